//! What most integration tests start with: a broker, a database and
//! `satwatch run` on them.

use super::{satwatch, Broker, Postgres, Satwatch, SMAP_PIPELINE};

/// What most integration tests start with: a broker with satwatch's topics
/// (`partitions` each), a database, and `satwatch run` on them, ready.
pub struct Stack {
    pub broker: Broker,
    pub pg: Postgres,
    pub service: Satwatch,
    /// Holds satwatch's log file for the test's lifetime.
    pub logs: tempfile::TempDir,
}

impl Stack {
    pub fn start(partitions: u32) -> Self {
        let broker = Broker::start();
        let pg = Postgres::start();
        let logs = tempfile::tempdir().expect("temp dir");
        let partitions = partitions.to_string();
        satwatch(
            &[
                "topics",
                "--pipeline",
                SMAP_PIPELINE,
                "--partitions",
                &partitions,
            ],
            &broker,
        );
        let service = Satwatch::start(&broker, &pg, logs.path(), &[]);
        Self {
            broker,
            pg,
            service,
            logs,
        }
    }
}
