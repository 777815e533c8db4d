//! Batched sampling with the KV cache: prompts left-padded into one batch,
//! one forward of the new token per step, temperature / top-k / top-p.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::model::network::{Cache, Network};

/// How answers are drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: i64,
    /// Keep the smallest set of tokens whose probability reaches p; 1 keeps all.
    pub top_p: f64,
    pub max_new_tokens: i64,
    /// Stop a sequence at its first EOS (the EOS is kept in the answer).
    pub stop_at_eos: bool,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 64,
            stop_at_eos: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    #[error("sampling: {0}")]
    Invalid(String),
    #[error("sampling: prompt {index} is empty; give at least one token")]
    EmptyPrompt { index: usize },
    #[error("sampling: prompt {index} ({prompt} tokens) + max_new_tokens ({new}) exceeds the model's n_positions ({limit})")]
    TooLong {
        index: usize,
        prompt: usize,
        new: i64,
        limit: i64,
    },
}

impl SamplingConfig {
    pub fn validate(&self) -> Result<(), SamplingError> {
        let bad = |m: String| Err(SamplingError::Invalid(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if self.top_k < 0 {
            return bad(format!("top_k must be >= 0, got {}", self.top_k));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must lie in (0, 1], got {}", self.top_p));
        }
        if self.max_new_tokens < 1 {
            return bad(format!(
                "max_new_tokens must be >= 1, got {}",
                self.max_new_tokens
            ));
        }
        Ok(())
    }
}

/// The ids sampling needs to know: end of text, padding, and how many ids
/// the tokenizer has (a model's vocabulary is often padded past it, e.g. to
/// a multiple of 8; those ids are never sampled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenSpec {
    pub eos: i64,
    pub pad: i64,
    pub vocab_size: i64,
}

impl TokenSpec {
    pub fn of(tokenizer: &rlhf_datasets::Tokenizer) -> Self {
        Self {
            eos: tokenizer.eos_id(),
            pad: tokenizer.pad_id(),
            vocab_size: tokenizer.vocab_size() as i64,
        }
    }
}

/// A sampled batch.
#[derive(Debug)]
pub struct Generation {
    /// `(B, P + N)`: left-padded prompts then answers (padded on the right
    /// after a sequence stopped).
    pub tokens: Tensor,
    /// `(B, P + N)`: 1 where `tokens` is a real token.
    pub attention_mask: Tensor,
    /// P: the padded prompt width; answers start at this column.
    pub prompt_width: i64,
    /// Each answer's tokens, EOS included when it stopped there.
    pub answers: Vec<Vec<i64>>,
    /// Whether each answer ended with EOS (else it hit max_new_tokens).
    pub finished: Vec<bool>,
    /// `(B, N)` float: each answer token's log-probability under the
    /// model (before temperature and top-k/top-p) as computed while
    /// sampling, 0 after a row stopped. PPO and GRPO compare it with their
    /// own forward pass (`rollout_logprob_diff`).
    pub logprobs: Tensor,
}

/// Samples answers to `prompts` (token ids) in one batch.
///
/// On models with a real vocabulary ([`Network::has_real_vocabulary`]), a
/// prompt that several rows answer (GRPO's groups) is prefilled once and
/// its keys and values copied to its rows; and rows
/// that stopped at EOS leave the batch (their keys and values are dropped
/// from the cache) once a quarter of the rows still decoding have stopped;
/// the random draws stay those of the whole batch, so that the answers are
/// those every row running on would give, to float rounding (a batch of
/// another size may round a matmul differently). Byte-level models keep
/// every row, which keeps their runs bit-identical to earlier ones; their
/// steps cost little per row anyway.
///
/// Deterministic for a given `tch::manual_seed`.
pub fn generate(
    model: &Network,
    prompts: &[Vec<i64>],
    config: &SamplingConfig,
    spec: TokenSpec,
    device: Device,
) -> Result<Generation, SamplingError> {
    let economise = model.has_real_vocabulary();
    generate_with(model, prompts, config, spec, device, economise)
}

/// [`generate`], with equal prompts prefilled once and rows that stop
/// leaving the batch (`economise`), or every row computed to the end.
fn generate_with(
    model: &Network,
    prompts: &[Vec<i64>],
    config: &SamplingConfig,
    spec: TokenSpec,
    device: Device,
    economise: bool,
) -> Result<Generation, SamplingError> {
    config.validate()?;
    check_prompts(prompts, config.max_new_tokens, model.n_positions())?;
    let (prompt_ids, prompt_mask, width) = left_pad(prompts, spec.pad, device);
    let any_padding = prompts.iter().any(|p| p.len() as i64 != width);
    let sample = || {
        let mut d = Decoding::new(prompts.len() as i64, width, config, spec, device);
        d.drop_stopped = economise && config.stop_at_eos;
        d.tokens.narrow(1, 0, width).copy_(&prompt_ids);
        d.attention.narrow(1, 0, width).copy_(&prompt_mask);
        let shared = economise
            .then(|| SharedPrompts::of(prompts, device))
            .flatten();
        let mut cache = model.cache(d.batch, width + config.max_new_tokens);
        let mask = any_padding.then_some(&prompt_mask);
        let mut hidden = match &shared {
            Some(s) => s.prefill(model, &prompt_ids, mask, &mut cache),
            None => model.hidden(&prompt_ids, mask, Some(&mut cache), false),
        };
        let model_vocab = model.vocab_size();
        let mut steps = 0;
        while steps < config.max_new_tokens {
            let mut logits = model.logits(&hidden.select(1, -1)); // (b, V)
            if spec.vocab_size < model_vocab {
                logits = logits.narrow(1, 0, spec.vocab_size);
            }
            let next = d.step(&logits, steps, config);
            steps += 1;
            let stopped = d.stopped_rows();
            if steps == config.max_new_tokens || d.all_stopped(stopped) {
                break;
            }
            let next = d.drop_stopped(next, stopped, &mut cache);
            // A row that stopped but is still in the batch is fed padding:
            // its later outputs are discarded and rows never attend to each
            // other, so only left padding of the prompts needs a mask.
            let mask = any_padding.then(|| d.mask_so_far(width + steps));
            hidden = model.hidden(&next.unsqueeze(1), mask.as_ref(), Some(&mut cache), false);
        }
        Ok(d.finish(steps))
    };
    let sample = || model.with_sampling_weights(device, sample);
    crate::ffi::with_autocast_weight_cache(|| tch::no_grad(sample))
}

/// The state of one batch's decoding: the full-width output buffers and
/// which of their rows are still in the cache.
struct Decoding {
    /// `(B, P + N)` ids and attention, written column by column.
    tokens: Tensor,
    attention: Tensor,
    /// `(B, N)` log-probabilities of the sampled tokens.
    logprobs: Tensor,
    /// The original row of each row in the cache, `(b,)`.
    rows: Tensor,
    /// Of the rows in the cache, those that produced EOS, `(b,)`.
    stopped: Tensor,
    batch: i64,
    width: i64,
    stop_at_eos: bool,
    /// Whether rows that stopped leave the cache.
    drop_stopped: bool,
    spec: TokenSpec,
}

impl Decoding {
    fn new(b: i64, width: i64, config: &SamplingConfig, spec: TokenSpec, device: Device) -> Self {
        let n = config.max_new_tokens;
        let attention = Tensor::zeros([b, width + n], (Kind::Int64, device));
        if !config.stop_at_eos {
            // Every row runs to max_new_tokens: all answer tokens are real.
            let _ = attention.narrow(1, width, n).fill_(1);
        }
        Self {
            tokens: Tensor::full([b, width + n], spec.pad, (Kind::Int64, device)),
            attention,
            logprobs: Tensor::zeros([b, n], (Kind::Float, device)),
            rows: Tensor::arange(b, (Kind::Int64, device)),
            stopped: Tensor::zeros([b], (Kind::Bool, device)),
            batch: b,
            width,
            stop_at_eos: config.stop_at_eos,
            drop_stopped: false,
            spec,
        }
    }

