//! The shipped deployment artefacts, checked the way a cluster and a builder
//! would see them.
//!
//! Every overlay under `manifests/overlays/` is rendered with
//! `kubectl kustomize` from a scratch copy of `manifests/` and
//! `certs/kustomization.yaml` (never the developer's own generated
//! `certs/*`), after the real binary's `certs` command has written the
//! certificate files into that copy. Each rendered object is decoded with the
//! Kubernetes API types, strictly (a field the API does not know, such as a
//! typo, fails the test), and the wiring is checked: which namespaces and pods
//! the webhook sees, its admission settings, the ports from the webhook's
//! clientConfig through the Service to the container and the `serve`
//! arguments, the probes, the mounts against the argument paths, the security
//! context, the certificate, and that the shipped config passes
//! `image-rewriter check-config`.
//!
//! Without `kubectl` on the PATH (or in `$KUBECTL`) the rendering tests print
//! `SKIPPED: kubectl not found` and pass; set
//! `IMAGE_REWRITER_REQUIRE_KUBECTL=1` to make that a failure instead.
//!
//! The Dockerfile, `.dockerignore` and `.gitignore` get structural checks that
//! need no tools.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine as _;
use k8s_openapi::Resource;
use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, MutatingWebhookConfiguration};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::scheduling::v1::PriorityClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize as _;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_image-rewriter");
const REPO: &str = env!("CARGO_MANIFEST_DIR");

const NAMESPACE: &str = "image-rewriter";
const SERVICE: &str = "image-rewriter";
const DEPLOYMENT: &str = "image-rewriter";
const WEBHOOK_CONFIGURATION: &str = "image-rewriter";
const WEBHOOK: &str = "image-rewriter.image-rewriter.io";
const CONFIG_MAP: &str = "image-rewriter-config";
const CONFIG_KEY: &str = "config.yaml";
const TLS_SECRET: &str = "image-rewriter-tls";
const ENABLED_LABEL: &str = "image-rewriter.io/enabled";
const NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// Never sent to the webhook, whatever the mode (DESIGN.md).
const ALWAYS_EXCLUDED: [&str; 4] = ["kube-system", "kube-public", "kube-node-lease", NAMESPACE];
/// The files `image-rewriter certs` writes (the interface the certs component relies on).
const GENERATED_CERT_FILES: [&str; 6] = [
    "ca.crt",
    "ca.key",
    "tls.crt",
    "tls.key",
    "secret.yaml",
    "webhook-ca-bundle.yaml",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    ClusterWide,
    OptIn,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CertSource {
    /// `image-rewriter certs --out certs/` and the `certs/` component.
    Generated,
    /// The `cert-manager` component.
    CertManager,
}

struct Expect {
    scope: Scope,
    certs: CertSource,
    failure_policy: &'static str,
}

/// The shipped cluster-wide overlay's expectations, and those of the
/// optional components added to it.
const CLUSTER_WIDE_GENERATED: Expect = Expect {
    scope: Scope::ClusterWide,
    certs: CertSource::Generated,
    failure_policy: "Ignore",
};

// ---------------------------------------------------------------------------
// The overlays

#[test]
fn overlay_cluster_wide() {
    check_overlay("cluster-wide", &CLUSTER_WIDE_GENERATED);
}

#[test]
fn overlay_opt_in() {
    check_overlay(
        "opt-in",
        &Expect {
            scope: Scope::OptIn,
            certs: CertSource::Generated,
            failure_policy: "Ignore",
        },
    );
}

#[test]
fn overlay_cluster_wide_cert_manager() {
    check_overlay(
        "cluster-wide-cert-manager",
        &Expect {
            scope: Scope::ClusterWide,
            certs: CertSource::CertManager,
            failure_policy: "Ignore",
        },
    );
}

#[test]
fn overlay_opt_in_cert_manager() {
    check_overlay(
        "opt-in-cert-manager",
        &Expect {
            scope: Scope::OptIn,
            certs: CertSource::CertManager,
            failure_policy: "Ignore",
        },
    );
}

/// The optional fail-closed component flips the failure policy, leaves
/// the cert-manager namespace out, and puts the webhook's pods in a
/// PriorityClass of their own, the highest a user-defined class may have, so
/// that they are not preempted while every pod creation waits on them.
#[test]
fn fail_closed_component_switches_to_fail() {
    let Some(rendered) = check_overlay_with_components(
        "test-opt-in-fail-closed",
        &["../../components/opt-in", "../../components/fail-closed"],
        &Expect {
            scope: Scope::OptIn,
            certs: CertSource::Generated,
            failure_policy: "Fail",
        },
    ) else {
        return;
    };
    let deployment: Deployment = rendered.one(DEPLOYMENT);
    let class_name = deployment
        .spec
        .and_then(|spec| spec.template.spec)
        .and_then(|pod| pod.priority_class_name)
        .expect("the webhook's pods name a PriorityClass");
    let class: PriorityClass = rendered.one(&class_name);
    // The apiserver refuses a user-defined class above 1e9.
    assert_eq!(class.value, 1_000_000_000);
    assert_ne!(class.global_default, Some(true), "only the webhook's pods");
}

/// The optional ipv6 component moves both listeners to `[::]`, ports kept,
/// and everything else checks as in the shipped overlays.
#[test]
fn ipv6_component_listens_on_every_address_family() {
    let Some(rendered) = check_overlay_with_components(
        "test-cluster-wide-ipv6",
        &["../../components/cluster-wide", "../../components/ipv6"],
        &CLUSTER_WIDE_GENERATED,
    ) else {
        return;
    };
    let deployment: Deployment = rendered.one(DEPLOYMENT);
    let pod = Pod::of(&rendered, &deployment);
    for (flag, port) in [("--listen", 8443), ("--metrics-listen", 9090)] {
        let address: std::net::SocketAddr = pod.args.get(flag).unwrap().parse().unwrap();
        assert_eq!(
            address,
            (std::net::Ipv6Addr::UNSPECIFIED, port).into(),
            "{flag}"
        );
    }
}

/// The optional prometheus-operator component, on top of a whole overlay:
/// its PodMonitor scrapes the webhook pods' metrics port, and every alert is
/// valid PromQL over metrics that exist, the server's own (as its registry
/// exports them) or the kube-apiserver's for this webhook.
#[test]
fn prometheus_operator_component_scrapes_the_pods_and_alerts_on_real_metrics() {
    let Some(rendered) = check_overlay_with_components(
        "test-cluster-wide-prometheus-operator",
        &[
            "../../components/cluster-wide",
            "../../components/prometheus-operator",
        ],
        &CLUSTER_WIDE_GENERATED,
    ) else {
        return;
    };
    let deployment: Deployment = rendered.one(DEPLOYMENT);
    let pod = Pod::of(&rendered, &deployment);
    let scrape_annotations = |deployment: &Deployment| -> Vec<String> {
        let template = &deployment.spec.as_ref().expect("spec").template;
        let annotations = template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.clone());
        annotations
            .unwrap_or_default()
            .into_keys()
            .filter(|key| key.starts_with("prometheus.io/"))
            .collect()
    };
    // Scraped by the PodMonitor alone: with the annotations kept, a
    // Prometheus that also scrapes by annotation would collect every series
    // twice, and fire each per-pod alert twice.
    assert_eq!(scrape_annotations(&deployment), Vec::<String>::new());
    let Some(kubectl) = common::kubectl("overlay cluster-wide, scrape annotations") else {
        return;
    };
    let ws = Workspace::new();
    ws.generate_certs();
    let without_component: Deployment = ws.render(&kubectl, "cluster-wide").one(DEPLOYMENT);
    assert_eq!(
        scrape_annotations(&without_component),
        [
            "prometheus.io/path",
            "prometheus.io/port",
            "prometheus.io/scrape"
        ]
    );
    let job = check_pod_monitor(&rendered, &pod);
    check_prometheus_rule(&rendered, &job);
    promtool_test_rules(&rendered, &job);
}

