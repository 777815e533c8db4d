//! `rlhf eval` and `rlhf samples`: what a finished run achieved.
//!
//! Every policy of the run (SFT, PPO, each round's PPO) answers the same
//! held-out prompts greedily; the answers are judged by the bundled task's
//! gold judge (where it knows the prompts) and by the run's latest reward
//! model, compared head to head with the reference (SFT) policy, and the KL
//! to the reference is measured on sampled answers. Each reward model's
//! pairwise accuracy is measured on held-out rankings. The report is
//! written to `<run>/report/` as JSON, Markdown and PNG plots.
//!
//! It reads run folders through run_folder and imports experiment (the
//! judge's settings) and label (the judge runs as a labelling program).

pub mod judge;
pub mod markdown;
pub mod plots;
pub mod seeds;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rlhf_datasets::atomic;
use rlhf_stages::eval::{self, EvalSettings, PolicyAnswers, Tally};
use rlhf_stages::{HeadChoice, Model};
use serde::{Deserialize, Serialize};
use tch::Device;

use crate::run_folder::finished::{self, finished_stages, FinishedStage};
use crate::run_folder::relative_to;
use rlhf_stages::eval::verifiable::Verifiable;
use rlhf_stages::kind::LoopRole;

pub use crate::run_folder::REPORT_DIR;
pub const REPORT_JSON: &str = "report.json";
pub const REPORT_MD: &str = "report.md";
pub const ANSWERS_FILE: &str = "answers.jsonl";

/// What to evaluate and how.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Held-out prompts; default: the PPO (else SFT) stage's `eval_prompts`.
    pub prompts: Option<PathBuf>,
    /// Held-out rankings for the reward models; default: each reward
    /// stage's own `eval_data`.
    pub preferences: Option<PathBuf>,
    /// Evaluate at most this many prompts (the first ones).
    pub max_prompts: Option<usize>,
    pub settings: EvalSettings,
    /// Skip the KL estimate (for `rlhf samples`: answers only).
    pub skip_kl: bool,
    /// Check answers against the prompts' `answer` column with this
    /// checker, with this many samples per prompt (`--checker`).
    pub checker: Option<(rlhf_stages::eval::verifiable::AnswerChecker, usize)>,
    /// A reward program or server scoring every policy's greedy answers
    /// (`--reward-command`, `--reward-url`).
    pub reward_program: Option<rlhf_stages::rl::reward::RewardConfig>,
    /// Other run folders whose policies join the report (`--with`).
    pub with_runs: Vec<PathBuf>,
    /// A program judging the answers (`--judge`); default: the run's
    /// recorded judge, else the bundled task's.
    pub judge: Option<judge::CommandJudge>,
}

/// Head-to-head counts and the win rate over the non-tied ones.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersusReference {
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
    pub win_rate: Option<f64>,
    /// 95% Wilson interval of `win_rate`.
    #[serde(default)]
    pub win_rate_95: Option<[f64; 2]>,
}

