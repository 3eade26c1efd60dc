//! Inference backends: a synchronous [`Backend`] trait, the backends, the
//! choice of backend per model ([`select`]), and a pool of threads that runs
//! batches on it, replying by channel.
//!
//! Backends are synchronous on purpose: an inference call is CPU- or
//! device-bound work that must not run on the async runtime's threads.
//!
//! - [`onnx`]: ONNX Runtime on the CPU; with the `onnx-gpu` feature also its
//!   TensorRT and CUDA execution providers (`onnx-tensorrt`).
//! - [`native`]: the shipped model family in plain Rust on the CPU.
//! - `cuda` (feature `cuda`): the same family on the GPU through cudarc
//!   (driver, cuBLAS, NVRTC), needing neither TensorRT nor onnxruntime-gpu.
//! - [`graph`]: reads an ONNX file into the plan `native` and `cuda` run.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod graph;
pub mod native;
pub mod onnx;
pub mod rows;

use std::{
    fmt,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::{
    batch::BatchInputs,
    config::EngineSettings,
    engine::ModelBatch,
    repository::{DeviceKind, ModelSpec},
};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0}")]
    Library(String),
    #[error("{path}: cannot load model: {reason}")]
    Load { path: String, reason: String },
    #[error("{path}{}: {reason}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Mismatch {
        path: String,
        line: Option<usize>,
        reason: String,
    },
    #[error("model {model}: inference failed: {reason}")]
    Inference { model: String, reason: String },
    /// A GPU backend was asked for and no GPU can be used: why.
    #[error("{0}")]
    NoGpu(String),
}

impl BackendError {
    /// The error's kind, for metric labels and log fields (the
    /// inference-failure counter is per model; this says which failure).
    pub fn error_type(&self) -> &'static str {
        match self {
            BackendError::Library(_) => "library",
            BackendError::Load { .. } => "load",
            BackendError::Mismatch { .. } => "mismatch",
            BackendError::Inference { .. } => "inference",
            BackendError::NoGpu(_) => "no_gpu",
        }
    }
}

/// Runs models on batches of windows.
pub trait Backend: Send + Sync {
    /// Runs model `model` (its index in the load order) on `rows` windows laid
    /// out `[rows, window, features]`; returns `[rows, horizon]`.
    fn infer(&self, model: usize, inputs: &[f32], rows: usize) -> Result<Vec<f32>, BackendError>;

    /// Runs model `model` on a batch as the engine cut it (runs of rows that
    /// consecutive windows share); returns `[windows, horizon]` in the batch's
    /// order. By default the windows are laid out one by one into `scratch`
    /// for [`Backend::infer`]; a backend that can read runs directly
    /// overrides this and skips that copy.
    fn infer_batch(
        &self,
        model: usize,
        batch: &BatchInputs,
        scratch: &mut Scratch,
    ) -> Result<Vec<f32>, BackendError> {
        lay_out_and_infer(self, model, batch, scratch)
    }
}

/// Lays a batch's windows out one by one into `scratch` (timing it as input
/// time), then runs [`Backend::infer`] on them.
pub fn lay_out_and_infer<B: Backend + ?Sized>(
    backend: &B,
    model: usize,
    batch: &BatchInputs,
    scratch: &mut Scratch,
) -> Result<Vec<f32>, BackendError> {
    let laying_out = Instant::now();
    let windows = batch.windows(&mut scratch.floats);
    scratch.input_time += laying_out.elapsed();
    backend.infer(model, windows, batch.len())
}

/// An inference thread's reusable input buffer, and the time calls spent
/// filling it (Triton's "compute input"), which [`Backend::infer_batch`] adds to.
#[derive(Debug, Default)]
pub struct Scratch {
    pub floats: Vec<f32>,
    pub input_time: Duration,
}