/// The alerts on the series they watch, as Prometheus evaluates them
/// (`promtool test rules`): each fires when it should, carries the
/// `namespace` label an AlertmanagerConfig routes by, and stays quiet over
/// a missed scrape or a count from long ago.
fn promtool_test_rules(r: &Rendered, job: &str) {
    let o = &r.overlay;
    let rule = r.custom("monitoring.coreos.com/v1", "PrometheusRule", DEPLOYMENT);
    let namespace = rule["metadata"]["namespace"].as_str().expect("namespace");
    let dir = tempfile::tempdir().unwrap();
    // promtool compares annotations too, templates rendered; they are
    // checked above, and this test is about when alerts fire and their labels.
    let mut groups = rule["spec"]["groups"].clone();
    for rule in groups
        .as_array_mut()
        .expect("groups")
        .iter_mut()
        .flat_map(|group| group["rules"].as_array_mut().expect("rules"))
    {
        rule.as_object_mut().expect("a rule").remove("annotations");
    }
    let rules = serde_json::json!({ "groups": groups });
    fs::write(dir.path().join("rules.json"), rules.to_string()).unwrap();
    let fail_open = format!(
        "apiserver_admission_webhook_fail_open_count{{name=\"{WEBHOOK}\", operation=\"CREATE\", type=\"admit\"}}"
    );
    let rejected = format!(
        "apiserver_admission_webhook_rejection_count{{name=\"{WEBHOOK}\", operation=\"CREATE\", \
         type=\"admit\", error_type=\"calling_webhook_error\", rejection_code=\"0\"}}"
    );
    let buckets = |counts: [u32; 3]| {
        let mut series = String::new();
        for (le, per_30s) in [
            ("0.8192", counts[0]),
            ("1.6384", counts[1]),
            ("3.2768", counts[2]),
            ("+Inf", 1000),
        ] {
            writeln!(
                series,
                "      - series: 'image_rewriter_admission_duration_seconds_bucket{{le=\"{le}\", job=\"{job}\", pod=\"p\"}}'\n        values: '0+{per_30s}x60'"
            )
            .unwrap();
        }
        series
    };
    let quiet = |eval_time: &str, alert: &str| {
        format!(
            "      - eval_time: {eval_time}\n        alertname: {alert}\n        exp_alerts: []\n"
        )
    };
    let fires = |eval_time: &str, alert: &str, labels: &str| {
        format!(
            "      - eval_time: {eval_time}\n        alertname: {alert}\n        exp_alerts:\n          - exp_labels: {{{labels}}}\n"
        )
    };
    let case = |series: &[(&str, &str)], extra_series: &str, checks: &[String]| {
        let mut text = String::from("  - interval: 30s\n    input_series:\n");
        for (name, values) in series {
            writeln!(text, "      - series: '{name}'\n        values: '{values}'").unwrap();
        }
        text.push_str(extra_series);
        text.push_str("    alert_rule_test:\n");
        for check in checks {
            text.push_str(check);
        }
        text
    };
    let warning = format!("severity: warning, namespace: {namespace}");
    let critical = format!("severity: critical, namespace: {namespace}");
    let mut tests = String::from("rule_files: [rules.json]\nevaluation_interval: 30s\ntests:\n");
    for (series, alert, labels) in [
        (&fail_open, "ImageRewriterCallsFailing", &warning),
        (&rejected, "ImageRewriterRejectingPods", &critical),
    ] {
        // Born at 1 after 10 quiet minutes: increase() cannot see it.
        tests.push_str(&case(
            &[(series, "_x20 1x40")],
            "",
            &[fires("12m", alert, labels)],
        ));
        // Counting up.
        tests.push_str(&case(
            &[(series, "0x40 1x40")],
            "",
            &[fires("22m", alert, labels)],
        ));
        // A count from long ago, flat, through a missed scrape (stale) and
        // through a six-minute gap.
        tests.push_str(&case(
            &[(series, "3x120 stale 3x60")],
            "",
            &[
                quiet("62m", alert),
                quiet("70m40s", alert),
                quiet("75m", alert),
            ],
        ));
        tests.push_str(&case(
            &[(series, "3x120 _x12 3x60")],
            "",
            &[
                quiet("70m", alert),
                quiet("76m", alert),
                quiet("80m", alert),
            ],
        ));
    }
    let up = format!("up{{job=\"{job}\", namespace=\"{namespace}\", pod=\"p\"}}");
    tests.push_str(&case(
        &[(&up, "1x10 0x20")],
        "",
        &[
            quiet("6m", "ImageRewriterDown"),
            fires("11m", "ImageRewriterDown", &critical),
        ],
    ));
    // 1.5% of reviews between 0.82 and 1.64 s: p99 interpolates to ~1.09 s
    // there, yet none took 1.64 s; then 1.5% over 1.64 s.
    tests.push_str(&case(
        &[],
        &buckets([985, 1000, 1000]),
        &[quiet("25m", "ImageRewriterSlow")],
    ));
    tests.push_str(&case(
        &[],
        &buckets([980, 985, 1000]),
        &[fires("25m", "ImageRewriterSlow", &warning)],
    ));
    let expiry = |days: u32| {
        (
            format!(
                "image_rewriter_certificate_expiration_timestamp_seconds{{job=\"{job}\", namespace=\"{namespace}\", pod=\"p\"}}"
            ),
            format!("{}x200", days * 86_400),
        )
    };
    let (series, values) = expiry(13);
    tests.push_str(&case(
        &[(&series, &values)],
        "",
        &[fires(
            "90m",
            "ImageRewriterCertificateExpiresSoon",
            &format!("severity: warning, job: {job}, namespace: {namespace}, pod: p"),
        )],
    ));
    let (series, values) = expiry(15);
    tests.push_str(&case(
        &[(&series, &values)],
        "",
        &[quiet("90m", "ImageRewriterCertificateExpiresSoon")],
    ));
    fs::write(dir.path().join("tests.yaml"), &tests).unwrap();

    let Some(output) = common::promtool(
        &["test", "rules", "tests.yaml"],
        dir.path(),
        b"",
        "alerts not evaluated",
    ) else {
        return;
    };
    assert!(
        output.status.success(),
        "{o}: promtool test rules:\n{}{}\ntests.yaml:\n{tests}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The PodMonitor selects the webhook pods, scrapes their metrics port and
/// path, and names the job after one of their labels; returns that job.
fn check_pod_monitor(r: &Rendered, pod: &Pod) -> String {
    let o = &r.overlay;
    let monitor = r.custom("monitoring.coreos.com/v1", "PodMonitor", DEPLOYMENT);
    assert_eq!(monitor["metadata"]["namespace"], pod.namespace, "{o}");
    let selector: LabelSelector =
        serde_json::from_value(monitor["spec"]["selector"].clone()).expect("PodMonitor selector");
    assert!(
        selector.match_expressions.is_none(),
        "{o}: matchLabels only"
    );
    let match_labels = selector.match_labels.unwrap_or_default();
    assert!(
        !match_labels.is_empty(),
        "{o}: PodMonitor selects every pod"
    );
    for (key, value) in &match_labels {
        assert_eq!(
            pod.labels.get(key),
            Some(value),
            "{o}: PodMonitor selector {key}={value} misses the webhook pods"
        );
    }
    let endpoints = monitor["spec"]["podMetricsEndpoints"]
        .as_array()
        .expect("podMetricsEndpoints");
    assert_eq!(endpoints.len(), 1, "{o}: one metrics endpoint");
    let port = endpoints[0]["port"].as_str().expect("endpoint port name");
    assert_eq!(
        pod.named_port(port),
        Some(pod.args.listen_port("--metrics-listen")),
        "{o}: PodMonitor port {port} must be the --metrics-listen port"
    );
    assert_eq!(endpoints[0]["path"], "/metrics", "{o}");
    let job_label = monitor["spec"]["jobLabel"].as_str().expect("jobLabel");
    pod.labels
        .get(job_label)
        .unwrap_or_else(|| panic!("{o}: jobLabel {job_label} is not a pod label"))
        .clone()
}

/// Every alert parses as PromQL, has a severity and a summary, and selects
/// only metrics that exist: `image_rewriter_*` as the server's registry
/// exports them (counters with `_total`, histograms by `_bucket`, `_sum`,
/// `_count`), `up` of the PodMonitor's job, and the kube-apiserver's
/// admission webhook metrics for this webhook's name.
fn check_prometheus_rule(r: &Rendered, job: &str) {
    use promql_parser::label::MatchOp;
    use promql_parser::parser::{self, Expr, VectorSelector};

    fn selectors<'e>(expr: &'e Expr, out: &mut Vec<&'e VectorSelector>) {
        match expr {
            Expr::VectorSelector(vs) => out.push(vs),
            Expr::MatrixSelector(ms) => out.push(&ms.vs),
            Expr::Aggregate(a) => {
                selectors(&a.expr, out);
                if let Some(param) = &a.param {
                    selectors(param, out);
                }
            }
            Expr::Unary(u) => selectors(&u.expr, out),
            Expr::Binary(b) => {
                selectors(&b.lhs, out);
                selectors(&b.rhs, out);
            }
            Expr::Paren(p) => selectors(&p.expr, out),
            Expr::Subquery(s) => selectors(&s.expr, out),
            Expr::Call(c) => c.args.args.iter().for_each(|arg| selectors(arg, out)),
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
        }
    }
    let equal_to = |vs: &VectorSelector, label: &str| -> Option<String> {
        vs.matchers
            .matchers
            .iter()
            .find(|m| m.name == label && matches!(m.op, MatchOp::Equal))
            .map(|m| m.value.clone())
    };

    let o = &r.overlay;
    let exported = exported_metrics();
    let rule = r.custom("monitoring.coreos.com/v1", "PrometheusRule", DEPLOYMENT);
    let groups = rule["spec"]["groups"].as_array().expect("groups");
    let mut alerts = BTreeSet::new();
    for rule in groups
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules"))
    {
        let alert = rule["alert"].as_str().expect("every rule is an alert");
        assert!(alerts.insert(alert.to_owned()), "{o}: alert {alert} twice");
        let text = rule["expr"].as_str().expect("expr");
        let expr = parser::parse(text).unwrap_or_else(|e| panic!("{o}: {alert}: {e}"));
        assert!(
            matches!(
                rule["labels"]["severity"].as_str(),
                Some("critical" | "warning" | "info")
            ),
            "{o}: {alert}: severity"
        );
        assert!(
            rule["annotations"]["summary"].is_string(),
            "{o}: {alert}: summary"
        );
        if let Expr::Binary(comparison) = &expr
            && let Expr::Call(call) = comparison.lhs.as_ref()
            && call.func.name == "histogram_quantile"
            && let Expr::NumberLiteral(threshold) = comparison.rhs.as_ref()
        {
            // Above the top finite bucket, histogram_quantile returns that
            // bucket's bound: the alert could never fire.
            assert!(
                threshold.val < exported.top_duration_bucket,
                "{o}: {alert}: threshold {} is not below the top bucket {}",
                threshold.val,
                exported.top_duration_bucket
            );
        }
        let mut found = Vec::new();
        selectors(&expr, &mut found);
        assert!(!found.is_empty(), "{o}: {alert} selects nothing");
        for vs in found {
            let name = vs.name.as_deref().expect("selectors name their metric");
            if name.starts_with("image_rewriter_") {
                assert!(
                    exported.names.contains(name),
                    "{o}: {alert}: the server exports no {name} (it exports {:?})",
                    exported.names
                );
                if let Some(result) = equal_to(vs, "result") {
                    let results = exported.results.get(name);
                    assert!(
                        results.is_some_and(|results| results.contains(&result)),
                        "{o}: {alert}: {name} has no result=\"{result}\" (it has {results:?})"
                    );
                }
            } else if name == "up" {
                assert_eq!(equal_to(vs, "job").as_deref(), Some(job), "{o}: {alert}");
            } else if name.starts_with("apiserver_admission_webhook_") {
                assert!(
                    APISERVER_WEBHOOK_METRICS.contains(&name),
                    "{o}: {alert}: {name} is not a kube-apiserver metric"
                );
                assert_eq!(
                    equal_to(vs, "name").as_deref(),
                    Some(WEBHOOK),
                    "{o}: {alert}"
                );
            } else {
                panic!("{o}: {alert}: unexpected metric {name}");
            }
        }
    }
    for metric in [
        "image_rewriter_config_last_reload_successful",
        "image_rewriter_config_rules",
        "image_rewriter_certificate_last_reload_successful",
        "image_rewriter_certificate_expiration_timestamp_seconds",
    ] {
        assert!(
            groups
                .iter()
                .flat_map(|g| g["rules"].as_array().unwrap())
                .any(|rule| rule["expr"].as_str().unwrap().contains(metric)),
            "{o}: no alert on {metric}"
        );
    }
}

/// The kube-apiserver's admission webhook metrics, from
/// k8s.io/apiserver/pkg/admission/metrics (v1.34).
const APISERVER_WEBHOOK_METRICS: [&str; 4] = [
    "apiserver_admission_webhook_fail_open_count",
    "apiserver_admission_webhook_rejection_count",
    "apiserver_admission_webhook_request_total",
    "apiserver_admission_webhook_admission_duration_seconds_bucket",
];

/// What the server's registry exports, read from a fresh registry's
/// exposition: every series name as Prometheus stores it (counters with
/// `_total`, histograms by `_bucket`, `_sum`, `_count`), every `result`
/// label value of each, and the duration histogram's largest finite bucket.
struct Exported {
    names: BTreeSet<String>,
    results: BTreeMap<String, BTreeSet<String>>,
    top_duration_bucket: f64,
}

fn exported_metrics() -> Exported {
    use image_rewriter::metrics::{Metrics, RuleLabel};
    let metrics = Metrics::new();
    // The two families whose series appear only once set.
    metrics
        .images_rewritten
        .get_or_create(&RuleLabel {
            rule: "docker.io".into(),
        })
        .inc();
    metrics.certificate_expiration.set(Some(0));
    let text = metrics.encode();
    let mut exported = Exported {
        names: BTreeSet::new(),
        results: BTreeMap::new(),
        top_duration_bucket: 0.0,
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            for suffix in suffixes {
                exported.names.insert(format!("{name}{suffix}"));
            }
        } else if !line.starts_with('#') {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            if let Some(result) = line
                .split_once("result=\"")
                .and_then(|(_, rest)| rest.split('"').next())
            {
                exported
                    .results
                    .entry(name.to_owned())
                    .or_default()
                    .insert(result.to_owned());
            }
            if let Some(le) = line
                .strip_prefix("image_rewriter_admission_duration_seconds_bucket{le=\"")
                .and_then(|rest| rest.split('"').next())
                .and_then(|le| le.parse::<f64>().ok())
                .filter(|le| le.is_finite())
            {
                exported.top_duration_bucket = exported.top_duration_bucket.max(le);
            }
        }
    }
    exported
}

