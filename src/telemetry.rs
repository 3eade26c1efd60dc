//! Telemetry samples: the wire shape (CONTRACT "Telemetry sample") and its
//! validation into a [`Sample`] the engine can trust.
//!
//! Every way a record can be bad has a stable reason code, which becomes the
//! `satwatch-error` header of its dead letter.

use std::{collections::HashMap, time::Instant};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use ustr::Ustr;

/// Where a consumed record came from, so its offset can be committed once
/// everything it caused is durable. `partition` indexes the source's table of
/// (topic, partition) pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Origin {
    pub partition: u32,
    /// The partition's assignment this record was consumed under (see
    /// [`crate::kafka::OffsetTracker`]): outputs of an assignment that has
    /// since ended are never published, since the partition's next owner
    /// processes the record again.
    pub generation: u32,
    pub offset: i64,
}

/// A sample's values, inline up to 32 features (SMAP channels have 25): a
/// sample allocates nothing on its way from the decoder to the window. Wider
/// channels work the same, their values on the heap.
pub type Values = smallvec::SmallVec<[f32; 32]>;

/// A validated telemetry sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Index into the pipeline's channel list.
    pub channel: u32,
    pub seq: u64,
    pub ts: DateTime<Utc>,
    pub values: Values,
    pub origin: Option<Origin>,
    /// When satwatch took the record from Kafka (none offline): the start of
    /// satwatch's own share of the latency.
    pub received: Option<Instant>,
    /// The record's value as consumed (none offline), kept until the engine
    /// has taken the sample in: one it refuses (a duplicate seq) is
    /// dead-lettered with these bytes, unchanged. Its key needs no copy: a
    /// sample's key is its channel id ([`Decoder::check_key`]).
    pub payload: Option<Box<[u8]>>,
}

/// Why a record was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    EmptyRecord,
    TooLarge,
    InvalidUtf8,
    MalformedJson,
    MissingField,
    WrongType,
    InvalidSeq,
    InvalidTimestamp,
    UnknownChannel,
    WrongTopic,
    WrongKey,
    WrongArity,
    NonFinite,
    OutOfRange,
    /// Decoded fine, but its `seq` names a sample its channel has taken in
    /// already or passed (the engine's verdict, see `engine::SeqOrder`).
    DuplicateSeq,
}

impl Reason {
    pub const ALL: [Reason; 15] = [
        Reason::EmptyRecord,
        Reason::TooLarge,
        Reason::InvalidUtf8,
        Reason::MalformedJson,
        Reason::MissingField,
        Reason::WrongType,
        Reason::InvalidSeq,
        Reason::InvalidTimestamp,
        Reason::UnknownChannel,
        Reason::WrongTopic,
        Reason::WrongKey,
        Reason::WrongArity,
        Reason::NonFinite,
        Reason::OutOfRange,
        Reason::DuplicateSeq,
    ];

    /// The stable code written to the `satwatch-error` header.
    pub fn code(self) -> &'static str {
        match self {
            Reason::EmptyRecord => "empty_record",
            Reason::TooLarge => "too_large",
            Reason::InvalidUtf8 => "invalid_utf8",
            Reason::MalformedJson => "malformed_json",
            Reason::MissingField => "missing_field",
            Reason::WrongType => "wrong_type",
            Reason::InvalidSeq => "invalid_seq",
            Reason::InvalidTimestamp => "invalid_timestamp",
            Reason::UnknownChannel => "unknown_channel",
            Reason::WrongTopic => "wrong_topic",
            Reason::WrongKey => "wrong_key",
            Reason::WrongArity => "wrong_arity",
            Reason::NonFinite => "non_finite",
            Reason::OutOfRange => "out_of_range",
            Reason::DuplicateSeq => "duplicate_seq",
        }
    }
}

/// A record that cannot become a sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub reason: Reason,
    /// A human sentence for the `satwatch-detail` header.
    pub detail: String,
}

