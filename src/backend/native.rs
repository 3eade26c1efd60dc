//! The shipped model family in plain Rust on the CPU: no ONNX Runtime, no
//! native libraries.
//!
//! Each model's ONNX file is planned by [`graph`](super::graph) (which refuses
//! any operator outside the family by name); a batch then runs as one matrix
//! product per dense layer (`matrixmultiply`'s sgemm, which picks AVX/FMA
//! kernels at run time) with the bias, ReLU and residual applied row by row.
//! It is the reference the CUDA backend is tested against, and a fallback for
//! machines where the ONNX Runtime library cannot be installed.

use std::sync::Arc;

use super::{
    graph::{self, Dense, MlpPlan},
    Backend, BackendError,
};
use crate::repository::ModelSpec;

/// One plan per model, in load order.
pub struct NativeBackend {
    plans: Vec<MlpPlan>,
    names: Vec<String>,
}

impl NativeBackend {
    /// Plans every model and checks it against its `config.pbtxt`.
    pub fn load(specs: &[Arc<ModelSpec>]) -> Result<Self, BackendError> {
        let plans = plan_models(specs)?;
        Ok(Self {
            plans,
            names: specs.iter().map(|s| s.name.clone()).collect(),
        })
    }
}

/// Plans every model's ONNX file and checks it against its config: what
/// every backend of the shipped model family starts from.
pub(crate) fn plan_models(specs: &[Arc<ModelSpec>]) -> Result<Vec<MlpPlan>, BackendError> {
    specs
        .iter()
        .map(|spec| {
            let plan = graph::load(&spec.model_path)?;
            check_plan(&plan, spec)?;
            Ok(plan)
        })
        .collect()
}

/// The planned model must take and give what the config declares.
fn check_plan(plan: &MlpPlan, spec: &ModelSpec) -> Result<(), BackendError> {
    let mismatch = |reason: String| BackendError::Mismatch {
        path: spec.config_path.display().to_string(),
        line: spec.input_dims_line,
        reason: format!("{reason} (model file {})", spec.model_path.display()),
    };
    if plan.input_name != spec.input_name || plan.output_name != spec.output_name {
        return Err(mismatch(format!(
            "the ONNX model's tensors are \"{}\" -> \"{}\"; the config declares \"{}\" -> \"{}\"",
            plan.input_name, plan.output_name, spec.input_name, spec.output_name
        )));
    }
    let planned = (plan.window, plan.features, plan.outputs_per_row());
    let declared = (spec.window, spec.features, spec.horizon);
    if planned != declared {
        return Err(mismatch(format!(
            "the ONNX model maps [batch, {}, {}] to [batch, {}]; the config declares [batch, {}, {}] to [batch, {}]",
            planned.0, planned.1, planned.2, declared.0, declared.1, declared.2
        )));
    }
    Ok(())
}

impl Backend for NativeBackend {
    fn infer(&self, model: usize, inputs: &[f32], rows: usize) -> Result<Vec<f32>, BackendError> {
        let plan = &self.plans[model];
        if inputs.len() != rows * plan.inputs_per_row() {
            return Err(BackendError::Inference {
                model: self.names[model].clone(),
                reason: format!(
                    "{} input values for {rows} rows of {}",
                    inputs.len(),
                    plan.inputs_per_row()
                ),
            });
        }
        Ok(run(plan, inputs, rows))
    }
}

/// Runs `plan` on `rows` rows of `inputs` (`[rows, window * features]`).
pub fn run(plan: &MlpPlan, inputs: &[f32], rows: usize) -> Vec<f32> {
    // The first layer reads the batch in place: copying it would cost as much
    // as the layer at large batches.
    let mut layers = plan.layers.iter();
    let mut activations = match layers.next() {
        Some(first) => dense(first, inputs, rows),
        None => inputs.to_vec(),
    };
    for layer in layers {
        activations = dense(layer, &activations, rows);
    }
    if let Some(offset) = plan.residual {
        let (per_in, per_out) = (plan.inputs_per_row(), plan.outputs_per_row());
        for (row, out) in activations.chunks_exact_mut(per_out).enumerate() {
            let value = inputs[row * per_in + offset];
            out.iter_mut().for_each(|y| *y += value);
        }
    }
    activations
}

/// `[rows, inputs]` through one layer: `[rows, outputs]`.
fn dense(layer: &Dense, x: &[f32], rows: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), rows * layer.inputs);
    // The bias goes in first; sgemm then adds x · weightᵀ onto it (beta = 1).
    let mut y: Vec<f32> = Vec::with_capacity(rows * layer.outputs);
    for _ in 0..rows {
        y.extend_from_slice(&layer.bias);
    }
    if rows > 0 {
        // SAFETY: x is [rows, inputs] row-major (row stride inputs, column
        // stride 1); weightᵀ is read from weight [outputs, inputs] row-major
        // as a [inputs, outputs] matrix (row stride 1, column stride inputs);
        // y is [rows, outputs] row-major. All three slices hold exactly those
        // many elements (checked above and by construction), and y does not
        // alias x or the weights.
        unsafe {
            matrixmultiply::sgemm(
                rows,
                layer.inputs,
                layer.outputs,
                1.0,
                x.as_ptr(),
                layer.inputs as isize,
                1,
                layer.weight.as_ptr(),
                1,
                layer.inputs as isize,
                1.0,
                y.as_mut_ptr(),
                layer.outputs as isize,
                1,
            );
        }
    }
    if layer.relu {
        y.iter_mut().for_each(|v| *v = v.max(0.0));
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan against a direct, loop-by-loop evaluation of its definition.
    #[test]
    fn sgemm_path_matches_the_definition() {
        let plan = MlpPlan {
            path: "test".into(),
            input_name: "in".into(),
            output_name: "out".into(),
            window: 3,
            features: 2,
            layers: vec![
                Dense {
                    inputs: 6,
                    outputs: 4,
                    weight: (0..24).map(|i| (i as f32 * 0.37).sin()).collect(),
                    bias: vec![0.1, -0.2, 0.3, -5.0],
                    relu: true,
                },
                Dense {
                    inputs: 4,
                    outputs: 2,
                    weight: (0..8).map(|i| (i as f32 * 0.91).cos()).collect(),
                    bias: vec![0.5, -0.5],
                    relu: false,
                },
            ],
            residual: Some(4),
        };
        let rows = 5;
        let x: Vec<f32> = (0..rows * 6)
            .map(|i| (i as f32 * 0.13).sin() * 2.0)
            .collect();
        let got = run(&plan, &x, rows);
        for r in 0..rows {
            let row = &x[r * 6..(r + 1) * 6];
            let mut h = [0.0f32; 4];
            for (o, h) in h.iter_mut().enumerate() {
                let l = &plan.layers[0];
                *h = (l.bias[o] + (0..6).map(|i| row[i] * l.weight[o * 6 + i]).sum::<f32>())
                    .max(0.0);
            }
            for o in 0..2 {
                let l = &plan.layers[1];
                let y =
                    l.bias[o] + (0..4).map(|i| h[i] * l.weight[o * 4 + i]).sum::<f32>() + row[4];
                let g = got[r * 2 + o];
                assert!((g - y).abs() <= 1e-5, "row {r} output {o}: {g} vs {y}");
            }
        }
        assert!(run(&plan, &[], 0).is_empty());
    }
}
