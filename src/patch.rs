//! Pod (or pod template) in, targeted JSON Patch operations out.
//!
//! Pure: no I/O. The patch is a list of targeted operations, never a
//! re-serialized Pod: k8s-openapi would drop fields it does not know, and the
//! apiserver applies every operation to the pod exactly as it sent it.

use std::collections::{BTreeMap, HashSet};

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation, ReplaceOperation};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Map, Value, json};

use crate::pod::{ContainerImage, PodImages};
use crate::policy::{Decision, Policy};

/// Records, per container name, the image as written before the rewrite.
pub const ORIGINAL_IMAGES_ANNOTATION: &str = "image-rewriter.io/original-images";
/// The same record for image volumes, by volume name: apart, so that the
/// original-images annotation stays container name to image.
pub const ORIGINAL_VOLUME_IMAGES_ANNOTATION: &str = "image-rewriter.io/original-volume-images";
/// On a namespace or a pod: `"false"` opts out (and `"true"` opts a namespace
/// in, in opt-in mode).
pub const ENABLED_LABEL: &str = "image-rewriter.io/enabled";
/// The kubelet's mark on the API copy of a static pod. Such a pod is left
/// alone: the apiserver refuses a mirror pod that references a secret (an
/// added `imagePullSecrets` entry), and its images must stay those the
/// kubelet runs from the manifest on the node.
pub const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Which containers a request may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// A new pod (or a pod template): every container, plus pull secrets and
    /// the original-images annotation.
    WholePod,
    /// `pods/ephemeralcontainers` UPDATE: only ephemeral containers whose
    /// names are not in `existing`; the apiserver keeps nothing else.
    NewEphemeralContainers { existing: HashSet<String> },
}

/// One image the plan moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewrittenImage {
    /// The container's name, or the image volume's.
    pub container: String,
    /// An image volume's: recorded in [`ORIGINAL_VOLUME_IMAGES_ANNOTATION`].
    pub volume: bool,
    pub from: String,
    pub to: String,
    /// The rule's `match`, as the metrics label it.
    pub rule: String,
}

/// What to do to one pod, and what to tell the user about it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodPlan {
    pub operations: Vec<PatchOperation>,
    pub rewritten: Vec<RewrittenImage>,
    pub warnings: Vec<String>,
    /// Images that are not valid references (left as written).
    pub unparsable: usize,
    /// The pull secrets the pod references for its rewritten (or already
    /// moved) images, in order of first use: these must exist in its
    /// namespace. Empty for ephemeral containers, which cannot add any.
    pub pull_secrets: Vec<String>,
    /// The pod carried the original-images or original-volume-images
    /// annotation already: an earlier pass rewrote some of its images (a
    /// reinvocation, or a pod made from a rewritten one).
    pub rewritten_before: bool,
}

/// A pod, or the pod template of a workload, located in a larger document.
#[derive(Debug, Clone, Copy)]
pub struct PodView<'a> {
    /// The namespace the pod is created in, when known.
    pub namespace: Option<&'a str>,
    pub metadata: Option<&'a ObjectMeta>,
    /// The bytes of all the pod's annotations' keys and values, `metadata`
    /// holding only those the policy reads: see [`annotations_bytes`].
    pub annotations_bytes: usize,
    pub spec: Option<&'a PodImages>,
    /// JSON Pointer tokens from the document root to the object holding
    /// `metadata` and `spec`: empty for a Pod, `["spec", "template"]` for a
    /// Deployment.
    pub location: &'a [&'a str],
}

