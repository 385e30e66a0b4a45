//! The guest artifacts a sandbox boots from: kernel, initramfs (with the agent
//! as PID 1) and root disk image. Built by `forkd-guest`, cached in the home
//! directory; this module decides which ones and finds the agent binary.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use forkd_guest::{Kernel, RootfsRecipe};
use forkd_oci::image::ImageSource;

use crate::images::ImageDefaults;
use crate::paths::Env;
use crate::CoreError;

/// The root disk a sandbox runs commands in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    /// Built by forkd from a recipe (`busybox`, `debian-python`).
    Recipe(RootfsRecipe),
    /// A raw ext4 image the user supplies.
    File(PathBuf),
    /// An image built here (`home/images/<name>.ext4`, as the image list
    /// names it: e.g. one built from a directory or with extra packages).
    Named(String),
    /// Built from a container image (`REF`, `oci-archive:PATH`,
    /// `docker-archive:PATH`, `oci-layout:DIR`), cached by its digest.
    Container(ImageSource),
    /// No disk: commands run in the initramfs.
    None,
}

/// Whether `s` is meant as a container image rather than a file (the
/// seam's rule, [`forkd_ops::image::image_kind`]).
fn names_container_image(s: &str) -> bool {
    forkd_ops::image::image_kind(s) != forkd_ops::image::ImageKind::Other
}

impl FromStr for Image {
    type Err = String;
    fn from_str(s: &str) -> Result<Image, String> {
        if s == "none" {
            return Ok(Image::None);
        }
        if let Ok(r) = s.parse::<RootfsRecipe>() {
            return Ok(Image::Recipe(r));
        }
        if names_container_image(s) {
            return ImageSource::parse(s)
                .map(Image::Container)
                .map_err(|e| e.to_string());
        }
        if s.contains('/') || s.ends_with(".ext4") || s.ends_with(".img") {
            return Ok(Image::File(PathBuf::from(s)));
        }
        if crate::images::is_image_name(s) {
            return Ok(Image::Named(s.to_string()));
        }
        Err(format!(
            "unknown image {s:?}: use busybox, debian-python, none, the name of an image built here, a path to a raw ext4 image, or a container image (HOST/REPO:TAG, oci-archive:PATH, docker-archive:PATH, oci-layout:DIR)"
        ))
    }
}

impl fmt::Display for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Image::Recipe(r) => write!(f, "{r}"),
            Image::File(p) => write!(f, "{}", p.display()),
            Image::Named(n) => f.write_str(n),
            Image::Container(source) => write!(f, "{source}"),
            Image::None => f.write_str("none"),
        }
    }
}

/// What to build or use.
#[derive(Debug, Clone)]
pub struct ArtifactOptions {
    /// A kernel image to use instead of Debian's cloud kernel.
    pub kernel: Option<PathBuf>,
    /// Its modules directory (`lib/modules/<version>`), if it has one.
    pub modules: Option<PathBuf>,
    /// The static guest agent; found next to the forkd binary when absent.
    pub agent: Option<PathBuf>,
    pub image: Image,
    /// Reach the registry of an [`Image::Container`] over plain HTTP.
    pub insecure_registry: bool,
}

impl Default for ArtifactOptions {
    fn default() -> Self {
        ArtifactOptions {
            kernel: None,
            modules: None,
            agent: None,
            image: Image::Recipe(RootfsRecipe::Busybox),
            insecure_registry: false,
        }
    }
}

/// Paths of everything a VM boots from.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub kernel: Kernel,
    pub initramfs: PathBuf,
    pub rootfs: Option<PathBuf>,
    /// The name of the root image when it is one of this home's
    /// (`home/images/NAME.ext4`).
    pub image_name: Option<String>,
    /// The defaults for commands its image brings (built from a container
    /// image).
    pub defaults: Option<ImageDefaults>,
}

