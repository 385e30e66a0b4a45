//! Measures how well each chunking dedups a file against its parent: what a
//! push of CHILD uploads when the registry already has PARENT (and what a
//! pull of CHILD downloads on a host that has PARENT). Prints a Markdown table.
//!
//!     cargo run --release -p forkd-oci --example chunk_dedup -- PARENT CHILD

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use forkd_oci::chunking::{self, Chunking, Piece};
use forkd_oci::Digest;

const MIB: f64 = 1024.0 * 1024.0;

fn raw_digests(path: &Path, chunking: Chunking) -> HashSet<Digest> {
    let mut set = HashSet::new();
    chunking::scan_file(path, chunking, &mut |piece| {
        if let Piece::Data { bytes, .. } = piece {
            set.insert(Digest::of(bytes));
        }
        Ok(())
    })
    .expect("scan parent");
    set
}

/// Pages (4 KiB) that differ between the two files, and pages holding data in CHILD.
fn page_diff(parent: &Path, child: &Path) -> (u64, u64) {
    let (a, b) = (File::open(parent).unwrap(), File::open(child).unwrap());
    let size = b.metadata().unwrap().len();
    let (mut pa, mut pb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let (mut differ, mut data) = (0, 0);
    let mut off = 0;
    while off < size {
        let n = ((size - off) as usize).min(pb.len());
        pa[..n].fill(0);
        let _ = a.read_at(&mut pa[..n], off);
        b.read_exact_at(&mut pb[..n], off).unwrap();
        for (x, y) in pa[..n].chunks(4096).zip(pb[..n].chunks(4096)) {
            if y.iter().any(|&v| v != 0) {
                data += 1;
            }
            if x != y {
                differ += 1;
            }
        }
        off += n as u64;
    }
    (differ, data)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, parent, child] = args.as_slice() else {
        eprintln!("usage: chunk_dedup PARENT CHILD");
        std::process::exit(2);
    };
    let (parent, child) = (Path::new(parent), Path::new(child));
    let (differ, data) = page_diff(parent, child);
    println!(
        "CHILD: {:.0} MiB, {} data pages; {} pages ({:.1}% of data pages) differ from PARENT\n",
        File::open(child).unwrap().metadata().unwrap().len() as f64 / MIB,
        data,
        differ,
        100.0 * differ as f64 / data.max(1) as f64
    );
    println!("| chunking | chunks in CHILD | new chunks | new raw MiB | new compressed MiB (sent) | CHILD alone compressed MiB | scan+compress s |");
    println!("|---|---|---|---|---|---|---|");
    let configs = [
        ("fixed 64 KiB", Chunking::Fixed { size: 64 << 10 }),
        ("fixed 256 KiB", Chunking::Fixed { size: 256 << 10 }),
        ("fixed 1 MiB", Chunking::Fixed { size: 1 << 20 }),
        (
            "cdc 16/64/256 KiB",
            Chunking::Cdc {
                min: 16 << 10,
                avg: 64 << 10,
                max: 256 << 10,
            },
        ),
        (
            "cdc 64/256/1024 KiB",
            Chunking::Cdc {
                min: 64 << 10,
                avg: 256 << 10,
                max: 1 << 20,
            },
        ),
        (
            "cdc 256/1024/4096 KiB",
            Chunking::Cdc {
                min: 256 << 10,
                avg: 1 << 20,
                max: 4 << 20,
            },
        ),
    ];
    for (name, chunking) in configs {
        let known = raw_digests(parent, chunking);
        let start = Instant::now();
        let mut seen = HashSet::new();
        let (mut chunks, mut new_chunks, mut new_raw, mut new_blob, mut all_blob) =
            (0u64, 0u64, 0u64, 0u64, 0u64);
        chunking::scan_file(child, chunking, &mut |piece| {
            if let Piece::Data { bytes, .. } = piece {
                chunks += 1;
                let raw = Digest::of(bytes);
                if !seen.insert(raw.clone()) {
                    return Ok(());
                }
                let blob = chunking::compress(bytes).len() as u64;
                all_blob += blob;
                if !known.contains(&raw) {
                    new_chunks += 1;
                    new_raw += bytes.len() as u64;
                    new_blob += blob;
                }
            }
            Ok(())
        })
        .expect("scan child");
        println!(
            "| {name} | {chunks} | {new_chunks} | {:.1} | {:.1} | {:.1} | {:.1} |",
            new_raw as f64 / MIB,
            new_blob as f64 / MIB,
            all_blob as f64 / MIB,
            start.elapsed().as_secs_f64()
        );
    }
}
