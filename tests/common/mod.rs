//! Shared test helpers: an independent RFC 6902 JSON Patch implementation,
//! apiserver-shaped AdmissionReview bodies, a response checker that reads an
//! answer the way the apiserver does, and a realistic defaulted Pod builder.
//!
//! Use from a test crate with `mod common;`. Nothing here depends on the code
//! under test except [`review_in_process`], which calls
//! `image_rewriter::admission::review`; the server tests can ignore it.
//!
//! Entry points:
//! - [`apply_json_patch`]: strict RFC 6902, as evanphx/json-patch applies it.
//! - [`admission_review`], [`ephemeral_containers_review`],
//!   [`admission_review_full`]: request bodies.
//! - [`check_response`]: validates an answer; returns the decoded patch.
//! - [`pod_after`]: applies the patch and decodes a `k8s_openapi` Pod.
//! - [`pod`], [`container`], [`ephemeral_container`]: realistic objects.
//! - [`binary`]: the `image-rewriter` binary, environment cleared of ours.
//! - [`skip_missing_tool`]: a missing tool skips a check, unless CI requires it.
//! - [`kubectl`]: the kubectl to run, or `None` after such a skip.
#![allow(dead_code)]

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Map, Value, json};

// ---------------------------------------------------------------------------
// JSON Patch (RFC 6902), independent of the json-patch crate.
// ---------------------------------------------------------------------------

/// Applies an RFC 6902 JSON Patch strictly, as the kube-apiserver does
/// (evanphx/json-patch): `add` needs the parent to exist and takes an array
/// index in `0..=len` or `-`; `remove` and `replace` need the target to
/// exist; `test` compares by JSON equality; `move`/`copy` need `from` to
/// exist. Pointers are unescaped (`~1` is `/`, `~0` is `~`). Any violation is
/// an `Err` describing the failing operation; the input is never modified.
pub fn apply_json_patch(doc: &Value, patch: &Value) -> Result<Value, String> {
    let operations = patch
        .as_array()
        .ok_or_else(|| format!("a JSON Patch must be an array, got {patch}"))?;
    let mut doc = doc.clone();
    for (index, operation) in operations.iter().enumerate() {
        apply_operation(&mut doc, operation)
            .map_err(|e| format!("operation {index} {operation}: {e}"))?;
    }
    Ok(doc)
}

fn apply_operation(doc: &mut Value, operation: &Value) -> Result<(), String> {
    let object = operation
        .as_object()
        .ok_or("an operation must be a JSON object")?;
    let op = string_member(object, "op")?;
    let path = parse_pointer(string_member(object, "path")?)?;
    let value = || {
        object
            .get("value")
            .cloned()
            .ok_or_else(|| format!("{op} needs a value"))
    };
    match op {
        "add" => add(doc, &path, value()?),
        "remove" => remove(doc, &path).map(drop),
        "replace" => {
            let value = value()?;
            let target = get_mut(doc, &path)?;
            *target = value;
            Ok(())
        }
        "test" => {
            let expected = value()?;
            let actual = get_mut(doc, &path)?;
            if *actual == expected {
                Ok(())
            } else {
                Err(format!("test failed: {actual} != {expected}"))
            }
        }
        "move" => {
            let from = parse_pointer(string_member(object, "from")?)?;
            if path.len() > from.len() && path[..from.len()] == from[..] {
                return Err("cannot move a value into one of its children".into());
            }
            let moved = remove(doc, &from)?;
            add(doc, &path, moved)
        }
        "copy" => {
            let from = parse_pointer(string_member(object, "from")?)?;
            let copied = get_mut(doc, &from)?.clone();
            add(doc, &path, copied)
        }
        other => Err(format!("unknown op {other:?}")),
    }
}

fn string_member<'a>(object: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    object
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing or non-string {key:?}"))
}

