//! Every patch case, end to end through `admission::review`: each patch is
//! applied (by an independent RFC 6902 implementation) to the object exactly
//! as sent, the result is decoded as a Pod, and the patched pod is sent again
//! (as `reinvocationPolicy: IfNeeded` does) to prove the second answer has no
//! patch.

mod common;

use common::*;
use image_rewriter::admission::{ReviewError, review};
use image_rewriter::config::ConfigFile;
use image_rewriter::patch::{
    ORIGINAL_IMAGES_ANNOTATION, ORIGINAL_VOLUME_IMAGES_ANNOTATION, PodView, Scope,
    annotations_bytes, plan_pod_patch,
};
use image_rewriter::policy::Policy;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

const CONFIG: &str = r#"
rules:
  - match: docker.io
    target: harbor.corp.example/dockerhub
    pullSecret: harbor-pull
  - match: quay.io
    target: harbor.corp.example/quay
    pullSecret: harbor-pull
  - match: ghcr.io
    target: harbor.corp.example/ghcr
    pullSecret: ghcr-pull
  - match: gcr.io
    target: mirror.corp.example/gcr
exclude:
  images: ["registry.k8s.io/**", "docker.io/library/busybox", "quay.io/internal/*"]
  namespaces: [legacy]
"#;

const NS: &str = "shop";
const ANNOTATION_PATH: &str = "/metadata/annotations/image-rewriter.io~1original-images";

fn digest() -> String {
    format!("sha256:{}", "3f2a".repeat(16))
}

fn policy() -> Policy {
    policy_from(CONFIG)
}

fn policy_from(yaml: &str) -> Policy {
    ConfigFile::from_yaml(yaml)
        .expect("config parses")
        .into_policy(Some("image-rewriter"))
        .expect("config is valid")
}

/// One CREATE round trip and its reinvocation.
struct Outcome {
    body: Vec<u8>,
    patch: Option<Value>,
    patched: Value,
    pod: Pod,
}

