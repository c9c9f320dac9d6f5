//! Container image references, parsed and normalized exactly as
//! distribution/reference (the grammar Docker, containerd and CRI-O use).
//!
//! Pure: no I/O. The regular expressions are the upstream ones, spelled with
//! ASCII classes because Rust's `\w` is Unicode-aware and Go's is not.

use std::fmt;
use std::sync::LazyLock;

use regex::Regex;

/// Docker Hub, as references are normalized to it.
pub const DOCKER_HUB: &str = "docker.io";
/// The legacy Docker Hub name, canonicalized to [`DOCKER_HUB`].
const LEGACY_DOCKER_HUB: &str = "index.docker.io";
/// Official images live under this namespace on Docker Hub.
const OFFICIAL_REPO_PREFIX: &str = "library/";
/// distribution/reference counts this limit on the path only, not the domain.
pub const MAX_PATH_LENGTH: usize = 255;

const ALPHANUMERIC: &str = "[a-z0-9]+";
const SEPARATOR: &str = "(?:[._]|__|[-]+)";
const DOMAIN_NAME_COMPONENT: &str = "(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])";
const IPV6_ADDRESS: &str = r"\[(?:[a-fA-F0-9:]+)\]";
const TAG: &str = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}";
const DIGEST: &str = "[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*[:][0-9A-Fa-f]{32,}";

fn path_component() -> String {
    format!("{ALPHANUMERIC}(?:{SEPARATOR}{ALPHANUMERIC})*")
}

fn domain_and_port() -> String {
    let domain_name = format!(r"{DOMAIN_NAME_COMPONENT}(?:\.{DOMAIN_NAME_COMPONENT})*");
    format!("(?:{domain_name}|{IPV6_ADDRESS})(?::[0-9]+)?")
}

fn name_pattern() -> String {
    let component = path_component();
    format!("(?:{}/)?{component}(?:/{component})*", domain_and_port())
}

fn compile(pattern: &str) -> Regex {
    Regex::new(pattern).unwrap_or_else(|e| unreachable!("constant pattern {pattern}: {e}"))
}

/// `name[:tag][@digest]`.
static REFERENCE: LazyLock<Regex> = LazyLock::new(|| {
    compile(&format!(
        "^(?:{})(?::{TAG})?(?:@{DIGEST})?$",
        name_pattern()
    ))
});

/// go-digest's `DigestRegexpAnchored`: the form it requires of a digest
/// whose algorithm it does not support before calling it unsupported.
static GO_DIGEST: LazyLock<Regex> =
    LazyLock::new(|| compile("^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$"));

static ANCHORED_DOMAIN: LazyLock<Regex> =
    LazyLock::new(|| compile(&format!("^{}$", domain_and_port())));

static ANCHORED_PATH_COMPONENT: LazyLock<Regex> =
    LazyLock::new(|| compile(&format!("^{}$", path_component())));

/// Why a string is not a valid image reference. The variants mirror
/// distribution/reference's errors so the upstream tables map onto them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("repository name must have at least one component")]
    NameEmpty,
    #[error("repository name must be lowercase")]
    NameContainsUppercase,
    #[error("repository name must not be more than {MAX_PATH_LENGTH} characters")]
    NameTooLong,
    #[error("invalid reference format")]
    InvalidFormat,
    #[error("cannot specify a 64-byte hexadecimal string as a repository name")]
    NameIsIdentifier,
    #[error("invalid digest format")]
    DigestInvalidFormat,
    #[error("unsupported digest algorithm")]
    DigestUnsupported,
    #[error("invalid digest length")]
    DigestInvalidLength,
}

/// A parsed reference: its text, and where its parts are in it. The text is
/// exactly `[domain/]path[:tag][@digest]`, so every part is a slice of it and
/// a parse allocates once. `domain` is empty only for references parsed with
/// the strict [`Reference::parse`] that name no registry host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    text: String,
    /// `text[..domain_end]` is the domain; 0 when there is none.
    domain_end: usize,
    /// `text[..name_end]` is the name (`domain/path`).
    name_end: usize,
    /// `text[name_end + 1..tag_end]` is the tag, when `tag_end > name_end`;
    /// `text[tag_end + 1..]` is the digest, when `tag_end < text.len()`.
    tag_end: usize,
}

