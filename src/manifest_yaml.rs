//! YAML for `mutate`'s output that every Kubernetes tool reads back as
//! written.
//!
//! serde_yaml_ng writes a string plain whenever a YAML 1.2 reader would read
//! it back as a string. `kubectl apply` (sigs.k8s.io/yaml, go-yaml v2) and
//! PyYAML read YAML 1.1, where a plain `yes`, `on`, `1_000`, `2024-01-01` or
//! `=` is a boolean, a number, a timestamp or a value key (kustomize too
//! takes `1_000` for a number and a date for a timestamp): an env value or a
//! ConfigMap entry would change type, or be refused, on its way back into
//! the cluster. So here a string is plain only when it cannot be read as anything
//! else under either version (it starts with a letter, `/`, `_`, or a `-`
//! before a letter or `-`, and holds no character that YAML gives a
//! meaning); every other string is
//! double-quoted, and a multi-line one is a literal block where that keeps it
//! exact. Sequences sit at their key's indentation, as kubectl writes them.

use std::fmt::Write as _;

use serde_json::{Map, Value};

/// One YAML document (without the `---` separator), ending in a newline.
pub fn to_yaml(document: &Value) -> String {
    let mut out = String::new();
    match document {
        Value::Object(map) if !map.is_empty() => write_map(&mut out, map, 0, false),
        Value::Array(items) if !items.is_empty() => write_seq(&mut out, items, 0, false),
        scalar => {
            write_scalar(&mut out, scalar, 2);
            out.push('\n');
        }
    }
    out
}

/// Writes `map` at `indent`; with `inline_first` the first key follows a
/// `- ` the caller has written.
fn write_map(out: &mut String, map: &Map<String, Value>, indent: usize, inline_first: bool) {
    for (index, (key, value)) in map.iter().enumerate() {
        if index > 0 || !inline_first {
            push_indent(out, indent);
        }
        let key_start = out.len();
        write_key(out, key);
        // YAML allows an implicit key of at most 1024 characters; a longer
        // one goes in the explicit form, `? key` then `: value`.
        let explicit = out[key_start..].chars().count() > MAX_IMPLICIT_KEY;
        if explicit {
            out.insert_str(key_start, "? ");
            out.push('\n');
            push_indent(out, indent);
        }
        out.push(':');
        match value {
            Value::Object(inner) if !inner.is_empty() => {
                out.push('\n');
                write_map(out, inner, indent + 2, false);
            }
            Value::Array(items) if !items.is_empty() => {
                out.push('\n');
                // Only an implicit key's sequence may sit at its indentation.
                write_seq(
                    out,
                    items,
                    if explicit { indent + 2 } else { indent },
                    false,
                );
            }
            scalar => {
                out.push(' ');
                write_scalar(out, scalar, indent + 2);
                out.push('\n');
            }
        }
    }
}

/// Writes `items` as `- ` entries at `indent`; with `inline_first` the first
/// entry follows a `- ` the caller has written.
fn write_seq(out: &mut String, items: &[Value], indent: usize, inline_first: bool) {
    for (index, item) in items.iter().enumerate() {
        if index > 0 || !inline_first {
            push_indent(out, indent);
        }
        out.push_str("- ");
        match item {
            Value::Object(map) if !map.is_empty() => write_map(out, map, indent + 2, true),
            Value::Array(inner) if !inner.is_empty() => write_seq(out, inner, indent + 2, true),
            scalar => {
                write_scalar(out, scalar, indent + 2);
                out.push('\n');
            }
        }
    }
}

/// A scalar or an empty collection; `block_indent` is where a literal
/// block's lines go.
fn write_scalar(out: &mut String, value: &Value, block_indent: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(number) => write_number(out, number),
        Value::String(text) => write_string(out, text, block_indent),
        Value::Array(_) => out.push_str("[]"),
        Value::Object(_) => out.push_str("{}"),
    }
}

const MAX_IMPLICIT_KEY: usize = 1024;

