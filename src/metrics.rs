//! Prometheus metrics, prefixed `image_rewriter_`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabel {
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabel {
    pub rule: String,
}

/// Every `result` of `admission_requests_total`. Each series exists from
/// the start, at 0: `increase()` over a series born at 1 reads 0, so an alert
/// on the first overload (or bad request) would otherwise never fire.
pub const ADMISSION_RESULTS: [&str; 9] = [
    "patched",
    "unchanged",
    "skipped",
    "bad_request",
    "too_large",
    "unsupported_media_type",
    "overloaded",
    "not_ready",
    "cancelled",
];
/// Every `protocol` of `tls_connections_total`: what ALPN settled on.
pub const PROTOCOLS: [&str; 2] = [H2, HTTP1];
const H2: &str = "h2";
const HTTP1: &str = "http/1.1";
/// Every `result` of `config_reloads_total` and `certificate_reloads_total`.
pub const RELOAD_RESULTS: [&str; 2] = ["success", "failure"];
/// Every `result` of `pull_secret_copies_total`.
pub const COPY_RESULTS: [&str; 5] = ["created", "updated", "exists", "user_owned", "failed"];

/// A gauge with no sample until it is first set (and again once cleared):
/// for a value that has no meaningful zero.
#[derive(Debug, Default, Clone)]
pub struct UnsetGauge(Arc<Mutex<Option<i64>>>);

impl UnsetGauge {
    pub fn set(&self, value: Option<i64>) {
        *crate::unwind::lock(&self.0) = value;
    }

    pub fn get(&self) -> Option<i64> {
        *crate::unwind::lock(&self.0)
    }
}