impl Reference {
    /// distribution/reference `Parse`: the strict grammar, no normalization
    /// (no `docker.io`, no `library/`).
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        Self::parse_text(input.to_owned())
    }

    fn parse_text(text: String) -> Result<Self, ReferenceError> {
        // A DFA match, then a split by hand: capture groups would need the
        // (much slower) backtracking engine, and once the whole grammar
        // matched the parts are unambiguous. Neither name nor tag contains
        // `@`; a tag has no `/`, while a `:port` is always followed by a path.
        if !REFERENCE.is_match(&text) {
            if text.is_empty() {
                return Err(ReferenceError::NameEmpty);
            }
            if REFERENCE.is_match(&go_to_lower(&text)) {
                return Err(ReferenceError::NameContainsUppercase);
            }
            return Err(ReferenceError::InvalidFormat);
        }
        let tag_end = text.find('@').unwrap_or(text.len());
        let name_end = match text[..tag_end].rfind(':') {
            Some(colon) if !text[colon..tag_end].contains('/') => colon,
            _ => tag_end,
        };
        let name = &text[..name_end];
        // The name matched the grammar, so its first component is the domain
        // exactly when it matches the domain pattern and a path follows
        // (what the upstream anchored-name regexp's captures decide).
        let domain_end = match name.split_once('/') {
            Some((first, _)) if ANCHORED_DOMAIN.is_match(first) => first.len(),
            _ => 0,
        };
        let path_start = if domain_end == 0 { 0 } else { domain_end + 1 };
        if name_end - path_start > MAX_PATH_LENGTH {
            return Err(ReferenceError::NameTooLong);
        }
        if tag_end < text.len() {
            validate_digest(&text[tag_end + 1..])?;
        }
        Ok(Self {
            text,
            domain_end,
            name_end,
            tag_end,
        })
    }

    /// distribution/reference `ParseNormalizedNamed`: what a container
    /// runtime pulls. `nginx` is `docker.io/library/nginx`; tag and digest are
    /// kept as written and no `:latest` is added.
    pub fn parse_normalized(input: &str) -> Result<Self, ReferenceError> {
        // A 64-hex string is an image ID, never a repository name.
        if is_lower_hex64(input) {
            return Err(ReferenceError::NameIsIdentifier);
        }
        let (domain, library, remainder) = split_docker_domain(input);
        let repository = remainder.split_once(':').map_or(remainder, |(r, _)| r);
        if changes_when_lowercased(repository) {
            return Err(ReferenceError::NameContainsUppercase);
        }
        let mut text = String::with_capacity(domain.len() + 1 + library.len() + remainder.len());
        text.push_str(domain);
        text.push('/');
        text.push_str(library);
        text.push_str(remainder);
        Self::parse_text(text)
    }

    /// The registry host (and port), or `""` when a strict parse found none.
    pub fn domain(&self) -> &str {
        &self.text[..self.domain_end]
    }

    /// The repository path, without the registry host.
    pub fn path(&self) -> &str {
        let start = if self.domain_end == 0 {
            0
        } else {
            self.domain_end + 1
        };
        &self.text[start..self.name_end]
    }

    pub fn tag(&self) -> Option<&str> {
        (self.tag_end > self.name_end).then(|| &self.text[self.name_end + 1..self.tag_end])
    }

    pub fn digest(&self) -> Option<&str> {
        (self.tag_end < self.text.len()).then(|| &self.text[self.tag_end + 1..])
    }

    /// `domain/path`: the repository, without tag or digest.
    pub fn name(&self) -> &str {
        &self.text[..self.name_end]
    }

    /// `[:tag][@digest]` as written, empty when there is neither.
    pub fn tag_and_digest(&self) -> &str {
        &self.text[self.name_end..]
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Go's `unicode.ToLower`, which `strings.ToLower` applies to each
/// character: the simple case mapping, so `İ` (U+0130) is `i`, where
/// `str::to_lowercase` makes it `i̇`, which no reference matches. (U+0130
/// is the one character whose lowercase is longer than one, and the first
/// of it is its simple mapping.)
fn go_lowercase(c: char) -> char {
    c.to_lowercase().next().unwrap_or(c)
}

/// Go's `strings.ToLower`.
fn go_to_lower(text: &str) -> String {
    text.chars().map(go_lowercase).collect()
}

/// Go's `strings.ToLower(s) != s`, without building the lowercase copy.
fn changes_when_lowercased(text: &str) -> bool {
    text.chars().any(|c| go_lowercase(c) != c)
}

/// Whether `host` is a registry host (with optional port) in the grammar.
pub fn is_valid_domain(host: &str) -> bool {
    ANCHORED_DOMAIN.is_match(host)
}

/// Whether `component` is one repository path component in the grammar.
pub fn is_valid_path_component(component: &str) -> bool {
    ANCHORED_PATH_COMPONENT.is_match(component)
}

/// Whether the first component of a name would be taken as a registry host
/// rather than a Docker Hub namespace (distribution/reference's rule).
pub fn looks_like_domain(component: &str) -> bool {
    component == "localhost" || component.contains(['.', ':']) || changes_when_lowercased(component)
}

/// Canonicalizes the legacy Docker Hub host name.
pub fn canonical_domain(host: &str) -> &str {
    if host == LEGACY_DOCKER_HUB {
        DOCKER_HUB
    } else {
        host
    }
}

/// distribution/reference `splitDockerDomain`: the domain, and the path
/// with its tag and digest as `library` (`"library/"` or `""`) followed by
/// the remainder.
fn split_docker_domain(name: &str) -> (&str, &'static str, &str) {
    let Some((first, rest)) = name.split_once('/') else {
        return (DOCKER_HUB, OFFICIAL_REPO_PREFIX, name);
    };
    let (domain, remainder) = if first == LEGACY_DOCKER_HUB {
        (DOCKER_HUB, rest)
    } else if looks_like_domain(first) {
        (first, rest)
    } else {
        (DOCKER_HUB, name)
    };
    if domain == DOCKER_HUB && !remainder.contains('/') {
        return (domain, OFFICIAL_REPO_PREFIX, remainder);
    }
    (domain, "", remainder)
}

/// go-digest `Parse` as the binaries that pull images run it. go-digest
/// supports an algorithm when its hash is linked into the program:
/// distribution/reference's own test binary links only sha256 (its test
/// table calls `sha512` unsupported), but the kubelet, containerd and CRI-O
/// link sha384 and sha512 too (through `crypto/tls`), and pull such images.
fn validate_digest(digest: &str) -> Result<&str, ReferenceError> {
    let Some((algorithm, encoded)) = digest.split_once(':') else {
        return Err(ReferenceError::DigestInvalidFormat);
    };
    if algorithm.is_empty() || encoded.is_empty() {
        return Err(ReferenceError::DigestInvalidFormat);
    }
    let hex_digits = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        // Unknown here: unsupported if it has go-digest's form (a lowercase
        // algorithm), else an invalid format, as go-digest says.
        _ if GO_DIGEST.is_match(digest) => return Err(ReferenceError::DigestUnsupported),
        _ => return Err(ReferenceError::DigestInvalidFormat),
    };
    if encoded.len() != hex_digits {
        return Err(ReferenceError::DigestInvalidLength);
    }
    if !is_lower_hex(encoded) {
        return Err(ReferenceError::DigestInvalidFormat);
    }
    Ok(digest)
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// 64 lowercase hex digits: an image ID.
fn is_lower_hex64(text: &str) -> bool {
    text.len() == 64 && is_lower_hex(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn familiar_names_normalize_to_docker_hub_library() {
        for input in [
            "nginx",
            "library/nginx",
            "docker.io/nginx",
            "docker.io/library/nginx",
            "index.docker.io/library/nginx",
            "index.docker.io/nginx",
        ] {
            let reference = Reference::parse_normalized(input).unwrap();
            assert_eq!(reference.name(), "docker.io/library/nginx", "{input}");
            assert_eq!(reference.to_string(), "docker.io/library/nginx", "{input}");
        }
    }

    #[test]
    fn tag_and_digest_are_kept_as_written() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let input = format!("nginx:1.27-Alpine@{digest}");
        let reference = Reference::parse_normalized(&input).unwrap();
        assert_eq!(reference.tag(), Some("1.27-Alpine"));
        assert_eq!(reference.digest(), Some(digest.as_str()));
        assert_eq!(
            reference.to_string(),
            format!("docker.io/library/nginx:1.27-Alpine@{digest}")
        );
    }

    #[test]
    fn the_digests_a_kubelet_pulls_are_valid_and_others_are_not() {
        for (algorithm, hex_digits) in [("sha256", 64), ("sha384", 96), ("sha512", 128)] {
            let digest = format!(
                "{algorithm}:{}",
                "0123456789abcdef".repeat(8).split_at(hex_digits).0
            );
            let reference = Reference::parse_normalized(&format!("nginx@{digest}")).unwrap();
            assert_eq!(reference.digest(), Some(digest.as_str()));
            let short = format!("nginx@{algorithm}:{}", "a".repeat(hex_digits - 1));
            assert_eq!(
                Reference::parse_normalized(&short).unwrap_err(),
                ReferenceError::DigestInvalidLength,
                "{short}"
            );
            let upper = format!("nginx@{algorithm}:{}", "A".repeat(hex_digits));
            assert_eq!(
                Reference::parse_normalized(&upper).unwrap_err(),
                ReferenceError::DigestInvalidFormat,
                "{upper}"
            );
        }
        // Hashes go-digest knows nothing of, or a kubelet does not link.
        for unsupported in [
            format!("md5:{}", "a".repeat(32)),
            format!("blake3:{}", "a".repeat(64)),
        ] {
            assert_eq!(
                Reference::parse_normalized(&format!("nginx@{unsupported}")).unwrap_err(),
                ReferenceError::DigestUnsupported,
                "{unsupported}"
            );
        }
    }

    /// Go's `strings.ToLower` maps each character alone (simple case
    /// mapping): `İ` (U+0130) becomes `i`, so upstream calls `nİnx` a name
    /// that must be lowercase. Rust's `str::to_lowercase` makes it `i̇` (two
    /// characters), which no reference matches.
    #[test]
    fn a_capital_that_lowercases_to_ascii_as_go_does_is_uppercase() {
        for input in ["İ", "nİnx", "x:İ", "localhost/x:İ", "\u{212a}"] {
            assert_eq!(
                Reference::parse(input).unwrap_err(),
                ReferenceError::NameContainsUppercase,
                "{input}"
            );
        }
        assert_eq!(
            Reference::parse_normalized("x:İ").unwrap_err(),
            ReferenceError::NameContainsUppercase
        );
        // Lowercase, it is still no reference: `ı` (dotless i) lowercases
        // to itself.
        assert_eq!(
            Reference::parse("nınx").unwrap_err(),
            ReferenceError::InvalidFormat
        );
    }

    /// go-digest calls an algorithm it does not know unsupported only when
    /// the digest has its own form (a lowercase algorithm); otherwise the
    /// format is invalid.
    #[test]
    fn an_unknown_algorithm_in_capitals_is_an_invalid_format() {
        let hex = "0123456789abcdef".repeat(4);
        for algorithm in ["SHA256", "Sha256", "sha256+B64", "A.B"] {
            assert_eq!(
                Reference::parse(&format!("x@{algorithm}:{hex}")).unwrap_err(),
                ReferenceError::DigestInvalidFormat,
                "{algorithm}"
            );
        }
        for algorithm in ["sha1", "sha256+b64", "a.b-c_d", "blake3"] {
            assert_eq!(
                Reference::parse(&format!("x@{algorithm}:{hex}")).unwrap_err(),
                ReferenceError::DigestUnsupported,
                "{algorithm}"
            );
        }
    }

    #[test]
    fn hosts_with_ports_are_registries() {
        for (input, domain, path) in [
            ("localhost:5000/x", "localhost:5000", "x"),
            ("localhost/x", "localhost", "x"),
            (
                "my-reg.corp.io:5000/team/app",
                "my-reg.corp.io:5000",
                "team/app",
            ),
            ("[2001:db8::1]:5000/repo", "[2001:db8::1]:5000", "repo"),
            ("user/app", "docker.io", "user/app"),
            ("DOCKER.IO/x", "DOCKER.IO", "x"),
        ] {
            let reference = Reference::parse_normalized(input).unwrap();
            assert_eq!((reference.domain(), reference.path()), (domain, path));
        }
    }
}
