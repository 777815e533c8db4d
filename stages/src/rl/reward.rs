//! Rewards from programs (`reward:` of PPO and GRPO): a built-in checker
//! (`checker: math`: the answer's final number against the prompt's
//! `answer` column; `checker: code`: the answer's Python run confined
//! against the tests in that column), a user's program speaking JSON lines (`command`), or
//! a reward server (`url`: `POST` a JSON array of the items below, get the
//! array of their results), called `workers` at once on shares of the
//! answers, each call stopped after `timeout_seconds` and retried up to
//! `retries` times. Every score
//! is kept in the stage folder (`reward_cache.jsonl`, keyed by a sha256 of
//! the scorer, prompt, answer and reference), so a resumed or repeated
//! iteration does not pay for it again.
//!
//! A program reads one line per answer, `{"prompt", "response",
//! "answer"}` (`answer`: the prompt's reference, or null), and writes one
//! line per answer, `{"score": x}`, optionally with `"components": {name:
//! value}`, each logged per iteration as `reward/NAME` (its mean).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rlhf_datasets::append_log::AppendLog;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::check;
use crate::programs::code_check::{CodeChecker, Verdict};
use crate::programs::sandbox::Limits;
pub use crate::programs::{Endpoint, ProgramRunner, ScoreItem, Scored};
use crate::train::StageError;

/// Where the scores are kept, in the stage folder.
pub const CACHE_FILE: &str = "reward_cache.jsonl";

/// A reward computed by a program rather than a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    /// A built-in checker: `math` or `code`.
    pub checker: Option<Checker>,
    /// The code checker's interpreter (a name on PATH or a path); it runs
    /// with its standard library only.
    pub python: Option<String>,
    /// The code checker's memory per answer (MiB of address space).
    pub memory_mb: Option<u64>,
    /// The largest file an answer's code may write (MiB).
    pub file_mb: Option<u64>,
    /// A program (and its arguments), run in the experiment file's folder.
    pub command: Option<Vec<String>>,
    /// A reward server's address (`http://HOST:PORT/PATH`).
    pub url: Option<String>,
    /// Each call is stopped (its process group killed) after this long.
    pub timeout_seconds: f64,
    /// Calls at once, each on its share of the answers.
    pub workers: usize,
    /// Further tries of a call that failed or timed out.
    pub retries: usize,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            checker: None,
            python: None,
            memory_mb: None,
            file_mb: None,
            command: None,
            url: None,
            timeout_seconds: 60.0,
            workers: 1,
            retries: 1,
        }
    }
}

/// The checkers rlhf has built in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Checker {
    /// 1 when the answer's final answer (its last `\boxed{}`, else its last
    /// number) equals the prompt's `answer` as a number, else 0.
    Math,
    /// 1 when the answer's Python (its last fenced block, else all of it)
    /// passes the prompt's `answer` (Python tests), run confined, else 0.
    Code,
}

impl RewardConfig {
    pub fn validate(&self) -> Result<(), StageError> {
        let given = [
            self.checker.is_some(),
            self.command.is_some(),
            self.url.is_some(),
        ];
        if given.iter().filter(|&&g| g).count() != 1 {
            return Err(StageError::setting(
                "reward",
                "give one of `checker` (math), `command` (a program) and `url` (a reward server)",
            ));
        }
        if let Some(c) = &self.command {
            if c.is_empty() || c[0].is_empty() {
                return Err(StageError::setting(
                    "reward.command",
                    "is empty: give the program and its arguments, e.g. [python3, reward.py]",
                ));
            }
        }
        if let Some(u) = &self.url {
            if !u.starts_with("http://") || u.len() <= "http://".len() {
                return Err(StageError::setting(
                    "reward.url",
                    format!("is {u:?}; expected http://HOST:PORT/PATH (for https, a local proxy in front)"),
                ));
            }
        }
        let code_only = [
            ("python", self.python.is_some()),
            ("memory_mb", self.memory_mb.is_some()),
            ("file_mb", self.file_mb.is_some()),
        ];
        if let Some((name, _)) = code_only.iter().find(|(_, given)| *given) {
            if self.checker != Some(Checker::Code) {
                return Err(StageError::setting(
                    format!("reward.{name}"),
                    "is a setting of the code checker: give it with `checker: code`",
                ));
            }
        }
        check::count(
            "reward.memory_mb",
            self.memory_mb.unwrap_or(1024),
            64,
            1 << 20,
        )?;
        check::count("reward.file_mb", self.file_mb.unwrap_or(16), 1, 1 << 20)?;
        let t = self.timeout_seconds;
        check::require(
            "reward.timeout_seconds",
            t.is_finite() && t > 0.0 && t <= 86_400.0,
            "in (0, 86400]",
            t,
        )?;
        check::count("reward.workers", self.workers as u64, 1, 256)?;
        check::count("reward.retries", self.retries as u64, 0, 100)?;
        Ok(())
    }

