//! Command line: `run`, `check`, `demo`, `spool inspect`, `--version`.
//!
//! Exit codes: 0 ok, 1 invalid config or runtime failure (or corruption found
//! by `spool inspect --verify`), 2 usage error. Errors are one line each on
//! stderr, never a panic or a backtrace.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Parser, Subcommand};

use crate::config::Config;
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
    /// Run the daemon.
    Run {
        /// Config file (.toml, .yaml or .json).
        #[arg(short, long, value_name = "PATH")]
        config: PathBuf,
    },
    /// Validate a config and print it normalized, with secrets redacted.
    Check {
        /// Config file (.toml, .yaml or .json).
        #[arg(short, long, value_name = "PATH")]
        config: PathBuf,
    },
    /// Run a self-contained demo on loopback: two sinks, the router, a load,
    /// an outage of the backup and its recovery.
    Demo {
        /// Seconds of load (the backup is down for part of it).
        #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u64).range(6..=120))]
        seconds: u64,
    },
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
        Command::Run { config } => run(&config),
        Command::Check { config } => check(&config),
        Command::Demo { seconds } => demo(seconds),
        Command::Spool {
            command: SpoolCommand::Inspect { dir, verify },
        } => spool_inspect(&dir, verify),
    }
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    for line in message.to_string().lines() {
        eprintln!("forkd: {line}");
    }
    ExitCode::from(1)
}

fn runtime() -> Result<tokio::runtime::Runtime, std::io::Error> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("forkd")
        .build()
}

fn run(path: &Path) -> ExitCode {
    // Validate before anything else so a bad config never binds a port.
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    crate::logging::init(&config.raw.log.level, config.raw.log.format);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    match rt.block_on(crate::app::run(path.to_path_buf())) {
        Ok(()) => ExitCode::SUCCESS,
        // One line, not a log event and the same text again.
        Err(e) => fail(e),
    }
}

fn check(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            for w in &config.warnings {
                eprintln!("warning: {w}");
            }
            print!("{}", config.normalized_redacted());
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn demo(seconds: u64) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    match rt.block_on(crate::demo::run(std::time::Duration::from_secs(seconds))) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => fail(e),
    }
}

fn spool_inspect(dir: &Path, verify: bool) -> ExitCode {
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
        Err(e) => fail(e),
    }
}
