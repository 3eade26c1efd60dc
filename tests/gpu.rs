//! The backends beside ONNX Runtime's CPU one, and how a model gets to each:
//!
//! - the native backend against ONNX Runtime on all 27 shipped models, on real
//!   SMAP test windows, and against the stored reference forecasts;
//! - the CUDA backend against the native one (FP32), where a GPU is present;
//!   where none is, it prints "SKIPPED: no CUDA driver/GPU present" and returns;
//! - ONNX Runtime's TensorRT/CUDA providers against the native backend (FP16
//!   allowed), where they register; skipped with the reason where they do not;
//! - a `KIND_GPU` model with no usable GPU: run on the CPU with
//!   `gpu_fallback = "cpu"`, refused with a one-line reason with `"refuse"`;
//! - the pipeline file's `[engine] backend` / `gpu_fallback` values checked.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use ndarray::{Array2, Array3};
use satwatch::{
    backend::{self, native::NativeBackend, onnx::OnnxBackend, Backend, BackendError, BackendKind},
    config::Pipeline,
    dataset,
    repository::{self, ModelSpec},
};

/// Native vs ONNX Runtime, both FP32 on the CPU: they differ only in the
/// order of the 1,600-term sums (MLAS vs matrixmultiply kernels).
const NATIVE_TOLERANCE: f32 = 2e-5;
/// CUDA (cuBLAS sgemm, FP32, no TF32) vs native: again only the summation
/// order differs.
#[cfg(feature = "cuda")]
const CUDA_TOLERANCE: f32 = 1e-4;
/// TensorRT with FP16 kernels allowed vs native FP32.
#[cfg(feature = "onnx-gpu")]
const TENSORRT_FP16_TOLERANCE: f32 = 2e-2;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// All 27 shipped models, in the pipeline's order, with their channel ids.
fn shipped() -> (Vec<String>, Vec<Arc<ModelSpec>>) {
    let pipeline = Pipeline::load(&root().join("pipelines/smap.toml")).unwrap();
    let specs = repository::load_models(&pipeline.repository, &pipeline.models()).unwrap();
    let channels = specs
        .iter()
        .map(|s| s.name.strip_prefix("smap_").unwrap().to_owned())
        .collect();
    (channels, specs.into_iter().map(Arc::new).collect())
}

/// `count` normalised test windows of `channel`, spread over its test split.
fn windows(channel: &str, spec: &ModelSpec, count: usize) -> Vec<f32> {
    let data =
        dataset::load_channel(&root().join("data/smap"), "test", channel, spec.features).unwrap();
    satwatch::bench::real_windows(&data.values, spec, count).unwrap()
}

/// The largest |got - want| / max(1, |want|), and where.
fn worst(got: &[f32], want: &[f32]) -> (f32, usize) {
    assert_eq!(got.len(), want.len(), "output lengths differ");
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
        .enumerate()
        .fold((0.0f32, 0), |(m, at), (i, d)| {
            assert!(d.is_finite(), "non-finite output at {i}");
            if d > m {
                (d, i)
            } else {
                (m, at)
            }
        })
}

#[test]
fn native_matches_onnx_runtime_on_every_shipped_model() {
    let (channels, specs) = shipped();
    assert_eq!(specs.len(), 27);
    let ort = OnnxBackend::load(&specs, 1).unwrap();
    let native = NativeBackend::load(&specs).unwrap();
    let mut overall = 0.0f32;
    for (model, (channel, spec)) in channels.iter().zip(&specs).enumerate() {
        let inputs = windows(channel, spec, 300);
        let per_row = spec.window * spec.features;
        for rows in [1, 7, 300] {
            let x = &inputs[..rows * per_row];
            let want = ort.infer(model, x, rows).unwrap();
            let got = native.infer(model, x, rows).unwrap();
            let (diff, at) = worst(&got, &want);
            assert!(
                diff <= NATIVE_TOLERANCE,
                "{}: batch {rows}: native {} vs ONNX Runtime {} at row {} step {} (relative difference {diff:e} > {NATIVE_TOLERANCE:e})",
                spec.name,
                got[at],
                want[at],
                at / spec.horizon,
                at % spec.horizon
            );
            overall = overall.max(diff);
        }
    }
    println!(
        "native vs ONNX Runtime, 27 models x 308 windows: largest relative difference {overall:e}"
    );
}

