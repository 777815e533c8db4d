//! `rlhf`: parse, run, map the error to an exit code.

mod artifact;
mod children;
mod cli;
mod commands;
mod config;
mod dag;
mod jsonl;
mod labeller;
mod lock;
mod report;
mod runner;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    cli::init_logging(cli.verbose);
    // Ctrl-C (or SIGTERM): training stops after the current step with a
    // checkpoint, so a rerun continues; a second Ctrl-C stops at once.
    let _ = ctrlc::set_handler(|| {
        if rlhf_stages::train::interrupt_requested() {
            eprintln!("interrupt again: stopping every stage now");
            children::stop_all();
            std::process::exit(130);
        }
        eprintln!("interrupt: stopping after the current step (Ctrl-C again to stop now)");
        rlhf_stages::train::request_interrupt();
    });
    match commands::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if rlhf_stages::train::interrupt_requested() {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
