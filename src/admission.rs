//! AdmissionReview bytes in, AdmissionReview bytes out.
//!
//! The glue between the HTTP server and the pure policy: decode with
//! kube-core's admission types, plan the patch, encode the answer the way the
//! apiserver reads it. No I/O here either, so it is tested without a server.

use std::collections::{HashMap, HashSet};

use base64::Engine as _;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::{ApiResource, DynamicResourceScope, ObjectMeta};

use crate::patch::{PodPlan, PodView, RewrittenImage, Scope, plan_pod_patch};
use crate::pod::PodObject;
use crate::policy::Policy;

const ADMISSION_V1: &str = "admission.k8s.io/v1";
/// The audit annotation (prefixed by the apiserver with the webhook name)
/// that records how many images a request rewrote.
pub const AUDIT_IMAGES_REWRITTEN: &str = "images-rewritten";
/// The same count, by a pass over a pod that carried the original-images
/// annotation already (a reinvocation).
pub const AUDIT_IMAGES_REWRITTEN_AGAIN: &str = "images-rewritten-again";

/// The longest warning sent, in characters; a longer one (an API error
/// quoted whole, say) is cut. The apiserver keeps 4096 characters of
/// warnings per request.
const MAX_WARNING_CHARS: usize = 512;

/// A warning the apiserver passes on: it silently drops one holding a
/// control character (an API error's message can hold line feeds), so
/// those become spaces; and it is cut to [`MAX_WARNING_CHARS`].
fn make_sendable(warning: &mut String) {
    if warning.chars().any(char::is_control) {
        *warning = warning
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
    }
    if let Some((cut, _)) = warning.char_indices().nth(MAX_WARNING_CHARS) {
        warning.truncate(cut);
        warning.push_str("...");
    }
}

/// The characters of warnings the apiserver shows per request, in the
/// order the answer lists them: past them it cuts every warning (other
/// webhooks' too) to 256 and stops at this many again
/// (k8s.io/apiserver/pkg/endpoints/filters/warning.go). An answer carries no
/// more, or a pod of thousands of unparsable images would be answered with
/// megabytes of warnings of which the user sees the first few.
const WARNING_CHARS_SHOWN: usize = 4096;

/// The warnings the answer carries, each made sendable: those the server
/// added first (about pull secrets: a few, about the whole pod), then the
/// policy's (one per container), as many as come to
/// [`WARNING_CHARS_SHOWN`], with, when some are left out, a last one within
/// that saying how many. So the apiserver passes on every one sent (unless
/// another webhook's came first).
fn sent_warnings(planned: Vec<String>, added: Vec<String>) -> Vec<String> {
    let total = planned.len() + added.len();
    let mut sent = Vec::new();
    let mut chars = 0;
    for mut warning in added.into_iter().chain(planned) {
        make_sendable(&mut warning);
        let length = warning.chars().count();
        if chars + length > WARNING_CHARS_SHOWN {
            break;
        }
        chars += length;
        sent.push(warning);
    }
    if sent.len() == total {
        return sent;
    }
    loop {
        let note = format!(
            "{} more warnings left out: the apiserver passes on about {WARNING_CHARS_SHOWN} characters of them",
            total - sent.len()
        );
        let length = note.chars().count();
        if chars + length <= WARNING_CHARS_SHOWN {
            sent.push(note);
            return sent;
        }
        // The last one sent makes way for the note.
        chars -= sent.pop().map_or(0, |w| w.chars().count());
    }
}

