//! Applies one image layer (a tar stream) onto a root directory, the way an
//! overlay filesystem would see the layers stacked: `.wh.NAME` deletes NAME
//! from lower layers, `.wh..wh..opq` hides everything lower layers put in its
//! directory, a non-directory replaces whatever was there.
//!
//! Layers are hostile input. An entry whose path has a `..` component is
//! refused. Parent directories are resolved inside the root as a chroot would
//! (a symlink `bin -> /usr/bin` leads to `ROOT/usr/bin`, never to the host's),
//! the final component is never followed, and hard links must point at an
//! existing non-directory inside the root. Ownership, modes (setuid
//! included), mtimes and `SCHILY.xattr` extended attributes are kept where the
//! host allows.

use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

use crate::error::{OciError, Result};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// Symlinks followed while resolving one path, as Linux's own limit.
const MAX_SYMLINK_HOPS: usize = 40;

/// How to apply layers.
#[derive(Debug, Clone)]
pub struct UnpackOptions {
    /// chown entries to their uid/gid (needs root); off keeps the caller's ids.
    pub preserve_ownership: bool,
    /// Refuse a layer once its entries add up to more than this many bytes.
    pub max_layer_bytes: u64,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            // SAFETY: geteuid takes no arguments and cannot fail.
            preserve_ownership: unsafe { libc::geteuid() } == 0,
            max_layer_bytes: 64 * 1024 * 1024 * 1024,
        }
    }
}

/// What applying a layer did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerStats {
    pub entries: u64,
    pub bytes: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    /// Extended attributes or device nodes the host would not let us create.
    pub skipped: u64,
}

/// The path of a tar entry as normal components; `..` is refused, `.`, empty
/// components and a leading `/` are dropped. Pure.
pub fn entry_components(raw: &[u8]) -> std::result::Result<Vec<OsString>, &'static str> {
    if raw.contains(&0) {
        return Err("the path contains a NUL byte");
    }
    let mut out = Vec::new();
    for component in Path::new(OsStr::from_bytes(raw)).components() {
        match component {
            Component::Normal(c) => out.push(c.to_owned()),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => return Err("the path climbs out with `..`"),
            Component::Prefix(_) => return Err("the path has a prefix"),
        }
    }
    Ok(out)
}

/// Resolves directory `components` under `root` as if `root` were `/`:
/// symlinks are followed (absolute ones from `root`, `..` stops at `root`).
/// Missing directories are created when `create` is set, else `None` is
/// returned. A component that exists but is not a directory is an error.
pub(crate) fn resolve_dir(
    root: &Path,
    components: &[OsString],
    create: bool,
) -> io::Result<Option<PathBuf>> {
    let mut resolved: Vec<OsString> = Vec::new();
    let mut pending: VecDeque<OsString> = components.iter().cloned().collect();
    let mut hops = 0;
    while let Some(c) = pending.pop_front() {
        if c.is_empty() || c == "." {
            continue;
        }
        if c == ".." {
            resolved.pop();
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&resolved);
        candidate.push(&c);
        match fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(io::Error::other(format!(
                        "too many symlinks resolving {}",
                        candidate.display()
                    )));
                }
                let target = fs::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved.clear();
                }
                let mut parts: Vec<OsString> = target
                    .iter()
                    .filter(|p| *p != "/")
                    .map(|p| p.to_owned())
                    .collect();
                parts.extend(pending.drain(..));
                pending = parts.into();
            }
            Ok(meta) if meta.is_dir() => resolved.push(c),
            Ok(_) => {
                let kind = io::Error::from_raw_os_error(libc::ENOTDIR).kind();
                return Err(io::Error::new(
                    kind,
                    format!("{} is not a directory", candidate.display()),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !create {
                    return Ok(None);
                }
                fs::create_dir(&candidate)?;
                resolved.push(c);
            }
            Err(e) => return Err(e),
        }
    }
    let mut path = root.to_path_buf();
    path.extend(&resolved);
    Ok(Some(path))
}

