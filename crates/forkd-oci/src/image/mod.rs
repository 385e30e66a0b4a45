//! Container images as forkd templates: find an image (registry reference,
//! `oci-archive:PATH`, `docker-archive:PATH`, `oci-layout:DIR`), resolve its
//! linux/amd64 manifest, and apply its layers in order into a directory.
//! Every blob is verified: layer bytes against the manifest's digest and size
//! (and the uncompressed stream against the config's `diff_ids`), the config
//! against its descriptor. The manifest digest (a docker-archive has none:
//! its config digest, the image ID, stands in) is the cache key.
//!
//! Turning the directory into a bootable root disk is forkd-guest's job.

mod archive;
pub mod unpack;

use std::fmt;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use crate::client::{ClientOptions, Registry};
use crate::digest::{verify, Digest, Hashing};
use crate::error::{OciError, Result};
use crate::media::*;
use crate::reference::Reference;
use archive::{BlobStore, TarIndex};
pub use unpack::{apply_layer, entry_components, LayerStats, UnpackOptions};

/// Largest image config or `index.json`/`manifest.json` read.
const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;
/// Index → index → manifest nesting followed at most.
const MAX_INDEX_DEPTH: usize = 3;

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    Registry(Reference),
    OciArchive(PathBuf),
    DockerArchive(PathBuf),
    OciLayout(PathBuf),
}

impl ImageSource {
    /// `oci-archive:PATH`, `docker-archive:PATH`, `oci-layout:DIR`, or a
    /// registry reference (optionally `docker://REF`).
    pub fn parse(text: &str) -> Result<ImageSource> {
        let path = |p: &str| -> Result<PathBuf> {
            if p.is_empty() {
                return Err(OciError::InvalidSource {
                    source_text: text.to_owned(),
                    reason: "the path is empty".into(),
                });
            }
            Ok(PathBuf::from(p))
        };
        if let Some(p) = text.strip_prefix("oci-archive:") {
            return Ok(ImageSource::OciArchive(path(p)?));
        }
        if let Some(p) = text.strip_prefix("docker-archive:") {
            return Ok(ImageSource::DockerArchive(path(p)?));
        }
        if let Some(p) = text
            .strip_prefix("oci-layout:")
            .or_else(|| text.strip_prefix("oci:"))
        {
            return Ok(ImageSource::OciLayout(path(p)?));
        }
        let reference = text.strip_prefix("docker://").unwrap_or(text);
        Ok(ImageSource::Registry(Reference::parse(reference)?))
    }
}

impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageSource::Registry(r) => write!(f, "{r}"),
            ImageSource::OciArchive(p) => write!(f, "oci-archive:{}", p.display()),
            ImageSource::DockerArchive(p) => write!(f, "docker-archive:{}", p.display()),
            ImageSource::OciLayout(p) => write!(f, "oci-layout:{}", p.display()),
        }
    }
}

impl FromStr for ImageSource {
    type Err = OciError;
    fn from_str(s: &str) -> Result<Self> {
        ImageSource::parse(s)
    }
}

/// An image whose manifest and config were read and verified; its layers
/// are read when it is unpacked.
pub struct ResolvedImage {
    source: String,
    store: BlobStore,
    digest: Digest,
    config_digest: Digest,
    config: ImageConfig,
    layers: Vec<Layer>,
}

/// One layer to apply.
struct Layer {
    what: String,
    location: LayerLocation,
    diff_id: Option<Digest>,
}

enum LayerLocation {
    /// A blob with a descriptor (OCI layouts and registries).
    Blob(Descriptor),
    /// A file inside a docker-archive (no descriptor; the diff_id verifies it).
    File(String),
}

/// What unpacking produced: the cache key and the defaults for exec.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    /// Manifest digest (docker-archive: config digest): the cache key.
    pub digest: Digest,
    pub config_digest: Digest,
    /// `Env`, `WorkingDir`, `User`, `Entrypoint`, `Cmd` of the image config.
    pub config: ContainerConfig,
    pub layers: Vec<LayerStats>,
}

/// Reads and verifies the manifest and config of the image at `source`.
pub fn resolve(source: &ImageSource, client: &ClientOptions) -> Result<ResolvedImage> {
    match source {
        ImageSource::Registry(reference) => resolve_registry(reference, client),
        ImageSource::OciLayout(dir) => {
            check_layout(&BlobStore::Layout(dir.clone()), &source.to_string())?;
            resolve_layout(BlobStore::Layout(dir.clone()), source.to_string())
        }
        ImageSource::OciArchive(path) => {
            let store = BlobStore::Archive(TarIndex::open(path)?);
            check_layout(&store, &source.to_string())?;
            resolve_layout(store, source.to_string())
        }
        ImageSource::DockerArchive(path) => resolve_docker_archive(path, source.to_string()),
    }
}

