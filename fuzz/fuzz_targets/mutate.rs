//! `mutate`, the offline command, on arbitrary text: manifests in YAML or
//! JSON in, the same format out.
//!
//! Invariants: no panic; what it prints reads back (as `mutate` reads its
//! input, so YAML as kubectl reads it) to a second pass that prints the same
//! text and rewrites nothing; and between input and output only images (as
//! the policy moves them, in containers and image volumes),
//! `imagePullSecrets` (entries added) and the original-images and
//! original-volume-images annotations change: nothing else the user wrote is lost or
//! read back as another value; and only inside the pod template of an
//! object that holds one (by its kind and API group, in a namespace the
//! policy does not exclude), judged by a table of its own here.
#![no_main]

mod common;

use image_rewriter::offline::{mutate_documents, read_documents};
use image_rewriter::patch::{ORIGINAL_IMAGES_ANNOTATION, ORIGINAL_VOLUME_IMAGES_ANNOTATION};
use image_rewriter::policy::Decision;
use json_patch::PatchOperation;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(first) = mutate_documents(&common::POLICY, text, None) else {
        return;
    };
    let second = mutate_documents(&common::POLICY, &first.output, None).unwrap_or_else(|error| {
        panic!(
            "the output does not read back: {error}\ninput:\n{text}\noutput:\n{}",
            first.output
        )
    });
    assert_eq!(
        second.output, first.output,
        "a second pass printed other text\ninput:\n{text}"
    );
    assert_eq!(second.rewritten, 0, "rewritten twice:\n{}", first.output);

    let before = objects(text);
    let after = objects(&first.output);
    assert_eq!(
        before.len(),
        after.len(),
        "objects lost or added\ninput:\n{text}\noutput:\n{}",
        first.output
    );
    let mut images_moved = 0;
    for (before, after) in before.iter().zip(&after) {
        let mut templates = Vec::new();
        pod_templates(before, Listed::default(), Vec::new(), &mut templates);
        for operation in json_patch::diff(before, after).iter() {
            let path: Vec<String> = operation
                .path()
                .tokens()
                .map(|t| t.decoded().into_owned())
                .collect();
            assert!(
                templates.iter().any(|template| path.starts_with(template)),
                "{operation:?} is outside every pod template ({templates:?})\ninput:\n{text}\noutput:\n{}",
                first.output
            );
            assert!(
                is_a_rewrite(before, operation),
                "{operation:?} is not a rewrite\ninput:\n{text}\noutput:\n{}",
                first.output
            );
            images_moved += usize::from(
                matches!(operation, PatchOperation::Replace(_)) && is_an_image(operation),
            );
        }
    }
    assert_eq!(
        images_moved, first.rewritten,
        "images moved, and those mutate counts\ninput:\n{text}\noutput:\n{}",
        first.output
    );
});

/// The objects of a stream as `mutate` reads it; an empty YAML document
/// holds none.
fn objects(text: &str) -> Vec<Value> {
    let input = read_documents(text).expect("read once by mutate");
    let is_json = input.is_json;
    input
        .documents
        .into_iter()
        .filter(|d| is_json || !d.is_null())
        .collect()
}

/// What a typed list says of its items' kind and API version (a `PodList`'s
/// items are Pods that name neither).
#[derive(Clone, Copy, Default)]
struct Listed<'a> {
    kind: Option<&'a str>,
    api_version: Option<&'a str>,
}

/// The paths (as tokens) of the pod templates in `object`, found at
/// `prefix`: a Pod is one whole; a ReplicationController, Deployment,
/// StatefulSet, DaemonSet, ReplicaSet or Job keeps one at spec.template, a
/// CronJob at spec.jobTemplate.spec.template, a PodTemplate at template,
/// each only in its own API group (a custom resource named Deployment holds
/// none); a `List`'s items are searched; an object in a namespace the policy
/// excludes holds none that may change.
fn pod_templates(
    object: &Value,
    listed: Listed<'_>,
    prefix: Vec<String>,
    found: &mut Vec<Vec<String>>,
) {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .or(listed.kind)
        .unwrap_or("");
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .or(listed.api_version);
    if let (Some(list_of), Some(items)) = (
        kind.strip_suffix("List"),
        object.get("items").and_then(Value::as_array),
    ) {
        let items_are = match list_of {
            "" => Listed::default(),
            kind => Listed {
                kind: Some(kind),
                api_version,
            },
        };
        for (index, item) in items.iter().enumerate() {
            let mut at = prefix.clone();
            at.extend(["items".to_owned(), index.to_string()]);
            pod_templates(item, items_are, at, found);
        }
        return;
    }
    if object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .is_some_and(|namespace| common::POLICY.excludes_namespace(namespace))
    {
        return;
    }
    let group = api_version.map(|version| version.rsplit_once('/').map_or("", |(group, _)| group));
    let in_group = |groups: &[&str]| group.is_none_or(|group| groups.contains(&group));
    let template: &[&str] = match kind {
        "Pod" if in_group(&[""]) => &[],
        "ReplicationController" if in_group(&[""]) => &["spec", "template"],
        "PodTemplate" if in_group(&[""]) => &["template"],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet"
            if in_group(&["apps", "extensions"]) =>
        {
            &["spec", "template"]
        }
        "Job" if in_group(&["batch"]) => &["spec", "template"],
        "CronJob" if in_group(&["batch"]) => &["spec", "jobTemplate", "spec", "template"],
        _ => return,
    };
    found.push(
        prefix
            .into_iter()
            .chain(template.iter().map(|t| (*t).to_owned()))
            .collect(),
    );
}

