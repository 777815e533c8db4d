//! The experiment file: shared settings and named stages.
//!
//! ```yaml
//! name: default
//! seed: 0
//! device: auto            # auto | cpu | cuda | cuda:N
//! out_dir: ../runs        # runs/<name>/<stage>/
//! model: {n_layer: 4, n_head: 4, n_embd: 128, n_positions: 128}
//! tokenizer: null         # null: built-in bytes; or a tokenizer.json
//! stages:
//!   sft:
//!     kind: sft
//!     data: ../datasets/task/sft.jsonl
//! ```
//!
//! Relative paths are relative to the experiment file's folder, so a run
//! does not depend on the directory it is started from. Parsing is two
//! steps (candle's pattern): serde structs mirror the file, then
//! [`Experiment::resolve`] checks and resolves them once. `sweep:` lines
//! expand into stages here too (`sweep`), and so do `loop:` rounds
//! (`rounds`).
//!
//! It imports plan (the stages' graph) and run_folder (names a stage may
//! not take).

mod checks;
mod errors;
mod file;
mod overrides;
mod paths;
mod rounds;
pub mod sweep;

pub use checks::*;
pub use errors::*;
pub use file::*;
pub use overrides::*;
use paths::*;
pub use rounds::{kind_named, CollectConfig, COLLECT_KIND, PREFERENCES_FILE};

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rlhf_stages::kind::{LoopRole, PathRole, StageConfig};
use rlhf_stages::train::StageError;
use rlhf_stages::ModelConfig;
use serde::{Deserialize, Serialize};

/// A checked experiment with absolute paths.
#[derive(Debug, Clone)]
pub struct Experiment {
    pub file: PathBuf,
    pub spec: ExperimentFile,
    /// `out_dir/<name>`.
    pub run_dir: PathBuf,
    /// Each stage's upstream stages (the ones whose checkpoints it reads).
    pub deps: BTreeMap<String, BTreeSet<String>>,
    /// The `--set` overrides it was loaded with (each seed's run is
    /// loaded again with them).
    pub overrides: Vec<String>,
}

