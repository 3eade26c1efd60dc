//! The SMAP data: rows of the test split replayed into the broker by
//! `satwatch replay`.

use super::{satwatch_with_brokers, Broker, SMAP_PIPELINE};

/// Replays rows `start..start + limit` of each of `channels` (comma-separated)
/// from the SMAP test split, as fast as the broker takes them.
pub fn replay(broker: &Broker, channels: &str, start: i64, limit: i64) -> String {
    replay_paced(&broker.addr(), channels, start, limit, None)
}

/// The same against the brokers at `brokers`, at `rate` samples/s when given.
pub fn replay_paced(
    brokers: &str,
    channels: &str,
    start: i64,
    limit: i64,
    rate: Option<u32>,
) -> String {
    let (start, limit) = (start.to_string(), limit.to_string());
    let rate = rate.map(|r| r.to_string());
    let mut args = vec![
        "replay",
        "--pipeline",
        SMAP_PIPELINE,
        "--data",
        "data/smap",
        "--channels",
        channels,
        "--start",
        &start,
        "--limit",
        &limit,
    ];
    match &rate {
        Some(rate) => args.extend(["--rate", rate.as_str()]),
        None => args.push("--max-rate"),
    }
    satwatch_with_brokers(&args, brokers)
}
