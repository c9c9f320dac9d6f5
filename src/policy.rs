//! Which images move where: rule matching and the rewrite decision.
//!
//! Pure: no I/O. Matching is by hash lookup of each component-boundary prefix
//! of the normalized name, so its cost grows with the number of path
//! components, not with the number of rules.

use std::collections::{BTreeSet, HashMap};
use std::sync::RwLock;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use crate::config::{ConfigError, ExcludeSpec, RuleSpec, is_dns_label, is_dns_subdomain};
use crate::image::{self, Reference, ReferenceError};

/// Namespaces that are never touched, whatever the config says: the control
/// plane's own, where a broken webhook must never block anything.
pub const ALWAYS_EXCLUDED_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// Validated `pullSecretSync` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullSecretSync {
    pub enabled: bool,
    /// `None` only when the webhook's own namespace is unknown (offline).
    pub source_namespace: Option<String>,
    pub wait_for_copy: std::time::Duration,
}

impl PullSecretSync {
    pub const DEFAULT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
    /// Well inside the shipped webhook `timeoutSeconds`.
    pub const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
}

/// One validated rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The `match` text with the legacy Docker Hub host canonicalized.
    pub match_prefix: String,
    /// The `target` text with the legacy Docker Hub host canonicalized.
    pub target: String,
    pub pull_secret: Option<String>,
}

impl Rule {
    pub(crate) fn new(index: usize, spec: RuleSpec) -> Result<Self, ConfigError> {
        let field = |name: &str| format!("rules[{index}].{name}");
        let match_prefix = normalize_prefix(&spec.match_prefix)
            .map_err(|reason| ConfigError::invalid(field("match"), reason))?;
        let target = normalize_prefix(&spec.target)
            .map_err(|reason| ConfigError::invalid(field("target"), reason))?;
        if let Some(secret) = &spec.pull_secret
            && !is_dns_subdomain(secret)
        {
            return Err(ConfigError::invalid(
                field("pullSecret"),
                format!("{secret:?} is not a valid Secret name (lower case RFC 1123 subdomain)"),
            ));
        }
        Ok(Self {
            match_prefix,
            target,
            pull_secret: spec.pull_secret,
        })
    }
}

/// Validates `host[:port][/path]` and canonicalizes the Docker Hub host.
fn normalize_prefix(text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Err("must not be empty; expected a registry host[:port][/path]".into());
    }
    let (host, path) = match text.split_once('/') {
        Some((host, path)) => (host, Some(path)),
        None => (text, None),
    };
    if let Some((scheme, _)) = text.split_once("://")
        && !scheme.contains('/')
    {
        return Err(format!(
            "{text:?} is a URL: an image reference has no scheme; write it without {scheme:?}://"
        ));
    }
    if !image::looks_like_domain(host) {
        return Err(format!(
            "{text:?} must start with a registry host (a name with a '.' or a ':port', or \
             localhost); {host:?} would be read as a Docker Hub namespace"
        ));
    }
    if !image::is_valid_domain(host) {
        return Err(format!(
            "{host:?} is not a valid registry host: DNS labels of letters, digits and '-' \
             joined by '.', or an IPv6 address in brackets, then an optional ':port'"
        ));
    }
    // The reference grammar takes any run of digits as a port; no registry
    // listens on one outside 1-65535, so every pull of such a rule would fail.
    if let Some(port) = port_of(host)
        && !port.parse::<u16>().is_ok_and(|port| port > 0)
    {
        return Err(format!(
            "{host:?} has port {port}, which is not a TCP port (1-65535)"
        ));
    }
    if let Some(path) = path
        && let Some(bad) = path
            .split('/')
            .find(|component| !image::is_valid_path_component(component))
    {
        return Err(format!(
            "{text:?} has an invalid path component {bad:?}: components are lower case \
             letters and digits separated by '.', '_', '__' or '-' (no tag, no digest)"
        ));
    }
    // No image name has a longer path, so a match this long matches nothing
    // and no image moved under a target this long is valid.
    if let Some(path) = path
        && path.len() > image::MAX_PATH_LENGTH
    {
        return Err(format!(
            "{text:?} has a path of {} characters after its host, more than the {} an image \
             name may have, so this rule would never rewrite anything",
            path.len(),
            image::MAX_PATH_LENGTH
        ));
    }
    Ok(with_canonical_host(text))
}

/// The port of a valid registry host, as written.
fn port_of(host: &str) -> Option<&str> {
    let after_address = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split_once(']').map_or("", |(_, rest)| rest),
        None => host,
    };
    after_address.split_once(':').map(|(_, port)| port)
}

/// What the policy decides for one image, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<'p> {
    /// Move the image: `image` is the new reference, tag and digest as written.
    Rewrite { image: String, rule: &'p Rule },
    /// Already under this rule's target: leave it, but its pull secret applies.
    AlreadyUnderTarget { rule: &'p Rule },
    /// Matched by `exclude.images`, and under no rule's target.
    Excluded,
    /// No rule matches its registry.
    NoMatchingRule,
    /// Not an image reference; left as written.
    Unparsable(ReferenceError),
    /// The rewritten reference would be invalid (or pulled from elsewhere).
    InvalidResult { rule: &'p Rule, reason: String },
}

impl<'p> Decision<'p> {
    /// The rule whose pull secret the pod needs for this image.
    pub fn rule(&self) -> Option<&'p Rule> {
        match self {
            Self::Rewrite { rule, .. } | Self::AlreadyUnderTarget { rule } => Some(rule),
            _ => None,
        }
    }

    /// The rule that matched the image, also when its rewrite was refused
    /// (whose pull secret the pod then does not need).
    pub fn matched_rule(&self) -> Option<&'p Rule> {
        match self {
            Self::InvalidResult { rule, .. } => Some(rule),
            _ => self.rule(),
        }
    }

    /// A short machine-readable reason, as `rewrite --output json` prints it.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Rewrite { .. } => "rewritten",
            Self::AlreadyUnderTarget { .. } => "already-under-target",
            Self::Excluded => "excluded",
            Self::NoMatchingRule => "no-matching-rule",
            Self::Unparsable(_) => "unparsable",
            Self::InvalidResult { .. } => "invalid-result",
        }
    }
}

