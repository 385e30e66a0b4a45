//! `forkd cp`: files and directories between this host and a sandbox, as
//! one tar stream through the seam (modes and times kept, parents created),
//! with `docker cp`'s rules for where things land:
//!
//! - `SRC` a file: onto `DST` if that is a file or does not exist (its
//!   parents are made), into it if it is a directory (or ends in `/`).
//! - `SRC` a directory: becomes `DST` when that does not exist, goes into it
//!   when it is a directory; `SRC/.` copies its contents instead.
//! - `-` is a tar stream on stdin (into a sandbox directory) or stdout.
//!
//! What comes out of a sandbox is untrusted: it is unpacked into a staging
//! directory beside the destination, refusing any entry that is not a file,
//! directory or symlink, or that would land outside the copied path (the tar
//! crate also refuses to write through symlinks out of the staging
//! directory); set-id bits are dropped. Only a complete, checked tree moves
//! into place, so a failure leaves the destination as it was.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use forkd_ops::{ErrorKind, FileKind, Operations, TarSummary};

use crate::exit::Usage;

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A path on this host.
    Local(PathBuf),
    /// A tar stream on stdin or stdout.
    Stdio,
    /// `ID:/path` in a sandbox.
    Guest { id: String, path: String },
}

impl Place {
    /// `ID:/abs/path` is a sandbox path when `ID` is a valid sandbox id;
    /// `-` is stdio; anything else is a local path (write `./a:b` for a
    /// local name with a colon).
    pub fn parse(s: &str) -> Place {
        if s == "-" {
            return Place::Stdio;
        }
        if let Some((id, path)) = s.split_once(':') {
            if path.starts_with('/') && forkd_ops::validate_id(id).is_ok() {
                return Place::Guest {
                    id: id.to_string(),
                    path: path.to_string(),
                };
            }
        }
        Place::Local(PathBuf::from(s))
    }
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Local(p) => write!(f, "{}", p.display()),
            Place::Stdio => f.write_str("-"),
            Place::Guest { id, path } => write!(f, "{id}:{path}"),
        }
    }
}

/// A source path and whether it names a directory's contents (`DIR/.`).
fn split_contents(path: &str) -> (&str, bool) {
    match path.strip_suffix("/.") {
        Some("") => ("/", true),
        Some(p) => (p, true),
        None => (path, false),
    }
}

/// The last component of a path (`/` has none).
fn base_name(path: &str) -> Option<&str> {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
}

/// Parent directory of a guest path.
fn guest_parent(path: &str) -> &str {
    match path.trim_end_matches('/').rsplit_once('/') {
        Some(("", _)) | None => "/",
        Some((p, _)) => p,
    }
}

/// Where a copy into a sandbox unpacks, and the name its top entry gets
/// (`None`: the source's contents go straight into the directory).
#[derive(Debug, PartialEq, Eq)]
pub struct Landing {
    pub dir: String,
    pub name: Option<String>,
}

/// What the destination is, as far as placing a copy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    Dir,
    Other,
    Missing,
}

/// `docker cp`'s placement rules, for a source that is (`src_dir`) or is
/// not a directory, named `src_name`, copied to `dst`.
pub fn landing(
    src_name: &str,
    src_dir: bool,
    contents: bool,
    dst: &str,
    existing: Existing,
) -> Result<Landing> {
    let dst_named = dst.trim_end_matches('/');
    let dst_name = base_name(dst);
    match existing {
        Existing::Dir => Ok(Landing {
            dir: dst.to_string(),
            name: (!contents).then(|| src_name.to_string()),
        }),
        Existing::Other if src_dir => Err(Usage(format!(
            "cannot copy a directory onto {dst}, which is not a directory"
        ))
        .into()),
        _ if dst.ends_with('/') && existing == Existing::Missing && !src_dir => Ok(Landing {
            dir: if dst_named.is_empty() { "/" } else { dst_named }.to_string(),
            name: Some(src_name.to_string()),
        }),
        _ => {
            let name = dst_name
                .ok_or_else(|| Usage(format!("{dst} names no file or directory to create")))?;
            Ok(Landing {
                dir: guest_parent(dst_named).to_string(),
                name: Some(name.to_string()),
            })
        }
    }
}

/// What a copy moved.
#[derive(Debug, serde::Serialize)]
pub struct Copied {
    pub src: String,
    pub dst: String,
    pub entries: u64,
    pub bytes: u64,
}