/// Every directory under manifests/overlays is one of the overlays checked
/// above: a new overlay must get a test.
#[test]
fn every_overlay_is_checked() {
    let found: BTreeSet<String> = fs::read_dir(repo_path("manifests/overlays"))
        .expect("read manifests/overlays")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let checked: BTreeSet<String> = [
        "cluster-wide",
        "opt-in",
        "cluster-wide-cert-manager",
        "opt-in-cert-manager",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(
        found, checked,
        "manifests/overlays/ and the overlays this test checks differ"
    );
}

/// Installing into another namespace: kustomize's `namespace:` moves every
/// namespaced object and rewrites the references it knows (the webhook's
/// `clientConfig.service.namespace`, the binding's subject), but not the
/// namespace written inside other values. Each shipped overlay (and the
/// monitoring component) is rendered under such an override, every place
/// that still names the old namespace is found, and each must be one that
/// README's paragraph on namespace overrides tells the user to change: left
/// as it is, the webhook's own namespace is sent to it, its `caBundle` is
/// never injected (every call fails TLS), or the Secret-write policy no
/// longer applies to its account.
#[test]
fn a_namespace_override_leaves_behind_only_what_the_readme_says_to_change() {
    const OTHER: &str = "platform-webhooks";
    // (kind, where, the words README's paragraph must have for it)
    const KNOWN: [(&str, &str, &str); 5] = [
        (
            "MutatingWebhookConfiguration",
            "webhooks.namespaceSelector.matchExpressions.values",
            "namespaceSelector",
        ),
        (
            "MutatingWebhookConfiguration",
            "metadata.annotations.cert-manager.io/inject-ca-from",
            "cert-manager.io/inject-ca-from",
        ),
        ("Certificate", "spec.dnsNames", "DNS names"),
        (
            "ValidatingAdmissionPolicy",
            "spec.matchConditions.expression",
            "matchConditions",
        ),
        (
            "PrometheusRule",
            "spec.groups.rules.labels.namespace",
            "PrometheusRule",
        ),
    ];
    let Some(kubectl) = common::kubectl("namespace override") else {
        return;
    };
    let readme = fs::read_to_string(repo_path("README.md")).expect("README.md");
    // The list item, its lines joined.
    let paragraph = readme
        .split("\n- ")
        .map(|item| item.split("\n\n").next().unwrap_or(item))
        .map(|item| item.split_whitespace().collect::<Vec<_>>().join(" "))
        .find(|item| item.contains("kustomize `namespace:` override"))
        .expect("README.md: a list item on a kustomize `namespace:` override");

    let ws = Workspace::new();
    ws.generate_certs();
    ws.write_overlay(
        "test-cert-manager-prometheus-operator",
        &[
            "../../components/cluster-wide",
            "../../components/cert-manager",
            "../../components/prometheus-operator",
        ],
    );
    let mut stale: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for overlay in [
        "cluster-wide",
        "opt-in",
        "cluster-wide-cert-manager",
        "opt-in-cert-manager",
        "test-cert-manager-prometheus-operator",
    ] {
        let moved = format!("test-{overlay}-in-{OTHER}");
        let dir = ws.dir.path().join("manifests/overlays").join(&moved);
        fs::create_dir_all(&dir).expect("mkdir overlay");
        fs::write(
            dir.join("kustomization.yaml"),
            format!(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
                 namespace: {OTHER}\nresources:\n  - ../{overlay}\n"
            ),
        )
        .expect("write overlay");
        let r = ws.render(&kubectl, &moved);
        for obj in &r.objects {
            let kind = obj["kind"].as_str().unwrap_or_default().to_owned();
            names_the_namespace(obj, NAMESPACE, &mut Vec::new(), &mut |path| {
                stale
                    .entry((kind.clone(), path))
                    .or_default()
                    .insert(overlay.to_owned());
            });
        }
    }
    assert!(
        !stale.is_empty(),
        "no reference to the namespace found: is the search still looking?"
    );
    let mut untold = Vec::new();
    for ((kind, path), overlays) in &stale {
        match KNOWN.iter().find(|(k, p, _)| k == kind && p == path) {
            None => untold.push(format!(
                "{kind} {path} (overlays {overlays:?}): not among the places this test knows"
            )),
            Some((_, _, words)) if !paragraph.contains(words) => untold.push(format!(
                "{kind} {path} (overlays {overlays:?}): the paragraph does not mention {words}"
            )),
            Some(_) => {}
        }
    }
    assert!(
        untold.is_empty(),
        "under a `namespace: {OTHER}` override these still name namespace {NAMESPACE}, and \
         README.md's paragraph on such an override does not say to change them:\n  {}\n\
         The paragraph: {paragraph}",
        untold.join("\n  ")
    );
}

/// Calls `found` with the path (object keys joined by `.`, list indices
/// left out) of every string in `value` that names `namespace` as a
/// namespace: a value of a `namespace` key or of a namespaceSelector's
/// expression, `namespace/name`, a Service's DNS name in it
/// (`service.namespace`, `service.namespace.svc...`), or a ServiceAccount
/// user name `system:serviceaccount:namespace:name`.
fn names_the_namespace(
    value: &Value,
    namespace: &str,
    path: &mut Vec<String>,
    found: &mut dyn FnMut(String),
) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                path.push(key.clone());
                names_the_namespace(value, namespace, path, found);
                path.pop();
            }
        }
        Value::Array(items) => {
            for item in items {
                names_the_namespace(item, namespace, path, found);
            }
        }
        Value::String(text) => {
            let joined = path.join(".");
            let exact = text == namespace
                && (path.last().is_some_and(|key| key == "namespace")
                    || joined.contains("namespaceSelector"));
            // service.namespace, service.namespace.svc[.cluster.local]
            let labels: Vec<&str> = text.split('.').collect();
            let dns = labels.len() >= 2
                && labels[1] == namespace
                && labels.get(2).is_none_or(|third| *third == "svc");
            if exact
                || text.starts_with(&format!("{namespace}/"))
                || dns
                || text.contains(&format!("system:serviceaccount:{namespace}:"))
            {
                found(joined);
            }
        }
        _ => {}
    }
}

/// An overlay of the base, `components` and the generated certificates,
/// rendered and checked like a shipped one; `None` without kubectl.
fn check_overlay_with_components(
    overlay: &str,
    components: &[&str],
    expect: &Expect,
) -> Option<Rendered> {
    let kubectl = common::kubectl(&format!("overlay {overlay}"))?;
    let ws = Workspace::new();
    ws.generate_certs();
    let mut with_certs = components.to_vec();
    with_certs.push("../../../certs");
    ws.write_overlay(overlay, &with_certs);
    let rendered = ws.render(&kubectl, overlay);
    check_rendered(&ws, &rendered, expect);
    Some(rendered)
}

fn check_overlay(overlay: &str, expect: &Expect) {
    let Some(kubectl) = common::kubectl(&format!("overlay {overlay}")) else {
        return;
    };
    let ws = Workspace::new();
    if expect.certs == CertSource::Generated {
        ws.generate_certs();
    }
    let rendered = ws.render(&kubectl, overlay);
    check_rendered(&ws, &rendered, expect);
}

fn check_rendered(ws: &Workspace, r: &Rendered, expect: &Expect) {
    let deployment: Deployment = r.one(DEPLOYMENT);
    let service: Service = r.one(SERVICE);
    let mwc: MutatingWebhookConfiguration = r.one(WEBHOOK_CONFIGURATION);
    let pdb: PodDisruptionBudget = r.one(DEPLOYMENT);
    let netpol: NetworkPolicy = r.one(DEPLOYMENT);
    let config_map: ConfigMap = r.one(CONFIG_MAP);
    let _namespace: Namespace = r.one(NAMESPACE);
    // Every typed object decodes strictly, including those not checked below.
    let _: Vec<ServiceAccount> = r.all();
    let _: Vec<Secret> = r.all();

    check_namespaces(r);

    let webhooks = mwc.webhooks.as_deref().unwrap_or_default();
    assert_eq!(
        webhooks.len(),
        1,
        "{}: exactly one webhook expected",
        r.overlay
    );
    let webhook = &webhooks[0];

    let pod = Pod::of(r, &deployment);
    check_webhook(r, webhook, &pod, expect);
    check_deployment(r, &deployment, &pod);
    check_ports(r, webhook, &service, &pod);
    check_mounts(r, &pod, &config_map, expect.certs);
    check_selectors(r, &service, &pdb, &netpol, &pod);
    check_certificate(ws, r, &mwc, webhook, expect.certs);
    check_config_map(r, &config_map);
    check_rbac(r, &config_map, &deployment);
    check_new_copies_follow_the_scope(r, expect.scope);
}

/// The webhook's API access is exactly what pull secret sync needs: the
/// rules' pull secret names (get/list/watch/update) and create, bound to the
/// Deployment's ServiceAccount, and nothing else.
fn check_rbac(r: &Rendered, config_map: &ConfigMap, deployment: &Deployment) {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    let o = &r.overlay;
    assert!(
        r.all::<Role>().is_empty() && r.all::<RoleBinding>().is_empty(),
        "{o}: unexpected Role"
    );
    let roles: Vec<ClusterRole> = r.all();
    assert_eq!(roles.len(), 1, "{o}: one ClusterRole");
    let rules = roles[0].rules.clone().unwrap_or_default();
    let config: serde_json::Value =
        serde_yaml_ng::from_str(&config_map.data.as_ref().unwrap()[CONFIG_KEY]).unwrap();
    let mut secret_names: Vec<String> = config["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|rule| rule["pullSecret"].as_str().map(str::to_owned))
        .collect();
    secret_names.sort();
    secret_names.dedup();
    for rule in &rules {
        assert_eq!(
            rule.api_groups.as_deref(),
            Some(&[String::new()][..]),
            "{o}: core group only"
        );
        assert_eq!(
            rule.resources.as_deref(),
            Some(&["secrets".to_owned()][..]),
            "{o}: secrets only"
        );
    }
    let named: Vec<_> = rules
        .iter()
        .filter(|r| r.resource_names.is_some())
        .collect();
    let unnamed: Vec<_> = rules
        .iter()
        .filter(|r| r.resource_names.is_none())
        .collect();
    assert_eq!(named.len(), 1, "{o}: one rule restricted by name");
    assert_eq!(named[0].verbs, ["get", "list", "watch", "update"], "{o}");
    let mut granted = named[0].resource_names.clone().unwrap();
    granted.sort();
    assert_eq!(
        granted, secret_names,
        "{o}: resourceNames must be the config's pull secrets"
    );
    // The webhook's own image comes from the private registry, with the
    // source pull secret its namespace holds for the copies.
    let own_pull_secrets: Vec<String> = deployment
        .spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .and_then(|pod| pod.image_pull_secrets.as_ref())
        .into_iter()
        .flatten()
        .map(|secret| secret.name.clone())
        .collect();
    assert!(
        !own_pull_secrets.is_empty()
            && own_pull_secrets
                .iter()
                .all(|name| secret_names.contains(name)),
        "{o}: the Deployment's imagePullSecrets {own_pull_secrets:?} must name the config's pull secrets {secret_names:?}"
    );
    assert_eq!(unnamed.len(), 1, "{o}: one unnamed rule");
    assert_eq!(
        unnamed[0].verbs,
        ["create"],
        "{o}: only create is unrestricted by name"
    );

    let bindings: Vec<ClusterRoleBinding> = r.all();
    assert_eq!(bindings.len(), 1, "{o}: one ClusterRoleBinding");
    let binding = &bindings[0];
    assert_eq!(
        binding.role_ref.name,
        roles[0].metadata.name.clone().unwrap()
    );
    let spec = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let subjects = binding.subjects.clone().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "{o}");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(
        Some(&subjects[0].name),
        spec.service_account_name.as_ref(),
        "{o}: bound to the pods' account"
    );
    assert_eq!(
        subjects[0].namespace.as_deref(),
        deployment.metadata.namespace.as_deref()
    );
    check_secret_writes_policy(r, &subjects[0], &granted);
}

/// The ValidatingAdmissionPolicy that narrows the account's Secret writes
/// is bound, denies, fails closed, and names the very account RBAC binds.
/// (What it allows and refuses is tested against a real apiserver, in
/// tests/e2e.rs.)
fn check_secret_writes_policy(
    r: &Rendered,
    account: &k8s_openapi::api::rbac::v1::Subject,
    granted_names: &[String],
) {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    let o = &r.overlay;
    let policies: Vec<ValidatingAdmissionPolicy> = r.all();
    assert_eq!(policies.len(), 1, "{o}: one ValidatingAdmissionPolicy");
    let policy = &policies[0];
    let spec = policy.spec.as_ref().expect("policy spec");
    assert_eq!(spec.failure_policy.as_deref(), Some("Fail"), "{o}");
    let rules = spec
        .match_constraints
        .as_ref()
        .and_then(|c| c.resource_rules.clone())
        .unwrap_or_default();
    assert_eq!(rules.len(), 1, "{o}");
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["secrets".to_owned()][..])
    );
    assert_eq!(
        rules[0].operations.as_deref(),
        Some(&["CREATE".to_owned(), "UPDATE".to_owned()][..])
    );
    let user = format!(
        "system:serviceaccount:{}:{}",
        account.namespace.as_deref().unwrap_or_default(),
        account.name
    );
    let conditions = spec.match_conditions.clone().unwrap_or_default();
    assert_eq!(conditions.len(), 1, "{o}");
    assert_eq!(
        conditions[0].expression,
        format!("request.userInfo.username == {user:?}"),
        "{o}: the policy must match the account RBAC binds"
    );
    let validations = spec.validations.clone().unwrap_or_default();
    let mut names: Vec<String> = validations
        .iter()
        .find_map(|v| v.expression.strip_prefix("object.metadata.name in "))
        .map(|list| serde_json::from_str(list).expect("a list of quoted names"))
        .expect("a validation of the Secret's name");
    names.sort();
    assert_eq!(
        names, granted_names,
        "{o}: the policy's names must be RBAC's resourceNames (the config's pull secrets)"
    );

    let bindings: Vec<ValidatingAdmissionPolicyBinding> = r.all();
    assert_eq!(
        bindings.len(),
        1,
        "{o}: one ValidatingAdmissionPolicyBinding"
    );
    let binding = bindings[0].spec.as_ref().expect("binding spec");
    assert_eq!(binding.policy_name, policy.metadata.name, "{o}");
    assert_eq!(
        binding.validation_actions.as_deref(),
        Some(&["Deny".to_owned()][..]),
        "{o}"
    );
}

