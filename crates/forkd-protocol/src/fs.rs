//! Filesystem messages: what the agent reports about a path ([`FileInfo`]),
//! what a directory watch delivers ([`FsEvent`]), what a tar stream moved
//! ([`TarSummary`]), and the permission string as Go's `FileMode.String()`
//! prints it (what E2B's envd reports), computed once here for every front end.

use serde::{Deserialize, Serialize};

/// What a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    /// A device, FIFO or socket.
    Other,
}

/// Facts about one path, from `lstat` (a symlink is described as a link;
/// what it points to is in [`FileInfo::target_kind`]).
///
/// Names and paths that are not UTF-8 are reported lossily (U+FFFD), so such
/// a name cannot be passed back to the agent verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// The last path component (`/` for the root).
    pub name: String,
    /// The absolute path in the guest.
    pub path: String,
    pub kind: FileKind,
    /// For a symlink: the kind of its final target, `None` when it dangles.
    #[serde(default)]
    pub target_kind: Option<FileKind>,
    /// For a symlink: its content (the path it points to, as written).
    #[serde(default)]
    pub symlink_target: Option<String>,
    pub size: u64,
    /// Permission bits with setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    /// `mode` and the kind as Go's `FileMode.String()` prints them
    /// (`-rw-r--r--`, `drwxr-xr-x`, `Lrwxrwxrwx`, `dtrwxrwxrwx`).
    pub permissions: String,
    pub uid: u32,
    pub gid: u32,
    /// The owner's name in the guest's `/etc/passwd`, else the uid in decimal.
    pub owner: String,
    /// The group's name in the guest's `/etc/group`, else the gid in decimal.
    pub group: String,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

/// What happened to a watched path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsEventKind {
    /// Created, or moved into the watched tree.
    Create,
    /// Written to.
    Write,
    /// Deleted.
    Remove,
    /// Moved away (reported under its old name; the new name, when inside
    /// the watched tree, gets a `Create`).
    Rename,
    /// Metadata changed (mode, owner, times).
    Chmod,
}

/// One change under a watched directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsEvent {
    /// Path relative to the watched directory (`a.txt`, `sub/b.txt`).
    pub name: String,
    pub kind: FsEventKind,
}

/// What a tar stream carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TarSummary {
    /// Bytes of the tar stream itself.
    pub bytes: u64,
    /// Archive entries (files, directories, links).
    pub entries: u64,
}

/// Go's `FileMode.String()` for a file of `kind` whose `st_mode` is `mode`
/// (type bits are taken from `kind`, the rest from `mode`): the type and
/// special-bit letters in Go's order (`d`, `L`, `D`, `p`, `S`, `u`, `g`,
/// `c`, `t`), `-` when there are none, then `rwxrwxrwx`.
pub fn permissions_string(kind: FileKind, mode: u32) -> String {
    const S_IFMT: u32 = 0o170000;
    let fmt = mode & S_IFMT;
    let mut s = String::with_capacity(12);
    match kind {
        FileKind::Dir => s.push('d'),
        FileKind::Symlink => s.push('L'),
        FileKind::File => {}
        FileKind::Other => match fmt {
            // Block and character devices (`c` follows below).
            0o060000 | 0o020000 => s.push('D'),
            0o010000 => s.push('p'),
            0o140000 => s.push('S'),
            _ => s.push('?'),
        },
    }
    if mode & 0o4000 != 0 {
        s.push('u');
    }
    if mode & 0o2000 != 0 {
        s.push('g');
    }
    if kind == FileKind::Other && fmt == 0o020000 {
        s.push('c');
    }
    if mode & 0o1000 != 0 {
        s.push('t');
    }
    if s.is_empty() {
        s.push('-');
    }
    for (bit, c) in [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o040, 'r'),
        (0o020, 'w'),
        (0o010, 'x'),
        (0o004, 'r'),
        (0o002, 'w'),
        (0o001, 'x'),
    ] {
        s.push(if mode & bit != 0 { c } else { '-' });
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_match_go_file_mode_string() {
        assert_eq!(permissions_string(FileKind::File, 0o100644), "-rw-r--r--");
        assert_eq!(permissions_string(FileKind::Dir, 0o040755), "drwxr-xr-x");
        assert_eq!(
            permissions_string(FileKind::Symlink, 0o120777),
            "Lrwxrwxrwx"
        );
        assert_eq!(permissions_string(FileKind::Dir, 0o041777), "dtrwxrwxrwx");
        assert_eq!(permissions_string(FileKind::File, 0o104755), "urwxr-xr-x");
        assert_eq!(permissions_string(FileKind::File, 0o102755), "grwxr-xr-x");
        assert_eq!(permissions_string(FileKind::Other, 0o020666), "Dcrw-rw-rw-");
        assert_eq!(permissions_string(FileKind::Other, 0o060660), "Drw-rw----");
        assert_eq!(permissions_string(FileKind::Other, 0o010644), "prw-r--r--");
        assert_eq!(permissions_string(FileKind::Other, 0o140755), "Srwxr-xr-x");
        assert_eq!(permissions_string(FileKind::File, 0), "----------");
    }
}
