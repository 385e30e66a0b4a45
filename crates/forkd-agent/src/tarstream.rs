//! Tar streams of guest files and directories, both ways (`TarRead`,
//! `TarWrite`), for copying trees in and out of a sandbox (`forkd cp`).
//!
//! Memory stays bounded: the archive is produced and consumed as it goes
//! (the `tar` crate over a writer that sends windowed `Data` frames, and a
//! reader that takes them), never held whole. Both run on the request's own
//! thread after [`fsops::enter`], so paths and symlinks resolve inside the
//! guest's root and files belong to the asking user.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use forkd_protocol::{ErrorCode, ErrorReply, Kind, Response, TarSummary, CHUNK};

use crate::fsops::{self, fs_error};
use crate::session::{Recv, Stream};

/// Writes the archive of `path` to the stream.
pub fn read(stream: &Arc<Stream>, root: Option<&Path>, path: &str, user: Option<&str>) -> Response {
    let r = (|| {
        let user = fsops::enter(root, user)?;
        let abs = fsops::absolute(path, &user.home)?;
        let meta = fs::symlink_metadata(&abs).map_err(|e| fs_error(&abs, &e))?;
        let name = top_name(&abs);
        let mut out = FrameWriter {
            stream,
            buf: Vec::with_capacity(CHUNK),
            bytes: 0,
        };
        let mut entries = 0u64;
        {
            let mut b = tar::Builder::new(&mut out);
            b.follow_symlinks(false);
            let mut append = |p: &Path, name: &Path| -> Result<(), ErrorReply> {
                let m = fs::symlink_metadata(p).map_err(|e| fs_error(p, &e))?;
                if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) {
                    // A socket has no content to archive; skip it as tar does.
                    return Ok(());
                }
                b.append_path_with_name(p, name)
                    .map_err(|e| archive_error(stream, p, &e))?;
                entries += 1;
                Ok(())
            };
            append(&abs, &name)?;
            if meta.is_dir() {
                walk(&abs, &name, &mut append)?;
            }
            b.finish().map_err(|e| archive_error(stream, &abs, &e))?;
        }
        out.flush().map_err(|e| archive_error(stream, &abs, &e))?;
        Ok(TarSummary {
            bytes: out.bytes,
            entries,
        })
    })();
    match r {
        Ok(summary) => Response::TarDone(summary),
        Err(e) => Response::Error(e),
    }
}

/// Unpacks the archive the stream carries into the directory `path`.
pub fn write(
    stream: &Arc<Stream>,
    root: Option<&Path>,
    path: &str,
    user: Option<&str>,
) -> Response {
    let mut input = FrameReader {
        stream,
        pending: Vec::new(),
        pos: 0,
        eof: false,
        bytes: 0,
    };
    let r = (|| {
        let user = fsops::enter(root, user)?;
        let dest = fsops::absolute(path, &user.home)?;
        match fs::metadata(&dest) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(ErrorReply::new(
                    ErrorCode::NotADirectory,
                    format!("{} exists and is not a directory", dest.display()),
                ))
            }
            Err(_) => fs::DirBuilder::new()
                .recursive(true)
                .create(&dest)
                .map_err(|e| fs_error(&dest, &e))?,
        }
        let mut archive = tar::Archive::new(&mut input);
        archive.set_preserve_permissions(true);
        archive.set_preserve_mtime(true);
        archive.set_overwrite(true);
        archive.set_unpack_xattrs(false);
        let mut entries = 0u64;
        // Directories last, deepest first, as `tar` does: a read-only
        // directory must not be made so before its contents are written.
        let mut dirs = Vec::new();
        let iter = archive
            .entries()
            .map_err(|e| archive_error(stream, &dest, &e))?;
        for entry in iter {
            let mut entry = entry.map_err(|e| archive_error(stream, &dest, &e))?;
            if entry.header().entry_type() == tar::EntryType::Directory {
                dirs.push(entry);
                continue;
            }
            if entry
                .unpack_in(&dest)
                .map_err(|e| archive_error(stream, &dest, &e))?
            {
                entries += 1;
            }
        }
        dirs.sort_by(|a, b| b.path_bytes().cmp(&a.path_bytes()));
        for mut d in dirs {
            if d.unpack_in(&dest)
                .map_err(|e| archive_error(stream, &dest, &e))?
            {
                entries += 1;
            }
        }
        Ok(entries)
    })();
    // Take the rest of what the host sends (padding after the archive's
    // end, the closing empty frame) so that its writes finish.
    let drained = input.drain();
    match (r, drained) {
        (Ok(entries), Ok(())) => Response::TarDone(TarSummary {
            bytes: input.bytes,
            entries,
        }),
        (Err(e), _) => Response::Error(e),
        (Ok(_), Err(e)) => Response::Error(e),
    }
}

