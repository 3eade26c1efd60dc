//! The shipped model family on an NVIDIA GPU with only the CUDA driver, cuBLAS
//! and NVRTC (no ONNX Runtime GPU build, no TensorRT), through `cudarc` with
//! every library loaded at run time.
//!
//! - Each model's ONNX file is planned by [`graph`](super::graph), the same
//!   planner the native backend uses; its weights are uploaded once.
//! - Each model has `instance_group.count` instances; an instance owns one
//!   CUDA stream, one cuBLAS handle bound to it, pinned host staging buffers
//!   and device activations, so batches of different models (and of different
//!   instances of one model) overlap on the device.
//! - A batch is copied into pinned host memory, sent to the device
//!   asynchronously, and then runs as one cuBLAS sgemm per dense layer, each
//!   followed by one small NVRTC-compiled kernel applying the bias, ReLU and,
//!   after the last layer, the residual input column. The result comes back
//!   through pinned memory; the call waits on its own stream only.
//!
//! Where there is no driver, no cuBLAS, no NVRTC or no device, [`probe`] says
//! which; nothing here panics for want of a GPU (cudarc would, were the driver
//! called without one).

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc, Mutex, TryLockError,
};

use cudarc::{
    cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig},
    driver::{
        result as driver, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr,
        DevicePtrMut, DriverError, LaunchConfig, PinnedHostSlice, PushKernelArg,
    },
};

use super::{graph::MlpPlan, native::plan_models, Backend, BackendError};
use crate::repository::ModelSpec;

/// Bias, optional ReLU and optional residual over `y` (`[rows, cols]`), in place.
const EPILOGUE: &str = r#"
extern "C" __global__ void epilogue(float *y, const float *bias, const float *x,
                                    int rows, int cols, int relu,
                                    int x_stride, int residual) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)rows * cols) return;
    long r = i / cols;
    int c = (int)(i - r * cols);
    float v = y[i] + bias[c];
    if (relu) v = fmaxf(v, 0.0f);
    if (residual >= 0) v += x[r * x_stride + residual];
    y[i] = v;
}
"#;

const EPILOGUE_THREADS: u32 = 256;

/// Why no GPU can be used, or the context of the one that can.
pub fn probe(device: usize) -> Result<Arc<CudaContext>, String> {
    // SAFETY: these only try to dlopen the libraries' usual names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no CUDA driver/GPU present (libcuda.so could not be loaded)".into());
    }
    // cudarc is built against CUDA 12.8 and asks the loader for the CUDA 12
    // names; CUDA 13 installs only have `.so.13` ones.
    let missing = |what: &str, lib: &str| {
        format!(
            "the CUDA driver is present but {what} could not be loaded (looked for {lib}.so and \
             {lib}.so.12 on the loader's path; with CUDA 13, link {lib}.so to {lib}.so.13 in a \
             directory on LD_LIBRARY_PATH, as scripts/gpu_check.sh does)"
        )
    };
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(missing("cuBLAS", "libcublas"));
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(missing("NVRTC", "libnvrtc"));
    }
    let count = CudaContext::device_count()
        .map_err(|err| format!("the CUDA driver did not initialise ({err}): no usable GPU"))?;
    if count <= 0 {
        return Err("no GPU: the CUDA driver sees no device".into());
    }
    if device >= count as usize {
        return Err(format!(
            "CUDA device {device} does not exist ({count} device(s) present; [engine] gpu_device picks one)"
        ));
    }
    CudaContext::new(device).map_err(|err| format!("cannot open CUDA device {device}: {err}"))
}

/// One dense layer's weights on the device.
struct DeviceLayer {
    inputs: usize,
    outputs: usize,
    relu: bool,
    weight: CudaSlice<f32>,
    bias: CudaSlice<f32>,
}

