//! The broker restarted mid-replay: satwatch rides it out, resumes by itself,
//! and every sample ends with exactly one row.

mod common;

use std::time::Duration;

use common::*;

const CHANNELS: &str = "A-1,E-2,T-1";
const ROWS: i64 = 2000;

#[test]
fn a_broker_restart_mid_replay_loses_and_doubles_nothing() {
    let Stack {
        mut broker,
        pg,
        service,
        logs: _logs,
    } = Stack::start(3);

    replay(&broker, CHANNELS, 0, ROWS / 2);
    let first = 3 * (ROWS / 2 - window());
    wait_for_scores(
        &pg,
        first,
        "the first half to be scored",
        Duration::from_secs(60),
    );

    // The second half goes out paced (about 1.5 s) while the broker dies
    // 0.5 s in: the replay's producer buffers and retries, satwatch's
    // consumer and producers reconnect.
    let addr = broker.addr();
    let second_half =
        std::thread::spawn(move || replay_paced(&addr, CHANNELS, ROWS / 2, ROWS / 2, Some(2000)));
    std::thread::sleep(Duration::from_millis(500));
    broker.stop();
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        service
            .get("/v2/health/live")
            .is_some_and(|(s, _)| s == 200),
        "satwatch stays up without a broker"
    );
    broker.resume();
    second_half.join().unwrap();

    let total = 3 * (ROWS - window());
    wait_for_scores(
        &pg,
        total,
        "everything to be scored after the restart",
        Duration::from_secs(120),
    );
    wait_for_commits(&broker, "satwatch", Duration::from_secs(60));
    assert!(service.terminate(Duration::from_secs(30)).success());

    assert_one_score_per_sample(&pg, CHANNELS, ROWS, window());
    let forecasts = read_topic(&broker, "forecasts");
    let mut keys: Vec<(String, i64)> = forecasts
        .iter()
        .map(|r| {
            let v: serde_json::Value =
                serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap();
            (
                v["channel"].as_str().unwrap().to_owned(),
                v["seq"].as_i64().unwrap(),
            )
        })
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(
        keys.len() as i64,
        3 * (ROWS - window() + 1),
        "every forecast reached the topic"
    );
}
