//! The stored AdmissionReview bodies (`tests/fixtures/admission/*.json`, and
//! `examples/admission-review.json` that the README sends with curl),
//! answered with `examples/config.yaml` and checked as the apiserver reads
//! the answer. Each fixture is a complete apiserver-shaped request, so the
//! same files can be POSTed to a running server.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use image_rewriter::admission::{ReviewError, plan_review, review};
use image_rewriter::config::load_policy;
use image_rewriter::policy::Policy;
use serde_json::{Value, json};

const DIGEST: &str = "sha256:4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn example_policy() -> Policy {
    load_policy(&root().join("examples/config.yaml"), Some("image-rewriter"))
        .expect("examples/config.yaml is valid")
}

fn fixture(name: &str) -> Value {
    let path = root().join("tests/fixtures/admission").join(name);
    read_json(&path)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Answers a stored review; returns the patched object, the response, and
/// asserts a reinvocation with the patched object is not patched again.
fn answer(review_body: &Value) -> (Value, Value, Option<Value>) {
    let policy = example_policy();
    let (body, patch) = review_in_process(&policy, review_body);
    let object = &review_body["request"]["object"];
    let patched = if object.is_null() {
        assert!(patch.is_none());
        Value::Null
    } else if review_body["request"]["kind"]["kind"] == "Pod" {
        let (patched, _pod) = pod_after(object, patch.as_ref());
        let mut again = review_body.clone();
        again["request"]["object"] = patched.clone();
        let (_, second) = review_in_process(&policy, &again);
        assert!(second.is_none(), "reinvocation patched again: {second:?}");
        patched
    } else {
        object.clone()
    };
    (patched, response_of(&body), patch)
}

#[test]
fn the_readme_example_is_rewritten() {
    let review_body = read_json(&root().join("examples/admission-review.json"));
    assert_eq!(uid_of(&review_body), "705ab4f5-6393-11e8-b7cc-42010a800002");
    let (patched, response, patch) = answer(&review_body);
    assert!(patch.is_some());
    assert_eq!(
        images(&patched, "initContainers"),
        ["harbor.corp.example/ghcr/org/app-migrations:2.4.1"]
    );
    assert_eq!(
        images(&patched, "containers"),
        [
            format!("harbor.corp.example/ghcr/org/app@{DIGEST}"),
            "harbor.corp.example/dockerhub/library/nginx:1.27".to_owned()
        ]
    );
    assert_eq!(pull_secrets(&patched), Some(vec!["harbor-pull".to_owned()]));
    assert_eq!(response["auditAnnotations"]["images-rewritten"], "3");
    let originals: Value = serde_json::from_str(
        patched["metadata"]["annotations"]["image-rewriter.io/original-images"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        originals,
        json!({
            "migrate": "ghcr.io/org/app-migrations:2.4.1",
            "app": format!("ghcr.io/org/app@{DIGEST}"),
            "nginx": "nginx:1.27"
        })
    );
}

#[test]
fn pod_create() {
    let (patched, response, _) = answer(&fixture("pod-create.json"));
    // busybox is excluded by examples/config.yaml.
    assert_eq!(images(&patched, "initContainers"), ["busybox:1.36"]);
    assert_eq!(
        images(&patched, "containers"),
        [
            "harbor.corp.example/quay/prometheus/node-exporter:v1.8.0",
            "harbor.corp.example/dockerhub/library/nginx:1.27",
            "harbor.corp.example/k8s/pause:3.9",
        ]
    );
    assert_eq!(
        pull_secrets(&patched),
        Some(vec!["regcred".to_owned(), "harbor-pull".to_owned()])
    );
    assert_eq!(response["auditAnnotations"]["images-rewritten"], "3");
    assert!(response.get("warnings").is_none());
}

#[test]
fn pod_create_dry_run() {
    let (patched, _, patch) = answer(&fixture("pod-create-dry-run.json"));
    assert!(patch.is_some());
    assert_eq!(
        images(&patched, "containers"),
        ["harbor.corp.example/dockerhub/library/nginx"]
    );
}

#[test]
fn pod_create_unparsable() {
    let (patched, response, _) = answer(&fixture("pod-create-unparsable.json"));
    assert_eq!(
        images(&patched, "containers"),
        ["NGINX", "harbor.corp.example/dockerhub/library/nginx:1.27"]
    );
    let warnings = response["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1);
    let warning = warnings[0].as_str().unwrap();
    assert!(
        warning.starts_with("container \"app\": image \"NGINX\" is not a valid reference")
            && warning.ends_with("left unchanged"),
        "{warning}"
    );
}

/// Image volumes (`volumes[].image.reference`) are pulled as container
/// images are, with the pod's pull secrets: rewritten by the same rules,
/// recorded in an annotation of their own, an unparsable one warned of;
/// other volumes untouched. The container's image matches no rule here, so
/// the pull secret comes from the volume alone, and the containers' record
/// is not written.
#[test]
fn pod_create_image_volumes() {
    let review = fixture("pod-create-image-volumes.json");
    let (patched, response, _) = answer(&review);
    let reference = |index: usize| patched["spec"]["volumes"][index]["image"]["reference"].clone();
    assert_eq!(reference(1), "harbor.corp.example/quay/org/models:v3");
    assert_eq!(reference(3), "Org/Weights:latest");
    assert_eq!(
        reference(4),
        review["request"]["object"]["spec"]["volumes"][4]["image"]["reference"]
    );
    for unchanged in [0, 2] {
        assert_eq!(
            patched["spec"]["volumes"][unchanged],
            review["request"]["object"]["spec"]["volumes"][unchanged]
        );
    }
    assert_eq!(
        images(&patched, "containers"),
        ["registry.internal.example/model-server:2.1"]
    );
    assert_eq!(pull_secrets(&patched), Some(vec!["harbor-pull".to_owned()]));
    assert_eq!(response["auditAnnotations"]["images-rewritten"], "1");
    let annotations = &patched["metadata"]["annotations"];
    let originals: Value = serde_json::from_str(
        annotations["image-rewriter.io/original-volume-images"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(originals, json!({"models": "quay.io/org/models:v3"}));
    assert!(
        annotations
            .get("image-rewriter.io/original-images")
            .is_none()
    );
    let warnings = response["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let warning = warnings[0].as_str().unwrap();
    assert!(
        warning.starts_with(
            "image volume \"weights\": image \"Org/Weights:latest\" is not a valid reference"
        ) && warning.ends_with("left unchanged"),
        "{warning}"
    );
}

#[test]
fn requests_answered_without_a_patch() {
    for name in [
        "pod-create-kube-system.json",
        "pod-create-reinvocation.json",
        "pod-status-update.json",
        "pod-update.json",
        "pod-delete.json",
        "deployment-create.json",
    ] {
        let review_body = fixture(name);
        let (patched, response, patch) = answer(&review_body);
        assert!(patch.is_none(), "{name}: {patch:?}");
        assert!(response.get("patchType").is_none(), "{name}");
        assert!(response.get("warnings").is_none(), "{name}: {response}");
        assert_eq!(patched, review_body["request"]["object"], "{name}");
    }
}

/// Any other kind is allowed untouched, whatever its object holds: it is
/// not read, so neither fields of unexpected types nor nesting past the
/// decoder's depth limit turn it into a 400.
#[test]
fn an_object_of_another_kind_is_allowed_whatever_it_holds() {
    // Deeper than serde_json's limit of 128 when read into a `Value`.
    let nested = (0..500).fold(json!([]), |inner, _| json!([inner]));
    let mut review_body = fixture("deployment-create.json");
    let object = &mut review_body["request"]["object"];
    object["metadata"]["creationTimestamp"] = json!(5);
    object["spec"]["containers"] = json!(5);
    object["spec"]["deep"] = nested;
    let (patched, response, patch) = answer(&review_body);
    assert_eq!(response["allowed"], true, "{response}");
    assert!(patch.is_none(), "{patch:?}");
    assert_eq!(patched, review_body["request"]["object"]);

    // A Pod is read, and one that does not decode is refused with the reason.
    let mut review_body = fixture("pod-create.json");
    review_body["request"]["object"]["spec"]["containers"] = json!(5);
    let body = serde_json::to_vec(&review_body).unwrap();
    match plan_review(&example_policy(), &body) {
        Err(ReviewError::InvalidPod(error)) => {
            assert!(error.to_string().contains("invalid type"), "{error}")
        }
        other => panic!("expected the Pod refused, got {other:?}"),
    }
}

/// A review holding more containers than fit in the webhook's body limit
/// as the apiserver sends them (one sent straight to the port) is refused
/// with the reason, before the plan and the answer, which cost some 25
/// times a container's bytes, are built; one at the limit is answered.
#[test]
fn a_pod_with_more_containers_than_the_apiserver_can_send_is_refused() {
    let containers = |count: usize| {
        (0..count)
            .map(|i| json!({"name": format!("c{i}"), "image": "nginx"}))
            .collect::<Vec<_>>()
    };
    let mut review_body = fixture("pod-create.json");
    let others = review_body["request"]["object"]["spec"]["containers"]
        .as_array()
        .map_or(0, Vec::len);
    // The limit counts every list together: the pod's containers, then
    // init containers up to it.
    let limit = image_rewriter::pod::MAX_CONTAINERS - others;
    review_body["request"]["object"]["spec"]["initContainers"] = json!(containers(limit + 1));
    let body = serde_json::to_vec(&review_body).unwrap();
    match plan_review(&example_policy(), &body) {
        Err(error @ ReviewError::InvalidPod(_)) => assert!(
            error.to_string().contains("more than 65536 containers"),
            "{error}"
        ),
        Err(other) => panic!("expected the Pod refused, got {other}"),
        Ok(_) => panic!("expected the Pod refused, got an answer"),
    }

    review_body["request"]["object"]["spec"]["initContainers"] = json!(containers(limit));
    let (patched, response, _) = answer(&review_body);
    assert_eq!(response["allowed"], true, "{response}");
    assert_eq!(
        patched["spec"]["initContainers"][limit - 1]["image"],
        "harbor.corp.example/dockerhub/library/nginx"
    );
}

/// kube-core keeps `request.options` whole and every string of
/// `request.userInfo`: in a body over 1 MiB they are counted first, and one
/// holding more values than the apiserver ever sends is refused with the
/// reason (an 8 MiB `options` of zeros had peaked at 283 MB). A large body
/// with ordinary ones is answered.
#[test]
fn a_large_review_with_oversized_options_or_user_info_is_refused() {
    let mut large = fixture("pod-create.json");
    large["request"]["object"]["metadata"]["annotations"]["filler"] =
        json!("x".repeat(1024 * 1024));
    let (_, response, _) = answer(&large);
    assert_eq!(response["allowed"], true, "{response}");

    for (field, value, limit) in [
        ("options", json!(vec![0; 1001]), 1000),
        (
            "userInfo",
            json!({"username": "u", "groups": vec![""; 100_000]}),
            100_000,
        ),
    ] {
        let mut review_body = large.clone();
        review_body["request"][field] = value;
        let body = serde_json::to_vec(&review_body).unwrap();
        match plan_review(&example_policy(), &body) {
            Err(error @ ReviewError::TooManyValues { .. }) => assert_eq!(
                error.to_string(),
                format!("request.{field} holds more than {limit} values")
            ),
            Err(other) => panic!("{field}: expected a refusal, got {other}"),
            Ok(_) => panic!("{field}: expected a refusal, got an answer"),
        }
    }

    // At the limits (the map, its keys, its username and its list count
    // too), the same large body is answered.
    let mut review_body = large.clone();
    review_body["request"]["options"] = json!(vec![0; 999]);
    review_body["request"]["userInfo"] = json!({"username": "u", "groups": vec![""; 99_995]});
    let (_, response, _) = answer(&review_body);
    assert_eq!(response["allowed"], true, "{response}");
}

/// Mutating admission runs before validation: a Pod sent without
/// containers (Go encodes it as `"containers": null`) is allowed untouched,
/// so the apiserver's validation, not a webhook error, tells the user.
#[test]
fn a_pod_without_containers_is_left_to_validation() {
    let policy = example_policy();
    for containers in [Value::Null, json!([])] {
        let mut review_body = fixture("pod-create.json");
        let spec = &mut review_body["request"]["object"]["spec"];
        spec["containers"] = containers.clone();
        spec["initContainers"] = Value::Null;
        let (body, patch) = review_in_process(&policy, &review_body);
        let response = response_of(&body);
        assert_eq!(response["allowed"], true, "{containers}: {response}");
        assert!(patch.is_none(), "{containers}: {patch:?}");
    }
    let mut review_body = fixture("pod-create.json");
    let spec = review_body["request"]["object"]["spec"]
        .as_object_mut()
        .expect("spec");
    spec.remove("containers");
    spec.remove("initContainers");
    let (body, patch) = review_in_process(&policy, &review_body);
    assert_eq!(response_of(&body)["allowed"], true);
    assert!(patch.is_none(), "{patch:?}");
}

#[test]
fn kubectl_debug() {
    let (patched, response, patch) = answer(&fixture("ephemeral-containers-update.json"));
    assert_eq!(
        patch,
        Some(json!([{
            "op": "replace",
            "path": "/spec/ephemeralContainers/1/image",
            "value": "harbor.corp.example/dockerhub/nicolaka/netshoot:v0.13"
        }]))
    );
    assert_eq!(
        images(&patched, "ephemeralContainers"),
        [
            "busybox:1.36",
            "harbor.corp.example/dockerhub/nicolaka/netshoot:v0.13"
        ]
    );
    assert!(response.get("warnings").is_none(), "{response}");
}

/// The missing pull secret is said once: a reinvocation (the rewritten
/// image sent back) says it in the very same words, which the apiserver
/// shows the user once, as it drops repeated warnings.
#[test]
fn kubectl_debug_without_the_pull_secret_warns() {
    let review = fixture("ephemeral-containers-update-no-secret.json");
    let (patched, response, patch) = answer(&review);
    let ops = patch.unwrap();
    assert_eq!(ops.as_array().unwrap().len(), 1);
    let warnings = response["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let warning = warnings[0].as_str().unwrap();
    assert!(
        warning.contains("\"harbor-pull\"") && warning.contains("debugger-m4t9z"),
        "{warning}"
    );

    let mut again = review.clone();
    again["request"]["object"] = patched;
    let (body, _) = review_in_process(&example_policy(), &again);
    assert_eq!(response_of(&body)["warnings"], response["warnings"]);
}

#[test]
fn v1beta1_is_refused() {
    let body = serde_json::to_vec(&fixture("v1beta1-pod-create.json")).unwrap();
    match review(&example_policy(), &body) {
        Err(ReviewError::UnsupportedVersion(version)) => {
            assert_eq!(version, "admission.k8s.io/v1beta1")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_fixture_is_an_apiserver_shaped_review() {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(root().join("tests/fixtures/admission"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.push(root().join("examples/admission-review.json"));
    assert!(paths.len() >= 10);
    for path in paths {
        let review_body = read_json(&path);
        let request = &review_body["request"];
        for key in [
            "uid",
            "kind",
            "resource",
            "requestKind",
            "requestResource",
            "name",
            "namespace",
            "operation",
            "userInfo",
            "object",
            "oldObject",
            "dryRun",
            "options",
        ] {
            assert!(
                request.get(key).is_some(),
                "{}: request.{key} missing",
                path.display()
            );
        }
        let operation = request["operation"].as_str().unwrap();
        assert_eq!(
            request["options"]["kind"],
            match operation {
                "CREATE" => "CreateOptions",
                "UPDATE" => "UpdateOptions",
                _ => "DeleteOptions",
            },
            "{}",
            path.display()
        );
        if operation == "CREATE" {
            assert!(request["oldObject"].is_null(), "{}", path.display());
        }
    }
}

/// The log line's identities: a pod created from a generateName (the name
/// is empty until after admission) is named by the prefix, marked `*`.
#[test]
fn the_summary_names_the_request_and_marks_a_generated_name() {
    let policy = example_policy();
    let named = pod("shop", &[], &[("web", "nginx")], None);
    let mut generated = named.clone();
    generated["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("name");
    for (object, expected_name) in [
        (named, "web-7d4b9c8f6-x2kqz"),
        (generated, "web-7d4b9c8f6-*"),
    ] {
        let review_body = admission_review(object, "CREATE", "shop");
        let body = serde_json::to_vec(&review_body).unwrap();
        let summary = plan_review(&policy, &body).expect("a valid review").summary;
        assert_eq!(summary.name, expected_name);
        assert_eq!(summary.uid, uid_of(&review_body));
        assert_eq!(summary.namespace, "shop");
        assert_eq!(summary.operation, "CREATE");
        assert!(summary.examined && !summary.dry_run);
    }
}

/// A body nested far deeper than any Pod neither crashes nor is misread,
/// on a thread with a tokio worker's stack (2 MiB): in a field the webhook
/// skips, serde_json skips it without recursion and the review is answered
/// untouched; where it is read, its recursion limit refuses it with a
/// reason. (sonic-rs 0.5, tried for speed, skips values by recursion: a
/// review of that change found this body would overflow the stack and kill
/// the process, and it was dropped.)
#[test]
fn deeply_nested_bodies_do_not_overflow_the_stack() {
    let policy = example_policy();
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let head = r#""apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview""#;
    let request = r#""uid":"u","kind":{"group":"","version":"v1","kind":"Pod"},"resource":{"group":"","version":"v1","resource":"pods"},"operation":"CREATE","userInfo":{}"#;
    let skipped = format!(
        r#"{{{head},"request":{{{request},"object":{{"spec":{{"containers":[],"skipped":{nested}}}}}}}}}"#
    );
    let read = [
        format!(r#"{{{head},"unknown":{nested},"request":{{{request}}}}}"#),
        format!(r#"{{{head},"request":{{{request},"options":{{"a":{nested}}}}}}}"#),
    ];
    std::thread::Builder::new()
        .stack_size(2 * 1024 * 1024)
        .spawn(move || {
            let planned = plan_review(&policy, skipped.as_bytes()).expect("answered");
            let reviewed = planned.into_response();
            assert!(reviewed.summary.examined && !reviewed.summary.patched);
            for body in read {
                match plan_review(&policy, body.as_bytes()) {
                    Err(ReviewError::NotAReview(error) | ReviewError::InvalidPod(error)) => {
                        assert!(error.to_string().contains("recursion limit"), "{error}")
                    }
                    other => panic!("expected a refusal, got {other:?}"),
                }
            }
        })
        .expect("a thread")
        .join()
        .expect("no panic");
}

/// The apiserver refuses a pod whose annotations, keys and values together,
/// pass 256 KiB (`TotalAnnotationSizeLimitB`, counted in UTF-8 bytes). The
/// original-images record must never be what takes a pod there: where it
/// would, the images are still rewritten, the record is left out, and the
/// user is told.
#[test]
fn the_original_images_record_is_left_out_where_it_would_pass_the_annotations_limit() {
    const LIMIT: usize = 256 * 1024;
    const RECORD: &str = "image-rewriter.io/original-images";
    const FILLER: &str = "example.com/blob";
    let bytes = |annotations: &Value| -> usize {
        annotations
            .as_object()
            .unwrap()
            .iter()
            .map(|(key, value)| key.len() + value.as_str().unwrap().len())
            .sum()
    };
    let review = fixture("pod-create.json");
    let (plain, _, _) = answer(&review);
    let record_bytes = RECORD.len()
        + plain["metadata"]["annotations"][RECORD]
            .as_str()
            .unwrap()
            .len();
    let others = bytes(&review["request"]["object"]["metadata"]["annotations"]);

    // The filler is sent with escapes (`\"`, `\n`) and two-byte characters
    // (`é`): what counts is the bytes of the decoded text, as in Go.
    let filler_of = |len: usize| {
        let unit = "\"é\n";
        let mut text = unit.repeat(len / unit.len());
        text.push_str(&"x".repeat(len - text.len()));
        assert_eq!(text.len(), len);
        text
    };
    for (over, recorded) in [(0, true), (1, false)] {
        let filler = LIMIT - others - FILLER.len() - record_bytes + over;
        let mut review = review.clone();
        review["request"]["object"]["metadata"]["annotations"][FILLER] = json!(filler_of(filler));
        let (patched, response, _) = answer(&review);
        let annotations = &patched["metadata"]["annotations"];
        assert_eq!(
            annotations.get(RECORD).is_some(),
            recorded,
            "{over} byte(s) over"
        );
        assert!(
            bytes(annotations) <= LIMIT,
            "{over} byte(s) over: {}",
            bytes(annotations)
        );
        assert_eq!(
            images(&patched, "containers"),
            images(&plain, "containers"),
            "rewritten either way"
        );
        let warnings = response["warnings"].as_array().cloned().unwrap_or_default();
        if recorded {
            assert!(warnings.is_empty(), "{warnings:?}");
        } else {
            assert_eq!(warnings.len(), 1, "{warnings:?}");
            let warning = warnings[0].as_str().unwrap();
            assert!(
                warning.contains(RECORD)
                    && warning.contains(&format!("{} bytes", LIMIT + 1))
                    && warning.contains("262144"),
                "{warning}"
            );
        }
    }
}

/// With image volumes too, the containers' record is written first, and
/// the volumes' only if both fit under the annotations limit: at the exact
/// limit both are written; a byte over, the volumes' record is left out,
/// with a warning naming it alone.
#[test]
fn the_volumes_record_is_left_out_first_at_the_annotations_limit() {
    const LIMIT: usize = 256 * 1024;
    const FILLER: &str = "example.com/blob";
    const CONTAINERS: &str = "image-rewriter.io/original-images";
    const VOLUMES: &str = "image-rewriter.io/original-volume-images";
    let mut review = fixture("pod-create.json");
    review["request"]["object"]["spec"]["volumes"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "models", "image": {"reference": "quay.io/org/models:v3"}}));
    let (plain, _, _) = answer(&review);
    let record = |patched: &Value, key: &str| {
        patched["metadata"]["annotations"][key]
            .as_str()
            .map(|text| key.len() + text.len())
    };
    let containers = record(&plain, CONTAINERS).expect("the containers' record");
    let volumes = record(&plain, VOLUMES).expect("the volumes' record");
    let others: usize = review["request"]["object"]["metadata"]["annotations"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(key, value)| key.len() + value.as_str().unwrap().len())
        .sum();
    for (over, volumes_recorded) in [(0, true), (1, false)] {
        let filler = LIMIT - others - FILLER.len() - containers - volumes + over;
        let mut review = review.clone();
        review["request"]["object"]["metadata"]["annotations"][FILLER] = json!("x".repeat(filler));
        let (patched, response, _) = answer(&review);
        assert!(record(&patched, CONTAINERS).is_some(), "{over} over");
        assert_eq!(
            record(&patched, VOLUMES).is_some(),
            volumes_recorded,
            "{over} over"
        );
        let warnings = response["warnings"].as_array().cloned().unwrap_or_default();
        if volumes_recorded {
            assert!(warnings.is_empty(), "{warnings:?}");
        } else {
            assert_eq!(warnings.len(), 1, "{warnings:?}");
            let warning = warnings[0].as_str().unwrap();
            assert!(
                warning.starts_with(&format!("annotation {VOLUMES} not written"))
                    && warning.contains(&format!("{} bytes", LIMIT + 1)),
                "{warning}"
            );
        }
    }
}
