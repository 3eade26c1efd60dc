//! The shipped model family served on a channel's rows instead of its windows.
//!
//! Consecutive windows of a channel share all their rows but one, and the
//! engine hands a batch over as runs of those shared rows
//! ([`BatchInputs`](crate::batch::BatchInputs)). The family's first layer is
//! dense over the flattened window: the same sums as a 2-D convolution with
//! one input channel and a `window × features` kernel slid down a run's rows,
//! one output position per window. Rewritten that way,
//!
//! ```text
//! rows [runs, 1, rows, F] ─ Conv ─ (Relu) ─ Transpose ─ Reshape ─ Gemm ─ (Relu) … ─ [runs × windows, H]
//! ```
//!
//! ONNX Runtime reads each row once per batch instead of once per window it
//! is part of: nothing copies a batch's windows out one by one any more (that
//! copy was 16–21 % of the inference threads' time, BENCHMARKS.md), and its
//! convolution kernel reads rows no slower than its matrix product reads
//! windows. The residual (one value of the window's newest row) is added
//! after the call, from the rows. Windows laid out one by one are runs of one
//! window each, so the same session serves both.
//!
//! Runs of a batch of a few lengths go to one call per length, read in place
//! (the engine lays a batch's runs out longest first); runs of many lengths
//! are padded to the longest in their call, and [`group_runs`] keeps that
//! padding small by splitting uneven runs into several calls.

use prost::Message;

use super::graph::{
    proto::{
        self, attribute_proto::AttributeType, tensor_proto::DataType,
        tensor_shape_proto::dimension, type_proto,
    },
    MlpPlan,
};

/// Name of the row-form model's input.
pub const INPUT: &str = "rows";

/// Padding a call may carry: at most one window in this many is padding.
const PADDING_LIMIT: usize = 8;

/// Up to this many different run lengths in a batch, one call per length
/// costs less than copying the runs into one padded tensor: at 270 and 2,700
/// channels a batch's runs have two lengths (51 and 52 windows, or 5 and 6).
const EXACT_CALLS: usize = 4;

/// The row form of `plan` as an encoded ONNX model (opset 17), without the
/// residual: its output is `plan.output_name`, `[runs × windows, horizon]`,
/// run after run.
pub fn model_bytes(plan: &MlpPlan) -> Vec<u8> {
    let first = &plan.layers[0];
    let mut nodes = Vec::new();
    let mut initializers = vec![
        floats(
            "conv.weight",
            &[first.outputs, 1, plan.window, plan.features],
            &first.weight,
        ),
        floats("conv.bias", &[first.outputs], &first.bias),
        int64s("hidden.shape", &[-1, first.outputs as i64]),
    ];
    nodes.push(node(
        "Conv",
        &[INPUT, "conv.weight", "conv.bias"],
        "conv",
        vec![],
    ));
    let mut last = "conv".to_string();
    if first.relu {
        nodes.push(node("Relu", &[&last], "conv.relu", vec![]));
        last = "conv.relu".into();
    }
    // [runs, hidden, windows, 1] -> [runs, windows, 1, hidden] -> [runs × windows, hidden]
    nodes.push(node(
        "Transpose",
        &[&last],
        "hidden.nhwc",
        vec![ints("perm", &[0, 2, 3, 1])],
    ));
    nodes.push(node(
        "Reshape",
        &["hidden.nhwc", "hidden.shape"],
        "hidden",
        vec![],
    ));
    last = "hidden".into();
    for (i, layer) in plan.layers.iter().enumerate().skip(1) {
        let (w, b, out) = (
            format!("dense{i}.weight"),
            format!("dense{i}.bias"),
            format!("dense{i}"),
        );
        initializers.push(floats(&w, &[layer.outputs, layer.inputs], &layer.weight));
        initializers.push(floats(&b, &[layer.outputs], &layer.bias));
        nodes.push(node("Gemm", &[&last, &w, &b], &out, vec![int("transB", 1)]));
        last = out;
        if layer.relu {
            let relu = format!("dense{i}.relu");
            nodes.push(node("Relu", &[&last], &relu, vec![]));
            last = relu;
        }
    }
    // The output carries the model's own name: rename the last value to it.
    let rename = |name: &mut String| {
        if *name == last {
            *name = plan.output_name.clone();
        }
    };
    for n in &mut nodes {
        n.output.iter_mut().for_each(rename);
    }
    let graph = proto::GraphProto {
        node: nodes,
        name: Some("satwatch_rows".into()),
        initializer: initializers,
        input: vec![tensor_info(
            INPUT,
            &[
                Dim::Named("runs"),
                Dim::Fixed(1),
                Dim::Named("rows"),
                Dim::Fixed(plan.features as i64),
            ],
        )],
        output: vec![tensor_info(
            &plan.output_name,
            &[
                Dim::Named("windows"),
                Dim::Fixed(plan.outputs_per_row() as i64),
            ],
        )],
        sparse_initializer: vec![],
    };
    proto::ModelProto {
        ir_version: Some(8),
        producer_name: Some("satwatch".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        graph: Some(graph),
        opset_import: vec![proto::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
    }
    .encode_to_vec()
}

/// Splits runs (given as their window counts) into calls, longest runs
/// first; returns run indices per call. With at most [`EXACT_CALLS`]
/// different lengths, each length gets a call of its own: nothing is padded,
/// and runs the engine laid side by side are read in place. Otherwise each
/// call pads its runs to its longest, and a run joins the current call only
/// while at most one window in [`PADDING_LIMIT`] of that call is padding.
/// Runs of equal length always share one call.
pub fn group_runs(windows_per_run: &[usize]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..windows_per_run.len()).collect();
    order.sort_by_key(|&r| std::cmp::Reverse(windows_per_run[r]));
    let mut lengths: Vec<usize> = windows_per_run.to_vec();
    lengths.sort_unstable();
    lengths.dedup();
    if lengths.len() <= EXACT_CALLS {
        let mut calls: Vec<Vec<usize>> = Vec::new();
        for r in order {
            match calls.last_mut() {
                Some(call) if windows_per_run[call[0]] == windows_per_run[r] => call.push(r),
                _ => calls.push(vec![r]),
            }
        }
        return calls;
    }
    let mut calls: Vec<Vec<usize>> = Vec::new();
    let mut real = 0;
    for r in order {
        let n = windows_per_run[r];
        let fits = calls.last().is_some_and(|call| {
            let longest = windows_per_run[call[0]];
            let padded = (call.len() + 1) * longest;
            (padded - real - n) * PADDING_LIMIT <= padded
        });
        if fits {
            calls.last_mut().expect("checked above").push(r);
            real += n;
        } else {
            calls.push(vec![r]);
            real = n;
        }
    }
    calls
}

fn node(
    op: &str,
    inputs: &[&str],
    output: &str,
    attribute: Vec<proto::AttributeProto>,
) -> proto::NodeProto {
    proto::NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name: Some(output.into()),
        op_type: Some(op.into()),
        attribute,
        domain: None,
    }
}