/// New pull secret copies go only where the scope rewrites pods: never
/// into a namespace labelled `false`, and in opt-in mode only into one
/// labelled `true`, whatever namespace a review names (anything that
/// reaches port 8443 can send one). Enforced by the apiserver, tested in
/// tests/e2e.rs; here, each overlay carries the validations of its scope.
fn check_new_copies_follow_the_scope(r: &Rendered, scope: Scope) {
    use k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy;
    let o = &r.overlay;
    let policy: Vec<ValidatingAdmissionPolicy> = r.all();
    let validations = policy[0]
        .spec
        .as_ref()
        .and_then(|spec| spec.validations.clone())
        .unwrap_or_default();
    let on_create_where_labelled = |value: &str| {
        validations.iter().any(|v| {
            v.expression
                .starts_with("request.operation != \"CREATE\" ||")
                && v.expression
                    .contains("namespaceObject.metadata.labels[variables.enabledLabel]")
                && v.expression.ends_with(value)
        })
    };
    assert!(
        on_create_where_labelled("!= \"false\""),
        "{o}: no validation keeps new copies out of namespaces labelled false"
    );
    assert_eq!(
        on_create_where_labelled("== \"true\")"),
        scope == Scope::OptIn,
        "{o}: new copies only into namespaces labelled true is opt-in mode's validation"
    );
    let variables = policy[0]
        .spec
        .as_ref()
        .and_then(|spec| spec.variables.clone())
        .unwrap_or_default();
    assert!(
        variables
            .iter()
            .any(|v| v.name == "enabledLabel" && v.expression == format!("{ENABLED_LABEL:?}")),
        "{o}: the policy's enabledLabel is the scope label"
    );
}

/// The webhook's own objects live in its namespace: a namespaced object
/// without one would land in whatever namespace kubectl's context says.
fn check_namespaces(r: &Rendered) {
    const CLUSTER_SCOPED: [&str; 7] = [
        "Namespace",
        "PriorityClass",
        "MutatingWebhookConfiguration",
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ];
    for obj in &r.objects {
        let kind = obj["kind"].as_str().unwrap_or_default();
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        if CLUSTER_SCOPED.contains(&kind) {
            assert!(
                obj["metadata"].get("namespace").is_none(),
                "{}: cluster-scoped {kind} {name} has a namespace",
                r.overlay
            );
        } else {
            assert_eq!(
                obj["metadata"]["namespace"].as_str(),
                Some(NAMESPACE),
                "{}: {kind} {name} is not in namespace {NAMESPACE}",
                r.overlay
            );
        }
    }
}

