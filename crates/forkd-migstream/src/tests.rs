use super::*;
use std::collections::BTreeMap;

/// Builds streams in the QEMU 7.2 layout.
#[derive(Default)]
struct Builder {
    b: Vec<u8>,
}

impl Builder {
    fn header(mut self) -> Self {
        self.b.extend(MAGIC.to_be_bytes());
        self.b.extend(FILE_VERSION.to_be_bytes());
        self
    }
    fn config(mut self, name: &str) -> Self {
        self.b.push(section::CONFIGURATION);
        self.b.extend((name.len() as u32).to_be_bytes());
        self.b.extend(name.as_bytes());
        self
    }
    fn ram_start(mut self, blocks: &[(&str, u64)], gpa: bool) -> Self {
        self.b.push(section::START);
        self.b.extend(2u32.to_be_bytes());
        self.b.push(3);
        self.b.extend(b"ram");
        self.b.extend(0u32.to_be_bytes());
        self.b.extend(4u32.to_be_bytes());
        let total: u64 = blocks.iter().map(|(_, l)| l).sum();
        self.b.extend((total | flag::MEM_SIZE).to_be_bytes());
        for (n, l) in blocks {
            self.b.push(n.len() as u8);
            self.b.extend(n.as_bytes());
            self.b.extend(l.to_be_bytes());
            if gpa {
                self.b.extend(0u64.to_be_bytes());
            }
        }
        self.b.extend(flag::EOS.to_be_bytes());
        self.footer()
    }
    fn footer(mut self) -> Self {
        self.b.push(section::FOOTER);
        self.b.extend(2u32.to_be_bytes());
        self
    }
    fn part(mut self) -> Self {
        self.b.push(section::PART);
        self.b.extend(2u32.to_be_bytes());
        self
    }
    fn page(mut self, block: Option<&str>, addr: u64, byte: u8) -> Self {
        let cont = if block.is_none() { flag::CONTINUE } else { 0 };
        self.b.extend((addr | flag::PAGE | cont).to_be_bytes());
        if let Some(n) = block {
            self.b.push(n.len() as u8);
            self.b.extend(n.as_bytes());
        }
        self.b.extend(std::iter::repeat_n(byte, PAGE_SIZE));
        self
    }
    fn zero(mut self, block: Option<&str>, addr: u64) -> Self {
        let cont = if block.is_none() { flag::CONTINUE } else { 0 };
        self.b.extend((addr | flag::ZERO | cont).to_be_bytes());
        if let Some(n) = block {
            self.b.push(n.len() as u8);
            self.b.extend(n.as_bytes());
        }
        self.b.push(0);
        self
    }
    fn eos(mut self) -> Self {
        self.b.extend(flag::EOS.to_be_bytes());
        self.footer()
    }
    fn devices(mut self, bytes: &[u8]) -> Self {
        self.b.push(section::FULL);
        self.b.extend(bytes);
        self.b.push(section::EOF);
        self
    }
}

#[derive(Default, Debug)]
struct Mem {
    blocks: Vec<(String, u64)>,
    pages: BTreeMap<(String, u64), Vec<u8>>,
}

impl RamSink for Mem {
    fn block(&mut self, id: &str, len: u64) -> io::Result<()> {
        self.blocks.push((id.into(), len));
        Ok(())
    }
    fn page(&mut self, id: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        self.pages.insert((id.into(), offset), data.to_vec());
        Ok(())
    }
    fn fill(&mut self, id: &str, offset: u64, fill: u8) -> io::Result<()> {
        self.pages
            .insert((id.into(), offset), vec![fill; PAGE_SIZE]);
        Ok(())
    }
}

fn live_stream() -> Vec<u8> {
    Builder::default()
        .header()
        .config("microvm")
        .ram_start(&[("mem0", 16 * 4096), ("pc.bios", 2 * 4096)], false)
        .part()
        .page(Some("mem0"), 0, 0xaa)
        .page(None, 4096, 0xbb)
        .zero(None, 8192)
        .page(Some("pc.bios"), 4096, 0xcc)
        .page(Some("mem0"), 15 * 4096, 0xdd)
        .eos()
        .part()
        .zero(Some("pc.bios"), 0)
        .eos()
        .devices(b"\x07\x03cpu-device-state")
        .b
}

fn split_vec(input: &[u8], opts: &Options) -> Result<(Vec<u8>, Mem, Summary), SplitError> {
    let mut dev = Vec::new();
    let mut mem = Mem::default();
    let s = split(input, &mut dev, &mut mem, opts)?;
    Ok((dev, mem, s))
}

