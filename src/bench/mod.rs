//! `satwatch bench pipeline`: what the pipeline costs next to its models.
//!
//! - **core throughput**: the test split streamed in-process through the engine,
//!   batcher, backend and detector ([`crate::offline::stream`]), with the share
//!   of the backend threads' time spent inside inference calls;
//! - **inference ceiling**: the very batches the batcher formed (same models,
//!   same sizes, same thread count) called directly on the backend: what the
//!   pipeline would reach if its own work cost nothing;
//! - **scaling**: the same with every channel replicated under new ids sharing
//!   the models (27, 270, 2,700 channels), with memory per channel.
//!
//! End-to-end and latency figures over the broker and PostgreSQL come from
//! `scripts/bench.sh`, which runs this command too. [`sweep`] is `satwatch
//! bench backend`'s measurement; [`cli`] holds the subcommands.

pub mod cli;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use ndarray::Array2;
use serde::Serialize;

use crate::{
    backend::{Backend, BackendError, Runner, Scratch},
    batch::BatchInputs,
    config::Pipeline,
    kafka::round_trip::Quantiles,
    metrics::Metrics,
    offline,
    repository::ModelSpec,
};

/// Why a benchmark could not run, by kind.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The pipeline file or a model's `config.pbtxt` was refused.
    #[error(transparent)]
    File(#[from] crate::file_error::FileError),
    /// The dataset could not be read.
    #[error(transparent)]
    Data(#[from] crate::dataset::DataError),
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Process(#[from] crate::processor::ProcessError),
    /// The broker round trip failed.
    #[error(transparent)]
    Broker(#[from] crate::kafka::KafkaToolError),
    /// What was asked cannot be done as asked (a bad option, too few rows).
    #[error("{0}")]
    Usage(String),
}

impl BenchError {
    /// The error's kind, for metric labels and log fields.
    pub fn error_type(&self) -> &'static str {
        match self {
            BenchError::File(e) => e.error_type(),
            BenchError::Data(_) => "data",
            BenchError::Backend(_) => "backend",
            BenchError::Engine(e) => e.error_type(),
            BenchError::Process(e) => e.error_type(),
            BenchError::Broker(e) => e.error_type(),
            BenchError::Usage(_) => "usage",
        }
    }
}

/// A batch the pipeline formed: its model, and its windows per run of rows.
#[derive(Debug, Clone)]
struct Call {
    model: usize,
    runs: Vec<usize>,
}

/// The batches the pipeline's models were called with, and the time inside
/// those calls (laying out their inputs excluded: that is counted as the
/// pipeline's).
#[derive(Default)]
struct CallLog {
    calls: Mutex<Vec<Call>>,
    inside_ns: AtomicU64,
}

/// One model's runner, recording every batch it forwards in the log.
struct RecordingBackend {
    inner: Runner,
    /// The model's index in the pipeline, as the log names it.
    model: usize,
    log: Arc<CallLog>,
}

impl RecordingBackend {
    /// Runners that record into `log` and forward to `runners`.
    fn wrap(runners: &[Runner], log: &Arc<CallLog>) -> Vec<Runner> {
        runners
            .iter()
            .enumerate()
            .map(|(model, inner)| Runner {
                backend: Arc::new(RecordingBackend {
                    inner: inner.clone(),
                    model,
                    log: log.clone(),
                }),
                index: 0,
            })
            .collect()
    }
}

impl Backend for RecordingBackend {
    fn infer(&self, _: usize, inputs: &[f32], rows: usize) -> Result<Vec<f32>, BackendError> {
        self.inner.backend.infer(self.inner.index, inputs, rows)
    }

    fn infer_batch(
        &self,
        _: usize,
        batch: &BatchInputs,
        scratch: &mut Scratch,
    ) -> Result<Vec<f32>, BackendError> {
        let model = self.model;
        let laid_out = scratch.input_time;
        let started = Instant::now();
        let result = self
            .inner
            .backend
            .infer_batch(self.inner.index, batch, scratch);
        let inside = started
            .elapsed()
            .saturating_sub(scratch.input_time - laid_out);
        self.log
            .inside_ns
            .fetch_add(inside.as_nanos() as u64, Ordering::Relaxed);
        let mut runs = vec![0; batch.run_starts.len()];
        for &start in &batch.starts {
            runs[batch.locate(start).0] += 1;
        }
        self.log
            .calls
            .lock()
            .expect("recording never panics")
            .push(Call { model, runs });
        result
    }
}

/// Every model of `specs` on a [`FreeBackend`].
fn free_runners(specs: &[Arc<ModelSpec>]) -> Vec<Runner> {
    let free = FreeBackend {
        horizons: specs.iter().map(|s| s.horizon).collect(),
    };
    Runner::all_on(Arc::new(free), specs.len())
}

/// Returns a zero forecast at once: the pipeline's own cost, with free models.
struct FreeBackend {
    horizons: Vec<usize>,
}

impl Backend for FreeBackend {
    fn infer(&self, model: usize, _inputs: &[f32], rows: usize) -> Result<Vec<f32>, BackendError> {
        Ok(vec![0.0; rows * self.horizons[model]])
    }

    /// Without laying the windows out: the shipped models run in their row
    /// form, which reads the engine's runs as they are.
    fn infer_batch(
        &self,
        model: usize,
        batch: &BatchInputs,
        _: &mut Scratch,
    ) -> Result<Vec<f32>, BackendError> {
        Ok(vec![0.0; batch.len() * self.horizons[model]])
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchRun {
    /// Inference threads: the pipeline's and the ceiling's.
    pub backend_threads: usize,
    pub channels: usize,
    pub replicas: usize,
    /// Samples streamed (including each channel's warm-up).
    pub samples: u64,
    /// Windows inferred (samples with a full window).
    pub windows: u64,
    pub elapsed_s: f64,
    pub samples_per_s: f64,
    pub windows_per_s: f64,
    /// Fraction of the backend threads' wall time spent inside inference calls.
    pub inference_share: f64,
    /// Fraction of the backend threads' wall time spent laying out windows
    /// for those calls (`satwatch_inference_compute_input_duration_us_total`).
    pub layout_share: f64,
    pub batches: usize,
    pub mean_batch_size: f64,
    pub ceiling_elapsed_s: f64,
    pub ceiling_windows_per_s: f64,
    /// windows_per_s / ceiling_windows_per_s.
    pub ratio_to_ceiling: f64,
    /// Backend-thread time inside inference calls per window, in the
    /// pipeline and in the ceiling: how much slower the same calls run
    /// among the pipeline's own work.
    pub pipeline_inference_us_per_window: f64,
    pub ceiling_inference_us_per_window: f64,
    /// Samples/s with a backend that costs nothing: the pipeline's own limit.
    pub free_model_samples_per_s: f64,
    /// Process CPU seconds during the streamed run.
    pub cpu_s: f64,
    pub peak_rss_bytes: u64,
    /// Window and detector state held per channel (computed, not sampled).
    pub channel_state_bytes: u64,
    pub bytes_per_channel: f64,
}

/// Every channel of `pipeline` repeated `replicas` times under new ids
/// (`<id>~<r>`, r >= 1), sharing the original's model, subsystem and topic.
pub fn replicate(pipeline: &Pipeline, replicas: usize) -> Pipeline {
    let mut replicated = pipeline.clone();
    replicated.channels = (0..replicas.max(1))
        .flat_map(|r| {
            pipeline.channels.iter().map(move |c| {
                let mut c = c.clone();
                if r > 0 {
                    c.id = format!("{}~{r}", c.id);
                }
                c
            })
        })
        .collect();
    replicated
}

fn cpu_and_peak_rss() -> (Duration, u64) {
    // SAFETY: getrusage writes into the struct we pass and reads nothing else.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (
        tv(usage.ru_utime) + tv(usage.ru_stime),
        usage.ru_maxrss as u64 * 1024,
    )
}

/// Streams `inputs` (one array per channel of `pipeline`) through the engine,
/// then replays the same batches directly on the backend.
pub async fn measure(
    pipeline: &Pipeline,
    specs: &[Arc<ModelSpec>],
    runners: Vec<Runner>,
    inputs: Vec<Arc<Array2<f32>>>,
    replicas: usize,
) -> Result<BenchRun, BenchError> {
    let log = Arc::new(CallLog::default());
    let samples: u64 = inputs.iter().map(|v| v.nrows() as u64).sum();
    let (cpu_before, _) = cpu_and_peak_rss();
    let started = Instant::now();
    let mut windows = 0u64;
    let inputs_again = inputs.clone();
    let metrics = Arc::new(Metrics::new());
    let counters = offline::stream(
        pipeline,
        specs,
        RecordingBackend::wrap(&runners, &log),
        inputs,
        metrics.clone(),
        None,
        |out| windows += out.forecasts.len() as u64,
    )
    .await?;
    let elapsed = started.elapsed();
    let (cpu_after, peak_rss) = cpu_and_peak_rss();
    debug_assert_eq!(counters.admitted, samples);

    let threads = pipeline.file.engine.backend_threads;
    let calls = std::mem::take(&mut *log.calls.lock().expect("recording never panics"));
    let first_channel = inputs_again
        .first()
        .ok_or_else(|| BenchError::Usage("the pipeline has no channels".into()))?;
    let ceiling_rows = ceiling_rows(pipeline, specs, first_channel, &calls)?;
    let inside = Duration::from_nanos(log.inside_ns.load(Ordering::Relaxed));
    let laying_out = Duration::from_micros(
        specs
            .iter()
            .map(|s| {
                let version = s.version.to_string();
                metrics
                    .input_duration_us
                    .with_label_values(&[s.name.as_str(), version.as_str()])
                    .get()
            })
            .sum(),
    );
    let ceiling = replay_calls(&runners, specs, &calls, threads, &ceiling_rows)?;

    let free = free_runners(specs);
    let started = Instant::now();
    let unobserved = Arc::new(Metrics::new());
    offline::stream(
        pipeline,
        specs,
        free,
        inputs_again,
        unobserved,
        None,
        |_| {},
    )
    .await?;
    let free_elapsed = started.elapsed();

    let elapsed_s = elapsed.as_secs_f64();
    let windows_per_s = windows as f64 / elapsed_s;
    let ceiling_windows_per_s = windows as f64 / ceiling.as_secs_f64();
    let channel_state_bytes = channel_state_bytes(pipeline, specs)?;
    Ok(BenchRun {
        backend_threads: threads,
        channels: pipeline.channels.len(),
        replicas,
        samples,
        windows,
        elapsed_s,
        samples_per_s: samples as f64 / elapsed_s,
        windows_per_s,
        inference_share: inside.as_secs_f64() / (elapsed_s * threads as f64),
        layout_share: laying_out.as_secs_f64() / (elapsed_s * threads as f64),
        batches: calls.len(),
        mean_batch_size: windows as f64 / calls.len().max(1) as f64,
        ceiling_elapsed_s: ceiling.as_secs_f64(),
        ceiling_windows_per_s,
        ratio_to_ceiling: windows_per_s / ceiling_windows_per_s,
        pipeline_inference_us_per_window: inside.as_secs_f64() * 1e6 / windows as f64,
        ceiling_inference_us_per_window: ceiling.as_secs_f64() * threads as f64 * 1e6
            / windows as f64,
        free_model_samples_per_s: samples as f64 / free_elapsed.as_secs_f64(),
        cpu_s: (cpu_after - cpu_before).as_secs_f64(),
        peak_rss_bytes: peak_rss,
        channel_state_bytes: channel_state_bytes as u64,
        bytes_per_channel: channel_state_bytes as f64 / pipeline.channels.len() as f64,
    })
}

fn channel_state_bytes(pipeline: &Pipeline, specs: &[Arc<ModelSpec>]) -> Result<usize, BenchError> {
    let engine = crate::engine::Engine::new(
        &pipeline.channels,
        specs,
        free_runners(specs),
        pipeline.file.detect,
    )?;
    Ok(engine.channel_state_bytes())
}

/// Floats of the longest run of rows among `calls`.
fn longest_run_floats(specs: &[Arc<ModelSpec>], calls: &[Call]) -> usize {
    calls
        .iter()
        .flat_map(|call| {
            let spec = &specs[call.model];
            call.runs
                .iter()
                .map(|&n| (n + spec.window - 1) * spec.features)
        })
        .max()
        .unwrap_or(0)
}

/// One buffer for every call of the ceiling, as long as the longest run: the
/// first channel's real rows, normalised by its model, repeated. Real values,
/// not a constant: the cost of a product can depend on its operands
/// (subnormal weights met by non-zero inputs ran 11 to 15 times slower on an
/// Intel Xeon; see `training/train.py`'s `flush_subnormals`), so a ceiling
/// should see inputs like the pipeline's.
fn ceiling_rows(
    pipeline: &Pipeline,
    specs: &[Arc<ModelSpec>],
    first_channel: &Array2<f32>,
    calls: &[Call],
) -> Result<Vec<f32>, BenchError> {
    let longest = longest_run_floats(specs, calls);
    if longest == 0 {
        return Ok(Vec::new());
    }
    let spec = pipeline
        .channels
        .first()
        .and_then(|c| specs.iter().find(|s| s.name == c.model))
        .ok_or_else(|| BenchError::Usage("the pipeline has no channels".into()))?;
    let rows = real_rows(first_channel, spec)?;
    Ok(rows.iter().copied().cycle().take(longest).collect())
}

/// Calls the backend with exactly the batches of `calls` (the same runs of
/// rows) on `threads` threads, every run read from (a prefix of) `rows`, one
/// cache-hot buffer. Returns the threads' time inside the calls, divided by
/// their number: what `calls` take on `threads` threads with nothing else to
/// do. Building each batch (a copy of its rows, as the engine does) is not
/// counted, nor is laying out its inputs inside the call.
fn replay_calls(
    runners: &[Runner],
    specs: &[Arc<ModelSpec>],
    calls: &[Call],
    threads: usize,
    rows: &[f32],
) -> Result<Duration, BenchError> {
    let next = AtomicUsize::new(0);
    let inside_ns = AtomicU64::new(0);
    let failure = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                // As on the pipeline's inference threads.
                crate::backend::treat_subnormals_as_zero();
                let mut scratch = Scratch::default();
                let mut batches: Vec<Option<BatchInputs>> = vec![None; specs.len()];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(call) = calls.get(i) else {
                        break;
                    };
                    let spec = &specs[call.model];
                    let batch = batches[call.model]
                        .get_or_insert_with(|| BatchInputs::new(spec.window * spec.features));
                    batch.clear();
                    for &n in &call.runs {
                        let start = batch.push_run(&rows[..(n + spec.window - 1) * spec.features]);
                        for w in 0..n {
                            batch.push_window(start + w * spec.features);
                        }
                    }
                    scratch.input_time = Duration::ZERO;
                    let started = Instant::now();
                    let runner = &runners[call.model];
                    let result = runner
                        .backend
                        .infer_batch(runner.index, batch, &mut scratch);
                    let inside = started.elapsed().saturating_sub(scratch.input_time);
                    inside_ns.fetch_add(inside.as_nanos() as u64, Ordering::Relaxed);
                    if let Err(err) = result {
                        *failure.lock().expect("no panics here") = Some(err);
                        break;
                    }
                }
            });
        }
    });
    match failure.into_inner().expect("no panics here") {
        Some(err) => Err(err.into()),
        None => Ok(Duration::from_nanos(
            inside_ns.load(Ordering::Relaxed) / threads.max(1) as u64,
        )),
    }
}

