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
    assert!(
        summary.flags.is_empty(),
        "a learning stage is not flagged: {:?}",
        summary.flags
    );
    // The length-only rule on the same pairs, where length says nothing
    // of the first digit: near chance, far below the model.
    let length = eval.length_accuracy.unwrap();
    assert!(
        (0.35..0.65).contains(&length) && eval.accuracy > length + 0.2,
        "{length}"
    );
}

#[test]
fn a_reward_model_on_shuffled_labels_is_flagged() {
    let _serial = common::serial();
    let d = tempfile::tempdir().unwrap();
    let (train, eval) = (d.path().join("train.jsonl"), d.path().join("eval.jsonl"));
    write_rankings(&train, 400, 1, true);
    write_rankings(&eval, 60, 2, true);
    let mut config = config(train, eval, 2);
    config.train.fail_if_not_learning = true;
    let summary = run(&config, &common::ctx(d.path().join("warn"))).unwrap();
    assert!(
        summary
            .flags
            .iter()
            .any(|f| f.contains("may not be learning")),
        "shuffled labels are flagged: {:?}",
        summary.flags
    );
    // The stage itself finishes (the runner stops what depends on it).
    assert!(d.path().join("warn/checkpoint/model.safetensors").exists());
}

/// The length-only baseline on a fixture, by hand. Group 1 ranks "aaa"
/// over "a" over "aa": the longer wins 2 of its 3 pairs. Group 2 ranks
/// "bb" over "cc": equal lengths, one half. (2 + 0.5) / 4 = 0.625.
#[test]
fn the_length_baseline_on_a_fixture_matches_the_hand_count() {
    let _serial = common::serial();
    let d = tempfile::tempdir().unwrap();
    let (train, eval) = (d.path().join("train.jsonl"), d.path().join("eval.jsonl"));
    synthetic(&train, 16, 1);
    std::fs::write(
        &eval,
        "{\"prompt\": \"Q: 1\\n\", \"responses\": [\"aaa\", \"a\", \"aa\"], \"ranking\": [0, 1, 2]}\n\
         {\"prompt\": \"Q: 2\\n\", \"responses\": [\"bb\", \"cc\"], \"ranking\": [0, 1]}\n",
    )
    .unwrap();
    let summary = run(&config(train, eval, 1), &common::ctx(d.path().join("run"))).unwrap();
    let eval = summary.eval.unwrap();
    assert_eq!(eval.pairs, 4);
    assert_eq!(eval.length_accuracy, Some(0.625));
}
