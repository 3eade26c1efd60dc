//! ONNX Runtime through `ort`, with the library loaded at run time: on the CPU,
//! and with the `onnx-gpu` feature on TensorRT's and CUDA's execution providers.
//!
//! The library comes from PyPI's `onnxruntime` wheel (scripts/setup.sh installs
//! it); `ORT_DYLIB_PATH` points at it. A missing library is reported in one
//! line that says what to install, instead of ort's panic. The GPU providers
//! need `onnxruntime-gpu`'s library instead, plus CUDA, cuDNN and TensorRT;
//! where the loaded library lacks them, or they cannot register, the load
//! reports [`BackendError::NoGpu`] and [`super::select`] falls back or refuses.

use std::{
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
};

use ort::{
    session::{builder::GraphOptimizationLevel, Session},
    value::TensorRef,
};

use super::{Backend, BackendError};
use crate::repository::ModelSpec;

/// The ONNX Runtime release satwatch is built against (ort's `api-31`).
pub const ORT_VERSION: &str = "1.31.1";

static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// Where to look for the library: `ORT_DYLIB_PATH`, then the venv that
/// scripts/setup.sh creates.
pub fn library_path() -> Result<PathBuf, BackendError> {
    if let Ok(path) = std::env::var("ORT_DYLIB_PATH") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        return Err(missing(&format!(
            "ORT_DYLIB_PATH={} does not exist",
            path.display()
        )));
    }
    let cache = std::env::var("SATWATCH_CACHE")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| Path::new(&h).join(".cache/satwatch")))
        .unwrap_or_else(|_| PathBuf::from(".cache/satwatch"));
    let lib = cache.join("venv/lib");
    let found = std::fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .flatten()
        .find_map(|python| {
            let candidate = python.path().join(format!(
                "site-packages/onnxruntime/capi/libonnxruntime.so.{ORT_VERSION}"
            ));
            candidate.is_file().then_some(candidate)
        });
    found.ok_or_else(|| {
        missing("ORT_DYLIB_PATH is not set and no library was found under the setup cache")
    })
}

fn missing(what: &str) -> BackendError {
    BackendError::Library(format!(
        "ONNX Runtime library not found ({what}): run scripts/setup.sh, or `pip install onnxruntime=={ORT_VERSION}` \
         and set ORT_DYLIB_PATH to its onnxruntime/capi/libonnxruntime.so.{ORT_VERSION}"
    ))
}

fn environment() -> Result<&'static ort::environment::Environment, BackendError> {
    let env = ENVIRONMENT.get_or_init(|| {
        let path = library_path().map_err(|e| e.to_string())?;
        ort::init_from(&path)
            .map_err(|err| format!("cannot load ONNX Runtime from {}: {err}", path.display()))?
            .with_name("satwatch")
            .build()
            .map_err(|err| format!("cannot start ONNX Runtime: {err}"))
    });
    env.as_ref().map_err(|e| BackendError::Library(e.clone()))
}

/// One ONNX Runtime session per model.
pub struct OnnxBackend {
    /// `Session::run` takes `&mut self`; the engine keeps one batch per model
    /// in flight, so these locks are never contended.
    sessions: Vec<Mutex<Session>>,
    names: Vec<String>,
    output_names: Vec<String>,
}

impl OnnxBackend {
    /// Loads every model and checks its tensors against its `config.pbtxt`.
    pub fn load(
        specs: &[std::sync::Arc<ModelSpec>],
        intra_threads: usize,
    ) -> Result<Self, BackendError> {
        let env = environment()?;
        let mut sessions = Vec::with_capacity(specs.len());
        for spec in specs {
            let session = open_session(env, spec, intra_threads)?;
            check_tensors(&session, spec)?;
            sessions.push(Mutex::new(session));
        }
        Ok(Self {
            sessions,
            names: specs.iter().map(|s| s.name.clone()).collect(),
            output_names: specs.iter().map(|s| s.output_name.clone()).collect(),
        })
    }
}

