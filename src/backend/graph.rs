//! ONNX model files read into the plan that the native and CUDA backends run.
//!
//! The shipped models (training/train.py's `ResidualMLP`, exported by PyTorch at
//! opset 17) are one graph shape:
//!
//! ```text
//! window [batch, W, F] ─ Flatten ─ Gemm ─ Relu ─ Gemm ─┐
//!        └─ Slice [:, W-1:W, :] ─ Gather [.., 0] ──────Add ─ forecast [batch, H]
//! ```
//!
//! [`load`] decodes the file against `proto/onnx.proto` and walks its nodes in
//! order, tracking what each value is in terms of the input (a box of the
//! window, one picked column, or the output of the dense layers so far). That
//! accepts this family in general (any number of Gemm layers, each optionally
//! followed by Relu, any window and feature count, the residual column taken
//! from any position or none) and nothing else: an operator outside
//! Constant, Slice, Gather, Flatten, Gemm, Relu and Add, or one of those used
//! in a way the plan cannot express, is refused naming the node and the file.

use std::{
    collections::HashMap,
    ops::Range,
    path::{Path, PathBuf},
};

use prost::Message;

use super::BackendError;

/// The types generated from `proto/onnx.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

use proto::{tensor_proto::DataType, type_proto, NodeProto, TensorProto};

/// The operators the plan is built from.
pub const SUPPORTED_OPS: &[&str] = &[
    "Constant", "Slice", "Gather", "Flatten", "Gemm", "Relu", "Add",
];

/// Oldest default-domain opset whose semantics for [`SUPPORTED_OPS`] the
/// parser implements (Slice's inputs, Gemm's optional C).
const MIN_OPSET: i64 = 11;

/// One dense layer: `y = x · weightᵀ + bias`, then ReLU when `relu`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dense {
    pub inputs: usize,
    pub outputs: usize,
    /// `[outputs, inputs]`, row-major, Gemm's alpha folded in.
    pub weight: Vec<f32>,
    /// `[outputs]`, Gemm's beta folded in (zeros when the Gemm has no C).
    pub bias: Vec<f32>,
    pub relu: bool,
}

/// What a model computes for each row of a batch: the window flattened,
/// through `layers`, plus the window's value at `residual` when there is one.
#[derive(Debug, Clone, PartialEq)]
pub struct MlpPlan {
    pub path: PathBuf,
    pub input_name: String,
    pub output_name: String,
    /// Samples per window.
    pub window: usize,
    /// Values per sample.
    pub features: usize,
    pub layers: Vec<Dense>,
    /// Offset into a flattened window (`sample * features + feature`) of the
    /// value added to every output.
    pub residual: Option<usize>,
}

impl MlpPlan {
    /// Values per input row (`window * features`).
    pub fn inputs_per_row(&self) -> usize {
        self.window * self.features
    }

    /// Values per output row (the horizon).
    pub fn outputs_per_row(&self) -> usize {
        self.layers
            .last()
            .map_or(self.inputs_per_row(), |l| l.outputs)
    }

    /// The widest activation a row passes through (buffers are sized by it).
    pub fn widest(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.outputs)
            .max()
            .unwrap_or(0)
            .max(self.inputs_per_row())
    }
}

/// Reads and plans the ONNX file at `path`.
pub fn load(path: &Path) -> Result<MlpPlan, BackendError> {
    let bytes = std::fs::read(path).map_err(|err| BackendError::Load {
        path: path.display().to_string(),
        reason: format!("cannot read: {err}"),
    })?;
    parse(&bytes, path)
}

