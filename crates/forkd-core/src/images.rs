//! The root images built on this host (`home/images/*.ext4`): what they are
//! named, which sandboxes and snapshots still read them, building one from
//! a directory or a container image, and deleting one nothing needs.
//!
//! An image built from a container image is keyed by the image's manifest
//! digest (a docker-archive's config digest) and keeps the image config's
//! `Env`, `WorkingDir` and `User` beside it (`NAME.json`, see
//! [`ImageDefaults`]): every sandbox created from it gets them as its
//! defaults for commands.
//!
//! An image is named by its file name without `.ext4`
//! (`busybox-3d554cd3…`, `debian-python-f96f…`, `tree-…`); `--image NAME`
//! boots from it. A sandbox's disk overlay and a snapshot's disk layers name
//! their base image as the end of their qcow2 backing chain, which is how
//! its users are found: an image some disk still backs onto is never deleted.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub use forkd_oci::image::ImageSource;
use forkd_oci::image::UnpackOptions;
use forkd_oci::ClientOptions;
use serde::{Deserialize, Serialize};

use crate::fleet::{Fleet, DISK_IMAGE};
use crate::paths::Env;
use crate::CoreError;

pub use forkd_guest::RootfsRecipe;

/// A root image of this home.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageEntry {
    /// What `--image` takes.
    pub name: String,
    pub path: PathBuf,
    /// `busybox`, `debian-python` (a recipe), `tree` (built from a directory
    /// or a container image), or `other`.
    pub kind: String,
    /// Bytes the image occupies on disk (it is sparse).
    pub disk_bytes: u64,
    /// Its size as the guest sees it.
    pub size_bytes: u64,
    /// Unix seconds of its last change.
    pub modified: u64,
    /// `sandbox ID` and `snapshot TAG` entries whose disk backs onto it.
    pub used_by: Vec<String>,
    /// The container image it was built from, when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

/// What a root image built from a container image keeps of it besides its
/// files: where it came from and the defaults of every command run in it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageDefaults {
    /// The source it was built from (`REF`, `oci-archive:PATH`, ...).
    pub source: String,
    /// Its manifest digest (a docker-archive: its config digest).
    pub digest: String,
    /// The config's `Env`, in order.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The config's `WorkingDir`.
    #[serde(default)]
    pub cwd: Option<String>,
    /// The config's `User` (`NAME`, `UID`, `UID:GID`), resolved by the
    /// guest in the image's `/etc/passwd`.
    #[serde(default)]
    pub user: Option<String>,
}

impl ImageDefaults {
    /// The defaults of `config` (pure). `Env` entries without `=` are
    /// skipped (they name no value); a relative `WorkingDir` is taken from
    /// `/`, as container runtimes do; empty values are no values.
    pub fn from_config(
        source: String,
        digest: String,
        config: &forkd_oci::ContainerConfig,
    ) -> Self {
        let env = config
            .env
            .iter()
            .flatten()
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| !k.is_empty() && !k.contains('\0'))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let cwd = config
            .working_dir
            .as_deref()
            .filter(|d| !d.is_empty() && !d.contains('\0'))
            .map(|d| {
                if d.starts_with('/') {
                    d.to_string()
                } else {
                    format!("/{d}")
                }
            });
        let user = config
            .user
            .as_deref()
            .filter(|u| !u.is_empty() && !u.contains('\0'))
            .map(str::to_string);
        ImageDefaults {
            source,
            digest,
            env,
            cwd,
            user,
        }
    }

    /// Lays these defaults under one command's own environment, working
    /// directory and account (a one-shot `run`, with no sandbox to keep
    /// them): the command's own win, as they do over a sandbox's defaults.
    pub fn apply_to_command(
        &self,
        env: &mut Vec<(String, String)>,
        cwd: &mut Option<String>,
        user: &mut Option<String>,
    ) {
        let defaults = forkd_ops::Lifetime {
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            user: self.user.clone(),
            ..forkd_ops::Lifetime::default()
        };
        defaults.apply(env, cwd);
        defaults.apply_user(user);
    }

    /// Lays these defaults under `settings`: the settings' own variables
    /// win over the image's of the same name, their working directory over
    /// the image's.
    pub fn apply_to(&self, settings: &mut forkd_ops::Settings) {
        let mut env: Vec<(String, String)> = self
            .env
            .iter()
            .filter(|(k, _)| !settings.env.iter().any(|(own, _)| own == k))
            .cloned()
            .collect();
        env.append(&mut settings.env);
        settings.env = env;
        if settings.cwd.is_none() {
            settings.cwd = self.cwd.clone();
        }
        if settings.user.is_none() {
            settings.user = self.user.clone();
        }
    }
}