/// Builds whatever is missing and returns the paths. Cheap when all is cached
/// (hashes the agent and busybox binaries to find the initramfs).
pub fn ensure(
    env: &Env,
    opts: &ArtifactOptions,
    log: &dyn Fn(&str),
) -> Result<Artifacts, CoreError> {
    let kernel = match &opts.kernel {
        Some(k) => forkd_guest::kernel_from_path(k, opts.modules.as_deref())?,
        None => forkd_guest::ensure_debian_kernel(&env.home, log)?,
    };
    let agent = find_agent(opts.agent.as_deref())?;
    let busybox = forkd_guest::find_busybox()?;
    let initramfs = forkd_guest::build_initramfs(
        &env.home,
        &forkd_guest::InitramfsSpec {
            agent: &agent,
            busybox: &busybox,
            kernel: &kernel,
            modules: forkd_guest::GUEST_MODULES,
        },
    )?;
    let rootfs = match &opts.image {
        Image::None => None,
        Image::File(p) => {
            if !p.is_file() {
                return Err(CoreError::BadRequest(format!(
                    "image {} does not exist",
                    p.display()
                )));
            }
            Some(p.clone())
        }
        Image::Named(name) => Some(crate::images::resolve(env, name)?),
        Image::Container(source) => {
            let client = crate::images::registry_options(opts.insecure_registry);
            let built = crate::images::build_from_container(env, source, &client, log)?;
            Some(built.path)
        }
        Image::Recipe(r) => Some(forkd_guest::build_rootfs(&env.home, *r, &busybox, log)?),
    };
    let image_name = rootfs
        .as_deref()
        .filter(|p| p.parent() == Some(env.home.join("images").as_path()))
        .map(crate::images::name_of)
        .filter(|n| crate::images::is_image_name(n));
    let defaults = image_name
        .as_deref()
        .and_then(|n| crate::images::defaults_of(env, n));
    Ok(Artifacts {
        kernel,
        initramfs,
        rootfs,
        image_name,
        defaults,
    })
}

/// Name of the agent binary.
pub const AGENT_BIN: &str = "forkd-agent";
/// The target the agent is built for statically.
pub const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Finds the static guest agent: `explicit`, then `$FORKD_AGENT`, then next to
/// the running executable, then in the cargo target directory above it.
pub fn find_agent(explicit: Option<&Path>) -> Result<PathBuf, CoreError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = explicit {
        candidates.push(p.to_path_buf());
    } else if let Some(p) = std::env::var_os("FORKD_AGENT") {
        candidates.push(PathBuf::from(p));
    } else if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join(AGENT_BIN));
            // target/<profile>/forkd or target/<profile>/deps/test-binary
            for up in dir.ancestors().take(4) {
                candidates.push(up.join(AGENT_TARGET).join("release").join(AGENT_BIN));
            }
        }
    }
    for c in &candidates {
        if let Ok(bytes) = std::fs::read(c) {
            if forkd_guest::is_static_elf(&bytes) {
                return Ok(c.clone());
            }
            if explicit.is_some() {
                return Err(CoreError::AgentNotFound(format!(
                    "{} is not a statically linked executable",
                    c.display()
                )));
            }
        }
    }
    Err(CoreError::AgentNotFound(format!(
        "looked in {}",
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_parse() {
        assert_eq!(
            "busybox".parse::<Image>().unwrap(),
            Image::Recipe(RootfsRecipe::Busybox)
        );
        assert_eq!(
            "debian-python".parse::<Image>().unwrap(),
            Image::Recipe(RootfsRecipe::DebianPython)
        );
        assert_eq!("none".parse::<Image>().unwrap(), Image::None);
        assert_eq!(
            "./my.ext4".parse::<Image>().unwrap(),
            Image::File("./my.ext4".into())
        );
        let e = "ubuntu".parse::<Image>().unwrap_err();
        assert!(e.contains("busybox, debian-python"), "{e}");
    }

    #[test]
    fn container_images_are_told_from_files() {
        for (text, container) in [
            ("127.0.0.1:5000/team/app:v1", true),
            ("localhost/app", true),
            ("ghcr.io/org/app", true),
            ("ubuntu:24.04", true),
            (
                "team/app@sha256:0000000000000000000000000000000000000000000000000000000000000000",
                true,
            ),
            ("oci-archive:/tmp/a.tar", true),
            ("docker-archive:a.tar", true),
            ("oci-layout:./dir", true),
            ("docker://busybox", true),
            ("images/root", false),
            ("./my.ext4", false),
            ("/srv/root.img", false),
            ("/srv/images/app:v1", false),
        ] {
            assert_eq!(names_container_image(text), container, "{text}");
        }
        assert!(matches!(
            "127.0.0.1:5000/team/app:v1".parse::<Image>().unwrap(),
            Image::Container(ImageSource::Registry(_))
        ));
        assert_eq!(
            "oci-archive:/tmp/a.tar".parse::<Image>().unwrap(),
            Image::Container(ImageSource::OciArchive("/tmp/a.tar".into()))
        );
        assert_eq!(
            "images/root".parse::<Image>().unwrap(),
            Image::File("images/root".into())
        );
        let e = "oci-archive:".parse::<Image>().unwrap_err();
        assert!(e.contains("path is empty"), "{e}");
        let e = "Bad Host:1/x:y".parse::<Image>().unwrap_err();
        assert!(e.contains("invalid"), "{e}");
    }

    #[test]
    fn a_dynamic_binary_is_not_taken_for_the_agent() {
        let e = find_agent(Some(Path::new("/bin/sh"))).unwrap_err();
        assert!(e.to_string().contains("not a statically linked"), "{e}");
    }
}
