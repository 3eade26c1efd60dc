//! The ONNX Runtime backend against reference forecasts stored when the
//! models were trained (tests/fixtures, written by training/train.py).

use std::{path::Path, sync::Arc};

use ndarray::{Array2, Array3};
use satwatch::{
    backend::{onnx::OnnxBackend, Backend},
    repository,
};

/// Reference forecasts came from onnxruntime in Python; the same library runs here.
const TOLERANCE: f32 = 1e-5;

#[test]
fn shipped_models_reproduce_their_reference_forecasts() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for channel in ["A-1", "T-1"] {
        let spec =
            repository::load_model(&root.join(format!("model_repository/smap_{channel}"))).unwrap();
        let fixtures = root.join("tests/fixtures");
        let input: Array3<f32> =
            ndarray_npy::read_npy(fixtures.join(format!("smap_{channel}_reference_input.npy")))
                .unwrap();
        let expected: Array2<f32> =
            ndarray_npy::read_npy(fixtures.join(format!("smap_{channel}_reference_forecast.npy")))
                .unwrap();
        assert_eq!(input.shape(), &[8, spec.window, spec.features]);

        // Served in the row form, and as the file is.
        let spec = Arc::new(spec);
        for backend in [
            OnnxBackend::load(std::slice::from_ref(&spec), 1).unwrap(),
            OnnxBackend::load_files(std::slice::from_ref(&spec), 1).unwrap(),
        ] {
            let rows = input.shape()[0];
            let got = backend.infer(0, input.as_slice().unwrap(), rows).unwrap();
            assert_eq!(got.len(), expected.len());
            for (i, (g, e)) in got.iter().zip(expected.iter()).enumerate() {
                assert!(
                    (g - e).abs() <= TOLERANCE,
                    "{channel} ({:?}): forecast[{i}] = {g}, reference {e}",
                    backend.form(0)
                );
            }
        }
    }
}

/// Subnormal weights add nothing to a forecast but make every product with a
/// non-zero input a slow operation on Intel CPUs (ONNX Runtime ran the
/// models 11 to 15 times slower on a Xeon when inputs that were zero in
/// training were not); training/train.py flushes them to zero.
#[test]
fn shipped_models_have_no_subnormal_weights() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut models = 0;
    for dir in std::fs::read_dir(root.join("model_repository")).unwrap() {
        let dir = dir.unwrap().path();
        let spec = repository::load_model(&dir).unwrap();
        let plan = satwatch::backend::graph::load(&spec.model_path).unwrap();
        for (l, layer) in plan.layers.iter().enumerate() {
            let subnormal = layer
                .weight
                .iter()
                .chain(&layer.bias)
                .filter(|w| w.is_subnormal())
                .count();
            assert_eq!(
                subnormal,
                0,
                "{}: layer {l} has {subnormal} subnormal weights",
                spec.model_path.display()
            );
        }
        models += 1;
    }
    assert_eq!(models, 27);
}

#[test]
fn a_model_file_that_disagrees_with_its_config_is_refused_with_the_config_line() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("smap_T-1");
    std::fs::create_dir_all(model.join("1")).unwrap();
    std::fs::copy(
        root.join("model_repository/smap_T-1/1/model.onnx"),
        model.join("1/model.onnx"),
    )
    .unwrap();
    // The config claims a 32-sample window; the ONNX file takes 128.
    let config = std::fs::read_to_string(root.join("model_repository/smap_T-1/config.pbtxt"))
        .unwrap()
        .replace("dims: [ 128, 25 ]", "dims: [ 32, 25 ]")
        .replace("string_value: \"128\"", "string_value: \"32\"");
    std::fs::write(model.join("config.pbtxt"), config).unwrap();
    let spec = repository::load_model(&model).unwrap();
    let err = OnnxBackend::load(&[Arc::new(spec.clone())], 1)
        .err()
        .expect("the mismatch is refused")
        .to_string();
    assert!(err.contains("config.pbtxt:"), "{err}");
    assert!(
        err.contains(&format!(":{}:", spec.input_dims_line.unwrap())),
        "names the dims line: {err}"
    );
    assert!(
        err.contains("[-1, 128, 25]") || err.contains("128, 25"),
        "says what the file has: {err}"
    );
}

