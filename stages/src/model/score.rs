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
    let mut out = Vec::with_capacity(seqs.len());
    tch::no_grad(|| {
        for chunk in seqs.chunks(batch_size.max(1)) {
            let (flat, width) = rlhf_datasets::batch::right_pad(chunk, 0);
            if width < 2 {
                out.extend(chunk.iter().map(|_| Vec::new()));
                continue;
            }
            let ids = Tensor::from_slice(&flat)
                .view([chunk.len() as i64, width as i64])
                .to_device(device);
            let logits = model.forward_logits(&ids.narrow(1, 0, width as i64 - 1), None, false);
            let lp = gather_logprobs(&logits, &ids.narrow(1, 1, width as i64 - 1))
                .to_kind(Kind::Double)
                .to_device(Device::Cpu);
            let lp: Vec<f64> = Vec::try_from(lp.reshape([-1])).expect("f64 logprobs");
            for (row, s) in chunk.iter().enumerate() {
                let start = row * (width - 1);
                out.push(lp[start..start + s.len().saturating_sub(1)].to_vec());
            }
        }
    });
    out
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
    }
}