impl From<Tally> for VersusReference {
    fn from(t: Tally) -> Self {
        Self {
            wins: t.wins,
            ties: t.ties,
            losses: t.losses,
            win_rate: t.win_rate(),
            win_rate_95: t.win_rate_interval(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyRow {
    pub label: String,
    pub round: usize,
    pub checkpoint: PathBuf,
    /// Mean gold-judge score of the greedy answers.
    pub gold_score: Option<f64>,
    /// Share of exactly right answers.
    pub exact: Option<f64>,
    /// Gold-judge comparisons against the reference's answers.
    pub gold_vs_reference: Option<VersusReference>,
    /// The same, by the prompt file's `family` column where it has one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gold_vs_reference_by_family: BTreeMap<String, VersusReference>,
    /// Mean reward-model score of the greedy answers.
    pub reward_score: Option<f64>,
    /// Reward-model comparisons against the reference's answers.
    pub reward_vs_reference: Option<VersusReference>,
    /// KL(policy || reference), nats per answer, on sampled answers.
    pub kl_to_reference: Option<f64>,
    /// Accepted by the checker (`--checker`): greedy, pass@1, pass@k,
    /// cons@k.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verifiable: Option<rlhf_stages::eval::verifiable::Verifiable>,
    /// The reward program's or server's mean score of the greedy answers
    /// and of each of its components (`--reward-command`, `--reward-url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program_score: Option<ProgramScore>,
    /// Mean answer length in tokens (EOS included).
    pub answer_tokens: f64,
    /// Share of answers that ended with EOS.
    pub finished: f64,
    /// The stage's own wall time (where it was copied from another run,
    /// its time there).
    #[serde(default)]
    pub seconds: Option<f64>,
    /// The stage's and every stage's upstream of it (SFT, reward models,
    /// earlier rounds and their labelling), each counted once.
    #[serde(default)]
    pub route_seconds: Option<f64>,
}

/// A reward program's scores of one policy's answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgramScore {
    /// The program or server as given.
    pub scorer: String,
    pub mean: f64,
    /// Each component's mean over the answers that have it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub components: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RewardRow {
    pub label: String,
    pub round: usize,
    pub eval_data: Option<PathBuf>,
    /// Pairwise accuracy on held-out rankings (tied answers not compared).
    pub accuracy: Option<f64>,
    pub pairs: usize,
    pub loss: Option<f64>,
    /// Groups (prompts with ranked answers) it was trained on.
    pub train_groups: Option<u64>,
    /// The same pairs ranked by "the longer answer wins" (tokens; equal
    /// lengths count one half): what length alone gets right. Chance is
    /// one half.
    #[serde(default)]
    pub length_accuracy: Option<f64>,
}

/// A stage that may not have learnt: why, each reason naming its
/// baseline and the numbers (its summary's `flags`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlaggedStage {
    pub stage: String,
    pub flags: Vec<String>,
}

/// An SFT stage's held-out numbers beside what knows nothing of the task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SftBaselineRow {
    pub stage: String,
    /// Held-out loss per answer token at the end.
    pub eval_loss: Option<f64>,
    /// A model that knows only the answer tokens' frequencies.
    pub frequency_loss: Option<f64>,
    /// The judge's score of greedy answers at step 0 and at the end.
    pub eval_gold_before: Option<f64>,
    pub eval_gold_after: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The run folder's name; every path below is relative to it.
    pub run: PathBuf,
    pub prompts_file: PathBuf,
    pub prompts: usize,
    /// The policy the others are compared with and KL is measured to.
    pub reference: String,
    /// The reward model that scores every policy's answers (the latest).
    pub reward_model: Option<String>,
    pub settings: EvalSettings,
    pub policies: Vec<PolicyRow>,
    pub reward_models: Vec<RewardRow>,
    /// The loop's rounds as `rlhf run` recorded them (`rounds.jsonl`).
    pub rounds: Vec<serde_json::Value>,
    /// PNG files written beside the report.
    pub plots: Vec<String>,
    /// What the report's reader should know of how it was made (a reward
    /// model older than the run's last round scored the answers).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Stages that did not clear their baselines, and why.
    #[serde(default)]
    pub flagged: Vec<FlaggedStage>,
    /// Each SFT stage against the frequency baseline and its step 0.
    #[serde(default)]
    pub sft_baselines: Vec<SftBaselineRow>,
    /// Who gave the gold scores: the bundled task's judge, a program or a
    /// held-out reward stage.
    #[serde(default)]
    pub judge: String,
    /// Pearson's r of the gold score with answer length (tokens), over
    /// every policy's answers.
    #[serde(default)]
    pub gold_length_correlation: Option<f64>,
    /// The same for the reward model scoring every policy.
    #[serde(default)]
    pub reward_length_correlation: Option<f64>,
    /// The first prompts with every policy's answer, side by side.
    #[serde(default)]
    pub examples: Vec<PromptAnswers>,
    /// Each RL stage's saved rollouts scored by the judge: (iteration,
    /// mean score), the over-optimisation plot's judged half.
    #[serde(default, skip_serializing_if = "plots::RolloutGold::is_empty")]
    pub rollout_judge_scores: plots::RolloutGold,
}

/// One prompt and every policy's answer to it (the `answers.jsonl` line).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptAnswers {
    pub prompt: String,
    pub answers: Vec<LabelledAnswer>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabelledAnswer {
    pub policy: String,
    pub answer: String,
    pub gold: Option<f64>,
    pub reward: Option<f64>,
}

/// Everything `rlhf eval` computes: the report and each prompt's answers.
#[derive(Debug)]
pub struct Evaluation {
    pub report: Report,
    pub answers: Vec<PromptAnswers>,
    /// The run's stages, as read for the report (the plots use them).
    pub stages: Vec<FinishedStage>,
    /// The run folder the report goes into.
    pub run_dir: PathBuf,
}

/// The eval prompts' file: given, else the last PPO stage's, else an SFT
/// stage's `eval_prompts`.
fn prompts_file(stages: &[FinishedStage], given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_owned());
    }
    stages
        .iter()
        .rev()
        .filter(|s| s.optimises_scorer())
        .chain(stages.iter().filter(|s| s.is_policy() && !s.optimises_scorer()))
        .find_map(|s| s.path_setting("eval_prompts"))
        .context("no stage of this run names eval_prompts; give --prompts FILE (JSONL with a \"prompt\" field)")
}

