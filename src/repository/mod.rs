//! The Triton-style model repository: `<repo>/<model>/config.pbtxt` and
//! `<repo>/<model>/<version>/model.onnx`.
//!
//! Each `config.pbtxt` is parsed once, at load, into a validated [`ModelSpec`];
//! everything downstream works with the typed spec and never looks at the text
//! again. Errors name the file, the line where it can be told, and the reason.

pub mod control;
pub mod pbtxt;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::file_error::FileError;
use pbtxt::inference::{self, model_instance_group::Kind, model_version_policy::PolicyChoice};

/// The Triton platform of the models satwatch serves.
pub const PLATFORM_ONNX: &str = "onnxruntime_onnx";

/// Where a model's instances run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Gpu,
}

/// Triton's dynamic batching settings, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchPolicy {
    pub max_batch_size: usize,
    /// Sorted ascending, each in 1..=max_batch_size.
    pub preferred_batch_sizes: Vec<usize>,
    pub max_queue_delay: Duration,
}

/// Per-feature affine normalisation fitted on the train split.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalisation {
    pub center: Vec<f32>,
    pub scale: Vec<f32>,
}

/// What the train split says about a channel: the one-step forecast error
/// on held-out train data, in the input's units (what "normal" error looks
/// like), and how much the channel drifts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ErrorCalibration {
    pub mean: f32,
    pub std: f32,
    /// The share of the train split outside the range of its first rows
    /// (`satwatch.train_drift`, training/train.py; 0 for models trained
    /// before it was recorded).
    pub train_drift: f32,
}

/// One model version, ready to be loaded by a backend.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub version: u64,
    pub config_path: PathBuf,
    pub model_path: PathBuf,
    pub device: DeviceKind,
    pub instance_count: usize,
    pub batching: BatchPolicy,
    pub input_name: String,
    pub output_name: String,
    /// Samples per window (input dims[0]).
    pub window: usize,
    /// Values per sample (input dims[1]).
    pub features: usize,
    /// Forecast steps (output dims[0]).
    pub horizon: usize,
    /// The feature that is forecast (the telemetry value).
    pub target_feature: usize,
    pub normalisation: Normalisation,
    pub calibration: ErrorCalibration,
    /// Line of the input `dims`, for errors found later against the ONNX file.
    pub input_dims_line: Option<usize>,
    /// Everything in `parameters`, for the metadata endpoint.
    pub parameters: BTreeMap<String, String>,
}

/// Values per sample that `model` takes (0 when it is not among `specs`).
pub fn model_features(specs: &[std::sync::Arc<ModelSpec>], model: &str) -> usize {
    specs
        .iter()
        .find(|s| s.name == model)
        .map_or(0, |s| s.features)
}

/// Loads every model directory under `root` whose name is in `wanted`.
pub fn load_models(root: &Path, wanted: &[String]) -> Result<Vec<ModelSpec>, FileError> {
    wanted
        .iter()
        .map(|name| load_model(&root.join(name)))
        .collect()
}

/// Loads the version of the model in `dir` that its version policy serves
/// (the highest version the policy selects).
pub fn load_model(dir: &Path) -> Result<ModelSpec, FileError> {
    let config_path = dir.join("config.pbtxt");
    let (config, text) = read_config(&config_path)?;
    let dir_name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    validate(&config, &text, &config_path, dir_name, dir)
}

/// The parsed `config.pbtxt` of the model in `dir`.
pub fn load_config(dir: &Path) -> Result<inference::ModelConfig, FileError> {
    read_config(&dir.join("config.pbtxt")).map(|(config, _)| config)
}

fn read_config(config_path: &Path) -> Result<(inference::ModelConfig, String), FileError> {
    let text = fs::read_to_string(config_path)
        .map_err(|err| FileError::new(config_path, None, format!("cannot read: {err}")))?;
    let config = pbtxt::parse_model_config(&text)
        .map_err(|err| FileError::new(config_path, err.line, err.reason))?;
    Ok((config, text))
}

