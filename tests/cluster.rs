//! Broker faults on a three-node Apache Kafka cluster, as users run it:
//! replication factor 3, `min.insync.replicas` 2, producers with
//! `acks=all`. Each test replays at a steady rate while a fault happens,
//! and checks the run against a reference run that consumes the same records
//! (its own group, database and output topics, on the same cluster): every
//! score row, forecast and event the same, and each `anomalies` and
//! `forecasts` record seen exactly once by a `read_committed` consumer.
//!
//! Each test prints how long the fault stalled the pipeline: the longest
//! time during the replay in which no score row was added (`--nocapture`).

mod common;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use common::*;

/// Rows 0..5400 of these hold anomalies that satwatch detects, so faults
/// land before, inside and after open events.
const CHANNELS: &str = "A-1,P-4,T-3";
const ROWS: i64 = 5400;
/// About 54 s of replay: long enough for a fault and its recovery.
const RATE: u32 = 300;
/// About 108 s: three restarts take 40 to 50 s on a loaded two-core machine
/// (a controlled shutdown, a JVM start, and a pause to catch up each), and
/// an instance stopped while a broker is down can take 20 s to drain.
const ROLLING_RATE: u32 = 150;

/// Three JVMs each: one cluster at a time on a two-core machine.
static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The scores table's row count, sampled every 100 ms while the replay runs.
struct StallMeter {
    samples: Arc<Mutex<Vec<(Instant, i64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StallMeter {
    fn start(pg: &Postgres) -> Self {
        let url = pg.url();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(connection);
                while !st.load(Ordering::Relaxed) {
                    let n: i64 = client
                        .query_one("SELECT count(*) FROM scores", &[])
                        .await
                        .unwrap()
                        .get(0);
                    s.lock().unwrap().push((Instant::now(), n));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        });
        Self {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// The longest stretch between `from` and `to` in which the row count
    /// did not move, as text (the meter samples every 100 ms).
    fn longest_stall(&self, from: Instant, to: Instant) -> String {
        let stall = self.longest_stall_duration(from, to);
        if stall < Duration::from_millis(100) {
            "< 0.1 s".into()
        } else {
            format!("{:.1} s", stall.as_secs_f64())
        }
    }

    fn longest_stall_duration(&self, from: Instant, to: Instant) -> Duration {
        let samples = self.samples.lock().unwrap();
        let mut longest = Duration::ZERO;
        let mut since: Option<(Instant, i64)> = None;
        for &(at, n) in samples.iter().filter(|(at, _)| *at >= from && *at <= to) {
            match since {
                Some((start, count)) if count == n => {
                    longest = longest.max(at - start);
                }
                _ => since = Some((at, n)),
            }
        }
        longest
    }
}

impl Drop for StallMeter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A cluster, a database with a reference database beside it, the topics
/// (3 partitions, replication factor 3), and two pipelines: the one under
/// test (group `faulted`) and the reference (group `reference`).
struct Setup {
    broker: Broker,
    pg: Postgres,
    logs: tempfile::TempDir,
    faulted: std::path::PathBuf,
    reference: Satwatch,
}

impl Setup {
    fn start() -> Self {
        let broker = Broker::start_cluster();
        let pg = Postgres::start();
        let logs = tempfile::tempdir().unwrap();
        let reference_url = pg.create_database("reference");
        let faulted = group_pipeline(logs.path(), "faulted", "", 6000);
        let reference = group_pipeline(logs.path(), "reference", "reference.", 6000);
        for p in [&faulted, &reference] {
            let p = p.to_str().unwrap();
            satwatch(
                &[
                    "topics",
                    "--pipeline",
                    p,
                    "--partitions",
                    "3",
                    "--replication-factor",
                    "3",
                ],
                &broker,
            );
        }
        let reference = Satwatch::start_with(&broker, &reference_url, &reference, logs.path(), &[]);
        Self {
            broker,
            pg,
            logs,
            faulted,
            reference,
        }
    }

    fn start_faulted(&self, transactional_id: &str) -> Satwatch {
        Satwatch::start_with(
            &self.broker,
            &self.pg.url(),
            &self.faulted,
            self.logs.path(),
            &[("SATWATCH_TRANSACTIONAL_ID", transactional_id)],
        )
    }

    fn replay(&self, rate: u32) -> std::thread::JoinHandle<String> {
        let addr = self.broker.addr();
        std::thread::spawn(move || replay_paced(&addr, CHANNELS, 0, ROWS, Some(rate)))
    }

    /// Waits until both runs have scored everything, stops them, and
    /// compares.
    fn finish(self, services: Vec<Satwatch>) -> Compared {
        for service in &services {
            let renewals = service
                .log_text()
                .matches("transactional producer was fenced")
                .count();
            eprintln!(
                "{}: renewed its fenced producer {renewals} time(s)",
                service.http
            );
        }
        let expected = 3 * (ROWS - window());
        let deadline = Instant::now() + Duration::from_secs(180);
        while scored(&self.pg) != expected {
            if Instant::now() > deadline {
                for service in &services {
                    let log = service.log_text();
                    let tail: Vec<&str> = log.lines().rev().take(40).collect();
                    eprintln!(
                        "{}: ready = {:?}; the end of its log:\n{}",
                        service.http,
                        service.get("/v2/health/ready"),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                panic!(
                    "timed out after 180 s waiting for the faulted run to score everything: {} of {expected}",
                    scored(&self.pg)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        wait_for(
            "the reference run to score everything",
            Duration::from_secs(180),
            || {
                (self.pg.count_in("reference", "SELECT count(*) FROM scores") == expected)
                    .then_some(())
            },
        );
        for service in services {
            assert!(service.terminate(Duration::from_secs(180)).success());
        }
        assert!(self.reference.terminate(Duration::from_secs(180)).success());
        assert_same_outputs_as_reference(&self.pg, &self.broker, CHANNELS, 0, ROWS, window())
    }
}

/// The broker that leads the most telemetry partitions.
fn busiest_leader(broker: &Broker) -> u32 {
    let topics = ["telemetry.acs", "telemetry.ps", "telemetry.tcs"];
    let counts = broker.leader_counts(&topics);
    let (&leader, _) = counts
        .iter()
        .max_by_key(|(_, n)| **n)
        .expect("the topics have leaders");
    eprintln!("partition leaders of {topics:?}: {counts:?}");
    leader as u32
}

/// Waits until `tenths` tenths of the replay are scored.
fn at_tenths(pg: &Postgres, tenths: i64) {
    wait_for(
        &format!("{tenths}0 % of the replay to be scored"),
        Duration::from_secs(90),
        || (scored(pg) > 3 * ROWS * tenths / 10).then_some(()),
    );
}

fn scored(pg: &Postgres) -> i64 {
    pg.count("SELECT count(*) FROM scores")
}

#[test]
fn kill_9_of_the_busiest_leader_mid_replay_and_its_restart_lose_and_double_nothing() {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut setup = Setup::start();
    let service = setup.start_faulted("faulted-1");
    let meter = StallMeter::start(&setup.pg);
    let replay = setup.replay(RATE);
    wait_for("a fifth of the replay", Duration::from_secs(60), || {
        (scored(&setup.pg) > 3 * ROWS / 5).then_some(())
    });
    let leader = busiest_leader(&setup.broker);
    let killed_at = Instant::now();
    setup.broker.kill_node(leader);
    eprintln!(
        "killed broker {leader} at {} scores rows",
        scored(&setup.pg)
    );
    std::thread::sleep(Duration::from_secs(10));
    setup.broker.resume_node(leader);
    eprintln!(
        "broker {leader} back after {:.1?}, at {} scores rows",
        killed_at.elapsed(),
        scored(&setup.pg)
    );
    assert!(!replay.is_finished(), "the fault lands mid-replay");
    replay.join().unwrap();
    let replayed = Instant::now();
    let stall = meter.longest_stall(killed_at, replayed);
    let before = meter.longest_stall(killed_at - Duration::from_secs(8), killed_at);
    drop(meter);
    let checked = setup.finish(vec![service]);
    eprintln!(
        "STALL kill -9 of broker {leader}: longest stretch without a new score {stall} (before the fault: {before}); checked: {checked:?}"
    );
}

#[test]
fn a_rolling_restart_of_all_three_brokers_loses_and_doubles_nothing() {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut setup = Setup::start();
    let service = setup.start_faulted("faulted-1");
    let meter = StallMeter::start(&setup.pg);
    let replay = setup.replay(ROLLING_RATE);
    wait_for("a twentieth of the replay", Duration::from_secs(60), || {
        (scored(&setup.pg) > 3 * ROWS / 20).then_some(())
    });
    let started = Instant::now();
    let mut stalls = Vec::new();
    for id in setup.broker.node_ids() {
        let at = Instant::now();
        setup.broker.stop_node(id);
        setup.broker.resume_node(id);
        // Let the restarted node catch up and take leadership back before
        // the next one goes.
        std::thread::sleep(Duration::from_secs(4));
        stalls.push((id, at));
        eprintln!(
            "broker {id} restarted in {:.1?}, at {} scores rows",
            at.elapsed(),
            scored(&setup.pg)
        );
    }
    assert!(!replay.is_finished(), "the restarts land mid-replay");
    replay.join().unwrap();
    let replayed = Instant::now();
    let per_broker: Vec<String> = stalls
        .iter()
        .enumerate()
        .map(|(i, (id, at))| {
            let until = stalls.get(i + 1).map_or(replayed, |(_, next)| *next);
            format!("broker {id}: {}", meter.longest_stall(*at, until))
        })
        .collect();
    let before = meter.longest_stall(started - Duration::from_secs(5), started);
    drop(meter);
    let checked = setup.finish(vec![service]);
    eprintln!(
        "STALL rolling restart: longest stretch without a new score, {} (before: {before}); checked: {checked:?}",
        per_broker.join(", ")
    );
}

#[test]
fn read_committed_consumers_see_each_output_once_across_a_crash_a_rebalance_and_a_lost_broker() {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut setup = Setup::start();
    let mut first = setup.start_faulted("faulted-1");
    let replay = setup.replay(ROLLING_RATE);

    // kill -9 of satwatch mid-transaction, and a restart with the same
    // transactional.id, which fences and aborts what the dead one left open.
    at_tenths(&setup.pg, 2);
    first.kill();
    eprintln!("killed satwatch at {} scores rows", scored(&setup.pg));
    first = setup.start_faulted("faulted-1");

    // A second instance joins: a rebalance under load.
    at_tenths(&setup.pg, 4);
    let second = setup.start_faulted("faulted-2");
    eprintln!(
        "second instance joined at {} scores rows",
        scored(&setup.pg)
    );

    // The busiest broker dies, and stays down while the second leaves.
    at_tenths(&setup.pg, 6);
    let leader = busiest_leader(&setup.broker);
    setup.broker.kill_node(leader);
    eprintln!(
        "killed broker {leader} at {} scores rows",
        scored(&setup.pg)
    );
    at_tenths(&setup.pg, 7);
    assert!(!replay.is_finished(), "every fault lands mid-replay");
    assert!(second.terminate(Duration::from_secs(180)).success());
    eprintln!("second instance left at {} scores rows", scored(&setup.pg));
    setup.broker.resume_node(leader);

    replay.join().unwrap();
    let checked = setup.finish(vec![first]);
    eprintln!("checked: {checked:?}");
}
