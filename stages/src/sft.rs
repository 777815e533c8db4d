//! Stage 1: supervised fine-tuning on demonstrations (InstructGPT, Ouyang
//! et al. 2022, section 3.5).
//!
//! Next-token cross-entropy on answer tokens only; AdamW with decay on 2-D
//! weights; linear warm-up then cosine decay; global-norm clipping;
//! gradient accumulation; periodic eval loss and checkpoints.
//!
//! Exact resume: a checkpoint holds weights, AdamW moments and the step.
//! The data order is a function of (seed, epoch) and the dropout RNG is
//! reseeded from (seed, step) before every step, so the step number alone
//! restores the data position and the RNG: a resumed run ends with the same
//! weights, bit for bit on CPU, as an uninterrupted one.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rlhf_datasets::batch::{collate, tokenize_pairs, train_eval_split, LmBatch, TokenizedPair};
use rlhf_datasets::load::read_table;
use rlhf_datasets::schema::{sft_records, ChatTemplate};
use rlhf_datasets::task;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::Model;
use crate::gpt::{Gpt, Head};
use crate::optim::{AdamWConfig, LrSchedule};
use crate::sample::{generate, SamplingConfig, TokenSpec};
use crate::train::{
    check_finite, finished_summary, io_err, progress_bar, start_or_resume, write_summary,
    Checkpointer, EpochBatches, MetricsLog, StageError, Start, METRICS_FILE,
};

/// Settings of the SFT stage (the `sft` stage of an experiment file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    /// Demonstrations: `{prompt, completion}` or `{messages}` (JSONL, JSONL.gz, Parquet, CSV).
    pub data: PathBuf,
    /// A model folder to start from (rlhf checkpoint or HF GPT-2); none
    /// starts from a random model of the experiment's `model` shape.
    pub init: Option<PathBuf>,
    /// Held-out share of the demonstrations for the eval loss.
    pub eval_fraction: f64,
    pub eval_max_examples: usize,
    /// Longest example in tokens (capped by the model's n_positions).
    pub max_len: usize,
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    pub epochs: usize,
    /// Stop after this many optimiser steps (overrides `epochs`).
    pub max_steps: Option<i64>,
    pub optimizer: AdamWConfig,
    pub schedule: LrSchedule,
    /// Global gradient-norm bound; 0 disables clipping.
    pub max_grad_norm: f64,
    pub eval_every: i64,
    pub checkpoint_every: i64,
    /// Prompts (`{prompt}` rows) to answer greedily after training, scored
    /// by the bundled task's gold judge where it knows the prompt.
    pub eval_prompts: Option<PathBuf>,
    pub eval_max_new_tokens: i64,
    pub seed: u64,
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            data: PathBuf::from("datasets/task/sft.jsonl"),
            init: None,
            eval_fraction: 0.05,
            eval_max_examples: 500,
            max_len: 128,
            batch_size: 32,
            grad_accum: 1,
            epochs: 2,
            max_steps: None,
            optimizer: AdamWConfig {
                lr: 1e-3,
                ..AdamWConfig::default()
            },
            schedule: LrSchedule::default(),
            max_grad_norm: 1.0,
            eval_every: 50,
            checkpoint_every: 100,
            eval_prompts: None,
            eval_max_new_tokens: 24,
            seed: 0,
        }
    }
}

impl SftConfig {
    pub fn validate(&self) -> Result<(), StageError> {
        let bad = |m: String| Err(StageError::Config(format!("sft: {m}")));
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad("batch_size and grad_accum must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return bad(format!(
                "eval_fraction must lie in [0, 1), got {}",
                self.eval_fraction
            ));
        }
        if self.max_len < 2 {
            return bad(format!("max_len must be at least 2, got {}", self.max_len));
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return bad("epochs is 0 and max_steps is unset: nothing to train".into());
        }
        if self.max_steps.is_some_and(|s| s < 1) {
            return bad("max_steps must be at least 1".into());
        }
        if self.eval_every < 1 || self.checkpoint_every < 1 {
            return bad("eval_every and checkpoint_every must be at least 1".into());
        }
        if self.optimizer.lr.is_nan() || self.optimizer.lr <= 0.0 {
            return bad(format!(
                "optimizer.lr must be positive, got {}",
                self.optimizer.lr
            ));
        }
        Ok(())
    }
}

pub use crate::train::ScratchModel;