/// Plans the patch for one pod.
pub fn plan_pod_patch(policy: &Policy, pod: PodView<'_>, scope: &Scope) -> PodPlan {
    let mut plan = PodPlan::default();
    let Some(spec) = pod.spec else {
        return plan;
    };
    if pod
        .namespace
        .is_some_and(|ns| policy.excludes_namespace(ns))
        || opted_out(pod.metadata)
        || is_mirror_pod(pod.metadata)
    {
        return plan;
    }
    let pointer = |tokens: &[&str]| json_pointer(pod.location, tokens, None);

    let existing_secrets: HashSet<&str> = spec
        .image_pull_secrets
        .iter()
        .flatten()
        .map(|secret| secret.name.as_str())
        .collect();
    let mut needed_secrets = PullSecretSet::default();
    // About what the whole pod lacks: they go before the per-container
    // warnings, as the apiserver shows only the first 4096 characters.
    let mut missing_secret_warnings = Vec::new();
    for (list, kind, containers) in container_lists(spec) {
        for (index, container) in containers.iter().enumerate() {
            let (name, image) = (container.name.as_str(), container.image.as_deref());
            let is_new = match scope {
                Scope::WholePod => true,
                Scope::NewEphemeralContainers { existing } => {
                    list == "ephemeralContainers" && !existing.contains(name)
                }
            };
            let Some(image) = image.filter(|_| is_new) else {
                continue;
            };
            let decision = policy.decide(image);
            let site = ImageSite {
                kind,
                volume: false,
                name,
                image,
            };
            plan_image(&mut plan, &decision, &site, || {
                json_pointer(pod.location, &["spec", list], Some((index, "image")))
            });
            let Some(secret) = decision.rule().and_then(|rule| rule.pull_secret.as_deref()) else {
                continue;
            };
            // Once per missing secret, at the first container that needs it,
            // and without the image: a reinvocation sees it rewritten, and
            // only the same words are shown to the user once.
            if matches!(scope, Scope::NewEphemeralContainers { .. })
                && !existing_secrets.contains(secret)
                && !needed_secrets.contains(secret)
            {
                missing_secret_warnings.push(format!(
                    "{kind} {}: the pod has no imagePullSecret {secret:?}, which its image's \
                     registry needs; ephemeral containers cannot add one, so the pull may fail",
                    quoted_for_warning(name, NAME_CHARS_IN_WARNING),
                ));
            }
            needed_secrets.insert(secret);
        }
    }
    plan.warnings.splice(0..0, missing_secret_warnings);

    if *scope == Scope::WholePod {
        // Pulled by the kubelet as container images are, with the pod's
        // pull secrets; a pod's volumes never change after it is created.
        for volume in &spec.image_volumes {
            let decision = policy.decide(&volume.reference);
            let site = ImageSite {
                kind: "image volume",
                volume: true,
                name: &volume.name,
                image: &volume.reference,
            };
            plan_image(&mut plan, &decision, &site, || {
                let index = itoa::Buffer::new().format(volume.index).to_owned();
                json_pointer(
                    pod.location,
                    &["spec", "volumes", &index, "image", "reference"],
                    None,
                )
            });
            if let Some(secret) = decision.rule().and_then(|rule| rule.pull_secret.as_deref()) {
                needed_secrets.insert(secret);
            }
        }
        plan.operations.extend(pull_secret_operations(
            spec,
            &existing_secrets,
            &needed_secrets,
            &pointer,
        ));
        plan.pull_secrets = needed_secrets.0.iter().map(|s| (*s).to_owned()).collect();
        plan.rewritten_before = pod
            .metadata
            .and_then(|m| m.annotations.as_ref())
            .is_some_and(|a| {
                a.contains_key(ORIGINAL_IMAGES_ANNOTATION)
                    || a.contains_key(ORIGINAL_VOLUME_IMAGES_ANNOTATION)
            });
        if !plan.rewritten.is_empty() {
            let warnings = original_images_operations(
                pod.metadata,
                pod.annotations_bytes,
                &plan.rewritten,
                &pointer,
                &mut plan.operations,
            );
            // First: they are about the whole pod, and the apiserver shows
            // only the first 4096 characters of warnings.
            plan.warnings.splice(0..0, warnings);
        }
    }
    plan
}

/// One image a pod pulls, as a warning names it.
struct ImageSite<'a> {
    /// `container`, `init container`, `ephemeral container`, `image volume`.
    kind: &'static str,
    volume: bool,
    name: &'a str,
    image: &'a str,
}

/// Adds to `plan` what `decision` says of the image at `site`: the
/// replacement at `path()` and its record, or a warning.
fn plan_image(
    plan: &mut PodPlan,
    decision: &Decision<'_>,
    site: &ImageSite<'_>,
    path: impl FnOnce() -> PointerBuf,
) {
    let ImageSite {
        kind,
        volume,
        name,
        image,
    } = *site;
    match decision {
        Decision::Rewrite {
            image: new_image,
            rule,
        } => {
            plan.operations
                .push(PatchOperation::Replace(ReplaceOperation {
                    path: path(),
                    value: Value::String(new_image.clone()),
                }));
            plan.rewritten.push(RewrittenImage {
                container: name.to_owned(),
                volume,
                from: image.to_owned(),
                to: new_image.clone(),
                rule: rule.match_prefix.clone(),
            });
        }
        Decision::Unparsable(error) => {
            plan.unparsable += 1;
            plan.warnings.push(format!(
                "{kind} {}: image {} is not a valid reference ({error}); left unchanged",
                quoted_for_warning(name, NAME_CHARS_IN_WARNING),
                quoted_for_warning(image, IMAGE_CHARS_IN_WARNING),
            ));
        }
        Decision::InvalidResult { reason, .. } => plan.warnings.push(format!(
            "{kind} {}: image {} left unchanged: {reason}",
            quoted_for_warning(name, NAME_CHARS_IN_WARNING),
            quoted_for_warning(image, IMAGE_CHARS_IN_WARNING),
        )),
        Decision::AlreadyUnderTarget { .. } | Decision::Excluded | Decision::NoMatchingRule => {}
    }
}

