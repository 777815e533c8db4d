//! The rollout both RL kinds share, phase 1 of every iteration: the
//! iteration's prompts (a seeded order per epoch), answers sampled from
//! the policy with the KV cache, their log-probabilities under the policy
//! and the frozen reference, and their scores (a reward model, the judge,
//! or a program that ranks each group). [`sample`] runs it; the kinds
//! turn its output into advantages.

use std::path::Path;

use rlhf_datasets::batch::epoch_order;
use rlhf_datasets::load::read_table;
use rlhf_datasets::schema::{prompt_texts, ChatTemplate};
use tch::{Device, Kind, Tensor};

use crate::model::checkpoint::{HeadChoice, Model};
use crate::model::gpt::Head;
use crate::model::network::Network;
use crate::model::sample::{generate, Generation, SamplingConfig, SharedPrompts, TokenSpec};
use crate::model::score::gather_logprobs;
use crate::train::{check_finite, StageError};

use super::episode::{play, Environment, EpisodeStarts, Turn};
pub use super::scorer::Scorer;

/// The frozen reference: its own model, or the policy with its LoRA
/// adapters off (one copy of the base in memory, not two).
pub enum Reference {
    Model(Box<Model>),
    AdaptersOff,
}

impl Reference {
    /// The model at `reference` (unset: the starting `policy`), or the
    /// policy itself where its adapters start from that policy.
    pub fn load(
        reference: Option<&Path>,
        policy_dir: &Path,
        policy: &Model,
        device: Device,
    ) -> Result<Self, StageError> {
        if reference.is_none() && policy.lora.is_some() {
            return Ok(Reference::AdaptersOff);
        }
        let mut m = Model::load(
            reference.unwrap_or(policy_dir),
            HeadChoice::Want(Head::Lm),
            device,
        )?;
        m.vs.freeze();
        Ok(Reference::Model(Box::new(m)))
    }

    /// Runs `f` on the reference of `policy`.
    pub fn with<T>(&self, policy: &Model, f: impl FnOnce(&Model) -> T) -> T {
        match self {
            Reference::Model(r) => f(r),
            Reference::AdaptersOff => policy.net.without_adapters(|| f(policy)),
        }
    }
}

/// The prompts an RL stage rolls out on, as text and tokens, and their
/// reference answers (an `answer` column) where the file has them.
pub struct Prompts {
    pub texts: Vec<String>,
    pub ids: Vec<Vec<i64>>,
    pub answers: Vec<Option<String>>,
}

impl Prompts {
    pub fn load(path: &Path, policy: &Model, max_new_tokens: i64) -> Result<Self, StageError> {
        let table = read_table(path)?;
        let (texts, ids) = prompts_with_room(&table, path, policy, max_new_tokens)?;
        // Only a checker reads it: a column of another type is left
        // unread (a checker then names the prompts without one).
        let answers = match rlhf_datasets::load::optional_text_column(&table, path, "answer") {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("{e}; the column is not read");
                None
            }
        };
        let answers = answers.unwrap_or_else(|| vec![None; texts.len()]);
        Ok(Self {
            texts,
            ids,
            answers,
        })
    }

    /// The text and reference answer of each prompt of `rows`.
    pub fn texts_and_references(&self, rows: &[usize]) -> (Vec<&str>, Vec<Option<&str>>) {
        rows.iter()
            .map(|&i| (self.texts[i].as_str(), self.answers[i].as_deref()))
            .unzip()
    }

    /// The `per_iteration` prompts of iteration `iteration`: each epoch
    /// goes through them in its own seeded order; fewer prompts than an
    /// iteration takes come round again.
    pub fn of_iteration(&self, per_iteration: usize, seed: u64, iteration: i64) -> Vec<usize> {
        let n = self.ids.len();
        let per_epoch = (n / per_iteration).max(1) as i64;
        let (epoch, pos) = (iteration / per_epoch, (iteration % per_epoch) as usize);
        let order = epoch_order(n, seed, epoch as u64);
        order
            .iter()
            .cycle()
            .skip(pos * per_iteration)
            .take(per_iteration)
            .copied()
            .collect()
    }
}