fn check_layout(store: &BlobStore, shown: &str) -> Result<()> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct LayoutFile {
        image_layout_version: String,
    }
    let bytes = store.read_file("oci-layout", 64 * 1024)?;
    let layout: LayoutFile = serde_json::from_slice(&bytes)
        .map_err(|e| OciError::bad(format!("oci-layout file of {shown}"), e))?;
    if !layout.image_layout_version.starts_with("1.") {
        return Err(OciError::bad(
            format!("oci-layout file of {shown}"),
            format!(
                "layout version {} (forkd reads 1.x)",
                layout.image_layout_version
            ),
        ));
    }
    Ok(())
}

/// Picks the linux/amd64 entry of an index; an index with one entry and no
/// platform is taken as it is.
fn pick_platform<'a>(index: &'a ImageIndex, shown: &str) -> Result<&'a Descriptor> {
    let amd64 = index.manifests.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    });
    if let Some(d) = amd64 {
        return Ok(d);
    }
    if let [only] = index.manifests.as_slice() {
        if only.platform.is_none() {
            return Ok(only);
        }
    }
    let available: Vec<String> = index
        .manifests
        .iter()
        .map(|d| match &d.platform {
            Some(p) => format!("{}/{}", p.os, p.architecture),
            None => "unspecified".to_owned(),
        })
        .collect();
    Err(OciError::NoPlatform {
        reference: shown.to_owned(),
        available: if available.is_empty() {
            "nothing".into()
        } else {
            available.join(", ")
        },
    })
}

fn resolve_layout(store: BlobStore, shown: String) -> Result<ResolvedImage> {
    let bytes = store.read_file("index.json", MAX_MANIFEST_BYTES as u64)?;
    let mut document = Manifest::parse(&format!("index.json of {shown}"), Some(OCI_INDEX), &bytes)?;
    for _ in 0..MAX_INDEX_DEPTH {
        match document {
            Manifest::Image(_) => break,
            Manifest::Index(index) => {
                let desc = pick_platform(&index, &shown)?.clone();
                let bytes = store.read_blob(&desc, "manifest", MAX_MANIFEST_BYTES as u64)?;
                document = Manifest::parse(
                    &format!("manifest {} of {shown}", desc.digest),
                    Some(&desc.media_type),
                    &bytes,
                )?;
                if let Manifest::Image(manifest) = document {
                    return finish_resolve(store, shown, desc.digest, manifest);
                }
            }
        }
    }
    Err(OciError::bad(
        format!("index.json of {shown}"),
        "no image manifest within three levels of indexes",
    ))
}

fn resolve_registry(reference: &Reference, options: &ClientOptions) -> Result<ResolvedImage> {
    let client = Registry::new(reference.api_host(), options.clone())?;
    let repo = reference.repository.clone();
    let shown = reference.to_string();
    let mut target = reference.manifest_reference();
    for _ in 0..MAX_INDEX_DEPTH {
        let (media_type, bytes, digest) = client.get_manifest(&repo, &target)?;
        match Manifest::parse(
            &format!("manifest of {shown}"),
            media_type.as_deref(),
            &bytes,
        )? {
            Manifest::Image(manifest) => {
                return finish_resolve(
                    BlobStore::Registry {
                        client: Box::new(client),
                        repo,
                    },
                    shown,
                    digest,
                    manifest,
                );
            }
            Manifest::Index(index) => target = pick_platform(&index, &shown)?.digest.to_string(),
        }
    }
    Err(OciError::bad(
        format!("manifest of {shown}"),
        "no image manifest within three levels of indexes",
    ))
}