fn validate(
    config: &inference::ModelConfig,
    text: &str,
    path: &Path,
    dir_name: &str,
    dir: &Path,
) -> Result<ModelSpec, FileError> {
    let at = |needle: &str| locate(text, needle);
    let refuse = |needle: &str, reason: String| FileError::new(path, at(needle), reason);

    if !config.name.is_empty() && config.name != dir_name {
        return Err(refuse(
            "name",
            format!(
                "name \"{}\" differs from the directory name \"{dir_name}\"",
                config.name
            ),
        ));
    }
    let platform_ok = config.platform == PLATFORM_ONNX
        || (config.platform.is_empty() && config.backend == "onnxruntime");
    if !platform_ok {
        return Err(refuse(
            "platform",
            format!(
                "platform \"{}\" / backend \"{}\" is not served; satwatch serves platform \"{PLATFORM_ONNX}\" (backend \"onnxruntime\")",
                config.platform, config.backend
            ),
        ));
    }
    if config.max_batch_size <= 0 {
        return Err(refuse(
            "max_batch_size",
            "max_batch_size must be > 0: satwatch batches windows along a leading batch dimension"
                .into(),
        ));
    }
    let max_batch_size = config.max_batch_size as usize;

    let [input] = config.input.as_slice() else {
        return Err(refuse(
            "input",
            format!("expected exactly one input, found {}", config.input.len()),
        ));
    };
    let [output] = config.output.as_slice() else {
        return Err(refuse(
            "output",
            format!("expected exactly one output, found {}", config.output.len()),
        ));
    };
    for (tensor, data_type) in [
        (&input.name, input.data_type),
        (&output.name, output.data_type),
    ] {
        if data_type != inference::DataType::TypeFp32 as i32 {
            return Err(refuse(
                tensor,
                format!("tensor \"{tensor}\" must be TYPE_FP32"),
            ));
        }
    }
    let (window, features) = match input.dims.as_slice() {
        &[w, f] if w > 0 && f > 0 => (w as usize, f as usize),
        dims => {
            return Err(refuse(
                "dims",
                format!("input dims {dims:?} must be [window, features], both > 0"),
            ))
        }
    };
    let horizon = match output.dims.as_slice() {
        &[h] if h > 0 => h as usize,
        dims => {
            let line = nth_line_of(text, "dims", 2);
            return Err(FileError::new(
                path,
                line,
                format!("output dims {dims:?} must be [horizon], > 0"),
            ));
        }
    };

    let batching = batch_policy(config, max_batch_size)
        .map_err(|reason| refuse("dynamic_batching", reason))?;
    let (device, instance_count) =
        instances(config).map_err(|reason| refuse("instance_group", reason))?;

    let parameters: BTreeMap<String, String> = config
        .parameters
        .iter()
        .map(|(k, v)| (k.clone(), v.string_value.clone()))
        .collect();
    let param = |key: &str| -> Result<&str, FileError> {
        parameters
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| FileError::new(path, None, format!("missing parameter \"{key}\"")))
    };
    let number = |key: &str| -> Result<f64, FileError> {
        let raw = param(key)?;
        raw.trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| {
                refuse(
                    key,
                    format!("parameter \"{key}\" = \"{raw}\" is not a finite number"),
                )
            })
    };
    let vector = |key: &str| -> Result<Vec<f32>, FileError> {
        let raw = param(key)?;
        let mut values = Vec::with_capacity(features);
        for (i, v) in raw.split(',').enumerate() {
            // NaN, infinities and numbers beyond f32 would make every
            // normalised input and forecast of the model NaN or infinite.
            match v.trim().parse::<f32>() {
                Ok(v) if v.is_finite() => values.push(v),
                _ => {
                    return Err(refuse(
                        key,
                        format!(
                            "parameter \"{key}\" must be {features} comma-separated finite \
                             numbers; element {i} is \"{}\"",
                            v.trim()
                        ),
                    ))
                }
            }
        }
        if values.len() != features {
            return Err(refuse(
                key,
                format!(
                    "parameter \"{key}\" must be {features} comma-separated finite numbers; \
                     it has {}",
                    values.len()
                ),
            ));
        }
        Ok(values)
    };

    for (key, expected) in [("satwatch.window", window), ("satwatch.horizon", horizon)] {
        if let Some(raw) = parameters.get(key) {
            if raw.trim().parse::<usize>().ok() != Some(expected) {
                return Err(refuse(key, format!("parameter \"{key}\" = \"{raw}\" disagrees with the tensor dims ({expected})")));
            }
        }
    }
    let target_feature = number("satwatch.target_feature")? as usize;
    if target_feature >= features {
        return Err(refuse(
            "satwatch.target_feature",
            format!("target_feature {target_feature} is not below features ({features})"),
        ));
    }
    let normalisation = Normalisation {
        center: vector("satwatch.norm_center")?,
        scale: vector("satwatch.norm_scale")?,
    };
    if let Some(i) = normalisation.scale.iter().position(|s| *s <= 0.0) {
        return Err(refuse(
            "satwatch.norm_scale",
            format!("norm_scale[{i}] must be > 0"),
        ));
    }
    let calibration = ErrorCalibration {
        mean: number("satwatch.error_mean")? as f32,
        std: number("satwatch.error_std")? as f32,
        train_drift: match parameters.get("satwatch.train_drift") {
            Some(_) => number("satwatch.train_drift")? as f32,
            None => 0.0,
        },
    };
    if !(0.0..=1.0).contains(&calibration.train_drift) {
        return Err(refuse(
            "satwatch.train_drift",
            "train_drift must be a share, in [0, 1]".into(),
        ));
    }
    if calibration.std <= 0.0 || calibration.mean < 0.0 {
        return Err(refuse(
            "satwatch.error_std",
            "error_mean must be >= 0 and error_std > 0".into(),
        ));
    }

    let version =
        serving_version(config, dir).map_err(|reason| refuse("version_policy", reason))?;
    let file_name = if config.default_model_filename.is_empty() {
        "model.onnx"
    } else {
        config.default_model_filename.as_str()
    };
    let model_path = dir.join(version.to_string()).join(file_name);
    if !model_path.is_file() {
        return Err(FileError::new(
            &model_path,
            None,
            format!("version {version} has no {file_name}"),
        ));
    }

    Ok(ModelSpec {
        name: dir_name.to_owned(),
        version,
        config_path: path.to_owned(),
        model_path,
        device,
        instance_count,
        batching,
        input_name: input.name.clone(),
        output_name: output.name.clone(),
        window,
        features,
        horizon,
        target_feature,
        normalisation,
        calibration,
        input_dims_line: at("dims"),
        parameters,
    })
}

