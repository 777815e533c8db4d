//! One module per subcommand (`cli` declares them), and the JSON-lines
//! input of those that take texts (`jsonl`). Commands may import every
//! other room; no room imports them.

mod bench;
mod check_template;
mod eval;
mod generate;
mod init;
pub mod jsonl;
mod judge;
mod merge;
mod plan;
mod reward;
mod samples;
mod score;
mod stage;
mod task;

use crate::cli::Command;

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init(args) => init::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Label(cmd) => label(cmd),
        Command::Generate(args) => generate::run(args),
        Command::Score(args) => score::run(args),
        Command::Reward(args) => reward::run(args),
        Command::Stage(args) => stage::run(args),
        Command::Run(args) => plan::run(args),
        Command::Plan(args) => plan::plan(args),
        Command::Judge(args) => judge::run(args),
        Command::CheckTemplate { model } => check_template::run(&model),
        Command::Eval(args) => eval::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Samples(args) => samples::run(args),
        Command::Task(cmd) => task::run(cmd),
        Command::Watch { run, bind } => crate::watch::serve(run, bind),
    }
}

fn label(cmd: crate::cli::LabelCommand) -> anyhow::Result<()> {
    use crate::cli::LabelCommand;
    use crate::label::queue_dir;
    match cmd {
        LabelCommand::Serve {
            queue,
            bind,
            labels_per_group,
            until_done,
            guidelines,
        } => {
            let options = crate::label::ServeOptions {
                bind,
                labels_per_group,
                guidelines,
            };
            crate::label::serve(queue_dir(&queue), &options, until_done)
        }
        LabelCommand::Export { queue, format, out } => {
            crate::label::export(&queue_dir(&queue), format.into(), &out)
        }
        LabelCommand::Import {
            queue,
            format,
            file,
        } => crate::label::import(&queue_dir(&queue), format.into(), &file),
        LabelCommand::Token { name, queue } => {
            println!("{}", crate::label::add_token(&queue_dir(&queue), &name)?);
            Ok(())
        }
    }
}

#[cfg(test)]
mod registered_kind_tests;
