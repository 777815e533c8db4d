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
    // A fixed mmap threshold makes glibc return every large tensor's
    // memory when it is freed, so peak RSS is the memory in use at the
    // peak, not what the allocator kept of freed blocks (which varied
    // with the machine: 142 MiB apart on one, 300 on another).
    let out = common::Rlhf::new(&args)
        .one_thread()
        .env("MALLOC_MMAP_THRESHOLD_", "65536")
        .ok();
    let line = out.lines().rfind(|l| l.starts_with('{')).unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["gradient_checkpointing"], checkpointing);
    v["peak_rss_mib"].as_f64().unwrap()
}

#[test]
fn gradient_checkpointing_lowers_a_training_steps_peak_memory() {
    let plain = peak_rss_mib(false);
    let checkpointed = peak_rss_mib(true);
    // Measured: 1095 MiB plain, 651 MiB checkpointed (each layer's
    // activations, about 45 MiB, against its 2 MiB input and one layer's
    // recompute at a time).
    assert!(
        checkpointed < plain - 250.0,
        "peak RSS {checkpointed:.0} MiB checkpointed, {plain:.0} MiB not"
    );
}
