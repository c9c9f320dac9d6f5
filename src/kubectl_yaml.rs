//! YAML read as `kubectl apply -f` reads it, for `mutate`'s input.
//!
//! kubectl reads manifests with sigs.k8s.io/yaml, which is go-yaml v2: YAML
//! 1.1. There a plain `0644` is the octal number 420 (the Kubernetes API
//! documents `defaultMode: 0644`), `yes`, `on`, `y` are booleans, `1_000` is
//! a number, and `<<: *base` merges a mapping into another. A YAML 1.2 reader
//! (serde_yaml_ng) reads the first three as strings and keeps `<<` as a key:
//! `mutate` then wrote back a manifest the apiserver refuses (a string for
//! an integer field) or reads differently (a container without its merged
//! image), though nothing in it was rewritten. So plain scalars are resolved
//! here as go-yaml v2 resolves them; quoted and block scalars are strings.
//!
//! One deliberate difference: go-yaml v2 reads a plain `2024-01-01` as a
//! timestamp, which kubectl then sends as `2024-01-01T00:00:00Z`; here it
//! stays the string as written (and the writer quotes it).

use std::collections::HashMap;

use granit_parser::{Event, Options, Parser, ScalarStyle, Tag};
use serde_json::{Map, Number, Value};

/// Deeper nesting is refused: `serde_json::Value`s are dropped recursively,
/// and no manifest comes near it.
const MAX_DEPTH: usize = 128;
/// Values that aliases may copy in one stream, so that a few lines of
/// aliases of aliases ("billion laughs") cannot take all memory.
const MAX_ALIASED_VALUES: usize = 1_000_000;

/// Why a stream is not YAML that kubectl reads; `document` counts from 1.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct ReadError {
    pub document: usize,
    pub reason: String,
}

/// Every document of `input`, an empty one as `null`.
pub fn documents(input: &str) -> Result<Vec<Value>, ReadError> {
    let mut options = Options::default();
    options.emit_comments = false;
    // As libyaml, and so go-yaml: `key: |` then `text` at the very end of
    // the input is "text", not "text\n".
    options.block_scalar_eof_without_line_feed = true;
    let mut reader = Reader::default();
    for event in Parser::new_from_str_with_options(input, options) {
        let (event, _) = event.map_err(|error| reader.error(error.to_string()))?;
        reader.event(event)?;
    }
    Ok(reader.documents)
}

#[derive(Default)]
struct Reader {
    documents: Vec<Value>,
    /// The collections open at this point, innermost last.
    open: Vec<Open>,
    /// The document being read, once its root is complete.
    root: Option<Value>,
    anchors: HashMap<usize, Value>,
    aliased_values: usize,
}

struct Open {
    anchor: usize,
    collection: Collection,
}

enum Collection {
    Sequence(Vec<Value>),
    Mapping {
        entries: Map<String, Value>,
        /// A key read, waiting for its value.
        key: Option<Key>,
        /// The values of `<<` keys, merged when the mapping ends.
        merges: Vec<Value>,
    },
}

enum Key {
    Merge,
    Name(String),
}

impl Reader {
    fn error(&self, reason: impl Into<String>) -> ReadError {
        ReadError {
            document: self.documents.len() + 1,
            reason: reason.into(),
        }
    }

    fn event(&mut self, event: Event<'_>) -> Result<(), ReadError> {
        match event {
            Event::DocumentStart(..) => {
                self.root = None;
                self.anchors.clear();
            }
            Event::DocumentEnd => {
                let root = self.root.take().unwrap_or(Value::Null);
                self.documents.push(root);
            }
            Event::Scalar(text, style, anchor, tag) => {
                if self.awaits_key() {
                    let key = self.key(&text, style, tag.as_deref())?;
                    return self.set_key(key);
                }
                let value = self.scalar(&text, style, tag.as_deref())?;
                self.complete(value, anchor)?;
            }
            Event::Alias(anchor) => {
                let value = self
                    .anchors
                    .get(&anchor)
                    .cloned()
                    .ok_or_else(|| self.error("an alias of an anchor not defined before it"))?;
                self.aliased_values += count_values(&value);
                if self.aliased_values > MAX_ALIASED_VALUES {
                    return Err(self.error(format!(
                        "aliases copy more than {MAX_ALIASED_VALUES} values"
                    )));
                }
                if self.awaits_key() {
                    return match value {
                        Value::String(name) => self.set_key(Key::Name(name)),
                        _ => Err(self.error("a mapping key must be a string")),
                    };
                }
                self.complete(value, 0)?;
            }
            Event::SequenceStart(_, anchor, _) => {
                self.open(anchor, Collection::Sequence(Vec::new()))?
            }
            Event::MappingStart(_, anchor, _) => self.open(
                anchor,
                Collection::Mapping {
                    entries: Map::new(),
                    key: None,
                    merges: Vec::new(),
                },
            )?,
            Event::SequenceEnd | Event::MappingEnd => {
                let Some(Open { anchor, collection }) = self.open.pop() else {
                    return Err(self.error("a collection closed that was never opened"));
                };
                let value = match collection {
                    Collection::Sequence(items) => Value::Array(items),
                    Collection::Mapping {
                        mut entries,
                        merges,
                        ..
                    } => {
                        merge(&mut entries, merges).map_err(|reason| self.error(reason))?;
                        Value::Object(entries)
                    }
                };
                self.complete(value, anchor)?;
            }
            // Stream boundaries, and presentation details (anchor names).
            _ => {}
        }
        Ok(())
    }

