//! `forkd push` and `forkd pull`: printers over [`Operations::push`] and
//! [`Operations::pull`]. On a terminal, one progress line on stderr
//! rewritten in place (bytes done, chunks moved vs reused); with `--json`,
//! only the outcome on stdout.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Result;
use forkd_ops::{Operations, PullRequest, PushRequest, TransferCounts, TransferProgress};

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// The progress line of a transfer: `verb file: done/total MiB, N chunks
/// sent (X MiB), M reused`.
fn progress_line(verb: &str, p: &TransferProgress) -> String {
    let c = &p.counts;
    format!(
        "{verb} {}: {:.1}/{:.1} MiB, {} chunks {} ({:.1} MiB), {} reused",
        p.file,
        mib(c.done_bytes),
        mib(c.total_bytes),
        c.chunks_transferred,
        if verb == "pushing" {
            "sent"
        } else {
            "downloaded"
        },
        mib(c.bytes_transferred),
        c.chunks_reused
    )
}

fn summary(c: &TransferCounts) -> String {
    format!(
        "{:.1} MiB in {} chunks over the network, {} chunks ({:.1} MiB) reused, {:.1} MiB of holes",
        mib(c.bytes_transferred),
        c.chunks_transferred,
        c.chunks_reused,
        mib(c.raw_bytes_reused),
        mib(c.zero_bytes)
    )
}

/// A progress printer for stderr when it is a terminal and not `--json`.
fn printer(verb: &'static str, json: bool) -> impl Fn(&TransferProgress) + Sync {
    let on = !json && std::io::stderr().is_terminal();
    let last = Mutex::new(Instant::now());
    move |p: &TransferProgress| {
        if !on {
            return;
        }
        let mut at = last.lock().unwrap_or_else(|e| e.into_inner());
        if at.elapsed().as_millis() < 100 {
            return;
        }
        *at = Instant::now();
        let mut err = std::io::stderr();
        let _ = write!(err, "\r\x1b[2K{}", progress_line(verb, p));
        let _ = err.flush();
    }
}

fn end_line(json: bool) {
    if !json && std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K");
    }
}

pub fn push(
    ops: &dyn Operations,
    tag: &str,
    reference: &str,
    insecure: bool,
    json: bool,
) -> Result<ExitCode> {
    let req = PushRequest {
        tag: tag.into(),
        reference: reference.into(),
        insecure,
    };
    let out = ops.push(&req, &printer("pushing", json));
    end_line(json);
    let out = out?;
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "pushed {} ({} snapshot{}) to {} ({})\n{}",
            out.tag,
            out.snapshots.len(),
            if out.snapshots.len() == 1 { "" } else { "s" },
            out.reference,
            out.digest,
            summary(&out.counts)
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn pull(
    ops: &dyn Operations,
    reference: &str,
    tag: Option<String>,
    insecure: bool,
    json: bool,
) -> Result<ExitCode> {
    let req = PullRequest {
        reference: reference.into(),
        tag,
        insecure,
    };
    let out = ops.pull(&req, &printer("pulling", json));
    end_line(json);
    let out = out?;
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "pulled {} as {} ({} new snapshot{}{})\n{}",
            out.reference,
            out.tag,
            out.published.len(),
            if out.published.len() == 1 { "" } else { "s" },
            if out.reused.is_empty() {
                String::new()
            } else {
                format!(", kept {}", out.reused.join(", "))
            },
            summary(&out.counts)
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_line_names_the_file_and_both_chunk_counts() {
        let p = TransferProgress {
            file: "kid/ram.img".into(),
            counts: TransferCounts {
                total_bytes: 4 << 20,
                done_bytes: 1 << 20,
                chunks_transferred: 3,
                bytes_transferred: 1 << 19,
                chunks_reused: 5,
                ..TransferCounts::default()
            },
        };
        assert_eq!(
            progress_line("pushing", &p),
            "pushing kid/ram.img: 1.0/4.0 MiB, 3 chunks sent (0.5 MiB), 5 reused"
        );
    }
}
