//! Stage 1: supervised fine-tuning on demonstrations (InstructGPT, Ouyang
//! et al. 2022, section 3.5).
//!
//! Next-token cross-entropy on answer tokens only, trained by the shared
//! loop ([`crate::train::fit`]: AdamW, warm-up then cosine decay, clipping,
//! accumulation, periodic eval and checkpoints, exact resume). This file
//! holds the stage's settings, its data, its loss and its eval.

use std::path::PathBuf;
use std::time::Instant;

use rlhf_datasets::batch::{collate, tokenize_pairs, train_eval_split, LmBatch, TokenizedPair};
use rlhf_datasets::load::read_table;
use rlhf_datasets::schema::{sft_records, ChatTemplate};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::check;
use crate::kind::{KindConfig, PathSetting, Plot, Produces};
use crate::model::checkpoint::Model;
use crate::model::gpt::Head;
use crate::model::network::Network;
use crate::objectives::nll::masked_nll_sum;
use crate::optim::{AdamWConfig, LrSchedule};
use crate::train::{
    finish, fit, learning, write_summary, Evaluation, FitRun, Objective, Ratio, Share,
    StageContext, StageError, TrainSettings, SAMPLES_AFTER,
};

/// Settings of the SFT stage (`kind: sft`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    #[serde(flatten, skip_deserializing)]
    pub train: TrainSettings,
    /// Demonstrations: `{prompt, completion}` or `{messages}` (JSONL, JSONL.gz, Parquet, CSV).
    pub data: PathBuf,
    /// A model folder to start from (rlhf checkpoint or HF GPT-2), or an
    /// earlier stage; none starts from a random model of the experiment's
    /// `model` shape.
    pub init: Option<PathBuf>,
    /// Held-out share of the demonstrations for the eval loss.
    pub eval_fraction: f64,
    pub eval_max_examples: usize,
    /// Longest example in tokens (capped by the model's n_positions).
    pub max_len: usize,
    /// Prompts (`{prompt}` rows) to answer greedily after training, scored
    /// by the judge where it knows the prompt.
    pub eval_prompts: Option<PathBuf>,
    pub eval_max_new_tokens: i64,
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            train: TrainSettings::new(
                32,
                2,
                AdamWConfig {
                    lr: 1e-3,
                    ..AdamWConfig::default()
                },
                LrSchedule::default(),
            ),
            data: PathBuf::new(),
            init: None,
            eval_fraction: 0.05,
            eval_max_examples: 500,
            max_len: 128,
            eval_prompts: None,
            eval_max_new_tokens: 24,
        }
    }
}

impl KindConfig for SftConfig {
    const KIND: &'static str = "sft";
    const PRODUCES: Produces = Produces::Policy;
    const PLOTS: &'static [Plot] = &[Plot::Loss {
        file: "sft_loss.png",
        title: "SFT loss (NLL per answer token)",
    }];
    type Summary = SftSummary;

    fn train(&mut self) -> Option<&mut TrainSettings> {
        Some(&mut self.train)
    }

    fn validate(&self) -> Result<(), StageError> {
        self.train.validate()?;
        check::example_split(self.eval_fraction, self.max_len)?;
        check::at_least("eval_max_new_tokens", self.eval_max_new_tokens, 1)?;
        Ok(())
    }

    fn paths(&mut self) -> Vec<PathSetting<'_>> {
        vec![
            PathSetting::data(
                "data",
                "the demonstrations: {prompt, completion} or {messages} rows",
                &mut self.data,
            ),
            PathSetting::optional_model("init", &mut self.init),
            PathSetting::optional_data("eval_prompts", &mut self.eval_prompts),
        ]
    }

    fn run(&self, ctx: &StageContext) -> Result<SftSummary, StageError> {
        run(self, ctx)
    }
}

pub use crate::train::ScratchModel;

