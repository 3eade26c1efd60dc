//! Prometheus metrics, named after Triton's (`nv_inference_*` becomes
//! `satwatch_inference_*`). Label sets stay bounded: per model and version,
//! per subsystem, per reason, per partition; never per sample.
//!
//! [`CATALOGUE`] lists every family a scrape can show, with its type, help
//! and label names; [`Metrics::new`] registers each from its entry there and
//! nothing else, so the catalogue is what the deployment (the Grafana
//! dashboard, checked by `tests/deploy.rs`) may rely on.

use prometheus::{
    core::Collector, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// A family's Prometheus type, as the text format's `# TYPE` line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family: what a scrape shows of it, observations aside.
#[derive(Debug, PartialEq)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    /// Label names; empty for a family with one unlabelled series.
    pub labels: &'static [&'static str],
}

impl Family {
    /// The series names a query may select: the family's name, or for a
    /// histogram its `_bucket`, `_sum` and `_count` series.
    pub fn series(&self) -> Vec<String> {
        match self.kind {
            Kind::Histogram => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|suffix| format!("{}{suffix}", self.name))
                .collect(),
            Kind::Counter | Kind::Gauge => vec![self.name.to_owned()],
        }
    }

    /// Registers `collector`, built from this entry, in `registry`.
    fn register<C: Collector + Clone + 'static>(
        &self,
        registry: &Registry,
        kind: Kind,
        labelled: bool,
        collector: C,
    ) -> C {
        assert!(
            CATALOGUE.contains(self),
            "{} is registered only from its CATALOGUE entry",
            self.name
        );
        assert!(
            self.kind == kind && self.labels.is_empty() != labelled,
            "{} is a {:?} with labels {:?}, not built as one",
            self.name,
            self.kind,
            self.labels
        );
        registry
            .register(Box::new(collector.clone()))
            .expect("each metric is registered once");
        collector
    }

    fn opts(&self) -> Opts {
        Opts::new(self.name, self.help)
    }

    fn histogram_opts(&self, buckets: &[f64]) -> HistogramOpts {
        HistogramOpts::new(self.name, self.help).buckets(buckets.to_vec())
    }

    fn int_counter(&self, r: &Registry) -> IntCounter {
        let c = IntCounter::with_opts(self.opts()).expect("metric names are valid");
        self.register(r, Kind::Counter, false, c)
    }

    fn int_counter_vec(&self, r: &Registry) -> IntCounterVec {
        let c = IntCounterVec::new(self.opts(), self.labels).expect("metric names are valid");
        self.register(r, Kind::Counter, true, c)
    }

    fn int_gauge(&self, r: &Registry) -> IntGauge {
        let g = IntGauge::with_opts(self.opts()).expect("metric names are valid");
        self.register(r, Kind::Gauge, false, g)
    }

    fn int_gauge_vec(&self, r: &Registry) -> IntGaugeVec {
        let g = IntGaugeVec::new(self.opts(), self.labels).expect("metric names are valid");
        self.register(r, Kind::Gauge, true, g)
    }

    fn gauge_vec(&self, r: &Registry) -> GaugeVec {
        let g = GaugeVec::new(self.opts(), self.labels).expect("metric names are valid");
        self.register(r, Kind::Gauge, true, g)
    }

    fn histogram(&self, r: &Registry, buckets: &[f64]) -> Histogram {
        let h = Histogram::with_opts(self.histogram_opts(buckets)).expect("valid histogram");
        self.register(r, Kind::Histogram, false, h)
    }

    fn histogram_vec(&self, r: &Registry, buckets: &[f64]) -> HistogramVec {
        let h =
            HistogramVec::new(self.histogram_opts(buckets), self.labels).expect("valid histogram");
        self.register(r, Kind::Histogram, true, h)
    }
}

const MODEL: &[&str] = &["model", "version"];