    fn awaits_key(&self) -> bool {
        matches!(
            self.open.last(),
            Some(Open {
                collection: Collection::Mapping { key: None, .. },
                ..
            })
        )
    }

    fn open(&mut self, anchor: usize, collection: Collection) -> Result<(), ReadError> {
        if self.awaits_key() {
            return Err(self.error("a mapping key must be a string"));
        }
        if self.open.len() >= MAX_DEPTH {
            return Err(self.error(format!("nesting deeper than {MAX_DEPTH} levels")));
        }
        self.open.push(Open { anchor, collection });
        Ok(())
    }

    fn set_key(&mut self, key: Key) -> Result<(), ReadError> {
        if let Key::Name(name) = &key
            && let Some(Open {
                collection: Collection::Mapping { entries, .. },
                ..
            }) = self.open.last()
            && entries.contains_key(name)
        {
            return Err(self.error(format!("duplicate mapping key {name:?}")));
        }
        if let Some(Open {
            collection: Collection::Mapping { key: slot, .. },
            ..
        }) = self.open.last_mut()
        {
            *slot = Some(key);
        }
        Ok(())
    }

    /// Puts a complete value where it belongs: the root, the next item, or
    /// the value of the key read last.
    fn complete(&mut self, value: Value, anchor: usize) -> Result<(), ReadError> {
        if anchor != 0 {
            self.anchors.insert(anchor, value.clone());
        }
        match self.open.last_mut() {
            None => self.root = Some(value),
            Some(Open {
                collection: Collection::Sequence(items),
                ..
            }) => items.push(value),
            Some(Open {
                collection:
                    Collection::Mapping {
                        entries,
                        key,
                        merges,
                    },
                ..
            }) => match key.take() {
                Some(Key::Merge) => merges.push(value),
                Some(Key::Name(name)) => {
                    entries.insert(name, value);
                }
                None => return Err(self.error("a value without a key")),
            },
        }
        Ok(())
    }

    fn key(&self, text: &str, style: ScalarStyle, tag: Option<&Tag>) -> Result<Key, ReadError> {
        if style == ScalarStyle::Plain && tag.is_none() && text == "<<" {
            return Ok(Key::Merge);
        }
        // Keys that read as other scalars are named by their JSON text, as
        // sigs.k8s.io/yaml does (`1: x` is `{"1": "x"}`).
        Ok(Key::Name(match self.scalar(text, style, tag)? {
            Value::String(name) => name,
            other => other.to_string(),
        }))
    }

    fn scalar(
        &self,
        text: &str,
        style: ScalarStyle,
        tag: Option<&Tag>,
    ) -> Result<Value, ReadError> {
        let core_tag = tag
            .filter(|tag| tag.handle() == "tag:yaml.org,2002:")
            .map(Tag::suffix);
        let resolved = match core_tag {
            Some("str" | "binary" | "timestamp") => Resolved::Value(Value::String(text.into())),
            Some(_) => resolve_plain(text),
            None if style == ScalarStyle::Plain => resolve_plain(text),
            None => Resolved::Value(Value::String(text.into())),
        };
        match (resolved, core_tag) {
            (Resolved::NotJson, _) => Err(self.error(format!(
                "{text:?} is not a number JSON can hold (kubectl refuses it too)"
            ))),
            (Resolved::Value(value), Some(suffix)) if !tag_admits(suffix, &value) => {
                Err(self.error(format!("{text:?} is not a valid !!{suffix}")))
            }
            (Resolved::Value(value), _) => Ok(value),
        }
    }
}

