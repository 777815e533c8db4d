//! Token batches: tokenising with a truncation policy, deterministic
//! shuffles and splits, and padding into rectangular batches.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::schema::SftRecord;
use crate::tokenizer::{Tokenizer, TokenizerError};

/// A tokenised demonstration. `completion` ends with EOS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPair {
    pub prompt: Vec<i64>,
    pub completion: Vec<i64>,
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
    let eos = tokenizer.eos_id();
    let mut stats = TruncationStats::default();
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        let mut prompt = tokenizer.encode(&r.prompt)?;
        if prompt.is_empty() {
            prompt.push(eos);
        }
        let mut completion = tokenizer.encode(&r.completion)?;
        completion.push(eos);
        out.push(truncate(prompt, completion, max_len, &mut stats));
    }
    Ok((out, stats))
}

/// Applies the truncation policy to one pair.
pub fn truncate(
    mut prompt: Vec<i64>,
    mut completion: Vec<i64>,
    max_len: usize,
    stats: &mut TruncationStats,
) -> TokenizedPair {
    if completion.len() > max_len - 1 {
        completion.truncate(max_len - 1);
        stats.completions_cut += 1;
    }
    let room = max_len - completion.len();
    if prompt.len() > room {
        prompt.drain(..prompt.len() - room);
        stats.prompts_cut += 1;
    }
    TokenizedPair { prompt, completion }
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
}

/// Collates pairs into one right-padded batch; the mask lets the loss see
/// answer tokens only.
pub fn collate(pairs: &[&TokenizedPair], pad: i64) -> LmBatch {
    let width = pairs.iter().map(|p| p.len() - 1).max().unwrap_or(0);
    let mut input_ids = Vec::with_capacity(pairs.len() * width);
    let mut targets = Vec::with_capacity(pairs.len() * width);
    let mut loss_mask = Vec::with_capacity(pairs.len() * width);
    let mut target_tokens = 0;
    for p in pairs {
        let seq: Vec<i64> = p.prompt.iter().chain(&p.completion).copied().collect();
        let n = seq.len() - 1;
        input_ids.extend_from_slice(&seq[..n]);
        input_ids.extend(std::iter::repeat_n(pad, width - n));
        // Target j is seq[j + 1]; answer tokens start at seq[prompt.len()].
        targets.extend_from_slice(&seq[1..]);
        targets.extend(std::iter::repeat_n(pad, width - n));
        let first = p.prompt.len() - 1;
        loss_mask.extend(std::iter::repeat_n(0.0, first));
        loss_mask.extend(std::iter::repeat_n(1.0, n - first));
        loss_mask.extend(std::iter::repeat_n(0.0, width - n));
        target_tokens += p.completion.len();
    }
    LmBatch {
        rows: pairs.len(),
        width,
        input_ids,
        targets,
        loss_mask,
        target_tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_the_answer_and_cuts_prompt_left() {
        let mut s = TruncationStats::default();
        let p = truncate(vec![1, 2, 3, 4, 5], vec![6, 7, 0], 6, &mut s);
        assert_eq!(p.prompt, vec![3, 4, 5]);
        assert_eq!(p.completion, vec![6, 7, 0]);
        let p = truncate(vec![1, 2], vec![3, 4, 5, 6, 7, 0], 4, &mut s);
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
        };
        let b = TokenizedPair {
            prompt: vec![20],
            completion: vec![0],
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
        let records = vec![
            SftRecord {
                prompt: "abcdef".into(),
                completion: "xy".into(),
            },
            SftRecord {
                prompt: String::new(),
                completion: "z".into(),
            },
        ];
        let (pairs, stats) = tokenize_pairs(&records, &tok, 6).unwrap();
        assert_eq!(pairs[0].completion, vec![120, 121, 256]);
        assert_eq!(pairs[0].prompt, vec![100, 101, 102]);
        assert_eq!(pairs[1].prompt, vec![256]);
        assert_eq!(stats.prompts_cut, 1);
    }
}