/// What one instance owns: its stream and everything only that stream touches.
struct Instance {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    /// Rows the buffers below hold; grown when a larger batch comes.
    capacity: usize,
    /// Write-combined pinned memory: the CPU only writes it, the copy engine reads it.
    host_in: PinnedHostSlice<f32>,
    /// Plain pinned memory: the CPU reads it back after the copy.
    host_out: PinnedHostSlice<f32>,
    device_in: CudaSlice<f32>,
    /// Activations ping-pong between these, layer by layer.
    scratch: [CudaSlice<f32>; 2],
}

struct DeviceModel {
    name: String,
    inputs_per_row: usize,
    outputs_per_row: usize,
    widest: usize,
    residual: Option<usize>,
    layers: Vec<DeviceLayer>,
    instances: Vec<Mutex<Instance>>,
    /// Where the next call starts looking for a free instance.
    next: AtomicUsize,
}

/// Every model on one GPU.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    epilogue: CudaFunction,
    models: Vec<DeviceModel>,
    device_name: String,
}

fn driver_error(what: &str) -> impl Fn(DriverError) -> BackendError + '_ {
    move |err| BackendError::Library(format!("CUDA: {what}: {err}"))
}

impl CudaBackend {
    /// Plans every model, uploads its weights to GPU `device` and creates its
    /// instances. [`BackendError::NoGpu`] when there is no usable GPU.
    pub fn load(specs: &[Arc<ModelSpec>], device: usize) -> Result<Self, BackendError> {
        // Plan first: a model outside the family is refused the same way
        // with or without a GPU.
        let plans = plan_models(specs)?;
        let ctx = probe(device).map_err(BackendError::NoGpu)?;
        // SAFETY: set before any slice exists. Each instance's buffers are
        // only used on its own stream, and the weights are read-only after an
        // upload that is synchronised below, so no cross-stream tracking is
        // needed.
        unsafe { ctx.disable_event_tracking() };
        let device_name = ctx
            .name()
            .unwrap_or_else(|_| format!("CUDA device {device}"));
        let ptx = cudarc::nvrtc::compile_ptx(EPILOGUE).map_err(|err| {
            BackendError::Library(format!(
                "NVRTC could not compile the epilogue kernel: {err}"
            ))
        })?;
        let module = ctx
            .load_module(ptx)
            .map_err(driver_error("loading the epilogue kernel"))?;
        let epilogue = module
            .load_function("epilogue")
            .map_err(driver_error("loading the epilogue kernel"))?;
        let upload = ctx.default_stream();
        let mut models = Vec::with_capacity(specs.len());
        for (spec, plan) in specs.iter().zip(&plans) {
            models.push(upload_model(&ctx, &upload, spec, plan)?);
        }
        upload
            .synchronize()
            .map_err(driver_error("uploading weights"))?;
        Ok(Self {
            ctx,
            epilogue,
            models,
            device_name,
        })
    }

    /// The GPU's name, as the driver reports it.
    pub fn device_name(&self) -> &str {
        &self.device_name
    }
}

fn upload_model(
    ctx: &Arc<CudaContext>,
    upload: &Arc<CudaStream>,
    spec: &ModelSpec,
    plan: &MlpPlan,
) -> Result<DeviceModel, BackendError> {
    let fail = driver_error("uploading weights");
    let layers = plan
        .layers
        .iter()
        .map(|layer| {
            Ok(DeviceLayer {
                inputs: layer.inputs,
                outputs: layer.outputs,
                relu: layer.relu,
                weight: upload.clone_htod(&layer.weight).map_err(&fail)?,
                bias: upload.clone_htod(&layer.bias).map_err(&fail)?,
            })
        })
        .collect::<Result<Vec<_>, BackendError>>()?;
    let mut model = DeviceModel {
        name: spec.name.clone(),
        inputs_per_row: plan.inputs_per_row(),
        outputs_per_row: plan.outputs_per_row(),
        widest: plan.widest(),
        residual: plan.residual,
        layers,
        instances: Vec::new(),
        next: AtomicUsize::new(0),
    };
    for _ in 0..spec.instance_count.max(1) {
        let instance = new_instance(ctx, &model, spec.batching.max_batch_size.max(1))?;
        model.instances.push(Mutex::new(instance));
    }
    Ok(model)
}

