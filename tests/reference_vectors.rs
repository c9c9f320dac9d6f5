//! distribution/reference's own test tables (tests/fixtures/reference.json,
//! copied from shared/vectors; see its `source` fields) run against our
//! parser. Each record says which upstream function it tests; we check the
//! ones whose semantics we implement and count them, so a fixture that
//! stopped matching anything would fail here too.

use image_rewriter::image::{Reference, ReferenceError, is_valid_domain};
use serde_json::Value;

fn vectors() -> Vec<Value> {
    let text = include_str!("fixtures/reference.json");
    serde_json::from_str::<Vec<Value>>(text).expect("fixture is JSON")
}

fn field<'a>(record: &'a Value, key: &str) -> Option<&'a str> {
    record.get(key).and_then(Value::as_str)
}

fn asserted(record: &Value, key: &str) -> bool {
    record["asserted"]
        .as_array()
        .is_some_and(|keys| keys.iter().any(|k| k == key))
}

fn error_name(error: &ReferenceError) -> &'static str {
    match error {
        ReferenceError::NameEmpty => "ErrNameEmpty",
        ReferenceError::NameContainsUppercase => "ErrNameContainsUppercase",
        ReferenceError::NameTooLong => "ErrNameTooLong",
        ReferenceError::InvalidFormat => "ErrReferenceInvalidFormat",
        ReferenceError::NameIsIdentifier => "ErrNameIsIdentifier",
        ReferenceError::DigestInvalidFormat => "digest.ErrDigestInvalidFormat",
        ReferenceError::DigestUnsupported => "digest.ErrDigestUnsupported",
        ReferenceError::DigestInvalidLength => "digest.ErrDigestInvalidLength",
    }
}

/// Compares one parse result with a record; returns a failure message.
fn check(record: &Value, result: Result<Reference, ReferenceError>) -> Option<String> {
    let input = field(record, "input").unwrap_or_default();
    let valid = record["valid"].as_bool().unwrap_or(false);
    match (&result, valid) {
        (Ok(_), false) => return Some(format!("{input:?}: accepted, upstream rejects it")),
        (Err(e), true) => return Some(format!("{input:?}: rejected ({e}), upstream accepts it")),
        (Err(e), false) => {
            if let Some(expected) = field(record, "error")
                && expected != error_name(e)
            {
                return Some(format!(
                    "{input:?}: error {} but upstream says {expected}",
                    error_name(e)
                ));
            }
            return None;
        }
        (Ok(_), true) => {}
    }
    let reference = result.ok()?;
    let name = reference.name();
    let string = reference.to_string();
    for (key, value) in [
        ("domain", Some(reference.domain())),
        ("path", Some(reference.path())),
        ("tag", reference.tag()),
        ("digest", reference.digest()),
        ("name", Some(name)),
        ("string", Some(string.as_str())),
    ] {
        if !asserted(record, key)
            && !record["derived"]
                .as_array()
                .is_some_and(|d| d.iter().any(|k| k == key))
        {
            continue;
        }
        let expected = field(record, key);
        if expected != value {
            return Some(format!(
                "{input:?}: {key} is {value:?}, upstream says {expected:?}"
            ));
        }
    }
    if field(record, "normalized_by") == Some("ParseNormalizedNamed(input).String()")
        && field(record, "normalized") != Some(string.as_str())
    {
        return Some(format!(
            "{input:?}: normalized to {string:?}, upstream says {:?}",
            field(record, "normalized")
        ));
    }
    None
}

/// Upstream records where we differ on purpose: distribution/reference's
/// test binary links only sha256, so go-digest calls a sha512 digest
/// unsupported there; the kubelet, containerd and CRI-O link sha384 and
/// sha512 (through crypto/tls) and pull such images, so we parse them.
const SUPPORTED_HERE: [&str; 1] = [
    "validname@sha512:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
];

