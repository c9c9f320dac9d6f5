//! Property tests: random policies and random pods through
//! `admission::review`. On CREATE reviews: whatever the input, the patch
//! applies to the pod exactly as sent, the result is a Pod, a reinvocation
//! changes nothing, exclusions and unparsable images are left alone, tags and
//! digests survive as written, and no pull secret appears twice. On reviews of
//! every shape (`kubectl debug` included, targets nested in other rules), the
//! patch applies, a second pass is empty and pull secrets keep their order.

mod common;

use std::collections::{BTreeMap, HashSet};

use common::*;
use image_rewriter::config::ConfigFile;
use image_rewriter::patch::ORIGINAL_IMAGES_ANNOTATION;
use proptest::prelude::*;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------

const MATCHES: &[&str] = &[
    "docker.io",
    "docker.io/library",
    "docker.io/bitnami",
    "quay.io",
    "ghcr.io",
    "gcr.io",
    "registry.k8s.io",
    "localhost:5000",
    "reg.example:8443",
];

/// No target is a path prefix of another (see the report on nested targets).
const TARGETS: &[&str] = &[
    "harbor.corp.example/hub",
    "harbor.corp.example/quay",
    "mirror.example",
    "10.0.0.5:8443/cache",
    "docker.io/mycorp-mirror",
    "localhost:5000/proxy",
];

const SECRETS: &[&str] = &["harbor-pull", "quay-pull", "regcred"];

const EXCLUDES: &[&str] = &[
    "registry.k8s.io/**",
    "docker.io/library/busybox",
    "quay.io/*/*",
    "**/internal/**",
    "ghcr.io/org/*",
];

const NAMESPACES: &[&str] = &["default", "shop", "legacy", "kube-system", "image-rewriter"];

#[derive(Debug, Clone)]
struct PolicyCase {
    yaml: String,
    excludes: Vec<&'static str>,
    excluded_namespaces: Vec<&'static str>,
    targets: Vec<&'static str>,
}

fn policy_case() -> impl Strategy<Value = PolicyCase> {
    (
        proptest::sample::subsequence(MATCHES.to_vec(), 0..=5),
        proptest::sample::subsequence(TARGETS.to_vec(), TARGETS.len()),
        proptest::collection::vec(proptest::option::of(proptest::sample::select(SECRETS)), 6),
        proptest::sample::subsequence(EXCLUDES.to_vec(), 0..=3),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(matches, targets, secrets, excludes, exclude_legacy, seed)| {
                // Pair each match with a distinct target, rotated by the seed.
                let rotation = (seed % targets.len() as u64) as usize;
                let mut yaml = String::from("rules:\n");
                let mut used = Vec::new();
                for (i, m) in matches.iter().enumerate() {
                    let target = targets[(i + rotation) % targets.len()];
                    used.push(target);
                    yaml.push_str(&format!("  - match: {m}\n    target: {target}\n"));
                    if let Some(secret) = secrets[i] {
                        yaml.push_str(&format!("    pullSecret: {secret}\n"));
                    }
                }
                if matches.is_empty() {
                    yaml = "rules: []\n".into();
                }
                let excluded_namespaces = if exclude_legacy {
                    vec!["legacy"]
                } else {
                    vec![]
                };
                yaml.push_str(&format!(
                    "exclude:\n  images: {}\n  namespaces: {}\n",
                    serde_json::to_string(&excludes).unwrap(),
                    serde_json::to_string(&excluded_namespaces).unwrap()
                ));
                PolicyCase {
                    yaml,
                    excludes,
                    excluded_namespaces,
                    targets: used,
                }
            },
        )
}

/// An image as written, and what the generator knows about it.
#[derive(Debug, Clone)]
struct ImageCase {
    text: String,
    valid: bool,
    /// `:tag`, `@digest`, `:tag@digest` or "" as written.
    suffix: String,
}

