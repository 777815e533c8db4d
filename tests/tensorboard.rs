//! TensorBoard event files: every stage of a run writes them beside
//! `metrics.jsonl`, and TensorBoard's own reader (the `tensorboard`
//! package, installed by `just test`) reads back every number of every
//! metrics line, at its step, as a scalar, for a supervised stage (SFT)
//! and an RL one (GRPO).

use crate::common;

#[test]
fn tensorboard_reads_back_every_metric_of_every_stage() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_str().unwrap();
    common::rlhf_ok(&["task", "arithmetic", "--out", dir, "--prompts", "32"]);
    let exp = d.path().join("exp.yaml");
    std::fs::write(
        &exp,
        "name: tb\ndevice: cpu\nmodel: {n_layer: 1, n_head: 2, n_embd: 32, n_positions: 48}\nstages:\n\
         \x20 sft: {kind: sft, data: sft.jsonl, max_steps: 6, batch_size: 8, eval_every: 3}\n\
         \x20 grpo: {kind: grpo, policy: sft, prompts: prompts.jsonl, iterations: 3, prompts_per_iteration: 4,\n\
         \x20        group_size: 4, minibatch_size: 8, epochs: 1, sampling: {max_new_tokens: 6}, reward: {checker: math}}\n",
    )
    .unwrap();
    common::rlhf_ok(&["run", exp.to_str().unwrap()]);
    for stage in ["sft", "grpo"] {
        let folder = d.path().join("runs/tb").join(stage);
        let out = common::run_python("read_tensorboard_events.py", &[folder.to_str().unwrap()]);
        let got: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            (got["files"].as_u64(), got["versions"].as_u64()),
            (Some(1), Some(1)),
            "{stage}"
        );
        let mut want = vec![];
        for line in std::fs::read_to_string(folder.join("metrics.jsonl"))
            .unwrap()
            .lines()
        {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let step = v
                .get("step")
                .or(v.get("iteration"))
                .and_then(|s| s.as_i64())
                .unwrap();
            for (tag, x) in v.as_object().unwrap() {
                if let (false, Some(x)) = (tag == "step", x.as_f64()) {
                    want.push((tag.clone(), step, x));
                }
            }
        }
        let scalars = got["scalars"].as_array().unwrap();
        assert_eq!(scalars.len(), want.len(), "{stage}: {scalars:?}");
        assert!(want.len() > 10, "{stage}: {want:?}");
        for (s, (tag, step, x)) in scalars.iter().zip(&want) {
            assert_eq!(
                (s[0].as_str().unwrap(), s[1].as_i64().unwrap()),
                (tag.as_str(), *step),
                "{stage}"
            );
            let y = s[2].as_f64().unwrap();
            assert!(
                (y - *x as f32 as f64).abs() <= 1e-6 * x.abs().max(1.0),
                "{stage} {tag}@{step}: {y} vs {x}"
            );
        }
    }
}
