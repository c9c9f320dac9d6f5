//! The whole admission handler, from raw request bytes.
//!
//! Invariants: no panic on any bytes. For a body that is JSON (reviewed
//! again in canonical form, so duplicate keys cannot make the typed and the
//! untyped view disagree): the answer is JSON with the request's uid,
//! `patchType` only beside a non-empty patch; a patch applies to the object
//! exactly as sent, the patched object still decodes as a Pod when the
//! object as sent did (the webhook decodes only the fields it reads, so it
//! also answers objects that k8s-openapi would refuse), and reviewing the
//! patched object again yields no patch.
#![no_main]

#[path = "common.rs"]
mod common;

use base64::Engine as _;
use image_rewriter::admission;
use k8s_openapi::api::core::v1::Pod;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let policy = &*common::POLICY;
    let _ = admission::review(policy, data);

    let Ok(request) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let canonical = serde_json::to_vec(&request).expect("a Value serializes");
    let Ok(reviewed) = admission::review(policy, &canonical) else {
        return;
    };
    let answer: Value = serde_json::from_slice(&reviewed.body).expect("the answer is JSON");
    let response = &answer["response"];
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(response["uid"], request["request"]["uid"], "uid");
    assert_eq!(response["allowed"], true);
    let patch = response.get("patch");
    assert_eq!(
        patch.is_some(),
        response.get("patchType").is_some(),
        "patchType only with a patch: {answer}"
    );
    let Some(patch) = patch else {
        return;
    };
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(patch.as_str().expect("the patch is a string"))
        .expect("the patch is base64");
    let operations: json_patch::Patch = serde_json::from_slice(&bytes).expect("a JSON Patch");
    assert!(!operations.0.is_empty(), "an empty patch was sent");

    let mut object = request["request"]["object"].clone();
    if let Err(error) = json_patch::patch(&mut object, &operations) {
        panic!(
            "the patch does not apply: {error}\npatch: {}\nobject: {}",
            String::from_utf8_lossy(&bytes),
            request["request"]["object"]
        );
    }
    let sent_a_pod = serde_json::from_value::<Pod>(request["request"]["object"].clone()).is_ok();
    if let (true, Err(error)) = (sent_a_pod, serde_json::from_value::<Pod>(object.clone())) {
        panic!("the patched object is not a Pod: {error}\nobject: {object}");
    }

    let mut again = request.clone();
    again["request"]["object"] = object;
    let second = admission::review(policy, &serde_json::to_vec(&again).unwrap())
        .expect("the patched review is answered");
    let second: Value = serde_json::from_slice(&second.body).unwrap();
    assert!(
        second["response"].get("patch").is_none(),
        "a second review patched again: {}\nfirst patch: {}",
        second["response"],
        String::from_utf8_lossy(&bytes)
    );
});
