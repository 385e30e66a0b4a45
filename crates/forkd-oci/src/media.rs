//! Media types and the OCI documents forkd reads and writes: descriptors,
//! image manifests, image indexes, image configs (and their Docker v2
//! equivalents, which differ only in media type). Only the fields forkd uses
//! are typed; unknown fields are ignored on read. Pure: parsing and encoding.
//!
//! Written by hand rather than with `oci-spec` because forkd needs a handful of
//! fields, must accept Docker's media types beside OCI's in the same structs,
//! and keeps its own forkd media types as plain strings.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{OciError, Result};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

/// `artifactType` of a forkd file set pushed as a snapshot.
pub const FORKD_SNAPSHOT_ARTIFACT: &str = "application/vnd.forkd.snapshot.v1+json";
/// Media type of the caller's JSON config blob of a snapshot file set.
pub const FORKD_SNAPSHOT_CONFIG: &str = "application/vnd.forkd.snapshot.config.v1+json";
/// A per-file chunk index (JSON, [`crate::FileIndex`]); its descriptor's
/// `org.opencontainers.image.title` annotation is the file's name.
pub const FORKD_FILE_INDEX: &str = "application/vnd.forkd.file.index.v1+json";
/// One chunk of a file, compressed with zstd.
pub const FORKD_CHUNK: &str = "application/vnd.forkd.chunk.v1+zstd";
/// `artifactType` of the extra manifests that carry chunk descriptors when one
/// manifest would exceed the registry's size limit (see [`crate::fileset`]).
pub const FORKD_CHUNK_CARRIER: &str = "application/vnd.forkd.chunks.v1";

/// The annotation holding a file's name inside the set.
pub const ANNOTATION_TITLE: &str = "org.opencontainers.image.title";

/// Manifests larger than this are refused by distribution; forkd never writes
/// one and never reads one.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// What every manifest-like document may be: forkd asks for all of these.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.to_owned(),
            digest,
            size,
            artifact_type: None,
            platform: None,
            annotations: BTreeMap::new(),
        }
    }

    /// The descriptor of `bytes` stored as a blob.
    pub fn of_bytes(media_type: &str, bytes: &[u8]) -> Descriptor {
        Descriptor::new(media_type, Digest::of(bytes), bytes.len() as u64)
    }

    pub fn title(&self) -> Option<&str> {
        self.annotations.get(ANNOTATION_TITLE).map(String::as_str)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An OCI image manifest (or Docker schema 2 manifest).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An OCI image index (or Docker manifest list).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A manifest-like document, told apart by its media type.
#[derive(Debug, Clone)]
pub enum Manifest {
    Image(ImageManifest),
    Index(ImageIndex),
}

impl Manifest {
    /// Parses `bytes` served (or stored) with `media_type`; when the type is
    /// missing or generic, the document's own `mediaType` field decides.
    pub fn parse(what: &str, media_type: Option<&str>, bytes: &[u8]) -> Result<Manifest> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(OciError::TooLarge {
                what: what.to_owned(),
                limit: MAX_MANIFEST_BYTES as u64,
            });
        }
        let declared = match media_type {
            Some(t) if is_manifest_type(t) => t.to_owned(),
            // Only a missing or generic type lets the document speak for itself.
            Some(t)
                if !matches!(
                    t,
                    "" | "application/json" | "application/octet-stream" | "text/plain"
                ) =>
            {
                return Err(OciError::UnsupportedMediaType {
                    what: what.to_owned(),
                    media_type: t.to_owned(),
                })
            }
            _ => {
                #[derive(Deserialize)]
                #[serde(rename_all = "camelCase")]
                struct Probe {
                    media_type: Option<String>,
                    manifests: Option<serde::de::IgnoredAny>,
                }
                let probe: Probe =
                    serde_json::from_slice(bytes).map_err(|e| OciError::bad(what, e))?;
                match (probe.media_type, probe.manifests) {
                    (Some(t), _) => t,
                    (None, Some(_)) => OCI_INDEX.to_owned(),
                    (None, None) => OCI_MANIFEST.to_owned(),
                }
            }
        };
        match declared.as_str() {
            OCI_MANIFEST | DOCKER_MANIFEST => serde_json::from_slice(bytes)
                .map(Manifest::Image)
                .map_err(|e| OciError::bad(what, e)),
            OCI_INDEX | DOCKER_MANIFEST_LIST => serde_json::from_slice(bytes)
                .map(Manifest::Index)
                .map_err(|e| OciError::bad(what, e)),
            other => Err(OciError::UnsupportedMediaType {
                what: what.to_owned(),
                media_type: other.to_owned(),
            }),
        }
    }
}

