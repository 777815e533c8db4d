//! GRPO end to end on a tiny task whose reward is a simple rule: the mean
//! score rises with no critic; a stopped run resumes to the same weights
//! bit for bit.

use crate::common;

use std::sync::Arc;

use rlhf_stages::model::checkpoint::{weights_of, HeadChoice};
use rlhf_stages::model::sample::SamplingConfig;
use rlhf_stages::rl::grpo::{run, GrpoConfig};
use rlhf_stages::train::{StageContext, StageError, FINAL_DIR};
use rlhf_stages::Model;
use tch::Device;

/// The judge rewards the share of lowercase letters (`common::lowercase_share`).
fn setup(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    common::rule_policy_and_prompts(dir)
}

/// Each iteration's score in a run folder's metrics, and the means of the
/// first two and of the last two.
fn scores(out: &std::path::Path) -> (Vec<f64>, f64, f64) {
    let scores: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["score"]
                .as_f64()
                .unwrap()
        })
        .collect();
    let n = scores.len();
    let (early, late) = (
        (scores[0] + scores[1]) / 2.0,
        (scores[n - 2] + scores[n - 1]) / 2.0,
    );
    (scores, early, late)
}

fn ctx(out: std::path::PathBuf, stop_after: Option<i64>) -> StageContext {
    StageContext {
        judge: Some(Arc::new(|p: &str, a: &str| {
            Some(common::lowercase_share(p, a))
        })),
        stop_after,
        ..common::ctx(out)
    }
}

fn config(policy: std::path::PathBuf, prompts: std::path::PathBuf, iterations: i64) -> GrpoConfig {
    GrpoConfig {
        prompts,
        policy,
        gold_reward: true, // the judge: the rule above
        iterations,
        prompts_per_iteration: 4,
        group_size: 8,
        minibatch_size: 8,
        epochs: 2,
        beta: 0.1,
        sampling: SamplingConfig {
            temperature: 1.0,
            max_new_tokens: 8,
            ..SamplingConfig::default()
        },
        optimizer: rlhf_stages::optim::AdamWConfig {
            lr: 2e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
        checkpoint_every: 2,
        ..GrpoConfig::default()
    }
}

#[test]
fn grpo_raises_a_rule_based_reward_without_a_critic() {
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
    // The bar of the PPO test: +0.25 in 15 iterations of 32 answers, which
    // a wrong sign, broken group advantages or no update cannot pass.
    assert!(late > early + 0.25, "score {early:.3} -> {late:.3}");
    // Per token, far from the ln 264 = 5.6 nats of a policy collapsed
    // onto one letter (seen here: 0.10 -> 0.62, 1.07 nats).
    assert!(summary.last_kl < 2.0, "per-token KL {:.3}", summary.last_kl);
    for key in [
        "kl",
        "policy_loss",
        "clip_fraction",
        "zero_spread",
        "answer_length",
    ] {
        assert!(lines[0][key].is_number(), "metrics lack {key}");
    }
    assert!(!d.path().join("run/critic").exists(), "no critic");
    assert!(summary.flags.is_empty(), "{:?}", summary.flags);
}

#[test]
fn stopped_grpo_resumes_to_identical_weights() {
    let _serial = common::serial();
    let d = tempfile::tempdir().unwrap();
    let (policy, prompts) = setup(d.path());
    let cfg = config(policy, prompts, 5);
    run(&cfg, &ctx(d.path().join("a"), None)).unwrap();
    let e = run(&cfg, &ctx(d.path().join("b"), Some(3))).unwrap_err();
    assert!(matches!(e, StageError::StoppedEarly(3)), "{e}");
    run(&cfg, &ctx(d.path().join("b"), None)).unwrap();
    let load = |run: &str| {
        let m = Model::load(
            &d.path().join(run).join(FINAL_DIR),
            HeadChoice::AsSaved,
            Device::Cpu,
        )
        .unwrap();
        weights_of(&m)
    };
    let (a, b) = (load("a"), load("b"));
    for (k, t) in &a {
        assert!(t.equal(&b[k]), "{k} differs after resume");
    }
    let metrics =
        |run: &str| std::fs::read_to_string(d.path().join(run).join("metrics.jsonl")).unwrap();
    let scores = |text: String| -> Vec<String> {
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["score"].to_string())
            .collect()
    };
    assert_eq!(scores(metrics("a")), scores(metrics("b")), "the same curve");
}