/// Removes whatever is at `path` (a file, a symlink, a whole tree); absent is fine.
fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Applies the layer tar stream `reader` onto `root`. `layer` names the
/// layer in errors, as a sentence's subject (`layer sha256:…`).
pub fn apply_layer(
    reader: impl Read,
    root: &Path,
    layer: &str,
    options: &UnpackOptions,
) -> Result<LayerStats> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(options.preserve_ownership);
    archive.set_preserve_mtime(true);
    // Applied by hand below, so a filesystem without some namespace skips it.
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let mut stats = LayerStats::default();
    // Paths (relative to root, as written in the layer) this layer created.
    let mut created: HashSet<PathBuf> = HashSet::new();
    let entries = archive.entries().map_err(|e| unpack_error(layer, "", e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| unpack_error(layer, "(next entry)", e))?;
        let raw_path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path)
            .chars()
            .take(300)
            .collect::<String>();
        let components = entry_components(&raw_path).map_err(|reason| OciError::UnsafeEntry {
            layer: layer.to_owned(),
            entry: shown.clone(),
            reason: reason.to_owned(),
        })?;
        stats.entries += 1;
        stats.bytes += entry.size();
        if stats.bytes > options.max_layer_bytes {
            return Err(OciError::TooLarge {
                what: format!("layer {layer}"),
                limit: options.max_layer_bytes,
            });
        }
        let Some((name, parents)) = components.split_last() else {
            continue; // the root itself
        };
        let name_str = name.to_string_lossy();
        let rel: PathBuf = components.iter().collect();

        if name_str == OPAQUE_MARKER {
            stats.opaque_dirs += 1;
            if let Some(dir) =
                resolve_dir(root, parents, false).map_err(|e| unpack_error(layer, &shown, e))?
            {
                let parent_rel: PathBuf = parents.iter().collect();
                clear_lower(&dir, &parent_rel, &created)
                    .map_err(|e| unpack_error(layer, &shown, e))?;
            }
            continue;
        }
        if let Some(hidden) = name_str.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.starts_with(".wh.") {
                continue; // aufs bookkeeping (.wh..wh.plnk and the like)
            }
            stats.whiteouts += 1;
            let hidden_rel: PathBuf = parents.iter().collect::<PathBuf>().join(hidden);
            if !created.contains(&hidden_rel) {
                if let Some(dir) =
                    resolve_dir(root, parents, false).map_err(|e| unpack_error(layer, &shown, e))?
                {
                    remove_any(&dir.join(hidden)).map_err(|e| unpack_error(layer, &shown, e))?;
                }
            }
            continue;
        }

        let parent = resolve_dir(root, parents, true)
            .map_err(|e| unpack_error(layer, &shown, e))?
            .unwrap_or_else(|| root.to_path_buf());
        let target = parent.join(name);
        let kind = entry.header().entry_type();
        let existing = fs::symlink_metadata(&target).ok();
        let keep_dir =
            kind == EntryType::Directory && existing.as_ref().is_some_and(|m| m.is_dir());
        if !keep_dir {
            remove_any(&target).map_err(|e| unpack_error(layer, &shown, e))?;
        }
        match kind {
            EntryType::Link => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| {
                        unpack_error(
                            layer,
                            &shown,
                            io::Error::other("hard link without a target"),
                        )
                    })?
                    .into_owned();
                let source =
                    hardlink_source(root, &link).map_err(|reason| OciError::UnsafeEntry {
                        layer: layer.to_owned(),
                        entry: shown.clone(),
                        reason,
                    })?;
                fs::hard_link(&source, &target).map_err(|e| unpack_error(layer, &shown, e))?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                if !make_node(&entry, &target, kind, options)
                    .map_err(|e| unpack_error(layer, &shown, e))?
                {
                    stats.skipped += 1;
                }
            }
            EntryType::XGlobalHeader
            | EntryType::XHeader
            | EntryType::GNULongName
            | EntryType::GNULongLink => continue,
            _ => {
                entry
                    .unpack(&target)
                    .map_err(|e| unpack_error(layer, &shown, e))?;
            }
        }
        stats.skipped +=
            apply_xattrs(&mut entry, &target).map_err(|e| unpack_error(layer, &shown, e))?;
        // Parents count as created too: an opaque marker above them must not
        // remove what this layer put inside.
        for ancestor in rel.ancestors().filter(|a| !a.as_os_str().is_empty()) {
            if !created.insert(ancestor.to_path_buf()) {
                break;
            }
        }
    }
    Ok(stats)
}