impl Experiment {
    /// Reads, parses and resolves an experiment file; `overrides` are
    /// `dotted.key=value` settings applied before parsing.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        Self::load_at(path, overrides, None)
    }

    /// The runs this experiment makes: one per seed of its `seeds:` list,
    /// each with that seed and its own run folder `RUN/seed-N`; itself
    /// alone without the list.
    pub fn seed_runs(&self) -> Result<Vec<Self>, ConfigError> {
        if self.spec.seeds.is_empty() {
            return Ok(vec![self.clone()]);
        }
        self.spec
            .seeds
            .iter()
            .map(|&s| Self::load_at(&self.file, &self.overrides, Some(s)))
            .collect()
    }

    /// `seed`: the run of one seed of the file's `seeds:` list.
    fn load_at(path: &Path, overrides: &[String], seed: Option<u64>) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::in_file(path, message);
        // An experiment file is a page of YAML, not a device or a FIFO.
        if path.exists() {
            rlhf_datasets::files::bounded_size(path, 16 << 20, "the limit for an experiment file")
                .map_err(&invalid)?;
        }
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut value: serde_norway::Value = serde_norway::from_str(&text)
            .map_err(|e| ConfigError::located(path, Some(&text), &[], e.to_string().into()))?;
        for o in overrides {
            apply_override(&mut value, o).map_err(|m| invalid(format!("--set {o}: {m}")))?;
        }
        let swept = value.get("sweep").is_some();
        crate::experiment::sweep::check_overrides(&value, overrides).map_err(&invalid)?;
        let refs = stage_refs(&value);
        crate::experiment::sweep::expand(&mut value, refs).map_err(&invalid)?;
        // Parse from the text when nothing was overridden or swept, so that
        // errors carry the file's line and column.
        // With overrides or sweeps, the changed value is parsed from its
        // own text too: serde names a field's path only when it reads text.
        let as_written = overrides.is_empty() && !swept;
        let spec: ExperimentFile = if as_written {
            serde_norway::from_str(&text)
        } else {
            from_value_with_paths(value)
        }
        .map_err(|e| {
            let problem = dotted(&e.to_string()).into();
            ConfigError::located(path, as_written.then_some(&*text), overrides, problem)
        })?;
        Self::resolve(path, &text, spec, overrides, seed)
    }

    fn resolve(
        path: &Path,
        text: &str,
        mut spec: ExperimentFile,
        overrides: &[String],
        seed: Option<u64>,
    ) -> Result<Self, ConfigError> {
        let located = |p: Problem| ConfigError::located(path, Some(text), overrides, p);
        let invalid = |message: String| located(message.into());
        check_names_and_settings(&spec).map_err(located)?;
        check_seeds(&spec).map_err(located)?;
        spec.model
            .validate()
            .map_err(|e| invalid(format!("model: {e}")))?;
        rlhf_stages::model::device::check_device_spec(&spec.device)
            .map_err(|e| invalid(format!("device: {e}")))?;
        // Absolute, so paths mean the same in child processes and overrides.
        let base = path.parent().map(Path::to_owned).unwrap_or_default();
        let base = std::path::absolute(if base.as_os_str().is_empty() {
            Path::new(".")
        } else {
            &base
        })
        .map_err(|e| invalid(format!("cannot resolve the file's folder: {e}")))?;
        let abs = |p: &Path| absolute_from(&base, p);
        spec.out_dir = abs(&spec.out_dir);
        spec.tokenizer = spec.tokenizer.as_deref().map(abs);
        if let Some(kind) = spec
            .tokenizer
            .as_deref()
            .and_then(rlhf_datasets::files::not_a_regular_file)
        {
            return Err(invalid(format!(
                "tokenizer: {} is {kind}, not a regular file",
                spec.tokenizer.as_ref().expect("checked").display()
            )));
        }
        let mut run_dir = spec.out_dir.join(&spec.name);
        if let Some(s) = seed {
            run_dir.push(crate::run_folder::seed_folder(s));
            spec.seed = s;
        }
        let stage_names: Vec<String> = spec.stages.keys().cloned().collect();
        let mut deps = BTreeMap::new();
        for (name, stage) in spec.stages.iter_mut() {
            let places = Places {
                stage: name,
                stages: &stage_names,
                run_dir: &run_dir,
                base: &base,
            };
            let refs = places.resolve(&mut *stage.config).map_err(&invalid)?;
            let seed = stage.config.seed_mut();
            seed.get_or_insert(spec.seed);
            stage
                .config
                .validate()
                .map_err(|e| invalid(stage_error(name, e)))?;
            let ranks = spec.distributed.nproc_per_node;
            let shared = stage.config.shared_batches();
            if let Some((field, batch)) = shared.iter().find(|(_, b)| b % ranks != 0) {
                return Err(invalid(format!(
                    "stages.{name}.{field}: {batch} does not divide among the {ranks} ranks of distributed.nproc_per_node (each rank takes an equal share of every batch)"
                )));
            }
            deps.insert(name.clone(), refs);
        }
        if let Some(l) = &mut spec.rounds {
            match &mut l.labeller {
                Labeller::Web {
                    guidelines: Some(g),
                    ..
                } => *g = abs(g),
                // A stage's name means its checkpoint; else a folder.
                Labeller::RewardModel { model } => {
                    *model = match model.to_str().filter(|m| spec.stages.contains_key(*m)) {
                        Some(stage) => stage_checkpoint(&run_dir, stage),
                        None => abs(model),
                    }
                }
                _ => {}
            }
            check_loop(l, &spec.stages).map_err(|m| invalid(format!("loop: {m}")))?;
            l.prompts = abs(&l.prompts);
        }
        rounds::expand(&mut spec, &mut deps, &run_dir, &base)
            .map_err(|m| invalid(format!("loop: {m}")))?;
        check_held_out_judge(&spec, &deps).map_err(located)?;
        Ok(Self {
            file: path.to_owned(),
            spec,
            run_dir,
            deps,
            overrides: overrides.to_vec(),
        })
    }

    /// How many ranks `rlhf run` starts for stage `name`: the experiment's
    /// `distributed.nproc_per_node` for kinds that train data-parallel.
    pub fn ranks(&self, name: &str) -> usize {
        match self.spec.stages.get(name) {
            Some(s) if !s.config.shared_batches().is_empty() => {
                self.spec.distributed.nproc_per_node
            }
            _ => 1,
        }
    }

    /// A stage's batch arithmetic for `rlhf plan`: global batch, per rank,
    /// accumulation.
    pub fn batch_arithmetic(&self, name: &str) -> Option<String> {
        let stage = self.spec.stages.get(name)?;
        let ranks = self.ranks(name);
        if let Some((batch, accum)) = stage.config.batch() {
            return Some(format!(
                "global batch {} = {ranks} rank(s) x {} per micro-batch x {accum} accumulation",
                batch * accum,
                batch / ranks
            ));
        }
        let parts: Vec<String> = stage
            .config
            .shared_batches()
            .iter()
            .map(|(field, n)| format!("{field} {n} = {ranks} rank(s) x {}", n / ranks))
            .collect();
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    pub fn stage(&self, name: &str) -> Result<&StageFile, ConfigError> {
        self.spec.stages.get(name).ok_or_else(|| {
            let names: Vec<&str> = self.spec.stages.keys().map(String::as_str).collect();
            ConfigError::in_file(
                &self.file,
                format!(
                    "no stage named \"{name}\"; the file defines: {}",
                    names.join(", ")
                ),
            )
        })
    }

    /// Where stage `name` runs, and its Slurm settings.
    pub fn executor(&self, name: &str) -> (ExecutorKind, SlurmSettings) {
        let stage = self.spec.stages.get(name);
        let kind = stage.and_then(|s| s.executor).unwrap_or(self.spec.executor);
        let slurm = stage
            .and_then(|s| s.slurm.as_ref())
            .map_or_else(|| self.spec.slurm.clone(), |s| s.over(&self.spec.slurm));
        (kind, slurm)
    }

    /// The folder a stage writes.
    pub fn stage_dir(&self, name: &str) -> PathBuf {
        self.run_dir.join(crate::experiment::sweep::folder_of(name))
    }

    /// Fails unless `path` lies strictly inside the run folder (checked on
    /// the path's text, before anything is created or removed).
    pub fn check_inside(&self, path: &Path) -> anyhow::Result<()> {
        let path = clean_path(path);
        let inside = path.starts_with(&self.run_dir)
            && path != self.run_dir
            && !path
                .components()
                .any(|c| c == std::path::Component::ParentDir);
        anyhow::ensure!(
            inside,
            "{}: refusing to touch {}: it is not inside the run folder {}",
            self.file.display(),
            path.display(),
            self.run_dir.display()
        );
        Ok(())
    }
}

