//! The checks of a whole experiment before any stage runs: names, the
//! loop, the labeller, time limits.

use super::*;

/// Most seeds one experiment runs.
const MAX_SEEDS: usize = 100;

/// `seeds:` lists distinct seeds, and no stage fixes its own: every seed's
/// run must differ in every stage, or they would share it.
pub(super) fn check_seeds(spec: &ExperimentFile) -> Result<(), Problem> {
    let seeds = &spec.seeds;
    if seeds.is_empty() {
        return Ok(());
    }
    if seeds.len() > MAX_SEEDS {
        return Err(Problem::at_key(
            "seeds",
            format!("seeds: at most {MAX_SEEDS} seeds, got {}", seeds.len()),
        ));
    }
    let distinct: BTreeSet<&u64> = seeds.iter().collect();
    if distinct.len() < seeds.len() {
        return Err(Problem::at_key(
            "seeds",
            format!("seeds: {seeds:?} names a seed twice; each seed is one run"),
        ));
    }
    if let Some((name, s)) = spec
        .stages
        .iter()
        .find_map(|(n, s)| Some((n, (*s.config.clone_box().seed_mut())?)))
    {
        return Err(Problem::at_key(
            name,
            format!(
                "stages.{name}.seed: {s} would be the same in every run of `seeds:`; remove it (each run gives every stage its seed)"
            ),
        ));
    }
    Ok(())
}

/// The names that become folders, and the run-wide settings' ranges;
/// each problem names the key whose line it is at.
pub(super) fn check_names_and_settings(spec: &ExperimentFile) -> Result<(), Problem> {
    if !is_folder_name(&spec.name) {
        return Err(Problem::at_key(
            "name",
            format!(
                "name \"{}\" {FOLDER_NAME} (it names the run folder)",
                spec.name
            ),
        ));
    }
    if spec.stages.is_empty() {
        return Err("stages: no stages defined".into());
    }
    if let Some(bad) = spec
        .stages
        .keys()
        .find(|n| !is_folder_name(n) && !crate::experiment::sweep::is_variant_name(n))
    {
        return Err(Problem::at_key(
            bad,
            format!("stages: the stage name \"{bad}\" {FOLDER_NAME} (it names the stage's folder)"),
        ));
    }
    if let Some(taken) = spec
        .stages
        .keys()
        .find(|n| crate::run_folder::is_reserved(n))
    {
        return Err(Problem::at_key(
            taken,
            format!(
                "stages: the stage name \"{taken}\" is taken by the run folder's own files \
                 (report/, round-N/, seed-N/, rounds.jsonl, plan.json, hidden files); choose another"
            ),
        ));
    }
    check_judge(&spec.judge)?;
    spec.slurm.check()?;
    if !(1..=1024).contains(&spec.max_parallel) {
        return Err(Problem::at_key(
            "max_parallel",
            format!(
                "max_parallel: must be in [1, 1024] (stages run at once), got {}",
                spec.max_parallel
            ),
        ));
    }
    let d = &spec.distributed;
    if !(1..=1024).contains(&d.nproc_per_node) || !(1..=86_400).contains(&d.timeout_seconds) {
        return Err(Problem::at_key(
            "distributed",
            format!(
                "distributed: nproc_per_node must be in [1, 1024] and timeout_seconds in [1, 86400], got {} and {}",
                d.nproc_per_node, d.timeout_seconds
            ),
        ));
    }
    if let Some(n) = spec.threads {
        crate::threads::check(n, "threads")
            .map_err(|e| Problem::at_key("threads", e.to_string()))?;
    }
    Ok(())
}

/// A judge program's command and time limit.
fn check_judge(judge: &JudgeSpec) -> Result<(), Problem> {
    let JudgeSpec::Command {
        command,
        timeout_seconds,
    } = judge
    else {
        return Ok(());
    };
    if command.is_empty() || command[0].is_empty() {
        return Err(Problem::at_key(
            "judge",
            "judge.command: name the program to run, e.g. [python3, judge.py]".into(),
        ));
    }
    if !(*timeout_seconds > 0.0 && *timeout_seconds <= 1e9) {
        return Err(Problem::at_key(
            "judge",
            format!(
                "judge.timeout_seconds: must be in (0, 1e9] seconds, got {}",
                rlhf_stages::check::shown(*timeout_seconds)
            ),
        ));
    }
    Ok(())
}