/// Copies `src` to `dst`; one of them must be in a sandbox.
pub fn copy(ops: &dyn Operations, src: &Place, dst: &Place) -> Result<Copied> {
    let summary = match (src, dst) {
        (Place::Guest { .. }, Place::Guest { .. }) => return Err(Usage(
            "copy between two sandboxes through this host: cp ID:/path DIR, then cp DIR ID:/path"
                .into(),
        )
        .into()),
        (Place::Local(_) | Place::Stdio, Place::Local(_) | Place::Stdio) => {
            return Err(Usage("one side must be a sandbox path, ID:/path".into()).into())
        }
        (Place::Stdio, Place::Guest { id, path }) => {
            ops.copy_in(id, path, None, &mut io::stdin().lock())?
        }
        (Place::Local(local), Place::Guest { id, path }) => copy_in(ops, local, id, path)?,
        (Place::Guest { id, path }, Place::Stdio) => {
            let mut out = io::stdout().lock();
            let s = ops.copy_out(id, path, None, &mut out)?;
            out.flush()?;
            s
        }
        (Place::Guest { id, path }, Place::Local(local)) => copy_out(ops, id, path, local)?,
    };
    Ok(Copied {
        src: src.to_string(),
        dst: dst.to_string(),
        entries: summary.entries,
        bytes: summary.bytes,
    })
}

fn guest_existing(ops: &dyn Operations, id: &str, path: &str) -> Result<Existing> {
    match ops.stat(id, path, None) {
        Ok(f) if f.kind == FileKind::Dir => Ok(Existing::Dir),
        Ok(_) => Ok(Existing::Other),
        Err(e) if e.kind == ErrorKind::NotFound => {
            // Not found may also mean no such sandbox: ask so the error
            // names the right thing.
            ops.sandbox(id)?;
            Ok(Existing::Missing)
        }
        Err(e) => Err(e.into()),
    }
}

fn copy_in(ops: &dyn Operations, local: &Path, id: &str, dst: &str) -> Result<TarSummary> {
    let text = local.to_string_lossy();
    let (src, contents) = split_contents(&text);
    let src = Path::new(src);
    let meta = fs::symlink_metadata(src).with_context(|| format!("reading {}", src.display()))?;
    if contents && !meta.is_dir() {
        return Err(Usage(format!("{} is not a directory", src.display())).into());
    }
    let abs = fs::canonicalize(src).unwrap_or_else(|_| src.to_path_buf());
    let src_name = abs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "root".into());
    let at = landing(
        &src_name,
        meta.is_dir(),
        contents,
        dst,
        guest_existing(ops, id, dst)?,
    )?;
    let (mut reader, writer) = forkd_client::pipe::pipe(4);
    let src_owned = src.to_path_buf();
    let packer = std::thread::spawn(move || {
        let mut writer = writer;
        let r = pack(&src_owned, at.name.as_deref(), &mut writer);
        if let Err(e) = &r {
            // The upload fails too, rather than end as a shorter tar.
            writer.fail(io::Error::new(e.kind(), e.to_string()));
        }
        r
    });
    let result = ops.copy_in(id, &at.dir, None, &mut reader);
    drop(reader);
    let packed = packer
        .join()
        .map_err(|_| anyhow!("the tar writer thread panicked"))?;
    // A failure to read the source explains a failed upload best, unless
    // it only failed because the upload stopped taking bytes.
    match (result, packed) {
        (Ok(s), Ok(())) => Ok(s),
        (Err(e), Err(p)) if p.kind() == io::ErrorKind::BrokenPipe => Err(e.into()),
        (_, Err(p)) => Err(p).with_context(|| format!("packing {}", src.display())),
        (Err(e), Ok(())) => Err(e.into()),
    }
}

/// Writes `src` as a tar stream: as `name` (a file, or a directory and
/// everything in it), or the directory's contents at the top when `name`
/// is `None`.
fn pack(src: &Path, name: Option<&str>, out: impl Write) -> io::Result<()> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    let meta = fs::symlink_metadata(src)?;
    match name {
        Some(name) if meta.is_dir() => b.append_dir_all(name, src)?,
        Some(name) => b.append_path_with_name(src, name)?,
        None => {
            let mut children: Vec<_> = fs::read_dir(src)?.collect::<io::Result<_>>()?;
            children.sort_by_key(|e| e.file_name());
            for child in children {
                let name = child.file_name();
                if child.file_type()?.is_dir() {
                    b.append_dir_all(&name, child.path())?;
                } else {
                    b.append_path_with_name(child.path(), &name)?;
                }
            }
        }
    }
    b.into_inner()?.flush()
}