    /// Whether rows have left the cache.
    fn compacted(&self) -> bool {
        self.rows.size()[0] < self.batch
    }

    /// Samples answer token `step` of the rows in the cache from their
    /// logits `(b, V)` and writes it; returns the tokens fed next, `(b,)`.
    fn step(&mut self, logits: &Tensor, step: i64, config: &SamplingConfig) -> Tensor {
        let mut next = if self.compacted() {
            // The draws of the whole batch, as if no row had left: each row
            // consumes the same random numbers as it always would.
            let full = Tensor::zeros(
                [self.batch, logits.size()[1]],
                (logits.kind(), logits.device()),
            );
            let full = full.index_copy(0, &self.rows, logits);
            pick_next(&full, config).index_select(0, &self.rows)
        } else {
            pick_next(logits, config)
        };
        let lp = logits.to_kind(Kind::Float);
        let lp = lp.gather(1, &next.unsqueeze(1), false).squeeze_dim(1)
            - lp.logsumexp([1i64].as_slice(), false);
        let col = self.width + step;
        if self.stop_at_eos {
            let alive = self.stopped.logical_not();
            next = next.where_self(
                &alive,
                &Tensor::from(self.spec.pad).to_device(next.device()),
            );
            let _ = self.attention.select(1, col).index_copy_(
                0,
                &self.rows,
                &alive.to_kind(Kind::Int64),
            );
            let _ = self.logprobs.select(1, step).index_copy_(
                0,
                &self.rows,
                &lp.where_self(&alive, &lp.zeros_like()),
            );
            self.stopped = self.stopped.logical_or(&next.eq(self.spec.eos));
        } else {
            let _ = self
                .logprobs
                .select(1, step)
                .index_copy_(0, &self.rows, &lp);
        }
        let _ = self.tokens.select(1, col).index_copy_(0, &self.rows, &next);
        next
    }

