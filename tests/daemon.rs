#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! In-process integration tests of the forkd daemon against SPEC.md: a real
//! forkd (`app::start`) between in-process sinks, driven over HTTP.
//!
//! Modules follow SPEC.md's sections:
//! - `request`: "What a request gets" (methods, body, admission, headers and
//!   URL, outcomes and the answer, h2c, auth tokens);
//! - `delivery`: Durability, Order, Duplicates and "Target states";
//! - `switching`: "Switching and reload", and "Shutdown";
//! - `admin`: "Admin endpoints" and "Metrics";
//! - `contract`: promises across those sections not covered above
//!   (`secondary_wait` bounding the client's wait, the oldest-record age,
//!   the in-flight budget of chunked bodies, the gauges while draining, the
//!   mode of `routing.state`).
//!
//! No sleep is used to synchronise and nothing asserts a duration: tests poll
//! for a condition with a deadline (`common::wait_for`).

#[path = "common/mod.rs"]
mod common;

#[path = "daemon/admin.rs"]
mod admin;
#[path = "daemon/contract.rs"]
mod contract;
#[path = "daemon/delivery.rs"]
mod delivery;
#[path = "daemon/request.rs"]
mod request;
#[path = "daemon/switching.rs"]
mod switching;