/// A record the engine refused after the source passed it on: its seq names
/// a sample its channel took in already, or passed. Only the Kafka consumer holds a
/// dead-letter producer, so the processor hands the record back for it to
/// dead-letter; the record is done once its dead letter is durable.
#[derive(Debug)]
pub struct Refused {
    pub origin: Origin,
    /// The record's key: its channel id ([`crate::telemetry::Decoder::check_key`]).
    pub key: Ustr,
    /// The record's value, unchanged.
    pub payload: Box<[u8]>,
    pub rejection: Rejection,
}

fn reject(reason: Reason, detail: impl Into<String>) -> Rejection {
    Rejection {
        reason,
        detail: detail.into(),
    }
}

/// The largest magnitude a value may have (in the channel's own units):
/// larger ones are dead-lettered as `out_of_range`. Far beyond any sensor's
/// reading, and far enough below f32's limit (3.4e38) that a value's square,
/// and its normalised form under any train spread above 1e-15, stay finite
/// f32s in the model's arithmetic, where 1e37 or 3e38 turned forecasts and
/// scores into infinity. Subnormal and zero magnitudes are accepted as
/// they are.
pub const MAX_ABS_VALUE: f32 = 1e15;

#[derive(Deserialize)]
struct WireSample {
    channel: Option<String>,
    seq: Option<WireSeq>,
    ts: Option<String>,
    values: Option<Vec<f64>>,
}

/// A `seq` as written: any JSON integer, so that one out of range is told
/// apart (`invalid_seq`) from one that is not an integer (`wrong_type`).
enum WireSeq {
    Valid(u64),
    /// Negative, or above `i64::MAX` (PostgreSQL's bigint), as written.
    OutOfRange(String),
}