fn open_session(
    env: &ort::environment::Environment,
    spec: &ModelSpec,
    intra_threads: usize,
) -> Result<Session, BackendError> {
    let fail = |reason: String| BackendError::Load {
        path: spec.model_path.display().to_string(),
        reason,
    };
    configured(env, spec, intra_threads)?
        .commit_from_file(&spec.model_path)
        .map_err(|e| fail(e.to_string()))
}

/// A session builder with satwatch's threading and optimisation settings.
fn configured(
    env: &ort::environment::Environment,
    spec: &ModelSpec,
    intra_threads: usize,
) -> Result<ort::session::builder::SessionBuilder, BackendError> {
    let fail = |reason: String| BackendError::Load {
        path: spec.model_path.display().to_string(),
        reason,
    };
    // Builder errors carry the builder and are not Send: flatten them to text here.
    Session::builder(env)
        .map_err(|e| fail(e.to_string()))?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| fail(e.to_string()))?
        .with_intra_threads(intra_threads)
        .map_err(|e| fail(e.to_string()))?
        .with_inter_threads(1)
        .map_err(|e| fail(e.to_string()))
}

/// Settings of the TensorRT and CUDA execution providers.
#[cfg(feature = "onnx-gpu")]
#[derive(Debug, Clone)]
pub struct GpuOptions {
    pub device: usize,
    /// TensorRT engine and timing caches.
    pub cache_dir: PathBuf,
    pub fp16: bool,
}

#[cfg(feature = "onnx-gpu")]
impl GpuOptions {
    pub fn from_engine(engine: &crate::config::EngineSettings) -> Self {
        let cache_dir = engine.tensorrt_cache_dir.clone().unwrap_or_else(|| {
            std::env::var("SATWATCH_CACHE")
                .map(PathBuf::from)
                .or_else(|_| std::env::var("HOME").map(|h| Path::new(&h).join(".cache/satwatch")))
                .unwrap_or_else(|_| PathBuf::from(".cache/satwatch"))
                .join("tensorrt")
        });
        Self {
            device: engine.gpu_device,
            cache_dir,
            fp16: engine.tensorrt_fp16,
        }
    }
}

#[cfg(feature = "onnx-gpu")]
impl OnnxBackend {
    /// Loads every model on the TensorRT execution provider (FP16 when
    /// allowed, engines cached in `options.cache_dir`, one optimisation
    /// profile from 1 to `max_batch_size` rows), with the CUDA provider for
    /// what TensorRT does not take; then runs each model once at every batch
    /// size the batcher prefers and at `max_batch_size`, so that no live batch
    /// waits for an engine build or a first-use tactic. Without TensorRT the
    /// CUDA provider alone serves (one warning). [`BackendError::NoGpu`] when
    /// neither is usable.
    pub fn load_gpu(
        specs: &[std::sync::Arc<ModelSpec>],
        intra_threads: usize,
        options: &GpuOptions,
    ) -> Result<Self, BackendError> {
        use ort::ep::ExecutionProvider;

        let env = environment()?;
        let library = library_path()?.display().to_string();
        let no_gpu = |what: &str, err: &dyn std::fmt::Display| {
            BackendError::NoGpu(format!("ONNX Runtime ({library}): {what}: {err}"))
        };
        let has_tensorrt =
            ort::ep::TensorRT::is_available().map_err(|e| no_gpu("listing providers", &e))?;
        let has_cuda =
            ort::ep::CUDA::is_available().map_err(|e| no_gpu("listing providers", &e))?;
        if !has_cuda {
            return Err(BackendError::NoGpu(format!(
                "the ONNX Runtime library {library} has no CUDA{} execution provider (a CPU-only build): \
                 install onnxruntime-gpu=={ORT_VERSION} with CUDA 12, cuDNN 9 and TensorRT 10, and point ORT_DYLIB_PATH at its library",
                if has_tensorrt { "" } else { " or TensorRT" }
            )));
        }
        std::fs::create_dir_all(&options.cache_dir).map_err(|err| BackendError::Load {
            path: options.cache_dir.display().to_string(),
            reason: format!("cannot create the TensorRT engine cache directory: {err}"),
        })?;
        let mut sessions = Vec::with_capacity(specs.len());
        let mut warned = !has_tensorrt;
        if !has_tensorrt {
            tracing::warn!(library = %library, "ONNX Runtime has no TensorRT execution provider; using its CUDA provider alone");
        }
        for spec in specs {
            let cuda = ort::ep::CUDA::default()
                .with_device_id(options.device as i32)
                .build()
                .error_on_failure();
            let session = if has_tensorrt {
                match gpu_session(
                    env,
                    spec,
                    intra_threads,
                    &[tensorrt(spec, options), cuda.clone()],
                ) {
                    Ok(session) => session,
                    Err(err) => {
                        if !warned {
                            tracing::warn!("TensorRT execution provider could not register ({err}); using the CUDA provider alone");
                            warned = true;
                        }
                        gpu_session(env, spec, intra_threads, &[cuda]).map_err(|e| {
                            no_gpu("the CUDA execution provider could not register", &e)
                        })?
                    }
                }
            } else {
                gpu_session(env, spec, intra_threads, &[cuda])
                    .map_err(|e| no_gpu("the CUDA execution provider could not register", &e))?
            };
            let mut session = session;
            check_tensors(&session, spec)?;
            warm_up(&mut session, spec)?;
            sessions.push(Mutex::new(session));
        }
        Ok(Self {
            sessions,
            names: specs.iter().map(|s| s.name.clone()).collect(),
            output_names: specs.iter().map(|s| s.output_name.clone()).collect(),
        })
    }
}

