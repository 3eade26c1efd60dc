//! Readiness as the parts of the pipeline report it; stalls, a stage whose
//! oldest unfinished work is older than `[health] max_stall_ms`; and models
//! reported unavailable (their inference calls keep failing).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// A stage of the pipeline that can stall with work waiting on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Score, forecast, event and checkpoint writes.
    Postgres,
    /// Output transactions (records with their offsets).
    Kafka,
    /// The consumer group as a whole: records wait (lag) and no partition's
    /// committed offset moves.
    Consumer,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::Postgres, Stage::Kafka, Stage::Consumer];

    /// The `stage` label of the stall metrics.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Postgres => "postgres",
            Stage::Kafka => "kafka",
            Stage::Consumer => "consumer",
        }
    }

    fn waiting_on(self) -> &'static str {
        match self {
            Stage::Postgres => "a PostgreSQL write has not completed",
            Stage::Kafka => "an output transaction to Kafka has not completed",
            Stage::Consumer => "no partition's committed offset has moved while records wait",
        }
    }
}

/// A stage whose oldest unfinished work is older than the stall limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Stall {
    pub stage: Stage,
    /// How long its oldest unfinished work has waited.
    pub waited: Duration,
}

impl std::fmt::Display for Stall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} stalled: {} for {} s",
            self.stage.name(),
            self.stage.waiting_on(),
            self.waited.as_secs()
        )
    }
}

#[derive(Debug)]
struct State {
    models_loaded: bool,
    partitions_assigned: usize,
    postgres_error: Option<String>,
    /// The last failure publishing outputs to Kafka, until one succeeds.
    kafka_publish_error: Option<String>,
    shutting_down: bool,
    /// Unfinished work per stage (by [`Stage::ALL`] index): when each piece
    /// began, by ticket, so the oldest is the first.
    work: [BTreeMap<u64, Instant>; 3],
    next_ticket: u64,
    /// When the consumer group last made progress (a committed offset
    /// moved) or had nothing waiting; `None` before the first report.
    consumer_progress: Option<Instant>,
    /// The sum of the committed offsets at the last report.
    consumer_committed: Option<i64>,
    /// Older unfinished work than this is a stall.
    max_stall: Duration,
    /// Models whose inference calls keep failing, with why.
    unavailable_models: BTreeMap<String, String>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            models_loaded: false,
            partitions_assigned: 0,
            postgres_error: None,
            kafka_publish_error: None,
            shutting_down: false,
            work: Default::default(),
            next_ticket: 0,
            consumer_progress: None,
            consumer_committed: None,
            max_stall: Duration::from_secs(30),
            unavailable_models: BTreeMap::new(),
        }
    }
}

impl State {
    /// How long each stage's oldest unfinished work has waited, as of `now`.
    fn waiting(&self, now: Instant) -> [Duration; 3] {
        Stage::ALL.map(|stage| {
            let since = match stage {
                Stage::Consumer => self.consumer_progress,
                _ => self.work[stage as usize].values().next().copied(),
            };
            since.map_or(Duration::ZERO, |s| now.saturating_duration_since(s))
        })
    }

    fn stalls(&self, now: Instant) -> Vec<Stall> {
        Stage::ALL
            .into_iter()
            .zip(self.waiting(now))
            .filter(|(_, waited)| *waited > self.max_stall)
            .map(|(stage, waited)| Stall { stage, waited })
            .collect()
    }
}

/// Shared readiness state; each part updates its own piece.
#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<State>,
}

/// A piece of a stage's work in progress; it is done when dropped.
#[must_use = "the work is done when the guard drops"]
pub struct Work {
    health: Arc<Health>,
    stage: Stage,
    ticket: u64,
}

impl Drop for Work {
    fn drop(&mut self) {
        let (stage, ticket) = (self.stage, self.ticket);
        self.health.with(|s| s.work[stage as usize].remove(&ticket));
    }
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

    /// Reports model `model` unavailable, saying why, or (None) available.
    pub fn set_model_unavailable(&self, model: &str, reason: Option<String>) {
        self.with(|s| match reason {
            Some(reason) => s.unavailable_models.insert(model.to_owned(), reason),
            None => s.unavailable_models.remove(model),
        });
    }

    /// Why model `model` is unavailable, if it is.
    pub fn model_unavailable(&self, model: &str) -> Option<String> {
        self.with(|s| s.unavailable_models.get(model).cloned())
    }

    pub fn set_max_stall(&self, max_stall: Duration) {
        self.with(|s| s.max_stall = max_stall);
    }

    /// Marks the start of a piece of `stage`'s work, retries included,
    /// until the returned guard drops.
    pub fn begin(self: &Arc<Self>, stage: Stage) -> Work {
        let ticket = self.with(|s| {
            let ticket = s.next_ticket;
            s.next_ticket += 1;
            s.work[stage as usize].insert(ticket, Instant::now());
            ticket
        });
        Work {
            health: self.clone(),
            stage,
            ticket,
        }
    }

