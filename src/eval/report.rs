//! `satwatch eval --report DIR`: a markdown summary and one PNG per channel.
//!
//! Each channel's PNG has three stacked panels sharing the x axis (the sample index, `seq`):
//! the telemetry value with its one-step forecast, the anomaly score against the threshold
//! (y clipped so that a spike of 1e4 does not flatten a threshold of 10), and a strip with the
//! labelled ranges and the detected events. Labelled ranges are also shaded in the first two
//! panels. Text is drawn with DejaVu Sans embedded in the binary, so no system font is needed.

use std::fmt::Display;
use std::io;
use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::ranged1d::ValueFormatter;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, RGBColor};

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
    ensure_font()?;
    std::fs::create_dir_all(dir).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("creating report directory {}: {e}", dir.display()),
        )
    })?;

    let mut readme = String::with_capacity(summary_markdown.len() + 64 * traces.len() + 32);
    readme.push_str(summary_markdown);
    if !readme.is_empty() && !readme.ends_with('\n') {
        readme.push('\n');
    }
    readme.push_str("\n## Channels\n");
    for trace in traces {
        let file = format!("{}.png", file_stem(&trace.channel));
        plot_channel(&dir.join(&file), trace)?;
        readme.push_str(&format!("\n![{}]({})\n", trace.channel, file));
    }
    let path = dir.join("README.md");
    std::fs::write(&path, readme)
        .map_err(|e| io::Error::new(e.kind(), format!("writing {}: {e}", path.display())))
}

/// Image size in pixels.
pub const WIDTH: u32 = 1600;
pub const HEIGHT: u32 = 900;

/// The family name the embedded font is registered under (plotters' own default family).
const FONT: &str = "sans-serif";
static DEJAVU_SANS: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Registers the embedded DejaVu Sans with plotters, once per process.
fn ensure_font() -> io::Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU_SANS)
                .map_err(|_| "registering the embedded DejaVu Sans font with plotters failed (invalid font data)".to_string())
        })
        .clone()
        .map_err(io::Error::other)
}

/// The channel id made safe as a file name (SMAP/MSL ids such as `A-1` are kept as they are).
fn file_stem(channel: &str) -> String {
    let stem: String = channel
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if stem.is_empty() || stem.starts_with('.') {
        format!("_{stem}")
    } else {
        stem
    }
}

// Colours on white: dark value over an orange forecast, purple score under a black dashed
// threshold, red labelled ranges, blue detected events.
const VALUE: RGBColor = RGBColor(34, 34, 34);
const FORECAST: RGBColor = RGBColor(230, 115, 0);
const SCORE: RGBColor = RGBColor(94, 60, 153);
const THRESHOLD: RGBColor = RGBColor(0, 0, 0);
const LABELLED: RGBColor = RGBColor(214, 39, 40);
const DETECTED: RGBColor = RGBColor(31, 119, 180);
const GREY: RGBColor = RGBColor(90, 90, 90);

// Layout (pixels).
const TITLE_H: u32 = 66;
const HEAD_H: u32 = 30;
const VALUE_H: u32 = 340;
const SCORE_H: u32 = 290;
const MARGIN_LEFT: u32 = 12;
const Y_LABEL_AREA: u32 = 74;
const X_LABEL_AREA: u32 = 50;
const MARGIN_RIGHT: u32 = 28;

/// One entry of a panel's legend.
#[derive(Clone, Copy)]
enum Swatch {
    Line(RGBColor),
    Dashed(RGBColor),
    Band(RGBColor, f64),
    Marker(RGBColor),
}

fn plot_err(channel: &str, e: impl Display) -> io::Error {
    io::Error::other(format!("plotting channel {channel}: {e}"))
}

type Area<'b> = DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>;
type DrawResult =
    Result<(), DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>>;

