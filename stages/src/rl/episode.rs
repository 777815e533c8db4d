//! Multi-turn episodes (`env:` of a GRPO stage): the policy writes a turn,
//! an environment program answers it (a tool's result, an observation),
//! the policy writes the next turn after it, up to `max_turns`. The
//! environment's tokens are part of what the policy reads but not of what
//! it is trained on: the rollout's answer mask (loss, KL, advantages) is
//! 1 only on the tokens the policy sampled.
//!
//! The program speaks JSON lines, one per live episode per turn (every
//! call stateless: it gets the whole history):
//!
//! ```text
//! in:  {"episode": 3, "turn": 1, "prompt": "...", "answer": "42" | null,
//!       "history": [{"role": "policy" | "environment", "text": "..."}],
//!       "response": "the policy's latest turn"}
//! out: {"observation": "..." | null, "done": false, "reward": 0.0}
//! ```
//!
//! An episode's score is the sum of its rewards. It ends when the program
//! says `done`, after `max_turns` policy turns, or when the model's
//! context is full. With a chat template, an observation is rendered as a
//! message of `observation_role` (the template must keep earlier turns a
//! prefix of later ones: `rlhf check-template`); without one (the bundled
//! byte-level models) it is appended as the program wrote it.

use std::sync::Arc;

use rlhf_datasets::jinja::{JinjaTemplate, Message};
use rlhf_datasets::template_check::check_prefix_preserving;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::check;
use crate::model::checkpoint::Model;
use crate::model::sample::{generate, Generation, SamplingConfig, TokenSpec};
use crate::rl::rollout::from_rows;
use crate::train::StageError;

/// Runs an environment program once on some episodes' turns: `(command,
/// timeout_seconds, requests)` to one reply per request, passed in by the
/// pipeline (which runs programs in their own process groups).
pub type EnvRunner =
    Arc<dyn Fn(&[String], f64, &[Value]) -> Result<Vec<Value>, String> + Send + Sync>;

/// `env:` of a GRPO stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnvConfig {
    /// The environment program and its arguments, run in the experiment
    /// file's folder.
    pub command: Vec<String>,
    /// Policy turns per episode at most.
    pub max_turns: usize,
    /// Each call is stopped (its process group killed) after this long.
    pub timeout_seconds: f64,
    /// Further tries of a call that failed.
    pub retries: usize,
    /// The role an observation takes in a chat template's conversation.
    pub observation_role: String,
}

impl Default for EnvConfig {
    fn default() -> Self {
        Self {
            command: vec![],
            max_turns: 4,
            timeout_seconds: 60.0,
            retries: 1,
            observation_role: "tool".into(),
        }
    }
}

impl EnvConfig {
    pub fn validate(&self) -> Result<(), StageError> {
        if self.command.first().is_none_or(|c| c.is_empty()) {
            return Err(StageError::setting(
                "env.command",
                "is empty: give the environment program and its arguments, e.g. [python3, env.py]",
            ));
        }
        check::count("env.max_turns", self.max_turns as u64, 1, 64)?;
        let t = self.timeout_seconds;
        check::require(
            "env.timeout_seconds",
            t.is_finite() && t > 0.0 && t <= 86_400.0,
            "in (0, 86400]",
            t,
        )?;
        check::count("env.retries", self.retries as u64, 0, 100)?;
        if self.observation_role.trim().is_empty() {
            return Err(StageError::setting(
                "env.observation_role",
                "is empty: e.g. tool or user",
            ));
        }
        Ok(())
    }
}

/// Who wrote a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Policy,
    Environment,
}

/// One turn of an episode: its text and how many tokens it took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    pub role: Role,
    pub text: String,
    pub tokens: usize,
}

/// 1 on the tokens the policy wrote, 0 on the environment's, over an
/// answer of `len` tokens; a single-turn answer (no turns) is all policy.
pub fn policy_tokens(turns: &[Turn], len: usize) -> Vec<f64> {
    if turns.is_empty() {
        return vec![1.0; len];
    }
    let mut mask: Vec<f64> = turns
        .iter()
        .flat_map(|t| std::iter::repeat_n(f64::from(u8::from(t.role == Role::Policy)), t.tokens))
        .collect();
    mask.resize(len, 0.0);
    mask
}

/// An environment's reply to one turn.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub observation: Option<String>,
    pub done: bool,
    pub reward: f64,
}