    /// What the cache keys on besides the answer: the scorer itself.
    fn identity(&self) -> String {
        match (&self.checker, &self.command, &self.url) {
            (Some(Checker::Code), _, _) => format!(
                "checker:Code:{}:{}:{}:{}",
                self.python_name(),
                self.memory_mb.unwrap_or(1024),
                self.file_mb.unwrap_or(16),
                self.timeout_seconds
            ),
            (Some(c), _, _) => format!("checker:{c:?}"),
            (None, Some(c), _) => format!("command:{}", c.join("\u{1f}")),
            (None, None, Some(u)) => format!("url:{u}"),
            (None, None, None) => String::new(),
        }
    }

    fn python_name(&self) -> &str {
        self.python.as_deref().unwrap_or("python3")
    }

    /// The code checker these settings describe (checked to work here).
    fn code_checker(&self) -> Result<CodeChecker, StageError> {
        let limits = Limits {
            wall_seconds: self.timeout_seconds,
            memory_mb: self.memory_mb.unwrap_or(1024),
            file_mb: self.file_mb.unwrap_or(16),
        };
        CodeChecker::new(self.python_name(), limits)
            .map_err(|e| StageError::setting("reward.checker", format!("code: {e}")))
    }

    /// The program or server to call (none for a built-in checker).
    fn endpoint(&self) -> Option<(Endpoint<'_>, &'static str)> {
        match (&self.command, &self.url) {
            (Some(c), _) => Some((Endpoint::Command(c), "reward.command")),
            (None, Some(u)) => Some((Endpoint::Url(u), "reward.url")),
            (None, None) => None,
        }
    }
}

/// Scores kept across iterations and restarts: an append-only log in the
/// stage folder (made at the first score), read back whole.
struct Cache {
    path: PathBuf,
    log: Option<AppendLog>,
    known: HashMap<String, Scored>,
}

#[derive(Serialize, Deserialize)]
struct CacheLine {
    key: String,
    #[serde(flatten)]
    scored: Scored,
}

fn log_err(e: rlhf_datasets::append_log::AppendLogError) -> StageError {
    StageError::Config(e.to_string())
}

impl Cache {
    /// The cache of `dir`; a torn last line (a crash mid-write) is cut
    /// off, so that answer is scored again.
    fn open(dir: &Path) -> Result<Self, StageError> {
        let path = dir.join(CACHE_FILE);
        let (log, lines) = match path.exists() {
            true => {
                let (log, lines) = AppendLog::open::<CacheLine>(&path).map_err(log_err)?;
                (Some(log), lines)
            }
            false => (None, vec![]),
        };
        let known = lines.into_iter().map(|l| (l.key, l.scored)).collect();
        Ok(Self { path, log, known })
    }

    fn add(&mut self, new: Vec<(String, Scored)>) -> Result<(), StageError> {
        if new.is_empty() {
            return Ok(());
        }
        if self.log.is_none() {
            self.log = Some(AppendLog::open::<CacheLine>(&self.path).map_err(log_err)?.0);
        }
        let lines: Vec<CacheLine> = new
            .iter()
            .map(|(key, scored)| CacheLine {
                key: key.clone(),
                scored: scored.clone(),
            })
            .collect();
        let log = self.log.as_mut().expect("opened above");
        log.append(&lines, false).map_err(log_err)?;
        self.known.extend(new);
        Ok(())
    }
}

/// A reward program with its cache.
pub struct ProgramScorer {
    cfg: RewardConfig,
    runner: Option<ProgramRunner>,
    code: Option<CodeChecker>,
    identity: String,
    cache: Mutex<Cache>,
}