/// Rule numbers by prefix.
type RuleIndex = HashMap<String, usize, foldhash::fast::RandomState>;

/// The validated config, ready to answer per image and per namespace.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Rule>,
    rule_by_match: RuleIndex,
    rule_by_target: RuleIndex,
    excluded_images: GlobSet,
    excluded_namespaces: BTreeSet<String>,
    pull_secret_sync: PullSecretSync,
    memo: DecisionMemo,
}

impl Policy {
    pub(crate) fn new(
        rules: Vec<Rule>,
        exclude: &ExcludeSpec,
        own_namespace: Option<&str>,
        pull_secret_sync: PullSecretSync,
    ) -> Result<Self, ConfigError> {
        let mut rule_by_match =
            RuleIndex::with_capacity_and_hasher(rules.len(), Default::default());
        let mut rule_by_target =
            RuleIndex::with_capacity_and_hasher(rules.len(), Default::default());
        for (index, rule) in rules.iter().enumerate() {
            if let Some(first) = rule_by_match.insert(rule.match_prefix.clone(), index) {
                return Err(ConfigError::invalid(
                    format!("rules[{index}].match"),
                    format!(
                        "{:?} is already the match of rules[{first}]; each match may appear once",
                        rule.match_prefix
                    ),
                ));
            }
            rule_by_target.entry(rule.target.clone()).or_insert(index);
        }
        // An image found under a target is given that target's pull secret on
        // reinvocation; where targets coincide or nest, its provenance is
        // ambiguous, so they must agree on the secret.
        for (index, rule) in rules.iter().enumerate() {
            let mut end = rule.target.len();
            loop {
                let prefix = &rule.target[..end];
                if let Some(&other) = rule_by_target.get(prefix)
                    && other != index
                    && rules[other].pull_secret != rule.pull_secret
                {
                    return Err(ConfigError::invalid(
                        format!("rules[{index}].pullSecret"),
                        format!(
                            "target {:?} lies under (or is) target {prefix:?} of rules[{other}], \
                             which has {}: an image already there could have come from either \
                             rule, so they must use the same pullSecret",
                            rule.target,
                            match &rules[other].pull_secret {
                                Some(secret) => format!("pullSecret {secret:?}"),
                                None => "no pullSecret".to_owned(),
                            }
                        ),
                    ));
                }
                match prefix.rfind('/') {
                    Some(slash) => end = slash,
                    None => break,
                }
            }
            if let Some((other, _)) = longest_prefix(&rule_by_target, &rule.match_prefix) {
                return Err(ConfigError::invalid(
                    format!("rules[{index}].match"),
                    format!(
                        "{:?} lies under target {:?} of rules[{other}]: every image it matches \
                         counts as already moved, so this rule would never rewrite anything",
                        rule.match_prefix, rules[other].target
                    ),
                ));
            }
        }

        let mut globs = GlobSetBuilder::new();
        for (index, pattern) in exclude.images.iter().enumerate() {
            if let Some(bad) = character_no_name_holds(pattern) {
                return Err(ConfigError::invalid(
                    format!("exclude.images[{index}]"),
                    format!(
                        "{pattern:?} has {bad:?} where no image name can, so it would never \
                         match: the globs know only `*` (within one path component) and `**` \
                         (across them), and take every other character literally"
                    ),
                ));
            }
            if let Some(reason) = shape_no_name_has(pattern) {
                return Err(ConfigError::invalid(
                    format!("exclude.images[{index}]"),
                    reason,
                ));
            }
            let glob = GlobBuilder::new(&star_only_glob(&with_canonical_host(pattern)))
                .literal_separator(true)
                .build()
                .map_err(|e| {
                    ConfigError::invalid(format!("exclude.images[{index}]"), e.to_string())
                })?;
            globs.add(glob);
        }
        let excluded_images = globs
            .build()
            .map_err(|e| ConfigError::invalid("exclude.images", e.to_string()))?;

        let mut excluded_namespaces: BTreeSet<String> = ALWAYS_EXCLUDED_NAMESPACES
            .iter()
            .map(|ns| (*ns).to_owned())
            .collect();
        for (index, namespace) in exclude.namespaces.iter().enumerate() {
            if !is_dns_label(namespace) {
                return Err(ConfigError::invalid(
                    format!("exclude.namespaces[{index}]"),
                    format!("{namespace:?} is not a valid namespace name"),
                ));
            }
            excluded_namespaces.insert(namespace.clone());
        }
        excluded_namespaces.extend(own_namespace.map(str::to_owned));

        Ok(Self {
            rules,
            rule_by_match,
            rule_by_target,
            excluded_images,
            excluded_namespaces,
            pull_secret_sync,
            memo: DecisionMemo::default(),
        })
    }

    pub fn pull_secret_sync(&self) -> &PullSecretSync {
        &self.pull_secret_sync
    }