/// Where a container's image is.
fn is_an_image(operation: &PatchOperation) -> bool {
    let tokens: Vec<String> = operation
        .path()
        .tokens()
        .map(|t| t.decoded().into_owned())
        .collect();
    let tail: Vec<&str> = tokens.iter().rev().map(String::as_str).collect();
    matches!(
        tail.as_slice(),
        [
            "image",
            _,
            "containers" | "initContainers" | "ephemeralContainers",
            ..
        ] | ["reference", "image", _, "volumes", ..]
    )
}

/// An image moved as the policy moves it, a pull secret entry added (one a
/// rule names), or the original images recorded; a field replaced whole
/// only where it was `null` (as good as absent), never an existing entry.
fn is_a_rewrite(before: &Value, operation: &PatchOperation) -> bool {
    let (path, value, replaces) = match operation {
        PatchOperation::Add(add) => (&add.path, &add.value, false),
        PatchOperation::Replace(replace) => (&replace.path, &replace.value, true),
        _ => return false,
    };
    let was = before.pointer(path.as_str());
    let over_nothing = !replaces || was.is_some_and(Value::is_null);
    if is_an_image(operation) {
        return replaces
            && was.and_then(Value::as_str).is_some_and(|image| {
                matches!(common::POLICY.decide(image), Decision::Rewrite { image, .. } if *value == image)
            });
    }
    let tokens: Vec<String> = path.tokens().map(|t| t.decoded().into_owned()).collect();
    let tail: Vec<&str> = tokens.iter().rev().map(String::as_str).collect();
    match tail.as_slice() {
        ["imagePullSecrets", ..] => {
            over_nothing
                && value
                    .as_array()
                    .is_some_and(|entries| entries.iter().all(is_a_pull_secret))
        }
        [_, "imagePullSecrets", ..] => !replaces && is_a_pull_secret(value),
        [key, "annotations", "metadata", ..] => is_a_record_key(key) && is_a_record(value),
        ["annotations", "metadata", ..] => over_nothing && only_the_records(value),
        ["metadata", ..] => {
            over_nothing
                && value.as_object().is_some_and(|metadata| {
                    metadata.len() == 1 && metadata.get("annotations").is_some_and(only_the_records)
                })
        }
        _ => false,
    }
}

/// `{name: S}`, S a rule's pull secret.
fn is_a_pull_secret(entry: &Value) -> bool {
    entry.as_object().is_some_and(|entry| {
        entry.len() == 1
            && entry
                .get("name")
                .and_then(Value::as_str)
                .is_some_and(|name| {
                    common::POLICY
                        .rules()
                        .iter()
                        .any(|rule| rule.pull_secret.as_deref() == Some(name))
                })
    })
}

fn is_a_record_key(key: &str) -> bool {
    key == ORIGINAL_IMAGES_ANNOTATION || key == ORIGINAL_VOLUME_IMAGES_ANNOTATION
}

/// Annotations holding only the records, one or both.
fn only_the_records(annotations: &Value) -> bool {
    annotations.as_object().is_some_and(|map| {
        !map.is_empty()
            && map
                .iter()
                .all(|(key, value)| is_a_record_key(key) && is_a_record(value))
    })
}

/// A record's text: a JSON object (of container or volume names to
/// images, and whatever an earlier record held).
fn is_a_record(value: &Value) -> bool {
    value
        .as_str()
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
        .is_some_and(|record| record.is_object())
}
