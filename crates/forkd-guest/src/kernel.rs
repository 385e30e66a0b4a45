//! The guest kernel: the Debian cloud kernel fetched with apt-get and
//! extracted under `home/kernels/<kver>/`, or a kernel the user points at.

use std::cmp::Ordering;
use std::fs;
use std::path::{Path, PathBuf};

use crate::cache::{prepare_dir, publish, temp_path, TempGuard};
use crate::tools::{self, APT_GET, DPKG_DEB};
use crate::GuestError;

/// The metapackage that always depends on the current cloud kernel.
pub const DEBIAN_KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";
const COMPLETE_MARKER: &str = ".complete";

/// A guest kernel image and the modules that go with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    pub version: String,
    pub vmlinuz: PathBuf,
    /// `.../lib/modules/<kver>`; empty when the kernel comes without modules
    /// (its drivers are built in), see [`Kernel::has_modules`].
    pub modules_dir: PathBuf,
}

impl Kernel {
    pub fn has_modules(&self) -> bool {
        !self.modules_dir.as_os_str().is_empty()
    }
}

/// Ensures the Debian cloud kernel is extracted under `home/kernels/<kver>/`.
///
/// A no-op (no network) once any kernel there is complete: the newest one is
/// returned, so guests keep the kernel their snapshots were made with. Delete
/// `home/kernels/<kver>` to pick up a newer Debian kernel.
pub fn ensure_debian_kernel(home: &Path, log: &dyn Fn(&str)) -> Result<Kernel, GuestError> {
    let kernels = home.join("kernels");
    prepare_dir(&kernels)?;
    if let Some(kernel) = newest_complete_kernel(&kernels)? {
        return Ok(kernel);
    }

    let stage = temp_path(&kernels.join("download"));
    let mut guard = TempGuard::new(stage.clone());
    let debs = stage.join("debs");
    fs::create_dir_all(&debs).map_err(GuestError::io("create dir", &debs))?;

    log(&format!(
        "resolving {DEBIAN_KERNEL_METAPACKAGE} with apt-get"
    ));
    let meta_deb = apt_download(&debs, DEBIAN_KERNEL_METAPACKAGE)?;
    let depends = tools::run(DPKG_DEB.command()?.arg("-f").arg(&meta_deb).arg("Depends"))?;
    let package = kernel_package_from_depends(&String::from_utf8_lossy(&depends))?;
    let version = package
        .strip_prefix("linux-image-")
        .filter(|v| is_plain_name(v))
        .ok_or_else(|| GuestError::KernelPackage {
            reason: format!("package name `{package}` does not look like linux-image-<kver>"),
        })?
        .to_owned();

    let final_dir = kernels.join(&version);
    if is_complete(&final_dir) {
        return load_extracted(&final_dir, &version);
    }
    log(&format!("downloading {package}"));
    let deb = apt_download(&debs, &package)?;
    log(&format!("extracting {package}"));
    tools::run(DPKG_DEB.command()?.arg("-x").arg(&deb).arg(&stage))?;
    fs::remove_dir_all(&debs).map_err(GuestError::io("remove", &debs))?;
    load_extracted(&stage, &version)?; // the package has what a guest needs

    let marker = stage.join(COMPLETE_MARKER);
    fs::write(&marker, format!("{package}\n")).map_err(GuestError::io("write", &marker))?;
    if final_dir.exists() {
        // An incomplete leftover (no marker) from an older forkd.
        fs::remove_dir_all(&final_dir).map_err(GuestError::io("remove", &final_dir))?;
    }
    match publish(&stage, &final_dir) {
        Ok(()) => guard.disarm(),
        // Another process won the race; its copy is just as good.
        Err(_) if is_complete(&final_dir) => {}
        Err(e) => return Err(e),
    }
    log(&format!(
        "kernel {version} ready in {}",
        final_dir.display()
    ));
    load_extracted(&final_dir, &version)
}