/// Sampled answers, as both kinds start from them (rows: answers).
pub struct Sampled {
    /// The prompt (of [`Prompts`]) each answer answers.
    pub rows: Vec<usize>,
    pub generation: Generation,
    /// `(B, N)`: 1 on the answers' real tokens.
    pub answer_mask: Tensor,
    pub old_lp: Tensor,
    pub ref_lp: Tensor,
    /// The critic's values of the states before each token (PPO's);
    /// `None` without a critic.
    pub values: Option<Tensor>,
    pub answers: Vec<String>,
    pub scores: Vec<f64>,
    /// Per answer, a reward program's named parts of its score (empty for
    /// other scorers).
    pub components: Vec<std::collections::BTreeMap<String, f64>>,
    /// Per answer, its turns when it is a multi-turn episode (else empty);
    /// `answer_mask` is then 1 on the policy's tokens only.
    pub turns: Vec<Vec<Turn>>,
    /// This rank's time in the rollout's parts.
    pub seconds: RolloutSeconds,
}

/// Where a rollout's time went (this rank's), written to each iteration's
/// metrics as `sampling_s`, `logprobs_s` and `scoring_s`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RolloutSeconds {
    /// Generating the answers (prefill and decode).
    pub sampling: f64,
    /// The policy's and the reference's forwards over the answers.
    pub logprobs: f64,
    /// Decoding the answers and scoring them.
    pub scoring: f64,
}

impl RolloutSeconds {
    pub fn record(&self, record: &mut serde_json::Value) {
        record["sampling_s"] = self.sampling.into();
        record["logprobs_s"] = self.logprobs.into();
        record["scoring_s"] = self.scoring.into();
    }
}

/// What a rollout reads: the models, the prompts and how to sample.
pub struct RolloutInputs<'a> {
    pub policy: &'a Model,
    pub reference: &'a Reference,
    pub scorer: &'a Scorer,
    pub prompts: &'a Prompts,
    pub sampling: &'a SamplingConfig,
    /// Answers per prompt: 1 (PPO) or the group size (GRPO).
    pub group: usize,
    /// Multi-turn episodes with this environment, which scores them.
    pub env: Option<&'a Environment>,
    pub device: Device,
}

impl RolloutInputs<'_> {
    /// `group` answers to each prompt of `chosen`, sampled from the policy
    /// (libtorch's RNG is seeded by the caller), seen by the policy and
    /// the reference, and scored; `iteration` (0-based) names a failure.
    pub fn sample(&self, chosen: &[usize], iteration: i64) -> Result<Sampled, StageError> {
        let rows: Vec<usize> = chosen
            .iter()
            .flat_map(|&i| std::iter::repeat_n(i, self.group))
            .collect();
        let prompt_ids: Vec<Vec<i64>> = rows.iter().map(|&i| self.prompts.ids[i].clone()).collect();
        if let Some(env) = self.env {
            return self.episodes(env, rows, &prompt_ids, iteration);
        }
        let tok = &self.policy.tokenizer;
        let clock = std::time::Instant::now();
        let g = generate(
            &self.policy.net,
            &prompt_ids,
            self.sampling,
            TokenSpec::of(tok),
            self.device,
        )?;
        let width = g.prompt_width;
        let n = g.tokens.size()[1] - width;
        let answer_mask = g.attention_mask.narrow(1, width, n).to_kind(Kind::Float);
        let sampling = clock.elapsed().as_secs_f64();
        let (old_lp, ref_lp) = self.logprobs(&g, &prompt_ids);
        let logprobs = clock.elapsed().as_secs_f64() - sampling;
        let answers: Vec<String> = g
            .answers
            .iter()
            .map(|a| tok.decode(a, false))
            .collect::<Result<_, _>>()?;
        let (texts, references) = self.prompts.texts_and_references(&rows);
        let scored = self.scorer.score(
            &prompt_ids,
            &texts,
            &references,
            &g.answers,
            &answers,
            self.group,
            self.device,
        )?;
        let scores: Vec<f64> = scored.iter().map(|s| s.score).collect();
        let components: Vec<_> = scored.into_iter().map(|s| s.components).collect();
        let what = match self.scorer {
            Scorer::Model(_) => "reward-model score",
            _ => "score",
        };
        check_finite(iteration + 1, what, scores.iter().sum::<f64>())?;
        Ok(Sampled {
            rows,
            generation: g,
            answer_mask,
            old_lp,
            ref_lp,
            values: None,
            answers,
            scores,
            turns: vec![vec![]; components.len()],
            components,
            seconds: RolloutSeconds {
                sampling,
                logprobs,
                scoring: clock.elapsed().as_secs_f64() - sampling - logprobs,
            },
        })
    }

    /// Multi-turn episodes from `env` for `rows`, their environment's sums
    /// of rewards as scores.
    fn episodes(
        &self,
        env: &Environment,
        rows: Vec<usize>,
        prompt_ids: &[Vec<i64>],
        iteration: i64,
    ) -> Result<Sampled, StageError> {
        let clock = std::time::Instant::now();
        let (texts, references) = self.prompts.texts_and_references(&rows);
        let starts = EpisodeStarts {
            ids: prompt_ids,
            texts: &texts,
            references: &references,
        };
        let e = play(env, self.policy, &starts, self.sampling, self.device)?;
        let sampling = clock.elapsed().as_secs_f64();
        let (old_lp, ref_lp) = self.logprobs(&e.generation, prompt_ids);
        let logprobs = clock.elapsed().as_secs_f64() - sampling;
        let tok = &self.policy.tokenizer;
        let answers: Vec<String> = e
            .generation
            .answers
            .iter()
            .map(|a| tok.decode(a, false))
            .collect::<Result<_, _>>()?;
        check_finite(
            iteration + 1,
            "environment reward",
            e.scores.iter().sum::<f64>(),
        )?;
        Ok(Sampled {
            components: vec![Default::default(); rows.len()],
            rows,
            generation: e.generation,
            answer_mask: e.policy_mask,
            old_lp,
            ref_lp,
            values: None,
            answers,
            scores: e.scores,
            turns: e.turns,
            seconds: RolloutSeconds {
                sampling,
                logprobs,
                scoring: 0.0,
            },
        })
    }

    /// The policy's and the reference's log-probabilities of `g`'s answers.
    fn logprobs(&self, g: &Generation, prompt_ids: &[Vec<i64>]) -> (Tensor, Tensor) {
        let (width, vocab) = (g.prompt_width, self.policy.tokenizer.vocab_size() as i64);
        tch::no_grad(|| {
            // A group's prompt is computed once (real vocabularies only).
            let shared = self
                .policy
                .net
                .has_real_vocabulary()
                .then(|| SharedPrompts::of(prompt_ids, self.device))
                .flatten();
            let of = |net: &Network| {
                rollout_logprobs(
                    net,
                    &g.tokens,
                    &g.attention_mask,
                    width,
                    vocab,
                    shared.as_ref(),
                )
            };
            let lp = of(&self.policy.net);
            let rlp = self.reference.with(self.policy, |r| of(&r.net));
            (lp, rlp)
        })
    }
}

