//! The config of a snapshot artifact: which snapshots it carries (the pushed
//! one first, then its parents), under which file names of the file set
//! their files travel, which boot files (kernel, initramfs) and base disks
//! they need, and what each qcow2 disk is layered on. Pure: building the
//! names, serialising, and checking a config that came from a registry
//! (hostile input) before anything trusts it.

use std::collections::{BTreeMap, HashSet};

use forkd_store::Manifest;
use serde::{Deserialize, Serialize};

/// Version of the config layout written here; higher ones are refused.
pub const CONFIG_FORMAT: u32 = 1;

/// Most snapshots one artifact may carry (a chain longer than this is a
/// corrupt or hostile config).
pub const MAX_SNAPSHOTS: usize = 256;

/// The artifact's config blob.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactConfig {
    pub format: u32,
    /// The pushed snapshot first, then its ancestors.
    pub snapshots: Vec<SnapshotEntry>,
    /// Files snapshots need that live outside the store where they were made.
    pub extras: Vec<ExtraFile>,
}

/// One snapshot of the artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotEntry {
    /// Its identity, the same on every host it travels to.
    pub origin: String,
    /// Its store manifest where it was pushed from (files with sizes and
    /// BLAKE3s, machine configuration, parent links by tag).
    pub manifest: Manifest,
    /// Prefix of its files in the set: `<prefix>.<file name>`.
    pub prefix: String,
    /// What its `disk.qcow2` is layered on, when it has one.
    #[serde(default)]
    pub disk_backing: Option<Backing>,
    /// The boot files (extras) its machine configuration names.
    pub kernel: String,
    pub initramfs: String,
}

/// What a qcow2 file is layered on: a file of the set and its format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backing {
    /// File name in the set (`s1.disk.qcow2`, `x0`).
    pub file: String,
    /// `qcow2` or `raw`.
    pub format: String,
}

/// What an extra file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtraRole {
    Kernel,
    Initramfs,
    /// A disk image below a snapshot's disk (the base image, or a frozen
    /// overlay that never became a snapshot's).
    Disk,
}

/// A file the snapshots need from outside their store directories.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraFile {
    /// File name in the set.
    pub name: String,
    pub role: ExtraRole,
    pub size: u64,
    /// Hex BLAKE3 of its contents as pushed.
    pub blake3: String,
    /// For a qcow2 disk: what it is layered on.
    #[serde(default)]
    pub backing: Option<Backing>,
}

/// The file-set name of snapshot file `file` under `prefix`.
pub fn set_name(prefix: &str, file: &str) -> String {
    format!("{prefix}.{file}")
}

/// The prefix of the `i`-th snapshot of an artifact.
pub fn prefix(i: usize) -> String {
    format!("s{i}")
}

/// Identity of a snapshot made on this host: BLAKE3 over what cannot change
/// without it being another snapshot (tag where made, creation time, files).
pub fn identity(m: &Manifest) -> String {
    if let Some(origin) = &m.origin {
        return origin.clone();
    }
    let mut h = blake3::Hasher::new();
    h.update(m.tag.as_bytes());
    h.update(&[0]);
    h.update(&m.created_at.to_le_bytes());
    for f in &m.files {
        h.update(f.name.as_bytes());
        h.update(&[0]);
        h.update(&f.size.to_le_bytes());
        h.update(f.blake3.as_bytes());
    }
    h.finalize().to_hex().to_string()
}