/// A panel's header row: the caption at the left edge of the plot, the legend (one row) at its right edge.
fn draw_header(head: &Area<'_>, caption: &str, legend: &[(Swatch, &str)]) -> DrawResult {
    let mid = HEAD_H as i32 / 2;
    let left = (MARGIN_LEFT + Y_LABEL_AREA) as i32;
    let caption_style = (FONT, 18)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    head.draw_text(caption, &caption_style, (left, mid))?;
    let text_style = (FONT, 14)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    let mut x = (WIDTH - MARGIN_RIGHT) as i32;
    for &(swatch, label) in legend.iter().rev() {
        let w = head.estimate_text_size(label, &text_style)?.0 as i32;
        x -= w;
        head.draw_text(label, &text_style, (x, mid))?;
        let (s0, s1) = (x - 30, x - 6);
        match swatch {
            Swatch::Line(c) => head.draw(&PathElement::new(
                vec![(s0, mid), (s1, mid)],
                c.stroke_width(2),
            ))?,
            Swatch::Dashed(c) => head.draw(&DashedPathElement::new(
                vec![(s0, mid), (s1, mid)],
                6,
                4,
                c.stroke_width(2),
            ))?,
            Swatch::Band(c, a) => head.draw(&Rectangle::new(
                [(s0, mid - 7), (s1, mid + 7)],
                c.mix(a).filled(),
            ))?,
            Swatch::Marker(c) => {
                head.draw(&TriangleMarker::new(((s0 + s1) / 2, mid), 6, c.filled()))?
            }
        }
        x = s0 - 22;
    }
    Ok(())
}

