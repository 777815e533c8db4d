//! The non-finite guard: a loss, gradient or reward that turns NaN or
//! infinite stops the stage with an error naming the step and the
//! quantity, before the update, and the last good checkpoint is kept.

use crate::common;

use rlhf_stages::kinds::sft::{run, SftConfig};
use rlhf_stages::model::checkpoint::HeadChoice;
use rlhf_stages::model::sample::SamplingConfig;
use rlhf_stages::optim::AdamWConfig;
use rlhf_stages::rl::ppo::{self, PpoConfig};
use rlhf_stages::train::{periodic_checkpoints, StageError, TrainSettings, FINAL_DIR};
use rlhf_stages::{Head, Model};
use tch::Device;

#[test]
fn exploding_sft_stops_at_the_step_and_keeps_the_last_good_checkpoint() {
    let _serial = common::serial();
    let d = tempfile::tempdir().unwrap();
    let data = common::task_slice(d.path(), "sft.jsonl", 64);
    // A learning rate of 1e30 without clipping sends the weights to
    // infinity after the first update; the next forward is not finite.
    let config = SftConfig {
        train: TrainSettings {
            batch_size: 8,
            max_steps: Some(6),
            checkpoint_every: 1,
            max_grad_norm: 0.0,
            optimizer: AdamWConfig {
                lr: 1e30,
                ..AdamWConfig::default()
            },
            schedule: rlhf_stages::optim::LrSchedule {
                warmup_steps: 0,
                min_lr_ratio: 1.0,
            },
            ..SftConfig::default().train
        },
        ..SftConfig::default()
    };
    let out = d.path().join("run");
    let job = common::sft_job(data, out.clone(), config);
    let err = run(&job.config, &job.ctx).unwrap_err();
    let StageError::NonFinite {
        step,
        quantity,
        value,
    } = &err
    else {
        panic!("expected the non-finite guard, got {err:?}");
    };
    assert!(*step >= 2, "the first update is finite: {err}");
    assert!(!value.is_finite());
    assert!(
        ["training loss", "gradient norm"].contains(quantity),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&format!("step {step}")) && message.contains(quantity),
        "{message}"
    );
    // No final checkpoint; the periodic ones before the blow-up load.
    assert!(!out.join(FINAL_DIR).exists());
    let kept = periodic_checkpoints(&out);
    assert!(!kept.is_empty());
    let (last_step, dir) = kept.last().unwrap();
    assert!(*last_step < *step);
    Model::load(dir, HeadChoice::AsSaved, Device::Cpu).unwrap();
}

#[test]
fn a_reward_model_that_returns_nan_stops_ppo_naming_the_reward() {
    let _serial = common::serial();
    let d = tempfile::tempdir().unwrap();
    let scratch = common::tiny_model();
    tch::manual_seed(3);
    let policy = Model::init(
        &scratch.config,
        Head::Lm,
        scratch.tokenizer.clone(),
        Device::Cpu,
    )
    .unwrap();
    policy.save(&d.path().join("policy")).unwrap();
    let rm = Model::init(
        &scratch.config,
        Head::Scalar,
        scratch.tokenizer,
        Device::Cpu,
    )
    .unwrap();
    tch::no_grad(|| {
        for (name, mut t) in rm.vs.variables() {
            if name.starts_with("score.") {
                let _ = t.fill_(f64::NAN);
            }
        }
    });
    rm.save(&d.path().join("rm")).unwrap();
    let prompts = d.path().join("prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"a\"}\n{\"prompt\": \"b\"}\n").unwrap();
    let job = common::Job {
        config: PpoConfig {
            prompts,
            policy: d.path().join("policy"),
            reward_model: Some(d.path().join("rm")),
            iterations: 2,
            rollout_batch: 2,
            minibatch_size: 2,
            sampling: SamplingConfig {
                max_new_tokens: 4,
                ..SamplingConfig::default()
            },
            ..PpoConfig::default()
        },
        ctx: common::ctx(d.path().join("ppo")),
    };
    let err = ppo::run(&job.config, &job.ctx).unwrap_err();
    assert!(
        matches!(
            err,
            StageError::NonFinite {
                step: 1,
                quantity: "reward-model score",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("step 1: reward-model score is NaN"),
        "{err}"
    );
    assert!(!d.path().join("ppo").join(FINAL_DIR).exists());
}
