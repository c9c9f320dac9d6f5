//! An image already under a rule's target that `exclude.images` also
//! matches: never rewritten (both say so), and the rule's pullSecret still
//! ensured for it, through the admission answer and `rewrite --output json`.

mod common;

use common::*;
use image_rewriter::config::ConfigFile;
use image_rewriter::offline::RewriteReport;
use image_rewriter::policy::Policy;
use serde_json::json;

const CONFIG: &str = r#"
rules:
  - match: docker.io
    target: harbor.corp.example/dockerhub
    pullSecret: harbor-pull
exclude:
  images: ["harbor.corp.example/**", "docker.io/library/busybox"]
"#;

const MOVED: &str = "harbor.corp.example/dockerhub/library/nginx:1.27";

fn policy() -> Policy {
    ConfigFile::from_yaml(CONFIG)
        .expect("config parses")
        .into_policy(Some("image-rewriter"))
        .expect("config is valid")
}

#[test]
fn the_pod_gets_the_pull_secret_of_an_excluded_image_under_a_target() {
    let object = pod(
        "shop",
        &[],
        &[("web", MOVED), ("tools", "busybox:1.36")],
        None,
    );
    let review = admission_review(object, "CREATE", "shop");
    let (_, patch) = review_in_process(&policy(), &review);
    let (patched, _) = pod_after(&review["request"]["object"], patch.as_ref());
    assert_eq!(
        images(&patched, "containers"),
        [MOVED, "busybox:1.36"],
        "nothing is rewritten"
    );
    assert_eq!(pull_secrets(&patched), Some(vec!["harbor-pull".to_owned()]));
}

#[test]
fn rewrite_reports_it_as_already_under_target_with_its_pull_secret() {
    let report = serde_json::to_value(RewriteReport::new(&policy(), MOVED)).unwrap();
    assert_eq!(
        report,
        json!({
            "input": MOVED,
            "output": MOVED,
            "rule": "docker.io",
            "pullSecret": "harbor-pull",
            "reason": "already-under-target"
        })
    );
    let excluded = serde_json::to_value(RewriteReport::new(&policy(), "busybox")).unwrap();
    assert_eq!(excluded["reason"], "excluded");
    assert!(excluded["pullSecret"].is_null());
}