/// Splits a JSON Pointer (RFC 6901) into unescaped tokens.
fn parse_pointer(pointer: &str) -> Result<Vec<String>, String> {
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    let rest = pointer
        .strip_prefix('/')
        .ok_or_else(|| format!("pointer {pointer:?} must start with '/'"))?;
    rest.split('/')
        .map(|token| {
            let mut out = String::with_capacity(token.len());
            let mut chars = token.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => out.push('~'),
                        Some('1') => out.push('/'),
                        _ => return Err(format!("bad escape in pointer {pointer:?}")),
                    }
                } else {
                    out.push(c);
                }
            }
            Ok(out)
        })
        .collect()
}

/// An existing array index: decimal digits, no leading zero, `< len`.
fn array_index(token: &str, len: usize, allow_end: bool) -> Result<usize, String> {
    if allow_end && token == "-" {
        return Ok(len);
    }
    let valid_syntax = !token.is_empty()
        && token.bytes().all(|b| b.is_ascii_digit())
        && (token == "0" || !token.starts_with('0'));
    let index: usize = if valid_syntax {
        token
            .parse()
            .map_err(|_| format!("array index {token:?} out of range"))?
    } else {
        return Err(format!("{token:?} is not an array index"));
    };
    let limit = if allow_end {
        len
    } else {
        len.saturating_sub(1)
    };
    if (allow_end && index <= limit) || (!allow_end && index < len) {
        Ok(index)
    } else {
        Err(format!("array index {index} out of bounds (length {len})"))
    }
}

fn get_mut<'a>(doc: &'a mut Value, path: &[String]) -> Result<&'a mut Value, String> {
    let mut current = doc;
    for (depth, token) in path.iter().enumerate() {
        current = match current {
            Value::Object(map) => map.get_mut(token),
            Value::Array(items) => {
                let index = array_index(token, items.len(), false)?;
                items.get_mut(index)
            }
            _ => None,
        }
        .ok_or_else(|| format!("path /{} does not exist", path[..=depth].join("/")))?;
    }
    Ok(current)
}

fn add(doc: &mut Value, path: &[String], value: Value) -> Result<(), String> {
    let Some((last, parent_path)) = path.split_last() else {
        *doc = value;
        return Ok(());
    };
    let parent = get_mut(doc, parent_path).map_err(|e| format!("add: parent missing: {e}"))?;
    match parent {
        Value::Object(map) => {
            map.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(items) => {
            let index = array_index(last, items.len(), true)?;
            items.insert(index, value);
            Ok(())
        }
        other => Err(format!("add: parent is not a container: {other}")),
    }
}

fn remove(doc: &mut Value, path: &[String]) -> Result<Value, String> {
    let (last, parent_path) = path
        .split_last()
        .ok_or("cannot remove the whole document")?;
    let parent = get_mut(doc, parent_path)?;
    match parent {
        Value::Object(map) => map
            .remove(last)
            .ok_or_else(|| format!("remove: key {last:?} does not exist")),
        Value::Array(items) => {
            let index = array_index(last, items.len(), false)?;
            Ok(items.remove(index))
        }
        other => Err(format!("remove: parent is not a container: {other}")),
    }
}

// ---------------------------------------------------------------------------
// AdmissionReview requests, shaped as the kube-apiserver sends them.
// ---------------------------------------------------------------------------

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// A fresh UUID-shaped uid, unique within the test process.
pub fn new_uid() -> String {
    let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let mixed = nanos ^ (u64::from(std::process::id()) << 32);
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (mixed >> 32) as u32,
        (mixed >> 16) as u16,
        mixed as u16 & 0xfff,
        sequence as u16 & 0xfff,
        sequence & 0xffff_ffff_ffff
    )
}

/// Group, version, kind and plural resource of an object, from its
/// `apiVersion` and `kind` (a Pod when they are absent).
fn gvk_of(object: &Value) -> (String, String, String, String) {
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("v1");
    let kind = object.get("kind").and_then(Value::as_str).unwrap_or("Pod");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let lower = kind.to_lowercase();
    let resource = if lower.ends_with('s') {
        format!("{lower}es")
    } else {
        format!("{lower}s")
    };
    (group.into(), version.into(), kind.into(), resource)
}

