//! Log-probabilities of given token sequences under a model (perplexity).

use tch::{Device, Kind, Tensor};

use crate::model::network::Network;

/// `log p(targets)` from logits: `(.., V)` and `(..)` -> `(..)`.
pub fn gather_logprobs(logits: &Tensor, targets: &Tensor) -> Tensor {
    logits
        .log_softmax(-1, Kind::Float)
        .gather(-1, &targets.unsqueeze(-1), false)
        .squeeze_dim(-1)
}

/// Vocabularies from this size on get logits only at the positions a loss
/// reads ([`logprobs_at`]): a 49k-token projection of every prompt
/// position costs more time and memory than the rest of a small model's
/// step. Smaller ones (the byte tokenizer's 264) project every position,
/// in one matmul, which keeps their runs bit-identical to earlier ones.
pub const SPARSE_LOGITS_VOCAB: i64 = 4096;

/// `log p(targets[i])` from the hidden states `(B, T, C)` at the flattened
/// positions `rows` (`b * T + t`): the vocabulary projection runs at those
/// positions only. Differentiable.
pub fn logprobs_at(model: &Network, hidden: &Tensor, rows: &Tensor, targets: &Tensor) -> Tensor {
    let h = hidden.reshape([-1, hidden.size()[2]]).index_select(0, rows);
    gather_logprobs(&model.logits(&h), targets)
}

/// For each sequence, `log p(ids[t] | ids[..t])` for t = 1..n (the first
/// token has no context, so a sequence of n tokens gets n - 1 values).
///
/// Sequences are right-padded into batches of `batch_size`; under causal
/// attention the padding never reaches a real token.
pub fn sequence_logprobs(
    model: &Network,
    seqs: &[Vec<i64>],
    batch_size: usize,
    device: Device,
) -> Vec<Vec<f64>> {
    let from = vec![1; seqs.len()];
    sequence_logprobs_from(model, seqs, &from, batch_size, device)
}

/// Positions whose logits are computed at once: the vocabulary projection
/// of a whole batch (a 49k vocabulary, 64 sequences of 300 tokens) would
/// take gigabytes, and only the scored positions need it.
const LOGIT_ROWS: i64 = 512;

/// For each sequence `i`, `log p(ids[t] | ids[..t])` for t = `from[i]`..n
/// (`from` below 1 counts as 1): the log-probabilities of an answer that
/// starts at `from[i]`. Logits are computed only at those positions.
pub fn sequence_logprobs_from(
    model: &Network,
    seqs: &[Vec<i64>],
    from: &[usize],
    batch_size: usize,
    device: Device,
) -> Vec<Vec<f64>> {
    assert_eq!(seqs.len(), from.len(), "one start per sequence");
    let mut out = Vec::with_capacity(seqs.len());
    tch::no_grad(|| {
        for (chunk, starts) in seqs
            .chunks(batch_size.max(1))
            .zip(from.chunks(batch_size.max(1)))
        {
            out.extend(chunk_logprobs(model, chunk, starts, device));
        }
    });
    out
}

/// [`sequence_logprobs_from`] for one padded batch.
fn chunk_logprobs(
    model: &Network,
    chunk: &[Vec<i64>],
    starts: &[usize],
    device: Device,
) -> Vec<Vec<f64>> {
    let (flat, width) = rlhf_datasets::batch::right_pad(chunk, 0);
    // Row r's value at t comes from the hidden state at t - 1.
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut counts = Vec::with_capacity(chunk.len());
    for (r, (s, &start)) in chunk.iter().zip(starts).enumerate() {
        let range = start.max(1)..s.len();
        counts.push(range.len());
        for t in range {
            rows.push((r * (width - 1) + t - 1) as i64);
            targets.push(s[t]);
        }
    }
    if rows.is_empty() {
        return counts.iter().map(|_| Vec::new()).collect();
    }
    let ids = Tensor::from_slice(&flat)
        .view([chunk.len() as i64, width as i64])
        .to_device(device);
    let hidden = model.hidden(&ids.narrow(1, 0, width as i64 - 1), None, None, false);
    let rows = Tensor::from_slice(&rows).to_device(device);
    let targets = Tensor::from_slice(&targets).to_device(device);
    let n = rows.size()[0];
    let mut values = Vec::with_capacity(n as usize);
    for begin in (0..n).step_by(LOGIT_ROWS as usize) {
        let len = LOGIT_ROWS.min(n - begin);
        let (rows, targets) = (rows.narrow(0, begin, len), targets.narrow(0, begin, len));
        let lp = logprobs_at(model, &hidden, &rows, &targets);
        values.extend(
            Vec::<f64>::try_from(lp.to_kind(Kind::Double).to_device(Device::Cpu))
                .expect("f64 logprobs"),
        );
    }
    let mut values = values.into_iter();
    counts
        .iter()
        .map(|&c| values.by_ref().take(c).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gpt::Head;

    #[test]
    fn batched_logprobs_equal_single_and_match_log_softmax() {
        let _rng = crate::rng_lock();
        let (_vs, gpt) = crate::tiny_gpt(5, 30, 16, 1, Head::Lm);
        let seqs = vec![vec![1i64, 2, 3, 4, 5, 6], vec![7i64, 8, 9], vec![10i64]];
        let batched = sequence_logprobs(&gpt, &seqs, 8, Device::Cpu);
        assert_eq!(
            batched.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![5, 2, 0]
        );
        for (i, s) in seqs.iter().enumerate() {
            let single = sequence_logprobs(&gpt, std::slice::from_ref(s), 1, Device::Cpu);
            for (a, b) in batched[i].iter().zip(&single[0]) {
                assert!((a - b).abs() < 1e-5);
            }
        }
        // By hand: position 0's distribution, token 2.
        let logits = gpt.forward_logits(&Tensor::from_slice(&[1i64]).view([1, 1]), None, false);
        let probs = Vec::<f64>::try_from(logits.view([-1]).softmax(-1, Kind::Double)).unwrap();
        assert!((batched[0][0] - probs[2].ln()).abs() < 1e-5);
        assert!(batched[0].iter().all(|&x| x < 0.0));
        // Answers only: the tail of the full values, whatever the start.
        let tails = sequence_logprobs_from(&gpt, &seqs, &[4, 0, 1], 2, Device::Cpu);
        let close = |a: &[f64], b: &[f64]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
        };
        assert!(close(&tails[0], &batched[0][3..]));
        assert!(close(&tails[1], &batched[1]));
        assert!(tails[2].is_empty());
    }
}
