//! Activation checkpointing lowers a training step's peak memory: the
//! same SFT steps by `rlhf bench train`, with and without
//! `--gradient-checkpointing` (the stage setting `gradient_checkpointing:
//! true`), each process's own peak RSS. Its gradients equal the plain
//! backward's (stages' unit and step tests).

use crate::common;

/// Peak RSS (MiB) of two SFT steps of a 16-layer, 256-wide model on 8
/// rows of 256 tokens.
fn peak_rss_mib(checkpointing: bool) -> f64 {
    let mut args = vec![
        "bench",
        "train",
        "--n-layer",
        "16",
        "--n-head",
        "4",
        "--n-embd",
        "256",
    ];
    args.extend(["--n-positions", "256", "--batch", "8", "--seq", "256"]);
    args.extend(["--warmup", "1", "--steps", "1"]);
    if checkpointing {
        args.push("--gradient-checkpointing");
    }
    let out = common::rlhf_ok(&args);
    let line = out.lines().rfind(|l| l.starts_with('{')).unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["gradient_checkpointing"], checkpointing);
    v["peak_rss_mib"].as_f64().unwrap()
}

#[test]
fn gradient_checkpointing_lowers_a_training_steps_peak_memory() {
    let plain = peak_rss_mib(false);
    let checkpointed = peak_rss_mib(true);
    // Measured on 2 cores: 1254 MiB plain, 961 MiB checkpointed (each
    // layer's activations, about 45 MiB, against its 2 MiB input and one
    // layer's recompute at a time).
    assert!(
        checkpointed < plain - 150.0,
        "peak RSS {checkpointed:.0} MiB checkpointed, {plain:.0} MiB not"
    );
}