/// An AdmissionReview v1 request, as the apiserver sends it.
///
/// - `operation`: `CREATE`, `UPDATE`, `DELETE` or `CONNECT`.
/// - `object`: the new object (for `DELETE`, pass `None`).
/// - `old_object`: the stored object for `UPDATE`/`DELETE`, else `None`.
/// - `sub_resource`: e.g. `Some("ephemeralcontainers")`, `Some("status")`.
/// - `namespace`: the request namespace.
///
/// Kind and resource come from the object's `apiVersion`/`kind` (a Pod by
/// default). `userInfo` is a ReplicaSet controller for CREATE, a user
/// otherwise.
pub fn admission_review_full(
    object: Option<Value>,
    old_object: Option<Value>,
    operation: &str,
    namespace: &str,
    sub_resource: Option<&str>,
    dry_run: bool,
) -> Value {
    let subject = object
        .as_ref()
        .or(old_object.as_ref())
        .unwrap_or(&Value::Null);
    let (group, version, kind, resource) = gvk_of(subject);
    let name = subject
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let options_kind = match operation {
        "CREATE" => "CreateOptions",
        "UPDATE" => "UpdateOptions",
        "DELETE" => "DeleteOptions",
        _ => "",
    };
    let user_info = if operation == "CREATE" {
        json!({
            "username": "system:serviceaccount:kube-system:replicaset-controller",
            "uid": "6b0c3b2c-3c9a-4a57-9d6c-1f7e6ab3d0a1",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]
        })
    } else {
        json!({
            "username": "kubernetes-admin",
            "uid": "a9a1d4a0-2a53-4a3e-8f1d-0c5b3c8d7e21",
            "groups": ["kubeadm:cluster-admins", "system:authenticated"]
        })
    };
    let mut request = json!({
        "uid": new_uid(),
        "kind": {"group": group, "version": version, "kind": kind},
        "resource": {"group": group, "version": version, "resource": resource},
        "requestKind": {"group": group, "version": version, "kind": kind},
        "requestResource": {"group": group, "version": version, "resource": resource},
        "name": name,
        "namespace": namespace,
        "operation": operation,
        "userInfo": user_info,
        "object": object.unwrap_or(Value::Null),
        "oldObject": old_object.unwrap_or(Value::Null),
        "dryRun": dry_run,
        "options": if options_kind.is_empty() { Value::Null } else {
            json!({"kind": options_kind, "apiVersion": "meta.k8s.io/v1"})
        },
    });
    if let Some(sub_resource) = sub_resource {
        request["subResource"] = json!(sub_resource);
        request["requestSubResource"] = json!(sub_resource);
    }
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": request,
    })
}

/// A review of `object` for `operation` in `namespace`, no subresource, not
/// a dry run. For `UPDATE` the old object is `object` itself; for `DELETE`
/// the object is null and `object` is sent as the old object.
pub fn admission_review(object: Value, operation: &str, namespace: &str) -> Value {
    match operation {
        "CREATE" | "CONNECT" => {
            admission_review_full(Some(object), None, operation, namespace, None, false)
        }
        "DELETE" => admission_review_full(None, Some(object), operation, namespace, None, false),
        _ => admission_review_full(
            Some(object.clone()),
            Some(object),
            operation,
            namespace,
            None,
            false,
        ),
    }
}

/// The `pods/ephemeralcontainers` UPDATE that `kubectl debug` causes: the
/// pod with its new ephemeral containers, and the pod as stored before.
pub fn ephemeral_containers_review(old_object: Value, object: Value, namespace: &str) -> Value {
    admission_review_full(
        Some(object),
        Some(old_object),
        "UPDATE",
        namespace,
        Some("ephemeralcontainers"),
        false,
    )
}

