//! RL over several ranks: each rank samples and scores its share of the
//! iteration's prompts; the shares are then gathered, so that every rank
//! holds the whole batch in the layout one process would have made
//! (prompts left-padded to the longest, answers right-padded) and computes
//! the same advantages (whitening, group baselines) and KL from it. Each
//! minibatch is then split between the ranks by position, and the
//! gradients summed.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::episode::{policy_tokens, Turn};
use super::rollout::{from_rows, to_rows, Sampled};
use crate::dist::Ranks;
use crate::model::sample::Generation;
use crate::train::StageError;

/// One answered prompt, as it travels between ranks.
#[derive(Clone, Serialize, Deserialize)]
struct Row {
    index: usize,
    prompt: Vec<i64>,
    answer: Vec<i64>,
    finished: bool,
    text: String,
    score: f64,
    components: std::collections::BTreeMap<String, f64>,
    /// A multi-turn episode's turns (else empty).
    turns: Vec<Turn>,
    /// Per answer token.
    sampled_lp: Vec<f64>,
    old_lp: Vec<f64>,
    ref_lp: Vec<f64>,
    values: Vec<f64>,
}

/// The whole batch on every rank, in rank order (one process: unchanged).
pub fn gather(local: Sampled, ranks: &Ranks, pad: i64) -> Result<Sampled, StageError> {
    if ranks.world() == 1 {
        return Ok(local);
    }
    let with_values = local.values.is_some();
    let bytes = serde_json::to_vec(&rows_of(&local)).expect("rows serialise");
    let mut rows: Vec<Row> = Vec::new();
    for (rank, part) in ranks.all_gather_bytes(&bytes)?.iter().enumerate() {
        let part: Vec<Row> = serde_json::from_slice(part).map_err(|e| {
            StageError::Config(format!("rank {rank}'s rollout did not decode: {e}"))
        })?;
        rows.extend(part);
    }
    let device = local.generation.tokens.device();
    let mut all = assemble(rows, pad, device, with_values);
    all.seconds = local.seconds;
    Ok(all)
}

/// The groups `keep` (`(rollout, group)` pairs, each group `group`
/// consecutive rows) of several gathered rollouts, as one rollout in that
/// order: DAPO's dynamic sampling keeps the groups with spread of several
/// rounds. Each round's time adds up.
pub fn select_groups(
    parts: &[Sampled],
    keep: &[(usize, usize)],
    group: usize,
    pad: i64,
) -> Sampled {
    let rows: Vec<Vec<Row>> = parts.iter().map(rows_of).collect();
    let mut chosen = Vec::with_capacity(keep.len() * group);
    for &(part, g) in keep {
        for row in &rows[part][g * group..(g + 1) * group] {
            chosen.push(row.clone());
        }
    }
    let device = parts[0].generation.tokens.device();
    let mut all = assemble(chosen, pad, device, parts[0].values.is_some());
    for p in parts {
        all.seconds.sampling += p.seconds.sampling;
        all.seconds.logprobs += p.seconds.logprobs;
        all.seconds.scoring += p.seconds.scoring;
    }
    all
}

fn rows_of(r: &Sampled) -> Vec<Row> {
    let g = &r.generation;
    let floats = |t: &Tensor| -> Vec<Vec<f64>> { to_rows(t) };
    let (lp, rlp) = (floats(&r.old_lp), floats(&r.ref_lp));
    let sampled = floats(&g.logprobs);
    let v = r.values.as_ref().map(floats);
    let prompt_ids: Vec<Vec<i64>> = to_rows(&g.tokens.narrow(1, 0, g.prompt_width));
    let prompt_mask: Vec<Vec<i64>> = to_rows(&g.attention_mask.narrow(1, 0, g.prompt_width));
    (0..r.rows.len())
        .map(|i| {
            let len = g.answers[i].len();
            Row {
                index: r.rows[i],
                prompt: prompt_ids[i]
                    .iter()
                    .zip(&prompt_mask[i])
                    .filter(|(_, &m)| m == 1)
                    .map(|(&t, _)| t)
                    .collect(),
                answer: g.answers[i].clone(),
                finished: g.finished[i],
                text: r.answers[i].clone(),
                score: r.scores[i],
                components: r.components[i].clone(),
                turns: r.turns[i].clone(),
                sampled_lp: sampled[i][..len].to_vec(),
                old_lp: lp[i][..len].to_vec(),
                ref_lp: rlp[i][..len].to_vec(),
                values: v.as_ref().map_or(vec![], |v| v[i][..len].to_vec()),
            }
        })
        .collect()
}

/// The rollout one process would hold for these rows.
fn assemble(rows: Vec<Row>, pad: i64, device: tch::Device, with_values: bool) -> Sampled {
    let p = rows.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
    let n = rows.iter().map(|r| r.answer.len()).max().unwrap_or(0);
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for r in &rows {
        let left = p - r.prompt.len();
        let right = n - r.answer.len();
        ids.extend(std::iter::repeat_n(pad, left));
        ids.extend(&r.prompt);
        ids.extend(&r.answer);
        ids.extend(std::iter::repeat_n(pad, right));
        mask.extend(std::iter::repeat_n(0i64, left));
        mask.extend(std::iter::repeat_n(1i64, r.prompt.len() + r.answer.len()));
        mask.extend(std::iter::repeat_n(0i64, right));
    }
    let shape = [rows.len() as i64, (p + n) as i64];
    let tokens = Tensor::from_slice(&ids).view(shape).to_device(device);
    let attention = Tensor::from_slice(&mask).view(shape).to_device(device);
    let table = |f: fn(&Row) -> &Vec<f64>| {
        let rows: Vec<Vec<f64>> = rows.iter().map(|r| f(r).clone()).collect();
        from_rows(&rows, n, device)
    };
    // The policy's tokens: every answer token, less an episode's
    // environment tokens.
    let policy: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| policy_tokens(&r.turns, r.answer.len()))
        .collect();
    let answer_mask = from_rows(&policy, n, device);
    Sampled {
        old_lp: table(|r| &r.old_lp),
        ref_lp: table(|r| &r.ref_lp),
        values: with_values.then(|| table(|r| &r.values)),
        answer_mask,
        rows: rows.iter().map(|r| r.index).collect(),
        answers: rows.iter().map(|r| r.text.clone()).collect(),
        scores: rows.iter().map(|r| r.score).collect(),
        components: rows.iter().map(|r| r.components.clone()).collect(),
        turns: rows.iter().map(|r| r.turns.clone()).collect(),
        generation: Generation {
            tokens,
            attention_mask: attention,
            prompt_width: p as i64,
            answers: rows.iter().map(|r| r.answer.clone()).collect(),
            finished: rows.iter().map(|r| r.finished).collect(),
            logprobs: table(|r| &r.sampled_lp),
        },
        seconds: Default::default(),
    }
}