/// satwatch's own latency at an offered load, in process: from a sample
/// being handed to the engine to its score row reaching the sink.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyAt {
    pub channels: usize,
    /// The offered load.
    pub samples_per_s: f64,
    /// Samples handed over at that load (after the warm-up rows), and the
    /// rate they went at.
    pub samples: u64,
    pub achieved_samples_per_s: f64,
    /// Score rows measured.
    pub scored: usize,
    #[serde(flatten)]
    pub latency: Quantiles,
}

/// Streams `inputs` through the engine at `samples_per_s` for about
/// `seconds` (after each channel's warm-up rows, fed at full speed) and
/// measures how long each sample takes to come out as a score row: the
/// engine, the batcher's wait, inference and detection, with no broker and
/// no database. The part of `run`'s end-to-end latency that satwatch owns,
/// and how it grows with the channels.
pub async fn measure_latency(
    pipeline: &Pipeline,
    specs: &[Arc<ModelSpec>],
    runners: Vec<Runner>,
    inputs: &[Arc<Array2<f32>>],
    samples_per_s: f64,
    seconds: f64,
) -> Result<LatencyAt, BenchError> {
    let warm_up = specs.iter().map(|s| s.window).max().unwrap_or(0);
    let channels = inputs.len().max(1);
    // At least two rows per channel past the warm-up (the first window's
    // forecast scores the second), at most what the shortest channel has.
    let shortest = inputs.iter().map(|v| v.nrows()).min().unwrap_or(0);
    let paced_rows = ((samples_per_s * seconds / channels as f64).ceil() as usize)
        .max(2)
        .min(shortest.saturating_sub(warm_up));
    if paced_rows < 2 {
        return Err(BenchError::Usage(format!(
            "a latency run needs {} rows per channel ({warm_up} to fill the windows, then 2 \
             or more at the offered load); the shortest channel has {shortest}",
            warm_up + 2
        )));
    }
    let rows = warm_up + paced_rows;
    // Replicas share their channel's array: cut each array once.
    let mut cut: HashMap<*const Array2<f32>, Arc<Array2<f32>>> = HashMap::new();
    let inputs = inputs
        .iter()
        .map(|v| {
            cut.entry(Arc::as_ptr(v))
                .or_insert_with(|| Arc::new(v.slice(ndarray::s![..rows, ..]).to_owned()))
                .clone()
        })
        .collect();
    let mut latencies = Vec::new();
    let pace = offline::Pace {
        samples_per_s,
        from_row: warm_up,
    };
    let mut first_paced: Option<Instant> = None;
    let mut last_paced = None;
    offline::stream(
        pipeline,
        specs,
        runners,
        inputs,
        Arc::new(Metrics::new()),
        Some(pace),
        |out| {
            let now = Instant::now();
            for received in out.scores.iter().filter_map(|row| row.received) {
                first_paced = Some(first_paced.map_or(received, |f| f.min(received)));
                last_paced = Some(last_paced.map_or(received, |l: Instant| l.max(received)));
                latencies.push((now - received).as_secs_f64() * 1e3);
            }
        },
    )
    .await?;
    let scored = latencies.len();
    let latency = Quantiles::of(latencies)
        .ok_or_else(|| BenchError::Usage("the latency run scored no sample".into()))?;
    let samples = (paced_rows * channels) as u64;
    let span = match (first_paced, last_paced) {
        (Some(first), Some(last)) => (last - first).as_secs_f64(),
        _ => 0.0,
    };
    Ok(LatencyAt {
        channels: pipeline.channels.len(),
        samples_per_s,
        samples,
        // From the first sample's stamp to the last's.
        achieved_samples_per_s: if span > 0.0 {
            (samples - 1) as f64 / span
        } else {
            f64::NAN
        },
        scored,
        latency,
    })
}

