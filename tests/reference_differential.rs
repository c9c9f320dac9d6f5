//! Differential test: our parser (`src/image.rs`) against the real
//! distribution/reference v0.6.0, run by a small Go program
//! (`tests/reference-oracle`, its module pinned there) that links sha256,
//! sha384 and sha512 as the kubelet, containerd and CRI-O do. Every input
//! goes through `Parse` and `ParseNormalizedNamed` on both sides, and the
//! results must agree: the same error (by upstream variable), or the same
//! string, domain, path, tag and digest. The only exceptions are the named
//! entries of [`DELIBERATE`]. (The sha384 and sha512 digests that
//! `tests/reference_vectors.rs` lets differ from upstream's test table are
//! no exception here: the oracle links those hashes.)
//!
//! Inputs, some 70 000 different strings: every `input` of
//! `tests/fixtures/reference.json`, the fuzz seed corpus
//! `fuzz/corpus/reference/`, and the rest made from grammar pieces and edge
//! cases, crossed and edited by a seeded generator (the same every run).
//! Strings only: our parser takes `&str`, and an image name reaches it from
//! JSON, which holds no invalid UTF-8 (nor a lone surrogate: serde_json
//! refuses one).
//!
//! The oracle is built with `go build` into Cargo's target directory, keyed
//! by a hash of its sources and of the Go version, so later runs reuse it.
//! Go is `$GO`, else `go` on the PATH, else `/usr/local/go/bin/go`; without
//! one the test prints `SKIPPED`, unless `IMAGE_REWRITER_REQUIRE_GO` is set,
//! which makes that a failure (`.ci/run` sets it).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::hash::{DefaultHasher, Hasher};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use image_rewriter::image::{Reference, ReferenceError};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// The oracle

fn oracle_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference-oracle")
}

/// `$GO`, else `go` on the PATH, else `/usr/local/go/bin/go`, as
/// `tests/control-plane/build.sh` looks for it; None when it does not run.
fn go() -> Option<PathBuf> {
    let candidates = match std::env::var_os("GO").filter(|go| !go.is_empty()) {
        Some(go) => vec![PathBuf::from(go)],
        None => vec![PathBuf::from("go"), PathBuf::from("/usr/local/go/bin/go")],
    };
    candidates.into_iter().find(|go| {
        Command::new(go)
            .args(["env", "GOVERSION"])
            .stderr(Stdio::null())
            .output()
            .is_ok_and(|out| out.status.success())
    })
}

fn go_output(go: &Path, args: &[&str]) -> String {
    let out = Command::new(go)
        .args(args)
        .current_dir(oracle_dir())
        .output()
        .unwrap_or_else(|e| panic!("{} {args:?}: {e}", go.display()));
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}",
        go.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The oracle binary, built when this version of its sources and of Go has