/// A body that is not an AdmissionReview we can answer: the server replies
/// 400 with this message.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("body is not an AdmissionReview: {0}")]
    NotAReview(serde_json::Error),
    #[error(
        "apiVersion {0:?} is not served; send admission.k8s.io/v1 (admissionReviewVersions: [\"v1\"])"
    )]
    UnsupportedVersion(String),
    #[error("kind {0:?} is not AdmissionReview")]
    NotAdmissionReview(String),
    #[error("AdmissionReview has no request")]
    MissingRequest,
    #[error("AdmissionReview request has an empty uid")]
    MissingUid,
    #[error("request.object is missing for a {0} of a Pod")]
    MissingObject(&'static str),
    #[error("request.object is not a valid Pod: {0}")]
    InvalidPod(serde_json::Error),
    #[error("{field} holds more than {limit} values")]
    TooManyValues { field: &'static str, limit: usize },
}

/// kube-core's request keeps `request.options` whole (a JSON value) and
/// every string of `request.userInfo`; the apiserver's are a few values,
/// but a body sent straight to the port can fill them with millions (an
/// 8 MiB `options` of zeros peaked at 283 MB, `userInfo.groups` of empty
/// strings at 185 MB). Bodies this large have them counted first, by a
/// pass that keeps nothing; smaller ones cost at most some 35 times their
/// size, and are not slowed by a second pass.
const COUNTED_BODY_BYTES: usize = 1024 * 1024;
/// The apiserver sends CreateOptions, UpdateOptions or DeleteOptions: a
/// handful of values.
const MAX_OPTIONS_VALUES: usize = 1_000;
/// A user's groups and extra fields: thousands for a very large directory.
const MAX_USER_INFO_VALUES: usize = 100_000;

/// Refuses a body whose `request.options` or `request.userInfo` holds more
/// values than the limits above. A body that does not parse is left to the
/// decode that follows, which names the error.
fn check_kept_fields(body: &[u8]) -> Result<(), ReviewError> {
    use crate::counted::{Budget, Count};
    use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};

    /// The review's top level, then its `request`: only `options` and
    /// `userInfo` are counted, the rest skipped.
    struct Fields<'a> {
        nested: bool,
        over: &'a mut Option<ReviewError>,
    }
    impl<'de> DeserializeSeed<'de> for Fields<'_> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de> Visitor<'de> for Fields<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<(), A::Error> {
            while let Some(key) = entries.next_key::<std::borrow::Cow<'de, str>>()? {
                let counted = match (self.nested, key.as_ref()) {
                    (false, "request") => {
                        entries.next_value_seed(Fields {
                            nested: true,
                            over: &mut *self.over,
                        })?;
                        continue;
                    }
                    (true, "options") => ("request.options", MAX_OPTIONS_VALUES),
                    (true, "userInfo") => ("request.userInfo", MAX_USER_INFO_VALUES),
                    _ => {
                        entries.next_value::<IgnoredAny>()?;
                        continue;
                    }
                };
                let (field, limit) = counted;
                let budget = Budget::new(limit, usize::MAX);
                if let Err(error) = entries.next_value_seed(Count(&budget)) {
                    if budget.exceeded() {
                        *self.over = Some(ReviewError::TooManyValues { field, limit });
                    }
                    return Err(error);
                }
            }
            Ok(())
        }
    }

    let mut over = None;
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let _ = Fields {
        nested: false,
        over: &mut over,
    }
    .deserialize(&mut deserializer);
    over.map_or(Ok(()), Err)
}

/// What one review did, for the log line and the metrics.
#[derive(Debug, Clone, Default)]
pub struct ReviewSummary {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub operation: &'static str,
    pub dry_run: bool,
    /// Whether the request was a Pod request the policy looked at.
    pub examined: bool,
    /// Filled when the answer is encoded ([`Planned::into_response`]).
    pub rewritten: Vec<RewrittenImage>,
    pub unparsable: usize,
    pub warnings: usize,
    pub patched: bool,
}

/// The encoded response and what it did.
#[derive(Debug)]
pub struct Reviewed {
    pub body: Vec<u8>,
    pub summary: ReviewSummary,
}

/// A decoded review and the plan for it, before the answer is encoded: the
/// server may add warnings (a pull secret that cannot exist) in between.
#[derive(Debug)]
pub struct Planned {
    response: AdmissionResponse,
    plan: Option<PodPlan>,
    pub summary: ReviewSummary,
}

/// The pull secrets a pod will reference, and where.
#[derive(Debug, Clone, Copy)]
pub struct PullSecretsNeeded<'a> {
    pub namespace: &'a str,
    pub names: &'a [String],
    /// A dry run must have no side effects: no copy is made for it, but it
    /// is told what the real request would be told of secrets known missing.
    pub dry_run: bool,
}

