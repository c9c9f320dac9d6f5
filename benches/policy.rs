//! Micro benchmarks of the pure policy: one reference decided, one pod
//! planned, and how both scale (with containers: at most linear; with rules:
//! flat, matching is by hash lookup).
//!
//! `decide` and the rule-count groups time `Policy::decide_afresh` (parse,
//! match, rewrite); `decide_recalled` times the policy's memo, which answers
//! an image seen before. The review and plan groups run with the memo warm,
//! as a server does once a pod's images have been seen.
//!
//!     cargo bench --bench policy                 # full run, ~2-3 minutes on 2 cores
//!     cargo bench --bench policy -- --quick      # criterion's quick mode
//!     cargo bench --bench policy -- --test       # smoke: every benchmark once (CI)
//!
//! After the criterion groups, a scaling report is printed (its own timing
//! loop, so it also appears in `--test` mode, with a shorter budget there).
//! Set `BENCH_ASSERT_SCALING=1` to make a super-linear container cost or a
//! rule-count dependence fail the run.

use std::hint::black_box;
use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use image_rewriter::admission;
use image_rewriter::config::ConfigFile;
use image_rewriter::patch::{PodView, Scope, plan_pod_patch};
use image_rewriter::pod::PodObject;
use image_rewriter::policy::{Decision, Policy};
use serde_json::{Value, json};

const CONTAINER_COUNTS: [usize; 4] = [1, 10, 100, 1000];
const RULE_COUNTS: [usize; 3] = [1, 100, 10_000];

const TWO_RULES: &str = "\
rules:
  - match: docker.io
    target: harbor.corp.example/dockerhub
    pullSecret: harbor-pull
  - match: quay.io
    target: harbor.corp.example/quay
    pullSecret: harbor-pull
exclude:
  images: [\"registry.k8s.io/**\"]
";

fn policy_from(yaml: &str) -> Policy {
    ConfigFile::from_yaml(yaml)
        .expect("bench config parses")
        .into_policy(None)
        .expect("bench config is valid")
}

/// `count` rules built as YAML, as a config file would have them. The
/// Docker Hub and quay.io rules are always the last two, so the matched
/// rules sit behind every generated one.
fn rules_yaml(count: usize) -> String {
    let mut yaml = String::from("rules:\n");
    for i in 0..count.saturating_sub(2) {
        yaml.push_str(&format!(
            "  - match: registry-{i}.example.com/team-{i}\n    target: harbor.corp.example/mirror-{i}\n    pullSecret: pull-{i}\n"
        ));
    }
    if count >= 2 {
        yaml.push_str("  - match: quay.io\n    target: harbor.corp.example/quay\n    pullSecret: harbor-pull\n");
    }
    yaml.push_str("  - match: docker.io\n    target: harbor.corp.example/dockerhub\n    pullSecret: harbor-pull\n");
    yaml
}

/// Images that exercise every decision: short and long names, tag and
/// digest, a target hit, an exclusion, no rule, unparsable.
fn sample_images() -> Vec<(&'static str, String)> {
    let digest = format!("sha256:{}", "a".repeat(64));
    vec![
        ("short", "nginx".to_owned()),
        (
            "tagged",
            "quay.io/prometheus/node-exporter:v1.8.0".to_owned(),
        ),
        ("digest", format!("docker.io/bitnami/redis:7.2@{digest}")),
        (
            "already-under-target",
            "harbor.corp.example/dockerhub/library/nginx:1.27".to_owned(),
        ),
        ("excluded", "registry.k8s.io/pause:3.9".to_owned()),
        ("no-rule", "gcr.io/distroless/static:nonroot".to_owned()),
        ("unparsable", "NGINX:latest".to_owned()),
    ]
}

/// A defaulted Pod with `count` containers, images alternating between the
/// two rules (and one in ten already rewritten).
fn pod_with(count: usize) -> Value {
    let image = |i: usize| match i % 10 {
        9 => format!("harbor.corp.example/dockerhub/library/app-{i}:1.0"),
        n if n % 2 == 0 => format!("nginx:1.27-{i}"),
        _ => format!("quay.io/org/app-{i}:v{i}"),
    };
    let containers: Vec<Value> = (0..count)
        .map(|i| common::container(&format!("c-{i}"), &image(i)))
        .collect();
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": "web-7d4b9c8f6-x2kqz",
            "generateName": "web-7d4b9c8f6-",
            "namespace": "team-a",
            "labels": {"app.kubernetes.io/name": "web", "pod-template-hash": "7d4b9c8f6"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2025-01-01T00:00:00Z"},
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9c8f6",
                "uid": "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b", "controller": true, "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}
            ], "defaultMode": 420}}],
            "containers": containers,
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "priority": 0,
            "enableServiceLinks": true
        },
        "status": {}
    })
}