/// The reference policy: the checkpoint the PPO stages were anchored to,
/// else the first SFT stage.
fn reference_stage(stages: &[FinishedStage]) -> anyhow::Result<&FinishedStage> {
    let policies: Vec<&FinishedStage> = stages.iter().filter(|s| s.is_policy()).collect();
    let named = stages
        .iter()
        .filter(|s| s.optimises_scorer())
        .find_map(|s| s.path_setting("reference"))
        .and_then(|r| policies.iter().find(|s| s.checkpoint() == r).copied());
    named
        .or_else(|| {
            policies
                .iter()
                .find(|s| s.kind().is_some_and(|k| k.loop_role == LoopRole::None))
                .copied()
        })
        .or_else(|| policies.first().copied())
        .context("this run has no finished policy (SFT, PPO, DPO or GRPO stage) to evaluate")
}

/// The prompts and, where the file has a `family` column (the bundled
/// task's does), each prompt's family.
fn read_prompts(
    path: &Path,
    max: Option<usize>,
    chat: &rlhf_datasets::schema::ChatTemplate,
) -> anyhow::Result<(Vec<String>, Option<Vec<String>>)> {
    use rlhf_datasets::load::{read_table, string_column, DataError};
    let table = read_table(path)?;
    let mut prompts = rlhf_datasets::schema::prompt_texts(&table, path, chat)?;
    let mut families = match string_column(&table, path, "family", "strings") {
        Ok(f) => Some(f),
        Err(DataError::MissingColumn { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    if let Some(m) = max {
        prompts.truncate(m);
        if let Some(f) = &mut families {
            f.truncate(m);
        }
    }
    if prompts.is_empty() {
        bail!("{}: no prompts to evaluate", path.display());
    }
    Ok((prompts, families))
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for x in xs {
        sum += x;
        n += 1;
    }
    (n > 0).then(|| sum / n as f64)
}

/// The models of a run that `rlhf eval` reads.
struct RunModels<'a> {
    reference_stage: &'a FinishedStage,
    reference: Model,
    reward_stage: Option<&'a FinishedStage>,
    reward_model: Option<Model>,
}

fn load_model(s: &FinishedStage, device: Device) -> anyhow::Result<Model> {
    Model::load(&s.checkpoint(), HeadChoice::AsSaved, device)
        .with_context(|| format!("loading {} ({})", s.label, s.checkpoint().display()))
}

/// Evaluates every finished stage of `run_dir`.
pub fn evaluate_run(
    run_dir: &Path,
    opts: &EvalOptions,
    device: Device,
) -> anyhow::Result<Evaluation> {
    let mut stages = finished_stages(run_dir)?;
    // The run's own latest reward model scores every policy, others' too.
    let own = stages.len();
    stages.extend(finished::stages_of_other_runs(&stages, &opts.with_runs)?);
    let run_dirs: Vec<&Path> = std::iter::once(run_dir)
        .chain(opts.with_runs.iter().map(PathBuf::as_path))
        .collect();
    let times = finished::stage_times(&run_dirs);
    let prompts_path = prompts_file(&stages, opts.prompts.as_deref())?;
    let reference_stage = reference_stage(&stages)?;
    let reference = load_model(reference_stage, device)?;
    // Prompts in the policies' chat format (their tokenizer is SFT's).
    let chat = rlhf_datasets::schema::ChatTemplate::for_tokenizer(&reference.tokenizer);
    let (prompts, families) = read_prompts(&prompts_path, opts.max_prompts, &chat)?;
    let references = match opts.checker {
        Some(_) => Some(references(&prompts_path, prompts.len())?),
        None => None,
    };
    let gold = judge::Gold::choose(run_dir, opts.judge.clone(), &stages, device)?;
    // The latest reward model scores every policy; a held-out judge is
    // none of theirs.
    let reward_stage = stages[..own]
        .iter()
        .rev()
        .find(|s| s.is_reward_model() && gold.stage() != Some(s.label.as_str()));
    let models = RunModels {
        reference_stage,
        reference,
        reward_stage,
        reward_model: reward_stage.map(|s| load_model(s, device)).transpose()?,
    };
    let policy_stages = policies_after_reference(&stages, reference_stage);
    let task_judge = gold.while_answering();
    let (mut all_answers, kls, verified) = answer_all(
        &policy_stages,
        &models,
        (&prompts, references.as_deref()),
        opts,
        task_judge.as_ref(),
        device,
    )?;
    gold.score(&prompts, &mut all_answers, &opts.settings, device)?;
    let measured = Measured {
        answers: &all_answers,
        kls,
        verified,
        families: families.as_deref(),
        exactness: gold.scores_exactness(),
    };
    let mut policies = policy_rows(&policy_stages, measured, run_dir, &times);
    if let Some(cfg) = &opts.reward_program {
        let scored = program_scores(cfg, run_dir, &prompts, &prompts_path, &all_answers)?;
        for (row, score) in policies.iter_mut().zip(scored) {
            row.program_score = Some(score);
        }
    }
    let reward_models = reward_rows(&stages, opts, run_dir, device)?;
    let answers = prompt_answers(&prompts, &all_answers);
    let rollout_judge_scores = plots::rollout_gold(&stages, |pairs| {
        gold.score_pairs(pairs, &opts.settings, device)
    })?;
    Ok(Evaluation {
        report: Report {
            run: PathBuf::from(run_dir.file_name().unwrap_or(run_dir.as_os_str())),
            prompts_file: relative_to(&prompts_path, run_dir),
            prompts: prompts.len(),
            reference: models.reference_stage.label.clone(),
            reward_model: models.reward_stage.map(|s| s.label.clone()),
            settings: opts.settings.clone(),
            policies,
            reward_models,
            rounds: crate::run_folder::read_log_lines(&run_dir.join(crate::run_folder::ROUNDS_LOG)),
            plots: vec![],
            warnings: warnings(&stages, models.reward_stage),
            flagged: flagged(&stages),
            sft_baselines: sft_baselines(&stages),
            judge: gold.shown(),
            gold_length_correlation: length_correlation(&all_answers, |a| a.gold.clone()),
            reward_length_correlation: length_correlation(&all_answers, |a| match &a.reward {
                Some(r) => r.iter().map(|&x| Some(x)).collect(),
                None => vec![],
            }),
            examples: answers.iter().take(EXAMPLES).cloned().collect(),
            rollout_judge_scores,
        },
        answers,
        stages,
        run_dir: run_dir.to_owned(),
    })
}

/// The reference first, then every other policy stage in order.
fn policies_after_reference<'a>(
    stages: &'a [FinishedStage],
    reference: &'a FinishedStage,
) -> Vec<&'a FinishedStage> {
    let others = stages
        .iter()
        .filter(|s| s.is_policy() && s.label != reference.label);
    std::iter::once(reference).chain(others).collect()
}