/// The same run in bf16 autocast (fp32 master weights) learns as fp32 does.
#[test]
fn grpo_in_bf16_raises_the_reward_too() {
    let _serial = common::serial();
    use rlhf_stages::kind::StageConfig;
    let d = tempfile::tempdir().unwrap();
    let (policy, prompts) = setup(d.path());
    let fp32 = config(policy, prompts, 15);
    let cfg = GrpoConfig {
        precision: rlhf_stages::model::precision::Precision::Bf16,
        ..fp32.clone()
    };
    let scores_of = |cfg: &GrpoConfig, out: &str| -> Vec<f64> {
        StageConfig::run(cfg, &ctx(d.path().join(out), None)).unwrap();
        scores(&d.path().join(out)).0
    };
    let scores = scores_of(&cfg, "run");
    assert_ne!(
        scores,
        scores_of(&fp32, "fp32"),
        "bf16 autocast took effect"
    );
    let (early, late) = (
        (scores[0] + scores[1]) / 2.0,
        (scores[13] + scores[14]) / 2.0,
    );
    assert!(late > early + 0.25, "bf16: score {early:.3} -> {late:.3}");
    let weights =
        tch::Tensor::read_safetensors(d.path().join("run/checkpoint/model.safetensors")).unwrap();
    assert!(weights.iter().all(|(_, t)| t.kind() == tch::Kind::Float));
    // Each iteration's answers, with their group advantage on every token.
    let rows = rlhf_datasets::rollout::read_prompts_and_answers(
        &d.path().join("run/rollouts/iter-0015.parquet"),
    )
    .unwrap();
    assert_eq!(rows.len(), 32);
}

/// The critic-free family on the same rule: each objective and advantage
/// estimator raises the score by the bar of the GRPO test, under a KL
/// bound (a wrong sign or a broken normalisation cannot pass).
#[test]
fn the_critic_free_family_raises_the_reward_too() {
    let _serial = common::serial();
    use rlhf_stages::rl::grpo::math::{AdvantageEstimator, LossType};
    use rlhf_stages::rl::grpo::KlPlacement;
    let d = tempfile::tempdir().unwrap();
    let (policy, prompts) = setup(d.path());
    let base = config(policy, prompts, 15);
    // Leave-one-out advantages are the score differences themselves, a
    // few times smaller than GRPO's (divided by the group's spread): a
    // larger step for them.
    let faster = rlhf_stages::optim::AdamWConfig {
        lr: 6e-3,
        ..base.optimizer.clone()
    };
    let variants = [
        (
            "dapo, clip-higher, rloo",
            GrpoConfig {
                loss_type: LossType::Dapo,
                epsilon_high: Some(0.28),
                advantage: AdvantageEstimator::Rloo,
                optimizer: faster.clone(),
                ..base.clone()
            },
        ),
        (
            "gspo",
            GrpoConfig {
                loss_type: LossType::Gspo,
                ..base.clone()
            },
        ),
        (
            "cispo",
            GrpoConfig {
                loss_type: LossType::Cispo,
                ..base.clone()
            },
        ),
        (
            "rloo loss, KL in the reward",
            GrpoConfig {
                loss_type: LossType::Rloo,
                advantage: AdvantageEstimator::Rloo,
                kl_in: KlPlacement::Reward,
                optimizer: faster.clone(),
                beta: 0.01,
                ..base.clone()
            },
        ),
        (
            "REINFORCE++, dr_grpo, overlong shaping",
            GrpoConfig {
                loss_type: LossType::DrGrpo,
                advantage: AdvantageEstimator::ReinforcePp,
                kl_in: KlPlacement::Reward,
                // OpenRLHF's KL coefficient: summed over the tokens to
                // come, 0.1 would outweigh the score.
                beta: 0.01,
                overlong_buffer: 2,
                ..base.clone()
            },
        ),
        (
            "REINFORCE++-baseline, bnpo",
            GrpoConfig {
                loss_type: LossType::Bnpo,
                advantage: AdvantageEstimator::ReinforcePpBaseline,
                ..base.clone()
            },
        ),
    ];
    let mut failed = vec![];
    for (name, cfg) in variants {
        let out = d.path().join(name.replace([' ', ',', '+'], "_"));
        let summary = run(&cfg, &ctx(out.clone(), None)).unwrap();
        let (_, early, late) = scores(&out);
        eprintln!(
            "{name}: score {early:.3} -> {late:.3}, KL {:.3}",
            summary.last_kl
        );
        // Collapsed onto one letter would be ln 264 = 5.6 nats a token.
        if late <= early + 0.25 || summary.last_kl >= 4.0 {
            failed.push(name);
        }
    }
    assert!(failed.is_empty(), "did not learn under the bar: {failed:?}");
}

