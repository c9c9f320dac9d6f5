//! The reference parser and the policy decision, from arbitrary text.
//!
//! Invariants: no panic; a normalized reference prints to text that parses
//! back to the same reference; a rewrite keeps tag and digest, is a valid
//! reference pulled from under the rule's target, and is never rewritten
//! again; a decision recalled from the policy's memo (shared by all runs,
//! so it fills and empties) is the decision made afresh.
#![no_main]

#[path = "common.rs"]
mod common;

use image_rewriter::image::Reference;
use image_rewriter::policy::Decision;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Reference::parse(text);
    if let Ok(reference) = Reference::parse_normalized(text) {
        let printed = reference.to_string();
        let again = Reference::parse_normalized(&printed).unwrap_or_else(|e| {
            panic!("{text:?} printed as {printed:?}, which does not parse: {e}")
        });
        assert_eq!(again, reference, "{text:?} -> {printed:?}");
    }
    let policy = &*common::POLICY;
    let decision = policy.decide(text);
    assert_eq!(decision, policy.decide_afresh(text), "{text:?}");
    assert_eq!(policy.decide(text), decision, "{text:?} recalled");
    if let Decision::Rewrite { image, rule } = decision {
        let original = Reference::parse_normalized(text).expect("a rewritten image parsed");
        let moved = Reference::parse_normalized(&image)
            .unwrap_or_else(|e| panic!("{text:?} rewritten to invalid {image:?}: {e}"));
        assert_eq!(moved.tag(), original.tag(), "{text:?} -> {image:?}");
        assert_eq!(moved.digest(), original.digest(), "{text:?} -> {image:?}");
        let name = moved.name();
        assert!(
            name == rule.target || name.starts_with(&format!("{}/", rule.target)),
            "{text:?} -> {image:?} is not under {:?}",
            rule.target
        );
        let second = policy.decide(&image);
        assert!(
            !matches!(second, Decision::Rewrite { .. }),
            "{text:?} -> {image:?} would be rewritten again: {second:?}"
        );
    }
});