fn check_webhook(r: &Rendered, w: &MutatingWebhook, pod: &Pod, expect: &Expect) {
    let o = &r.overlay;
    assert_eq!(w.name, WEBHOOK, "{o}: webhook name");
    assert!(
        w.name.split('.').count() >= 3,
        "{o}: a webhook name needs three DNS segments"
    );
    assert_eq!(
        w.admission_review_versions,
        ["v1"],
        "{o}: admissionReviewVersions"
    );
    // Pull secret copies are a side effect, skipped on dry-run requests.
    assert_eq!(w.side_effects, "NoneOnDryRun", "{o}: sideEffects");
    assert_eq!(
        w.reinvocation_policy.as_deref(),
        Some("IfNeeded"),
        "{o}: reinvocationPolicy"
    );
    assert_eq!(
        w.match_policy.as_deref(),
        Some("Equivalent"),
        "{o}: matchPolicy"
    );
    assert_eq!(
        w.failure_policy.as_deref(),
        Some(expect.failure_policy),
        "{o}: failurePolicy"
    );
    let timeout = w
        .timeout_seconds
        .expect("timeoutSeconds set (the default is 10)");
    assert!(
        (1..=10).contains(&timeout),
        "{o}: timeoutSeconds {timeout} should be short"
    );

    // Exactly Pod CREATE and the ephemeral-containers UPDATE of `kubectl debug`.
    let mut rules = BTreeSet::new();
    for rule in w.rules.as_deref().unwrap_or_default() {
        let scope = rule.scope.clone().unwrap_or_else(|| "*".into());
        for op in rule.operations.as_deref().unwrap_or_default() {
            for group in rule.api_groups.as_deref().unwrap_or_default() {
                for version in rule.api_versions.as_deref().unwrap_or_default() {
                    for resource in rule.resources.as_deref().unwrap_or_default() {
                        rules.insert(format!("{op} {group}/{version} {resource} {scope}"));
                    }
                }
            }
        }
    }
    let expected: BTreeSet<String> = [
        "CREATE /v1 pods Namespaced",
        "UPDATE /v1 pods/ephemeralcontainers Namespaced",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(rules, expected, "{o}: webhook rules");

    // Mirror pods are never sent (the e2e suite has the apiserver evaluate
    // the expression; here, that every overlay keeps it).
    let conditions: Vec<(&str, &str)> = w
        .match_conditions
        .iter()
        .flatten()
        .map(|c| (c.name.as_str(), c.expression.as_str()))
        .collect();
    assert_eq!(
        conditions,
        [(
            "not-a-mirror-pod",
            "!has(object.metadata.annotations) || \
             !('kubernetes.io/config.mirror' in object.metadata.annotations)"
        )],
        "{o}: matchConditions"
    );

    // The namespaceSelector: the name-based exclusion of the system namespaces
    // and the webhook's own, then the scope's label expression.
    let ns_sel = w.namespace_selector.as_ref().expect("namespaceSelector");
    assert!(
        ns_sel.match_labels.as_ref().is_none_or(BTreeMap::is_empty),
        "{o}: namespaceSelector.matchLabels is not expected"
    );
    let exprs = ns_sel.match_expressions.as_deref().unwrap_or_default();
    let mut shapes: Vec<(String, String, BTreeSet<String>)> = exprs
        .iter()
        .map(|e| {
            (
                e.key.clone(),
                e.operator.clone(),
                e.values.iter().flatten().cloned().collect(),
            )
        })
        .collect();
    shapes.sort();
    let by_name = shapes
        .iter()
        .find(|(k, op, _)| k == NAME_LABEL && op == "NotIn")
        .unwrap_or_else(|| panic!("{o}: no `{NAME_LABEL} NotIn [...]` in namespaceSelector"));
    for ns in ALWAYS_EXCLUDED
        .iter()
        .copied()
        .chain([pod.namespace.as_str()])
    {
        assert!(
            by_name.2.contains(ns),
            "{o}: namespaceSelector does not exclude {ns} by name"
        );
    }
    // Under Fail, cert-manager's pods must not wait on the webhook whose
    // certificate it keeps; under Ignore they never wait, and their images
    // are rewritten like any others.
    assert_eq!(
        by_name.2.contains("cert-manager"),
        expect.failure_policy == "Fail",
        "{o}: the cert-manager namespace is left out exactly when the webhook fails closed"
    );
    let (op, value) = match expect.scope {
        Scope::ClusterWide => ("NotIn", "false"),
        Scope::OptIn => ("In", "true"),
    };
    let scope_expr = (
        ENABLED_LABEL.to_string(),
        op.to_string(),
        BTreeSet::from([value.to_string()]),
    );
    assert!(
        shapes.contains(&scope_expr),
        "{o}: namespaceSelector lacks {scope_expr:?}: {shapes:?}"
    );
    assert_eq!(
        shapes.len(),
        2,
        "{o}: unexpected namespaceSelector expressions: {shapes:?}"
    );

    // And what that selects, the way the apiserver evaluates it.
    let cases: [(&str, Option<&str>, bool, bool); 9] = [
        // namespace, its enabled label, selected cluster-wide, selected opt-in
        ("default", None, true, false),
        ("team-a", Some("true"), true, true),
        ("team-b", Some("false"), false, false),
        ("team-c", Some("yes"), true, false),
        ("kube-system", Some("true"), false, false),
        ("kube-public", None, false, false),
        ("kube-node-lease", Some("true"), false, false),
        (NAMESPACE, Some("true"), false, false),
        (NAMESPACE, None, false, false),
    ];
    for (ns, label, cluster_wide, opt_in) in cases {
        let mut labels = BTreeMap::from([(NAME_LABEL.to_string(), ns.to_string())]);
        if let Some(v) = label {
            labels.insert(ENABLED_LABEL.to_string(), v.to_string());
        }
        let want = if expect.scope == Scope::ClusterWide {
            cluster_wide
        } else {
            opt_in
        };
        assert_eq!(
            selects(ns_sel, &labels),
            want,
            "{o}: namespace {ns} labelled {label:?}: sent to the webhook?"
        );
    }

    // The objectSelector lets a single pod opt out, in either scope.
    let obj_sel = w.object_selector.as_ref().expect("objectSelector");
    let obj_exprs: Vec<(String, String, Vec<String>)> = obj_sel
        .match_expressions
        .iter()
        .flatten()
        .map(|e| {
            (
                e.key.clone(),
                e.operator.clone(),
                e.values.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        obj_exprs,
        [(
            ENABLED_LABEL.to_string(),
            "NotIn".to_string(),
            vec!["false".to_string()]
        )],
        "{o}: objectSelector"
    );
    assert!(obj_sel.match_labels.as_ref().is_none_or(BTreeMap::is_empty));
    for (label, want) in [(None, true), (Some("true"), true), (Some("false"), false)] {
        let labels: BTreeMap<String, String> = label
            .map(|v| (ENABLED_LABEL.to_string(), v.to_string()))
            .into_iter()
            .collect();
        assert_eq!(
            selects(obj_sel, &labels),
            want,
            "{o}: pod labelled {label:?}: sent?"
        );
    }

    let service = w
        .client_config
        .service
        .as_ref()
        .expect("clientConfig.service");
    assert!(
        w.client_config.url.is_none(),
        "{o}: clientConfig.url and .service are exclusive"
    );
    assert_eq!(service.name, SERVICE, "{o}: clientConfig.service.name");
    assert_eq!(
        service.namespace, pod.namespace,
        "{o}: clientConfig.service.namespace"
    );
    assert_eq!(
        service.path.as_deref(),
        Some("/mutate"),
        "{o}: clientConfig.service.path"
    );
    assert_eq!(service.port, Some(443), "{o}: clientConfig.service.port");
}

fn check_deployment(r: &Rendered, d: &Deployment, pod: &Pod) {
    let o = &r.overlay;
    let spec = d.spec.as_ref().expect("Deployment spec");
    let replicas = spec.replicas.unwrap_or(1);
    assert!(
        replicas >= 2,
        "{o}: {replicas} replica(s): a single webhook pod is an outage per rollout"
    );
    assert!(
        selects(&spec.selector, &pod.labels),
        "{o}: the Deployment's selector does not select its own pod template"
    );
    let rolling_update = spec
        .strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref());
    assert_eq!(
        rolling_update.and_then(|ru| ru.max_unavailable.clone()),
        Some(IntOrString::Int(0)),
        "{o}: rollouts should never drop below the ready replicas"
    );

    let ps = &pod.spec;
    let c = &pod.container;
    assert!(
        c.command.is_none(),
        "{o}: the image's ENTRYPOINT runs the binary; set args only"
    );
    assert_eq!(
        pod.args.subcommand, "serve",
        "{o}: container args start with `serve`"
    );
    assert!(
        c.image.as_deref().is_some_and(|i| !i.is_empty()),
        "{o}: container image"
    );
    assert_eq!(
        pod.args.get("--log-format"),
        Some("json"),
        "{o}: --log-format json in a cluster"
    );

    // Namespace from the downward API (the server always excludes its own).
    let env = c.env.as_deref().unwrap_or_default();
    let ns_env = env
        .iter()
        .find(|e| e.name == "IMAGE_REWRITER_NAMESPACE")
        .unwrap_or_else(|| panic!("{o}: no IMAGE_REWRITER_NAMESPACE env"));
    let field = ns_env
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .unwrap_or_else(|| panic!("{o}: IMAGE_REWRITER_NAMESPACE must come from a fieldRef"));
    assert_eq!(
        field.field_path, "metadata.namespace",
        "{o}: IMAGE_REWRITER_NAMESPACE fieldRef"
    );

    // Probes: HTTPS on the webhook port.
    let https_port = pod.args.listen_port("--listen");
    for (probe, path) in [
        (&c.readiness_probe, "/readyz"),
        (&c.liveness_probe, "/healthz"),
    ] {
        let probe = probe
            .as_ref()
            .unwrap_or_else(|| panic!("{o}: no probe for {path}"));
        let get = probe
            .http_get
            .as_ref()
            .unwrap_or_else(|| panic!("{o}: {path} probe is not httpGet"));
        assert_eq!(get.path.as_deref(), Some(path), "{o}: probe path");
        assert_eq!(
            get.scheme.as_deref(),
            Some("HTTPS"),
            "{o}: {path} probe scheme"
        );
        assert_eq!(
            pod.resolve_port(&get.port, &format!("{o}: {path} probe")),
            https_port,
            "{o}: {path} probe port"
        );
        assert!(
            get.host.is_none(),
            "{o}: {path} probe must go to the pod IP"
        );
    }

    // Security: non-root, read-only root, no privilege, RuntimeDefault seccomp.
    assert_ne!(ps.host_network, Some(true), "{o}: hostNetwork");
    assert_ne!(ps.host_pid, Some(true), "{o}: hostPID");
    let csc = c.security_context.clone().unwrap_or_default();
    let psc = ps.security_context.clone().unwrap_or_default();
    assert_eq!(
        csc.run_as_non_root.or(psc.run_as_non_root),
        Some(true),
        "{o}: runAsNonRoot"
    );
    assert_eq!(
        csc.run_as_user.or(psc.run_as_user),
        Some(65532),
        "{o}: runAsUser"
    );
    assert_eq!(
        csc.read_only_root_filesystem,
        Some(true),
        "{o}: readOnlyRootFilesystem"
    );
    assert_eq!(
        csc.allow_privilege_escalation,
        Some(false),
        "{o}: allowPrivilegeEscalation"
    );
    assert_ne!(csc.privileged, Some(true), "{o}: privileged");
    let caps = csc.capabilities.clone().unwrap_or_default();
    assert!(
        caps.drop.iter().flatten().any(|cap| cap == "ALL"),
        "{o}: capabilities.drop ALL"
    );
    assert!(
        caps.add.unwrap_or_default().is_empty(),
        "{o}: no capabilities added"
    );
    let seccomp = csc.seccomp_profile.or(psc.seccomp_profile).map(|s| s.type_);
    assert_eq!(
        seccomp.as_deref(),
        Some("RuntimeDefault"),
        "{o}: seccompProfile"
    );

    // Resources.
    let res = c.resources.clone().unwrap_or_default();
    let requests = res.requests.unwrap_or_default();
    let limits = res.limits.unwrap_or_default();
    assert!(
        requests.contains_key("cpu") && requests.contains_key("memory"),
        "{o}: requests"
    );
    assert!(limits.contains_key("memory"), "{o}: memory limit");

    // Shutdown: enough time to stop being ready and drain in-flight reviews.
    let grace = ps.termination_grace_period_seconds.unwrap_or(30);
    assert!(
        grace >= 30,
        "{o}: terminationGracePeriodSeconds {grace} is short"
    );
    // A preStop sleep keeps the pod serving while it leaves the endpoints; it
    // counts against the grace period.
    let pre_stop_sleep = c
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|h| h.sleep.as_ref())
        .map(|s| s.seconds)
        .unwrap_or_else(|| panic!("{o}: no preStop sleep"));
    assert!(
        (1..=15).contains(&pre_stop_sleep) && pre_stop_sleep + 20 <= grace,
        "{o}: preStop sleep {pre_stop_sleep}s vs terminationGracePeriodSeconds {grace}"
    );

    // Replicas on different nodes when possible.
    let anti = ps
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .unwrap_or_else(|| panic!("{o}: no podAntiAffinity"));
    let spread = anti
        .preferred_during_scheduling_ignored_during_execution
        .iter()
        .flatten()
        .map(|w| &w.pod_affinity_term)
        .chain(
            anti.required_during_scheduling_ignored_during_execution
                .iter()
                .flatten(),
        )
        .any(|t| {
            t.topology_key == "kubernetes.io/hostname"
                && t.label_selector
                    .as_ref()
                    .is_some_and(|s| selects(s, &pod.labels))
        });
    assert!(
        spread,
        "{o}: no anti-affinity on kubernetes.io/hostname selecting the webhook pods"
    );
    // And over zones, where the nodes have them (losing one zone then
    // leaves a replica), as a preference: one zone still takes both.
    let zones = ps.topology_spread_constraints.iter().flatten().any(|c| {
        c.topology_key == "topology.kubernetes.io/zone"
            && c.max_skew == 1
            && c.when_unsatisfiable == "ScheduleAnyway"
            && c.match_label_keys.as_deref() == Some(&["pod-template-hash".to_owned()][..])
            && c.label_selector
                .as_ref()
                .is_some_and(|s| selects(s, &pod.labels))
    });
    assert!(
        zones,
        "{o}: no ScheduleAnyway spread over topology.kubernetes.io/zone selecting the webhook \
         pods of one rollout (matchLabelKeys: [pod-template-hash])"
    );

    // The service account exists.
    let sa = ps.service_account_name.as_deref().unwrap_or("default");
    let _: ServiceAccount = r.one(sa);
}

/// clientConfig.service -> Service port -> container port -> `serve --listen`,
/// and the metrics port the same way.
fn check_ports(r: &Rendered, w: &MutatingWebhook, svc: &Service, pod: &Pod) {
    let o = &r.overlay;
    let https_port = pod.args.listen_port("--listen");
    let metrics_port = pod.args.listen_port("--metrics-listen");
    assert_eq!(https_port, 8443, "{o}: --listen port");
    assert_eq!(metrics_port, 9090, "{o}: --metrics-listen port");
    for flag in ["--listen", "--metrics-listen"] {
        let host = pod
            .args
            .get(flag)
            .and_then(|a| a.rsplit_once(':'))
            .map(|(h, _)| h);
        assert!(
            matches!(host, Some("0.0.0.0" | "[::]" | "")),
            "{o}: {flag} must bind all interfaces for the kubelet and the Service, got {host:?}"
        );
    }
    assert_eq!(
        pod.named_port("https"),
        Some(https_port),
        "{o}: container port `https`"
    );
    assert_eq!(
        pod.named_port("metrics"),
        Some(metrics_port),
        "{o}: container port `metrics`"
    );

    let spec = svc.spec.as_ref().expect("Service spec");
    let ports = spec.ports.as_deref().unwrap_or_default();
    let client_port = w
        .client_config
        .service
        .as_ref()
        .and_then(|s| s.port)
        .unwrap_or(443);
    let webhook_port = ports
        .iter()
        .find(|p| p.port == client_port)
        .unwrap_or_else(|| panic!("{o}: Service has no port {client_port} for the webhook"));
    let target = webhook_port
        .target_port
        .clone()
        .unwrap_or(IntOrString::Int(webhook_port.port));
    assert_eq!(
        pod.resolve_port(&target, &format!("{o}: Service port {client_port}")),
        https_port,
        "{o}: Service {client_port} -> container"
    );
    assert_eq!(
        webhook_port.name.as_deref(),
        Some("https"),
        "{o}: Service port name"
    );
    let metrics = ports
        .iter()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .unwrap_or_else(|| panic!("{o}: Service has no port named metrics"));
    assert_eq!(metrics.port, 9090, "{o}: Service metrics port");
    let target = metrics
        .target_port
        .clone()
        .unwrap_or(IntOrString::Int(metrics.port));
    assert_eq!(
        pod.resolve_port(&target, &format!("{o}: Service port metrics")),
        metrics_port,
        "{o}: Service metrics -> container"
    );
    for p in ports {
        assert!(
            p.protocol.as_deref().is_none_or(|p| p == "TCP"),
            "{o}: Service protocol"
        );
    }
    assert!(
        spec.type_.as_deref().is_none_or(|t| t == "ClusterIP"),
        "{o}: the webhook Service needs no external exposure"
    );
}

/// The `serve` file arguments point into read-only, whole-directory mounts of
/// the ConfigMap and the TLS Secret, and the files are keys those carry.
fn check_mounts(r: &Rendered, pod: &Pod, config_map: &ConfigMap, certs: CertSource) {
    let o = &r.overlay;
    let secret: Option<Secret> = r.maybe_one(TLS_SECRET);
    for (flag, want_key) in [
        ("--config", CONFIG_KEY),
        ("--tls-cert", "tls.crt"),
        ("--tls-key", "tls.key"),
    ] {
        let path = pod
            .args
            .get(flag)
            .unwrap_or_else(|| panic!("{o}: serve lacks {flag}"));
        let (dir, file) = path.rsplit_once('/').expect("an absolute file path");
        let mounts = pod.container.volume_mounts.as_deref().unwrap_or_default();
        let mount = mounts
            .iter()
            .find(|m| m.mount_path.trim_end_matches('/') == dir)
            .unwrap_or_else(|| panic!("{o}: {flag} {path}: nothing is mounted at {dir}"));
        assert!(
            mount.sub_path.is_none() && mount.sub_path_expr.is_none(),
            "{o}: {dir} is a subPath mount, which never sees updates"
        );
        assert_eq!(
            mount.read_only,
            Some(true),
            "{o}: {dir} should be mounted read-only"
        );
        let volume = pod
            .spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .unwrap_or_else(|| panic!("{o}: no volume {}", mount.name));

        // Which key of the ConfigMap/Secret ends up as `file`.
        let key_for = |items: Option<&Vec<k8s_openapi::api::core::v1::KeyToPath>>| -> String {
            match items {
                Some(items) => items
                    .iter()
                    .find(|i| i.path == file)
                    .map(|i| i.key.clone())
                    .unwrap_or_else(|| panic!("{o}: {path} is not among the volume's items")),
                None => file.to_string(),
            }
        };
        if flag == "--config" {
            let cm = volume
                .config_map
                .as_ref()
                .unwrap_or_else(|| panic!("{o}: {dir} is not a ConfigMap"));
            assert_eq!(cm.name, CONFIG_MAP, "{o}: config volume");
            let key = key_for(cm.items.as_ref());
            assert_eq!(key, want_key, "{o}: {flag}");
            assert!(
                config_map
                    .data
                    .as_ref()
                    .is_some_and(|d| d.contains_key(&key)),
                "{o}: ConfigMap {CONFIG_MAP} has no key {key}"
            );
        } else {
            let sv = volume
                .secret
                .as_ref()
                .unwrap_or_else(|| panic!("{o}: {dir} is not a Secret"));
            assert_eq!(
                sv.secret_name.as_deref(),
                Some(TLS_SECRET),
                "{o}: TLS volume"
            );
            assert_ne!(sv.optional, Some(true), "{o}: the TLS Secret is required");
            let key = key_for(sv.items.as_ref());
            assert_eq!(key, want_key, "{o}: {flag}");
            if certs == CertSource::Generated {
                let secret = secret.as_ref().expect("the generated Secret");
                assert!(
                    secret_entries(secret).contains_key(&key),
                    "{o}: Secret {TLS_SECRET} has no key {key}"
                );
            }
        }
    }
}

/// Service, PodDisruptionBudget and NetworkPolicy all select the webhook pods.
fn check_selectors(
    r: &Rendered,
    svc: &Service,
    pdb: &PodDisruptionBudget,
    np: &NetworkPolicy,
    pod: &Pod,
) {
    let o = &r.overlay;
    let svc_sel = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    assert!(!svc_sel.is_empty(), "{o}: Service without selector");
    assert!(
        svc_sel.iter().all(|(k, v)| pod.labels.get(k) == Some(v)),
        "{o}: the Service selector {svc_sel:?} does not select the pods {:?}",
        pod.labels
    );

    let pdb_spec = pdb.spec.as_ref().expect("PDB spec");
    let pdb_sel = pdb_spec.selector.as_ref().expect("PDB selector");
    assert!(
        selects(pdb_sel, &pod.labels),
        "{o}: the PDB does not select the webhook pods"
    );
    assert_eq!(
        pdb_spec.min_available,
        Some(IntOrString::Int(1)),
        "{o}: PDB minAvailable"
    );

    let np_spec = np.spec.as_ref().expect("NetworkPolicy spec");
    assert!(
        np_spec
            .pod_selector
            .as_ref()
            .is_some_and(|s| selects(s, &pod.labels)),
        "{o}: NetworkPolicy podSelector"
    );
    assert!(
        np_spec
            .policy_types
            .iter()
            .flatten()
            .any(|t| t == "Ingress"),
        "{o}: NetworkPolicy must govern Ingress"
    );
    let mut open = BTreeSet::new();
    for rule in np_spec.ingress.iter().flatten() {
        let ports = rule.ports.as_deref().unwrap_or_default();
        assert!(
            !ports.is_empty(),
            "{o}: a NetworkPolicy ingress rule without ports opens all ports"
        );
        for p in ports {
            assert!(
                p.protocol.as_deref().is_none_or(|p| p == "TCP"),
                "{o}: NetworkPolicy protocol"
            );
            assert!(p.end_port.is_none(), "{o}: NetworkPolicy port ranges");
            open.insert(pod.resolve_port(
                p.port.as_ref().expect("NetworkPolicy port"),
                &format!("{o}: NetworkPolicy ingress"),
            ));
        }
    }
    let want = BTreeSet::from([
        pod.args.listen_port("--listen"),
        pod.args.listen_port("--metrics-listen"),
    ]);
    assert_eq!(
        open, want,
        "{o}: NetworkPolicy should admit exactly the webhook and metrics ports"
    );
}

fn check_certificate(
    ws: &Workspace,
    r: &Rendered,
    mwc: &MutatingWebhookConfiguration,
    w: &MutatingWebhook,
    certs: CertSource,
) {
    let o = &r.overlay;
    let inject = mwc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("cert-manager.io/inject-ca-from"))
        .cloned();
    match certs {
        CertSource::Generated => {
            assert!(
                inject.is_none(),
                "{o}: cert-manager annotation without cert-manager"
            );
            let ca = ws.read_cert_file("ca.crt");
            let bundle = w
                .client_config
                .ca_bundle
                .as_ref()
                .unwrap_or_else(|| panic!("{o}: no caBundle"));
            assert!(
                bundle.0 == ca,
                "{o}: caBundle is not the ca.crt written by `image-rewriter certs`"
            );
            let secret: Secret = r.one(TLS_SECRET);
            assert_eq!(
                secret.type_.as_deref(),
                Some("kubernetes.io/tls"),
                "{o}: Secret type"
            );
            let data = secret_entries(&secret);
            for key in ["tls.crt", "tls.key", "ca.crt"] {
                let value = data
                    .get(key)
                    .unwrap_or_else(|| panic!("{o}: Secret lacks {key}"));
                assert!(
                    *value == ws.read_cert_file(key),
                    "{o}: Secret {key} differs from certs/{key}"
                );
            }
            // The CA the apiserver trusts signed the certificate the pods serve.
            verify_chain(ws, o);
        }
        CertSource::CertManager => {
            assert!(
                w.client_config.ca_bundle.is_none(),
                "{o}: a static caBundle in a cert-manager overlay (cainjector sets it)"
            );
            assert!(
                r.maybe_one::<Secret>(TLS_SECRET).is_none(),
                "{o}: Secret {TLS_SECRET} is cert-manager's to write"
            );
            let inject = inject.unwrap_or_else(|| panic!("{o}: no cert-manager.io/inject-ca-from"));
            let (ns, name) = inject
                .split_once('/')
                .expect("inject-ca-from is namespace/name");
            assert_eq!(ns, NAMESPACE, "{o}: inject-ca-from namespace");
            let cert = r.custom("cert-manager.io/v1", "Certificate", name);
            assert_eq!(
                cert["metadata"]["namespace"], NAMESPACE,
                "{o}: Certificate namespace"
            );
            assert_eq!(
                cert["spec"]["secretName"], TLS_SECRET,
                "{o}: Certificate secretName"
            );
            assert_ne!(
                cert["spec"]["isCA"], true,
                "{o}: the serving certificate is not a CA"
            );
            let service = w
                .client_config
                .service
                .as_ref()
                .expect("clientConfig.service");
            let dns: BTreeSet<&str> = cert["spec"]["dnsNames"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            for host in [
                format!("{}.{}.svc", service.name, service.namespace),
                format!("{}.{}.svc.cluster.local", service.name, service.namespace),
                format!("{}.{}", service.name, service.namespace),
                service.name.clone(),
            ] {
                assert!(
                    dns.contains(host.as_str()),
                    "{o}: Certificate dnsNames lack {host}"
                );
            }
            // The issuer chain resolves within the render: CA issuers lead to
            // a CA Certificate, ending at a self-signed Issuer.
            let mut issuer_ref = cert["spec"]["issuerRef"].clone();
            for _ in 0..4 {
                assert!(
                    issuer_ref["kind"].as_str().is_none_or(|k| k == "Issuer"),
                    "{o}: issuerRef {issuer_ref}: expected a namespaced Issuer shipped here"
                );
                let issuer = r.custom(
                    "cert-manager.io/v1",
                    "Issuer",
                    issuer_ref["name"].as_str().expect("issuerRef.name"),
                );
                if issuer["spec"].get("selfSigned").is_some() {
                    return;
                }
                let ca_secret = issuer["spec"]["ca"]["secretName"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{o}: Issuer {issuer} is neither selfSigned nor ca"));
                let ca_cert = r
                    .objects
                    .iter()
                    .find(|v| v["kind"] == "Certificate" && v["spec"]["secretName"] == ca_secret)
                    .unwrap_or_else(|| {
                        panic!("{o}: no Certificate writes the CA Secret {ca_secret}")
                    });
                assert_eq!(
                    ca_cert["spec"]["isCA"], true,
                    "{o}: the CA Certificate needs isCA"
                );
                issuer_ref = ca_cert["spec"]["issuerRef"].clone();
            }
            panic!("{o}: issuer chain does not end at a self-signed Issuer");
        }
    }
}

/// A Secret's entries, whether written as `data` (base64) or `stringData`.
fn secret_entries(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut entries: BTreeMap<String, Vec<u8>> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in secret.string_data.iter().flatten() {
        entries.insert(k.clone(), v.clone().into_bytes());
    }
    entries
}

/// `openssl verify` of the generated serving certificate against the CA, for
/// the name the apiserver connects to. Skipped quietly without openssl: the
/// certs command's own tests cover the certificate contents.
fn verify_chain(ws: &Workspace, overlay: &str) {
    let certs = ws.dir.path().join("certs");
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(certs.join("ca.crt"))
        .args(["-purpose", "sslserver", "-verify_hostname"])
        .arg(format!("{SERVICE}.{NAMESPACE}.svc"))
        .arg(certs.join("tls.crt"))
        .output();
    match out {
        Ok(out) => assert!(
            out.status.success(),
            "{overlay}: tls.crt does not verify against ca.crt for {SERVICE}.{NAMESPACE}.svc: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => common::skip_missing_tool(
            "openssl",
            "IMAGE_REWRITER_REQUIRE_OPENSSL",
            "certificate chain not verified",
        ),
        Err(e) => panic!("{overlay}: openssl: {e}"),
    }
}

/// The ConfigMap's config is valid for the binary that will read it.
fn check_config_map(r: &Rendered, cm: &ConfigMap) {
    let config = cm
        .data
        .as_ref()
        .and_then(|d| d.get(CONFIG_KEY))
        .unwrap_or_else(|| panic!("{}: ConfigMap has no {CONFIG_KEY}", r.overlay));
    assert_eq!(
        config,
        &fs::read_to_string(repo_path("manifests/base/config.yaml")).expect("base config"),
        "{}: the ConfigMap should carry manifests/base/config.yaml verbatim",
        r.overlay
    );
    check_config(config, &r.overlay);
}

// ---------------------------------------------------------------------------
// The shipped config, without kubectl

#[test]
fn base_config_passes_check_config_and_proxies_through_harbor() {
    let config = fs::read_to_string(repo_path("manifests/base/config.yaml")).expect("read config");
    check_config(&config, "manifests/base/config.yaml");

    let value = yaml_value(&config);
    let rules: BTreeMap<&str, (&str, Option<&str>)> = value["rules"]
        .as_array()
        .expect("rules is a list")
        .iter()
        .map(|r| {
            (
                r["match"].as_str().expect("match"),
                (
                    r["target"].as_str().expect("target"),
                    r["pullSecret"].as_str(),
                ),
            )
        })
        .collect();
    for (registry, project) in [
        ("docker.io", "dockerhub"),
        ("quay.io", "quay"),
        ("ghcr.io", "ghcr"),
        ("registry.k8s.io", "k8s"),
    ] {
        let target = format!("harbor.corp.example/{project}");
        assert_eq!(
            rules.get(registry),
            Some(&(target.as_str(), Some("harbor-pull"))),
            "rule for {registry}"
        );
    }
}

/// Guards the check above: check-config does reject a bad config.
#[test]
fn check_config_rejects_an_unknown_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.yaml");
    fs::write(&path, "rules:\n  - match: docker.io\n    target: harbor.corp.example/dockerhub\n    pullsecret: typo\n")
        .expect("write config");
    let out = run(Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&path));
    assert!(
        !out.status.success(),
        "check-config accepted an unknown field `pullsecret`"
    );
}

