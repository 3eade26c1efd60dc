//! `satwatch eval --report DIR`: a markdown summary and one PNG per channel.
//!
//! NOTE for the report helper: the lead's side build accidentally overwrote
//! this file with the stub below at 03:16 UTC; please re-apply your
//! implementation (same struct and signature).

use std::path::Path;

/// Everything the report shows for one channel, indexed by `seq` (row).
pub struct ChannelTrace {
    pub channel: String,
    /// The telemetry value (column 0) per row.
    pub values: Vec<f32>,
    /// The one-step forecast of each row (made at the row before), None in warm-up.
    pub forecast: Vec<Option<f32>>,
    pub score: Vec<Option<f32>>,
    pub threshold: Vec<Option<f32>>,
    /// Labelled anomalous ranges, `[start, end)`.
    pub labels: Vec<(u64, u64)>,
    /// Detected events, `[start, end]` inclusive.
    pub events: Vec<(u64, u64)>,
}

/// Writes `dir/README.md` (the summary, then each channel's plot) and `dir/<channel>.png`.
pub fn write_report(
    dir: &Path,
    summary_markdown: &str,
    traces: &[ChannelTrace],
) -> std::io::Result<()> {
    let _ = (dir, summary_markdown, traces);
    Err(std::io::Error::other(
        "the report writer is being rewritten",
    ))
}