    /// Every distinct `pullSecret` the rules name, sorted.
    pub fn pull_secret_names(&self) -> BTreeSet<String> {
        self.rules
            .iter()
            .filter_map(|rule| rule.pull_secret.clone())
            .collect()
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// What a valid config does that its author may not expect: a rule's
    /// `target` under another rule's `match` leaves that part of the match
    /// to the first rule, as images there count as already moved. (Under
    /// its own match it is the usual mirror on the same registry.)
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        for (index, rule) in self.rules.iter().enumerate() {
            if let Some((other, _)) = longest_prefix(&self.rule_by_match, &rule.target)
                && other != index
            {
                let shadowing = &self.rules[other];
                warnings.push(format!(
                    "rules[{index}].target {:?} lies under rules[{other}].match {:?}: images \
                     there count as already moved by rules[{index}], so rules[{other}] never \
                     moves them to {:?}",
                    rule.target, shadowing.match_prefix, shadowing.target
                ));
            }
        }
        warnings
    }

    /// Namespaces never touched: the always-excluded ones, the webhook's
    /// own, and the config's.
    pub fn excluded_namespaces(&self) -> impl Iterator<Item = &str> {
        self.excluded_namespaces.iter().map(String::as_str)
    }

    pub fn excludes_namespace(&self, namespace: &str) -> bool {
        self.excluded_namespaces.contains(namespace)
    }

    /// Decides what to do with one image reference as written in a pod.
    ///
    /// The decisions to move or leave an image are remembered, per image
    /// text, for the life of this policy: a rollout sends the same few
    /// images in every pod, and recalling a decision costs a hash lookup
    /// instead of a parse.
    pub fn decide(&self, image: &str) -> Decision<'_> {
        if image.len() > DecisionMemo::MAX_KEY_LENGTH {
            return self.decide_afresh(image);
        }
        if let Some(decision) = self.memo.recall(image, &self.rules) {
            return decision;
        }
        let (decision, rule) = self.decide_afresh_numbered(image);
        if let Some(remembered) = Remembered::of(&decision, rule) {
            self.memo.remember(image, remembered);
        }
        decision
    }

    /// [`Policy::decide`] without the memo: parse, match and rewrite, what
    /// an image costs the first time it is seen (which then also pays a
    /// failed lookup and the insert).
    pub fn decide_afresh(&self, image: &str) -> Decision<'_> {
        self.decide_afresh_numbered(image).0
    }

    /// The decision, and the number of the rule it names (if it names one).
    fn decide_afresh_numbered(&self, image: &str) -> (Decision<'_>, Option<usize>) {
        let reference = match Reference::parse_normalized(image) {
            Ok(reference) => reference,
            Err(error) => return (Decision::Unparsable(error), None),
        };
        let name = reference.name();
        // Before the exclusions: an image under a target is not rewritten
        // either way, but only this answer ensures its rule's pullSecret.
        if let Some((index, _)) = longest_prefix(&self.rule_by_target, name) {
            let rule = &self.rules[index];
            return (Decision::AlreadyUnderTarget { rule }, Some(index));
        }
        if self.excluded_images.is_match(name) {
            return (Decision::Excluded, None);
        }
        let Some((index, rest)) = longest_prefix(&self.rule_by_match, name) else {
            return (Decision::NoMatchingRule, None);
        };
        let rule = &self.rules[index];
        let decision = match rewritten(&rule.target, rest, reference.tag_and_digest()) {
            Ok(image) => Decision::Rewrite { image, rule },
            Err(reason) => Decision::InvalidResult { rule, reason },
        };
        (decision, Some(index))
    }
}

/// A decision as the memo keeps it: rules by number, so it does not borrow
/// the policy that owns it.
enum Remembered {
    Rewrite { image: Box<str>, rule: usize },
    AlreadyUnderTarget { rule: usize },
    Excluded,
    NoMatchingRule,
}

impl Remembered {
    /// What is kept of `decision` (made with rule number `rule`): nothing
    /// for an unparsable image or an invalid result, which are rare and
    /// whose reasons are worth rebuilding rather than storing.
    fn of(decision: &Decision<'_>, rule: Option<usize>) -> Option<Self> {
        Some(match decision {
            Decision::Rewrite { image, .. } => Self::Rewrite {
                image: image.as_str().into(),
                rule: rule?,
            },
            Decision::AlreadyUnderTarget { .. } => Self::AlreadyUnderTarget { rule: rule? },
            Decision::Excluded => Self::Excluded,
            Decision::NoMatchingRule => Self::NoMatchingRule,
            Decision::Unparsable(_) | Decision::InvalidResult { .. } => return None,
        })
    }

    /// The decision again, with its rule looked up in `rules`.
    fn decision<'p>(&self, rules: &'p [Rule]) -> Option<Decision<'p>> {
        Some(match self {
            Self::Rewrite { image, rule } => Decision::Rewrite {
                image: image.to_string(),
                rule: rules.get(*rule)?,
            },
            Self::AlreadyUnderTarget { rule } => Decision::AlreadyUnderTarget {
                rule: rules.get(*rule)?,
            },
            Self::Excluded => Decision::Excluded,
            Self::NoMatchingRule => Decision::NoMatchingRule,
        })
    }
}

/// Decisions by image text, bounded in entries and key length so that pods
/// naming endless distinct images cannot grow it without limit: when full
/// it is emptied and fills again with the images still in use. By those
/// limits an entry takes at most ~1.1 KiB plus the length of a rule's
/// target (a 512-byte key; a rewritten reference of the target, a path of
/// at most 255 bytes, a tag and a digest), so with targets of ordinary
/// length a memo holds ~4.5 MiB at most (estimated from the limits, not
/// measured).
#[derive(Default)]
struct DecisionMemo {
    entries: RwLock<MemoEntries>,
}