const INFERENCE_SUCCESS: Family = Family {
    name: "satwatch_inference_request_success_total",
    kind: Kind::Counter,
    help: "Windows inferred successfully.",
    labels: MODEL,
};
const INFERENCE_FAILURE: Family = Family {
    name: "satwatch_inference_request_failure_total",
    kind: Kind::Counter,
    help: "Windows whose inference failed.",
    labels: MODEL,
};
const INFERENCE_COUNT: Family = Family {
    name: "satwatch_inference_count_total",
    kind: Kind::Counter,
    help: "Windows inferred.",
    labels: MODEL,
};
const EXECUTION_COUNT: Family = Family {
    name: "satwatch_inference_exec_count_total",
    kind: Kind::Counter,
    help: "Backend calls (batches) executed.",
    labels: MODEL,
};
const QUEUE_DURATION_US: Family = Family {
    name: "satwatch_inference_queue_duration_us_total",
    kind: Kind::Counter,
    help: "Microseconds windows waited in the batcher.",
    labels: MODEL,
};
const INPUT_DURATION_US: Family = Family {
    name: "satwatch_inference_compute_input_duration_us_total",
    kind: Kind::Counter,
    help: "Microseconds laying out batches' windows for backend calls.",
    labels: MODEL,
};
const COMPUTE_DURATION_US: Family = Family {
    name: "satwatch_inference_compute_infer_duration_us_total",
    kind: Kind::Counter,
    help: "Microseconds spent inside backend calls.",
    labels: MODEL,
};
const BATCH_SIZE: Family = Family {
    name: "satwatch_inference_batch_size",
    kind: Kind::Histogram,
    help: "Windows per backend call.",
    labels: MODEL,
};
const END_TO_END_LATENCY: Family = Family {
    name: "satwatch_end_to_end_latency_seconds",
    kind: Kind::Histogram,
    help: "Seconds from a sample's timestamp to its score and forecast being durable.",
    labels: &[],
};
const PROCESSING_LATENCY: Family = Family {
    name: "satwatch_processing_latency_seconds",
    kind: Kind::Histogram,
    help: "Seconds from a record being taken from Kafka to its score row being committed \
           to PostgreSQL: satwatch's own share of the latency to the commit.",
    labels: &[],
};
const SAMPLES_CONSUMED: Family = Family {
    name: "satwatch_samples_consumed_total",
    kind: Kind::Counter,
    help: "Valid samples consumed.",
    labels: &["subsystem"],
};
const SAMPLES_SCORED: Family = Family {
    name: "satwatch_samples_scored_total",
    kind: Kind::Counter,
    help: "Samples scored.",
    labels: &["subsystem"],
};
const SAMPLES_DUPLICATE: Family = Family {
    name: "satwatch_samples_duplicate_total",
    kind: Kind::Counter,
    help: "Samples dropped because their seq was not new.",
    labels: &["subsystem"],
};
const SAMPLES_GAP: Family = Family {
    name: "satwatch_samples_gap_total",
    kind: Kind::Counter,
    help: "Samples that arrived after a jump in seq.",
    labels: &["subsystem"],
};
const DEAD_LETTERS: Family = Family {
    name: "satwatch_dead_letters_total",
    kind: Kind::Counter,
    help: "Records sent to the dead-letter topic.",
    labels: &["reason"],
};
const ANOMALIES_OPEN: Family = Family {
    name: "satwatch_anomalies_open",
    kind: Kind::Gauge,
    help: "Anomaly events open now.",
    labels: &[],
};
const EVENTS: Family = Family {
    name: "satwatch_anomaly_events_total",
    kind: Kind::Counter,
    help: "Anomaly event records emitted.",
    labels: &["subsystem", "state"],
};
const CONSUMER_LAG: Family = Family {
    name: "satwatch_consumer_lag",
    kind: Kind::Gauge,
    help: "Records between the committed position and the end of the partition.",
    labels: &["topic", "partition"],
};
const PARTITIONS_PAUSED: Family = Family {
    name: "satwatch_partitions_paused",
    kind: Kind::Gauge,
    help: "Telemetry partitions paused: [kafka] max_uncommitted_per_partition records wait behind \
           their oldest unfinished one (e.g. a held model's).",
    labels: &[],
};
const POSTGRES_WRITE_SECONDS: Family = Family {
    name: "satwatch_postgres_write_seconds",
    kind: Kind::Histogram,
    help: "Seconds per PostgreSQL write transaction.",
    labels: &[],
};
const POSTGRES_WRITE_FAILURES: Family = Family {
    name: "satwatch_postgres_write_failures_total",
    kind: Kind::Counter,
    help: "PostgreSQL write transactions that failed.",
    labels: &[],
};
const KAFKA_PUBLISH_FAILURES: Family = Family {
    name: "satwatch_kafka_publish_failures_total",
    kind: Kind::Counter,
    help: "Output batches whose Kafka delivery failed.",
    labels: &[],
};
const ROWS_WRITTEN: Family = Family {
    name: "satwatch_rows_written_total",
    kind: Kind::Counter,
    help: "Rows committed to PostgreSQL.",
    labels: &["table"],
};
const STAGE_WAITING_SECONDS: Family = Family {
    name: "satwatch_stage_waiting_seconds",
    kind: Kind::Gauge,
    help: "Seconds the stage's oldest unfinished work has waited: a PostgreSQL write \
           (postgres), an output transaction (kafka), consumer lag with no committed \
           progress (consumer); 0 when nothing waits.",
    labels: &["stage"],
};
const STAGE_STALLED: Family = Family {
    name: "satwatch_stage_stalled",
    kind: Kind::Gauge,
    help: "1 while the stage's oldest unfinished work is older than [health] max_stall_ms \
           (readiness is then 503), else 0.",
    labels: &["stage"],
};
const HTTP_CONNECTIONS: Family = Family {
    name: "satwatch_http_connections",
    kind: Kind::Gauge,
    help: "HTTP connections open now.",
    labels: &[],
};
const HTTP_CONNECTIONS_EVICTED: Family = Family {
    name: "satwatch_http_connections_evicted_total",
    kind: Kind::Counter,
    help: "HTTP connections closed to make room for a new one at [http] max_connections.",
    labels: &[],
};
const MODEL_FAILURES: Family = Family {
    name: "satwatch_model_failures_total",
    kind: Kind::Counter,
    help: "Inference calls that failed or panicked (each retry of a batch counts).",
    labels: &["model"],
};
const MODEL_AVAILABLE: Family = Family {
    name: "satwatch_model_available",
    kind: Kind::Gauge,
    help: "1 while the model serves its channels, 0 while it is unavailable: its \
           inference calls kept failing, its channels are held (nothing of theirs is \
           committed) and readiness is 503 naming it.",
    labels: &["model"],
};

