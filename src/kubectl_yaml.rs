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
//! here as go-yaml v2 resolves them, quoted and block scalars are strings,
//! and the rest follows what kubectl was seen to do (a differential test of
//! generated manifests against kubectl): a duplicate key keeps its last
//! value, a `<<` sets its keys over those written before it, a scalar with a
//! tag of its own (`!foo 1`) is a string, a byte order mark may start any
//! document, a document after `...` without a `---` is never read, and a
//! float key is named at float32 precision. Not as kubectl reads it: a lone
//! `-` in a flow collection (`[cat, -]`), which libyaml takes and the YAML
//! grammar (so this parser) refuses.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};

use base64::Engine as _;
use granit_parser::{Event, Options, Parser, ScalarStyle, Tag};
use serde_json::{Map, Number, Value};

/// Deeper nesting is refused, an alias's copy included: `serde_json::Value`s
/// are cloned, dropped and written out recursively, and no manifest comes
/// near it.
const MAX_DEPTH: usize = 128;
/// Values that aliases may copy in one stream, so that a few lines of
/// aliases of aliases ("billion laughs") cannot take all memory.
const MAX_ALIASED_VALUES: usize = 1_000_000;
/// The bytes of text (strings and keys) that aliases may copy in one
/// stream: a long anchored string copied by aliases of aliases is few
/// values but many bytes.
const MAX_ALIASED_BYTES: usize = 64 * 1024 * 1024;
const CORE_TAG_PREFIX: &str = "tag:yaml.org,2002:";

/// Why a stream is not YAML that kubectl reads; `document` counts from 1.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct ReadError {
    pub document: usize,
    pub reason: String,
}

/// The documents of a stream (an empty one as `null`), and what was read
/// differently from how it is written (a key written twice).
#[derive(Debug, Default)]
pub struct Read {
    pub documents: Vec<Value>,
    pub warnings: Vec<String>,
}

/// Every document of `input`.
pub fn documents(input: &str) -> Result<Read, ReadError> {
    let mut options = Options::default();
    options.emit_comments = false;
    // A byte order mark inside a value is content, as for kubectl; one that
    // starts a line (files concatenated after `---`) is dropped below.
    options.bom_inside_document_as_content = true;
    let input = without_line_start_byte_order_marks(input);
    let mut reader = Reader::default();
    for event in Parser::new_from_str_with_options(&input, options) {
        let (event, _) = event.map_err(|error| reader.error(error.to_string()))?;
        reader.event(event)?;
    }
    Ok(Read {
        documents: reader.documents,
        warnings: reader.warnings,
    })
}

/// kubectl splits a stream at its `---` lines and go-yaml skips a byte
/// order mark at the start of each part, so one may start any line there.
fn without_line_start_byte_order_marks(input: &str) -> Cow<'_, str> {
    const MARK: char = '\u{feff}';
    if !input.contains(MARK) {
        return Cow::Borrowed(input);
    }
    let mut cleaned = String::with_capacity(input.len());
    for line in input.split_inclusive('\n') {
        cleaned.push_str(line.strip_prefix(MARK).unwrap_or(line));
    }
    Cow::Owned(cleaned)
}