/// How far the log-probabilities recorded while sampling lie from those
/// the update's forward computes for the same tokens (`old_lp`), over the
/// answers' real tokens: `rollout_logprob_diff_max` and `_mean` of
/// `metrics.jsonl`. rlhf samples and trains with one model, so this is
/// float rounding (the KV cache's decode against the full forward, bf16
/// more than fp32), not a mismatch of engines to correct for.
pub fn rollout_logprob_diff(r: &Sampled) -> [f64; 2] {
    masked_abs_diff(&r.generation.logprobs, &r.old_lp, &r.answer_mask)
}

/// The largest and the mean `|a - b|` where `mask` (`(B, N)`, 1 or 0) is
/// set. Padding is left out by selection: a -inf there times 0 is NaN.
pub fn masked_abs_diff(a: &Tensor, b: &Tensor, mask: &Tensor) -> [f64; 2] {
    let diff = (a - b).abs().where_self(&mask.gt(0.0), &a.zeros_like());
    let tokens = mask.sum(Kind::Double).double_value(&[]).max(1.0);
    [
        diff.max().double_value(&[]),
        diff.sum(Kind::Double).double_value(&[]) / tokens,
    ]
}

/// The share of the rollout's `(B, P + N)` positions that are padding
/// (left of short prompts, right of short answers): what every forward
/// over the whole rollout (reference, reward, update) computes for nothing.
pub fn rollout_padding_waste(r: &Sampled) -> f64 {
    let mask = &r.generation.attention_mask;
    let real = mask.sum(Kind::Int64).int64_value(&[]) as usize;
    crate::train::padding_waste(real, mask.numel())
}

