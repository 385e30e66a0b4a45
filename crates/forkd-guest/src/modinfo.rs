//! Reads a kernel module's `.modinfo` ELF section: NUL-separated `key=value`
//! strings written by modpost. Pure; never runs `modinfo(8)`.

use crate::elf::Elf64;
use crate::GuestError;

/// What this crate needs to know about one kernel module.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModInfo {
    /// `name=` as written by modpost (uses `_`); absent in very old modules.
    pub name: Option<String>,
    /// `depends=`, split on commas, as written (module names, not file names).
    pub depends: Vec<String>,
}

/// Parses the `.modinfo` section out of the bytes of an uncompressed `.ko`.
pub fn parse_modinfo(elf_bytes: &[u8]) -> Result<ModInfo, GuestError> {
    let invalid = |reason: String| GuestError::InvalidElf {
        what: "kernel module".into(),
        reason,
    };
    let elf = Elf64::parse(elf_bytes).map_err(invalid)?;
    let section = elf.section(".modinfo").map_err(invalid)?.ok_or_else(|| {
        invalid("it has no .modinfo section, so it is not a kernel module".into())
    })?;
    Ok(parse_modinfo_section(section))
}

/// Parses the body of a `.modinfo` section.
pub fn parse_modinfo_section(section: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    for entry in section.split(|&b| b == 0).filter(|e| !e.is_empty()) {
        let entry = String::from_utf8_lossy(entry);
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        match key {
            "name" if !value.is_empty() => info.name = Some(value.to_owned()),
            "depends" => info.depends.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(str::to_owned),
            ),
            _ => {}
        }
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elf::tests::synthetic_elf;

    #[test]
    fn parses_synthetic_module() {
        let modinfo = b"license=GPL\0depends=virtio_ring,virtio,net_failover\0\0\0retpoline=Y\0name=virtio_net\0vermagic=6.1.0 SMP mod_unload\0";
        let elf = synthetic_elf(1, &[], &[(".text", b"\x90\x90"), (".modinfo", modinfo)]);
        let info = parse_modinfo(&elf).unwrap();
        assert_eq!(info.name.as_deref(), Some("virtio_net"));
        assert_eq!(info.depends, ["virtio_ring", "virtio", "net_failover"]);
    }

    #[test]
    fn empty_depends_means_no_dependencies() {
        let elf = synthetic_elf(1, &[], &[(".modinfo", b"depends=\0name=failover\0")]);
        let info = parse_modinfo(&elf).unwrap();
        assert_eq!(info.name.as_deref(), Some("failover"));
        assert!(info.depends.is_empty());
    }

    #[test]
    fn missing_section_and_non_elf_are_errors() {
        let elf = synthetic_elf(1, &[], &[(".text", b"x")]);
        let err = parse_modinfo(&elf).unwrap_err().to_string();
        assert!(err.contains("no .modinfo section"), "{err}");
        assert!(
            parse_modinfo(b"not an elf at all, clearly not one, no no no no no no no no no")
                .is_err()
        );
        assert!(parse_modinfo(&[]).is_err());
    }

    #[test]
    fn parses_real_debian_module_when_present() {
        // Optional: only where a Debian kernel was extracted for experiments.
        let Ok(dirs) = std::fs::read_dir("/tmp/k/x/lib/modules") else {
            return;
        };
        for dir in dirs.flatten() {
            let ko = dir
                .path()
                .join("kernel/drivers/char/hw_random/virtio-rng.ko");
            let Ok(bytes) = std::fs::read(&ko) else {
                continue;
            };
            let info = parse_modinfo(&bytes).unwrap();
            assert_eq!(info.name.as_deref(), Some("virtio_rng"));
            assert!(info.depends.iter().any(|d| d == "virtio_ring"), "{info:?}");
        }
    }
}
