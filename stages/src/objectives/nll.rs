//! Next-token likelihood: the SFT loss over answer tokens, which PPO's
//! pretraining mix (ptx) reuses, and per-position NLL.

use rlhf_datasets::batch::LmBatch;
use tch::{Device, Kind, Tensor};

use crate::model::network::Network;
use crate::model::score::logprobs_at;

/// The SFT loss of a batch: mean NLL over answer tokens, as
/// `(sum of masked NLL, number of answer tokens)` tensors.
pub fn masked_nll_sum(
    model: &Network,
    batch: &LmBatch,
    device: Device,
    train: bool,
) -> (Tensor, f64) {
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
    if !model.has_real_vocabulary() {
        let logits = model.forward_logits(&inputs, None, train);
        let nll = token_nll(&logits, &targets);
        return ((nll * mask).sum(Kind::Float), batch.target_tokens as f64);
    }
    // Logits at the answer tokens only.
    let (rows, weights): (Vec<i64>, Vec<f32>) = batch
        .loss_mask
        .iter()
        .enumerate()
        .filter(|(_, &m)| m != 0.0)
        .map(|(i, &m)| (i as i64, m))
        .unzip();
    let rows = Tensor::from_slice(&rows).to_device(device);
    let hidden = model.hidden(&inputs, None, None, train);
    let lp = logprobs_at(
        model,
        &hidden,
        &rows,
        &targets.view([-1]).index_select(0, &rows),
    );
    let weights = Tensor::from_slice(&weights).to_device(device);
    ((-lp * weights).sum(Kind::Float), batch.target_tokens as f64)
}

/// Per-position NLL `(B, T)` of `targets` under `logits` `(B, T, V)`.
pub fn token_nll(logits: &Tensor, targets: &Tensor) -> Tensor {
    -crate::model::score::gather_logprobs(logits, targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gpt::Head;
    use rlhf_datasets::batch::{collate, TokenizedPair};

    #[test]
    fn prompt_targets_contribute_nothing_to_the_loss() {
        let _rng = crate::rng_lock();
        // A small vocabulary, and one large enough for logits at the
        // answer tokens only.
        for vocab in [40, crate::model::score::SPARSE_LOGITS_VOCAB + 8] {
            answer_tokens_only(vocab);
        }
    }

    fn answer_tokens_only(vocab: i64) {
        let (_vs, gpt) = crate::tiny_gpt(9, vocab, 16, 1, Head::Lm);
        let pair = TokenizedPair {
            prompt: vec![1, 2, 3, 4],
            completion: vec![5, 6, 0],
            learn: None,
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
        let lp = crate::model::score::gather_logprobs(
            &gpt.forward_logits(&ids, None, false),
            &Tensor::from_slice(&[2i64, 3, 4, 5, 6, 0]).view([1, 6]),
        );
        let by_hand = -lp.narrow(1, 3, 3).sum(Kind::Double).double_value(&[]);
        assert!((by_hand - base).abs() < 1e-5, "{by_hand} vs {base}");
    }
}
