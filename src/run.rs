//! `satwatch run`: wires the Kafka consumer -> processor -> sink around the engine, serves
//! HTTP, and shuts down cleanly on SIGINT/SIGTERM (stop consuming, drain,
//! commit, exit 0).

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Instant,
};

use tokio::sync::{mpsc, watch};

use crate::{
    backend,
    config::{ControlMode, Pipeline},
    engine::Counters,
    health::Health,
    http,
    kafka::{
        consumer::{self, SourceParts},
        DeadLetters, Publisher,
    },
    metrics::Metrics,
    postgres::{self, PgWriter},
    processor,
    repository::{
        self,
        control::{RepositoryControl, Served},
        ModelSpec,
    },
    sink::{self, SinkParts},
    telemetry::{ChannelShape, Decoder},
};
use crate::{backend::BackendError, engine::EngineError, file_error::FileError, postgres::PgError};

/// Why `run` could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A model directory or its `config.pbtxt` was refused.
    #[error(transparent)]
    Model(#[from] FileError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The `[postgres]` settings were refused.
    #[error(transparent)]
    PostgresSettings(#[from] PgError),
    #[error("{context}: {source}")]
    Postgres {
        context: &'static str,
        source: PgError,
    },
    /// A Kafka client or step failed; values of secret settings masked.
    #[error("{context}: {message}")]
    Kafka { context: String, message: String },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    /// A part of the pipeline ended abnormally (a panic, or its error).
    #[error("{part}: {message}")]
    Part { part: &'static str, message: String },
}

impl RunError {
    /// The error's kind, for metric labels and log fields.
    pub fn error_type(&self) -> &'static str {
        match self {
            RunError::Model(_) => "model",
            RunError::Backend(_) => "backend",
            RunError::Engine(_) => "engine",
            RunError::PostgresSettings(_) | RunError::Postgres { .. } => "postgres",
            RunError::Kafka { .. } => "kafka",
            RunError::Listen { .. } => "http",
            RunError::Part { .. } => "part_failed",
        }
    }
}

/// A part of the pipeline that ended abnormally, named.
fn part_failed(part: &'static str) -> impl Fn(&dyn std::fmt::Display) -> RunError {
    move |err| RunError::Part {
        part,
        message: err.to_string(),
    }
}

/// A Kafka client's error with the values of secret-looking settings masked
/// (librdkafka quotes a misspelt property's value).
fn kafka_fail(
    context: &str,
    err: &dyn std::fmt::Display,
    kafka: &crate::config::KafkaSettings,
) -> RunError {
    RunError::Kafka {
        context: context.to_owned(),
        message: crate::secrets::mask_client_error(err, &kafka.client),
    }
}

/// Samples buffered between the source and the processor.
const SAMPLE_CHANNEL_CAPACITY: usize = 4096;
/// Output batches buffered between the processor and the sink.
const OUTPUT_CHANNEL_CAPACITY: usize = 64;
/// Refused records (duplicate seqs) on their way from the processor to the
/// dead-letter task, beyond which the processor waits.
const REFUSED_CHANNEL_CAPACITY: usize = 1024;

/// Loads and checks every model the pipeline names.
pub fn load_models(pipeline: &Pipeline) -> Result<Vec<Arc<ModelSpec>>, FileError> {
    let specs = repository::load_models(&pipeline.repository, &pipeline.models())?;
    Ok(specs.into_iter().map(Arc::new).collect())
}

/// The decoder for the pipeline's channels (index = position in the channel list).
pub fn decoder(pipeline: &Pipeline, specs: &[Arc<ModelSpec>]) -> Decoder {
    let channels: HashMap<String, ChannelShape> = pipeline
        .channels
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let features = repository::model_features(specs, &c.model);
            (
                c.id.clone(),
                ChannelShape {
                    index: i as u32,
                    topic: c.topic.clone(),
                    features,
                },
            )
        })
        .collect();
    Decoder::new(channels, pipeline.file.kafka.max_record_bytes)
}

