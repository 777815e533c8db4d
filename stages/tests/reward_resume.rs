//! Stop reward-model training mid-run, resume, and the final weights and
//! optimiser moments equal an uninterrupted run's bit for bit (CPU).

use crate::common;

use rlhf_stages::kinds::reward::{run, RewardConfig};
use rlhf_stages::model::checkpoint::{weights_of, HeadChoice};
use rlhf_stages::train::{StageContext, StageError, TrainSettings, FINAL_DIR, OPTIMIZER_FILE};
use rlhf_stages::Model;
use tch::{Device, Tensor};

#[test]
fn resumed_reward_training_equals_uninterrupted_bit_for_bit() {
    let _serial = common::serial();
    let d = tempfile::tempdir().unwrap();
    let data = common::task_slice(d.path(), "preferences.jsonl", 120);
    let demos = common::task_slice(d.path(), "sft.jsonl", 50);
    let mut scratch = common::tiny_model();
    let rlhf_stages::ModelConfig::Gpt2(gpt) = &mut scratch.config else {
        unreachable!()
    };
    gpt.resid_pdrop = 0.1;
    let config = RewardConfig {
        data: data.clone(),
        train: TrainSettings {
            batch_size: 4,
            grad_accum: 2,
            max_steps: Some(11),
            checkpoint_every: 3,
            eval_every: 4,
            ..RewardConfig::default().train
        },
        normalize_on: Some(demos.clone()),
        ..RewardConfig::default()
    };
    let ctx = |out: &str| StageContext {
        scratch: scratch.clone(),
        ..common::ctx(d.path().join(out))
    };
    let a = run(&config, &ctx("a")).unwrap();
    let mut b = ctx("b");
    b.stop_after = Some(7);
    assert!(matches!(run(&config, &b), Err(StageError::StoppedEarly(7))));
    b.stop_after = None;
    let b_summary = run(&config, &b).unwrap();
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