/// A policy's label and its answers.
type Labelled = (String, PolicyAnswers);

/// What was measured of every policy, in the order of its stages.
struct Measured<'a> {
    answers: &'a [Labelled],
    kls: Vec<Option<f64>>,
    verified: Vec<Option<Verifiable>>,
    families: Option<&'a [String]>,
    /// The gold judge scores exactness (only the bundled task's does).
    exactness: bool,
}

/// The report's row of each policy stage.
fn policy_rows(
    stages: &[&FinishedStage],
    m: Measured,
    run_dir: &Path,
    times: &BTreeMap<String, (f64, Vec<String>)>,
) -> Vec<PolicyRow> {
    let base = &m.answers[0].1;
    let rows = stages.iter().zip(m.answers).zip(m.kls).zip(m.verified);
    rows.map(|(((stage, (_, answers)), kl), verified)| {
        let mut row = policy_row(stage, answers, base, m.families, kl);
        row.verifiable = verified;
        if !m.exactness {
            row.exact = None;
        }
        row.checkpoint = relative_to(&row.checkpoint, run_dir);
        row.seconds = Some(stage.manifest.seconds);
        row.route_seconds = finished::route_seconds(&stage.manifest.key, times);
        row
    })
    .collect()
}

/// Every policy's answers, KL to the reference and checked accuracy.
type Answered = (Vec<Labelled>, Vec<Option<f64>>, Vec<Option<Verifiable>>);

