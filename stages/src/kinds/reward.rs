//! Stage 2: the reward model (InstructGPT, Ouyang et al. 2022, section 3.5).
//!
//! The GPT trunk (from the SFT checkpoint) with a scalar head read at the
//! last token of each answer (its EOS), or averaged over the answer's
//! tokens (`pooling: mean`). Loss: Bradley-Terry,
//! `-log sigmoid(r_better - r_worse - margin)`.
//!
//! K-wise batching as InstructGPT trained: each of a prompt's K answers is
//! forwarded once, and all C(K,2) pairs of the prompt form one batch
//! element whose loss is the mean over its pairs. A prompt's pairs never
//! straddle two batches. One epoch by default: InstructGPT saw more overfit.
//!
//! After training the head's bias is shifted so that demonstrations score
//! mean 0, as InstructGPT normalised its reward model before RL; the
//! statistics are kept in the checkpoint's `config.json`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rlhf_datasets::batch::{
    collate_groups, group_width, tokenize_pairs, train_eval_split, GroupBatch, TokenizedGroup,
};
use rlhf_datasets::load::read_table;
use rlhf_datasets::schema::{sft_records, ChatTemplate};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::check;
use crate::kind::{KindConfig, LoopRole, PathSetting, Plot, Produces};
use crate::model::checkpoint::Model;
use crate::model::gpt::Head;
use crate::model::network::Network;
use crate::objectives::rankings::{
    batch_rewards, kwise_loss, load_groups, sequence_rewards, Pooling, RewardInput, RANKINGS_ABOUT,
    SCORE_BATCH,
};
use crate::optim::{AdamWConfig, LrSchedule};
use crate::train::{
    finish, fit, learning, write_summary, Evaluation, FitRun, Objective, Ratio, Share,
    StageContext, StageError, TrainSettings,
};

/// Settings of a reward stage (`kind: reward`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    /// `batch_size` counts prompts (each with its ranked answers).
    #[serde(flatten, skip_deserializing)]
    pub train: TrainSettings,
    /// Rankings: pairwise, implicit-prompt pairwise or K-wise rows.
    pub data: PathBuf,
    /// Held-out rankings for eval; unset: `eval_fraction` of `data`.
    pub eval_data: Option<PathBuf>,
    pub eval_fraction: f64,
    /// The model to start from (the SFT checkpoint); its scalar head is
    /// created if it has none. Unset: a random model.
    pub init: Option<PathBuf>,
    pub max_len: usize,
    /// Demonstrations (`{prompt, completion}`) whose mean reward is shifted
    /// to 0 after training; unset: no normalisation.
    pub normalize_on: Option<PathBuf>,
    pub normalize_max_examples: usize,
    /// Where the score is read: `last` (the EOS) or `mean` (over the
    /// answer's tokens). Saved in the checkpoint for every later reader.
    pub pooling: Pooling,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            // One epoch: InstructGPT saw more overfit.
            train: TrainSettings::new(
                8,
                1,
                AdamWConfig {
                    lr: 3e-4,
                    weight_decay: 0.0,
                    ..AdamWConfig::default()
                },
                LrSchedule {
                    warmup_steps: 10,
                    min_lr_ratio: 0.1,
                },
            ),
            data: PathBuf::new(),
            eval_data: None,
            eval_fraction: 0.05,
            init: None,
            max_len: 128,
            normalize_on: None,
            normalize_max_examples: 2000,
            pooling: Pooling::Last,
        }
    }
}