#[test]
fn extracts_main_memory_and_keeps_other_blocks_in_the_device_stream() {
    let (dev, mem, s) = split_vec(&live_stream(), &Options::live_snapshot("mem0")).unwrap();
    assert_eq!(mem.blocks, [("mem0".to_string(), 16 * 4096)]);
    assert_eq!(mem.pages.len(), 4);
    assert_eq!(mem.pages[&("mem0".into(), 4096)][0], 0xbb);
    assert_eq!(mem.pages[&("mem0".into(), 8192)], vec![0; PAGE_SIZE]);
    assert_eq!((s.pages, s.fill_pages, s.kept_pages), (3, 1, 2));
    assert!(
        dev.ends_with(b"cpu-device-state\x00"),
        "device state copied verbatim"
    );
    // The loader checks x-ignore-shared against the stream's capability list.
    assert!(
        dev.windows(26 + 15).any(
            |w| w.starts_with(b"configuration/capabilities") && w.ends_with(b"x-ignore-shared")
        ) || dev.windows(15).any(|w| w == b"x-ignore-shared")
    );
    assert!(dev.windows(26).any(|w| w == b"configuration/capabilities"));

    // The device stream reads back as an x-ignore-shared stream: the same
    // blocks (now with GPAs) and only the kept pages.
    let mut again = Options::live_snapshot("mem0");
    again.source_ignore_shared = true;
    again.extract = vec![];
    let (dev2, mem2, s2) = split_vec(&dev, &again).unwrap();
    assert!(mem2.pages.is_empty());
    assert_eq!(s2.kept_pages, 2);
    assert_eq!(s2.blocks, s.blocks);
    assert_eq!(dev2, dev, "re-splitting a split stream changes nothing");
}

#[test]
fn the_device_stream_carries_no_extracted_page() {
    let (dev, _, _) = split_vec(&live_stream(), &Options::live_snapshot("mem0")).unwrap();
    assert!(!dev.windows(64).any(|w| w.iter().all(|&b| b == 0xaa)));
    assert!(
        dev.windows(64).any(|w| w.iter().all(|&b| b == 0xcc)),
        "pc.bios page kept"
    );
}

#[test]
fn refusals_name_the_offset_and_the_reason() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"NOTQEMU!".to_vec(), "not QEVM"),
        (
            {
                let mut v = live_stream();
                v[7] = 4;
                v
            },
            "file version 4",
        ),
        (
            Builder::default()
                .header()
                .config("m")
                .ram_start(&[("mem0", 4096)], false)
                .part()
                .b
                .into_iter()
                .chain((flag::COMPRESS_PAGE | flag::PAGE).to_be_bytes())
                .collect(),
            "COMPRESS_PAGE",
        ),
        (
            Builder::default()
                .header()
                .config("m")
                .ram_start(&[("mem0", 4096)], false)
                .part()
                .page(Some("mem0"), 4096, 1)
                .b,
            "outside block `mem0`",
        ),
        (
            Builder::default()
                .header()
                .config("m")
                .ram_start(&[("mem0", 4096)], false)
                .part()
                .page(Some("ghost"), 0, 1)
                .b,
            "not in the block list",
        ),
        (
            Builder::default()
                .header()
                .config("m")
                .ram_start(&[("mem0", 4096)], false)
                .part()
                .page(None, 0, 1)
                .b,
            "CONTINUE before",
        ),
        (
            Builder::default()
                .header()
                .config("m")
                .ram_start(&[("other", 4096)], false)
                .b,
            "`mem0` to extract",
        ),
        (
            Builder::default()
                .header()
                .config("m")
                .b
                .into_iter()
                .chain([section::COMMAND])
                .collect(),
            "COMMAND",
        ),
        (
            Builder::default()
                .header()
                .config("m")
                .b
                .into_iter()
                .chain([0x42])
                .collect(),
            "unknown section type 0x42",
        ),
        (
            Builder::default().header().config("m").devices(b"x").b,
            "device state before any RAM",
        ),
    ];
    for (input, needle) in cases {
        let e = split_vec(&input, &Options::live_snapshot("mem0"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "expected {needle:?} in {e:?}");
        assert!(e.contains("byte "), "no offset in {e:?}");
    }
}

#[test]
fn every_truncation_is_an_error_never_a_panic_or_success() {
    let full = live_stream();
    for cut in 0..full.len() - 1 {
        match split_vec(&full[..cut], &Options::live_snapshot("mem0")) {
            Err(SplitError::Truncated { offset, .. }) => assert!(offset <= cut as u64),
            Err(SplitError::Format { .. }) => {} // e.g. a device state cut to nothing
            Ok((_, _, summary)) => panic!("cut at {cut} of {} accepted: {summary:?}", full.len()),
            Err(e) => panic!("cut at {cut}: {e}"),
        }
    }
}

#[test]
fn a_trailing_vm_description_is_accepted_and_its_truncation_refused() {
    let json = br#"{"devices":[]}"#;
    let mut s = live_stream();
    s.push(section::VMDESCRIPTION);
    s.extend((json.len() as u32).to_be_bytes());
    s.extend(json);
    let (dev, _, _) = split_vec(&s, &Options::live_snapshot("mem0")).unwrap();
    assert!(dev.ends_with(json));
    assert!(split_vec(&s[..s.len() - 3], &Options::live_snapshot("mem0")).is_err());
}