/// A `(B, N)` tensor as B rows, in `T`'s kind, on the CPU.
pub fn to_rows<T>(t: &Tensor) -> Vec<Vec<T>>
where
    T: tch::kind::Element,
    Vec<T>: TryFrom<Tensor>,
    <Vec<T> as TryFrom<Tensor>>::Error: std::fmt::Debug,
{
    let t = t.to_kind(T::KIND).to_device(Device::Cpu);
    let (b, n) = t.size2().expect("2-D");
    let flat: Vec<T> = Vec::try_from(t.reshape([-1])).expect("the kind asked for");
    let n = n as usize;
    (0..b as usize)
        .map(|i| flat[i * n..(i + 1) * n].to_vec())
        .collect()
}

/// Rows of per-token numbers as a `(B, n)` float tensor, zero-padded.
pub fn from_rows(rows: &[Vec<f64>], n: usize, device: Device) -> Tensor {
    let flat: Vec<f32> = rows
        .iter()
        .flat_map(|r| {
            r.iter()
                .map(|&x| x as f32)
                .chain(std::iter::repeat_n(0.0, n - r.len()))
        })
        .collect();
    Tensor::from_slice(&flat)
        .view([rows.len() as i64, n as i64])
        .to_device(device)
}

/// The prompts of `path` as text and tokens; each must leave room for
/// `max_new_tokens` in the model's context.
pub fn prompts_with_room(
    table: &rlhf_datasets::load::Table,
    path: &Path,
    policy: &Model,
    max_new_tokens: i64,
) -> Result<(Vec<String>, Vec<Vec<i64>>), StageError> {
    let tok = &policy.tokenizer;
    let prompts = prompt_texts(table, path, &ChatTemplate::for_tokenizer(tok))?;
    let ids = prompts
        .iter()
        .map(|p| tok.encode(p))
        .collect::<Result<Vec<_>, _>>()?;
    let limit = (policy.net.n_positions() - max_new_tokens).max(0) as usize;
    if let Some((i, p)) = ids
        .iter()
        .enumerate()
        .find(|(_, p)| p.len() > limit || p.is_empty())
    {
        return Err(StageError::Config(format!(
            "{}: row {}: the prompt has {} tokens; it must have 1..={limit} to leave room for max_new_tokens ({max_new_tokens})",
            path.display(),
            i + 1,
            p.len(),
        )));
    }
    Ok((prompts, ids))
}

/// The columns a minibatch of rollout rows needs: its prompts are
/// left-padded to the rollout's `width` and its answers right-padded to
/// the rollout's longest, so a minibatch of shorter rows computes padding
/// on both sides. Returns `(start, prompt, answer)`: its rows' tokens lie
/// in columns `start..width + answer` of `attention` `(b, P + N)`, their
/// prompts in the last `prompt` of the first `width`; `answer_mask`
/// `(b, N)`. Cutting there changes no real token's log-probability or
/// value (positions count real tokens; padding is never attended).
pub fn minibatch_span(attention: &Tensor, answer_mask: &Tensor, width: i64) -> (i64, i64, i64) {
    let longest = |t: &Tensor| {
        t.sum_dim_intlist(1, false, Kind::Int64)
            .max()
            .int64_value(&[])
    };
    let prompt = longest(&attention.narrow(1, 0, width)).max(1);
    let answer = longest(answer_mask).max(1);
    (width - prompt, prompt, answer)
}

/// The columns the minibatch of rollout rows `rows` (all ranks' rows)
/// computes on, `(start, prompt, answer)`: its span ([`minibatch_span`])
/// where `trim`, else the rollout's whole width. Every rank takes the same
/// columns for its part of the minibatch, as one process would.
pub fn columns_of(r: &Sampled, rows: &Tensor, trim: bool) -> (i64, i64, i64) {
    let (width, answer) = (r.generation.prompt_width, r.answer_mask.size()[1]);
    if !trim {
        return (0, width, answer);
    }
    let pick = |t: &Tensor| t.index_select(0, rows);
    let attention = pick(&r.generation.attention_mask);
    // The answers' real tokens, the environment's in episodes too (the
    // answer mask has only the policy's).
    let real = attention.narrow(1, width, answer);
    minibatch_span(&attention, &real, width)
}

/// Log-probabilities `(B, N)` of the answer tokens in `tokens` (answers
/// start at column `width`), and the logits they came from, over the
/// tokenizer's `vocab` ids only (the ids sampling can produce).
pub fn answer_logprobs(
    model: &Network,
    tokens: &Tensor,
    attention: &Tensor,
    width: i64,
    vocab: i64,
) -> (Tensor, Tensor) {
    let n = tokens.size()[1] - width;
    let hidden = model.hidden(tokens, Some(attention), None, false);
    let logits = model.logits(&hidden.narrow(1, width - 1, n));
    let logits = logits.narrow(2, 0, vocab.min(logits.size()[2]));
    let lp = gather_logprobs(&logits, &tokens.narrow(1, width, n));
    (lp, logits)
}