    /// The consumer group's position: `waiting` records behind the ends of
    /// the assigned partitions, `committed` the sum of their committed
    /// offsets. Progress is a change of `committed`, or nothing waiting.
    pub fn set_consumer_position(&self, waiting: i64, committed: i64, now: Instant) {
        self.with(|s| {
            let progressed = s.consumer_committed != Some(committed);
            s.consumer_committed = Some(committed);
            if waiting <= 0 || progressed || s.consumer_progress.is_none() {
                s.consumer_progress = (waiting > 0).then_some(now);
            }
        });
    }

    /// How long each stage of [`Stage::ALL`] has had work waiting, and the
    /// stages stalled, as of `now`.
    pub fn stages(&self, now: Instant) -> ([Duration; 3], Vec<Stall>) {
        self.with(|s| (s.waiting(now), s.stalls(now)))
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
            reasons.extend(
                s.unavailable_models
                    .iter()
                    .map(|(model, why)| format!("model {model} is unavailable: {why}")),
            );
            reasons.extend(s.stalls(Instant::now()).iter().map(Stall::to_string));
            if reasons.is_empty() {
                Ok(())
            } else {
                Err(reasons)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(max_stall_s: u64) -> Arc<Health> {
        let health = Arc::new(Health::default());
        health.set_max_stall(Duration::from_secs(max_stall_s));
        health
    }

    #[test]
    fn unfinished_work_older_than_the_limit_is_a_stall() {
        let health = health(30);
        let write = health.begin(Stage::Postgres);
        let now = Instant::now();
        let (waiting, stalls) = health.stages(now + Duration::from_secs(10));
        assert!(waiting[Stage::Postgres as usize] >= Duration::from_secs(10));
        assert!(stalls.is_empty(), "10 s is within the limit");
        let (_, stalls) = health.stages(now + Duration::from_secs(31));
        assert_eq!(stalls.len(), 1);
        assert_eq!(stalls[0].stage, Stage::Postgres);
        assert!(stalls[0].to_string().starts_with("postgres stalled"));
        drop(write);
        let (waiting, stalls) = health.stages(now + Duration::from_secs(31));
        assert_eq!(
            waiting,
            [Duration::ZERO; 3],
            "nothing waits once it is done"
        );
        assert!(stalls.is_empty());
    }

    #[test]
    fn the_oldest_unfinished_work_counts() {
        let health = health(30);
        let first = health.begin(Stage::Kafka);
        let now = Instant::now();
        let second = health.begin(Stage::Kafka);
        drop(second);
        let (waiting, _) = health.stages(now + Duration::from_secs(5));
        assert!(waiting[Stage::Kafka as usize] >= Duration::from_secs(5));
        drop(first);
    }

    #[test]
    fn the_consumer_stalls_when_records_wait_and_nothing_is_committed() {
        let health = health(30);
        let t0 = Instant::now();
        health.set_consumer_position(0, 100, t0);
        health.set_consumer_position(50, 100, t0 + Duration::from_secs(1));
        health.set_consumer_position(80, 100, t0 + Duration::from_secs(20));
        let (_, stalls) = health.stages(t0 + Duration::from_secs(30));
        assert!(stalls.is_empty(), "waiting 29 s, within the limit");
        let (_, stalls) = health.stages(t0 + Duration::from_secs(32));
        assert_eq!(stalls.first().map(|s| s.stage), Some(Stage::Consumer));
        // A committed offset moves: progress, the wait starts again.
        health.set_consumer_position(60, 120, t0 + Duration::from_secs(32));
        let (_, stalls) = health.stages(t0 + Duration::from_secs(40));
        assert!(stalls.is_empty());
        // Nothing waits: no stall however long nothing is committed.
        health.set_consumer_position(0, 180, t0 + Duration::from_secs(41));
        health.set_consumer_position(0, 180, t0 + Duration::from_secs(100));
        let (waiting, stalls) = health.stages(t0 + Duration::from_secs(200));
        assert_eq!(waiting[Stage::Consumer as usize], Duration::ZERO);
        assert!(stalls.is_empty());
    }

    #[test]
    fn readiness_names_an_unavailable_model_until_it_is_available_again() {
        let health = health(30);
        health.set_models_loaded(true);
        health.set_partitions_assigned(1);
        health.set_model_unavailable("smap_A-1", Some("inference failed 3 times".into()));
        let reasons = health.readiness().unwrap_err();
        assert_eq!(
            reasons,
            ["model smap_A-1 is unavailable: inference failed 3 times"]
        );
        assert_eq!(
            health.model_unavailable("smap_A-1").as_deref(),
            Some("inference failed 3 times")
        );
        assert_eq!(health.model_unavailable("smap_E-2"), None);
        health.set_model_unavailable("smap_A-1", None);
        assert_eq!(health.readiness(), Ok(()));
        assert_eq!(health.model_unavailable("smap_A-1"), None);
    }

    #[test]
    fn readiness_names_the_stalled_stage() {
        let health = health(0);
        health.set_models_loaded(true);
        health.set_partitions_assigned(1);
        assert_eq!(health.readiness(), Ok(()));
        let _write = health.begin(Stage::Postgres);
        std::thread::sleep(Duration::from_millis(5));
        let reasons = health.readiness().unwrap_err();
        assert_eq!(reasons.len(), 1);
        assert!(reasons[0].contains("postgres stalled"), "{reasons:?}");
    }
}
