//! forkd — an ingestion fork router daemon.
//!
//! forkd sits between telemetry producers and the *data products* that ingest
//! their data, one per cloud region, and keeps ingestion alive through the loss
//! of a region: it forks every request to a primary and a backup target
//! (active-active) or sends it to the one active target (active-passive), and
//! keeps a bounded, crash-safe, per-target spool on disk while a target is
//! unreachable, delivering it in order when the target returns.
//!
//! # Map
//!
//! The request path has few hops:
//!
//! ```text
//!  client ─▶ server ─▶ fork ─┬─▶ target "primary" ─▶ upstream
//!                            │        └─ spool (when down or backlogged)
//!                            └─▶ target "backup"  ─▶ upstream
//!                                     └─ spool
//! ```
//!
//! - [`spool`]: the storage engine. A segment log per target directory with a
//!   group-commit writer thread, a durable cursor, crash recovery, bounds
//!   with admission by reservation, and a `rejected/` area. Synchronous
//!   (std::fs), tested on its own; its byte layout is in its module doc.
//! - [`cli`]: the command line (`forkd spool inspect`, `forkd --version`).
//!
//! Still to come, per `docs/` and the open issues: `server` (hyper listener
//! and limits), `fork` (target selection, body budget, admission, the answer),
//! `target` (per-target state machine, upstream client, retries, delivery
//! worker), `config`, `admin`, `metrics` and `app` (wiring and shutdown).

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod demo;
pub mod fork;
pub mod logging;
pub mod metrics;
pub mod proxy_headers;
pub mod rand;
pub mod server;
pub mod sink;
pub mod spool;
pub mod target;
pub mod tls;
pub mod upstream;
