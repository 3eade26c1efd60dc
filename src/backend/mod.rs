//! Inference backends: a synchronous [`Backend`] trait and a pool of threads
//! that runs batches on it, replying by channel.
//!
//! Backends are synchronous on purpose: an inference call is CPU- or
//! device-bound work that must not run on the async runtime's threads.

pub mod onnx;

use std::{
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::engine::ModelBatch;

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
}

/// Runs models on batches of windows.
pub trait Backend: Send + Sync {
    /// Runs model `model` (its index in the load order) on `rows` windows laid
    /// out `[rows, window, features]`; returns `[rows, horizon]`.
    fn infer(&self, model: usize, inputs: &[f32], rows: usize) -> Result<Vec<f32>, BackendError>;
}

/// A batch that has been through a backend.
#[derive(Debug)]
pub struct Completion {
    pub batch: ModelBatch,
    pub result: Result<Vec<f32>, BackendError>,
    /// Time from the oldest window's enqueue to dispatch.
    pub queue_time: Duration,
    /// Time inside the backend call.
    pub compute_time: Duration,
}

/// Threads that take batches, run them, and send completions back.
pub struct BackendPool {
    jobs: crossbeam_channel::Sender<(ModelBatch, Instant)>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl BackendPool {
    /// Starts `threads` workers on `backend`; completions go to `completions`.
    pub fn start(
        backend: Arc<dyn Backend>,
        threads: usize,
        completions: mpsc::UnboundedSender<Completion>,
    ) -> Self {
        let (jobs, queue) = crossbeam_channel::unbounded::<(ModelBatch, Instant)>();
        let threads = (0..threads.max(1))
            .map(|i| {
                let queue = queue.clone();
                let backend = backend.clone();
                let completions = completions.clone();
                thread::Builder::new()
                    .name(format!("satwatch-infer-{i}"))
                    .spawn(move || {
                        for (batch, dispatched) in queue {
                            let started = Instant::now();
                            let result =
                                backend.infer(batch.model, &batch.inputs, batch.entries.len());
                            let compute_time = started.elapsed();
                            let queue_time =
                                dispatched.saturating_duration_since(batch.oldest_enqueued);
                            if completions
                                .send(Completion {
                                    batch,
                                    result,
                                    queue_time,
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