/// not been built before. Built beside its final name and renamed there, so
/// a run never sees half a binary, and two runs at once do not clash.
fn oracle(go: &Path) -> PathBuf {
    let mut hasher = DefaultHasher::new();
    for file in ["go.mod", "go.sum", "main.go"] {
        let text = std::fs::read(oracle_dir().join(file))
            .unwrap_or_else(|e| panic!("tests/reference-oracle/{file}: {e}"));
        hasher.write(file.as_bytes());
        hasher.write(&text);
    }
    hasher.write(go_output(go, &["env", "GOVERSION"]).as_bytes());
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("reference-oracle");
    let binary = dir.join(format!("reference-oracle-{:016x}", hasher.finish()));
    if binary.is_file() {
        return binary;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let partial = dir.join(format!(".build-{}", std::process::id()));
    // Up to three tries: on a machine whose module cache lacks the two
    // modules, `go build` downloads them, and does not retry a proxy's
    // transient error itself.
    let mut errors = String::new();
    for attempt in 1..=3 {
        let out = Command::new(go)
            .args(["build", "-trimpath", "-o"])
            .arg(&partial)
            .arg(".")
            .current_dir(oracle_dir())
            .env("CGO_ENABLED", "0")
            // Its own module alone, whatever go.work a parent directory holds.
            .env("GOWORK", "off")
            // Exactly what go.mod and go.sum pin; never rewrite them.
            .env("GOFLAGS", "-mod=readonly -buildvcs=false")
            .output()
            .unwrap_or_else(|e| panic!("running {} build: {e}", go.display()));
        if out.status.success() {
            std::fs::rename(&partial, &binary).unwrap();
            // Builds of older sources (a running test keeps its file open).
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                let name = entry.file_name();
                if path != binary && name.to_string_lossy().starts_with("reference-oracle-") {
                    let _ = std::fs::remove_file(path);
                }
            }
            return binary;
        }
        errors += &format!(
            "try {attempt}: {}\n",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        if attempt < 3 {
            std::thread::sleep(std::time::Duration::from_secs(5));
        }
    }
    panic!("building tests/reference-oracle failed 3 times:\n{errors}");
}

/// What the oracle says of each input, in order.
fn ask(oracle: &Path, inputs: &[String]) -> Vec<Value> {
    let mut child = Command::new(oracle)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", oracle.display()));
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = Vec::new();
    for input in inputs {
        serde_json::to_writer(&mut lines, input).unwrap();
        lines.push(b'\n');
    }
    // Written from another thread: the oracle answers as it reads, and
    // would block on a full stdout while we block on a full stdin.
    let writer = std::thread::spawn(move || stdin.write_all(&lines));
    let out = child.wait_with_output().unwrap();
    let written = writer.join().unwrap();
    // Its status first: an oracle that died says why on stderr, where the
    // write's broken pipe would not.
    assert!(
        out.status.success(),
        "the oracle failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    written.expect("writing to the oracle");
    let answers: Vec<Value> = out
        .stdout
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_slice(line).expect("the oracle writes JSON lines"))
        .collect();
    assert_eq!(answers.len(), inputs.len(), "one answer for each input");
    answers
}

// ---------------------------------------------------------------------------
// Our side, in the oracle's terms

fn ours(result: Result<Reference, ReferenceError>) -> Value {
    match result {
        Ok(r) => json!({
            "string": r.to_string(),
            "domain": r.domain(),
            "path": r.path(),
            "tag": r.tag(),
            "digest": r.digest(),
        }),
        Err(e) => json!({ "error": format!("{e:?}") }),
    }
}

/// The oracle's names for each of our errors. ParseNormalizedNamed checks
/// the repository name's case itself (an error of its own, built with
/// fmt.Errorf) before `Parse` checks it again; we have one error for both.
fn upstream_errors(error: &str, function: Function) -> &'static [&'static str] {
    match (error, function) {
        ("NameEmpty", _) => &["ErrNameEmpty"],
        ("NameContainsUppercase", Function::Parse) => &["ErrNameContainsUppercase"],
        ("NameContainsUppercase", Function::Normalized) => {
            &["ErrNameContainsUppercase", "fmt:NameContainsUppercase"]
        }
        ("NameTooLong", _) => &["ErrNameTooLong"],
        ("InvalidFormat", _) => &["ErrReferenceInvalidFormat"],
        ("NameIsIdentifier", Function::Normalized) => &["fmt:NameIsIdentifier"],
        ("DigestInvalidFormat", _) => &["digest.ErrDigestInvalidFormat"],
        ("DigestUnsupported", _) => &["digest.ErrDigestUnsupported"],
        ("DigestInvalidLength", _) => &["digest.ErrDigestInvalidLength"],
        _ => &[],
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Function {
    Parse,
    Normalized,
}

impl Function {
    fn upstream(self) -> &'static str {
        match self {
            Self::Parse => "Parse",
            Self::Normalized => "ParseNormalizedNamed",
        }
    }
}

fn agree(go: &Value, ours: &Value, function: Function) -> bool {
    match (go.get("error"), ours.get("error")) {
        (Some(go), Some(Value::String(ours))) => go
            .as_str()
            .is_some_and(|go| upstream_errors(ours, function).contains(&go)),
        (None, None) => ["string", "domain", "path", "tag", "digest"]
            .iter()
            .all(|key| go.get(key) == ours.get(key)),
        _ => false,
    }
}

// ---------------------------------------------------------------------------
// Deliberate differences

/// A difference from upstream we keep on purpose; `applies` says which
/// disagreements it covers. An entry must cover at least one input when
/// `expected` says so (given the version of Go's Unicode tables), so that
/// one whose difference has gone cannot linger.
struct Deliberate {
    name: &'static str,
    applies: fn(input: &str, function: Function, go: &Value, ours: &Value) -> bool,
    expected: fn(go_unicode: (u32, u32, u32)) -> bool,
}

/// Capitals that Unicode 16.0 added (CYRILLIC CAPITAL LETTER TJE, LATIN
/// CAPITAL LETTER RAMS HORN, GARAY CAPITAL LETTER A), which the generator
/// puts in names.
const UNICODE_16_CAPITALS: [char; 3] = ['\u{1c89}', '\u{a7cb}', '\u{10d50}'];

const DELIBERATE: &[Deliberate] = &[Deliberate {
    // ParseNormalizedNamed calls a repository name uppercase when
    // strings.ToLower changes it; we ask the same of Rust's Unicode tables
    // (`char::to_lowercase`). Go 1.26's are Unicode 15.0, Rust's newer: a
    // capital added since is uppercase to us and not to Go, so we say "must
    // be lowercase" where Go says "invalid reference format". Both refuse
    // the name (no non-ASCII character is in the grammar), and which of the
    // two errors the kubelet gives depends on the Go it was built with.
    // Copying Go 1.26's tables would only move the difference to the next
    // Go.
    name: "capitals newer than Go's Unicode tables",
    applies: |input, function, go, ours| {
        function == Function::Normalized
            && go["error"] == "ErrReferenceInvalidFormat"
            && ours["error"] == "NameContainsUppercase"
            && input.contains(UNICODE_16_CAPITALS)
            // And nothing else differs: with those capitals made another
            // non-ASCII letter, we say what Go says.
            && Reference::parse_normalized(&input.replace(UNICODE_16_CAPITALS, "é"))
                == Err(ReferenceError::InvalidFormat)
    },
    expected: |go_unicode| go_unicode < (16, 0, 0),
}];

/// The version of the Unicode tables the oracle's Go has.
fn go_unicode(oracle: &Path) -> (u32, u32, u32) {
    let out = Command::new(oracle)
        .arg("-unicode-version")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", oracle.display()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let version: Vec<u32> = text
        .trim()
        .split('.')
        .map(|n| {
            n.parse()
                .unwrap_or_else(|_| panic!("Unicode version {text:?}"))
        })
        .collect();
    match version[..] {
        [major, minor, update] => (major, minor, update),
        _ => panic!("Unicode version {text:?}"),
    }
}

// ---------------------------------------------------------------------------
// Inputs

/// SplitMix64: small, seeded, and the same sequence on every machine and
/// every version of every crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn hex(len: usize) -> String {
    repeat("0123456789abcdef", len)
}

