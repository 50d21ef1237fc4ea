//! `volumectl`: the command-line client of volume-daemon's REST API (see `volumectl --help` for the commands
//! and the exit codes, and docs/operations.md).

mod cli;
mod client;
mod commands;
mod error;
mod progress;
mod render;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use crate::error::{CliError, Exit};

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)
        .and_then(|rt| rt.block_on(commands::run(cli)));
    match result {
        Ok(()) => Exit::Ok.into(),
        Err(e) => {
            // The message may quote the daemon or the cloud: control characters are shown escaped. A closed or
            // full standard error must not turn the documented exit code into a panic's.
            let msg = render::printable(&volume_api::error_chain(&e), true);
            let _ = writeln!(std::io::stderr().lock(), "volumectl: {msg}");
            e.exit().into()
        }
    }
}