fn valid_image() -> impl Strategy<Value = ImageCase> {
    let host = proptest::option::of(proptest::sample::select(vec![
        "docker.io",
        "index.docker.io",
        "quay.io",
        "ghcr.io",
        "gcr.io",
        "registry.k8s.io",
        "localhost:5000",
        "localhost",
        "reg.example:8443",
        "harbor.corp.example",
        "10.0.0.5:8443",
        "mirror.example",
        "DOCKER.IO",
    ]));
    let component = proptest::sample::select(vec![
        "library",
        "nginx",
        "org",
        "team",
        "app",
        "bitnami",
        "redis",
        "internal",
        "hub",
        "quay",
        "mycorp-mirror",
        "proxy",
        "cache",
        "busybox",
        "a.b",
        "x_y",
        "z--w",
        "node-exporter",
    ]);
    let path = proptest::collection::vec(component, 1..=3);
    let tag = proptest::option::of(proptest::sample::select(vec![
        "1.27",
        "v1.8.0",
        "latest",
        "1.0-Alpine",
        "_x",
        "3.9",
    ]));
    let digest = proptest::option::of("[0-9a-f]{64}".prop_map(|hex| format!("sha256:{hex}")));
    (host, path, tag, digest).prop_map(|(host, path, tag, digest)| {
        let mut text = match host {
            Some(host) => format!("{host}/{}", path.join("/")),
            None => path.join("/"),
        };
        let mut suffix = String::new();
        if let Some(tag) = tag {
            suffix.push_str(&format!(":{tag}"));
        }
        if let Some(digest) = digest {
            suffix.push_str(&format!("@{digest}"));
        }
        text.push_str(&suffix);
        ImageCase {
            text,
            valid: true,
            suffix,
        }
    })
}

fn invalid_image() -> impl Strategy<Value = ImageCase> {
    proptest::sample::select(vec![
        "NGINX",
        "nginx:",
        "",
        "Foo/Bar",
        "nginx@sha256:abc",
        ":tag",
        "a//b",
        "-x",
        "nginx:tag with space",
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "quay.io/Org/App",
        "nginx@md5:0123456789abcdef0123456789abcdef",
        "docker.io/library/nginx:1.27:extra",
    ])
    .prop_map(|text| ImageCase {
        text: text.to_owned(),
        valid: false,
        suffix: String::new(),
    })
}

fn image() -> impl Strategy<Value = ImageCase> {
    prop_oneof![6 => valid_image(), 1 => invalid_image()]
}

#[derive(Debug, Clone)]
enum AnnotationsCase {
    NoMap,
    Others,
    OursValid,
    OursInvalid,
}

#[derive(Debug, Clone)]
struct PodCase {
    namespace: &'static str,
    init: Vec<ImageCase>,
    containers: Vec<ImageCase>,
    ephemeral: Vec<ImageCase>,
    pull_secrets: Option<Vec<&'static str>>,
    annotations: AnnotationsCase,
    opted_out: bool,
}

fn pod_case() -> impl Strategy<Value = PodCase> {
    (
        proptest::sample::select(NAMESPACES),
        proptest::collection::vec(image(), 0..3),
        proptest::collection::vec(image(), 1..5),
        proptest::collection::vec(image(), 0..2),
        proptest::option::of(proptest::sample::subsequence(SECRETS.to_vec(), 0..=3)),
        prop_oneof![
            Just(AnnotationsCase::NoMap),
            Just(AnnotationsCase::Others),
            Just(AnnotationsCase::OursValid),
            Just(AnnotationsCase::OursInvalid),
        ],
        proptest::bool::weighted(0.05),
    )
        .prop_map(
            |(namespace, init, containers, ephemeral, pull_secrets, annotations, opted_out)| {
                PodCase {
                    namespace,
                    init,
                    containers,
                    ephemeral,
                    pull_secrets,
                    annotations,
                    opted_out,
                }
            },
        )
}

impl PodCase {
    fn names(list: &str, images: &[ImageCase]) -> Vec<(String, String)> {
        images
            .iter()
            .enumerate()
            .map(|(i, image)| (format!("{list}-{i}"), image.text.clone()))
            .collect()
    }

