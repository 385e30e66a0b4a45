//! QEMU's migration stream, read and split.
//!
//! A live snapshot (`background-snapshot`) arrives as one stream holding both
//! guest RAM and device state. To make it a snapshot that children can map
//! copy-on-write, the RAM pages of the guest's main memory block go to a
//! sparse RAM image and everything else becomes a device-state stream in the
//! form an `x-ignore-shared` source would have produced: its `ram` section
//! lists the blocks (with their guest-physical address) but carries none of
//! the extracted pages, so a child loads it with `x-ignore-shared` while its
//! RAM comes from the image.
//!
//! The reader is pure: bytes in, pages and bytes out, through [`RamSink`] and
//! a `Write`. It understands the stream layout of QEMU 7.2 ([`Format`]; add a
//! variant for formats that differ) and refuses anything else with the byte
//! offset and the value it did not understand. It never drops data silently.
//!
//! Layout handled (QEMU 7.2, `migration/savevm.c`, `migration/ram.c`):
//!
//! ```text
//! "QEVM" be32(3)
//! CONFIGURATION(0x07) be32 len, name, subsections*
//! SECTION_START(0x01) be32 id, u8 len, "ram", be32 instance, be32 version,
//!     be64(total | MEM_SIZE) { u8 len, idstr, be64 used_length [, be64 gpa] }*
//!     be64(EOS)  [FOOTER(0x7e) be32 id]
//! SECTION_PART(0x02) / SECTION_END(0x03) be32 id,
//!     { be64(offset | flags) [u8 len, idstr unless CONTINUE] (u8 fill | 4096 bytes) }* be64(EOS) [footer]
//! SECTION_FULL(0x04) ...device state... EOF(0x00)     <- copied verbatim
//! ```

use std::io::{self, Read, Write};

/// `QEVM`
pub const MAGIC: u32 = 0x5145_564d;
/// The only file format version QEMU has written since 2009.
pub const FILE_VERSION: u32 = 3;
/// Target page size for x86-64 guests.
pub const PAGE_SIZE: usize = 4096;

/// Section types (`QEMU_VM_*`).
pub mod section {
    pub const EOF: u8 = 0x00;
    pub const START: u8 = 0x01;
    pub const PART: u8 = 0x02;
    pub const END: u8 = 0x03;
    pub const FULL: u8 = 0x04;
    pub const SUBSECTION: u8 = 0x05;
    pub const VMDESCRIPTION: u8 = 0x06;
    pub const CONFIGURATION: u8 = 0x07;
    pub const COMMAND: u8 = 0x08;
    pub const FOOTER: u8 = 0x7e;
}

/// RAM record flags (`RAM_SAVE_FLAG_*`), in the low bits of the offset.
pub mod flag {
    pub const FULL: u64 = 0x01;
    pub const ZERO: u64 = 0x02;
    pub const MEM_SIZE: u64 = 0x04;
    pub const PAGE: u64 = 0x08;
    pub const EOS: u64 = 0x10;
    pub const CONTINUE: u64 = 0x20;
    pub const XBZRLE: u64 = 0x40;
    pub const HOOK: u64 = 0x80;
    pub const COMPRESS_PAGE: u64 = 0x100;
    pub const MULTIFD_FLUSH: u64 = 0x200;
}

/// Which QEMU's stream layout to expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// QEMU 7.2 (Debian 12).
    Qemu7_2,
}

impl Format {
    /// The format for a QEMU version, if this reader knows it.
    pub fn for_qemu(major: u32, minor: u32) -> Option<Format> {
        match (major, minor) {
            (7, 2) => Some(Format::Qemu7_2),
            _ => None,
        }
    }

    /// RAM flags a stream of this format may carry (others are refused).
    fn known_flags(self) -> u64 {
        match self {
            Format::Qemu7_2 => {
                flag::ZERO | flag::MEM_SIZE | flag::PAGE | flag::EOS | flag::CONTINUE
            }
        }
    }
}

/// How to read and what to split.
#[derive(Debug, Clone)]
pub struct Options {
    pub format: Format,
    /// The source had `x-ignore-shared` on: block entries carry a GPA.
    pub source_ignore_shared: bool,
    /// RAM blocks whose pages go to the [`RamSink`] (e.g. `["mem0"]`); their
    /// pages are removed from the device stream.
    pub extract: Vec<String>,
    /// Guest-physical address written for each block in the device stream's
    /// block list (the loader checks it for extracted blocks only).
    pub gpa: fn(&str) -> u64,
}