fn repeat(piece: &str, len: usize) -> String {
    piece.chars().cycle().take(len).collect()
}

/// Registry hosts, valid and not ("" for none).
fn domains() -> Vec<String> {
    let mut domains: Vec<String> = [
        "",
        "localhost",
        "localhost:5000",
        "localhost:",
        "localhost:05000",
        "LOCALHOST",
        "Localhost:5000",
        "docker.io",
        "index.docker.io",
        "registry-1.docker.io",
        "DOCKER.IO",
        "Docker.io",
        "docker.io:443",
        "index.docker.io:443",
        "INDEX.DOCKER.IO",
        "127.0.0.1",
        "127.0.0.1:5000",
        "1.2.3.4:00080",
        "256.300.1.1",
        "[::1]",
        "[::1]:5000",
        "[2001:db8::1]:5000",
        "[2001:DB8::1]",
        "[::]",
        "[]",
        "[::1",
        "::1",
        "[::1]:",
        "[fe80::1%eth0]:5000",
        "[::ffff:127.0.0.1]",
        "[g::1]",
        "example.com",
        "example.com:",
        "example.com:0",
        "example.com:65536",
        "example.com:99999999999999999999",
        "example.com:-1",
        "example.com:80:80",
        "example.com:port",
        "ex_ample.com",
        "-example.com",
        "example-.com",
        "exa--mple.com",
        "example..com",
        ".example.com",
        "example.com.",
        "sub.Example.COM:5000",
        "xn--bcher-kva.example",
        "ghcr.io",
        "quay.io",
        "registry.k8s.io",
        "a",
        "a.b",
        "A",
        "a:1",
        "1",
        "1.2",
        "my_registry",
        "my-registry",
        "my--registry",
        "UPPER",
        "münchen.de",
        "ex ample.com",
        "_",
        "-",
        ".",
        ":",
        ":5000",
    ]
    .map(String::from)
    .to_vec();
    // Long hosts: distribution/reference bounds only the path.
    domains.push(format!("{}.example.com", repeat("a", 63)));
    domains.push(format!("{}.com", repeat("a.", 300)));
    domains
}