/// A key is one line: plain or double-quoted, never a block.
fn write_key(out: &mut String, key: &str) {
    if is_plain_safe(key) {
        out.push_str(key);
    } else {
        write_double_quoted(out, key);
    }
}

/// serde_json's number, with an exponent spelled as YAML 1.1 needs it to
/// read a float (`1.0e+300`, where JSON and YAML 1.2 take `1e300`).
fn write_number(out: &mut String, number: &serde_json::Number) {
    let text = number.to_string();
    match text.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => {
            out.push_str(mantissa);
            if !mantissa.contains('.') {
                out.push_str(".0");
            }
            out.push('e');
            if !exponent.starts_with(['-', '+']) {
                out.push('+');
            }
            out.push_str(exponent);
        }
        None => out.push_str(&text),
    }
}

fn write_string(out: &mut String, text: &str, block_indent: usize) {
    if is_plain_safe(text) {
        out.push_str(text);
    } else if is_literal_safe(text) {
        write_literal(out, text, block_indent);
    } else {
        write_double_quoted(out, text);
    }
}

/// Strings that YAML 1.1 and 1.2 both read back as this very string when
/// written plain, in a key or a value. The start rules out numbers,
/// timestamps and the `.inf`/`.nan` floats of both versions (they start
/// with a digit, a dot, or a sign before one of those) and every indicator
/// (`-` only before a letter or another `-`, as in `--port`); the other
/// characters rule out comments, flow collections and `: `; the words left
/// are YAML 1.1's booleans and the null of both.
fn is_plain_safe(text: &str) -> bool {
    let mut chars = text.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    let starts_safely = first.is_ascii_alphabetic()
        || first == '/'
        || first == '_'
        || (first == '-'
            && chars
                .clone()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '-'));
    starts_safely
        && chars.all(|c| c.is_ascii_alphanumeric() || "._/-+@:=".contains(c))
        && !text.ends_with(':')
        // `---` at the start of a line is a document marker.
        && !text.starts_with("---")
        && !matches!(
            text,
            "y" | "Y"
                | "yes"
                | "Yes"
                | "YES"
                | "n"
                | "N"
                | "no"
                | "No"
                | "NO"
                | "true"
                | "True"
                | "TRUE"
                | "false"
                | "False"
                | "FALSE"
                | "on"
                | "On"
                | "ON"
                | "off"
                | "Off"
                | "OFF"
                | "null"
                | "Null"
                | "NULL"
        )
}

/// Multi-line text a literal block (`|`) keeps exactly: its first line sets
/// the block's indentation, so it must have text that starts with no
/// whitespace; and every character must be one a block may hold as it is.
fn is_literal_safe(text: &str) -> bool {
    let first_line = text.split('\n').next().unwrap_or_default();
    text.contains('\n')
        && first_line
            .chars()
            .next()
            .is_some_and(|c| !c.is_whitespace())
        && text
            .chars()
            .all(|c| c == '\n' || c == '\t' || is_printable(c))
}

/// `|`, `|-` or `|+` for one, none or several trailing line breaks, then the
/// lines at `indent` (empty lines stay empty).
fn write_literal(out: &mut String, text: &str, indent: usize) {
    let content = text.trim_end_matches('\n');
    let trailing_breaks = text.len() - content.len();
    out.push_str(match trailing_breaks {
        0 => "|-",
        1 => "|",
        _ => "|+",
    });
    for line in content.split('\n') {
        out.push('\n');
        if !line.is_empty() {
            push_indent(out, indent);
            out.push_str(line);
        }
    }
    for _ in 1..trailing_breaks {
        out.push('\n');
    }
}

/// A double-quoted scalar: `"` and `\` escaped, and every character YAML
/// does not let stand in a document (controls, DEL, C1, the line and
/// paragraph separators, the byte order mark) as an escape both versions
/// read.
fn write_double_quoted(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if is_printable(c) => out.push(c),
            c => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
        }
    }
    out.push('"');
}