impl<'de> Deserialize<'de> for WireSeq {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = WireSeq;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E>(self, v: i64) -> Result<WireSeq, E> {
                Ok(match u64::try_from(v) {
                    Ok(seq) => WireSeq::Valid(seq),
                    Err(_) => WireSeq::OutOfRange(v.to_string()),
                })
            }
            fn visit_u64<E>(self, v: u64) -> Result<WireSeq, E> {
                Ok(if v <= i64::MAX as u64 {
                    WireSeq::Valid(v)
                } else {
                    WireSeq::OutOfRange(v.to_string())
                })
            }
            /// serde_json reads an integer beyond u64 as a float: a whole
            /// number out of range, not another type.
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<WireSeq, E> {
                if v.fract() == 0.0 && (v < 0.0 || v > i64::MAX as f64) {
                    Ok(WireSeq::OutOfRange(v.to_string()))
                } else {
                    Err(E::invalid_type(serde::de::Unexpected::Float(v), &self))
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// What a decoder needs to know about one channel.
#[derive(Debug, Clone)]
pub struct ChannelShape {
    pub index: u32,
    pub topic: String,
    pub features: usize,
}

/// Decodes and validates telemetry records against the configured channels.
#[derive(Debug, Clone)]
pub struct Decoder {
    channels: HashMap<String, ChannelShape>,
    /// Channel ids by [`Sample::channel`] index, for the key check.
    ids: Vec<String>,
    max_record_bytes: usize,
}

impl Decoder {
    pub fn new(channels: HashMap<String, ChannelShape>, max_record_bytes: usize) -> Self {
        let len = channels.values().map(|s| s.index as usize + 1).max();
        let mut ids = vec![String::new(); len.unwrap_or(0)];
        for (id, shape) in &channels {
            if let Some(slot) = ids.get_mut(shape.index as usize) {
                *slot = id.clone();
            }
        }
        Self {
            channels,
            ids,
            max_record_bytes,
        }
    }

    /// A sample's Kafka key must be its channel id: a channel's order rests
    /// on all its records sharing one partition, and a record keyed
    /// otherwise (or not at all) may land on another and overtake or trail
    /// its channel's records.
    pub fn check_key(&self, sample: &Sample, key: Option<&[u8]>) -> Result<(), Rejection> {
        let id = self.ids.get(sample.channel as usize).map(String::as_str);
        if key.is_some() && key == id.map(str::as_bytes) {
            return Ok(());
        }
        let shown = match key {
            None => "no key".to_owned(),
            Some(k) => format!("the key \"{}\"", truncate(&String::from_utf8_lossy(k))),
        };
        Err(reject(
            Reason::WrongKey,
            format!(
                "a sample of channel \"{}\" must be keyed by its channel id; the record has {shown}",
                id.unwrap_or_default()
            ),
        ))
    }

    /// Decodes one record's value. `topic` is where it was read (None skips the
    /// topic check, for in-process sources); `fallback_ts` stands in for a
    /// missing `ts` (the Kafka record's timestamp).
    pub fn decode(
        &self,
        payload: Option<&[u8]>,
        topic: Option<&str>,
        fallback_ts: DateTime<Utc>,
    ) -> Result<Sample, Rejection> {
        let bytes = payload.unwrap_or_default();
        if bytes.is_empty() {
            return Err(reject(Reason::EmptyRecord, "the record has no value"));
        }
        if bytes.len() > self.max_record_bytes {
            return Err(reject(
                Reason::TooLarge,
                format!(
                    "the record is {} bytes; the limit is {}",
                    bytes.len(),
                    self.max_record_bytes
                ),
            ));
        }
        let text = std::str::from_utf8(bytes).map_err(|err| {
            reject(
                Reason::InvalidUtf8,
                format!("the record is not UTF-8 ({err})"),
            )
        })?;
        let wire: WireSample =
            serde_json::from_str(text).map_err(|err| classify_json_error(text, &err))?;

        let channel = wire
            .channel
            .ok_or_else(|| reject(Reason::MissingField, "field `channel` is missing"))?;
        let seq = wire
            .seq
            .ok_or_else(|| reject(Reason::MissingField, "field `seq` is missing"))?;
        let values = wire
            .values
            .ok_or_else(|| reject(Reason::MissingField, "field `values` is missing"))?;
        let shape = self.channels.get(&channel).ok_or_else(|| {
            reject(
                Reason::UnknownChannel,
                format!("channel \"{}\" is not configured", truncate(&channel)),
            )
        })?;
        if let Some(topic) = topic {
            if topic != shape.topic {
                return Err(reject(
                    Reason::WrongTopic,
                    format!(
                        "channel \"{channel}\" belongs on {}, not {topic}",
                        shape.topic
                    ),
                ));
            }
        }
        let seq = match seq {
            WireSeq::Valid(seq) => seq,
            WireSeq::OutOfRange(seq) => {
                return Err(reject(
                    Reason::InvalidSeq,
                    format!("seq {} is outside 0..={}", truncate(&seq), i64::MAX),
                ))
            }
        };
        if values.len() != shape.features {
            return Err(reject(
                Reason::WrongArity,
                format!(
                    "channel \"{channel}\" takes {} values, the record has {}",
                    shape.features,
                    values.len()
                ),
            ));
        }
        let mut floats = Values::with_capacity(values.len());
        for (i, v) in values.iter().enumerate() {
            let f = *v as f32;
            if !f.is_finite() {
                return Err(reject(
                    Reason::NonFinite,
                    format!("values[{i}] = {v} is not a finite f32"),
                ));
            }
            if f.abs() > MAX_ABS_VALUE {
                return Err(reject(
                    Reason::OutOfRange,
                    format!("values[{i}] = {v} is beyond ±{MAX_ABS_VALUE:e}"),
                ));
            }
            floats.push(f);
        }
        let ts = match wire.ts {
            None => fallback_ts,
            Some(ts) => DateTime::parse_from_rfc3339(&ts)
                .map_err(|err| {
                    reject(
                        Reason::InvalidTimestamp,
                        format!("ts \"{}\" is not RFC 3339 ({err})", truncate(&ts)),
                    )
                })?
                .with_timezone(&Utc),
        };
        Ok(Sample {
            channel: shape.index,
            seq,
            ts,
            values: floats,
            origin: None,
            received: None,
            payload: None,
        })
    }
}

/// serde_json refuses `NaN`/`Infinity` as syntax; report them as what they
/// are, but only in a record that is JSON but for them: a record cut short
/// or broken elsewhere is malformed whatever it mentions.
fn classify_json_error(text: &str, err: &serde_json::Error) -> Rejection {
    use serde_json::error::Category;
    match err.classify() {
        Category::Data => reject(Reason::WrongType, err.to_string()),
        Category::Syntax if err.to_string().contains("number out of range") => reject(
            Reason::NonFinite,
            format!("a number is out of range ({err})"),
        ),
        Category::Syntax if json_but_for_non_finite_literals(text) => reject(
            Reason::NonFinite,
            format!("values must be finite numbers ({err})"),
        ),
        _ => reject(Reason::MalformedJson, err.to_string()),
    }
}

/// Whether `text` has `NaN` or `Infinity` literals outside strings and
/// parses as JSON once each is read as 0. One pass and one parse, whatever
/// the number of literals.
fn json_but_for_non_finite_literals(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut zeroed = String::with_capacity(text.len());
    let (mut found, mut in_string, mut escaped) = (false, false, false);
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else if b == b'"' {
            in_string = true;
        } else if let Some(literal) = [&b"NaN"[..], b"Infinity"]
            .into_iter()
            .find(|l| bytes[i..].starts_with(l))
        {
            // All ASCII: i and i + len are character boundaries.
            zeroed.push_str(&text[copied..i]);
            zeroed.push('0');
            found = true;
            i += literal.len();
            copied = i;
            continue;
        }
        i += 1;
    }
    zeroed.push_str(&text[copied..]);
    found && serde_json::from_str::<serde::de::IgnoredAny>(&zeroed).is_ok()
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The JSON a producer writes for one sample (used by `satwatch replay`).
pub fn encode(channel: &str, seq: u64, ts: &DateTime<Utc>, values: &[f32]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(64 + values.len() * 8);
    // Channel ids come from the pipeline file; serde_json escapes them properly.
    let channel = serde_json::to_string(channel).expect("a string serialises");
    let _ = write!(
        out,
        "{{\"channel\":{channel},\"seq\":{seq},\"ts\":\"{}\",\"values\":[",
        ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    );
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        // Shortest representation that round-trips to the same f32.
        let _ = write!(out, "{v}");
    }
    out.push_str("]}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder() -> Decoder {
        let mut channels = HashMap::new();
        channels.insert(
            "A-1".to_string(),
            ChannelShape {
                index: 7,
                topic: "telemetry.acs".into(),
                features: 3,
            },
        );
        Decoder::new(channels, 1024)
    }

    fn decode(payload: &[u8]) -> Result<Sample, Rejection> {
        decoder().decode(Some(payload), Some("telemetry.acs"), DateTime::UNIX_EPOCH)
    }

    fn reason(payload: &[u8]) -> &'static str {
        decode(payload).unwrap_err().reason.code()
    }

    #[test]
    fn good_record_round_trips_through_encode() {
        let ts = DateTime::parse_from_rfc3339("2026-11-22T01:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let text = encode("A-1", 4690, &ts, &[0.98, 0.0, 1.0]);
        let sample = decode(text.as_bytes()).unwrap();
        assert_eq!(
            sample,
            Sample {
                channel: 7,
                seq: 4690,
                ts,
                values: Values::from_slice(&[0.98, 0.0, 1.0]),
                origin: None,
                received: None,
                payload: None,
            }
        );
    }

    #[test]
    fn missing_ts_takes_the_fallback() {
        let sample = decode(br#"{"channel":"A-1","seq":1,"values":[1,2,3]}"#).unwrap();
        assert_eq!(sample.ts, DateTime::UNIX_EPOCH);
    }

    #[test]
    fn every_kind_of_bad_record_gets_its_reason() {
        assert_eq!(reason(b""), "empty_record");
        assert_eq!(reason(&vec![b' '; 2000]), "too_large");
        assert_eq!(reason(b"{\"channel\":\"A-1\xff\"}"), "invalid_utf8");
        assert_eq!(reason(b"{\"channel\":"), "malformed_json");
        assert_eq!(
            reason(br#"{"channel":"A-1","values":[1,2,3]}"#),
            "missing_field"
        );
        assert_eq!(
            reason(br#"{"channel":"A-1","seq":"x","values":[1,2,3]}"#),
            "wrong_type"
        );
        assert_eq!(
            reason(br#"{"channel":"A-1","seq":-1,"values":[1,2,3]}"#),
            "invalid_seq"
        );
        assert_eq!(
            reason(br#"{"channel":"A-1","seq":1,"ts":"yesterday","values":[1,2,3]}"#),
            "invalid_timestamp"
        );
        assert_eq!(
            reason(br#"{"channel":"Z-9","seq":1,"values":[1,2,3]}"#),
            "unknown_channel"
        );
        assert_eq!(
            reason(br#"{"channel":"A-1","seq":1,"values":[1,2]}"#),
            "wrong_arity"
        );
        assert_eq!(
            reason(br#"{"channel":"A-1","seq":1,"values":[1,NaN,3]}"#),
            "non_finite"
        );
        assert_eq!(
            reason(br#"{"channel":"A-1","seq":1,"values":[1,1e39,3]}"#),
            "non_finite"
        );
        assert_eq!(reason(br#"[1,2]"#), "wrong_type");
    }

    /// A decoder for a 25-wide SMAP channel and a 55-wide one (1 telemetry
    /// value and 54 command columns, as other missions have).
    fn mixed_width_decoder() -> Decoder {
        let shape = |index, features| ChannelShape {
            index,
            topic: "telemetry.acs".into(),
            features,
        };
        let channels = HashMap::from([
            ("A-1".to_string(), shape(0, 25)),
            ("M-1".to_string(), shape(1, 55)),
        ]);
        Decoder::new(channels, 65536)
    }

    fn record(channel: &str, width: usize) -> String {
        let values = vec![0.5f32; width];
        encode(channel, 1, &DateTime::UNIX_EPOCH, &values)
    }

    #[test]
    fn each_channel_takes_its_own_model_width() {
        let decoder = mixed_width_decoder();
        for (channel, width) in [("A-1", 25), ("M-1", 55)] {
            let sample = decoder
                .decode(
                    Some(record(channel, width).as_bytes()),
                    None,
                    DateTime::UNIX_EPOCH,
                )
                .unwrap();
            assert_eq!(sample.values.len(), width, "{channel}");
        }
    }

    #[test]
    fn a_sample_of_another_width_is_wrong_arity_naming_channel_and_both_widths() {
        let decoder = mixed_width_decoder();
        let refused = |channel: &str, width: usize| {
            decoder
                .decode(
                    Some(record(channel, width).as_bytes()),
                    None,
                    DateTime::UNIX_EPOCH,
                )
                .unwrap_err()
        };
        let narrow = refused("M-1", 25);
        assert_eq!(narrow.reason.code(), "wrong_arity");
        assert_eq!(
            narrow.detail,
            "channel \"M-1\" takes 55 values, the record has 25"
        );
        let wide = refused("A-1", 55);
        assert_eq!(wide.reason.code(), "wrong_arity");
        assert_eq!(
            wide.detail,
            "channel \"A-1\" takes 25 values, the record has 55"
        );
    }

    #[test]
    fn a_truncated_record_is_malformed_even_when_it_mentions_nan() {
        // Cut short: the syntax error is the end of the text, not a NaN.
        assert_eq!(
            reason(br#"{"channel":"A-1","seq":1,"note":"NaN","values":[1,2"#),
            "malformed_json"
        );
        assert_eq!(
            reason(br#"{"channel":"A-1","seq":1,"values":[1,2,Infinity"#),
            "malformed_json"
        );
        assert_eq!(reason(br#"{"channel":"NaN-1","seq":1,"#), "malformed_json");
        // Other syntax errors elsewhere in a record that mentions NaN.
        assert_eq!(
            reason(br#"{"channel":"NaN","seq":1,"values":[1,2,3]]"#),
            "malformed_json"
        );
        // NaN and infinities as numbers are what non_finite means.
        assert_eq!(
            reason(br#"{"channel":"A-1","seq":1,"values":[1,-Infinity,3]}"#),
            "non_finite"
        );
        assert_eq!(
            reason(br#"{"channel":"A-1","seq":1,"values":[Infinity,2,3]}"#),
            "non_finite"
        );
        assert_eq!(
            reason(br#"{"channel":"A-1","seq":1,"values":[1,2,1e400]}"#),
            "non_finite"
        );
    }

    #[test]
    fn a_seq_beyond_the_largest_is_invalid_not_the_wrong_type() {
        for seq in ["18446744073709551615", "9223372036854775808", "1e30", "-1"] {
            let record = format!(r#"{{"channel":"A-1","seq":{seq},"values":[1,2,3]}}"#);
            let err = decode(record.as_bytes()).unwrap_err();
            assert_eq!(err.reason.code(), "invalid_seq", "seq {seq}: {err:?}");
        }
        let largest = br#"{"channel":"A-1","seq":9223372036854775807,"values":[1,2,3]}"#;
        assert_eq!(decode(largest).unwrap().seq, i64::MAX as u64);
        // Not an integer at all: the wrong type.
        for seq in ["1.5", "\"7\"", "true", "[1]"] {
            let record = format!(r#"{{"channel":"A-1","seq":{seq},"values":[1,2,3]}}"#);
            assert_eq!(reason(record.as_bytes()), "wrong_type", "seq {seq}");
        }
    }

    #[test]
    fn values_beyond_the_documented_bound_are_out_of_range() {
        let record = |v: &str| format!(r#"{{"channel":"A-1","seq":1,"values":[0,{v},0]}}"#);
        for v in ["3e38", "-3.4028235e38", "1e37", "1.0000001e15", "-2e15"] {
            let err = decode(record(v).as_bytes()).unwrap_err();
            assert_eq!(err.reason.code(), "out_of_range", "{v}: {err:?}");
            assert!(
                err.detail.contains("values[1]"),
                "names the column: {err:?}"
            );
        }
        // Up to the bound, and every tiny magnitude, are accepted as they are.
        for v in [
            "1e15",
            "-1e15",
            "1.17549435e-38",
            "1e-45",
            "-1e-45",
            "0",
            "-0",
        ] {
            let sample = decode(record(v).as_bytes()).unwrap();
            assert_eq!(sample.values[1], v.parse::<f32>().unwrap(), "{v}");
        }
        assert_eq!(Reason::OutOfRange.code(), "out_of_range");
        assert!(Reason::ALL.contains(&Reason::OutOfRange));
    }

    #[test]
    fn a_sample_keyed_by_anything_but_its_channel_is_wrong_key() {
        let decoder = decoder();
        let sample = decode(br#"{"channel":"A-1","seq":1,"values":[1,2,3]}"#).unwrap();
        assert_eq!(decoder.check_key(&sample, Some(b"A-1")), Ok(()));
        for key in [Some(&b"A-2"[..]), Some(b""), Some(b"a-1"), None] {
            let err = decoder.check_key(&sample, key).unwrap_err();
            assert_eq!(err.reason.code(), "wrong_key", "{key:?}");
            assert!(err.detail.contains("\"A-1\""), "{}", err.detail);
        }
    }

    #[test]
    fn wrong_topic_is_refused() {
        let err = decoder()
            .decode(
                Some(br#"{"channel":"A-1","seq":1,"values":[1,2,3]}"#),
                Some("telemetry.eps"),
                DateTime::UNIX_EPOCH,
            )
            .unwrap_err();
        assert_eq!(err.reason, Reason::WrongTopic);
    }
}
