//! Everything satwatch keeps in PostgreSQL, in one room.
//!
//! - [`connection`]: the connection settings and TLS, parsed once, that every
//!   connection goes through; the readiness probe.
//! - [`schema`]: the migrations, applied at start.
//! - [`writer`]: batched, idempotent writes of scores, forecasts and events.
//! - [`checkpoints`]: each channel's detector state, written after its
//!   records' offsets are committed and read when its partition is assigned.

pub mod checkpoints;
pub mod connection;
pub mod schema;
pub mod writer;

pub use checkpoints::{load_checkpoints, StoredCheckpoint};
pub use connection::{PgConnector, PgError, Probe};
pub use schema::{migrate, MIGRATIONS};
pub use writer::PgWriter;
