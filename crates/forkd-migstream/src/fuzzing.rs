//! Properties of the splitter over arbitrary input, shared by the bounded
//! property tests (`cargo test`) and the cargo-fuzz targets in `fuzz/`
//! (compiled with `--cfg fuzzing`). Not part of the library's API.
//!
//! [`check`] splits any bytes and asserts what must hold whatever they are;
//! [`synthesize`] turns arbitrary bytes into a stream that follows QEMU's
//! layout most of the way (valid header and sections, block lists, records
//! with mostly-valid flags, addresses in and out of range), so that random
//! input reaches the deep parts of the reader instead of dying at the magic.

use std::io;

use crate::{flag, section, split, Options, RamSink, FILE_VERSION, MAGIC, PAGE_SIZE};

/// A sink that stores nothing and checks every call against the blocks
/// announced before it.
#[derive(Default)]
struct Checker {
    blocks: Vec<(String, u64)>,
    pages: u64,
    fills: u64,
}

impl Checker {
    fn check(&self, id: &str, offset: u64) {
        let len = self
            .blocks
            .iter()
            .find(|(b, _)| b == id)
            .map(|(_, l)| *l)
            .expect("a page for a block that was announced");
        assert_eq!(offset % PAGE_SIZE as u64, 0, "page offset {offset:#x}");
        assert!(
            offset < len && len - offset >= PAGE_SIZE as u64,
            "page {offset:#x} inside block {id} of {len:#x}"
        );
    }
}

impl RamSink for Checker {
    fn block(&mut self, id: &str, len: u64) -> io::Result<()> {
        assert!(
            !self.blocks.iter().any(|(b, _)| b == id),
            "block {id} twice"
        );
        self.blocks.push((id.to_string(), len));
        Ok(())
    }
    fn page(&mut self, id: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check(id, offset);
        assert_eq!(data.len(), PAGE_SIZE);
        self.pages += 1;
        Ok(())
    }
    fn fill(&mut self, id: &str, offset: u64, _fill: u8) -> io::Result<()> {
        self.check(id, offset);
        self.fills += 1;
        Ok(())
    }
}

/// Splits `input` (as a live snapshot extracting `mem0`) and asserts: no
/// panic, the sink only sees pages inside announced blocks, the summary
/// counts what the sink saw, and an error names an offset inside the input.
pub fn check(input: &[u8]) {
    let mut device = Vec::new();
    let mut sink = Checker::default();
    match split(
        input,
        &mut device,
        &mut sink,
        &Options::live_snapshot("mem0"),
    ) {
        Ok(summary) => {
            assert_eq!(summary.pages, sink.pages);
            assert_eq!(summary.fill_pages, sink.fills);
            assert!(device.starts_with(&MAGIC.to_be_bytes()));
        }
        Err(e) => {
            let offset = match &e {
                crate::SplitError::Format { offset, .. }
                | crate::SplitError::Truncated { offset, .. }
                | crate::SplitError::Io { offset, .. }
                | crate::SplitError::Sink { offset, .. } => *offset,
            };
            assert!(offset <= input.len() as u64, "{e}");
            assert!(!e.to_string().is_empty());
        }
    }
}

/// Reads arbitrary bytes as decisions; zeros once they run out.
struct Tape<'a>(&'a [u8]);

impl Tape<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    /// True with probability about `n`/256; false on an exhausted tape.
    fn chance(&mut self, n: u8) -> bool {
        self.u8() > u8::MAX - n
    }
    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |v, _| v << 8 | u64::from(self.u8()))
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
}

const NAMES: [&str; 4] = ["mem0", "pc.bios", "/rom@etc/acpi/tables", "x"];