/// DAPO's dynamic sampling: under a reward that few answers earn (a "q"
/// anywhere), most groups score alike; extra rounds replace them, so the
/// first iteration (whose first round is the same with and without) keeps
/// fewer groups without spread, and says how many rounds it took.
#[test]
fn dynamic_sampling_replaces_groups_without_spread() {
    let _serial = common::serial();
    let d = tempfile::tempdir().unwrap();
    let (policy, prompts) = setup(d.path());
    let rare = |out: std::path::PathBuf| StageContext {
        judge: Some(Arc::new(|_: &str, a: &str| {
            Some(f64::from(u8::from(a.contains('q'))))
        })),
        ..common::ctx(out)
    };
    let plain = config(policy, prompts, 1);
    let dynamic = GrpoConfig {
        dynamic_sampling_rounds: 3,
        ..plain.clone()
    };
    let first = |cfg: &GrpoConfig, name: &str| -> serde_json::Value {
        run(cfg, &rare(d.path().join(name))).unwrap();
        let text = std::fs::read_to_string(d.path().join(name).join("metrics.jsonl")).unwrap();
        serde_json::from_str(text.lines().next().unwrap()).unwrap()
    };
    let (a, b) = (first(&plain, "plain"), first(&dynamic, "dynamic"));
    let zero = |m: &serde_json::Value| m["zero_spread"].as_f64().unwrap();
    assert!(zero(&a) >= 0.5, "the reward is rare enough: {a}");
    assert!(zero(&b) < zero(&a), "{} -> {}", zero(&a), zero(&b));
    assert!(b["extra_rounds"].as_u64().unwrap() >= 1, "{b}");
    assert!(a.get("extra_rounds").is_none());
}

