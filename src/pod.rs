//! The parts of a Pod the policy reads, and nothing else.
//!
//! The apiserver sends the whole Pod (managed fields, volumes, probes,
//! resources, ...) on every review; decoding all of it into
//! `k8s_openapi::api::core::v1::Pod` allocated every string and map and was
//! the largest share of a review's cost. These types keep only what a plan
//! needs (names, images, labels, annotations, pull secrets) and let serde skip
//! the rest without building it. The patch never re-serializes them, so the
//! skipped fields are untouched in the pod the apiserver stores.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::patch::{
    ENABLED_LABEL, MIRROR_POD_ANNOTATION, ORIGINAL_IMAGES_ANNOTATION,
    ORIGINAL_VOLUME_IMAGES_ANNOTATION,
};

/// A Pod as the policy sees it. Implements `kube::Resource` so kube-core's
/// `AdmissionRequest<PodObject>` carries it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodObject {
    /// Only name, generateName and namespace, the `image-rewriter.io/enabled`
    /// label, and the original-images, original-volume-images and mirror-pod
    /// annotations are kept;
    /// `labels` and `annotations` are `Some` exactly when the object had
    /// them. Boxed: kube-core's request holds two pods by value and the
    /// decode moves it several times, 360 bytes of mostly empty fields each.
    pub metadata: Box<ObjectMeta>,
    /// Whether the object had a `metadata` object at all (`null` or absent
    /// is none: a patch must then add `/metadata` whole).
    pub has_metadata: bool,
    /// The bytes of all its annotations' keys and values, the size the
    /// apiserver limits (256 KiB in all): the policy keeps only two.
    pub annotations_bytes: usize,
    pub spec: Option<PodImages>,
}

/// The fields of a PodSpec that name images or pull secrets. Its
/// containers, in all three lists together, are read up to
/// [`MAX_CONTAINERS`], its pull secrets up to [`MAX_PULL_SECRETS`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodImages {
    /// Empty when absent or `null`: mutating admission runs before
    /// validation, and Go encodes a Pod sent without containers as
    /// `"containers": null`. Such a pod is allowed here (nothing to rewrite)
    /// so that the apiserver's own validation tells the user what is wrong.
    pub containers: Vec<ContainerImage>,
    pub init_containers: Option<Vec<ContainerImage>>,
    pub ephemeral_containers: Option<Vec<ContainerImage>>,
    /// `None` when absent or `null` (serde reads `null` as `None`): a patch
    /// must then add the array whole. A `null` entry is an empty reference,
    /// as Go decodes it.
    pub image_pull_secrets: Option<Vec<SecretReference>>,
    /// The `volumes` that are images (`image.reference`, Kubernetes 1.31 and
    /// later): the kubelet pulls them as it pulls a container's image, with
    /// the pod's pull secrets. Other volumes are skipped, counted by index.
    pub image_volumes: Vec<ImageVolume>,
}

/// A volume whose content is an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageVolume {
    /// Its position in `volumes`.
    pub index: usize,
    pub name: String,
    pub reference: String,
}

/// The `volumes` a Pod may have: like [`MAX_CONTAINERS`], a bound on what
/// a review sent straight to the port makes the plan hold.
pub const MAX_VOLUMES: usize = 65_536;

/// The containers a Pod may have in all its lists together. The most the
/// webhook can be sent is what fits in its body limit (8 MiB): some 55 000
/// of the smallest containers as the apiserver sends them, defaulted (~150
/// bytes each); etcd's default object limit (1.5 MiB) would store roughly
/// 26 000 (estimated from their protobuf size, not measured).
/// A review sent straight to the port can hold far more, and each container
/// costs the plan and the answer some 25 times its bytes: one 8 MiB review
/// of 291 000 tiny containers peaked at 268 MB, past the shipped memory
/// limit. Past this a review is refused (400) before the rest is read.
pub const MAX_CONTAINERS: usize = 65_536;

/// The `imagePullSecrets` entries a Pod may have: far more than anyone
/// writes, and a bound on what a review of millions of `{}` would hold.
pub const MAX_PULL_SECRETS: usize = 65_536;

impl<'de> Deserialize<'de> for PodImages {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(PodImagesVisitor)
    }
}

struct PodImagesVisitor;

