//! Real services for integration tests, one concern to a file:
//!
//! - [`kafka`]: Apache Kafka, one node or a cluster, on free loopback ports;
//!   reading topics back and the group's committed offsets.
//! - [`postgres`]: a throwaway PostgreSQL server and queries against it.
//! - [`process`]: the satwatch binary, as a `satwatch run` child process or
//!   a subcommand run to completion.
//! - [`stack`]: the broker, database and `satwatch run` most tests start with.
//! - [`fixtures`]: the shipped SMAP pipeline and model repository, and
//!   variants of them.
//! - [`smap`]: replaying rows of the SMAP test split.
//! - [`outputs`]: what satwatch wrote to PostgreSQL and the output topics.
//! - [`reference`]: comparing a disturbed run with an undisturbed reference.
//! - [`net`]: free ports and plain HTTP requests.
//! - [`wait`]: waiting on a condition with a deadline.
//!
//! Each test gets its own broker and database, so tests run in parallel and
//! faults injected in one (stopping PostgreSQL, killing satwatch) stay there.

#![allow(dead_code)] // Each test binary uses a different part of the harness.

mod fixtures;
mod kafka;
mod net;
mod outputs;
mod postgres;
mod process;
mod reference;
mod smap;
mod stack;
mod wait;

// Tests name the helpers as `common::name`, whatever file they live in.
#[allow(unused_imports)]
pub use {
    fixtures::*, kafka::*, net::*, outputs::*, postgres::*, process::*, reference::*, smap::*,
    stack::*, wait::*,
};