/// Repository paths, valid and not.
fn paths() -> Vec<String> {
    let mut paths: Vec<String> = [
        "nginx",
        "library/nginx",
        "library",
        "library/",
        "a",
        "a/b",
        "a/b/c/d/e",
        "foo.bar",
        "foo_bar",
        "foo__bar",
        "foo___bar",
        "foo-bar",
        "foo--bar",
        "foo---bar",
        "foo.-bar",
        "foo._bar",
        "foo-_bar",
        "foo..bar",
        "foo.bar.baz",
        "foo-",
        "-foo",
        "_foo",
        ".foo",
        "foo.",
        "foo_",
        "foo/",
        "/foo",
        "foo//bar",
        "Foo",
        "fOo",
        "foo/Bar",
        "FOO/bar",
        "foo/bar-baz_qux.quux",
        "0",
        "9a",
        "a9",
        "localhost",
        "docker.io",
        "index.docker.io",
        "library/library",
        "İ",
        "\u{212a}",
        "é",
        "nİnx",
        "ngin\u{212a}",
        "\u{1c89}x",
        "x\u{a7cb}",
        "\u{10d50}",
        "ΣΑΣ",
        "a b",
        "a\tb",
        "a\nb",
        "\0",
        "nginx\n",
        "\nnginx",
        "ngi\u{200b}nx",
        "ＮＧＩＮＸ",
        "a:b",
        "a@b",
        "a#b",
        "a+b",
        "a%2fb",
        "",
    ]
    .map(String::from)
    .to_vec();
    paths.extend([
        hex(64),
        hex(64).to_uppercase(),
        hex(63),
        hex(65),
        repeat("abcdefabcdef", 64),
        format!("library/{}", hex(64)),
        format!("{}/x", hex(64)),
        format!("x/{}", hex(64)),
    ]);
    // Around 255 bytes, the limit upstream puts on the path: as one
    // component, as many, and as what normalization prefixes with
    // `library/` (8 bytes more).
    for len in [246, 247, 248, 249, 253, 254, 255, 256, 257] {
        paths.push(repeat("a", len));
        paths.push(format!("x/{}", repeat("b", len - 2)));
        paths.push(repeat("a/", len - 1) + "a");
        paths.push(repeat("a.b-c__d", len));
    }
    paths.push(repeat("a", 1000));
    paths
}