impl EncodeMetric for UnsetGauge {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        match self.get() {
            Some(value) => encoder.encode_gauge(&value),
            None => Ok(()),
        }
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    /// [`ADMISSION_RESULTS`]: `patched`, `unchanged` (examined, nothing to
    /// do), `skipped` (not a request the webhook acts on), `bad_request`,
    /// `too_large`, `unsupported_media_type`, `overloaded` (body budget
    /// exhausted, or its client gave up while waiting for it), `not_ready`
    /// (no config loaded yet), `cancelled` (the client gave up first).
    pub admission_requests: Family<ResultLabel, Counter>,
    pub admission_duration: Histogram,
    pub images_rewritten: Family<RuleLabel, Counter>,
    pub images_unparsable: Counter,
    /// `success` or `failure`.
    pub config_reloads: Family<ResultLabel, Counter>,
    pub certificate_reloads: Family<ResultLabel, Counter>,
    /// 1 when the config file as it is now loaded, 0 when it was refused (the
    /// last good config is in force) or none has loaded yet.
    pub config_last_reload_successful: Gauge,
    /// Rules in the config in force (0 rewrites nothing); no config yet, 0.
    pub config_rules: Gauge,
    /// The same for the certificate and key files.
    pub certificate_last_reload_successful: Gauge,
    /// The notAfter of the serving certificate in force, as a Unix time; no
    /// series until a certificate has loaded (a 0 would read as expired).
    pub certificate_expiration: UnsetGauge,
    /// `created`, `updated`, `exists`, `user_owned`, `failed`.
    pub pull_secret_copies: Family<ResultLabel, Counter>,
    pub pull_secret_sync_errors: Counter,
    pub pull_secret_cache_size: Gauge,
    /// [`PROTOCOLS`]: connections whose TLS handshake completed (the
    /// apiserver's, the kubelet's HTTPS probes, anyone's).
    pub tls_connections: Family<ProtocolLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("image_rewriter");
        let admission_requests = Family::<ResultLabel, Counter>::default();
        registry.register(
            "admission_requests",
            "AdmissionReview requests, by result (cancelled: the client gave up before the answer)",
            admission_requests.clone(),
        );
        // 50 µs to ~52 s: the interesting range is well under a millisecond,
        // but a pull secret wait takes seconds, and the top bucket must lie
        // past the longest webhook timeout the apiserver allows (30 s) for a
        // quantile to tell "slow" from "timed out".
        let admission_duration = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.000_05, 2.0, 21),
        );
        registry.register(
            "admission_duration_seconds",
            "Time to answer one AdmissionReview, from body read to response encoded (or to when its client gave up)",
            admission_duration.clone(),
        );
        let tls_connections = Family::<ProtocolLabel, Counter>::default();
        registry.register(
            "tls_connections",
            "TLS connections accepted (handshake completed), by the protocol ALPN settled on",
            tls_connections.clone(),
        );
        let images_rewritten = Family::<RuleLabel, Counter>::default();
        registry.register(
            "images_rewritten",
            "Container images rewritten, by the rule's match",
            images_rewritten.clone(),
        );
        let images_unparsable = Counter::default();
        registry.register(
            "images_unparsable",
            "Container images left unchanged because they are not valid references",
            images_unparsable.clone(),
        );
        let config_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "config_reloads",
            "Config file loads after a change, by result",
            config_reloads.clone(),
        );
        let certificate_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "certificate_reloads",
            "Certificate and key loads after a change, by result",
            certificate_reloads.clone(),
        );
        let config_last_reload_successful = Gauge::default();
        registry.register(
            "config_last_reload_successful",
            "1 if the config file as it is now was loaded, 0 if it was refused and the last good config is in force",
            config_last_reload_successful.clone(),
        );
        let config_rules = Gauge::default();
        registry.register(
            "config_rules",
            "Rules in the config in force (0: no image is rewritten)",
            config_rules.clone(),
        );
        let certificate_last_reload_successful = Gauge::default();
        registry.register(
            "certificate_last_reload_successful",
            "1 if the certificate and key files as they are now were loaded, 0 if they were refused and the last good pair serves",
            certificate_last_reload_successful.clone(),
        );
        let certificate_expiration = UnsetGauge::default();
        registry.register(
            "certificate_expiration_timestamp_seconds",
            "When the serving certificate in force expires (the earliest notAfter in its chain), as a Unix time",
            certificate_expiration.clone(),
        );
        let pull_secret_copies = Family::<ResultLabel, Counter>::default();
        registry.register(
            "pull_secret_copies",
            "Pull secret copies into pod namespaces, by result",
            pull_secret_copies.clone(),
        );
        let pull_secret_sync_errors = Counter::default();
        registry.register(
            "pull_secret_sync_errors",
            "Errors syncing pull secrets: API failures, missing or deleted sources, watch errors",
            pull_secret_sync_errors.clone(),
        );
        let pull_secret_cache_size = Gauge::default();
        registry.register(
            "pull_secret_cache_size",
            "Secrets, across namespaces, in the watch cache of the rules' pull secret names",
            pull_secret_cache_size.clone(),
        );
        Self {
            registry,
            pull_secret_copies,
            pull_secret_sync_errors,
            pull_secret_cache_size,
            admission_requests,
            admission_duration,
            images_rewritten,
            images_unparsable,
            config_reloads,
            certificate_reloads,
            config_last_reload_successful,
            config_rules,
            certificate_last_reload_successful,
            certificate_expiration,
            tls_connections,
        }
        .with_every_result()
    }

    /// Every labelled counter at 0 for each of its results.
    fn with_every_result(self) -> Self {
        for result in ADMISSION_RESULTS {
            self.admission_requests
                .get_or_create(&ResultLabel { result })
                .inc_by(0);
        }
        for family in [&self.config_reloads, &self.certificate_reloads] {
            for result in RELOAD_RESULTS {
                family.get_or_create(&ResultLabel { result }).inc_by(0);
            }
        }
        for result in COPY_RESULTS {
            self.pull_secret_copies
                .get_or_create(&ResultLabel { result })
                .inc_by(0);
        }
        for protocol in PROTOCOLS {
            self.tls_connections
                .get_or_create(&ProtocolLabel { protocol })
                .inc_by(0);
        }
        self
    }

    /// Each rule's `images_rewritten_total` series at 0 (a count already
    /// there is kept), for a config about to be in force: an `increase()`
    /// cannot see a rule's first rewrite in a series born at 1. Series of
    /// rules a reload dropped stay, with their counts.
    pub fn expose_rules(&self, rules: &[crate::policy::Rule]) {
        for rule in rules {
            self.images_rewritten
                .get_or_create(&RuleLabel {
                    rule: rule.match_prefix.clone(),
                })
                .inc_by(0);
        }
    }

    pub fn count_copy(&self, result: &'static str) {
        debug_assert!(COPY_RESULTS.contains(&result), "{result}");
        self.pull_secret_copies
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    pub fn count_connection(&self, http2: bool) {
        let protocol = if http2 { H2 } else { HTTP1 };
        self.tls_connections
            .get_or_create(&ProtocolLabel { protocol })
            .inc();
    }

    pub fn count_request(&self, result: &'static str) {
        debug_assert!(ADMISSION_RESULTS.contains(&result), "{result}");
        self.admission_requests
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    pub fn count_reload(family: &Family<ResultLabel, Counter>, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        family.get_or_create(&ResultLabel { result }).inc();
    }

    /// OpenMetrics text (what Prometheus asks for).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// The Prometheus text format 0.0.4 (what a scraper gets that does not
    /// ask for OpenMetrics).
    pub fn encode_prometheus_text(&self) -> String {
        prometheus_text_from_openmetrics(&self.encode())
    }
}

/// OpenMetrics text rewritten as the Prometheus text format 0.0.4 reads it.
/// prometheus-client writes only OpenMetrics. For the metric types here
/// (counters, gauges, histograms; help texts without escapes) the formats
/// differ in three places: OpenMetrics names a counter's family without
/// `_total`, where 0.0.4 names it as its samples (a 0.0.4 parser otherwise
/// reads the samples as untyped, without help), and `# UNIT` and the closing
/// `# EOF` exist only in OpenMetrics. Samples are copied as they are.
pub fn prometheus_text_from_openmetrics(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let counter_family = ["# HELP ", "# TYPE "].into_iter().find_map(|keyword| {
            let rest = line.strip_prefix(keyword)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters.contains(name).then_some((keyword, name, tail))
        });
        match counter_family {
            Some((keyword, name, tail)) => {
                text.push_str(keyword);
                text.push_str(name);
                text.push_str("_total ");
                text.push_str(tail);
            }
            None => text.push_str(line),
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples_of(metrics: &Metrics, name: &str) -> Vec<String> {
        metrics
            .encode()
            .lines()
            .filter(|line| line.starts_with(name))
            .map(str::to_owned)
            .collect()
    }

    /// The 0.0.4 text has OpenMetrics' samples, in order and unchanged;
    /// counters' families named as their samples; no `# UNIT`, no `# EOF`.
    #[test]
    fn the_prometheus_text_names_counter_families_as_their_samples() {
        let metrics = Metrics::new();
        metrics.count_request("patched");
        metrics.admission_duration.observe(0.001);
        let openmetrics = metrics.encode();
        let text = metrics.encode_prometheus_text();
        let samples = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|line| !line.starts_with('#'))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(samples(&text), samples(&openmetrics));
        assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
        assert!(!text.contains("# EOF"), "{text}");

        let requests = "image_rewriter_admission_requests";
        assert!(openmetrics.contains(&format!("# TYPE {requests} counter\n")));
        assert!(text.contains(&format!("# TYPE {requests}_total counter\n")));
        assert!(text.contains(&format!(
            "# HELP {requests}_total AdmissionReview requests, by result (cancelled: the client \
             gave up before the answer).\n"
        )));
        assert!(!text.contains(&format!("# TYPE {requests} ")), "{text}");
        for unchanged in [
            "# TYPE image_rewriter_admission_duration_seconds histogram\n",
            "# TYPE image_rewriter_pull_secret_cache_size gauge\n",
        ] {
            assert!(openmetrics.contains(unchanged), "{openmetrics}");
            assert!(text.contains(unchanged), "{text}");
        }
        // Every counter family is named exactly as its samples.
        let counters: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
            .collect();
        assert!(counters.len() >= 5, "{text}");
        for name in counters {
            assert!(
                samples(&text).iter().any(|s| s
                    .strip_prefix(name)
                    .is_some_and(|r| r.starts_with([' ', '{']))),
                "{name}: no sample of that name"
            );
        }
    }

    #[test]
    fn unit_lines_are_openmetrics_only() {
        let openmetrics = "# HELP x_seconds Time.\n# TYPE x_seconds counter\n# UNIT x_seconds seconds\n\
                           x_seconds_total 1\n# HELP y A gauge.\n# TYPE y gauge\ny 2\n# EOF\n";
        assert_eq!(
            prometheus_text_from_openmetrics(openmetrics),
            "# HELP x_seconds_total Time.\n# TYPE x_seconds_total counter\n\
             x_seconds_total 1\n# HELP y A gauge.\n# TYPE y gauge\ny 2\n"
        );
    }

    #[test]
    fn the_certificate_expiration_has_no_sample_until_a_certificate_loads() {
        let metrics = Metrics::new();
        let name = "image_rewriter_certificate_expiration_timestamp_seconds";
        assert!(
            samples_of(&metrics, name).is_empty(),
            "a 0 would read as expired"
        );
        metrics.certificate_expiration.set(Some(1_800_000_000));
        assert_eq!(samples_of(&metrics, name), [format!("{name} 1800000000")]);
        metrics.certificate_expiration.set(None);
        assert!(samples_of(&metrics, name).is_empty());
    }

    #[test]
    fn every_result_is_exported_at_zero_from_the_start() {
        let metrics = Metrics::new();
        for (name, results) in [
            (
                "image_rewriter_admission_requests_total",
                &ADMISSION_RESULTS[..],
            ),
            ("image_rewriter_config_reloads_total", &RELOAD_RESULTS[..]),
            (
                "image_rewriter_certificate_reloads_total",
                &RELOAD_RESULTS[..],
            ),
            ("image_rewriter_pull_secret_copies_total", &COPY_RESULTS[..]),
        ] {
            let samples = samples_of(&metrics, name);
            assert_eq!(samples.len(), results.len(), "{samples:?}");
            for result in results {
                let sample = format!("{name}{{result=\"{result}\"}} 0");
                assert!(samples.contains(&sample), "{sample} in {samples:?}");
            }
        }
        let name = "image_rewriter_tls_connections_total";
        let samples = samples_of(&metrics, name);
        assert_eq!(samples.len(), PROTOCOLS.len(), "{samples:?}");
        for protocol in PROTOCOLS {
            let sample = format!("{name}{{protocol=\"{protocol}\"}} 0");
            assert!(samples.contains(&sample), "{sample} in {samples:?}");
        }
    }

    #[test]
    fn the_duration_histogram_reaches_past_the_longest_webhook_timeout() {
        let text = Metrics::new().encode();
        let top = text
            .lines()
            .filter_map(|line| {
                line.strip_prefix("image_rewriter_admission_duration_seconds_bucket{le=\"")
            })
            .filter_map(|rest| rest.split('"').next())
            .filter_map(|le| le.parse::<f64>().ok())
            .filter(|le| le.is_finite()) // "+Inf" parses too
            .fold(0.0, f64::max);
        // timeoutSeconds may be set up to 30 s.
        assert!(top > 30.0, "top finite bucket {top}");
    }
}
