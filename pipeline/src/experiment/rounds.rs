//! `loop:` as stages. Each round becomes named stages of the plan, as a
//! sweep's values do: `round-N/collect` (sample the latest policy, have
//! the labeller rank its answers, add them to the rankings so far), then
//! the round's copies of the repeated stages (`round-N/rm`,
//! `round-N/ppo`, or `round-N/dpo`) with their paths pointed at the
//! round's data and models. The edges follow from those paths, so rounds
//! are keyed, cached, scheduled, shown by `rlhf plan` and rerun with
//! `--force`/`--only` like every other stage.

use super::*;

use rlhf_stages::kind::Kind;
use rlhf_stages::model::sample::SamplingConfig;
use rlhf_stages::train::FINAL_DIR;

/// `kind:` of a round's collection stage. The loop makes these; a file
/// cannot declare one.
pub const COLLECT_KIND: &str = "collect";

/// The rankings a collection stage leaves in its `checkpoint/`.
pub const PREFERENCES_FILE: &str = "preferences.parquet";

/// A round's collection: what `round-N/collect` samples, who ranks it,
/// and the rankings it adds to. It runs as `label::collect`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectConfig {
    pub round: usize,
    /// The policy whose answers are ranked (a checkpoint folder).
    pub policy: PathBuf,
    /// Every ranking so far: the first round's is the repeated stage's
    /// `data`, later rounds' the previous round's output.
    pub base: PathBuf,
    pub prompts: PathBuf,
    pub prompts_per_round: usize,
    pub k: usize,
    pub labeller: Labeller,
    pub sampling: SamplingConfig,
    /// A web labeller's queue: beside the stage folder, not in it, so that
    /// people's labels outlive a rerun of the stage.
    pub queue: PathBuf,
    pub seed: Option<u64>,
}

/// The collection kind, for parsing a planned `round-N/collect`.
pub static COLLECT: Kind = Kind::of::<CollectConfig>();

/// Kind `name`: a registered one, or the loop's collection.
pub fn kind_named(name: &str) -> Option<&'static Kind> {
    rlhf_stages::kinds::kind(name).or((name == COLLECT_KIND).then_some(&COLLECT))
}

/// The round's rankings file inside a collection stage's folder.
fn preferences_of(collect_dir: &Path) -> PathBuf {
    collect_dir.join(FINAL_DIR).join(PREFERENCES_FILE)
}