#[test]
fn a_corrupt_model_file_is_refused_with_its_path() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("smap_T-1");
    std::fs::create_dir_all(model.join("1")).unwrap();
    std::fs::copy(
        root.join("model_repository/smap_T-1/config.pbtxt"),
        model.join("config.pbtxt"),
    )
    .unwrap();
    std::fs::write(model.join("1/model.onnx"), b"not an onnx file").unwrap();
    let spec = repository::load_model(&model).unwrap();
    let err = OnnxBackend::load(&[Arc::new(spec)], 1)
        .err()
        .expect("a corrupt file is refused")
        .to_string();
    assert!(err.contains("model.onnx"), "{err}");
}

/// ONNX Runtime serves the shipped models in their row form (a convolution
/// over a run's rows, src/backend/rows.rs). On real test telemetry, batches
/// of uneven runs in an interleaved order, as the engine cuts them when
/// channels share a model, must get the forecasts the model files give.
#[test]
fn row_form_gives_the_model_files_forecasts_on_real_runs_of_every_shipped_model() {
    use satwatch::{backend::onnx::Form, backend::Scratch, batch::BatchInputs};
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut models = 0;
    for dir in std::fs::read_dir(root.join("model_repository")).unwrap() {
        let spec = Arc::new(repository::load_model(&dir.unwrap().path()).unwrap());
        let channel = spec.name.trim_start_matches("smap_").to_string();
        let rows_form = OnnxBackend::load(std::slice::from_ref(&spec), 1).unwrap();
        let files = OnnxBackend::load_files(std::slice::from_ref(&spec), 1).unwrap();
        assert!(
            matches!(rows_form.form(0), Form::Rows { .. }),
            "{}: not served in its row form",
            spec.name
        );
        assert!(matches!(files.form(0), Form::Windows { .. }));
        let data = satwatch::dataset::load_channel(
            &root.join("data/smap"),
            "test",
            &channel,
            spec.features,
        )
        .unwrap();
        let rows = satwatch::bench::real_rows(&data.values, &spec).unwrap();
        let (w, f) = (spec.window, spec.features);
        let total = rows.len() / f;
        // Runs from across the split, their windows interleaved as queued
        // windows of several channels are. First three lengths: one call
        // each, the two runs of 41 read in place; then six lengths: 41, 39,
        // 38 and 37 padded into one call, 300 and 1 alone.
        let layouts: [&[usize]; 2] = [&[300, 41, 41, 1], &[300, 41, 39, 38, 37, 1]];
        for layout in layouts {
            let mut batch = BatchInputs::new(w * f);
            let mut runs = Vec::new();
            for (k, &n) in layout.iter().enumerate() {
                let from = (total - n - w) * k / layout.len();
                let start = batch.push_run(&rows[from * f..(from + n + w - 1) * f]);
                runs.push((start, n));
            }
            for i in 0..300 {
                for &(start, n) in &runs {
                    if i < n {
                        batch.push_window(start + i * f);
                    }
                }
            }
            let got = rows_form
                .infer_batch(0, &batch, &mut Scratch::default())
                .unwrap();
            let want = files
                .infer_batch(0, &batch, &mut Scratch::default())
                .unwrap();
            assert_eq!(got.len(), want.len());
            assert_eq!(got.len(), batch.len() * spec.horizon);
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "{} {layout:?}: forecast value {i} is {g} in the row form, {e} from the file",
                    spec.name
                );
            }
        }
        models += 1;
    }
    assert_eq!(models, 27);
}
