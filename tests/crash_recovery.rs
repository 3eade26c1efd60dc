//! `kill -9` at random moments during a replay, a restart after each: the
//! tables and the `anomalies` topic end up as those of a run that was never
//! interrupted, which consumes the same records at the same time (its own
//! consumer group, database and output topics).

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Rows 0..5400 of these hold six anomalies that satwatch detects (P-4 x3,
/// T-3 x2, A-1), so kills land before, inside and after open events.
const CHANNELS: &str = "A-1,P-4,T-3";
const START: i64 = 0;
const ROWS: i64 = 5400;
/// Slow enough that every kill lands mid-replay (about 30 s of it).
const RATE: u32 = 500;

/// As a deployment gives an instance (a StatefulSet's pod name): the restart
/// registers the same `transactional.id`, which aborts at once the
/// transaction the killed process left open.
const STABLE_ID: &[(&str, &str)] = &[("SATWATCH_TRANSACTIONAL_ID", "crashed-instance")];

/// A small deterministic generator for the kill moments (xorshift64).
struct Moments(u64);

impl Moments {
    fn next_ms(&mut self, low: u64, high: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        low + self.0 % (high - low)
    }
}

#[test]
fn kill_9_at_random_moments_leaves_the_same_rows_and_events_as_an_uninterrupted_run() {
    let broker = Broker::start();
    let mut pg = Postgres::start();
    let logs = tempfile::tempdir().unwrap();
    let reference_url = pg.create_database("reference");
    let crashed = group_pipeline(logs.path(), "crashed", "", 1500);
    let reference = group_pipeline(logs.path(), "reference", "reference.", 1500);
    for p in [&crashed, &reference] {
        let p = p.to_str().unwrap();
        satwatch(&["topics", "--pipeline", p, "--partitions", "3"], &broker);
    }
    let reference_run = Satwatch::start_with(&broker, &reference_url, &reference, logs.path(), &[]);
    let mut service = Satwatch::start_with(&broker, &pg.url(), &crashed, logs.path(), STABLE_ID);

    let addr = broker.addr();
    let replay = std::thread::spawn(move || replay_paced(&addr, CHANNELS, START, ROWS, Some(RATE)));
    let started = Instant::now();
    let mut moments = Moments(0x5eed_2026_1122);
    let mut kills = Vec::new();
    for kill in 1..=6 {
        assert!(
            !replay.is_finished(),
            "kill {kill} would land after the replay"
        );
        let scored_before = pg.count("SELECT count(*) FROM scores");
        match kill {
            // Mid-write: PostgreSQL is down, so the sink is holding a batch
            // and retrying it when the process dies.
            3 => {
                std::thread::sleep(Duration::from_millis(moments.next_ms(200, 600)));
                pg.stop();
                std::thread::sleep(Duration::from_millis(800));
                service.kill();
                pg.resume();
            }
            // Right after the restart is ready: mid-restore, while windows
            // refill from Kafka.
            5 => service.kill(),
            // Anywhere, with batches in the batcher, the backend and the sink.
            _ => {
                std::thread::sleep(Duration::from_millis(moments.next_ms(300, 1500)));
                service.kill();
            }
        }
        kills.push((kill, started.elapsed(), scored_before));
        service = Satwatch::start_with(&broker, &pg.url(), &crashed, logs.path(), STABLE_ID);
    }
    replay.join().unwrap();
    eprintln!("kills (n, when, scores rows before): {kills:?}");

    let expected = 3 * (ROWS - window());
    wait_for_scores(
        &pg,
        expected,
        "the crashed run to score everything",
        Duration::from_secs(120),
    );
    wait_for(
        "the reference run to score everything",
        Duration::from_secs(120),
        || (pg.count_in("reference", "SELECT count(*) FROM scores") == expected).then_some(()),
    );
    assert!(service.terminate(Duration::from_secs(30)).success());
    assert!(reference_run.terminate(Duration::from_secs(30)).success());

    let checked = assert_same_outputs_as_reference(&pg, &broker, CHANNELS, START, ROWS, window());
    eprintln!("checked after {} kills: {checked:?}", kills.len());
}