/// One SFT run.
#[derive(Debug, Clone)]
pub struct SftJob {
    pub config: SftConfig,
    pub scratch: ScratchModel,
    pub out_dir: PathBuf,
    pub device: Device,
    /// Stop (as if killed) after this step, leaving its checkpoint: for
    /// resume tests.
    pub stop_after_step: Option<i64>,
}

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
    /// Mean gold-judge score of greedy answers to `eval_prompts`.
    pub eval_gold_score: Option<f64>,
    /// Share of those answers that are exactly right.
    pub eval_exact: Option<f64>,
    pub tokens_per_second: f64,
    pub wall_seconds: f64,
}

/// State saved with every SFT checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SftState {
    stage: String,
    /// Optimiser steps done.
    step: i64,
    total_steps: i64,
    seed: u64,
    last_train_loss: f64,
    done: bool,
}

/// The SFT loss of a batch: mean NLL over answer tokens, as
/// `(sum of masked NLL, number of answer tokens)` tensors.
pub fn masked_nll_sum(model: &Gpt, batch: &LmBatch, device: Device, train: bool) -> (Tensor, f64) {
    let shape = [batch.rows as i64, batch.width as i64];
    let inputs = Tensor::from_slice(&batch.input_ids)
        .view(shape)
        .to_device(device);
    let targets = Tensor::from_slice(&batch.targets)
        .view(shape)
        .to_device(device);
    let mask = Tensor::from_slice(&batch.loss_mask)
        .view(shape)
        .to_device(device);
    let logits = model.forward_logits(&inputs, None, train);
    let nll = token_nll(&logits, &targets);
    ((nll * mask).sum(Kind::Float), batch.target_tokens as f64)
}

/// Per-position NLL `(B, T)` of `targets` under `logits` `(B, T, V)`.
pub fn token_nll(logits: &Tensor, targets: &Tensor) -> Tensor {
    -crate::score::gather_logprobs(logits, targets)
}