/// One batch size of the backend micro-benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct BatchFigure {
    pub batch_size: usize,
    pub calls: usize,
    /// Windows forecast per second by back-to-back calls on one thread.
    pub windows_per_s: f64,
    /// The same at the median call's latency: steadier than the mean where
    /// other processes share the cores.
    pub p50_windows_per_s: f64,
    /// Latency of one call, milliseconds.
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Every row of one channel, normalised as the pipeline does
/// (`(x - center) / scale` with the model's train statistics), row-major.
pub fn real_rows(values: &Array2<f32>, spec: &ModelSpec) -> Result<Vec<f32>, BenchError> {
    if values.nrows() < spec.window || values.ncols() != spec.features {
        return Err(BenchError::Usage(format!(
            "{}: the data has {} rows of {} values; a window needs {} rows of {}",
            spec.name,
            values.nrows(),
            values.ncols(),
            spec.window,
            spec.features
        )));
    }
    let (norm, features) = (&spec.normalisation, spec.features);
    // ndarray iterates in logical (row-major) order whatever the layout.
    Ok(values
        .iter()
        .enumerate()
        .map(|(i, x)| (x - norm.center[i % features]) / norm.scale[i % features])
        .collect())
}

/// `count` real windows of one channel, normalised as the pipeline does
/// (`(x - center) / scale` with the model's train statistics), ending at rows
/// spread evenly over `values`: `[count, window * features]` row-major.
pub fn real_windows(
    values: &Array2<f32>,
    spec: &ModelSpec,
    count: usize,
) -> Result<Vec<f32>, BenchError> {
    let rows = real_rows(values, spec)?;
    let (window, features) = (spec.window, spec.features);
    let last_start = values.nrows() - window;
    let mut out = Vec::with_capacity(count * window * features);
    for i in 0..count {
        let start = if count > 1 {
            i * last_start / (count - 1)
        } else {
            last_start
        };
        out.extend_from_slice(&rows[start * features..(start + window) * features]);
    }
    Ok(out)
}