impl Outcome {
    fn warnings(&self) -> Vec<String> {
        warnings_of(&self.body)
    }
    fn response(&self) -> Value {
        response_of(&self.body)
    }
    fn annotation(&self) -> Option<Value> {
        self.patched["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION]
            .as_str()
            .map(|text| serde_json::from_str(text).expect("annotation is JSON"))
    }
    fn ops(&self) -> Vec<Value> {
        self.patch
            .as_ref()
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }
}

/// Reviews `review`, applies the patch, then sends the patched object again
/// in a review of the same shape and asserts there is no second patch.
fn round_trip(policy: &Policy, review: Value) -> Outcome {
    let (body, patch) = review_in_process(policy, &review);
    let (patched, pod) = pod_after(&review["request"]["object"], patch.as_ref());
    let mut again = review.clone();
    again["request"]["object"] = patched.clone();
    again["request"]["uid"] = json!(new_uid());
    let (second_body, second) = review_in_process(policy, &again);
    assert!(
        second.is_none(),
        "the reinvocation was patched again: {second:#?}\nfirst patch: {patch:#?}\nresponse: {}",
        String::from_utf8_lossy(&second_body)
    );
    Outcome {
        body,
        patch,
        patched,
        pod,
    }
}

fn create(policy: &Policy, object: Value, namespace: &str) -> Outcome {
    round_trip(policy, admission_review(object, "CREATE", namespace))
}

fn assert_no_patch(body: &[u8]) {
    let response = response_of(body);
    assert!(
        response.get("patch").is_none() && response.get("patchType").is_none(),
        "expected neither patch nor patchType: {response:#}"
    );
}

// ---------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------

#[test]
fn design_examples_are_rewritten_in_containers() {
    let d = digest();
    let redis = format!("docker.io/bitnami/redis@{d}");
    let pinned = format!("quay.io/org/app:1.0@{d}");
    let object = pod(
        NS,
        &[],
        &[
            ("a", "nginx"),
            ("b", "library/nginx:1.27"),
            ("c", &redis),
            ("d", "quay.io/prometheus/node-exporter"),
            ("e", &pinned),
            ("f", "index.docker.io/library/nginx:1.27-alpine"),
            ("g", "ghcr.io/org/tool:v2"),
        ],
        None,
    );
    let out = create(&policy(), object, NS);
    assert_eq!(
        images(&out.patched, "containers"),
        vec![
            "harbor.corp.example/dockerhub/library/nginx".to_owned(),
            "harbor.corp.example/dockerhub/library/nginx:1.27".to_owned(),
            format!("harbor.corp.example/dockerhub/bitnami/redis@{d}"),
            "harbor.corp.example/quay/prometheus/node-exporter".to_owned(),
            format!("harbor.corp.example/quay/org/app:1.0@{d}"),
            "harbor.corp.example/dockerhub/library/nginx:1.27-alpine".to_owned(),
            "harbor.corp.example/ghcr/org/tool:v2".to_owned(),
        ]
    );
    // No tag is ever added.
    assert!(!out.patched.to_string().contains(":latest"));
    assert_eq!(
        out.pod.spec.as_ref().unwrap().containers[0]
            .image
            .as_deref(),
        Some("harbor.corp.example/dockerhub/library/nginx")
    );
    assert_eq!(
        out.response()["auditAnnotations"]["images-rewritten"],
        json!("7")
    );
    assert!(out.warnings().is_empty(), "{:?}", out.warnings());
    // The image operations are targeted replaces, never a whole container.
    for op in out.ops() {
        let path = op["path"].as_str().unwrap();
        if path.starts_with("/spec/containers/") {
            assert_eq!(op["op"], "replace");
            assert!(path.ends_with("/image"), "{path}");
        }
    }
}

#[test]
fn init_and_ephemeral_containers_are_rewritten_on_create() {
    let mut object = pod(
        NS,
        &[
            ("migrate", "ghcr.io/org/migrate:3"),
            ("wait", "busybox:1.36"),
        ],
        &[("app", "quay.io/org/app:1")],
        None,
    );
    object["spec"]["ephemeralContainers"] =
        json!([ephemeral_container("debug", "nicolaka/netshoot", "app")]);
    let out = create(&policy(), object, NS);
    assert_eq!(
        images(&out.patched, "initContainers"),
        ["harbor.corp.example/ghcr/org/migrate:3", "busybox:1.36"]
    );
    assert_eq!(
        images(&out.patched, "containers"),
        ["harbor.corp.example/quay/org/app:1"]
    );
    assert_eq!(
        images(&out.patched, "ephemeralContainers"),
        ["harbor.corp.example/dockerhub/nicolaka/netshoot"]
    );
    assert_eq!(
        out.annotation(),
        Some(json!({
            "migrate": "ghcr.io/org/migrate:3",
            "app": "quay.io/org/app:1",
            "debug": "nicolaka/netshoot"
        }))
    );
    let spec = out.pod.spec.unwrap();
    assert_eq!(spec.ephemeral_containers.unwrap()[0].name, "debug");
}

#[test]
fn odd_but_valid_references() {
    let object = pod(
        NS,
        &[],
        &[
            // Registry hosts are compared as written.
            ("upper", "DOCKER.IO/x"),
            // Component boundaries: gcr.io does not match gcr.io.evil.
            ("lookalike", "gcr.io.evil.example/app"),
            ("gcr", "gcr.io/project/app:1"),
            // No rule.
            ("own", "registry.corp.example:5000/team/app"),
            ("local", "localhost/app"),
        ],
        None,
    );
    let out = create(&policy(), object, NS);
    assert_eq!(
        images(&out.patched, "containers"),
        [
            "DOCKER.IO/x",
            "gcr.io.evil.example/app",
            "mirror.corp.example/gcr/project/app:1",
            "registry.corp.example:5000/team/app",
            "localhost/app",
        ]
    );
    // The gcr rule has no pull secret: no imagePullSecrets at all.
    assert_eq!(pull_secrets(&out.patched), None);
    assert!(out.warnings().is_empty(), "{:?}", out.warnings());
}

#[test]
fn a_rewrite_past_the_length_limit_is_left_with_a_warning() {
    // The path grows by "dockerhub/" (10 characters): 250 + 10 > 255.
    let long = format!("team/{}", "a".repeat(245));
    let object = pod(NS, &[], &[("long", &long), ("ok", "nginx:1")], None);
    let out = create(&policy(), object, NS);
    assert_eq!(
        images(&out.patched, "containers"),
        [
            long.as_str(),
            "harbor.corp.example/dockerhub/library/nginx:1"
        ]
    );
    let warnings = out.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    // Quoted in part: a warning quotes at most 100 characters of an image.
    assert!(
        warnings[0].starts_with(&format!(
            "container \"long\": image \"{}\"... (250 bytes) left unchanged",
            &long[..100]
        )),
        "{warnings:?}"
    );
}

// ---------------------------------------------------------------------------
// imagePullSecrets
// ---------------------------------------------------------------------------

fn secrets_case(existing: Option<&[&str]>) -> Outcome {
    let object = pod(
        NS,
        &[("init", "ghcr.io/org/init:1")],
        &[
            ("app", "nginx:1.27"),
            ("sidecar", "quay.io/org/sidecar:2"),
            ("exporter", "ghcr.io/org/exporter:1"),
        ],
        existing,
    );
    create(&policy(), object, NS)
}

#[test]
fn pull_secrets_absent_are_added_whole_in_order_of_first_use() {
    let out = secrets_case(None);
    // initContainers first: ghcr-pull, then containers: harbor-pull.
    assert_eq!(
        pull_secrets(&out.patched),
        Some(vec!["ghcr-pull".into(), "harbor-pull".into()])
    );
    let op = out
        .ops()
        .into_iter()
        .find(|op| {
            op["path"]
                .as_str()
                .unwrap()
                .starts_with("/spec/imagePullSecrets")
        })
        .unwrap();
    assert_eq!(op["op"], "add");
    assert_eq!(op["path"], "/spec/imagePullSecrets");
    let secrets = out.pod.spec.unwrap().image_pull_secrets.unwrap();
    assert_eq!(secrets.len(), 2);
}

#[test]
fn pull_secrets_empty_array_is_appended_to() {
    let out = secrets_case(Some(&[]));
    assert_eq!(
        pull_secrets(&out.patched),
        Some(vec!["ghcr-pull".into(), "harbor-pull".into()])
    );
}

#[test]
fn pull_secrets_existing_entries_are_kept_first_in_order() {
    let out = secrets_case(Some(&["zeta-registry", "alpha-registry"]));
    assert_eq!(
        pull_secrets(&out.patched),
        Some(vec![
            "zeta-registry".into(),
            "alpha-registry".into(),
            "ghcr-pull".into(),
            "harbor-pull".into()
        ])
    );
}

#[test]
fn pull_secrets_already_present_are_not_duplicated() {
    let out = secrets_case(Some(&["harbor-pull", "regcred"]));
    assert_eq!(
        pull_secrets(&out.patched),
        Some(vec![
            "harbor-pull".into(),
            "regcred".into(),
            "ghcr-pull".into()
        ])
    );
    let out = secrets_case(Some(&["ghcr-pull", "harbor-pull"]));
    assert_eq!(
        pull_secrets(&out.patched),
        Some(vec!["ghcr-pull".into(), "harbor-pull".into()])
    );
    assert!(
        out.ops()
            .iter()
            .all(|op| !op["path"].as_str().unwrap().contains("imagePullSecrets")),
        "{:?}",
        out.ops()
    );
}

#[test]
fn an_image_already_under_a_target_still_gets_its_pull_secret() {
    let object = pod(
        NS,
        &[],
        &[("app", "harbor.corp.example/quay/org/app:1")],
        Some(&["regcred"]),
    );
    let out = create(&policy(), object, NS);
    assert_eq!(
        images(&out.patched, "containers"),
        ["harbor.corp.example/quay/org/app:1"]
    );
    assert_eq!(
        pull_secrets(&out.patched),
        Some(vec!["regcred".into(), "harbor-pull".into()])
    );
    // Nothing was rewritten: no annotation, no audit count.
    assert_eq!(out.annotation(), None);
    assert!(out.response().get("auditAnnotations").is_none());
    assert_eq!(out.ops().len(), 1, "{:?}", out.ops());
}

// ---------------------------------------------------------------------------
// The original-images annotation
// ---------------------------------------------------------------------------

#[test]
fn annotation_added_when_the_pod_has_no_annotations() {
    let mut object = pod(NS, &[], &[("app", "nginx:1.27")], None);
    object["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    let out = create(&policy(), object, NS);
    assert_eq!(out.annotation(), Some(json!({"app": "nginx:1.27"})));
    let annotations = out.pod.metadata.annotations.unwrap();
    assert_eq!(annotations.len(), 1);
}

#[test]
fn annotation_added_beside_other_annotations_with_an_escaped_path() {
    let object = pod(NS, &[], &[("app", "nginx:1.27")], None);
    let before = object["metadata"]["annotations"].clone();
    let out = create(&policy(), object, NS);
    assert_eq!(out.annotation(), Some(json!({"app": "nginx:1.27"})));
    let op = out
        .ops()
        .into_iter()
        .find(|op| op["path"].as_str().unwrap().starts_with("/metadata"))
        .unwrap();
    assert_eq!(
        op,
        json!({"op": "add", "path": ANNOTATION_PATH, "value": "{\"app\":\"nginx:1.27\"}"})
    );
    for (key, value) in before.as_object().unwrap() {
        assert_eq!(&out.patched["metadata"]["annotations"][key], value, "{key}");
    }
}

#[test]
fn annotation_object_is_merged() {
    let mut object = pod(
        NS,
        &[],
        &[
            ("app", "nginx:1.27"),
            (
                "istio-proxy",
                "harbor.corp.example/dockerhub/istio/proxyv2:1.22",
            ),
        ],
        Some(&["harbor-pull"]),
    );
    object["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION] =
        json!(r#"{"istio-proxy":"istio/proxyv2:1.22","app":"stale:0"}"#);
    let out = create(&policy(), object, NS);
    assert_eq!(
        out.annotation(),
        Some(json!({"istio-proxy": "istio/proxyv2:1.22", "app": "nginx:1.27"}))
    );
    let op = out
        .ops()
        .into_iter()
        .find(|op| op["path"] == ANNOTATION_PATH)
        .unwrap();
    assert_eq!(op["op"], "replace");
    assert!(out.warnings().is_empty(), "{:?}", out.warnings());
    assert_eq!(
        out.patched["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"],
        "2025-01-01T00:00:00Z"
    );
}

#[test]
fn annotation_that_is_not_a_json_object_is_replaced_with_a_warning() {
    for bad in ["not json", "[\"app\"]", "\"nginx\"", "", "null"] {
        let mut object = pod(NS, &[], &[("app", "nginx:1.27")], None);
        object["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION] = json!(bad);
        let out = create(&policy(), object, NS);
        assert_eq!(
            out.annotation(),
            Some(json!({"app": "nginx:1.27"})),
            "{bad:?}"
        );
        let warnings = out.warnings();
        assert!(
            warnings
                .iter()
                .any(|w| w.contains(ORIGINAL_IMAGES_ANNOTATION) && w.contains("replaced")),
            "{bad:?}: {warnings:?}"
        );
    }
}

/// The apiserver shows only the first 4096 characters of warnings: the one
/// about the whole pod comes before the containers', so a pod of many
/// unparsable images still shows it.
#[test]
fn the_warning_about_the_pod_comes_before_the_containers() {
    let mut containers = vec![("app", "nginx:1.27")];
    let names: Vec<String> = (0..200).map(|i| format!("bad{i}")).collect();
    containers.extend(names.iter().map(|name| (name.as_str(), "Not/Valid")));
    let mut object = pod(NS, &[], &containers, None);
    object["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION] = json!("not json");
    let warnings = create(&policy(), object, NS).warnings();
    assert!(
        warnings[0].contains(ORIGINAL_IMAGES_ANNOTATION) && warnings[0].contains("replaced"),
        "{:?}",
        &warnings[..2]
    );
    assert!(
        warnings[1].starts_with(r#"container "bad0""#),
        "{}",
        warnings[1]
    );
}

// ---------------------------------------------------------------------------
// No patch
// ---------------------------------------------------------------------------

#[test]
fn nothing_to_change_means_no_patch_and_no_patch_type() {
    let object = pod(
        NS,
        &[("init", "registry.k8s.io/pause:3.9")],
        &[
            ("app", "registry.corp.example/team/app:1"),
            ("bb", "busybox"),
        ],
        None,
    );
    let out = create(&policy(), object.clone(), NS);
    assert!(out.patch.is_none());
    assert_no_patch(&out.body);
    assert_eq!(out.patched, object);
    assert!(out.response().get("auditAnnotations").is_none());
    assert!(out.response().get("warnings").is_none());
}

#[test]
fn excluded_namespaces_are_never_touched() {
    for namespace in [
        "kube-system",
        "kube-public",
        "kube-node-lease",
        "image-rewriter",
        "legacy",
    ] {
        let object = pod(
            namespace,
            &[("init", "nginx")],
            &[("app", "quay.io/org/app:1")],
            None,
        );
        let out = create(&policy(), object.clone(), namespace);
        assert_no_patch(&out.body);
        assert_eq!(out.patched, object, "{namespace}");
    }
}

#[test]
fn excluded_image_globs_are_never_touched() {
    let object = pod(
        NS,
        &[],
        &[
            ("pause", "registry.k8s.io/pause:3.9"),
            ("deep", "registry.k8s.io/sig-storage/csi-provisioner:v5.0.1"),
            ("bb", "busybox:1.36"),
            ("bb2", "docker.io/library/busybox"),
            ("internal", "quay.io/internal/tool:1"),
            // `*` stays within one component.
            ("internal-deep", "quay.io/internal/team/tool:1"),
        ],
        None,
    );
    let out = create(&policy(), object, NS);
    assert_eq!(
        images(&out.patched, "containers"),
        [
            "registry.k8s.io/pause:3.9",
            "registry.k8s.io/sig-storage/csi-provisioner:v5.0.1",
            "busybox:1.36",
            "docker.io/library/busybox",
            "quay.io/internal/tool:1",
            "harbor.corp.example/quay/internal/team/tool:1",
        ]
    );
}

#[test]
fn a_pod_labelled_enabled_false_is_left_alone() {
    let mut object = pod(NS, &[], &[("app", "nginx")], None);
    object["metadata"]["labels"]["image-rewriter.io/enabled"] = json!("false");
    let out = create(&policy(), object.clone(), NS);
    assert_no_patch(&out.body);
    assert_eq!(out.patched, object);

    // Any other value is no opt-out.
    object["metadata"]["labels"]["image-rewriter.io/enabled"] = json!("true");
    let out = create(&policy(), object, NS);
    assert_eq!(
        images(&out.patched, "containers"),
        ["harbor.corp.example/dockerhub/library/nginx"]
    );
}

/// The API copy of a static pod: the apiserver refuses one that references a
/// secret (`a mirror pod may not reference secrets`, after every mutating
/// webhook), and its images are those the kubelet runs from the node's
/// manifest, so it is never patched, whatever its other annotations.
#[test]
fn a_mirror_pod_is_left_alone() {
    let mut object = pod(NS, &[("init", "busybox")], &[("app", "nginx")], None);
    object["metadata"]["annotations"] = json!({
        "kubernetes.io/config.hash": "5c1d6a0b3f",
        "kubernetes.io/config.mirror": "5c1d6a0b3f",
        "kubernetes.io/config.source": "file",
    });
    let out = create(&policy(), object.clone(), NS);
    assert_no_patch(&out.body);
    assert_eq!(out.patched, object);

    // The same pod without the mark is rewritten.
    object["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("kubernetes.io/config.mirror");
    let out = create(&policy(), object, NS);
    assert_eq!(
        images(&out.patched, "containers"),
        ["harbor.corp.example/dockerhub/library/nginx"]
    );
}

/// Only the opt-out label and the original-images annotation are read from
/// the pod's maps (the others are skipped, not copied): they must be found
/// among many entries and when their keys are written with JSON escapes,
/// which the apiserver's encoder does not do but any JSON allows.
#[test]
fn the_label_and_annotation_read_are_found_among_others_and_escaped() {
    let policy = policy();
    let mut object = pod(NS, &[], &[("app", "nginx:1.27")], None);
    for i in 0..20 {
        object["metadata"]["labels"][format!("team.example/l{i}")] = json!(format!("v{i}"));
    }
    object["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] =
        json!(serde_json::to_string(&object).unwrap());
    object["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION] = json!(r#"{"old":"busybox"}"#);
    let escape = |body: Vec<u8>, key: &str| {
        let text = String::from_utf8(body).unwrap();
        let escaped = format!("\"{}\"", key.replace('/', "\\/"));
        assert!(text.contains(&format!("\"{key}\":")));
        text.replace(&format!("\"{key}\":"), &format!("{escaped}:"))
            .into_bytes()
    };

    let review_value = admission_review(object.clone(), "CREATE", NS);
    let body = escape(
        serde_json::to_vec(&review_value).unwrap(),
        ORIGINAL_IMAGES_ANNOTATION,
    );
    let answer = review(&policy, &body).expect("answered");
    let patch = check_response(&review_value, &answer.body).expect("a patch");
    let (patched, _) = pod_after(&object, Some(&patch));
    let originals: Value = serde_json::from_str(
        patched["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(originals, json!({"old": "busybox", "app": "nginx:1.27"}));
    assert_eq!(
        patched["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"],
        object["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
    );

    object["metadata"]["labels"]["image-rewriter.io/enabled"] = json!("false");
    let review_value = admission_review(object, "CREATE", NS);
    let body = escape(
        serde_json::to_vec(&review_value).unwrap(),
        "image-rewriter.io/enabled",
    );
    let answer = review(&policy, &body).expect("answered");
    assert_no_patch(&answer.body);
}

// ---------------------------------------------------------------------------
// Unparsable images
// ---------------------------------------------------------------------------

#[test]
fn unparsable_images_are_left_with_warnings_and_the_rest_rewritten() {
    let object = pod(
        NS,
        &[("init", "nginx:")],
        &[("app", "NGINX"), ("web", "nginx:1.27"), ("empty", "")],
        None,
    );
    let out = create(&policy(), object, NS);
    assert_eq!(images(&out.patched, "initContainers"), ["nginx:"]);
    assert_eq!(
        images(&out.patched, "containers"),
        [
            "NGINX",
            "harbor.corp.example/dockerhub/library/nginx:1.27",
            ""
        ]
    );
    let warnings = out.warnings();
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    for (kind, name, image) in [
        ("init container", "init", "nginx:"),
        ("container", "app", "NGINX"),
        ("container", "empty", ""),
    ] {
        let prefix = format!("{kind} {name:?}: image {image:?} is not a valid reference");
        assert!(
            warnings
                .iter()
                .any(|w| w.starts_with(&prefix) && w.ends_with("left unchanged")),
            "no warning starting {prefix:?} in {warnings:?}"
        );
    }
    assert_eq!(
        out.response()["auditAnnotations"]["images-rewritten"],
        json!("1")
    );
    assert_eq!(out.annotation(), Some(json!({"web": "nginx:1.27"})));
}

/// The apiserver keeps 4096 characters of warnings per request and then
/// cuts every warning to 256; and it drops a warning with a control
/// character. An image is user input: a long one is quoted shortened, with
/// its length, and its control characters escaped.
#[test]
fn a_long_or_odd_image_is_quoted_short_and_printable_in_its_warning() {
    let long = format!("NGINX{}", "x".repeat(5000));
    let object = pod(NS, &[], &[("app", &long), ("odd", "NGINX\n\u{85}")], None);
    let out = create(&policy(), object, NS);
    let warnings = out.warnings();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    for warning in &warnings {
        assert!(warning.chars().count() < 256, "{warning}");
        assert!(!warning.chars().any(char::is_control), "{warning:?}");
        assert!(warning.ends_with("left unchanged"), "{warning}");
    }
    assert!(warnings[0].contains("(5005 bytes)"), "{}", warnings[0]);
    assert!(
        warnings[1].contains(r#""NGINX\n\u{85}""#),
        "{}",
        warnings[1]
    );
}

/// The apiserver keeps a webhook's audit annotations of a request's first
/// pass and of its reinvocation on one record and refuses to overwrite a
/// key with another value: a pass over a pod rewritten before counts
/// under a key of its own.
#[test]
fn a_reinvocation_counts_its_rewrites_under_an_audit_key_of_its_own() {
    let policy = policy();
    let first = create(&policy, pod(NS, &[], &[("app", "nginx:1.27")], None), NS);
    assert_eq!(
        first.response()["auditAnnotations"],
        json!({"images-rewritten": "1"})
    );
    // A sidecar injector, reinvoking us, added two containers.
    let mut injected = first.patched.clone();
    let containers = injected["spec"]["containers"].as_array_mut().unwrap();
    containers.push(json!({"name": "istio-proxy", "image": "istio/proxyv2:1.22"}));
    containers.push(json!({"name": "exporter", "image": "quay.io/prometheus/node-exporter"}));
    let again = create(&policy, injected, NS);
    assert_eq!(
        again.response()["auditAnnotations"],
        json!({"images-rewritten-again": "2"})
    );
}

#[test]
fn only_unparsable_images_means_warnings_but_no_patch() {
    let object = pod(NS, &[], &[("app", "NGINX")], None);
    let out = create(&policy(), object, NS);
    assert_no_patch(&out.body);
    assert_eq!(out.warnings().len(), 1);
}

// ---------------------------------------------------------------------------
// pods/ephemeralcontainers (kubectl debug)
// ---------------------------------------------------------------------------

/// A running pod as stored, with a realistic status.
fn running_pod(pull_secrets: Option<&[&str]>) -> Value {
    let mut object = pod(NS, &[], &[("app", "nginx:1.27")], pull_secrets);
    object["metadata"]["uid"] = json!("5d0f6e33-8a4b-4c65-9a3e-7f51c2e8d9b0");
    object["metadata"]["resourceVersion"] = json!("48213");
    object["metadata"]["creationTimestamp"] = json!("2025-01-01T00:00:00Z");
    object["spec"]["nodeName"] = json!("worker-1");
    object["status"] = json!({
        "phase": "Running",
        "conditions": [
            {"type": "Ready", "status": "True", "lastProbeTime": null, "lastTransitionTime": "2025-01-01T00:00:05Z"}
        ],
        "hostIP": "172.18.0.3",
        "podIP": "10.244.1.7",
        "podIPs": [{"ip": "10.244.1.7"}],
        "startTime": "2025-01-01T00:00:00Z",
        "containerStatuses": [{
            "name": "app",
            "state": {"running": {"startedAt": "2025-01-01T00:00:04Z"}},
            "lastState": {},
            "ready": true,
            "restartCount": 0,
            "image": "docker.io/library/nginx:1.27",
            "imageID": format!("docker.io/library/nginx@{}", digest()),
            "containerID": "containerd://0123abcd",
            "started": true
        }],
        "qosClass": "Burstable"
    });
    object
}

fn debug_review(pull_secrets: Option<&[&str]>, new_image: &str) -> (Value, Value) {
    let mut old = running_pod(pull_secrets);
    old["spec"]["ephemeralContainers"] = json!([ephemeral_container(
        "debugger-old",
        "nicolaka/netshoot:v0.12",
        "app"
    )]);
    let mut new = old.clone();
    new["spec"]["ephemeralContainers"]
        .as_array_mut()
        .unwrap()
        .push(ephemeral_container("debugger-new", new_image, "app"));
    new["metadata"]["resourceVersion"] = json!("48290");
    (old, new)
}

#[test]
fn ephemeral_update_rewrites_only_the_new_container() {
    let (old, new) = debug_review(Some(&["harbor-pull"]), "nicolaka/netshoot:v0.13");
    let out = round_trip(&policy(), ephemeral_containers_review(old, new.clone(), NS));
    assert_eq!(
        out.ops(),
        vec![json!({
            "op": "replace",
            "path": "/spec/ephemeralContainers/1/image",
            "value": "harbor.corp.example/dockerhub/nicolaka/netshoot:v0.13"
        })]
    );
    assert_eq!(
        images(&out.patched, "ephemeralContainers"),
        [
            "nicolaka/netshoot:v0.12",
            "harbor.corp.example/dockerhub/nicolaka/netshoot:v0.13"
        ]
    );
    // Regular containers are not touched on this subresource.
    assert_eq!(images(&out.patched, "containers"), ["nginx:1.27"]);
    assert_eq!(out.patched["metadata"], new["metadata"]);
    assert!(out.warnings().is_empty(), "{:?}", out.warnings());
    assert_eq!(
        out.response()["auditAnnotations"]["images-rewritten"],
        json!("1")
    );
}

/// A pod's volumes cannot change after it is created: an ephemeral
/// container's update leaves its image volumes as they are, rewritten or
/// not.
#[test]
fn ephemeral_update_leaves_image_volumes_alone() {
    let (mut old, mut new) = debug_review(Some(&["harbor-pull"]), "nicolaka/netshoot:v0.13");
    let volumes = json!([{"name": "models", "image": {"reference": "quay.io/org/models:v3"}}]);
    old["spec"]["volumes"] = volumes.clone();
    new["spec"]["volumes"] = volumes.clone();
    let out = round_trip(&policy(), ephemeral_containers_review(old, new, NS));
    assert_eq!(out.ops().len(), 1, "{:?}", out.ops());
    assert_eq!(out.patched["spec"]["volumes"], volumes);
}

/// Image volumes beside containers: the containers recorded in the
/// original-images annotation, the volumes in original-volume-images (a
/// container and a volume may share a name), a volume already under a
/// target still gets its rule's pull secret, and pull secrets follow first
/// use: containers first, then volumes.
#[test]
fn image_volumes_are_rewritten_beside_containers() {
    let mut object = pod(NS, &[], &[("models", "nginx:1.27")], None);
    object["spec"]["volumes"] = json!([
        {"name": "cache", "emptyDir": {}},
        {"name": "models", "image": {"reference": "ghcr.io/org/models:v3", "pullPolicy": "IfNotPresent"}},
        {"name": "moved", "image": {"reference": "harbor.corp.example/quay/org/data:1"}},
        {"name": "public", "image": {"reference": "gcr.io/org/tools:2"}}
    ]);
    let out = create(&policy(), object, NS);
    let reference =
        |index: usize| out.patched["spec"]["volumes"][index]["image"]["reference"].clone();
    assert_eq!(reference(1), "harbor.corp.example/ghcr/org/models:v3");
    assert_eq!(reference(2), "harbor.corp.example/quay/org/data:1");
    assert_eq!(reference(3), "mirror.corp.example/gcr/org/tools:2");
    assert_eq!(
        out.patched["spec"]["volumes"][1]["image"]["pullPolicy"],
        "IfNotPresent"
    );
    assert_eq!(out.annotation(), Some(json!({"models": "nginx:1.27"})));
    let volumes = out.patched["metadata"]["annotations"][ORIGINAL_VOLUME_IMAGES_ANNOTATION]
        .as_str()
        .map(|text| serde_json::from_str::<Value>(text).unwrap());
    assert_eq!(
        volumes,
        Some(json!({"models": "ghcr.io/org/models:v3", "public": "gcr.io/org/tools:2"}))
    );
    assert_eq!(
        pull_secrets(&out.patched),
        Some(vec!["harbor-pull".to_owned(), "ghcr-pull".to_owned()])
    );
    assert_eq!(
        out.response()["auditAnnotations"]["images-rewritten"],
        json!("3")
    );
    assert!(out.warnings().is_empty(), "{:?}", out.warnings());
}

#[test]
fn ephemeral_update_warns_when_the_pod_lacks_the_pull_secret() {
    for existing in [None, Some(&["regcred"][..])] {
        let (old, new) = debug_review(existing, "nicolaka/netshoot:v0.13");
        let out = round_trip(&policy(), ephemeral_containers_review(old, new, NS));
        assert!(
            out.ops()
                .iter()
                .all(|op| op["path"] == "/spec/ephemeralContainers/1/image"),
            "{:?}",
            out.ops()
        );
        let warnings = out.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("\"harbor-pull\"") && warnings[0].contains("debugger-new"),
            "{warnings:?}"
        );
    }
}

#[test]
fn ephemeral_update_under_the_target_still_warns_about_the_secret() {
    let (old, new) = debug_review(None, "harbor.corp.example/quay/org/debug:1");
    let review = ephemeral_containers_review(old, new, NS);
    let out = round_trip(&policy(), review);
    assert!(out.patch.is_none());
    let warnings = out.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("\"harbor-pull\""), "{warnings:?}");
}

/// The apiserver shows the first 4096 characters of warnings: what the pod
/// lacks comes before the warnings about each new container's image, or a
/// debug session of many unparsable images would hide it.
#[test]
fn ephemeral_update_warns_about_the_missing_secret_first() {
    let (old, mut new) = debug_review(None, "nicolaka/netshoot:v0.13");
    let debuggers = new["spec"]["ephemeralContainers"].as_array_mut().unwrap();
    let needs_the_secret = debuggers.pop().unwrap();
    for index in 0..60 {
        debuggers.push(ephemeral_container(
            &format!("debugger-unparsable-{index}"),
            "Busybox",
            "app",
        ));
    }
    debuggers.push(needs_the_secret);
    let out = round_trip(&policy(), ephemeral_containers_review(old, new, NS));
    let warnings = out.warnings();
    assert!(
        warnings[0].contains("\"debugger-new\"")
            && warnings[0].contains("no imagePullSecret \"harbor-pull\""),
        "{warnings:?}"
    );
    assert!(
        warnings[1].contains("\"debugger-unparsable-0\""),
        "{warnings:?}"
    );
    assert!(
        warnings.last().unwrap().contains("more warnings left out"),
        "{warnings:?}"
    );
}

#[test]
fn ephemeral_update_with_an_unparsable_image_warns() {
    let (old, new) = debug_review(Some(&["harbor-pull"]), "Busybox");
    let out = round_trip(&policy(), ephemeral_containers_review(old, new, NS));
    assert!(out.patch.is_none());
    let warnings = out.warnings();
    assert!(
        warnings.iter().any(|w| w.starts_with(
            "ephemeral container \"debugger-new\": image \"Busybox\" is not a valid reference"
        )),
        "{warnings:?}"
    );
}

#[test]
fn ephemeral_update_in_an_excluded_namespace_is_untouched() {
    let (mut old, mut new) = debug_review(None, "nicolaka/netshoot:v0.13");
    old["metadata"]["namespace"] = json!("kube-system");
    new["metadata"]["namespace"] = json!("kube-system");
    let out = round_trip(
        &policy(),
        ephemeral_containers_review(old, new, "kube-system"),
    );
    assert_no_patch(&out.body);
    assert!(out.warnings().is_empty());
}

// ---------------------------------------------------------------------------
// Requests the webhook does not act on
// ---------------------------------------------------------------------------

fn deployment() -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "app", "image": "nginx:1.27"}]}
            }
        }
    })
}

#[test]
fn other_kinds_and_operations_are_allowed_without_a_patch() {
    let rewritable = pod(NS, &[], &[("app", "nginx:1.27")], None);
    let mut status_update = admission_review_full(
        Some(rewritable.clone()),
        Some(rewritable.clone()),
        "UPDATE",
        NS,
        Some("status"),
        false,
    );
    status_update["request"]["object"]["status"] = json!({"phase": "Running"});
    let cases = [
        (
            "Deployment CREATE",
            admission_review(deployment(), "CREATE", NS),
        ),
        (
            "Pod UPDATE",
            admission_review(rewritable.clone(), "UPDATE", NS),
        ),
        (
            "Pod DELETE",
            admission_review(rewritable.clone(), "DELETE", NS),
        ),
        ("pods/status UPDATE", status_update),
        (
            "pods/eviction CREATE",
            admission_review_full(
                Some(
                    json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "web", "namespace": NS}}),
                ),
                None,
                "CREATE",
                NS,
                Some("eviction"),
                false,
            ),
        ),
        (
            "ConfigMap CREATE",
            admission_review(
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"image": "nginx"}}),
                "CREATE",
                NS,
            ),
        ),
    ];
    for (what, review) in cases {
        let (body, patch) = review_in_process(&policy(), &review);
        assert!(patch.is_none(), "{what}: {patch:?}");
        assert_no_patch(&body);
        assert!(warnings_of(&body).is_empty(), "{what}");
    }
}