/// RL from a verifiable reward: after SFT on arithmetic demonstrations
/// that are right half the time, GRPO scored by the math checker alone
/// (`reward: {checker: math}`, the prompts' `answer` column) raises the
/// share of sampled answers the checker accepts (pass@1 at temperature 1)
/// by at least 0.2; every score is kept in the stage's cache.
#[test]
fn grpo_learns_arithmetic_from_a_checker_alone() {
    use rlhf_datasets::arithmetic::{generate, ArithmeticConfig};
    use rlhf_stages::rl::reward::{Checker, RewardConfig, CACHE_FILE};
    let _serial = common::serial();
    let d = tempfile::tempdir().unwrap();
    let task = ArithmeticConfig {
        sft_examples: 2000,
        prompts: 400,
        eval_prompts: 10,
        max_operand: 4,
        ..ArithmeticConfig::default()
    };
    generate(d.path(), &task).unwrap();
    fine_tune(d.path(), 24, None);
    let cfg = GrpoConfig {
        gold_reward: false,
        reward: Some(RewardConfig {
            checker: Some(Checker::Math),
            ..RewardConfig::default()
        }),
        group_size: 8,
        prompts_per_iteration: 8,
        minibatch_size: 16,
        beta: 0.04,
        sampling: SamplingConfig {
            temperature: 1.0,
            max_new_tokens: 6,
            ..SamplingConfig::default()
        },
        ..config(
            d.path().join("sft").join(FINAL_DIR),
            d.path().join("prompts.jsonl"),
            20,
        )
    };
    let out = d.path().join("grpo");
    run(&cfg, &common::ctx(out.clone())).unwrap();
    let (all, early, late) = scores(&out);
    eprintln!("pass@1 (sampled) {early:.3} -> {late:.3}");
    assert!(
        late > early + 0.2,
        "pass@1 {early:.3} -> {late:.3}: {all:?}"
    );
    let cached = std::fs::read_to_string(out.join(CACHE_FILE)).unwrap();
    assert!(cached.lines().count() >= 8, "scores kept");
}

