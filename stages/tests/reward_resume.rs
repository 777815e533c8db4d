//! Stop reward-model training mid-run, resume, and the final weights and
//! optimiser moments equal an uninterrupted run's bit for bit (CPU).

mod common;

use rlhf_stages::checkpoint::{weights_of, HeadChoice};
use rlhf_stages::reward::{run, RewardConfig, RewardJob};
use rlhf_stages::train::{StageError, FINAL_DIR, OPTIMIZER_FILE};
use rlhf_stages::Model;
use tch::{Device, Tensor};

#[test]
fn resumed_reward_training_equals_uninterrupted_bit_for_bit() {
    let d = tempfile::tempdir().unwrap();
    let data = common::task_slice(d.path(), "preferences.jsonl", 120);
    let demos = common::task_slice(d.path(), "sft.jsonl", 50);
    let mut scratch = common::tiny_model();
    scratch.config.resid_pdrop = 0.1;
    let job = |out: &str| RewardJob {
        config: RewardConfig {
            data: data.clone(),
            batch_size: 4,
            grad_accum: 2,
            max_steps: Some(11),
            checkpoint_every: 3,
            eval_every: 4,
            normalize_on: Some(demos.clone()),
            ..RewardConfig::default()
        },
        scratch: scratch.clone(),
        out_dir: d.path().join(out),
        device: Device::Cpu,
        stop_after_step: None,
    };
    let a = run(&job("a")).unwrap();
    let mut b = job("b");
    b.stop_after_step = Some(7);
    assert!(matches!(run(&b), Err(StageError::StoppedEarly(7))));
    b.stop_after_step = None;
    let b_summary = run(&b).unwrap();
    assert_eq!(a.normalization, b_summary.normalization);
    let load = |out: &str| {
        let dir = d.path().join(out).join(FINAL_DIR);
        let m = Model::load(&dir, HeadChoice::AsSaved, Device::Cpu).unwrap();
        let mut w = weights_of(&m);
        for (k, v) in Tensor::read_safetensors(dir.join(OPTIMIZER_FILE)).unwrap() {
            w.insert(format!("optimizer.{k}"), v);
        }
        w
    };
    let (wa, wb) = (load("a"), load("b"));
    assert!(wa.contains_key("score.bias"));
    for (k, t) in &wa {
        assert!(t.equal(&wb[k]), "{k} differs after resume");
    }
}
