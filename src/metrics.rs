//! Prometheus metrics, prefixed `image_rewriter_`.

use prometheus_client::encoding::EncodeLabelSet;
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
pub struct RuleLabel {
    pub rule: String,
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    /// `patched`, `unchanged` (examined, nothing to do), `skipped` (not a
    /// request the webhook acts on), `bad_request`, `too_large`,
    /// `unsupported_media_type`, `overloaded` (body budget exhausted),
    /// `not_ready` (no config loaded yet).
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
    /// The same for the certificate and key files.
    pub certificate_last_reload_successful: Gauge,
    /// The notAfter of the serving certificate in force, as a Unix time.
    pub certificate_expiration: Gauge,
    /// `created`, `updated`, `exists`, `user_owned`, `failed`.
    pub pull_secret_copies: Family<ResultLabel, Counter>,
    pub pull_secret_sync_errors: Counter,
    pub pull_secret_cache_size: Gauge,
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
            "AdmissionReview requests answered, by result",
            admission_requests.clone(),
        );
        // 50 µs to ~0.4 s: the interesting range is well under a millisecond.
        let admission_duration = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.000_05, 2.0, 14),
        );
        registry.register(
            "admission_duration_seconds",
            "Time to answer one AdmissionReview, from body read to response encoded",
            admission_duration.clone(),
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
        let certificate_last_reload_successful = Gauge::default();
        registry.register(
            "certificate_last_reload_successful",
            "1 if the certificate and key files as they are now were loaded, 0 if they were refused and the last good pair serves",
            certificate_last_reload_successful.clone(),
        );
        let certificate_expiration = Gauge::default();
        registry.register(
            "certificate_expiration_timestamp_seconds",
            "When the serving certificate in force expires (its notAfter), as a Unix time",
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
            certificate_last_reload_successful,
            certificate_expiration,
        }
    }

    pub fn count_request(&self, result: &'static str) {
        self.admission_requests
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    pub fn count_reload(family: &Family<ResultLabel, Counter>, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        family.get_or_create(&ResultLabel { result }).inc();
    }

    /// The Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