/// A user-supplied kernel (`--kernel PATH`) with an optional modules dir.
pub fn kernel_from_path(vmlinuz: &Path, modules_dir: Option<&Path>) -> Result<Kernel, GuestError> {
    if !vmlinuz.is_file() {
        return Err(GuestError::KernelMissing {
            path: vmlinuz.to_owned(),
        });
    }
    if let Some(dir) = modules_dir {
        if !dir.is_dir() {
            return Err(GuestError::ModulesDirMissing {
                path: dir.to_owned(),
            });
        }
    }
    let image = fs::read(vmlinuz).map_err(GuestError::io("read kernel image", vmlinuz))?;
    let version = bzimage_version(&image)
        .or_else(|| {
            modules_dir
                .and_then(Path::file_name)
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| format!("custom-{}", &blake3::hash(&image).to_hex()[..16]));
    Ok(Kernel {
        version,
        vmlinuz: vmlinuz.to_owned(),
        modules_dir: modules_dir.map(Path::to_owned).unwrap_or_default(),
    })
}

/// The release string an x86 bzImage carries in its setup header
/// (`kernel_version` field), e.g. `6.1.0-56-cloud-amd64`.
pub fn bzimage_version(image: &[u8]) -> Option<String> {
    if image.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let pointer = u16::from_le_bytes(image.get(0x20e..0x210)?.try_into().ok()?);
    if pointer == 0 {
        return None;
    }
    let start = 0x200usize.checked_add(usize::from(pointer))?;
    let text = image.get(start..)?.split(|&b| b == 0).next()?;
    let text = std::str::from_utf8(text).ok()?;
    let release = text.split_whitespace().next()?;
    is_plain_name(release).then(|| release.to_owned())
}

/// Picks the versioned kernel package out of a metapackage's `Depends`.
pub fn kernel_package_from_depends(depends: &str) -> Result<String, GuestError> {
    depends
        .split(',')
        .flat_map(|dep| dep.split('|'))
        .filter_map(|alt| alt.split_whitespace().next())
        .map(|name| name.split(':').next().unwrap_or(name))
        .find(|name| name.starts_with("linux-image-") && *name != DEBIAN_KERNEL_METAPACKAGE)
        .map(str::to_owned)
        .ok_or_else(|| GuestError::KernelPackage {
            reason: format!(
                "no linux-image-<kver> package in Depends `{}`",
                depends.trim()
            ),
        })
}

/// Orders kernel releases with digit runs compared as numbers
/// (`6.1.0-10` after `6.1.0-9`).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for ((da, xa), (db, xb)) in ca.iter().zip(cb.iter()) {
        let ord = if *da && *db {
            let (ta, tb) = (xa.trim_start_matches('0'), xb.trim_start_matches('0'));
            ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb))
        } else {
            xa.cmp(xb)
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'))
}

fn is_complete(dir: &Path) -> bool {
    dir.join(COMPLETE_MARKER).is_file()
}

fn newest_complete_kernel(kernels: &Path) -> Result<Option<Kernel>, GuestError> {
    let mut versions: Vec<String> = fs::read_dir(kernels)
        .map_err(GuestError::io("read dir", kernels))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| is_plain_name(name) && !name.contains(".tmp-"))
        .filter(|name| is_complete(&kernels.join(name)))
        .collect();
    versions.sort_by(|a, b| compare_versions(a, b));
    match versions.pop() {
        Some(version) => load_extracted(&kernels.join(&version), &version).map(Some),
        None => Ok(None),
    }
}

/// The kernel inside an extracted package tree (`/lib` or merged `/usr/lib`).
fn load_extracted(root: &Path, version: &str) -> Result<Kernel, GuestError> {
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{version}"));
    if !vmlinuz.is_file() {
        return Err(GuestError::KernelPackage {
            reason: format!("the package has no {}", vmlinuz.display()),
        });
    }
    let modules_dir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|base| root.join(base).join(version))
        .find(|dir| dir.is_dir())
        .ok_or_else(|| GuestError::KernelPackage {
            reason: format!(
                "the package has no lib/modules/{version} under {}",
                root.display()
            ),
        })?;
    Ok(Kernel {
        version: version.to_owned(),
        vmlinuz,
        modules_dir,
    })
}

