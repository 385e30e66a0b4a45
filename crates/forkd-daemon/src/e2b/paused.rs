//! The records of paused E2B sandboxes on disk (`$FORKD_HOME/e2b-paused/ID.json`,
//! mode 0600: a record holds the sandbox's envd access token). Written
//! atomically (a temporary file renamed into place) before the sandbox is
//! stopped, removed once `connect` has brought it back. The record's form
//! is `forkd_e2b::paused`'s; this module only reads and writes files.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use forkd_e2b::paused::{PausedSandbox, MAX_RECORD};
use forkd_ops::{ErrorKind, OpError};

/// The directory of the records.
#[derive(Debug, Clone)]
pub struct PausedStore {
    dir: PathBuf,
}

fn internal(what: &str, path: &Path, e: impl std::fmt::Display) -> OpError {
    OpError {
        kind: ErrorKind::Internal,
        message: format!("{what} {}: {e}", path.display()),
        hint: None,
    }
}

impl PausedStore {
    pub fn new(dir: PathBuf) -> PausedStore {
        PausedStore { dir }
    }

    /// A record's file; `None` for an id that is no file name (ids are
    /// checked before, this is the second lock).
    fn file(&self, id: &str) -> Option<PathBuf> {
        forkd_ops::validate_id(id).ok()?;
        Some(self.dir.join(format!("{id}.json")))
    }

    /// Writes the record of `r.sandbox_id`, replacing any.
    pub fn save(&self, r: &PausedSandbox) -> Result<(), OpError> {
        let path = self.file(&r.sandbox_id).ok_or_else(|| OpError {
            kind: ErrorKind::BadInput,
            message: format!("{:?} is not a sandbox id", r.sandbox_id),
            hint: None,
        })?;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| internal("creating the directory", &self.dir, e))?;
        let tmp = self.dir.join(format!(".{}.json.tmp", r.sandbox_id));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| internal("writing", &tmp, e))?;
        f.write_all(&r.to_json())
            .and_then(|()| f.sync_all())
            .map_err(|e| internal("writing", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| internal("renaming", &tmp, e))
    }

    /// The record of `id`, if it is paused.
    pub fn load(&self, id: &str) -> Result<Option<PausedSandbox>, OpError> {
        let Some(path) = self.file(id) else {
            return Ok(None);
        };
        let bytes = match read_bounded(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(internal("reading", &path, e)),
        };
        PausedSandbox::from_json(id, &bytes)
            .map(Some)
            .map_err(|e| internal("reading", &path, e))
    }

    /// Every readable record (an unreadable one is skipped: `load` names it).
    pub fn list(&self) -> Vec<PausedSandbox> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let id = name.strip_suffix(".json")?;
                if id.starts_with('.') {
                    return None;
                }
                self.load(id).ok().flatten()
            })
            .collect()
    }

    /// Forgets the record of `id` (resumed or killed).
    pub fn remove(&self, id: &str) -> Result<(), OpError> {
        let Some(path) = self.file(id) else {
            return Ok(());
        };
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(internal("removing", &path, e)),
        }
    }
}

/// A file of at most [`MAX_RECORD`] + 1 bytes (the parser refuses more).
fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_RECORD as u64 + 1)
        .read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> PausedSandbox {
        PausedSandbox {
            sandbox_id: id.into(),
            template_id: "base".into(),
            snapshot: format!("e2b-paused-{id}-1"),
            envd_access_token: Some("fkd_secret".into()),
            started_at: 1,
            paused_at_ms: 2000,
            cpu_count: 1,
            memory_mb: 256,
            metadata: Default::default(),
            env: Vec::new(),
            cwd: None,
            user: None,
        }
    }

    #[test]
    fn records_are_saved_private_listed_and_removed() {
        let dir = std::env::temp_dir().join(format!("forkd-paused-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = PausedStore::new(dir.clone());
        assert!(store.list().is_empty());
        assert_eq!(store.load("sb-a").unwrap(), None);
        store.save(&record("sb-a")).unwrap();
        store.save(&record("sb-b")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("sb-a.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(store.load("sb-a").unwrap(), Some(record("sb-a")));
        let mut ids: Vec<_> = store.list().into_iter().map(|r| r.sandbox_id).collect();
        ids.sort();
        assert_eq!(ids, ["sb-a", "sb-b"]);
        // A record filed under another id is refused, not trusted.
        std::fs::copy(dir.join("sb-a.json"), dir.join("sb-c.json")).unwrap();
        assert!(store.load("sb-c").is_err());
        assert_eq!(store.list().len(), 2);
        assert_eq!(store.load("../etc/passwd").unwrap(), None);
        store.remove("sb-a").unwrap();
        store.remove("sb-a").unwrap();
        assert_eq!(store.load("sb-a").unwrap(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
