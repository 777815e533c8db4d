//! One module per subcommand.

mod generate;
mod init;
mod score;

use crate::cli::Command;

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init(args) => init::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Score(args) => score::run(args),
    }
}