    /// How many rows in the cache produced EOS (one host sync per step;
    /// cheap next to a forward pass); 0 when answers do not stop.
    fn stopped_rows(&self) -> i64 {
        match self.stop_at_eos {
            true => self.stopped.sum(Kind::Int64).int64_value(&[]),
            false => 0,
        }
    }

    /// Every row in the cache produced EOS.
    fn all_stopped(&self, stopped: i64) -> bool {
        self.stop_at_eos && stopped == self.rows.size()[0]
    }

    /// Drops the `stopped` rows from the cache once they are a quarter of
    /// it (each drop copies the cache); returns `next` of the rows kept.
    fn drop_stopped(&mut self, next: Tensor, stopped: i64, cache: &mut Cache) -> Tensor {
        if !self.drop_stopped || stopped == 0 || stopped * 4 < self.rows.size()[0] {
            return next;
        }
        let keep = self.stopped.logical_not().nonzero().squeeze_dim(1);
        cache.keep_rows(&keep);
        self.rows = self.rows.index_select(0, &keep);
        self.stopped = self.stopped.index_select(0, &keep);
        next.index_select(0, &keep)
    }

    /// The attention mask of the rows in the cache over the first `cols`
    /// columns.
    fn mask_so_far(&self, cols: i64) -> Tensor {
        let mask = self.attention.narrow(1, 0, cols);
        if self.compacted() {
            mask.index_select(0, &self.rows)
        } else {
            mask
        }
    }

    fn finish(self, steps: i64) -> Generation {
        let logprobs = self.logprobs.narrow(1, 0, steps);
        let (tokens, attention) = (self.tokens, self.attention);
        collect(
            tokens,
            attention,
            logprobs,
            self.width,
            self.width + steps,
            self.spec.eos,
        )
    }
}

/// Every prompt has a token, and room for `new` more within `limit`.
fn check_prompts(prompts: &[Vec<i64>], new: i64, limit: i64) -> Result<(), SamplingError> {
    for (index, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(SamplingError::EmptyPrompt { index });
        }
        if p.len() as i64 + new > limit {
            return Err(SamplingError::TooLong {
                index,
                prompt: p.len(),
                new,
                limit,
            });
        }
    }
    Ok(())
}

/// Rows that answer the same prompt: each distinct prompt is prefilled
/// once and its keys and values copied to its rows.
pub struct SharedPrompts {
    /// The first row of each distinct prompt, `(U,)`.
    distinct: Tensor,
    /// Each row's distinct prompt, `(B,)`.
    rows: Tensor,
}

impl SharedPrompts {
    /// `None` when every prompt is distinct.
    pub fn of<P: AsRef<[i64]>>(prompts: &[P], device: Device) -> Option<Self> {
        let mut first = std::collections::HashMap::new();
        let mut distinct = vec![];
        let rows: Vec<i64> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                *first.entry(p.as_ref()).or_insert_with(|| {
                    distinct.push(i as i64);
                    distinct.len() as i64 - 1
                })
            })
            .collect();
        (distinct.len() < prompts.len()).then(|| Self {
            distinct: Tensor::from_slice(&distinct).to_device(device),
            rows: Tensor::from_slice(&rows).to_device(device),
        })
    }

    /// The hidden states of `ids` `(B, P)` (with `mask` over them),
    /// computed for the distinct prompts, their keys and values in `cache`
    /// then copied to every row.
    pub fn prefill(
        &self,
        model: &Network,
        ids: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut Cache,
    ) -> Tensor {
        let pick = |t: &Tensor| t.index_select(0, &self.distinct);
        let mask = mask.map(pick);
        let hidden = model.hidden(&pick(ids), mask.as_ref(), Some(cache), false);
        cache.keep_rows(&self.rows);
        hidden.index_select(0, &self.rows)
    }
}