fn finish_resolve(
    store: BlobStore,
    shown: String,
    digest: Digest,
    manifest: ImageManifest,
) -> Result<ResolvedImage> {
    if !matches!(
        manifest.config.media_type.as_str(),
        OCI_CONFIG | DOCKER_CONFIG
    ) {
        return Err(OciError::UnsupportedMediaType {
            what: format!("the config of {shown} (is it a container image?)"),
            media_type: manifest.config.media_type.clone(),
        });
    }
    let bytes = store.read_blob(&manifest.config, "image config", MAX_CONFIG_BYTES)?;
    let config: ImageConfig = serde_json::from_slice(&bytes)
        .map_err(|e| OciError::bad(format!("image config of {shown}"), e))?;
    let diff_ids = diff_ids_for(&config, manifest.layers.len());
    let layers = manifest
        .layers
        .into_iter()
        .zip(diff_ids)
        .map(|(desc, diff_id)| {
            LayerCompression::from_media_type(&format!("layer {}", desc.digest), &desc.media_type)?;
            Ok(Layer {
                what: format!("layer {}", desc.digest),
                location: LayerLocation::Blob(desc),
                diff_id,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ResolvedImage {
        source: shown,
        store,
        digest,
        config_digest: manifest.config.digest,
        config,
        layers,
    })
}

/// The config's diff_ids, one per layer, when their count matches.
fn diff_ids_for(config: &ImageConfig, layers: usize) -> Vec<Option<Digest>> {
    match &config.rootfs {
        Some(rootfs) if rootfs.diff_ids.len() == layers => {
            rootfs.diff_ids.iter().cloned().map(Some).collect()
        }
        _ => vec![None; layers],
    }
}

fn resolve_docker_archive(path: &Path, shown: String) -> Result<ResolvedImage> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Entry {
        config: String,
        #[serde(default)]
        layers: Vec<String>,
    }
    let store = BlobStore::Archive(TarIndex::open(path)?);
    let bytes = store.read_file("manifest.json", MAX_CONFIG_BYTES)?;
    let entries: Vec<Entry> = serde_json::from_slice(&bytes)
        .map_err(|e| OciError::bad(format!("manifest.json of {shown}"), e))?;
    let entry = match entries.as_slice() {
        [only] => only,
        other => {
            return Err(OciError::Archive {
                path: path.to_owned(),
                reason: format!(
                "it holds {} images; forkd reads archives of exactly one (`docker save` one image)",
                other.len()
            ),
            })
        }
    };
    let config_bytes = store.read_file(&entry.config, MAX_CONFIG_BYTES)?;
    let config_digest = Digest::of(&config_bytes);
    // The config's file name is its digest in every docker save format; check it when it is.
    let stem = entry
        .config
        .rsplit('/')
        .next()
        .unwrap_or("")
        .trim_end_matches(".json");
    if let Ok(named) = Digest::parse(&format!("sha256:{stem}")) {
        if named != config_digest {
            return Err(OciError::DigestMismatch {
                what: format!("image config {} of {shown}", entry.config),
                digest: named,
                actual: config_digest,
            });
        }
    }
    let config: ImageConfig = serde_json::from_slice(&config_bytes)
        .map_err(|e| OciError::bad(format!("image config of {shown}"), e))?;
    let diff_ids = diff_ids_for(&config, entry.layers.len());
    if diff_ids.iter().any(Option::is_none) {
        return Err(OciError::bad(
            format!("image config of {shown}"),
            format!(
                "it lists {} diff_ids for {} layers, so the layers cannot be verified",
                config.rootfs.as_ref().map_or(0, |r| r.diff_ids.len()),
                entry.layers.len()
            ),
        ));
    }
    let layers = entry
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(name, diff_id)| Layer {
            what: format!("layer {name}"),
            location: LayerLocation::File(name.clone()),
            diff_id,
        })
        .collect();
    Ok(ResolvedImage {
        source: shown,
        store,
        digest: config_digest.clone(),
        config_digest,
        config,
        layers,
    })
}

impl ResolvedImage {
    /// The cache key: manifest digest (docker-archive: config digest).
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Exec defaults from the image config.
    pub fn container_config(&self) -> ContainerConfig {
        self.config.config.clone().unwrap_or_default()
    }

    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// Applies every layer in order onto `dest` (an existing, normally empty
    /// directory the caller discards on error), verifying each.
    pub fn unpack(&self, dest: &Path, options: &UnpackOptions) -> Result<ImageInfo> {
        let mut stats = Vec::new();
        for layer in &self.layers {
            stats.push(self.apply(layer, dest, options)?);
        }
        Ok(ImageInfo {
            digest: self.digest.clone(),
            config_digest: self.config_digest.clone(),
            config: self.container_config(),
            layers: stats,
        })
    }

    fn apply(&self, layer: &Layer, dest: &Path, options: &UnpackOptions) -> Result<LayerStats> {
        let (raw, declared) = match &layer.location {
            LayerLocation::Blob(desc) => (
                self.store.open_blob(desc, &layer.what)?,
                Some(LayerCompression::from_media_type(
                    &layer.what,
                    &desc.media_type,
                )?),
            ),
            LayerLocation::File(name) => match &self.store {
                BlobStore::Archive(index) => (index.open_entry(name)?.0, None),
                _ => {
                    return Err(OciError::bad(
                        &layer.what,
                        "a file layer outside an archive",
                    ))
                }
            },
        };
        let read_error =
            |e: io::Error| OciError::io("read", format!("{} of {}", layer.what, self.source))(e);
        let mut outer = Hashing::new(raw);
        let (diff_id, stats) = {
            let mut buffered = BufReader::with_capacity(256 * 1024, &mut outer);
            let compression = match declared {
                Some(c) => c,
                None => LayerCompression::sniff(buffered.fill_buf().map_err(read_error)?),
            };
            let decompressed: Box<dyn Read + '_> = match compression {
                LayerCompression::None => Box::new(buffered),
                LayerCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(buffered)),
                LayerCompression::Zstd => {
                    Box::new(zstd::Decoder::with_buffer(buffered).map_err(read_error)?)
                }
            };
            let mut inner = Hashing::new(decompressed);
            let stats = apply_layer(&mut inner, dest, &layer.what, options)?;
            // The tar ends before its padding does; the digests cover all of it.
            io::copy(&mut inner, &mut io::sink()).map_err(read_error)?;
            let (diff_id, _, _) = inner.finish();
            (diff_id, stats)
        };
        io::copy(&mut outer, &mut io::sink()).map_err(read_error)?;
        let (digest, size, _) = outer.finish();
        if let LayerLocation::Blob(desc) = &layer.location {
            verify(&layer.what, &desc.digest, desc.size, &digest, size)?;
        }
        if let Some(expected) = &layer.diff_id {
            if *expected != diff_id {
                return Err(OciError::DigestMismatch {
                    what: format!("{} (uncompressed, the config's diff_id)", layer.what),
                    digest: expected.clone(),
                    actual: diff_id,
                });
            }
        }
        Ok(stats)
    }
}

