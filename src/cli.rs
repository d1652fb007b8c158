//! Command line: `forkd spool inspect`, `forkd --version`.
//!
//! Exit codes: 0 ok, 1 runtime failure (or corruption found by `--verify`),
//! 2 usage error. Errors are one line on stderr.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Parser, Subcommand};

use crate::spool::inspect;

/// forkd: ingestion fork router with a crash-safe per-target spool.
#[derive(Debug, Parser)]
#[command(name = "forkd", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Spool maintenance.
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum SpoolCommand {
    /// Report records, bytes, oldest record age, segments and rejected records
    /// per target. Read-only and lock-free: safe beside a running daemon.
    Inspect {
        /// A `buffer.dir` (one sub-directory per target) or one target's directory.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Check every record's checksum; exit 1 if any record is corrupt.
        #[arg(long)]
        verify: bool,
    },
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Command::Spool {
            command: SpoolCommand::Inspect { dir, verify },
        } => spool_inspect(&dir, verify),
    }
}

fn spool_inspect(dir: &std::path::Path, verify: bool) -> ExitCode {
    match inspect::inspect(dir, verify) {
        Ok(report) => {
            print!("{}", inspect::render(&report, SystemTime::now()));
            if verify && report.corrupt() {
                eprintln!("forkd: corrupt records found in {}", dir.display());
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("forkd: {e}");
            ExitCode::from(1)
        }
    }
}