/// The prompts left-padded with `pad` to the longest: ids and attention
/// mask `(B, width)` on `device`, and the width.
fn left_pad(prompts: &[Vec<i64>], pad: i64, device: Device) -> (Tensor, Tensor, i64) {
    let b = prompts.len() as i64;
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0) as i64;
    let mut ids = Vec::with_capacity((b * width) as usize);
    let mut mask = Vec::with_capacity((b * width) as usize);
    for p in prompts {
        let padding = width as usize - p.len();
        ids.extend(std::iter::repeat_n(pad, padding).chain(p.iter().copied()));
        mask.extend(std::iter::repeat_n(0i64, padding).chain(std::iter::repeat_n(1, p.len())));
    }
    let ids = Tensor::from_slice(&ids).view([b, width]).to_device(device);
    let mask = Tensor::from_slice(&mask).view([b, width]).to_device(device);
    (ids, mask, width)
}

fn collect(
    tokens: Tensor,
    attention: Tensor,
    logprobs: Tensor,
    width: i64,
    filled: i64,
    eos: i64,
) -> Generation {
    let tokens = tokens.narrow(1, 0, filled);
    let attention = attention.narrow(1, 0, filled);
    let b = tokens.size()[0];
    let answer_ids = tokens
        .narrow(1, width, filled - width)
        .to_device(Device::Cpu);
    let answer_mask = attention
        .narrow(1, width, filled - width)
        .to_device(Device::Cpu);
    let ids: Vec<i64> = Vec::try_from(answer_ids.reshape([-1])).expect("int64 tokens");
    let mask: Vec<i64> = Vec::try_from(answer_mask.reshape([-1])).expect("int64 mask");
    let n = (filled - width) as usize;
    let mut answers = Vec::with_capacity(b as usize);
    let mut finished = Vec::with_capacity(b as usize);
    for row in 0..b as usize {
        let answer: Vec<i64> = (0..n)
            .filter(|&j| mask[row * n + j] == 1)
            .map(|j| ids[row * n + j])
            .collect();
        finished.push(answer.last() == Some(&eos));
        answers.push(answer);
    }
    Generation {
        tokens,
        attention_mask: attention,
        prompt_width: width,
        answers,
        finished,
        logprobs,
    }
}

/// Greedy or sampled next tokens from `(B, V)` logits.
pub fn pick_next(logits: &Tensor, config: &SamplingConfig) -> Tensor {
    if config.temperature == 0.0 {
        return logits.argmax(-1, false);
    }
    // Each skipped op is one libtorch call less per decoded token.
    let mut logits = logits.shallow_clone();
    if config.temperature != 1.0 {
        logits = logits.to_kind(Kind::Float) / config.temperature;
    }
    if config.top_k > 0 || config.top_p < 1.0 {
        logits = filter_logits(&logits, config.top_k, config.top_p);
    }
    logits
        .softmax(-1, Kind::Float)
        .multinomial(1, false)
        .squeeze_dim(-1)
}