impl Options {
    /// Splits the main memory block `mem0` out of a live-snapshot stream.
    pub fn live_snapshot(block: &str) -> Options {
        Options {
            format: Format::Qemu7_2,
            source_ignore_shared: false,
            extract: vec![block.to_string()],
            gpa: |_| 0,
        }
    }
}

/// Receives the pages of extracted blocks.
pub trait RamSink {
    /// A block of `len` bytes exists (from the block list, before any page).
    fn block(&mut self, id: &str, len: u64) -> io::Result<()>;
    /// A page of data at `offset` within block `id`.
    fn page(&mut self, id: &str, offset: u64, data: &[u8]) -> io::Result<()>;
    /// A page at `offset` is all `fill` bytes (QEMU sends only fill 0).
    fn fill(&mut self, id: &str, offset: u64, fill: u8) -> io::Result<()>;
}

/// What the stream contained.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Pages sent to the sink with data / as fill.
    pub pages: u64,
    pub fill_pages: u64,
    /// Pages of other blocks kept in the device stream.
    pub kept_pages: u64,
    /// Bytes of device state after the RAM (copied verbatim).
    pub device_bytes: u64,
    /// Every block in the stream with its length.
    pub blocks: Vec<(String, u64)>,
}

/// Why a stream was refused. Always names the byte offset.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    #[error("migration stream, byte {offset}: {what}")]
    Format { offset: u64, what: String },
    #[error("migration stream ended at byte {offset} inside {inside}")]
    Truncated { offset: u64, inside: &'static str },
    #[error("migration stream, byte {offset}: {source}")]
    Io { offset: u64, source: io::Error },
    #[error("writing the split output at stream byte {offset}: {source}")]
    Sink { offset: u64, source: io::Error },
}

/// Reads a big-endian stream while counting bytes, with one byte of pushback.
struct Reader<R> {
    inner: R,
    offset: u64,
    peeked: Option<u8>,
}

impl<R: Read> Reader<R> {
    fn fill(&mut self, buf: &mut [u8], inside: &'static str) -> Result<(), SplitError> {
        let mut done = 0;
        if let (Some(b), false) = (self.peeked, buf.is_empty()) {
            buf[0] = b;
            self.peeked = None;
            done = 1;
        }
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) => {
                    return Err(SplitError::Truncated {
                        offset: self.offset + done as u64,
                        inside,
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(SplitError::Io {
                        offset: self.offset + done as u64,
                        source,
                    })
                }
            }
        }
        self.offset += buf.len() as u64;
        Ok(())
    }
    fn u8(&mut self, inside: &'static str) -> Result<u8, SplitError> {
        let mut b = [0u8; 1];
        self.fill(&mut b, inside)?;
        Ok(b[0])
    }
    /// Hands the last byte read back to the next read.
    fn unread(&mut self, b: u8) {
        debug_assert!(self.peeked.is_none());
        self.peeked = Some(b);
        self.offset -= 1;
    }
    fn be32(&mut self, inside: &'static str) -> Result<u32, SplitError> {
        let mut b = [0u8; 4];
        self.fill(&mut b, inside)?;
        Ok(u32::from_be_bytes(b))
    }
    fn be64(&mut self, inside: &'static str) -> Result<u64, SplitError> {
        let mut b = [0u8; 8];
        self.fill(&mut b, inside)?;
        Ok(u64::from_be_bytes(b))
    }
    /// A u8-length-prefixed string.
    fn idstr(&mut self, inside: &'static str) -> Result<String, SplitError> {
        let at = self.offset;
        let len = self.u8(inside)? as usize;
        let mut b = vec![0u8; len];
        self.fill(&mut b, inside)?;
        String::from_utf8(b).map_err(|_| bad(at, format!("{inside}: a name that is not UTF-8")))
    }
    /// Copies everything left to `out`, keeping (at least) the last `keep`
    /// bytes in `tail`; returns the byte count. `tail` never holds more than
    /// twice `keep` plus one read.
    fn copy_rest<W: Write>(
        &mut self,
        out: &mut W,
        tail: &mut Vec<u8>,
        keep: usize,
    ) -> Result<u64, SplitError> {
        let mut n_total = 0u64;
        if let Some(b) = self.peeked.take() {
            out.write_all(&[b]).map_err(|source| SplitError::Sink {
                offset: self.offset,
                source,
            })?;
            self.offset += 1;
            n_total += 1;
            tail.push(b);
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match self.inner.read(&mut buf) {
                Ok(0) => return Ok(n_total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(SplitError::Io {
                        offset: self.offset,
                        source,
                    })
                }
            };
            out.write_all(&buf[..n])
                .map_err(|source| SplitError::Sink {
                    offset: self.offset,
                    source,
                })?;
            self.offset += n as u64;
            n_total += n as u64;
            tail.extend_from_slice(&buf[..n]);
            // Trim in large steps: trimming on every read would move
            // `keep` bytes per read.
            if tail.len() > 2 * keep {
                tail.drain(..tail.len() - keep);
            }
        }
    }
}