fn check_config(config: &str, what: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(CONFIG_KEY);
    fs::write(&path, config).expect("write config");
    let out = run(Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&path));
    assert!(
        out.status.success(),
        "{what}: `image-rewriter check-config` refused the shipped config ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// Dockerfile, .dockerignore, .gitignore

#[test]
fn dockerfile_is_a_locked_multi_stage_build_into_a_distroless_nonroot_image() {
    let text = fs::read_to_string(repo_path("Dockerfile")).expect("read Dockerfile");
    let instructions = dockerfile_instructions(&text);

    // ARG RUST_VERSION (with a default) before the first FROM, used by it.
    let first_from = instructions
        .iter()
        .position(|i| i.keyword == "FROM")
        .expect("a FROM");
    let global_args: Vec<&str> = instructions[..first_from]
        .iter()
        .filter(|i| i.keyword == "ARG")
        .map(|i| i.args.as_str())
        .collect();
    assert!(
        global_args
            .iter()
            .any(|a| a.starts_with("RUST_VERSION=") && a.len() > "RUST_VERSION=".len()),
        "ARG RUST_VERSION=<default> before the first FROM; got {global_args:?}"
    );

    let stages = dockerfile_stages(&instructions[first_from..]);
    assert!(stages.len() >= 2, "a multi-stage build");
    let (builders, runtime) = stages.split_at(stages.len() - 1);
    let runtime = &runtime[0];
    let builder = builders
        .iter()
        .find(|s| s.image.contains("rust:") && s.image.contains("${RUST_VERSION}"))
        .expect("a builder stage FROM rust:${RUST_VERSION}...");
    let builder_alias = builder
        .alias
        .as_deref()
        .expect("the builder stage is named (AS ...)");

    // Dependencies are built before the sources are copied in, against the
    // lock file.
    let body = &builder.body;
    let pos = |pred: &dyn Fn(&Instruction) -> bool| body.iter().position(pred);
    let copy_manifest = pos(&|i| {
        i.keyword == "COPY" && i.args.contains("Cargo.toml") && i.args.contains("Cargo.lock")
    })
    .expect("COPY Cargo.toml Cargo.lock");
    let copy_src = pos(&|i| {
        i.keyword == "COPY"
            && i.args
                .split_whitespace()
                .any(|a| a.trim_end_matches('/') == "src" || a == ".")
    })
    .expect("COPY src");
    // A build is a RUN of `cargo build` or of scripts/pgo-build.sh, whose
    // own `cargo build` is checked like the Dockerfile's.
    const PGO_BUILD: &str = "scripts/pgo-build.sh";
    let builds: Vec<usize> = body
        .iter()
        .enumerate()
        .filter(|(_, i)| {
            i.keyword == "RUN" && (i.args.contains("cargo build") || i.args.contains(PGO_BUILD))
        })
        .map(|(n, _)| n)
        .collect();
    assert!(
        builds.iter().any(|&n| copy_manifest < n && n < copy_src),
        "a dependency-only build between COPY Cargo.toml Cargo.lock and COPY src"
    );
    let final_build = &body[*builds.iter().max().expect("cargo build")];
    assert!(
        final_build.args.contains(PGO_BUILD) && !final_build.args.contains("--dependencies-only"),
        "the shipped binary is the profile-guided build (BENCHMARKS.md): {}",
        final_build.args
    );
    let pgo_build_script =
        fs::read_to_string(repo_path(PGO_BUILD)).expect("read the PGO build script");
    let script_cargo_builds: Vec<&str> = pgo_build_script
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("cargo build"))
        .collect();
    assert_eq!(
        script_cargo_builds.len(),
        1,
        "{PGO_BUILD} runs cargo build in one place"
    );
    let build_command = |args: &str| -> String {
        if args.contains(PGO_BUILD) {
            format!("{args} [{PGO_BUILD}: {}]", script_cargo_builds[0])
        } else {
            args.to_string()
        }
    };
    for &n in &builds {
        let command = build_command(&body[n].args);
        for flag in ["--release", "--locked"] {
            assert!(
                command.contains(flag),
                "every cargo build uses {flag}: {command}"
            );
        }
    }

    // A small runtime base with no libc (distroless/static or scratch, as the
    // deployment issue asks), so the binary is static: glibc linked in, not
    // musl, whose memcpy ran a review ~20% more CPU.
    let rt = |kw: &'static str| instructions_of(runtime, kw);
    let image = runtime.image.split(['@', ':']).next().unwrap_or_default();
    assert!(
        image.starts_with("gcr.io/distroless/static") || image == "scratch",
        "runtime base {} should be distroless/static or scratch",
        runtime.image
    );
    assert!(
        body.iter()
            .any(|i| i.keyword == "ENV" && i.args.contains("target-feature=+crt-static")),
        "a static runtime base needs a static build: RUSTFLAGS with +crt-static"
    );
    assert!(
        !body.iter().any(|i| i.args.contains("-linux-musl")),
        "a musl build: it ran ~20% more CPU a review than glibc"
    );
    for &n in &builds {
        let command = build_command(&body[n].args);
        assert!(
            command.contains("--target"),
            "with RUSTFLAGS +crt-static, every cargo build names its --target, or the flag \
             reaches the proc-macros, which cannot be static: {command}"
        );
    }

    let entrypoint = rt("ENTRYPOINT").last().expect("ENTRYPOINT").args.clone();
    let entrypoint: Vec<String> = serde_json::from_str(&entrypoint)
        .unwrap_or_else(|_| panic!("ENTRYPOINT {entrypoint} is not exec form"));
    assert_eq!(entrypoint, ["/image-rewriter"], "ENTRYPOINT");
    let copied_to = rt("COPY")
        .filter(|i| i.args.contains(&format!("--from={builder_alias}")))
        .filter_map(|i| i.args.split_whitespace().last())
        .collect::<Vec<_>>();
    assert_eq!(
        copied_to,
        [entrypoint[0].as_str()],
        "COPY --from={builder_alias} puts the binary where ENTRYPOINT runs it"
    );
    let user = rt("USER")
        .last()
        .expect("USER in the runtime stage")
        .args
        .clone();
    for id in user.split(':') {
        let id: u32 = id
            .parse()
            .unwrap_or_else(|_| panic!("USER {user}: numeric, so runAsNonRoot can check it"));
        assert_ne!(id, 0, "USER {user} is root");
    }
    assert_eq!(
        user.split(':').next(),
        Some("65532"),
        "USER 65532 (the manifests' runAsUser)"
    );

    if let Some(cmd) = rt("CMD").last() {
        let cmd: Vec<String> = serde_json::from_str(&cmd.args)
            .unwrap_or_else(|_| panic!("CMD {} is not exec form", cmd.args));
        assert_eq!(
            cmd.first().map(String::as_str),
            Some("serve"),
            "CMD starts with serve"
        );
        let cmd = ServeArgs::parse(&cmd);
        let deployment = base_deployment_args();
        for flag in ["--config", "--tls-cert", "--tls-key"] {
            if let Some(value) = cmd.get(flag) {
                assert_eq!(
                    Some(value),
                    deployment.get(flag),
                    "CMD {flag} vs the Deployment's"
                );
            }
        }
    }

    let exposed: BTreeSet<&str> = rt("EXPOSE")
        .flat_map(|i| i.args.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp"))
        .collect();
    assert!(
        exposed.contains("8443") && exposed.contains("9090"),
        "EXPOSE 8443 9090, got {exposed:?}"
    );

    let labels: BTreeMap<String, String> = rt("LABEL")
        .flat_map(|i| parse_label_pairs(&i.args))
        .collect();
    for key in ["title", "source", "licenses", "description"] {
        let key = format!("org.opencontainers.image.{key}");
        assert!(
            labels.get(&key).is_some_and(|v| !v.is_empty()),
            "LABEL {key}"
        );
    }
    if let Some(license) = cargo_license() {
        assert_eq!(
            labels["org.opencontainers.image.licenses"], license,
            "licenses label vs Cargo.toml"
        );
    }
}

#[test]
fn dockerignore_keeps_build_output_history_and_keys_out_of_the_context() {
    let text = fs::read_to_string(repo_path(".dockerignore")).expect("read .dockerignore");
    let lines: BTreeSet<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches('/'))
        .collect();
    for want in ["target", ".git"] {
        assert!(lines.contains(want), ".dockerignore should list {want}");
    }
    assert!(
        lines.contains("certs")
            || (lines.contains("**/*.key") && lines.contains("certs/secret.yaml")),
        ".dockerignore should keep the generated certs out"
    );
    for needed in ["src", "Cargo.toml", "Cargo.lock", "*.rs", "**/*.rs"] {
        assert!(
            !lines.contains(needed),
            ".dockerignore excludes {needed}, which the build needs"
        );
    }
    // Files the sources pull in with include_str!/include_bytes! (a sample
    // config, a README) must be in the build context too.
    let mut included = Vec::new();
    collect_includes(&repo_path("src"), &mut included);
    for file in included {
        let excluded_by = lines.iter().find(|pattern| {
            let pattern = pattern.trim_end_matches('/');
            match pattern.strip_prefix("**/*") {
                Some(suffix) => file.ends_with(suffix),
                None => file == pattern || file.starts_with(&format!("{pattern}/")),
            }
        });
        assert!(
            excluded_by.is_none(),
            "the sources include {file}, but .dockerignore excludes it ({excluded_by:?})"
        );
    }
}