impl Planned {
    /// The namespace of a pod the policy examined, and the pull secrets it
    /// must find there; `None` for requests that need none.
    pub fn pull_secrets_needed(&self) -> Option<PullSecretsNeeded<'_>> {
        let plan = self.plan.as_ref()?;
        if plan.pull_secrets.is_empty() || self.summary.namespace.is_empty() {
            return None;
        }
        Some(PullSecretsNeeded {
            namespace: &self.summary.namespace,
            names: &plan.pull_secrets,
            dry_run: self.summary.dry_run,
        })
    }

    pub fn add_warning(&mut self, warning: String) {
        self.summary.warnings += 1;
        self.response
            .warnings
            .get_or_insert_with(Vec::new)
            .push(warning);
    }

    /// Encodes the answer.
    pub fn into_response(mut self) -> Reviewed {
        let mut patch = None;
        let mut planned_warnings = Vec::new();
        if let Some(plan) = self.plan {
            planned_warnings = plan.warnings;
            if !plan.rewritten.is_empty() {
                // The apiserver keeps a webhook's audit annotations of both
                // passes on one record and refuses to overwrite a key with
                // another value: a reinvocation, which finds the annotation
                // the first pass wrote, counts under a key of its own.
                let key = if plan.rewritten_before {
                    AUDIT_IMAGES_REWRITTEN_AGAIN
                } else {
                    AUDIT_IMAGES_REWRITTEN
                };
                self.response.audit_annotations =
                    HashMap::from([(key.to_owned(), plan.rewritten.len().to_string())]);
            }
            if !plan.operations.is_empty() {
                patch = Some(json_patch::Patch(plan.operations));
            }
            self.summary.rewritten = plan.rewritten;
        }
        let added = self.response.warnings.take().unwrap_or_default();
        let warnings = sent_warnings(planned_warnings, added);
        self.response.warnings = (!warnings.is_empty()).then_some(warnings);
        Reviewed {
            body: encode(&self.response, patch.as_ref()),
            summary: self.summary,
        }
    }
}

/// Answers one AdmissionReview body.
pub fn review(policy: &Policy, body: &[u8]) -> Result<Reviewed, ReviewError> {
    Ok(plan_review(policy, body)?.into_response())
}

/// Decodes one AdmissionReview body and plans the patch.
pub fn plan_review(policy: &Policy, body: &[u8]) -> Result<Planned, ReviewError> {
    if body.len() > COUNTED_BODY_BYTES {
        check_kept_fields(body)?;
    }
    let mut request = match decode::<AdmissionReview<PodObject>>(body) {
        Ok(review) => checked_request(review)?,
        // Not a Pod (another kind reached /mutate): answer it untouched. If
        // it claims to be a Pod, the Pod decoding error is the reason.
        Err(pod_error) => {
            let review: AdmissionReview<UnreadObject> =
                decode(body).map_err(ReviewError::NotAReview)?;
            let request = checked_request(review)?;
            if is_pod(&request.kind.group, &request.kind.kind) {
                return Err(ReviewError::InvalidPod(pod_error));
            }
            return Ok(Planned {
                response: AdmissionResponse::from(&request),
                plan: None,
                summary: summarize(request, None, None),
            });
        }
    };

    let scope = pod_scope(&request)?;
    let plan = match (&scope, &request.object) {
        (Some(scope), Some(pod)) => {
            let view = PodView {
                namespace: request
                    .namespace
                    .as_deref()
                    .or(pod.metadata.namespace.as_deref()),
                // A Pod sent without `metadata` (or with `null`): plan for
                // none, so the patch adds `/metadata` whole instead of
                // `/metadata/annotations`.
                metadata: pod.has_metadata.then_some(&*pod.metadata),
                annotations_bytes: pod.annotations_bytes,
                spec: pod.spec.as_ref(),
                location: &[],
            };
            Some(plan_pod_patch(policy, view, scope))
        }
        _ => None,
    };
    let generate_name = request
        .object
        .as_mut()
        .and_then(|pod| pod.metadata.generate_name.take());
    Ok(Planned {
        response: AdmissionResponse::from(&request),
        summary: summarize(request, plan.as_ref(), generate_name),
        plan,
    })
}

/// The object of a request that is not a Pod's: checked to be JSON and
/// otherwise not read, since whatever it holds it is allowed untouched
/// (a stricter type, such as `DynamicObject`, would refuse some with 400:
/// nesting past its depth limit, or a `metadata` field of another type).
#[derive(Debug, Default)]
struct UnreadObject {
    metadata: ObjectMeta,
}

impl<'de> serde::Deserialize<'de> for UnreadObject {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(deserializer)?;
        Ok(Self::default())
    }
}

