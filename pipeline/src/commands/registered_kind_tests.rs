//! A kind is one file and one line: a kind registered only here, with no
//! code of its own in the pipeline, is parsed and planned, evaluated as a
//! policy and plotted as it declares.

use std::path::{Path, PathBuf};

use rlhf_stages::kind::{Kind, KindConfig, PathSetting, Plot, Produces};
use rlhf_stages::train::{StageContext, StageError};
use rlhf_stages::{GptConfig, Head, Model, ModelConfig};
use serde::{Deserialize, Serialize};

use crate::experiment::Experiment;
use crate::report::{evaluate_run, write_report, EvalOptions};

/// `kind: echo`: a policy that is its `init` model, unchanged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct EchoConfig {
    init: PathBuf,
    eval_prompts: Option<PathBuf>,
    seed: Option<u64>,
}

impl KindConfig for EchoConfig {
    const KIND: &'static str = "echo";
    const PRODUCES: Produces = Produces::Policy;
    const PLOTS: &'static [Plot] = &[Plot::Loss {
        file: "echo_loss.png",
        title: "Echo loss",
    }];
    type Summary = serde_json::Value;

    fn validate(&self) -> Result<(), StageError> {
        Ok(())
    }

    fn paths(&mut self) -> Vec<PathSetting<'_>> {
        vec![
            PathSetting::model("init", "the model to echo", &mut self.init),
            PathSetting::optional_data("eval_prompts", &mut self.eval_prompts),
        ]
    }

    fn seed_mut(&mut self) -> &mut Option<u64> {
        &mut self.seed
    }

    fn run(&self, _ctx: &StageContext) -> Result<serde_json::Value, StageError> {
        Ok(serde_json::json!({}))
    }
}

static ECHO: Kind = Kind::of::<EchoConfig>();

/// A finished stage folder by hand: a tiny model, a complete manifest of
/// `kind`, and a few metrics lines.
fn finished_stage(dir: &Path, name: &str, kind: &str, prompts: &Path) {
    let stage = dir.join(name);
    let config = ModelConfig::Gpt2(GptConfig {
        vocab_size: GptConfig::vocab_for(rlhf_datasets::Tokenizer::bytes().vocab_size()),
        n_positions: 32,
        n_embd: 16,
        n_layer: 1,
        n_head: 2,
        ..GptConfig::default()
    });
    tch::manual_seed(3);
    let model = Model::init(
        &config,
        Head::Lm,
        rlhf_datasets::Tokenizer::bytes(),
        tch::Device::Cpu,
    )
    .unwrap();
    model.save(&stage.join("checkpoint")).unwrap();
    let manifest = serde_json::json!({
        "stage": name, "kind": kind, "key": format!("key-{name}"), "inputs": {},
        "upstream": {}, "status": "complete", "seconds": 1.0, "summary": {},
        "config": {"stage": {"kind": kind, "eval_prompts": prompts}},
    });
    std::fs::write(stage.join("manifest.json"), manifest.to_string()).unwrap();
    let metrics: String = (0..5)
        .map(|s| {
            format!(
                "{{\"step\": {s}, \"loss\": {}, \"eval_loss\": 1.0}}\n",
                2.0 - 0.1 * s as f64
            )
        })
        .collect();
    std::fs::write(stage.join("metrics.jsonl"), metrics).unwrap();
}

#[test]
fn a_kind_registered_only_in_a_test_is_planned_evaluated_and_plotted() {
    rlhf_stages::kinds::register(&ECHO).unwrap();
    assert!(
        rlhf_stages::kinds::register(&ECHO).is_err(),
        "a name is taken once"
    );
    let d = tempfile::tempdir().unwrap();
    let prompts = d.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"Q: 1+1=\"}\n{\"prompt\": \"Q: ab\"}\n",
    )
    .unwrap();
    std::fs::write(
        d.path().join("sft.jsonl"),
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n",
    )
    .unwrap();
    let file = d.path().join("exp.yaml");
    std::fs::write(
        &file,
        "name: t\nout_dir: runs\nmodel: {n_layer: 1, n_head: 2, n_embd: 16, n_positions: 32}\n\
         stages:\n  sft: {kind: sft, data: sft.jsonl}\n  echo: {kind: echo, init: sft, eval_prompts: prompts.jsonl}\n",
    )
    .unwrap();

    // Planned: after the stage it reads.
    let exp = Experiment::load(&file, &[]).unwrap();
    let plan = crate::exec::runner::describe_plan(&exp).unwrap();
    let (sft_at, echo_at) = (plan.find("sft").unwrap(), plan.find("echo").unwrap());
    assert!(sft_at < echo_at, "{plan}");

    // Evaluated as a policy beside SFT, and plotted as it declares.
    let run = d.path().join("runs/t");
    finished_stage(&run, "sft", "sft", &prompts);
    finished_stage(&run, "echo", "echo", &prompts);
    let mut opts = EvalOptions {
        prompts: None,
        preferences: None,
        max_prompts: None,
        settings: Default::default(),
        skip_kl: true,
        checker: None,
        reward_program: None,
        with_runs: vec![],
        judge: None,
    };
    opts.settings.max_new_tokens = 2;
    let mut evaluation = evaluate_run(&run, &opts, tch::Device::Cpu).unwrap();
    let labels: Vec<&str> = evaluation
        .report
        .policies
        .iter()
        .map(|p| p.label.as_str())
        .collect();
    assert_eq!(labels, ["sft", "echo"]);
    write_report(&mut evaluation).unwrap();
    assert!(
        evaluation
            .report
            .plots
            .contains(&"echo_loss.png".to_owned()),
        "{:?}",
        evaluation.report.plots
    );
    assert!(run.join("report/echo_loss.png").is_file());
}