fn bad(offset: u64, what: impl Into<String>) -> SplitError {
    SplitError::Format {
        offset,
        what: what.into(),
    }
}

fn sink_err(offset: u64) -> impl Fn(io::Error) -> SplitError {
    move |source| SplitError::Sink { offset, source }
}

/// Splits `input`: extracted pages go to `ram`, the rest (rewritten for an
/// `x-ignore-shared` load) to `device`.
pub fn split<R: Read, W: Write, S: RamSink>(
    input: R,
    device: &mut W,
    ram: &mut S,
    opts: &Options,
) -> Result<Summary, SplitError> {
    let mut r = Reader {
        inner: input,
        offset: 0,
        peeked: None,
    };
    let mut summary = Summary::default();
    let mut out: Vec<u8> = Vec::with_capacity(64 * 1024);

    let magic = r.be32("the file header")?;
    if magic != MAGIC {
        return Err(bad(
            0,
            format!("magic {magic:#010x} is not QEVM: not a migration stream"),
        ));
    }
    let version = r.be32("the file header")?;
    if version != FILE_VERSION {
        return Err(bad(
            4,
            format!("file version {version}, expected {FILE_VERSION}"),
        ));
    }
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(&FILE_VERSION.to_be_bytes());

    let mut ram_section: Option<u32> = None;
    let mut state = RamState::default();
    let mut footers: Option<bool> = None;
    loop {
        let at = r.offset;
        let kind = r.u8("a section header")?;
        match kind {
            section::CONFIGURATION => {
                out.push(kind);
                read_configuration(&mut r, &mut out, opts)?;
            }
            section::START => {
                let id = r.be32("a section header")?;
                let name = r.idstr("a section header")?;
                let instance = r.be32("a section header")?;
                let version = r.be32("a section header")?;
                if name != "ram" {
                    return Err(bad(
                        at,
                        format!("iterable section `{name}` is not supported, only `ram` (block or dirty-bitmap migration on?)"),
                    ));
                }
                if ram_section.is_some() {
                    return Err(bad(at, "a second `ram` section start"));
                }
                ram_section = Some(id);
                out.push(kind);
                out.extend_from_slice(&id.to_be_bytes());
                out.push(3);
                out.extend_from_slice(b"ram");
                out.extend_from_slice(&instance.to_be_bytes());
                out.extend_from_slice(&version.to_be_bytes());
                read_ram(&mut r, &mut out, &mut state, &mut summary, ram, opts, true)?;
                let f = read_footer(&mut r, id)?;
                footers = Some(f);
                if f {
                    out.push(section::FOOTER);
                    out.extend_from_slice(&id.to_be_bytes());
                }
            }
            section::PART | section::END => {
                let id = r.be32("a section header")?;
                if Some(id) != ram_section {
                    return Err(bad(
                        at,
                        format!("section {id} continues, but no iterable section {id} started"),
                    ));
                }
                let mut kept = Vec::new();
                read_ram(
                    &mut r,
                    &mut kept,
                    &mut state,
                    &mut summary,
                    ram,
                    opts,
                    false,
                )?;
                if state.kept.len() + kept.len() > MAX_KEPT {
                    return Err(too_many_kept(r.offset));
                }
                state.kept.extend_from_slice(&kept);
                let f = read_footer(&mut r, id)?;
                if Some(f) != footers {
                    return Err(bad(
                        r.offset,
                        "section footers appear in some sections and not in others",
                    ));
                }
            }
            section::FULL | section::EOF => {
                // The device state saved at the pause: first the pages of
                // blocks we keep, in one ram section, then the rest verbatim.
                let Some(id) = ram_section else {
                    return Err(bad(
                        at,
                        "device state before any RAM: not a live-snapshot stream",
                    ));
                };
                out.push(section::END);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&state.kept);
                out.extend_from_slice(&flag::EOS.to_be_bytes());
                if footers == Some(true) {
                    out.push(section::FOOTER);
                    out.extend_from_slice(&id.to_be_bytes());
                }
                device.write_all(&out).map_err(sink_err(at))?;
                r.unread(kind);
                let mut tail = Vec::new();
                summary.device_bytes = r.copy_rest(device, &mut tail, MAX_VMDESC + 8)?;
                if !ends_cleanly(&tail) {
                    return Err(bad(
                        r.offset,
                        "the device state does not end with QEMU's end-of-stream marker: the stream is truncated",
                    ));
                }
                return Ok(summary);
            }
            section::COMMAND => {
                return Err(bad(
                    at,
                    "a COMMAND section (postcopy or COLO): not a live-snapshot stream",
                ))
            }
            other => return Err(bad(at, format!("unknown section type {other:#04x}"))),
        }
        if out.len() >= 64 * 1024 {
            device.write_all(&out).map_err(sink_err(r.offset))?;
            out.clear();
        }
    }
}