/// The resource is named at run time, as `DynamicObject`'s is; nothing here
/// asks for it (the request's `kind` says what the object is).
impl kube::Resource for UnreadObject {
    type DynamicType = ApiResource;
    type Scope = DynamicResourceScope;

    fn kind(resource: &ApiResource) -> std::borrow::Cow<'_, str> {
        resource.kind.as_str().into()
    }

    fn group(resource: &ApiResource) -> std::borrow::Cow<'_, str> {
        resource.group.as_str().into()
    }

    fn version(resource: &ApiResource) -> std::borrow::Cow<'_, str> {
        resource.version.as_str().into()
    }

    fn plural(resource: &ApiResource) -> std::borrow::Cow<'_, str> {
        resource.plural.as_str().into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// `serde_json::from_slice`, with the same result, but faster: one UTF-8
/// check of the whole body instead of one per string it reads (the whole
/// review of the load benchmark's body 11% faster). A body that is not
/// UTF-8 goes to `from_slice`, which either reads it (bad bytes in a
/// skipped string) or names the error.
fn decode<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(body) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(body),
    }
}

fn checked_request<T>(review: AdmissionReview<T>) -> Result<AdmissionRequest<T>, ReviewError>
where
    T: kube::Resource,
{
    if review.types.api_version != ADMISSION_V1 {
        return Err(ReviewError::UnsupportedVersion(review.types.api_version));
    }
    if review.types.kind != "AdmissionReview" {
        return Err(ReviewError::NotAdmissionReview(review.types.kind));
    }
    let request: AdmissionRequest<T> =
        review.try_into().map_err(|_| ReviewError::MissingRequest)?;
    if request.uid.is_empty() {
        return Err(ReviewError::MissingUid);
    }
    Ok(request)
}

fn is_pod(group: &str, kind: &str) -> bool {
    group.is_empty() && kind == "Pod"
}

/// Which containers this request may change, or `None` when it is not a
/// request the webhook acts on (it is then allowed untouched).
fn pod_scope(request: &AdmissionRequest<PodObject>) -> Result<Option<Scope>, ReviewError> {
    if !is_pod(&request.kind.group, &request.kind.kind) {
        return Ok(None);
    }
    let scope = match (&request.operation, request.sub_resource.as_deref()) {
        (Operation::Create, None) => Scope::WholePod,
        (Operation::Update, Some("ephemeralcontainers")) => {
            let existing: HashSet<String> = request
                .old_object
                .iter()
                .filter_map(|old| old.spec.as_ref())
                .flat_map(|spec| spec.ephemeral_containers.iter().flatten())
                .map(|container| container.name.clone())
                .collect();
            Scope::NewEphemeralContainers { existing }
        }
        _ => return Ok(None),
    };
    if request.object.is_none() {
        return Err(ReviewError::MissingObject(operation_name(
            &request.operation,
        )));
    }
    Ok(Some(scope))
}

/// The operation as the apiserver spells it.
fn operation_name(operation: &Operation) -> &'static str {
    match operation {
        Operation::Create => "CREATE",
        Operation::Update => "UPDATE",
        Operation::Delete => "DELETE",
        Operation::Connect => "CONNECT",
    }
}

/// Takes the request's strings rather than copying them: the request is
/// not needed after this.
fn summarize<T: kube::Resource>(
    request: AdmissionRequest<T>,
    plan: Option<&PodPlan>,
    generate_name: Option<String>,
) -> ReviewSummary {
    // On CREATE a pod may have only a generateName: log that, marked.
    let name = match (request.name.is_empty(), generate_name) {
        (true, Some(mut prefix)) => {
            prefix.push('*');
            prefix
        }
        _ => request.name,
    };
    let mut summary = ReviewSummary {
        uid: request.uid,
        namespace: request.namespace.unwrap_or_default(),
        name,
        operation: operation_name(&request.operation),
        dry_run: request.dry_run,
        ..ReviewSummary::default()
    };
    if let Some(plan) = plan {
        summary.examined = true;
        summary.unparsable = plan.unparsable;
        summary.warnings = plan.warnings.len();
        summary.patched = !plan.operations.is_empty();
    }
    summary
}