impl KindConfig for RewardConfig {
    const KIND: &'static str = "reward";
    const PRODUCES: Produces = Produces::RewardModel;
    const LOOP_ROLE: LoopRole = LoopRole::Scorer;
    const PLOTS: &'static [Plot] = &[Plot::PairwiseAccuracy {
        file: "reward_accuracy.png",
        title: "Reward model pairwise accuracy (faint: train batches, EMA)",
    }];
    type Summary = RewardSummary;

    fn validate(&self) -> Result<(), StageError> {
        self.train.validate()?;
        check::example_split(self.eval_fraction, self.max_len)?;
        check::at_least(
            "normalize_max_examples",
            self.normalize_max_examples as i64,
            1,
        )?;
        Ok(())
    }

    fn paths(&mut self) -> Vec<PathSetting<'_>> {
        vec![
            PathSetting::data("data", RANKINGS_ABOUT, &mut self.data),
            PathSetting::optional_data("eval_data", &mut self.eval_data),
            PathSetting::optional_data("normalize_on", &mut self.normalize_on),
            PathSetting::optional_model("init", &mut self.init),
        ]
    }

    fn run(&self, ctx: &StageContext) -> Result<RewardSummary, StageError> {
        run(self, ctx)
    }

    fn train(&mut self) -> Option<&mut TrainSettings> {
        Some(&mut self.train)
    }
}

/// Held-out quality of a reward model.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct RewardEval {
    pub loss: f64,
    /// Share of pairs where the better answer gets the higher reward.
    pub accuracy: f64,
    /// Mean `r_better - r_worse`.
    pub mean_margin: f64,
    pub reward_mean: f64,
    pub reward_std: f64,
    pub pairs: usize,
    /// The same pairs ranked by "the longer answer wins" (in tokens; an
    /// equal length counts one half): a baseline that knows no content.
    #[serde(default)]
    pub length_accuracy: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RewardSummary {
    pub steps: i64,
    pub train_groups: usize,
    pub train_pairs: usize,
    /// Rows of `data` passed over as saying nothing (chosen identical to
    /// rejected, every answer ranked equal).
    #[serde(default)]
    pub skipped_rows: usize,
    pub eval: Option<RewardEval>,
    /// Mean and sd of the demonstrations' rewards before the shift.
    pub normalization: Option<RewardNormalization>,
    pub wall_seconds: f64,
    /// Why the stage may not have learnt, each naming its baseline (the
    /// eval loss by chance, ln 2; chance and length-only accuracy) and the
    /// numbers; empty when it cleared them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct RewardNormalization {
    pub mean_before: f64,
    pub std: f64,
    pub examples: usize,
}

impl Evaluation for RewardEval {
    fn loss(&self) -> f64 {
        self.loss
    }
    fn record(&self, record: &mut serde_json::Value) {
        record["eval_loss"] = json!(self.loss);
        record["eval_accuracy"] = json!(self.accuracy);
        record["eval_mean_margin"] = json!(self.mean_margin);
        record["reward_mean"] = json!(self.reward_mean);
        record["reward_std"] = json!(self.reward_std);
    }
}

pub fn evaluate(
    model: &Network,
    pooling: Pooling,
    groups: &[&TokenizedGroup],
    batch_size: usize,
    pad: i64,
    device: Device,
) -> Option<RewardEval> {
    if groups.is_empty() {
        return None;
    }
    tch::no_grad(|| {
        let (mut loss, mut correct, mut gaps, mut pairs) = (0.0, 0usize, 0.0, 0usize);
        let mut all_rewards = Vec::new();
        for chunk in groups.chunks(batch_size.max(1)) {
            let batch = collate_groups(chunk, pad);
            let rewards = batch_rewards(model, &batch, pooling, device, false);
            let (l, gap) = kwise_loss(&rewards, &batch);
            loss += l.double_value(&[]) * chunk.len() as f64;
            let gap: Vec<f64> =
                Vec::try_from(gap.to_kind(Kind::Double).to_device(Device::Cpu)).expect("f64");
            correct += gap.iter().filter(|&&g| g > 0.0).count();
            gaps += gap.iter().sum::<f64>();
            pairs += gap.len();
            all_rewards.extend(
                Vec::<f64>::try_from(rewards.to_kind(Kind::Double).to_device(Device::Cpu))
                    .expect("f64"),
            );
        }
        let (mean, std) = mean_std(&all_rewards);
        Some(RewardEval {
            loss: loss / groups.len() as f64,
            accuracy: correct as f64 / pairs.max(1) as f64,
            mean_margin: gaps / pairs.max(1) as f64,
            reward_mean: mean,
            reward_std: std,
            pairs,
            length_accuracy: learning::length_accuracy(groups),
        })
    })
}