/// Answer positions whose logits a rollout computes at once on a real
/// vocabulary: 64 answers of 128 tokens over 49k ids would be 1.6 GB of
/// logits, and as much again for their log-softmax.
const ROLLOUT_LOGIT_POSITIONS: i64 = 2048;

/// [`answer_logprobs`] without gradients and without the logits. With
/// `shared` (rows answering the same prompt, GRPO's groups), each prompt
/// is computed once and its keys and values shared by its rows; on real
/// vocabularies the vocabulary projection is taken a few rows at a time;
/// byte-level models take one plain pass.
pub fn rollout_logprobs(
    model: &Network,
    tokens: &Tensor,
    attention: &Tensor,
    width: i64,
    vocab: i64,
    shared: Option<&SharedPrompts>,
) -> Tensor {
    if !model.has_real_vocabulary() {
        return answer_logprobs(model, tokens, attention, width, vocab).0;
    }
    let hidden = answer_hidden(model, tokens, attention, width, shared);
    logprobs_in_chunks(
        model,
        &hidden,
        tokens,
        width,
        vocab,
        ROLLOUT_LOGIT_POSITIONS,
    )
}

/// The hidden states that predict the answers' tokens (columns `width - 1`
/// to the second last), `(B, N, C)`; with `shared`, each distinct prompt
/// computed once and the answers run after its cached keys and values.
fn answer_hidden(
    model: &Network,
    tokens: &Tensor,
    attention: &Tensor,
    width: i64,
    shared: Option<&SharedPrompts>,
) -> Tensor {
    let n = tokens.size()[1] - width;
    let Some(shared) = shared else {
        let hidden = model.hidden(tokens, Some(attention), None, false);
        return hidden.narrow(1, width - 1, n);
    };
    let mut cache = model.cache(tokens.size()[0], width + n - 1);
    let prompt_mask = attention.narrow(1, 0, width);
    let prompts = shared.prefill(
        model,
        &tokens.narrow(1, 0, width),
        Some(&prompt_mask),
        &mut cache,
    );
    let last = prompts.narrow(1, width - 1, 1);
    if n == 1 {
        return last;
    }
    let mask = attention.narrow(1, 0, width + n - 1);
    let answers = model.hidden(
        &tokens.narrow(1, width, n - 1),
        Some(&mask),
        Some(&mut cache),
        false,
    );
    Tensor::cat(&[last, answers], 1)
}