/// The most characters of a container name, and of an image, that a
/// warning quotes. Both are user input, checked only after mutating
/// admission: the apiserver keeps 4096 characters of warnings per request
/// and, past that, cuts every warning (other webhooks' and admission
/// plugins' too) to 256.
const NAME_CHARS_IN_WARNING: usize = 64;
const IMAGE_CHARS_IN_WARNING: usize = 100;

/// `text` quoted (control characters escaped: the apiserver drops a
/// warning that holds one), cut to `at_most` characters with its length
/// said.
fn quoted_for_warning(text: &str, at_most: usize) -> String {
    match text.char_indices().nth(at_most) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &text[..cut], text.len()),
    }
}

/// `location` and `tokens` as a JSON Pointer, then `/index/last` when given.
fn json_pointer(location: &[&str], tokens: &[&str], item: Option<(usize, &str)>) -> PointerBuf {
    // Every token is escaped as RFC 6901 says, so this parse only checks;
    // the slow path is there so no mistake here can panic.
    PointerBuf::parse(escaped_pointer(location, tokens, item))
        .unwrap_or_else(|_| pointer_from_tokens(location, tokens, item))
}

/// The pointer's text, written into one buffer of the right size
/// (`PointerBuf::from_tokens` grows its string token by token: a third of
/// the plan's allocations).
fn escaped_pointer(location: &[&str], tokens: &[&str], item: Option<(usize, &str)>) -> String {
    let mut index_text = itoa::Buffer::new();
    let index = item.map(|(index, _)| index_text.format(index));
    let last = item.map(|(_, last)| last);
    let all_tokens = || {
        location
            .iter()
            .chain(tokens)
            .copied()
            .chain(index)
            .chain(last)
    };
    let capacity = all_tokens().map(escaped_len).sum();
    let mut text = String::with_capacity(capacity);
    for token in all_tokens() {
        text.push('/');
        if !token.bytes().any(must_escape) {
            text.push_str(token);
            continue;
        }
        for part in token.split_inclusive(['~', '/']) {
            match part.as_bytes().last() {
                Some(b'~') => {
                    text.push_str(&part[..part.len() - 1]);
                    text.push_str("~0");
                }
                Some(b'/') => {
                    text.push_str(&part[..part.len() - 1]);
                    text.push_str("~1");
                }
                _ => text.push_str(part),
            }
        }
    }
    debug_assert_eq!(text.len(), capacity, "escaped_len must be exact");
    text
}

/// `~` and `/`, the bytes RFC 6901 escapes. Byte-wise is exact for UTF-8:
/// neither byte occurs inside a multi-byte character.
fn must_escape(byte: u8) -> bool {
    matches!(byte, b'~' | b'/')
}

/// The length of `/token` escaped: `~` and `/` take two bytes each.
fn escaped_len(token: &str) -> usize {
    1 + token.len() + token.bytes().filter(|&byte| must_escape(byte)).count()
}

/// The same pointer through jsonptr's own escaping.
fn pointer_from_tokens(
    location: &[&str],
    tokens: &[&str],
    item: Option<(usize, &str)>,
) -> PointerBuf {
    let index = item.map(|(index, _)| index.to_string());
    let item_tokens = index
        .as_deref()
        .into_iter()
        .chain(item.map(|(_, last)| last));
    PointerBuf::from_tokens(location.iter().chain(tokens).copied().chain(item_tokens))
}