/// The reward model's pairwise accuracy and loss on a rankings file (any
/// format the reward stage reads); `None` if it has no comparisons.
pub fn evaluate_file(
    model: &Model,
    path: &Path,
    max_len: usize,
    batch_size: usize,
    device: Device,
) -> Result<Option<RewardEval>, StageError> {
    let (groups, _) = load_groups(path, model, max_len)?;
    let refs: Vec<&TokenizedGroup> = groups.iter().collect();
    Ok(evaluate(
        &model.net,
        Pooling::of(model),
        &refs,
        batch_size,
        model.tokenizer.pad_id(),
        device,
    ))
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// The K-wise Bradley-Terry loss over ranked groups: a step's loss is the
/// mean over its micro-batches of each prompt's mean pair loss.
struct Rankings<'a> {
    eval: Vec<&'a TokenizedGroup>,
    pooling: Pooling,
    eval_batch: usize,
    pad: i64,
    device: Device,
}

impl Objective for Rankings<'_> {
    type Batch = GroupBatch;
    type Example = TokenizedGroup;
    const LOSS: &'static str = "reward-model loss";
    type Eval = RewardEval;

    fn collate(&self, groups: &[&TokenizedGroup]) -> GroupBatch {
        collate_groups(groups, self.pad)
    }

    fn weight(&self, batch: &GroupBatch) -> f64 {
        batch.groups as f64
    }

    /// A micro-batch's loss is the mean over its groups, on every rank
    /// (`kwise_loss` is this rank's mean); the step's, the mean over its
    /// micro-batches.
    fn loss(&self, model: &Network, batch: &GroupBatch, share: &Share) -> (Tensor, Vec<Ratio>) {
        let rewards = batch_rewards(model, batch, self.pooling, self.device, true);
        let (loss, gap) = kwise_loss(&rewards, batch);
        let loss = loss * (share.local / share.micro);
        let correct = i64::try_from(gap.gt(0.0).sum(Kind::Int64)).unwrap_or(0);
        let accuracy = Ratio {
            name: "accuracy",
            num: correct as f64,
            den: batch.better.len() as f64,
        };
        (loss / share.micro_batches as f64, vec![accuracy])
    }

    fn chance_loss(&self) -> Option<f64> {
        Some(std::f64::consts::LN_2)
    }

    fn length(&self, group: &TokenizedGroup) -> usize {
        group_width(group)
    }

    fn evaluate(&self, model: &Network) -> Option<RewardEval> {
        evaluate(
            model,
            self.pooling,
            &self.eval,
            self.eval_batch,
            self.pad,
            self.device,
        )
    }
}

