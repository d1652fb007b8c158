//! Prometheus metrics: every series SPEC.md names, on an owned registry.
//!
//! Series whose labels are known at start (each target with each result,
//! reason, state and path; both reload results) are created with value 0 so
//! dashboards and alerts never see a gap. A target removed by a reload has its
//! series removed.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// `result` label values of `forkd_target_requests_total`.
pub const RESULTS: [&str; 4] = ["delivered", "spooled", "rejected", "dropped"];
/// `reason` label values of `forkd_target_attempt_failures_total`.
pub const FAILURE_REASONS: [&str; 5] = ["connect", "timeout", "status", "io", "tls"];
/// `state` label values of `forkd_target_state`.
pub const STATES: [&str; 3] = ["up", "down", "draining"];
/// `path` label values of `forkd_target_latency_seconds`.
pub const PATHS: [&str; 2] = ["live", "replay"];
/// `reason` label values of `forkd_buffer_dropped_records_total`.
pub const DROP_REASONS: [&str; 2] = ["full", "corrupt"];

/// Latency buckets, seconds: 1 ms to 30 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Every metric forkd exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `forkd_requests_total{status}` series by status code, looked up once.
    by_status: std::sync::Arc<[std::sync::OnceLock<IntCounter>]>,
    pub requests: IntCounterVec,
    pub request_bytes: IntCounter,
    pub request_duration: Histogram,
    pub inflight_bytes: IntGauge,
    pub connections: IntGauge,
    pub target_requests: IntCounterVec,
    pub target_delivered_bytes: IntCounterVec,
    pub target_attempt_failures: IntCounterVec,
    pub target_up: IntGaugeVec,
    pub target_state: IntGaugeVec,
    pub target_selected: IntGaugeVec,
    pub target_latency: HistogramVec,
    pub buffer_bytes: IntGaugeVec,
    pub buffer_records: IntGaugeVec,
    pub buffer_max_bytes: IntGaugeVec,
    pub buffer_oldest_age: GaugeVec,
    pub buffer_dropped: IntCounterVec,
    pub buffer_rejected_records: IntGaugeVec,
    pub config_reloads: IntCounterVec,
    pub config_last_reload_successful: IntGauge,
    pub buffer_writable: IntGaugeVec,
    pub build_info: IntGaugeVec,
    pub up_since: Gauge,
}