/// Sets logits outside the top-k and outside the top-p nucleus to -inf
/// (Holtzman et al., 2020). The most likely token always survives.
pub fn filter_logits(logits: &Tensor, top_k: i64, top_p: f64) -> Tensor {
    let vocab = *logits.size().last().expect("logits have a vocab dim");
    let mut logits = logits.shallow_clone();
    if top_k > 0 && top_k < vocab {
        let (top, _) = logits.topk(top_k, -1, true, true);
        let kth = top.narrow(-1, top_k - 1, 1);
        logits = logits.masked_fill(&logits.lt_tensor(&kth), f64::NEG_INFINITY);
    }
    if top_p < 1.0 {
        let (sorted, order) = logits.sort(-1, true);
        let probs = sorted.softmax(-1, Kind::Float);
        // Drop a token if the tokens before it already reach top_p.
        let before = probs.cumsum(-1, Kind::Float) - &probs;
        let drop_sorted = before.gt(top_p);
        let drop = drop_sorted.scatter(-1, &order, &drop_sorted);
        logits = logits.masked_fill(&drop, f64::NEG_INFINITY);
    }
    logits
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gpt::Head;
    use tch::nn::VarStore;

    fn spec(eos: i64) -> TokenSpec {
        TokenSpec {
            eos,
            pad: 39,
            vocab_size: 40,
        }
    }

    fn tiny() -> (VarStore, Network) {
        crate::tiny_gpt(3, 40, 40, 2, Head::Lm)
    }

    /// The GPT-2-layout and the Llama-layout model.
    fn both() -> [(VarStore, Network); 2] {
        [tiny(), crate::tiny_llama(3, 40, 40, 2, Head::Lm)]
    }

    #[test]
    fn top_k_and_top_p_keep_the_right_tokens() {
        let _rng = crate::rng_lock();
        let logits = Tensor::from_slice(&[0.0f32, 3.0, 1.0, 2.0])
            .log_softmax(-1, Kind::Float)
            .view([1, 4]);
        let keep = |t: &Tensor| Vec::<bool>::try_from(t.isfinite().view([-1])).unwrap();
        assert_eq!(
            keep(&filter_logits(&logits, 2, 1.0)),
            vec![false, true, false, true]
        );
        // probs ~ [0.032, 0.644, 0.087, 0.237]: nucleus 0.7 is {1, 3}.
        assert_eq!(
            keep(&filter_logits(&logits, 0, 0.7)),
            vec![false, true, false, true]
        );
        assert_eq!(
            keep(&filter_logits(&logits, 0, 0.5)),
            vec![false, true, false, false]
        );
    }

    #[test]
    fn greedy_batched_generation_equals_one_prompt_at_a_time() {
        let _rng = crate::rng_lock();
        for (_vs, gpt) in both() {
            greedy_batched_equals_single(&gpt);
        }
    }

    fn greedy_batched_equals_single(gpt: &Network) {
        let prompts = vec![vec![1i64, 2, 3, 4, 5], vec![7i64, 8], vec![9i64, 10, 11]];
        let cfg = SamplingConfig {
            temperature: 0.0,
            max_new_tokens: 6,
            stop_at_eos: false,
            ..SamplingConfig::default()
        };
        let batched = generate(gpt, &prompts, &cfg, spec(0), Device::Cpu).unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let single =
                generate(gpt, std::slice::from_ref(p), &cfg, spec(0), Device::Cpu).unwrap();
            assert_eq!(batched.answers[i], single.answers[0], "prompt {i}");
            // And equal to a full forward re-run without the cache.
            let mut seq = p.clone();
            for _ in 0..6 {
                let ids = Tensor::from_slice(&seq).view([1, -1]);
                let next = gpt
                    .forward_logits(&ids, None, false)
                    .select(1, -1)
                    .argmax(-1, false);
                seq.push(next.int64_value(&[0]));
            }
            assert_eq!(&seq[p.len()..], &single.answers[0][..]);
        }
    }

    #[test]
    fn stops_at_eos_and_pads_after() {
        let _rng = crate::rng_lock();
        for (_vs, gpt) in both() {
            stops_at_eos(&gpt);
        }
    }

    fn stops_at_eos(gpt: &Network) {
        let prompts = vec![vec![1i64, 2], vec![3i64, 4, 5]];
        let cfg = SamplingConfig {
            temperature: 0.0,
            max_new_tokens: 8,
            ..SamplingConfig::default()
        };
        // Make the greedy first token of prompt 0 the "EOS".
        let free = generate(
            gpt,
            &prompts,
            &SamplingConfig {
                stop_at_eos: false,
                ..cfg.clone()
            },
            spec(0),
            Device::Cpu,
        )
        .unwrap();
        let eos = free.answers[0][0];
        let out = generate(gpt, &prompts, &cfg, spec(eos), Device::Cpu).unwrap();
        assert_eq!(out.answers[0], vec![eos]);
        assert!(out.finished[0]);
        // The other row continues exactly as without stopping, up to its own EOS.
        let other = &free.answers[1];
        let cut = other
            .iter()
            .position(|&t| t == eos)
            .map_or(other.len(), |i| i + 1);
        assert_eq!(out.answers[1], other[..cut].to_vec());
    }

    /// Sampling without a cache or dropped rows: the whole left-padded
    /// batch through the full forward for every token, stopped rows fed
    /// padding; each token's log-probability from the same forward.
    fn sample_by_full_forwards(
        net: &Network,
        prompts: &[Vec<i64>],
        cfg: &SamplingConfig,
        spec: TokenSpec,
    ) -> (Vec<Vec<i64>>, Vec<Vec<f64>>) {
        let (mut ids, mut mask, _) = left_pad(prompts, spec.pad, Device::Cpu);
        let b = prompts.len();
        let (mut answers, mut lps) = (vec![Vec::new(); b], vec![Vec::new(); b]);
        let mut stopped = vec![false; b];
        for _ in 0..cfg.max_new_tokens {
            let logits = tch::no_grad(|| net.forward_logits(&ids, Some(&mask), false))
                .select(1, -1)
                .narrow(1, 0, spec.vocab_size);
            let next: Vec<i64> = Vec::try_from(pick_next(&logits, cfg)).unwrap();
            let lp = logits.log_softmax(-1, Kind::Float);
            let mut fed = Vec::new();
            for row in 0..b {
                let token = if stopped[row] { spec.pad } else { next[row] };
                if !stopped[row] {
                    answers[row].push(token);
                    lps[row].push(lp.double_value(&[row as i64, token]));
                    stopped[row] = token == spec.eos;
                }
                fed.push((token, i64::from(!stopped[row] || token == spec.eos)));
            }
            let col = |f: fn(&(i64, i64)) -> i64| {
                Tensor::from_slice(&fed.iter().map(f).collect::<Vec<_>>()).view([-1, 1])
            };
            ids = Tensor::cat(&[ids, col(|f| f.0)], 1);
            mask = Tensor::cat(&[mask, col(|f| f.1)], 1);
            if stopped.iter().all(|&s| s) {
                break;
            }
        }
        (answers, lps)
    }

    #[test]
    fn rows_that_stop_leave_the_batch_without_changing_any_answer() {
        let _rng = crate::rng_lock();
        // Near-uniform draws over 40 tokens: most of the 16 rows meet EOS
        // within 36 tokens, at different steps, so rows leave the cache
        // several times.
        let cfg = SamplingConfig {
            temperature: 4.0,
            max_new_tokens: 36,
            ..SamplingConfig::default()
        };
        let prompts: Vec<Vec<i64>> = (0..16).map(|i| (1..2 + i % 3).collect()).collect();
        for (_vs, net) in both() {
            tch::manual_seed(11);
            let g = generate_with(&net, &prompts, &cfg, spec(7), Device::Cpu, true).unwrap();
            tch::manual_seed(11);
            let (answers, lps) = sample_by_full_forwards(&net, &prompts, &cfg, spec(7));
            assert_eq!(g.answers, answers);
            let stopped_early = g.answers.iter().filter(|a| a.len() < 30).count();
            assert!(stopped_early >= 6, "{:?}", g.answers);
            // The log-probabilities recorded while sampling are the full
            // forward's to float rounding, and 0 after a row stopped.
            for (row, lp) in lps.iter().enumerate() {
                let recorded = g.logprobs.get(row as i64);
                for (j, want) in lp.iter().enumerate() {
                    let got = recorded.double_value(&[j as i64]);
                    assert!(
                        (got - want).abs() < 1e-5,
                        "row {row} token {j}: {got} {want}"
                    );
                }
                let rest =
                    recorded.narrow(0, lp.len() as i64, g.logprobs.size()[1] - lp.len() as i64);
                assert_eq!(rest.abs().sum(Kind::Float).double_value(&[]), 0.0);
            }
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_validates() {
        let _rng = crate::rng_lock();
        let (_vs, gpt) = tiny();
        let prompts = vec![vec![1i64, 2, 3]; 4];
        let cfg = SamplingConfig {
            temperature: 1.0,
            top_k: 10,
            top_p: 0.9,
            max_new_tokens: 5,
            stop_at_eos: false,
        };
        tch::manual_seed(11);
        let a = generate(&gpt, &prompts, &cfg, spec(0), Device::Cpu).unwrap();
        tch::manual_seed(11);
        let b = generate(&gpt, &prompts, &cfg, spec(0), Device::Cpu).unwrap();
        assert_eq!(a.answers, b.answers);
        let err = generate(&gpt, &[vec![1; 38]], &cfg, spec(0), Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("n_positions"), "{err}");
        let bad = SamplingConfig { top_p: 0.0, ..cfg };
        assert!(generate(&gpt, &prompts, &bad, spec(0), Device::Cpu).is_err());
    }
}