fn run(function: &str, parse: impl Fn(&str) -> Result<Reference, ReferenceError>) -> usize {
    let mut checked = 0;
    let mut failures = Vec::new();
    for record in vectors() {
        if field(&record, "function") != Some(function)
            || field(&record, "impl") != Some("distribution/reference")
        {
            continue;
        }
        checked += 1;
        let input = field(&record, "input").unwrap_or_default();
        if SUPPORTED_HERE.contains(&input) {
            assert_eq!(field(&record, "error"), Some("digest.ErrDigestUnsupported"));
            let digest = input.split_once('@').map(|(_, digest)| digest);
            match parse(input) {
                Ok(reference) if reference.digest() == digest => {}
                other => failures.push(format!("{input:?}: {other:?}, a supported digest here")),
            }
            continue;
        }
        if let Some(failure) = check(&record, parse(input)) {
            failures.push(failure);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} {function} vectors fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
    checked
}

#[test]
fn parse_matches_upstream() {
    assert_eq!(run("Parse", Reference::parse), 47);
    assert_eq!(run("Parse (via Field.UnmarshalText)", Reference::parse), 4);
}

/// containers/image's test table links crypto/sha512, as the binaries that
/// pull images do: its sha512 record is valid, as here.
#[test]
fn a_sha512_digest_parses_as_where_sha512_is_linked() {
    let records: Vec<Value> = vectors()
        .into_iter()
        .filter(|record| {
            field(record, "impl") == Some("containers/image/docker/reference")
                && field(record, "digest").is_some_and(|d| d.starts_with("sha512:"))
        })
        .collect();
    assert_eq!(records.len(), 1);
    for record in records {
        let input = field(&record, "input").unwrap_or_default();
        assert_eq!(check(&record, Reference::parse(input)), None);
    }
}

#[test]
fn parse_normalized_named_matches_upstream() {
    assert_eq!(
        run("ParseNormalizedNamed", Reference::parse_normalized),
        101
    );
}

#[test]
fn with_name_matches_upstream() {
    // WithName takes a bare name: anything but a name is an invalid format.
    let bare_name = |input: &str| {
        let reference = Reference::parse(input).map_err(|e| match e {
            ReferenceError::NameTooLong => e,
            _ => ReferenceError::InvalidFormat,
        })?;
        if reference.tag().is_some() || reference.digest().is_some() {
            return Err(ReferenceError::InvalidFormat);
        }
        Ok(reference)
    };
    assert_eq!(run("WithName", bare_name), 13);
}

#[test]
fn anchored_name_regexp_matches_upstream() {
    // The regexp has no length limit, so a too-long name still matches it.
    let name_only = |input: &str| match Reference::parse(input) {
        Ok(r) if r.tag().is_none() && r.digest().is_none() => Ok(r),
        Ok(_) => Err(ReferenceError::InvalidFormat),
        Err(ReferenceError::NameTooLong) => Err(ReferenceError::NameTooLong),
        Err(e) => Err(e),
    };
    let mut failures = Vec::new();
    let mut checked = 0;
    for record in vectors() {
        if field(&record, "function") != Some("regexp:anchoredNameRegexp") {
            continue;
        }
        checked += 1;
        let input = field(&record, "input").unwrap_or_default();
        let matched = !matches!(name_only(input), Err(e) if e != ReferenceError::NameTooLong);
        if matched != record["valid"].as_bool().unwrap_or(false) {
            failures.push(input.to_owned());
        }
    }
    assert!(
        failures.is_empty(),
        "anchoredNameRegexp disagrees on {failures:?}"
    );
    assert_eq!(checked, 61);
}

#[test]
fn domain_regexp_matches_upstream() {
    let mut checked = 0;
    for record in vectors() {
        if !field(&record, "function").is_some_and(|f| f.starts_with("regexp:^domainAndPort$")) {
            continue;
        }
        checked += 1;
        let input = field(&record, "input").unwrap_or_default();
        assert_eq!(
            is_valid_domain(input),
            record["valid"].as_bool().unwrap_or(false),
            "{input:?}"
        );
    }
    assert_eq!(checked, 30);
}
