//! `mutate`, the offline command, on arbitrary text: manifests in YAML or
//! JSON in, the same format out.
//!
//! Invariants: no panic; what it prints reads back (as `mutate` reads its
//! input, so YAML as kubectl reads it) to a second pass that prints the same
//! text and rewrites nothing; and between input and output only images,
//! `imagePullSecrets` and the original-images annotation change: nothing else
//! the user wrote is lost or read back as another value.
#![no_main]

mod common;

use image_rewriter::kubectl_yaml;
use image_rewriter::offline::mutate_documents;
use image_rewriter::patch::ORIGINAL_IMAGES_ANNOTATION;
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
    for (before, after) in before.iter().zip(&after) {
        for operation in json_patch::diff(before, after).iter() {
            assert!(
                is_a_rewrite(operation),
                "{operation:?} is not a rewrite\ninput:\n{text}\noutput:\n{}",
                first.output
            );
        }
    }
});

/// The objects of a stream as `mutate` reads it: one JSON value or several
/// in a row, else YAML documents, whose empty ones hold no object.
fn objects(text: &str) -> Vec<Value> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim_start().starts_with(['{', '['])
        && let Ok(values) = serde_json::Deserializer::from_str(text)
            .into_iter::<Value>()
            .collect::<Result<Vec<_>, _>>()
    {
        return values;
    }
    let read = kubectl_yaml::documents(text).expect("read once by mutate");
    read.documents
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// An image moved, a pull secret added, or the original images recorded.
fn is_a_rewrite(operation: &PatchOperation) -> bool {
    let (path, value) = match operation {
        PatchOperation::Add(add) => (&add.path, Some(&add.value)),
        PatchOperation::Replace(replace) => (&replace.path, Some(&replace.value)),
        _ => return false,
    };
    let tokens: Vec<String> = path.tokens().map(|t| t.decoded().into_owned()).collect();
    let tail: Vec<&str> = tokens.iter().rev().map(String::as_str).collect();
    let only_the_record = |value: Option<&Value>| {
        value
            .and_then(Value::as_object)
            .is_some_and(|map| map.len() == 1 && map.contains_key(ORIGINAL_IMAGES_ANNOTATION))
    };
    match tail.as_slice() {
        [
            "image",
            _,
            "containers" | "initContainers" | "ephemeralContainers",
            ..,
        ] => true,
        ["imagePullSecrets", ..] | [_, "imagePullSecrets", ..] => true,
        [key, "annotations", "metadata", ..] => *key == ORIGINAL_IMAGES_ANNOTATION,
        ["annotations", "metadata", ..] => only_the_record(value),
        ["metadata", ..] => value.and_then(Value::as_object).is_some_and(|metadata| {
            metadata.len() == 1 && only_the_record(metadata.get("annotations"))
        }),
        _ => false,
    }
}
