//! A PostgreSQL write that blocks (a `LOCK TABLE scores` held by someone
//! else) is a visible stall: past `[health] max_stall_ms` (30 s by default)
//! readiness is 503 with a reason naming postgres, the stall metric and a
//! log line say so, and consumer lag keeps counting the records that wait
//! while intake is paused; once the lock goes, everything is written and
//! readiness is 200 again. Default settings throughout.

mod common;

use std::{
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use common::*;

/// Enough records that, with the sink blocked, the processor's and the
/// source's queues fill and intake pauses.
const CHANNELS: &str = "A-1,A-2,A-3,E-1,E-2,E-3,T-1,T-2";
const CHANNEL_COUNT: i64 = 8;
/// Rows per channel replayed and written before the lock.
const BEFORE: i64 = 300;
/// Rows per channel in all.
const ROWS: i64 = 7300;
/// `[health] max_stall_ms`'s default.
const MAX_STALL: Duration = Duration::from_secs(30);

/// Sums every series of `name` whose labels contain all of `with`.
fn sum(metrics: &str, name: &str, with: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| with.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn metrics(service: &Satwatch) -> String {
    service.get("/metrics").expect("satwatch serves /metrics").1
}

/// `LOCK TABLE scores IN ACCESS EXCLUSIVE MODE` in an open transaction, on
/// a connection of its own, until [`HeldLock::release`].
struct HeldLock {
    release: mpsc::Sender<()>,
    holder: thread::JoinHandle<()>,
}

impl HeldLock {
    fn take(pg: &Postgres) -> Self {
        let url = pg.url();
        let (locked_tx, locked_rx) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let holder = thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let (mut client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .expect("the test connects to PostgreSQL");
                tokio::spawn(connection);
                let tx = client.transaction().await.unwrap();
                tx.batch_execute("LOCK TABLE scores IN ACCESS EXCLUSIVE MODE")
                    .await
                    .expect("the lock is taken");
                locked_tx.send(()).unwrap();
                let _ = tokio::task::spawn_blocking(move || release_rx.recv()).await;
                tx.rollback().await.unwrap();
            });
        });
        locked_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("LOCK TABLE scores within 30 s");
        Self { release, holder }
    }

    fn release(self) {
        self.release.send(()).unwrap();
        self.holder.join().expect("the lock holder ends cleanly");
    }
}

#[test]
fn a_blocked_postgres_write_is_a_visible_stall() {
    let Stack {
        broker,
        pg,
        service,
        logs: _logs,
    } = Stack::start(3);
    replay(&broker, CHANNELS, 0, BEFORE);
    wait_for_scores(
        &pg,
        CHANNEL_COUNT * (BEFORE - window()),
        "the first rows to be written",
        Duration::from_secs(60),
    );
    wait_for(
        "the first rows' offsets to be committed",
        Duration::from_secs(30),
        || {
            let m = metrics(&service);
            (sum(&m, "satwatch_consumer_lag", &[]) == 0.0
                && m.lines().any(|l| l.starts_with("satwatch_consumer_lag{")))
            .then_some(())
        },
    );

    let lock = HeldLock::take(&pg);
    let locked_at = Instant::now();
    replay(&broker, CHANNELS, BEFORE, ROWS - BEFORE);
    let waiting = (CHANNEL_COUNT * (ROWS - BEFORE)) as f64;

    let (status, body) = wait_for(
        "readiness to report the stall",
        MAX_STALL + Duration::from_secs(30),
        || {
            service
                .get("/v2/health/ready")
                .filter(|(status, body)| *status == 503 && body.contains("postgres stalled"))
        },
    );
    let after = locked_at.elapsed();
    eprintln!("readiness {status} after {after:?}: {body}");
    assert!(
        after >= MAX_STALL - Duration::from_secs(1),
        "reported after {after:?}, before [health] max_stall_ms (30 s)"
    );
    // The metrics and the log follow on the watchdog's next round (1 s).
    let m = wait_for(
        "the metric to name the stalled stage",
        Duration::from_secs(5),
        || {
            let m = metrics(&service);
            (sum(&m, "satwatch_stage_stalled", &["stage=\"postgres\""]) == 1.0).then_some(m)
        },
    );
    assert!(
        sum(
            &m,
            "satwatch_stage_waiting_seconds",
            &["stage=\"postgres\""]
        ) >= 29.0
    );
    wait_for(
        "a log line naming the stalled stage",
        Duration::from_secs(5),
        || {
            service
                .log_text()
                .contains("postgres stalled")
                .then_some(())
        },
    );
    // Intake is paused (the sink holds nothing more), and the lag still
    // counts every record that waits.
    let consumed = sum(&m, "satwatch_samples_consumed_total", &[]);
    eprintln!(
        "consumed {consumed} of {} replayed records",
        CHANNEL_COUNT * ROWS
    );
    wait_for(
        "consumer lag to count every record replayed since the lock",
        Duration::from_secs(15),
        || (sum(&metrics(&service), "satwatch_consumer_lag", &[]) == waiting).then_some(()),
    );

    lock.release();
    wait_for_scores(
        &pg,
        CHANNEL_COUNT * (ROWS - window()),
        "every sample to be written once the lock is released",
        Duration::from_secs(180),
    );
    wait_for("readiness to recover", Duration::from_secs(30), || {
        service
            .get("/v2/health/ready")
            .filter(|(status, _)| *status == 200)
    });
    wait_for("the stall metric to clear", Duration::from_secs(10), || {
        (sum(&metrics(&service), "satwatch_stage_stalled", &[]) == 0.0).then_some(())
    });
    assert!(
        service.log_text().contains("no longer stalled"),
        "a log line says the stall ended"
    );
}