/// Adds each round's stages to `spec.stages` and their edges to `deps`.
pub(super) fn expand(
    spec: &mut ExperimentFile,
    deps: &mut BTreeMap<String, BTreeSet<String>>,
    run_dir: &Path,
    base: &Path,
) -> Result<(), String> {
    let Some(l) = spec.rounds.clone() else {
        return Ok(());
    };
    let checkpoint = |name: &str| super::paths::stage_checkpoint(run_dir, name);
    let (scorer, trained) = match l.repeat.as_slice() {
        [rm, ppo] => (Some(rm.clone()), ppo.clone()),
        [dpo] => (None, dpo.clone()),
        _ => unreachable!("check_loop allows one or two repeated stages"),
    };
    check_round_settings(&l)?;
    let reference = path_of(&spec.stages[&trained], "reference")
        .or_else(|| path_of(&spec.stages[&trained], "policy"))
        .ok_or_else(|| format!("repeat: stage {trained} has no `policy` to start rounds from"))?;
    let ranked = scorer.as_ref().unwrap_or(&trained);
    let mut prefs = path_of(&spec.stages[ranked], "data")
        .ok_or_else(|| format!("repeat: stage {ranked} has no `data` of rankings"))?;
    let scorer_init = scorer
        .as_ref()
        .and_then(|s| path_of(&spec.stages[s], "init"));
    let (mut policy, mut last_scorer) = (trained.clone(), scorer.clone());
    let mut added = Vec::new();
    for round in 1..=l.rounds {
        let collect = crate::run_folder::round_stage(round, COLLECT_KIND);
        let config = CollectConfig {
            round,
            policy: checkpoint(&policy),
            base: prefs.clone(),
            prompts: l.prompts.clone(),
            prompts_per_round: l.prompts_per_round,
            k: l.k,
            labeller: l.labeller.clone(),
            sampling: l.sampling.clone(),
            queue: run_dir
                .join(crate::run_folder::round_folder(round))
                .join(crate::run_folder::QUEUE_DIR),
            seed: Some(spec.seed),
        };
        let collect_stage = StageFile {
            config: Box::new(config),
            threads: None,
            // Sampled and ranked here, where a web labeller's page is served.
            executor: Some(ExecutorKind::Local),
            slurm: None,
        };
        spec.stages.insert(collect.clone(), collect_stage);
        added.push(collect.clone());
        let round_prefs = preferences_of(&run_dir.join(&collect));
        let start = match l.policy_init {
            PolicyInit::Previous => checkpoint(&policy),
            PolicyInit::Reference => reference.clone(),
        };
        let mut copy = RoundCopy {
            spec,
            sets: &l.set,
            run_dir,
            base,
        };
        let mut fields: Vec<(&str, Option<PathBuf>)> = vec![
            ("policy", Some(start)),
            ("reference", Some(reference.clone())),
        ];
        if let Some(s) = &scorer {
            let init = match l.reward_init {
                RewardInit::Previous => last_scorer.as_deref().map(checkpoint),
                RewardInit::Stage => scorer_init.clone(),
            };
            let fitted = [("data", Some(round_prefs.clone())), ("init", init)];
            let name = copy.insert(round, s, &fitted)?;
            fields.push(("reward_model", Some(checkpoint(&name))));
            added.push(name.clone());
            last_scorer = Some(name);
        } else {
            fields.push(("data", Some(round_prefs.clone())));
        }
        let name = copy.insert(round, &trained, &fields)?;
        added.push(name.clone());
        (policy, prefs) = (name, round_prefs);
    }
    for name in added {
        let edges = edges(&spec.stages, &name, run_dir);
        deps.insert(name, edges);
    }
    Ok(())
}

/// `loop.set` changes the repeated stages' settings only.
fn check_round_settings(l: &LoopFile) -> Result<(), String> {
    for set in &l.set {
        let key = set.split_once('=').map_or(set.as_str(), |(k, _)| k);
        let ours = l
            .repeat
            .iter()
            .any(|s| key.starts_with(&format!("stages.{s}.")));
        if !ours {
            let names: Vec<String> = l.repeat.iter().map(|s| format!("stages.{s}.…")).collect();
            return Err(format!(
                "set: `{set}`: a round's setting belongs to a repeated stage ({})",
                names.join(", ")
            ));
        }
    }
    Ok(())
}

/// The value of path setting `field` of a stage, if it has one.
fn path_of(stage: &StageFile, field: &str) -> Option<PathBuf> {
    let mut config = stage.config.clone();
    let value = config
        .paths()
        .into_iter()
        .find(|p| p.field == field)
        .and_then(|p| p.get().cloned());
    value
}

/// Makes a round's copy of a repeated stage.
struct RoundCopy<'a> {
    spec: &'a mut ExperimentFile,
    sets: &'a [String],
    run_dir: &'a Path,
    base: &'a Path,
}