/// Plans an ONNX model held in memory; `path` is only for messages.
pub fn parse(bytes: &[u8], path: &Path) -> Result<MlpPlan, BackendError> {
    let refuse = |reason: String| BackendError::Load {
        path: path.display().to_string(),
        reason,
    };
    let model = proto::ModelProto::decode(bytes)
        .map_err(|err| refuse(format!("not an ONNX model (protobuf decode failed: {err})")))?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| matches!(o.domain(), "" | "ai.onnx"))
        .map(|o| o.version())
        .ok_or_else(|| refuse("the model imports no default-domain (ai.onnx) opset".into()))?;
    if opset < MIN_OPSET {
        return Err(refuse(format!(
            "opset {opset} is older than {MIN_OPSET}, the oldest the native and CUDA backends read; re-export the model"
        )));
    }
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| refuse("the model has no graph".into()))?;
    if !graph.sparse_initializer.is_empty() {
        return Err(refuse("sparse initializers are not supported".into()));
    }

    let mut values: HashMap<String, Value> = HashMap::new();
    for init in &graph.initializer {
        let tensor = Tensor::decode(init)
            .map_err(|r| refuse(format!("initializer \"{}\": {r}", init.name())))?;
        values.insert(init.name().to_owned(), Value::Const(tensor));
    }

    let inputs: Vec<_> = graph
        .input
        .iter()
        .filter(|i| !values.contains_key(i.name()))
        .collect();
    let [input] = inputs.as_slice() else {
        return Err(refuse(format!(
            "the graph has {} inputs; the native and CUDA backends take one [batch, window, features] tensor",
            inputs.len()
        )));
    };
    let (window, features) =
        input_shape(input).map_err(|r| refuse(format!("input \"{}\": {r}", input.name())))?;
    values.insert(
        input.name().to_owned(),
        Value::Window(View {
            samples: Axis::Range(0..window),
            features: Axis::Range(0..features),
        }),
    );

    let mut builder = Builder {
        window,
        features,
        layers: Vec::new(),
        residual: None,
    };
    for (index, node) in graph.node.iter().enumerate() {
        let name = if node.name().is_empty() {
            format!("#{index}")
        } else {
            node.name().to_owned()
        };
        let at = |reason: String| refuse(format!("node \"{name}\" ({}): {reason}", node.op_type()));
        if !matches!(node.domain(), "" | "ai.onnx") {
            return Err(at(format!(
                "operator domain \"{}\" is not supported; the native and CUDA backends run the default ONNX domain only",
                node.domain()
            )));
        }
        if !SUPPORTED_OPS.contains(&node.op_type()) {
            return Err(refuse(format!(
                "operator {} (node \"{name}\") is not supported by the native and CUDA backends, which run {}; use backend = \"onnx\" for this model",
                node.op_type(),
                SUPPORTED_OPS.join(", ")
            )));
        }
        let [output] = node.output.as_slice() else {
            return Err(at(format!(
                "has {} outputs; expected one",
                node.output.len()
            )));
        };
        let args: Vec<Option<&Value>> = node
            .input
            .iter()
            .map(|name| {
                if name.is_empty() {
                    Ok(None)
                } else {
                    values.get(name).map(Some).ok_or_else(|| {
                        at(format!("input \"{name}\" is not produced before this node"))
                    })
                }
            })
            .collect::<Result<_, _>>()?;
        let value = builder.node(node, &args).map_err(at)?;
        values.insert(output.clone(), value);
    }

    let [output] = graph.output.as_slice() else {
        return Err(refuse(format!(
            "the graph has {} outputs; the native and CUDA backends give one [batch, horizon] tensor",
            graph.output.len()
        )));
    };
    let result = values
        .get(output.name())
        .ok_or_else(|| refuse(format!("output \"{}\" is never produced", output.name())))?;
    let done = builder.layers.len();
    match result {
        Value::Dense { layers } if *layers == done && done > 0 => {}
        Value::Sum { layers, residual } if *layers == done && done > 0 => {
            builder.residual = Some(*residual);
        }
        _ => {
            return Err(refuse(format!(
                "output \"{}\" is not the dense layers' result (optionally plus one input column); the native and CUDA backends run that model family only",
                output.name()
            )))
        }
    }
    Ok(MlpPlan {
        path: path.to_owned(),
        input_name: input.name().to_owned(),
        output_name: output.name().to_owned(),
        window,
        features,
        layers: builder.layers,
        residual: builder.residual,
    })
}