/// For a sweep: where each stage of the raw file names another stage it
/// reads (its model settings whose value is a stage's name).
fn stage_refs(
    root: &serde_norway::Value,
) -> impl Fn(&str, &serde_norway::Value) -> crate::experiment::sweep::Refs {
    let names: BTreeSet<String> = root
        .get("stages")
        .and_then(serde_norway::Value::as_mapping)
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    move |_, value| {
        let Ok(mut stage) = parse_stage(value.clone()) else {
            // Its error is reported when the file is parsed.
            return vec![];
        };
        stage
            .config
            .paths()
            .into_iter()
            .filter(|p| p.role != PathRole::Data)
            .filter_map(|p| {
                let s = p.get()?.to_string_lossy().into_owned();
                names.contains(&s).then(|| (p.field.to_owned(), s))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rlhf_stages::kinds::reward::RewardConfig;
    use rlhf_stages::kinds::sft::SftConfig;

    /// `dir/exp.yaml` holding `text` (the other rooms' tests use it too).
    pub(super) fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("exp.yaml");
        std::fs::write(&p, text).unwrap();
        p
    }

    const GOOD: &str = "name: t\nseed: 3\nstages:\n  sft:\n    kind: sft\n    data: data/sft.jsonl\n    epochs: 1\n";

    #[test]
    fn resolves_paths_against_the_file_and_inherits_the_seed() {
        let d = tempfile::tempdir().unwrap();
        let e = Experiment::load(&write(d.path(), GOOD), &[]).unwrap();
        let c: &SftConfig = e.stage("sft").unwrap().get().unwrap();
        assert_eq!(c.data, d.path().join("data/sft.jsonl"));
        assert_eq!(c.train.seed, Some(3));
        assert_eq!(e.stage_dir("sft"), d.path().join("runs/t/sft"));
    }

    #[test]
    fn a_stage_without_its_data_names_the_field_and_the_stage_line() {
        let d = tempfile::tempdir().unwrap();
        let text = "name: t\nstages:\n  sft:\n    kind: sft\n    epochs: 1\n";
        let m = Experiment::load(&write(d.path(), text), &[])
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("exp.yaml")
                && m.contains("stages.sft: missing field `data`")
                && m.ends_with("at line 3"),
            "{m}"
        );
        let text =
            "name: t\nstages:\n  p:\n    kind: ppo\n    prompts: p.jsonl\n    gold_reward: true\n";
        let m = Experiment::load(&write(d.path(), text), &[])
            .unwrap_err()
            .to_string();
        assert!(m.contains("stages.p: missing field `policy`"), "{m}");
    }

    #[test]
    fn seed_zero_is_a_seed_and_an_unset_one_is_the_experiments() {
        let d = tempfile::tempdir().unwrap();
        let text = format!("{GOOD}    seed: 0\n  rm:\n    kind: reward\n    data: p.jsonl\n");
        let e = Experiment::load(&write(d.path(), &text), &[]).unwrap();
        let sft: &SftConfig = e.stage("sft").unwrap().get().unwrap();
        let rm: &RewardConfig = e.stage("rm").unwrap().get().unwrap();
        assert_eq!((sft.train.seed, rm.train.seed), (Some(0), Some(3)));
    }

    #[test]
    fn training_settings_keep_each_kinds_defaults_and_unknown_keys_list_both() {
        let d = tempfile::tempdir().unwrap();
        let text = format!("{GOOD}  rm:\n    kind: reward\n    data: p.jsonl\n");
        let e = Experiment::load(&write(d.path(), &text), &[]).unwrap();
        let sft: &SftConfig = e.stage("sft").unwrap().get().unwrap();
        let rm: &RewardConfig = e.stage("rm").unwrap().get().unwrap();
        assert_eq!(sft.train.epochs, 1, "set in the file");
        assert_eq!(sft.train.batch_size, SftConfig::default().train.batch_size);
        assert_eq!(rm.train.optimizer, RewardConfig::default().train.optimizer);
        let m = Experiment::load(&write(d.path(), &GOOD.replace("epochs", "epochz")), &[])
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("unknown field `epochz`")
                && m.contains("`data`")
                && m.contains("`grad_accum`")
                && m.ends_with("at line 7"),
            "{m}"
        );
    }

    #[test]
    fn unknown_keys_name_the_key_and_line() {
        let d = tempfile::tempdir().unwrap();
        let text = GOOD.replace("    epochs: 1\n", "    epochs: 1\n    epocs: 2\n");
        let m = Experiment::load(&write(d.path(), &text), &[])
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("exp.yaml") && m.contains("epocs") && m.contains("line 8"),
            "{m}"
        );
        let m = Experiment::load(&write(d.path(), "name: t\nstagez: {}\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(m.contains("stagez"), "{m}");
        let m = Experiment::load(
            &write(d.path(), &GOOD.replace("kind: sft", "kind: kto")),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            m.contains("kto") && m.contains("sft") && m.contains("grpo"),
            "{m}"
        );
    }

    #[test]
    fn a_bad_value_inside_a_stage_names_its_path_and_line() {
        let d = tempfile::tempdir().unwrap();
        let text = GOOD.replace(
            "    epochs: 1\n",
            "    epochs: 1\n    schedule:\n      warmup_steps: soon\n",
        );
        let m = Experiment::load(&write(d.path(), &text), &[])
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("exp.yaml")
                && m.contains("stages.sft.schedule.warmup_steps: invalid type")
                && m.ends_with("at line 9"),
            "{m}"
        );
        let text = GOOD.replace("    epochs: 1\n", "    epochs: [1]\n");
        let m = Experiment::load(&write(d.path(), &text), &[])
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("stages.sft.epochs:") && m.ends_with("at line 7"),
            "{m}"
        );
        let m = Experiment::load(&write(d.path(), GOOD), &["stages.sft.seed=x".into()])
            .unwrap_err()
            .to_string();
        assert!(m.contains("stages.sft.seed: invalid type"), "{m}");
    }

    #[test]
    fn overrides_set_nested_values_and_reject_bad_ones() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), GOOD);
        let e = Experiment::load(
            &p,
            &["stages.sft.optimizer.lr=0.01".into(), "device=cpu".into()],
        )
        .unwrap();
        let c: &SftConfig = e.stage("sft").unwrap().get().unwrap();
        assert_eq!(c.train.optimizer.lr, 0.01);
        assert_eq!(e.spec.device, "cpu");
        let m = Experiment::load(&p, &["stages.sft.epochs".into()])
            .unwrap_err()
            .to_string();
        assert!(m.contains("KEY=VALUE"), "{m}");
        let m = Experiment::load(&p, &["stages.sft.epochs=many".into()])
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("stages.sft.epochs: invalid type: string \"many\", expected usize (from --set stages.sft.epochs=many)"),
            "{m}"
        );
        let m = Experiment::load(&p, &["seed.x=1".into()])
            .unwrap_err()
            .to_string();
        assert!(m.contains("not a mapping"), "{m}");
        // A range error names the --set that wrote the value, not a line.
        let m = Experiment::load(&p, &["stages.sft.optimizer.lr=-1".into()])
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("stages.sft.optimizer.lr: must be")
                && m.ends_with("(from --set stages.sft.optimizer.lr=-1)"),
            "{m}"
        );
    }

    #[test]
    fn stage_references_resolve_to_checkpoints() {
        let d = tempfile::tempdir().unwrap();
        let text = format!("{GOOD}  rm:\n    kind: reward\n    init: sft\n    data: prefs.jsonl\n");
        let e = Experiment::load(&write(d.path(), &text), &[]).unwrap();
        let c: &RewardConfig = e.stage("rm").unwrap().get().unwrap();
        assert_eq!(
            c.init.as_deref(),
            Some(d.path().join("runs/t/sft/checkpoint").as_path())
        );
        assert_eq!(c.data, d.path().join("prefs.jsonl"));
    }

    #[test]
    fn semantic_errors_name_the_stage() {
        let d = tempfile::tempdir().unwrap();
        let m = Experiment::load(
            &write(d.path(), &GOOD.replace("epochs: 1", "batch_size: 0")),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(m.contains("stages.sft") && m.contains("batch_size"), "{m}");
        let m = Experiment::load(&write(d.path(), &GOOD.replace("name: t", "name: a/b")), &[])
            .unwrap_err()
            .to_string();
        assert!(m.contains("name"), "{m}");
    }
}

