//! Just enough ELF64 reading to find a section by name and to tell a static
//! executable from a dynamic one. Pure code over bytes: every offset read from
//! the file is bounds-checked, nothing is trusted.

const PT_LOAD: u32 = 1;
const PT_INTERP: u32 = 3;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const SHN_XINDEX: u16 = 0xffff;
const SHT_NOBITS: u32 = 8;
const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
const SHDR_LEN: usize = 64;

/// A validated view of an ELF64 file's bytes.
pub(crate) struct Elf64<'a> {
    bytes: &'a [u8],
    big_endian: bool,
}

/// One section header, reduced to what this crate reads.
struct Section {
    name: u32,
    kind: u32,
    offset: u64,
    size: u64,
    link: u32,
}

impl<'a> Elf64<'a> {
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Self, String> {
        if bytes.len() < EHDR_LEN {
            return Err(format!(
                "{} bytes is shorter than an ELF64 header",
                bytes.len()
            ));
        }
        if bytes[..4] != *b"\x7fELF" {
            return Err("no ELF magic".into());
        }
        if bytes[4] != 2 {
            return Err("not a 64-bit ELF (EI_CLASS is not ELFCLASS64)".into());
        }
        let big_endian = match bytes[5] {
            1 => false,
            2 => true,
            other => return Err(format!("unknown byte order {other} in EI_DATA")),
        };
        Ok(Elf64 { bytes, big_endian })
    }

    fn slice(&self, offset: u64, len: u64) -> Option<&'a [u8]> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        self.bytes.get(start..end)
    }

    fn u16_at(&self, offset: u64) -> Option<u16> {
        let b: [u8; 2] = self.slice(offset, 2)?.try_into().ok()?;
        Some(if self.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }

    fn u32_at(&self, offset: u64) -> Option<u32> {
        let b: [u8; 4] = self.slice(offset, 4)?.try_into().ok()?;
        Some(if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }

    fn u64_at(&self, offset: u64) -> Option<u64> {
        let b: [u8; 8] = self.slice(offset, 8)?.try_into().ok()?;
        Some(if self.big_endian {
            u64::from_be_bytes(b)
        } else {
            u64::from_le_bytes(b)
        })
    }

    fn file_type(&self) -> Option<u16> {
        self.u16_at(0x10)
    }

    /// The `p_type` of every program header.
    pub(crate) fn program_header_types(&self) -> Result<Vec<u32>, String> {
        let phoff = self.u64_at(0x20).ok_or("truncated header")?;
        let entsize = self.u16_at(0x36).ok_or("truncated header")?;
        let count = self.u16_at(0x38).ok_or("truncated header")?;
        if count == 0 {
            return Ok(Vec::new());
        }
        if usize::from(entsize) < PHDR_LEN {
            return Err(format!("program header size {entsize} is too small"));
        }
        (0..u64::from(count))
            .map(|i| {
                let at = i
                    .checked_mul(u64::from(entsize))
                    .and_then(|o| o.checked_add(phoff))
                    .ok_or("program header offset overflows")?;
                self.u32_at(at)
                    .ok_or_else(|| format!("program header {i} lies outside the file"))
            })
            .collect()
    }

    fn section_header(&self, index: u64) -> Result<Section, String> {
        let shoff = self.u64_at(0x28).ok_or("truncated header")?;
        let entsize = self.u16_at(0x3a).ok_or("truncated header")?;
        if usize::from(entsize) < SHDR_LEN {
            return Err(format!("section header size {entsize} is too small"));
        }
        let at = index
            .checked_mul(u64::from(entsize))
            .and_then(|o| o.checked_add(shoff))
            .ok_or("section header offset overflows")?;
        let field32 = |off: u64| self.u32_at(at + off);
        let field64 = |off: u64| self.u64_at(at + off);
        let outside = || format!("section header {index} lies outside the file");
        Ok(Section {
            name: field32(0).ok_or_else(outside)?,
            kind: field32(4).ok_or_else(outside)?,
            offset: field64(24).ok_or_else(outside)?,
            size: field64(32).ok_or_else(outside)?,
            link: field32(40).ok_or_else(outside)?,
        })
    }

    /// The bytes of the first section called `wanted`, `None` when there is none.
    pub(crate) fn section(&self, wanted: &str) -> Result<Option<&'a [u8]>, String> {
        if self.u64_at(0x28).ok_or("truncated header")? == 0 {
            return Ok(None);
        }
        let mut count = u64::from(self.u16_at(0x3c).ok_or("truncated header")?);
        let strndx = self.u16_at(0x3e).ok_or("truncated header")?;
        // Extended numbering: the real values live in section header 0.
        let first = self.section_header(0)?;
        if count == 0 {
            count = first.size;
        }
        let strndx = if strndx == SHN_XINDEX {
            u64::from(first.link)
        } else {
            u64::from(strndx)
        };
        if strndx >= count {
            return Err(format!("section name table index {strndx} is out of range"));
        }
        let names = self.section_header(strndx)?;
        let names = self
            .slice(names.offset, names.size)
            .ok_or("section name table lies outside the file")?;
        for index in 0..count {
            let header = self.section_header(index)?;
            let name = usize::try_from(header.name)
                .ok()
                .and_then(|start| names.get(start..))
                .and_then(|rest| rest.split(|&b| b == 0).next());
            if name != Some(wanted.as_bytes()) {
                continue;
            }
            if header.kind == SHT_NOBITS {
                return Ok(Some(&[]));
            }
            return self
                .slice(header.offset, header.size)
                .map(Some)
                .ok_or_else(|| format!("section {wanted} lies outside the file"));
        }
        Ok(None)
    }
}