impl Reply {
    /// `{"observation": text | null, "done": bool, "reward": number}`
    /// (each optional: no observation, not done, reward 0).
    pub fn from_json(v: &Value) -> Result<Self, String> {
        if !v.is_object() {
            return Err("expected {\"observation\", \"done\", \"reward\"}".into());
        }
        let observation = match v.get("observation") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err("`observation` must be text or null".into()),
        };
        let done = match v.get("done") {
            None | Some(Value::Null) => false,
            Some(d) => d.as_bool().ok_or("`done` must be true or false")?,
        };
        let reward = match v.get("reward") {
            None | Some(Value::Null) => 0.0,
            Some(r) => r
                .as_f64()
                .filter(|r| r.abs() <= crate::programs::MAX_SCORE)
                .ok_or("`reward` must be a finite number within ±1e15")?,
        };
        Ok(Self {
            observation,
            done,
            reward,
        })
    }
}

/// How an observation becomes text after the policy's turn.
#[derive(Debug, Clone)]
enum Wrapping {
    /// As the program wrote it.
    Verbatim,
    /// Inside the template's message: `before + observation + after`.
    Message { before: String, after: String },
}

/// The environment of a stage: its program and how observations are
/// rendered for the policy's tokenizer.
pub struct Environment {
    cfg: EnvConfig,
    runner: EnvRunner,
    wrapping: Wrapping,
}

impl Environment {
    /// The environment of `cfg` for `policy`; with a chat template, the
    /// template must keep earlier turns a token prefix of later ones.
    pub fn new(
        cfg: &EnvConfig,
        runner: Option<EnvRunner>,
        policy: &Model,
        policy_dir: &std::path::Path,
    ) -> Result<Self, StageError> {
        cfg.validate()?;
        let runner = runner.ok_or_else(|| {
            StageError::setting(
                "env.command",
                "needs the pipeline to run programs (run the stage with rlhf)",
            )
        })?;
        let wrapping = match policy.tokenizer.chat_template() {
            None => Wrapping::Verbatim,
            Some(t) => template_wrapping(&t, policy, policy_dir, &cfg.observation_role)?,
        };
        Ok(Self {
            cfg: cfg.clone(),
            runner,
            wrapping,
        })
    }

    /// One call on `requests`, retried; one reply each.
    fn call(&self, requests: &[Value]) -> Result<Vec<Reply>, StageError> {
        let fail = |m: String| StageError::setting("env.command", m);
        let cfg = &self.cfg;
        let counts = (requests.len(), "replies", "turns");
        let replies =
            crate::programs::call_with_retries("environment", cfg.retries, counts, || {
                (self.runner)(&cfg.command, cfg.timeout_seconds, requests)
            })
            .map_err(fail)?;
        replies
            .iter()
            .enumerate()
            .map(|(i, r)| Reply::from_json(r).map_err(|e| fail(format!("reply {}: {e}", i + 1))))
            .collect()
    }

    /// The text that follows a policy turn for `observation`.
    fn wrap(&self, observation: &str) -> String {
        match &self.wrapping {
            Wrapping::Verbatim => observation.to_owned(),
            Wrapping::Message { before, after } => format!("{before}{observation}{after}"),
        }
    }
}