/// Multi-turn episodes with a tool: after SFT on demonstrations that call
/// the calculator 30% of the time (else guess), GRPO with the calculator
/// environment (`env`), which answers `CALC a*b` turns and scores the
/// final answer, teaches the policy to call it: the share of episodes
/// that call it and their score both rise by at least 0.3. The
/// environment's tokens carry no advantage (they are out of the loss and
/// the KL), the policy's do, and the rollout files record every turn.
#[test]
fn grpo_learns_to_call_a_calculator_tool() {
    use rlhf_datasets::calculator::{generate, reply, CalculatorConfig, CALL};
    use rlhf_stages::rl::episode::EnvConfig;
    const ITERATIONS: i64 = 12;
    let _serial = common::serial();
    let d = tempfile::tempdir().unwrap();
    let task = CalculatorConfig {
        sft_examples: 4000,
        prompts: 400,
        eval_prompts: 10,
        ..CalculatorConfig::default()
    };
    generate(d.path(), &task).unwrap();
    // Wide enough to copy four digits reliably.
    let shape = rlhf_stages::GptConfig {
        vocab_size: 264,
        n_positions: 48,
        n_embd: 128,
        n_layer: 3,
        n_head: 4,
        ..rlhf_stages::GptConfig::default()
    };
    fine_tune(d.path(), 44, Some(shape));
    let cfg = GrpoConfig {
        gold_reward: false,
        env: Some(EnvConfig {
            command: vec!["calculator".into()],
            max_turns: 3,
            ..EnvConfig::default()
        }),
        group_size: 8,
        prompts_per_iteration: 8,
        minibatch_size: 16,
        beta: 0.04,
        sampling: SamplingConfig {
            temperature: 1.0,
            max_new_tokens: 12,
            ..SamplingConfig::default()
        },
        save_rollouts: true,
        optimizer: rlhf_stages::optim::AdamWConfig {
            lr: 5e-4,
            weight_decay: 0.0,
            ..Default::default()
        },
        ..config(
            d.path().join("sft").join(FINAL_DIR),
            d.path().join("prompts.jsonl"),
            ITERATIONS,
        )
    };
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = calls.clone();
    let ctx = StageContext {
        env_runner: Some(Arc::new(move |command, _, requests| {
            assert_eq!(command, ["calculator"]);
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(requests
                .iter()
                .map(|r| reply(r["response"].as_str().unwrap(), r["answer"].as_str()))
                .collect())
        })),
        ..common::ctx(d.path().join("grpo"))
    };
    run(&cfg, &ctx).unwrap();
    let out = d.path().join("grpo");
    let (all, _, _) = scores(&out);
    // Per iteration: the share of episodes whose first turn calls the
    // tool; and every environment token's advantage is 0.
    let mut tool_share = vec![];
    for it in 1..=ITERATIONS {
        let df =
            rlhf_datasets::load::read_table(&out.join(format!("rollouts/iter-{it:04}.parquet")))
                .unwrap();
        let texts = df.column("turn_texts").unwrap().list().unwrap().clone();
        let roles = df.column("turn_roles").unwrap().list().unwrap().clone();
        let tokens = df.column("turn_tokens").unwrap().list().unwrap().clone();
        let adv = df.column("advantages").unwrap().list().unwrap().clone();
        let mut called = 0;
        for row in 0..df.height() {
            let strings = |l: &polars::prelude::ListChunked| -> Vec<String> {
                let s = l.get_as_series(row).unwrap();
                s.str()
                    .unwrap()
                    .iter()
                    .map(|x| x.unwrap().to_owned())
                    .collect()
            };
            let (texts, roles) = (strings(&texts), strings(&roles));
            assert!(!texts.is_empty(), "an episode has turns");
            called += usize::from(texts[0].starts_with(CALL.trim_end()));
            let sizes: Vec<u32> = tokens
                .get_as_series(row)
                .unwrap()
                .u32()
                .unwrap()
                .iter()
                .flatten()
                .collect();
            let a: Vec<f64> = adv
                .get_as_series(row)
                .unwrap()
                .f64()
                .unwrap()
                .iter()
                .flatten()
                .collect();
            let mut at = 0;
            for (role, n) in roles.iter().zip(&sizes) {
                let part = &a[at..at + *n as usize];
                if role == "environment" {
                    assert!(
                        part.iter().all(|&x| x == 0.0),
                        "iteration {it}: environment tokens in the loss: {part:?}"
                    );
                } else {
                    assert_eq!(role, "policy");
                }
                at += *n as usize;
            }
            assert_eq!(at, a.len(), "the turns cover the answer's tokens");
        }
        tool_share.push(called as f64 / df.height() as f64);
    }
    // The SFT policy's own episodes (iteration 1) against the last five
    // iterations'.
    let last5 = |x: &[f64]| x[x.len() - 5..].iter().sum::<f64>() / 5.0;
    let (tool_early, tool_late) = (tool_share[0], last5(&tool_share));
    let (early, late) = (all[0], last5(&all));
    eprintln!("score {early:.3} -> {late:.3}; calls the tool {tool_early:.3} -> {tool_late:.3}");
    eprintln!("scores {all:?}\ntool share {tool_share:?}");
    assert!(
        calls.load(std::sync::atomic::Ordering::SeqCst) >= 20,
        "the environment ran"
    );
    assert!(tool_late > tool_early + 0.3, "tool calls {tool_share:?}");
    assert!(late > early + 0.3, "scores {all:?}");
}

/// SFT of the scratch model (or one of `shape`) on `dir/sft.jsonl` into
/// `dir/sft`: 8 epochs at lr 3e-3, examples cut to `max_len` tokens.
fn fine_tune(dir: &std::path::Path, max_len: usize, shape: Option<rlhf_stages::GptConfig>) {
    use rlhf_stages::kinds::sft::SftConfig;
    tch::manual_seed(11);
    let sft = SftConfig {
        eval_fraction: 0.0,
        max_len,
        train: rlhf_stages::train::TrainSettings {
            batch_size: 32,
            epochs: 8,
            optimizer: rlhf_stages::optim::AdamWConfig {
                lr: 3e-3,
                ..Default::default()
            },
            eval_every: 10_000,
            checkpoint_every: 10_000,
            ..SftConfig::default().train
        },
        ..SftConfig::default()
    };
    let mut job = common::sft_job(dir.join("sft.jsonl"), dir.join("sft"), sft);
    if let Some(shape) = shape {
        job.ctx.scratch.config = shape.into();
    }
    rlhf_stages::kinds::sft::run(&job.config, &job.ctx).unwrap();
}