/// Where a hard link's target lives under `root`: its parent resolved inside
/// the root, its own name not followed; it must exist and not be a directory.
fn hardlink_source(root: &Path, link: &[u8]) -> std::result::Result<PathBuf, String> {
    let components = entry_components(link).map_err(|r| format!("its hard link target {r}"))?;
    let (name, parents) = components
        .split_last()
        .ok_or_else(|| "its hard link target is empty".to_owned())?;
    let parent = resolve_dir(root, parents, false)
        .map_err(|e| format!("its hard link target cannot be resolved: {e}"))?
        .ok_or_else(|| {
            format!(
                "its hard link target `{}` does not exist",
                String::from_utf8_lossy(link)
            )
        })?;
    let source = parent.join(name);
    match fs::symlink_metadata(&source) {
        Ok(m) if m.is_dir() => Err("it hard-links a directory".into()),
        Ok(_) => Ok(source),
        Err(_) => Err(format!(
            "its hard link target `{}` does not exist",
            String::from_utf8_lossy(link)
        )),
    }
}

/// Removes everything under `dir` (at `dir_rel` in the layer) that this layer
/// did not create itself: the effect of an opaque marker on lower layers.
fn clear_lower(dir: &Path, dir_rel: &Path, created: &HashSet<PathBuf>) -> io::Result<()> {
    for child in fs::read_dir(dir)? {
        let child = child?;
        let rel = dir_rel.join(child.file_name());
        let path = child.path();
        if !created.contains(&rel) {
            remove_any(&path)?;
        } else if child.file_type()?.is_dir() {
            clear_lower(&path, &rel, created)?;
        }
    }
    Ok(())
}

/// Creates a device node or FIFO; false when the host does not allow it
/// (device nodes need root).
fn make_node<R: Read>(
    entry: &tar::Entry<'_, R>,
    target: &Path,
    kind: EntryType,
    options: &UnpackOptions,
) -> io::Result<bool> {
    let header = entry.header();
    let mode = header.mode()? & 0o7777;
    let (type_bits, dev) = match kind {
        EntryType::Fifo => (libc::S_IFIFO, 0),
        EntryType::Char | EntryType::Block => {
            let major = header.device_major()?.unwrap_or(0);
            let minor = header.device_minor()?.unwrap_or(0);
            let bits = if kind == EntryType::Char {
                libc::S_IFCHR
            } else {
                libc::S_IFBLK
            };
            (bits, libc::makedev(major, minor))
        }
        _ => return Ok(false),
    };
    let path =
        std::ffi::CString::new(target.as_os_str().as_bytes().to_vec()).map_err(io::Error::other)?;
    // SAFETY: mknod with a valid NUL-terminated path; it only creates a node.
    if unsafe { libc::mknod(path.as_ptr(), type_bits | mode, dev) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EPERM) {
            return Ok(false);
        }
        return Err(e);
    }
    if options.preserve_ownership {
        let (uid, gid) = (header.uid()? as libc::uid_t, header.gid()? as libc::gid_t);
        // SAFETY: lchown with a valid NUL-terminated path.
        if unsafe { libc::lchown(path.as_ptr(), uid, gid) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(true)
}

/// Sets the entry's `SCHILY.xattr.*` attributes on `target` (not following a
/// symlink); returns how many the filesystem refused as unsupported.
fn apply_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>, target: &Path) -> io::Result<u64> {
    let Some(extensions) = entry.pax_extensions()? else {
        return Ok(0);
    };
    let mut attrs = Vec::new();
    for ext in extensions {
        let ext = ext?;
        if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
            attrs.push((
                OsString::from_vec(name.to_vec()),
                ext.value_bytes().to_vec(),
            ));
        }
    }
    let mut skipped = 0;
    for (name, value) in attrs {
        if let Err(e) = xattr::set(target, &name, &value) {
            match e.raw_os_error() {
                Some(libc::ENOTSUP) | Some(libc::EPERM) | Some(libc::EACCES) => skipped += 1,
                _ => return Err(e),
            }
        }
    }
    Ok(skipped)
}