/// Calls `backend` for `model` back to back at each batch size, on one
/// thread, for at least `min_time` (and at least 5 calls) after 3 warm-up
/// calls. A batch of `n` is `n` consecutive windows of one channel, one run
/// of rows as the engine hands it over, cut from `rows` (a channel's
/// normalised rows, `features` values each, repeated when a batch needs
/// more). Time laying out inputs inside a call is not counted.
pub fn sweep(
    backend: &dyn Backend,
    model: usize,
    rows: &[f32],
    window: usize,
    features: usize,
    batch_sizes: &[usize],
    min_time: Duration,
) -> Result<Vec<BatchFigure>, BenchError> {
    if rows.len() < window * features || features == 0 {
        return Err(BenchError::Usage(
            "not enough rows for a window to benchmark with".into(),
        ));
    }
    // As on the pipeline's inference threads.
    crate::backend::treat_subnormals_as_zero();
    let mut figures = Vec::with_capacity(batch_sizes.len());
    let mut scratch = Scratch::default();
    for &n in batch_sizes {
        if n == 0 {
            return Err(BenchError::Usage("batch sizes must be >= 1".into()));
        }
        let mut batch = BatchInputs::new(window * features);
        let run: Vec<f32> = rows
            .iter()
            .copied()
            .cycle()
            .take((n + window - 1) * features)
            .collect();
        let start = batch.push_run(&run);
        for w in 0..n {
            batch.push_window(start + w * features);
        }
        let rows = n;
        let mut call = || -> Result<(Vec<f32>, Duration), BenchError> {
            scratch.input_time = Duration::ZERO;
            let t = Instant::now();
            let out = backend.infer_batch(model, &batch, &mut scratch)?;
            Ok((out, t.elapsed().saturating_sub(scratch.input_time)))
        };
        for _ in 0..3 {
            call()?;
        }
        let mut latencies = Vec::new();
        let started = Instant::now();
        while started.elapsed() < min_time || latencies.len() < 5 {
            let (out, latency) = call()?;
            latencies.push(latency);
            std::hint::black_box(out);
        }
        let total: Duration = latencies.iter().sum();
        latencies.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
        figures.push(BatchFigure {
            batch_size: rows,
            calls: latencies.len(),
            windows_per_s: (rows * latencies.len()) as f64 / total.as_secs_f64(),
            p50_windows_per_s: rows as f64 / at(0.5).as_secs_f64(),
            mean_ms: ms(latencies.iter().sum::<Duration>()) / latencies.len() as f64,
            p50_ms: ms(at(0.5)),
            p99_ms: ms(at(0.99)),
            max_ms: ms(*latencies.last().expect("at least 5 calls")),
        });
    }
    Ok(figures)
}