/// Runs (or resumes, or finds done) a reward-model run.
pub fn run(cfg: &RewardConfig, ctx: &StageContext) -> Result<RewardSummary, StageError> {
    KindConfig::validate(cfg)?;
    let started = Instant::now();
    let train = &cfg.train;
    let run = FitRun::new("reward", train, ctx);
    let mut start = match run.begin(Head::Scalar, cfg.init.as_deref(), ctx)? {
        Ok(start) => start,
        Err(done) => return Ok(done),
    };
    // Recorded before the first checkpoint: every later reader pools alike.
    cfg.pooling.record(&mut start.model);
    let max_len = cfg.max_len.min(start.model.net.n_positions() as usize);
    let (all, skipped_rows) = load_groups(&cfg.data, &start.model, max_len)?;
    let held_out = match &cfg.eval_data {
        Some(p) => load_groups(p, &start.model, max_len)?.0,
        None => vec![],
    };
    let (train_idx, eval_idx) = match &cfg.eval_data {
        Some(_) => ((0..all.len()).collect(), vec![]),
        None => train_eval_split(all.len(), cfg.eval_fraction, usize::MAX, train.seed()),
    };
    let examples: Vec<&TokenizedGroup> = train_idx.iter().map(|&i| &all[i]).collect();
    let objective = Rankings {
        eval: match &cfg.eval_data {
            Some(_) => held_out.iter().collect(),
            None => eval_idx.iter().map(|&i| &all[i]).collect(),
        },
        pooling: cfg.pooling,
        eval_batch: train.batch_size,
        pad: start.model.tokenizer.pad_id(),
        device: ctx.device,
    };
    let train_pairs: usize = examples.iter().map(|g| g.pairs.len()).sum();
    tracing::info!(
        "reward: {} train prompts ({train_pairs} pairs) / {} eval prompts, {} steps of {} prompts",
        examples.len(),
        objective.eval.len(),
        train.total_steps(examples.len()),
        train.batch_size * train.grad_accum
    );
    let groups = examples.iter().copied();
    crate::train::check_groups_memory(&start.model, groups, train.batch_size, run.ranks)?;
    let mut fitted = fit(&run, start, &objective, &examples)?;
    let normalization = match &cfg.normalize_on {
        Some(path) => Some(normalize(
            &mut fitted.model,
            path,
            max_len,
            cfg.normalize_max_examples,
            ctx.device,
        )?),
        None => None,
    };
    // Eval after the shift: accuracy is unchanged, reward mean moves.
    let final_eval = objective.evaluate(&fitted.model.net).or(fitted.last_eval);
    finish(&run, &fitted)?;
    let summary = RewardSummary {
        steps: fitted.steps,
        train_groups: examples.len(),
        train_pairs,
        skipped_rows,
        eval: final_eval,
        normalization,
        wall_seconds: started.elapsed().as_secs_f64(),
        flags: learning::flags(
            run.ranks.is_main(),
            [
                fitted.warning.clone(),
                learning::below_accuracy_baselines(
                    "reward",
                    final_eval.map(|e| e.accuracy),
                    final_eval.and_then(|e| e.length_accuracy),
                ),
            ],
        ),
    };
    // Rank 0 alone writes the run folder.
    if run.ranks.is_main() {
        write_summary(&ctx.out_dir, &summary)?;
    }
    Ok(summary)
}