/// `[batch, W, F]` with W and F fixed and the batch free (or any size).
fn input_shape(input: &proto::ValueInfoProto) -> Result<(usize, usize), String> {
    let Some(type_proto::Value::TensorType(tensor)) =
        input.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Err("is not a tensor".into());
    };
    if tensor.elem_type() != DataType::Float as i32 {
        return Err(format!(
            "element type {} is not float32",
            tensor.elem_type()
        ));
    }
    let dims: Vec<Option<i64>> = tensor
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(proto::tensor_shape_proto::dimension::Value::DimValue(v)) => Some(v),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match dims.as_slice() {
        [_, Some(w), Some(f)] if *w > 0 && *f > 0 => Ok((*w as usize, *f as usize)),
        _ => Err(format!(
            "shape {dims:?} is not [batch, window, features] with fixed window and features"
        )),
    }
}

/// A constant tensor (initializer or Constant node), values widened.
#[derive(Debug, Clone, PartialEq)]
enum Tensor {
    F32 { dims: Vec<usize>, data: Vec<f32> },
    I64 { dims: Vec<usize>, data: Vec<i64> },
}

impl Tensor {
    fn decode(t: &TensorProto) -> Result<Self, String> {
        if t.data_location() == proto::tensor_proto::DataLocation::External {
            return Err(
                "external tensor data is not supported; save the model with its weights inside"
                    .into(),
            );
        }
        let dims = t
            .dims
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| format!("negative dimension {d}")))
            .collect::<Result<Vec<_>, _>>()?;
        let count: usize = dims.iter().product();
        let raw = t.raw_data();
        let tensor = match DataType::try_from(t.data_type()) {
            Ok(DataType::Float) => Tensor::F32 {
                data: if raw.is_empty() {
                    t.float_data.clone()
                } else {
                    le_values(raw, f32::from_le_bytes)?
                },
                dims,
            },
            Ok(DataType::Int64) => Tensor::I64 {
                data: if raw.is_empty() {
                    t.int64_data.clone()
                } else {
                    le_values(raw, i64::from_le_bytes)?
                },
                dims,
            },
            Ok(DataType::Int32) => Tensor::I64 {
                data: if raw.is_empty() {
                    t.int32_data.iter().map(|&v| v as i64).collect()
                } else {
                    le_values(raw, i32::from_le_bytes)?
                        .into_iter()
                        .map(i64::from)
                        .collect()
                },
                dims,
            },
            _ => {
                return Err(format!(
                    "element type {} is not supported (float32, int64 and int32 are)",
                    t.data_type()
                ))
            }
        };
        let len = match &tensor {
            Tensor::F32 { data, .. } => data.len(),
            Tensor::I64 { data, .. } => data.len(),
        };
        if len != count {
            return Err(format!(
                "holds {len} values; its dimensions {:?} need {count}",
                t.dims
            ));
        }
        Ok(tensor)
    }

    fn ints(&self) -> Option<&[i64]> {
        match self {
            Tensor::I64 { data, .. } => Some(data),
            Tensor::F32 { .. } => None,
        }
    }
}

fn le_values<T, const N: usize>(raw: &[u8], from: fn([u8; N]) -> T) -> Result<Vec<T>, String> {
    if raw.len() % N != 0 {
        return Err(format!(
            "raw data of {} bytes is not a whole number of {N}-byte values",
            raw.len()
        ));
    }
    Ok(raw
        .chunks_exact(N)
        .map(|c| from(c.try_into().expect("chunks_exact yields N bytes")))
        .collect())
}

/// An axis of the input that is still present (a range) or was removed by a
/// Gather (one index).
#[derive(Debug, Clone, PartialEq)]
enum Axis {
    Range(Range<usize>),
    Index(usize),
}

