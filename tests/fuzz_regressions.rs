//! Inputs the fuzzers (fuzz/) found, kept as regression tests.

mod common;

use common::{admission_review, pod_after, review_in_process};
use image_rewriter::config::ConfigFile;
use image_rewriter::offline::mutate_documents;
use image_rewriter::policy::Policy;
use serde_json::{Value, json};

fn policy() -> Policy {
    ConfigFile::from_yaml(
        "rules:\n  - match: docker.io\n    target: harbor.corp.example/dockerhub\n    pullSecret: harbor-pull\n",
    )
    .unwrap()
    .into_policy(Some("image-rewriter"))
    .unwrap()
}

/// fuzz/corpus/admission/regression-no-metadata.json: a Pod without
/// `metadata` got `add /metadata/annotations`, which does not apply.
#[test]
fn a_pod_without_metadata_gets_a_patch_that_applies() {
    let spec = json!({"containers": [{"name": "web", "image": "nginx:1.27"}]});
    for metadata in [None, Some(Value::Null), Some(json!({}))] {
        let mut object = json!({"apiVersion": "v1", "kind": "Pod", "spec": spec});
        if let Some(metadata) = metadata {
            object["metadata"] = metadata;
        }
        let review = admission_review(object.clone(), "CREATE", "team-a");
        let (_, patch) = review_in_process(&policy(), &review);
        let (patched, pod) = pod_after(&object, patch.as_ref());
        assert_eq!(
            pod.spec.unwrap().containers[0].image.as_deref(),
            Some("harbor.corp.example/dockerhub/library/nginx:1.27"),
            "{object}"
        );
        assert_eq!(
            patched["metadata"]["annotations"]["image-rewriter.io/original-images"],
            json!(r#"{"web":"nginx:1.27"}"#),
            "{object}"
        );
        let again = admission_review(patched, "CREATE", "team-a");
        assert_eq!(review_in_process(&policy(), &again).1, None, "{object}");
    }
}

/// fuzz/corpus/mutate/regression-float-digits.json: `mutate` read a JSON
/// float of 17 significant digits (as serde_json and Go print one) a step
/// away from its value (serde_json parses floats fast, not exactly, unless
/// told otherwise), and printed another number than the one written.
#[test]
fn mutate_keeps_a_json_float_of_17_digits() {
    let input = r#"{"kind": "ConfigMap", "data": {}, "size": 1.8446724417370954e+20}"#;
    let output = mutate_documents(&policy(), input, None).unwrap().output;
    assert!(
        output.contains(r#""size": 1.8446724417370954e+20"#),
        "{output}"
    );
    // As the fuzzers found it: an integer too long for 64 bits, and a
    // decimal of 18 digits that was read as 99999999.99999999 and printed
    // so, which reads back as 100000000.0.
    for input in [
        r#"{"kind": "ConfigMap", "data": {}, "size": 184467244173709551616}"#,
        "[][]99999999.9999999899",
    ] {
        let first = mutate_documents(&policy(), input, None).unwrap();
        let second = mutate_documents(&policy(), &first.output, None).unwrap();
        assert_eq!(second.output, first.output, "{input}");
    }
}