type MemoEntries = HashMap<Box<str>, Remembered, foldhash::fast::RandomState>;

impl DecisionMemo {
    const CAPACITY: usize = 4096;
    /// Longer images are decided afresh each time (real ones are far shorter).
    const MAX_KEY_LENGTH: usize = 512;

    fn recall<'p>(&self, image: &str, rules: &'p [Rule]) -> Option<Decision<'p>> {
        self.read().get(image)?.decision(rules)
    }

    fn remember(&self, image: &str, remembered: Remembered) {
        let mut entries = self.write();
        if entries.len() >= Self::CAPACITY {
            entries.clear();
        }
        entries.insert(image.into(), remembered);
    }

    fn len(&self) -> usize {
        self.read().len()
    }

    // The map is only ever changed by `clear` and `insert`, which cannot
    // leave it half-written, so a lock poisoned by a panic elsewhere still
    // guards good entries.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, MemoEntries> {
        crate::unwind::read(&self.entries)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, MemoEntries> {
        crate::unwind::write(&self.entries)
    }
}

/// A copied policy starts with an empty memo (it is only a cache).
impl Clone for DecisionMemo {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// The entry count only: the policy's `Debug` should not list thousands
/// of images.
impl std::fmt::Debug for DecisionMemo {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("DecisionMemo")
            .field("entries", &self.len())
            .finish()
    }
}

/// The first character of an `exclude.images` pattern that no normalized
/// name holds where it stands: in the registry host (the first component)
/// letters, digits, `.`, `-`, `:` and the brackets of an IPv6 address; in
/// the path lower-case letters, digits, `.`, `_`, `-` and `/`; `*` anywhere. Other
/// glob syntax (`?`, `{a,b}`, `[a-z]` in a path, `\`) lands here, and is
/// refused rather than silently never matching.
fn character_no_name_holds(pattern: &str) -> Option<char> {
    let (host, path) = pattern.split_once('/').unwrap_or((pattern, ""));
    let in_host =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']' | '*');
    let in_path = |c: char| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | '/' | '*')
    };
    host.chars()
        .find(|&c| !in_host(c))
        .or_else(|| path.chars().find(|&c| !in_path(c)))
}

/// Why a pattern of characters names do hold still could never match a
/// normalized name, with what to write instead: the name always starts with
/// a registry host, has a path after it, and on Docker Hub a namespace
/// (`library/` for official images) before the repository.
fn shape_no_name_has(pattern: &str) -> Option<String> {
    let (host, path) = pattern.split_once('/').unwrap_or((pattern, ""));
    if host.is_empty() {
        return Some(format!(
            "{pattern:?} would never match: the globs apply to the normalized name, which \
             starts with its registry host (`nginx` is `docker.io/library/nginx`)"
        ));
    }
    if !host.contains('*') && !image::looks_like_domain(host) {
        let docker_hub = if pattern.contains('/') {
            format!("docker.io/{pattern}")
        } else {
            format!("docker.io/library/{pattern}")
        };
        return Some(format!(
            "{pattern:?} would never match: the globs apply to the normalized name, which \
             starts with its registry host ({host:?} is none: `nginx` is \
             `docker.io/library/nginx`); for Docker Hub write {docker_hub:?}"
        ));
    }
    if !host.contains('*') && !image::is_valid_domain(host) {
        let advice = match pattern.split_once(':') {
            // `nginx:1.27`: a tag, not a port.
            Some((name, _)) if !pattern.contains('/') => format!(
                "; the globs match the name without tag or digest: write {:?}",
                if image::looks_like_domain(name) {
                    format!("{name}/**")
                } else {
                    format!("docker.io/library/{name}")
                }
            ),
            _ => String::new(),
        };
        return Some(format!(
            "{pattern:?} would never match: {host:?} is not a registry host (letters, digits, \
             '.' and '-', then an optional ':port' of digits){advice}"
        ));
    }
    if pattern.contains('/')
        && let Some(bad) = path.split('/').find(|component| {
            component.is_empty()
                || !component.contains('*') && !image::is_valid_path_component(component)
        })
    {
        return Some(format!(
            "{pattern:?} would never match: {bad:?} is no path component of an image name \
             (lower-case letters and digits separated by '.', '_', '__' or '-'; none empty)"
        ));
    }
    // Under `literal_separator`, `**` crosses `/` only as a whole component;
    // elsewhere it is `*`.
    if !pattern.contains('/') && pattern != "**" {
        return Some(format!(
            "{pattern:?} would never match: a normalized name has a path after its registry \
             host, `*` stops at `/`, and the globs match the name without tag or digest; for \
             every image under it write \"{pattern}/**\""
        ));
    }
    if image::canonical_domain(host) == image::DOCKER_HUB && !path.contains('/') && path != "**" {
        let advice = if path == "library" {
            "\"docker.io/library/*\" for every official image".to_owned()
        } else if path.contains('*') {
            format!("\"docker.io/library/{path}\"")
        } else {
            format!(
                "\"docker.io/library/{path}\" for the official image, or \"docker.io/{path}/*\" \
                 for the images of the {path:?} namespace"
            )
        };
        return Some(format!(
            "{pattern:?} would never match: on Docker Hub a normalized name has a namespace \
             before the repository (`nginx` is `docker.io/library/nginx`); write {advice}"
        ));
    }
    None
}