fn is_manifest_type(t: &str) -> bool {
    matches!(
        t,
        OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_MANIFEST_LIST
    )
}

/// The part of an image config forkd uses as exec defaults and to verify layers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: Option<ContainerConfig>,
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

/// The `config` object of an image config: defaults for processes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

impl LayerCompression {
    pub fn from_media_type(what: &str, media_type: &str) -> Result<LayerCompression> {
        match media_type {
            OCI_LAYER_TAR | DOCKER_LAYER_TAR => Ok(LayerCompression::None),
            OCI_LAYER_GZIP | DOCKER_LAYER_GZIP => Ok(LayerCompression::Gzip),
            OCI_LAYER_ZSTD => Ok(LayerCompression::Zstd),
            other => Err(OciError::UnsupportedMediaType {
                what: what.to_owned(),
                media_type: other.to_owned(),
            }),
        }
    }

    /// For blobs without a media type (docker-archive layers): the magic bytes decide.
    pub fn sniff(head: &[u8]) -> LayerCompression {
        if head.starts_with(&[0x1f, 0x8b]) {
            LayerCompression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            LayerCompression::Zstd
        } else {
            LayerCompression::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_by_declared_type_or_content() {
        let m = br#"{"schemaVersion":2,"config":{"mediaType":"a","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0},"layers":[]}"#;
        assert!(matches!(
            Manifest::parse("m", None, m).unwrap(),
            Manifest::Image(_)
        ));
        let i = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(
            Manifest::parse("i", Some("application/json"), i).unwrap(),
            Manifest::Index(_)
        ));
        let e = Manifest::parse(
            "x",
            Some("application/vnd.docker.distribution.manifest.v1+prettyjws"),
            m,
        );
        assert!(e.is_err());
        let e = Manifest::parse("x", None, br#"{"mediaType":"text/plain"}"#).unwrap_err();
        assert!(e.to_string().contains("text/plain"), "{e}");
        assert!(Manifest::parse("x", None, b"\xff\x00").is_err());
    }

    #[test]
    fn docker_config_fields_parse() {
        let c: ImageConfig = serde_json::from_str(
            r#"{"architecture":"amd64","os":"linux","config":{"Env":["A=1"],"WorkingDir":"/w","User":"1000:1000","Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap();
        let cc = c.config.unwrap();
        assert_eq!(cc.env.unwrap(), vec!["A=1"]);
        assert_eq!(cc.working_dir.as_deref(), Some("/w"));
        assert_eq!(cc.user.as_deref(), Some("1000:1000"));
        assert_eq!(cc.cmd.unwrap(), vec!["sh"]);
        assert!(cc.entrypoint.is_none());
    }

    #[test]
    fn layer_compression() {
        assert_eq!(
            LayerCompression::sniff(&[0x1f, 0x8b, 8]),
            LayerCompression::Gzip
        );
        assert_eq!(
            LayerCompression::sniff(&[0x28, 0xb5, 0x2f, 0xfd]),
            LayerCompression::Zstd
        );
        assert_eq!(LayerCompression::sniff(b"etc/"), LayerCompression::None);
        assert!(LayerCompression::from_media_type("l", OCI_LAYER_ZSTD).is_ok());
        assert!(LayerCompression::from_media_type("l", "application/x-foo").is_err());
    }
}
