//! `rlhf`: parse, run, map the error to an exit code.

mod cli;
mod commands;
mod exec;
mod experiment;
mod label;
mod plan;
mod report;
mod reward_server;
mod run_folder;
mod threads;
mod watch;

use std::process::ExitCode;

use clap::Parser;

/// The system allocator, with a memory bound on chat-template renderings.
#[global_allocator]
static ALLOCATOR: rlhf_datasets::render_guard::BoundedAlloc =
    rlhf_datasets::render_guard::BoundedAlloc;

/// A line on stderr, or nothing where stderr is gone.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    cli::init_logging(cli.verbose);
    if let Err(e) = threads::init(cli.threads) {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    // Ctrl-C (or SIGTERM): training stops after the current step with a
    // checkpoint, so a rerun continues; a second Ctrl-C stops at once.
    // Messages here never panic on a closed stderr (a runner that died
    // took it along): the stop must happen all the same.
    let _ = ctrlc::set_handler(|| {
        if rlhf_stages::train::interrupt_requested() {
            say("interrupt again: stopping every stage now");
            exec::children::stop_all();
            std::process::exit(130);
        }
        say("interrupt: stopping after the current step (Ctrl-C again to stop now)");
        rlhf_stages::train::request_interrupt();
    });
    match commands::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(&format!("error: {}", error_chain(&e)));
            if rlhf_stages::train::interrupt_requested() {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error and its causes joined by ": ", leaving out a cause its
/// wrapper already quotes (`{path}: {source}` errors would say it twice).
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if !text.ends_with(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cause_already_quoted_is_not_repeated() {
        let io = std::io::Error::from_raw_os_error(17);
        let e = anyhow::Error::new(io).context("cannot write f/m: File exists (os error 17)");
        assert_eq!(
            super::error_chain(&e),
            "cannot write f/m: File exists (os error 17)"
        );
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(super::error_chain(&e), "outer: inner");
    }
}