fn plot_channel(path: &Path, t: &ChannelTrace) -> io::Result<()> {
    let ch = t.channel.as_str();
    let err = |e: &dyn Display| plot_err(ch, e);

    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (title_area, body) = root.split_vertically(TITLE_H);
    let (value_area, rest) = body.split_vertically(VALUE_H);
    let (score_area, strip_area) = rest.split_vertically(SCORE_H);

    // The x extent covers every series and every range, so nothing is cut off.
    let n = t
        .values
        .len()
        .max(t.forecast.len())
        .max(t.score.len())
        .max(t.threshold.len());
    let range_end = t
        .labels
        .iter()
        .map(|&(_, e)| e)
        .chain(t.events.iter().map(|&(_, e)| e.saturating_add(1)))
        .max();
    let x_max = (n as f64).max(range_end.unwrap_or(0) as f64).max(1.0);
    let x_range = 0f64..x_max;
    let labels: Vec<(f64, f64)> = t
        .labels
        .iter()
        .filter(|r| r.1 > r.0)
        .map(|&(s, e)| (s as f64, e as f64))
        .collect();
    let events: Vec<(f64, f64)> = t
        .events
        .iter()
        .filter(|r| r.1 >= r.0)
        .map(|&(s, e)| (s as f64, e as f64 + 1.0))
        .collect();
    let label_shade = (Swatch::Band(LABELLED, LABEL_SHADE), "labelled anomaly");

    // Title.
    let title_style = (FONT, 30)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Top));
    title_area
        .draw_text(ch, &title_style, (WIDTH as i32 / 2, 8))
        .map_err(|e| err(&e))?;
    let subtitle = format!(
        "{} samples  ·  {} labelled range{}  ·  {} detected event{}",
        thousands(n),
        labels.len(),
        plural(labels.len()),
        events.len(),
        plural(events.len())
    );
    let sub_style = (FONT, 16)
        .into_font()
        .color(&GREY)
        .pos(Pos::new(HPos::Center, VPos::Top));
    title_area
        .draw_text(&subtitle, &sub_style, (WIDTH as i32 / 2, 42))
        .map_err(|e| err(&e))?;

    // Panel 1: value and forecast.
    {
        let (head, area) = value_area.split_vertically(HEAD_H);
        let mut legend = vec![
            (Swatch::Line(VALUE), "value"),
            (Swatch::Line(FORECAST), "forecast"),
        ];
        if !labels.is_empty() {
            legend.push(label_shade);
        }
        draw_header(&head, "Telemetry value and one-step forecast", &legend)
            .map_err(|e| err(&e))?;
        let (lo, hi) = padded_range(
            t.values
                .iter()
                .copied()
                .chain(t.forecast.iter().flatten().copied()),
        );
        let mut chart = panel(&area, x_range.clone(), lo..hi, 0).map_err(|e| err(&e))?;
        configure_mesh(&mut chart, "value", false).map_err(|e| err(&e))?;
        let bucket = bucket_size(n, chart.plotting_area().dim_in_pixel().0);
        shade_labels(&mut chart, &labels, lo, hi).map_err(|e| err(&e))?;
        // The forecast goes underneath, a little wider, so the value stays readable on top of it.
        let (w, h) = chart.plotting_area().dim_in_pixel();
        let pixel = (x_max / w.max(1) as f64, (hi - lo) / h.max(1) as f64);
        chart
            .draw_series(wide(
                segments(t.forecast.iter().copied(), bucket),
                pixel,
                FORECAST,
            ))
            .map_err(|e| err(&e))?;
        let style = VALUE.stroke_width(1);
        let values = t.values.iter().map(|&v| Some(v));
        chart
            .draw_series(
                segments(values, bucket)
                    .into_iter()
                    .map(|s| PathElement::new(s, style)),
            )
            .map_err(|e| err(&e))?;
    }

    // Panel 2: score and threshold, y clipped to something readable.
    {
        let (head, area) = score_area.split_vertically(HEAD_H);
        let scale = ScoreScale::new(&t.score, &t.threshold);
        let caption = if scale.clipped {
            format!(
                "Anomaly score and threshold (clipped at {}; max score {})",
                short_number(scale.cap),
                short_number(scale.max_score)
            )
        } else {
            "Anomaly score and threshold".to_string()
        };
        let mut legend = vec![
            (Swatch::Line(SCORE), "score"),
            (Swatch::Dashed(THRESHOLD), "threshold"),
        ];
        if scale.clipped {
            legend.push((Swatch::Marker(SCORE), "score off scale"));
        }
        if !labels.is_empty() {
            legend.push(label_shade);
        }
        draw_header(&head, &caption, &legend).map_err(|e| err(&e))?;
        let mut chart =
            panel(&area, x_range.clone(), scale.lo..scale.hi, 0).map_err(|e| err(&e))?;
        configure_mesh(&mut chart, "score", false).map_err(|e| err(&e))?;
        let bucket = bucket_size(n, chart.plotting_area().dim_in_pixel().0);
        shade_labels(&mut chart, &labels, scale.lo, scale.hi).map_err(|e| err(&e))?;
        // Values above the axis are drawn at its top (the cap when clipped) and marked.
        let (lo, top) = (scale.lo, if scale.clipped { scale.cap } else { scale.hi });
        let clamp = move |v: Option<f32>| {
            v.filter(|v| v.is_finite())
                .map(|v| (v as f64).clamp(lo, top) as f32)
        };
        let style = SCORE.stroke_width(1);
        chart
            .draw_series(
                segments(t.score.iter().map(|&v| clamp(v)), bucket)
                    .into_iter()
                    .map(|s| PathElement::new(s, style)),
            )
            .map_err(|e| err(&e))?;
        // Dashes 10 px on, 6 px off.
        let (w, h) = chart.plotting_area().dim_in_pixel();
        let pixel = (
            x_max / w.max(1) as f64,
            (scale.hi - scale.lo) / h.max(1) as f64,
        );
        let dashed: Vec<Vec<(f64, f64)>> = segments(t.threshold.iter().map(|&v| clamp(v)), bucket)
            .iter()
            .flat_map(|s| dashes(s, 10.0 * pixel.0, 16.0 * pixel.0))
            .collect();
        chart
            .draw_series(wide(dashed, pixel, THRESHOLD))
            .map_err(|e| err(&e))?;
        // One marker per run of samples above the cap, in the headroom above it.
        if scale.clipped {
            let marker_y = (scale.cap + scale.hi) / 2.0;
            let runs = runs_above(&t.score, scale.cap);
            chart
                .draw_series(runs.into_iter().map(|(s, e)| {
                    TriangleMarker::new(((s + e) / 2.0, marker_y), 5, SCORE.filled())
                }))
                .map_err(|e| err(&e))?;
        }
    }

    // Panel 3: labelled ranges (top row) and detected events (bottom row).
    {
        let (head, area) = strip_area.split_vertically(HEAD_H);
        let legend = [
            (Swatch::Band(tint(LABELLED, BAND), 1.0), "labelled anomaly"),
            (Swatch::Band(tint(DETECTED, BAND), 1.0), "detected event"),
        ];
        draw_header(&head, "Labelled anomalies and detected events", &legend)
            .map_err(|e| err(&e))?;
        let mut chart =
            panel(&area, x_range.clone(), 0f64..2f64, X_LABEL_AREA).map_err(|e| err(&e))?;
        configure_mesh(&mut chart, "", true).map_err(|e| err(&e))?;
        // Row names where the y tick labels would be.
        let row_style = (FONT, 14)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Right, VPos::Center));
        let x0 = chart.plotting_area().get_pixel_range().0.start;
        for (row, name) in [(1.5, "labelled"), (0.5, "detected")] {
            let (_, y) = chart.backend_coord(&(0.0, row));
            root.draw_text(name, &row_style, (x0 - 8, y))
                .map_err(|e| err(&e))?;
        }
        // Keep very short ranges visible: at least 3 pixels wide.
        let px = chart.plotting_area().dim_in_pixel().0.max(1) as f64;
        let min_w = 3.0 * x_max / px;
        let band = |(s, e): (f64, f64), row: f64, color: RGBColor| {
            let (s, e) = if e - s < min_w {
                ((s + e - min_w) / 2.0, (s + e + min_w) / 2.0)
            } else {
                (s, e)
            };
            Rectangle::new(
                [(s, row + 0.18), (e, row + 0.82)],
                tint(color, BAND).filled(),
            )
        };
        chart
            .draw_series(labels.iter().map(|&r| band(r, 1.0, LABELLED)))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(events.iter().map(|&r| band(r, 0.0, DETECTED)))
            .map_err(|e| err(&e))?;
    }

    root.present()
        .map_err(|e| io::Error::other(format!("writing {}: {e}", path.display())))
}

