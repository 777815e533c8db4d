//! Ranked answers and the scalar head that scores them: loading rankings
//! for a model, the K-wise Bradley-Terry loss, and rewards of whole
//! sequences read with the pooling a reward model was trained with. The
//! reward model trains on them; DPO loads the same rankings; PPO, GRPO
//! and `rlhf eval` score answers with `sequence_rewards`.

use std::path::Path;

use rlhf_datasets::batch::{tokenize_groups, GroupBatch, TokenizedGroup};
use rlhf_datasets::hh::render_groups;
use rlhf_datasets::load::{read_table, DataError};
use rlhf_datasets::preference::ranked_groups;
use rlhf_datasets::schema::ChatTemplate;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::error::StageError;
use crate::model::checkpoint::Model;
use crate::model::network::Network;

/// What a rankings file holds, for the error when a stage names none
/// (the reward model's and DPO's `data`).
pub const RANKINGS_ABOUT: &str =
    "the rankings: pairwise {prompt, chosen, rejected} or K-wise {prompt, responses, ranking} rows";

/// Sequences per forward when scoring whole sequences for normalisation.
pub const SCORE_BATCH: usize = 64;

/// Where a reward model reads its score from the head's per-token values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The value at the answer's EOS (InstructGPT, TRL, OpenRLHF): the
    /// last token has read the whole answer.
    #[default]
    Last,
    /// The mean value over the answer's tokens, EOS included: each token
    /// judges its own place, which a small trunk does more reliably than
    /// summing a whole answer into its EOS.
    Mean,
}

/// The key of the pooling in a checkpoint's `config.json` (`"rlhf"` part).
const POOLING_KEY: &str = "reward_pooling";

impl Pooling {
    /// The pooling a reward-model checkpoint was trained with; `last`
    /// for folders without the key (plain HF sequence classifiers).
    pub fn of(model: &Model) -> Self {
        model
            .meta
            .extra
            .get(POOLING_KEY)
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default()
    }

    pub fn record(self, model: &mut Model) {
        model.meta.extra.insert(POOLING_KEY.into(), json!(self));
    }
}

/// One sequence a reward model reads: prompt + answer + EOS, and where
/// the answer starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewardInput {
    pub ids: Vec<i64>,
    pub answer_start: usize,
}

/// Rewards of a collated batch, one per row: the head's value at each
/// row's last real token, or its mean over the row's answer. One forward
/// for all rows.
pub fn batch_rewards(
    model: &Network,
    batch: &GroupBatch,
    pooling: Pooling,
    device: Device,
    train: bool,
) -> Tensor {
    let ids = Tensor::from_slice(&batch.input_ids)
        .view([batch.rows as i64, batch.width as i64])
        .to_device(device);
    let values = model.values(&model.hidden(&ids, None, None, train)); // (N, T)
    let last = Tensor::from_slice(&batch.last_index)
        .to_device(device)
        .unsqueeze(1);
    match pooling {
        Pooling::Last => values.gather(1, &last, false).squeeze_dim(1), // (N,)
        Pooling::Mean => {
            let start = Tensor::from_slice(&batch.answer_start)
                .to_device(device)
                .unsqueeze(1);
            let pos = Tensor::arange(batch.width as i64, (Kind::Int64, device)).unsqueeze(0);
            let answer = pos
                .ge_tensor(&start)
                .logical_and(&pos.le_tensor(&last))
                .to_kind(values.kind()); // (N, T)
            let sum = (values * &answer).sum_dim_intlist(1, false, None);
            sum / answer.sum_dim_intlist(1, false, None)
        }
    }
}

/// The K-wise Bradley-Terry loss from per-row rewards; also the per-pair
/// reward gaps `r_better - r_worse` (without margin).
pub fn kwise_loss(rewards: &Tensor, batch: &GroupBatch) -> (Tensor, Tensor) {
    let device = rewards.device();
    let better = rewards.index_select(0, &Tensor::from_slice(&batch.better).to_device(device));
    let worse = rewards.index_select(0, &Tensor::from_slice(&batch.worse).to_device(device));
    let gap = &better - &worse;
    let margin = Tensor::from_slice(&batch.margin).to_device(device);
    let weight = Tensor::from_slice(&batch.pair_weight).to_device(device);
    let loss = -((&gap - margin).log_sigmoid() * weight).sum(Kind::Float);
    (loss, gap)
}

