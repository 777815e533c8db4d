//! The timed kernels behind `rlhf bench` (and `just bench`): each times
//! one piece of work and returns one JSON object; `bench/bench.py` runs
//! them alternately with the Python reference and computes the ratios.

use std::path::PathBuf;
use std::time::Instant;

use rlhf_datasets::batch::LmBatch;
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::error::{io_err, StageError};
use crate::model::sample::{generate, SamplingConfig, TokenSpec};
use crate::objectives::nll::masked_nll_sum;
use crate::optim::{AdamW, AdamWConfig};
use crate::{GptConfig, Head, HeadChoice, Model, ModelConfig};

mod stage_runs;
pub use stage_runs::{dpo_epochs, grpo_iterations, ppo_iterations};

/// The shape of the work to time.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    /// A model folder for generation and PPO; unset: a random model of the
    /// shape below.
    pub model: Option<PathBuf>,
    /// Generation: a JSON file `{"prompts": [[ids]], "eos": id, "pad": id}`
    /// of real prompts, answered in batches of `batch` until EOS or
    /// `new_tokens`; unset: random prompts of `prompt_len`, no early stop.
    pub prompts: Option<PathBuf>,
    /// DPO: rankings (as the dpo stage reads them); GRPO: prompt rows.
    pub data: Option<PathBuf>,
    /// GRPO: the reward model that scores answers.
    pub reward_model: Option<PathBuf>,
    /// GRPO: answers per prompt.
    pub group_size: i64,
    /// Training: activation checkpointing (`gradient_checkpointing`).
    pub gradient_checkpointing: bool,
    /// Generation: LoRA adapters of this rank on every projection (the
    /// base frozen, as PPO and GRPO with `lora:` sample); 0: none.
    pub lora_r: i64,
    pub n_layer: i64,
    pub n_head: i64,
    pub n_embd: i64,
    pub n_positions: i64,
    pub vocab_size: i64,
    pub batch: i64,
    pub seq: i64,
    pub prompt_len: i64,
    pub new_tokens: i64,
    pub minibatch: i64,
    /// Untimed repetitions first.
    pub warmup: i64,
    /// Timed repetitions (the median is reported).
    pub steps: i64,
    /// Matrix size for matmul.
    pub size: i64,
    /// libtorch's seed (random tokens, weights and samples).
    pub seed: i64,
    /// The caller runs train, generate and ppo in it; matmul takes
    /// bfloat16 operands for bf16.
    pub precision: crate::model::precision::Precision,
}

