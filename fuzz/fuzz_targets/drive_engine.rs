//! Any bytes, as a life of the engine (src/engine.rs): samples of two channels
//! with any seq (the next, a small step, back, far ahead, 2^63-1) and any
//! finite value the decoder accepts (up to ±1e15, subnormals, zeros, long
//! constant runs), batches completed with any forecast a model could return
//! (NaN and infinities included), and restarts from the latest checkpoint.
//!
//! Invariants: no panic; every score and threshold is finite; every
//! forecast step is finite and within ±1e15; every checkpoint's state goes
//! to JSON and back unchanged and restores an engine that carries on.
#![no_main]

use std::{path::PathBuf, sync::Arc, time::Duration, time::Instant};

use libfuzzer_sys::fuzz_target;
use satwatch::{
    backend::{Backend, BackendError, Runner},
    config::ChannelConfig,
    detect::{
        baseline::BaselineSettings, burst::BurstSettings, events::EventSettings,
        excursion::ExcursionSettings, stuck::StuckSettings, surprise::SurpriseSettings,
        threshold::ThresholdSettings, DetectSettings,
    },
    engine::{Checkpoint, Engine, Outputs, Restore, SavedState},
    repository::{BatchPolicy, DeviceKind, ErrorCalibration, ModelSpec, Normalisation},
    telemetry::{Origin, Sample, Values, MAX_ABS_VALUE},
};

/// The engine's model runner: never called, since the fuzzer completes
/// batches itself, with any forecast.
struct NeverCalled;

impl Backend for NeverCalled {
    fn infer(&self, _: usize, _: &[f32], _: usize) -> Result<Vec<f32>, BackendError> {
        Err(BackendError::Library("the fuzzer completes batches itself".into()))
    }
}

const FEATURES: usize = 2;
const HORIZON: usize = 3;