/// Every policy's greedy answers to `prompts`, scored by the task's judge
/// (where it judges) and the run's reward model, its KL to the reference
/// (unless skipped), and, given the prompts' reference answers, what the
/// checker accepts.
fn answer_all(
    policy_stages: &[&FinishedStage],
    models: &RunModels,
    (prompts, references): (&[String], Option<&[String]>),
    opts: &EvalOptions,
    task_judge: Option<&rlhf_stages::eval::answer::Judge>,
    device: Device,
) -> anyhow::Result<Answered> {
    let mut all_answers = Vec::new();
    let (mut kls, mut verified) = (Vec::new(), Vec::new());
    for stage in policy_stages {
        tracing::info!("evaluating {} on {} prompts", stage.label, prompts.len());
        let model = load_model(stage, device)?;
        let answers = eval::answer_and_score(
            &model,
            models.reward_model.as_ref(),
            task_judge,
            prompts,
            &opts.settings,
            device,
        )?;
        kls.push(match opts.skip_kl {
            true => None,
            false => Some(eval::kl_to_reference(
                &model,
                &models.reference,
                prompts,
                &opts.settings,
                device,
            )?),
        });
        verified.push(match (references, &opts.checker) {
            (Some(refs), Some((checker, k))) => Some(rlhf_stages::eval::verifiable::verifiable(
                checker,
                &model,
                prompts,
                refs,
                &answers.answers,
                *k,
                &opts.settings,
                device,
            )?),
            _ => None,
        });
        all_answers.push((stage.label.clone(), answers));
        drop(model);
        rlhf_stages::memory::release_free_memory();
    }
    Ok((all_answers, kls, verified))
}

/// Every policy's greedy answers scored by the reward program or server
/// of `cfg` (run in this folder; its cache in `RUN/report/`), with the
/// prompts' `answer` column where they have one.
fn program_scores(
    cfg: &rlhf_stages::rl::reward::RewardConfig,
    run_dir: &Path,
    prompts: &[String],
    prompts_path: &Path,
    all: &[Labelled],
) -> anyhow::Result<Vec<ProgramScore>> {
    use rlhf_stages::programs::ScoreItem;
    let table = rlhf_datasets::load::read_table(prompts_path)?;
    let answers = rlhf_datasets::load::optional_text_column(&table, prompts_path, "answer")
        .unwrap_or(None)
        .unwrap_or_default();
    let cache = run_dir.join(REPORT_DIR);
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let here = std::env::current_dir().context("the current folder")?;
    let runner = crate::label::programs::reward_runner(here, "--reward-timeout");
    let scorer = rlhf_stages::rl::reward::ProgramScorer::new(cfg, Some(runner), &cache)?;
    let shown = match (&cfg.command, &cfg.url) {
        (Some(c), _) => c.join(" "),
        (None, Some(u)) => u.clone(),
        (None, None) => String::new(),
    };
    all.iter()
        .map(|(label, policy)| {
            let items: Vec<ScoreItem> = prompts
                .iter()
                .zip(&policy.answers)
                .enumerate()
                .map(|(i, (p, a))| ScoreItem {
                    prompt: p.clone(),
                    response: a.clone(),
                    answer: answers.get(i).cloned().flatten(),
                })
                .collect();
            tracing::info!("scoring {label}'s answers with {shown}");
            let scored = scorer.scores(&items)?;
            let mut record = serde_json::json!({});
            let parts: Vec<_> = scored.iter().map(|s| s.components.clone()).collect();
            rlhf_stages::rl::reward::record_components(&parts, &mut record);
            let components = record
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k.strip_prefix("reward/")?.to_owned(), v.as_f64()?)))
                .collect();
            Ok(ProgramScore {
                scorer: shown.clone(),
                mean: mean(scored.iter().map(|s| s.score)).unwrap_or(0.0),
                components,
            })
        })
        .collect()
}

