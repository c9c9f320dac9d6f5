//! The offline commands: `rewrite` and `mutate` try a policy on images and
//! manifests before it is deployed. Text in, text out; the CLI does the I/O.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::patch::{PodView, Scope, plan_pod_patch};
use crate::pod::{PodImages, TemplateMetadata, template_metadata};
use crate::policy::{Decision, Policy};

/// One line of `rewrite --output json`.
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RewriteReport {
    pub input: String,
    pub output: String,
    pub rule: Option<String>,
    pub pull_secret: Option<String>,
    pub reason: String,
}

impl RewriteReport {
    pub fn new(policy: &Policy, input: &str) -> Self {
        let decision = policy.decide(input);
        let output = match &decision {
            Decision::Rewrite { image, .. } => image.clone(),
            _ => input.to_owned(),
        };
        let rule = decision.matched_rule();
        let pull_secret = decision.rule().and_then(|rule| rule.pull_secret.clone());
        let reason = match &decision {
            Decision::Unparsable(error) => format!("{}: {error}", decision.reason()),
            Decision::InvalidResult { reason, .. } => format!("{}: {reason}", decision.reason()),
            _ => decision.reason().to_owned(),
        };
        Self {
            input: input.to_owned(),
            output,
            rule: rule.map(|r| r.match_prefix.clone()),
            pull_secret,
            reason,
        }
    }

    /// Whether the input was a valid reference (the command fails otherwise).
    pub fn is_valid_input(&self) -> bool {
        !self.reason.starts_with("unparsable")
    }

    pub fn to_text(&self) -> String {
        let mut line = format!("{} -> {}", self.input, self.output);
        if let Some(rule) = &self.rule {
            line.push_str(&format!("  [rule {rule}"));
            if let Some(secret) = &self.pull_secret {
                line.push_str(&format!(", pullSecret {secret}"));
            }
            line.push(']');
        }
        line.push_str(&format!("  ({})", self.reason));
        line
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MutateError {
    #[error("document {index}: not valid YAML or JSON: {reason}")]
    Syntax { index: usize, reason: String },
    /// `object` is its kind and, when it has one, its name.
    #[error("document {index} ({object}): {field} is not valid: {reason}")]
    InvalidField {
        index: usize,
        object: String,
        field: String,
        reason: String,
    },
    #[error("document {index} ({object}): the patch did not apply: {reason}")]
    PatchFailed {
        index: usize,
        object: String,
        reason: String,
    },
}

/// The mutated documents, and the warnings for the user.
#[derive(Debug, Default)]
pub struct Mutated {
    pub output: String,
    pub warnings: Vec<String>,
    pub rewritten: usize,
}

/// Where a kind keeps its pod template, as JSON Pointer tokens; `None` for
/// other kinds, and for a kind of that name in another API group (a custom
/// resource called `Deployment`). An object without `apiVersion` (an item
/// of a typed list) is judged by its kind.
fn pod_location(api_version: Option<&str>, kind: &str) -> Option<&'static [&'static str]> {
    let (groups, location): (&[&str], &'static [&'static str]) = match kind {
        "Pod" => (&[""], &[]),
        "ReplicationController" => (&[""], &["spec", "template"]),
        // core/v1 PodTemplate keeps its template beside its metadata.
        "PodTemplate" => (&[""], &["template"]),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" => {
            (&["apps", "extensions"], &["spec", "template"])
        }
        "Job" => (&["batch"], &["spec", "template"]),
        "CronJob" => (&["batch"], &["spec", "jobTemplate", "spec", "template"]),
        _ => return None,
    };
    let group = api_version.map(|version| version.rsplit_once('/').map_or("", |(group, _)| group));
    group
        .is_none_or(|group| groups.contains(&group))
        .then_some(location)
}

