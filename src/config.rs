//! The config file: YAML in, a validated [`Policy`] out.
//!
//! Every error names the field (`rules[1].target`) and says why, so a
//! platform engineer can fix the file without reading the source.

use std::collections::HashMap;
use std::path::Path;

use granit_parser::{Event, Options, Parser};
use serde::Deserialize;

use crate::counted::{Budget, Count};
use crate::policy::{Policy, PullSecretSync, Rule};

/// The config file as written.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConfigFile {
    #[serde(default, deserialize_with = "null_as_default")]
    pub rules: Vec<RuleSpec>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub exclude: ExcludeSpec,
    #[serde(default, deserialize_with = "null_as_default")]
    pub pull_secret_sync: PullSecretSyncSpec,
}

/// `rules: null` (or `~`) reads as no rules, as an empty `rules:` does: a
/// Helm or kustomize template that renders an empty list as null must not
/// make the webhook refuse its config.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Copying each rule's `pullSecret` into the namespaces that need it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PullSecretSyncSpec {
    /// Copy missing pull secrets (default true; without API access, off).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Where the source Secrets live (default: the webhook's namespace).
    #[serde(default)]
    pub source_namespace: Option<String>,
    /// How long one admission waits for a missing copy to be created, e.g.
    /// `1s` (default), `500ms`; `0s` never waits.
    #[serde(default)]
    pub wait_for_copy: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleSpec {
    /// A registry host, or host/path-prefix, of the normalized image name.
    #[serde(rename = "match")]
    pub match_prefix: String,
    /// Registry host[:port][/path] that replaces the matched prefix.
    pub target: String,
    #[serde(default)]
    pub pull_secret: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExcludeSpec {
    /// Globs on the normalized name: `*` within a component, `**` across.
    #[serde(default, deserialize_with = "null_as_default")]
    pub images: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub namespaces: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    Read {
        path: String,
        // Not `source`: the message holds it already, and a source would be
        // printed a second time in the CLI's error chain.
        reason: std::io::Error,
    },
    #[error("config is not valid YAML for image-rewriter: {0}")]
    Syntax(String),
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

impl ConfigError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Whether a config file holds no value at all, as the YAML parser reads
/// it (nothing but blanks, comments and document markers, or a bare `~`).
/// Such a file loads as no rules (a fresh ConfigMap), but it does not
/// replace a config in force: a file being rewritten in place that has been
/// truncated and not yet written looks just like it.
fn is_blank(text: &str) -> bool {
    matches!(
        serde_yaml_ng::from_str(without_byte_order_mark(text)),
        Ok(serde_yaml_ng::Value::Null)
    )
}

/// What aliases may copy in one config file, in values and in bytes of
/// text (scalars and keys, as written). serde_yaml_ng bounds how often
/// aliases are expanded, not what they copy: a 100 KB file copying a long
/// string through four levels of ten aliases took 548 MB to parse, past
/// the shipped memory limit, so a reload of it would have killed the
/// server instead of keeping the config in force. No hand-written config
/// comes near these.
const MAX_ALIASED_VALUES: usize = 100_000;
const MAX_ALIASED_BYTES: usize = 16 * 1024 * 1024;

/// Refuses a file that, its aliases expanded, holds more than the file
/// itself plus the limits above, in values and in bytes of text. Counted
/// by walking the file with serde_yaml_ng itself, the parser that expands
/// the aliases afterwards, keeping nothing: another YAML parser may read
/// anchors differently (libyaml ends an anchor's name at a `:`, the YAML
/// 1.2 grammar does not), and a count on its reading missed what this
/// one copies. A file that does not parse is left to the real parse,
/// which names the error.
fn check_alias_copies(text: &str) -> Result<(), ConfigError> {
    use serde::de::DeserializeSeed;

    // Every value written takes at least a byte of the file, so the file's
    // length bounds what it holds unexpanded.
    let budget = Budget::new(
        MAX_ALIASED_VALUES
            .saturating_add(text.len())
            .saturating_add(1),
        MAX_ALIASED_BYTES.saturating_add(text.len()),
    );
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        if Count(&budget).deserialize(document).is_ok() {
            continue;
        }
        if !budget.exceeded() {
            // Not YAML, or past serde_yaml_ng's own limits: the parse that
            // follows names the error.
            return Ok(());
        }
        // Where serde_yaml_ng stopped is inside the anchored value being
        // copied, not at the alias that copies it: no line is named.
        return Err(ConfigError::Syntax(format!(
            "aliases copy more than {MAX_ALIASED_VALUES} values or \
             {MAX_ALIASED_BYTES} bytes of text"
        )));
    }
    Ok(())
}

/// Refuses a file that defines an anchor name twice. YAML lets a later
/// `&name` replace an earlier one, but serde_yaml_ng 0.10 numbers anchors by
/// how many names it has seen, so after a redefinition the next new anchor
/// takes a number already given and an alias reads the wrong value: with
/// `&t one`, `&s two`, `&t three`, `&u four`, `*t` read `four`, and a rule's
/// target came out as another rule's without a word. Read with
/// granit_parser: where it reads a name differently (libyaml ends one at a
/// `:`), it reads a longer one, so it never sees a redefinition that is not
/// there. A file it cannot read (libyaml accepts some it refuses, such as
/// a comment right after a quoted scalar) is scanned for `&name` as text.
fn check_anchor_names(text: &str) -> Result<(), ConfigError> {
    let mut options = Options::default();
    options.emit_anchor_events = true;
    let mut anchors = Vec::new();
    for event in Parser::new_from_str_with_options(text, options) {
        let Ok((event, span)) = event else {
            return first_redefinition(anchor_tokens(text));
        };
        match event {
            // Anchors are a document's own; a config has one document.
            Event::DocumentStart(..) => anchors.clear(),
            Event::Anchor(_, name) => anchors.push((span.start.line(), name.into_owned())),
            _ => {}
        }
    }
    first_redefinition(anchors)
}

fn first_redefinition(anchors: Vec<(usize, String)>) -> Result<(), ConfigError> {
    let mut defined: HashMap<String, usize> = HashMap::new();
    for (line, name) in anchors {
        if let Some(first) = defined.insert(name.clone(), line) {
            return Err(ConfigError::Syntax(format!(
                "anchor &{name} is defined twice (lines {first} and {line}): give each \
                 anchor its own name (the YAML reader resolves an alias of a redefined \
                 anchor to the wrong value)"
            )));
        }
    }
    Ok(())
}

/// `&name` where a node may start (a line's start, or after a blank, `[`,
/// `{` or `,`), named as libyaml names an anchor (`[0-9A-Za-z_-]`), with
/// comments left out: a rough reading, for a file granit_parser cannot
/// read, where a quoted string holding the same `&name` twice reads as a
/// redefinition too.
fn anchor_tokens(text: &str) -> Vec<(usize, String)> {
    let mut anchors = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let mut previous = ' ';
        for (at, c) in line.char_indices() {
            let may_start = previous.is_whitespace() || matches!(previous, '[' | '{' | ',');
            // libyaml also takes a `#` right after a quoted scalar as a comment.
            if c == '#' && (previous.is_whitespace() || matches!(previous, '"' | '\'')) {
                break;
            }
            if c == '&' && may_start {
                let name: String = line[at + 1..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
                    .collect();
                if !name.is_empty() {
                    anchors.push((index + 1, name));
                }
            }
            previous = c;
        }
    }
    anchors
}

/// Editors on Windows start a file with a byte order mark, which the YAML
/// parser misreads in some files (an unindented list).
fn without_byte_order_mark(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

impl ConfigFile {
    /// The file as written, `None` when it holds no value (see
    /// [`is_blank`]): a fresh ConfigMap, or one emptied.
    pub fn parse(text: &str) -> Result<Option<Self>, ConfigError> {
        let text = without_byte_order_mark(text);
        check_anchor_names(text)?;
        check_alias_copies(text)?;
        // An empty document is one serde refuses.
        if is_blank(text) {
            return Ok(None);
        }
        serde_yaml_ng::from_str(text)
            .map(Some)
            .map_err(|e| ConfigError::Syntax(e.to_string()))
    }

    /// The file as written; one with no value has no rules, so a fresh
    /// ConfigMap is valid and rewrites nothing.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        Self::parse(text).map(Option::unwrap_or_default)
    }

    /// Turns the file into a policy, validating every field.
    pub fn into_policy(self, own_namespace: Option<&str>) -> Result<Policy, ConfigError> {
        let rules = self
            .rules
            .into_iter()
            .enumerate()
            .map(|(index, spec)| Rule::new(index, spec))
            .collect::<Result<Vec<_>, _>>()?;
        let sync = self.pull_secret_sync.validate(own_namespace)?;
        Policy::new(rules, &self.exclude, own_namespace, sync)
    }
}

impl PullSecretSyncSpec {
    fn validate(&self, own_namespace: Option<&str>) -> Result<PullSecretSync, ConfigError> {
        let source_namespace = match &self.source_namespace {
            Some(namespace) if !is_dns_label(namespace) => {
                return Err(ConfigError::invalid(
                    "pullSecretSync.sourceNamespace",
                    format!("{namespace:?} is not a valid namespace name"),
                ));
            }
            Some(namespace) => Some(namespace.clone()),
            None => own_namespace.map(str::to_owned),
        };
        let wait_for_copy = match &self.wait_for_copy {
            Some(text) => humantime::parse_duration(text).map_err(|e| {
                ConfigError::invalid("pullSecretSync.waitForCopy", format!("{text:?}: {e}"))
            })?,
            None => PullSecretSync::DEFAULT_WAIT,
        };
        if wait_for_copy > PullSecretSync::MAX_WAIT {
            return Err(ConfigError::invalid(
                "pullSecretSync.waitForCopy",
                format!(
                    "{wait_for_copy:?} is longer than {:?}: the apiserver's webhook timeout must cover it",
                    PullSecretSync::MAX_WAIT
                ),
            ));
        }
        Ok(PullSecretSync {
            enabled: self.enabled.unwrap_or(true),
            source_namespace,
            wait_for_copy,
        })
    }
}

/// Reads, parses and validates a config file.
pub fn load_policy(path: &Path, own_namespace: Option<&str>) -> Result<Policy, ConfigError> {
    ConfigFile::from_yaml(&read_config(path)?)?.into_policy(own_namespace)
}

/// The config file's text.
pub fn read_config(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|reason| ConfigError::Read {
        path: path.display().to_string(),
        reason,
    })
}