/// Each prompt's reference answer (the `answer` column) for the checker.
fn references(path: &Path, n: usize) -> anyhow::Result<Vec<String>> {
    let table = rlhf_datasets::load::read_table(path)?;
    let Some(answers) = rlhf_datasets::load::optional_text_column(&table, path, "answer")? else {
        bail!(
            "{}: --checker needs each prompt's reference answer in an `answer` column",
            path.display()
        );
    };
    answers
        .into_iter()
        .take(n)
        .enumerate()
        .map(|(i, a)| {
            a.ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: row {}: `answer` is missing (null)",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// The stages whose summaries carry flags (did not learn), in order.
fn flagged(stages: &[FinishedStage]) -> Vec<FlaggedStage> {
    stages
        .iter()
        .map(|s| FlaggedStage {
            stage: s.label.clone(),
            flags: crate::run_folder::summary_flags(&s.manifest.summary),
        })
        .filter(|f| !f.flags.is_empty())
        .collect()
}

/// Each SFT stage's numbers against its baselines, from its summary.
fn sft_baselines(stages: &[FinishedStage]) -> Vec<SftBaselineRow> {
    let sft = <rlhf_stages::kinds::sft::SftConfig as rlhf_stages::kind::KindConfig>::KIND;
    stages
        .iter()
        .filter(|s| s.manifest.kind == sft)
        .map(|s| {
            let summary = &s.manifest.summary;
            SftBaselineRow {
                stage: s.label.clone(),
                eval_loss: summary["final_eval_loss"].as_f64(),
                frequency_loss: summary["baselines"]["frequency_loss"].as_f64(),
                eval_gold_before: summary["baselines"]["eval_gold_before"].as_f64(),
                eval_gold_after: summary["eval_gold_score"].as_f64(),
            }
        })
        .collect()
}

/// A reward model older than the run's last round, which scores the
/// answers in its stead.
fn warnings(stages: &[FinishedStage], reward_stage: Option<&FinishedStage>) -> Vec<String> {
    let mut out = Vec::new();
    let last_round = stages.iter().map(|s| s.round).max().unwrap_or(0);
    if let Some(rm) = reward_stage.filter(|rm| rm.round < last_round) {
        let w = format!(
            "round-{last_round} has no finished reward model; answers are scored by {}, the latest one found",
            rm.label
        );
        tracing::warn!("{w}");
        out.push(w);
    }
    out
}

/// A policy's line of the report: its answers' scores and its tallies
/// against the reference's answers (`base`), overall and by family.
fn policy_row(
    stage: &FinishedStage,
    answers: &PolicyAnswers,
    base: &PolicyAnswers,
    families: Option<&[String]>,
    kl: Option<f64>,
) -> PolicyRow {
    let by_family = families
        .map(|f| {
            let names: std::collections::BTreeSet<&String> = f.iter().collect();
            names
                .into_iter()
                .filter_map(|name| {
                    let keep: Vec<bool> = f.iter().map(|x| x == name).collect();
                    Some((name.clone(), gold_tally(answers, base, Some(&keep))?))
                })
                .collect()
        })
        .unwrap_or_default();
    let reward_vs = match (&answers.reward, &base.reward) {
        (Some(ours), Some(theirs)) => Some(Tally::of(ours, theirs, 1e-6).into()),
        _ => None,
    };
    let n = answers.answers.len().max(1) as f64;
    PolicyRow {
        label: stage.label.clone(),
        round: stage.round,
        checkpoint: stage.checkpoint(),
        gold_score: eval::mean_present(&answers.gold),
        exact: mean(
            answers
                .gold
                .iter()
                .flatten()
                .map(|&g| f64::from(u8::from(g == 1.0))),
        ),
        gold_vs_reference: gold_tally(answers, base, None),
        gold_vs_reference_by_family: by_family,
        reward_score: answers
            .reward
            .as_ref()
            .and_then(|r| mean(r.iter().copied())),
        reward_vs_reference: reward_vs,
        kl_to_reference: kl,
        answer_tokens: answers.answer_tokens.iter().sum::<usize>() as f64 / n,
        finished: answers.finished.iter().filter(|&&f| f).count() as f64 / n,
        verifiable: None,
        program_score: None,
        seconds: None,
        route_seconds: None,
    }
}

/// Each reward model's held-out pairwise accuracy.
fn reward_rows(
    stages: &[FinishedStage],
    opts: &EvalOptions,
    run_dir: &Path,
    device: Device,
) -> anyhow::Result<Vec<RewardRow>> {
    let mut rows = Vec::new();
    for stage in stages.iter().filter(|s| s.is_reward_model()) {
        let data = opts
            .preferences
            .clone()
            .or_else(|| stage.path_setting("eval_data"));
        let model = load_model(stage, device)?;
        let max_len = stage.manifest.config["stage"]["max_len"]
            .as_u64()
            .unwrap_or(model.net.n_positions() as u64) as usize;
        let result = match &data {
            Some(path) => rlhf_stages::kinds::reward::evaluate_file(
                &model,
                path,
                max_len,
                opts.settings.batch_size,
                device,
            )?,
            None => None,
        };
        rows.push(RewardRow {
            label: stage.label.clone(),
            round: stage.round,
            eval_data: data.map(|d| relative_to(&d, run_dir)),
            accuracy: result.as_ref().map(|r| r.accuracy),
            pairs: result.as_ref().map_or(0, |r| r.pairs),
            loss: result.as_ref().map(|r| r.loss),
            train_groups: stage.manifest.summary["train_groups"].as_u64(),
            length_accuracy: result.as_ref().and_then(|r| r.length_accuracy),
        });
    }
    Ok(rows)
}

/// How many prompts' answers the report shows side by side.
const EXAMPLES: usize = 10;

/// Pearson's correlation of a score with answer length (tokens) over
/// every policy's answers that have the score: how much a judge or a
/// reward model pays for length, the usual reward hack. `None` for fewer
/// than three answers or no spread.
fn length_correlation(
    all: &[(String, PolicyAnswers)],
    score: impl Fn(&PolicyAnswers) -> Vec<Option<f64>>,
) -> Option<f64> {
    let (xs, ys): (Vec<f64>, Vec<f64>) = all
        .iter()
        .flat_map(|(_, a)| {
            let tokens = a.answer_tokens.iter().map(|&t| t as f64);
            score(a).into_iter().zip(tokens).collect::<Vec<_>>()
        })
        .filter_map(|(s, t)| Some((s?, t)))
        .unzip();
    pearson(&xs, &ys)
}

fn pearson(xs: &[f64], ys: &[f64]) -> Option<f64> {
    let n = xs.len() as f64;
    if xs.len() < 3 {
        return None;
    }
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let cov: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let vx: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    let vy: f64 = ys.iter().map(|y| (y - my).powi(2)).sum();
    (vx > 0.0 && vy > 0.0).then(|| cov / (vx * vy).sqrt())
}

/// Every policy's answer to each prompt, prompt by prompt.
fn prompt_answers(prompts: &[String], all: &[(String, PolicyAnswers)]) -> Vec<PromptAnswers> {
    (0..prompts.len())
        .map(|i| PromptAnswers {
            prompt: prompts[i].clone(),
            answers: all
                .iter()
                .map(|(label, a)| LabelledAnswer {
                    policy: label.clone(),
                    answer: a.answers[i].clone(),
                    gold: a.gold[i],
                    reward: a.reward.as_ref().map(|r| r[i]),
                })
                .collect(),
        })
        .collect()
}

/// Gold comparisons over the prompts the judge knows (and `keep` allows).
fn gold_tally(
    ours: &PolicyAnswers,
    theirs: &PolicyAnswers,
    keep: Option<&[bool]>,
) -> Option<VersusReference> {
    let (a, b): (Vec<f64>, Vec<f64>) = ours
        .gold
        .iter()
        .zip(&theirs.gold)
        .enumerate()
        .filter(|(i, _)| keep.is_none_or(|k| k[*i]))
        .filter_map(|(_, (a, b))| Some(((*a)?, (*b)?)))
        .unzip();
    (!a.is_empty()).then(|| Tally::of(&a, &b, 1e-9).into())
}

/// Writes `report.json`, `report.md`, `answers.jsonl` and the plots into
/// `<run>/report/`; returns the folder.
pub fn write_report(evaluation: &mut Evaluation) -> anyhow::Result<PathBuf> {
    let dir = evaluation.run_dir.join(REPORT_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    evaluation.report.plots = plots::write_all(
        &evaluation.stages,
        &evaluation.report.rollout_judge_scores,
        &dir,
    )?;
    let json = serde_json::to_string_pretty(&evaluation.report)?;
    atomic::write_file(&dir.join(REPORT_JSON), json.as_bytes())?;
    atomic::write_file(
        &dir.join(REPORT_MD),
        markdown::render(&evaluation.report).as_bytes(),
    )?;
    let mut lines = String::new();
    for a in &evaluation.answers {
        lines.push_str(&serde_json::to_string(a)?);
        lines.push('\n');
    }
    atomic::write_file(&dir.join(ANSWERS_FILE), lines.as_bytes())?;
    Ok(dir)
}