fn unpack_error(layer: &str, entry: &str, source: io::Error) -> OciError {
    OciError::Unpack {
        layer: layer.to_owned(),
        entry: entry.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    /// A tar built entry by entry (with raw names, so hostile ones too).
    struct Layer(tar::Builder<Vec<u8>>);

    impl Layer {
        fn new() -> Self {
            Layer(tar::Builder::new(Vec::new()))
        }
        fn header(kind: EntryType, size: u64, mode: u32) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(size);
            h.set_mode(mode);
            h.set_mtime(1_700_000_000);
            h
        }
        fn raw_name(h: &mut tar::Header, name: &str) {
            let bytes = &mut h.as_old_mut().name;
            bytes.fill(0);
            bytes[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
        }
        fn file(mut self, name: &str, data: &[u8], mode: u32) -> Self {
            let mut h = Self::header(EntryType::Regular, data.len() as u64, mode);
            Self::raw_name(&mut h, name);
            self.0.append(&h, data).unwrap();
            self
        }
        fn dir(mut self, name: &str) -> Self {
            let mut h = Self::header(EntryType::Directory, 0, 0o755);
            Self::raw_name(&mut h, name);
            self.0.append(&h, &[][..]).unwrap();
            self
        }
        fn link(mut self, kind: EntryType, name: &str, target: &str) -> Self {
            let mut h = Self::header(kind, 0, 0o777);
            h.set_link_name(target).unwrap();
            Self::raw_name(&mut h, name);
            self.0.append(&h, &[][..]).unwrap();
            self
        }
        fn bytes(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn apply(root: &Path, layer: Layer) -> Result<LayerStats> {
        let options = UnpackOptions {
            preserve_ownership: false,
            ..UnpackOptions::default()
        };
        apply_layer(&layer.bytes()[..], root, "test", &options)
    }

    #[test]
    fn components_refuse_parent_dirs() {
        assert_eq!(
            entry_components(b"./a//b/").unwrap(),
            vec![OsString::from("a"), OsString::from("b")]
        );
        assert_eq!(entry_components(b"/etc/passwd").unwrap().len(), 2);
        assert!(entry_components(b"../x").is_err());
        assert!(entry_components(b"a/../../x").is_err());
        assert!(entry_components(b"a\0b").is_err());
    }

    #[test]
    fn traversal_entries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let e = apply(&root, Layer::new().file("../escape", b"x", 0o644)).unwrap_err();
        assert!(matches!(e, OciError::UnsafeEntry { .. }), "{e}");
        assert!(e.to_string().contains("../escape"), "{e}");
        assert!(!dir.path().join("escape").exists());
        // A hard link to a file outside the root.
        let e = apply(
            &root,
            Layer::new().link(EntryType::Link, "h", "../../etc/passwd"),
        )
        .unwrap_err();
        assert!(matches!(e, OciError::UnsafeEntry { .. }), "{e}");
    }

    #[test]
    fn symlinked_parents_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&outside).unwrap();
        // An absolute symlink to a host directory, and a relative one climbing out.
        let layer = Layer::new()
            .link(EntryType::Symlink, "abs", outside.to_str().unwrap())
            .link(EntryType::Symlink, "rel", "../../../../outside")
            .file("abs/f", b"1", 0o644)
            .file("rel/g", b"2", 0o644);
        apply(&root, layer).unwrap();
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            0,
            "wrote outside the root"
        );
        let inside = root.join(outside.strip_prefix("/").unwrap()).join("f");
        assert_eq!(fs::read(inside).unwrap(), b"1");
        assert_eq!(fs::read(root.join("outside/g")).unwrap(), b"2");
        // The links themselves are kept as written.
        assert_eq!(
            fs::read_link(root.join("rel")).unwrap(),
            Path::new("../../../../outside")
        );
    }

    #[test]
    fn whiteouts_and_opaque_dirs_hide_lower_layers() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        apply(
            root,
            Layer::new()
                .dir("etc")
                .file("etc/keep", b"k", 0o644)
                .file("etc/gone", b"g", 0o644)
                .dir("opq")
                .file("opq/old", b"o", 0o644)
                .dir("opq/sub")
                .file("opq/sub/old2", b"o", 0o644),
        )
        .unwrap();
        let stats = apply(
            root,
            Layer::new()
                .file("etc/.wh.gone", b"", 0o644)
                .file("opq/new", b"n", 0o644)
                .dir("opq/sub")
                .file("opq/sub/new2", b"n", 0o644)
                .file("opq/.wh..wh..opq", b"", 0o644)
                .file("opq/after", b"a", 0o644),
        )
        .unwrap();
        assert_eq!((stats.whiteouts, stats.opaque_dirs), (1, 1));
        assert!(root.join("etc/keep").exists());
        assert!(!root.join("etc/gone").exists());
        assert!(!root.join("etc/.wh.gone").exists());
        let mut names: Vec<_> = walk(&root.join("opq"));
        names.sort();
        assert_eq!(names, vec!["after", "new", "sub", "sub/new2"]);
    }

    fn walk(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().unwrap().is_dir() {
                out.extend(walk(&e.path()).into_iter().map(|n| format!("{name}/{n}")));
            }
            out.push(name);
        }
        out
    }

    #[test]
    fn files_links_modes_and_replacement() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        symlink("/nowhere", root.join("was-link")).unwrap();
        fs::create_dir(root.join("was-dir")).unwrap();
        fs::write(root.join("was-dir/inner"), b"x").unwrap();
        apply(
            root,
            Layer::new()
                .file("bin/tool", b"#!/bin/sh\n", 0o4755)
                .link(EntryType::Link, "bin/tool2", "bin/tool")
                .link(EntryType::Symlink, "bin/sh", "tool")
                .file("was-link", b"now a file", 0o600)
                .file("was-dir", b"now a file too", 0o644),
        )
        .unwrap();
        let tool = fs::metadata(root.join("bin/tool")).unwrap();
        assert_eq!(tool.permissions().mode() & 0o7777, 0o4755);
        assert_eq!(
            tool.ino(),
            fs::metadata(root.join("bin/tool2")).unwrap().ino()
        );
        assert_eq!(
            fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("tool")
        );
        assert_eq!(fs::read(root.join("was-link")).unwrap(), b"now a file");
        assert!(fs::symlink_metadata(root.join("was-link"))
            .unwrap()
            .is_file());
        assert_eq!(fs::read(root.join("was-dir")).unwrap(), b"now a file too");
        assert_eq!(tool.mtime(), 1_700_000_000);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        for junk in [&b"not a tar at all, just bytes"[..], &[0xffu8; 1024][..]] {
            let _ = apply_layer(junk, dir.path(), "junk", &UnpackOptions::default());
        }
    }
}