/// The configuration section after its type byte, copied to `out` with its
/// capability list saying `x-ignore-shared` (QEMU checks that list against
/// its own capabilities on load, and the children load with it on).
fn read_configuration<R: Read>(
    r: &mut Reader<R>,
    out: &mut Vec<u8>,
    opts: &Options,
) -> Result<(), SplitError> {
    let at = r.offset;
    let len = r.be32("the configuration section")?;
    if len > 256 {
        return Err(bad(at, format!("a machine name of {len} bytes")));
    }
    let mut name = vec![0u8; len as usize];
    r.fill(&mut name, "the configuration section")?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&name);
    let mut caps: Vec<String> = Vec::new();
    loop {
        let at = r.offset;
        let b = r.u8("the configuration section")?;
        if b != section::SUBSECTION {
            r.unread(b);
            if !opts.extract.is_empty() && !caps.iter().any(|c| c == IGNORE_SHARED) {
                caps.push(IGNORE_SHARED.to_string());
            }
            if !caps.is_empty() {
                out.push(section::SUBSECTION);
                out.push(CAPABILITIES.len() as u8);
                out.extend_from_slice(CAPABILITIES.as_bytes());
                out.extend_from_slice(&1u32.to_be_bytes());
                out.extend_from_slice(&(caps.len() as u32).to_be_bytes());
                for c in &caps {
                    out.push(c.len() as u8);
                    out.extend_from_slice(c.as_bytes());
                }
            }
            return Ok(());
        }
        let sub = r.idstr("a configuration subsection")?;
        let version = r.be32("a configuration subsection")?;
        if sub == CAPABILITIES {
            // Collected, and written back (amended) after the others.
            let n = r.be32("the capabilities subsection")?;
            if n > 64 {
                return Err(bad(at, format!("{n} capabilities")));
            }
            for _ in 0..n {
                caps.push(r.idstr("the capabilities subsection")?);
            }
            continue;
        }
        out.push(b);
        out.push(sub.len() as u8);
        out.extend_from_slice(sub.as_bytes());
        out.extend_from_slice(&version.to_be_bytes());
        match sub.as_str() {
            "configuration/target-page-bits" => {
                let bits = r.be32("the target-page-bits subsection")?;
                if bits != 12 {
                    return Err(bad(
                        at,
                        format!("target page bits {bits}: only 4 KiB pages are supported"),
                    ));
                }
                out.extend_from_slice(&bits.to_be_bytes());
            }
            "configuration/uuid" => {
                let mut uuid = [0u8; 16];
                r.fill(&mut uuid, "the uuid subsection")?;
                out.extend_from_slice(&uuid);
            }
            other => {
                return Err(bad(
                    at,
                    format!("unknown configuration subsection `{other}`"),
                ))
            }
        }
    }
}

/// `FOOTER id` if present; its id must match.
fn read_footer<R: Read>(r: &mut Reader<R>, id: u32) -> Result<bool, SplitError> {
    let at = r.offset;
    let b = r.u8("a section footer")?;
    if b != section::FOOTER {
        r.unread(b);
        return Ok(false);
    }
    let got = r.be32("a section footer")?;
    if got != id {
        return Err(bad(
            at,
            format!("footer for section {got} closes section {id}"),
        ));
    }
    Ok(true)
}

