//! A hostile or careless user: names that try to leave the run folder,
//! a second run on a folder in use, data paths that are not files, a model
//! folder written over. Nothing outside the run folder is touched, and each
//! case fails at once with an error that says why.

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{rlhf, task_head};

const MODEL: &str = "model: {n_layer: 1, n_head: 2, n_embd: 16, n_positions: 48}";

/// An experiment in `dir/exp/` writing to `dir/exp/runs/`, with a stage
/// named `stage` (and the experiment named `name`).
fn experiment(dir: &Path, name: &str, stage: &str) -> std::path::PathBuf {
    let exp_dir = dir.join("exp");
    std::fs::create_dir_all(&exp_dir).unwrap();
    task_head("sft.jsonl", &exp_dir.join("sft.jsonl"), 32);
    let exp = exp_dir.join("exp.yaml");
    std::fs::write(
        &exp,
        format!(
            "name: {name:?}\ndevice: cpu\n{MODEL}\nstages:\n  {stage:?}: {{kind: sft, data: sft.jsonl, max_steps: 2, batch_size: 4}}\n"
        ),
    )
    .unwrap();
    exp
}

#[test]
fn files_outside_the_run_folder_survive_every_hostile_name() {
    let d = tempfile::tempdir().unwrap();
    // What a hostile name could reach: the experiment's folder, its
    // parent, the out_dir with another experiment in it, an absolute path.
    let precious = [
        d.path().join("x/keep.txt"),
        d.path().join("exp/x/keep.txt"),
        d.path().join("exp/runs/other/keep.txt"),
        d.path().join("abs/keep.txt"),
    ];
    for p in &precious {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, "mine").unwrap();
    }
    let absolute = d.path().join("abs").display().to_string();
    let stages = ["../../x", "../x", "..", ".", "", "a/b", absolute.as_str()];
    let names = ["..", ".", "", "../exp", "a/b", absolute.as_str()];
    let cases = stages
        .iter()
        .map(|s| ("ok", *s))
        .chain(names.iter().map(|n| (*n, "sft")));
    for (name, stage) in cases {
        let exp = experiment(d.path(), name, stage);
        for _ in 0..2 {
            let out = rlhf(&["run", exp.to_str().unwrap()]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "name {name:?} stage {stage:?} ran");
            assert!(
                err.contains("must be one path component"),
                "name {name:?} stage {stage:?}: {err}"
            );
        }
        for p in &precious {
            assert!(
                p.exists(),
                "{} was lost (name {name:?}, stage {stage:?})",
                p.display()
            );
        }
    }
}

/// `rlhf run` of `exp` in the background, one thread.
fn spawn_run(exp: &Path, sets: &[&str]) -> common::Drained {
    let run = common::Rlhf::new(["run".as_ref(), exp.as_os_str()]).one_thread();
    sets.iter().fold(run, |run, s| run.set(s)).spawn()
}