fn model_config(spec: &BenchSpec) -> ModelConfig {
    ModelConfig::Gpt2(GptConfig {
        vocab_size: spec.vocab_size,
        n_positions: spec.n_positions,
        n_embd: spec.n_embd,
        n_layer: spec.n_layer,
        n_head: spec.n_head,
        ..GptConfig::default()
    })
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

/// The model to time: `spec.model` (with LoRA adapters of rank
/// `spec.lora_r` when set), else a random one of the spec's shape.
fn bench_model(spec: &BenchSpec, device: Device) -> Result<Model, StageError> {
    let Some(dir) = &spec.model else {
        let tokenizer = rlhf_datasets::Tokenizer::bytes();
        return Ok(Model::init(
            &model_config(spec),
            Head::Lm,
            tokenizer,
            device,
        )?);
    };
    let mut model = Model::load(dir, HeadChoice::Want(Head::Lm), device)?;
    if spec.lora_r > 0 {
        let config = crate::model::lora::LoraConfig {
            r: spec.lora_r,
            alpha: 2.0 * spec.lora_r as f64,
            ..Default::default()
        };
        model.add_lora(&config, dir)?;
    }
    Ok(model)
}

/// SFT training steps on random tokens: forward, mean NLL over every
/// token, backward, clip to norm 1, AdamW. Tokens/s of the timed steps.
pub fn train(spec: &BenchSpec, device: Device) -> Result<serde_json::Value, StageError> {
    tch::manual_seed(spec.seed);
    let model = bench_model(spec, device)?;
    let cfg = model.net.config();
    if spec.gradient_checkpointing {
        model
            .net
            .set_gradient_checkpointing(true)
            .map_err(StageError::Config)?;
    }
    let mut opt = AdamW::new(
        &model.vs,
        AdamWConfig {
            lr: 1e-4,
            ..AdamWConfig::default()
        },
    );
    let (b, t) = (spec.batch, spec.seq);
    let n = (b * t) as usize;
    let ids = Tensor::randint(cfg.vocab_size(), [b, t + 1], (Kind::Int64, Device::Cpu));
    let flat: Vec<i64> = Vec::try_from(ids.reshape([-1])).expect("int64 ids");
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
        real_tokens: n,
    };
    let mut times = Vec::new();
    for step in 0..spec.warmup + spec.steps {
        sync(device);
        let t0 = Instant::now();
        opt.zero_grad();
        let (nll, count) = masked_nll_sum(&model.net, &batch, device, true);
        let loss = nll / count;
        loss.backward();
        model.net.backward_checkpointed();
        opt.clip_grad_norm(1.0);
        opt.step(1e-4);
        sync(device);
        if step >= spec.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let step_s = median(times);
    Ok(json!({
        "mode": "train", "params": cfg.n_params(), "batch": b, "seq": t, "lora_r": spec.lora_r,
        "trained_params": crate::train::trainable_by_name(&model).iter().map(Tensor::numel).sum::<usize>(),
        "step_seconds": step_s, "tokens_per_s": (b * t) as f64 / step_s,
        "gradient_checkpointing": spec.gradient_checkpointing,
        "peak_rss_mib": crate::memory::peak_rss_bytes().map(|b| b as f64 / (1 << 20) as f64),
    }))
}

/// Sampled answers (temperature 1) with the KV cache: to random prompts
/// without early stop, or to the prompts of `spec.prompts` until EOS.
/// Tokens/s of generated (real) tokens.
pub fn generation(spec: &BenchSpec, device: Device) -> Result<serde_json::Value, StageError> {
    tch::manual_seed(spec.seed);
    let model = bench_model(spec, device)?;
    let vocab = model.net.vocab_size();
    let (prompts, tokens, stop_at_eos) = match &spec.prompts {
        Some(path) => prompt_file(path, vocab)?,
        None => (
            random_prompts(spec, vocab),
            TokenSpec {
                eos: vocab - 1,
                pad: 0,
                vocab_size: vocab,
            },
            false,
        ),
    };
    let sampling = SamplingConfig {
        temperature: 1.0,
        max_new_tokens: spec.new_tokens,
        stop_at_eos,
        ..SamplingConfig::default()
    };
    let (mut rates, mut lengths, mut times) = (Vec::new(), Vec::new(), Vec::new());
    let mut last = None;
    for rep in 0..spec.warmup + spec.steps {
        sync(device);
        let t0 = Instant::now();
        let mut generated = 0;
        for batch in prompts.chunks(spec.batch as usize) {
            let g = generate(&model.net, batch, &sampling, tokens, device)?;
            generated += g.answers.iter().map(Vec::len).sum::<usize>();
            last = Some(g);
        }
        sync(device);
        if !stop_at_eos && generated as i64 != prompts.len() as i64 * spec.new_tokens {
            return Err(StageError::Config("bench: an answer stopped early".into()));
        }
        if rep >= spec.warmup {
            let seconds = t0.elapsed().as_secs_f64();
            rates.push(generated as f64 / seconds);
            times.push(seconds);
            lengths.push(generated as f64 / prompts.len() as f64);
        }
    }
    let tokens_per_s = median(rates);
    let [diff_max, diff_mean] = match &last {
        Some(g) => sampling_against_forward(&model, g),
        None => [f64::NAN; 2],
    };
    Ok(json!({
        "logprob_diff_max": diff_max, "logprob_diff_mean": diff_mean,
        "mode": "generate", "batch": spec.batch, "prompts": prompts.len(), "lora_r": spec.lora_r,
        "prompt_len": spec.prompt_len, "new_tokens": spec.new_tokens, "stop_at_eos": stop_at_eos,
        "mean_length": lengths.iter().sum::<f64>() / lengths.len() as f64,
        "seconds": median(times), "tokens_per_s": tokens_per_s,
    }))
}

/// How far the log-probabilities recorded while sampling `g` lie from a
/// full forward's over the same tokens (what PPO's and GRPO's
/// `rollout_logprob_diff` measures): max and mean over answer tokens.
fn sampling_against_forward(model: &Model, g: &crate::model::sample::Generation) -> [f64; 2] {
    // Over every id of the model, as the bench samples; one row at a time,
    // so that the check's logits do not count in the rollout's peak RSS.
    let vocab = model.net.vocab_size();
    let rows: Vec<Tensor> = (0..g.tokens.size()[0])
        .map(|i| {
            let row = |t: &Tensor| t.narrow(0, i, 1);
            let (tokens, mask) = (row(&g.tokens), row(&g.attention_mask));
            let net = &model.net;
            let width = g.prompt_width;
            tch::no_grad(|| {
                crate::rl::rollout::answer_logprobs(net, &tokens, &mask, width, vocab).0
            })
        })
        .collect();
    let lp = Tensor::cat(&rows, 0);
    let n = g.tokens.size()[1] - g.prompt_width;
    let mask = g
        .attention_mask
        .narrow(1, g.prompt_width, n)
        .to_kind(Kind::Float);
    crate::rl::rollout::masked_abs_diff(&lp, &g.logprobs, &mask)
}

/// `batch` random prompts of `prompt_len` byte-range ids.
fn random_prompts(spec: &BenchSpec, vocab: i64) -> Vec<Vec<i64>> {
    let ids = Tensor::randint(
        vocab.min(256),
        [spec.batch, spec.prompt_len],
        (Kind::Int64, Device::Cpu),
    );
    let flat: Vec<i64> = Vec::try_from(ids.reshape([-1])).expect("int64 ids");
    flat.chunks(spec.prompt_len as usize)
        .map(<[i64]>::to_vec)
        .collect()
}

/// The prompts, EOS and padding ids of a bench prompt file.
fn prompt_file(
    path: &std::path::Path,
    vocab: i64,
) -> Result<(Vec<Vec<i64>>, TokenSpec, bool), StageError> {
    #[derive(serde::Deserialize)]
    struct File {
        prompts: Vec<Vec<i64>>,
        eos: i64,
        pad: i64,
    }
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let f: File = serde_json::from_str(&text)
        .map_err(|e| StageError::Config(format!("{}: {e}", path.display())))?;
    let spec = TokenSpec {
        eos: f.eos,
        pad: f.pad,
        vocab_size: vocab,
    };
    Ok((f.prompts, spec, true))
}

/// The matmul peak of this machine through libtorch: FLOP/s of square
/// float32 matmuls, the denominator of MFU.
pub fn matmul(spec: &BenchSpec, device: Device) -> Result<serde_json::Value, StageError> {
    tch::manual_seed(spec.seed);
    let n = spec.size;
    let kind = match spec.precision {
        crate::model::precision::Precision::Fp32 => Kind::Float,
        crate::model::precision::Precision::Bf16 => Kind::BFloat16,
    };
    let a = Tensor::randn([n, n], (kind, device));
    let b = Tensor::randn([n, n], (kind, device));
    let mut times = Vec::new();
    for rep in 0..spec.warmup + spec.steps {
        sync(device);
        let t0 = Instant::now();
        let c = a.matmul(&b);
        sync(device);
        let _ = c.size();
        if rep >= spec.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let s = median(times);
    Ok(
        json!({"mode": "matmul", "size": n, "seconds": s, "flops_per_s": 2.0 * (n as f64).powi(3) / s}),
    )
}