/// A root image built (or found) from a container image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BuiltImage {
    /// What `--image` takes.
    pub name: String,
    pub path: PathBuf,
    /// Whether it was here already (same digest): nothing was unpacked.
    pub cached: bool,
    pub defaults: ImageDefaults,
}

/// Whether `s` has the shape of an image built here: `KIND-KEY`, where
/// KIND is lower-case letters, digits, `.` and `-` and KEY at least 8 hex
/// digits (what the builders write: `busybox-3d554cd3…`). Anything else
/// (`ubuntu`) is not taken for an image name, so that a mistyped recipe is
/// refused as such.
pub fn is_image_name(s: &str) -> bool {
    let Some((kind, key)) = s.rsplit_once('-') else {
        return false;
    };
    s.len() <= 128
        && kind.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && kind
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && key.len() >= 8
        && key
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

fn images_dir(env: &Env) -> PathBuf {
    env.home.join("images")
}

/// The file of the image named `name`.
pub fn resolve(env: &Env, name: &str) -> Result<PathBuf, CoreError> {
    let dir = images_dir(env);
    let path = dir.join(format!("{name}.ext4"));
    if is_image_name(name) && path.is_file() {
        Ok(path)
    } else {
        Err(CoreError::NoImage {
            name: name.into(),
            dir,
        })
    }
}

/// The kind of an image, from its name.
fn kind_of(name: &str) -> &'static str {
    for recipe in forkd_guest::RootfsRecipe::ALL {
        if name
            .strip_prefix(recipe.name())
            .is_some_and(|rest| rest.starts_with('-'))
        {
            return recipe.name();
        }
    }
    if name.starts_with("tree-") {
        "tree"
    } else {
        "other"
    }
}