/// The sequence a reward model reads for `answer` to `prompt`, as it was
/// trained: prompt + answer + EOS. Longer than `limit` tokens, it keeps its
/// end (where the reward is read) and says it was cut.
pub fn reward_sequence(
    tokenizer: &rlhf_datasets::Tokenizer,
    prompt: &str,
    answer: &str,
    limit: usize,
) -> Result<(RewardInput, bool), rlhf_datasets::tokenizer::TokenizerError> {
    let mut ids = tokenizer.encode(prompt)?;
    let mut answer_start = ids.len();
    ids.extend(tokenizer.encode(answer)?);
    ids.push(tokenizer.eos_id());
    let cut = ids.len() > limit;
    if cut {
        let drop = ids.len() - limit;
        ids.drain(..drop);
        answer_start = answer_start.saturating_sub(drop);
    }
    Ok((RewardInput { ids, answer_start }, cut))
}

/// Rewards of whole sequences (prompt + answer + EOS), read with the
/// pooling `model` was trained with. Batched, right-padded.
pub fn sequence_rewards(
    model: &Model,
    inputs: &[RewardInput],
    batch_size: usize,
    device: Device,
) -> Vec<f64> {
    let pooling = Pooling::of(model);
    let mut out = Vec::with_capacity(inputs.len());
    tch::no_grad(|| {
        for chunk in inputs.chunks(batch_size.max(1)) {
            let seqs: Vec<&[i64]> = chunk.iter().map(|s| s.ids.as_slice()).collect();
            let (ids, width) = rlhf_datasets::batch::right_pad(&seqs, 0);
            let batch = GroupBatch {
                rows: chunk.len(),
                width,
                input_ids: ids,
                last_index: chunk.iter().map(|s| s.ids.len() as i64 - 1).collect(),
                answer_start: chunk.iter().map(|s| s.answer_start as i64).collect(),
                better: vec![],
                worse: vec![],
                margin: vec![],
                pair_weight: vec![],
                groups: 0,
            };
            let r = batch_rewards(&model.net, &batch, pooling, device, false)
                .to_kind(Kind::Double)
                .to_device(Device::Cpu);
            out.extend(Vec::<f64>::try_from(r).expect("f64 rewards"));
        }
    });
    out
}

/// The rankings of `path` tokenized for `model`, and how many rows were
/// skipped as saying nothing.
pub fn load_groups(
    path: &Path,
    model: &Model,
    max_len: usize,
) -> Result<(Vec<TokenizedGroup>, usize), StageError> {
    let mut rankings = ranked_groups(&read_table(path)?, path)?;
    if let Some(note) = rankings.skipped_note() {
        tracing::warn!("{}: {note}", path.display());
    }
    // HH-RLHF dialogues in the model's own chat format, as its policy
    // writes them.
    let chat = ChatTemplate::for_tokenizer(&model.tokenizer);
    let dropped = render_groups(&mut rankings.groups, &mut rankings.rows, &chat).map_err(
        |(row, message)| DataError::BadValue {
            path: path.to_owned(),
            row: row + 1,
            column: "prompt".into(),
            message,
        },
    )?;
    if dropped > 0 {
        tracing::warn!(
            "{}: {dropped} pairs skipped whose answers carry further dialogue turns (the chat template renders one answer)",
            path.display()
        );
    }
    let skipped = rankings.skipped() + dropped;
    let (tokenized, cut) = tokenize_groups(&rankings.groups, &model.tokenizer, max_len)?;
    if cut.prompts_cut + cut.completions_cut > 0 {
        tracing::warn!(
            "{}: truncated to {max_len} tokens: {} prompts cut on the left, {} groups with an answer cut",
            path.display(),
            cut.prompts_cut,
            cut.completions_cut
        );
    }
    Ok((tokenized, skipped))
}