impl ArtifactConfig {
    /// Parses and checks a config that came from a registry: every name a
    /// valid set file name, every reference between entries resolvable,
    /// every manifest's tag valid, parents before nothing circular.
    pub fn parse(bytes: &[u8]) -> Result<ArtifactConfig, String> {
        let c: ArtifactConfig =
            serde_json::from_slice(bytes).map_err(|e| format!("its config is not valid: {e}"))?;
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<(), String> {
        if self.format != CONFIG_FORMAT {
            return Err(format!(
                "its config has format {}, this forkd reads format {CONFIG_FORMAT}",
                self.format
            ));
        }
        if self.snapshots.is_empty() || self.snapshots.len() > MAX_SNAPSHOTS {
            return Err(format!(
                "it carries {} snapshots (1 to {MAX_SNAPSHOTS} expected)",
                self.snapshots.len()
            ));
        }
        let names = self.file_names();
        let unique: HashSet<&String> = names.keys().collect();
        if unique.len() != names.len() {
            return Err("two of its files have the same name".into());
        }
        for name in names.keys() {
            forkd_oci::fileset::validate_file_name(name).map_err(|e| e.to_string())?;
        }
        let mut tags = HashSet::new();
        let mut origins = HashSet::new();
        for (i, s) in self.snapshots.iter().enumerate() {
            if s.prefix != prefix(i) {
                return Err(format!("snapshot {i} has prefix `{}`", s.prefix));
            }
            forkd_ops::validate_tag(&s.manifest.tag).map_err(|e| e.to_string())?;
            if !tags.insert(s.manifest.tag.as_str()) || !origins.insert(s.origin.as_str()) {
                return Err(format!("snapshot `{}` appears twice", s.manifest.tag));
            }
            if s.origin.len() != 64 || !s.origin.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "snapshot `{}` has a malformed origin",
                    s.manifest.tag
                ));
            }
            for f in &s.manifest.files {
                forkd_oci::fileset::validate_file_name(&f.name).map_err(|e| e.to_string())?;
            }
            for extra in [&s.kernel, &s.initramfs] {
                if !self.extras.iter().any(|e| &e.name == extra) {
                    return Err(format!(
                        "snapshot `{}` names boot file `{extra}`, which it lacks",
                        s.manifest.tag
                    ));
                }
            }
        }
        // Parent links point further down the list (or out of it), so the
        // list publishes bottom-up without cycles.
        for (i, s) in self.snapshots.iter().enumerate() {
            for link in [&s.manifest.parent, &s.manifest.ram_parent]
                .into_iter()
                .flatten()
            {
                if let Some(j) = self.position(link) {
                    if j <= i {
                        return Err(format!(
                            "snapshot `{}` names `{link}`, which is not below it",
                            s.manifest.tag
                        ));
                    }
                }
            }
            if let Some(parent) = &s.manifest.ram_parent {
                if self.position(parent).is_none() {
                    return Err(format!(
                        "snapshot `{}` keeps its RAM over `{parent}`, which it lacks",
                        s.manifest.tag
                    ));
                }
            }
        }
        // Backing files must exist in the set and go down, never in a loop.
        for (from, backing) in self.backings() {
            let Some(kind) = names.get(&backing.file) else {
                return Err(format!(
                    "`{from}` is layered on `{}`, which it lacks",
                    backing.file
                ));
            };
            if !matches!(kind, SetFile::Disk | SetFile::SnapshotDisk(_)) {
                return Err(format!("`{from}` is layered on a file that is not a disk"));
            }
            if !matches!(backing.format.as_str(), "qcow2" | "raw") {
                return Err(format!(
                    "`{from}` names backing format `{}`",
                    backing.format
                ));
            }
        }
        let mut steps = 0;
        for (from, _) in self.backings() {
            let mut at = from;
            while let Some(next) = self.backing_of(&at) {
                steps += 1;
                if steps > 64 * (MAX_SNAPSHOTS + self.extras.len()) {
                    return Err("its disks are layered in a loop".into());
                }
                at = next.file.clone();
            }
        }
        Ok(())
    }

    /// Index of the snapshot whose tag (where pushed) is `tag`.
    pub fn position(&self, tag: &str) -> Option<usize> {
        self.snapshots.iter().position(|s| s.manifest.tag == tag)
    }

    /// Every file name of the set and what it is.
    pub fn file_names(&self) -> BTreeMap<String, SetFile> {
        let mut names = BTreeMap::new();
        for (i, s) in self.snapshots.iter().enumerate() {
            for f in &s.manifest.files {
                let kind = if f.name == crate::fleet::DISK_IMAGE {
                    SetFile::SnapshotDisk(i)
                } else {
                    SetFile::Snapshot(i)
                };
                names.insert(set_name(&s.prefix, &f.name), kind);
            }
        }
        for e in &self.extras {
            let kind = match e.role {
                ExtraRole::Disk => SetFile::Disk,
                _ => SetFile::Boot,
            };
            names.insert(e.name.clone(), kind);
        }
        names
    }

    fn backings(&self) -> Vec<(String, Backing)> {
        let mut out = Vec::new();
        for s in &self.snapshots {
            if let Some(b) = &s.disk_backing {
                out.push((set_name(&s.prefix, crate::fleet::DISK_IMAGE), b.clone()));
            }
        }
        for e in &self.extras {
            if let Some(b) = &e.backing {
                out.push((e.name.clone(), b.clone()));
            }
        }
        out
    }

    /// What set file `name` (a disk) is layered on.
    pub fn backing_of(&self, name: &str) -> Option<Backing> {
        self.backings()
            .into_iter()
            .find(|(from, _)| from == name)
            .map(|(_, b)| b)
    }
}