/// A stream in QEMU 7.2's layout built from the decisions in `data`, with
/// deliberate faults now and then (see the module docs).
pub fn synthesize(data: &[u8]) -> Vec<u8> {
    let mut t = Tape(data);
    let mut s = Vec::new();
    let be32 = |s: &mut Vec<u8>, v: u32| s.extend_from_slice(&v.to_be_bytes());
    let be64 = |s: &mut Vec<u8>, v: u64| s.extend_from_slice(&v.to_be_bytes());
    let name = |s: &mut Vec<u8>, n: &str| {
        s.push(n.len() as u8);
        s.extend_from_slice(n.as_bytes());
    };
    be32(&mut s, if t.chance(4) { t.u64() as u32 } else { MAGIC });
    be32(
        &mut s,
        if t.chance(4) {
            t.u8().into()
        } else {
            FILE_VERSION
        },
    );
    // Configuration: machine name and subsections.
    s.push(section::CONFIGURATION);
    be32(&mut s, 7);
    s.extend_from_slice(b"microvm");
    for _ in 0..t.u8() % 3 {
        s.extend([section::SUBSECTION]);
        match t.u8() % 4 {
            0 => {
                name(&mut s, "configuration/target-page-bits");
                be32(&mut s, 1);
                be32(&mut s, if t.chance(16) { t.u8().into() } else { 12 });
            }
            1 => {
                name(&mut s, "configuration/uuid");
                be32(&mut s, 1);
                let uuid = t.bytes(16);
                s.extend_from_slice(&uuid);
            }
            2 => {
                name(&mut s, "configuration/capabilities");
                be32(&mut s, 1);
                let n = t.u8() % 4;
                be32(&mut s, n.into());
                for _ in 0..n {
                    name(&mut s, "x-ignore-shared");
                }
            }
            _ => {
                let len = t.u8() % 8;
                let junk = t.bytes(len.into());
                s.push(len);
                s.extend_from_slice(&junk);
            }
        }
    }
    // The ram section's start with the block list.
    let mut blocks: Vec<(&str, u64)> = Vec::new();
    for _ in 0..1 + t.u8() % 3 {
        let n = NAMES[usize::from(t.u8()) % NAMES.len()];
        let pages = u64::from(t.u8() % 16) + 1;
        let len = if t.chance(8) {
            t.u64()
        } else {
            pages * PAGE_SIZE as u64
        };
        blocks.push((n, len));
    }
    let id = if t.chance(8) { t.u8().into() } else { 2 };
    s.push(section::START);
    be32(&mut s, id);
    name(&mut s, if t.chance(8) { "blk" } else { "ram" });
    be32(&mut s, 0);
    be32(&mut s, 4);
    let total = blocks.iter().fold(0u64, |a, (_, l)| a.wrapping_add(*l));
    be64(&mut s, (total & !0xfff) | flag::MEM_SIZE);
    for (n, l) in &blocks {
        name(&mut s, n);
        be64(&mut s, *l);
    }
    be64(&mut s, flag::EOS);
    let footers = !t.chance(32);
    if footers {
        s.push(section::FOOTER);
        be32(&mut s, 2);
    }
    // Parts with page records.
    for _ in 0..t.u8() % 4 {
        s.push(if t.chance(32) {
            section::END
        } else {
            section::PART
        });
        be32(&mut s, 2);
        for _ in 0..t.u8() % 8 {
            let (n, len) = blocks[usize::from(t.u8()) % blocks.len()];
            let addr = if t.chance(16) {
                t.u64() & !0xfff
            } else {
                (u64::from(t.u8()) * PAGE_SIZE as u64) % len.max(1)
            } & !0xfff;
            let cont = t.chance(64);
            let zero = t.chance(128);
            let mut flags = if zero { flag::ZERO } else { flag::PAGE };
            if cont {
                flags |= flag::CONTINUE;
            }
            if t.chance(8) {
                flags = t.u64() & 0xfff;
            }
            be64(&mut s, addr | flags);
            if !cont {
                name(&mut s, n);
            }
            if zero {
                s.push(0);
            } else {
                let b = t.u8();
                s.extend(std::iter::repeat_n(b, PAGE_SIZE));
            }
        }
        be64(&mut s, flag::EOS);
        if footers {
            s.push(section::FOOTER);
            be32(&mut s, 2);
        }
    }
    // Device state, end of stream, maybe a VM description.
    s.push(section::FULL);
    let len = t.u8();
    let dev = t.bytes(len.into());
    s.extend_from_slice(&dev);
    s.push(section::EOF);
    if t.chance(32) {
        s.push(section::VMDESCRIPTION);
        be32(&mut s, 2);
        s.extend_from_slice(b"{}");
    }
    // Now and then cut it short or flip a byte.
    if t.chance(32) {
        let at = usize::from(t.u8()) * s.len() / 256;
        s.truncate(at);
    } else if t.chance(32) && !s.is_empty() {
        let at = (t.u64() as usize) % s.len();
        s[at] ^= t.u8() | 1;
    }
    s
}