pub async fn run(pipeline: Pipeline) -> Result<Counters, RunError> {
    let started = Instant::now();
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    health.set_max_stall(pipeline.file.health.max_stall());
    let file_limit = raise_file_limit();
    let specs = load_models(&pipeline)?;
    let selection = backend::select(&specs, &pipeline.file.engine)?;
    health.set_models_loaded(true);
    for (spec, placement) in specs.iter().zip(&selection.placements) {
        tracing::info!(model = %spec.name, version = spec.version, device = ?spec.device, backend = %placement.backend, "model loaded");
    }

    // The producers first: their settings (e.g. SASL) are checked before
    // anything else is reached.
    let kafka = &pipeline.file.kafka;
    let transactional_id = transactional_id(&pipeline);
    let publisher = Publisher::new(kafka, &transactional_id)
        .map_err(|e| kafka_fail("cannot create the Kafka producer", &e, kafka))?;
    let dead_letters = DeadLetters::new(kafka)
        .map_err(|e| kafka_fail("cannot create the dead-letter producer", &e, kafka))?;

    let pg = postgres::PgConnector::new(&pipeline.file.postgres)?;
    tracing::info!(
        sslmode = pg.ssl_mode(),
        certificate_checked_against = pg.trust(),
        "PostgreSQL settings"
    );
    let mut client = pg.connect().await.map_err(|source| RunError::Postgres {
        context: "cannot connect to PostgreSQL",
        source,
    })?;
    let schema = postgres::migrate(&mut client)
        .await
        .map_err(|source| RunError::Postgres {
            context: "cannot migrate the schema",
            source,
        })?;
    drop(client);
    tracing::info!(schema_version = schema, "PostgreSQL schema ready");

    // Registered before anything is consumed: fences a crashed predecessor
    // with the same transactional.id and aborts what it left open.
    {
        let publisher = publisher.clone();
        tokio::task::spawn_blocking(move || publisher.register())
            .await
            .map_err(|e| part_failed("Kafka producer task")(&e))?
            .map_err(|e| RunError::Kafka {
                context: format!(
                    "cannot register the Kafka producer (delivery {:?}, transactional.id {transactional_id})",
                    kafka.delivery
                ),
                message: format!(
                    "{e} (a broker without transactions needs [kafka] delivery = \"at-least-once\")"
                ),
            })?;
    }
    tracing::info!(delivery = ?kafka.delivery, %transactional_id, "Kafka producer ready");

    let topics = pipeline.telemetry_topics();
    let subscription = consumer::subscribe(kafka, &topics, &pg, health.clone(), metrics.clone())
        .map_err(|e| kafka_fail("cannot create the Kafka consumer", &e, kafka))?;
    let tracker = subscription.tracker.clone();
    let consumer = subscription.consumer.clone();

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shutdown_tx = Arc::new(shutdown_tx);
    consumer::spawn_lag_watch(
        consumer.clone(),
        tracker.clone(),
        metrics.clone(),
        health.clone(),
        shutdown_rx.clone(),
    );
    // Model control: versions loaded while running reach the processor
    // through `updates`; the HTTP metadata follows what is served.
    let served: Served = Arc::new(RwLock::new(specs.clone()));
    let (updates_tx, updates_rx) = mpsc::channel(4);
    let repository = &pipeline.file.repository;
    let control = Arc::new(RepositoryControl::new(
        pipeline.repository.clone(),
        pipeline.file.engine.clone(),
        served.clone(),
        updates_tx,
    ));
    if repository.mode == ControlMode::Poll {
        tokio::spawn(
            control
                .clone()
                .poll(repository.poll_interval(), shutdown_rx.clone()),
        );
    }
    tracing::info!(
        mode = ?repository.mode,
        load_unload = if repository.control_token.is_some() { "enabled (token set)" } else { "disabled (no token)" },
        "model repository control"
    );
    let state = http::AppState {
        metrics: metrics.clone(),
        health: health.clone(),
        models: served,
        control: (repository.mode != ControlMode::None).then_some(control),
        mode: repository.mode,
        token: repository.control_token.as_deref().map(Arc::from),
    };
    let limits = http::Limits::new(&pipeline.file.http, file_limit);
    tracing::info!(
        max_connections = limits.max_connections,
        header_read_timeout_ms = limits.header_read_timeout.as_millis() as u64,
        max_request_body_bytes = limits.max_request_body_bytes,
        open_files_limit = file_limit,
        "HTTP limits"
    );
    if limits.max_connections < pipeline.file.http.max_connections {
        tracing::warn!(
            configured = pipeline.file.http.max_connections,
            used = limits.max_connections,
            "[http] max_connections lowered to half the open files limit"
        );
    }
    let (http_addr, http_task) =
        http::serve(&pipeline.file.http.addr, limits, state, shutdown_rx.clone())
            .await
            .map_err(|source| RunError::Listen {
                addr: pipeline.file.http.addr.clone(),
                source,
            })?;

    let (samples_tx, samples_rx) = mpsc::channel(SAMPLE_CHANNEL_CAPACITY);
    let (outputs_tx, outputs_rx) = mpsc::channel(OUTPUT_CHANNEL_CAPACITY);
    let (refused_tx, refused_rx) = mpsc::channel(REFUSED_CHANNEL_CAPACITY);
    // The dead-letter task holds the sink's input open until it is done.
    let sink_input = outputs_tx.clone();
    let processor = processor::spawn(
        &pipeline,
        &specs,
        selection.runners,
        samples_rx,
        outputs_tx,
        metrics.clone(),
        Some(processor::Live {
            updates: updates_rx,
            health: health.clone(),
            refused: refused_tx,
        }),
    )?;
    let sink = tokio::spawn(sink::write_loop(
        outputs_rx,
        SinkParts {
            pg: PgWriter::new(pg.clone()),
            checkpoint_pg: PgWriter::new(pg.clone()),
            publisher,
            consumer,
            settings: pipeline.file.sink.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            partitions: tracker,
            shutdown: shutdown_rx.clone(),
        },
    ));
    let source = tokio::spawn(consumer::consume(
        subscription,
        SourceParts {
            decoder: decoder(&pipeline, &specs),
            dead_letters,
            samples: samples_tx,
            refused: refused_rx,
            sink: sink_input,
            shutdown: shutdown_rx,
            metrics: metrics.clone(),
            max_uncommitted_per_partition: kafka.max_uncommitted_per_partition,
        },
    ));
    tracing::info!(
        channels = pipeline.channels.len(),
        topics = %topics.join(","),
        http = %http_addr,
        startup_ms = started.elapsed().as_millis() as u64,
        "satwatch running"
    );

    spawn_postgres_probe(pg, health.clone(), shutdown_tx.subscribe());
    spawn_stall_watch(health.clone(), metrics.clone(), shutdown_tx.subscribe());
    let signal_health = health.clone();
    let signal_shutdown = shutdown_tx.clone();
    let shutdown_timeout = pipeline.file.engine.shutdown_timeout();
    // What the drain waits for, so that a drain cut short by the timeout
    // says which part did not finish.
    let (draining_tx, draining) = watch::channel("the processor (scoring what was taken in)");
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!(
            timeout_ms = shutdown_timeout.as_millis() as u64,
            "shutdown requested: draining"
        );
        signal_health.set_shutting_down();
        signal_shutdown.send_replace(true);
        // Draining waits on PostgreSQL and the broker; bound it. What is not
        // durable by then is not committed either, and is reprocessed after
        // the restart (the sinks are idempotent).
        tokio::time::sleep(shutdown_timeout).await;
        tracing::error!(
            waiting_for = *draining.borrow(),
            "shutdown did not finish within the timeout; exiting without the final commit"
        );
        std::process::exit(2);
    });

    // A model's failed calls are held and retried inside the processor; it
    // only stops early when the sink is gone, or when it panicked. Either
    // way stop consuming too, and let the sink commit what is done.
    let processed = processor.await;
    health.set_shutting_down();
    shutdown_tx.send_replace(true);
    draining_tx.send_replace("the Kafka consumer (its last dead letters)");
    source.await.map_err(|e| part_failed("source task")(&e))?;
    draining_tx.send_replace("the sink (the last writes and the final commit)");
    sink.await
        .map_err(|e| part_failed("sink task")(&e))?
        .map_err(|e| part_failed("sink")(&e))?;
    http_task.abort();
    let engine = processed
        .map_err(|e| part_failed("the processor task failed")(&e))?
        .map_err(|e| part_failed("processor")(&e))?;
    let counters = engine.counters();
    tracing::info!(
        admitted = counters.admitted,
        scored = counters.scored,
        duplicates = counters.duplicates,
        events_opened = counters.events_opened,
        events_closed = counters.events_closed,
        "satwatch stopped"
    );
    Ok(counters)
}