/// Reads the input front to back; zeros once it runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        *first
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(std::array::from_fn(|_| self.u8()))
    }
    fn f32(&mut self) -> f32 {
        f32::from_bits(u32::from_le_bytes(std::array::from_fn(|_| self.u8())))
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn spec(scale: f32) -> Arc<ModelSpec> {
    Arc::new(ModelSpec {
        name: "m".into(),
        version: 1,
        config_path: PathBuf::from("m/config.pbtxt"),
        model_path: PathBuf::from("m/1/model.onnx"),
        device: DeviceKind::Cpu,
        instance_count: 1,
        batching: BatchPolicy {
            max_batch_size: 8,
            preferred_batch_sizes: vec![4],
            max_queue_delay: Duration::ZERO,
        },
        input_name: "window".into(),
        output_name: "forecast".into(),
        window: 4,
        features: FEATURES,
        horizon: HORIZON,
        target_feature: 0,
        normalisation: Normalisation {
            center: vec![0.5, -3.0],
            scale: vec![scale, 1.0],
        },
        calibration: ErrorCalibration {
            mean: 0.01,
            std: 0.02,
            train_drift: 0.0,
        },
        input_dims_line: None,
        parameters: Default::default(),
    })
}

fn channels() -> Vec<ChannelConfig> {
    ["X-1", "X-2"]
        .iter()
        .map(|id| ChannelConfig {
            id: (*id).into(),
            subsystem: "xs".into(),
            topic: "telemetry.xs".into(),
            model: "m".into(),
        })
        .collect()
}

/// Every score part on, with small sizes so that a short input reaches
/// every phase of a channel's life (baseline, calibration, events).
fn settings() -> DetectSettings {
    let shipped = DetectSettings::default();
    DetectSettings {
        ewma_alpha: 0.5,
        events: EventSettings {
            min_gap: 3,
            max_samples: 20,
        },
        baseline: BaselineSettings {
            samples: 8,
            ..shipped.baseline
        },
        excursion: ExcursionSettings {
            samples: 3,
            ..shipped.excursion
        },
        threshold: ThresholdSettings {
            calibration_samples: 6,
            min_peaks: 3,
            ..shipped.threshold
        },
        stuck: StuckSettings {
            factor: 2.0,
            ..shipped.stuck
        },
        surprise: SurpriseSettings {
            min_error_std: 0.01,
            ..shipped.surprise
        },
        burst: BurstSettings {
            window: 8,
            ..shipped.burst
        },
        ..shipped
    }
}

/// A value the decoder accepts: finite and within ±1e15.
fn accepted(x: f32) -> f32 {
    if x.is_finite() {
        x.clamp(-MAX_ABS_VALUE, MAX_ABS_VALUE)
    } else {
        0.0
    }
}

fn check(out: &Outputs, latest: &mut Option<Checkpoint>) {
    for s in &out.scores {
        assert!(
            s.score.is_finite() && s.threshold.is_finite(),
            "a score row is finite: {s:?}"
        );
    }
    for f in &out.forecasts {
        assert!(
            f.horizon
                .iter()
                .all(|x| x.is_finite() && x.abs() <= MAX_ABS_VALUE),
            "a published forecast is finite and in range: {f:?}"
        );
    }
    for c in &out.checkpoints {
        let json = serde_json::to_string(&c.state).expect("a checkpoint's state serialises");
        let back: SavedState = serde_json::from_str(&json).expect("and reads back");
        assert_eq!(back, c.state, "a checkpoint's state survives JSON: {json}");
        *latest = Some(c.clone());
    }
}

fn complete_one(engine: &mut Engine, bytes: &mut Bytes, latest: &mut Option<Checkpoint>) {
    if let Some(batch) = engine.flush_batch() {
        let n = batch.entries.len() * HORIZON;
        let forecasts: Vec<f32> = (0..n).map(|_| bytes.f32()).collect();
        let mut out = Outputs::default();
        engine.complete(batch, &forecasts, &mut out);
        check(&out, latest);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = Bytes(data);
    let scale = [1e-6, 1.0, 3e3, 1e6][(bytes.u8() % 4) as usize];
    let spec = spec(scale);
    let new_engine = || Engine::new(
            &channels(),
            &[spec.clone()],
            Runner::all_on(Arc::new(NeverCalled), 1),
            settings(),
        ).expect("valid");
    let mut engine = new_engine();
    let mut last = [0u64; 2];
    let mut offset = 0i64;
    let mut latest: Option<Checkpoint> = None;
    let now = Instant::now();
    let mut steps = 0;
    while !bytes.is_empty() && steps < 4096 {
        steps += 1;
        let op = bytes.u8();
        match op % 8 {
            0..=4 => {
                let channel = (op >> 3) as usize % 2;
                let seq = match bytes.u8() % 6 {
                    0 | 1 => last[channel].saturating_add(1),
                    2 => last[channel].saturating_add(bytes.u8() as u64),
                    3 => last[channel].saturating_sub(bytes.u8() as u64),
                    4 => bytes.u64() & i64::MAX as u64,
                    _ => i64::MAX as u64,
                };
                last[channel] = seq;
                let values: Values = match bytes.u8() % 4 {
                    // A long constant run, or zeros.
                    0 => Values::from_slice(&[1.0, 0.0]),
                    1 => Values::from_slice(&[0.0; FEATURES]),
                    _ => (0..FEATURES).map(|_| accepted(bytes.f32())).collect(),
                };
                let sample = Sample {
                    channel: channel as u32,
                    seq,
                    ts: chrono::DateTime::UNIX_EPOCH,
                    values,
                    origin: Some(Origin {
                        partition: 0,
                        generation: 0,
                        offset,
                    }),
                    received: None,
                    payload: None,
                };
                offset += 1;
                engine.admit(&sample, now);
            }
            5 | 6 => complete_one(&mut engine, &mut bytes, &mut latest),
            _ => {
                // A restart: a new engine resumes from the latest checkpoint
                // (what is in flight is dropped, as a crash drops it).
                engine = new_engine();
                engine.restore(Restore {
                    partition: 0,
                    committed: Some(offset),
                    checkpoints: latest.clone().into_iter().collect(),
                });
            }
        }
    }
    // Drain: every window queued is completed.
    while !engine.is_idle() {
        complete_one(&mut engine, &mut bytes, &mut latest);
    }
});