/// What an SFT run reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SftSummary {
    pub steps: i64,
    pub train_examples: usize,
    pub eval_examples: usize,
    pub prompts_cut: usize,
    pub completions_cut: usize,
    pub final_train_loss: f64,
    pub final_eval_loss: Option<f64>,
    /// Mean judge score of greedy answers to `eval_prompts`.
    pub eval_gold_score: Option<f64>,
    /// Share of those answers that are exactly right.
    pub eval_exact: Option<f64>,
    pub tokens_per_second: f64,
    pub wall_seconds: f64,
    /// What the stage's numbers are set against.
    #[serde(default)]
    pub baselines: SftBaselines,
    /// Why the stage may not have learnt, each naming its baseline and
    /// the numbers ([`crate::train::learning`]); empty when it cleared them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
}

/// The numbers an SFT stage must beat.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SftBaselines {
    /// Loss per answer token of a model that knows only how often each
    /// answer token occurs in the training answers (their entropy, nats).
    pub frequency_loss: Option<f64>,
    /// The judge's mean score and exact share of the starting model's
    /// greedy answers to `eval_prompts` (step 0).
    pub eval_gold_before: Option<f64>,
    pub eval_exact_before: Option<f64>,
}

/// Next-token loss on answer tokens: a step's loss is the mean over every
/// answer token of its micro-batches.
struct Demonstrations<'a> {
    eval: Vec<&'a TokenizedPair>,
    eval_batch: usize,
    pad: i64,
    device: Device,
}

/// The held-out NLL per answer token.
#[derive(Debug, Clone, Copy)]
pub struct EvalLoss(pub f64);

impl Evaluation for EvalLoss {
    fn loss(&self) -> f64 {
        self.0
    }
    fn record(&self, record: &mut serde_json::Value) {
        record["eval_loss"] = serde_json::json!(self.0);
    }
}

impl Objective for Demonstrations<'_> {
    const LOSS: &'static str = "training loss";
    type Example = TokenizedPair;
    type Eval = EvalLoss;
    type Batch = LmBatch;

    fn collate(&self, pairs: &[&TokenizedPair]) -> LmBatch {
        collate(pairs, self.pad)
    }

    fn weight(&self, batch: &LmBatch) -> f64 {
        batch.target_tokens as f64
    }

    /// The step's loss is the mean over its answer tokens, on every rank.
    fn loss(&self, model: &Network, batch: &LmBatch, share: &Share) -> (Tensor, Vec<Ratio>) {
        let (nll_sum, _) = masked_nll_sum(model, batch, self.device, true);
        (nll_sum / share.step, vec![])
    }

    fn evaluate(&self, model: &Network) -> Option<EvalLoss> {
        eval_loss(model, &self.eval, self.eval_batch, self.pad, self.device).map(EvalLoss)
    }

    fn length(&self, pair: &TokenizedPair) -> usize {
        pair.len()
    }
}