impl<'de> Visitor<'de> for PodImagesVisitor {
    type Value = PodImages;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a PodSpec")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PodImages, A::Error> {
        let mut images = PodImages::default();
        let mut containers_left = MAX_CONTAINERS;
        let mut seen = BTreeSet::new();
        while let Some(Key(key)) = map.next_key()? {
            let field: &'static str = match key.as_ref() {
                "containers" => "containers",
                "initContainers" => "initContainers",
                "ephemeralContainers" => "ephemeralContainers",
                "imagePullSecrets" => "imagePullSecrets",
                "volumes" => "volumes",
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            if !seen.insert(field) {
                return Err(serde::de::Error::duplicate_field(field));
            }
            let list = ContainerList {
                left: &mut containers_left,
            };
            match field {
                "containers" => images.containers = map.next_value_seed(list)?.unwrap_or_default(),
                "initContainers" => images.init_containers = map.next_value_seed(list)?,
                "ephemeralContainers" => images.ephemeral_containers = map.next_value_seed(list)?,
                "volumes" => images.image_volumes = map.next_value::<VolumeList>()?.0,
                _ => images.image_pull_secrets = map.next_value::<PullSecretList>()?.0,
            }
        }
        Ok(images)
    }
}

/// A container list, or `None` for `null` or absent, counted against what
/// the Pod's lists may hold together.
struct ContainerList<'a> {
    left: &'a mut usize,
}

impl<'de> DeserializeSeed<'de> for ContainerList<'_> {
    type Value = Option<Vec<ContainerImage>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for ContainerList<'_> {
    type Value = Option<Vec<ContainerImage>>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a list of containers, or null")
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut containers = Vec::new();
        while let Some(container) = seq.next_element()? {
            if *self.left == 0 {
                return Err(serde::de::Error::custom(format_args!(
                    "more than {MAX_CONTAINERS} containers"
                )));
            }
            *self.left -= 1;
            containers.push(container);
        }
        Ok(Some(containers))
    }
}

/// `imagePullSecrets`, up to [`MAX_PULL_SECRETS`] entries.
struct PullSecretList(Option<Vec<SecretReference>>);

impl<'de> Deserialize<'de> for PullSecretList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = PullSecretList;
            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a list of pull secret references, or null")
            }
            fn visit_none<E>(self) -> Result<PullSecretList, E> {
                Ok(PullSecretList(None))
            }
            fn visit_unit<E>(self) -> Result<PullSecretList, E> {
                Ok(PullSecretList(None))
            }
            fn visit_some<D: Deserializer<'de>>(
                self,
                deserializer: D,
            ) -> Result<PullSecretList, D::Error> {
                deserializer.deserialize_seq(self)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PullSecretList, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = seq.next_element::<Option<SecretReference>>()? {
                    if entries.len() == MAX_PULL_SECRETS {
                        return Err(serde::de::Error::custom(format_args!(
                            "more than {MAX_PULL_SECRETS} imagePullSecrets"
                        )));
                    }
                    entries.push(entry.unwrap_or_default());
                }
                Ok(PullSecretList(Some(entries)))
            }
        }
        deserializer.deserialize_option(Entries)
    }
}

/// The image volumes of `volumes` (`null` or absent: none), up to
/// [`MAX_VOLUMES`] volumes of any kind.
struct VolumeList(Vec<ImageVolume>);

impl<'de> Deserialize<'de> for VolumeList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = VolumeList;
            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a list of volumes, or null")
            }
            fn visit_none<E>(self) -> Result<VolumeList, E> {
                Ok(VolumeList(Vec::new()))
            }
            fn visit_unit<E>(self) -> Result<VolumeList, E> {
                Ok(VolumeList(Vec::new()))
            }
            fn visit_some<D: Deserializer<'de>>(
                self,
                deserializer: D,
            ) -> Result<VolumeList, D::Error> {
                deserializer.deserialize_seq(self)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<VolumeList, A::Error> {
                let mut images = Vec::new();
                let mut index = 0;
                while let Some(volume) = seq.next_element::<Option<VolumeFields<'de>>>()? {
                    if index == MAX_VOLUMES {
                        return Err(serde::de::Error::custom(format_args!(
                            "more than {MAX_VOLUMES} volumes"
                        )));
                    }
                    let reference = volume.and_then(|v| Some((v.name, v.image?.reference?)));
                    if let Some((name, reference)) = reference {
                        images.push(ImageVolume {
                            index,
                            name: name.map(|name| name.0.into_owned()).unwrap_or_default(),
                            reference,
                        });
                    }
                    index += 1;
                }
                Ok(VolumeList(images))
            }
        }
        deserializer.deserialize_option(Entries)
    }
}