/// The annotation's text: the entries kept from it, ours over them, in key
/// order (as a serde_json map writes them), without copying our strings.
fn originals_text<'r, I>(kept: Map<String, Value>, rewritten: impl Fn() -> I) -> String
where
    I: Iterator<Item = &'r RewrittenImage>,
{
    #[derive(serde::Serialize)]
    #[serde(untagged)]
    enum Original<'a> {
        Kept(&'a Value),
        Ours(&'a str),
    }
    let mut merged: BTreeMap<&str, Original<'_>> = kept
        .iter()
        .map(|(container, image)| (container.as_str(), Original::Kept(image)))
        .collect();
    for image in rewritten() {
        merged.insert(&image.container, Original::Ours(&image.from));
    }
    // Cannot fail (string keys, plain values); if it did, the owned way.
    serde_json::to_string(&merged).unwrap_or_else(|_| {
        let mut owned = kept.clone();
        for image in rewritten() {
            owned.insert(image.container.clone(), Value::String(image.from.clone()));
        }
        Value::Object(owned).to_string()
    })
}

fn opted_out(metadata: Option<&ObjectMeta>) -> bool {
    metadata
        .and_then(|m| m.labels.as_ref())
        .and_then(|labels| labels.get(ENABLED_LABEL))
        .is_some_and(|value| value == "false")
}

fn is_mirror_pod(metadata: Option<&ObjectMeta>) -> bool {
    metadata
        .and_then(|m| m.annotations.as_ref())
        .is_some_and(|annotations| annotations.contains_key(MIRROR_POD_ANNOTATION))
}

/// Every container list, in the order pull secrets are first used: init
/// containers, containers, then ephemeral containers.
fn container_lists(spec: &PodImages) -> [(&'static str, &'static str, &[ContainerImage]); 3] {
    [
        (
            "initContainers",
            "init container",
            spec.init_containers.as_deref().unwrap_or_default(),
        ),
        ("containers", "container", &spec.containers),
        (
            "ephemeralContainers",
            "ephemeral container",
            spec.ephemeral_containers.as_deref().unwrap_or_default(),
        ),
    ]
}

/// Secret names in order of first use, each once.
#[derive(Debug, Default)]
struct PullSecretSet<'a>(Vec<&'a str>);

impl<'a> PullSecretSet<'a> {
    fn contains(&self, name: &str) -> bool {
        self.0.contains(&name)
    }

    fn insert(&mut self, name: &'a str) {
        if !self.0.contains(&name) {
            self.0.push(name);
        }
    }
}

/// Adds the missing secrets after the existing entries, which stay as they
/// are. `add .../imagePullSecrets/-` needs the array to exist, so an absent
/// field is added whole.
fn pull_secret_operations(
    spec: &PodImages,
    existing: &HashSet<&str>,
    needed: &PullSecretSet<'_>,
    pointer: &impl Fn(&[&str]) -> PointerBuf,
) -> Vec<PatchOperation> {
    let missing = needed
        .0
        .iter()
        .copied()
        .filter(|name| !existing.contains(name));
    let entry = |name: &str| json!({ "name": name });
    if spec.image_pull_secrets.is_some() {
        missing
            .map(|name| {
                PatchOperation::Add(AddOperation {
                    path: pointer(&["spec", "imagePullSecrets", "-"]),
                    value: entry(name),
                })
            })
            .collect()
    } else {
        let entries: Vec<Value> = missing.map(entry).collect();
        if entries.is_empty() {
            return Vec::new();
        }
        vec![PatchOperation::Add(AddOperation {
            path: pointer(&["spec", "imagePullSecrets"]),
            value: Value::Array(entries),
        })]
    }
}

/// The apiserver's bound on the bytes of a pod's annotations, keys and
/// values together (`TotalAnnotationSizeLimitB`): past it the pod is refused.
pub const ANNOTATIONS_BYTES_LIMIT: usize = 256 * 1024;

/// The bytes of `annotations` as the apiserver counts them against
/// [`ANNOTATIONS_BYTES_LIMIT`], for a caller holding the whole map.
pub fn annotations_bytes(annotations: &BTreeMap<String, String>) -> usize {
    annotations
        .iter()
        .map(|(key, value)| key.len() + value.len())
        .sum()
}