#[test]
fn dry_run_is_answered_like_a_real_request() {
    let object = pod(
        NS,
        &[("init", "ghcr.io/org/init:1")],
        &[("app", "nginx"), ("x", "NGINX")],
        None,
    );
    let real = admission_review_full(Some(object.clone()), None, "CREATE", NS, None, false);
    let dry = admission_review_full(Some(object), None, "CREATE", NS, None, true);
    let (real_body, real_patch) = review_in_process(&policy(), &real);
    let (dry_body, dry_patch) = review_in_process(&policy(), &dry);
    assert!(real_patch.is_some());
    assert_eq!(real_patch, dry_patch);
    assert_eq!(warnings_of(&real_body), warnings_of(&dry_body));
    let reviewed = review(&policy(), &serde_json::to_vec(&dry).unwrap()).unwrap();
    assert!(reviewed.summary.dry_run);
    assert!(reviewed.summary.patched);
}

// ---------------------------------------------------------------------------
// Bodies that are not answerable
// ---------------------------------------------------------------------------

#[test]
fn bad_bodies_are_errors() {
    let good = admission_review(pod(NS, &[], &[("app", "nginx")], None), "CREATE", NS);
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut review = good.clone();
        edit(&mut review);
        serde_json::to_vec(&review).unwrap()
    };
    type IsExpected = fn(&ReviewError) -> bool;
    let cases: Vec<(&str, Vec<u8>, IsExpected)> = vec![
        ("not JSON", b"{not json".to_vec(), |e| {
            matches!(e, ReviewError::NotAReview(_))
        }),
        ("empty body", Vec::new(), |e| {
            matches!(e, ReviewError::NotAReview(_))
        }),
        ("JSON array", b"[]".to_vec(), |e| {
            matches!(e, ReviewError::NotAReview(_))
        }),
        (
            "v1beta1",
            with(&|r| r["apiVersion"] = json!("admission.k8s.io/v1beta1")),
            |e| matches!(e, ReviewError::UnsupportedVersion(v) if v == "admission.k8s.io/v1beta1"),
        ),
        (
            "wrong kind",
            with(&|r| r["kind"] = json!("AdmissionReviewX")),
            |e| matches!(e, ReviewError::NotAdmissionReview(_)),
        ),
        (
            "missing request",
            with(&|r| {
                r.as_object_mut().unwrap().remove("request");
            }),
            |e| matches!(e, ReviewError::MissingRequest),
        ),
        (
            "missing object on CREATE",
            with(&|r| r["request"]["object"] = Value::Null),
            |e| matches!(e, ReviewError::MissingObject("CREATE")),
        ),
        (
            "object absent on CREATE",
            with(&|r| {
                r["request"].as_object_mut().unwrap().remove("object");
            }),
            |e| matches!(e, ReviewError::MissingObject("CREATE")),
        ),
        (
            "empty uid",
            with(&|r| r["request"]["uid"] = json!("")),
            |e| matches!(e, ReviewError::MissingUid),
        ),
        (
            "containers is a string",
            with(&|r| r["request"]["object"]["spec"]["containers"] = json!("nginx")),
            |e| matches!(e, ReviewError::InvalidPod(_)),
        ),
        (
            "image is a number",
            with(&|r| r["request"]["object"]["spec"]["containers"][0]["image"] = json!(42)),
            |e| matches!(e, ReviewError::InvalidPod(_)),
        ),
    ];
    for (what, body, expected) in cases {
        match review(&policy(), &body) {
            Ok(reviewed) => panic!(
                "{what}: answered {}",
                String::from_utf8_lossy(&reviewed.body)
            ),
            Err(error) => {
                assert!(expected(&error), "{what}: unexpected error {error:?}");
                assert!(!error.to_string().is_empty());
            }
        }
    }
    // And the ephemeral UPDATE without its object.
    let (old, new) = debug_review(None, "nicolaka/netshoot");
    let mut review_body = ephemeral_containers_review(old, new, NS);
    review_body["request"]["object"] = Value::Null;
    assert!(matches!(
        review(&policy(), &serde_json::to_vec(&review_body).unwrap()),
        Err(ReviewError::MissingObject("UPDATE"))
    ));
}