/// A box of the input `[batch, samples, features]`.
#[derive(Debug, Clone, PartialEq)]
struct View {
    samples: Axis,
    features: Axis,
}

impl View {
    /// The view's shape after the batch axis.
    fn shape(&self) -> Vec<usize> {
        [&self.samples, &self.features]
            .into_iter()
            .filter_map(|a| match a {
                Axis::Range(r) => Some(r.len()),
                Axis::Index(_) => None,
            })
            .collect()
    }

    /// The axes still present, as mutable references, in order (axis 1, 2, ...).
    fn present_mut(&mut self) -> Vec<&mut Axis> {
        [&mut self.samples, &mut self.features]
            .into_iter()
            .filter(|a| matches!(a, Axis::Range(_)))
            .collect()
    }
}

/// What a value in the graph is, in terms of the input.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Const(Tensor),
    /// A box of the input.
    Window(View),
    /// `[batch, width]`: the flattened window through the first `layers` dense layers.
    Dense {
        layers: usize,
    },
    /// `[batch, horizon]`: `Dense { layers }` plus the input value at `residual`.
    Sum {
        layers: usize,
        residual: usize,
    },
}

struct Builder {
    window: usize,
    features: usize,
    layers: Vec<Dense>,
    residual: Option<usize>,
}

impl Builder {
    fn width(&self, layers: usize) -> usize {
        if layers == 0 {
            self.window * self.features
        } else {
            self.layers[layers - 1].outputs
        }
    }