/// `index.docker.io[/...]` as `docker.io[/...]`, the host normalized names
/// have: for a rule's `match` and `target` and an `exclude.images` pattern.
fn with_canonical_host(text: &str) -> String {
    match text.split_once('/') {
        Some((host, path)) => format!("{}/{path}", image::canonical_domain(host)),
        None => image::canonical_domain(text).to_owned(),
    }
}

/// `pattern` in globset's syntax with every character but `*` literal: the
/// config's globs have `*` and `**` only, and a registry host can hold
/// globset's metacharacters (`[fd00::1]:5000` is an IPv6 host, not a class).
fn star_only_glob(pattern: &str) -> String {
    let mut glob = String::with_capacity(pattern.len() + 8);
    for (index, literal) in pattern.split('*').enumerate() {
        if index > 0 {
            glob.push('*');
        }
        glob.push_str(&globset::escape(literal));
    }
    glob
}

/// `target` + `rest` (the new name) with tag and digest as written, checked
/// to be valid and to be pulled from exactly that name. No re-parse is
/// needed: the target was validated at load time and `rest` comes from a
/// parsed reference, so only the length and the Docker Hub `library/` rule
/// can break the result.
fn rewritten(target: &str, rest: &str, tag_and_digest: &str) -> Result<String, String> {
    let mut text = String::with_capacity(target.len() + rest.len() + tag_and_digest.len());
    text.push_str(target);
    text.push_str(rest);
    let Some((domain, path)) = text.split_once('/') else {
        return Err(format!(
            "the rewritten name {text:?} has no repository path"
        ));
    };
    if path.len() > image::MAX_PATH_LENGTH {
        return Err(format!(
            "the rewritten repository path would be {} characters, more than {}",
            path.len(),
            image::MAX_PATH_LENGTH
        ));
    }
    if domain == image::DOCKER_HUB && !path.contains('/') {
        return Err(format!(
            "{text:?} would be pulled as \"docker.io/library/{path}\", not from the target"
        ));
    }
    text.push_str(tag_and_digest);
    Ok(text)
}

