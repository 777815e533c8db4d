//! Settings that change how a step is computed, not what: with
//! `group_by_length` a step's examples sorted by length into its
//! micro-batches give the same loss and gradient as the shuffled
//! micro-batches, with less of each forward spent on padding; with
//! `gradient_checkpointing` the recomputed layers give the same steps.

use crate::common;

use rlhf_stages::kinds::reward::{self, RewardConfig};
use rlhf_stages::kinds::sft::{self, SftConfig};
use rlhf_stages::train::{TrainSettings, METRICS_FILE};

/// Per step of `metrics.jsonl`: loss, gradient norm, padding waste.
fn steps(run_dir: &std::path::Path) -> Vec<[f64; 3]> {
    let text = std::fs::read_to_string(run_dir.join(METRICS_FILE)).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|m| m["loss"].is_number())
        .map(|m| ["loss", "grad_norm", "padding_waste"].map(|k| m[k].as_f64().unwrap()))
        .collect()
}

/// Four steps of 4 micro-batches of 4; dropout off, so that the grouping
/// alone differs.
fn settings(train: TrainSettings, grouped: bool) -> TrainSettings {
    TrainSettings {
        batch_size: 4,
        grad_accum: 4,
        max_steps: Some(4),
        eval_every: 1000,
        checkpoint_every: 1000,
        group_by_length: grouped,
        ..train
    }
}

/// Equal losses and gradient norms step by step, to float rounding.
fn same_losses_and_gradient_norms(a: &[[f64; 3]], b: &[[f64; 3]]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        for k in 0..2 {
            let rel = (x[k] - y[k]).abs() / x[k].abs().max(1e-12);
            assert!(rel < 1e-5, "step {x:?} against {y:?}: {a:?} {b:?}");
        }
    }
}

/// Equal losses and gradient norms step by step (to float rounding); no
/// step pads more once grouped (sorted rows minimise the padded total),
/// and the run pads less.
fn same_steps_less_padding(shuffled: &[[f64; 3]], grouped: &[[f64; 3]]) {
    assert_eq!(shuffled.len(), 4);
    assert_eq!(shuffled.len(), grouped.len());
    for (a, b) in shuffled.iter().zip(grouped) {
        for k in 0..2 {
            let rel = (a[k] - b[k]).abs() / a[k].abs().max(1e-12);
            assert!(
                rel < 1e-5,
                "step {a:?} against grouped {b:?}: {shuffled:?} {grouped:?}"
            );
        }
        assert!(
            b[2] <= a[2] + 1e-12,
            "padding waste {} grouped, {} not",
            b[2],
            a[2]
        );
    }
    let total = |s: &[[f64; 3]]| s.iter().map(|x| x[2]).sum::<f64>();
    assert!(
        total(grouped) < total(shuffled) - 0.01,
        "{grouped:?} against {shuffled:?}"
    );
}

#[test]
fn sft_and_reward_steps_grouped_by_length_equal_shuffled_ones_with_less_padding() {
    let _serial = common::serial();
    let d = tempfile::tempdir().unwrap();
    let mut scratch = common::tiny_model();
    let rlhf_stages::ModelConfig::Gpt2(gpt) = &mut scratch.config else {
        unreachable!()
    };
    (gpt.resid_pdrop, gpt.attn_pdrop, gpt.embd_pdrop) = (0.0, 0.0, 0.0);

    let data = common::task_slice(d.path(), "sft.jsonl", 200);
    let mut runs = Vec::new();
    for grouped in [false, true] {
        let config = SftConfig {
            train: settings(SftConfig::default().train, grouped),
            ..SftConfig::default()
        };
        let out = d.path().join(format!("sft-{grouped}"));
        let mut job = common::sft_job(data.clone(), out.clone(), config);
        job.ctx.scratch = scratch.clone();
        sft::run(&job.config, &job.ctx).unwrap();
        runs.push(steps(&out));
    }
    same_steps_less_padding(&runs[0], &runs[1]);

    // 64 groups for training, the held-out ones apart: 16 full
    // micro-batches (a short one would weigh its groups more).
    let (rankings, held_out) = (d.path().join("rankings.jsonl"), d.path().join("eval.jsonl"));
    common::first_digit_rankings(&rankings, 64, 3, false);
    common::first_digit_rankings(&held_out, 8, 4, false);
    let mut runs = Vec::new();
    for grouped in [false, true] {
        let config = RewardConfig {
            data: rankings.clone(),
            eval_data: Some(held_out.clone()),
            train: settings(RewardConfig::default().train, grouped),
            ..RewardConfig::default()
        };
        let out = d.path().join(format!("rm-{grouped}"));
        let mut ctx = common::ctx(out.clone());
        ctx.scratch = scratch.clone();
        reward::run(&config, &ctx).unwrap();
        runs.push(steps(&out));
    }
    same_steps_less_padding(&runs[0], &runs[1]);
}

#[test]
fn sft_steps_with_gradient_checkpointing_equal_plain_ones() {
    let _serial = common::serial();
    let d = tempfile::tempdir().unwrap();
    let data = common::task_slice(d.path(), "sft.jsonl", 200);
    let mut runs = Vec::new();
    for checkpointing in [false, true] {
        let mut train = settings(SftConfig::default().train, false);
        train.gradient_checkpointing = checkpointing;
        let config = SftConfig {
            train,
            ..SftConfig::default()
        };
        let out = d.path().join(format!("sft-{checkpointing}"));
        let job = common::sft_job(data.clone(), out.clone(), config);
        sft::run(&job.config, &job.ctx).unwrap();
        runs.push(steps(&out));
    }
    assert_eq!(runs[0].len(), 4);
    same_losses_and_gradient_norms(&runs[0], &runs[1]);
}