#[test]
fn native_reproduces_the_stored_reference_forecasts() {
    for channel in ["A-1", "T-1"] {
        let spec = repository::load_model(&root().join(format!("model_repository/smap_{channel}")))
            .unwrap();
        let fixtures = root().join("tests/fixtures");
        let input: Array3<f32> =
            ndarray_npy::read_npy(fixtures.join(format!("smap_{channel}_reference_input.npy")))
                .unwrap();
        let expected: Array2<f32> =
            ndarray_npy::read_npy(fixtures.join(format!("smap_{channel}_reference_forecast.npy")))
                .unwrap();
        let native = NativeBackend::load(&[Arc::new(spec)]).unwrap();
        let got = native
            .infer(0, input.as_slice().unwrap(), input.shape()[0])
            .unwrap();
        let (diff, at) = worst(&got, expected.as_slice().unwrap());
        assert!(
            diff <= NATIVE_TOLERANCE,
            "{channel}: forecast[{at}] = {}, reference {}",
            got[at],
            expected.as_slice().unwrap()[at]
        );
    }
}

#[test]
fn native_refuses_a_model_whose_file_disagrees_with_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model(dir.path(), "T-1", |config| {
        config.replace("dims: [ 10 ]", "dims: [ 12 ]")
    });
    // The horizon parameter must agree with the output dims for the repository to load it.
    let config = std::fs::read_to_string(model.join("config.pbtxt")).unwrap();
    std::fs::write(
        model.join("config.pbtxt"),
        config.replace(
            "key: \"satwatch.horizon\" value: { string_value: \"10\" }",
            "key: \"satwatch.horizon\" value: { string_value: \"12\" }",
        ),
    )
    .unwrap();
    let spec = repository::load_model(&model).unwrap();
    let err = NativeBackend::load(&[Arc::new(spec)])
        .err()
        .expect("a mismatch is refused")
        .to_string();
    assert!(
        err.contains("config.pbtxt") && err.contains("[batch, 10]") && err.contains("[batch, 12]"),
        "{err}"
    );
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_matches_native_on_every_shipped_model() {
    use satwatch::backend::cuda::{probe, CudaBackend};

    if let Err(reason) = probe(0) {
        println!("SKIPPED: no CUDA driver/GPU present: {reason}");
        return;
    }
    let (channels, specs) = shipped();
    let native = NativeBackend::load(&specs).unwrap();
    let gpu = Arc::new(CudaBackend::load(&specs, 0).unwrap());
    println!("CUDA backend on {}", gpu.device_name());
    let mut overall = 0.0f32;
    // 1000 rows is above max_batch_size (512): the instance's buffers grow.
    for (model, (channel, spec)) in channels.iter().zip(&specs).enumerate() {
        let inputs = windows(channel, spec, 1000);
        let per_row = spec.window * spec.features;
        for rows in [1, 7, 64, 512, 1000] {
            let x = &inputs[..rows * per_row];
            let want = native.infer(model, x, rows).unwrap();
            let got = gpu.infer(model, x, rows).unwrap();
            let (diff, at) = worst(&got, &want);
            assert!(
                diff <= CUDA_TOLERANCE,
                "{}: batch {rows}: CUDA {} vs native {} at {at} (relative difference {diff:e} > {CUDA_TOLERANCE:e})",
                spec.name,
                got[at],
                want[at]
            );
            overall = overall.max(diff);
        }
    }
    // Many threads at once, as the backend pool calls it: every call must
    // still get its own model's answer.
    std::thread::scope(|scope| {
        for thread in 0..8 {
            let (gpu, native, channels, specs) = (&gpu, &native, &channels, &specs);
            scope.spawn(move || {
                for round in 0..20 {
                    let model = (thread * 7 + round) % specs.len();
                    let inputs = windows(&channels[model], &specs[model], 64);
                    let got = gpu.infer(model, &inputs, 64).unwrap();
                    let want = native.infer(model, &inputs, 64).unwrap();
                    let (diff, _) = worst(&got, &want);
                    assert!(
                        diff <= CUDA_TOLERANCE,
                        "{} under concurrency: {diff:e}",
                        specs[model].name
                    );
                }
            });
        }
    });
    println!("CUDA vs native, 27 models: largest relative difference {overall:e}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_matches_native_on_every_shipped_model() {
    println!("SKIPPED: built without the `cuda` feature (cargo test --features cuda)");
}

#[cfg(feature = "onnx-gpu")]
#[test]
fn onnx_runtime_gpu_providers_match_native_where_they_register() {
    let (channels, specs) = shipped();
    let specs = &specs[..3];
    let mut engine = satwatch::config::EngineSettings::default();
    let cache = tempfile::tempdir().unwrap();
    engine.tensorrt_cache_dir = Some(cache.path().to_owned());
    let gpu = match backend::load_kind(BackendKind::OnnxTensorrt, specs, &engine) {
        Ok(gpu) => gpu,
        Err(BackendError::NoGpu(reason)) => {
            println!(
                "SKIPPED: ONNX Runtime's TensorRT/CUDA providers are not usable here: {reason}"
            );
            return;
        }
        Err(other) => {
            panic!("the GPU providers failed for a reason other than a missing GPU: {other}")
        }
    };
    let native = NativeBackend::load(specs).unwrap();
    for (model, (channel, spec)) in channels.iter().zip(specs).enumerate() {
        let inputs = windows(channel, spec, 256);
        let want = native.infer(model, &inputs, 256).unwrap();
        let got = gpu.infer(model, &inputs, 256).unwrap();
        let (diff, at) = worst(&got, &want);
        assert!(
            diff <= TENSORRT_FP16_TOLERANCE,
            "{}: TensorRT/CUDA {} vs native {} at {at} (relative difference {diff:e})",
            spec.name,
            got[at],
            want[at]
        );
    }
}

/// Copies `model_repository/smap_<channel>` into `dir`, its config rewritten by `edit`.
fn copy_model(dir: &Path, channel: &str, edit: impl Fn(&str) -> String) -> PathBuf {
    let from = root().join(format!("model_repository/smap_{channel}"));
    let to = dir.join(format!("smap_{channel}"));
    std::fs::create_dir_all(to.join("1")).unwrap();
    std::fs::copy(from.join("1/model.onnx"), to.join("1/model.onnx")).unwrap();
    let config = std::fs::read_to_string(from.join("config.pbtxt")).unwrap();
    std::fs::write(to.join("config.pbtxt"), edit(&config)).unwrap();
    to
}

fn pipeline_with_engine(engine: &str) -> Result<Pipeline, String> {
    let text = format!(
        "[kafka]\nbrokers = \"127.0.0.1:9092\"\n[repository]\npath = \"model_repository\"\n\
         [channels]\nids = [\"T-1\", \"A-1\"]\n[subsystems]\nT = \"tcs\"\nA = \"acs\"\n[engine]\n{engine}\n"
    );
    Pipeline::parse(&text, Path::new("gpu-test.toml")).map_err(|e| e.to_string())
}

#[test]
fn a_gpu_model_without_a_usable_gpu_falls_back_or_is_refused_as_configured() {
    let dir = tempfile::tempdir().unwrap();
    // T-1 asks for a GPU; A-1 stays on the CPU. Device 4096 exists nowhere,
    // so there is no usable GPU even on a machine that has one.
    let gpu_model = copy_model(dir.path(), "T-1", |c| {
        c.replace("kind: KIND_CPU", "kind: KIND_GPU")
    });
    let cpu_model = copy_model(dir.path(), "A-1", |c| c.to_owned());
    let specs: Vec<Arc<ModelSpec>> = [&gpu_model, &cpu_model]
        .iter()
        .map(|dir| Arc::new(repository::load_model(dir).unwrap()))
        .collect();
    assert_eq!(specs[0].device, repository::DeviceKind::Gpu);

    let fallback = pipeline_with_engine("gpu_fallback = \"cpu\"\ngpu_device = 4096").unwrap();
    let selection = backend::select(&specs, &fallback.file.engine).unwrap();
    let placed: Vec<_> = selection
        .placements
        .iter()
        .map(|p| (p.model.as_str(), p.backend))
        .collect();
    assert_eq!(
        placed,
        [
            ("smap_T-1", BackendKind::Onnx),
            ("smap_A-1", BackendKind::Onnx)
        ]
    );
    let reason = selection.placements[0]
        .fell_back
        .as_deref()
        .expect("T-1 fell back");
    assert!(
        reason.contains("no CUDA driver/GPU present")
            || reason.contains("CUDA device 4096 does not exist")
            || reason.contains("without the `cuda` cargo feature"),
        "{reason}"
    );
    assert_eq!(
        selection.placements[1].fell_back, None,
        "A-1 never asked for a GPU"
    );
    // And it runs: the same forecasts as ONNX Runtime on the CPU.
    let cpu = OnnxBackend::load(&specs, 1).unwrap();
    for (model, channel) in ["T-1", "A-1"].iter().enumerate() {
        let inputs = windows(channel, &specs[model], 16);
        assert_eq!(
            {
                let runner = &selection.runners[model];
                runner.backend.infer(runner.index, &inputs, 16).unwrap()
            },
            cpu.infer(model, &inputs, 16).unwrap(),
            "{channel} after the fallback"
        );
    }

    let refuse = pipeline_with_engine("gpu_fallback = \"refuse\"\ngpu_device = 4096").unwrap();
    let err = backend::select(&specs, &refuse.file.engine)
        .err()
        .expect("refused");
    assert!(matches!(err, BackendError::NoGpu(_)), "{err:?}");
    let message = err.to_string();
    assert!(!message.contains('\n'), "one line: {message}");
    assert!(
        message.starts_with("model smap_T-1 asked for a GPU (instance_group KIND_GPU in its config.pbtxt) but none can be used: "),
        "{message}"
    );
    assert!(message.contains("gpu_fallback = \"refuse\""), "{message}");
}

#[test]
fn an_explicit_gpu_backend_is_refused_with_its_name_when_no_gpu_is_usable() {
    let (_, specs) = shipped();
    let specs = &specs[..2];
    for (name, kind) in [
        ("cuda", BackendKind::Cuda),
        ("onnx-tensorrt", BackendKind::OnnxTensorrt),
    ] {
        let pipeline = pipeline_with_engine(&format!(
            "backend = \"{name}\"\ngpu_fallback = \"refuse\"\ngpu_device = 4096"
        ))
        .unwrap();
        match backend::select(specs, &pipeline.file.engine) {
            Err(err) => {
                let message = err.to_string();
                assert!(
                    message.starts_with(&format!(
                        "models smap_A-1, smap_A-2 asked for a GPU ([engine] backend = \"{name}\") but none can be used: "
                    )),
                    "{message}"
                );
            }
            // Only a machine with ONNX Runtime's GPU build can place models
            // on onnx-tensorrt here (gpu_device is not what its providers
            // are probed by); there the selection must say so.
            Ok(selection) => {
                assert_eq!(
                    kind,
                    BackendKind::OnnxTensorrt,
                    "cuda on device 4096 cannot load"
                );
                assert!(selection
                    .placements
                    .iter()
                    .all(|p| p.backend == kind && p.fell_back.is_none()));
            }
        }
    }
}

#[test]
fn the_pipeline_file_names_the_allowed_backend_and_fallback_values() {
    let p = pipeline_with_engine("").unwrap();
    assert_eq!(p.file.engine.backend, backend::BackendKind::Auto);
    assert_eq!(p.file.engine.gpu_fallback, backend::GpuFallback::Cpu);
    let p = pipeline_with_engine("backend = \"onnx-tensorrt\"\ngpu_fallback = \"refuse\"").unwrap();
    assert_eq!(p.file.engine.backend, backend::BackendKind::OnnxTensorrt);
    assert_eq!(p.file.engine.gpu_fallback, backend::GpuFallback::Refuse);

    let err = pipeline_with_engine("backend = \"tpu\"").unwrap_err();
    assert!(err.starts_with("gpu-test.toml:11:"), "{err}");
    assert!(
        err.contains("tpu") && err.contains("onnx-tensorrt") && err.contains("native"),
        "{err}"
    );
    let err = pipeline_with_engine("gpu_fallback = \"maybe\"").unwrap_err();
    assert!(
        err.contains("maybe") && err.contains("cpu") && err.contains("refuse"),
        "{err}"
    );
}