/// Whether a value resolved from a scalar tagged `!!suffix` has that type.
fn tag_admits(suffix: &str, value: &Value) -> bool {
    match suffix {
        "null" => value.is_null(),
        "bool" => value.is_boolean(),
        "int" => value.is_i64() || value.is_u64(),
        "float" => value.is_number(),
        _ => true,
    }
}

enum Resolved {
    Value(Value),
    /// An infinity or NaN, which JSON has no number for.
    NotJson,
}

/// A plain scalar as go-yaml v2 resolves it (resolve.go): null, a YAML 1.1
/// boolean, an integer in Go's syntax (`0x`, `0o`, `0b`, a leading `0` for
/// octal, `_` anywhere), a float, else a string.
fn resolve_plain(text: &str) -> Resolved {
    let value = match text {
        "" | "~" | "null" | "Null" | "NULL" => Value::Null,
        "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "true" | "True" | "TRUE" => {
            Value::Bool(true)
        }
        "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" | "false" | "False" | "FALSE" => {
            Value::Bool(false)
        }
        ".nan" | ".NaN" | ".NAN" | ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF"
        | "-.inf" | "-.Inf" | "-.INF" => return Resolved::NotJson,
        _ if text.starts_with(|c: char| c.is_ascii_digit() || c == '+' || c == '-') => {
            number(&text.replace('_', "")).unwrap_or_else(|| Value::String(text.into()))
        }
        _ if text.starts_with('.') => float(text).unwrap_or_else(|| Value::String(text.into())),
        _ => Value::String(text.into()),
    };
    Resolved::Value(value)
}

/// Go's `strconv.ParseInt(s, 0, 64)`, then `ParseUint`, then a float of
/// YAML's shape, then `0b`: what go-yaml v2 tries, in its order.
fn number(text: &str) -> Option<Value> {
    let (negative, unsigned) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let (radix, digits) = if let Some(hex) = unsigned
        .strip_prefix("0x")
        .or_else(|| unsigned.strip_prefix("0X"))
    {
        (16, hex)
    } else if let Some(binary) = unsigned
        .strip_prefix("0b")
        .or_else(|| unsigned.strip_prefix("0B"))
    {
        (2, binary)
    } else if let Some(octal) = unsigned
        .strip_prefix("0o")
        .or_else(|| unsigned.strip_prefix("0O"))
    {
        (8, octal)
    } else if unsigned.len() > 1 && unsigned.starts_with('0') {
        (8, &unsigned[1..])
    } else {
        (10, unsigned)
    };
    let is_digits = !digits.is_empty() && digits.chars().all(|c| c.is_digit(radix));
    if is_digits && let Ok(magnitude) = u64::from_str_radix(digits, radix) {
        if !negative {
            return Some(Value::Number(magnitude.into()));
        }
        if magnitude <= i64::MAX as u64 + 1 {
            return Some(Value::Number((magnitude as i64).wrapping_neg().into()));
        }
    }
    float(text)
}

/// A float of YAML's shape (`[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`),
/// as JSON holds it; one past f64's range is no JSON number.
fn float(text: &str) -> Option<Value> {
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (&unsigned[..at], Some(&unsigned[at + 1..])),
        None => (unsigned, None),
    };
    let digits = |part: &str| part.chars().all(|c| c.is_ascii_digit());
    let mantissa_ok = match mantissa.split_once('.') {
        Some((whole, fraction)) => {
            digits(whole) && digits(fraction) && !(whole.is_empty() && fraction.is_empty())
        }
        None => !mantissa.is_empty() && digits(mantissa),
    };
    let exponent_ok = exponent.is_none_or(|exponent| {
        let exponent = exponent.strip_prefix(['-', '+']).unwrap_or(exponent);
        !exponent.is_empty() && digits(exponent)
    });
    if !mantissa_ok || !exponent_ok {
        return None;
    }
    let parsed: f64 = text.parse().ok()?;
    Number::from_f64(parsed).map(Value::Number)
}

/// Merges `<<` values into `entries`: keys written in the mapping win, then
/// the first merged mapping that has the key (a `<<` of a sequence lists
/// them in order of precedence).
fn merge(entries: &mut Map<String, Value>, merges: Vec<Value>) -> Result<(), String> {
    let mut sources = Vec::new();
    for merged in merges {
        match merged {
            Value::Object(mapping) => sources.push(mapping),
            Value::Array(items) => {
                for item in items {
                    match item {
                        Value::Object(mapping) => sources.push(mapping),
                        _ => return Err("a `<<` sequence may hold only mappings".into()),
                    }
                }
            }
            _ => return Err("a `<<` value must be a mapping or a sequence of mappings".into()),
        }
    }
    for source in sources {
        for (key, value) in source {
            entries.entry(key).or_insert(value);
        }
    }
    Ok(())
}

