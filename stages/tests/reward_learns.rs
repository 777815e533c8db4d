//! A reward model learns a noiseless ranking rule from K-wise rankings.

mod common;

use rand::{Rng, SeedableRng};
use rlhf_stages::optim::AdamWConfig;
use rlhf_stages::reward::{run, RewardConfig};
use rlhf_stages::train::TrainSettings;
use serde_json::json;

/// Prompts `Q: <n>`, four answers of random digits; the rule: an answer is
/// better the larger its first digit (distinct first digits, so no ties).
fn synthetic(path: &std::path::Path, n: usize, seed: u64) {
    write_rankings(path, n, seed, false);
}

/// `synthetic`, or with each ranking shuffled at random (`shuffled`):
/// labels that say nothing a model could learn.
fn write_rankings(path: &std::path::Path, n: usize, seed: u64, shuffled: bool) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut text = String::new();
    for i in 0..n {
        let mut firsts: Vec<u32> = (0..10).collect();
        let mut responses = Vec::new();
        for _ in 0..4 {
            let first = firsts.remove(rng.random_range(0..firsts.len()));
            let tail: String = (0..rng.random_range(2..6))
                .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
                .collect();
            responses.push(format!("{first}{tail}"));
        }
        let mut order: Vec<usize> = (0..4).collect();
        order.sort_by_key(|&j| std::cmp::Reverse(responses[j].as_bytes()[0]));
        if shuffled {
            rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rng);
        }
        let mut ranking = vec![0; 4];
        for (r, &j) in order.iter().enumerate() {
            ranking[j] = r;
        }
        text.push_str(
            &json!({"prompt": format!("Q: {i}\n"), "responses": responses, "ranking": ranking})
                .to_string(),
        );
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// Batches of 8 prompts for `epochs` at learning rate 2e-3, eval at the end.
fn config(train: std::path::PathBuf, eval: std::path::PathBuf, epochs: usize) -> RewardConfig {
    RewardConfig {
        data: train,
        eval_data: Some(eval),
        train: TrainSettings {
            batch_size: 8,
            epochs,
            optimizer: AdamWConfig {
                lr: 2e-3,
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
            eval_every: 1000,
            checkpoint_every: 1000,
            ..RewardConfig::default().train
        },
        ..RewardConfig::default()
    }
}

#[test]
fn reward_model_learns_a_ranking_rule() {
    let d = tempfile::tempdir().unwrap();
    let (train, eval) = (d.path().join("train.jsonl"), d.path().join("eval.jsonl"));
    synthetic(&train, 400, 1);
    synthetic(&eval, 60, 2);
    let config = config(train, eval, 3);
    let summary = run(&config, &common::ctx(d.path().join("run"))).unwrap();
    let eval = summary.eval.unwrap();
    // The rule is noiseless and needs one look at the answer's first token:
    // a model that learnt it ranks every pair right, chance is 0.5. 0.9
    // leaves room for a few confusions between neighbouring digits.
    assert_eq!(eval.pairs, 60 * 6);
    assert!(
        eval.accuracy >= 0.9,
        "held-out pairwise accuracy {:.3}",
        eval.accuracy
    );
    assert!(eval.mean_margin > 0.0);
    assert_eq!(summary.warning, None, "a learning stage is not flagged");
}

#[test]
fn a_reward_model_on_shuffled_labels_is_flagged_and_can_stop_the_pipeline() {
    let d = tempfile::tempdir().unwrap();
    let (train, eval) = (d.path().join("train.jsonl"), d.path().join("eval.jsonl"));
    write_rankings(&train, 400, 1, true);
    write_rankings(&eval, 60, 2, true);
    let mut config = config(train, eval, 2);
    let summary = run(&config, &common::ctx(d.path().join("warn"))).unwrap();
    let warning = summary.warning.expect("shuffled labels are flagged");
    assert!(warning.contains("may not be learning"), "{warning}");
    config.train.fail_if_not_learning = true;
    let err = run(&config, &common::ctx(d.path().join("fail"))).unwrap_err();
    assert!(err.to_string().contains("fail_if_not_learning"), "{err}");
    assert!(!d.path().join("fail/checkpoint").exists());
}