/// `[kafka] transactional_id`, else `<group_id>-<host name>-<HTTP port>`:
/// stable across restarts of one instance, and different for instances on
/// one host (they cannot share an HTTP port).
fn transactional_id(pipeline: &Pipeline) -> String {
    let kafka = &pipeline.file.kafka;
    if let Some(id) = &kafka.transactional_id {
        return id.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    let port = pipeline
        .file
        .http
        .addr
        .rsplit(':')
        .next()
        .unwrap_or_default();
    format!("{}-{host}-{port}", kafka.group_id)
}

/// How often readiness checks PostgreSQL, and how long an answer may take.
const POSTGRES_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
const POSTGRES_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

fn spawn_postgres_probe(
    pg: postgres::PgConnector,
    health: Arc<Health>,
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut probe = postgres::Probe::new(pg);
        let mut tick = tokio::time::interval(POSTGRES_PROBE_INTERVAL);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {
                    let verdict = match tokio::time::timeout(POSTGRES_PROBE_TIMEOUT, probe.check()).await {
                        Ok(Ok(())) => None,
                        Ok(Err(err)) => Some(err.to_string()),
                        Err(_) => Some(format!("no answer within {POSTGRES_PROBE_TIMEOUT:?}")),
                    };
                    health.set_postgres(verdict);
                }
            }
        }
    });
}