/// The entry whose key is the longest prefix of `name` ending on a path
/// component boundary, and the rest of `name` after it.
fn longest_prefix<'n>(keys: &RuleIndex, name: &'n str) -> Option<(usize, &'n str)> {
    let mut end = name.len();
    loop {
        let (prefix, rest) = name.split_at(end);
        if let Some(&index) = keys.get(prefix) {
            return Some((index, rest));
        }
        end = prefix.rfind('/')?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigFile;

    const DESIGN_CONFIG: &str = r#"
rules:
  - match: docker.io
    target: harbor.corp.example/dockerhub
    pullSecret: harbor-pull
  - match: docker.io/library
    target: 10.0.0.5:8443
  - match: quay.io
    target: harbor.corp.example/quay
    pullSecret: harbor-pull
  - match: localhost:5000
    target: harbor.corp.example/local
exclude:
  images: ["registry.k8s.io/**", "docker.io/bitnami/*"]
  namespaces: [kube-system]
"#;

    fn policy(yaml: &str) -> Policy {
        ConfigFile::from_yaml(yaml)
            .unwrap()
            .into_policy(Some("image-rewriter"))
            .unwrap()
    }

    /// What loading `yaml` (without an own namespace) gives.
    fn load(yaml: &str) -> Result<Policy, ConfigError> {
        ConfigFile::from_yaml(yaml).unwrap().into_policy(None)
    }

    /// The message a refused `yaml` gets.
    fn refusal(yaml: &str) -> String {
        load(yaml).unwrap_err().to_string()
    }

    fn outcome(policy: &Policy, image: &str) -> (String, Option<String>) {
        match policy.decide(image) {
            Decision::Rewrite { image, rule } => {
                // What the runtime pulls is exactly the rewritten reference.
                let pulled = Reference::parse_normalized(&image).unwrap();
                assert_eq!(pulled.to_string(), image);
                (image, rule.pull_secret.clone())
            }
            Decision::AlreadyUnderTarget { rule } => (image.to_owned(), rule.pull_secret.clone()),
            _ => (image.to_owned(), None),
        }
    }

    /// Only a target under another rule's match is worth a warning: one
    /// under its own match (a mirror on the same registry), or a config
    /// with disjoint matches and targets, is not.
    #[test]
    fn a_target_under_another_rules_match_is_warned_of() {
        assert!(policy(DESIGN_CONFIG).warnings().is_empty());
        let own = policy(
            "rules:\n  - match: registry.corp.example\n    \
             target: registry.corp.example/mirror\n",
        );
        assert!(own.warnings().is_empty(), "{:?}", own.warnings());
        let shadowed = policy(
            "rules:\n  - match: docker.io\n    target: harbor.corp.example/dockerhub/cache\n  \
             - match: harbor.corp.example\n    target: harbor-new.corp.example/a\n  \
             - match: harbor.corp.example/dockerhub\n    target: harbor-new.corp.example/b\n",
        );
        // The longest match covering the target is the one named.
        assert_eq!(
            shadowed.warnings(),
            [
                "rules[0].target \"harbor.corp.example/dockerhub/cache\" lies under rules[2].match \
              \"harbor.corp.example/dockerhub\": images there count as already moved by \
              rules[0], so rules[2] never moves them to \"harbor-new.corp.example/b\""
            ]
        );
    }

    #[test]
    fn a_host_that_is_not_one_is_refused_with_the_reason() {
        let refusal_of = |target: &str| {
            refusal(&format!(
                "rules:\n  - match: docker.io\n    target: {target:?}\n"
            ))
        };
        for (target, reason) in [
            ("harbor/x", "would be read as a Docker Hub namespace"),
            ("https://harbor.example/x", "is a URL"),
            ("h.example/a://b", "has an invalid path component \"a:\""),
            ("bad..host/x", "\"bad..host\" is not a valid registry host"),
            ("harbor_x.example/x", "is not a valid registry host"),
            ("h.example:84433/x", "port 84433, which is not a TCP port"),
            ("h.example:0/x", "port 0, which is not a TCP port"),
            ("[fd00::1]:70000/x", "port 70000, which is not a TCP port"),
        ] {
            let refused = refusal_of(target);
            assert!(
                refused.starts_with("rules[0].target: ") && refused.contains(reason),
                "{target}: {refused}"
            );
        }
        for target in [
            "h.example:65535/x",
            "[fd00::1]:5000/x",
            "[fd00::1]/x",
            "localhost:1",
        ] {
            load(&format!(
                "rules:\n  - match: docker.io\n    target: {target:?}\n"
            ))
            .unwrap_or_else(|error| panic!("{target}: {error}"));
        }
        let refused = refusal("rules:\n  - match: quay.io:99999\n    target: h.example/q\n");
        assert!(refused.starts_with("rules[0].match: "), "{refused}");
    }

    #[test]
    fn longest_match_wins_on_component_boundaries() {
        let policy = policy(DESIGN_CONFIG);
        let digest = format!("sha256:{}", "0".repeat(64));
        for (input, expected) in [
            ("nginx", "10.0.0.5:8443/nginx"),
            ("library/nginx:1.27", "10.0.0.5:8443/nginx:1.27"),
            (
                "docker.io/libraryx/app",
                "harbor.corp.example/dockerhub/libraryx/app",
            ),
            ("user/app:v1", "harbor.corp.example/dockerhub/user/app:v1"),
            (
                "quay.io/prometheus/node-exporter",
                "harbor.corp.example/quay/prometheus/node-exporter",
            ),
            ("localhost:5000/x", "harbor.corp.example/local/x"),
            ("localhost:50001/x", "localhost:50001/x"),
            ("DOCKER.IO/x", "DOCKER.IO/x"),
            ("quay.io.evil.example/x", "quay.io.evil.example/x"),
        ] {
            assert_eq!(outcome(&policy, input).0, expected, "{input}");
        }
        let pinned = format!("quay.io/org/app:1.0@{digest}");
        assert_eq!(
            outcome(&policy, &pinned).0,
            format!("harbor.corp.example/quay/org/app:1.0@{digest}")
        );
    }

    #[test]
    fn images_under_a_target_are_never_rewritten_again() {
        let policy = policy(
            "rules:\n  - match: docker.io\n    target: docker.io/mycorp-mirror\n    pullSecret: hub\n",
        );
        let once = outcome(&policy, "nginx:1");
        assert_eq!(
            once,
            (
                "docker.io/mycorp-mirror/library/nginx:1".into(),
                Some("hub".into())
            )
        );
        assert_eq!(outcome(&policy, &once.0), once);
        assert!(matches!(
            policy.decide("mycorp-mirror/app"),
            Decision::AlreadyUnderTarget { .. }
        ));
    }

    #[test]
    fn exclusions_and_unparsable_images_are_left_alone() {
        let policy = policy(DESIGN_CONFIG);
        assert_eq!(
            policy.decide("registry.k8s.io/pause:3.9"),
            Decision::Excluded
        );
        assert_eq!(policy.decide("bitnami/redis"), Decision::Excluded);
        assert!(matches!(
            policy.decide("bitnami/redis/x"),
            Decision::Rewrite { .. }
        ));
        assert!(matches!(policy.decide("NGINX"), Decision::Unparsable(_)));
        assert!(matches!(policy.decide(""), Decision::Unparsable(_)));
        assert_eq!(policy.decide("gcr.io/x"), Decision::NoMatchingRule);
    }

    #[test]
    fn exclude_globs_take_an_ipv6_host_literally() {
        let policy = policy(
            r#"
rules:
  - match: "[fd00::1]:5000"
    target: harbor.corp.example/v6
  - match: "d:5000"
    target: harbor.corp.example/d
exclude:
  images: ["[fd00::1]:5000/**"]
"#,
        );
        assert_eq!(
            policy.decide("[fd00::1]:5000/team/app:1"),
            Decision::Excluded
        );
        assert_eq!(
            outcome(&policy, "d:5000/team/app").0,
            "harbor.corp.example/d/team/app"
        );
    }

    #[test]
    fn exclude_globs_with_any_other_glob_syntax_are_refused() {
        for pattern in [
            "quay.io/app?",
            "quay.io/{tools,infra}/*",
            "quay.io/[a-c]pp",
            "quay.io/[!x]pp",
            "quay.io/one\\\\/*",
            "registry.k8s.io/[",
            "quay.io/a b",
            "quay.io/MyOrg/*",
            "{quay,ghcr}.io/**",
        ] {
            let yaml = format!("exclude:\n  images: [\"quay.io/**\", \"{pattern}\"]\n");
            let refused = refusal(&yaml);
            assert!(
                refused.starts_with("exclude.images[1]") && refused.contains("never match"),
                "{pattern}: {refused}"
            );
        }
    }

    #[test]
    fn exclude_globs_that_no_normalized_name_has_the_shape_of_are_refused() {
        for (pattern, advice) in [
            ("nginx", "\"docker.io/library/nginx\""),
            ("library/nginx", "\"docker.io/library/nginx\""),
            ("bitnami/*", "\"docker.io/bitnami/*\""),
            ("5", "\"docker.io/library/5\""),
            ("quay.io", "\"quay.io/**\""),
            ("*", "\"*/**\""),
            ("quay.io*", "\"quay.io*/**\""),
            ("quay.io**", "\"quay.io**/**\""),
            (
                "nginx:1.27",
                "without tag or digest: write \"docker.io/library/nginx\"",
            ),
            ("/x", "starts with its registry host"),
            (
                "docker.io/nginx",
                "write \"docker.io/library/nginx\" for the official image, or \"docker.io/nginx/*\"",
            ),
            (
                "docker.io/library",
                "write \"docker.io/library/*\" for every official image",
            ),
            ("index.docker.io/*", "\"docker.io/library/*\""),
            ("nginx:latest", "\"docker.io/library/nginx\""),
            ("registry.example:5000:1/**", "is not a registry host"),
            ("quay..io/**", "is not a registry host"),
            ("quay.io/", "\"\" is no path component"),
            ("quay.io//**", "\"\" is no path component"),
            ("quay.io/x/", "\"\" is no path component"),
            ("docker.io/", "\"\" is no path component"),
            ("quay.io/-x/**", "\"-x\" is no path component"),
            ("quay.io/a..b", "\"a..b\" is no path component"),
        ] {
            let yaml = format!("exclude:\n  images: [\"quay.io/**\", \"{pattern}\"]\n");
            let refused = refusal(&yaml);
            assert!(
                refused.starts_with("exclude.images[1]")
                    && refused.contains("would never match")
                    && refused.contains(advice),
                "{pattern}: {refused}"
            );
        }
        let policy = policy(
            r#"
rules:
  - match: docker.io
    target: harbor.corp.example/hub
  - match: MIRROR
    target: harbor.corp.example/mirror
exclude:
  images: ["index.docker.io/library/nginx", "**/keep", "MIRROR/**", "*/team/**"]
"#,
        );
        for excluded in [
            "nginx:1.27",
            "ghcr.io/org/keep",
            "MIRROR/x",
            "quay.io/team/a/b",
        ] {
            assert_eq!(policy.decide(excluded), Decision::Excluded, "{excluded}");
        }
        assert!(matches!(policy.decide("redis"), Decision::Rewrite { .. }));
        for accepted in [
            "**",
            "docker.io/**",
            "docker.io/library/*",
            "*:5000/**",
            "[fd00::1]:5000/**",
            "localhost/**",
            "LOCALHOST/**",
            "Docker.io/x",
            "quay.io/a__b/c-d.e/**",
            "quay.io/*x*/**",
        ] {
            let yaml = format!("exclude:\n  images: [\"{accepted}\"]\n");
            let loaded = load(&yaml);
            assert!(loaded.is_ok(), "{accepted}: {:?}", loaded.err());
        }
    }

    #[test]
    fn one_star_stays_within_a_component_and_two_cross_them() {
        let policy = policy(
            r#"
rules:
  - match: quay.io
    target: harbor.corp.example/quay
exclude:
  images: ["quay.io/*/single", "quay.io/deep/**", "quay.io/**/leaf", "quay.io/pre*", "quay.io/in**"]
"#,
        );
        for excluded in [
            "quay.io/org/single",
            "quay.io/deep/a",
            "quay.io/deep/a/b/c",
            "quay.io/leaf",
            "quay.io/a/b/leaf",
            "quay.io/prefix",
            "quay.io/inside",
        ] {
            assert_eq!(policy.decide(excluded), Decision::Excluded, "{excluded}");
        }
        for rewritten in [
            "quay.io/a/b/single",
            "quay.io/single",
            "quay.io/deeper/a",
            "quay.io/leaf/x",
            // A `**` at the end takes at least one component.
            "quay.io/deep",
            "quay.io/prefix/x",
            // `**` inside a component is `*`: it does not cross the `/`.
            "quay.io/inside/x",
        ] {
            assert!(
                matches!(policy.decide(rewritten), Decision::Rewrite { .. }),
                "{rewritten}: {:?}",
                policy.decide(rewritten)
            );
        }
    }

    #[test]
    fn an_image_under_a_target_keeps_its_pull_secret_when_excluded_too() {
        let policy = policy(
            r#"
rules:
  - match: docker.io
    target: harbor.corp.example/dockerhub
    pullSecret: harbor-pull
exclude:
  images: ["harbor.corp.example/**", "docker.io/library/busybox"]
"#,
        );
        let moved = "harbor.corp.example/dockerhub/library/nginx:1.27";
        for decision in [policy.decide(moved), policy.decide(moved)] {
            let Decision::AlreadyUnderTarget { rule } = decision else {
                panic!("{moved}: {decision:?}");
            };
            assert_eq!(rule.pull_secret.as_deref(), Some("harbor-pull"));
        }
        // Exclusion still wins over rewriting, and covers what no target holds.
        assert_eq!(policy.decide("busybox:1.36"), Decision::Excluded);
        assert_eq!(
            policy.decide("harbor.corp.example/other/app"),
            Decision::Excluded
        );
    }

    #[test]
    fn a_remembered_decision_is_the_decision_made_afresh() {
        let policy = policy(DESIGN_CONFIG);
        let long_tag = format!("nginx:{}", "t".repeat(120));
        let kept = [
            "nginx",
            "nginx:1.27@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "quay.io/org/app:v1",
            long_tag.as_str(),
            "harbor.corp.example/dockerhub/library/nginx:1.27",
            "registry.k8s.io/pause:3.9",
            "gcr.io/x",
        ];
        let too_long_path = format!("team/{}", "a".repeat(600));
        let long_host = format!("{}/app", vec!["h".repeat(60); 9].join("."));
        let invalid_result = format!("team/{}", "a".repeat(250));
        let not_kept = [
            "NGINX",
            "",
            too_long_path.as_str(),
            long_host.as_str(),
            invalid_result.as_str(),
        ];
        assert!(long_host.len() > DecisionMemo::MAX_KEY_LENGTH);
        assert_eq!(policy.decide_afresh(&long_host), Decision::NoMatchingRule);
        assert!(matches!(
            policy.decide_afresh(&invalid_result),
            Decision::InvalidResult { .. }
        ));
        for image in kept.into_iter().chain(not_kept) {
            let afresh = policy.decide_afresh(image);
            assert_eq!(policy.decide(image), afresh, "first: {image:?}");
            assert_eq!(policy.decide(image), afresh, "again: {image:?}");
        }
        for image in kept {
            let recalled = policy.memo.recall(image, &policy.rules);
            assert_eq!(recalled, Some(policy.decide_afresh(image)), "{image:?}");
        }
        for image in not_kept {
            assert_eq!(policy.memo.recall(image, &policy.rules), None, "{image:?}");
        }
        assert_eq!(policy.memo.len(), kept.len());
    }

    #[test]
    fn the_decision_memo_stays_bounded() {
        let policy = policy(DESIGN_CONFIG);
        for index in 0..DecisionMemo::CAPACITY + 100 {
            let image = format!("team/app-{index}:v1");
            assert!(matches!(policy.decide(&image), Decision::Rewrite { .. }));
            assert!(policy.memo.len() <= DecisionMemo::CAPACITY);
        }
        assert_eq!(policy.memo.len(), 100);
        assert_eq!(policy.clone().memo.len(), 0, "a copy starts empty");
        assert_eq!(
            outcome(&policy, "team/app-1:v1").0,
            "harbor.corp.example/dockerhub/team/app-1:v1"
        );
    }

    #[test]
    fn a_rewrite_past_the_length_limit_is_refused() {
        let policy = policy(
            "rules:\n  - match: docker.io\n    target: harbor.corp.example/a-very-long-project-name\n",
        );
        let long_path = "a".repeat(240);
        let image = format!("team/{long_path}");
        assert!(matches!(
            policy.decide(&image),
            Decision::InvalidResult { .. }
        ));
    }

    /// A path longer than any image name's can never be a match, and no
    /// image rewritten under it would be valid: such a rule would never
    /// rewrite anything, so it is refused, as a match under a target is.
    #[test]
    fn a_match_or_target_path_longer_than_a_name_can_have_is_refused() {
        let longest = "a".repeat(image::MAX_PATH_LENGTH);
        let too_long = "a".repeat(image::MAX_PATH_LENGTH + 1);
        for field in ["match", "target"] {
            let (matched, target) = if field == "match" {
                (format!("quay.io/{too_long}"), "harbor.example/q".to_owned())
            } else {
                ("quay.io".to_owned(), format!("harbor.example/{too_long}"))
            };
            let refused = refusal(&format!(
                "rules:\n  - match: {matched}\n    target: {target}\n"
            ));
            assert!(
                refused.starts_with(&format!("rules[0].{field}: "))
                    && refused.contains("256 characters")
                    && refused.contains("255"),
                "{refused}"
            );
        }
        // At the limit, an image named exactly by `match` goes to exactly
        // `target`, which is valid.
        let policy = policy(&format!(
            "rules:\n  - match: quay.io/{longest}\n    target: harbor.example/{longest}\n"
        ));
        assert_eq!(
            outcome(&policy, &format!("quay.io/{longest}:1")).0,
            format!("harbor.example/{longest}:1")
        );
    }

    #[test]
    fn a_docker_hub_target_must_not_gain_library() {
        let policy = policy("rules:\n  - match: quay.io\n    target: docker.io\n");
        assert!(matches!(
            policy.decide("quay.io/busybox"),
            Decision::InvalidResult { .. }
        ));
        assert_eq!(outcome(&policy, "quay.io/org/app").0, "docker.io/org/app");
    }

    #[test]
    fn overlapping_targets_must_agree_on_the_pull_secret() {
        let shared = "rules:\n  - match: docker.io\n    target: h.example/m\n    pullSecret: a\n  - match: quay.io\n    target: h.example/m\n    pullSecret: b\n";
        assert!(refusal(shared).starts_with("rules[1].pullSecret"));
        let nested = "rules:\n  - match: docker.io\n    target: h.example/hub\n    pullSecret: a\n  - match: quay.io\n    target: h.example/hub/quay\n";
        let nested_refusal = refusal(nested);
        assert!(
            nested_refusal.starts_with("rules[1].pullSecret")
                && nested_refusal.contains("of rules[0], which has pullSecret \"a\":"),
            "{nested_refusal}"
        );
        let without_secret = nested.replace("    pullSecret: a\n", "") + "    pullSecret: b\n";
        assert!(
            refusal(&without_secret).contains("of rules[0], which has no pullSecret:"),
            "{without_secret}"
        );
        let agreeing = "rules:\n  - match: docker.io\n    target: h.example/m\n    pullSecret: a\n  - match: quay.io\n    target: h.example/m/quay\n    pullSecret: a\n";
        assert!(load(agreeing).is_ok());
    }

    #[test]
    fn system_and_own_namespaces_are_always_excluded() {
        let policy = policy("exclude:\n  namespaces: [legacy]\n");
        for namespace in [
            "kube-system",
            "kube-public",
            "kube-node-lease",
            "image-rewriter",
            "legacy",
        ] {
            assert!(policy.excludes_namespace(namespace), "{namespace}");
        }
        assert!(!policy.excludes_namespace("default"));
    }
}
