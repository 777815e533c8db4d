//! `rlhf bench` (hidden): the Rust side of `just bench`. Each mode times
//! one piece of work and prints one JSON line; `bench/bench.py` runs it
//! alternately with the Python reference and computes the ratios.

use std::time::Instant;

use anyhow::Context;
use rlhf_datasets::batch::LmBatch;
use rlhf_stages::device::parse_device;
use rlhf_stages::optim::{AdamW, AdamWConfig};
use rlhf_stages::ppo::{self, PpoConfig, PpoJob};
use rlhf_stages::sample::{generate, SamplingConfig, TokenSpec};
use rlhf_stages::sft::masked_nll_sum;
use rlhf_stages::{GptConfig, Head, HeadChoice, Model};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::cli::{BenchArgs, BenchMode};

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device.device)?;
    tch::manual_seed(args.seed);
    let out = match args.mode {
        BenchMode::Train => train(&args, device)?,
        BenchMode::Generate => rollout(&args, device)?,
        BenchMode::Ppo => ppo_iteration(&args, device)?,
        BenchMode::Matmul => matmul(&args, device),
    };
    println!("{out}");
    Ok(())
}

fn config(args: &BenchArgs) -> GptConfig {
    GptConfig {
        vocab_size: args.vocab_size,
        n_positions: args.n_positions,
        n_embd: args.n_embd,
        n_layer: args.n_layer,
        n_head: args.n_head,
        ..GptConfig::default()
    }
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// SFT training steps on random tokens: forward, mean NLL over every
/// token, backward, clip to norm 1, AdamW. Tokens/s of the timed steps.
fn train(args: &BenchArgs, device: Device) -> anyhow::Result<serde_json::Value> {
    let cfg = config(args);
    let model = Model::init(&cfg, Head::Lm, rlhf_datasets::Tokenizer::bytes(), device)?;
    let mut opt = AdamW::new(
        &model.vs,
        AdamWConfig {
            lr: 1e-4,
            ..AdamWConfig::default()
        },
    );
    let (b, t) = (args.batch, args.seq);
    let n = (b * t) as usize;
    let ids = Tensor::randint(cfg.vocab_size, [b, t + 1], (Kind::Int64, Device::Cpu));
    let flat: Vec<i64> = Vec::try_from(ids.reshape([-1]))?;
    let (mut inputs, mut targets) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for row in flat.chunks(t as usize + 1) {
        inputs.extend_from_slice(&row[..t as usize]);
        targets.extend_from_slice(&row[1..]);
    }
    let batch = LmBatch {
        rows: b as usize,
        width: t as usize,
        input_ids: inputs,
        targets,
        loss_mask: vec![1.0; n],
        target_tokens: n,
    };
    let mut times = Vec::new();
    for step in 0..args.warmup + args.steps {
        sync(device);
        let t0 = Instant::now();
        opt.zero_grad();
        let (nll, count) = masked_nll_sum(&model.gpt, &batch, device, true);
        let loss = nll / count;
        loss.backward();
        opt.clip_grad_norm(1.0);
        opt.step(1e-4);
        sync(device);
        if step >= args.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let step_s = median(times);
    Ok(json!({
        "mode": "train", "params": cfg.n_params(), "batch": b, "seq": t,
        "step_seconds": step_s, "tokens_per_s": (b * t) as f64 / step_s,
    }))
}

/// Sampled answers (temperature 1, no early stop) to random prompts with
/// the KV cache. Tokens/s of new tokens.
fn rollout(args: &BenchArgs, device: Device) -> anyhow::Result<serde_json::Value> {
    let model = match &args.model {
        Some(dir) => Model::load(dir, HeadChoice::Want(Head::Lm), device)?,
        None => Model::init(
            &config(args),
            Head::Lm,
            rlhf_datasets::Tokenizer::bytes(),
            device,
        )?,
    };
    let vocab = model.gpt.config().vocab_size;
    let ids = Tensor::randint(
        vocab.min(256),
        [args.batch, args.prompt_len],
        (Kind::Int64, Device::Cpu),
    );
    let flat: Vec<i64> = Vec::try_from(ids.reshape([-1]))?;
    let prompts: Vec<Vec<i64>> = flat
        .chunks(args.prompt_len as usize)
        .map(<[i64]>::to_vec)
        .collect();
    let sampling = SamplingConfig {
        temperature: 1.0,
        max_new_tokens: args.new_tokens,
        stop_at_eos: false,
        ..SamplingConfig::default()
    };
    let spec = TokenSpec {
        eos: vocab - 1,
        pad: 0,
        vocab_size: vocab,
    };
    let mut times = Vec::new();
    for rep in 0..args.warmup + args.steps {
        sync(device);
        let t0 = Instant::now();
        let g = generate(&model.gpt, &prompts, &sampling, spec, device)?;
        sync(device);
        anyhow::ensure!(g.answers.iter().all(|a| a.len() as i64 == args.new_tokens));
        if rep >= args.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let s = median(times);
    Ok(json!({
        "mode": "generate", "batch": args.batch, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "seconds": s,
        "tokens_per_s": (args.batch * args.new_tokens) as f64 / s,
    }))
}

/// PPO iterations (rollout, reference and reward scoring, GAE, update) with
/// a policy and a reward model; the median iteration's wall time.
fn ppo_iteration(args: &BenchArgs, device: Device) -> anyhow::Result<serde_json::Value> {
    let dir = tempfile::tempdir()?;
    let policy_dir = match &args.model {
        Some(d) => d.clone(),
        None => {
            let p = dir.path().join("policy");
            Model::init(
                &config(args),
                Head::Lm,
                rlhf_datasets::Tokenizer::bytes(),
                device,
            )?
            .save(&p)?;
            p
        }
    };
    let policy = Model::load(&policy_dir, HeadChoice::AsSaved, device)?;
    let rm_dir = dir.path().join("rm");
    Model::init(
        policy.gpt.config(),
        Head::Scalar,
        policy.tokenizer.clone(),
        device,
    )?
    .save(&rm_dir)?;
    // Prompts of `prompt_len` random bytes; answers of exactly `new_tokens`.
    let mut lines = String::new();
    for i in 0..args.batch * 4 {
        let p: String = (0..args.prompt_len)
            .map(|j| char::from(b'a' + ((i * 7 + j * 13) % 26) as u8))
            .collect();
        lines.push_str(&json!({ "prompt": p }).to_string());
        lines.push('\n');
    }
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(&prompts, lines)?;
    let config = PpoConfig {
        prompts,
        policy: Some(policy_dir),
        reward_model: Some(rm_dir),
        iterations: args.warmup + args.steps,
        rollout_batch: args.batch as usize,
        minibatch_size: args.minibatch as usize,
        ppo_epochs: 1,
        sampling: SamplingConfig {
            temperature: 1.0,
            max_new_tokens: args.new_tokens,
            stop_at_eos: false,
            ..SamplingConfig::default()
        },
        save_rollouts: false,
        checkpoint_every: 1_000_000,
        ..PpoConfig::default()
    };
    let out = dir.path().join("ppo");
    ppo::run(&PpoJob {
        config,
        out_dir: out.clone(),
        device,
        reward_rule: None,
        stop_after_iteration: None,
    })?;
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).context("ppo metrics")?;
    let times: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["iteration"].as_i64().is_some_and(|i| i > args.warmup))
        .filter_map(|r| r["iteration_seconds"].as_f64())
        .collect();
    anyhow::ensure!(!times.is_empty(), "no timed PPO iterations");
    Ok(json!({
        "mode": "ppo", "batch": args.batch, "new_tokens": args.new_tokens,
        "iteration_seconds": median(times),
    }))
}

/// The matmul peak of this machine through libtorch: FLOP/s of square
/// float32 matmuls, the denominator of MFU.
fn matmul(args: &BenchArgs, device: Device) -> serde_json::Value {
    let n = args.size;
    let a = Tensor::randn([n, n], (Kind::Float, device));
    let b = Tensor::randn([n, n], (Kind::Float, device));
    let mut times = Vec::new();
    for rep in 0..args.warmup + args.steps {
        sync(device);
        let t0 = Instant::now();
        let c = a.matmul(&b);
        sync(device);
        let _ = c.size();
        if rep >= args.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let s = median(times);
    json!({"mode": "matmul", "size": n, "seconds": s, "flops_per_s": 2.0 * (n as f64).powi(3) / s})
}