impl ProgramScorer {
    /// `cfg`'s scorer, keeping its scores in `out_dir`; a `command` needs
    /// the pipeline's `runner`.
    pub fn new(
        cfg: &RewardConfig,
        runner: Option<ProgramRunner>,
        out_dir: &Path,
    ) -> Result<Self, StageError> {
        cfg.validate()?;
        if let (Some((_, setting)), None) = (cfg.endpoint(), &runner) {
            return Err(StageError::setting(
                setting,
                "needs the pipeline to call programs and servers (run the stage with rlhf)",
            ));
        }
        let code = match cfg.checker {
            Some(Checker::Code) => Some(cfg.code_checker()?),
            _ => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            runner,
            code,
            identity: cfg.identity(),
            cache: Mutex::new(Cache::open(out_dir)?),
        })
    }

    fn key(&self, item: &ScoreItem) -> String {
        let mut h = Sha256::new();
        for part in [
            self.identity.as_str(),
            &item.prompt,
            &item.response,
            item.answer.as_deref().unwrap_or("\u{0}none"),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        format!("{:x}", h.finalize())
    }

    /// One score per item, in order: from the cache, else computed. The
    /// scores computed are kept even when some share failed, so a rerun
    /// asks only for the rest.
    pub fn scores(&self, items: &[ScoreItem]) -> Result<Vec<Scored>, StageError> {
        let keys: Vec<String> = items.iter().map(|i| self.key(i)).collect();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let missing: Vec<usize> = (0..items.len())
            .filter(|&i| !cache.known.contains_key(&keys[i]))
            .collect();
        let todo: Vec<ScoreItem> = missing.iter().map(|&i| items[i].clone()).collect();
        let (computed, failed) = self.compute(&todo);
        let new = missing
            .iter()
            .zip(computed)
            .filter_map(|(&i, s)| Some((keys[i].clone(), s?)))
            .collect();
        cache.add(new)?;
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(keys.iter().map(|k| cache.known[k].clone()).collect())
    }

    /// Each item's score where it was computed, and the first failure.
    fn compute(&self, items: &[ScoreItem]) -> (Vec<Option<Scored>>, Option<StageError>) {
        if items.is_empty() {
            return (vec![], None);
        }
        match (self.cfg.checker, &self.code) {
            (Some(Checker::Math), _) => {
                match items.iter().map(math_score).collect::<Result<Vec<_>, _>>() {
                    Ok(scores) => (scores.into_iter().map(Some).collect(), None),
                    Err(e) => (vec![None; items.len()], Some(e)),
                }
            }
            (Some(Checker::Code), Some(code)) => {
                self.in_shares(items, "reward.checker", |part| code_scores(code, part))
            }
            _ => {
                let (endpoint, setting) = self.cfg.endpoint().expect("validated");
                self.in_shares(items, setting, |part| self.call(endpoint, part))
            }
        }
    }

    /// One call of the program or server on `part`, retried.
    fn call(&self, endpoint: Endpoint<'_>, part: &[ScoreItem]) -> Result<Vec<Scored>, String> {
        let (cfg, runner) = (&self.cfg, self.runner.as_ref().expect("checked in new"));
        let counts = (part.len(), "scores", "answers");
        crate::programs::call_with_retries("reward program", cfg.retries, counts, || {
            runner(endpoint, cfg.timeout_seconds, part)
        })
    }

    /// The items in `workers` shares scored at once by `score`.
    fn in_shares(
        &self,
        items: &[ScoreItem],
        setting: &str,
        score: impl Fn(&[ScoreItem]) -> Result<Vec<Scored>, String> + Sync,
    ) -> (Vec<Option<Scored>>, Option<StageError>) {
        let share = items.len().div_ceil(self.cfg.workers);
        let score = &score;
        let results: Vec<Result<Vec<Scored>, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = items
                .chunks(share)
                .map(|part| s.spawn(move || score(part)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("a worker panicked".into())))
                .collect()
        });
        let (mut out, mut failed) = (Vec::with_capacity(items.len()), None);
        for (r, part) in results.into_iter().zip(items.chunks(share)) {
            match r {
                Ok(scores) => out.extend(scores.into_iter().map(Some)),
                Err(e) => {
                    out.extend(std::iter::repeat_n(None, part.len()));
                    failed.get_or_insert_with(|| StageError::setting(setting, e));
                }
            }
        }
        (out, failed)
    }
}