#[test]
fn configuration_subsections_are_understood_or_refused() {
    let mut b = Builder::default().header().config("microvm").b;
    b.push(section::SUBSECTION);
    b.push(26);
    b.extend(b"configuration/capabilities");
    b.extend(1u32.to_be_bytes());
    b.extend(1u32.to_be_bytes());
    b.push(15);
    b.extend(b"x-ignore-shared");
    let ok = Builder { b: b.clone() }
        .ram_start(&[("mem0", 4096)], false)
        .part()
        .page(Some("mem0"), 0, 7)
        .eos()
        .devices(b"d")
        .b;
    let (dev, mem, _) = split_vec(&ok, &Options::live_snapshot("mem0")).unwrap();
    assert_eq!(mem.pages.len(), 1);
    assert!(
        dev.windows(15).any(|w| w == b"x-ignore-shared"),
        "configuration copied"
    );
    let mut unknown = Builder::default().header().config("microvm").b;
    unknown.push(section::SUBSECTION);
    unknown.push(17);
    unknown.extend(b"configuration/new");
    unknown.extend(1u32.to_be_bytes());
    let e = split_vec(&unknown, &Options::live_snapshot("mem0"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown configuration subsection"), "{e}");
}

/// A bounded, deterministic fuzzer: mutated streams must never panic, and a
/// successful split must only report pages inside the announced blocks.
#[test]
fn fuzz_mutated_streams() {
    let seed = live_stream();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let iterations: u64 = std::env::var("FORKD_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    for _ in 0..iterations {
        let mut s = seed.clone();
        for _ in 0..1 + next() % 4 {
            let i = (next() as usize) % s.len();
            match next() % 4 {
                0 => s[i] = next() as u8,
                1 => s[i] ^= 1 << (next() % 8),
                2 => s.truncate(i.max(1)),
                _ => s.insert(i, next() as u8),
            }
        }
        if let Ok((_, mem, summary)) = split_vec(&s, &Options::live_snapshot("mem0")) {
            for ((block, off), data) in &mem.pages {
                let len = summary
                    .blocks
                    .iter()
                    .find(|(b, _)| b == block)
                    .map(|(_, l)| *l)
                    .unwrap();
                assert!(off + PAGE_SIZE as u64 <= len);
                assert_eq!(data.len(), PAGE_SIZE);
            }
        }
    }
}

mod properties {
    //! Bounded property runs of [`crate::fuzzing`] (seconds); the long run is
    //! `PROPTEST_CASES=1000000 cargo test -p forkd-migstream --release properties`
    //! or the cargo-fuzz target `migstream` (docs/fuzzing.md).
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            crate::fuzzing::check(&data);
        }

        #[test]
        fn synthesized_streams_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            crate::fuzzing::check(&crate::fuzzing::synthesize(&data));
        }
    }

    #[test]
    fn the_synthesizer_reaches_a_successful_split() {
        // Without faults (all-zero decisions past the first bytes) the
        // synthesized stream is valid: the property above explores real paths.
        let s = crate::fuzzing::synthesize(&[]);
        let mut dev = Vec::new();
        let mut mem = super::Mem::default();
        crate::split(
            &s[..],
            &mut dev,
            &mut mem,
            &crate::Options::live_snapshot("mem0"),
        )
        .expect("a synthesized stream without faults splits");
    }
}

#[test]
fn a_page_address_at_the_top_of_the_address_space_is_refused_not_wrapped() {
    let s = Builder::default()
        .header()
        .config("microvm")
        .ram_start(&[("mem0", 4 * 4096)], false)
        .part()
        .page(Some("mem0"), 0xffff_ffff_ffff_f000, 1)
        .eos()
        .devices(b"")
        .b;
    let e = split_vec(&s, &Options::live_snapshot("mem0"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside block"), "{e}");
}

#[test]
fn kept_pages_beyond_the_bound_are_refused() {
    // A block that is not extracted, rewritten over and over: the splitter
    // holds kept pages until the end, so it must stop at MAX_KEPT.
    let mut b = Builder::default()
        .header()
        .config("microvm")
        .ram_start(&[("mem0", 4096), ("pc.bios", 4096)], false)
        .part();
    for _ in 0..(MAX_KEPT / PAGE_SIZE) + 2 {
        b = b.page(Some("pc.bios"), 0, 7);
    }
    let s = b.eos().devices(b"").b;
    let e = split_vec(&s, &Options::live_snapshot("mem0"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("kept in the device state"), "{e}");
}

#[test]
fn a_block_list_of_endless_empty_blocks_is_refused() {
    let names: Vec<String> = (0..MAX_BLOCKS + 1).map(|i| format!("b{i}")).collect();
    // Empty blocks first: they do not use up the announced total.
    let blocks: Vec<(&str, u64)> = names
        .iter()
        .map(|n| (n.as_str(), 0))
        .chain(std::iter::once(("mem0", 4096)))
        .collect();
    let s = Builder::default()
        .header()
        .config("microvm")
        .ram_start(&blocks, false)
        .eos()
        .devices(b"")
        .b;
    let e = split_vec(&s, &Options::live_snapshot("mem0"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("RAM blocks"), "{e}");
}
