//! Two instances in one consumer group: a second joins mid-replay, takes
//! some partitions, and leaves again later. The outputs are exactly those of
//! an undisturbed single instance consuming the same records.

mod common;

use std::time::Duration;

use common::*;

/// Six channels over four subsystems, so both instances get records.
const CHANNELS: &str = "A-1,F-1,P-2,P-4,T-1,T-3";
const START: i64 = 0;
const ROWS: i64 = 5400;
const RATE: u32 = 1200;

fn samples_consumed(service: &Satwatch) -> f64 {
    let (_, metrics) = service.get("/metrics").expect("metrics answer");
    metrics
        .lines()
        .filter(|l| l.starts_with("satwatch_samples_consumed_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_second_instance_joining_and_leaving_mid_replay_loses_and_doubles_nothing() {
    let broker = Broker::start();
    let pg = Postgres::start();
    let logs = tempfile::tempdir().unwrap();
    let reference_url = pg.create_database("reference");
    let scaled = group_pipeline(logs.path(), "scaled", "", 10000);
    let reference = group_pipeline(logs.path(), "reference", "reference.", 10000);
    for p in [&scaled, &reference] {
        let p = p.to_str().unwrap();
        satwatch(&["topics", "--pipeline", p, "--partitions", "3"], &broker);
    }
    let reference_run = Satwatch::start_with(&broker, &reference_url, &reference, logs.path(), &[]);
    let first = Satwatch::start_with(&broker, &pg.url(), &scaled, logs.path(), &[]);

    let addr = broker.addr();
    let replay = std::thread::spawn(move || replay_paced(&addr, CHANNELS, START, ROWS, Some(RATE)));
    wait_for(
        "a fifth of the samples to be scored",
        Duration::from_secs(60),
        || (pg.count("SELECT count(*) FROM scores") > 6 * ROWS / 5).then_some(()),
    );
    let second = Satwatch::start_with(&broker, &pg.url(), &scaled, logs.path(), &[]);
    let joined_at = pg.count("SELECT count(*) FROM scores");
    wait_for(
        "the second instance to take records",
        Duration::from_secs(60),
        || (samples_consumed(&second) > 500.0).then_some(()),
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !replay.is_finished(),
        "the second instance leaves mid-replay"
    );
    let taken = samples_consumed(&second);
    assert!(second.terminate(Duration::from_secs(30)).success());
    let left_at = pg.count("SELECT count(*) FROM scores");
    replay.join().unwrap();

    let expected = 6 * (ROWS - window());
    wait_for_scores(
        &pg,
        expected,
        "everything to be scored",
        Duration::from_secs(120),
    );
    wait_for(
        "the reference run to score everything",
        Duration::from_secs(120),
        || (pg.count_in("reference", "SELECT count(*) FROM scores") == expected).then_some(()),
    );
    assert!(first.terminate(Duration::from_secs(30)).success());
    assert!(reference_run.terminate(Duration::from_secs(30)).success());

    let checked = assert_same_outputs_as_reference(&pg, &broker, CHANNELS, START, ROWS, window());
    eprintln!(
        "second instance joined at {joined_at} scores rows, consumed {taken} samples, left at {left_at}; checked: {checked:?}"
    );
}