/// Every family [`Metrics::new`] registers, and no other.
pub const CATALOGUE: &[Family] = &[
    INFERENCE_SUCCESS,
    INFERENCE_FAILURE,
    INFERENCE_COUNT,
    EXECUTION_COUNT,
    QUEUE_DURATION_US,
    INPUT_DURATION_US,
    COMPUTE_DURATION_US,
    BATCH_SIZE,
    END_TO_END_LATENCY,
    PROCESSING_LATENCY,
    SAMPLES_CONSUMED,
    SAMPLES_SCORED,
    SAMPLES_DUPLICATE,
    SAMPLES_GAP,
    DEAD_LETTERS,
    ANOMALIES_OPEN,
    EVENTS,
    CONSUMER_LAG,
    PARTITIONS_PAUSED,
    POSTGRES_WRITE_SECONDS,
    POSTGRES_WRITE_FAILURES,
    KAFKA_PUBLISH_FAILURES,
    ROWS_WRITTEN,
    STAGE_WAITING_SECONDS,
    STAGE_STALLED,
    HTTP_CONNECTIONS,
    HTTP_CONNECTIONS_EVICTED,
    MODEL_FAILURES,
    MODEL_AVAILABLE,
];

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

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        // Fine around the latency target (max_queue_delay + 20 ms), coarse beyond.
        let latency_buckets = [
            0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.0225, 0.025,
            0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        let batch_buckets = [
            1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
        ];
        let metrics = Self {
            inference_success: INFERENCE_SUCCESS.int_counter_vec(&r),
            inference_failure: INFERENCE_FAILURE.int_counter_vec(&r),
            inference_count: INFERENCE_COUNT.int_counter_vec(&r),
            execution_count: EXECUTION_COUNT.int_counter_vec(&r),
            queue_duration_us: QUEUE_DURATION_US.int_counter_vec(&r),
            input_duration_us: INPUT_DURATION_US.int_counter_vec(&r),
            compute_duration_us: COMPUTE_DURATION_US.int_counter_vec(&r),
            batch_size: BATCH_SIZE.histogram_vec(&r, &batch_buckets),
            end_to_end_latency: END_TO_END_LATENCY.histogram(&r, &latency_buckets),
            processing_latency: PROCESSING_LATENCY.histogram(&r, &latency_buckets),
            samples_consumed: SAMPLES_CONSUMED.int_counter_vec(&r),
            samples_scored: SAMPLES_SCORED.int_counter_vec(&r),
            samples_duplicate: SAMPLES_DUPLICATE.int_counter_vec(&r),
            samples_gap: SAMPLES_GAP.int_counter_vec(&r),
            dead_letters: DEAD_LETTERS.int_counter_vec(&r),
            anomalies_open: ANOMALIES_OPEN.int_gauge(&r),
            events: EVENTS.int_counter_vec(&r),
            consumer_lag: CONSUMER_LAG.int_gauge_vec(&r),
            partitions_paused: PARTITIONS_PAUSED.int_gauge(&r),
            postgres_write_seconds: POSTGRES_WRITE_SECONDS.histogram(&r, &latency_buckets),
            postgres_write_failures: POSTGRES_WRITE_FAILURES.int_counter(&r),
            kafka_publish_failures: KAFKA_PUBLISH_FAILURES.int_counter(&r),
            rows_written: ROWS_WRITTEN.int_counter_vec(&r),
            stage_waiting_seconds: STAGE_WAITING_SECONDS.gauge_vec(&r),
            stage_stalled: STAGE_STALLED.int_gauge_vec(&r),
            http_connections: HTTP_CONNECTIONS.int_gauge(&r),
            http_connections_evicted: HTTP_CONNECTIONS_EVICTED.int_counter(&r),
            model_failures: MODEL_FAILURES.int_counter_vec(&r),
            model_available: MODEL_AVAILABLE.int_gauge_vec(&r),
            registry: r,
        };
        for stage in crate::health::Stage::ALL {
            metrics
                .stage_waiting_seconds
                .with_label_values(&[stage.name()])
                .set(0.0);
            metrics
                .stage_stalled
                .with_label_values(&[stage.name()])
                .set(0);
        }
        metrics
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_catalogue_family_is_registered_once() {
        let metrics = Metrics::new();
        let mut names: Vec<&str> = CATALOGUE.iter().map(|f| f.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CATALOGUE.len(), "a family is listed twice");
        // A second collector of a registered name is refused as already
        // registered; one of a name the registry lacks would be taken.
        for family in CATALOGUE {
            let probe = IntGauge::new(family.name, family.help).expect("valid name");
            assert!(
                matches!(
                    metrics.registry.register(Box::new(probe)),
                    Err(prometheus::Error::AlreadyReg)
                ),
                "{} is in CATALOGUE but Metrics::new does not register it",
                family.name
            );
        }
    }

    #[test]
    fn every_rendered_family_is_in_the_catalogue_as_rendered() {
        let text = Metrics::new().render();
        let mut seen = 0;
        for line in text.lines() {
            let (what, rest) = match line.strip_prefix("# TYPE ") {
                Some(rest) => ("TYPE", rest),
                None => match line.strip_prefix("# HELP ") {
                    Some(rest) => ("HELP", rest),
                    None => continue,
                },
            };
            let (name, value) = rest.split_once(' ').expect("name and value");
            let family = CATALOGUE
                .iter()
                .find(|f| f.name == name)
                .unwrap_or_else(|| panic!("{name} is rendered but not in CATALOGUE"));
            let want = if what == "TYPE" {
                family.kind.name().to_owned()
            } else {
                family.help.replace('\\', "\\\\").replace('\n', "\\n")
            };
            assert_eq!(value, want, "{what} of {name}");
            seen += 1;
        }
        // The unlabelled families and the per-stage gauges render before any
        // observation, each with a HELP and a TYPE line.
        let unlabelled = CATALOGUE.iter().filter(|f| f.labels.is_empty()).count();
        assert_eq!(seen, 2 * (unlabelled + 2), "{text}");
    }

    #[test]
    fn histogram_series_carry_the_suffixes() {
        assert_eq!(
            END_TO_END_LATENCY.series(),
            [
                "satwatch_end_to_end_latency_seconds_bucket",
                "satwatch_end_to_end_latency_seconds_sum",
                "satwatch_end_to_end_latency_seconds_count"
            ]
        );
        assert_eq!(DEAD_LETTERS.series(), ["satwatch_dead_letters_total"]);
    }
}