/// Sets the original-images entries of the containers rewritten now, and
/// the original-volume-images entries of the image volumes, keeping the
/// others (a reinvocation after another webhook added a container), by
/// adding the operations to `operations`. Not a record that would take the
/// pod's annotations past the apiserver's limit: the pod would be refused
/// for a record of ours, so the rewrite goes without it, and the user is
/// told (in the warnings returned). The containers' record goes first.
fn original_images_operations(
    metadata: Option<&ObjectMeta>,
    annotations_bytes: usize,
    rewritten: &[RewrittenImage],
    pointer: &impl Fn(&[&str]) -> PointerBuf,
    operations: &mut Vec<PatchOperation>,
) -> Vec<String> {
    let annotations = metadata.and_then(|m| m.annotations.as_ref());
    let mut warnings = Vec::new();
    // (annotation, whether the pod has it, its new text)
    let mut records: [Option<(&str, bool, Value)>; 2] = [None, None];
    let mut bytes_after = annotations_bytes;
    for (record, (annotation, volumes)) in records.iter_mut().zip([
        (ORIGINAL_IMAGES_ANNOTATION, false),
        (ORIGINAL_VOLUME_IMAGES_ANNOTATION, true),
    ]) {
        let images = || {
            rewritten
                .iter()
                .filter(move |image| image.volume == volumes)
        };
        if images().next().is_none() {
            continue;
        }
        let existing = annotations.and_then(|a| a.get(annotation));
        let mut replaced = None;
        let originals = match existing.map(|text| serde_json::from_str::<Value>(text)) {
            Some(Ok(Value::Object(map))) => map,
            Some(_) => {
                replaced = Some(format!(
                    "annotation {annotation} was not a JSON object; replaced"
                ));
                Map::new()
            }
            None => Map::new(),
        };
        let text = originals_text(originals, images);
        let with_this = bytes_after
            .saturating_sub(existing.map_or(0, |old| annotation.len() + old.len()))
            + annotation.len()
            + text.len();
        if with_this > ANNOTATIONS_BYTES_LIMIT {
            warnings.push(format!(
                "annotation {annotation} not written: it would take the pod's annotations to \
                 {with_this} bytes, past the apiserver's limit of {ANNOTATIONS_BYTES_LIMIT}; the \
                 images were rewritten without a record of the originals"
            ));
            continue;
        }
        warnings.extend(replaced);
        bytes_after = with_this;
        *record = Some((annotation, existing.is_some(), Value::String(text)));
    }
    let mut records = records.into_iter().flatten().peekable();
    if records.peek().is_none() {
        return warnings;
    }
    match (metadata.is_some(), annotations.is_some()) {
        (false, _) => operations.push(PatchOperation::Add(AddOperation {
            path: pointer(&["metadata"]),
            value: json!({ "annotations": all_records(records) }),
        })),
        (true, false) => operations.push(PatchOperation::Add(AddOperation {
            path: pointer(&["metadata", "annotations"]),
            value: all_records(records),
        })),
        (true, true) => {
            for (annotation, existed, value) in records {
                let path = pointer(&["metadata", "annotations", annotation]);
                operations.push(if existed {
                    PatchOperation::Replace(ReplaceOperation { path, value })
                } else {
                    PatchOperation::Add(AddOperation { path, value })
                });
            }
        }
    }
    warnings
}

/// The records as one annotations object.
fn all_records<'a>(records: impl Iterator<Item = (&'a str, bool, Value)>) -> Value {
    Value::Object(
        records
            .map(|(annotation, _, value)| (annotation.to_owned(), value))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The fast text, checked against jsonptr's escaping (not through
    /// `json_pointer`, whose fallback would hide a wrong fast path).
    fn assert_escapes_like_jsonptr(
        location: &[&str],
        tokens: &[&str],
        item: Option<(usize, &str)>,
    ) {
        let expected = pointer_from_tokens(location, tokens, item);
        assert_eq!(
            escaped_pointer(location, tokens, item),
            expected.as_str(),
            "{location:?} {tokens:?} {item:?}"
        );
        assert_eq!(json_pointer(location, tokens, item), expected);
    }

    #[test]
    fn json_pointer_escapes_like_jsonptr() {
        type Case<'a> = (&'a [&'a str], &'a [&'a str], Option<(usize, &'a str)>);
        let cases: [Case; 6] = [
            (&[], &[], None),
            (&[], &["spec", "containers"], Some((0, "image"))),
            (
                &["spec", "template"],
                &["spec", "initContainers"],
                Some((12, "image")),
            ),
            (
                &[],
                &["metadata", "annotations", ORIGINAL_IMAGES_ANNOTATION],
                None,
            ),
            (
                &["a~b", "~1/~0", ""],
                &["/", "~"],
                Some((usize::MAX, "x/~y")),
            ),
            (&["ümlaut/é~"], &[], None),
        ];
        for (location, tokens, item) in cases {
            assert_escapes_like_jsonptr(location, tokens, item);
        }
        assert_eq!(
            json_pointer(
                &[],
                &["metadata", "annotations", ORIGINAL_IMAGES_ANNOTATION],
                None
            )
            .as_str(),
            "/metadata/annotations/image-rewriter.io~1original-images"
        );
    }

    proptest! {
        #[test]
        fn escaped_pointer_matches_from_tokens(
            location in proptest::collection::vec(".*", 0..3),
            tokens in proptest::collection::vec("[a-z~/]*", 0..3),
            item in proptest::option::of((any::<usize>(), "\\PC*")),
        ) {
            let location: Vec<&str> = location.iter().map(String::as_str).collect();
            let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
            let item = item.as_ref().map(|(index, last)| (*index, last.as_str()));
            let expected = pointer_from_tokens(&location, &tokens, item);
            prop_assert_eq!(escaped_pointer(&location, &tokens, item), expected.as_str());
        }
    }
}
