//! Prometheus metrics, named after Triton's (`nv_inference_*` becomes
//! `satwatch_inference_*`). Label sets stay bounded: per model and version,
//! per subsystem, per reason, per partition; never per sample.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    /// Windows inferred successfully / unsuccessfully (Triton: requests).
    pub inference_success: IntCounterVec,
    pub inference_failure: IntCounterVec,
    /// Windows inferred (Triton: inference count) and backend calls (execution
    /// count): their ratio is the average batch size.
    pub inference_count: IntCounterVec,
    pub execution_count: IntCounterVec,
    pub queue_duration_us: IntCounterVec,
    pub input_duration_us: IntCounterVec,
    pub compute_duration_us: IntCounterVec,
    pub batch_size: HistogramVec,
    /// From the sample's `ts` to its outputs being durable.
    pub end_to_end_latency: Histogram,
    /// From the record being taken from Kafka to its score row being
    /// committed: satwatch's own share of the latency to the commit.
    pub processing_latency: Histogram,
    pub samples_consumed: IntCounterVec,
    pub samples_scored: IntCounterVec,
    pub samples_duplicate: IntCounterVec,
    pub samples_gap: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub anomalies_open: IntGauge,
    pub events: IntCounterVec,
    pub consumer_lag: IntGaugeVec,
    /// Partitions paused because `[kafka] max_uncommitted_per_partition`
    /// records wait behind their oldest unfinished one.
    pub partitions_paused: IntGauge,
    pub postgres_write_seconds: Histogram,
    pub postgres_write_failures: IntCounter,
    pub kafka_publish_failures: IntCounter,
    pub rows_written: IntCounterVec,
    /// Per stage (`postgres`, `kafka`, `consumer`): how long its oldest
    /// unfinished work has waited, and 1 while that is past
    /// `[health] max_stall_ms`.
    pub stage_waiting_seconds: GaugeVec,
    pub stage_stalled: IntGaugeVec,
    /// HTTP connections open now, and those closed to make room at
    /// `[http] max_connections`.
    pub http_connections: IntGauge,
    pub http_connections_evicted: IntCounter,
    /// Per model: inference calls that failed (each retry counts), and 1
    /// while the model is available, 0 while it is reported unavailable
    /// (its channels held).
    pub model_failures: IntCounterVec,
    pub model_available: IntGaugeVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric names are valid");
    registry
        .register(Box::new(c.clone()))
        .expect("each metric is registered once");
    c
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let model = &["model", "version"];
        // Fine around the latency target (max_queue_delay + 20 ms), coarse beyond.
        let latency_buckets = vec![
            0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.0225, 0.025,
            0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        let end_to_end_latency = Histogram::with_opts(
            HistogramOpts::new(
                "satwatch_end_to_end_latency_seconds",
                "Seconds from a sample's timestamp to its score and forecast being durable.",
            )
            .buckets(latency_buckets.clone()),
        )
        .expect("valid histogram");
        r.register(Box::new(end_to_end_latency.clone()))
            .expect("registered once");
        let processing_latency = Histogram::with_opts(
            HistogramOpts::new(
                "satwatch_processing_latency_seconds",
                "Seconds from a record being taken from Kafka to its score row being committed \
                 to PostgreSQL: satwatch's own share of the latency to the commit.",
            )
            .buckets(latency_buckets.clone()),
        )
        .expect("valid histogram");
        r.register(Box::new(processing_latency.clone()))
            .expect("registered once");
        let postgres_write_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "satwatch_postgres_write_seconds",
                "Seconds per PostgreSQL write transaction.",
            )
            .buckets(latency_buckets),
        )
        .expect("valid histogram");
        r.register(Box::new(postgres_write_seconds.clone()))
            .expect("registered once");
        let batch_size = HistogramVec::new(
            HistogramOpts::new("satwatch_inference_batch_size", "Windows per backend call.")
                .buckets(vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
                ]),
            model,
        )
        .expect("valid histogram");
        r.register(Box::new(batch_size.clone()))
            .expect("registered once");
        let anomalies_open =
            IntGauge::new("satwatch_anomalies_open", "Anomaly events open now.").expect("valid");
        r.register(Box::new(anomalies_open.clone()))
            .expect("registered once");
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "satwatch_consumer_lag",
                "Records between the committed position and the end of the partition.",
            ),
            &["topic", "partition"],
        )
        .expect("valid");
        r.register(Box::new(consumer_lag.clone()))
            .expect("registered once");
        let partitions_paused = IntGauge::new(
            "satwatch_partitions_paused",
            "Telemetry partitions paused: [kafka] max_uncommitted_per_partition records wait behind \
             their oldest unfinished one (e.g. a held model's).",
        )
        .expect("valid");
        r.register(Box::new(partitions_paused.clone()))
            .expect("registered once");
        let postgres_write_failures = IntCounter::new(
            "satwatch_postgres_write_failures_total",
            "PostgreSQL write transactions that failed.",
        )
        .expect("valid");
        r.register(Box::new(postgres_write_failures.clone()))
            .expect("registered once");
        let kafka_publish_failures = IntCounter::new(
            "satwatch_kafka_publish_failures_total",
            "Output batches whose Kafka delivery failed.",
        )
        .expect("valid");
        r.register(Box::new(kafka_publish_failures.clone()))
            .expect("registered once");
        let stage_waiting_seconds = GaugeVec::new(
            Opts::new(
                "satwatch_stage_waiting_seconds",
                "Seconds the stage's oldest unfinished work has waited: a PostgreSQL write \
                 (postgres), an output transaction (kafka), consumer lag with no committed \
                 progress (consumer); 0 when nothing waits.",
            ),
            &["stage"],
        )
        .expect("valid");
        r.register(Box::new(stage_waiting_seconds.clone()))
            .expect("registered once");
        let stage_stalled = IntGaugeVec::new(
            Opts::new(
                "satwatch_stage_stalled",
                "1 while the stage's oldest unfinished work is older than [health] max_stall_ms \
                 (readiness is then 503), else 0.",
            ),
            &["stage"],
        )
        .expect("valid");
        r.register(Box::new(stage_stalled.clone()))
            .expect("registered once");
        for stage in crate::health::Stage::ALL {
            stage_waiting_seconds
                .with_label_values(&[stage.name()])
                .set(0.0);
            stage_stalled.with_label_values(&[stage.name()]).set(0);
        }
        let http_connections =
            IntGauge::new("satwatch_http_connections", "HTTP connections open now.")
                .expect("valid");
        r.register(Box::new(http_connections.clone()))
            .expect("registered once");
        let http_connections_evicted = IntCounter::new(
            "satwatch_http_connections_evicted_total",
            "HTTP connections closed to make room for a new one at [http] max_connections.",
        )
        .expect("valid");
        r.register(Box::new(http_connections_evicted.clone()))
            .expect("registered once");
        let model_available = IntGaugeVec::new(
            Opts::new(
                "satwatch_model_available",
                "1 while the model serves its channels, 0 while it is unavailable: its \
                 inference calls kept failing, its channels are held (nothing of theirs is \
                 committed) and readiness is 503 naming it.",
            ),
            &["model"],
        )
        .expect("valid");
        r.register(Box::new(model_available.clone()))
            .expect("registered once");
        Self {
            model_failures: counter(
                &r,
                "satwatch_model_failures_total",
                "Inference calls that failed or panicked (each retry of a batch counts).",
                &["model"],
            ),
            model_available,
            stage_waiting_seconds,
            stage_stalled,
            http_connections,
            http_connections_evicted,
            inference_success: counter(
                &r,
                "satwatch_inference_request_success_total",
                "Windows inferred successfully.",
                model,
            ),
            inference_failure: counter(
                &r,
                "satwatch_inference_request_failure_total",
                "Windows whose inference failed.",
                model,
            ),
            inference_count: counter(
                &r,
                "satwatch_inference_count_total",
                "Windows inferred.",
                model,
            ),
            execution_count: counter(
                &r,
                "satwatch_inference_exec_count_total",
                "Backend calls (batches) executed.",
                model,
            ),
            queue_duration_us: counter(
                &r,
                "satwatch_inference_queue_duration_us_total",
                "Microseconds windows waited in the batcher.",
                model,
            ),
            input_duration_us: counter(
                &r,
                "satwatch_inference_compute_input_duration_us_total",
                "Microseconds laying out batches' windows for backend calls.",
                model,
            ),
            compute_duration_us: counter(
                &r,
                "satwatch_inference_compute_infer_duration_us_total",
                "Microseconds spent inside backend calls.",
                model,
            ),
            batch_size,
            end_to_end_latency,
            processing_latency,
            samples_consumed: counter(
                &r,
                "satwatch_samples_consumed_total",
                "Valid samples consumed.",
                &["subsystem"],
            ),
            samples_scored: counter(
                &r,
                "satwatch_samples_scored_total",
                "Samples scored.",
                &["subsystem"],
            ),
            samples_duplicate: counter(
                &r,
                "satwatch_samples_duplicate_total",
                "Samples dropped because their seq was not new.",
                &["subsystem"],
            ),
            samples_gap: counter(
                &r,
                "satwatch_samples_gap_total",
                "Samples that arrived after a jump in seq.",
                &["subsystem"],
            ),
            dead_letters: counter(
                &r,
                "satwatch_dead_letters_total",
                "Records sent to the dead-letter topic.",
                &["reason"],
            ),
            anomalies_open,
            events: counter(
                &r,
                "satwatch_anomaly_events_total",
                "Anomaly event records emitted.",
                &["subsystem", "state"],
            ),
            consumer_lag,
            partitions_paused,
            postgres_write_seconds,
            postgres_write_failures,
            kafka_publish_failures,
            rows_written: counter(
                &r,
                "satwatch_rows_written_total",
                "Rows committed to PostgreSQL.",
                &["table"],
            ),
            registry: r,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