    fn to_json(&self) -> Value {
        let init = Self::names("init", &self.init);
        let containers = Self::names("app", &self.containers);
        let init_pairs: Vec<(&str, &str)> =
            init.iter().map(|(n, i)| (n.as_str(), i.as_str())).collect();
        let container_pairs: Vec<(&str, &str)> = containers
            .iter()
            .map(|(n, i)| (n.as_str(), i.as_str()))
            .collect();
        let mut object = pod(
            self.namespace,
            &init_pairs,
            &container_pairs,
            self.pull_secrets.as_deref(),
        );
        if !self.ephemeral.is_empty() {
            object["spec"]["ephemeralContainers"] = Self::names("debug", &self.ephemeral)
                .iter()
                .map(|(n, i)| ephemeral_container(n, i, "app-0"))
                .collect();
        }
        match self.annotations {
            AnnotationsCase::NoMap => {
                object["metadata"]
                    .as_object_mut()
                    .unwrap()
                    .remove("annotations");
            }
            AnnotationsCase::Others => {}
            AnnotationsCase::OursValid => {
                object["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION] =
                    json!(r#"{"app-0":"old:1","istio-proxy":"istio/proxyv2:1.22"}"#);
            }
            AnnotationsCase::OursInvalid => {
                object["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION] = json!("oops");
            }
        }
        if self.opted_out {
            object["metadata"]["labels"]["image-rewriter.io/enabled"] = json!("false");
        }
        object
    }

    fn all_images(&self) -> Vec<(&'static str, &ImageCase)> {
        self.init
            .iter()
            .map(|i| ("initContainers", i))
            .chain(self.containers.iter().map(|i| ("containers", i)))
            .chain(self.ephemeral.iter().map(|i| ("ephemeralContainers", i)))
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Independent oracles
// ---------------------------------------------------------------------------

/// The normalized name of a valid reference (distribution/reference rules,
/// enough for the generator's vocabulary): `nginx` is
/// `docker.io/library/nginx`, `index.docker.io` is `docker.io`.
fn normalized_name(image: &str) -> String {
    let without_digest = image.split('@').next().unwrap();
    let (first, rest) = without_digest
        .split_once('/')
        .unwrap_or(("", without_digest));
    let is_host = !first.is_empty()
        && (first.contains('.')
            || first.contains(':')
            || first == "localhost"
            || first != first.to_lowercase());
    let (host, path) = if is_host {
        (
            if first == "index.docker.io" {
                "docker.io"
            } else {
                first
            },
            rest.to_owned(),
        )
    } else {
        ("docker.io", without_digest.to_owned())
    };
    // Strip a tag from the last component.
    let path = match path.rsplit_once('/') {
        Some((head, last)) => format!("{head}/{}", last.split(':').next().unwrap()),
        None => path.split(':').next().unwrap().to_owned(),
    };
    let path = if host == "docker.io" && !path.contains('/') {
        format!("library/{path}")
    } else {
        path
    };
    format!("{host}/{path}")
}

/// `*` within a component, `**` across components (whole components only,
/// enough for the generator's patterns).
fn glob_matches(pattern: &str, name: &str) -> bool {
    fn go(p: &[&str], n: &[&str]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            // A trailing `**` needs at least one component (globset's rule).
            (Some(&"**"), _) if p.len() == 1 => !n.is_empty(),
            (Some(&"**"), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(&"*"), Some(_)) => go(&p[1..], &n[1..]),
            (Some(lit), Some(part)) => lit == part && go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    let p: Vec<&str> = pattern.split('/').collect();
    let n: Vec<&str> = name.split('/').collect();
    go(&p, &n)
}

// ---------------------------------------------------------------------------
// The property
// ---------------------------------------------------------------------------

fn check(policy_case: &PolicyCase, pod_case: &PodCase) -> Result<(), TestCaseError> {
    let policy = ConfigFile::from_yaml(&policy_case.yaml)
        .and_then(|c| c.into_policy(Some("image-rewriter")))
        .map_err(|e| {
            TestCaseError::fail(format!(
                "generated config refused: {e}\n{}",
                policy_case.yaml
            ))
        })?;
    let object = pod_case.to_json();
    let review = admission_review(object.clone(), "CREATE", pod_case.namespace);
    let (body, patch) = review_in_process(&policy, &review);
    let (patched, _pod) = pod_after(&review["request"]["object"], patch.as_ref());

    // Reinvocation: nothing more to do.
    let again = admission_review(patched.clone(), "CREATE", pod_case.namespace);
    let (_, second) = review_in_process(&policy, &again);
    prop_assert!(
        second.is_none(),
        "second patch {:?}\nfirst {:?}",
        second,
        patch
    );

    let namespace_excluded = [
        "kube-system",
        "kube-public",
        "kube-node-lease",
        "image-rewriter",
    ]
    .contains(&pod_case.namespace)
        || policy_case
            .excluded_namespaces
            .contains(&pod_case.namespace);
    if namespace_excluded || pod_case.opted_out {
        prop_assert!(patch.is_none());
        prop_assert_eq!(&patched, &object);
        return Ok(());
    }

    let warnings = warnings_of(&body);
    let annotation: Option<BTreeMap<String, String>> = patched["metadata"]["annotations"]
        [ORIGINAL_IMAGES_ANNOTATION]
        .as_str()
        .and_then(|text| serde_json::from_str(text).ok());
    let mut changed = 0;
    let mut counters = BTreeMap::<&str, usize>::new();
    for (list, case) in pod_case.all_images() {
        let index = counters.entry(list).or_default();
        let name = format!(
            "{}-{}",
            match list {
                "initContainers" => "init",
                "containers" => "app",
                _ => "debug",
            },
            *index
        );
        let after = patched["spec"][list][*index]["image"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        *index += 1;
        if !case.valid {
            prop_assert_eq!(&after, &case.text, "unparsable image changed");
            prop_assert!(
                warnings.iter().any(|w| w.contains(&format!(
                    "{name:?}: image {:?} is not a valid reference",
                    case.text
                ))),
                "no warning for {:?} in {:?}",
                case.text,
                warnings
            );
            continue;
        }
        let normalized = normalized_name(&case.text);
        if policy_case
            .excludes
            .iter()
            .any(|g| glob_matches(g, &normalized))
        {
            prop_assert_eq!(&after, &case.text, "excluded image changed");
        }
        if after != case.text {
            changed += 1;
            // Tag and digest as written; no tag added.
            prop_assert!(after.ends_with(&case.suffix), "{} -> {}", case.text, after);
            let last = after.rsplit('/').next().unwrap();
            if case.suffix.is_empty() {
                prop_assert!(
                    !last.contains(':') && !last.contains('@'),
                    "{} -> {}",
                    case.text,
                    after
                );
            }
            // Under one of the targets, on a component boundary.
            prop_assert!(
                policy_case
                    .targets
                    .iter()
                    .any(|t| after.starts_with(&format!("{t}/"))),
                "{} -> {} is under no target",
                case.text,
                after
            );
            let recorded = annotation.as_ref().and_then(|a| a.get(&name));
            prop_assert_eq!(recorded, Some(&case.text), "annotation for {}", name);
        }
    }
    if changed == 0 {
        prop_assert!(
            patch
                .as_ref()
                .is_none_or(|p| p.as_array().unwrap().iter().all(|op| op["path"]
                    .as_str()
                    .unwrap()
                    .starts_with("/spec/imagePullSecrets"))),
            "nothing rewritten, yet {:?}",
            patch
        );
    }

    // Pull secrets: existing kept in order as a prefix, none twice.
    if let Some(secrets) = pull_secrets(&patched) {
        let unique: HashSet<&String> = secrets.iter().collect();
        prop_assert_eq!(
            unique.len(),
            secrets.len(),
            "duplicate pull secret: {:?}",
            secrets
        );
        if let Some(existing) = &pod_case.pull_secrets {
            prop_assert!(
                secrets.iter().zip(existing.iter()).all(|(a, b)| a == b)
                    && secrets.len() >= existing.len(),
                "existing {:?} not kept as prefix of {:?}",
                existing,
                secrets
            );
        }
    }
    // Other annotations never touched.
    if let Some(before) = object["metadata"]["annotations"].as_object() {
        for (key, value) in before {
            if key != ORIGINAL_IMAGES_ANNOTATION {
                prop_assert_eq!(&patched["metadata"]["annotations"][key], value);
            }
        }
    }
    // Unknown fields kept.
    prop_assert_eq!(&patched["spec"]["someFutureField"], &json!({"x": 1}));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn create_reviews_are_sound(policy in policy_case(), pod in pod_case()) {
        check(&policy, &pod)?;
    }
}

#[test]
fn oracles_agree_with_the_documented_examples() {
    assert_eq!(normalized_name("nginx"), "docker.io/library/nginx");
    assert_eq!(
        normalized_name("index.docker.io/nginx:1"),
        "docker.io/library/nginx"
    );
    assert_eq!(
        normalized_name("localhost:5000/a/b:1@sha256:00"),
        "localhost:5000/a/b"
    );
    assert_eq!(normalized_name("org/app:v1"), "docker.io/org/app");
    assert!(glob_matches("registry.k8s.io/**", "registry.k8s.io/a/b"));
    assert!(glob_matches("quay.io/*/*", "quay.io/a/b"));
    assert!(!glob_matches("quay.io/*/*", "quay.io/a/b/c"));
    assert!(glob_matches("**/internal/**", "quay.io/internal/x"));
    assert!(!glob_matches("**/internal/**", "quay.io/internal"));
    assert!(!glob_matches("registry.k8s.io/**", "registry.k8s.io"));
    assert!(!glob_matches("ghcr.io/org/*", "ghcr.io/org/a/b"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    /// `mutate`'s YAML reader answers any text with documents or an error,
    /// never a panic.
    #[test]
    fn the_kubectl_yaml_reader_never_panics(
        text in "[-+_.0-9a-fA-FxXoObB~:&*<>!{}\\[\\],'\" \n#|%]{0,60}"
    ) {
        let _ = image_rewriter::kubectl_yaml::documents(&text);
    }

    /// Number-like scalars (the reader's own parsing) never panic plain,
    /// and stay the very strings quoted.
    #[test]
    fn number_like_plain_scalars_never_panic_and_quoted_ones_stay_strings(
        scalar in "[-+_.0-9a-fA-FxXoObBeE]{1,24}"
    ) {
        let _ = image_rewriter::kubectl_yaml::documents(&format!("v: {scalar}\n"));
        let quoted = image_rewriter::kubectl_yaml::documents(&format!("v: '{scalar}'\n"))
            .expect("a quoted scalar is valid YAML");
        prop_assert_eq!(&quoted.documents[0]["v"], &json!(scalar));
    }
}

// ---------------------------------------------------------------------------
// Reviews of every shape, nested targets included
// ---------------------------------------------------------------------------

/// Policies the generators above leave out: one rule's target under another
/// rule's match (quay.io's under docker.io's), a target on Docker Hub, an
/// IPv6 target, a host with capitals, and an exclusion.
const NESTED_CONFIGS: &[&str] = &[
    "rules:\n\
     \x20 - match: docker.io\n    target: harbor.example/hub\n    pullSecret: a\n\
     \x20 - match: quay.io\n    target: harbor.example/hub/quay\n    pullSecret: a\n\
     \x20 - match: ghcr.io\n    target: docker.io/mirror\n    pullSecret: b\n\
     \x20 - match: harbor.example\n    target: other.example\n\
     exclude:\n  images: [\"**/keep\"]\n",
    "rules:\n\
     \x20 - match: docker.io/library\n    target: \"[fd00::1]:5000\"\n    pullSecret: b\n\
     \x20 - match: docker.io\n    target: Harbor.Example/x\n\
     \x20 - match: localhost:5000\n    target: localhost:5000/proxy\n    pullSecret: c\n",
];

const SHAPED_IMAGES: &[&str] = &[
    "nginx",
    "nginx:1",
    "keep",
    "quay.io/a/b:2",
    "ghcr.io/o/r",
    "ghcr.io/o",
    "harbor.example/z",
    "localhost:5000/x",
    "NOPE",
    "",
    "bitnami/redis@sha256:0000000000000000000000000000000000000000000000000000000000000000",
    "harbor.example/hub/library/nginx",
    "docker.io/mirror/o/r",
];

/// A field of the pod: left out, `null`, empty, or holding values.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Absent,
    Null,
    Empty,
    Present,
}

fn shape() -> impl Strategy<Value = Shape> {
    prop_oneof![
        Just(Shape::Absent),
        Just(Shape::Null),
        Just(Shape::Empty),
        Just(Shape::Present)
    ]
}

/// Containers named `{prefix}0`, `{prefix}1`...; `None` has no image.
fn containers(prefix: &str, images: &[Option<&str>]) -> Value {
    images
        .iter()
        .enumerate()
        .map(|(i, image)| {
            let mut container = json!({"name": format!("{prefix}{i}"), "resources": {}});
            if let Some(image) = image {
                container["image"] = json!(image);
            }
            container
        })
        .collect()
}

fn images(most: usize) -> impl Strategy<Value = Vec<Option<&'static str>>> {
    proptest::collection::vec(
        proptest::option::of(proptest::sample::select(SHAPED_IMAGES)),
        0..most,
    )
}

#[derive(Debug, Clone)]
struct ShapedReview {
    config: &'static str,
    init: Vec<Option<&'static str>>,
    regular: Vec<Option<&'static str>>,
    old_ephemeral: Vec<Option<&'static str>>,
    new_ephemeral: Vec<Option<&'static str>>,
    pull_secrets: Vec<&'static str>,
    pull_secrets_shape: Shape,
    annotations_shape: Shape,
    original_images: Option<&'static str>,
    metadata_null: bool,
    /// A `pods/ephemeralcontainers` UPDATE (`kubectl debug`), else a CREATE.
    debug: bool,
}

fn shaped_review() -> impl Strategy<Value = ShapedReview> {
    let original_images = proptest::option::of(prop_oneof![
        Just(r#"{"c0":"x","gone":"y"}"#),
        Just("oops"),
        Just("null"),
        Just("[]"),
        Just(""),
    ]);
    (
        proptest::sample::select(NESTED_CONFIGS),
        (images(3), images(3), images(2), images(3)),
        proptest::collection::vec(
            proptest::sample::select(&["a", "b", "c", "", "z"][..]),
            0..3,
        ),
        (shape(), shape(), original_images),
        (any::<bool>(), any::<bool>()),
    )
        .prop_map(
            |(
                config,
                (init, regular, old_ephemeral, new_ephemeral),
                pull_secrets,
                (pull_secrets_shape, annotations_shape, original_images),
                (metadata_null, debug),
            )| ShapedReview {
                config,
                init,
                regular,
                old_ephemeral,
                new_ephemeral,
                pull_secrets,
                pull_secrets_shape,
                annotations_shape,
                original_images,
                metadata_null,
                debug,
            },
        )
}

impl ShapedReview {
    fn pod(&self) -> Value {
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": {"containers": containers("c", &self.regular)}
        });
        if !self.init.is_empty() {
            pod["spec"]["initContainers"] = containers("i", &self.init);
        }
        let pull_secrets = match self.pull_secrets_shape {
            Shape::Absent => None,
            Shape::Null => Some(Value::Null),
            Shape::Empty => Some(json!([])),
            Shape::Present => Some(
                self.pull_secrets
                    .iter()
                    .map(|name| match *name {
                        "" => json!({}),
                        name => json!({ "name": name }),
                    })
                    .collect(),
            ),
        };
        if let Some(pull_secrets) = pull_secrets {
            pod["spec"]["imagePullSecrets"] = pull_secrets;
        }
        match self.annotations_shape {
            Shape::Absent => {}
            Shape::Null => pod["metadata"]["annotations"] = Value::Null,
            Shape::Empty => pod["metadata"]["annotations"] = json!({}),
            Shape::Present => {
                pod["metadata"]["annotations"] = json!({"a/b~c": "d"});
                if let Some(value) = self.original_images {
                    pod["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION] = json!(value);
                }
            }
        }
        if self.metadata_null && !self.debug {
            pod["metadata"] = Value::Null;
        }
        pod
    }

    fn review(&self) -> Value {
        let pod = self.pod();
        if !self.debug {
            return admission_review(pod, "CREATE", "shop");
        }
        let mut old = pod;
        if !self.old_ephemeral.is_empty() {
            old["spec"]["ephemeralContainers"] = containers("e", &self.old_ephemeral);
        }
        let mut new = old.clone();
        let all: Vec<_> = self
            .old_ephemeral
            .iter()
            .chain(&self.new_ephemeral)
            .copied()
            .collect();
        if !all.is_empty() {
            new["spec"]["ephemeralContainers"] = containers("e", &all);
        }
        ephemeral_containers_review(old, new, "shop")
    }
}

fn pull_secret_names(pod: &Value) -> Vec<&str> {
    pod["spec"]["imagePullSecrets"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|entry| entry["name"].as_str().unwrap_or(""))
                .collect()
        })
        .unwrap_or_default()
}

fn check_shaped(case: &ShapedReview) -> Result<(), TestCaseError> {
    let policy = ConfigFile::from_yaml(case.config)
        .unwrap()
        .into_policy(Some("image-rewriter"))
        .unwrap();
    let review = case.review();
    let (_, patch) = review_in_process(&policy, &review);
    let sent = &review["request"]["object"];
    let patched = match &patch {
        Some(patch) => apply_json_patch(sent, patch)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{sent:#}\n{patch:#}")))?,
        None => sent.clone(),
    };

    if case.debug {
        // Only the new ephemeral containers' images may change.
        let (mut after, mut before) = (patched.clone(), sent.clone());
        let new = case.old_ephemeral.len()..case.old_ephemeral.len() + case.new_ephemeral.len();
        for i in new {
            after["spec"]["ephemeralContainers"][i]["image"] = Value::Null;
            before["spec"]["ephemeralContainers"][i]["image"] = Value::Null;
        }
        prop_assert_eq!(
            after,
            before,
            "more than new ephemeral images changed: {:?}",
            patch
        );
    }

    let mut again = review.clone();
    again["request"]["object"] = patched.clone();
    again["request"]["uid"] = json!(new_uid());
    let (_, second) = review_in_process(&policy, &again);
    prop_assert!(
        second.is_none(),
        "second pass {second:?} after {patch:?}\n{sent:#}"
    );

    // The pull secrets sent stay first, in order; those added are new and
    // each added once.
    let (sent_names, names) = (pull_secret_names(sent), pull_secret_names(&patched));
    prop_assert_eq!(&names[..sent_names.len()], &sent_names[..]);
    let added = &names[sent_names.len()..];
    for (i, name) in added.iter().enumerate() {
        prop_assert!(
            !sent_names.contains(name) && !added[..i].contains(name),
            "{:?}",
            names
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// CREATE and `kubectl debug` reviews, with pull secrets and annotations
    /// absent, null, empty or set, under policies with nested targets: the
    /// patch applies as sent, `kubectl debug` changes only new ephemeral
    /// images, a second pass changes nothing, and pull secrets keep order.
    #[test]
    fn reviews_of_every_shape_apply_and_settle(case in shaped_review()) {
        check_shaped(&case)?;
    }
}