/// Mutates a stream of Kubernetes objects, YAML (multi-document) or JSON,
/// as the webhook would mutate the pods they create. Output keeps the
/// input's format; objects without pods pass through unchanged. An object
/// that names no namespace is taken to go into `target_namespace` (as with
/// `kubectl apply -n`), so its exclusions apply; with none, into a
/// namespace no exclusion covers.
pub fn mutate_documents(
    policy: &Policy,
    input: &str,
    target_namespace: Option<&str>,
) -> Result<Mutated, MutateError> {
    let Input {
        documents,
        is_json,
        warnings,
    } = read_documents(input)?;
    let mut mutated = Mutated {
        warnings,
        ..Mutated::default()
    };
    let mut outputs = Vec::with_capacity(documents.len());
    for (index, mut document) in documents.into_iter().enumerate() {
        // An empty YAML document (`---` twice) holds no object; it still
        // counts, so that errors name documents as an editor counts them.
        if !is_json && document.is_null() {
            continue;
        }
        if let Some(what) = not_an_object(&document) {
            mutated.warnings.push(format!(
                "document {}: {what}, not an object, so it holds no pod: left as it is \
                 (each document is read as one object; a list of objects is kind: List)",
                index + 1
            ));
        }
        let target = Target {
            index: index + 1,
            namespace: target_namespace,
        };
        mutate_object(
            policy,
            &target,
            ListedAs::default(),
            &mut document,
            &mut Vec::new(),
            &mut mutated,
        )?;
        outputs.push(document);
    }
    mutated.output = if is_json {
        outputs
            .iter()
            .map(|document| {
                format!(
                    "{}\n",
                    serde_json::to_string_pretty(document).unwrap_or_default()
                )
            })
            .collect()
    } else {
        outputs
            .iter()
            .map(crate::manifest_yaml::to_yaml)
            .collect::<Vec<_>>()
            .join("---\n")
    };
    Ok(mutated)
}

/// What a document is when it is not an object, as its writer would call it.
fn not_an_object(document: &Value) -> Option<&'static str> {
    match document {
        Value::Object(_) => None,
        Value::Array(_) => Some("a list"),
        Value::String(_) => Some("a string"),
        Value::Number(_) => Some("a number"),
        Value::Bool(_) => Some("a boolean"),
        Value::Null => Some("null"),
    }
}

/// The objects of `mutate`'s input.
pub struct Input {
    pub documents: Vec<Value>,
    pub is_json: bool,
    /// What was read otherwise than it is written (a key written twice).
    pub warnings: Vec<String>,
}

/// The input's objects: one JSON value or several in a row (as `jq` prints
/// them), else YAML documents, flow style (`{kind: Pod, ...}`) included.
/// Text that starts like JSON but is neither gets JSON's error, the likelier
/// intent.
pub fn read_documents(input: &str) -> Result<Input, MutateError> {
    let input = input.strip_prefix('\u{feff}').unwrap_or(input);
    if !input.trim_start().starts_with(['{', '[']) {
        return read_yaml(input);
    }
    let values: Result<Vec<Value>, _> = serde_json::Deserializer::from_str(input)
        .into_iter::<Value>()
        .enumerate()
        .map(|(index, value)| value.map_err(|error| (index, error)))
        .collect();
    match values {
        Ok(documents) => Ok(Input {
            documents,
            is_json: true,
            warnings: Vec::new(),
        }),
        Err((index, json_error)) => read_yaml(input).map_err(|_| MutateError::Syntax {
            index: index + 1,
            reason: json_error.to_string(),
        }),
    }
}

/// The documents as `kubectl apply` reads them (YAML 1.1), an empty one as
/// `null`.
fn read_yaml(input: &str) -> Result<Input, MutateError> {
    let read = crate::kubectl_yaml::documents(input).map_err(|error| MutateError::Syntax {
        index: error.document,
        reason: error.reason,
    })?;
    Ok(Input {
        documents: read.documents,
        is_json: false,
        warnings: read.warnings,
    })
}

/// Which document is being mutated, and the namespace of its objects that
/// name none.
struct Target<'a> {
    index: usize,
    namespace: Option<&'a str>,
}

