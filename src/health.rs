//! Readiness as the parts of the pipeline report it.

use std::sync::Mutex;

#[derive(Debug, Default)]
struct State {
    models_loaded: bool,
    partitions_assigned: usize,
    postgres_error: Option<String>,
    /// The last failure publishing outputs to Kafka, until one succeeds.
    kafka_publish_error: Option<String>,
    shutting_down: bool,
}

/// Shared readiness state; each part updates its own piece.
#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<State>,
}

impl Health {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().expect("health updates never panic"))
    }

    pub fn set_models_loaded(&self, loaded: bool) {
        self.with(|s| s.models_loaded = loaded);
    }

    pub fn set_partitions_assigned(&self, count: usize) {
        self.with(|s| s.partitions_assigned = count);
    }

    pub fn set_postgres(&self, error: Option<String>) {
        self.with(|s| s.postgres_error = error);
    }

    pub fn set_kafka_publish(&self, error: Option<String>) {
        self.with(|s| s.kafka_publish_error = error);
    }

    pub fn set_shutting_down(&self) {
        self.with(|s| s.shutting_down = true);
    }

    /// `Ok` when ready; otherwise every reason it is not.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        self.with(|s| {
            let mut reasons = Vec::new();
            if s.shutting_down {
                reasons.push("shutting down".to_string());
            }
            if !s.models_loaded {
                reasons.push("models are not loaded".to_string());
            }
            if s.partitions_assigned == 0 {
                reasons.push("no Kafka partitions are assigned".to_string());
            }
            if let Some(err) = &s.postgres_error {
                reasons.push(format!("PostgreSQL is unreachable: {err}"));
            }
            if let Some(err) = &s.kafka_publish_error {
                reasons.push(format!("publishing outputs to Kafka fails: {err}"));
            }
            if reasons.is_empty() {
                Ok(())
            } else {
                Err(reasons)
            }
        })
    }
}