/// Repository-relative paths named by include_str!/include_bytes! in the .rs
/// files under `dir`.
fn collect_includes(dir: &Path, out: &mut Vec<String>) {
    for entry in fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            collect_includes(&path, out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = fs::read_to_string(&path).expect("read source");
        for macro_name in ["include_str!(\"", "include_bytes!(\""] {
            for (at, _) in text.match_indices(macro_name) {
                let rest = &text[at + macro_name.len()..];
                let Some(end) = rest.find('"') else { continue };
                let target = path.parent().expect("parent").join(&rest[..end]);
                // Normalize `..` without touching the filesystem.
                let mut parts: Vec<String> = Vec::new();
                for c in target.strip_prefix(REPO).unwrap_or(&target).components() {
                    match c {
                        std::path::Component::ParentDir => {
                            parts.pop();
                        }
                        std::path::Component::Normal(p) => {
                            parts.push(p.to_string_lossy().into_owned());
                        }
                        _ => {}
                    }
                }
                out.push(parts.join("/"));
            }
        }
    }
}

#[test]
fn generated_certificates_are_git_ignored() {
    let ignored = |path: &str| -> Option<bool> {
        let out = Command::new("git")
            .current_dir(REPO)
            .args(["check-ignore", "--no-index", "-q", path])
            .output()
            .ok()?;
        match out.status.code() {
            Some(0) => Some(true),
            Some(1) => Some(false),
            _ => None, // not a git checkout
        }
    };
    if ignored("certs/kustomization.yaml").is_none() {
        say("SKIPPED: not a git checkout (or no git); .gitignore not checked");
        return;
    }
    for file in GENERATED_CERT_FILES {
        assert_eq!(
            ignored(&format!("certs/{file}")),
            Some(true),
            "certs/{file} must be git-ignored"
        );
        // Where `certs` writes each file before renaming it into place: a
        // run killed in between (Ctrl-C, the OOM killer) leaves it, a
        // private key among them.
        let staged = format!("certs/.{file}.Ab3xZ9.tmp");
        assert_eq!(ignored(&staged), Some(true), "{staged} must be git-ignored");
    }
    for file in [
        "certs/kustomization.yaml",
        "certs/README.md",
        "manifests/base/kustomization.yaml",
    ] {
        assert_eq!(ignored(file), Some(false), "{file} must not be git-ignored");
    }
}

// ---------------------------------------------------------------------------
// Scratch workspace, kubectl, rendering

struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    /// manifests/ and certs/kustomization.yaml only: whatever the developer
    /// generated into certs/ stays out.
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        copy_dir(&repo_path("manifests"), &dir.path().join("manifests"));
        fs::create_dir(dir.path().join("certs")).expect("mkdir certs");
        fs::copy(
            repo_path("certs/kustomization.yaml"),
            dir.path().join("certs/kustomization.yaml"),
        )
        .expect("copy certs/kustomization.yaml");
        Workspace { dir }
    }

    fn generate_certs(&self) {
        let out_dir = self.dir.path().join("certs");
        let out = run(Command::new(BIN)
            .args([
                "certs",
                "--service",
                SERVICE,
                "--namespace",
                NAMESPACE,
                "--out",
            ])
            .arg(&out_dir));
        assert!(
            out.status.success(),
            "`image-rewriter certs --service {SERVICE} --namespace {NAMESPACE} --out DIR` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for file in GENERATED_CERT_FILES {
            assert!(
                out_dir.join(file).is_file(),
                "`image-rewriter certs` did not write {file}"
            );
        }
    }

    fn read_cert_file(&self, name: &str) -> Vec<u8> {
        fs::read(self.dir.path().join("certs").join(name))
            .unwrap_or_else(|e| panic!("read certs/{name}: {e}"))
    }

    fn write_overlay(&self, name: &str, components: &[&str]) {
        let dir = self.dir.path().join("manifests/overlays").join(name);
        fs::create_dir_all(&dir).expect("mkdir overlay");
        let mut k = String::from(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../../base\ncomponents:\n",
        );
        for c in components {
            writeln!(k, "  - {c}").expect("write");
        }
        fs::write(dir.join("kustomization.yaml"), k).expect("write overlay");
    }

    fn render(&self, kubectl: &OsString, overlay: &str) -> Rendered {
        let dir = self.dir.path().join("manifests/overlays").join(overlay);
        let out = run(Command::new(kubectl).arg("kustomize").arg(&dir));
        assert!(
            out.status.success(),
            "kubectl kustomize manifests/overlays/{overlay} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Rendered::parse(overlay, &String::from_utf8(out.stdout).expect("UTF-8 YAML"))
    }
}