/// TensorRT with one optimisation profile covering every batch the batcher forms.
#[cfg(feature = "onnx-gpu")]
fn tensorrt(spec: &ModelSpec, options: &GpuOptions) -> ort::ep::ExecutionProviderDispatch {
    let shape = |rows: usize| {
        format!(
            "{}:{rows}x{}x{}",
            spec.input_name, spec.window, spec.features
        )
    };
    let max = spec.batching.max_batch_size.max(1);
    let opt = spec
        .batching
        .preferred_batch_sizes
        .last()
        .copied()
        .unwrap_or(max);
    let cache = options.cache_dir.display().to_string();
    ort::ep::TensorRT::default()
        .with_device_id(options.device as i32)
        .with_fp16(options.fp16)
        .with_engine_cache(true)
        .with_engine_cache_path(&cache)
        .with_engine_cache_prefix(format!("{}_v{}", spec.name, spec.version))
        .with_timing_cache(true)
        .with_timing_cache_path(&cache)
        .with_profile_min_shapes(shape(1))
        .with_profile_opt_shapes(shape(opt))
        .with_profile_max_shapes(shape(max))
        .build()
        .error_on_failure()
}

/// A session on the given providers; the error says why they did not register.
#[cfg(feature = "onnx-gpu")]
fn gpu_session(
    env: &ort::environment::Environment,
    spec: &ModelSpec,
    intra_threads: usize,
    providers: &[ort::ep::ExecutionProviderDispatch],
) -> Result<Session, String> {
    configured(env, spec, intra_threads)
        .map_err(|e| e.to_string())?
        .with_execution_providers(providers)
        .map_err(|e| e.to_string())?
        .commit_from_file(&spec.model_path)
        .map_err(|e| e.to_string())
}

/// One run at 1 row, every preferred batch size and `max_batch_size`.
#[cfg(feature = "onnx-gpu")]
fn warm_up(session: &mut Session, spec: &ModelSpec) -> Result<(), BackendError> {
    let mut sizes = spec.batching.preferred_batch_sizes.clone();
    sizes.extend([1, spec.batching.max_batch_size.max(1)]);
    sizes.sort_unstable();
    sizes.dedup();
    let largest = sizes.last().copied().unwrap_or(1);
    let zeros = vec![0.0f32; largest * spec.window * spec.features];
    for rows in sizes {
        let fail = |reason: String| BackendError::Inference {
            model: spec.name.clone(),
            reason: format!("warm-up at batch size {rows}: {reason}"),
        };
        let len = rows * spec.window * spec.features;
        let tensor =
            TensorRef::from_array_view(([rows, spec.window, spec.features], &zeros[..len]))
                .map_err(|e| fail(e.to_string()))?;
        session
            .run(ort::inputs![tensor])
            .map_err(|e| fail(e.to_string()))?;
    }
    Ok(())
}