/// Every image of this home, by name, with its users.
pub fn list(fleet: &Fleet) -> Result<Vec<ImageEntry>, CoreError> {
    let dir = images_dir(fleet.env());
    let read = match std::fs::read_dir(&dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CoreError::host("listing", &dir)(e)),
    };
    let users = users_by_image(fleet)?;
    let mut out = Vec::new();
    for entry in read {
        let entry = entry.map_err(CoreError::host("listing", &dir))?;
        let file_name = entry.file_name();
        let Some(name) = file_name
            .to_str()
            .and_then(|n| n.strip_suffix(".ext4"))
            .filter(|n| is_image_name(n))
        else {
            continue; // temporaries of a build in progress, foreign files
        };
        let path = entry.path();
        let Ok(meta) = std::fs::metadata(&path) else {
            continue; // removed meanwhile
        };
        if !meta.is_file() {
            continue;
        }
        let canonical = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        out.push(ImageEntry {
            name: name.to_string(),
            kind: kind_of(name).to_string(),
            disk_bytes: meta.blocks() * 512,
            size_bytes: meta.len(),
            modified: meta.mtime().max(0) as u64,
            used_by: users.get(&canonical).cloned().unwrap_or_default(),
            from: defaults_of(fleet.env(), name).map(|d| d.source),
            path,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Deletes the image `name`; refused while a sandbox or snapshot of this
/// home backs onto it. Returns what was deleted.
pub fn remove(fleet: &Fleet, name: &str) -> Result<ImageEntry, CoreError> {
    resolve(fleet.env(), name)?;
    let entry = list(fleet)?
        .into_iter()
        .find(|e| e.name == name)
        .ok_or_else(|| CoreError::NoImage {
            name: name.into(),
            dir: images_dir(fleet.env()),
        })?;
    if !entry.used_by.is_empty() {
        return Err(CoreError::ImageInUse {
            name: name.into(),
            users: entry.used_by,
        });
    }
    std::fs::remove_file(&entry.path).map_err(CoreError::host("deleting", &entry.path))?;
    let defaults = defaults_path(&entry.path);
    match std::fs::remove_file(&defaults) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(CoreError::host("deleting", defaults)(e))
        }
        _ => {}
    }
    Ok(entry)
}

/// Where the defaults of the image at `image` (`NAME.ext4`) are kept.
fn defaults_path(image: &Path) -> PathBuf {
    image.with_extension("json")
}

/// Largest defaults file read back (it is written by forkd, but lives in a
/// directory the user can write).
const MAX_DEFAULTS_BYTES: u64 = 1024 * 1024;

/// The defaults kept with the image `name`, when it was built from a
/// container image. A missing or unreadable file means none.
pub fn defaults_of(env: &Env, name: &str) -> Option<ImageDefaults> {
    use std::io::Read;
    if !is_image_name(name) {
        return None;
    }
    let path = defaults_path(&images_dir(env).join(format!("{name}.ext4")));
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_DEFAULTS_BYTES)
        .read_to_end(&mut bytes)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The defaults of the image snapshot `tag`'s sandbox was created from,
/// when it was built from a container image: its children get them too.
pub fn defaults_of_snapshot(fleet: &Fleet, tag: &str) -> Option<ImageDefaults> {
    let manifest = fleet.store().load(tag).ok()?;
    let config: crate::fleet::SandboxConfig = serde_json::from_value(manifest.machine).ok()?;
    // A grandchild's record says `NAME (from TAG)`.
    let image = config.image.as_str();
    let name = image.split_once(" (from ").map_or(image, |(n, _)| n);
    defaults_of(fleet.env(), name)
}

fn write_defaults(image: &Path, defaults: &ImageDefaults) -> Result<(), CoreError> {
    let path = defaults_path(image);
    let tmp = path.with_extension(format!("json.tmp{}", std::process::id()));
    let json = serde_json::to_vec_pretty(defaults)
        .map_err(|e| CoreError::BadRequest(format!("encoding image defaults: {e}")))?;
    std::fs::write(&tmp, json).map_err(CoreError::host("writing", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(CoreError::host("renaming", &path))
}

/// How `--insecure` reaches the registry client: plain HTTP when set, and
/// Docker's `config.json` for credentials as push and pull read it.
pub fn registry_options(insecure: bool) -> ClientOptions {
    ClientOptions {
        insecure,
        ..ClientOptions::default()
    }
}

/// Builds (or finds cached, by the image's digest) the root image of the
/// container image at `source`: its layers are verified and applied into a
/// staging tree (whiteouts, opaque directories, owners and modes kept),
/// forkd's own files are added and the tree becomes an ext4 image. The
/// config's `Env`, `WorkingDir` and `User` are kept beside it. A failure
/// leaves no image behind.
pub fn build_from_container(
    env: &Env,
    source: &ImageSource,
    client: &ClientOptions,
    log: &dyn Fn(&str),
) -> Result<BuiltImage, CoreError> {
    let shown = source.to_string();
    let oci = |error| CoreError::ContainerImage {
        source_text: shown.clone(),
        error: Box::new(error),
    };
    log(&format!("resolving {shown}"));
    let resolved = forkd_oci::image::resolve(source, client).map_err(oci)?;
    let digest = resolved.digest().to_string();
    let defaults =
        ImageDefaults::from_config(shown.clone(), digest.clone(), &resolved.container_config());
    let key = format!("oci:{digest}");
    let path = forkd_guest::tree::staged_image_path(&env.home, &key);
    let cached = path.is_file();
    let path = if cached {
        log(&format!("{digest} is built already"));
        path
    } else {
        let layers = resolved.layer_count();
        let mut unpack = |staging: &Path| -> Result<(), CoreError> {
            log(&format!("unpacking {layers} layer(s) of {digest}"));
            let info = resolved
                .unpack(staging, &UnpackOptions::default())
                .map_err(oci)?;
            let skipped: u64 = info.layers.iter().map(|l| l.skipped).sum();
            if skipped > 0 {
                log(&format!(
                    "{skipped} device node(s) or extended attribute(s) could not be created on this host and were left out"
                ));
            }
            Ok(())
        };
        forkd_guest::tree::build_rootfs_staged(&env.home, &key, &mut unpack, log)?
    };
    // Written after the image appears (and again on a cache hit, should a
    // crash have come between the two, or another source of the same
    // digest be named): an image without it is plain.
    if defaults_of(env, &name_of(&path)).as_ref() != Some(&defaults) {
        write_defaults(&path, &defaults)?;
    }
    Ok(BuiltImage {
        name: name_of(&path),
        path,
        cached,
        defaults,
    })
}

/// Builds (or finds cached) the image of directory `dir`; returns its name.
pub fn build_from_dir(env: &Env, dir: &Path, log: &dyn Fn(&str)) -> Result<String, CoreError> {
    let path = forkd_guest::tree::build_rootfs_from_dir(&env.home, dir, log)?;
    Ok(name_of(&path))
}

/// Builds (or finds cached) `recipe` with extra Debian `packages`; returns
/// its name.
pub fn build_with_packages(
    env: &Env,
    recipe: forkd_guest::RootfsRecipe,
    packages: &[String],
    log: &dyn Fn(&str),
) -> Result<String, CoreError> {
    let busybox = forkd_guest::find_busybox()?;
    let path = forkd_guest::build_rootfs_with_packages(&env.home, recipe, &busybox, packages, log)?;
    Ok(name_of(&path))
}

/// The image name of a file under `home/images`.
pub fn name_of(path: &Path) -> String {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".ext4"))
        .unwrap_or_default()
        .to_string()
}

/// For each base image (canonical path), the sandboxes and snapshots whose
/// disk backs onto it.
fn users_by_image(fleet: &Fleet) -> Result<BTreeMap<PathBuf, Vec<String>>, CoreError> {
    let mut disks: Vec<(String, PathBuf)> = Vec::new();
    {
        let db = fleet.db();
        for row in db.list_sandboxes()? {
            disks.push((
                format!("sandbox {}", row.id),
                row.run_dir.join("root.qcow2"),
            ));
        }
        for row in db.list_snapshots()? {
            disks.push((format!("snapshot {}", row.tag), row.dir.join(DISK_IMAGE)));
        }
    }
    let mut users: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for (who, disk) in disks {
        if !disk.is_file() {
            continue;
        }
        // A chain that cannot be read names no image: it is reported by the
        // health checks, and an image is then kept only if something else
        // still names it.
        let Ok(chain) = forkd_vm::disk::backing_chain(&disk) else {
            continue;
        };
        for file in chain {
            let file = std::fs::canonicalize(&file).unwrap_or(file);
            users.entry(file).or_default().push(who.clone());
        }
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_kinds() {
        for good in [
            "busybox-3d554cd3",
            "tree-0a1b2c3d4e5f",
            "debian-python-f96f132c9eb6ff577735ac35d5fee5b0",
            "my.img-0123abcd",
        ] {
            assert!(is_image_name(good), "{good}");
        }
        for bad in [
            "",
            "-x",
            "A",
            "a/b",
            "a b",
            "../x",
            ".hidden",
            "a_b",
            "ubuntu",
            "tree-nope",
            "tree-0123",
            "tree-0123ABCD",
            "-01234567",
        ] {
            assert!(!is_image_name(bad), "{bad:?}");
        }
        assert_eq!(kind_of("busybox-3d55"), "busybox");
        assert_eq!(kind_of("debian-python-f96f"), "debian-python");
        assert_eq!(kind_of("tree-0a1b"), "tree");
        assert_eq!(kind_of("busyboxer"), "other");
    }

    fn config(env: &[&str], cwd: Option<&str>, user: Option<&str>) -> forkd_oci::ContainerConfig {
        forkd_oci::ContainerConfig {
            env: Some(env.iter().map(|s| s.to_string()).collect()),
            working_dir: cwd.map(str::to_string),
            user: user.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn an_image_config_becomes_defaults() {
        let d = ImageDefaults::from_config(
            "src".into(),
            "sha256:x".into(),
            &config(
                &["PATH=/bin", "EMPTY=", "A=b=c", "NOVALUE", "=x"],
                Some("app"),
                Some("1000:1000"),
            ),
        );
        assert_eq!(
            d.env,
            [("PATH", "/bin"), ("EMPTY", ""), ("A", "b=c")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        assert_eq!(d.cwd.as_deref(), Some("/app"), "relative to /");
        assert_eq!(d.user.as_deref(), Some("1000:1000"));
        let none =
            ImageDefaults::from_config("s".into(), "d".into(), &config(&[], Some(""), Some("")));
        assert_eq!((none.cwd, none.user), (None, None));
    }

    #[test]
    fn the_sandbox_own_settings_win_over_the_image() {
        let d = ImageDefaults::from_config(
            "s".into(),
            "d".into(),
            &config(&["A=image", "B=image"], Some("/srv"), Some("app")),
        );
        let mut s = forkd_ops::Settings {
            env: vec![("B".into(), "create".into()), ("C".into(), "create".into())],
            cwd: Some("/work".into()),
            ..Default::default()
        };
        d.apply_to(&mut s);
        assert_eq!(
            s.env,
            [("A", "image"), ("B", "create"), ("C", "create")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        assert_eq!(s.cwd.as_deref(), Some("/work"));
        assert_eq!(s.user.as_deref(), Some("app"));
        let mut plain = forkd_ops::Settings::default();
        d.apply_to(&mut plain);
        assert_eq!(plain.cwd.as_deref(), Some("/srv"));
        // A one-shot command: its own values win the same way.
        let (mut env, mut cwd, mut user) =
            (vec![("A".into(), "cmd".into())], None, Some("root".into()));
        d.apply_to_command(&mut env, &mut cwd, &mut user);
        assert_eq!(env[1], ("A".to_string(), "cmd".to_string()));
        assert_eq!(cwd.as_deref(), Some("/srv"));
        assert_eq!(user.as_deref(), Some("root"));
    }
}