/// Shifts the head's bias so the demonstrations of `path` score mean 0.
fn normalize(
    model: &mut Model,
    path: &Path,
    max_len: usize,
    max_examples: usize,
    device: Device,
) -> Result<RewardNormalization, StageError> {
    let records = sft_records(
        &read_table(path)?,
        path,
        &ChatTemplate::for_tokenizer(&model.tokenizer),
    )?;
    let records = &records[..records.len().min(max_examples)];
    let (pairs, _) = tokenize_pairs(records, &model.tokenizer, max_len)?;
    let inputs: Vec<RewardInput> = pairs
        .iter()
        .map(|p| RewardInput {
            ids: p.prompt.iter().chain(&p.completion).copied().collect(),
            answer_start: p.prompt.len(),
        })
        .collect();
    let rewards = sequence_rewards(model, &inputs, SCORE_BATCH, device);
    let (mean, std) = mean_std(&rewards);
    model.net.shift_scalar_bias(-mean);
    let stats = RewardNormalization {
        mean_before: mean,
        std,
        examples: rewards.len(),
    };
    model.meta.extra.insert(
        "reward_normalization".into(),
        json!({"mean_before": mean, "std": std, "examples": rewards.len(), "source": path.display().to_string()}),
    );
    tracing::info!("reward: demonstrations scored mean {mean:.4} (sd {std:.4}); bias shifted to centre them at 0");
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gpt::GptConfig;
    use crate::objectives::rankings::reward_sequence;
    use tch::nn::VarStore;

    #[test]
    fn loss_matches_hand_computed_values() {
        // Two groups: K=2 with margin 1, and K=3 (three pairs).
        let batch = GroupBatch {
            rows: 5,
            width: 1,
            input_ids: vec![0; 5],
            last_index: vec![0; 5],
            answer_start: vec![0; 5],
            better: vec![0, 2, 2, 3],
            worse: vec![1, 3, 4, 4],
            margin: vec![1.0, 0.0, 0.0, 0.0],
            pair_weight: vec![0.5, 1.0 / 6.0, 1.0 / 6.0, 1.0 / 6.0],
            groups: 2,
        };
        let r = Tensor::from_slice(&[2.0f32, 0.5, 1.0, -1.0, 0.0]);
        let (loss, gap) = kwise_loss(&r, &batch);
        let nls = |x: f64| (1.0 + (-x).exp()).ln(); // -log sigmoid(x)
                                                    // Group 1: -log s(2 - 0.5 - 1) = nls(0.5). Group 2: mean of nls(2), nls(1), nls(-1).
        let expected = 0.5 * nls(0.5) + 0.5 * (nls(2.0) + nls(1.0) + nls(-1.0)) / 3.0;
        assert!(
            (loss.double_value(&[]) - expected).abs() < 1e-6,
            "{} vs {expected}",
            loss.double_value(&[])
        );
        assert_eq!(
            Vec::<f32>::try_from(gap).unwrap(),
            vec![1.5, 2.0, 1.0, -1.0]
        );
        // By the numbers: nls(0.5) = 0.474077, nls(2) = 0.126928, nls(1) = 0.313262, nls(-1) = 1.313262.
        assert!(
            (expected - (0.5 * 0.474077 + 0.5 * (0.126928 + 0.313262 + 1.313262) / 3.0)).abs()
                < 1e-5
        );
    }

    #[test]
    fn kwise_batch_equals_explicit_pairs_with_k_forwards() {
        let _rng = crate::rng_lock();
        let (vs, gpt) = crate::tiny_gpt(21, 32, 16, 1, Head::Scalar);
        let group = TokenizedGroup {
            prompt: vec![1, 2, 3],
            responses: vec![vec![4, 0], vec![5, 6, 0], vec![7, 0], vec![8, 9, 10, 0]],
            pairs: vec![(1, 0), (1, 2), (1, 3), (0, 2), (0, 3), (3, 2)],
            margin: 0.25,
        };
        let grads = |vs: &VarStore| -> Vec<Tensor> {
            let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v.iter().map(|(_, t)| t.grad().copy()).collect()
        };
        let zero = |vs: &VarStore| {
            for (_, t) in vs.variables() {
                let mut g = t.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
        };
        // K-wise: one batch of K = 4 rows.
        let batch = collate_groups(&[&group], 31);
        assert_eq!(batch.rows, 4);
        let (loss, _) = kwise_loss(
            &batch_rewards(&gpt, &batch, Pooling::Last, Device::Cpu, false),
            &batch,
        );
        loss.backward();
        let kwise_grads = grads(&vs);
        zero(&vs);
        // Explicit: each pair as its own K = 2 group, 2 rows per pair, 12 forwards.
        let pair_groups: Vec<TokenizedGroup> = group
            .pairs
            .iter()
            .map(|&(b, w)| TokenizedGroup {
                prompt: group.prompt.clone(),
                responses: vec![group.responses[b].clone(), group.responses[w].clone()],
                pairs: vec![(0, 1)],
                margin: group.margin,
            })
            .collect();
        let refs: Vec<&TokenizedGroup> = pair_groups.iter().collect();
        let explicit = collate_groups(&refs, 31);
        assert_eq!(explicit.rows, 12);
        let (loss2, _) = kwise_loss(
            &batch_rewards(&gpt, &explicit, Pooling::Last, Device::Cpu, false),
            &explicit,
        );
        loss2.backward();
        let explicit_grads = grads(&vs);
        assert!((loss.double_value(&[]) - loss2.double_value(&[])).abs() < 1e-6);
        for (a, b) in kwise_grads.iter().zip(&explicit_grads) {
            let d = (a - b).abs().max().double_value(&[]);
            assert!(d < 1e-5, "gradient differs by {d}"); // f32 sums in another order
        }
    }

    #[test]
    fn mean_pooling_averages_the_answer_tokens_and_is_read_from_the_checkpoint() {
        let _rng = crate::rng_lock();
        tch::manual_seed(22);
        let cfg = GptConfig {
            vocab_size: 300,
            n_positions: 16,
            n_embd: 16,
            n_layer: 1,
            n_head: 2,
            ..GptConfig::default()
        };
        let tok = rlhf_datasets::Tokenizer::bytes();
        let mut model = Model::init(&cfg.into(), Head::Scalar, tok, Device::Cpu).unwrap();
        let group = TokenizedGroup {
            prompt: vec![1, 2, 3],
            responses: vec![vec![4, 0], vec![5, 6, 7, 0]],
            pairs: vec![(1, 0)],
            margin: 0.0,
        };
        let batch = collate_groups(&[&group], 31);
        assert_eq!(batch.answer_start, vec![3, 3]);
        let ids = Tensor::from_slice(&batch.input_ids).view([2, batch.width as i64]);
        let values: Vec<f32> = Vec::try_from(
            tch::no_grad(|| model.net.values(&model.net.hidden(&ids, None, None, false)))
                .reshape([-1]),
        )
        .unwrap();
        let w = batch.width;
        // By hand: row 0 averages positions 3..=4, row 1 positions 3..=6.
        let expected = [
            (values[3] + values[4]) / 2.0,
            (values[w + 3] + values[w + 4] + values[w + 5] + values[w + 6]) / 4.0,
        ];
        let mean: Vec<f32> = Vec::try_from(tch::no_grad(|| {
            batch_rewards(&model.net, &batch, Pooling::Mean, Device::Cpu, false)
        }))
        .unwrap();
        let last: Vec<f32> = Vec::try_from(tch::no_grad(|| {
            batch_rewards(&model.net, &batch, Pooling::Last, Device::Cpu, false)
        }))
        .unwrap();
        for i in 0..2 {
            assert!(
                (mean[i] - expected[i]).abs() < 1e-6,
                "{mean:?} vs {expected:?}"
            );
        }
        assert_eq!(last, vec![values[4], values[w + 6]]);

        // The pooling travels with the checkpoint to every reader.
        let inputs: Vec<RewardInput> = group
            .responses
            .iter()
            .map(|r| RewardInput {
                ids: group.prompt.iter().chain(r).copied().collect(),
                answer_start: group.prompt.len(),
            })
            .collect();
        let close =
            |a: &[f64], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - *y as f64).abs() < 1e-6);
        assert_eq!(Pooling::of(&model), Pooling::Last);
        assert!(close(
            &sequence_rewards(&model, &inputs, 8, Device::Cpu),
            &last
        ));
        Pooling::Mean.record(&mut model);
        let dir = tempfile::tempdir().unwrap();
        model.save(&dir.path().join("rm")).unwrap();
        let back = Model::load(
            &dir.path().join("rm"),
            crate::model::checkpoint::HeadChoice::AsSaved,
            Device::Cpu,
        )
        .unwrap();
        assert_eq!(Pooling::of(&back), Pooling::Mean);
        assert!(close(
            &sequence_rewards(&back, &inputs, 1, Device::Cpu),
            &mean
        ));
    }

    #[test]
    fn reward_sequence_keeps_the_answer_start_when_cut() {
        let tok = rlhf_datasets::Tokenizer::bytes();
        let (full, cut) = reward_sequence(&tok, "abcd", "xy", 16).unwrap();
        assert_eq!((full.ids.len(), full.answer_start, cut), (7, 4, false));
        let (short, cut) = reward_sequence(&tok, "abcd", "xy", 5).unwrap();
        assert_eq!((short.ids.len(), short.answer_start, cut), (5, 2, true));
        assert_eq!(&short.ids[2..], &full.ids[4..]);
    }
}