/// The ONNX file must take `[batch, window, features]` and give `[batch, horizon]`
/// under the names the config declares.
fn check_tensors(session: &Session, spec: &ModelSpec) -> Result<(), BackendError> {
    let mismatch = |reason: String| BackendError::Mismatch {
        path: spec.config_path.display().to_string(),
        line: spec.input_dims_line,
        reason: format!("{reason} (model file {})", spec.model_path.display()),
    };
    let [input] = session.inputs() else {
        return Err(mismatch(format!(
            "the ONNX model has {} inputs; the config declares one",
            session.inputs().len()
        )));
    };
    let [output] = session.outputs() else {
        return Err(mismatch(format!(
            "the ONNX model has {} outputs; the config declares one",
            session.outputs().len()
        )));
    };
    if input.name() != spec.input_name || output.name() != spec.output_name {
        return Err(mismatch(format!(
            "the ONNX model's tensors are \"{}\" -> \"{}\"; the config declares \"{}\" -> \"{}\"",
            input.name(),
            output.name(),
            spec.input_name,
            spec.output_name
        )));
    }
    let expect = [
        (
            input.dtype().tensor_shape(),
            vec![spec.window as i64, spec.features as i64],
            &spec.input_name,
        ),
        (
            output.dtype().tensor_shape(),
            vec![spec.horizon as i64],
            &spec.output_name,
        ),
    ];
    for (shape, dims, name) in expect {
        let Some(shape) = shape else {
            return Err(mismatch(format!("tensor \"{name}\" is not a tensor")));
        };
        let shape: Vec<i64> = shape.iter().copied().collect();
        // Leading dimension is the batch: dynamic (-1) or at least max_batch_size.
        let fits = shape.len() == dims.len() + 1 && shape[1..] == dims[..];
        if !fits {
            return Err(mismatch(format!(
                "tensor \"{name}\" has shape {shape:?} in the ONNX file; the config declares [batch, {}]",
                dims.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
            )));
        }
        if shape[0] >= 0 && (shape[0] as usize) < spec.batching.max_batch_size {
            return Err(mismatch(format!(
                "tensor \"{name}\" has a fixed batch of {} below max_batch_size {}",
                shape[0], spec.batching.max_batch_size
            )));
        }
    }
    Ok(())
}

impl Backend for OnnxBackend {
    fn infer(&self, model: usize, inputs: &[f32], rows: usize) -> Result<Vec<f32>, BackendError> {
        let fail = |reason: String| BackendError::Inference {
            model: self.names[model].clone(),
            reason,
        };
        let features_per_row = inputs.len() / rows.max(1);
        let mut session = self.sessions[model]
            .lock()
            .map_err(|_| fail("a previous call panicked".into()))?;
        let input_shape = session.inputs()[0]
            .dtype()
            .tensor_shape()
            .map(|s| s.iter().copied().collect::<Vec<i64>>());
        let (window, features) = match input_shape.as_deref() {
            Some([_, w, f]) => (*w as usize, *f as usize),
            _ => return Err(fail("unexpected input rank".into())),
        };
        debug_assert_eq!(features_per_row, window * features);
        let tensor = TensorRef::from_array_view(([rows, window, features], inputs))
            .map_err(|e| fail(e.to_string()))?;
        let outputs = session
            .run(ort::inputs![tensor])
            .map_err(|e| fail(e.to_string()))?;
        let (_, values) = outputs[self.output_names[model].as_str()]
            .try_extract_tensor::<f32>()
            .map_err(|e| fail(e.to_string()))?;
        Ok(values.to_vec())
    }
}