/// Blocks seen so far and the records kept for the device stream.
#[derive(Default)]
struct RamState {
    blocks: Vec<(String, u64)>,
    last: Option<usize>,
    kept: Vec<u8>,
    /// The block of the last record written to `kept` (for CONTINUE).
    kept_last: Option<usize>,
}

/// RAM records up to EOS. In the start section (`start`) the block list is
/// rewritten into `out`; later, records of kept blocks go to `out`.
fn read_ram<R: Read, S: RamSink>(
    r: &mut Reader<R>,
    out: &mut Vec<u8>,
    st: &mut RamState,
    summary: &mut Summary,
    ram: &mut S,
    opts: &Options,
    start: bool,
) -> Result<(), SplitError> {
    let known = opts.format.known_flags();
    let mut page = vec![0u8; PAGE_SIZE];
    loop {
        let at = r.offset;
        let header = r.be64("a RAM record")?;
        let flags = header & (PAGE_SIZE as u64 - 1);
        let addr = header & !(PAGE_SIZE as u64 - 1);
        if flags & !known != 0 {
            return Err(bad(at, format!("RAM flags {flags:#x} include {:#x}, which this reader does not understand ({})", flags & !known, flag_names(flags & !known))));
        }
        if flags & flag::EOS != 0 {
            if flags != flag::EOS {
                return Err(bad(at, format!("EOS combined with other flags {flags:#x}")));
            }
            if start {
                out.extend_from_slice(&flag::EOS.to_be_bytes());
            }
            return Ok(());
        }
        if flags & flag::MEM_SIZE != 0 {
            if flags != flag::MEM_SIZE || !start || !st.blocks.is_empty() {
                return Err(bad(at, "a block list outside the start of the ram section"));
            }
            read_block_list(r, out, st, summary, ram, opts, addr)?;
            continue;
        }
        if start {
            return Err(bad(
                at,
                "pages in the ram section start: not a stream forkd can split",
            ));
        }
        let data = flags & (flag::ZERO | flag::PAGE);
        if data != flag::ZERO && data != flag::PAGE {
            return Err(bad(
                at,
                format!(
                    "RAM record with flags {flags:#x} carries neither one page nor one fill byte"
                ),
            ));
        }
        let block = if flags & flag::CONTINUE != 0 {
            st.last
                .ok_or_else(|| bad(at, "CONTINUE before any block was named"))?
        } else {
            let name = r.idstr("a RAM record")?;
            st.blocks
                .iter()
                .position(|(b, _)| *b == name)
                .ok_or_else(|| {
                    bad(
                        at,
                        format!("page for block `{name}`, which is not in the block list"),
                    )
                })?
        };
        st.last = Some(block);
        let (name, len) = st.blocks[block].clone();
        if addr
            .checked_add(PAGE_SIZE as u64)
            .is_none_or(|end| end > len)
        {
            return Err(bad(
                at,
                format!("page at {addr:#x} is outside block `{name}` ({len:#x} bytes)"),
            ));
        }
        let extract = opts.extract.contains(&name);
        let mut fill = 0u8;
        if data == flag::ZERO {
            fill = r.u8("a zero-page record")?;
        } else {
            r.fill(&mut page, "a RAM page")?;
        }
        if extract {
            if data == flag::ZERO {
                ram.fill(&name, addr, fill).map_err(sink_err(at))?;
                summary.fill_pages += 1;
            } else {
                ram.page(&name, addr, &page).map_err(sink_err(at))?;
                summary.pages += 1;
            }
        } else {
            // Kept: re-encode for the device stream (CONTINUE relative to
            // what we wrote there, not to the input).
            let cont = st.kept_last == Some(block);
            out.extend_from_slice(
                &(addr | data | if cont { flag::CONTINUE } else { 0 }).to_be_bytes(),
            );
            if !cont {
                out.push(name.len() as u8);
                out.extend_from_slice(name.as_bytes());
            }
            if data == flag::ZERO {
                out.push(fill);
            } else {
                out.extend_from_slice(&page);
            }
            st.kept_last = Some(block);
            summary.kept_pages += 1;
            if st.kept.len() + out.len() > MAX_KEPT {
                return Err(too_many_kept(at));
            }
        }
    }
}