/// Opacity of the labelled-range shading behind the lines, and the strength of the strip's
/// (opaque, so that overlapping events do not darken) band colours.
const LABEL_SHADE: f64 = 0.12;
const BAND: f64 = 0.75;

/// `c` at opacity `a` over white, as an opaque colour.
fn tint(c: RGBColor, a: f64) -> RGBColor {
    let mix = |v: u8| (v as f64 * a + 255.0 * (1.0 - a)).round() as u8;
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}

type Chart<'a, 'b, Y> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>;

fn panel<'a, 'b>(
    area: &'a Area<'b>,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
    x_label_area: u32,
) -> Result<
    Chart<'a, 'b, plotters::coord::types::RangedCoordf64>,
    DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>,
> {
    ChartBuilder::on(area)
        .margin_left(MARGIN_LEFT)
        .margin_right(MARGIN_RIGHT)
        .margin_top(2)
        .margin_bottom(if x_label_area > 0 { 8 } else { 10 })
        .y_label_area_size(Y_LABEL_AREA)
        .x_label_area_size(x_label_area)
        .build_cartesian_2d(x, y)
}

fn configure_mesh<'a, 'b: 'a, Y>(
    chart: &mut Chart<'a, 'b, Y>,
    y_desc: &str,
    strip: bool,
) -> DrawResult
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let y_fmt = |y: &f64| short_number(*y);
    // Sample indices are whole numbers: a short range's fractional ticks stay unlabelled.
    let x_fmt = |x: &f64| {
        if (x - x.round()).abs() < 1e-6 {
            thousands(x.round().max(0.0) as usize)
        } else {
            String::new()
        }
    };
    let mut mesh = chart.configure_mesh();
    mesh.x_labels(12)
        .y_labels(if strip { 0 } else { 6 })
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .x_desc("sample (seq)")
        .y_desc(y_desc)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .axis_style(BLACK.mix(0.55))
        .bold_line_style(BLACK.mix(0.10))
        .light_line_style(BLACK.mix(0.03));
    if strip {
        mesh.disable_y_mesh();
    }
    mesh.draw()
}