/// A batch that has been through a backend.
#[derive(Debug)]
pub struct Completion {
    pub batch: ModelBatch,
    pub result: Result<Vec<f32>, BackendError>,
    /// Time from the oldest window's enqueue to dispatch.
    pub queue_time: Duration,
    /// Time laying out the batch's windows for the call (Triton's "compute
    /// input").
    pub input_time: Duration,
    /// Time inside the backend call.
    pub compute_time: Duration,
}

/// Threads that take batches, run them, and send completions back.
pub struct BackendPool {
    jobs: crossbeam_channel::Sender<(ModelBatch, Instant)>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl BackendPool {
    /// Starts `threads` workers, each running batches on their models'
    /// runners; completions go to `completions`.
    pub fn start(threads: usize, completions: mpsc::UnboundedSender<Completion>) -> Self {
        let (jobs, queue) = crossbeam_channel::unbounded::<(ModelBatch, Instant)>();
        let threads = (0..threads.max(1))
            .map(|i| {
                let queue = queue.clone();
                let completions = completions.clone();
                thread::Builder::new()
                    .name(format!("satwatch-infer-{i}"))
                    .spawn(move || {
                        treat_subnormals_as_zero();
                        // A batch's inputs are laid out here, just before the
                        // call reads them, so they are still in cache.
                        let mut scratch = Scratch::default();
                        for (batch, dispatched) in queue {
                            scratch.input_time = Duration::ZERO;
                            let started = Instant::now();
                            let result = run_batch(&batch, &mut scratch);
                            let input_time = scratch.input_time;
                            let compute_time = started.elapsed().saturating_sub(input_time);
                            let queue_time =
                                dispatched.saturating_duration_since(batch.oldest_enqueued);
                            if completions
                                .send(Completion {
                                    batch,
                                    result,
                                    queue_time,
                                    input_time,
                                    compute_time,
                                })
                                .is_err()
                            {
                                break; // The driver is gone; nothing waits for results.
                            }
                        }
                    })
                    .expect("the OS can start an inference thread")
            })
            .collect();
        Self { jobs, threads }
    }

    /// Queues a batch. In-flight batches are bounded by the engine (one per model).
    pub fn submit(&self, batch: ModelBatch) {
        self.jobs
            .send((batch, Instant::now()))
            .expect("inference threads live as long as the pool");
    }

    /// Stops the workers after the queued batches.
    pub fn shutdown(self) {
        drop(self.jobs);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// Runs `batch` on its version's runner. A call that panics, or returns
/// other than `[windows, horizon]` values, is that model's failed call: the
/// panic is caught here, at the backend's boundary, and the inference
/// thread goes on with the next batch.
fn run_batch(batch: &ModelBatch, scratch: &mut Scratch) -> Result<Vec<f32>, BackendError> {
    let runner = &batch.runner;
    let call = std::panic::AssertUnwindSafe(|| {
        runner
            .backend
            .infer_batch(runner.index, &batch.inputs, scratch)
    });
    let failed = |reason: String| BackendError::Inference {
        model: batch.spec.name.clone(),
        reason,
    };
    let forecasts = match std::panic::catch_unwind(call) {
        Ok(result) => result?,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            return Err(failed(format!("the backend panicked: {message}")));
        }
    };
    let expected = batch.entries.len() * batch.spec.horizon;
    if forecasts.len() != expected {
        return Err(failed(format!(
            "the backend returned {} values for {} windows of horizon {} ({expected} expected)",
            forecasts.len(),
            batch.entries.len(),
            batch.spec.horizon
        )));
    }
    Ok(forecasts)
}

/// Makes the calling thread's floating-point unit flush subnormal results to
/// zero and read subnormal operands as zero (x86-64's FTZ and DAZ bits;
/// elsewhere nothing). Every inference call runs on such a thread: a model
/// with subnormal weights (training leaves them where an input never fires)
/// otherwise runs an order of magnitude slower on Intel CPUs once such an
/// input is non-zero, for values too small to change a forecast.
pub fn treat_subnormals_as_zero() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: reads and writes this thread's MXCSR register only, setting the
    // two bits that change how subnormal floats are handled and nothing else.
    unsafe {
        const FLUSH_TO_ZERO: u32 = 1 << 15;
        const DENORMALS_ARE_ZERO: u32 = 1 << 6;
        let mut csr: u32 = 0;
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
        csr |= FLUSH_TO_ZERO | DENORMALS_ARE_ZERO;
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags));
    }
}

