//! The ordering rules (docs/contract.md "Order within a channel", the README's
//! Guarantees) against a real broker and database: a seq far ahead of its
//! channel's numbering, then a return to it, never silences the channel,
//! across a restart too; a producer that restarts its numbering from zero has
//! its repeated seqs dropped as duplicates, counted, logged with the channel
//! named and dead-lettered (`duplicate_seq`, once each, the restart's refill
//! included), and is scored again once it passes its old numbering.

mod common;

use std::time::Duration;

use common::*;

/// Rows replayed before the glitches, and in all.
const BEFORE: i64 = 300;
const ROWS: i64 = 400;

/// A record of `channel` with 25 zero values (the SMAP channels' arity).
fn zeros(channel: &str, seq: u64) -> Vec<u8> {
    format!(
        r#"{{"channel":"{channel}","seq":{seq},"values":[0{}]}}"#,
        ",0".repeat(24)
    )
    .into_bytes()
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// (rows, min seq, max seq, whether `seq` has a row) of `channel`'s scores.
fn scored(pg: &Postgres, channel: &str, seq: i64) -> (i64, i64, i64, bool) {
    let row = &pg.query(&format!(
        "SELECT count(*), min(seq), max(seq), count(*) FILTER (WHERE seq = {seq}) \
         FROM scores WHERE channel = '{channel}'"
    ))[0];
    let has: i64 = row.get(3);
    (row.get(0), row.get(1), row.get(2), has == 1)
}

#[test]
fn a_seq_far_ahead_and_a_producer_restarted_from_zero_never_silence_a_channel() {
    let Stack {
        broker,
        pg,
        service,
        logs,
    } = Stack::start(1);
    let w = window();
    replay(&broker, "A-1,T-1,E-1", 0, BEFORE);
    // A-1: one record with the largest seq the schema allows; T-1: one
    // record 10,000 ahead. Both producers then go on with their numbering.
    let top = i64::MAX as u64;
    let glitch = (BEFORE - 1) as u64 + 10_000;
    produce(&broker, "telemetry.acs", b"A-1", &zeros("A-1", top));
    produce(&broker, "telemetry.tcs", b"T-1", &zeros("T-1", glitch));
    // E-1: its producer restarts from zero and sends its first rows again.
    replay(&broker, "E-1", 0, BEFORE);

    wait_for(
        "the glitches' forecasts and E-1's repeated seqs",
        Duration::from_secs(60),
        || {
            let forecasts = pg.count(&format!(
                "SELECT count(*) FROM forecasts WHERE (channel, seq) IN \
                 (('A-1', {top}), ('T-1', {glitch}))"
            ));
            let page = service.get("/metrics")?.1;
            let duplicates = metric(&page, "satwatch_samples_duplicate_total{subsystem=\"eps\"}")?;
            (forecasts == 2 && duplicates == BEFORE as f64).then_some(())
        },
    );
    let first_log = service.log_text();
    // The checkpoint now holds A-1 at seq 2^63-1: a restart must not make
    // every later sample of A-1 a duplicate.
    assert!(
        service.terminate(Duration::from_secs(30)).success(),
        "satwatch stops cleanly"
    );
    let service = Satwatch::start(&broker, &pg, logs.path(), &[]);
    replay(&broker, "A-1,T-1,E-1", BEFORE, ROWS - BEFORE);

    // Per channel: the rows before, then every later sample but the first
    // after the return (its forecast was the glitch's, which does not cover
    // it); E-1 from seq BEFORE on, as it passes its old numbering.
    let before = BEFORE - w;
    let expected = 3 * before + 2 * (ROWS - BEFORE - 1) + (ROWS - BEFORE);
    let started = std::time::Instant::now();
    while pg.count("SELECT count(*) FROM scores") < expected
        && started.elapsed() < Duration::from_secs(90)
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    for channel in ["A-1", "T-1"] {
        assert_eq!(
            scored(&pg, channel, BEFORE),
            (before + ROWS - BEFORE - 1, w, ROWS - 1, false),
            "{channel} is scored on after its glitch and the return to its numbering \
             (all but seq {BEFORE}, the first after the return)\n{}",
            describe_scores(&pg, "satwatch")
        );
    }
    assert_eq!(
        scored(&pg, "E-1", BEFORE),
        (before + ROWS - BEFORE, w, ROWS - 1, true),
        "E-1 is scored again once its restarted numbering passes its old last seq"
    );
    assert_eq!(
        pg.count("SELECT count(*) FROM scores"),
        expected,
        "nothing else is scored (no seq twice)"
    );

    let log = first_log + &service.log_text();
    for (channel, what) in [
        ("A-1", "returned"),
        ("T-1", "returned"),
        ("E-1", "duplicate"),
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.contains(channel) && l.contains(what)),
            "a warning names {channel} ({what}):\n{log}"
        );
    }
    let page = service.get("/metrics").expect("metrics answer").1;
    assert_eq!(
        metric(&page, "satwatch_samples_duplicate_total{subsystem=\"acs\"}").unwrap_or(0.0),
        0.0,
        "A-1 dropped nothing after the restart"
    );

    assert!(service.terminate(Duration::from_secs(30)).success());

    // Each sample the restarted producer sent again is on the dead-letter
    // topic, as it was sent, once: the restart refilled E-1's window through
    // those records, refused them again, and did not dead-letter them again.
    let mut refused: Vec<u64> = Vec::new();
    for record in read_topic(&broker, "telemetry.dlq") {
        let header = |name: &str| {
            record
                .headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        assert_eq!(header("satwatch-error"), "duplicate_seq", "{record:?}");
        assert_eq!(record.key.as_deref(), Some(&b"E-1"[..]), "{record:?}");
        let sample: serde_json::Value =
            serde_json::from_slice(record.payload.as_deref().unwrap()).unwrap();
        let seq = sample["seq"].as_u64().unwrap();
        assert!(
            header("satwatch-detail").contains(&format!(
                "seq {seq} of channel \"E-1\" is not above the channel's last seq {}",
                BEFORE - 1
            )),
            "{record:?}"
        );
        assert!(header("satwatch-source").starts_with("telemetry.eps/0/"));
        refused.push(seq);
    }
    refused.sort();
    assert_eq!(
        refused,
        (0..BEFORE as u64).collect::<Vec<_>>(),
        "one dead letter per sample dropped as a duplicate"
    );
}
