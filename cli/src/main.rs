//! `kvsctl`: kvstore's command line (see `docs/cli.md`).
//!
//! - [`args`]: the command line (clap);
//! - [`session`]: endpoints with fail-over, the cluster token, the causal context file;
//! - [`commands`]: one function per command;
//! - [`render`]: what is printed, as tables or JSON (pure);
//! - [`members`]: naming the members of a resized cluster (pure);
//! - [`progress`]: progress bars of long work;
//! - [`error`]: errors and their exit codes.

mod args;
mod commands;
mod error;
mod members;
mod progress;
mod render;
mod session;

use args::{BackupAction, BackupArgs, Cli, Command};
use clap::{CommandFactory, Parser};
use error::CliError;
use session::{ContextFile, Session};
use std::process::ExitCode;

async fn run(cli: Cli) -> Result<(), CliError> {
    let output = cli.global.output;
    match &cli.command {
        Command::Completion { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "kvsctl", &mut std::io::stdout());
            return Ok(());
        }
        // Verifying reads the backup only: no cluster, so no endpoint or token is needed.
        Command::Backup(BackupArgs { action: Some(BackupAction::Verify { url }), .. }) => {
            return commands::verify(output, url).await;
        }
        _ => {}
    }
    let session = Session::new(&cli.global)?;
    match cli.command {
        Command::Get { key, session: s } => {
            commands::get(&session, output, &key, &ContextFile::new(s.context_file)).await
        }
        Command::Put { key, value, session: s } => {
            commands::put(&session, output, &key, &value, &ContextFile::new(s.context_file)).await
        }
        Command::Del { key, session: s } => {
            commands::del(&session, output, &key, &ContextFile::new(s.context_file)).await
        }
        Command::Status { no_wait } => commands::status(&session, output, no_wait).await,
        Command::Plan(args) => commands::plan(&session, output, &args).await,
        Command::Backup(BackupArgs { to: Some(to), cluster_name, .. }) => {
            commands::backup(&session, output, &to, cluster_name).await
        }
        Command::Backup(_) => {
            Err(CliError::Invalid("say where: kvsctl backup --to URL, or kvsctl backup verify URL".into()))
        }
        Command::Restore { from, overwrite } => commands::restore(&session, output, &from, overwrite).await,
        Command::Completion { .. } => Ok(()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("kvsctl: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvsctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
