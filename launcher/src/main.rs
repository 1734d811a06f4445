//! `deberta`: the single user-facing command.
//!
//! Exit codes: 0 success; 2 a problem with the user's input (config, checkpoint, ids, flags),
//! reported in one message that names the file, field or tensor; 1 anything else.

mod cli;
mod commands;
mod data_cmds;
mod launch;
mod plan;
mod supervise;

// The loader's "no prediction" label must be the model loss's ignore index.
const _: () = assert!(deberta_data::masking::IGNORE_LABEL == deberta_model::IGNORE_INDEX);

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match commands::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            if commands::is_user_error(&err) {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