/// `[engine] gpu_fallback`: what happens to a model that asks for a GPU when
/// none can be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GpuFallback {
    /// Run it on ONNX Runtime's CPU backend, after one warning line.
    #[default]
    Cpu,
    /// Refuse to start, saying why.
    Refuse,
}

/// A backend a model can run on, as `[engine] backend` and `--backend` name
/// it (serde and clap read the same names). `Auto` is Triton's `KIND_AUTO`:
/// each model where its `config.pbtxt` puts it, resolved by [`select`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum BackendKind {
    /// Each model where its `config.pbtxt` puts it: `KIND_CPU` on ONNX
    /// Runtime (CPU), `KIND_GPU` on the GPU backend this build has (`cuda`,
    /// else `onnx-tensorrt`).
    #[default]
    Auto,
    /// ONNX Runtime on the CPU.
    Onnx,
    /// The model family in plain Rust on the CPU.
    Native,
    /// The model family on the GPU through cudarc (feature `cuda`).
    Cuda,
    /// ONNX Runtime with the TensorRT execution provider, CUDA's as fallback
    /// (feature `onnx-gpu`, onnxruntime-gpu and TensorRT installed).
    OnnxTensorrt,
}

/// Loads a group of models on one backend.
pub type LoadFn = fn(&[Arc<ModelSpec>], &EngineSettings) -> Result<Arc<dyn Backend>, BackendError>;

/// One row of [`BACKENDS`]: what satwatch knows of a backend.
pub struct BackendEntry {
    pub kind: BackendKind,
    pub gpu: bool,
    /// Loads a group of models on it.
    pub load: LoadFn,
}

/// Every backend, in the order [`select`] loads them: GPU ones first, so that
/// models that fall back to the CPU join the CPU group. A new backend is a
/// file beside `onnx.rs`, a [`BackendKind`] variant and a row here.
pub const BACKENDS: &[BackendEntry] = &[
    BackendEntry {
        kind: BackendKind::Cuda,
        gpu: true,
        load: load_cuda,
    },
    BackendEntry {
        kind: BackendKind::OnnxTensorrt,
        gpu: true,
        load: load_onnx_tensorrt,
    },
    BackendEntry {
        kind: BackendKind::Native,
        gpu: false,
        load: |specs, _| Ok(Arc::new(native::NativeBackend::load(specs)?)),
    },
    BackendEntry {
        kind: BackendKind::Onnx,
        gpu: false,
        load: |specs, engine| {
            Ok(if engine.row_form {
                Arc::new(onnx::OnnxBackend::load(specs, 1)?)
            } else {
                Arc::new(onnx::OnnxBackend::load_files(specs, 1)?)
            })
        },
    },
];

#[cfg(feature = "cuda")]
fn load_cuda(
    specs: &[Arc<ModelSpec>],
    engine: &EngineSettings,
) -> Result<Arc<dyn Backend>, BackendError> {
    Ok(Arc::new(cuda::CudaBackend::load(specs, engine.gpu_device)?))
}

#[cfg(not(feature = "cuda"))]
fn load_cuda(_: &[Arc<ModelSpec>], _: &EngineSettings) -> Result<Arc<dyn Backend>, BackendError> {
    Err(BackendError::NoGpu(
        "this satwatch was built without the `cuda` cargo feature (cargo build --release --features cuda)".into(),
    ))
}

#[cfg(feature = "onnx-gpu")]
fn load_onnx_tensorrt(
    specs: &[Arc<ModelSpec>],
    engine: &EngineSettings,
) -> Result<Arc<dyn Backend>, BackendError> {
    Ok(Arc::new(onnx::OnnxBackend::load_gpu(
        specs,
        1,
        &onnx::GpuOptions::from_engine(engine),
    )?))
}