/// The request uid of a review body.
pub fn uid_of(review: &Value) -> &str {
    review
        .pointer("/request/uid")
        .and_then(Value::as_str)
        .expect("review has a request.uid")
}

// ---------------------------------------------------------------------------
// Responses, checked as the apiserver reads them.
// ---------------------------------------------------------------------------

/// Checks an AdmissionReview response body as the apiserver does and returns
/// the decoded JSON Patch (`None` when the answer has no patch).
///
/// Panics, with the body in the message, unless: it is JSON with
/// `apiVersion: admission.k8s.io/v1` and `kind: AdmissionReview`;
/// `response.uid` equals the request's uid; `response.allowed` is `true`;
/// `patchType` is present exactly when `patch` is, and is `JSONPatch`;
/// `patch` is a base64 string of a non-empty JSON array; `warnings`, when
/// present, is an array of strings; `auditAnnotations`, when present, is a
/// map of strings.
pub fn check_response(request: &Value, response_body: &[u8]) -> Option<Value> {
    let text = String::from_utf8_lossy(response_body);
    let fail = |why: &str| -> ! { panic!("invalid AdmissionReview response: {why}\nbody: {text}") };
    let body: Value =
        serde_json::from_slice(response_body).unwrap_or_else(|e| fail(&e.to_string()));
    if body.get("apiVersion") != Some(&json!("admission.k8s.io/v1")) {
        fail("apiVersion is not admission.k8s.io/v1");
    }
    if body.get("kind") != Some(&json!("AdmissionReview")) {
        fail("kind is not AdmissionReview");
    }
    let response = body
        .get("response")
        .and_then(Value::as_object)
        .unwrap_or_else(|| fail("no response object"));
    let expected_uid = request.pointer("/request/uid").and_then(Value::as_str);
    if response.get("uid").and_then(Value::as_str) != expected_uid {
        fail(&format!(
            "response.uid is not the request uid {expected_uid:?}"
        ));
    }
    if response.get("allowed") != Some(&json!(true)) {
        fail("response.allowed is not true");
    }
    if let Some(warnings) = response.get("warnings")
        && !warnings
            .as_array()
            .is_some_and(|w| w.iter().all(Value::is_string))
    {
        fail("warnings is not an array of strings");
    }
    if let Some(audit) = response.get("auditAnnotations")
        && !audit
            .as_object()
            .is_some_and(|a| a.values().all(Value::is_string))
    {
        fail("auditAnnotations is not a map of strings");
    }
    let patch = response.get("patch").filter(|p| !p.is_null());
    let patch_type = response.get("patchType").filter(|p| !p.is_null());
    match (patch, patch_type) {
        (None, None) => None,
        (Some(_), None) => fail("patch without patchType"),
        (None, Some(_)) => fail("patchType without patch"),
        (Some(patch), Some(patch_type)) => {
            if patch_type != "JSONPatch" {
                fail("patchType is not JSONPatch");
            }
            let encoded = patch
                .as_str()
                .unwrap_or_else(|| fail("patch is not a (base64) string"));
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .unwrap_or_else(|e| fail(&format!("patch is not base64: {e}")));
            let decoded: Value = serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| fail(&format!("patch is not JSON: {e}")));
            match decoded.as_array() {
                Some(ops) if !ops.is_empty() => Some(decoded),
                Some(_) => fail("patch is an empty array"),
                None => fail("patch is not a JSON array"),
            }
        }
    }
}

/// The `response` member of a response body (for warnings and audit
/// annotations).
pub fn response_of(response_body: &[u8]) -> Value {
    let body: Value = serde_json::from_slice(response_body).expect("response body is JSON");
    body["response"].clone()
}