/// The code checker's scores of some answers: 1 passed, else 0, with the
/// component `stopped` (1 when a limit stopped the code).
fn code_scores(code: &CodeChecker, items: &[ScoreItem]) -> Result<Vec<Scored>, String> {
    items
        .iter()
        .map(|item| {
            let tests = item.answer.as_deref().ok_or_else(|| {
                format!(
                    "code needs each prompt's tests (an `answer` column in `prompts`); the prompt {:?} has none",
                    item.prompt.chars().take(80).collect::<String>()
                )
            })?;
            let verdict = code.check(&item.response, tests)?;
            let stopped = matches!(verdict, Verdict::Stopped(_));
            Ok(Scored {
                score: f64::from(u8::from(verdict == Verdict::Passed)),
                components: BTreeMap::from([("stopped".into(), f64::from(u8::from(stopped)))]),
            })
        })
        .collect()
}

/// The math checker's score of one answer.
fn math_score(item: &ScoreItem) -> Result<Scored, StageError> {
    let reference = item.answer.as_deref().ok_or_else(|| {
        StageError::setting(
            "reward.checker",
            format!(
                "math needs each prompt's reference answer (an `answer` column in `prompts`); the prompt {:?} has none",
                item.prompt.chars().take(80).collect::<String>()
            ),
        )
    })?;
    let right = rlhf_datasets::math_answer::is_correct(&item.response, reference);
    Ok(Scored {
        score: f64::from(u8::from(right)),
        components: BTreeMap::new(),
    })
}