fn batch_policy(
    config: &inference::ModelConfig,
    max_batch_size: usize,
) -> Result<BatchPolicy, String> {
    let Some(dynamic) = &config.dynamic_batching else {
        // Without dynamic_batching Triton runs each request as it comes.
        return Ok(BatchPolicy {
            max_batch_size,
            preferred_batch_sizes: vec![],
            max_queue_delay: Duration::ZERO,
        });
    };
    let mut preferred = Vec::with_capacity(dynamic.preferred_batch_size.len());
    for &size in &dynamic.preferred_batch_size {
        if size <= 0 || size as usize > max_batch_size {
            return Err(format!(
                "preferred_batch_size {size} must be in 1..={max_batch_size} (max_batch_size)"
            ));
        }
        preferred.push(size as usize);
    }
    preferred.sort_unstable();
    preferred.dedup();
    Ok(BatchPolicy {
        max_batch_size,
        preferred_batch_sizes: preferred,
        max_queue_delay: Duration::from_micros(dynamic.max_queue_delay_microseconds),
    })
}

fn instances(config: &inference::ModelConfig) -> Result<(DeviceKind, usize), String> {
    let Some(group) = config.instance_group.first() else {
        return Ok((DeviceKind::Cpu, 1));
    };
    if config.instance_group.len() > 1 {
        return Err("satwatch serves one instance_group per model".into());
    }
    let device = match Kind::try_from(group.kind).unwrap_or(Kind::Auto) {
        Kind::Cpu | Kind::Auto => DeviceKind::Cpu,
        Kind::Gpu => DeviceKind::Gpu,
        Kind::Model => return Err("KIND_MODEL is not supported; use KIND_CPU or KIND_GPU".into()),
    };
    let count = if group.count <= 0 {
        1
    } else {
        group.count as usize
    };
    Ok((device, count))
}