#[cfg(not(feature = "onnx-gpu"))]
fn load_onnx_tensorrt(
    _: &[Arc<ModelSpec>],
    _: &EngineSettings,
) -> Result<Arc<dyn Backend>, BackendError> {
    Err(BackendError::NoGpu(
        "this satwatch was built without the `onnx-gpu` cargo feature (cargo build --release --features onnx-gpu)".into(),
    ))
}

impl BackendKind {
    /// Its row in [`BACKENDS`]; None for `Auto`, which is not a backend.
    pub fn entry(self) -> Option<&'static BackendEntry> {
        BACKENDS.iter().find(|b| b.kind == self)
    }

    pub fn is_gpu(self) -> bool {
        self.entry().is_some_and(|b| b.gpu)
    }

    /// The GPU backend `auto` gives a `KIND_GPU` model: the one this build has.
    pub fn default_gpu() -> Self {
        if cfg!(feature = "cuda") || !cfg!(feature = "onnx-gpu") {
            Self::Cuda
        } else {
            Self::OnnxTensorrt
        }
    }

    /// The backend a model on `device` runs on when this kind is asked for.
    pub fn resolve(self, device: DeviceKind) -> Self {
        match self {
            Self::Auto if device == DeviceKind::Gpu => Self::default_gpu(),
            Self::Auto => Self::Onnx,
            kind => kind,
        }
    }

    /// The name the pipeline file and the command line use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Onnx => "onnx",
            Self::Native => "native",
            Self::Cuda => "cuda",
            Self::OnnxTensorrt => "onnx-tensorrt",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a model version runs: a backend and the model's index there. Every
/// model has one from the start; model control gives a new version its own.
#[derive(Clone)]
pub struct Runner {
    pub backend: Arc<dyn Backend>,
    pub index: usize,
}

impl Runner {
    /// Runners for `models` models that all run on `backend`, in its order.
    pub fn all_on(backend: Arc<dyn Backend>, models: usize) -> Vec<Runner> {
        (0..models)
            .map(|index| Runner {
                backend: backend.clone(),
                index,
            })
            .collect()
    }
}

impl fmt::Debug for Runner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Runner {{ index: {} }}", self.index)
    }
}

/// Where one model ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub model: String,
    pub backend: BackendKind,
    /// Set when the model asked for a GPU and fell back to the CPU: why.
    pub fell_back: Option<String>,
}

/// Where each of a set of models runs, in the specs' order.
pub struct Selection {
    pub placements: Vec<Placement>,
    pub runners: Vec<Runner>,
}