/// The response's warnings (empty when absent).
pub fn warnings_of(response_body: &[u8]) -> Vec<String> {
    response_of(response_body)["warnings"]
        .as_array()
        .map(|w| {
            w.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Applies `patch` (if any) to the object exactly as sent and decodes the
/// result as a Pod. Panics when the patch does not apply or the result is not
/// a Pod.
pub fn pod_after(request_object: &Value, patch: Option<&Value>) -> (Value, Pod) {
    let patched = match patch {
        Some(patch) => apply_json_patch(request_object, patch).unwrap_or_else(|e| {
            panic!("patch does not apply: {e}\npatch: {patch:#}\nobject: {request_object:#}")
        }),
        None => request_object.clone(),
    };
    let pod: Pod = serde_json::from_value(patched.clone())
        .unwrap_or_else(|e| panic!("patched object is not a Pod: {e}\n{patched:#}"));
    (patched, pod)
}

/// Runs `image_rewriter::admission::review` on `review`, checks the answer
/// with [`check_response`], and returns the response body and the patch.
/// Panics if the review is refused.
pub fn review_in_process(
    policy: &image_rewriter::policy::Policy,
    review: &Value,
) -> (Vec<u8>, Option<Value>) {
    let body = serde_json::to_vec(review).expect("review serializes");
    let reviewed = image_rewriter::admission::review(policy, &body)
        .unwrap_or_else(|e| panic!("review refused: {e}\n{review:#}"));
    let patch = check_response(review, &reviewed.body);
    (reviewed.body, patch)
}

// ---------------------------------------------------------------------------
// Realistic objects.
// ---------------------------------------------------------------------------

/// A container as the apiserver has it after defaulting.
pub fn container(name: &str, image: &str) -> Value {
    json!({
        "name": name,
        "image": image,
        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
        "env": [{"name": "LOG_LEVEL", "value": "info"}],
        "resources": {
            "limits": {"memory": "256Mi"},
            "requests": {"cpu": "100m", "memory": "128Mi"}
        },
        "volumeMounts": [{
            "name": "kube-api-access-x7k2p",
            "readOnly": true,
            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"
        }],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent"
    })
}

/// An ephemeral container as `kubectl debug` creates it.
pub fn ephemeral_container(name: &str, image: &str, target: &str) -> Value {
    json!({
        "name": name,
        "image": image,
        "resources": {},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
        "stdin": true,
        "tty": true,
        "targetContainerName": target
    })
}

/// A Pod as the apiserver sends it in a CREATE review, after defaulting:
/// `init_containers` and `containers` are `(name, image)` pairs;
/// `image_pull_secrets` is `None` for no field, `Some(&[])` for `[]`.
/// It carries labels, an annotation, `spec.someFutureField` (a field the
/// Rust types do not know) and `status: {}`.
pub fn pod(
    namespace: &str,
    init_containers: &[(&str, &str)],
    containers: &[(&str, &str)],
    image_pull_secrets: Option<&[&str]>,
) -> Value {
    let mut pod = json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": "web-7d4b9c8f6-x2kqz",
            "generateName": "web-7d4b9c8f6-",
            "namespace": namespace,
            "creationTimestamp": null,
            "labels": {
                "app.kubernetes.io/name": "web",
                "pod-template-hash": "7d4b9c8f6"
            },
            "annotations": {
                "kubectl.kubernetes.io/restartedAt": "2025-01-01T00:00:00Z"
            },
            "ownerReferences": [{
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": "web-7d4b9c8f6",
                "uid": "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b",
                "controller": true,
                "blockOwnerDeletion": true
            }],
            "managedFields": [{
                "manager": "kube-controller-manager",
                "operation": "Update",
                "apiVersion": "v1",
                "time": "2025-01-01T00:00:00Z",
                "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:labels": {".": {}}}}
            }]
        },
        "spec": {
            "volumes": [{
                "name": "kube-api-access-x7k2p",
                "projected": {
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}
                    ],
                    "defaultMode": 420
                }
            }],
            "containers": containers.iter().map(|(n, i)| container(n, i)).collect::<Vec<_>>(),
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "serviceAccount": "default",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            ],
            "priority": 0,
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority",
            "someFutureField": {"x": 1}
        },
        "status": {}
    });
    if !init_containers.is_empty() {
        pod["spec"]["initContainers"] = init_containers
            .iter()
            .map(|(n, i)| container(n, i))
            .collect();
    }
    if let Some(secrets) = image_pull_secrets {
        pod["spec"]["imagePullSecrets"] = secrets.iter().map(|s| json!({"name": s})).collect();
    }
    pod
}