/// Runs (or resumes, or finds already done) an SFT run.
pub fn run(job: &SftJob) -> Result<SftSummary, StageError> {
    let cfg = &job.config;
    cfg.validate()?;
    let started = Instant::now();
    let out = &job.out_dir;
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    if let Some(summary) = finished_summary(out) {
        tracing::info!("sft: {} is complete; nothing to do", out.display());
        return Ok(summary);
    }

    // The model: a periodic checkpoint to resume, else init or scratch.
    let Start {
        model,
        mut opt,
        resumed_at,
        state,
    } = start_or_resume::<SftState>(
        out,
        Head::Lm,
        cfg.init.as_deref(),
        &job.scratch,
        &cfg.optimizer,
        cfg.seed,
        job.device,
    )?;

    // The data.
    let table = read_table(&cfg.data)?;
    let records = sft_records(
        &table,
        &cfg.data,
        &ChatTemplate::for_tokenizer(&model.tokenizer),
    )?;
    let max_len = cfg.max_len.min(model.gpt.config().n_positions as usize);
    let (pairs, cut) = tokenize_pairs(&records, &model.tokenizer, max_len)?;
    if cut.prompts_cut + cut.completions_cut > 0 {
        tracing::warn!(
            "sft: truncated to {max_len} tokens: {} prompts cut on the left, {} answers cut on the right",
            cut.prompts_cut,
            cut.completions_cut
        );
    }
    let (train_idx, eval_idx) = train_eval_split(
        pairs.len(),
        cfg.eval_fraction,
        cfg.eval_max_examples,
        cfg.seed,
    );
    let train: Vec<&TokenizedPair> = train_idx.iter().map(|&i| &pairs[i]).collect();
    let eval: Vec<&TokenizedPair> = eval_idx.iter().map(|&i| &pairs[i]).collect();
    let per_epoch = train.len().div_ceil(cfg.batch_size) as i64;
    let total_steps = cfg.max_steps.unwrap_or_else(|| {
        ((cfg.epochs as u64 * per_epoch as u64).div_ceil(cfg.grad_accum as u64) as i64).max(1)
    });
    tracing::info!(
        "sft: {} train / {} eval examples, {total_steps} steps of {} x {} on {:?}",
        train.len(),
        eval.len(),
        cfg.batch_size,
        cfg.grad_accum,
        job.device
    );

    let start_step = state.as_ref().map_or(0, |s| s.step);
    let mut metrics = MetricsLog::open(&out.join(METRICS_FILE), resumed_at)?;
    let checkpointer = Checkpointer {
        out_dir: out.clone(),
        every: cfg.checkpoint_every,
        total_steps,
        stop_after: job.stop_after_step,
    };
    let bar = progress_bar(total_steps as u64, start_step as u64, "sft");
    let pad = model.tokenizer.pad_id();
    let mut last_loss = state.as_ref().map_or(f64::NAN, |s| s.last_train_loss);
    let mut last_eval = None;
    let mut micro_batches = EpochBatches::new(train.len(), cfg.batch_size, cfg.seed);
    let (mut tokens_seen, mut train_time) = (0usize, 0.0f64);

    for step in start_step..total_steps {
        let t0 = Instant::now();
        tch::manual_seed((cfg.seed as i64).wrapping_mul(1_000_003).wrapping_add(step));
        let lr = cfg.schedule.lr(cfg.optimizer.lr, step, total_steps);
        // This step's micro-batches, from the seeded epoch order.
        let mut batches = Vec::with_capacity(cfg.grad_accum);
        for k in 0..cfg.grad_accum as i64 {
            let micro = step * cfg.grad_accum as i64 + k;
            let rows: Vec<&TokenizedPair> = micro_batches
                .rows(micro)
                .into_iter()
                .map(|i| train[i])
                .collect();
            batches.push(collate(&rows, pad));
        }
        let step_tokens: usize = batches.iter().map(|b| b.target_tokens).sum();
        opt.zero_grad();
        let mut loss_sum = 0.0;
        for batch in &batches {
            let (nll_sum, _) = masked_nll_sum(&model.gpt, batch, job.device, true);
            let loss = nll_sum / step_tokens as f64;
            loss.backward();
            loss_sum += loss.double_value(&[]);
            tokens_seen += batch.rows * batch.width;
        }
        check_finite(step + 1, "training loss", loss_sum)?;
        let grad_norm = opt.clip_grad_norm(cfg.max_grad_norm);
        check_finite(step + 1, "gradient norm", grad_norm)?;
        opt.step(lr);
        last_loss = loss_sum;
        let dt = t0.elapsed().as_secs_f64();
        train_time += dt;
        let done = step + 1;
        let mut record = json!({
            "step": done, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": batches.iter().map(|b| b.rows * b.width).sum::<usize>() as f64 / dt.max(1e-9),
            "epoch": (done * cfg.grad_accum as i64) as f64 / per_epoch as f64,
        });
        if done % cfg.eval_every == 0 || done == total_steps {
            let e = eval_loss(&model.gpt, &eval, cfg.batch_size, pad, job.device);
            if let Some(e) = e {
                record["eval_loss"] = json!(e);
            }
            last_eval = e;
        }
        metrics.write(&record);
        bar.set_position(done as u64);
        bar.set_message(format!("loss {loss_sum:.3}"));
        if done % cfg.eval_every == 0 {
            let eval = last_eval.map_or("-".into(), |e| format!("{e:.4}"));
            tracing::info!(
                "sft: step {done}/{total_steps} loss {loss_sum:.4} eval {eval} lr {lr:.2e}"
            );
        }
        let state = SftState {
            stage: "sft".into(),
            step: done,
            total_steps,
            seed: cfg.seed,
            last_train_loss: last_loss,
            done: false,
        };
        checkpointer
            .after_step(done, &model, &opt, &state)
            .inspect_err(|_| bar.abandon())?;
    }
    bar.finish_and_clear();

    let state = SftState {
        stage: "sft".into(),
        step: total_steps,
        total_steps,
        seed: cfg.seed,
        last_train_loss: last_loss,
        done: true,
    };
    checkpointer.finish(&model, &opt, &state)?;

    let (eval_gold_score, eval_exact) = match &cfg.eval_prompts {
        Some(path) => {
            let scores = gold_eval(
                &model,
                path,
                cfg.eval_max_new_tokens,
                job.device,
                &out.join("samples.jsonl"),
            )?;
            (scores.map(|s| s.0), scores.map(|s| s.1))
        }
        None => (None, None),
    };
    let summary = SftSummary {
        steps: total_steps,
        train_examples: train.len(),
        eval_examples: eval.len(),
        prompts_cut: cut.prompts_cut,
        completions_cut: cut.completions_cut,
        final_train_loss: last_loss,
        final_eval_loss: last_eval,
        eval_gold_score,
        eval_exact,
        tokens_per_second: tokens_seen as f64 / train_time.max(1e-9),
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    write_summary(out, &summary)?;
    Ok(summary)
}

/// Mean NLL per answer token over `pairs`; `None` if there are none.
pub fn eval_loss(
    model: &Gpt,
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

/// Greedy answers to the prompts of `path`, written to `samples_out`, and
/// (mean gold score, exact share) where the bundled task's judge knows the
/// prompts.
pub fn gold_eval(
    model: &Model,
    path: &Path,
    max_new_tokens: i64,
    device: Device,
    samples_out: &Path,
) -> Result<Option<(f64, f64)>, StageError> {
    let table = read_table(path)?;
    let prompts = rlhf_datasets::load::string_column(&table, path, "prompt", "{prompt}")?;
    let answers = greedy_answers(model, &prompts, max_new_tokens, device)?;
    let mut lines = String::new();
    let mut scores = Vec::new();
    for (p, a) in prompts.iter().zip(&answers) {
        let score = task::judge(p, a);
        if let Some(s) = score {
            scores.push(s);
        }
        lines.push_str(&json!({"prompt": p, "answer": a, "gold_score": score}).to_string());
        lines.push('\n');
    }
    rlhf_datasets::atomic::write_file(samples_out, lines.as_bytes())?;
    if scores.is_empty() {
        return Ok(None);
    }
    let mean = scores.iter().sum::<f64>() / scores.len() as f64;
    let exact = scores.iter().filter(|&&s| s == 1.0).count() as f64 / scores.len() as f64;
    Ok(Some((mean, exact)))
}

/// Greedy decoding of each prompt, in batches, answers as text.
pub fn greedy_answers(
    model: &Model,
    prompts: &[String],
    max_new_tokens: i64,
    device: Device,
) -> Result<Vec<String>, StageError> {
    let tok = &model.tokenizer;
    let cfg = SamplingConfig {
        temperature: 0.0,
        max_new_tokens,
        ..SamplingConfig::default()
    };
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(64) {
        let ids = chunk
            .iter()
            .map(|p| tok.encode(p))
            .collect::<Result<Vec<_>, _>>()?;
        let g = generate(&model.gpt, &ids, &cfg, TokenSpec::of(tok), device)?;
        for a in &g.answers {
            out.push(tok.decode(a, false)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpt::GptConfig;
    use rlhf_datasets::batch::collate;
    use tch::nn::VarStore;

    #[test]
    fn prompt_targets_contribute_nothing_to_the_loss() {
        let _rng = crate::rng_lock();
        tch::manual_seed(9);
        let vs = VarStore::new(Device::Cpu);
        let cfg = GptConfig {
            vocab_size: 40,
            n_positions: 16,
            n_embd: 16,
            n_layer: 1,
            n_head: 2,
            ..GptConfig::default()
        };
        let gpt = Gpt::new(&vs.root(), &cfg, Head::Lm);
        let pair = TokenizedPair {
            prompt: vec![1, 2, 3, 4],
            completion: vec![5, 6, 0],
        };
        let batch = collate(&[&pair], 39);
        let loss = |b: &LmBatch| {
            masked_nll_sum(&gpt, b, Device::Cpu, false)
                .0
                .double_value(&[])
        };
        let base = loss(&batch);
        // Position 1's target is prompt token 3: change it, nothing moves.
        let mut changed = batch.clone();
        assert_eq!(changed.loss_mask[1], 0.0);
        changed.targets[1] = 17;
        assert_eq!(loss(&changed), base);
        // Position 4's target is answer token 6: changing it does move the loss.
        let mut answer = batch.clone();
        assert_eq!(answer.loss_mask[4], 1.0);
        answer.targets[4] = 17;
        assert_ne!(loss(&answer), base);
        // And the loss is exactly the answer tokens' NLL, computed apart.
        let ids = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6]).view([1, 6]);
        let lp = crate::score::gather_logprobs(
            &gpt.forward_logits(&ids, None, false),
            &Tensor::from_slice(&[2i64, 3, 4, 5, 6, 0]).view([1, 6]),
        );
        let by_hand = -lp.narrow(1, 3, 3).sum(Kind::Double).double_value(&[]);
        assert!((by_hand - base).abs() < 1e-5, "{by_hand} vs {base}");
    }
}