/// Where a template puts an observation after an assistant turn: the
/// text between the end of the assistant's EOS and the observation, and
/// from the observation to the next assistant turn's start. Refuses a
/// template that does not keep earlier turns a prefix of later ones.
fn template_wrapping(
    template: &JinjaTemplate,
    policy: &Model,
    policy_dir: &std::path::Path,
    role: &str,
) -> Result<Wrapping, StageError> {
    let shown = policy_dir.display();
    let bad = |m: String| StageError::Config(format!("{shown}: chat template: {m}"));
    let check =
        check_prefix_preserving(template, &policy.tokenizer).map_err(|e| bad(e.to_string()))?;
    if let Some(c) = check
        .cases
        .iter()
        .find(|c| !(c.text_prefix && c.token_prefix))
    {
        return Err(bad(format!(
            "does not keep earlier turns a prefix of later ones ({}: the renderings part at byte {}), so a multi-turn episode would train on text the model never sees at inference; `rlhf check-template {shown}` shows where. Use a template that keeps them (e.g. TRL's training variant)",
            c.name,
            c.parts_at()
        )));
    }
    const MARK: &str = "\u{1}observation\u{1}";
    let turn = vec![Message::new("user", "q"), Message::new("assistant", "a")];
    let mut with_obs = turn.clone();
    with_obs.push(Message::new(role, MARK));
    let render = |m: &[Message], g| template.render(m, g).map_err(|e| bad(e.to_string()));
    let (base, next) = (render(&turn, false)?, render(&with_obs, true)?);
    let tail = next.strip_prefix(base.as_str()).ok_or_else(|| {
        bad(format!(
            "adding a `{role}` message changes the turns before it"
        ))
    })?;
    let (before, after) = tail
        .split_once(MARK)
        .ok_or_else(|| bad(format!("does not render a `{role}` message's content")))?;
    // What the template writes after the assistant's EOS (a newline, say):
    // the policy stopped at EOS, so it comes before the observation.
    let eos = policy
        .tokenizer
        .decode(&[policy.tokenizer.eos_id()], true)
        .unwrap_or_default();
    let gap = match (eos.is_empty(), base.rfind(&eos)) {
        (false, Some(at)) => &base[at + eos.len()..],
        _ => "",
    };
    Ok(Wrapping::Message {
        before: format!("{gap}{before}"),
        after: after.to_owned(),
    })
}

/// Episodes as the rollout takes them: the whole token layout (prompts,
/// then every turn), which tokens the policy wrote, each episode's turns
/// and score.
pub struct Episodes {
    /// `answers`: every token after the prompt, the environment's too;
    /// `finished`: the environment said done; `logprobs`: 0 on the
    /// environment's tokens.
    pub generation: Generation,
    /// `(B, N)` float: 1 on the tokens the policy sampled.
    pub policy_mask: Tensor,
    pub turns: Vec<Vec<Turn>>,
    pub scores: Vec<f64>,
}

/// One episode as it goes.
struct Running {
    context: Vec<i64>,
    answer: Vec<i64>,
    sampled_lp: Vec<f64>,
    turns: Vec<Turn>,
    score: f64,
    done: bool,
}

/// What each episode starts from: its prompt's tokens, text and reference.
pub struct EpisodeStarts<'a> {
    pub ids: &'a [Vec<i64>],
    pub texts: &'a [&'a str],
    pub references: &'a [Option<&'a str>],
}

/// Plays one episode per prompt row: policy turns sampled with
/// `sampling` (its `max_new_tokens` per turn), the environment called on
/// the live episodes after each.
pub fn play(
    env: &Environment,
    policy: &Model,
    starts: &EpisodeStarts,
    sampling: &SamplingConfig,
    device: Device,
) -> Result<Episodes, StageError> {
    let tok = &policy.tokenizer;
    let n_positions = policy.net.n_positions() as usize;
    let mut eps: Vec<Running> = starts
        .ids
        .iter()
        .map(|p| Running {
            context: p.clone(),
            answer: vec![],
            sampled_lp: vec![],
            turns: vec![],
            score: 0.0,
            done: false,
        })
        .collect();
    let mut live: Vec<usize> = (0..eps.len()).collect();
    for turn in 1..=env.cfg.max_turns {
        // An episode whose context is full ends.
        live.retain(|&i| eps[i].context.len() < n_positions);
        let Some(room) = live
            .iter()
            .map(|&i| n_positions - eps[i].context.len())
            .min()
        else {
            break;
        };
        let config = SamplingConfig {
            max_new_tokens: sampling.max_new_tokens.min(room as i64),
            ..sampling.clone()
        };
        let contexts: Vec<Vec<i64>> = live.iter().map(|&i| eps[i].context.clone()).collect();
        let g = generate(&policy.net, &contexts, &config, TokenSpec::of(tok), device)?;
        let lps: Vec<Vec<f64>> = crate::rl::rollout::to_rows(&g.logprobs);
        let mut requests = Vec::with_capacity(live.len());
        for (k, &i) in live.iter().enumerate() {
            let ids = &g.answers[k];
            let text = tok.decode(ids, false)?;
            let e = &mut eps[i];
            e.context.extend(ids);
            e.answer.extend(ids);
            e.sampled_lp.extend(&lps[k][..ids.len()]);
            e.turns.push(Turn {
                role: Role::Policy,
                text: text.clone(),
                tokens: ids.len(),
            });
            requests.push(json!({
                "episode": i, "turn": turn, "prompt": starts.texts[i],
                "answer": starts.references[i], "response": text,
                "history": e.turns.iter().map(|t| json!({"role": t.role, "text": t.text})).collect::<Vec<_>>(),
            }));
        }
        let replies = env.call(&requests)?;
        let mut next = Vec::with_capacity(live.len());
        for (&i, reply) in live.iter().zip(replies) {
            let e = &mut eps[i];
            e.score += reply.reward;
            e.done = reply.done;
            let observation = match (reply.done, turn < env.cfg.max_turns, reply.observation) {
                (false, true, Some(o)) => o,
                _ => continue,
            };
            let text = env.wrap(&observation);
            let ids = tok.encode(&text)?;
            if e.context.len() + ids.len() >= n_positions {
                continue;
            }
            e.context.extend(&ids);
            e.answer.extend(&ids);
            e.sampled_lp.extend(std::iter::repeat_n(0.0, ids.len()));
            e.turns.push(Turn {
                role: Role::Environment,
                text,
                tokens: ids.len(),
            });
            next.push(i);
        }
        live = next;
    }
    Ok(lay_out(eps, starts.ids, tok.pad_id(), device))
}