/// The `MEM_SIZE` block list, rewritten with a GPA per block.
#[allow(clippy::too_many_arguments)]
fn read_block_list<R: Read, S: RamSink>(
    r: &mut Reader<R>,
    out: &mut Vec<u8>,
    st: &mut RamState,
    summary: &mut Summary,
    ram: &mut S,
    opts: &Options,
    total: u64,
) -> Result<(), SplitError> {
    out.extend_from_slice(&(total | flag::MEM_SIZE).to_be_bytes());
    let mut left = total;
    while left > 0 {
        let at = r.offset;
        let name = r.idstr("the RAM block list")?;
        let len = r.be64("the RAM block list")?;
        if opts.source_ignore_shared {
            r.be64("the RAM block list")?;
        }
        if len > left || len % PAGE_SIZE as u64 != 0 {
            return Err(bad(
                at,
                format!(
                    "block `{name}` of {len:#x} bytes does not fit the announced total {total:#x}"
                ),
            ));
        }
        left -= len;
        if st.blocks.iter().any(|(b, _)| *b == name) {
            return Err(bad(at, format!("block `{name}` listed twice")));
        }
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&(opts.gpa)(&name).to_be_bytes());
        if opts.extract.contains(&name) {
            ram.block(&name, len).map_err(sink_err(at))?;
        }
        if st.blocks.len() >= MAX_BLOCKS {
            return Err(bad(
                at,
                format!("more than {MAX_BLOCKS} RAM blocks: not a stream of a forkd guest"),
            ));
        }
        st.blocks.push((name.clone(), len));
        summary.blocks.push((name, len));
    }
    for e in &opts.extract {
        if !st.blocks.iter().any(|(b, _)| b == e) {
            return Err(bad(
                r.offset,
                format!("block `{e}` to extract is not in the stream"),
            ));
        }
    }
    Ok(())
}

const CAPABILITIES: &str = "configuration/capabilities";
const IGNORE_SHARED: &str = "x-ignore-shared";

/// Largest trailing VM description (JSON) the end check looks through.
const MAX_VMDESC: usize = 4 << 20;

/// Most bytes of kept (not extracted) RAM records held until the device
/// state: they are written out only at the end, so they are bounded. A
/// forkd guest keeps only firmware and ACPI blocks, well under a MiB.
pub const MAX_KEPT: usize = 64 << 20;

/// Most RAM blocks a stream may list (QEMU's microvm has a handful).
pub const MAX_BLOCKS: usize = 1024;

fn too_many_kept(offset: u64) -> SplitError {
    bad(
        offset,
        format!(
            "more than {MAX_KEPT} bytes of pages of blocks kept in the device state: \
             extract the guest's big RAM blocks"
        ),
    )
}

/// A stream ends with `EOF`, or with `EOF VMDESCRIPTION be32(len) json[len]`.
/// Device payloads are opaque here, so a cut that happens to end on a zero
/// byte passes this check: it catches most truncations, and callers also
/// require QEMU to report the migration `completed`.
fn ends_cleanly(tail: &[u8]) -> bool {
    if tail.last() == Some(&section::EOF) {
        return true;
    }
    // Find `00 06 len` whose len reaches exactly to the end.
    (0..tail.len().saturating_sub(6)).rev().any(|i| {
        tail[i] == section::EOF
            && tail[i + 1] == section::VMDESCRIPTION
            && u32::from_be_bytes([tail[i + 2], tail[i + 3], tail[i + 4], tail[i + 5]]) as usize
                == tail.len() - i - 6
    })
}

fn flag_names(flags: u64) -> String {
    let names = [
        (flag::FULL, "FULL"),
        (flag::XBZRLE, "XBZRLE: turn off the xbzrle capability"),
        (flag::HOOK, "HOOK: RDMA"),
        (
            flag::COMPRESS_PAGE,
            "COMPRESS_PAGE: turn off the compress capability",
        ),
        (flag::MULTIFD_FLUSH, "MULTIFD_FLUSH: turn off multifd"),
    ];
    let v: Vec<&str> = names
        .iter()
        .filter(|(f, _)| flags & f != 0)
        .map(|(_, n)| *n)
        .collect();
    if v.is_empty() {
        "unknown".into()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests;

#[cfg(any(test, fuzzing))]
pub mod fuzzing;