impl Metrics {
    /// Creates and registers every metric. Fails only on a programming error
    /// (a duplicate or malformed name), which the unit tests catch.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let m = Metrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "forkd_requests_total",
                    "Requests answered, by the status sent to the client.",
                ),
                &["status"],
            )?,
            request_bytes: IntCounter::new(
                "forkd_request_bytes_total",
                "Request body bytes accepted.",
            )?,
            request_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "forkd_request_duration_seconds",
                    "Time from request start to the answer sent to the client.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )?,
            inflight_bytes: IntGauge::new(
                "forkd_inflight_bytes",
                "Request body bytes held in memory (bounded by server.max_inflight_bytes).",
            )?,
            connections: IntGauge::new("forkd_client_connections", "Client connections open.")?,
            target_requests: IntCounterVec::new(
                Opts::new(
                    "forkd_target_requests_total",
                    "Per-target outcome of each request copy.",
                ),
                &["target", "result"],
            )?,
            target_delivered_bytes: IntCounterVec::new(
                Opts::new(
                    "forkd_target_delivered_bytes_total",
                    "Body bytes delivered to the target.",
                ),
                &["target"],
            )?,
            target_attempt_failures: IntCounterVec::new(
                Opts::new(
                    "forkd_target_attempt_failures_total",
                    "Failed attempts to send to a target.",
                ),
                &["target", "reason"],
            )?,
            target_up: IntGaugeVec::new(
                Opts::new(
                    "forkd_target_up",
                    "1 if the target is up, 0 if down or draining.",
                ),
                &["target"],
            )?,
            target_state: IntGaugeVec::new(
                Opts::new("forkd_target_state", "1 for the target's current state."),
                &["target", "state"],
            )?,
            target_selected: IntGaugeVec::new(
                Opts::new(
                    "forkd_target_selected",
                    "1 if the target receives new requests.",
                ),
                &["target"],
            )?,
            target_latency: HistogramVec::new(
                HistogramOpts::new(
                    "forkd_target_latency_seconds",
                    "Duration of attempts to a target.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["target", "path"],
            )?,
            buffer_bytes: IntGaugeVec::new(
                Opts::new(
                    "forkd_buffer_bytes",
                    "Bytes in the target's spool, framing included.",
                ),
                &["target"],
            )?,
            buffer_records: IntGaugeVec::new(
                Opts::new("forkd_buffer_records", "Records in the target's spool."),
                &["target"],
            )?,
            buffer_max_bytes: IntGaugeVec::new(
                Opts::new("forkd_buffer_max_bytes", "The target spool's max_size."),
                &["target"],
            )?,
            buffer_oldest_age: GaugeVec::new(
                Opts::new(
                    "forkd_buffer_oldest_record_age_seconds",
                    "Age of the oldest record in the target's spool (0 when empty).",
                ),
                &["target"],
            )?,
            buffer_dropped: IntCounterVec::new(
                Opts::new(
                    "forkd_buffer_dropped_records_total",
                    "Spooled records lost, by reason.",
                ),
                &["target", "reason"],
            )?,
            buffer_rejected_records: IntGaugeVec::new(
                Opts::new(
                    "forkd_buffer_rejected_records",
                    "Records kept in the target's rejected/ area.",
                ),
                &["target"],
            )?,
            config_reloads: IntCounterVec::new(
                Opts::new("forkd_config_reloads_total", "Config reloads, by result."),
                &["result"],
            )?,
            config_last_reload_successful: IntGauge::new(
                "forkd_config_last_reload_successful",
                "1 if the last reload succeeded (or none was tried), 0 if it was refused.",
            )?,
            buffer_writable: IntGaugeVec::new(
                Opts::new(
                    "forkd_buffer_writable",
                    "1 if the target's spool accepts writes, 0 after a write error (ENOSPC, EIO) until one succeeds.",
                ),
                &["target"],
            )?,
            build_info: IntGaugeVec::new(
                Opts::new("forkd_build_info", "Build information."),
                &["version"],
            )?,
            up_since: Gauge::new(
                "forkd_start_time_seconds",
                "Start time of the process, Unix seconds.",
            )?,
            registry,
            by_status: (0..600).map(|_| std::sync::OnceLock::new()).collect(),
        };
        let collectors: [Box<dyn Collector>; 23] = [
            Box::new(m.config_last_reload_successful.clone()),
            Box::new(m.buffer_writable.clone()),
            Box::new(m.requests.clone()),
            Box::new(m.request_bytes.clone()),
            Box::new(m.request_duration.clone()),
            Box::new(m.inflight_bytes.clone()),
            Box::new(m.connections.clone()),
            Box::new(m.target_requests.clone()),
            Box::new(m.target_delivered_bytes.clone()),
            Box::new(m.target_attempt_failures.clone()),
            Box::new(m.target_up.clone()),
            Box::new(m.target_state.clone()),
            Box::new(m.target_selected.clone()),
            Box::new(m.target_latency.clone()),
            Box::new(m.buffer_bytes.clone()),
            Box::new(m.buffer_records.clone()),
            Box::new(m.buffer_max_bytes.clone()),
            Box::new(m.buffer_oldest_age.clone()),
            Box::new(m.buffer_dropped.clone()),
            Box::new(m.buffer_rejected_records.clone()),
            Box::new(m.config_reloads.clone()),
            Box::new(m.build_info.clone()),
            Box::new(m.up_since.clone()),
        ];
        for c in collectors {
            m.registry.register(c)?;
        }
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for result in ["success", "failure"] {
            m.config_reloads.with_label_values(&[result]);
        }
        m.config_last_reload_successful.set(1);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        m.up_since.set(now);
        Ok(m)
    }

    /// Creates every series of a target at zero.
    pub fn add_target(&self, target: &str) {
        for result in RESULTS {
            self.target_requests.with_label_values(&[target, result]);
        }
        self.target_delivered_bytes.with_label_values(&[target]);
        for reason in FAILURE_REASONS {
            self.target_attempt_failures
                .with_label_values(&[target, reason]);
        }
        self.target_up.with_label_values(&[target]);
        for state in STATES {
            self.target_state.with_label_values(&[target, state]);
        }
        self.target_selected.with_label_values(&[target]);
        for path in PATHS {
            self.target_latency.with_label_values(&[target, path]);
        }
        self.buffer_bytes.with_label_values(&[target]);
        self.buffer_records.with_label_values(&[target]);
        self.buffer_max_bytes.with_label_values(&[target]);
        self.buffer_oldest_age.with_label_values(&[target]);
        for reason in DROP_REASONS {
            self.buffer_dropped.with_label_values(&[target, reason]);
        }
        self.buffer_rejected_records.with_label_values(&[target]);
        self.buffer_writable.with_label_values(&[target]).set(1);
    }

    /// Removes every series of a target (it was removed from the config).
    pub fn remove_target(&self, target: &str) {
        for result in RESULTS {
            let _ = self.target_requests.remove_label_values(&[target, result]);
        }
        let _ = self.target_delivered_bytes.remove_label_values(&[target]);
        for reason in FAILURE_REASONS {
            let _ = self
                .target_attempt_failures
                .remove_label_values(&[target, reason]);
        }
        let _ = self.target_up.remove_label_values(&[target]);
        for state in STATES {
            let _ = self.target_state.remove_label_values(&[target, state]);
        }
        let _ = self.target_selected.remove_label_values(&[target]);
        for path in PATHS {
            let _ = self.target_latency.remove_label_values(&[target, path]);
        }
        let _ = self.buffer_bytes.remove_label_values(&[target]);
        let _ = self.buffer_records.remove_label_values(&[target]);
        let _ = self.buffer_max_bytes.remove_label_values(&[target]);
        let _ = self.buffer_oldest_age.remove_label_values(&[target]);
        for reason in DROP_REASONS {
            let _ = self.buffer_dropped.remove_label_values(&[target, reason]);
        }
        let _ = self.buffer_rejected_records.remove_label_values(&[target]);
        let _ = self.buffer_writable.remove_label_values(&[target]);
    }

    /// Counts an answer sent to a client.
    pub fn count_response(&self, status: http::StatusCode) {
        match self.by_status.get(usize::from(status.as_u16())) {
            Some(slot) => slot
                .get_or_init(|| self.requests.with_label_values(&[status.as_str()]))
                .inc(),
            None => self.requests.with_label_values(&[status.as_str()]).inc(),
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Result<Vec<u8>, prometheus::Error> {
        let mut out = Vec::with_capacity(16 << 10);
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn every_spec_series_of_a_new_target_is_exported_at_zero() -> TestResult {
        let m = Metrics::new()?;
        m.add_target("primary");
        let text = String::from_utf8(m.render()?)?;
        for line in [
            "forkd_target_requests_total{result=\"spooled\",target=\"primary\"} 0",
            "forkd_target_attempt_failures_total{reason=\"tls\",target=\"primary\"} 0",
            "forkd_target_state{state=\"draining\",target=\"primary\"} 0",
            "forkd_target_latency_seconds_count{path=\"replay\",target=\"primary\"} 0",
            "forkd_buffer_dropped_records_total{reason=\"corrupt\",target=\"primary\"} 0",
            "forkd_buffer_oldest_record_age_seconds{target=\"primary\"} 0",
            "forkd_config_reloads_total{result=\"failure\"} 0",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(text.contains(&format!(
            "forkd_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        m.remove_target("primary");
        let text = String::from_utf8(m.render()?)?;
        assert!(
            !text.contains("target=\"primary\""),
            "series left after removal:\n{text}"
        );
        Ok(())
    }
}
