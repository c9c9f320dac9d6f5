//! The parts of a Pod the policy reads, and nothing else.
//!
//! The apiserver sends the whole Pod (managed fields, volumes, probes,
//! resources, ...) on every review; decoding all of it into
//! `k8s_openapi::api::core::v1::Pod` allocated every string and map and was
//! the largest share of a review's cost. These types keep only what a plan
//! needs (names, images, labels, annotations, pull secrets) and let serde skip
//! the rest without building it. The patch never re-serializes them, so the
//! skipped fields are untouched in the pod the apiserver stores.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer};

/// A Pod as the policy sees it. Implements `kube::Resource` so kube-core's
/// `AdmissionRequest<PodObject>` carries it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodObject {
    /// Only name, generateName, namespace, labels and annotations are kept.
    pub metadata: ObjectMeta,
    /// Whether the object had a `metadata` object at all (`null` or absent
    /// is none: a patch must then add `/metadata` whole).
    pub has_metadata: bool,
    pub spec: Option<PodImages>,
}

/// The fields of a PodSpec that name images or pull secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodImages {
    /// Required, as in every PodSpec: a spec without it is not a Pod's.
    pub containers: Vec<ContainerImage>,
    #[serde(default)]
    pub init_containers: Option<Vec<ContainerImage>>,
    #[serde(default)]
    pub ephemeral_containers: Option<Vec<ContainerImage>>,
    /// `None` when absent or `null` (serde reads `null` as `None`): a patch
    /// must then add the array whole.
    #[serde(default)]
    pub image_pull_secrets: Option<Vec<SecretReference>>,
}

/// A container's name and image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ContainerImage {
    pub name: String,
    #[serde(default)]
    pub image: Option<String>,
}

/// An `imagePullSecrets` entry. The name is optional in the API (an empty
/// reference is allowed, if useless).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct SecretReference {
    #[serde(default)]
    pub name: String,
}

/// The ObjectMeta fields a plan or its log line reads.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetadataFields {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    generate_name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

impl From<MetadataFields> for ObjectMeta {
    fn from(fields: MetadataFields) -> Self {
        ObjectMeta {
            name: fields.name,
            generate_name: fields.generate_name,
            namespace: fields.namespace,
            labels: fields.labels,
            annotations: fields.annotations,
            ..ObjectMeta::default()
        }
    }
}

impl<'de> Deserialize<'de> for PodObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Fields {
            #[serde(default)]
            metadata: Option<MetadataFields>,
            #[serde(default)]
            spec: Option<PodImages>,
        }
        let fields = Fields::deserialize(deserializer)?;
        Ok(PodObject {
            has_metadata: fields.metadata.is_some(),
            metadata: fields.metadata.map(ObjectMeta::from).unwrap_or_default(),
            spec: fields.spec,
        })
    }
}

impl k8s_openapi::Resource for PodObject {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Pod";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "pods";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for PodObject {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}