/// The response as the apiserver decodes it: kube-core's fields, then the
/// patch as a base64 string (Go's `[]byte`) and `patchType`, only beside a
/// non-empty patch.
///
/// The patch is appended by hand: base64 never needs escaping, and passing
/// it through the JSON string escaper cost more than the rest of the answer
/// (a profile under load put it at about an eighth of the review).
fn encode(response: &AdmissionResponse, patch: Option<&json_patch::Patch>) -> Vec<u8> {
    const HEAD: &[u8] =
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":"#;
    let patch_json = patch.and_then(|patch| {
        let mut json = Vec::with_capacity(PATCH_CAPACITY_HINT);
        serde_json::to_writer(&mut json, patch).ok().map(|()| json)
    });
    let base64_len = patch_json
        .as_ref()
        .map_or(0, |json| json.len().div_ceil(3) * 4);
    let mut out = Vec::with_capacity(RESPONSE_CAPACITY_HINT + base64_len);
    out.extend_from_slice(HEAD);
    // Serializing plain strings, maps and numbers cannot fail; the fallback
    // keeps the uid so the apiserver still reads an allowed answer.
    if serde_json::to_writer(&mut out, response).is_err() {
        return format!(
            r#"{{"apiVersion":"{ADMISSION_V1}","kind":"AdmissionReview","response":{{"uid":{},"allowed":true}}}}"#,
            serde_json::Value::String(response.uid.clone())
        )
        .into_bytes();
    }
    if let Some(json) = patch_json {
        // A serialized struct always ends with its closing brace: reopen it.
        debug_assert_eq!(out.last(), Some(&b'}'));
        out.pop();
        out.extend_from_slice(br#","patch":""#);
        let start = out.len();
        out.resize(start + base64_len, 0);
        let engine = &base64::engine::general_purpose::STANDARD;
        match engine.encode_slice(&json, &mut out[start..]) {
            Ok(written) => out.truncate(start + written),
            // Cannot happen (the length is base64's own formula); if it
            // did, encode through a second buffer rather than fail.
            Err(_) => {
                out.truncate(start);
                out.extend_from_slice(engine.encode(&json).as_bytes());
            }
        }
        out.extend_from_slice(br#"","patchType":"JSONPatch"}"#);
    }
    out.push(b'}');
    out
}

/// Room for the envelope, uid, status and a few warnings, so the answer is
/// written without growing its buffer.
const RESPONSE_CAPACITY_HINT: usize = 512;
/// A patch for a few containers, with pull secrets and the annotation.
const PATCH_CAPACITY_HINT: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    /// The answer as kube-core's own serializer writes the response, with
    /// the patch fields added beside it: what `encode` must equal.
    fn expected_answer(
        response: &AdmissionResponse,
        patch: Option<&json_patch::Patch>,
    ) -> serde_json::Value {
        let mut fields = serde_json::to_value(response).expect("a response serializes");
        if let Some(patch) = patch {
            let json = serde_json::to_vec(patch).expect("a patch serializes");
            fields["patch"] = base64::engine::general_purpose::STANDARD
                .encode(json)
                .into();
            fields["patchType"] = "JSONPatch".into();
        }
        serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": fields,
        })
    }

    /// `decode` must answer exactly as `serde_json::from_slice` does, for
    /// valid bodies and broken ones: a byte that is not UTF-8, or one that
    /// breaks the JSON, in every place (a read string, a skipped one, a key,
    /// between tokens), and escapes or multi-byte characters in strings.
    #[test]
    fn decode_reads_every_body_as_from_slice_does() {
        type Review = AdmissionReview<PodObject>;
        fn same(body: &[u8]) {
            let ours = decode::<Review>(body).map_err(|error| error.to_string());
            let reference =
                serde_json::from_slice::<Review>(body).map_err(|error| error.to_string());
            match (&ours, &reference) {
                (Ok(ours), Ok(reference)) => assert_eq!(
                    (ours.request.as_ref().map(|r| (&r.uid, &r.object))),
                    (reference.request.as_ref().map(|r| (&r.uid, &r.object)))
                ),
                _ => assert_eq!(ours.as_ref().err(), reference.as_ref().err()),
            }
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let body = std::fs::read(root.join("tests/fixtures/admission/pod-create.json"))
            .expect("the fixture");
        same(&body);
        // Replace each byte in turn: by one that is never UTF-8 (the
        // `from_slice` path), and by ASCII that keeps the body UTF-8 but
        // breaks it where it lands (the `from_str` path: an escape, a
        // quote, a control character; errors must match to the column).
        for at in 0..body.len() {
            for replacement in [0xff, b'\\', b'"', 0x01] {
                let mut broken = body.clone();
                broken[at] = replacement;
                same(&broken);
            }
        }
        // Escapes, lone surrogates and multi-byte characters, in a string
        // the review reads (an image) and in one it skips.
        let text = std::str::from_utf8(&body).expect("the fixture is UTF-8");
        for (needle, replacement) in [
            (r#""image": "busybox"#, r#""image": "busy\u00e9\"\\box"#),
            (r#""image": "busybox"#, r#""image": "busy\ud800box"#),
            (r#""image": "busybox"#, r#""image": "busy\udc00\ud800box"#),
            (r#""image": "busybox"#, "\"image\": \"büsy日本box"),
            (r#""image": "busybox"#, r#""image": "busy\u12box"#),
            (
                r#""restartPolicy": "Always"#,
                r#""restartPolicy": "Al\ud800ways"#,
            ),
            (
                r#""restartPolicy": "Always"#,
                "\"restartPolicy\": \"Alwäys日本",
            ),
            (
                r#""restartPolicy": "Always"#,
                r#""restartPolicy": "Al\qways"#,
            ),
        ] {
            assert!(text.contains(needle), "{needle}");
            same(text.replacen(needle, replacement, 1).as_bytes());
        }
        // A bad byte in a skipped string is read, as before; one in a read
        // string (an image) is refused.
        let broken_at = |needle: &str| {
            let at = text.find(needle).expect("the fixture has it") + needle.len() - 2;
            let mut broken = body.clone();
            broken[at] = 0xff;
            decode::<Review>(&broken)
        };
        assert!(broken_at(r#""restartPolicy": "Always""#).is_ok());
        let refused = broken_at(r#""image": "busybox"#).expect_err("a bad image is refused");
        assert!(refused.to_string().contains("invalid unicode"), "{refused}");
    }

    fn example_policy() -> Policy {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        crate::config::load_policy(&root.join("examples/config.yaml"), Some("image-rewriter"))
            .expect("examples/config.yaml is valid")
    }

    /// The apiserver drops a warning that holds a control character: an
    /// API error quoted in one (another webhook's refusal of a pull secret
    /// copy, with line feeds) is sent with spaces instead, and cut if long.
    #[test]
    fn warnings_are_sent_printable_and_bounded() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let policy = example_policy();
        let body = std::fs::read(root.join("examples/admission-review.json")).expect("example");
        let mut planned = plan_review(&policy, &body).expect("a review");
        planned.add_warning("denied:\n\n* rule 1\r\n\t* rule 2".to_owned());
        planned.add_warning("long ".repeat(200));
        let answer: serde_json::Value =
            serde_json::from_slice(&planned.into_response().body).expect("JSON");
        let warnings: Vec<&str> = answer["response"]["warnings"]
            .as_array()
            .expect("warnings")
            .iter()
            .map(|w| w.as_str().expect("a string"))
            .collect();
        assert!(
            warnings.contains(&"denied:  * rule 1   * rule 2"),
            "{warnings:?}"
        );
        let long = warnings
            .iter()
            .find(|w| w.starts_with("long"))
            .expect("kept");
        assert_eq!(long.chars().count(), MAX_WARNING_CHARS + 3, "{long}");
        assert!(long.ends_with("..."));
    }

    /// What kube-apiserver v0.34 shows the user of the warnings an answer
    /// carries, in order (k8s.io/apiserver/pkg/endpoints/filters/warning.go):
    /// each text once; all of them while they come to 4096 characters, else
    /// every one cut to 256 characters until 4096 are written.
    fn apiserver_shows(warnings: &[String]) -> Vec<String> {
        const TOTAL: usize = 4096;
        let cut = |w: &str| w.chars().take(256).collect::<String>();
        let mut seen = HashSet::new();
        let mut ordered: Vec<&str> = Vec::new();
        let mut shown: Vec<String> = Vec::new();
        let (mut written, mut truncating) = (0, false);
        for warning in warnings {
            if warning.is_empty() {
                continue;
            }
            if truncating && written >= TOTAL {
                break;
            }
            if !seen.insert(warning.as_str()) {
                continue;
            }
            ordered.push(warning);
            let text = if truncating {
                cut(warning)
            } else {
                warning.clone()
            };
            let length = text.chars().count();
            if truncating || written + length <= TOTAL {
                written += length;
                shown.push(text);
                continue;
            }
            truncating = true;
            shown = ordered.iter().map(|w| cut(w)).collect();
            written = shown.iter().map(|w| w.chars().count()).sum();
        }
        shown
    }

    /// A pod of many unparsable images is answered with the warnings the
    /// apiserver shows, not one per container: the server's own (a pull
    /// secret that cannot exist) first, then the policy's, and a last one
    /// counting those left out; all of them reach the user.
    #[test]
    fn warnings_past_what_the_apiserver_shows_are_left_out() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let policy = example_policy();
        let body = std::fs::read(root.join("examples/admission-review.json")).expect("example");
        let mut review: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        const SECRET_WARNING: &str =
            r#"imagePullSecret "harbor-pull" is missing in namespace "team-a" and was not copied"#;
        let mut answer_for = |containers: usize, image: &str| {
            review["request"]["object"]["spec"]["containers"] = (0..containers)
                .map(|i| serde_json::json!({"name": format!("c{i}"), "image": image}))
                .collect();
            let body = serde_json::to_vec(&review).expect("JSON");
            let mut planned = plan_review(&policy, &body).expect("a review");
            planned.add_warning(SECRET_WARNING.to_owned());
            let reviewed = planned.into_response();
            let answer: serde_json::Value = serde_json::from_slice(&reviewed.body).expect("JSON");
            let warnings: Vec<String> = answer["response"]["warnings"]
                .as_array()
                .expect("warnings")
                .iter()
                .map(|w| w.as_str().expect("a string").to_owned())
                .collect();
            (warnings, reviewed.summary)
        };

        let (warnings, summary) = answer_for(3, "Not/Valid");
        assert_eq!(warnings.len(), 4, "{warnings:?}");
        assert_eq!(summary.warnings, 4);
        assert_eq!(apiserver_shows(&warnings), warnings);
        assert!(warnings.iter().all(|w| !w.contains("left out")));

        let long_image = format!("Not/{}", "x".repeat(300));
        for image in ["Not/Valid", &long_image] {
            let (warnings, summary) = answer_for(300, image);
            assert_eq!((summary.warnings, summary.unparsable), (301, 300));
            // Everything sent reaches the user, the pull secret's warning
            // and the count of those left out included.
            assert_eq!(apiserver_shows(&warnings), warnings, "{image}");
            assert_eq!(warnings[0], SECRET_WARNING);
            assert!(warnings[1].starts_with(r#"container "c0": image "Not/"#));
            let sent_of_ours = warnings.len() - 1;
            assert!(sent_of_ours > 10, "{warnings:?}");
            assert_eq!(
                warnings[sent_of_ours],
                format!(
                    "{} more warnings left out: the apiserver passes on about 4096 characters of them",
                    301 - sent_of_ours
                )
            );
        }
    }

    #[test]
    fn encode_writes_kube_cores_fields_and_the_patch() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let policy = example_policy();
        let mut seen_patch = 0;
        let fixtures = std::fs::read_dir(root.join("tests/fixtures/admission")).expect("fixtures");
        for entry in fixtures {
            let path = entry.expect("a fixture").path();
            let body = std::fs::read(&path).expect("a readable fixture");
            let Ok(planned) = plan_review(&policy, &body) else {
                continue;
            };
            // Every optional field, with strings that need escaping.
            let mut response = planned.response;
            response.warnings = Some(vec!["a \"quoted\" warning\nwith a newline".into()]);
            response.audit_annotations =
                HashMap::from([(AUDIT_IMAGES_REWRITTEN.to_owned(), "2".to_owned())]);
            let patch = planned
                .plan
                .filter(|plan| !plan.operations.is_empty())
                .map(|plan| json_patch::Patch(plan.operations));
            seen_patch += usize::from(patch.is_some());
            for patch in [None, patch.as_ref()] {
                let written: serde_json::Value = serde_json::from_slice(&encode(&response, patch))
                    .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
                assert_eq!(
                    written,
                    expected_answer(&response, patch),
                    "{}",
                    path.display()
                );
            }
        }
        assert!(seen_patch >= 3, "fixtures with a patch: {seen_patch}");
    }
}