/// Property test of the parser: thousands of mutated experiment files
/// (bytes dropped, duplicated or replaced, lines swapped or cut, values
/// swapped for other YAML values) never panic; each either loads or fails
/// with an error that names the file; and a file that loads, loads the
/// same again.
#[cfg(test)]
mod fuzz {
    use super::*;
    use rand::{Rng, SeedableRng};

    const SEEDS: [&str; 2] = [
        include_str!("../../../configs/default.yaml"),
        "name: t\nseed: 3\nmodel: {n_layer: 1, n_head: 2, n_embd: 16, n_positions: 32}\nstages:\n  sft: {kind: sft, data: a.jsonl}\n  rm: {kind: reward, init: sft, data: b.jsonl}\n  ppo: {kind: ppo, policy: sft, reward_model: rm, prompts: c.jsonl}\nloop: {repeat: [rm, ppo], rounds: 1, prompts: c.jsonl, labeller: {kind: gold}}\n",
    ];
    const VALUES: [&str; 16] = [
        "-1",
        "0",
        "1e400",
        "nan",
        ".inf",
        "null",
        "~",
        "[]",
        "{}",
        "\"\"",
        "yes",
        "sft",
        "ppo",
        "[rm, ppo]",
        "{kind: sft}",
        "18446744073709551616",
    ];

