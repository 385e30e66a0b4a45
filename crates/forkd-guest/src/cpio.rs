//! A deterministic cpio "newc" writer, the format the Linux kernel unpacks as
//! an initramfs. Pure over `Write`: every entry gets mtime 0, uid/gid 0 and an
//! inode number from a counter, so equal inputs give equal bytes. Parent dirs
//! are emitted automatically; duplicate paths are refused.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const HEADER_LEN: u64 = 110;
const TRAILER: &str = "TRAILER!!!";

/// Writes a newc archive entry by entry; call [`CpioWriter::finish`] to add
/// the trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_inode: u32,
    paths: BTreeSet<String>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Archive names are relative (`bin/sh`), without `.`/`..` components.
fn normalize(path: &str) -> io::Result<String> {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.is_empty() || parts.contains(&"..") || path.contains('\0') {
        return Err(invalid(format!(
            "cpio entry path `{path}` is not a plain relative path"
        )));
    }
    Ok(parts.join("/"))
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            written: 0,
            next_inode: 1,
            paths: BTreeSet::new(),
        }
    }

    /// A directory with permission bits `perm` (e.g. 0o755, 0o1777).
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        let path = self.claim(path)?;
        self.header(&path, S_IFDIR | (perm & 0o7777), 2, 0)
    }

    /// A regular file holding `data`.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let path = self.claim(path)?;
        self.header(&path, S_IFREG | (perm & 0o7777), 1, data.len() as u64)?;
        self.write(data)?;
        self.pad()
    }

    /// A regular file whose content is copied from `source` on the host.
    pub fn file_from_path(&mut self, path: &str, perm: u32, source: &Path) -> io::Result<()> {
        let file = File::open(source)?;
        let len = file.metadata()?.len();
        let path = self.claim(path)?;
        self.header(&path, S_IFREG | (perm & 0o7777), 1, len)?;
        let copied = io::copy(&mut file.take(len), &mut self.out)?;
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while being archived", source.display()),
            ));
        }
        self.written += copied;
        self.pad()
    }

    /// A symbolic link pointing at `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        if target.is_empty() || target.contains('\0') {
            return Err(invalid(format!(
                "symlink target `{target}` is empty or has a NUL"
            )));
        }
        let path = self.claim(path)?;
        self.header(&path, S_IFLNK | 0o777, 1, target.len() as u64)?;
        self.write(target.as_bytes())?;
        self.pad()
    }

    /// A character device node (e.g. `dev/console`, 5:1), so PID 1 has a
    /// console before it mounts devtmpfs.
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        let path = self.claim(path)?;
        self.header_with_rdev(&path, S_IFCHR | (perm & 0o7777), 1, 0, (major, minor))
    }

    /// Writes the trailer, pads to 512 bytes like GNU cpio, and flushes.
    pub fn finish(mut self) -> io::Result<W> {
        self.next_inode = 0;
        self.header_with_rdev(TRAILER, 0, 1, 0, (0, 0))?;
        let tail = (512 - self.written % 512) % 512;
        self.write(&vec![0u8; tail as usize])?;
        self.out.flush()?;
        Ok(self.out)
    }

    /// Validates `path`, emits missing parent dirs, and records it.
    fn claim(&mut self, path: &str) -> io::Result<String> {
        let path = normalize(path)?;
        if path == TRAILER || self.paths.contains(&path) {
            return Err(invalid(format!("cpio entry `{path}` is added twice")));
        }
        let mut parent = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for part in &components[..components.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            if self.paths.insert(parent.clone()) {
                self.header(&parent.clone(), S_IFDIR | 0o755, 2, 0)?;
            }
        }
        self.paths.insert(path.clone());
        Ok(path)
    }

    fn header(&mut self, name: &str, mode: u32, nlink: u32, size: u64) -> io::Result<()> {
        self.header_with_rdev(name, mode, nlink, size, (0, 0))
    }

    fn header_with_rdev(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        size: u64,
        rdev: (u32, u32),
    ) -> io::Result<()> {
        let size = u32::try_from(size).map_err(|_| {
            invalid(format!(
                "cpio entry `{name}` is larger than newc's 4 GiB limit"
            ))
        })?;
        let name_len = u32::try_from(name.len() + 1)
            .map_err(|_| invalid(format!("cpio entry name `{name}` is too long")))?;
        let inode = self.next_inode;
        self.next_inode = self.next_inode.wrapping_add(1);
        let fields = [
            inode, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name_len, 0,
        ];
        let mut header = String::with_capacity(HEADER_LEN as usize);
        header.push_str("070701");
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - self.written % 4) % 4;
        self.write(&[0u8; 3][..pad as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[derive(Debug, PartialEq)]
    struct Entry {
        name: String,
        mode: u32,
        inode: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    /// An independent newc reader for the round trip.
    fn parse(mut bytes: &[u8]) -> Vec<Entry> {
        let total = bytes.len();
        let mut entries = Vec::new();
        loop {
            let offset = total - bytes.len();
            assert_eq!(offset % 4, 0);
            assert_eq!(&bytes[..6], b"070701");
            let field = |i: usize| {
                let s = std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let (inode, mode, size, rdev, namesize) = (
                field(0),
                field(1),
                field(6) as usize,
                (field(9), field(10)),
                field(11) as usize,
            );
            let name = std::str::from_utf8(&bytes[110..110 + namesize - 1])
                .unwrap()
                .to_owned();
            assert_eq!(bytes[110 + namesize - 1], 0);
            let data_start = (110 + namesize).next_multiple_of(4);
            let data = bytes[data_start..data_start + size].to_vec();
            bytes = &bytes[(data_start + size).next_multiple_of(4)..];
            if name == TRAILER {
                assert_eq!(total % 512, 0);
                assert!(bytes.iter().all(|&b| b == 0));
                return entries;
            }
            entries.push(Entry {
                name,
                mode,
                inode,
                rdev,
                data,
            });
        }
    }

    fn sample() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"from disk!").unwrap();
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/tmp", 0o1777).unwrap();
        w.file("/init", 0o755, b"#!agent").unwrap();
        w.file("bin/busybox", 0o755, b"busybox-bytes").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.file_from_path("etc/forkd/data", 0o644, &src).unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        w.file("empty", 0o644, b"").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn round_trips_through_own_parser() {
        let entries = parse(&sample());
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "tmp",
                "init",
                "bin",
                "bin/busybox",
                "bin/sh",
                "etc",
                "etc/forkd",
                "etc/forkd/data",
                "dev",
                "dev/console",
                "empty"
            ]
        );
        let by_name = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        assert_eq!(by_name("tmp").mode, S_IFDIR | 0o1777);
        assert_eq!(by_name("init").mode, S_IFREG | 0o755);
        assert_eq!(by_name("init").data, b"#!agent");
        assert_eq!(by_name("bin/sh").mode, S_IFLNK | 0o777);
        assert_eq!(by_name("bin/sh").data, b"busybox");
        assert_eq!(by_name("etc/forkd/data").data, b"from disk!");
        assert_eq!(by_name("dev/console").rdev, (5, 1));
        let inodes: Vec<_> = entries.iter().map(|e| e.inode).collect();
        assert_eq!(inodes, (1..=entries.len() as u32).collect::<Vec<_>>());
    }

    #[test]
    fn output_is_deterministic() {
        assert_eq!(sample(), sample());
    }

    #[test]
    fn refuses_duplicates_and_escapes() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("a", 0o644, b"").unwrap();
        assert!(w.file("/a", 0o644, b"").is_err());
        assert!(w.dir("../x", 0o755).is_err());
        assert!(w.dir("", 0o755).is_err());
        assert!(w.symlink("b", "").is_err());
    }

    #[test]
    fn gnu_cpio_lists_and_extracts_the_archive() {
        if Command::new("cpio").arg("--version").output().is_err() {
            return; // cpio(1) not installed; the own-parser test still runs
        }
        let archive = sample();
        let run = |args: &[&str], cwd: &Path| {
            let mut child = Command::new("cpio")
                .args(args)
                .current_dir(cwd)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(&archive).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let listing = run(&["-t", "--quiet"], dir.path());
        assert!(listing.lines().any(|l| l == "etc/forkd/data"), "{listing}");
        assert!(listing.lines().any(|l| l == "bin/sh"), "{listing}");

        run(
            &[
                "-i",
                "-d",
                "--quiet",
                "--no-absolute-filenames",
                "--nonmatching",
                "dev/console",
            ],
            dir.path(),
        );
        let root = dir.path();
        assert_eq!(
            std::fs::read(root.join("etc/forkd/data")).unwrap(),
            b"from disk!"
        );
        assert_eq!(
            std::fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root.join("init"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }
}