fn new_instance(
    ctx: &Arc<CudaContext>,
    model: &DeviceModel,
    rows: usize,
) -> Result<Instance, BackendError> {
    let stream = ctx
        .new_stream()
        .map_err(driver_error("creating a stream"))?;
    let blas = CudaBlas::new(stream.clone())
        .map_err(|err| BackendError::Library(format!("cuBLAS: cannot create a handle: {err}")))?;
    let (host_in, host_out, device_in, scratch) = buffers(ctx, &stream, model, rows)?;
    Ok(Instance {
        stream,
        blas,
        capacity: rows,
        host_in,
        host_out,
        device_in,
        scratch,
    })
}

type Buffers = (
    PinnedHostSlice<f32>,
    PinnedHostSlice<f32>,
    CudaSlice<f32>,
    [CudaSlice<f32>; 2],
);

fn buffers(
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    model: &DeviceModel,
    rows: usize,
) -> Result<Buffers, BackendError> {
    let fail = driver_error("allocating batch buffers");
    // SAFETY: the contents are unset; every call writes the part it reads
    // (inputs before they are copied, outputs by the copy back).
    unsafe {
        let host_in = ctx
            .alloc_pinned::<f32>(rows * model.inputs_per_row)
            .map_err(&fail)?;
        let host_out = ctx
            .alloc_pinned_with_flags::<f32>(rows * model.outputs_per_row, 0)
            .map_err(&fail)?;
        let device_in = stream
            .alloc::<f32>(rows * model.inputs_per_row)
            .map_err(&fail)?;
        let scratch = [
            stream.alloc::<f32>(rows * model.widest).map_err(&fail)?,
            stream.alloc::<f32>(rows * model.widest).map_err(&fail)?,
        ];
        Ok((host_in, host_out, device_in, scratch))
    }
}