fn shade_labels<'a, 'b: 'a, Y>(
    chart: &mut Chart<'a, 'b, Y>,
    labels: &[(f64, f64)],
    lo: f64,
    hi: f64,
) -> DrawResult
where
    Y: Ranged<ValueType = f64>,
{
    chart.draw_series(
        labels
            .iter()
            .map(|&(s, e)| Rectangle::new([(s, lo), (e, hi)], LABELLED.mix(LABEL_SHADE).filled())),
    )?;
    Ok(())
}

/// Lines two pixels wide, drawn as 1-pixel lines shifted by one pixel right and up (`pixel` is
/// the size of a pixel in data units). Plotters draws wider strokes as polygons with unbounded
/// miter joins, which shoot far out of the panel at the sharp turns of noisy telemetry.
fn wide(
    lines: Vec<Vec<(f64, f64)>>,
    pixel: (f64, f64),
    color: RGBColor,
) -> impl Iterator<Item = PathElement<(f64, f64)>> {
    let style = color.stroke_width(1);
    lines.into_iter().flat_map(move |line| {
        [(0.0, 0.0), (pixel.0, 0.0), (0.0, pixel.1)].map(|(dx, dy)| {
            PathElement::new(
                line.iter()
                    .map(|&(x, y)| (x + dx, y + dy))
                    .collect::<Vec<_>>(),
                style,
            )
        })
    })
}

/// The dashes of a polyline, each a polyline itself, laid out along x: `on` of every `period`.
fn dashes(line: &[(f64, f64)], on: f64, period: f64) -> Vec<Vec<(f64, f64)>> {
    if !(on > 0.0 && period > on) {
        return vec![line.to_vec()];
    }
    let mut out = Vec::new();
    let mut dash: Vec<(f64, f64)> = Vec::new();
    for w in line.windows(2) {
        let (a, b) = (w[0], w[1]);
        if b.0 <= a.0 {
            continue;
        }
        let y_at = |x: f64| a.1 + (b.1 - a.1) * (x - a.0) / (b.0 - a.0);
        let mut x = a.0;
        while x < b.0 {
            let k = (x / period).floor();
            let (next, is_on) = if x - k * period < on {
                (k * period + on, true)
            } else {
                ((k + 1.0) * period, false)
            };
            let x2 = next.min(b.0);
            if is_on && x2 > x {
                // A dash crossing a vertex of the line goes on from where it was.
                if dash.last().is_none_or(|p| p.0 != x) {
                    if dash.len() > 1 {
                        out.push(std::mem::take(&mut dash));
                    }
                    dash = vec![(x, y_at(x))];
                }
                dash.push((x2, y_at(x2)));
            }
            x = if x2 > x { x2 } else { x + period * 1e-6 };
        }
    }
    if dash.len() > 1 {
        out.push(dash);
    }
    out
}