fn int(name: &str, value: i64) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        i: Some(value),
        r#type: Some(AttributeType::Int as i32),
        ..Default::default()
    }
}

fn ints(name: &str, values: &[i64]) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        ints: values.to_vec(),
        r#type: Some(AttributeType::Ints as i32),
        ..Default::default()
    }
}

fn floats(name: &str, dims: &[usize], values: &[f32]) -> proto::TensorProto {
    debug_assert_eq!(dims.iter().product::<usize>(), values.len());
    proto::TensorProto {
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(DataType::Float as i32),
        name: Some(name.into()),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

fn int64s(name: &str, values: &[i64]) -> proto::TensorProto {
    proto::TensorProto {
        dims: vec![values.len() as i64],
        data_type: Some(DataType::Int64 as i32),
        name: Some(name.into()),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

enum Dim {
    Fixed(i64),
    Named(&'static str),
}

fn tensor_info(name: &str, dims: &[Dim]) -> proto::ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| proto::tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Fixed(v) => dimension::Value::DimValue(*v),
                Dim::Named(p) => dimension::Value::DimParam(p.to_string()),
            }),
        })
        .collect();
    proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(proto::TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(proto::TensorShapeProto { dim }),
            })),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (padding, padded windows) of one call.
    fn padding(runs: &[usize], call: &[usize]) -> (usize, usize) {
        let padded = call.len() * runs[call[0]];
        (
            padded - call.iter().map(|&r| runs[r]).sum::<usize>(),
            padded,
        )
    }

    #[test]
    fn equal_runs_share_one_call() {
        assert_eq!(group_runs(&[51, 51, 51]), vec![vec![0, 1, 2]]);
        assert_eq!(group_runs(&[7]), vec![vec![0]]);
        assert!(group_runs(&[]).is_empty());
    }

    #[test]
    fn a_few_lengths_get_a_call_each_longest_first() {
        assert_eq!(
            group_runs(&[6, 5, 6, 5, 5]),
            vec![vec![0, 2], vec![1, 3, 4]]
        );
        assert_eq!(
            group_runs(&[9, 1, 3, 7]),
            vec![vec![0], vec![3], vec![2], vec![1]]
        );
    }

    #[test]
    fn uneven_runs_split_so_padding_stays_within_the_limit() {
        let runs = [400, 12, 12, 390, 11, 3, 52, 51];
        let calls = group_runs(&runs);
        // Every run is in exactly one call.
        let mut seen: Vec<usize> = calls.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..runs.len()).collect::<Vec<_>>());
        // Each call's padding is within the limit, and the longest run leads.
        for call in &calls {
            let (pad, padded) = padding(&runs, call);
            assert!(
                pad * PADDING_LIMIT <= padded,
                "{call:?} pads {pad} of {padded}"
            );
            assert!(call.iter().all(|&r| runs[r] <= runs[call[0]]));
        }
        // 400 and 390 share a call; the short runs do not join them.
        assert!(calls.iter().any(|c| c.contains(&0) && c.contains(&3)));
        assert!(calls.iter().all(|c| !(c.contains(&0) && c.contains(&1))));
    }
}