/// The name the top of an archive gets: `path`'s last component (`.` for `/`).
fn top_name(path: &Path) -> PathBuf {
    match path.components().next_back() {
        Some(Component::Normal(n)) => PathBuf::from(n),
        _ => PathBuf::from("."),
    }
}

/// Walks the tree under `dir` (not following symlinks), appending each
/// entry under `prefix`.
fn walk(
    dir: &Path,
    prefix: &Path,
    append: &mut dyn FnMut(&Path, &Path) -> Result<(), ErrorReply>,
) -> Result<(), ErrorReply> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(|e| fs_error(dir, &e))?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    // A stable order: the same tree gives the same archive.
    names.sort();
    for n in names {
        let p = dir.join(&n);
        let name = prefix.join(&n);
        append(&p, &name)?;
        let is_dir = fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir());
        if is_dir {
            walk(&p, &name, append)?;
        }
    }
    Ok(())
}

fn archive_error(stream: &Stream, path: &Path, e: &io::Error) -> ErrorReply {
    if stream.is_cancelled() {
        return ErrorReply::new(ErrorCode::Cancelled, "the tar stream was cancelled");
    }
    match e.raw_os_error() {
        Some(_) => fs_error(path, e),
        None => ErrorReply::new(
            ErrorCode::BadRequest,
            format!("tar stream for {}: {e}", path.display()),
        ),
    }
}

/// Sends what the archive writer produces as `Data` frames of `CHUNK` bytes.
struct FrameWriter<'a> {
    stream: &'a Stream,
    buf: Vec<u8>,
    bytes: u64,
}

impl Write for FrameWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.stream.send_data(Kind::Data, &self.buf).map_err(|_| {
            io::Error::new(io::ErrorKind::BrokenPipe, "the tar stream was cancelled")
        })?;
        self.bytes += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

/// Reads the host's `Data` frames as one byte stream.
struct FrameReader<'a> {
    stream: &'a Stream,
    pending: Vec<u8>,
    pos: usize,
    eof: bool,
    bytes: u64,
}

impl FrameReader<'_> {
    fn drain(&mut self) -> Result<(), ErrorReply> {
        let mut sink = [0u8; 8192];
        loop {
            match self.read(&mut sink) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(ErrorReply::new(ErrorCode::Cancelled, e.to_string())),
            }
        }
    }
}

impl Read for FrameReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.pending.len() {
            if self.eof {
                return Ok(0);
            }
            match self.stream.recv(None) {
                Recv::Data(d) => {
                    self.bytes += d.len() as u64;
                    self.pending = d;
                    self.pos = 0;
                }
                Recv::Eof => self.eof = true,
                Recv::Cancelled | Recv::Idle => {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the tar stream was cancelled",
                    ))
                }
            }
        }
        let n = buf.len().min(self.pending.len() - self.pos);
        buf[..n].copy_from_slice(&self.pending[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_top_entry_is_named_after_the_last_component() {
        assert_eq!(top_name(Path::new("/root/dir")), PathBuf::from("dir"));
        assert_eq!(
            top_name(Path::new("/root/file.txt")),
            PathBuf::from("file.txt")
        );
        assert_eq!(top_name(Path::new("/")), PathBuf::from("."));
    }
}
