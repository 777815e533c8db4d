//! Where stages run. The runner walks the plan and keys each stage (`key`:
//! its settings, input hashes and upstream keys) to skip what is done or
//! copy it from a sibling run (`sibling_cache`). A stage runs as child
//! processes on this machine (`spawn`: one, or N ranks) or as a Slurm job
//! (`slurm`); `children` keeps their process groups, so that a second
//! Ctrl-C ends them all and a child whose runner died stops.
//!
//! It imports experiment, plan and run_folder; label borrows `children`
//! for its labelling programs; commands drive it.

pub mod children;
pub mod key;
pub mod planned;
pub mod runner;
pub mod sibling_cache;
pub mod slurm;
pub mod spawn;

use anyhow::Context;

/// The running binary, for stage children. On Linux `/proc/self/exe`: it
/// stays valid when the file is replaced mid-run (a rebuild, an upgrade),
/// where `current_exe()` names a deleted path, and every stage of a run
/// keeps the runner's code.
pub(crate) fn own_binary() -> anyhow::Result<std::path::PathBuf> {
    let proc_exe = std::path::Path::new("/proc/self/exe");
    if proc_exe.exists() {
        return Ok(proc_exe.to_owned());
    }
    std::env::current_exe().context("locating the rlhf binary")
}