/// Runs (or resumes, or finds already done) an SFT run.
pub fn run(cfg: &SftConfig, ctx: &StageContext) -> Result<SftSummary, StageError> {
    KindConfig::validate(cfg)?;
    let started = Instant::now();
    let train = &cfg.train;
    let run = FitRun::new("sft", train, ctx);
    let start = match run.begin(Head::Lm, cfg.init.as_deref(), ctx)? {
        Ok(start) => start,
        Err(done) => return Ok(done),
    };
    let (pairs, cut) = load_demonstrations(cfg, &start.model)?;
    let (train_idx, eval_idx) = train_eval_split(
        pairs.len(),
        cfg.eval_fraction,
        cfg.eval_max_examples,
        train.seed(),
    );
    let examples: Vec<&TokenizedPair> = train_idx.iter().map(|&i| &pairs[i]).collect();
    let objective = Demonstrations {
        eval: eval_idx.iter().map(|&i| &pairs[i]).collect(),
        eval_batch: train.batch_size,
        pad: start.model.tokenizer.pad_id(),
        device: ctx.device,
    };
    tracing::info!(
        "sft: {} train / {} eval examples, {} steps of {} x {} on {:?}",
        examples.len(),
        objective.eval.len(),
        train.total_steps(examples.len()),
        train.batch_size,
        train.grad_accum,
        ctx.device
    );
    let longest = examples.iter().map(|e| e.prompt.len() + e.completion.len());
    let longest = longest.max().unwrap_or(0);
    let rows = (train.batch_size / run.ranks.world())
        .max(1)
        .min(examples.len());
    crate::train::check_step_memory(&start.model, rows, longest)?;
    let frequency_loss = learning::frequency_loss(examples.iter().map(|e| learned_tokens(e)));
    let out = &ctx.out_dir;
    // Rank 0 alone writes the run folder (samples, summary).
    let main = run.ranks.is_main();
    let (prompts, max_new) = (cfg.eval_prompts.as_deref(), cfg.eval_max_new_tokens);
    let fresh = start.state.is_none();
    // One process only: with several ranks, rank 0 would judge while the
    // others wait in fit's first collective, which has a timeout.
    let judge_before = match run.ranks.world() {
        1 => ctx.judged_start(&start.model, prompts, max_new, fresh)?,
        _ => None,
    };
    let fitted = fit(&run, start, &objective, &examples)?;
    finish(&run, &fitted)?;
    let judge_after = match main {
        true => ctx.judged_eval(&fitted.model, prompts, max_new, SAMPLES_AFTER)?,
        false => None,
    };
    let final_eval_loss = fitted.last_eval.map(|e| e.0);
    let flags = learning::flags(
        main,
        [
            fitted.warning.clone(),
            learning::near_frequency_baseline("sft", final_eval_loss, frequency_loss),
            learning::no_judge_gain(
                "sft",
                "the starting model's (step 0)",
                judge_before.map(|j| j.mean),
                judge_after.map(|j| j.mean),
            ),
        ],
    );
    let summary = SftSummary {
        steps: fitted.steps,
        train_examples: examples.len(),
        eval_examples: objective.eval.len(),
        prompts_cut: cut.prompts_cut,
        completions_cut: cut.completions_cut,
        final_train_loss: fitted.last_loss,
        final_eval_loss,
        eval_gold_score: judge_after.map(|j| j.mean),
        eval_exact: judge_after.map(|j| j.exact),
        tokens_per_second: fitted.tokens_per_second,
        wall_seconds: started.elapsed().as_secs_f64(),
        baselines: SftBaselines {
            frequency_loss,
            eval_gold_before: judge_before.map(|j| j.mean),
            eval_exact_before: judge_before.map(|j| j.exact),
        },
        flags,
    };
    if main {
        write_summary(out, &summary)?;
    }
    Ok(summary)
}

/// The completion tokens the loss counts (a conversation's assistant
/// turns; all of them without a mask).
fn learned_tokens(pair: &TokenizedPair) -> Vec<i64> {
    match &pair.learn {
        Some(mask) => pair
            .completion
            .iter()
            .zip(mask)
            .filter(|(_, &learn)| learn)
            .map(|(&t, _)| t)
            .collect(),
        None => pair.completion.clone(),
    }
}

/// The demonstrations tokenized for `model`, and how many were cut.
fn load_demonstrations(
    cfg: &SftConfig,
    model: &Model,
) -> Result<(Vec<TokenizedPair>, rlhf_datasets::batch::TruncationStats), StageError> {
    let table = read_table(&cfg.data)?;
    let records = sft_records(
        &table,
        &cfg.data,
        &ChatTemplate::for_tokenizer(&model.tokenizer),
    )?;
    let max_len = cfg.max_len.min(model.net.n_positions() as usize);
    let (pairs, cut) = tokenize_pairs(&records, &model.tokenizer, max_len)?;
    if cut.prompts_cut + cut.completions_cut > 0 {
        tracing::warn!(
            "sft: truncated to {max_len} tokens: {} prompts cut on the left, {} answers cut on the right",
            cut.prompts_cut,
            cut.completions_cut
        );
    }
    Ok((pairs, cut))
}

/// Mean NLL per answer token over `pairs`; `None` if there are none.
pub fn eval_loss(
    model: &Network,
    pairs: &[&TokenizedPair],
    batch_size: usize,
    pad: i64,
    device: Device,
) -> Option<f64> {
    if pairs.is_empty() {
        return None;
    }
    tch::no_grad(|| {
        let (mut sum, mut count) = (0.0, 0.0);
        for chunk in pairs.chunks(batch_size.max(1)) {
            let batch = collate(chunk, pad);
            let (s, n) = masked_nll_sum(model, &batch, device, false);
            sum += s.double_value(&[]);
            count += n;
        }
        Some(sum / count)
    })
}