/// The `[start, end)` runs of rows whose score is above `limit`.
fn runs_above(score: &[Option<f32>], limit: f64) -> Vec<(f64, f64)> {
    let mut runs = Vec::new();
    let mut start = None;
    for (i, v) in score.iter().enumerate() {
        let above = v.is_some_and(|v| v.is_finite() && v as f64 > limit);
        match (above, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                runs.push((s as f64, i as f64));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        runs.push((s as f64, score.len() as f64));
    }
    runs
}

/// The score panel's y range: clipped at max(3 × max threshold, 99th percentile of scores).
struct ScoreScale {
    lo: f64,
    hi: f64,
    /// Where the axis is clipped (below the headroom); meaningful when `clipped`.
    cap: f64,
    max_score: f64,
    clipped: bool,
}

impl ScoreScale {
    fn new(score: &[Option<f32>], threshold: &[Option<f32>]) -> Self {
        let mut scores: Vec<f64> = score
            .iter()
            .flatten()
            .filter(|v| v.is_finite())
            .map(|&v| v as f64)
            .collect();
        let max_thr = threshold
            .iter()
            .flatten()
            .filter(|v| v.is_finite())
            .map(|&v| v as f64)
            .fold(f64::NAN, f64::max);
        let max_score = scores.iter().copied().fold(f64::NAN, f64::max);
        let min_score = scores.iter().copied().fold(f64::NAN, f64::min);
        let min_thr = threshold
            .iter()
            .flatten()
            .filter(|v| v.is_finite())
            .map(|&v| v as f64)
            .fold(f64::NAN, f64::min);
        let p99 = if scores.is_empty() {
            f64::NAN
        } else {
            let k = ((scores.len() - 1) as f64 * 0.99).round() as usize;
            *scores.select_nth_unstable_by(k, f64::total_cmp).1
        };
        let cap = (3.0 * max_thr).max(p99); // f64::max ignores a NaN side
        let top = max_score.max(max_thr);
        let (mut hi, clipped) = if cap.is_finite() && max_score > cap {
            (cap, true)
        } else {
            (top, false)
        };
        let lo = 0f64.min(min_score).min(min_thr); // scores are normally >= 0: start the axis at 0
        let lo = if lo.is_finite() { lo } else { 0.0 };
        if !hi.is_finite() || hi <= lo {
            hi = lo + 1.0;
        }
        // Headroom: room for the off-scale markers above a clipped axis.
        let pad = if clipped { 0.08 } else { 0.05 } * (hi - lo);
        let lo = if lo < 0.0 { lo - pad } else { lo };
        Self {
            lo,
            hi: hi + pad,
            cap: hi,
            max_score,
            clipped,
        }
    }
}

/// Min..max of the finite values with a 5% margin (a flat or empty series gets a unit range).
fn padded_range(values: impl Iterator<Item = f32>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v as f64), hi.max(v as f64))
        });
    if !lo.is_finite() {
        return (-1.0, 1.0);
    }
    let span = hi - lo;
    if span <= f64::EPSILON * lo.abs().max(1.0) {
        let half = (lo.abs() * 0.05).max(0.5);
        return (lo - half, hi + half);
    }
    (lo - 0.05 * span, hi + 0.05 * span)
}

/// How many samples share one pixel column (1 when there are fewer samples than pixels).
fn bucket_size(n: usize, width_px: u32) -> usize {
    n.div_ceil(width_px.max(1) as usize).max(1)
}