/// Resolves and unpacks in one call.
pub fn unpack_image(
    source: &ImageSource,
    dest: &Path,
    client: &ClientOptions,
    options: &UnpackOptions,
) -> Result<ImageInfo> {
    resolve(source, client)?.unpack(dest, options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        assert_eq!(
            ImageSource::parse("oci-archive:/x.tar").unwrap(),
            ImageSource::OciArchive("/x.tar".into())
        );
        assert_eq!(
            ImageSource::parse("docker-archive:x.tar").unwrap(),
            ImageSource::DockerArchive("x.tar".into())
        );
        assert_eq!(
            ImageSource::parse("oci-layout:/d").unwrap(),
            ImageSource::OciLayout("/d".into())
        );
        assert!(matches!(
            ImageSource::parse("127.0.0.1:5000/a:b").unwrap(),
            ImageSource::Registry(_)
        ));
        assert!(matches!(
            ImageSource::parse("docker://h.io/a").unwrap(),
            ImageSource::Registry(_)
        ));
        assert!(ImageSource::parse("oci-archive:").is_err());
        assert!(ImageSource::parse("NOT A REF").is_err());
    }

    fn desc(os: &str, arch: &str) -> Descriptor {
        let mut d = Descriptor::of_bytes(OCI_MANIFEST, arch.as_bytes());
        d.platform = Some(Platform {
            architecture: arch.into(),
            os: os.into(),
            variant: None,
        });
        d
    }

    #[test]
    fn platform_choice() {
        let index = |manifests| ImageIndex {
            schema_version: 2,
            media_type: None,
            artifact_type: None,
            manifests,
            annotations: Default::default(),
        };
        let i = index(vec![desc("linux", "arm64"), desc("linux", "amd64")]);
        assert_eq!(
            pick_platform(&i, "x")
                .unwrap()
                .platform
                .as_ref()
                .unwrap()
                .architecture,
            "amd64"
        );
        let e = pick_platform(
            &index(vec![desc("linux", "arm64"), desc("windows", "amd64")]),
            "img",
        )
        .unwrap_err();
        assert!(e.to_string().contains("linux/arm64, windows/amd64"), "{e}");
        let plain = Descriptor::of_bytes(OCI_MANIFEST, b"m");
        assert!(pick_platform(&index(vec![plain]), "x").is_ok());
        assert!(pick_platform(&index(vec![]), "x").is_err());
    }
}