/// RFC 1123 subdomain: what Kubernetes accepts as a Secret name.
pub(crate) fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// RFC 1123 label: what Kubernetes accepts as a namespace name.
pub(crate) fn is_dns_label(name: &str) -> bool {
    name.len() <= 63 && !name.contains('.') && is_dns_subdomain(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(yaml: &str) -> String {
        match ConfigFile::from_yaml(yaml).and_then(|c| c.into_policy(None)) {
            Ok(_) => panic!("config was accepted:\n{yaml}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_design_example_loads() {
        let policy = ConfigFile::from_yaml(include_str!("../examples/config.yaml"))
            .unwrap()
            .into_policy(Some("image-rewriter"))
            .unwrap();
        assert!(policy.rules().len() >= 4);
    }

    /// `base` anchored, then `levels` levels of ten aliases of the level
    /// before, and a valid `rules: []` after them.
    fn aliases_of_aliases(base: &str, levels: usize) -> String {
        let mut yaml = format!("x-base: &l0 {base}\n");
        for level in 1..=levels {
            let items = vec![format!("*l{}", level - 1); 10].join(", ");
            yaml.push_str(&format!("x-l{level}: &l{level} [{items}]\n"));
        }
        yaml + "rules: []\n"
    }

    #[test]
    fn aliases_that_copy_too_much_are_refused_before_they_are_expanded() {
        // 100 KB copied 10 000 times, 1 GB: before the check, parsing this
        // file took 548 MB (`check-config`, peak RSS) before refusing the
        // unknown field.
        let long_string = aliases_of_aliases(&"x".repeat(100_000), 4);
        let message = error_of(&long_string);
        assert!(message.contains("aliases copy more than"), "{message}");
        // A thousand empty values copied a thousand times: no text at all.
        let many_values = aliases_of_aliases(&format!("[{}]", vec!["{}"; 1000].join(", ")), 3);
        let message = error_of(&many_values);
        assert!(message.contains("aliases copy more than"), "{message}");
        // Under the limits the same shapes are only refused for the unknown
        // field, so the check was what refused them above.
        for yaml in [
            aliases_of_aliases(&"x".repeat(100_000), 1),
            aliases_of_aliases(&format!("[{}]", vec!["{}"; 1000].join(", ")), 1),
        ] {
            let message = error_of(&yaml);
            assert!(message.contains("unknown field `x-base`"), "{message}");
        }
    }

    /// The limits hold for what serde_yaml_ng expands, however another
    /// YAML parser would read the anchors. Each of these 100 KB files took
    /// over 500 MB (`check-config`, peak RSS) to refuse when the aliases
    /// were counted on granit_parser's reading:
    /// - libyaml ends an anchor's name at a `:`, so `&l0:x` anchors `l0`
    ///   there, where the YAML 1.2 grammar reads an anchor named `l0:x`
    ///   (and `*l0`, an alias of no anchor, ended the count);
    /// - serde_yaml_ng numbers an anchor by how many names it has seen, so
    ///   after a name is anchored twice the next anchor takes the number of
    ///   the second: `*s` copies `x-big`, not the `x` it reads as.
    #[test]
    fn aliases_are_counted_as_the_parser_that_expands_them_reads_them() {
        let base = "x".repeat(100_000);
        let colon = aliases_of_aliases(&base, 4).replacen("&l0 ", "&l0:x ", 1);
        let anchored_twice = format!("x-a: &s x\nx-b: &s x\n{}", aliases_of_aliases(&base, 4))
            .replacen("x-base: &l0 ", "x-big: &t ", 1)
            .replace("*l0", "*s");
        for yaml in [colon, anchored_twice] {
            // The count alone: a file loaded is refused for its redefined
            // anchor before it is counted.
            let message = check_alias_copies(&yaml).unwrap_err().to_string();
            assert!(message.contains("aliases copy more than"), "{message}");
        }
    }

    #[test]
    fn an_anchor_defined_twice_is_refused_by_name() {
        // serde_yaml_ng read `*t` below as "four", so the last rule's target
        // was the fourth rule's.
        let yaml = "\
rules:
  - match: docker.io
    target: &t harbor.corp.example/one
  - match: quay.io
    target: &s harbor.corp.example/two
  - match: ghcr.io
    target: &t harbor.corp.example/three
  - match: gcr.io
    target: &u harbor.corp.example/four
  - match: registry.k8s.io
    target: *t
";
        let message = error_of(yaml);
        assert!(
            message.contains("anchor &t is defined twice (lines 3 and 7)"),
            "{message}"
        );
        // Each name once: the aliases read what they name.
        let renamed = yaml.replace(
            "&t harbor.corp.example/three",
            "&v harbor.corp.example/three",
        );
        let file = ConfigFile::from_yaml(&renamed).unwrap();
        assert_eq!(file.rules[4].target, "harbor.corp.example/one");
        // Where granit_parser cannot read the file (a comment right after a
        // quoted scalar, which libyaml reads), the names are read as text.
        let unreadable = yaml.replace("match: docker.io\n", "match: \"docker.io\"# the Hub\n");
        let message = error_of(&unreadable);
        assert!(
            message.contains("anchor &t is defined twice (lines 3 and 7)"),
            "{message}"
        );
        let unreadable_renamed = renamed.replace(
            "match: docker.io\n",
            "match: \"docker.io\"# the Hub &t &t\n",
        );
        assert_eq!(
            ConfigFile::from_yaml(&unreadable_renamed).unwrap().rules[4].target,
            "harbor.corp.example/one"
        );
        // A name ended by `:` for libyaml is read whole here: no false alarm.
        let colons = "x-a: &a:1 one\nx-b: &a:2 two\nrules: []\n";
        assert!(!error_of(colons).contains("defined twice"), "{colons}");
    }

    #[test]
    fn aliases_that_reuse_values_load() {
        let yaml = "\
rules:
  - match: docker.io
    target: harbor.corp.example/dockerhub
    pullSecret: &secret harbor-pull
  - match: quay.io
    target: harbor.corp.example/quay
    pullSecret: *secret
exclude:
  namespaces: &system [kube-system, kube-public]
";
        let file = ConfigFile::from_yaml(yaml).unwrap();
        assert_eq!(file.rules[1].pull_secret.as_deref(), Some("harbor-pull"));
        file.into_policy(None).unwrap();
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let message = error_of("rules:\n  - match: docker.io\n    targt: harbor.example/x\n");
        assert!(message.contains("targt"), "{message}");
        let message = error_of("rulez: []\n");
        assert!(message.contains("rulez"), "{message}");
    }

    #[test]
    fn invalid_fields_are_named_with_their_index() {
        for (yaml, field) in [
            (
                "rules:\n  - match: docker.io\n    target: Harbor.example/UP\n",
                "rules[0].target",
            ),
            (
                "rules:\n  - match: docker.io\n    target: harbor.example/x:tag\n",
                "rules[0].target",
            ),
            (
                "rules:\n  - match: docker.io\n    target: ''\n",
                "rules[0].target",
            ),
            (
                "rules:\n  - match: library/nginx\n    target: h.example\n",
                "rules[0].match",
            ),
            (
                "rules:\n  - match: docker.io\n    target: h.example\n  - match: docker.io\n    target: i.example\n",
                "rules[1].match",
            ),
            (
                "rules:\n  - match: docker.io\n    target: h.example\n    pullSecret: Bad_Name\n",
                "rules[0].pullSecret",
            ),
            (
                "exclude:\n  images: ['registry.k8s.io/[']\n",
                "exclude.images[0]",
            ),
            (
                "exclude:\n  namespaces: ['Not A Namespace']\n",
                "exclude.namespaces[0]",
            ),
        ] {
            let message = error_of(yaml);
            assert!(
                message.starts_with(field),
                "expected {field} in {message:?}"
            );
        }
    }

    #[test]
    fn null_sections_and_lists_read_as_empty() {
        for yaml in [
            "rules: null\n",
            "rules: ~\n",
            "rules:\n",
            "exclude: null\n",
            "exclude:\n  images: null\n  namespaces: ~\n",
            "pullSecretSync: null\n",
        ] {
            let config = ConfigFile::from_yaml(yaml).unwrap_or_else(|e| panic!("{yaml:?}: {e}"));
            assert_eq!(config, ConfigFile::default(), "{yaml:?}");
        }
    }

    #[test]
    fn a_list_of_the_wrong_type_is_still_refused_by_name() {
        let message = error_of("rules: docker.io\n");
        assert!(message.contains("rules"), "{message}");
        let message = error_of("exclude:\n  images: registry.k8s.io/**\n");
        assert!(message.contains("exclude.images"), "{message}");
    }

    #[test]
    fn blank_means_no_content_at_all() {
        for blank in [
            "",
            "\n  \n",
            "# rules to come\n",
            "---\n# none yet\n...\n",
            "--- # none yet\n",
            "%YAML 1.2\n---\n",
            "\u{feff}",
            "\u{feff}# rules to come\n",
            "~\n",
        ] {
            assert!(is_blank(blank), "{blank:?}");
        }
        for content in [
            "rules: []\n",
            "# header\nrules:\n",
            "{}",
            // Line ends the parser knows and `str::lines` does not.
            "# mirror rules\rrules:\r- match: docker.io\r  target: h.example/x\r",
            "# mirror rules\u{85}rules: []",
        ] {
            assert!(!is_blank(content), "{content:?}");
        }
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_config() {
        let yaml = "rules:\n- match: docker.io\n  target: h.example/x\n";
        let with_mark = format!("\u{feff}{yaml}");
        assert_eq!(
            ConfigFile::from_yaml(&with_mark).unwrap(),
            ConfigFile::from_yaml(yaml).unwrap()
        );
    }

    #[test]
    fn an_empty_file_rewrites_nothing() {
        let policy = ConfigFile::from_yaml("")
            .unwrap()
            .into_policy(None)
            .unwrap();
        assert!(policy.rules().is_empty());
    }
}