fn copy_out(ops: &dyn Operations, id: &str, path: &str, local: &Path) -> Result<TarSummary> {
    let (src, contents) = split_contents(path);
    let top = base_name(src)
        .ok_or_else(|| Usage(format!("copy the contents of {src} with {src}/.")))?
        .to_string();
    let info = ops.stat(id, src, None)?;
    let src_dir = info.kind == FileKind::Dir;
    if contents && !src_dir {
        return Err(Usage(format!("{id}:{src} is not a directory")).into());
    }
    let existing = match fs::metadata(local) {
        Ok(m) if m.is_dir() => Existing::Dir,
        Ok(_) => Existing::Other,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Existing::Missing,
        Err(e) => return Err(e).with_context(|| format!("reading {}", local.display())),
    };
    let text = local.to_string_lossy();
    let at = landing(&top, src_dir, contents, &text, existing)?;
    let dir = PathBuf::from(&at.dir);
    fs::create_dir_all(&dir).with_context(|| format!("making {}", dir.display()))?;
    let stage = Staging::new(&dir)?;
    let (reader, mut writer) = forkd_client::pipe::pipe(4);
    let stage_path = stage.path.clone();
    let top_for_unpack = top.clone();
    let unpacker = std::thread::spawn(move || unpack(reader, &stage_path, &top_for_unpack));
    let result = ops.copy_out(id, src, None, &mut writer);
    drop(writer);
    let unpacked = unpacker
        .join()
        .map_err(|_| anyhow!("the unpacking thread panicked"))?;
    let summary = result?;
    unpacked?;
    let staged = stage.path.join(&top);
    match at.name {
        Some(name) => place(&staged, &dir.join(name))?,
        None => merge(&staged, &dir)?,
    }
    Ok(summary)
}

/// A directory beside the destination that the copy unpacks into; removed
/// with whatever is left in it.
struct Staging {
    path: PathBuf,
}

impl Staging {
    fn new(dir: &Path) -> Result<Staging> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = dir.join(format!(".forkd-cp-{}-{nanos}", std::process::id()));
        fs::create_dir(&path).with_context(|| format!("making {}", path.display()))?;
        Ok(Staging { path })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Unpacks an untrusted tar stream into `dir`, every entry under `top`.
pub fn unpack(stream: impl Read, dir: &Path, top: &str) -> Result<()> {
    let mut archive = tar::Archive::new(stream);
    archive.set_preserve_permissions(false); // mode & 0o777: no set-id bits
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    for entry in archive
        .entries()
        .context("reading the sandbox's tar stream")?
    {
        let mut entry = entry.context("reading the sandbox's tar stream")?;
        let name = entry.path()?.into_owned();
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
            bail!(
                "the sandbox sent {} as a {kind:?} entry; only files, directories and symlinks are copied",
                name.display()
            );
        }
        let mut parts = name.components().filter(|c| *c != Component::CurDir);
        let inside = parts.next() == Some(Component::Normal(top.as_ref()))
            && parts.all(|c| matches!(c, Component::Normal(_)));
        if !inside {
            bail!(
                "the sandbox sent an entry outside the copied path: {}",
                name.display()
            );
        }
        if !entry
            .unpack_in(dir)
            .with_context(|| format!("unpacking {}", name.display()))?
        {
            bail!(
                "the sandbox sent an entry that would land outside the destination: {}",
                name.display()
            );
        }
    }
    Ok(())
}

/// Moves `from` to `to`: replacing a file, merging into a directory.
fn place(from: &Path, to: &Path) -> Result<()> {
    let from_meta = fs::symlink_metadata(from).with_context(|| {
        format!(
            "the sandbox's tar stream had no {}",
            from.file_name().unwrap_or_default().to_string_lossy()
        )
    })?;
    match fs::symlink_metadata(to) {
        Ok(m) if m.is_dir() && from_meta.is_dir() => merge(from, to),
        Ok(m) if m.is_dir() => bail!("cannot replace directory {} with a file", to.display()),
        Ok(_) if from_meta.is_dir() => {
            bail!("cannot replace {} with a directory", to.display())
        }
        _ => fs::rename(from, to).with_context(|| format!("moving into {}", to.display())),
    }
}

