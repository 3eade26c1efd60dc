//! PostgreSQL stopped mid-replay: readiness says why, satwatch stops taking
//! records with bounded memory, resumes by itself when PostgreSQL returns, and
//! nothing is lost or written twice.

mod common;

use std::time::Duration;

use common::*;

const CHANNELS: &str = "A-1,E-2,T-1";
const ROWS: i64 = 2000;
const WINDOW: i64 = 64;
/// How long PostgreSQL stays down.
const OUTAGE: Duration = Duration::from_secs(10);

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_postgres_outage_turns_readiness_503_and_loses_nothing() {
    let Stack {
        broker,
        mut pg,
        service,
        logs: _logs,
    } = Stack::start(3);

    replay(&broker, CHANNELS, 0, ROWS / 2);
    let first = 3 * (ROWS / 2 - WINDOW);
    wait_for_scores(
        &pg,
        first,
        "the first half to be scored",
        Duration::from_secs(60),
    );

    pg.stop();
    let (status, body) = wait_for(
        "readiness to report the outage",
        Duration::from_secs(20),
        || {
            service
                .get("/v2/health/ready")
                .filter(|(status, _)| *status == 503)
        },
    );
    assert_eq!(status, 503);
    assert!(body.contains("PostgreSQL"), "the body says why: {body}");
    replay(&broker, CHANNELS, ROWS / 2, ROWS / 2);
    let rss_before = rss_kib(service.pid());
    std::thread::sleep(OUTAGE);
    assert!(
        service
            .get("/v2/health/live")
            .is_some_and(|(s, _)| s == 200),
        "satwatch stays alive"
    );
    let rss_after = rss_kib(service.pid());
    assert!(
        rss_after < rss_before + 256 * 1024,
        "memory stays bounded: {rss_before} KiB -> {rss_after} KiB"
    );

    pg.resume();
    let total = 3 * (ROWS - WINDOW);
    wait_for_scores(
        &pg,
        total,
        "everything to be scored after PostgreSQL returns",
        Duration::from_secs(60),
    );
    wait_for("readiness to return", Duration::from_secs(20), || {
        service
            .get("/v2/health/ready")
            .filter(|(status, _)| *status == 200)
    });
    assert!(service.terminate(Duration::from_secs(30)).success());

    assert_one_score_per_sample(&pg, CHANNELS, ROWS, WINDOW);
    assert_eq!(
        pg.count("SELECT count(*) FROM forecasts"),
        3 * (ROWS - WINDOW + 1)
    );
}