// ---------------------------------------------------------------------------
// Fields the Rust types do not know
// ---------------------------------------------------------------------------

#[test]
fn unknown_fields_survive_the_patch() {
    let mut object = pod(
        NS,
        &[("init", "nginx")],
        &[("app", "quay.io/org/app:1")],
        None,
    );
    object["spec"]["containers"][0]["futureContainerField"] = json!({"enabled": true});
    object["metadata"]["futureMetadataField"] = json!("kept");
    object["futureTopLevel"] = json!([1, 2, 3]);
    let out = create(&policy(), object.clone(), NS);
    assert_eq!(out.patched["spec"]["someFutureField"], json!({"x": 1}));
    assert_eq!(
        out.patched["spec"]["containers"][0]["futureContainerField"],
        json!({"enabled": true})
    );
    assert_eq!(out.patched["metadata"]["futureMetadataField"], "kept");
    assert_eq!(out.patched["futureTopLevel"], json!([1, 2, 3]));
    // Only the image, pull-secret and annotation paths differ.
    let mut expected = object;
    expected["spec"]["initContainers"][0]["image"] =
        json!("harbor.corp.example/dockerhub/library/nginx");
    expected["spec"]["containers"][0]["image"] = json!("harbor.corp.example/quay/org/app:1");
    expected["spec"]["imagePullSecrets"] = json!([{"name": "harbor-pull"}]);
    assert_eq!(
        out.annotation(),
        Some(json!({"init": "nginx", "app": "quay.io/org/app:1"}))
    );
    let mut patched = out.patched.clone();
    patched["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove(ORIGINAL_IMAGES_ANNOTATION);
    assert_eq!(patched, expected);
}

/// The webhook decodes only the fields it reads (`image_rewriter::pod`):
/// empty and `null` forms of those fields must still give patches that
/// apply to the object as sent.
#[test]
fn empty_and_null_forms_of_the_fields_read_are_patched_correctly() {
    type Change = dyn Fn(&mut Value);
    let cases: [(&str, &Change); 5] = [
        ("metadata: {}", &|o| o["metadata"] = json!({})),
        ("annotations: null", &|o| {
            o["metadata"]["annotations"] = Value::Null
        }),
        ("labels: null", &|o| o["metadata"]["labels"] = Value::Null),
        ("imagePullSecrets: null", &|o| {
            o["spec"]["imagePullSecrets"] = Value::Null
        }),
        ("initContainers: null, ephemeralContainers: null", &|o| {
            o["spec"]["initContainers"] = Value::Null;
            o["spec"]["ephemeralContainers"] = Value::Null;
        }),
    ];
    for (what, change) in cases {
        let mut object = pod(NS, &[], &[("app", "nginx:1.27")], None);
        change(&mut object);
        let out = create(&policy(), object, NS);
        assert_eq!(
            out.patched["spec"]["containers"][0]["image"],
            "harbor.corp.example/dockerhub/library/nginx:1.27",
            "{what}"
        );
        assert_eq!(
            out.patched["spec"]["imagePullSecrets"],
            json!([{"name": "harbor-pull"}]),
            "{what}"
        );
        assert_eq!(
            out.annotation(),
            Some(json!({"app": "nginx:1.27"})),
            "{what}"
        );
    }
}

// ---------------------------------------------------------------------------
// plan_pod_patch on a pod template (the offline path)
// ---------------------------------------------------------------------------

#[test]
fn plan_on_a_deployment_template_applies_at_its_location() {
    use image_rewriter::pod::PodImages;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    let policy = policy();
    for with_metadata in [true, false] {
        let mut document = deployment();
        if !with_metadata {
            document["spec"]["template"]
                .as_object_mut()
                .unwrap()
                .remove("metadata");
        }
        let template = &document["spec"]["template"];
        let metadata: Option<ObjectMeta> = template
            .get("metadata")
            .map(|m| serde_json::from_value(m.clone()).unwrap());
        let spec: PodImages = serde_json::from_value(template["spec"].clone()).unwrap();
        let plan = plan_pod_patch(
            &policy,
            PodView {
                namespace: Some(NS),
                metadata: metadata.as_ref(),
                annotations_bytes: metadata
                    .as_ref()
                    .and_then(|m| m.annotations.as_ref())
                    .map_or(0, annotations_bytes),
                spec: Some(&spec),
                location: &["spec", "template"],
            },
            &Scope::WholePod,
        );
        let patch = serde_json::to_value(json_patch::Patch(plan.operations.clone())).unwrap();
        let patched = apply_json_patch(&document, &patch)
            .unwrap_or_else(|e| panic!("with_metadata={with_metadata}: {e}\n{patch:#}"));
        assert_eq!(
            patched["spec"]["template"]["spec"]["containers"][0]["image"],
            "harbor.corp.example/dockerhub/library/nginx:1.27"
        );
        assert_eq!(
            patched["spec"]["template"]["spec"]["imagePullSecrets"],
            json!([{"name": "harbor-pull"}])
        );
        assert_eq!(
            patched["spec"]["template"]["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION],
            r#"{"app":"nginx:1.27"}"#
        );
        assert_eq!(plan.rewritten.len(), 1);
        assert_eq!(plan.rewritten[0].rule, "docker.io");
    }
}

#[test]
fn two_rules_with_different_secrets_each_add_theirs() {
    let object = pod(
        NS,
        &[],
        &[
            ("a", "quay.io/org/a:1"),
            ("b", "ghcr.io/org/b:1"),
            ("c", "nginx"),
        ],
        Some(&["ghcr-pull"]),
    );
    let out = create(&policy(), object, NS);
    assert_eq!(
        pull_secrets(&out.patched),
        Some(vec!["ghcr-pull".into(), "harbor-pull".into()])
    );
    let appends: Vec<_> = out
        .ops()
        .into_iter()
        .filter(|op| op["path"] == "/spec/imagePullSecrets/-")
        .collect();
    assert_eq!(
        appends,
        vec![
            json!({"op": "add", "path": "/spec/imagePullSecrets/-", "value": {"name": "harbor-pull"}})
        ]
    );
}

fn refusal_of(yaml: &str) -> String {
    match ConfigFile::from_yaml(yaml)
        .expect("config parses")
        .into_policy(None)
    {
        Ok(_) => panic!("config was accepted:\n{yaml}"),
        Err(error) => error.to_string(),
    }
}

/// Two rules that share a target but differ in pullSecret would make a
/// reinvocation attribute `harbor.corp.example/mirror/org/app:1` to the
/// wrong rule and add a second secret: such a config is refused instead.
#[test]
fn rules_sharing_a_target_must_share_the_pull_secret() {
    let message = refusal_of(
        r#"
rules:
  - match: docker.io
    target: harbor.corp.example/mirror
    pullSecret: hub-pull
  - match: quay.io
    target: harbor.corp.example/mirror
    pullSecret: quay-pull
"#,
    );
    assert!(message.starts_with("rules[1].pullSecret"), "{message}");
    assert!(message.contains("hub-pull"), "{message}");

    // With one secret the shared target converges on reinvocation.
    let policy = policy_from(
        r#"
rules:
  - match: docker.io
    target: harbor.corp.example/mirror
    pullSecret: mirror-pull
  - match: quay.io
    target: harbor.corp.example/mirror
    pullSecret: mirror-pull
"#,
    );
    let object = pod(NS, &[], &[("app", "quay.io/org/app:1")], None);
    let out = create(&policy, object, NS);
    assert_eq!(
        images(&out.patched, "containers"),
        ["harbor.corp.example/mirror/org/app:1"]
    );
}

/// Nested targets: `harbor.corp.example/hub/quay/tool` could be Docker Hub's
/// user "quay" or quay.io's; with different secrets that is ambiguous.
#[test]
fn nested_targets_must_share_the_pull_secret() {
    let message = refusal_of(
        r#"
rules:
  - match: docker.io
    target: harbor.corp.example/hub
    pullSecret: hub-pull
  - match: quay.io
    target: harbor.corp.example/hub/quay
    pullSecret: quay-pull
"#,
    );
    assert!(message.starts_with("rules[1].pullSecret"), "{message}");
}

/// A rule whose match lies under some target never fires: every image it
/// matches is already "under a target".
#[test]
fn a_match_under_a_target_is_refused() {
    let message = refusal_of(
        r#"
rules:
  - match: docker.io
    target: docker.io
"#,
    );
    assert!(message.starts_with("rules[0].match"), "{message}");
}

mod apply_json_patch_selftest {
    use super::common::*;
    use base64::Engine as _;
    use serde_json::{Value, json};

    fn ok(doc: Value, patch: Value) -> Value {
        apply_json_patch(&doc, &patch).unwrap()
    }

    fn err(doc: Value, patch: Value) {
        assert!(
            apply_json_patch(&doc, &patch).is_err(),
            "patch {patch} applied to {doc}"
        );
    }

    // RFC 6902 appendix A examples.
    #[test]
    fn a1_add_object_member() {
        assert_eq!(
            ok(
                json!({"foo": "bar"}),
                json!([{"op": "add", "path": "/baz", "value": "qux"}])
            ),
            json!({"baz": "qux", "foo": "bar"})
        );
    }

    #[test]
    fn a2_add_array_element() {
        assert_eq!(
            ok(
                json!({"foo": ["bar", "baz"]}),
                json!([{"op": "add", "path": "/foo/1", "value": "qux"}])
            ),
            json!({"foo": ["bar", "qux", "baz"]})
        );
    }

    #[test]
    fn a3_a4_remove() {
        assert_eq!(
            ok(
                json!({"baz": "qux", "foo": "bar"}),
                json!([{"op": "remove", "path": "/baz"}])
            ),
            json!({"foo": "bar"})
        );
        assert_eq!(
            ok(
                json!({"foo": ["bar", "qux", "baz"]}),
                json!([{"op": "remove", "path": "/foo/1"}])
            ),
            json!({"foo": ["bar", "baz"]})
        );
    }

    #[test]
    fn a5_replace() {
        assert_eq!(
            ok(
                json!({"baz": "qux", "foo": "bar"}),
                json!([{"op": "replace", "path": "/baz", "value": "boo"}])
            ),
            json!({"baz": "boo", "foo": "bar"})
        );
    }

    #[test]
    fn a6_a7_move() {
        assert_eq!(
            ok(
                json!({"foo": {"bar": "baz", "waldo": "fred"}, "qux": {"corge": "grault"}}),
                json!([{"op": "move", "from": "/foo/waldo", "path": "/qux/thud"}])
            ),
            json!({"foo": {"bar": "baz"}, "qux": {"corge": "grault", "thud": "fred"}})
        );
        assert_eq!(
            ok(
                json!({"foo": ["all", "grass", "cows", "eat"]}),
                json!([{"op": "move", "from": "/foo/1", "path": "/foo/3"}])
            ),
            json!({"foo": ["all", "cows", "eat", "grass"]})
        );
    }

    #[test]
    fn a8_a9_test() {
        ok(
            json!({"baz": "qux", "foo": ["a", 2, "c"]}),
            json!([{"op": "test", "path": "/baz", "value": "qux"}, {"op": "test", "path": "/foo/1", "value": 2}]),
        );
        err(
            json!({"baz": "qux"}),
            json!([{"op": "test", "path": "/baz", "value": "bar"}]),
        );
    }

    #[test]
    fn a10_add_nested_member() {
        assert_eq!(
            ok(
                json!({"foo": "bar"}),
                json!([{"op": "add", "path": "/child", "value": {"grandchild": {}}}])
            ),
            json!({"foo": "bar", "child": {"grandchild": {}}})
        );
    }

    #[test]
    fn a12_add_to_nonexistent_target() {
        err(
            json!({"foo": "bar"}),
            json!([{"op": "add", "path": "/baz/bat", "value": "qux"}]),
        );
    }

    #[test]
    fn a14_escape_ordering() {
        ok(
            json!({"/": 9, "~1": 10}),
            json!([{"op": "test", "path": "/~01", "value": 10}, {"op": "test", "path": "/~1", "value": 9}]),
        );
        assert_eq!(
            ok(
                json!({"a": {}}),
                json!([{"op": "add", "path": "/a/x.io~1y", "value": "v"}])
            ),
            json!({"a": {"x.io/y": "v"}})
        );
    }

    #[test]
    fn a16_add_array_value_and_append() {
        assert_eq!(
            ok(
                json!({"foo": ["bar"]}),
                json!([{"op": "add", "path": "/foo/-", "value": ["abc", "def"]}])
            ),
            json!({"foo": ["bar", ["abc", "def"]]})
        );
        assert_eq!(
            ok(
                json!({"foo": []}),
                json!([{"op": "add", "path": "/foo/0", "value": 1}])
            ),
            json!({"foo": [1]})
        );
    }

    #[test]
    fn copy_and_whole_document() {
        assert_eq!(
            ok(
                json!({"a": [1]}),
                json!([{"op": "copy", "from": "/a", "path": "/b"}])
            ),
            json!({"a": [1], "b": [1]})
        );
        assert_eq!(
            ok(
                json!({"a": 1}),
                json!([{"op": "add", "path": "", "value": [2]}])
            ),
            json!([2])
        );
    }

    #[test]
    fn strictness_like_the_apiserver() {
        // `-` on an absent array, index past the end, replace/remove of
        // missing members, bad escapes, leading zeros, moving into a child.
        err(
            json!({"spec": {}}),
            json!([{"op": "add", "path": "/spec/imagePullSecrets/-", "value": {}}]),
        );
        err(
            json!({"a": [1]}),
            json!([{"op": "add", "path": "/a/2", "value": 0}]),
        );
        err(
            json!({"a": [1]}),
            json!([{"op": "replace", "path": "/a/1", "value": 0}]),
        );
        err(
            json!({"a": {}}),
            json!([{"op": "replace", "path": "/a/b", "value": 0}]),
        );
        err(json!({"a": {}}), json!([{"op": "remove", "path": "/a/b"}]));
        err(
            json!({"a": {}}),
            json!([{"op": "add", "path": "/a/~2", "value": 0}]),
        );
        err(
            json!({"a": [1, 2]}),
            json!([{"op": "replace", "path": "/a/01", "value": 0}]),
        );
        err(
            json!({"a": {"b": {}}}),
            json!([{"op": "move", "from": "/a", "path": "/a/b/c"}]),
        );
        err(json!({"a": 1}), json!([{"op": "frobnicate", "path": "/a"}]));
        err(json!({"a": 1}), json!([{"op": "add", "path": "/b"}]));
        err(
            json!({"a": 1}),
            json!({"op": "add", "path": "/b", "value": 1}),
        );
        // A patch whose later operation fails is refused whole (the input
        // is borrowed, so it is never changed either way).
        assert!(apply_json_patch(&json!({"a": 1}), &json!([{"op": "replace", "path": "/a", "value": 2}, {"op": "remove", "path": "/x"}])).is_err());
    }

    #[test]
    fn reviews_have_unique_uids_and_check_response_reads_answers() {
        let a = admission_review(
            pod("default", &[], &[("app", "nginx")], None),
            "CREATE",
            "default",
        );
        let b = admission_review(
            pod("default", &[], &[("app", "nginx")], None),
            "CREATE",
            "default",
        );
        assert_ne!(uid_of(&a), uid_of(&b));
        let patch = json!([{"op": "replace", "path": "/spec/containers/0/image", "value": "x.example/nginx"}]);
        let encoded = base64::engine::general_purpose::STANDARD.encode(patch.to_string());
        let body = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "response": {"uid": uid_of(&a), "allowed": true, "patchType": "JSONPatch", "patch": encoded}
        });
        let decoded = check_response(&a, body.to_string().as_bytes());
        assert_eq!(decoded, Some(patch.clone()));
        let (_, after) = pod_after(&a["request"]["object"], decoded.as_ref());
        assert_eq!(
            after.spec.unwrap().containers[0].image.as_deref(),
            Some("x.example/nginx")
        );
    }

    #[test]
    #[should_panic(expected = "patchType without patch")]
    fn check_response_refuses_a_patch_type_alone() {
        let a = admission_review(
            pod("default", &[], &[("app", "nginx")], None),
            "CREATE",
            "default",
        );
        let body = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "response": {"uid": uid_of(&a), "allowed": true, "patchType": "JSONPatch"}
        });
        check_response(&a, body.to_string().as_bytes());
    }
}