/// `apt-get download PACKAGE` into `dir`; returns the .deb it wrote.
fn apt_download(dir: &Path, package: &str) -> Result<PathBuf, GuestError> {
    tools::run(
        APT_GET
            .command()?
            .arg("download")
            .arg(package)
            .current_dir(dir),
    )?;
    let prefix = format!("{package}_");
    fs::read_dir(dir)
        .map_err(GuestError::io("read dir", dir))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .ok_or_else(|| GuestError::KernelPackage {
            reason: format!("apt-get download {package} wrote no {prefix}*.deb"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_versioned_package_from_depends() {
        let deps = "linux-image-6.1.0-56-cloud-amd64 (= 6.1.153-1)";
        assert_eq!(
            kernel_package_from_depends(deps).unwrap(),
            "linux-image-6.1.0-56-cloud-amd64"
        );
        let alt = "initramfs-tools | linux-initramfs-tool, linux-image-6.12.1-cloud-amd64-unsigned:amd64 | linux-image-6.12.1-cloud-amd64";
        assert_eq!(
            kernel_package_from_depends(alt).unwrap(),
            "linux-image-6.12.1-cloud-amd64-unsigned"
        );
        assert!(kernel_package_from_depends("libc6 (>= 2.3)").is_err());
        assert!(kernel_package_from_depends("").is_err());
    }

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(
            compare_versions("6.1.0-10-cloud-amd64", "6.1.0-9-cloud-amd64"),
            Ordering::Greater
        );
        assert_eq!(compare_versions("6.12.0-1", "6.1.0-56"), Ordering::Greater);
        assert_eq!(compare_versions("6.1.0", "6.1.0"), Ordering::Equal);
        assert_eq!(compare_versions("6.1", "6.1.0"), Ordering::Less);
    }

    #[test]
    fn reads_bzimage_release_string() {
        let mut image = vec![0u8; 0x400];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        let text = b"6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP\0";
        image[0x300..0x300 + text.len()].copy_from_slice(text);
        assert_eq!(
            bzimage_version(&image).as_deref(),
            Some("6.1.0-56-cloud-amd64")
        );
        image[0x202] = b'X';
        assert_eq!(bzimage_version(&image), None);
        assert_eq!(bzimage_version(&[]), None);
    }

    #[test]
    fn existing_complete_kernel_is_used_without_network() {
        let home = tempfile::tempdir().unwrap();
        for (version, complete) in [
            ("6.1.0-9-cloud-amd64", true),
            ("6.1.0-10-cloud-amd64", true),
            ("6.1.0-11-cloud-amd64", false),
        ] {
            let dir = home.path().join("kernels").join(version);
            fs::create_dir_all(dir.join("boot")).unwrap();
            fs::create_dir_all(dir.join("lib/modules").join(version)).unwrap();
            fs::write(dir.join("boot").join(format!("vmlinuz-{version}")), b"k").unwrap();
            if complete {
                fs::write(dir.join(COMPLETE_MARKER), b"").unwrap();
            }
        }
        let kernel = ensure_debian_kernel(home.path(), &|_| panic!("must not fetch")).unwrap();
        assert_eq!(kernel.version, "6.1.0-10-cloud-amd64");
        assert!(kernel
            .vmlinuz
            .ends_with("boot/vmlinuz-6.1.0-10-cloud-amd64"));
        assert!(kernel
            .modules_dir
            .ends_with("lib/modules/6.1.0-10-cloud-amd64"));
    }

    #[test]
    fn kernel_from_path_checks_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("vmlinuz");
        assert!(matches!(
            kernel_from_path(&image, None),
            Err(GuestError::KernelMissing { .. })
        ));
        fs::write(&image, b"not a bzimage").unwrap();
        let modules = dir.path().join("6.6.6-test");
        assert!(matches!(
            kernel_from_path(&image, Some(&modules)),
            Err(GuestError::ModulesDirMissing { .. })
        ));
        fs::create_dir(&modules).unwrap();
        let kernel = kernel_from_path(&image, Some(&modules)).unwrap();
        assert_eq!(kernel.version, "6.6.6-test");
        assert!(kernel.has_modules());
        let bare = kernel_from_path(&image, None).unwrap();
        assert!(bare.version.starts_with("custom-") && !bare.has_modules());
    }

    #[test]
    fn real_debian_vmlinuz_names_its_release_when_present() {
        let Ok(boot) = fs::read_dir("/tmp/k/x/boot") else {
            return;
        };
        for entry in boot.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(release) = name.strip_prefix("vmlinuz-") {
                let kernel = kernel_from_path(&entry.path(), None).unwrap();
                assert_eq!(kernel.version, release);
            }
        }
    }
}