fn tags() -> Vec<Option<String>> {
    let mut tags: Vec<Option<String>> = [
        "",
        "latest",
        "1.25",
        "v1.2.3-alpine",
        "LATEST",
        "Latest_1.0",
        "_",
        ".",
        "-",
        ".a",
        "-a",
        "_a",
        "a.",
        "a-",
        "a..b",
        "a:b",
        "a/b",
        "a@b",
        "İ",
        "\u{212a}",
        "é",
        "a b",
        "\n",
        "latest\n",
        "5000",
        "5000/x",
        "sha256",
    ]
    .map(|t| Some(t.to_owned()))
    .to_vec();
    tags.push(None);
    for len in [127, 128, 129] {
        tags.push(Some(repeat("a", len)));
        tags.push(Some(repeat("A_.-9", len)));
        tags.push(Some(format!("_{}", repeat("-", len - 1))));
    }
    tags
}

fn digests() -> Vec<Option<String>> {
    let mut digests: Vec<Option<String>> = vec![None, Some(String::new())];
    for (algorithm, len) in [("sha256", 64), ("sha384", 96), ("sha512", 128)] {
        for n in [32, len - 1, len, len + 1, 64, 96, 128] {
            digests.push(Some(format!("{algorithm}:{}", hex(n))));
        }
        digests.push(Some(format!("{algorithm}:{}", hex(len).to_uppercase())));
        digests.push(Some(format!("{algorithm}:A{}", hex(len - 1))));
        digests.push(Some(format!("{algorithm}:{}", repeat("g", len))));
        digests.push(Some(format!("{}:{}", algorithm.to_uppercase(), hex(len))));
        digests.push(Some(format!("{algorithm}:")));
        digests.push(Some(algorithm.to_owned()));
    }
    for digest in [
        format!("Sha256:{}", hex(64)),
        format!("sha1:{}", hex(40)),
        format!("md5:{}", hex(32)),
        format!("blake3:{}", hex(64)),
        format!("sha256+b64u:{}", hex(64)),
        format!("sha256-x:{}", hex(64)),
        format!("a.b+c_d-e:{}", hex(32)),
        format!("A.B:{}", hex(32)),
        format!("sha256..x:{}", hex(64)),
        format!("1sha256:{}", hex(64)),
        format!(":{}", hex(64)),
        format!("sha256::{}", hex(64)),
        format!("sha256:{}\n", hex(64)),
        format!("sha256:{}:", hex(64)),
        format!("sha256:{}@sha256:{}", hex(64), hex(64)),
        format!("sha256:{}", hex(31)),
        format!("x:{}", hex(31)),
        format!("x:{}", hex(32)),
        format!("sha256:{}", repeat("0", 64)),
        format!("sha256:{}", repeat("f", 1000)),
    ] {
        digests.push(Some(digest));
    }
    digests
}

fn compose(domain: &str, path: &str, tag: Option<&str>, digest: Option<&str>) -> String {
    let mut text = String::new();
    if !domain.is_empty() {
        text.push_str(domain);
        text.push('/');
    }
    text.push_str(path);
    if let Some(tag) = tag {
        text.push(':');
        text.push_str(tag);
    }
    if let Some(digest) = digest {
        text.push('@');
        text.push_str(digest);
    }
    text
}

/// Characters an edit inserts: the grammar's, its neighbours, and what case
/// mapping or a careless reader could trip on.
const EDIT_CHARS: &[char] = &[
    'a',
    'z',
    'A',
    'Z',
    '0',
    '9',
    'f',
    'F',
    'g',
    '/',
    ':',
    '@',
    '.',
    '-',
    '_',
    '[',
    ']',
    '+',
    ' ',
    '\n',
    '\t',
    '\r',
    '\0',
    '\u{7f}',
    'İ',
    'ı',
    '\u{212a}',
    'é',
    'ß',
    '\u{1c89}',
    '\u{10d50}',
    '\u{feff}',
    '\u{fffd}',
    '%',
    '#',
    '\\',
];