/// Chooses and loads the backend of every model: `[engine] backend` when it
/// names one, else each model's `instance_group` kind. A model that asks for
/// a GPU when none is usable runs on ONNX Runtime's CPU backend after one
/// warning (`gpu_fallback = "cpu"`), or stops the load with the reason
/// (`"refuse"`).
pub fn select(
    specs: &[Arc<ModelSpec>],
    engine: &EngineSettings,
) -> Result<Selection, BackendError> {
    let wanted: Vec<BackendKind> = specs
        .iter()
        .map(|spec| engine.backend.resolve(spec.device))
        .collect();
    let mut placements: Vec<Placement> = specs
        .iter()
        .zip(&wanted)
        .map(|(spec, &backend)| Placement {
            model: spec.name.clone(),
            backend,
            fell_back: None,
        })
        .collect();

    // Load each kind's models together, in the table's order.
    let mut runners: Vec<Option<Runner>> = vec![None; specs.len()];
    for entry in BACKENDS {
        let kind = entry.kind;
        let members: Vec<usize> = (0..specs.len())
            .filter(|&i| placements[i].backend == kind)
            .collect();
        if members.is_empty() {
            continue;
        }
        let group: Vec<Arc<ModelSpec>> = members.iter().map(|&i| specs[i].clone()).collect();
        match (entry.load)(&group, engine) {
            Ok(backend) => {
                for (index, &model) in members.iter().enumerate() {
                    runners[model] = Some(Runner {
                        backend: backend.clone(),
                        index,
                    });
                }
            }
            Err(BackendError::NoGpu(reason)) => {
                let names: Vec<&str> = members.iter().map(|&i| specs[i].name.as_str()).collect();
                let asked = match engine.backend {
                    BackendKind::Auto => "instance_group KIND_GPU in its config.pbtxt".to_owned(),
                    _ => format!("[engine] backend = \"{kind}\""),
                };
                match engine.gpu_fallback {
                    GpuFallback::Refuse => {
                        return Err(BackendError::NoGpu(format!(
                            "{} asked for a GPU ({asked}) but none can be used: {reason}; \
                             [engine] gpu_fallback = \"refuse\" stops here (\"cpu\" would run on the CPU instead)",
                            list_models(&names)
                        )))
                    }
                    GpuFallback::Cpu => {
                        tracing::warn!(
                            "no GPU for {} ({asked}): {reason}; running on the CPU (onnx backend) as [engine] gpu_fallback = \"cpu\" allows",
                            list_models(&names)
                        );
                        for &i in &members {
                            placements[i].backend = BackendKind::Onnx;
                            placements[i].fell_back = Some(reason.clone());
                        }
                    }
                }
            }
            Err(other) => return Err(other),
        }
    }

    let runners = runners
        .into_iter()
        .map(|r| r.expect("every model's kind is in BACKENDS and was loaded, or the load failed"))
        .collect();
    Ok(Selection {
        placements,
        runners,
    })
}

fn list_models(names: &[&str]) -> String {
    match names {
        [one] => format!("model {one}"),
        many => format!("models {}", many.join(", ")),
    }
}

/// Loads `specs` on one backend (not `Auto`).
pub fn load_kind(
    kind: BackendKind,
    specs: &[Arc<ModelSpec>],
    engine: &EngineSettings,
) -> Result<Arc<dyn Backend>, BackendError> {
    let entry = kind.entry().ok_or_else(|| {
        BackendError::Library("\"auto\" is resolved per model, not loaded".into())
    })?;
    (entry.load)(specs, engine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn inference_threads_treat_subnormals_as_zero() {
        use std::hint::black_box;
        let smallest_subnormal = f32::from_bits(1);
        // Both products are subnormal (or read one) on an ordinary thread...
        let ordinary = thread::spawn(move || {
            (
                black_box(f32::MIN_POSITIVE) * black_box(0.25f32),
                black_box(smallest_subnormal) * black_box(2.0f32),
            )
        });
        let (result, operand) = ordinary.join().unwrap();
        assert!(result.is_subnormal() && operand.is_subnormal());
        // ...and zero where inference runs.
        let inference = thread::spawn(move || {
            treat_subnormals_as_zero();
            (
                black_box(f32::MIN_POSITIVE) * black_box(0.25f32),
                black_box(smallest_subnormal) * black_box(2.0f32),
            )
        });
        assert_eq!(inference.join().unwrap(), (0.0, 0.0));
    }

    #[test]
    fn backend_names_are_read_alike_by_the_pipeline_file_and_the_command_line() {
        use clap::ValueEnum;
        for kind in BackendKind::value_variants() {
            let name = kind.name();
            let via_serde: BackendKind = serde_json::from_str(&format!("\"{name}\"")).unwrap();
            let via_clap = BackendKind::from_str(name, false).unwrap();
            assert_eq!((via_serde, via_clap), (*kind, *kind), "{name}");
            assert_eq!(kind.to_string(), name);
        }
        // Every backend but `auto` has a row in the table, and `auto` none.
        for kind in BackendKind::value_variants() {
            assert_eq!(kind.entry().is_some(), *kind != BackendKind::Auto, "{kind}");
        }
        assert_eq!(BACKENDS.len(), BackendKind::value_variants().len() - 1);
        let err = serde_json::from_str::<BackendKind>("\"gpu\"").unwrap_err();
        assert!(err.is_data(), "an unknown name is refused: {err}");
    }
}