/// Log-probabilities of the answer tokens from their `hidden` states,
/// the logits of about `positions` answer positions at a time.
fn logprobs_in_chunks(
    model: &Network,
    hidden: &Tensor,
    tokens: &Tensor,
    width: i64,
    vocab: i64,
    positions: i64,
) -> Tensor {
    let n = tokens.size()[1] - width;
    let targets = tokens.narrow(1, width, n);
    let rows = (positions / n.max(1)).max(1);
    let parts: Vec<Tensor> = (0..tokens.size()[0])
        .step_by(rows as usize)
        .map(|start| {
            let take = rows.min(tokens.size()[0] - start);
            let logits = model.logits(&hidden.narrow(0, start, take));
            let logits = logits.narrow(2, 0, vocab.min(logits.size()[2]));
            gather_logprobs(&logits, &targets.narrow(0, start, take))
        })
        .collect();
    Tensor::cat(&parts, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two rows of a rollout padded for longer ones (prompts to 5 columns,
    /// answers to 6): cut to their span, their answers' log-probabilities
    /// are the same on both layouts.
    #[test]
    fn a_minibatch_cut_to_its_span_keeps_every_answer_log_probability() {
        let _rng = crate::rng_lock();
        // Prompts [7, 8] and [9]; answers [3, 4, 5] and [6].
        let tokens = Tensor::from_slice(&[
            0i64, 0, 0, 7, 8, 3, 4, 5, 0, 0, 0, //
            0, 0, 0, 0, 9, 6, 0, 0, 0, 0, 0,
        ])
        .view([2, 11]);
        let attention = Tensor::from_slice(&[
            0i64, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, //
            0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0,
        ])
        .view([2, 11]);
        let answer_mask = attention.narrow(1, 5, 6);
        let (start, prompt, answer) = minibatch_span(&attention, &answer_mask, 5);
        assert_eq!((start, prompt, answer), (3, 2, 3));
        for (_vs, net) in [
            crate::tiny_gpt(2, 20, 16, 2, Head::Lm),
            crate::tiny_llama(2, 20, 16, 2, Head::Lm),
        ] {
            let (full, _) = tch::no_grad(|| answer_logprobs(&net, &tokens, &attention, 5, 20));
            let cut = |t: &Tensor| t.narrow(1, start, prompt + answer);
            let (part, _) =
                tch::no_grad(|| answer_logprobs(&net, &cut(&tokens), &cut(&attention), prompt, 20));
            let real = answer_mask.narrow(1, 0, answer).to_kind(Kind::Float);
            let diff = ((full.narrow(1, 0, answer) - part) * real).abs().max();
            assert!(diff.double_value(&[]) < 1e-6, "{diff}");
        }
    }

    /// A rollout's log-probabilities taken a few rows at a time equal one
    /// pass's, on a vocabulary large enough to be chunked.
    #[test]
    fn rollout_log_probabilities_in_chunks_equal_one_pass() {
        let _rng = crate::rng_lock();
        let vocab = crate::model::score::SPARSE_LOGITS_VOCAB;
        let (_vs, net) = crate::tiny_llama(2, vocab, 16, 2, Head::Lm);
        let tokens = Tensor::randint(vocab, [5, 9], (Kind::Int64, Device::Cpu));
        let attention = Tensor::ones([5, 9], (Kind::Int64, Device::Cpu));
        let (whole, _) = tch::no_grad(|| answer_logprobs(&net, &tokens, &attention, 4, vocab));
        let hidden = tch::no_grad(|| answer_hidden(&net, &tokens, &attention, 4, None));
        for positions in [1, 10, 5000] {
            let parts =
                tch::no_grad(|| logprobs_in_chunks(&net, &hidden, &tokens, 4, vocab, positions));
            assert_eq!(parts.size(), vec![5, 5]);
            let diff = (&whole - parts).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{positions} positions at a time: {diff}");
        }
    }

    /// Groups of rows answering one prompt (left-padded prompts, answers
    /// padded after EOS): each prompt computed once, its keys and values
    /// shared, gives every answer token's log-probability of one full
    /// pass, on both layouts.
    #[test]
    fn answers_after_a_shared_prompt_have_the_full_passes_log_probabilities() {
        let _rng = crate::rng_lock();
        let vocab = crate::model::score::SPARSE_LOGITS_VOCAB;
        // Prompts [5, 6, 7] (rows 0-2) and [8] (rows 3-5), width 3;
        // answers of 4, 2, 3, 1, 4 and 2 tokens in 4 columns.
        let prompts: Vec<Vec<i64>> = [vec![5, 6, 7], vec![8]]
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), 3))
            .collect();
        let lengths = [4, 2, 3, 1, 4, 2];
        let (mut ids, mut mask) = (vec![], vec![]);
        for (row, p) in prompts.iter().enumerate() {
            let pad = 3 - p.len();
            ids.extend(std::iter::repeat_n(0, pad).chain(p.iter().copied()));
            mask.extend(std::iter::repeat_n(0i64, pad).chain(std::iter::repeat_n(1, p.len())));
            for j in 0..4 {
                let real = j < lengths[row];
                ids.push(if real {
                    100 + (row * 4 + j) as i64 * 37
                } else {
                    0
                });
                mask.push(i64::from(real));
            }
        }
        let tokens = Tensor::from_slice(&ids).view([6, 7]);
        let attention = Tensor::from_slice(&mask).view([6, 7]);
        let real = attention.narrow(1, 3, 4).to_kind(Kind::Float);
        for (_vs, net) in [
            crate::tiny_gpt(3, vocab, 16, 2, Head::Lm),
            crate::tiny_llama(3, vocab, 16, 2, Head::Lm),
        ] {
            let (whole, _) = tch::no_grad(|| answer_logprobs(&net, &tokens, &attention, 3, vocab));
            let groups = SharedPrompts::of(&prompts, Device::Cpu);
            assert!(groups.is_some(), "two groups of three");
            let shared = rollout_logprobs(&net, &tokens, &attention, 3, vocab, groups.as_ref());
            let diff = ((whole - shared) * &real).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{diff}");
        }
    }
}