/// Each component's mean over the answers that have it, as
/// `reward/NAME` in an iteration's metrics.
pub fn record_components(components: &[BTreeMap<String, f64>], record: &mut serde_json::Value) {
    let mut sums: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    for c in components {
        for (name, v) in c {
            let e = sums.entry(name).or_default();
            (e.0, e.1) = (e.0 + v, e.1 + 1);
        }
    }
    for (name, (sum, n)) in sums {
        record[format!("reward/{name}")] = (sum / n as f64).into();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn item(p: &str, r: &str, a: Option<&str>) -> ScoreItem {
        ScoreItem {
            prompt: p.into(),
            response: r.into(),
            answer: a.map(str::to_owned),
        }
    }

    #[test]
    fn the_math_checker_scores_final_answers_and_needs_references() {
        let d = tempfile::tempdir().unwrap();
        let cfg = RewardConfig {
            checker: Some(Checker::Math),
            ..RewardConfig::default()
        };
        let s = ProgramScorer::new(&cfg, None, d.path()).unwrap();
        let got = s
            .scores(&[
                item("2+2?", "It is \\boxed{4}.", Some("4")),
                item("2+2?", "It is 5.", Some("4")),
            ])
            .unwrap();
        assert_eq!((got[0].score, got[1].score), (1.0, 0.0));
        let e = s.scores(&[item("2+3?", "5", None)]).unwrap_err();
        assert!(e.to_string().contains("`answer` column"), "{e}");
    }

    /// The code checker through the scorer: answers in two shares at
    /// once, right code 1, wrong or stopped code 0 (`stopped` says
    /// which), and a prompt without tests named.
    #[test]
    fn the_code_checker_scores_answers_run_against_their_tests() {
        let d = tempfile::tempdir().unwrap();
        let cfg = RewardConfig {
            checker: Some(Checker::Code),
            python: std::env::var("RLHF_PYTHON").ok(),
            timeout_seconds: 2.0,
            workers: 2,
            memory_mb: Some(256),
            ..RewardConfig::default()
        };
        let s = ProgramScorer::new(&cfg, None, d.path()).unwrap();
        let tests = Some("assert double(4) == 8");
        let got = s
            .scores(&[
                item(
                    "double?",
                    "```python\ndef double(x):\n    return 2 * x\n```",
                    tests,
                ),
                item("double?", "def double(x):\n    return x", tests),
                item("double?", "while True: pass", tests),
            ])
            .unwrap();
        let scores: Vec<(f64, f64)> = got
            .iter()
            .map(|g| (g.score, g.components["stopped"]))
            .collect();
        assert_eq!(scores, [(1.0, 0.0), (0.0, 0.0), (0.0, 1.0)]);
        let e = s.scores(&[item("p", "x = 1", None)]).unwrap_err();
        assert!(e.to_string().contains("tests (an `answer` column"), "{e}");
        let misplaced = RewardConfig {
            checker: Some(Checker::Math),
            memory_mb: Some(256),
            ..RewardConfig::default()
        };
        let e = misplaced.validate().unwrap_err().to_string();
        assert!(
            e.contains("reward.memory_mb") && e.contains("checker: code"),
            "{e}"
        );
    }

    /// Shares run at once, a failing call is retried, and a second
    /// scorer on the same folder (a resumed stage) calls nothing again.
    #[test]
    fn programs_run_in_shares_with_retries_and_their_scores_are_kept() {
        let d = tempfile::tempdir().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let runner: ProgramRunner = Arc::new(move |_, _, items| {
            // Every third call fails once.
            if seen.fetch_add(1, Ordering::SeqCst) % 3 == 2 {
                return Err("crashed".into());
            }
            Ok(items
                .iter()
                .map(|i| Scored {
                    score: i.response.len() as f64,
                    components: BTreeMap::from([("len".into(), i.response.len() as f64)]),
                })
                .collect())
        });
        let cfg = RewardConfig {
            command: Some(vec!["reward".into()]),
            workers: 2,
            retries: 1,
            ..RewardConfig::default()
        };
        let items: Vec<ScoreItem> = (0..5).map(|i| item("p", &"x".repeat(i), None)).collect();
        let s = ProgramScorer::new(&cfg, Some(runner.clone()), d.path()).unwrap();
        let got = s.scores(&items).unwrap();
        assert_eq!(
            got.iter().map(|s| s.score).collect::<Vec<_>>(),
            [0.0, 1.0, 2.0, 3.0, 4.0]
        );
        let before = calls.load(Ordering::SeqCst);
        assert!(before >= 2, "two shares: {before} calls");
        let again = ProgramScorer::new(&cfg, Some(runner), d.path()).unwrap();
        assert_eq!(again.scores(&items).unwrap(), got);
        assert_eq!(calls.load(Ordering::SeqCst), before, "all from the cache");
        let mut record = serde_json::json!({});
        let parts: Vec<_> = got.iter().map(|s| s.components.clone()).collect();
        record_components(&parts, &mut record);
        assert_eq!(record["reward/len"], 2.0);
    }

    #[test]
    fn a_program_that_always_fails_names_its_last_error() {
        let d = tempfile::tempdir().unwrap();
        let runner: ProgramRunner = Arc::new(|_, _, _| Err("exit status 3".into()));
        let cfg = RewardConfig {
            command: Some(vec!["reward".into()]),
            retries: 2,
            ..RewardConfig::default()
        };
        let s = ProgramScorer::new(&cfg, Some(runner), d.path()).unwrap();
        let e = s.scores(&[item("p", "a", None)]).unwrap_err();
        assert!(
            e.to_string().contains("exit status 3 (after 3 tries)"),
            "{e}"
        );
        assert!(!d.path().join(CACHE_FILE).exists(), "nothing kept");
    }

    /// One of two shares fails: the other's scores are kept, and the
    /// rerun asks only for the failed share's answers.
    #[test]
    fn a_failed_share_leaves_the_others_scores_kept() {
        let d = tempfile::tempdir().unwrap();
        let score = |items: &[ScoreItem]| -> Vec<Scored> {
            items
                .iter()
                .map(|i| Scored {
                    score: i.response.len() as f64,
                    ..Scored::default()
                })
                .collect()
        };
        let flaky: ProgramRunner = Arc::new(move |_, _, items: &[ScoreItem]| {
            match items.iter().any(|i| i.response == "bad") {
                true => Err("timed out".into()),
                false => Ok(score(items)),
            }
        });
        let cfg = RewardConfig {
            command: Some(vec!["reward".into()]),
            workers: 2,
            retries: 0,
            ..RewardConfig::default()
        };
        let items = [item("p", "ok", None), item("p", "bad", None)];
        let s = ProgramScorer::new(&cfg, Some(flaky), d.path()).unwrap();
        assert!(s.scores(&items).is_err());
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = asked.clone();
        let fixed: ProgramRunner = Arc::new(move |_, _, items: &[ScoreItem]| {
            seen.lock()
                .unwrap()
                .extend(items.iter().map(|i| i.response.clone()));
            Ok(score(items))
        });
        let again = ProgramScorer::new(&cfg, Some(fixed), d.path()).unwrap();
        let got: Vec<f64> = again
            .scores(&items)
            .unwrap()
            .iter()
            .map(|s| s.score)
            .collect();
        assert_eq!(got, [2.0, 3.0]);
        assert_eq!(
            *asked.lock().unwrap(),
            ["bad"],
            "only the failed share again"
        );
    }
}