    /// The value `node` produces from `args`.
    fn node(&mut self, node: &NodeProto, args: &[Option<&Value>]) -> Result<Value, String> {
        let arg = |i: usize| -> Result<&Value, String> {
            args.get(i)
                .copied()
                .flatten()
                .ok_or_else(|| format!("input {i} is missing"))
        };
        let ints = |i: usize| -> Result<Option<Vec<i64>>, String> {
            match args.get(i).copied().flatten() {
                None => Ok(None),
                Some(Value::Const(t)) => t
                    .ints()
                    .map(|v| Some(v.to_vec()))
                    .ok_or_else(|| format!("input {i} must be an integer constant")),
                Some(_) => Err(format!("input {i} must be a constant")),
            }
        };
        for attr in &node.attribute {
            if !attr.ref_attr_name().is_empty() {
                return Err(format!(
                    "attribute \"{}\" refers to a function attribute",
                    attr.name()
                ));
            }
        }
        match node.op_type() {
            "Constant" => {
                let [attr] = node.attribute.as_slice() else {
                    return Err("expected exactly one attribute".into());
                };
                match (attr.name(), attr.t.as_ref()) {
                    ("value", Some(t)) => Ok(Value::Const(Tensor::decode(t)?)),
                    (other, _) => Err(format!(
                        "attribute \"{other}\" is not supported (only a tensor \"value\" is)"
                    )),
                }
            }
            "Slice" => {
                let Value::Window(view) = arg(0)? else {
                    return Err("only slices of the input window are supported".into());
                };
                let starts = ints(1)?.ok_or("starts are missing")?;
                let ends = ints(2)?.ok_or("ends are missing")?;
                let rank = 1 + view.shape().len() as i64;
                let axes = ints(3)?.unwrap_or_else(|| (0..starts.len() as i64).collect());
                let steps = ints(4)?.unwrap_or_else(|| vec![1; starts.len()]);
                if ends.len() != starts.len()
                    || axes.len() != starts.len()
                    || steps.len() != starts.len()
                {
                    return Err("starts, ends, axes and steps differ in length".into());
                }
                let mut view = view.clone();
                for (((start, end), axis), step) in starts.iter().zip(&ends).zip(&axes).zip(&steps)
                {
                    let axis = if *axis < 0 { axis + rank } else { *axis };
                    if axis == 0 {
                        return Err("slicing the batch axis is not supported".into());
                    }
                    if *step != 1 {
                        return Err(format!("step {step} is not supported (only 1 is)"));
                    }
                    let mut present = view.present_mut();
                    let Some(Axis::Range(range)) =
                        present.get_mut((axis - 1) as usize).map(|a| &mut **a)
                    else {
                        return Err(format!("axis {axis} is outside the input's rank {rank}"));
                    };
                    let len = range.len() as i64;
                    let clamp = |v: i64| (if v < 0 { v + len } else { v }).clamp(0, len) as usize;
                    let (from, to) = (clamp(*start), clamp(*end));
                    if from >= to {
                        return Err(format!("slice {start}..{end} of axis {axis} is empty"));
                    }
                    *range = range.start + from..range.start + to;
                }
                Ok(Value::Window(view))
            }
            "Gather" => {
                let Value::Window(view) = arg(0)? else {
                    return Err("only gathers from the input window are supported".into());
                };
                let Some(Value::Const(indices)) = args.get(1).copied().flatten() else {
                    return Err("indices must be a constant".into());
                };
                let Tensor::I64 { dims, data } = indices else {
                    return Err("indices must be integers".into());
                };
                let (true, [index]) = (dims.is_empty(), data.as_slice()) else {
                    return Err("only a scalar index is supported".into());
                };
                let rank = 1 + view.shape().len() as i64;
                let axis = attr_int(node, "axis").unwrap_or(0);
                let axis = if axis < 0 { axis + rank } else { axis };
                if axis == 0 {
                    return Err("gathering along the batch axis is not supported".into());
                }
                let mut view = view.clone();
                let mut present = view.present_mut();
                let Some(slot) = present.get_mut((axis - 1) as usize) else {
                    return Err(format!("axis {axis} is outside the input's rank {rank}"));
                };
                let Axis::Range(range) = &**slot else {
                    unreachable!("present_mut returns ranges only")
                };
                let (start, len) = (range.start, range.len() as i64);
                let i = if *index < 0 { index + len } else { *index };
                if !(0..len).contains(&i) {
                    return Err(format!("index {index} is outside 0..{len}"));
                }
                **slot = Axis::Index(start + i as usize);
                Ok(Value::Window(view))
            }
            "Flatten" => {
                let whole = View {
                    samples: Axis::Range(0..self.window),
                    features: Axis::Range(0..self.features),
                };
                if arg(0)? != &Value::Window(whole) {
                    return Err("only the whole input window can be flattened".into());
                }
                if attr_int(node, "axis").unwrap_or(1) != 1 {
                    return Err("only axis 1 is supported ([batch, window * features])".into());
                }
                Ok(Value::Dense { layers: 0 })
            }
            "Gemm" => {
                let Value::Dense { layers } = *arg(0)? else {
                    return Err("A must be the flattened window or a previous Gemm's result".into());
                };
                if layers != self.layers.len() {
                    return Err(
                        "A must be the latest dense result (the graph must be a chain)".into(),
                    );
                }
                if attr_int(node, "transA").unwrap_or(0) != 0 {
                    return Err("transA = 1 is not supported".into());
                }
                let trans_b = attr_int(node, "transB").unwrap_or(0) != 0;
                let alpha = attr_float(node, "alpha").unwrap_or(1.0);
                let beta = attr_float(node, "beta").unwrap_or(1.0);
                let Value::Const(Tensor::F32 { dims, data }) = arg(1)? else {
                    return Err("B must be a float32 constant".into());
                };
                let &[rows, cols] = dims.as_slice() else {
                    return Err(format!("B has shape {dims:?}; expected a matrix"));
                };
                let (outputs, inputs) = if trans_b { (rows, cols) } else { (cols, rows) };
                let width = self.width(layers);
                if inputs != width {
                    return Err(format!("B takes {inputs} values per row; A has {width}"));
                }
                let mut weight = vec![0.0; outputs * inputs];
                for o in 0..outputs {
                    for i in 0..inputs {
                        let b = if trans_b {
                            data[o * inputs + i]
                        } else {
                            data[i * outputs + o]
                        };
                        weight[o * inputs + i] = alpha * b;
                    }
                }
                let bias = match args.get(2).copied().flatten() {
                    None => vec![0.0; outputs],
                    Some(Value::Const(Tensor::F32 { dims, data })) => {
                        let per_output = dims.iter().product::<usize>() == outputs
                            && dims.iter().rev().skip(1).all(|&d| d == 1);
                        if per_output {
                            data.iter().map(|c| beta * c).collect()
                        } else if data.len() == 1 {
                            vec![beta * data[0]; outputs]
                        } else {
                            return Err(format!(
                                "C has shape {dims:?}; expected [{outputs}] or a scalar"
                            ));
                        }
                    }
                    Some(_) => return Err("C must be a float32 constant".into()),
                };
                self.layers.push(Dense {
                    inputs,
                    outputs,
                    weight,
                    bias,
                    relu: false,
                });
                Ok(Value::Dense { layers: layers + 1 })
            }
            "Relu" => match *arg(0)? {
                Value::Dense { layers } if layers == self.layers.len() && layers > 0 => {
                    let last = self.layers.last_mut().expect("layers > 0");
                    if last.relu {
                        return Err("Relu applied twice to one layer".into());
                    }
                    last.relu = true;
                    Ok(Value::Dense { layers })
                }
                _ => Err("only the latest Gemm's result can go through Relu".into()),
            },
            "Add" => {
                let (a, b) = (arg(0)?, arg(1)?);
                let (dense, column) = match (a, b) {
                    (Value::Dense { layers }, Value::Window(view))
                    | (Value::Window(view), Value::Dense { layers }) => (*layers, view),
                    _ => return Err(
                        "only the latest dense result plus one column of the input is supported"
                            .into(),
                    ),
                };
                if dense != self.layers.len() || dense == 0 {
                    return Err("only the final dense result can take the residual".into());
                }
                // [batch, 1]: one axis picked by Gather, the other sliced to one.
                let residual = match (&column.samples, &column.features) {
                    (Axis::Index(s), Axis::Range(f)) if f.len() == 1 => s * self.features + f.start,
                    (Axis::Range(s), Axis::Index(f)) if s.len() == 1 => s.start * self.features + f,
                    _ => {
                        return Err(format!(
                            "the added input view has shape [batch, {}]; only [batch, 1] (one value per row) is supported",
                            column.shape().iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
                        ))
                    }
                };
                Ok(Value::Sum {
                    layers: dense,
                    residual,
                })
            }
            other => Err(format!("operator {other} has no plan")),
        }
    }
}

