//! Pushes two snapshot directories (a parent and a branch of it) to a
//! registry and pulls them onto an empty "host", the branch with the parent
//! as local source; prints bytes, chunks and times of each step.
//!
//!     cargo run --release -p forkd-oci --example registry_transfer -- \
//!         127.0.0.1:5000/bench/snap PARENT_DIR BRANCH_DIR WORK_DIR [--insecure]

use std::path::{Path, PathBuf};
use std::time::Instant;

use forkd_oci::fileset::{self, FileSpec, LocalSources, PullOptions, PushOptions, TransferStats};
use forkd_oci::{ClientOptions, Reference, Registry};

const MIB: f64 = 1024.0 * 1024.0;

fn files(dir: &Path) -> Vec<FileSpec> {
    let mut out: Vec<FileSpec> = std::fs::read_dir(dir)
        .expect("read snapshot dir")
        .map(|e| e.expect("dir entry"))
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| FileSpec::new(e.file_name().to_string_lossy(), e.path()))
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn row(step: &str, seconds: f64, s: &TransferStats) {
    println!(
        "| {step} | {seconds:.1} | {} | {} | {:.1} | {:.1} | {} | {:.1} |",
        s.chunks,
        s.chunks_transferred,
        s.bytes_transferred as f64 / MIB,
        s.raw_bytes_transferred as f64 / MIB,
        s.chunks_reused,
        s.zero_bytes as f64 / MIB,
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: registry_transfer REPO_REF PARENT_DIR BRANCH_DIR WORK_DIR [--insecure]");
        std::process::exit(2);
    }
    let base = Reference::parse(&args[1]).expect("reference");
    let (parent, branch, work) = (
        PathBuf::from(&args[2]),
        PathBuf::from(&args[3]),
        PathBuf::from(&args[4]),
    );
    let options = ClientOptions {
        insecure: args.iter().any(|a| a == "--insecure"),
        ..ClientOptions::default()
    };
    let client = Registry::new(base.api_host(), options).expect("client");
    let tagged = |tag: &str| Reference {
        tag: Some(tag.to_owned()),
        ..base.clone()
    };
    let none = LocalSources::new();
    println!("| step | s | chunks | sent/received | MiB over the wire | raw MiB | reused | zero MiB (not sent) |");
    println!("|---|---|---|---|---|---|---|---|");

    let t = Instant::now();
    let p = fileset::push(
        &client,
        &tagged("parent"),
        b"{}",
        &files(&parent),
        &none,
        &PushOptions::default(),
        &mut |_| {},
    )
    .expect("push parent");
    row("push parent", t.elapsed().as_secs_f64(), &p.stats);

    let mut local = LocalSources::new();
    for (name, index) in &p.indexes {
        local.add(parent.join(name), index);
    }
    let t = Instant::now();
    let b = fileset::push(
        &client,
        &tagged("branch"),
        b"{}",
        &files(&branch),
        &local,
        &PushOptions::default(),
        &mut |_| {},
    )
    .expect("push branch");
    row(
        "push branch (parent in registry)",
        t.elapsed().as_secs_f64(),
        &b.stats,
    );

    let host = work.join("host");
    let t = Instant::now();
    let got = fileset::pull(
        &client,
        &tagged("parent"),
        &host.join("parent"),
        &none,
        &PullOptions::default(),
        &mut |_| {},
    )
    .expect("pull parent");
    row(
        "pull parent (empty host)",
        t.elapsed().as_secs_f64(),
        &got.stats,
    );

    let mut local = LocalSources::new();
    for (name, index) in &got.indexes {
        local.add(host.join("parent").join(name), index);
    }
    let t = Instant::now();
    let got = fileset::pull(
        &client,
        &tagged("branch"),
        &host.join("branch"),
        &local,
        &PullOptions::default(),
        &mut |_| {},
    )
    .expect("pull branch");
    row(
        "pull branch (host has parent)",
        t.elapsed().as_secs_f64(),
        &got.stats,
    );

    let t = Instant::now();
    let got = fileset::pull(
        &client,
        &tagged("branch"),
        &work.join("cold/branch"),
        &none,
        &PullOptions::default(),
        &mut |_| {},
    )
    .expect("pull branch cold");
    row(
        "pull branch (empty host)",
        t.elapsed().as_secs_f64(),
        &got.stats,
    );
}