/// Moves everything in directory `from` into directory `into`.
fn merge(from: &Path, into: &Path) -> Result<()> {
    for child in fs::read_dir(from)? {
        let child = child?;
        place(&child.path(), &into.join(child.file_name()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_sandbox_paths_stdio_or_local() {
        assert_eq!(
            Place::parse("sb-1:/tmp/x"),
            Place::Guest {
                id: "sb-1".into(),
                path: "/tmp/x".into()
            }
        );
        assert_eq!(Place::parse("-"), Place::Stdio);
        assert_eq!(Place::parse("a:b"), Place::Local("a:b".into()));
        assert_eq!(Place::parse("./sb-1:/x"), Place::Local("./sb-1:/x".into()));
        assert_eq!(Place::parse("/abs"), Place::Local("/abs".into()));
    }

    #[test]
    fn landing_follows_docker_cp() {
        let l = |name, dir, contents, dst, ex| landing(name, dir, contents, dst, ex).unwrap();
        // A file onto a missing path: that path, parents made.
        assert_eq!(
            l("a.txt", false, false, "/w/b.txt", Existing::Missing),
            Landing {
                dir: "/w".into(),
                name: Some("b.txt".into())
            }
        );
        // A file into a directory, or a path ending in `/`.
        assert_eq!(
            l("a.txt", false, false, "/w", Existing::Dir)
                .name
                .as_deref(),
            Some("a.txt")
        );
        assert_eq!(
            l("a.txt", false, false, "/w/new/", Existing::Missing),
            Landing {
                dir: "/w/new".into(),
                name: Some("a.txt".into())
            }
        );
        // A file onto a file replaces it.
        assert_eq!(
            l("a.txt", false, false, "/w/b", Existing::Other),
            Landing {
                dir: "/w".into(),
                name: Some("b".into())
            }
        );
        // A directory becomes a missing path, goes into an existing one.
        assert_eq!(
            l("src", true, false, "/w/dst", Existing::Missing),
            Landing {
                dir: "/w".into(),
                name: Some("dst".into())
            }
        );
        assert_eq!(
            l("src", true, false, "/w", Existing::Dir),
            Landing {
                dir: "/w".into(),
                name: Some("src".into())
            }
        );
        // `src/.`: its contents.
        assert_eq!(l("src", true, true, "/w", Existing::Dir).name, None);
        // A directory onto a file is refused; so is `/` as a name.
        assert!(landing("src", true, false, "/w/f", Existing::Other).is_err());
        assert!(landing("a", true, false, "/w/..", Existing::Missing).is_err());
        assert_eq!(guest_parent("/top"), "/");
        assert_eq!(split_contents("/w/."), ("/w", true));
        assert_eq!(base_name("/w/x/"), Some("x"));
    }

    fn tar_of(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o4755);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            // set_path refuses `..`; write the raw name as a hostile tar would.
            let raw = &mut h.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("forkd-cp-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_plain_tree_unpacks_without_set_id_bits() {
        use std::os::unix::fs::PermissionsExt;
        let d = scratch("plain");
        let t = tar_of(&[
            ("top", tar::EntryType::Directory, b"", None),
            ("top/run", tar::EntryType::Regular, b"#!/bin/sh\n", None),
        ]);
        unpack(&t[..], &d, "top").unwrap();
        let m = fs::metadata(d.join("top/run")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o755);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn hostile_streams_are_refused_and_write_nothing_outside() {
        let d = scratch("hostile");
        let outside = d.join("outside");
        fs::create_dir(&outside).unwrap();
        let stage = d.join("stage");
        fs::create_dir(&stage).unwrap();
        let cases: Vec<Vec<u8>> = vec![
            tar_of(&[("top/../../outside/x", tar::EntryType::Regular, b"x", None)]),
            tar_of(&[("other", tar::EntryType::Regular, b"x", None)]),
            tar_of(&[("top/dev", tar::EntryType::Char, b"", None)]),
            tar_of(&[("top/fifo", tar::EntryType::Fifo, b"", None)]),
            tar_of(&[
                ("top", tar::EntryType::Directory, b"", None),
                ("top/hard", tar::EntryType::Link, b"", Some("/etc/passwd")),
            ]),
            tar_of(&[
                (
                    "top",
                    tar::EntryType::Symlink,
                    b"",
                    Some(outside.to_str().unwrap()),
                ),
                ("top/x", tar::EntryType::Regular, b"x", None),
            ]),
        ];
        for (i, t) in cases.iter().enumerate() {
            assert!(unpack(&t[..], &stage, "top").is_err(), "case {i} unpacked");
            assert_eq!(
                fs::read_dir(&outside).unwrap().count(),
                0,
                "case {i} wrote outside"
            );
            let _ = fs::remove_dir_all(&stage);
            fs::create_dir(&stage).unwrap();
        }
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn placing_merges_directories_and_replaces_files() {
        let d = scratch("place");
        fs::create_dir_all(d.join("from/sub")).unwrap();
        fs::write(d.join("from/sub/new"), "new").unwrap();
        fs::write(d.join("from/f"), "2").unwrap();
        fs::create_dir_all(d.join("to/sub")).unwrap();
        fs::write(d.join("to/sub/old"), "old").unwrap();
        fs::write(d.join("to/f"), "1").unwrap();
        place(&d.join("from"), &d.join("to")).unwrap();
        assert_eq!(fs::read_to_string(d.join("to/f")).unwrap(), "2");
        assert_eq!(fs::read_to_string(d.join("to/sub/old")).unwrap(), "old");
        assert_eq!(fs::read_to_string(d.join("to/sub/new")).unwrap(), "new");
        fs::create_dir(d.join("dir")).unwrap();
        fs::write(d.join("file"), "x").unwrap();
        assert!(place(&d.join("file"), &d.join("dir")).is_err());
        fs::remove_dir_all(&d).unwrap();
    }
}
