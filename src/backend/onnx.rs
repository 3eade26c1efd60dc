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

use super::{graph, rows, Backend, BackendError, Scratch};
use crate::{batch::BatchInputs, repository::ModelSpec};

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
    /// Per model: what its session takes.
    forms: Vec<Form>,
    names: Vec<String>,
    output_names: Vec<String>,
}

/// The input a model's session takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// The model file as it is: windows `[batch, window, features]`.
    Windows { window: usize, features: usize },
    /// Its row form ([`rows`]): runs of rows `[runs, 1, rows, features]`,
    /// the residual value (an offset into a window) added after the call.
    Rows {
        window: usize,
        features: usize,
        horizon: usize,
        residual: Option<usize>,
    },
}

impl Form {
    /// The model file as it is, with the window its config declares.
    fn file(spec: &ModelSpec) -> Self {
        Self::Windows {
            window: spec.window,
            features: spec.features,
        }
    }
}

impl OnnxBackend {
    /// Loads every model and checks its tensors against its `config.pbtxt`;
    /// a model of the shipped family is served in its row form once it has
    /// given the same forecasts as its file on a probe.
    pub fn load(
        specs: &[std::sync::Arc<ModelSpec>],
        intra_threads: usize,
    ) -> Result<Self, BackendError> {
        Self::load_as(specs, intra_threads, true)
    }

    /// Loads every model and serves its file as it is, on laid-out windows.
    pub fn load_files(
        specs: &[std::sync::Arc<ModelSpec>],
        intra_threads: usize,
    ) -> Result<Self, BackendError> {
        Self::load_as(specs, intra_threads, false)
    }

    fn load_as(
        specs: &[std::sync::Arc<ModelSpec>],
        intra_threads: usize,
        row_form: bool,
    ) -> Result<Self, BackendError> {
        let env = environment()?;
        let mut sessions = Vec::with_capacity(specs.len());
        let mut forms = Vec::with_capacity(specs.len());
        for spec in specs {
            let mut session = open_session(env, spec, intra_threads)?;
            check_tensors(&session, spec)?;
            let mut form = Form::file(spec);
            if row_form {
                match row_session(env, spec, intra_threads, &mut session) {
                    Ok((rows, served)) => (session, form) = (rows, served),
                    Err(why) => tracing::debug!(model = %spec.name, "served on windows: {why}"),
                }
            }
            sessions.push(Mutex::new(session));
            forms.push(form);
        }
        Ok(Self {
            sessions,
            forms,
            names: specs.iter().map(|s| s.name.clone()).collect(),
            output_names: specs.iter().map(|s| s.output_name.clone()).collect(),
        })
    }

    /// What model `model`'s session takes.
    pub fn form(&self, model: usize) -> Form {
        self.forms[model]
    }
}