fn attr_int(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute
        .iter()
        .find(|a| a.name() == name)
        .map(|a| a.i())
}

fn attr_float(node: &NodeProto, name: &str) -> Option<f32> {
    node.attribute
        .iter()
        .find(|a| a.name() == name)
        .map(|a| a.f())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped(channel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("model_repository/smap_{channel}/1/model.onnx"))
    }

    #[test]
    fn the_shipped_model_is_two_dense_layers_and_the_last_target_value() {
        let plan = load(&shipped("T-1")).unwrap();
        assert_eq!((plan.window, plan.features), (128, 25));
        assert_eq!(
            (plan.input_name.as_str(), plan.output_name.as_str()),
            ("window", "forecast")
        );
        let shapes: Vec<_> = plan
            .layers
            .iter()
            .map(|l| (l.inputs, l.outputs, l.relu))
            .collect();
        assert_eq!(shapes, [(3200, 32, true), (32, 10, false)]);
        // window[:, 127:128, 0]: the target feature of the newest sample.
        assert_eq!(plan.residual, Some(127 * 25));
    }

    /// Rewrites one node of the shipped model and returns the parse error.
    fn refusal(edit: impl FnOnce(&mut proto::ModelProto)) -> String {
        let path = shipped("T-1");
        let mut model =
            proto::ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
        edit(&mut model);
        parse(&model.encode_to_vec(), Path::new("edited.onnx"))
            .unwrap_err()
            .to_string()
    }

    fn node<'a>(model: &'a mut proto::ModelProto, op: &str) -> &'a mut NodeProto {
        let graph = model.graph.as_mut().unwrap();
        graph.node.iter_mut().find(|n| n.op_type() == op).unwrap()
    }

    #[test]
    fn an_unknown_operator_is_refused_by_name_and_file() {
        let err = refusal(|m| node(m, "Relu").op_type = Some("Sigmoid".into()));
        assert!(
            err.starts_with("edited.onnx: cannot load model: operator Sigmoid"),
            "{err}"
        );
        assert!(
            err.contains("Relu"),
            "the message lists what is supported: {err}"
        );
    }

    #[test]
    fn a_supported_operator_used_outside_the_family_is_refused() {
        let err = refusal(|m| {
            let gather = node(m, "Gather");
            gather.attribute[0].i = Some(1); // Gather along the window instead of the features.
        });
        assert!(
            err.contains("(Add)") && err.contains("[batch, 25]"),
            "{err}"
        );
        let err = refusal(|m| node(m, "Flatten").attribute[0].i = Some(2));
        assert!(err.contains("only axis 1"), "{err}");
        let err = refusal(|m| {
            node(m, "Gemm").attribute.push(proto::AttributeProto {
                name: Some("transA".into()),
                i: Some(1),
                ..Default::default()
            })
        });
        assert!(err.contains("transA"), "{err}");
    }

    #[test]
    fn gemm_without_transposed_b_and_with_alpha_beta_is_folded() {
        let path = shipped("T-1");
        let mut model =
            proto::ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
        let reference = parse(&model.encode_to_vec(), &path).unwrap();
        // Store out.weight transposed ([hidden, horizon]), halve it and double
        // alpha; triple the bias and take a third with beta: same function.
        let graph = model.graph.as_mut().unwrap();
        let weight = graph
            .initializer
            .iter_mut()
            .find(|t| t.name() == "out.weight")
            .unwrap();
        let (horizon, hidden) = (weight.dims[0], weight.dims[1]);
        let w: Vec<f32> = le_values(weight.raw_data(), f32::from_le_bytes).unwrap();
        let mut t = vec![0.0f32; w.len()];
        for o in 0..horizon as usize {
            for i in 0..hidden as usize {
                t[i * horizon as usize + o] = w[o * hidden as usize + i] / 2.0;
            }
        }
        weight.dims = vec![hidden, horizon];
        weight.raw_data = Some(t.iter().flat_map(|v| v.to_le_bytes()).collect());
        let bias = graph
            .initializer
            .iter_mut()
            .find(|t| t.name() == "out.bias")
            .unwrap();
        let b: Vec<f32> = le_values(bias.raw_data(), f32::from_le_bytes).unwrap();
        bias.raw_data = Some(b.iter().flat_map(|v| (v * 3.0).to_le_bytes()).collect());
        let gemm = graph
            .node
            .iter_mut()
            .filter(|n| n.op_type() == "Gemm")
            .nth(1)
            .unwrap();
        for attr in &mut gemm.attribute {
            match attr.name() {
                "alpha" => attr.f = Some(2.0),
                "beta" => attr.f = Some(1.0 / 3.0),
                "transB" => attr.i = Some(0),
                _ => {}
            }
        }
        let folded = parse(&model.encode_to_vec(), &path).unwrap();
        let (a, b) = (&reference.layers[1], &folded.layers[1]);
        for (x, y) in a
            .weight
            .iter()
            .zip(&b.weight)
            .chain(a.bias.iter().zip(&b.bias))
        {
            assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0), "{x} vs {y}");
        }
    }

    #[test]
    fn a_file_that_is_not_onnx_is_refused() {
        let err = parse(b"\xff\xff\xff not protobuf", Path::new("junk.onnx")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("junk.onnx: cannot load model: not an ONNX model"),
            "{err}"
        );
    }
}