/// Splits a series into runs of finite values (a `None` or NaN ends a run), as (seq, value)
/// points, keeping only each bucket's min and max (in order) when `bucket > 1`, so that a line
/// over thousands of samples is drawn with about two points per pixel column and the same envelope.
fn segments(values: impl Iterator<Item = Option<f32>>, bucket: usize) -> Vec<Vec<(f64, f64)>> {
    let mut out = Vec::new();
    let mut cur: Vec<(f64, f64)> = Vec::new();
    // The current bucket: its number and the (row, value) of its min and of its max.
    type Bucket = (usize, (usize, f32), (usize, f32));
    let mut acc: Option<Bucket> = None;
    let flush = |acc: &mut Option<Bucket>, cur: &mut Vec<(f64, f64)>| {
        if let Some((_, mn, mx)) = acc.take() {
            let (a, b) = if mn.0 <= mx.0 { (mn, mx) } else { (mx, mn) };
            cur.push((a.0 as f64, a.1 as f64));
            if b.0 != a.0 {
                cur.push((b.0 as f64, b.1 as f64));
            }
        }
    };
    for (i, v) in values.enumerate() {
        match v.filter(|v| v.is_finite()) {
            None => {
                flush(&mut acc, &mut cur);
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            Some(v) => {
                let b = i / bucket;
                match &mut acc {
                    Some((ab, mn, mx)) if *ab == b => {
                        if v < mn.1 {
                            *mn = (i, v);
                        }
                        if v > mx.1 {
                            *mx = (i, v);
                        }
                    }
                    _ => {
                        flush(&mut acc, &mut cur);
                        acc = Some((b, (i, v), (i, v)));
                    }
                }
            }
        }
    }
    flush(&mut acc, &mut cur);
    if !cur.is_empty() {
        out.push(cur);
    }
    // A lone point draws nothing as a path: give it a short horizontal tick.
    for s in &mut out {
        if s.len() == 1 {
            let (x, y) = s[0];
            s.push((x + 1.0, y));
        }
    }
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// `12345` -> `12,345`.
fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A compact tick/caption number: up to 3 significant decimals, scientific when very large or small.
fn short_number(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".to_string();
    }
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        return format!("{v:.1e}");
    }
    let decimals = if a >= 100.0 {
        0
    } else if a >= 10.0 {
        1
    } else if a >= 1.0 {
        2
    } else {
        3
    };
    let s = format!("{v:.decimals$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    if s == "-0" {
        "0".to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic(channel: &str, n: usize) -> ChannelTrace {
        let values: Vec<f32> = (0..n)
            .map(|i| (i as f32 * 0.02).sin() + 0.1 * (i as f32 * 0.37).cos())
            .collect();
        let forecast = (0..n)
            .map(|i| {
                if i < 250 {
                    None
                } else {
                    Some(values[i - 1] * 0.97)
                }
            })
            .collect();
        let score = (0..n)
            .map(|i| match i {
                _ if i < 250 => None,
                1200..=1210 => Some(12_000.0),
                1180..=1240 => Some(25.0),
                _ => Some(1.0 + (i as f32 * 0.11).sin().abs() * 3.0),
            })
            .collect();
        let threshold = (0..n)
            .map(|i| if i < 250 { None } else { Some(10.0) })
            .collect();
        ChannelTrace {
            channel: channel.to_string(),
            values,
            forecast,
            score,
            threshold,
            labels: vec![(1150, 1300)],
            events: vec![(1185, 1235)],
        }
    }

    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert!(bytes.len() > 24, "PNG too short");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG signature");
        assert_eq!(&bytes[12..16], b"IHDR");
        let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        (w, h)
    }

    #[test]
    fn writes_png_per_channel_and_readme() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("report"); // does not exist yet
        let summary = "# Evaluation\n\n| channel | F1 |\n|---|---|\n| T-1 | 0.90 |";
        write_report(&out, summary, &[synthetic("T-1", 2_000)]).unwrap();

        let png = std::fs::read(out.join("T-1.png")).unwrap();
        assert_eq!(png_size(&png), (WIDTH, HEIGHT));
        assert_eq!((WIDTH, HEIGHT), (1600, 900));

        let readme = std::fs::read_to_string(out.join("README.md")).unwrap();
        assert!(readme.starts_with(summary), "{readme}");
        assert!(readme.contains("## Channels"), "{readme}");
        assert!(readme.contains("![T-1](T-1.png)"), "{readme}");
        assert!(readme.find(summary).unwrap() < readme.find("## Channels").unwrap());

        // SATWATCH_REPORT_KEEP=/some/file.png keeps the image for a look.
        if let Ok(keep) = std::env::var("SATWATCH_REPORT_KEEP") {
            std::fs::copy(out.join("T-1.png"), keep).unwrap();
        }
    }

    #[test]
    fn degenerate_traces_still_plot() {
        let dir = tempfile::tempdir().unwrap();
        let empty = ChannelTrace {
            channel: "E-0".into(),
            values: vec![],
            forecast: vec![],
            score: vec![],
            threshold: vec![],
            labels: vec![],
            events: vec![],
        };
        let flat = ChannelTrace {
            channel: "F/1".into(),
            values: vec![3.0; 10],
            forecast: vec![None; 10],
            score: vec![
                None,
                Some(f32::NAN),
                Some(0.0),
                None,
                Some(0.0),
                None,
                None,
                None,
                None,
                None,
            ],
            threshold: vec![None; 10],
            labels: vec![(4, 4), (20, 30)],
            events: vec![(9, 9)],
        };
        write_report(dir.path(), "", &[empty, flat]).unwrap();
        for f in ["E-0.png", "F_1.png"] {
            let png = std::fs::read(dir.path().join(f)).unwrap();
            assert_eq!(png_size(&png), (WIDTH, HEIGHT));
        }
        let readme = std::fs::read_to_string(dir.path().join("README.md")).unwrap();
        assert!(readme.contains("![F/1](F_1.png)"), "{readme}");
    }

    #[test]
    fn score_axis_is_clipped_above_the_threshold() {
        let t = synthetic("T-1", 2_000);
        let s = ScoreScale::new(&t.score, &t.threshold);
        assert!(s.clipped);
        assert!(s.hi >= 30.0 && s.hi < 100.0, "{}", s.hi);
        assert_eq!(s.lo, 0.0);
        let calm: Vec<Option<f32>> = (0..100).map(|i| Some(i as f32 / 20.0)).collect();
        let s = ScoreScale::new(&calm, &[Some(10.0)]);
        assert!(!s.clipped);
        assert!(s.hi >= 10.0 && s.hi < 11.0, "{}", s.hi);
    }

    #[test]
    fn segments_split_on_gaps_and_keep_the_envelope() {
        let v = [
            None,
            Some(1.0),
            Some(5.0),
            Some(-2.0),
            Some(0.0),
            None,
            Some(7.0),
        ];
        let segs = segments(v.iter().copied(), 2);
        assert_eq!(segs.len(), 2);
        // Buckets {1}, {2,3}, {4}: all of min/max kept, in order.
        assert_eq!(
            segs[0],
            vec![(1.0, 1.0), (2.0, 5.0), (3.0, -2.0), (4.0, 0.0)]
        );
        assert_eq!(segs[1], vec![(6.0, 7.0), (7.0, 7.0)]);
        let ys: Vec<f64> = segments((0..10_000).map(|i| Some((i % 7) as f32)), 50)[0]
            .iter()
            .map(|p| p.1)
            .collect();
        assert!(ys.len() <= 400);
        assert_eq!(ys.iter().copied().fold(f64::MIN, f64::max), 6.0);
        assert_eq!(ys.iter().copied().fold(f64::MAX, f64::min), 0.0);
    }

    #[test]
    fn dashes_follow_x_and_cover_the_on_fraction() {
        let d = dashes(&[(0.0, 1.0), (10.0, 1.0), (20.0, 3.0)], 2.0, 5.0);
        assert_eq!(d.len(), 4);
        assert_eq!(d[0], vec![(0.0, 1.0), (2.0, 1.0)]);
        assert_eq!(d[1], vec![(5.0, 1.0), (7.0, 1.0)]);
        assert_eq!(d[3], vec![(15.0, 2.0), (17.0, 2.4)]);
        // A dash over a vertex is one polyline through it.
        let d = dashes(&[(0.0, 0.0), (3.0, 3.0), (10.0, 3.0)], 4.0, 5.0);
        assert_eq!(d[0], vec![(0.0, 0.0), (3.0, 3.0), (4.0, 3.0)]);
        assert_eq!(d[1], vec![(5.0, 3.0), (9.0, 3.0)]);
    }

    #[test]
    fn number_formats() {
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(12), "12");
        assert_eq!(short_number(12_000.0), "12000");
        assert_eq!(short_number(123_456.0), "1.2e5");
        assert_eq!(short_number(31.5), "31.5");
        assert_eq!(short_number(0.25), "0.25");
        assert_eq!(short_number(-0.0), "0");
        assert_eq!(file_stem("A-1"), "A-1");
        assert_eq!(file_stem("../x"), "_.._x");
    }
}
