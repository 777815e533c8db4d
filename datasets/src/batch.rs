//! Token batches: tokenising with a truncation policy, deterministic
//! shuffles and splits, and padding into rectangular batches.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::schema::SftRecord;
use crate::tokenizer::{Tokenizer, TokenizerError};

/// A tokenised demonstration. `completion` ends with EOS (or, rendered by
/// a chat template, with the template's end of turn).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenizedPair {
    pub prompt: Vec<i64>,
    pub completion: Vec<i64>,
    /// Which completion tokens are learned (a conversation's assistant
    /// turns); `None`: all of them.
    pub learn: Option<Vec<bool>>,
}

impl TokenizedPair {
    pub fn len(&self) -> usize {
        self.prompt.len() + self.completion.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How many rows truncation touched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TruncationStats {
    /// Rows whose prompt lost tokens on the left.
    pub prompts_cut: usize,
    /// Rows whose answer alone was too long and lost tokens on the right.
    pub completions_cut: usize,
}

/// Tokenises demonstrations to at most `max_len` tokens each.
///
/// The policy keeps the answer: the prompt is cut from the left (its end,
/// nearest the answer, matters most). Only an answer longer than the whole
/// budget is cut, on the right. A prompt keeps at least one token, as the
/// first answer token needs something to be predicted from; an empty
/// prompt becomes a lone EOS (GPT-2's beginning-of-text).
pub fn tokenize_pairs(
    records: &[SftRecord],
    tokenizer: &Tokenizer,
    max_len: usize,
) -> Result<(Vec<TokenizedPair>, TruncationStats), TokenizerError> {
    assert!(
        max_len >= 2,
        "max_len must leave room for a prompt and an answer token"
    );
    let mut stats = TruncationStats::default();
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        let prompt = encode_prompt(tokenizer, &r.prompt)?;
        let pair = match &r.learn {
            None if r.eos => TokenizedPair {
                completion: encode_answer(tokenizer, &r.completion)?,
                ..Default::default()
            },
            _ => encode_turns(tokenizer, r)?,
        };
        out.push(truncate(
            TokenizedPair { prompt, ..pair },
            max_len,
            &mut stats,
        ));
    }
    Ok((out, stats))
}

/// A conversation's completion: a token is learned when it starts inside
/// an assistant turn (transformers' assistant mask does the same); EOS,
/// when the record asks for it, is learned too.
fn encode_turns(tokenizer: &Tokenizer, r: &SftRecord) -> Result<TokenizedPair, TokenizerError> {
    let (mut completion, offsets) = tokenizer.encode_with_offsets(&r.completion)?;
    let learned = |start: &usize| match &r.learn {
        Some(spans) => spans.iter().any(|s| s.contains(start)),
        None => true,
    };
    let mut learn: Vec<bool> = offsets.iter().map(|(start, _)| learned(start)).collect();
    if r.eos {
        completion.push(tokenizer.eos_id());
        learn.push(true);
    }
    Ok(TokenizedPair {
        prompt: vec![],
        completion,
        learn: Some(learn),
    })
}

/// A prompt's ids; an empty prompt becomes a lone EOS (GPT-2's
/// beginning-of-text), as the first answer token needs a context.
fn encode_prompt(tokenizer: &Tokenizer, prompt: &str) -> Result<Vec<i64>, TokenizerError> {
    let mut ids = tokenizer.encode(prompt)?;
    if ids.is_empty() {
        ids.push(tokenizer.eos_id());
    }
    Ok(ids)
}

/// An answer's ids, ending with EOS.
fn encode_answer(tokenizer: &Tokenizer, answer: &str) -> Result<Vec<i64>, TokenizerError> {
    let mut ids = tokenizer.encode(answer)?;
    ids.push(tokenizer.eos_id());
    Ok(ids)
}

/// Sequences right-padded with `pad` into one row-major block; returns it
/// and the width (the longest sequence).
pub fn right_pad<S: AsRef<[i64]>>(seqs: &[S], pad: i64) -> (Vec<i64>, usize) {
    let width = seqs.iter().map(|s| s.as_ref().len()).max().unwrap_or(0);
    let flat = seqs
        .iter()
        .flat_map(|s| {
            let s = s.as_ref();
            s.iter()
                .copied()
                .chain(std::iter::repeat_n(pad, width - s.len()))
        })
        .collect();
    (flat, width)
}

/// Applies the truncation policy to one pair.
pub fn truncate(
    mut pair: TokenizedPair,
    max_len: usize,
    stats: &mut TruncationStats,
) -> TokenizedPair {
    if pair.completion.len() > max_len - 1 {
        pair.completion.truncate(max_len - 1);
        if let Some(learn) = &mut pair.learn {
            learn.truncate(max_len - 1);
        }
        stats.completions_cut += 1;
    }
    let room = max_len - pair.completion.len();
    if pair.prompt.len() > room {
        pair.prompt.drain(..pair.prompt.len() - room);
        stats.prompts_cut += 1;
    }
    pair
}

/// A permutation of `0..n` fixed by `(seed, epoch)`.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    order
}