/// What a volume holds that the policy reads. The name is borrowed from
/// the body when it can be: every pod has a volume or two (its service
/// account token's), and only image volumes keep theirs.
#[derive(Deserialize)]
struct VolumeFields<'a> {
    #[serde(default, borrow)]
    name: Option<BorrowedText<'a>>,
    #[serde(default)]
    image: Option<ImageVolumeSource>,
}

/// A string, borrowed from the body when it has no escapes (serde's own
/// `Cow<str>` copies every time).
struct BorrowedText<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for BorrowedText<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl<'de> Visitor<'de> for Text {
            type Value = BorrowedText<'de>;
            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Self::Value, E> {
                Ok(BorrowedText(Cow::Borrowed(text)))
            }
            fn visit_str<E>(self, text: &str) -> Result<Self::Value, E> {
                Ok(BorrowedText(Cow::Owned(text.to_owned())))
            }
        }
        deserializer.deserialize_str(Text)
    }
}

#[derive(Deserialize)]
struct ImageVolumeSource {
    #[serde(default)]
    reference: Option<String>,
}

/// A `null` string is `""`, as Go decodes it into a `string` field or map
/// value: what a manifest's `key:` with no value reads as.
fn null_as_empty_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(deserializer)?.unwrap_or_default())
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
    #[serde(default, deserialize_with = "null_as_empty_string")]
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
    #[serde(default, deserialize_with = "enabled_label")]
    labels: Option<MapEntries>,
    #[serde(default, deserialize_with = "annotations_read")]
    annotations: Option<MapEntries>,
}

fn enabled_label<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<MapEntries>, D::Error> {
    deserializer.deserialize_option(OnlyEntries(&[ENABLED_LABEL]))
}

fn annotations_read<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<MapEntries>, D::Error> {
    deserializer.deserialize_option(OnlyEntries(&[
        ORIGINAL_IMAGES_ANNOTATION,
        ORIGINAL_VOLUME_IMAGES_ANNOTATION,
        MIRROR_POD_ANNOTATION,
    ]))
}

/// What is read of a label or annotation map.
struct MapEntries {
    /// The entries the policy reads.
    kept: BTreeMap<String, String>,
    /// The bytes of every key and value (UTF-8, unescaped), the size the
    /// apiserver bounds a pod's annotations by (256 KiB in all), so that
    /// the patch does not add an annotation past it. A `null` or non-string
    /// value counts as `""`.
    bytes: usize,
}

/// A label or annotation map reduced to the entries the policy reads: the
/// others (an annotation can hold a whole last-applied manifest) are
/// measured and skipped, not copied. `null` is `None`; a map without those
/// entries has none kept.
struct OnlyEntries(&'static [&'static str]);

impl<'de> Visitor<'de> for OnlyEntries {
    type Value = Option<MapEntries>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a map of strings, or null")
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut kept = BTreeMap::new();
        let mut bytes = 0;
        while let Some(Key(key)) = map.next_key()? {
            bytes += key.len();
            if self.0.contains(&key.as_ref()) {
                let value = map.next_value::<Option<String>>()?.unwrap_or_default();
                bytes += value.len();
                kept.insert(key.into_owned(), value);
            } else {
                bytes += map.next_value::<StringBytes>()?.0;
            }
        }
        Ok(Some(MapEntries { kept, bytes }))
    }
}

/// The length of a string value, read without copying it when it has no
/// escapes; any other value is skipped and counts 0.
struct StringBytes(usize);

impl<'de> Deserialize<'de> for StringBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LengthVisitor;
        impl<'de> Visitor<'de> for LengthVisitor {
            type Value = StringBytes;
            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("any value")
            }
            fn visit_str<E>(self, value: &str) -> Result<StringBytes, E> {
                Ok(StringBytes(value.len()))
            }
            fn visit_bool<E>(self, _: bool) -> Result<StringBytes, E> {
                Ok(StringBytes(0))
            }
            fn visit_i64<E>(self, _: i64) -> Result<StringBytes, E> {
                Ok(StringBytes(0))
            }
            fn visit_u64<E>(self, _: u64) -> Result<StringBytes, E> {
                Ok(StringBytes(0))
            }
            fn visit_f64<E>(self, _: f64) -> Result<StringBytes, E> {
                Ok(StringBytes(0))
            }
            fn visit_unit<E>(self) -> Result<StringBytes, E> {
                Ok(StringBytes(0))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<StringBytes, A::Error> {
                IgnoredAny.visit_seq(seq).map(|_| StringBytes(0))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<StringBytes, A::Error> {
                IgnoredAny.visit_map(map).map(|_| StringBytes(0))
            }
        }
        deserializer.deserialize_any(LengthVisitor)
    }
}

