//! A reward model learns a noiseless ranking rule from K-wise rankings.

use crate::common;

use rlhf_stages::kinds::reward::{run, RewardConfig};
use rlhf_stages::optim::AdamWConfig;
use rlhf_stages::train::TrainSettings;

fn synthetic(path: &std::path::Path, n: usize, seed: u64) {
    common::first_digit_rankings(path, n, seed, false);
}

fn write_rankings(path: &std::path::Path, n: usize, seed: u64, shuffled: bool) {
    common::first_digit_rankings(path, n, seed, shuffled);
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
    let _serial = common::serial();
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
    let _serial = common::serial();
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