struct Rendered {
    overlay: String,
    objects: Vec<Value>,
}

impl Rendered {
    fn parse(overlay: &str, yaml: &str) -> Self {
        let mut objects = Vec::new();
        for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
            let value =
                Value::deserialize(doc).unwrap_or_else(|e| panic!("{overlay}: rendered YAML: {e}"));
            if !value.is_null() {
                objects.push(value);
            }
        }
        assert!(!objects.is_empty(), "{overlay}: rendered nothing");
        let mut seen = BTreeSet::new();
        for obj in &objects {
            let id = (
                obj["apiVersion"].as_str().expect("apiVersion").to_string(),
                obj["kind"].as_str().expect("kind").to_string(),
                obj["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                obj["metadata"]["name"]
                    .as_str()
                    .expect("metadata.name")
                    .to_string(),
            );
            assert!(seen.insert(id.clone()), "{overlay}: {id:?} rendered twice");
        }
        Rendered {
            overlay: overlay.to_string(),
            objects,
        }
    }

    fn of_type<T: Resource>(&self) -> impl Iterator<Item = &Value> {
        self.objects
            .iter()
            .filter(|v| v["apiVersion"] == T::API_VERSION && v["kind"] == T::KIND)
    }

    /// Every object of type T, decoded strictly.
    fn all<T: Resource + DeserializeOwned + Serialize>(&self) -> Vec<T> {
        self.of_type::<T>()
            .map(|v| decode_strict(v, &self.overlay))
            .collect()
    }

    fn maybe_one<T: Resource + DeserializeOwned + Serialize>(&self, name: &str) -> Option<T> {
        let mut found = self
            .of_type::<T>()
            .filter(|v| v["metadata"]["name"] == name);
        let first = found.next()?;
        assert!(
            found.next().is_none(),
            "{}: more than one {} {name}",
            self.overlay,
            T::KIND
        );
        Some(decode_strict(first, &self.overlay))
    }

    fn one<T: Resource + DeserializeOwned + Serialize>(&self, name: &str) -> T {
        self.maybe_one(name)
            .unwrap_or_else(|| panic!("{}: no {} {name} rendered", self.overlay, T::KIND))
    }

    /// An object with no k8s-openapi type (cert-manager's).
    fn custom(&self, api_version: &str, kind: &str, name: &str) -> &Value {
        self.objects
            .iter()
            .find(|v| {
                v["apiVersion"] == api_version && v["kind"] == kind && v["metadata"]["name"] == name
            })
            .unwrap_or_else(|| {
                panic!(
                    "{}: no {kind} {name} ({api_version}) rendered",
                    self.overlay
                )
            })
    }
}

/// Decode with the API type and require that nothing was lost on the way:
/// k8s-openapi ignores fields it does not know, the apiserver's strict field
/// validation does not, and a misspelt field would silently do nothing.
fn decode_strict<T: DeserializeOwned + Serialize>(value: &Value, overlay: &str) -> T {
    let what = format!("{} {}", value["kind"], value["metadata"]["name"]);
    let typed: T =
        serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{overlay}: {what}: {e}"));
    let back = serde_json::to_value(&typed).expect("serialize");
    let mut lost = Vec::new();
    json_lost(value, &back, String::new(), &mut lost);
    assert!(
        lost.is_empty(),
        "{overlay}: {what}: fields the API type does not know: {lost:?}"
    );
    typed
}

fn json_lost(original: &Value, back: &Value, path: String, lost: &mut Vec<String>) {
    match (original, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => json_lost(v, w, format!("{path}.{k}"), lost),
                    None => lost.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (n, (v, w)) in a.iter().zip(b).enumerate() {
                json_lost(v, w, format!("{path}[{n}]"), lost);
            }
        }
        (a, b) if a == b => {}
        (a, b) => lost.push(format!("{path}: {a} became {b}")),
    }
}

// ---------------------------------------------------------------------------
// The webhook pod, as the Deployment describes it

struct Pod {
    namespace: String,
    labels: BTreeMap<String, String>,
    spec: PodSpec,
    container: Container,
    args: ServeArgs,
}

impl Pod {
    fn of(r: &Rendered, d: &Deployment) -> Pod {
        let o = &r.overlay;
        let spec = d.spec.as_ref().expect("Deployment spec");
        let template = &spec.template;
        let pod_spec = template.spec.clone().expect("pod template spec");
        assert_eq!(pod_spec.containers.len(), 1, "{o}: one container expected");
        let container = pod_spec.containers[0].clone();
        let args = ServeArgs::parse(container.args.as_deref().unwrap_or_default());
        Pod {
            namespace: d.metadata.namespace.clone().expect("Deployment namespace"),
            labels: template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.clone())
                .unwrap_or_default(),
            spec: pod_spec,
            container,
            args,
        }
    }

    fn named_port(&self, name: &str) -> Option<i32> {
        self.container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
    }

    /// A port by number or by container port name; a number must be one the
    /// container declares.
    fn resolve_port(&self, port: &IntOrString, what: &str) -> i32 {
        match port {
            IntOrString::Int(n) => {
                assert!(
                    self.container
                        .ports
                        .iter()
                        .flatten()
                        .any(|p| p.container_port == *n),
                    "{what}: port {n} is not a declared container port"
                );
                *n
            }
            IntOrString::String(name) => self
                .named_port(name)
                .unwrap_or_else(|| panic!("{what}: no container port named {name}")),
        }
    }
}

/// `serve --flag value ...` (or `--flag=value`).
struct ServeArgs {
    subcommand: String,
    flags: BTreeMap<String, String>,
}

impl ServeArgs {
    fn parse(args: &[String]) -> ServeArgs {
        let mut it = args.iter();
        let subcommand = it.next().cloned().unwrap_or_default();
        let mut flags = BTreeMap::new();
        while let Some(arg) = it.next() {
            assert!(
                arg.starts_with("--"),
                "unexpected argument {arg:?} in {args:?}"
            );
            let (flag, value) = match arg.split_once('=') {
                Some((f, v)) => (f.to_string(), v.to_string()),
                None => (
                    arg.clone(),
                    it.next()
                        .unwrap_or_else(|| panic!("{arg} has no value"))
                        .clone(),
                ),
            };
            assert!(
                flags.insert(flag, value).is_none(),
                "{arg} given twice in {args:?}"
            );
        }
        ServeArgs { subcommand, flags }
    }

    fn get(&self, flag: &str) -> Option<&str> {
        self.flags.get(flag).map(String::as_str)
    }

    fn listen_port(&self, flag: &str) -> i32 {
        let addr = self
            .get(flag)
            .unwrap_or_else(|| panic!("serve lacks {flag}"));
        let (_, port) = addr
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{flag} {addr}: no port"));
        port.parse()
            .unwrap_or_else(|_| panic!("{flag} {addr}: bad port"))
    }
}

/// manifests/base/deployment.yaml read directly (no kubectl needed).
fn base_deployment_args() -> ServeArgs {
    let text =
        fs::read_to_string(repo_path("manifests/base/deployment.yaml")).expect("read deployment");
    let d: Deployment = serde_json::from_value(yaml_value(&text)).expect("a Deployment");
    let spec = d.spec.and_then(|s| s.template.spec).expect("pod spec");
    ServeArgs::parse(spec.containers[0].args.as_deref().unwrap_or_default())
}

/// A label selector evaluated the way the apiserver does.
fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_exprs = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => panic!("unknown selector operator {other}"),
        }
    });
    by_labels && by_exprs
}

// ---------------------------------------------------------------------------
// Dockerfile parsing (enough of it for the checks above)

#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
}

struct Stage {
    image: String,
    alias: Option<String>,
    body: Vec<Instruction>,
}

/// Instructions with line continuations joined and comments dropped, as the
/// Docker parser does.
fn dockerfile_instructions(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        // Comment lines and empty lines are dropped, also inside a continuation.
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        if let Some(rest) = line.trim_end().strip_suffix('\\') {
            current.push_str(rest);
            current.push(' ');
            continue;
        }
        current.push_str(line);
        let joined = std::mem::take(&mut current);
        let joined = joined.trim();
        let (keyword, args) = joined
            .split_once(char::is_whitespace)
            .unwrap_or((joined, ""));
        out.push(Instruction {
            keyword: keyword.to_ascii_uppercase(),
            args: args.trim().to_string(),
        });
    }
    assert!(
        current.trim().is_empty(),
        "Dockerfile ends inside a line continuation"
    );
    out
}

fn instructions_of<'a>(
    stage: &'a Stage,
    keyword: &'a str,
) -> impl Iterator<Item = &'a Instruction> {
    stage.body.iter().filter(move |i| i.keyword == keyword)
}

fn dockerfile_stages(instructions: &[Instruction]) -> Vec<Stage> {
    let mut stages: Vec<Stage> = Vec::new();
    for i in instructions {
        if i.keyword == "FROM" {
            let words: Vec<&str> = i
                .args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let alias = match words.as_slice() {
                [_, as_, alias] if as_.eq_ignore_ascii_case("as") => Some(alias.to_string()),
                [_] => None,
                _ => panic!("FROM {}: unexpected form", i.args),
            };
            stages.push(Stage {
                image: words[0].to_string(),
                alias,
                body: Vec::new(),
            });
        } else {
            let stage = stages.last_mut().expect("instruction before FROM");
            stage.body.push(Instruction {
                keyword: i.keyword.clone(),
                args: i.args.clone(),
            });
        }
    }
    stages
}

/// `key="value with spaces" key2=value2 ...`
fn parse_label_pairs(args: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut chars = args.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return pairs;
        }
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        pairs.push((key.trim().to_string(), value));
    }
}

fn cargo_license() -> Option<String> {
    let text = fs::read_to_string(repo_path("Cargo.toml")).ok()?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("license"))
        .and_then(|rest| rest.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_string())
}

// ---------------------------------------------------------------------------
// Small helpers

/// A line on the real stderr: the test harness captures `eprintln!` of
/// passing tests, and a skip must be visible.
fn say(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn repo_path(rel: &str) -> PathBuf {
    Path::new(REPO).join(rel)
}

fn yaml_value(text: &str) -> Value {
    serde_yaml_ng::from_str(text).expect("YAML")
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap_or_else(|e| panic!("mkdir {}: {e}", to.display()));
    for entry in fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display())) {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target)
                .unwrap_or_else(|e| panic!("copy {}: {e}", entry.path().display()));
        }
    }
}

#[test]
fn selector_evaluation_matches_the_apiserver() {
    // Sanity of the helper the selector checks rely on.
    let sel: LabelSelector = serde_json::from_value(serde_json::json!({
        "matchLabels": {"a": "1"},
        "matchExpressions": [
            {"key": "b", "operator": "NotIn", "values": ["x"]},
            {"key": "c", "operator": "Exists"}
        ]
    }))
    .expect("selector");
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert!(selects(&sel, &labels(&[("a", "1"), ("c", "")])));
    assert!(selects(&sel, &labels(&[("a", "1"), ("b", "y"), ("c", "")])));
    assert!(!selects(
        &sel,
        &labels(&[("a", "1"), ("b", "x"), ("c", "")])
    ));
    assert!(!selects(&sel, &labels(&[("a", "1")])));
    assert!(!selects(&sel, &labels(&[("a", "2"), ("c", "")])));
    // base64 of the CA PEM, as the certs patch carries it, decodes as ByteString does.
    let pem = b"-----BEGIN CERTIFICATE-----\n";
    let encoded = base64::engine::general_purpose::STANDARD.encode(pem);
    let decoded: k8s_openapi::ByteString =
        serde_json::from_value(Value::String(encoded)).expect("ByteString");
    assert_eq!(decoded.0, pem);
}