/// Values in `value`, itself included.
fn count_values(value: &Value) -> usize {
    1 + match value {
        Value::Array(items) => items.iter().map(count_values).sum(),
        Value::Object(entries) => entries.values().map(count_values).sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn one(yaml: &str) -> Value {
        let mut documents = documents(yaml).unwrap_or_else(|e| panic!("{yaml:?}: {e}"));
        assert_eq!(documents.len(), 1, "{yaml:?}");
        documents.remove(0)
    }

    #[test]
    fn plain_scalars_resolve_as_go_yaml_v2_resolves_them() {
        for (plain, expected) in [
            ("0644", json!(420)),
            ("0400", json!(256)),
            ("0o17", json!(15)),
            ("0x1F", json!(31)),
            ("0b101", json!(5)),
            ("-0b101", json!(-5)),
            ("1_000", json!(1000)),
            ("+12", json!(12)),
            ("-9223372036854775808", json!(i64::MIN)),
            ("18446744073709551615", json!(u64::MAX)),
            ("12345678901234567890123", json!(1.2345678901234568e22)),
            ("1.5", json!(1.5)),
            ("1.", json!(1.0)),
            (".5", json!(0.5)),
            ("1e3", json!(1000.0)),
            ("-2.5E-3", json!(-0.0025)),
            ("yes", json!(true)),
            ("on", json!(true)),
            ("Y", json!(true)),
            ("No", json!(false)),
            ("OFF", json!(false)),
            ("~", json!(null)),
            ("Null", json!(null)),
            // Not octal: go-yaml v2 then reads it as a float.
            ("08", json!(8.0)),
            ("0x", json!("0x")),
            ("1.2.3", json!("1.2.3")),
            ("2024-01-01", json!("2024-01-01")),
            (".", json!(".")),
            ("1e", json!("1e")),
            ("nginx:1.27", json!("nginx:1.27")),
            ("yes please", json!("yes please")),
        ] {
            assert_eq!(one(&format!("v: {plain}\n"))["v"], expected, "{plain}");
        }
    }

    #[test]
    fn quoted_block_and_str_tagged_scalars_are_strings() {
        let value = one("a: '0644'\nb: \"yes\"\nc: !!str 0644\nd: |\n  on\ne: !!int \"0644\"\n");
        assert_eq!(
            value,
            json!({"a": "0644", "b": "yes", "c": "0644", "d": "on\n", "e": 420})
        );
    }

    #[test]
    fn infinities_and_bad_tags_are_refused_with_the_document() {
        for yaml in ["a: 1\n---\nv: .inf\n", "a: 1\n---\nv: !!int nope\n"] {
            let error = documents(yaml).unwrap_err();
            assert_eq!(error.document, 2, "{yaml:?}: {error}");
        }
    }

    #[test]
    fn merge_keys_merge_and_written_keys_win() {
        let value = one(
            "base: &base {image: nginx, name: base, resources: {cpu: 1}}\n\
             extra: &extra {name: extra, tty: true}\n\
             a: {<<: *base, name: a}\n\
             b:\n  name: b\n  <<: [*extra, *base]\n",
        );
        assert_eq!(
            value["a"],
            json!({"image": "nginx", "name": "a", "resources": {"cpu": 1}})
        );
        assert_eq!(
            value["b"],
            json!({"image": "nginx", "name": "b", "resources": {"cpu": 1}, "tty": true})
        );
    }

    #[test]
    fn documents_anchors_and_keys() {
        let read = documents("a: &x [1, 2]\nb: *x\n---\n---\n1: one\ntrue: yes\n").unwrap();
        assert_eq!(
            read,
            [
                json!({"a": [1, 2], "b": [1, 2]}),
                Value::Null,
                json!({"1": "one", "true": true}),
            ]
        );
        assert!(documents("a: 1\na: 2\n").is_err(), "duplicate keys");
        assert!(documents("? [a]\n: 1\n").is_err(), "a sequence as a key");
    }

    #[test]
    fn a_block_scalar_at_the_end_of_the_input_has_no_added_line_feed() {
        assert_eq!(one("v: |\n  text")["v"], "text");
    }

    #[test]
    fn alias_bombs_and_deep_nesting_are_refused() {
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for level in 1..10 {
            let previous = format!("*a{}", level - 1);
            let items = [previous.as_str(); 10].join(", ");
            bomb.push_str(&format!("a{level}: &a{level} [{items}]\n"));
        }
        let error = documents(&bomb).unwrap_err();
        assert!(error.reason.contains("aliases copy more than"), "{error}");

        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(documents(&deep).is_err());
    }
}
