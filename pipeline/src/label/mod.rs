//! `rlhf label`: people rank a round's sampled answers in a web page.
//!
//! The queue's HTTP service and page, per-labeller tokens, and export
//! to / import from Label Studio and Argilla. `serve` binds 127.0.0.1 by default; every request needs a
//! labeller's token (`Authorization: Bearer TOKEN`, or `?token=` for the
//! page itself); a submission is checked by the queue and refused with a
//! 4xx that changes nothing. Programs that rank (`programs`: the bundled
//! task's gold judge, or a user's command speaking JSON lines) live here
//! too, and a loop round's collection stage (`collect`: sample, rank,
//! write the round's rankings). The queue itself is
//! `rlhf_datasets::labels`.
//!
//! It imports experiment (the labeller's settings), run_folder and
//! exec's process groups.

mod collect;
mod exchange;
pub mod page;
pub mod programs;
mod server;
mod tokens;

pub use exchange::{export, import};

pub use server::{serve, serve_until_labelled, ServeOptions, GUIDELINES_FILE};
pub use tokens::add_token;

/// A queue folder, or a round's folder holding one in `queue/`.
pub fn queue_dir(path: &std::path::Path) -> std::path::PathBuf {
    let inner = path.join(crate::run_folder::QUEUE_DIR);
    let groups = rlhf_datasets::labels::GROUPS_FILE;
    if !path.join(groups).exists() && inner.join(groups).exists() {
        inner
    } else {
        path.to_owned()
    }
}