    fn mutate(text: &str, rng: &mut impl Rng) -> String {
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        for _ in 0..rng.random_range(1..4) {
            let n = lines.len().max(1);
            let i = rng.random_range(0..n);
            match rng.random_range(0..7) {
                0 if !lines.is_empty() => {
                    lines.remove(i);
                }
                1 if !lines.is_empty() => {
                    let l = lines[i].clone();
                    lines.insert(i, l);
                }
                2 if n > 1 => lines.swap(i, rng.random_range(0..n)),
                3 if !lines.is_empty() => {
                    // Replace a value after a colon.
                    if let Some(c) = lines[i].find(": ") {
                        let v = VALUES[rng.random_range(0..VALUES.len())];
                        lines[i] = format!("{}: {v}", &lines[i][..c]);
                    }
                }
                4 if !lines.is_empty() => {
                    let l = &lines[i];
                    let cut = rng.random_range(0..=l.len());
                    let cut = (0..=cut)
                        .rev()
                        .find(|&c| l.is_char_boundary(c))
                        .unwrap_or(0);
                    lines[i] = l[..cut].to_owned();
                }
                5 if !lines.is_empty() => {
                    // Indentation broken.
                    let pad = [" ", "\t", "   "][rng.random_range(0..3)];
                    lines[i] = format!("{pad}{}", lines[i]);
                }
                _ => {
                    let junk = ["{", "]", ":", "- x", "&a", "*a", "!!int x", "'", "\"", "#"];
                    lines.insert(i, junk[rng.random_range(0..junk.len())].to_owned());
                }
            }
        }
        lines.join("\n") + "\n"
    }