/// A reward-model judge names a reward stage that no stage reads: what
/// judges the policies must be something none of them learnt from.
pub(super) fn check_held_out_judge(
    spec: &ExperimentFile,
    deps: &BTreeMap<String, BTreeSet<String>>,
) -> Result<(), Problem> {
    let JudgeSpec::RewardModel { stage } = &spec.judge else {
        return Ok(());
    };
    let at = |message: String| Problem::at_key("judge", message);
    let Some(file) = spec.stages.get(stage) else {
        let names: Vec<&str> = spec.stages.keys().map(String::as_str).collect();
        return Err(at(format!(
            "judge.stage: no stage named \"{stage}\"; the file defines: {}",
            names.join(", ")
        )));
    };
    let produces = kind_named(file.kind()).map(|k| k.produces);
    if produces != Some(rlhf_stages::kind::Produces::RewardModel) {
        return Err(at(format!(
            "judge.stage: {stage} is a {} stage; a judge is a reward model ({})",
            file.kind(),
            kinds_producing(rlhf_stages::kind::Produces::RewardModel)
        )));
    }
    if let Some((reader, _)) = deps.iter().find(|(_, up)| up.contains(stage)) {
        return Err(at(format!(
            "judge.stage: stage {reader} reads {stage}; a held-out judge must be a stage that nothing learns from or starts from"
        )));
    }
    Ok(())
}

/// A labeller's time limit: above 0, at most about 30 years (a longer
/// one would overflow the clock's arithmetic).
pub(super) fn check_timeout(seconds: f64) -> Result<(), String> {
    if seconds.is_finite() && seconds > 0.0 && seconds <= 1e9 {
        return Ok(());
    }
    Err(format!(
        "labeller.timeout_seconds must be in (0, 1e9], got {}",
        rlhf_stages::check::shown(seconds)
    ))
}

/// The kinds that play `role` in a loop, for messages: `ppo or grpo`.
pub(super) fn kinds_with_role(role: LoopRole) -> String {
    let names: Vec<&str> = rlhf_stages::kinds::all()
        .into_iter()
        .filter(|k| k.loop_role == role)
        .map(|k| k.name)
        .collect();
    names.join(" or ")
}

/// The kinds that produce `what`, for messages: `reward`.
fn kinds_producing(what: rlhf_stages::kind::Produces) -> String {
    let names: Vec<&str> = rlhf_stages::kinds::all()
        .into_iter()
        .filter(|k| k.produces == what)
        .map(|k| k.name)
        .collect();
    format!("kind {}", names.join(" or "))
}