impl RoundCopy<'_> {
    /// Adds `round-N/<name>`: stage `name` with the loop's `set` applied
    /// and `fields` (path settings) pointed at the round's files. Returns
    /// its name.
    fn insert(
        &mut self,
        round: usize,
        name: &str,
        fields: &[(&str, Option<PathBuf>)],
    ) -> Result<String, String> {
        let label = crate::run_folder::round_stage(round, name);
        let original = &self.spec.stages[name];
        let mut stage = self.with_sets(name, original)?;
        let mut missing = None;
        {
            let mut paths = stage.config.paths();
            for (field, value) in fields {
                match paths.iter_mut().find(|p| p.field == *field) {
                    // Unset (a reward stage's own `init`, which it has
                    // none of): the copy keeps the stage's.
                    Some(p) => value.iter().for_each(|v| p.set(v.clone())),
                    None if *field == "reference" => {}
                    None => missing = Some(*field),
                }
            }
        }
        if let Some(field) = missing {
            return Err(format!(
                "repeat: stage {name} (kind {}) has no `{field}` for its rounds to set",
                original.kind()
            ));
        }
        stage
            .config
            .validate()
            .map_err(|e| format!("{label} (with loop.set): {e}"))?;
        self.spec.stages.insert(label.clone(), stage);
        Ok(label)
    }

    /// Stage `name` with the `stages.<name>.…` entries of `loop.set`
    /// applied; a path they set is placed as the file's paths are.
    fn with_sets(&self, name: &str, original: &StageFile) -> Result<StageFile, String> {
        let prefix = format!("stages.{name}.");
        let sets: Vec<&str> = self
            .sets
            .iter()
            .filter_map(|s| s.strip_prefix(&prefix))
            .collect();
        if sets.is_empty() {
            return Ok(original.clone());
        }
        let mut value =
            serde_norway::to_value(original.config.to_json()).map_err(|e| format!("set: {e}"))?;
        if let (Some(map), Some(threads)) = (value.as_mapping_mut(), original.threads) {
            map.insert("threads".into(), (threads as u64).into());
        }
        for s in &sets {
            apply_override(&mut value, s).map_err(|m| format!("set: `{prefix}{s}`: {m}"))?;
        }
        let mut stage = parse_stage(value).map_err(|m| format!("set: stages.{name}{m}"))?;
        stage.executor = stage.executor.or(original.executor);
        stage.slurm = stage.slurm.or_else(|| original.slurm.clone());
        let names: Vec<String> = self.spec.stages.keys().cloned().collect();
        let places = Places {
            stage: name,
            stages: &names,
            run_dir: self.run_dir,
            base: self.base,
        };
        places
            .resolve_changed(&mut *stage.config, &*original.config)
            .map_err(|m| format!("set: {m}"))?;
        Ok(stage)
    }
}