/// True when `bytes` is an ELF64 executable (static-pie included) that needs no
/// program interpreter, i.e. runs with no dynamic loader and no libraries.
pub fn is_static_elf(bytes: &[u8]) -> bool {
    let Ok(elf) = Elf64::parse(bytes) else {
        return false;
    };
    if !matches!(elf.file_type(), Some(ET_EXEC | ET_DYN)) {
        return false;
    }
    match elf.program_header_types() {
        Ok(types) => types.contains(&PT_LOAD) && !types.contains(&PT_INTERP),
        Err(_) => false,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a little-endian ELF64 with the given program header types and
    /// named sections (section 0 is the null section, the last is .shstrtab).
    pub(crate) fn synthetic_elf(
        e_type: u16,
        program_headers: &[u32],
        sections: &[(&str, &[u8])],
    ) -> Vec<u8> {
        let mut out = vec![0u8; EHDR_LEN];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
        out[6] = 1;
        out[0x10..0x12].copy_from_slice(&e_type.to_le_bytes());
        out[0x12..0x14].copy_from_slice(&62u16.to_le_bytes());

        let phoff = out.len() as u64;
        for &kind in program_headers {
            let mut ph = [0u8; PHDR_LEN];
            ph[..4].copy_from_slice(&kind.to_le_bytes());
            out.extend_from_slice(&ph);
        }

        let mut shstrtab = vec![0u8];
        let mut placed = Vec::new();
        for (name, data) in sections {
            let name_off = shstrtab.len() as u32;
            shstrtab.extend_from_slice(name.as_bytes());
            shstrtab.push(0);
            placed.push((name_off, out.len() as u64, data.len() as u64));
            out.extend_from_slice(data);
        }
        let shstr_name = shstrtab.len() as u32;
        shstrtab.extend_from_slice(b".shstrtab\0");
        let shstr_off = out.len() as u64;
        out.extend_from_slice(&shstrtab);
        placed.push((shstr_name, shstr_off, shstrtab.len() as u64));

        let shoff = out.len() as u64;
        out.extend_from_slice(&[0u8; SHDR_LEN]);
        for (name, offset, size) in &placed {
            let mut sh = [0u8; SHDR_LEN];
            sh[..4].copy_from_slice(&name.to_le_bytes());
            sh[4..8].copy_from_slice(&1u32.to_le_bytes());
            sh[24..32].copy_from_slice(&offset.to_le_bytes());
            sh[32..40].copy_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&sh);
        }
        let shnum = placed.len() as u16 + 1;
        out[0x20..0x28].copy_from_slice(&phoff.to_le_bytes());
        out[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        out[0x34..0x36].copy_from_slice(&(EHDR_LEN as u16).to_le_bytes());
        out[0x36..0x38].copy_from_slice(&(PHDR_LEN as u16).to_le_bytes());
        out[0x38..0x3a].copy_from_slice(&(program_headers.len() as u16).to_le_bytes());
        out[0x3a..0x3c].copy_from_slice(&(SHDR_LEN as u16).to_le_bytes());
        out[0x3c..0x3e].copy_from_slice(&shnum.to_le_bytes());
        out[0x3e..0x40].copy_from_slice(&(shnum - 1).to_le_bytes());
        out
    }

    #[test]
    fn static_executable_is_static() {
        let elf = synthetic_elf(ET_EXEC, &[6, PT_LOAD, PT_LOAD, 4], &[]);
        assert!(is_static_elf(&elf));
        let pie = synthetic_elf(ET_DYN, &[PT_LOAD], &[]);
        assert!(is_static_elf(&pie), "static-pie has no PT_INTERP");
    }

    #[test]
    fn dynamic_executable_is_not_static() {
        let elf = synthetic_elf(ET_EXEC, &[6, PT_INTERP, PT_LOAD], &[]);
        assert!(!is_static_elf(&elf));
    }

    #[test]
    fn non_executables_and_garbage_are_not_static() {
        assert!(!is_static_elf(&synthetic_elf(1, &[PT_LOAD], &[])), "ET_REL");
        assert!(!is_static_elf(b"#!/bin/sh\necho hi\n"));
        assert!(!is_static_elf(&[]));
        let mut truncated = synthetic_elf(ET_EXEC, &[PT_LOAD], &[]);
        truncated.truncate(66); // cuts the first program header's p_type
        assert!(!is_static_elf(&truncated));
        let mut elf32 = synthetic_elf(ET_EXEC, &[PT_LOAD], &[]);
        elf32[4] = 1;
        assert!(!is_static_elf(&elf32));
    }

    #[test]
    fn host_busybox_is_static_when_installed_static() {
        // Real-file check; skipped where busybox is absent.
        for path in ["/bin/busybox", "/usr/bin/busybox"] {
            if let Ok(bytes) = std::fs::read(path) {
                let file_says_static = std::process::Command::new("file")
                    .arg("-L")
                    .arg(path)
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).contains("statically linked"));
                if let Ok(expected) = file_says_static {
                    assert_eq!(is_static_elf(&bytes), expected, "{path}");
                }
                return;
            }
        }
    }

    #[test]
    fn finds_sections_by_name_and_rejects_bad_offsets() {
        let elf = synthetic_elf(1, &[], &[(".text", b"code"), (".modinfo", b"a=b\0")]);
        let parsed = Elf64::parse(&elf).unwrap();
        assert_eq!(parsed.section(".modinfo").unwrap(), Some(&b"a=b\0"[..]));
        assert_eq!(parsed.section(".text").unwrap(), Some(&b"code"[..]));
        assert_eq!(parsed.section(".nope").unwrap(), None);

        // Point the section header table past the end of the file.
        let mut broken = elf.clone();
        broken[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Elf64::parse(&broken).unwrap().section(".modinfo").is_err());
    }
}
