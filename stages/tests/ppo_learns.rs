//! PPO end to end on a tiny task whose reward is a simple rule: the mean
//! reward rises while the KL to the reference stays bounded; and a stopped
//! run resumes to the same weights bit for bit.

use crate::common;

use std::sync::Arc;

use rlhf_stages::model::checkpoint::{weights_of, HeadChoice};
use rlhf_stages::model::sample::SamplingConfig;
use rlhf_stages::rl::ppo::{run, AdaptiveKl, PpoConfig};
use rlhf_stages::train::{StageContext, StageError, FINAL_DIR};
use rlhf_stages::Model;
use tch::Device;

fn setup(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    common::rule_policy_and_prompts(dir)
}

/// A run into `out` whose judge is the lowercase rule.
fn ctx(out: std::path::PathBuf, stop_after: Option<i64>) -> StageContext {
    StageContext {
        judge: Some(Arc::new(|p: &str, a: &str| {
            Some(common::lowercase_share(p, a))
        })),
        stop_after,
        ranks: std::sync::Arc::new(rlhf_stages::dist::Ranks::single()),
        ..common::ctx(out)
    }
}

fn config(policy: std::path::PathBuf, prompts: std::path::PathBuf, iterations: i64) -> PpoConfig {
    PpoConfig {
        prompts,
        policy,
        gold_reward: true, // the judge: the rule above
        iterations,
        rollout_batch: 32,
        sampling: SamplingConfig {
            temperature: 1.0,
            max_new_tokens: 8,
            ..SamplingConfig::default()
        },
        ppo_epochs: 4,
        minibatch_size: 8,
        kl_coef: 0.05,
        missing_eos_penalty: None,
        policy_optimizer: rlhf_stages::optim::AdamWConfig {
            lr: 2e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
        critic_optimizer: rlhf_stages::optim::AdamWConfig {
            lr: 2e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
        checkpoint_every: 2,
        ..PpoConfig::default()
    }
}

#[test]
fn reward_rises_under_a_kl_bound() {
    let _serial = common::serial();
    let d = tempfile::tempdir().unwrap();
    let (policy, prompts) = setup(d.path());
    let summary = run(
        &config(policy, prompts, 15),
        &ctx(d.path().join("run"), None),
    )
    .unwrap();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(d.path().join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let score = |i: usize| lines[i]["score"].as_f64().unwrap();
    let early = (score(0) + score(1)) / 2.0;
    let late = (score(13) + score(14)) / 2.0;
    // From about 0.1 (26 of 264 ids are lowercase letters) the rule is easy
    // to climb: +0.25 in 15 iterations of 32 answers is a modest bar that a
    // PPO with a wrong sign, broken advantages or no update cannot pass.
    assert!(late > early + 0.25, "score {early:.3} -> {late:.3}");
    // KL per answer of 8 tokens stays far from the ~35 nats of a policy
    // that put all its mass on one letter.
    assert!(summary.last_kl < 8.0, "KL {:.2}", summary.last_kl);
    for key in [
        "kl",
        "beta",
        "policy_loss",
        "value_loss",
        "entropy",
        "clip_fraction",
        "approx_kl",
        "explained_variance",
        "answer_length",
    ] {
        assert!(lines[0][key].is_number(), "metrics lack {key}");
    }
    assert!(d.path().join("run/rollouts/iter-0015.parquet").exists());
    assert!(d.path().join("run/critic/model.safetensors").exists());
}

#[test]
fn stopped_ppo_resumes_to_identical_weights() {
    let _serial = common::serial();
    let d = tempfile::tempdir().unwrap();
    let (policy, prompts) = setup(d.path());
    let mut cfg = config(policy, prompts, 5);
    cfg.adaptive_kl = Some(AdaptiveKl {
        target: 1.0,
        horizon: 100.0,
    });
    let job = |out: &str, stop: Option<i64>| ctx(d.path().join(out), stop);
    let a = run(&cfg, &job("a", None)).unwrap();
    assert!(matches!(
        run(&cfg, &job("b", Some(3))),
        Err(StageError::StoppedEarly(3))
    ));
    let b = run(&cfg, &job("b", None)).unwrap();
    assert_eq!(
        a.own["beta"], b.own["beta"],
        "the KL controller's state is restored"
    );
    for part in [FINAL_DIR, "critic"] {
        let load = |out: &str| {
            weights_of(
                &Model::load(
                    &d.path().join(out).join(part),
                    HeadChoice::AsSaved,
                    Device::Cpu,
                )
                .unwrap(),
            )
        };
        let (wa, wb) = (load("a"), load("b"));
        for (k, t) in &wa {
            assert!(t.equal(&wb[k]), "{part}: {k} differs after resume");
        }
    }
}

#[test]
fn ptx_adds_the_demonstration_loss() {
    let _serial = common::serial();
    let d = tempfile::tempdir().unwrap();
    let (policy, prompts) = setup(d.path());
    let demos = common::task_slice(d.path(), "sft.jsonl", 40);
    let mut cfg = config(policy, prompts, 2);
    cfg.ptx = Some(rlhf_stages::rl::ppo::PtxConfig {
        data: demos,
        coef: 27.8,
        batch_size: 4,
    });
    run(&cfg, &ctx(d.path().join("run"), None)).unwrap();
    let metrics = std::fs::read_to_string(d.path().join("run/metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // An untrained model's demonstration loss is near ln(264) = 5.6 nats;
    // 27.8 times that dominates the update, so it must fall at once.
    let (first, second) = (
        lines[0]["ptx_loss"].as_f64().unwrap(),
        lines[1]["ptx_loss"].as_f64().unwrap(),
    );
    assert!(
        first > 4.0 && second < first,
        "ptx loss {first} -> {second}"
    );
}