/// What a typed list says of its items, which the API leaves out of them
/// (`PodList` items are Pods without `kind` or `apiVersion`).
#[derive(Clone, Copy, Default)]
struct ListedAs<'a> {
    kind: Option<&'a str>,
    /// The list's: a custom resource's `DeploymentList` holds no apps/v1
    /// Deployments.
    api_version: Option<&'a str>,
}

/// Mutates one object at `prefix` inside `root`, recursing into `List`s.
fn mutate_object(
    policy: &Policy,
    target: &Target<'_>,
    listed_as: ListedAs<'_>,
    root: &mut Value,
    prefix: &mut Vec<String>,
    mutated: &mut Mutated,
) -> Result<(), MutateError> {
    let object = root
        .pointer(&json_pointer(prefix.iter().map(String::as_str)))
        .cloned()
        .unwrap_or(Value::Null);
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .or(listed_as.kind)
        .unwrap_or("")
        .to_owned();
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .or(listed_as.api_version);
    let name = object
        .pointer("/metadata/name")
        .or_else(|| object.pointer("/metadata/generateName"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if let Some(listed) = kind.strip_suffix("List")
        && let Some(items) = object.get("items").and_then(Value::as_array)
    {
        // A `List`'s items name their own kind and apiVersion.
        let items_are = match listed {
            "" => ListedAs::default(),
            kind => ListedAs {
                kind: Some(kind),
                api_version,
            },
        };
        for item in 0..items.len() {
            prefix.extend(["items".to_owned(), item.to_string()]);
            mutate_object(policy, target, items_are, root, prefix, mutated)?;
            prefix.truncate(prefix.len() - 2);
        }
        return Ok(());
    }
    let Some(location) = pod_location(api_version, &kind) else {
        return Ok(());
    };
    let label = if name.is_empty() {
        kind.clone()
    } else {
        format!("{kind} {name}")
    };
    let invalid = |field: &str, reason: String| MutateError::InvalidField {
        index: target.index,
        object: label.clone(),
        field: field.to_owned(),
        reason,
    };
    let template = object.pointer(&json_pointer(location.iter().copied()));
    let Some(template) = template else {
        return Ok(());
    };
    let field = |leaf: &str| {
        location
            .iter()
            .copied()
            .chain([leaf])
            .collect::<Vec<_>>()
            .join(".")
    };
    // `null` is as good as absent, for both.
    let metadata: Option<TemplateMetadata> = template
        .get("metadata")
        .filter(|m| !m.is_null())
        .map(template_metadata)
        .transpose()
        .map_err(|e| invalid(&field("metadata"), e.to_string()))?;
    let spec: Option<PodImages> = template
        .get("spec")
        .filter(|s| !s.is_null())
        .map(PodImages::deserialize)
        .transpose()
        .map_err(|e| invalid(&field("spec"), e.to_string()))?;
    // An empty namespace is no namespace, as the API and kubectl read it
    // (cli-runtime's `SetNamespace` fills in `-n` when its length is 0).
    let namespace = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .filter(|namespace| !namespace.is_empty())
        .or(target.namespace);
    let tokens: Vec<&str> = prefix
        .iter()
        .map(String::as_str)
        .chain(location.iter().copied())
        .collect();
    let plan = plan_pod_patch(
        policy,
        PodView {
            namespace,
            metadata: metadata.as_ref().map(|m| &m.meta),
            annotations_bytes: metadata.as_ref().map_or(0, |m| m.annotations_bytes),
            spec: spec.as_ref(),
            location: &tokens,
        },
        &Scope::WholePod,
    );
    mutated
        .warnings
        .extend(plan.warnings.iter().map(|w| format!("{label}: {w}")));
    mutated.rewritten += plan.rewritten.len();
    json_patch::patch(root, &plan.operations).map_err(|e| MutateError::PatchFailed {
        index: target.index,
        object: label,
        reason: e.to_string(),
    })
}

fn json_pointer<'t>(tokens: impl IntoIterator<Item = &'t str>) -> String {
    json_patch::jsonptr::PointerBuf::from_tokens(tokens).to_string()
}