/// A random edit of a string: insert, delete, replace, swap the case of or
/// duplicate a character.
fn mutate(rng: &mut Rng, text: &str) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for _ in 0..=rng.below(3) {
        let at = rng.below(chars.len() + 1);
        match rng.below(5) {
            0 => chars.insert(at, *rng.pick(EDIT_CHARS)),
            1 if at < chars.len() => {
                chars.remove(at);
            }
            2 if at < chars.len() => chars[at] = *rng.pick(EDIT_CHARS),
            3 if at < chars.len() => {
                let c = chars[at];
                chars[at] = if c.is_ascii_lowercase() {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                };
            }
            _ if at < chars.len() => chars.insert(at, chars[at]),
            _ => chars.push(*rng.pick(EDIT_CHARS)),
        }
    }
    chars.into_iter().collect()
}

fn fixture_inputs() -> Vec<String> {
    let records: Vec<Value> =
        serde_json::from_str(include_str!("fixtures/reference.json")).expect("fixture is JSON");
    let inputs: Vec<String> = records
        .iter()
        .filter_map(|r| r["input"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(inputs.len(), records.len(), "every record has an input");
    inputs
}

fn corpus_inputs() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/reference");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files
        .iter()
        .filter_map(|file| String::from_utf8(std::fs::read(file).unwrap()).ok())
        .collect()
}

/// Every input, each once, in the same order on every run.
fn inputs() -> Vec<String> {
    let mut inputs = Vec::new();
    inputs.extend(fixture_inputs());
    inputs.extend(corpus_inputs());

    let (domains, paths, tags, digests) = (domains(), paths(), tags(), digests());
    fn tag(t: &Option<String>) -> Option<&str> {
        t.as_deref()
    }
    // Every piece of each kind against every piece of one other kind.
    for domain in &domains {
        for path in &paths {
            inputs.push(compose(domain, path, None, None));
        }
        for t in &tags {
            inputs.push(compose(domain, "x", tag(t), None));
        }
        for d in &digests {
            inputs.push(compose(domain, "x/y", None, tag(d)));
        }
    }
    for path in &paths {
        for t in &tags {
            inputs.push(compose("", path, tag(t), None));
        }
        for d in &digests {
            inputs.push(compose("", path, None, tag(d)));
        }
    }
    for t in &tags {
        for d in &digests {
            inputs.push(compose("", "x", tag(t), tag(d)));
            inputs.push(compose("localhost:5000", "x", tag(t), tag(d)));
        }
    }

    let mut rng = Rng(0x5eed_da7a_2025_0001);
    // Random whole references from the pieces, some of whose pieces are
    // edited, and a few with more path components.
    for _ in 0..20_000 {
        let mut domain = rng.pick(&domains).clone();
        let mut path = rng.pick(&paths).clone();
        if rng.chance(4) {
            path = format!("{path}/{}", rng.pick(&paths));
        }
        let mut t = rng.pick(&tags).clone();
        let mut d = if rng.chance(2) {
            None
        } else {
            rng.pick(&digests).clone()
        };
        match rng.below(6) {
            0 => domain = mutate(&mut rng, &domain),
            1 => path = mutate(&mut rng, &path),
            2 => t = t.map(|t| mutate(&mut rng, &t)),
            3 => d = d.map(|d| mutate(&mut rng, &d)),
            _ => {}
        }
        inputs.push(compose(&domain, &path, tag(&t), tag(&d)));
    }
    // Edits anywhere in well-formed references.
    let seeds: Vec<String> = inputs
        .iter()
        .filter(|i| i.len() < 200 && Reference::parse(i).is_ok())
        .cloned()
        .collect();
    for _ in 0..15_000 {
        let seed = rng.pick(&seeds).clone();
        inputs.push(mutate(&mut rng, &seed));
    }
    // Short strings of the grammar's own characters: its corners.
    const ALPHABET: &[char] = &['a', 'b', 'A', '0', '/', ':', '@', '.', '-', '_', '[', ']'];
    for _ in 0..10_000 {
        let len = rng.below(14);
        inputs.push((0..len).map(|_| *rng.pick(ALPHABET)).collect());
    }

    let mut seen = HashSet::new();
    inputs.retain(|input| seen.insert(input.clone()));
    inputs
}

// ---------------------------------------------------------------------------
// The test

/// A kind of disagreement: the function, what upstream said (its error, or
/// "ok") and what we said.
type Disagreement = (Function, String, String);

#[test]
fn image_reference_parser_agrees_with_distribution_reference() {
    let Some(go) = go() else {
        common::skip_missing_tool(
            "go",
            "IMAGE_REWRITER_REQUIRE_GO",
            "our parser not compared with distribution/reference",
        );
        return;
    };
    let oracle = oracle(&go);
    let inputs = inputs();
    assert!(inputs.len() > 40_000, "only {} inputs", inputs.len());
    let answers = ask(&oracle, &inputs);

    let mut used = vec![0usize; DELIBERATE.len()];
    // Disagreements none of DELIBERATE covers, grouped by what each side said.
    let mut unexplained: BTreeMap<Disagreement, Vec<(&str, Value, Value)>> = BTreeMap::new();
    let mut accepted = [0usize; 2];
    for (input, answer) in inputs.iter().zip(&answers) {
        for (function, go, ours) in [
            (
                Function::Parse,
                &answer["parse"],
                ours(Reference::parse(input)),
            ),
            (
                Function::Normalized,
                &answer["normalized"],
                ours(Reference::parse_normalized(input)),
            ),
        ] {
            if go.get("error").is_none() {
                accepted[function as usize] += 1;
            }
            if agree(go, &ours, function) {
                continue;
            }
            match DELIBERATE
                .iter()
                .position(|d| (d.applies)(input, function, go, &ours))
            {
                Some(index) => used[index] += 1,
                None => unexplained
                    .entry((
                        function,
                        go.get("error")
                            .map_or_else(|| "ok".to_owned(), ToString::to_string),
                        ours.get("error")
                            .map_or_else(|| "ok".to_owned(), ToString::to_string),
                    ))
                    .or_default()
                    .push((input, go.clone(), ours)),
            }
        }
    }
    // Enough of the inputs are references for the comparison of results,
    // not only of errors, to mean something.
    assert!(
        accepted.iter().all(|&n| n > 5_000),
        "accepted by upstream: {accepted:?}"
    );
    let mut report = String::new();
    for ((function, go, ours), cases) in &unexplained {
        report += &format!(
            "{} inputs: {} says {go}, we say {ours}; for example:\n",
            cases.len(),
            function.upstream()
        );
        for (input, go, ours) in cases.iter().take(5) {
            report += &format!("  {input:?}\n    upstream: {go}\n    ours:     {ours}\n");
        }
    }
    assert!(
        unexplained.is_empty(),
        "{} groups of disagreements with distribution/reference:\n{report}",
        unexplained.len()
    );
    let go_unicode = go_unicode(&oracle);
    for (deliberate, count) in DELIBERATE.iter().zip(&used) {
        assert!(
            *count > 0 || !(deliberate.expected)(go_unicode),
            "{}: no input differs from upstream this way any more (Go's Unicode {go_unicode:?})",
            deliberate.name
        );
    }
    println!(
        "{} inputs, {} accepted by Parse and {} by ParseNormalizedNamed; differences kept: {}",
        inputs.len(),
        accepted[0],
        accepted[1],
        DELIBERATE
            .iter()
            .zip(&used)
            .map(|(d, n)| format!("{} ({n})", d.name))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