/// A CREATE review of `pod`, as the apiserver sends it.
fn create_review(pod: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "web-7d4b9c8f6-x2kqz",
            "namespace": "team-a",
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "6b0c3b2c-3c9a-4a57-9d6c-1f7e6ab3d0a1",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]
            },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    }))
    .expect("serializes")
}

fn plan(policy: &Policy, pod: &PodObject) -> usize {
    let view = PodView {
        namespace: Some("team-a"),
        metadata: Some(&pod.metadata),
        annotations_bytes: pod.annotations_bytes,
        spec: pod.spec.as_ref(),
        location: &[],
    };
    plan_pod_patch(policy, view, &Scope::WholePod)
        .operations
        .len()
}

fn bench_decide(c: &mut Criterion) {
    let policy = policy_from(TWO_RULES);
    type Decide = for<'p> fn(&'p Policy, &str) -> Decision<'p>;
    let ways: [(&str, Decide); 2] = [
        // Parse, match and rewrite: what an image costs the first time.
        ("decide", Policy::decide_afresh),
        // From the policy's memo, as every later pod with that image.
        ("decide_recalled", Policy::decide),
    ];
    for (group_name, decide) in ways {
        let mut group = c.benchmark_group(group_name);
        for (label, image) in sample_images() {
            group.bench_with_input(BenchmarkId::from_parameter(label), &image, |b, image| {
                b.iter(|| black_box(decide(&policy, black_box(image))))
            });
        }
        group.finish();
    }
}

fn bench_pods(c: &mut Criterion) {
    let policy = policy_from(TWO_RULES);
    let mut review_group = c.benchmark_group("review_create");
    for count in CONTAINER_COUNTS {
        let body = create_review(pod_with(count));
        review_group.throughput(Throughput::Elements(count as u64));
        review_group.bench_with_input(BenchmarkId::from_parameter(count), &body, |b, body| {
            b.iter(|| {
                admission::review(&policy, black_box(body))
                    .expect("review answers")
                    .body
                    .len()
            })
        });
    }
    review_group.finish();

    let mut plan_group = c.benchmark_group("plan_pod_patch");
    for count in CONTAINER_COUNTS {
        let pod: PodObject = serde_json::from_value(pod_with(count)).expect("a Pod");
        plan_group.throughput(Throughput::Elements(count as u64));
        plan_group.bench_with_input(BenchmarkId::from_parameter(count), &pod, |b, pod| {
            b.iter(|| plan(&policy, black_box(pod)))
        });
    }
    plan_group.finish();
}

fn bench_rules(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide_rules");
    for count in RULE_COUNTS {
        let policy = policy_from(&rules_yaml(count));
        assert_eq!(policy.rules().len(), count);
        assert!(matches!(
            policy.decide("quay.io/org/app:v1"),
            Decision::Rewrite { .. } | Decision::NoMatchingRule
        ));
        group.bench_with_input(BenchmarkId::new("nginx", count), &policy, |b, policy| {
            b.iter(|| black_box(policy.decide_afresh(black_box("nginx:1.27"))))
        });
        group.bench_with_input(
            BenchmarkId::new("deep-no-rule", count),
            &policy,
            |b, policy| {
                b.iter(|| {
                    black_box(policy.decide_afresh(black_box("gcr.io/a/b/c/d/e/f/g/h/app:v1")))
                })
            },
        );
    }
    group.finish();
}

/// Short measurements, so the whole file finishes in a few minutes on 2
/// cores; command-line flags still override them.
fn short() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = short();
    targets = bench_decide, bench_pods, bench_rules
}