/// Numeric version directories present under `dir`, ascending.
pub fn version_dirs(dir: &Path) -> Vec<u64> {
    let mut versions: Vec<u64> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.path().is_dir())
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort_unstable();
    versions
}

/// The versions the policy makes available, ascending (Triton's default: latest 1).
pub fn policy_versions(config: &inference::ModelConfig, dir: &Path) -> Result<Vec<u64>, String> {
    let present = version_dirs(dir);
    if present.is_empty() {
        return Err(format!(
            "no version directory (e.g. {}/1/) found",
            dir.display()
        ));
    }
    let policy = config
        .version_policy
        .as_ref()
        .and_then(|p| p.policy_choice.as_ref());
    Ok(match policy {
        None => present[present.len() - 1..].to_vec(),
        Some(PolicyChoice::Latest(latest)) => {
            let n = (latest.num_versions.max(1) as usize).min(present.len());
            present[present.len() - n..].to_vec()
        }
        Some(PolicyChoice::All(_)) => present,
        Some(PolicyChoice::Specific(specific)) => {
            let mut wanted = Vec::new();
            for &v in &specific.versions {
                let v = u64::try_from(v).map_err(|_| format!("version {v} is negative"))?;
                if !present.contains(&v) {
                    return Err(format!(
                        "version_policy names version {v}, which has no directory"
                    ));
                }
                wanted.push(v);
            }
            wanted.sort_unstable();
            wanted
        }
    })
}

fn serving_version(config: &inference::ModelConfig, dir: &Path) -> Result<u64, String> {
    let versions = policy_versions(config, dir)?;
    versions
        .last()
        .copied()
        .ok_or_else(|| "version_policy selects no version".into())
}

/// 1-based line of the first line that mentions `needle`.
fn locate(text: &str, needle: &str) -> Option<usize> {
    nth_line_of(text, needle, 1)
}