#[test]
fn a_second_run_on_a_folder_in_use_fails_naming_the_first() {
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path(), "busy", "sft");
    let text = std::fs::read_to_string(&exp).unwrap();
    std::fs::write(&exp, text.replace("max_steps: 2", "max_steps: 2000")).unwrap();
    let mut first = spawn_run(&exp, &[]);
    let metrics = d.path().join("exp/runs/busy/sft/metrics.jsonl");
    first.wait_until("the first run", Duration::from_secs(600), || {
        metrics.exists()
    });
    let run_dir = d.path().join("exp/runs/busy");
    for args in [
        vec!["eval", run_dir.to_str().unwrap()],
        vec!["run", exp.to_str().unwrap()],
        vec!["stage", "--config", exp.to_str().unwrap(), "sft"],
    ] {
        let out = rlhf(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} ran beside the first run");
        assert!(
            err.contains(&format!("another rlhf process (pid {})", first.id())),
            "{args:?}: {err}"
        );
    }
    let (status, stderr) = first.wait();
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("threads: 1 (from --threads"),
        "the thread count is logged: {stderr}"
    );
    // The first run ends as a run alone does, bit for bit.
    let solo = tempfile::tempdir().unwrap();
    let solo_exp = experiment(solo.path(), "busy", "sft");
    std::fs::copy(&exp, &solo_exp).unwrap();
    let (status, stderr) = spawn_run(&solo_exp, &[]).wait();
    assert!(status.success(), "{stderr}");
    let weights = |root: &Path| {
        std::fs::read(root.join("exp/runs/busy/sft/checkpoint/model.safetensors")).unwrap()
    };
    assert!(
        weights(d.path()) == weights(solo.path()),
        "the busy run's weights differ from a run alone"
    );

    // A killed holder frees the folder: the next run starts over and finishes.
    let mut holder = spawn_run(&exp, &["stages.sft.max_steps=100000"]);
    let t0 = Instant::now();
    while !holder.stderr().contains("step 50/100000") {
        assert!(
            holder.try_wait().is_none() && t0.elapsed() < Duration::from_secs(600),
            "{}",
            holder.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    holder.kill();
    let out = rlhf(&[
        "run",
        exp.to_str().unwrap(),
        "--set",
        "stages.sft.max_steps=4",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn data_paths_must_be_regular_files_and_init_keeps_a_full_folder() {
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path(), "t", "sft");
    let text = std::fs::read_to_string(&exp).unwrap();
    let fifo = d.path().join("exp/pipe.jsonl");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    for (data, what) in [
        ("pipe.jsonl", "a FIFO (named pipe)"),
        ("/dev/zero", "a device"),
        (".", "a folder"),
    ] {
        std::fs::write(
            &exp,
            text.replace("data: sft.jsonl", &format!("data: {data}")),
        )
        .unwrap();
        let t0 = Instant::now();
        let out = rlhf(&["run", exp.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && err.contains("stages.sft.data")
                && err.contains(&format!("is {what}, not a regular file")),
            "{err}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{data} blocked the run"
        );
    }
    // Files hashed for the stage key: the experiment's tokenizer, and the
    // weights of a model folder a stage starts from.
    let zero_model = d.path().join("exp/zero_model");
    common::rlhf_ok(&["init", "--out", zero_model.to_str().unwrap()]);
    std::fs::remove_file(zero_model.join("model.safetensors")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", zero_model.join("model.safetensors")).unwrap();
    for (changed, what) in [
        (format!("tokenizer: pipe.jsonl\n{text}"), "tokenizer: "),
        (
            text.replace("data: sft.jsonl", "data: sft.jsonl, init: zero_model"),
            "model.safetensors is a device",
        ),
    ] {
        std::fs::write(&exp, changed).unwrap();
        let t0 = Instant::now();
        let out = rlhf(&["plan", exp.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(what), "{err}");
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{what} blocked the plan"
        );
    }
    let folder = d.path().join("model");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("notes.txt"), "mine").unwrap();
    let out = rlhf(&["init", "--out", folder.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--force"), "{err}");
    assert!(folder.join("notes.txt").exists());
    let out = rlhf(&["init", "--out", folder.to_str().unwrap(), "--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(folder.join("model.safetensors").exists());
}

/// Folders and files rlhf did not make are refused before anything is
/// touched: a user's folder bearing a stage's name, the task's files, a
/// file named as a model folder; and a run folder's recorded judge is
/// shown, never run.
#[test]
fn what_rlhf_did_not_make_is_left_alone_and_a_run_folder_runs_nothing() {
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path(), "t", "sft");
    let mine = d.path().join("exp/runs/t/sft");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "mine").unwrap();
    let out = rlhf(&["run", exp.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not made by rlhf"),
        "{err}"
    );
    assert!(err.contains(&mine.display().to_string()), "{err}");
    assert_eq!(
        std::fs::read_to_string(mine.join("notes.txt")).unwrap(),
        "mine"
    );
    let out = rlhf(&["run", exp.to_str().unwrap(), "--force"]);
    assert!(!out.status.success(), "--force does not clear it either");
    assert!(mine.join("notes.txt").exists());
    std::fs::remove_dir_all(&mine).unwrap();
    common::rlhf_ok(&["run", exp.to_str().unwrap()]);

    // The task's files: refused without --force, replaced with it.
    let task = d.path().join("task");
    std::fs::create_dir_all(&task).unwrap();
    std::fs::write(task.join("sft.jsonl"), "mine\n").unwrap();
    let out = rlhf(&[
        "task",
        "generate",
        "--out",
        task.to_str().unwrap(),
        "--sft-examples",
        "10",
        "--preference-prompts",
        "10",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--force"), "{err}");
    assert_eq!(
        std::fs::read_to_string(task.join("sft.jsonl")).unwrap(),
        "mine\n"
    );
    assert!(!task.join("prompts.jsonl").exists(), "nothing written");

    // A file named as the model folder: refused, the file as it was.
    let file = d.path().join("model.bin");
    std::fs::write(&file, "weights of mine").unwrap();
    for args in [
        vec!["init", "--out", file.to_str().unwrap()],
        vec!["init", "--out", file.to_str().unwrap(), "--force"],
        vec![
            "merge",
            "--adapter",
            mine.to_str().unwrap(),
            "--out",
            file.to_str().unwrap(),
            "--force",
        ],
    ] {
        let out = rlhf(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("is not a folder"),
            "{args:?}: {err}"
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "weights of mine");
        let hidden = std::fs::read_dir(d.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(".model.bin"))
            .count();
        assert_eq!(hidden, 0, "{args:?} left a hidden copy");
    }

    // A judge recorded in a run folder (from someone else) is not run.
    let run = d.path().join("exp/runs/t");
    let pwned = d.path().join("pwned");
    let judge = serde_json::json!({"command": ["sh", "-c", format!("touch {}", pwned.display())],
        "timeout_seconds": 10.0, "cwd": "/"});
    std::fs::write(run.join("judge.json"), judge.to_string()).unwrap();
    let prompts = d.path().join("prompts.jsonl");
    task_head("prompts.jsonl", &prompts, 2);
    let out = common::eval_quick(&run, &prompts, &["--max-prompts", "2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!pwned.exists(), "the recorded judge ran");
    assert!(
        err.contains("judge.json records") && err.contains("--judge"),
        "{err}"
    );
    // Named on the command line, with quotes as a shell reads them, it runs.
    let script = d.path().join("my judge.py");
    std::fs::write(&script, "import json, sys\nfor l in sys.stdin:\n    print(json.dumps({'scores': [0.5] * len(json.loads(l)['responses'])}), flush=True)\n").unwrap();
    let line = format!("{} '{}'", common::python().display(), script.display());
    let out = common::eval_quick(&run, &prompts, &["--max-prompts", "2", "--judge", &line]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("report/report.json")).unwrap()).unwrap();
    assert!(
        report["judge"].as_str().unwrap().contains("my judge.py"),
        "{}",
        report["judge"]
    );
}

/// Another run's folder can neither stop this run nor slip it weights: a
/// FIFO as a manifest is passed over, a stray file is not copied in, and
/// a checkpoint without its checksum list is not trusted, there or here.
#[test]
fn another_runs_folder_cannot_stop_or_fool_this_run() {
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path(), "a", "sft");
    common::rlhf_ok(&["run", exp.to_str().unwrap()]);
    let runs = d.path().join("exp/runs");
    std::fs::write(runs.join("a/sft/stray.bin"), vec![7u8; 1 << 20]).unwrap();
    std::fs::create_dir_all(runs.join("x/sft")).unwrap();
    assert!(Command::new("mkfifo")
        .arg(runs.join("x/sft/manifest.json"))
        .status()
        .unwrap()
        .success());
    let text = std::fs::read_to_string(&exp).unwrap();
    std::fs::write(&exp, text.replace("name: \"a\"", "name: \"b\"")).unwrap();
    let t0 = Instant::now();
    let out = rlhf(&["run", exp.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "the FIFO blocked the run"
    );
    assert!(err.contains("copied from"), "{err}");
    assert!(
        !runs.join("b/sft/stray.bin").exists(),
        "a stray file was copied"
    );
    assert!(runs.join("b/sft/checkpoint/model.safetensors").exists());

    // This run's own checkpoint without its list: run again, not cached.
    std::fs::remove_file(runs.join("b/sft/checkpoint/checksums.sha256")).unwrap();
    // And the sibling's: not copied either.
    std::fs::remove_file(runs.join("a/sft/checkpoint/checksums.sha256")).unwrap();
    let out = rlhf(&["run", exp.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("no checksums.sha256"), "{err}");
    assert!(!err.contains("copied from"), "{err}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(runs.join("b/sft/manifest.json")).unwrap()).unwrap();
    assert!(manifest.get("copied_from").is_none(), "{manifest}");
    assert!(runs.join("b/sft/checkpoint/checksums.sha256").exists());
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let out = Command::new("pgrep")
        .args(["-af", needle])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains("pgrep"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn two_sigterms_leave_no_stage_or_labeller_running() {
    let d = tempfile::tempdir().unwrap();
    let exp_dir = d.path().join("exp");
    std::fs::create_dir_all(&exp_dir).unwrap();
    task_head("sft.jsonl", &exp_dir.join("sft.jsonl"), 32);
    task_head("preferences.jsonl", &exp_dir.join("prefs.jsonl"), 16);
    task_head("prompts.jsonl", &exp_dir.join("prompts.jsonl"), 16);
    // The labeller never answers; its marker names it in `ps`.
    let marker = format!("hang-{}", std::process::id());
    let exp = exp_dir.join("exp.yaml");
    std::fs::write(
        &exp,
        format!(
            "name: stop\ndevice: cpu\n{MODEL}\nstages:\n\
             \x20 sft: {{kind: sft, data: sft.jsonl, max_steps: 2, batch_size: 4}}\n\
             \x20 rm: {{kind: reward, init: sft, data: prefs.jsonl, max_steps: 2, batch_size: 2}}\n\
             \x20 ppo: {{kind: ppo, policy: sft, reward_model: rm, prompts: prompts.jsonl, iterations: 1, rollout_batch: 4, minibatch_size: 4, sampling: {{max_new_tokens: 4}}}}\n\
             loop: {{repeat: [rm, ppo], rounds: 1, prompts: prompts.jsonl, prompts_per_round: 2, k: 2, sampling: {{max_new_tokens: 4}}, \
             labeller: {{kind: command, command: [sh, -c, 'sleep 600 # {marker}']}}}}\n"
        ),
    )
    .unwrap();
    let runner = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(["run", exp.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut runner = common::Drained::new(runner);
    runner.wait_until("the labeller's start", Duration::from_secs(600), || {
        !processes_mentioning(&marker).is_empty()
    });
    for _ in 0..2 {
        Command::new("kill")
            .args(["-TERM", &runner.id().to_string()])
            .status()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    let (status, stderr) = runner.wait();
    assert_eq!(status.code(), Some(130), "{stderr}");
    // Within the grace period everything the run started is gone.
    let t0 = Instant::now();
    // The runner names the experiment file, a stage its stage.json: both
    // lie in the test's folder.
    let exp_path = d.path().display().to_string();
    loop {
        let left: Vec<String> = processes_mentioning(&marker)
            .into_iter()
            .chain(processes_mentioning(&exp_path))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(8),
            "still running: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The runner killed outright (no signal handler runs): its stage child
/// sees it is gone and stops within twice the grace period.
#[test]
fn a_stage_stops_when_its_runner_is_killed() {
    let d = tempfile::tempdir().unwrap();
    let exp = experiment(d.path(), "orphan", "sft");
    let text = std::fs::read_to_string(&exp).unwrap();
    std::fs::write(&exp, text.replace("max_steps: 2", "max_steps: 1000000")).unwrap();
    let mut runner = spawn_run(&exp, &[]);
    let t0 = Instant::now();
    while !runner.stderr().contains("step 50/1000000") {
        assert!(
            runner.try_wait().is_none() && t0.elapsed() < Duration::from_secs(600),
            "{}",
            runner.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The runner names the experiment file, a stage its stage.json: both
    // lie in the test's folder.
    let exp_path = d.path().display().to_string();
    assert!(
        processes_mentioning(&exp_path).len() >= 2,
        "the runner and its stage: {:?}",
        processes_mentioning(&exp_path)
    );
    runner.kill();
    let t0 = Instant::now();
    loop {
        let left = processes_mentioning(&exp_path);
        if left.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(12),
            "still running: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