/// Images of a list (`initContainers`, `containers`, `ephemeralContainers`)
/// of a pod JSON, in order.
pub fn images(pod: &Value, list: &str) -> Vec<String> {
    pod["spec"][list]
        .as_array()
        .map(|c| {
            c.iter()
                .map(|c| c["image"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The `imagePullSecrets` names of a pod JSON (`None` when absent).
pub fn pull_secrets(pod: &Value) -> Option<Vec<String>> {
    pod["spec"]["imagePullSecrets"].as_array().map(|s| {
        s.iter()
            .map(|s| s["name"].as_str().unwrap_or_default().to_owned())
            .collect()
    })
}

/// The `image-rewriter` binary with no inherited `IMAGE_REWRITER_*`
/// variables, so a developer's environment cannot change what a test sees.
pub fn binary() -> std::process::Command {
    // `option_env!`: the benches include this module too, and Cargo names
    // the binary only to integration tests (the benches never call this).
    let binary = option_env!("CARGO_BIN_EXE_image-rewriter").unwrap_or("image-rewriter");
    let mut command = Command::new(binary);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("IMAGE_REWRITER_") {
            command.env_remove(key);
        }
    }
    command
}

/// A tool a check needs is not installed: the check is skipped with a
/// `SKIPPED` line on stderr (written past the test harness's capture, so it
/// shows in a passing run), unless the environment variable `required_by` is
/// set to anything but empty or `0` (`.ci/run` sets it), which fails the test.
pub fn skip_missing_tool(tool: &str, required_by: &str, skipped: &str) {
    use std::io::Write as _;
    let required = std::env::var(required_by).is_ok_and(|v| !v.is_empty() && v != "0");
    assert!(!required, "{tool} not found and {required_by} is set");
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED: {tool} not found; {skipped}"
    );
}

/// `promtool args...` run in `dir` with `stdin` as its input; None (after
/// saying what is `skipped`) when promtool is not installed and
/// `IMAGE_REWRITER_REQUIRE_PROMTOOL` is not set.
pub fn promtool(
    args: &[&str],
    dir: &Path,
    stdin: &[u8],
    skipped: &str,
) -> Option<std::process::Output> {
    use std::io::Write as _;
    use std::process::Stdio;
    let spawned = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            skip_missing_tool(
                "promtool (Debian package prometheus)",
                "IMAGE_REWRITER_REQUIRE_PROMTOOL",
                skipped,
            );
            return None;
        }
        Err(error) => panic!("running promtool: {error}"),
    };
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    Some(child.wait_with_output().unwrap())
}

/// `$KUBECTL`, else the kubectl the test control plane built (the same one
/// on every machine), else `kubectl` on the PATH; None (after saying so)
/// when it is not installed.
pub fn kubectl(test: &str) -> Option<OsString> {
    let built =
        Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/control-plane/build.sh"))
            .arg("--print-dir")
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| {
                let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                OsString::from(Path::new(&dir).join("kubectl"))
            });
    let program = std::env::var_os("KUBECTL")
        .or(built)
        .unwrap_or_else(|| "kubectl".into());
    match Command::new(&program)
        .args(["version", "--client"])
        .output()
    {
        Ok(out) if out.status.success() => Some(program),
        Ok(out) => panic!(
            "{} version --client failed: {}",
            program.to_string_lossy(),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            skip_missing_tool(
                "kubectl",
                "IMAGE_REWRITER_REQUIRE_KUBECTL",
                &format!("{test} not rendered or checked"),
            );
            None
        }
        Err(e) => panic!("running {}: {e}", program.to_string_lossy()),
    }
}