/// A session on the row form of `spec`'s model, checked against the file's
/// own session `file` on a probe batch; why not, when the model is outside
/// the family the row form expresses, or the two disagree.
fn row_session(
    env: &ort::environment::Environment,
    spec: &ModelSpec,
    intra_threads: usize,
    file: &mut Session,
) -> Result<(Session, Form), String> {
    let plan = graph::load(&spec.model_path).map_err(|e| e.to_string())?;
    if plan.layers.is_empty() || plan.window != spec.window || plan.features != spec.features {
        return Err("not a dense model over the configured window".into());
    }
    let form = Form::Rows {
        window: plan.window,
        features: plan.features,
        horizon: plan.outputs_per_row(),
        residual: plan.residual,
    };
    let mut session = configured(env, spec, intra_threads)
        .map_err(|e| e.to_string())?
        .commit_from_memory(&rows::model_bytes(&plan))
        .map_err(|e| format!("ONNX Runtime refused its row form: {e}"))?;
    // A probe over values spread like normalised telemetry: runs of five
    // lengths, so they are padded, 8, 7 and 6 windows into one call, 5 and 2
    // alone (rows::group_runs).
    let mut probe = BatchInputs::new(plan.inputs_per_row());
    let mut value = 0x2545_f491_u32;
    for windows in [8, 7, 6, 5, 2] {
        let rows: Vec<f32> = (0..(windows + plan.window - 1) * plan.features)
            .map(|_| {
                value = value.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (value >> 8) as f32 / (1 << 23) as f32 - 1.0
            })
            .collect();
        let start = probe.push_run(&rows);
        for w in 0..windows {
            probe.push_window(start + w * plan.features);
        }
    }
    let mut scratch = Scratch::default();
    let windows = probe.windows(&mut scratch.floats).to_vec();
    let want = run_tensor(
        file,
        &spec.output_name,
        [probe.len(), spec.window, spec.features],
        &windows,
    )
    .map_err(|e| e.to_string())?;
    let got = run_rows(&mut session, form, &spec.output_name, &probe, &mut scratch)
        .map_err(|e| e.to_string())?;
    let worst = want
        .iter()
        .zip(&got)
        .map(|(w, g)| (w - g).abs() / (1.0 + w.abs()))
        .fold(0.0f32, f32::max);
    if got.len() != want.len() || worst > 1e-4 {
        return Err(format!(
            "its row form disagrees with the file on a probe (relative difference {worst:e})"
        ));
    }
    Ok((session, form))
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
            // TensorRT's profiles and engine caches are built for the file's windows.
            forms: specs.iter().map(|s| Form::file(s)).collect(),
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

/// Runs `session` on one input tensor of `shape`; returns output `output`.
fn run_tensor<const N: usize>(
    session: &mut Session,
    output: &str,
    shape: [usize; N],
    input: &[f32],
) -> Result<Vec<f32>, ort::Error> {
    let tensor = TensorRef::from_array_view((shape, input))?;
    let outputs = session.run(ort::inputs![tensor])?;
    let (_, values) = outputs[output].try_extract_tensor::<f32>()?;
    Ok(values.to_vec())
}

/// Runs a row-form session on a batch: its runs grouped into calls by
/// [`rows::group_runs`], each call's runs padded to its longest (read in
/// place when they already are, as in the common case of one run, or of runs
/// all as long), then every window's forecast picked out in batch order, plus
/// its residual.
fn run_rows(
    session: &mut Session,
    form: Form,
    output: &str,
    batch: &BatchInputs,
    scratch: &mut Scratch,
) -> Result<Vec<f32>, ort::Error> {
    let Form::Rows {
        window,
        features,
        horizon,
        residual,
    } = form
    else {
        unreachable!("only row-form sessions take runs");
    };
    let runs: Vec<&[f32]> = batch.runs().collect();
    let windows_per_run: Vec<usize> = runs
        .iter()
        .map(|r| (r.len() / features + 1).saturating_sub(window))
        .collect();
    // Per run: where its first window's forecast lands in `forecasts`.
    let mut first_forecast = vec![0; runs.len()];
    let mut forecasts = Vec::with_capacity(batch.len() * horizon);
    for call in rows::group_runs(&windows_per_run) {
        let longest = windows_per_run[call[0]];
        if longest == 0 {
            continue; // Runs too short for a window hold none of the batch's.
        }
        let rows_per_run = longest + window - 1;
        let floats_per_run = rows_per_run * features;
        let in_place = call.windows(2).all(|p| p[1] == p[0] + 1)
            && call.iter().all(|&r| runs[r].len() == floats_per_run);
        let input: &[f32] = if in_place {
            let from = batch.run_starts[call[0]];
            &batch.rows[from..from + call.len() * floats_per_run]
        } else {
            let laying_out = std::time::Instant::now();
            scratch.floats.clear();
            scratch.floats.resize(call.len() * floats_per_run, 0.0);
            for (slot, &r) in call.iter().enumerate() {
                scratch.floats[slot * floats_per_run..][..runs[r].len()].copy_from_slice(runs[r]);
            }
            scratch.input_time += laying_out.elapsed();
            &scratch.floats
        };
        for (slot, &r) in call.iter().enumerate() {
            first_forecast[r] = forecasts.len() + slot * longest * horizon;
        }
        forecasts.extend(run_tensor(
            session,
            output,
            [call.len(), 1, rows_per_run, features],
            input,
        )?);
    }
    let mut picked = Vec::with_capacity(batch.len() * horizon);
    for &start in &batch.starts {
        let (run, offset) = batch.locate(start);
        let at = first_forecast[run] + offset / features * horizon;
        let bias = residual.map_or(0.0, |r| batch.rows[start + r]);
        picked.extend(forecasts[at..at + horizon].iter().map(|v| v + bias));
    }
    Ok(picked)
}

impl OnnxBackend {
    fn failure(&self, model: usize, reason: impl std::fmt::Display) -> BackendError {
        BackendError::Inference {
            model: self.names[model].clone(),
            reason: reason.to_string(),
        }
    }

    fn session(&self, model: usize) -> Result<std::sync::MutexGuard<'_, Session>, BackendError> {
        self.sessions[model]
            .lock()
            .map_err(|_| self.failure(model, "a previous call panicked"))
    }
}

impl Backend for OnnxBackend {
    fn infer(&self, model: usize, inputs: &[f32], rows: usize) -> Result<Vec<f32>, BackendError> {
        let fail = |e: ort::Error| self.failure(model, e);
        let mut session = self.session(model)?;
        let output = self.output_names[model].as_str();
        match self.forms[model] {
            Form::Windows { window, features } => {
                run_tensor(&mut session, output, [rows, window, features], inputs).map_err(fail)
            }
            // Windows one by one are runs of one window each.
            Form::Rows {
                window,
                features,
                horizon,
                residual,
            } => {
                let mut values =
                    run_tensor(&mut session, output, [rows, 1, window, features], inputs)
                        .map_err(fail)?;
                if let Some(r) = residual {
                    for (forecast, window) in values
                        .chunks_mut(horizon)
                        .zip(inputs.chunks(window * features))
                    {
                        forecast.iter_mut().for_each(|v| *v += window[r]);
                    }
                }
                Ok(values)
            }
        }
    }

    fn infer_batch(
        &self,
        model: usize,
        batch: &BatchInputs,
        scratch: &mut Scratch,
    ) -> Result<Vec<f32>, BackendError> {
        match self.forms[model] {
            Form::Windows { .. } => super::lay_out_and_infer(self, model, batch, scratch),
            form => run_rows(
                &mut *self.session(model)?,
                form,
                &self.output_names[model],
                batch,
                scratch,
            )
            .map_err(|e| self.failure(model, e)),
        }
    }
}