/// A map key, borrowed from the input when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, key: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(key)))
            }
            fn visit_str<E>(self, key: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(key.to_owned())))
            }
            fn visit_string<E>(self, key: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(key)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// A pod template's `metadata` (a Deployment's, say) read as
/// [`PodObject`] reads a Pod's, so that `mutate` plans as `/mutate` does.
pub fn template_metadata(value: &serde_json::Value) -> Result<TemplateMetadata, serde_json::Error> {
    MetadataFields::deserialize(value).map(MetadataFields::into_template)
}

/// What is read of a pod template's `metadata`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TemplateMetadata {
    pub meta: ObjectMeta,
    /// As [`PodObject::annotations_bytes`].
    pub annotations_bytes: usize,
}

impl MetadataFields {
    fn into_template(self) -> TemplateMetadata {
        let annotations_bytes = self.annotations.as_ref().map_or(0, |a| a.bytes);
        TemplateMetadata {
            meta: ObjectMeta {
                name: self.name,
                generate_name: self.generate_name,
                namespace: self.namespace,
                labels: self.labels.map(|labels| labels.kept),
                annotations: self.annotations.map(|annotations| annotations.kept),
                ..ObjectMeta::default()
            },
            annotations_bytes,
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
        let has_metadata = fields.metadata.is_some();
        let metadata = fields
            .metadata
            .map(MetadataFields::into_template)
            .unwrap_or_default();
        Ok(PodObject {
            has_metadata,
            metadata: Box::new(metadata.meta),
            annotations_bytes: metadata.annotations_bytes,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_are_measured_as_the_apiserver_counts_them_and_never_refused() {
        // Go decodes `null` as ""; a non-string value never reaches a
        // webhook from the apiserver, and is read as "" rather than refused.
        let pod: PodObject = serde_json::from_str(
            r#"{"metadata": {"annotations": {
                "a": "b\"\u00e9", "k": null, "n": 5, "o": {"x": "yyyy"}, "s": ["zz"],
                "image-rewriter.io/original-images": "{}"
            }}}"#,
        )
        .unwrap();
        assert_eq!(pod.annotations_bytes, (1 + 4) + 1 + 1 + 1 + 1 + (33 + 2));
        let kept = pod.metadata.annotations.unwrap();
        assert_eq!(
            kept.keys().collect::<Vec<_>>(),
            [ORIGINAL_IMAGES_ANNOTATION]
        );

        let bare: PodObject =
            serde_json::from_str(r#"{"metadata": {"annotations": null}}"#).unwrap();
        assert_eq!(
            (bare.annotations_bytes, bare.metadata.annotations),
            (0, None)
        );
    }

    fn containers(from: usize, count: usize) -> String {
        (from..from + count)
            .map(|i| format!(r#"{{"name":"c{i}","image":"nginx"}}"#))
            .collect::<Vec<_>>()
            .join(",")
    }

    #[test]
    fn containers_are_read_up_to_their_limit_in_all_lists_together() {
        let third = MAX_CONTAINERS / 3;
        let rest = MAX_CONTAINERS - 2 * third;
        let at_limit = format!(
            r#"{{"spec":{{"containers":[{}],"initContainers":[{}],"ephemeralContainers":[{}]}}}}"#,
            containers(0, third),
            containers(third, third),
            containers(2 * third, rest)
        );
        let spec = serde_json::from_str::<PodObject>(&at_limit)
            .unwrap()
            .spec
            .unwrap();
        assert_eq!(
            spec.containers.len()
                + spec.init_containers.unwrap().len()
                + spec.ephemeral_containers.unwrap().len(),
            MAX_CONTAINERS
        );
        // One more in any list is one too many.
        for list in ["containers", "initContainers", "ephemeralContainers"] {
            let over = at_limit.replacen(
                &format!(r#""{list}":["#),
                &format!(r#""{list}":[{{"name":"extra","image":"nginx"}},"#),
                1,
            );
            let error = serde_json::from_str::<PodObject>(&over).unwrap_err();
            assert!(
                error.to_string().contains("more than 65536 containers"),
                "{list}: {error}"
            );
        }
    }

    #[test]
    fn pull_secrets_are_read_up_to_their_limit() {
        let entries = |count: usize| vec![r#"{"name":"s"}"#; count].join(",");
        let at_limit = format!(
            r#"{{"spec":{{"imagePullSecrets":[{}]}}}}"#,
            entries(MAX_PULL_SECRETS)
        );
        let spec = serde_json::from_str::<PodObject>(&at_limit)
            .unwrap()
            .spec
            .unwrap();
        assert_eq!(spec.image_pull_secrets.unwrap().len(), MAX_PULL_SECRETS);
        let over = format!(
            r#"{{"spec":{{"imagePullSecrets":[{}]}}}}"#,
            entries(MAX_PULL_SECRETS + 1)
        );
        let error = serde_json::from_str::<PodObject>(&over).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("more than 65536 imagePullSecrets"),
            "{error}"
        );
    }

    #[test]
    fn image_volumes_are_read_by_their_index_and_others_skipped() {
        let spec = serde_json::from_str::<PodObject>(
            r#"{"spec":{"volumes":[
                {"name":"token","projected":{"sources":[{"serviceAccountToken":{"path":"t"}}]}},
                {"image":{"pullPolicy":"Always","reference":"quay.io/a:1"},"name":"a"},
                null,
                {"name":"no-reference","image":{"pullPolicy":"Always"}},
                {"name":"null-image","image":null},
                {"name":"b","image":{"reference":"b:2"}},
                {"name":"\u0065scaped","image":{"reference":"c:3"}},
                {"name":null,"image":{"reference":"d:4"}}]}}"#,
        )
        .unwrap()
        .spec
        .unwrap();
        let volume = |index: usize, name: &str, reference: &str| ImageVolume {
            index,
            name: name.into(),
            reference: reference.into(),
        };
        assert_eq!(
            spec.image_volumes,
            [
                volume(1, "a", "quay.io/a:1"),
                volume(5, "b", "b:2"),
                volume(6, "escaped", "c:3"),
                volume(7, "", "d:4")
            ]
        );
        for none in [r#"{"spec":{"volumes":null}}"#, r#"{"spec":{}}"#] {
            let spec = serde_json::from_str::<PodObject>(none).unwrap().spec;
            assert!(spec.unwrap().image_volumes.is_empty(), "{none}");
        }
        let at_limit = format!(
            r#"{{"spec":{{"volumes":[{}]}}}}"#,
            vec!["{}"; MAX_VOLUMES].join(",")
        );
        assert!(serde_json::from_str::<PodObject>(&at_limit).is_ok());
        let over = format!(
            r#"{{"spec":{{"volumes":[{}]}}}}"#,
            vec!["{}"; MAX_VOLUMES + 1].join(",")
        );
        let error = serde_json::from_str::<PodObject>(&over).unwrap_err();
        assert!(
            error.to_string().contains("more than 65536 volumes"),
            "{error}"
        );
        let error = serde_json::from_str::<PodObject>(r#"{"spec":{"volumes":[],"volumes":[]}}"#)
            .unwrap_err();
        assert!(
            error.to_string().contains("duplicate field `volumes`"),
            "{error}"
        );
    }

    #[test]
    fn spec_fields_read_as_before() {
        // `null` and absent lists are still read as before.
        let pod: PodObject =
            serde_json::from_str(r#"{"spec":{"containers":null,"initContainers":null}}"#).unwrap();
        let spec = pod.spec.unwrap();
        assert!(spec.containers.is_empty());
        assert_eq!(spec.init_containers, None);
        assert_eq!(spec.ephemeral_containers, None);
        assert_eq!(spec.image_pull_secrets, None);
        // Other fields are skipped; a `null` pull secret entry is an empty
        // reference, as Go decodes it; a field given twice is refused.
        let spec = serde_json::from_str::<PodObject>(
            r#"{"spec":{"volumes":[{"name":"v"}],"containers":[{"name":"a","image":"x","env":[]}],
                "imagePullSecrets":[null,{"name":"s"}],"nodeName":"n"}}"#,
        )
        .unwrap()
        .spec
        .unwrap();
        assert_eq!(spec.containers[0].image.as_deref(), Some("x"));
        assert_eq!(
            spec.image_pull_secrets.unwrap(),
            [
                SecretReference::default(),
                SecretReference { name: "s".into() }
            ]
        );
        let error =
            serde_json::from_str::<PodObject>(r#"{"spec":{"containers":[],"containers":[]}}"#)
                .unwrap_err();
        assert!(
            error.to_string().contains("duplicate field `containers`"),
            "{error}"
        );
    }
}