/// Splits `0..n` into (train, eval) by a seeded shuffle; eval gets
/// `round(n * eval_fraction)` items, at most `eval_max`, and train at
/// least one.
pub fn train_eval_split(
    n: usize,
    eval_fraction: f64,
    eval_max: usize,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    let order = epoch_order(n, seed, u64::MAX);
    let n_eval = ((n as f64 * eval_fraction).round() as usize)
        .min(eval_max)
        .min(n.saturating_sub(1));
    let (eval, train) = order.split_at(n_eval);
    let (mut train, mut eval) = (train.to_vec(), eval.to_vec());
    train.sort_unstable();
    eval.sort_unstable();
    (train, eval)
}

/// A padded batch for next-token training, row-major `(rows, width)`.
#[derive(Debug, Clone, PartialEq)]
pub struct LmBatch {
    pub rows: usize,
    pub width: usize,
    /// Inputs: each sequence without its last token, right-padded with `pad`.
    pub input_ids: Vec<i64>,
    /// Next tokens (the input shifted by one; `pad` after the end).
    pub targets: Vec<i64>,
    /// 1 where the target is an answer token, 0 on prompt and padding:
    /// the loss is `sum(nll * mask) / sum(mask)`.
    pub loss_mask: Vec<f32>,
    /// Targets that count: `sum(loss_mask)`.
    pub target_tokens: usize,
    /// Input positions that hold a token rather than padding.
    pub real_tokens: usize,
}