/// The episodes in the rollout's layout: prompts left-padded, answers
/// (every turn) right-padded.
fn lay_out(eps: Vec<Running>, prompts: &[Vec<i64>], pad: i64, device: Device) -> Episodes {
    let p = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let n = eps.iter().map(|e| e.answer.len()).max().unwrap_or(0).max(1);
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for (e, prompt) in eps.iter().zip(prompts) {
        let (left, right) = (p - prompt.len(), n - e.answer.len());
        ids.extend(std::iter::repeat_n(pad, left));
        ids.extend(prompt);
        ids.extend(&e.answer);
        ids.extend(std::iter::repeat_n(pad, right));
        mask.extend(std::iter::repeat_n(0i64, left));
        mask.extend(std::iter::repeat_n(1i64, prompt.len() + e.answer.len()));
        mask.extend(std::iter::repeat_n(0i64, right));
    }
    let shape = [eps.len() as i64, (p + n) as i64];
    let policy: Vec<Vec<f64>> = eps
        .iter()
        .map(|e| policy_tokens(&e.turns, e.answer.len()))
        .collect();
    let lps: Vec<Vec<f64>> = eps.iter().map(|e| e.sampled_lp.clone()).collect();
    Episodes {
        generation: Generation {
            tokens: Tensor::from_slice(&ids).view(shape).to_device(device),
            attention_mask: Tensor::from_slice(&mask).view(shape).to_device(device),
            prompt_width: p as i64,
            answers: eps.iter().map(|e| e.answer.clone()).collect(),
            finished: eps.iter().map(|e| e.done).collect(),
            logprobs: from_rows(&lps, n, device),
        },
        policy_mask: from_rows(&policy, n, device).to_kind(Kind::Float),
        turns: eps.iter().map(|e| e.turns.clone()).collect(),
        scores: eps.iter().map(|e| e.score).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(seed: i64, n_positions: i64) -> Model {
        crate::tiny_byte_model(seed, n_positions)
    }

    /// An environment that answers every turn `<obs N>` with reward 0.5
    /// until the third call of an episode, then says done with reward 1;
    /// episode 1 it ends at once (done, reward 2).
    fn env(max_turns: usize) -> Environment {
        let runner: EnvRunner = Arc::new(|_, _, requests| {
            Ok(requests
                .iter()
                .map(|r| {
                    let (ep, turn) = (r["episode"].as_u64().unwrap(), r["turn"].as_u64().unwrap());
                    assert_eq!(r["history"].as_array().unwrap().len() as u64, 2 * turn - 1);
                    match (ep, turn) {
                        (1, _) => json!({"done": true, "reward": 2.0}),
                        (_, 3) => json!({"done": true, "reward": 1.0}),
                        _ => json!({"observation": format!("<obs {turn}>"), "reward": 0.5}),
                    }
                })
                .collect())
        });
        let cfg = EnvConfig {
            command: vec!["env".into()],
            max_turns,
            ..EnvConfig::default()
        };
        let policy = tiny(1, 64);
        Environment::new(&cfg, Some(runner), &policy, std::path::Path::new("p")).unwrap()
    }

    /// The layout an episode leaves: its tokens are the prompt, then each
    /// turn's tokens in order; the mask is 1 exactly on the policy's; the
    /// sampled log-probabilities are 0 on the environment's; the score is
    /// the sum of the rewards; `max_turns` and `done` end episodes.
    #[test]
    fn episodes_interleave_policy_and_environment_tokens_with_the_policys_masked_in() {
        let policy = tiny(1, 64);
        let tok = &policy.tokenizer;
        let ids: Vec<Vec<i64>> = ["Q: a", "Q: bb", "Q: c"]
            .iter()
            .map(|p| tok.encode(p).unwrap())
            .collect();
        let texts = ["Q: a", "Q: bb", "Q: c"];
        let refs = [None, Some("1"), None];
        let starts = EpisodeStarts {
            ids: &ids,
            texts: &texts,
            references: &refs,
        };
        let sampling = SamplingConfig {
            max_new_tokens: 4,
            ..SamplingConfig::default()
        };
        for (max_turns, want_turns, want_scores) in [
            (3, [5, 1, 5], [2.0, 2.0, 2.0]),
            (2, [3, 1, 3], [1.0, 2.0, 1.0]),
        ] {
            let env = env(max_turns);
            let e = play(&env, &policy, &starts, &sampling, Device::Cpu).unwrap();
            let counts: Vec<usize> = e.turns.iter().map(Vec::len).collect();
            assert_eq!(counts, want_turns, "max_turns {max_turns}");
            assert_eq!(e.scores, want_scores);
            let g = &e.generation;
            let (tokens, mask) = (
                crate::rl::rollout::to_rows::<i64>(&g.tokens),
                crate::rl::rollout::to_rows::<f64>(&e.policy_mask),
            );
            let lps = crate::rl::rollout::to_rows::<f64>(&g.logprobs);
            let width = g.prompt_width as usize;
            for (row, turns) in e.turns.iter().enumerate() {
                let mut at = 0;
                for (k, t) in turns.iter().enumerate() {
                    let role = if k % 2 == 0 {
                        Role::Policy
                    } else {
                        Role::Environment
                    };
                    assert_eq!(t.role, role);
                    let span = at..at + t.tokens;
                    let text = tok
                        .decode(&tokens[row][width + span.start..width + span.end], false)
                        .unwrap();
                    match role {
                        Role::Environment => {
                            assert_eq!(text, format!("<obs {}>", k / 2 + 1));
                            assert!(mask[row][span.clone()].iter().all(|&m| m == 0.0));
                            assert!(lps[row][span].iter().all(|&l| l == 0.0));
                        }
                        Role::Policy => {
                            assert_eq!(text, t.text);
                            assert!(mask[row][span.clone()].iter().all(|&m| m == 1.0));
                            assert!(lps[row][span].iter().all(|&l| l < 0.0));
                        }
                    }
                    at += t.tokens;
                }
                assert_eq!(at, g.answers[row].len());
                assert!(mask[row][at..].iter().all(|&m| m == 0.0), "padding");
                assert_eq!(g.finished[row], row == 1 || max_turns == 3);
            }
        }
    }

    /// With a chat template, an observation is the template's tool message
    /// and the next assistant turn's start; a template that drops earlier
    /// reasoning is refused, naming the model folder.
    #[test]
    fn observations_follow_the_chat_template_and_bad_templates_are_refused() {
        let chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let policy = tiny(1, 64);
        let t = JinjaTemplate::new(chatml, serde_json::Map::new()).unwrap();
        let wrapping = template_wrapping(&t, &policy, std::path::Path::new("m"), "tool").unwrap();
        // The byte tokenizer's EOS is not <|im_end|>: nothing after it.
        let Wrapping::Message { before, after } = wrapping else {
            panic!("a template wraps")
        };
        assert_eq!(
            (before.as_str(), after.as_str()),
            ("<|im_start|>tool\n", "<|im_end|>\n<|im_start|>assistant\n")
        );
        // Dropping every assistant turn but the last is not prefix-preserving.
        let dropping = "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let t = JinjaTemplate::new(dropping, serde_json::Map::new()).unwrap();
        let e = template_wrapping(&t, &policy, std::path::Path::new("models/qwen"), "tool")
            .map(|_| ())
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("models/qwen") && e.contains("rlhf check-template"),
            "{e}"
        );
    }
}