/// YAML's printable set (`c-printable`, the same in 1.1 and 1.2), less tab
/// and line breaks, which the callers treat apart.
fn is_printable(c: char) -> bool {
    matches!(c, ' '..='~' | '\u{A0}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
        && !matches!(c, '\u{2028}' | '\u{2029}' | '\u{FEFF}')
}

fn push_indent(out: &mut String, indent: usize) {
    out.extend(std::iter::repeat_n(' ', indent));
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn read_back(yaml: &str) -> Value {
        serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("{e}:\n{yaml}"))
    }

    #[test]
    fn strings_another_reading_could_take_for_something_else_are_quoted() {
        for text in [
            "yes",
            "no",
            "on",
            "Off",
            "y",
            "N",
            "true",
            "FALSE",
            "null",
            "~",
            "",
            "1_000",
            "0x1F",
            "0o17",
            "017",
            "1e3",
            "12:30",
            "190:20:30",
            "2024-01-01",
            "2001-12-14t21:59:43.10-05:00",
            ".inf",
            "-.Inf",
            ".NaN",
            "=",
            "<<",
            "-",
            "- x",
            "---",
            "---x",
            "a: b",
            "a #b",
            "#x",
            "[x]",
            "{x}",
            "*x",
            "&x",
            "!x",
            "%x",
            "@x",
            "`x",
            "'x'",
            "\"x\"",
            "?",
            "|",
            ">",
            "a:",
            " x",
            "x ",
            "8080",
            "100m",
            "+1",
            "-1",
            "-.5",
            ".5",
            "-0x1",
        ] {
            let yaml = to_yaml(&json!({ "value": text }));
            assert!(
                yaml.starts_with("value: \""),
                "{text:?} must be double-quoted: {yaml}"
            );
            assert_eq!(read_back(&yaml)["value"], text, "{yaml}");
        }
    }

    #[test]
    fn names_images_and_paths_stay_plain() {
        for text in [
            "nginx",
            "harbor.corp.example/dockerhub/library/nginx:1.27",
            "ghcr.io/org/app@sha256:4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945",
            "app.kubernetes.io/name",
            "f:metadata",
            "/var/run/secrets/kubernetes.io/serviceaccount",
            "IfNotPresent",
            "yesterday",
            "http://example.com/x",
            "_x",
            "--port",
            "-v",
        ] {
            let yaml = to_yaml(&json!({ text: text }));
            assert_eq!(yaml, format!("{text}: {text}\n"));
            assert_eq!(read_back(&yaml)[text], text);
        }
    }

    #[test]
    fn multi_line_text_is_a_literal_block_that_reads_back_exactly() {
        for (text, header) in [
            ("a\nb\n", "|"),
            ("a\nb", "|-"),
            ("a\n\n  b\n\n\n", "|+"),
            ("#!/bin/sh\necho \"hi\" # done\n", "|"),
        ] {
            let document = json!({ "data": { "script": text }, "after": 1 });
            let yaml = to_yaml(&document);
            assert!(yaml.contains(&format!("script: {header}\n")), "{yaml}");
            assert_eq!(read_back(&yaml), document, "{yaml}");
        }
        // Text a literal block cannot hold exactly is double-quoted instead.
        for text in [
            "\nleading break",
            "  indented\nfirst line",
            "bell\u{7}\nx",
            "cr\r\nlf",
        ] {
            let yaml = to_yaml(&json!({ "v": text }));
            assert!(yaml.starts_with("v: \""), "{text:?}: {yaml}");
            assert_eq!(read_back(&yaml)["v"], text);
        }
    }

    #[test]
    fn keys_past_yaml_s_implicit_limit_are_explicit() {
        let long = "k".repeat(1100);
        let document = json!({
            "data": { &long: "v", "short": 1 },
            "nested": { &long: { "a": [1, { &long: [] }] } },
            "list": [{ &long: ["x", "y"], "b": 2 }],
        });
        let yaml = to_yaml(&document);
        assert!(yaml.contains(&format!("? {long}\n")), "{yaml}");
        assert_eq!(read_back(&yaml), document, "{yaml}");
    }

    #[test]
    fn floats_read_as_floats_in_yaml_1_1_too() {
        for (number, written) in [
            (json!(1e300), "1.0e+300"),
            (json!(-2.5e-7), "-2.5e-7"),
            (json!(0.5), "0.5"),
            (json!(7), "7"),
        ] {
            let yaml = to_yaml(&json!({ "count": number }));
            assert_eq!(yaml, format!("count: {written}\n"));
            assert_eq!(read_back(&yaml)["count"], number);
        }
    }

    #[test]
    fn characters_yaml_cannot_hold_are_escaped() {
        let text = "del\u{7F} nel\u{85} ls\u{2028} bom\u{FEFF} nul\u{0} tab\t quote\" back\\ é 😀";
        let yaml = to_yaml(&json!({ "v": text }));
        for raw in ['\u{7F}', '\u{85}', '\u{2028}', '\u{FEFF}', '\u{0}'] {
            assert!(!yaml.contains(raw), "{raw:?} escaped: {yaml}");
        }
        assert_eq!(read_back(&yaml)["v"], text);
    }

    #[rustfmt::skip]
    const TRICKY_PIECES: &[&str] = &[
        "yes", "No", "ON", "off", "y", "~", "null", "true", "1_000", "0x1F", "12:30", "2024-01-01",
        ".inf", "=", "<<", "-", "--", "- ", ": ", " #", "#", "'", "\"", "\\", "{", "}", "[", "]",
        ",", "&", "*", "!", "|", ">", "%", "@", "`", "?", ":", "/", ".", "_", "\n", "\n\n", "\r",
        "\t", " ", "  ", "\u{85}", "\u{2028}", "\u{FEFF}", "\u{7F}", "\u{0}", "é", "😀",
    ];

    /// Strings built from what makes YAML scalars tricky: indicators,
    /// YAML 1.1 words and numbers, spaces, breaks, controls, non-ASCII.
    fn tricky_string() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let piece = prop_oneof![
            proptest::sample::select(TRICKY_PIECES).prop_map(str::to_owned),
            "[a-zA-Z0-9]{1,6}",
        ];
        proptest::collection::vec(piece, 0..6).prop_map(|pieces| pieces.concat())
    }

    fn document() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            (-1e300..1e300f64).prop_map(Value::from),
            tricky_string().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                proptest::collection::btree_map(tricky_string(), inner, 0..5)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn any_document_reads_back_exactly(document in document()) {
            let yaml = to_yaml(&document);
            let read: Value = serde_yaml_ng::from_str(&yaml)
                .map_err(|e| proptest::test_runner::TestCaseError::fail(format!("{e}:\n{yaml}")))?;
            proptest::prop_assert_eq!(read, document, "{}", yaml);
        }
    }

    #[test]
    fn structure_reads_back_as_written_in_kubectl_layout() {
        let document = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": "web", "labels": {}, "annotations": { "a/b": "{\"x\":1}" } },
            "spec": {
                "containers": [
                    { "name": "web", "image": "nginx:1.27", "args": ["--port", "8080", ""], "ports": [{ "containerPort": 8080 }] },
                    { "name": "side", "image": "busybox", "command": [] }
                ],
                "matrix": [[1, [2]], [], [{ "k": null }]],
                "enabled": true,
                "ratio": 0.5,
                "nothing": null
            },
            "data": { "8080": "port", "multi\nline key": "v", "": "empty key" }
        });
        let yaml = to_yaml(&document);
        assert_eq!(read_back(&yaml), document, "{yaml}");
        assert!(
            yaml.contains("spec:\n  containers:\n  - args:\n    - --port\n    - \"8080\"\n"),
            "{yaml}"
        );
        for scalar in [
            json!("x"),
            json!(3),
            json!(null),
            json!([]),
            json!({}),
            json!("a\nb"),
        ] {
            assert_eq!(read_back(&to_yaml(&scalar)), scalar);
        }
    }
}