#[derive(Default)]
struct Reader {
    documents: Vec<Value>,
    warnings: Vec<String>,
    /// The collections open at this point, innermost last.
    open: Vec<Open>,
    /// The document being read, once its root is complete.
    root: Option<Value>,
    anchors: HashMap<usize, Value>,
    aliased_values: usize,
    aliased_bytes: usize,
    started_documents: usize,
    /// The current document is one kubectl would not read.
    unread_by_kubectl: bool,
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
        /// The keys written in this mapping itself: one that a `<<` merge
        /// brought in as well is overridden, as merges mean, not written
        /// twice.
        written: BTreeSet<String>,
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
            Event::DocumentStart(explicit, _) => {
                self.root = None;
                self.anchors.clear();
                // kubectl splits the stream at its `---` lines and reads one
                // document of each part: one that follows `...` without a
                // `---` of its own is never read.
                self.unread_by_kubectl = !explicit && self.started_documents > 0;
                self.started_documents += 1;
            }
            Event::DocumentEnd => {
                let root = self.root.take().unwrap_or(Value::Null);
                if self.unread_by_kubectl {
                    self.warnings.push(format!(
                        "document {}: it follows `...` without a `---`, so kubectl never reads \
                         it; left out",
                        self.documents.len() + 1
                    ));
                } else {
                    self.documents.push(root);
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                if self.awaits_key() {
                    let is_merge = style == ScalarStyle::Plain
                        && text == "<<"
                        && tag.as_deref().is_none_or(|tag| tag.suffix() == "merge");
                    if is_merge {
                        self.set_key(Key::Merge);
                        return Ok(());
                    }
                    // A key needs no JSON number: an infinity or NaN is
                    // named as sigs.k8s.io/yaml names a float key.
                    let value = match self.scalar(&text, style, tag.as_deref()) {
                        Err(_) if style == ScalarStyle::Plain && tag.is_none() => {
                            Value::String(non_finite_key_name(&text).to_owned())
                        }
                        read => read?,
                    };
                    if anchor != 0 {
                        self.anchors.insert(anchor, value.clone());
                    }
                    self.set_key(Key::Name(key_name(value)));
                    return Ok(());
                }
                let value = self.scalar(&text, style, tag.as_deref())?;
                self.complete(value, anchor)?;
            }
            Event::Alias(anchor) => {
                // Measured before it is copied: the copy is what the limits
                // are for. Every value held is at most MAX_DEPTH deep, so
                // the measure's recursion is bounded.
                let size = self
                    .anchors
                    .get(&anchor)
                    .map(measure)
                    .ok_or_else(|| self.error("an alias of an anchor not defined before it"))?;
                self.aliased_values += size.values;
                if self.aliased_values > MAX_ALIASED_VALUES {
                    return Err(self.error(format!(
                        "aliases copy more than {MAX_ALIASED_VALUES} values"
                    )));
                }
                self.aliased_bytes += size.bytes;
                if self.aliased_bytes > MAX_ALIASED_BYTES {
                    return Err(self.error(format!(
                        "aliases copy more than {MAX_ALIASED_BYTES} bytes of text"
                    )));
                }
                // An alias of a deep collection inside others nests as deep
                // as both together: the bound on collections opened alone
                // would let aliases of aliases build any depth.
                if self.open.len() + size.depth > MAX_DEPTH {
                    return Err(self.error(format!(
                        "nesting deeper than {MAX_DEPTH} levels (through an alias)"
                    )));
                }
                let value = self.anchors.get(&anchor).cloned().unwrap_or(Value::Null);
                if self.awaits_key() {
                    if value.is_object() || value.is_array() {
                        return Err(self.error("a mapping key must be a scalar"));
                    }
                    self.set_key(Key::Name(key_name(value)));
                    return Ok(());
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
                    written: BTreeSet::new(),
                },
            )?,
            Event::SequenceEnd | Event::MappingEnd => {
                let Some(Open { anchor, collection }) = self.open.pop() else {
                    return Err(self.error("a collection closed that was never opened"));
                };
                let value = match collection {
                    Collection::Sequence(items) => Value::Array(items),
                    Collection::Mapping { entries, .. } => Value::Object(entries),
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
            return Err(self.error("a mapping key must be a scalar"));
        }
        if self.open.len() >= MAX_DEPTH {
            return Err(self.error(format!("nesting deeper than {MAX_DEPTH} levels")));
        }
        self.open.push(Open { anchor, collection });
        Ok(())
    }

    fn set_key(&mut self, key: Key) {
        if let Some(Open {
            collection: Collection::Mapping { key: slot, .. },
            ..
        }) = self.open.last_mut()
        {
            *slot = Some(key);
        }
    }

    /// Puts a complete value where it belongs: the root, the next item, or
    /// the value of the key read last. Entries are set in the order read, as
    /// go-yaml v2 sets them: a key written twice keeps its last value, and a
    /// `<<` sets the merged keys over those before it (of a `<<` sequence,
    /// the first mapping wins).
    fn complete(&mut self, value: Value, anchor: usize) -> Result<(), ReadError> {
        if anchor != 0 {
            self.anchors.insert(anchor, value.clone());
        }
        let document = self.documents.len() + 1;
        let error = |reason: &str| ReadError {
            document,
            reason: reason.into(),
        };
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
                        written,
                    },
                ..
            }) => match key.take() {
                Some(Key::Merge) => {
                    let mappings = match value {
                        Value::Object(mapping) => vec![mapping],
                        Value::Array(items) => items
                            .into_iter()
                            .rev()
                            .map(|item| match item {
                                Value::Object(mapping) => Ok(mapping),
                                _ => Err(error("a `<<` sequence may hold only mappings")),
                            })
                            .collect::<Result<_, _>>()?,
                        _ => {
                            return Err(error(
                                "a `<<` value must be a mapping or a sequence of mappings",
                            ));
                        }
                    };
                    for mapping in mappings {
                        entries.extend(mapping);
                    }
                }
                Some(Key::Name(name)) => {
                    let written_before = !written.insert(name.clone());
                    if entries.insert(name.clone(), value).is_some() && written_before {
                        self.warnings.push(format!(
                            "document {document}: key {name:?} is written twice; its last value \
                             is kept, as kubectl keeps it"
                        ));
                    }
                }
                None => return Err(error("a value without a key")),
            },
        }
        Ok(())
    }

    fn scalar(
        &self,
        text: &str,
        style: ScalarStyle,
        tag: Option<&Tag>,
    ) -> Result<Value, ReadError> {
        let full_tag = tag.map(|tag| format!("{}{}", tag.handle(), tag.suffix()));
        let core_tag = full_tag
            .as_deref()
            .map(|tag| tag.strip_prefix(CORE_TAG_PREFIX).unwrap_or("other"));
        let resolved = match core_tag {
            None if style == ScalarStyle::Plain => resolve_plain(text),
            None | Some("str" | "timestamp" | "merge" | "other") => {
                Resolved::Value(Value::String(text.into()))
            }
            Some("binary") => Resolved::Value(Value::String(from_base64(text))),
            Some(_) => resolve_plain(text),
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

/// A key as sigs.k8s.io/yaml names it in JSON: a string as it is, a float
/// as Go formats a float32 (`strconv.FormatFloat(f, 'g', -1, 32)`), another
/// scalar by its JSON text (`1: x` is `{"1": "x"}`).
fn key_name(value: Value) -> String {
    match value {
        Value::String(name) => name,
        Value::Number(number) if number.is_f64() => {
            go_float32_text(number.as_f64().unwrap_or_default())
        }
        other => other.to_string(),
    }
}

/// Go's `strconv.FormatFloat(value, 'g', -1, 32)`: the shortest digits that
/// read back as the same float32, in exponent form when the exponent is
/// below -4 or 6 and above (`1e+07`, `1.5e-07`), else plainly (`1000`, `0.3`).
fn go_float32_text(value: f64) -> String {
    // Past float32's range the cast gives an infinity, which `{:e}` writes
    // without digits (`inf`). Go writes `+Inf` and `-Inf`, which
    // sigs.k8s.io/yaml renames to `.inf` and `-.inf` for a key, the only
    // place this text goes.
    let value = value as f32;
    if value.is_infinite() {
        return if value > 0.0 { ".inf" } else { "-.inf" }.to_owned();
    }
    let shortest = format!("{value:e}");
    let (mantissa, exponent) = shortest.split_once('e').unwrap_or((&shortest, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let sign = if mantissa.starts_with('-') { "-" } else { "" };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if !(-4..6).contains(&exponent) {
        let (first, rest) = digits.split_at(1);
        let fraction = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let exponent_sign = if exponent < 0 { '-' } else { '+' };
        return format!(
            "{sign}{first}{fraction}e{exponent_sign}{:02}",
            exponent.abs()
        );
    }
    if exponent < 0 {
        let zeros = "0".repeat((-exponent - 1) as usize);
        return format!("{sign}0.{zeros}{digits}");
    }
    let whole = exponent as usize + 1;
    if digits.len() <= whole {
        format!("{sign}{digits}{}", "0".repeat(whole - digits.len()))
    } else {
        format!("{sign}{}.{}", &digits[..whole], &digits[whole..])
    }
}

/// The name sigs.k8s.io/yaml gives a key that go-yaml v2 read as an
/// infinity or NaN (`.Inf`, `+.inf`, `.NaN`): Go's `+Inf`, `-Inf` and `NaN`
/// renamed as YAML writes them.
fn non_finite_key_name(text: &str) -> &'static str {
    if text.to_ascii_lowercase().ends_with("nan") {
        ".nan"
    } else if text.starts_with('-') {
        "-.inf"
    } else {
        ".inf"
    }
}

/// A `!!binary` scalar's bytes as text, as go-yaml v2 decodes it; kept as
/// written when it is not base64 of UTF-8.
fn from_base64(text: &str) -> String {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .unwrap_or_else(|| text.to_owned())
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

/// What an alias of a value copies.
#[derive(Debug, Default, PartialEq)]
struct Size {
    /// Values in it, itself included.
    values: usize,
    /// Bytes of its strings and keys.
    bytes: usize,
    /// Collections nested in it, itself included: 0 for a scalar.
    depth: usize,
}

/// The [`Size`] of `value`.
fn measure(value: &Value) -> Size {
    let mut size = Size {
        values: 1,
        ..Size::default()
    };
    let mut add = |key_bytes: usize, item: &Value| {
        let item = measure(item);
        size.values += item.values;
        size.bytes += key_bytes + item.bytes;
        size.depth = size.depth.max(item.depth + 1);
    };
    match value {
        Value::Array(items) => items.iter().for_each(|item| add(0, item)),
        Value::Object(entries) => entries.iter().for_each(|(key, item)| add(key.len(), item)),
        Value::String(text) => size.bytes = text.len(),
        _ => {}
    }
    if value.is_array() || value.is_object() {
        size.depth = size.depth.max(1);
    }
    size
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn one(yaml: &str) -> Value {
        let mut documents = documents(yaml)
            .unwrap_or_else(|e| panic!("{yaml:?}: {e}"))
            .documents;
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

    /// As go-yaml v2 (and so kubectl) merges: entries in the order read, a
    /// `<<` over the keys before it, keys after it over the `<<`, and of a
    /// `<<` sequence the first mapping over the later ones.
    #[test]
    fn merge_keys_merge_as_kubectl_merges() {
        let value = one(
            "base: &base {image: nginx, name: base, resources: {cpu: 1}}\n\
             extra: &extra {name: extra, tty: true}\n\
             a: {<<: *base, name: a}\n\
             b:\n  name: b\n  <<: [*extra, *base]\n\
             c: {<<: *base, <<: *extra}\n\
             d: {!!merge <<: *extra}\n\
             e: {!!str <<: 1}\n",
        );
        assert_eq!(
            value["a"],
            json!({"image": "nginx", "name": "a", "resources": {"cpu": 1}})
        );
        assert_eq!(
            value["b"],
            json!({"image": "nginx", "name": "extra", "resources": {"cpu": 1}, "tty": true})
        );
        assert_eq!(value["c"]["name"], "extra");
        assert_eq!(value["d"], json!({"name": "extra", "tty": true}));
        assert_eq!(value["e"], json!({"<<": 1}));
    }

    #[test]
    fn documents_anchors_and_keys() {
        let read =
            documents("a: &x [1, 2]\nb: *x\n---\n---\n1: one\ntrue: yes\nk: &k 7\n*k : seven\n")
                .unwrap();
        assert_eq!(
            read.documents,
            [
                json!({"a": [1, 2], "b": [1, 2]}),
                Value::Null,
                json!({"1": "one", "true": true, "k": 7, "7": "seven"}),
            ]
        );
        assert!(read.warnings.is_empty(), "{:?}", read.warnings);
        assert!(documents("? [a]\n: 1\n").is_err(), "a sequence as a key");
    }

    /// kubectl keeps a key's last value; so does the reader, and says so.
    #[test]
    fn a_key_written_twice_keeps_its_last_value_with_a_warning() {
        let read = documents("a: 1\n---\nb: 1\nb: 2\n'1': x\n1: z\n").unwrap();
        assert_eq!(read.documents[1], json!({"b": 2, "1": "z"}));
        assert_eq!(read.warnings.len(), 2, "{:?}", read.warnings);
        assert!(
            read.warnings[0].starts_with("document 2: key \"b\""),
            "{:?}",
            read.warnings
        );
    }

    /// A key that a `<<` merge brought in is overridden, as merges are
    /// meant to be used, not written twice; one written twice in the
    /// mapping itself still is, a merge in between or not.
    #[test]
    fn a_key_overriding_a_merge_is_no_key_written_twice() {
        let read = documents("- &c {name: a, image: nginx}\n- {<<: *c, name: b}\n").unwrap();
        assert_eq!(read.documents[0][1], json!({"name": "b", "image": "nginx"}));
        assert!(read.warnings.is_empty(), "{:?}", read.warnings);
        let read = documents("- &c {name: a}\n- {name: x, <<: *c, name: b}\n").unwrap();
        assert_eq!(read.documents[0][1], json!({"name": "b"}));
        assert_eq!(read.warnings.len(), 1, "{:?}", read.warnings);
    }

    /// kubectl's splitter ends every line with a line feed before go-yaml
    /// reads it, so a block scalar on the last line keeps its line feed.
    #[test]
    fn a_block_scalar_at_the_end_of_the_input_keeps_its_line_feed() {
        assert_eq!(one("v: |\n  text")["v"], "text\n");
    }

    #[test]
    fn tags_of_their_own_make_strings_and_binary_is_decoded() {
        let value = one(
            "a: !foo 123\nb: ! yes\nc: !!binary aGVsbG8=\nd: !x\ne: !<tag:yaml.org,2002:str> 5\n",
        );
        assert_eq!(
            value,
            json!({"a": "123", "b": "yes", "c": "hello", "d": "", "e": "5"})
        );
    }

    /// Files concatenated after `---` may each start with a byte order mark;
    /// one inside a value is content.
    #[test]
    fn a_document_after_an_end_marker_without_a_start_is_left_out_as_kubectl_does() {
        let read = documents("a: 1\n...\nb: 2\n---\nc: 3\n").unwrap();
        assert_eq!(read.documents, [json!({"a": 1}), json!({"c": 3})]);
        assert_eq!(read.warnings.len(), 1, "{:?}", read.warnings);
        let read = documents("a: 1\n...\n---\nb: 2\n").unwrap();
        assert_eq!(read.documents, [json!({"a": 1}), json!({"b": 2})]);
        assert!(read.warnings.is_empty());
    }

    /// Float keys are named as sigs.k8s.io/yaml names them (the values
    /// kubectl printed for these keys).
    #[test]
    fn float_keys_are_named_as_go_formats_a_float32() {
        for (key, name) in [
            ("1e3", "1000"),
            ("1.0", "1"),
            ("08", "8"),
            ("3.141592653589793", "3.1415927"),
            ("1.5e-7", "1.5e-07"),
            ("123456789.0", "1.2345679e+08"),
            ("16777217.0", "1.6777216e+07"),
            ("0.30000000000000004", "0.3"),
            ("-0.0", "-0"),
            ("1e7", "1e+07"),
            ("0.0001", "0.0001"),
            ("0.00001", "1e-05"),
            ("123456.5", "123456.5"),
            // Past float32's range: an infinity, which sigs.k8s.io/yaml
            // names as YAML writes it (kubectl 1.32 printed these), not
            // as Go formats it (`+Inf`).
            ("1e39", ".inf"),
            ("1e300", ".inf"),
            ("-1e300", "-.inf"),
        ] {
            let value = one(&format!("{key}: v\n"));
            assert_eq!(value, json!({name: "v"}), "{key}");
        }
    }

    /// Infinities and NaN are named `.inf`, `-.inf` and `.nan` however
    /// they are written (kubectl 1.32 printed these).
    #[test]
    fn keys_need_no_json_number() {
        assert_eq!(one(".inf: x\n.nan: z\n"), json!({".inf": "x", ".nan": "z"}));
        assert_eq!(
            one(".Inf: a\n-.INF: b\n.NaN: c\n"),
            json!({".inf": "a", "-.inf": "b", ".nan": "c"})
        );
        assert_eq!(one("+.inf: a\n"), json!({".inf": "a"}));
    }

    #[test]
    fn byte_order_marks_start_documents_or_are_content() {
        let read = documents("\u{feff}a: 1\n---\n\u{feff}b: 2\nc: \u{feff}x\n").unwrap();
        assert_eq!(
            read.documents,
            [json!({"a": 1}), json!({"b": 2, "c": "\u{feff}x"})]
        );
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

    /// `a0` is 127 sequences deep, as deep as a document may nest them
    /// under its root mapping; each `aN` holds an alias of the one before
    /// 126 sequences down. Before aliases counted towards the depth, 80
    /// such lines (10 000 levels, 21 KiB of input) overflowed the stack of
    /// a debug build's `mutate` while the reader cloned the anchors.
    fn aliases_nesting_deeper(levels: usize) -> String {
        let mut yaml = format!("a0: &a0 {}0{}\n", "[".repeat(127), "]".repeat(127));
        for level in 1..=levels {
            let (open, close) = ("[".repeat(126), "]".repeat(126));
            yaml.push_str(&format!(
                "a{level}: &a{level} {open}*a{}{close}\n",
                level - 1
            ));
        }
        yaml
    }

    #[test]
    fn aliases_cannot_nest_past_the_depth_limit() {
        let error = documents(&aliases_nesting_deeper(1)).unwrap_err();
        assert!(
            error.reason.contains("nesting deeper than 128 levels"),
            "{error}"
        );
        // As deep as the limit, through an alias, is read.
        let at_limit = format!("a: &a {}0{}\nb: *a\n", "[".repeat(127), "]".repeat(127));
        let read = documents(&at_limit).unwrap();
        assert_eq!(read.documents[0]["a"], read.documents[0]["b"]);
        let one_more = format!("a: &a {}0{}\nb: [*a]\n", "[".repeat(127), "]".repeat(127));
        assert!(documents(&one_more).is_err());
    }

    #[test]
    fn aliases_cannot_copy_a_long_string_without_limit() {
        // 10 000 copies of a 10 KiB string, 100 MiB, from 10 KiB of input
        // and 11 110 aliased values (well under their limit).
        let mut bomb = format!("s: &s {}\n", "x".repeat(10 * 1024));
        let mut previous = "s".to_owned();
        for level in 1..=4 {
            let items = vec![format!("*{previous}"); 10].join(", ");
            bomb.push_str(&format!("l{level}: &l{level} [{items}]\n"));
            previous = format!("l{level}");
        }
        let error = documents(&bomb).unwrap_err();
        assert!(error.reason.contains("bytes of text"), "{error}");
        // A few copies of a long string are fine.
        let few = format!("s: &s {}\nt: [*s, *s, *s]\n", "x".repeat(1024 * 1024));
        assert_eq!(
            documents(&few).unwrap().documents[0]["t"][2]
                .as_str()
                .map(str::len),
            Some(1024 * 1024)
        );
    }

    #[test]
    fn a_value_is_measured_as_an_alias_copies_it() {
        assert_eq!(
            measure(&json!({"ab": ["cd", 1, []], "e": {}})),
            Size {
                values: 6,
                bytes: 5,
                depth: 3
            }
        );
        assert_eq!(
            measure(&json!("x")),
            Size {
                values: 1,
                bytes: 1,
                depth: 0
            }
        );
    }
}
