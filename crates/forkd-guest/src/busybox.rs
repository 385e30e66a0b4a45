//! The host's static busybox, which both the initramfs and the busybox root
//! image carry, and the applet links that go with it; and the host's static
//! bash (Debian's `bash-static`), which the busybox root image carries as
//! `/bin/bash` because E2B's SDK runs every command as `/bin/bash -l -c`.

use std::path::{Path, PathBuf};

use crate::elf::is_static_elf;
use crate::GuestError;

/// `/bin/busybox` or `/usr/bin/busybox`, which must be statically linked.
pub fn find_busybox() -> Result<PathBuf, GuestError> {
    let mut dynamic = None;
    for candidate in ["/bin/busybox", "/usr/bin/busybox"] {
        let path = Path::new(candidate);
        let Ok(bytes) = std::fs::read(path) else {
            continue;
        };
        if is_static_elf(&bytes) {
            return Ok(path.to_owned());
        }
        dynamic.get_or_insert_with(|| path.to_owned());
    }
    Err(match dynamic {
        Some(path) => GuestError::BusyboxNotStatic { path },
        None => GuestError::BusyboxMissing,
    })
}

/// `bash-static` (`/bin/bash-static` or `/usr/bin/bash-static`), which must
/// be statically linked.
pub fn find_static_bash() -> Result<PathBuf, GuestError> {
    for candidate in ["/bin/bash-static", "/usr/bin/bash-static"] {
        let path = Path::new(candidate);
        if let Ok(bytes) = std::fs::read(path) {
            if is_static_elf(&bytes) {
                return Ok(path.to_owned());
            }
        }
    }
    Err(GuestError::BashMissing)
}

fn is_applet_name(name: &str) -> bool {
    !name.is_empty() && name != "busybox" && name != "." && name != ".." && !name.contains('\0')
}

/// Applet names from `busybox --list`, one per line.
pub fn parse_applet_list(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|n| is_applet_name(n) && !n.contains('/'))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Applet paths from `busybox --list-full` (`usr/bin/env`), with the
/// relative link target to `/bin/busybox` (`../../bin/busybox`). Entries
/// outside a dir (`linuxrc`) and busybox itself are skipped.
pub fn parse_applet_list_full(text: &str) -> Vec<(String, String)> {
    let mut links: Vec<(String, String)> = text
        .lines()
        .map(|l| l.trim().trim_start_matches('/'))
        .filter_map(|path| {
            let (dir, name) = path.rsplit_once('/')?;
            let parts: Vec<&str> = dir.split('/').collect();
            let plain = parts.iter().all(|p| is_applet_name(p) && *p != "busybox");
            if !plain || !is_applet_name(name) {
                return None;
            }
            let target = format!("{}bin/busybox", "../".repeat(parts.len()));
            let target = if dir == "bin" {
                "busybox".to_owned()
            } else {
                target
            };
            Some((path.to_owned(), target))
        })
        .collect();
    links.sort();
    links.dedup_by(|a, b| a.0 == b.0);
    links
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applet_list_skips_busybox_and_paths() {
        let names = parse_applet_list("sh\nls\n\nbusybox\n[\n[[\nbin/ls\nls\n");
        assert_eq!(names, ["[", "[[", "ls", "sh"]);
    }

    #[test]
    fn full_list_gets_relative_targets() {
        let links = parse_applet_list_full("bin/busybox\nbin/sh\nlinuxrc\nsbin/init\nusr/bin/env\n/usr/sbin/chroot\nusr/../etc/x\n");
        assert_eq!(
            links,
            [
                ("bin/sh".to_owned(), "busybox".to_owned()),
                ("sbin/init".to_owned(), "../bin/busybox".to_owned()),
                ("usr/bin/env".to_owned(), "../../bin/busybox".to_owned()),
                ("usr/sbin/chroot".to_owned(), "../../bin/busybox".to_owned()),
            ]
        );
    }
}