/// Collates pairs into one right-padded batch; the mask lets the loss see
/// answer tokens only.
pub fn collate(pairs: &[&TokenizedPair], pad: i64) -> LmBatch {
    let width = pairs.iter().map(|p| p.len() - 1).max().unwrap_or(0);
    let mut input_ids = Vec::with_capacity(pairs.len() * width);
    let mut targets = Vec::with_capacity(pairs.len() * width);
    let mut loss_mask = Vec::with_capacity(pairs.len() * width);
    let (mut target_tokens, mut real_tokens) = (0, 0);
    for p in pairs {
        let seq: Vec<i64> = p.prompt.iter().chain(&p.completion).copied().collect();
        let n = seq.len() - 1;
        real_tokens += n;
        input_ids.extend_from_slice(&seq[..n]);
        input_ids.extend(std::iter::repeat_n(pad, width - n));
        // Target j is seq[j + 1]; answer tokens start at seq[prompt.len()].
        targets.extend_from_slice(&seq[1..]);
        targets.extend(std::iter::repeat_n(pad, width - n));
        let first = p.prompt.len() - 1;
        loss_mask.extend(std::iter::repeat_n(0.0, first));
        match &p.learn {
            None => {
                loss_mask.extend(std::iter::repeat_n(1.0, n - first));
                target_tokens += p.completion.len();
            }
            Some(learn) => {
                loss_mask.extend(learn.iter().map(|&l| f32::from(u8::from(l))));
                target_tokens += learn.iter().filter(|&&l| l).count();
            }
        }
        loss_mask.extend(std::iter::repeat_n(0.0, width - n));
    }
    LmBatch {
        rows: pairs.len(),
        width,
        input_ids,
        targets,
        loss_mask,
        target_tokens,
        real_tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_the_answer_and_cuts_prompt_left() {
        let mut s = TruncationStats::default();
        let pair = |prompt: Vec<i64>, completion: Vec<i64>| TokenizedPair {
            prompt,
            completion,
            learn: None,
        };
        let p = truncate(pair(vec![1, 2, 3, 4, 5], vec![6, 7, 0]), 6, &mut s);
        assert_eq!(p.prompt, vec![3, 4, 5]);
        assert_eq!(p.completion, vec![6, 7, 0]);
        let p = truncate(pair(vec![1, 2], vec![3, 4, 5, 6, 7, 0]), 4, &mut s);
        assert_eq!((p.prompt, p.completion), (vec![2], vec![3, 4, 5]));
        assert_eq!(
            s,
            TruncationStats {
                prompts_cut: 2,
                completions_cut: 1
            }
        );
    }

    #[test]
    fn collate_masks_prompt_and_padding() {
        let a = TokenizedPair {
            prompt: vec![10, 11],
            completion: vec![12, 0],
            learn: None,
        };
        let b = TokenizedPair {
            prompt: vec![20],
            completion: vec![0],
            learn: None,
        };
        let batch = collate(&[&a, &b], 99);
        assert_eq!(batch.width, 3);
        assert_eq!(batch.input_ids, vec![10, 11, 12, 20, 99, 99]);
        assert_eq!(batch.targets, vec![11, 12, 0, 0, 99, 99]);
        assert_eq!(batch.loss_mask, vec![0.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
        assert_eq!(batch.target_tokens, 3);
    }

    #[test]
    fn shuffles_and_splits_are_seeded() {
        assert_eq!(epoch_order(50, 1, 0), epoch_order(50, 1, 0));
        assert_ne!(epoch_order(50, 1, 0), epoch_order(50, 1, 1));
        let mut sorted = epoch_order(50, 1, 3);
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        let (train, eval) = train_eval_split(100, 0.1, 1000, 7);
        assert_eq!((train.len(), eval.len()), (90, 10));
        assert!(eval.iter().all(|i| !train.contains(i)));
        assert_eq!(train_eval_split(100, 0.1, 1000, 7), (train, eval));
        assert_eq!(train_eval_split(100, 0.5, 5, 7).1.len(), 5);
    }

    #[test]
    fn tokenize_appends_eos_and_counts_truncation() {
        let tok = Tokenizer::bytes();
        let records = vec![SftRecord::new("abcdef", "xy"), SftRecord::new("", "z")];
        let (pairs, stats) = tokenize_pairs(&records, &tok, 6).unwrap();
        assert_eq!(pairs[0].completion, vec![120, 121, 256]);
        assert_eq!(pairs[0].prompt, vec![100, 101, 102]);
        assert_eq!(pairs[1].prompt, vec![256]);
        assert_eq!(stats.prompts_cut, 1);
    }
}

/// A tokenised ranked group: one prompt, K answers (each ending with EOS),
/// its `(better, worse)` pairs and margin.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedGroup {
    pub prompt: Vec<i64>,
    pub responses: Vec<Vec<i64>>,
    pub pairs: Vec<(usize, usize)>,
    pub margin: f64,
}

/// Tokenises ranked groups with the same policy as demonstrations: every
/// answer is kept (cut on the right only if longer than the whole budget),
/// the shared prompt is cut from the left to fit the longest answer.
pub fn tokenize_groups(
    groups: &[crate::preference::RankedGroup],
    tokenizer: &Tokenizer,
    max_len: usize,
) -> Result<(Vec<TokenizedGroup>, TruncationStats), TokenizerError> {
    assert!(
        max_len >= 2,
        "max_len must leave room for a prompt and an answer token"
    );
    let mut stats = TruncationStats::default();
    let mut out = Vec::with_capacity(groups.len());
    for g in groups {
        let mut prompt = encode_prompt(tokenizer, &g.prompt)?;
        let mut responses = Vec::with_capacity(g.responses.len());
        let mut cut_answer = false;
        for r in &g.responses {
            let mut ids = encode_answer(tokenizer, r)?;
            if ids.len() > max_len - 1 {
                ids.truncate(max_len - 1);
                cut_answer = true;
            }
            responses.push(ids);
        }
        let longest = responses.iter().map(Vec::len).max().unwrap_or(0);
        let room = max_len - longest;
        if prompt.len() > room {
            prompt.drain(..prompt.len() - room);
            stats.prompts_cut += 1;
        }
        stats.completions_cut += usize::from(cut_answer);
        out.push(TokenizedGroup {
            prompt,
            responses,
            pairs: g.pairs(),
            margin: g.margin,
        });
    }
    Ok((out, stats))
}

/// Groups collated for one K-wise forward: every answer of every group is
/// one right-padded row, and pairs index rows.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupBatch {
    pub rows: usize,
    pub width: usize,
    pub input_ids: Vec<i64>,
    /// Per row, the position of its last real token (where the reward is read).
    pub last_index: Vec<i64>,
    /// Per row, the position of its first answer token.
    pub answer_start: Vec<i64>,
    /// Per pair, the rows of the better and the worse answer.
    pub better: Vec<i64>,
    pub worse: Vec<i64>,
    pub margin: Vec<f32>,
    /// Per pair, 1 / (pairs in its group * groups in the batch): each group
    /// weighs the same, its loss the mean over its pairs (InstructGPT eq. 1).
    pub pair_weight: Vec<f32>,
    pub groups: usize,
}

/// The widest row a group makes: its prompt and longest answer.
pub fn group_width(group: &TokenizedGroup) -> usize {
    let longest = group.responses.iter().map(Vec::len).max().unwrap_or(0);
    group.prompt.len() + longest
}

pub fn collate_groups(groups: &[&TokenizedGroup], pad: i64) -> GroupBatch {
    let width = groups.iter().map(|g| group_width(g)).max().unwrap_or(0);
    let mut b = GroupBatch {
        rows: 0,
        width,
        input_ids: Vec::new(),
        last_index: Vec::new(),
        answer_start: Vec::new(),
        better: Vec::new(),
        worse: Vec::new(),
        margin: Vec::new(),
        pair_weight: Vec::new(),
        groups: groups.len(),
    };
    for g in groups {
        let first_row = b.rows as i64;
        for r in &g.responses {
            let n = g.prompt.len() + r.len();
            b.input_ids.extend(g.prompt.iter().chain(r).copied());
            b.input_ids.extend(std::iter::repeat_n(pad, width - n));
            b.last_index.push(n as i64 - 1);
            b.answer_start.push(g.prompt.len() as i64);
            b.rows += 1;
        }
        let weight = 1.0 / (g.pairs.len() as f32 * groups.len() as f32);
        for &(i, j) in &g.pairs {
            b.better.push(first_row + i as i64);
            b.worse.push(first_row + j as i64);
            b.margin.push(g.margin as f32);
            b.pair_weight.push(weight);
        }
    }
    b
}

#[cfg(test)]
mod group_tests {
    use super::*;

    #[test]
    fn groups_collate_into_rows_and_weighted_pairs() {
        let a = TokenizedGroup {
            prompt: vec![1, 2],
            responses: vec![vec![3, 0], vec![4, 5, 0], vec![6, 0]],
            pairs: vec![(1, 0), (1, 2), (0, 2)],
            margin: 0.5,
        };
        let b = TokenizedGroup {
            prompt: vec![7],
            responses: vec![vec![8, 0], vec![9, 0]],
            pairs: vec![(1, 0)],
            margin: 0.0,
        };
        let batch = collate_groups(&[&a, &b], 99);
        assert_eq!((batch.rows, batch.width, batch.groups), (5, 5, 2));
        assert_eq!(batch.last_index, vec![3, 4, 3, 2, 2]);
        assert_eq!(&batch.input_ids[15..20], &[7, 8, 0, 99, 99]);
        assert_eq!(batch.better, vec![1, 1, 0, 4]);
        assert_eq!(batch.worse, vec![0, 2, 2, 3]);
        let w: f32 = batch.pair_weight.iter().sum();
        assert!((w - 1.0).abs() < 1e-6);
        assert_eq!(batch.pair_weight[3], 0.5);
    }
}