/// Raises the soft limit on open files to the hard limit, so that the HTTP
/// connection limit (half of it at most) leaves room for everything else;
/// returns the limit in force, if it can be read.
fn raise_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        } else {
            tracing::warn!(
                soft = limit.rlim_cur,
                hard = limit.rlim_max,
                "cannot raise the open files limit to the hard limit"
            );
        }
    }
    (limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// How often stalls are looked for.
const STALL_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Publishes each stage's waiting time and stall, and logs a stall when it
/// starts and when it ends (readiness reads the same state on each probe).
fn spawn_stall_watch(
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    use crate::health::Stage;
    tokio::spawn(async move {
        let mut stalled = [false; Stage::ALL.len()];
        let mut tick = tokio::time::interval(STALL_CHECK_INTERVAL);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {}
            }
            let (waiting, stalls) = health.stages(Instant::now());
            for (i, stage) in Stage::ALL.into_iter().enumerate() {
                let stall = stalls.iter().find(|s| s.stage == stage);
                metrics
                    .stage_waiting_seconds
                    .with_label_values(&[stage.name()])
                    .set(waiting[i].as_secs_f64());
                metrics
                    .stage_stalled
                    .with_label_values(&[stage.name()])
                    .set(stall.is_some() as i64);
                match (stall, stalled[i]) {
                    (Some(stall), false) => {
                        tracing::error!(
                            stage = stage.name(),
                            waited_s = stall.waited.as_secs(),
                            "{stall}"
                        )
                    }
                    (None, true) => tracing::info!(
                        stage = stage.name(),
                        "{} stage no longer stalled",
                        stage.name()
                    ),
                    _ => {}
                }
                stalled[i] = stall.is_some();
            }
        }
    });
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM can be handled");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