/// What a file of the set is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetFile {
    /// A file of snapshot `i`.
    Snapshot(usize),
    /// The disk of snapshot `i`.
    SnapshotDisk(usize),
    /// A kernel or initramfs.
    Boot,
    /// A disk below the snapshots' disks.
    Disk,
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkd_store::FileEntry;

    fn manifest(tag: &str, parent: Option<&str>) -> Manifest {
        Manifest {
            format: 1,
            tag: tag.into(),
            created_at: 7,
            parent: parent.map(Into::into),
            source_sandbox: None,
            pause_ms: 1.0,
            ram_parent: None,
            disk_from: None,
            machine: serde_json::json!({}),
            files: vec![
                FileEntry {
                    name: "ram.img".into(),
                    size: 4,
                    blake3: "ab".into(),
                },
                FileEntry {
                    name: "disk.qcow2".into(),
                    size: 4,
                    blake3: "cd".into(),
                },
            ],
            origin: None,
        }
    }

    fn config() -> ArtifactConfig {
        let boot = |name: &str, role| ExtraFile {
            name: name.into(),
            role,
            size: 1,
            blake3: "00".into(),
            backing: None,
        };
        let entry = |i: usize, m: Manifest, backing: &str| SnapshotEntry {
            origin: identity(&m),
            manifest: m,
            prefix: prefix(i),
            disk_backing: Some(Backing {
                file: backing.into(),
                format: if backing == "x0" { "raw" } else { "qcow2" }.into(),
            }),
            kernel: "k0".into(),
            initramfs: "i0".into(),
        };
        ArtifactConfig {
            format: CONFIG_FORMAT,
            snapshots: vec![
                entry(0, manifest("kid", Some("warm")), "s1.disk.qcow2"),
                entry(1, manifest("warm", None), "x0"),
            ],
            extras: vec![
                boot("k0", ExtraRole::Kernel),
                boot("i0", ExtraRole::Initramfs),
                boot("x0", ExtraRole::Disk),
            ],
        }
    }

    #[test]
    fn a_config_round_trips_and_checks() {
        let c = config();
        let bytes = serde_json::to_vec(&c).unwrap();
        assert_eq!(ArtifactConfig::parse(&bytes).unwrap(), c);
        assert_eq!(c.backing_of("s0.disk.qcow2").unwrap().file, "s1.disk.qcow2");
        assert_eq!(
            c.file_names().get("s1.disk.qcow2"),
            Some(&SetFile::SnapshotDisk(1))
        );
    }

    #[test]
    fn hostile_configs_are_refused_with_a_reason() {
        let refuse = |c: ArtifactConfig, needle: &str| {
            let e = ArtifactConfig::parse(&serde_json::to_vec(&c).unwrap()).unwrap_err();
            assert!(e.contains(needle), "{e}");
        };
        let mut c = config();
        c.snapshots[1].disk_backing = Some(Backing {
            file: "s0.disk.qcow2".into(),
            format: "qcow2".into(),
        });
        refuse(c, "loop");
        let mut c = config();
        c.snapshots[0].manifest.files[0].name = "../etc".into();
        refuse(c, "name");
        let mut c = config();
        c.snapshots[1].manifest.parent = Some("kid".into());
        refuse(c, "not below");
        let mut c = config();
        c.snapshots[0].disk_backing.as_mut().unwrap().file = "nothing".into();
        refuse(c, "lacks");
        let mut c = config();
        c.snapshots[0].kernel = "k9".into();
        refuse(c, "boot file");
        let mut c = config();
        c.format = 2;
        refuse(c, "format");
        assert!(ArtifactConfig::parse(b"\xff{").is_err());
    }

    #[test]
    fn identity_is_stable_and_kept_across_hosts() {
        let m = manifest("warm", None);
        let id = identity(&m);
        assert_eq!(id.len(), 64);
        let mut pulled = m.clone();
        pulled.tag = "elsewhere".into();
        pulled.origin = Some(id.clone());
        assert_eq!(identity(&pulled), id);
        let mut other = m;
        other.created_at += 1;
        assert_ne!(identity(&other), id);
    }
}