/// Median nanoseconds per call of `f`, over `rounds` timed batches within
/// roughly `budget`.
fn median_ns(budget: Duration, mut f: impl FnMut()) -> f64 {
    // Calibrate a batch to about budget / 15.
    let start = Instant::now();
    f();
    let one = start.elapsed().max(Duration::from_nanos(20));
    let batch = ((budget.as_secs_f64() / 15.0) / one.as_secs_f64()).clamp(1.0, 1e7) as u64;
    let mut samples = Vec::new();
    let deadline = Instant::now() + budget;
    while samples.len() < 5 || (Instant::now() < deadline && samples.len() < 15) {
        let start = Instant::now();
        for _ in 0..batch {
            f();
        }
        samples.push(start.elapsed().as_secs_f64() * 1e9 / batch as f64);
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Prints how the cost grows; returns the problems found.
fn scaling_report(budget: Duration) -> Vec<String> {
    let mut problems = Vec::new();
    let policy = policy_from(TWO_RULES);
    println!("\n== scaling (median of timed batches, {budget:?} per point) ==");
    println!(
        "{:>10} | {:>14} {:>14} | {:>14} {:>14}",
        "containers", "review ns", "ns/container", "plan ns", "ns/container"
    );
    let mut per_container = Vec::new();
    for count in CONTAINER_COUNTS {
        let body = create_review(pod_with(count));
        let pod: PodObject = serde_json::from_value(pod_with(count)).expect("a Pod");
        let review = median_ns(budget, || {
            black_box(
                admission::review(&policy, black_box(&body))
                    .map(|r| r.body.len())
                    .ok(),
            );
        });
        let planned = median_ns(budget, || {
            black_box(plan(&policy, black_box(&pod)));
        });
        println!(
            "{count:>10} | {review:>14.0} {:>14.0} | {planned:>14.0} {:>14.0}",
            review / count as f64,
            planned / count as f64
        );
        per_container.push((count, review / count as f64, planned / count as f64));
    }
    // At most linear: the per-container cost at 1000 must not exceed the one
    // at 10 by more than noise (3x).
    let at = |n: usize| per_container.iter().find(|p| p.0 == n).copied().unwrap();
    let (_, review10, plan10) = at(10);
    let (_, review1000, plan1000) = at(1000);
    println!(
        "per-container cost 1000 vs 10 containers: review x{:.2}, plan x{:.2} (<= 1 is linear or better)",
        review1000 / review10,
        plan1000 / plan10
    );
    if review1000 / review10 > 3.0 || plan1000 / plan10 > 3.0 {
        problems.push(format!(
            "cost grows faster than linearly with containers: review x{:.2}, plan x{:.2} per container",
            review1000 / review10,
            plan1000 / plan10
        ));
    }

    println!(
        "{:>10} | {:>14} {:>16}",
        "rules", "decide nginx", "decide no-rule"
    );
    let mut by_rules = Vec::new();
    for count in RULE_COUNTS {
        let policy = policy_from(&rules_yaml(count));
        let hit = median_ns(budget, || {
            black_box(policy.decide_afresh(black_box("nginx:1.27")));
        });
        let miss = median_ns(budget, || {
            black_box(policy.decide_afresh(black_box("gcr.io/a/b/c/d/e/f/g/h/app:v1")));
        });
        println!("{count:>10} | {hit:>11.0} ns {miss:>13.0} ns");
        by_rules.push((hit, miss));
    }
    let (hit1, miss1) = by_rules[0];
    let (hit_n, miss_n) = by_rules[by_rules.len() - 1];
    println!(
        "10 000 rules vs 1 rule: decide x{:.2} (hit), x{:.2} (no rule) (~1 is flat)",
        hit_n / hit1,
        miss_n / miss1
    );
    if hit_n / hit1 > 2.0 || miss_n / miss1 > 2.0 {
        problems.push(format!(
            "decide depends on the rule count: x{:.2} / x{:.2} from 1 to 10 000 rules",
            hit_n / hit1,
            miss_n / miss1
        ));
    }
    problems
}

fn main() {
    benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();

    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes `--bench`; `cargo test --benches` does not. Keep
    // the report short in smoke (`--test`) and test runs.
    let smoke = args.iter().any(|a| a == "--test") || !args.iter().any(|a| a == "--bench");
    let quick = args.iter().any(|a| a == "--quick");
    let budget = if smoke {
        Duration::from_millis(30)
    } else if quick {
        Duration::from_millis(150)
    } else {
        Duration::from_millis(400)
    };
    let problems = scaling_report(budget);
    for problem in &problems {
        println!("SCALING PROBLEM: {problem}");
    }
    if !problems.is_empty() && std::env::var_os("BENCH_ASSERT_SCALING").is_some() {
        std::process::exit(1);
    }
}