fn nth_line_of(text: &str, needle: &str, nth: usize) -> Option<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim_start().starts_with('#') && line.contains(needle))
        .nth(nth - 1)
        .map(|(i, _)| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"name: "smap_X-1"
platform: "onnxruntime_onnx"
max_batch_size: 16
input [ { name: "window" data_type: TYPE_FP32 dims: [ 4, 2 ] } ]
output [ { name: "forecast" data_type: TYPE_FP32 dims: [ 3 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
dynamic_batching { preferred_batch_size: [ 8, 4 ] max_queue_delay_microseconds: 500 }
parameters: { key: "satwatch.window" value: { string_value: "4" } }
parameters: { key: "satwatch.horizon" value: { string_value: "3" } }
parameters: { key: "satwatch.target_feature" value: { string_value: "0" } }
parameters: { key: "satwatch.norm_center" value: { string_value: "0.5,0" } }
parameters: { key: "satwatch.norm_scale" value: { string_value: "2,1" } }
parameters: { key: "satwatch.error_mean" value: { string_value: "0.01" } }
parameters: { key: "satwatch.error_std" value: { string_value: "0.02" } }
"#;

    fn model_dir(config: &str, versions: &[u64]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("smap_X-1");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("config.pbtxt"), config).unwrap();
        for v in versions {
            fs::create_dir(dir.join(v.to_string())).unwrap();
            fs::write(dir.join(v.to_string()).join("model.onnx"), b"").unwrap();
        }
        root
    }

    fn load(config: &str, versions: &[u64]) -> Result<ModelSpec, FileError> {
        let root = model_dir(config, versions);
        load_model(&root.path().join("smap_X-1"))
    }

    #[test]
    fn good_config_loads_into_validated_spec() {
        let spec = load(GOOD, &[1, 2]).unwrap();
        assert_eq!((spec.window, spec.features, spec.horizon), (4, 2, 3));
        assert_eq!(spec.version, 2, "latest version is served by default");
        assert_eq!(spec.batching.preferred_batch_sizes, vec![4, 8]);
        assert_eq!(spec.batching.max_queue_delay, Duration::from_micros(500));
        assert_eq!(spec.normalisation.center, vec![0.5, 0.0]);
        assert_eq!(spec.input_dims_line, Some(4));
    }

    #[test]
    fn unknown_field_names_file_and_line() {
        let bad = GOOD.replace(
            "max_batch_size: 16",
            "max_batch_size: 16\nmax_batch_sise: 3",
        );
        let err = load(&bad, &[1]).unwrap_err();
        assert!(err.path.ends_with("config.pbtxt"));
        assert_eq!(err.line, Some(4));
        assert!(err.to_string().contains("max_batch_sise"), "{err}");
    }

    #[test]
    fn missing_version_directory_is_refused() {
        let err = load(GOOD, &[]).unwrap_err();
        assert!(err.reason.contains("no version directory"), "{err}");
    }

    #[test]
    fn parameter_that_disagrees_with_dims_is_refused_at_its_line() {
        let bad = GOOD.replace("string_value: \"4\" }", "string_value: \"5\" }");
        let err = load(&bad, &[1]).unwrap_err();
        assert_eq!(err.line, Some(8));
        assert!(err.reason.contains("disagrees"), "{err}");
    }

    #[test]
    fn preferred_size_above_max_is_refused() {
        let bad = GOOD.replace("[ 8, 4 ]", "[ 32 ]");
        let err = load(&bad, &[1]).unwrap_err();
        assert_eq!(err.line, Some(7));
    }

    #[test]
    fn wrong_norm_length_is_refused() {
        let bad = GOOD.replace("\"0.5,0\"", "\"0.5\"");
        assert!(load(&bad, &[1])
            .unwrap_err()
            .reason
            .contains("2 comma-separated"));
    }

    #[test]
    fn a_norm_vector_with_nan_infinity_or_beyond_f32_is_refused_naming_the_element() {
        for (key, bad) in [
            ("satwatch.norm_scale", "NaN"),
            ("satwatch.norm_scale", "nan"),
            ("satwatch.norm_scale", "inf"),
            ("satwatch.norm_scale", "1e39"),
            ("satwatch.norm_center", "-Infinity"),
        ] {
            let good = if key == "satwatch.norm_scale" {
                "2,1"
            } else {
                "0.5,0"
            };
            let config = GOOD.replace(
                &format!("\"{key}\" value: {{ string_value: \"{good}\""),
                &format!("\"{key}\" value: {{ string_value: \"1,{bad}\""),
            );
            assert_ne!(config, GOOD);
            let err = load(&config, &[1]).unwrap_err();
            assert!(
                err.reason.contains(key)
                    && err.reason.contains("finite")
                    && err.reason.contains(&format!("element 1 is \"{bad}\"")),
                "{bad}: {err}"
            );
            assert_eq!(err.line, locate(&config, key), "{bad}: {err}");
        }
    }

    #[test]
    fn specific_version_policy_selects_named_version() {
        let cfg = GOOD.replace(
            "max_batch_size: 16",
            "max_batch_size: 16\nversion_policy: { specific: { versions: [1] } }",
        );
        assert_eq!(load(&cfg, &[1, 2]).unwrap().version, 1);
    }
}