/// The loop's settings, checked with the rest before any stage runs.
pub(super) fn check_loop(l: &LoopFile, stages: &BTreeMap<String, StageFile>) -> Result<(), String> {
    let kinds: Vec<&str> = l
        .repeat
        .iter()
        .map(|n| stages.get(n).map_or("missing", |s| s.kind()))
        .collect();
    let roles: Vec<Option<LoopRole>> = kinds
        .iter()
        .map(|k| rlhf_stages::kinds::kind(k).map(|k| k.loop_role))
        .collect();
    use LoopRole::{LearnsFromRankings, OptimisesScorer, Scorer};
    if !matches!(
        roles.as_slice(),
        [Some(Scorer), Some(OptimisesScorer)] | [Some(LearnsFromRankings)]
    ) {
        return Err(format!(
            "repeat must name a reward stage then a stage that optimises it ({}), or one stage that learns from rankings ({}), got {:?} (kinds {kinds:?})",
            kinds_with_role(OptimisesScorer),
            kinds_with_role(LearnsFromRankings),
            l.repeat
        ));
    }
    let dpo = l
        .repeat
        .first()
        .and_then(|n| stages.get(n)?.get::<rlhf_stages::kinds::dpo::DpoConfig>());
    if dpo.is_some_and(|d| d.policy.is_none()) {
        return Err(
            "repeat: [dpo] needs the dpo stage's `policy` (the model the rounds start from)".into(),
        );
    }
    // Each round points GRPO at its new reward model: no other scorer.
    let grpo = l
        .repeat
        .get(1)
        .and_then(|n| stages.get(n)?.get::<rlhf_stages::rl::grpo::GrpoConfig>());
    if grpo.is_some_and(|g| g.gold_reward || g.ranker_command.is_some() || g.reward.is_some()) {
        return Err("repeat: [rm, grpo] scores each round with the round's reward model; drop the grpo stage's `gold_reward`, `ranker_command` and `reward`".into());
    }
    let ppo = l
        .repeat
        .get(1)
        .and_then(|n| stages.get(n)?.get::<rlhf_stages::rl::ppo::PpoConfig>());
    if ppo.is_some_and(|p| p.reward.is_some()) {
        return Err("repeat: [rm, ppo] scores each round with the round's reward model; drop the ppo stage's `reward`".into());
    }
    // A round's folder holds its own `collect/` and `queue/` beside the
    // repeated stages.
    if let Some(taken) = l
        .repeat
        .iter()
        .find(|n| [COLLECT_KIND, crate::run_folder::QUEUE_DIR].contains(&n.as_str()))
    {
        return Err(format!(
            "repeat: the stage name \"{taken}\" is taken inside each round's folder (collect/, queue/); rename the stage"
        ));
    }
    for (name, value, lo, hi) in [
        ("rounds", l.rounds, 1, 10_000),
        ("k", l.k, 2, 1024),
        ("prompts_per_round", l.prompts_per_round, 1, 1 << 20),
    ] {
        if !(lo..=hi).contains(&value) {
            return Err(format!("{name} must be in [{lo}, {hi}], got {value}"));
        }
    }
    check_labeller(&l.labeller)?;
    l.sampling.validate().map_err(|e| e.to_string())?;
    if let Some(bad) = l
        .set
        .iter()
        .find(|o| !o.contains('=') || o.starts_with('='))
    {
        return Err(format!(
            "set: \"{bad}\" is not KEY=VALUE (e.g. \"stages.rm.epochs=1\")"
        ));
    }
    Ok(())
}

/// The loop's labeller: a program that exists, a web page's settings.
pub(super) fn check_labeller(labeller: &Labeller) -> Result<(), String> {
    if let Labeller::Command {
        command,
        timeout_seconds,
    } = labeller
    {
        let Some(program) = command.first() else {
            return Err("labeller.command is empty".into());
        };
        if !program_exists(program) {
            return Err(format!(
                "labeller.command: program \"{program}\" not found (neither a file nor on PATH)"
            ));
        }
        check_timeout(*timeout_seconds)?;
    }
    if let Labeller::Web {
        labels_per_group,
        bind,
        timeout_seconds,
        guidelines,
    } = labeller
    {
        if let Some(kind) = guidelines
            .as_deref()
            .and_then(rlhf_datasets::files::not_a_regular_file)
        {
            return Err(format!(
                "labeller.guidelines: {kind}, expected a Markdown file"
            ));
        }
        if !(1..=100).contains(labels_per_group) {
            return Err(format!(
                "labeller.labels_per_group must be in 1..=100, got {labels_per_group}"
            ));
        }
        if bind.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!(
                "labeller.bind: \"{bind}\" is not an address such as 127.0.0.1:8080"
            ));
        }
        check_timeout(*timeout_seconds)?;
    }
    Ok(())
}

/// Whether a command's program is a file (a path) or found on PATH.
pub(super) fn program_exists(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

pub(super) const FOLDER_NAME: &str = "must be one path component of at most 100 letters, digits, '-', '_' or '.', not empty, \".\" or \"..\"";

/// Whether a name can be a folder inside the run folder and nothing else.
pub fn is_folder_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}