/// Both records are written whatever the pod holds: no `metadata`, no
/// `annotations`, other annotations, or both records already (a
/// reinvocation after another webhook added a container and a volume).
#[test]
fn both_records_are_written_whatever_metadata_the_pod_has() {
    let previous = json!({
        ORIGINAL_IMAGES_ANNOTATION: r#"{"earlier":"nginx:1.26"}"#,
        ORIGINAL_VOLUME_IMAGES_ANNOTATION: r#"{"earlier":"quay.io/org/old:1"}"#,
    });
    for (case, annotations) in [
        ("no metadata", None),
        ("no annotations", Some(Value::Null)),
        ("other annotations", Some(json!({"team": "shop"}))),
        ("both records", Some(previous)),
    ] {
        let mut object = pod(NS, &[], &[("app", "nginx:1.27")], None);
        object["spec"]["volumes"] =
            json!([{"name": "models", "image": {"reference": "quay.io/org/models:v3"}}]);
        match &annotations {
            None => {
                object.as_object_mut().unwrap().remove("metadata");
            }
            Some(Value::Null) => {
                object["metadata"]
                    .as_object_mut()
                    .unwrap()
                    .remove("annotations");
            }
            Some(annotations) => object["metadata"]["annotations"] = annotations.clone(),
        }
        let out = create(&policy(), object, NS);
        let record = |annotation: &str| {
            out.patched["metadata"]["annotations"][annotation]
                .as_str()
                .map(|text| serde_json::from_str::<Value>(text).unwrap())
        };
        let earlier = |image: &str| {
            if case == "both records" {
                json!({"earlier": image})
            } else {
                json!({})
            }
        };
        let mut containers = earlier("nginx:1.26");
        containers["app"] = json!("nginx:1.27");
        let mut volumes = earlier("quay.io/org/old:1");
        volumes["models"] = json!("quay.io/org/models:v3");
        assert_eq!(
            record(ORIGINAL_IMAGES_ANNOTATION),
            Some(containers),
            "{case}"
        );
        assert_eq!(
            record(ORIGINAL_VOLUME_IMAGES_ANNOTATION),
            Some(volumes),
            "{case}"
        );
        if case == "other annotations" {
            assert_eq!(out.patched["metadata"]["annotations"]["team"], "shop");
        }
    }
}
