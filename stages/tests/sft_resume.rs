//! Stop SFT mid-run, resume it, and the final weights and optimiser moments
//! equal an uninterrupted run's bit for bit (CPU).

use crate::common;

use std::collections::BTreeMap;

use rlhf_stages::kinds::sft::{run, SftConfig};
use rlhf_stages::model::checkpoint::HeadChoice;
use rlhf_stages::train::{StageError, TrainSettings, FINAL_DIR, OPTIMIZER_FILE};
use rlhf_stages::{model::checkpoint::weights_of, Model};
use tch::{Device, Tensor};

fn final_tensors(run_dir: &std::path::Path) -> BTreeMap<String, Tensor> {
    let ckpt = run_dir.join(FINAL_DIR);
    let model = Model::load(&ckpt, HeadChoice::AsSaved, Device::Cpu).unwrap();
    let mut all = weights_of(&model);
    for (k, v) in Tensor::read_safetensors(ckpt.join(OPTIMIZER_FILE)).unwrap() {
        all.insert(format!("optimizer.{k}"), v);
    }
    all
}

#[test]
fn resumed_sft_equals_uninterrupted_bit_for_bit() {
    let _serial = common::serial();
    let d = tempfile::tempdir().unwrap();
    let data = common::task_slice(d.path(), "sft.jsonl", 200);
    let config = SftConfig {
        train: TrainSettings {
            batch_size: 16,
            grad_accum: 2,
            max_steps: Some(14),
            eval_every: 5,
            checkpoint_every: 4,
            ..SftConfig::default().train
        },
        ..SftConfig::default()
    };
    let mut scratch = common::tiny_model();
    // Dropout on: the resumed run must restore the RNG too.
    let rlhf_stages::ModelConfig::Gpt2(gpt) = &mut scratch.config else {
        unreachable!()
    };
    gpt.resid_pdrop = 0.1;
    gpt.attn_pdrop = 0.1;

    let mut job = common::sft_job(data.clone(), d.path().join("a"), config.clone());
    job.ctx.scratch = scratch.clone();
    run(&job.config, &job.ctx).unwrap();

    let mut job = common::sft_job(data, d.path().join("b"), config);
    job.ctx.scratch = scratch;
    job.ctx.stop_after = Some(9);
    match run(&job.config, &job.ctx) {
        Err(StageError::StoppedEarly(9)) => {}
        other => panic!("expected a stop after step 9, got {other:?}"),
    }
    assert!(!d.path().join("b").join(FINAL_DIR).exists());
    job.ctx.stop_after = None;
    run(&job.config, &job.ctx).unwrap();

    let (a, b) = (
        final_tensors(&d.path().join("a")),
        final_tensors(&d.path().join("b")),
    );
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, t) in &a {
        assert!(t.equal(&b[k]), "{k} differs after resume");
    }
    // The metrics log of the resumed run has each step once.
    let steps: Vec<i64> = std::fs::read_to_string(d.path().join("b/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        steps,
        (0..=14).collect::<Vec<_>>(),
        "step 0: the start's eval"
    );
}
