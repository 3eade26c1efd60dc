//! Events: an event opens at a channel's first anomalous sample, names the
//! score part that opened it, and closes once `min_gap` normal samples
//! follow its last anomalous one.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{InvalidSetting, Scored};

/// `[detect.events]`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventSettings {
    /// Normal samples in a row that close an open event: one model window,
    /// so a forecaster that echoes a past dip still in its window fires
    /// inside the same event.
    pub min_gap: u64,
    /// Once an event has been open for this many samples, the stream's
    /// value level is taken as its new normal: the baseline range is set
    /// again from the next `baseline.samples` samples, and the excursion
    /// and stuck counts start afresh, so an alarm for a lasting shift or a
    /// drift ends instead of running to the end of the stream (0: never).
    pub max_samples: u64,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            min_gap: 128,
            max_samples: 0,
        }
    }
}

impl EventSettings {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.min_gap == 0 {
            return Err(InvalidSetting::new(
                "events.min_gap",
                "detect.events.min_gap must be >= 1",
            ));
        }
        Ok(())
    }
}

/// The score part that opened an event: an operator's first question is
/// why it fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cause {
    /// The value landed far from its forecast (the forecast surprise).
    Surprise,
    /// The value lies far outside the stream's baseline range.
    Level,
    /// The value lay a little outside the baseline range for long.
    Excursion,
    /// The value has repeated exactly for far longer than it ever did.
    Stuck,
    /// The recent errors stand far above the stream's own error spread.
    Burst,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Surprise => "surprise",
            Cause::Level => "level",
            Cause::Excursion => "excursion",
            Cause::Stuck => "stuck",
            Cause::Burst => "burst",
        }
    }
}

/// An anomaly event as the detector knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventSpan {
    pub start_seq: u64,
    pub start_ts: DateTime<Utc>,
    /// The last anomalous sample; set once the event has closed.
    pub end: Option<(u64, DateTime<Utc>)>,
    pub peak_score: f32,
    /// The threshold in force when the event opened.
    pub threshold: f32,
    /// The part with the highest score at the sample that opened the event;
    /// None for an event opened before causes were recorded (restored from
    /// an older checkpoint).
    #[serde(default)]
    pub cause: Option<Cause>,
}

/// What one step changed about events.
#[derive(Debug, Clone, PartialEq)]
pub enum EventChange {
    Opened(EventSpan),
    Closed(EventSpan),
}

/// The event open on a channel, as its checkpoint holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenEvent {
    pub(super) span: EventSpan,
    last_anomalous: (u64, DateTime<Utc>),
    /// Normal samples since the last anomalous one.
    normal_run: u64,
}

/// Takes a scored sample: opens, extends or closes the channel's `open`
/// event.
pub fn track(
    open: &mut Option<OpenEvent>,
    settings: &EventSettings,
    seq: u64,
    ts: DateTime<Utc>,
    scored: Scored,
) -> Option<EventChange> {
    match (open.as_mut(), scored.anomalous) {
        (None, false) => None,
        (None, true) => {
            let span = EventSpan {
                start_seq: seq,
                start_ts: ts,
                end: None,
                peak_score: scored.score,
                threshold: scored.threshold,
                cause: Some(scored.cause),
            };
            *open = Some(OpenEvent {
                span: span.clone(),
                last_anomalous: (seq, ts),
                normal_run: 0,
            });
            Some(EventChange::Opened(span))
        }
        (Some(event), true) => {
            event.span.peak_score = event.span.peak_score.max(scored.score);
            event.last_anomalous = (seq, ts);
            event.normal_run = 0;
            None
        }
        (Some(event), false) => {
            event.normal_run += 1;
            if event.normal_run < settings.min_gap {
                return None;
            }
            let mut event = open.take().expect("matched Some above");
            event.span.end = Some(event.last_anomalous);
            Some(EventChange::Closed(event.span))
        }
    }
}
