//! The guest artifacts a sandbox boots from: kernel, initramfs (with the agent
//! as PID 1) and root disk image. Built by `forkd-guest`, cached in the home
//! directory; this module decides which ones and finds the agent binary.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use forkd_guest::{Kernel, RootfsRecipe};

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
    /// No disk: commands run in the initramfs.
    None,
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
        if s.contains('/') || s.ends_with(".ext4") || s.ends_with(".img") {
            return Ok(Image::File(PathBuf::from(s)));
        }
        if crate::images::is_image_name(s) {
            return Ok(Image::Named(s.to_string()));
        }
        Err(format!(
            "unknown image {s:?}: use busybox, debian-python, none, the name of an image built here, or a path to a raw ext4 image"
        ))
    }
}

impl fmt::Display for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Image::Recipe(r) => write!(f, "{r}"),
            Image::File(p) => write!(f, "{}", p.display()),
            Image::Named(n) => f.write_str(n),
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
}

impl Default for ArtifactOptions {
    fn default() -> Self {
        ArtifactOptions {
            kernel: None,
            modules: None,
            agent: None,
            image: Image::Recipe(RootfsRecipe::Busybox),
        }
    }
}

/// Paths of everything a VM boots from.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub kernel: Kernel,
    pub initramfs: PathBuf,
    pub rootfs: Option<PathBuf>,
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
        Image::Recipe(r) => Some(forkd_guest::build_rootfs(&env.home, *r, &busybox, log)?),
    };
    Ok(Artifacts {
        kernel,
        initramfs,
        rootfs,
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
    fn a_dynamic_binary_is_not_taken_for_the_agent() {
        let e = find_agent(Some(Path::new("/bin/sh"))).unwrap_err();
        assert!(e.to_string().contains("not a statically linked"), "{e}");
    }
}