impl CudaBackend {
    fn run(
        &self,
        model: &DeviceModel,
        instance: &mut Instance,
        inputs: &[f32],
        rows: usize,
    ) -> Result<Vec<f32>, String> {
        self.ctx.bind_to_thread().map_err(|e| e.to_string())?;
        if rows > instance.capacity {
            let grown = rows.next_power_of_two();
            instance.stream.synchronize().map_err(|e| e.to_string())?;
            let (host_in, host_out, device_in, scratch) =
                buffers(&self.ctx, &instance.stream, model, grown).map_err(|e| e.to_string())?;
            instance.host_in = host_in;
            instance.host_out = host_out;
            instance.device_in = device_in;
            instance.scratch = scratch;
            instance.capacity = grown;
        }
        let (n_in, n_out) = (rows * model.inputs_per_row, rows * model.outputs_per_row);
        let stream = instance.stream.clone();
        let host_in = instance.host_in.as_mut_slice().map_err(|e| e.to_string())?;
        host_in[..n_in].copy_from_slice(inputs);
        {
            let (dst, _) = instance.device_in.device_ptr_mut(&stream);
            // SAFETY: host_in is pinned and outlives the copy (the call
            // synchronises the stream before returning); dst holds capacity
            // >= rows input rows.
            unsafe { driver::memcpy_htod_async(dst, &host_in[..n_in], stream.cu_stream()) }
                .map_err(|e| format!("copy to the device: {e}"))?;
        }
        let x_stride = model.inputs_per_row as i32;
        let rows_i32 = i32::try_from(rows).map_err(|_| format!("{rows} rows is too many"))?;
        let last = model.layers.len() - 1;
        for (i, layer) in model.layers.iter().enumerate() {
            let [even, odd] = &mut instance.scratch;
            let (source, target) = if i % 2 == 0 {
                (&*odd, even)
            } else {
                (&*even, odd)
            };
            let x = if i == 0 {
                instance.device_in.slice(..n_in)
            } else {
                source.slice(..rows * layer.inputs)
            };
            let mut y = target.slice_mut(..rows * layer.outputs);
            let gemm = GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_T,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: layer.outputs as i32,
                n: rows_i32,
                k: layer.inputs as i32,
                alpha: 1.0f32,
                lda: layer.inputs as i32,
                ldb: layer.inputs as i32,
                beta: 0.0f32,
                ldc: layer.outputs as i32,
            };
            // SAFETY: weight is [outputs, inputs] row-major = column-major
            // [inputs, outputs] (lda = inputs), used transposed; x is [rows,
            // inputs] row-major = column-major [inputs, rows] (ldb = inputs);
            // y is column-major [outputs, rows] = row-major [rows, outputs]
            // (ldc = outputs). Every view holds exactly those elements.
            unsafe { instance.blas.gemm(gemm, &layer.weight, &x, &mut y) }
                .map_err(|e| format!("cuBLAS sgemm: {e}"))?;
            let cols = layer.outputs as i32;
            let relu = i32::from(layer.relu);
            let residual = match model.residual {
                Some(offset) if i == last => offset as i32,
                _ => -1,
            };
            let input = instance.device_in.slice(..n_in);
            let elements = (rows * layer.outputs) as u32;
            let config = LaunchConfig {
                grid_dim: (elements.div_ceil(EPILOGUE_THREADS), 1, 1),
                block_dim: (EPILOGUE_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut launch = stream.launch_builder(&self.epilogue);
            launch
                .arg(&mut y)
                .arg(&layer.bias)
                .arg(&input)
                .arg(&rows_i32)
                .arg(&cols)
                .arg(&relu)
                .arg(&x_stride)
                .arg(&residual);
            // SAFETY: the kernel reads bias[cols] and x[rows * x_stride] and
            // writes y[rows * cols], all within the views passed.
            unsafe { launch.launch(config) }.map_err(|e| format!("epilogue kernel: {e}"))?;
        }
        let result = &instance.scratch[last % 2];
        let host_out = instance
            .host_out
            .as_mut_slice()
            .map_err(|e| e.to_string())?;
        {
            let (src, _) = result.device_ptr(&stream);
            // SAFETY: host_out is pinned, holds capacity >= rows output rows,
            // and is read only after the synchronize below.
            unsafe { driver::memcpy_dtoh_async(&mut host_out[..n_out], src, stream.cu_stream()) }
                .map_err(|e| format!("copy from the device: {e}"))?;
        }
        stream.synchronize().map_err(|e| format!("stream: {e}"))?;
        Ok(host_out[..n_out].to_vec())
    }
}

impl Backend for CudaBackend {
    fn infer(&self, model: usize, inputs: &[f32], rows: usize) -> Result<Vec<f32>, BackendError> {
        let m = &self.models[model];
        let fail = |reason: String| BackendError::Inference {
            model: m.name.clone(),
            reason,
        };
        if inputs.len() != rows * m.inputs_per_row {
            return Err(fail(format!(
                "{} input values for {rows} rows of {}",
                inputs.len(),
                m.inputs_per_row
            )));
        }
        if rows == 0 {
            return Ok(Vec::new());
        }
        // A free instance if there is one, else wait for the next in turn.
        let start = m.next.fetch_add(1, Ordering::Relaxed);
        let count = m.instances.len();
        let mut chosen = None;
        for k in 0..count {
            match m.instances[(start + k) % count].try_lock() {
                Ok(guard) => {
                    chosen = Some(guard);
                    break;
                }
                Err(TryLockError::WouldBlock) => continue,
                Err(TryLockError::Poisoned(_)) => {
                    return Err(fail("a previous call panicked".into()))
                }
            }
        }
        let mut instance = match chosen {
            Some(guard) => guard,
            None => m.instances[start % count]
                .lock()
                .map_err(|_| fail("a previous call panicked".into()))?,
        };
        self.run(m, &mut instance, inputs, rows).map_err(fail)
    }
}