    #[test]
    fn mutated_files_load_or_fail_cleanly_never_panic() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("fuzz.yaml");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (mut loaded, mut failed) = (0, 0);
        for round in 0..3000 {
            let seed = SEEDS[round % SEEDS.len()];
            let text = mutate(seed, &mut rng);
            std::fs::write(&path, &text).unwrap();
            let result = std::panic::catch_unwind(|| Experiment::load(&path, &[]));
            let result = result.unwrap_or_else(|_| panic!("the parser panicked on:\n{text}"));
            match result {
                Ok(first) => {
                    loaded += 1;
                    let again = Experiment::load(&path, &[]).unwrap();
                    assert_eq!(
                        serde_json::to_string(&first.spec).unwrap(),
                        serde_json::to_string(&again.spec).unwrap()
                    );
                }
                Err(e) => {
                    failed += 1;
                    let msg = e.to_string();
                    assert!(
                        msg.contains("fuzz.yaml"),
                        "error without the file name: {msg}\n{text}"
                    );
                    assert!(
                        msg.len() > "fuzz.yaml: ".len() + d.path().as_os_str().len(),
                        "{msg}"
                    );
                }
            }
        }
        // Both outcomes are exercised, not one of them only.
        assert!(
            loaded > 100 && failed > 1000,
            "loaded {loaded}, failed {failed}"
        );
    }

    #[test]
    fn random_set_overrides_never_panic() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("exp.yaml");
        std::fs::write(&path, SEEDS[1]).unwrap();
        let keys = [
            "name",
            "seed",
            "model.n_layer",
            "model.n_embd",
            "stages.sft.epochs",
            "stages.sft",
            "stages.rm.init",
            "stages.ppo.sampling.top_p",
            "loop.k",
            "loop",
            "stages",
            "x.y.z",
            "stages..sft",
            ".",
            "",
        ];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        for _ in 0..500 {
            let k = keys[rng.random_range(0..keys.len())];
            let v = VALUES[rng.random_range(0..VALUES.len())];
            let set = vec![format!("{k}={v}")];
            let r = std::panic::catch_unwind(|| Experiment::load(&path, &set));
            assert!(r.is_ok(), "--set {k}={v} panicked");
        }
    }
}