/// The stages `name` reads: those whose checkpoint its model settings
/// name, and those whose folder holds a data file it reads.
fn edges(stages: &BTreeMap<String, StageFile>, name: &str, run_dir: &Path) -> BTreeSet<String> {
    let mut config = stages[name].config.clone();
    let read: Vec<PathBuf> = config
        .paths()
        .iter()
        .filter_map(|p| p.get().cloned())
        .collect();
    stages
        .keys()
        .filter(|other| *other != name)
        .filter(|other| {
            let dir = run_dir.join(crate::experiment::sweep::folder_of(other));
            read.iter().any(|p| p.starts_with(&dir))
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rlhf_stages::kinds::reward::RewardConfig;
    use rlhf_stages::rl::ppo::PpoConfig;

    use crate::experiment::tests::write;

    const LOOP: &str = "name: t\nseed: 5\nstages:\n  sft: {kind: sft, data: a.jsonl}\n  rm: {kind: reward, init: sft, data: b.jsonl, epochs: 3}\n  ppo: {kind: ppo, policy: sft, reward_model: rm, prompts: c.jsonl}\nloop: {repeat: [rm, ppo], rounds: 2, prompts: c.jsonl, k: 3, set: [\"stages.rm.epochs=1\"]}\n";

    /// Each round is three stages whose paths point at the round before
    /// and whose edges follow from them; `loop.set` changes the rounds'
    /// copies only.
    #[test]
    fn a_loop_becomes_named_stages_with_their_paths_and_edges() {
        let d = tempfile::tempdir().unwrap();
        let e = Experiment::load(&write(d.path(), LOOP), &[]).unwrap();
        let run = d.path().join("runs/t");
        let ckpt = |s: &str| run.join(s).join(FINAL_DIR);
        let prefs =
            |r: usize| run.join(format!("round-{r}/collect/checkpoint/preferences.parquet"));
        let c: &CollectConfig = e.stage("round-2/collect").unwrap().get().unwrap();
        assert_eq!((c.round, c.k, c.seed), (2, 3, Some(5)));
        assert_eq!(c.policy, ckpt("round-1/ppo"));
        assert_eq!(c.base, prefs(1));
        assert_eq!(c.queue, run.join("round-2/queue"));
        let first: &CollectConfig = e.stage("round-1/collect").unwrap().get().unwrap();
        assert_eq!(first.base, d.path().join("b.jsonl"));
        assert_eq!(first.policy, ckpt("ppo"));
        let rm: &RewardConfig = e.stage("round-2/rm").unwrap().get().unwrap();
        assert_eq!(rm.data, prefs(2));
        assert_eq!(rm.init.as_deref(), Some(ckpt("round-1/rm").as_path()));
        assert_eq!(rm.train.epochs, 1, "loop.set");
        let own: &RewardConfig = e.stage("rm").unwrap().get().unwrap();
        assert_eq!(own.train.epochs, 3, "the file's stage keeps its setting");
        let ppo: &PpoConfig = e.stage("round-2/ppo").unwrap().get().unwrap();
        assert_eq!(ppo.policy, ckpt("round-1/ppo"), "policy_init: previous");
        assert_eq!(ppo.reference.as_deref(), Some(ckpt("sft").as_path()));
        assert_eq!(
            ppo.reward_model.as_deref(),
            Some(ckpt("round-2/rm").as_path())
        );
        let deps = |s: &str| e.deps[s].iter().cloned().collect::<Vec<_>>().join(",");
        assert_eq!(deps("round-1/collect"), "ppo");
        assert_eq!(deps("round-2/collect"), "round-1/collect,round-1/ppo");
        assert_eq!(deps("round-2/rm"), "round-1/rm,round-2/collect");
        assert_eq!(deps("round-2/ppo"), "round-1/ppo,round-2/rm,sft");
        // policy_init: reference starts each round's PPO from the SFT.
        let e = Experiment::load(
            &write(d.path(), LOOP),
            &[
                "loop.policy_init=reference".into(),
                "loop.reward_init=stage".into(),
            ],
        )
        .unwrap();
        let ppo: &PpoConfig = e.stage("round-2/ppo").unwrap().get().unwrap();
        assert_eq!(ppo.policy, ckpt("sft"));
        let rm: &RewardConfig = e.stage("round-2/rm").unwrap().get().unwrap();
        assert_eq!(rm.init.as_deref(), Some(ckpt("sft").as_path()));
        assert_eq!(
            e.deps["round-2/ppo"]
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(","),
            "round-2/rm,sft"
        );
    }

    #[test]
    fn a_rounds_setting_must_belong_to_a_repeated_stage_and_is_checked() {
        let d = tempfile::tempdir().unwrap();
        let text = LOOP.replace("stages.rm.epochs=1", "stages.sft.epochs=1");
        let m = Experiment::load(&write(d.path(), &text), &[])
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("loop: set: `stages.sft.epochs=1`: a round's setting belongs to a repeated stage (stages.rm.…, stages.ppo.…)"),
            "{m}"
        );
        let text = LOOP.replace("stages.rm.epochs=1", "stages.rm.epochs=lots");
        let m = Experiment::load(&write(d.path(), &text), &[])
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("loop: set: stages.rm.epochs: invalid type"),
            "{m}"
        );
        // A path it sets is placed like the file's: against the file's folder.
        let text = LOOP.replace("stages.rm.epochs=1", "stages.ppo.prompts=other.jsonl");
        let e = Experiment::load(&write(d.path(), &text), &[]).unwrap();
        let ppo: &PpoConfig = e.stage("round-1/ppo").unwrap().get().unwrap();
        assert_eq!(ppo.prompts, d.path().join("other.jsonl"));
    }

    /// A file cannot declare a collection stage: the loop makes them.
    #[test]
    fn a_file_cannot_declare_a_collect_stage() {
        let d = tempfile::tempdir().unwrap();
        let text = "name: t\nstages:\n  c: {kind: collect}\n";
        let m = Experiment::load(&write(d.path(), text), &[])
            .unwrap_err()
            .to_string();
        assert!(m.contains("unknown variant `collect`"), "{m}");
    }
}
