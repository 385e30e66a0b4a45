//! The state database: one SQLite file in WAL mode, opened concurrently by the
//! CLI and the daemon (each with its own [`Db`] handle). It records sandboxes,
//! snapshots and a cache of verified file hashes; it never touches those files.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forkd_ops::{SandboxState, SnapshotStatus};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row, TransactionBehavior};
use serde::Serialize;

use crate::error::{io_err, Result, StoreError};

/// Schema version kept in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 1;

/// How long a writer waits for another process holding the write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS sandboxes (
    id         TEXT PRIMARY KEY,
    state      TEXT NOT NULL,
    pid        INTEGER NOT NULL,
    pid_start  INTEGER NOT NULL,
    run_dir    TEXT NOT NULL,
    snapshot   TEXT NULL,
    config     TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sandboxes_by_snapshot ON sandboxes(snapshot);
CREATE TABLE IF NOT EXISTS snapshots (
    tag        TEXT PRIMARY KEY,
    status     TEXT NOT NULL,
    dir        TEXT NOT NULL,
    parent     TEXT NULL,
    source     TEXT NULL,
    created_at INTEGER NOT NULL,
    pause_ms   REAL NULL,
    error      TEXT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_by_parent ON snapshots(parent);
CREATE TABLE IF NOT EXISTS verified (
    path     TEXT PRIMARY KEY,
    size     INTEGER,
    mtime_ns INTEGER,
    ctime_ns INTEGER,
    ino      INTEGER,
    blake3   TEXT
);
";

/// One row of `sandboxes`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SandboxRow {
    pub id: String,
    pub state: SandboxState,
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat`, so a reused pid is not mistaken for ours.
    pub pid_start: u64,
    pub run_dir: PathBuf,
    /// Tag of the snapshot the sandbox was spawned from.
    pub snapshot: Option<String>,
    /// Opaque configuration owned by the caller.
    pub config: serde_json::Value,
    /// Unix seconds.
    pub created_at: u64,
}

/// One row of `snapshots`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SnapshotRow {
    pub tag: String,
    pub status: SnapshotStatus,
    pub dir: PathBuf,
    /// Parent snapshot tag (diff layers).
    pub parent: Option<String>,
    /// Id of the sandbox it was taken from.
    pub source: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    pub pause_ms: Option<f64>,
    /// Why writing failed, for `status == failed`.
    pub error: Option<String>,
}

/// What identifies one version of a file on disk for the verified-hash cache.
/// `ctime` is included because it cannot be set back by the user, so rewriting
/// a file in place (even with its old mtime restored) invalidates the entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileStamp {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
}

impl FileStamp {
    pub(crate) fn of(meta: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
            ino: meta.ino(),
        }
    }
}

/// A handle on the state database. Cheap to open; open one per thread or
/// process (a handle is `Send` but not `Sync`).
pub struct Db {
    conn: Connection,
    path: PathBuf,
}

impl fmt::Debug for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Db").field("path", &self.path).finish()
    }
}

impl Db {
    /// Opens (creating it and its parent directory if needed) the database at
    /// `path`, switches it to WAL and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Db> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
        }
        let conn = Connection::open(path).map_err(|source| StoreError::Database {
            path: path.to_owned(),
            source,
        })?;
        let mut db = Db {
            conn,
            path: path.to_owned(),
        };
        db.conn.busy_timeout(BUSY_TIMEOUT).map_err(db.sql())?;
        // Two connections switching a fresh file to WAL (or migrating it) at
        // the same time can deadlock on the lock upgrade; SQLite then answers
        // BUSY at once instead of calling the busy handler, so retry here.
        let deadline = Instant::now() + BUSY_TIMEOUT;
        loop {
            match db.set_up() {
                Err(err) if is_busy(&err) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                result => return result.map(|()| db),
            }
        }
    }

    fn set_up(&mut self) -> Result<()> {
        self.conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))
            .map_err(self.sql())?;
        self.migrate()
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Schema version stored in the file.
    pub fn schema_version(&self) -> Result<i64> {
        self.conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(self.sql())
    }

    fn migrate(&mut self) -> Result<()> {
        if self.schema_version()? == SCHEMA_VERSION {
            return Ok(());
        }
        let sql = sql_err(&self.path);
        // IMMEDIATE takes the write lock up front, so two processes opening a
        // fresh database migrate one after the other, never interleaved.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&sql)?;
        let found: i64 = tx
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(&sql)?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                path: self.path.clone(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        if found < 1 {
            tx.execute_batch(SCHEMA_V1).map_err(&sql)?;
        }
        // Later versions: `if found < 2 { ... }`, each step idempotent.
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(&sql)?;
        tx.commit().map_err(&sql)
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Database {
            path: self.path.clone(),
            source,
        }
    }

    /// Runs `f` inside one IMMEDIATE transaction (write lock taken up front, so
    /// it cannot fail half-way with SQLITE_BUSY); commits if `f` returns `Ok`.
    pub fn transaction<T>(&mut self, f: impl FnOnce(&Db) -> Result<T>) -> Result<T> {
        let sql = sql_err(&self.path);
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(&sql)?;
        match f(self) {
            Ok(value) => {
                self.conn.execute_batch("COMMIT").map_err(&sql)?;
                Ok(value)
            }
            Err(err) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(err)
            }
        }
    }

    // ---- sandboxes -------------------------------------------------------

    pub fn insert_sandbox(&self, row: &SandboxRow) -> Result<()> {
        let run_dir = utf8(&row.run_dir)?;
        let config = row.config.to_string();
        let result = self.conn.execute(
            "INSERT INTO sandboxes (id, state, pid, pid_start, run_dir, snapshot, config, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                row.id,
                row.state.as_str(),
                row.pid,
                to_i64(row.pid_start),
                run_dir,
                row.snapshot,
                config,
                to_i64(row.created_at)
            ],
        );
        match result {
            Err(e) if is_constraint(&e) => Err(StoreError::SandboxExists { id: row.id.clone() }),
            other => other.map(drop).map_err(self.sql()),
        }
    }

    pub fn update_sandbox_state(&self, id: &str, state: SandboxState) -> Result<()> {
        let changed = self
            .conn
            .execute(
                "UPDATE sandboxes SET state = ?2 WHERE id = ?1",
                params![id, state.as_str()],
            )
            .map_err(self.sql())?;
        if changed == 0 {
            return Err(StoreError::NoSandbox { id: id.to_owned() });
        }
        Ok(())
    }

    /// Records the QEMU of a sandbox whose row was written before it
    /// started: its pid and start time, as soon as they are known.
    pub fn set_sandbox_pid(&self, id: &str, pid: u32, pid_start: u64) -> Result<()> {
        let changed = self
            .conn
            .execute(
                "UPDATE sandboxes SET pid = ?2, pid_start = ?3 WHERE id = ?1",
                params![id, pid, to_i64(pid_start)],
            )
            .map_err(self.sql())?;
        if changed == 0 {
            return Err(StoreError::NoSandbox { id: id.to_owned() });
        }
        Ok(())
    }

    /// Takes one pooled sandbox of snapshot `tag` for a spawn: marks it
    /// running and returns it, or `None` when the pool is empty. Atomic
    /// across processes (a single conditional UPDATE), so two spawns never
    /// get the same member.
    pub fn claim_pooled(&self, tag: &str) -> Result<Option<SandboxRow>> {
        loop {
            let candidate: Option<String> = self
                .conn
                .query_row(
                    "SELECT id FROM sandboxes WHERE snapshot = ?1 AND state = 'pooled' \
                     ORDER BY created_at, id LIMIT 1",
                    [tag],
                    |r| r.get(0),
                )
                .optional()
                .map_err(self.sql())?;
            let Some(id) = candidate else {
                return Ok(None);
            };
            let won = self
                .conn
                .execute(
                    "UPDATE sandboxes SET state = 'running' WHERE id = ?1 AND state = 'pooled'",
                    [&id],
                )
                .map_err(self.sql())?;
            if won == 1 {
                return self.get_sandbox(&id);
            }
            // Another process claimed it between our SELECT and UPDATE.
        }
    }

    /// How many sandboxes of snapshot `tag` are in `state`.
    pub fn count_from_snapshot(&self, tag: &str, state: SandboxState) -> Result<usize> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FROM sandboxes WHERE snapshot = ?1 AND state = ?2",
                params![tag, state.as_str()],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as usize)
            .map_err(self.sql())
    }

    pub fn get_sandbox(&self, id: &str) -> Result<Option<SandboxRow>> {
        self.conn
            .query_row(
                &format!("{SANDBOX_SELECT} WHERE id = ?1"),
                [id],
                sandbox_from_row,
            )
            .optional()
            .map_err(self.sql())
    }

    /// All sandboxes, oldest first (ties broken by id).
    pub fn list_sandboxes(&self) -> Result<Vec<SandboxRow>> {
        self.query_sandboxes(&format!("{SANDBOX_SELECT} ORDER BY created_at, id"), [])
    }

    /// Deletes a sandbox row; returns whether it existed.
    pub fn delete_sandbox(&self, id: &str) -> Result<bool> {
        let changed = self
            .conn
            .execute("DELETE FROM sandboxes WHERE id = ?1", [id])
            .map_err(self.sql())?;
        Ok(changed > 0)
    }

    /// Sandboxes (in any state) spawned from snapshot `tag`.
    pub fn sandboxes_from_snapshot(&self, tag: &str) -> Result<Vec<SandboxRow>> {
        self.query_sandboxes(
            &format!("{SANDBOX_SELECT} WHERE snapshot = ?1 ORDER BY created_at, id"),
            [tag],
        )
    }

    fn query_sandboxes(&self, sql: &str, params: impl rusqlite::Params) -> Result<Vec<SandboxRow>> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(self.sql())?;
        let rows = stmt
            .query_map(params, sandbox_from_row)
            .map_err(self.sql())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.sql())?;
        Ok(rows)
    }

    // ---- snapshots -------------------------------------------------------

    /// Records a new snapshot; fails with [`StoreError::SnapshotExists`] if the
    /// tag is taken.
    pub fn insert_snapshot(&self, row: &SnapshotRow) -> Result<()> {
        let dir = utf8(&row.dir)?;
        let result = self.conn.execute(
            "INSERT INTO snapshots (tag, status, dir, parent, source, created_at, pause_ms, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                row.tag,
                row.status.as_str(),
                dir,
                row.parent,
                row.source,
                to_i64(row.created_at),
                row.pause_ms,
                row.error
            ],
        );
        match result {
            Err(e) if is_constraint(&e) => Err(StoreError::SnapshotExists {
                tag: row.tag.clone(),
            }),
            other => other.map(drop).map_err(self.sql()),
        }
    }

    /// Claims tag `row.tag` for a snapshot about to be written: inserts
    /// `row`, replacing a `failed` row of the same tag (returned, so that
    /// the caller can remove what it left behind). Any other row keeps the
    /// tag taken: [`StoreError::SnapshotExists`]. One transaction, so two
    /// processes never both claim a tag.
    pub fn claim_snapshot(&mut self, row: &SnapshotRow) -> Result<Option<SnapshotRow>> {
        self.transaction(|db| {
            let old = db.get_snapshot(&row.tag)?;
            match &old {
                Some(o) if o.status == SnapshotStatus::Failed => {
                    db.delete_snapshot_row(&row.tag)?;
                }
                Some(_) => {
                    return Err(StoreError::SnapshotExists {
                        tag: row.tag.clone(),
                    })
                }
                None => {}
            }
            db.insert_snapshot(row)?;
            Ok(old)
        })
    }

    /// Sets the status of snapshot `tag` only if it is `from` now; returns
    /// whether it changed. Whoever finishes a snapshot first wins: a writer
    /// that completes and a watcher that saw it die never both record.
    pub fn transition_snapshot(
        &self,
        tag: &str,
        from: SnapshotStatus,
        to: SnapshotStatus,
        error: Option<&str>,
    ) -> Result<bool> {
        let changed = self
            .conn
            .execute(
                "UPDATE snapshots SET status = ?3, error = ?4 WHERE tag = ?1 AND status = ?2",
                params![tag, from.as_str(), to.as_str(), error],
            )
            .map_err(self.sql())?;
        Ok(changed > 0)
    }

    pub fn set_snapshot_status(
        &self,
        tag: &str,
        status: SnapshotStatus,
        error: Option<&str>,
    ) -> Result<()> {
        let changed = self
            .conn
            .execute(
                "UPDATE snapshots SET status = ?2, error = ?3 WHERE tag = ?1",
                params![tag, status.as_str(), error],
            )
            .map_err(self.sql())?;
        self.expect_snapshot_changed(tag, changed)
    }

    /// Records the snapshot `tag` is layered on (known once its files are).
    pub fn set_snapshot_parent(&self, tag: &str, parent: Option<&str>) -> Result<()> {
        let changed = self
            .conn
            .execute(
                "UPDATE snapshots SET parent = ?2 WHERE tag = ?1",
                params![tag, parent],
            )
            .map_err(self.sql())?;
        self.expect_snapshot_changed(tag, changed)
    }

    pub fn set_snapshot_pause(&self, tag: &str, pause_ms: f64) -> Result<()> {
        let changed = self
            .conn
            .execute(
                "UPDATE snapshots SET pause_ms = ?2 WHERE tag = ?1",
                params![tag, pause_ms],
            )
            .map_err(self.sql())?;
        self.expect_snapshot_changed(tag, changed)
    }

    fn expect_snapshot_changed(&self, tag: &str, changed: usize) -> Result<()> {
        if changed == 0 {
            return Err(StoreError::NoSnapshot {
                tag: tag.to_owned(),
            });
        }
        Ok(())
    }

    pub fn get_snapshot(&self, tag: &str) -> Result<Option<SnapshotRow>> {
        self.conn
            .query_row(
                &format!("{SNAPSHOT_SELECT} WHERE tag = ?1"),
                [tag],
                snapshot_from_row,
            )
            .optional()
            .map_err(self.sql())
    }

    /// The snapshot `tag` if it is ready to use; otherwise an error saying why
    /// not (unknown, still being written, failed).
    pub fn ready_snapshot(&self, tag: &str) -> Result<SnapshotRow> {
        let row = self
            .get_snapshot(tag)?
            .ok_or_else(|| StoreError::NoSnapshot {
                tag: tag.to_owned(),
            })?;
        match row.status {
            SnapshotStatus::Ready => Ok(row),
            SnapshotStatus::Writing => Err(StoreError::SnapshotWriting {
                tag: tag.to_owned(),
            }),
            SnapshotStatus::Failed | SnapshotStatus::Broken => Err(StoreError::SnapshotFailed {
                tag: tag.to_owned(),
                error: row.error,
            }),
        }
    }

    /// All snapshots, oldest first (ties broken by tag).
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotRow>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("{SNAPSHOT_SELECT} ORDER BY created_at, tag"))
            .map_err(self.sql())?;
        let rows = stmt
            .query_map([], snapshot_from_row)
            .map_err(self.sql())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.sql())?;
        Ok(rows)
    }

    /// Deletes a snapshot row; returns whether it existed.
    pub fn delete_snapshot_row(&self, tag: &str) -> Result<bool> {
        let changed = self
            .conn
            .execute("DELETE FROM snapshots WHERE tag = ?1", [tag])
            .map_err(self.sql())?;
        Ok(changed > 0)
    }

    /// Snapshots taken from sandbox `id`, oldest first.
    pub fn snapshots_from_source(&self, id: &str) -> Result<Vec<SnapshotRow>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "{SNAPSHOT_SELECT} WHERE source = ?1 ORDER BY created_at, tag"
            ))
            .map_err(self.sql())?;
        let rows = stmt
            .query_map([id], snapshot_from_row)
            .map_err(self.sql())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.sql())?;
        Ok(rows)
    }

    /// Tags of the snapshots whose parent is `tag`, sorted.
    pub fn children_of(&self, tag: &str) -> Result<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT tag FROM snapshots WHERE parent = ?1 ORDER BY tag")
            .map_err(self.sql())?;
        let rows = stmt
            .query_map([tag], |row| row.get(0))
            .map_err(self.sql())?
            .collect::<rusqlite::Result<Vec<String>>>()
            .map_err(self.sql())?;
        Ok(rows)
    }

    // ---- verified-hash cache --------------------------------------------

    /// The cached hash of `path` if it was verified in exactly this version.
    pub(crate) fn verified_hash(&self, path: &str, stamp: &FileStamp) -> Result<Option<String>> {
        self.conn
            .query_row(
                "SELECT blake3 FROM verified
                 WHERE path = ?1 AND size = ?2 AND mtime_ns = ?3 AND ctime_ns = ?4 AND ino = ?5",
                params![
                    path,
                    to_i64(stamp.size),
                    stamp.mtime_ns,
                    stamp.ctime_ns,
                    to_i64(stamp.ino)
                ],
                |row| row.get(0),
            )
            .optional()
            .map_err(self.sql())
    }

    pub(crate) fn record_verified(
        &self,
        path: &str,
        stamp: &FileStamp,
        blake3: &str,
    ) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO verified (path, size, mtime_ns, ctime_ns, ino, blake3)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    path,
                    to_i64(stamp.size),
                    stamp.mtime_ns,
                    stamp.ctime_ns,
                    to_i64(stamp.ino),
                    blake3
                ],
            )
            .map(drop)
            .map_err(self.sql())
    }

    /// Drops cached verifications of files under `dir` (e.g. after `rmi`).
    /// Returns how many entries went.
    pub fn forget_verified_under(&self, dir: &Path) -> Result<usize> {
        let mut prefix = utf8(dir)?.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        self.conn
            .execute(
                "DELETE FROM verified WHERE substr(path, 1, length(?1)) = ?1",
                [prefix],
            )
            .map_err(self.sql())
    }
}

const SANDBOX_SELECT: &str =
    "SELECT id, state, pid, pid_start, run_dir, snapshot, config, created_at FROM sandboxes";
const SNAPSHOT_SELECT: &str =
    "SELECT tag, status, dir, parent, source, created_at, pause_ms, error FROM snapshots";

fn sandbox_from_row(row: &Row<'_>) -> rusqlite::Result<SandboxRow> {
    let config: String = row.get(6)?;
    let config = serde_json::from_str(&config).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(6, rusqlite::types::Type::Text, Box::new(e))
    })?;
    Ok(SandboxRow {
        id: row.get(0)?,
        state: parsed(row, 1)?,
        pid: row.get(2)?,
        pid_start: from_i64(row.get(3)?),
        run_dir: PathBuf::from(row.get::<_, String>(4)?),
        snapshot: row.get(5)?,
        config,
        created_at: from_i64(row.get(7)?),
    })
}

fn snapshot_from_row(row: &Row<'_>) -> rusqlite::Result<SnapshotRow> {
    Ok(SnapshotRow {
        tag: row.get(0)?,
        status: parsed(row, 1)?,
        dir: PathBuf::from(row.get::<_, String>(2)?),
        parent: row.get(3)?,
        source: row.get(4)?,
        created_at: from_i64(row.get(5)?),
        pause_ms: row.get(6)?,
        error: row.get(7)?,
    })
}

/// A state column, parsed by the one spelling the seam defines.
fn parsed<T>(row: &Row<'_>, i: usize) -> rusqlite::Result<T>
where
    T: std::str::FromStr<Err = forkd_ops::UnknownState>,
{
    let text: String = row.get(i)?;
    text.parse().map_err(|e: forkd_ops::UnknownState| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Database {
        path: path.to_owned(),
        source,
    }
}

fn is_busy(err: &StoreError) -> bool {
    matches!(
        err,
        StoreError::Database {
            source: rusqlite::Error::SqliteFailure(e, _),
            ..
        } if matches!(e.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

fn is_constraint(err: &rusqlite::Error) -> bool {
    matches!(err, rusqlite::Error::SqliteFailure(e, _) if e.code == ErrorCode::ConstraintViolation)
}

fn utf8(path: &Path) -> Result<&str> {
    path.to_str().ok_or_else(|| StoreError::NonUtf8Path {
        path: path.to_owned(),
    })
}

/// SQLite integers are signed; u64 values we store (times, inodes, sizes) are
/// kept bit-for-bit so they round-trip exactly.
fn to_i64(value: u64) -> i64 {
    value as i64
}

fn from_i64(value: i64) -> u64 {
    value as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sandbox(id: &str, snapshot: Option<&str>, created_at: u64) -> SandboxRow {
        SandboxRow {
            id: id.to_owned(),
            state: SandboxState::Running,
            pid: 4242,
            pid_start: 987_654_321,
            run_dir: PathBuf::from(format!("/run/forkd/{id}")),
            snapshot: snapshot.map(str::to_owned),
            config: json!({"mem_mib": 512, "cpus": 2, "net": null}),
            created_at,
        }
    }

    fn snapshot(tag: &str, parent: Option<&str>, created_at: u64) -> SnapshotRow {
        SnapshotRow {
            tag: tag.to_owned(),
            status: SnapshotStatus::Writing,
            dir: PathBuf::from(format!("/var/forkd/snapshots/{tag}")),
            parent: parent.map(str::to_owned),
            source: Some("sb1".to_owned()),
            created_at,
            pause_ms: None,
            error: None,
        }
    }

    fn open_temp() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("state/forkd.db")).unwrap();
        (dir, db)
    }

    #[test]
    fn open_creates_parent_dir_and_uses_wal() {
        let (dir, db) = open_temp();
        assert!(dir.path().join("state/forkd.db").exists());
        let mode: String = db
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let timeout: i64 = db
            .conn
            .pragma_query_value(None, "busy_timeout", |r| r.get(0))
            .unwrap();
        assert_eq!(timeout, 10_000);
    }

    #[test]
    fn pooled_members_are_claimed_once_each_across_handles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("forkd.db");
        let db = Db::open(&path).unwrap();
        for i in 0..40 {
            let mut row = sandbox(&format!("p{i:02}"), Some("py"), i);
            row.state = SandboxState::Pooled;
            db.insert_sandbox(&row).unwrap();
        }
        db.insert_sandbox(&sandbox("busy", Some("py"), 99)).unwrap();
        assert_eq!(
            db.count_from_snapshot("py", SandboxState::Pooled).unwrap(),
            40
        );
        let claimers: Vec<_> = (0..2)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let db = Db::open(&path).unwrap();
                    let mut got = Vec::new();
                    while let Some(row) = db.claim_pooled("py").unwrap() {
                        assert_eq!(row.state, SandboxState::Running);
                        got.push(row.id);
                    }
                    got
                })
            })
            .collect();
        let mut all: Vec<String> = claimers
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        all.sort();
        let before = all.len();
        all.dedup();
        assert_eq!(
            (before, all.len()),
            (40, 40),
            "a member was claimed twice or lost"
        );
        assert!(db.claim_pooled("py").unwrap().is_none());
        assert!(db.claim_pooled("other").unwrap().is_none());
        assert_eq!(
            db.count_from_snapshot("py", SandboxState::Running).unwrap(),
            41
        );
    }

    #[test]
    fn sandbox_crud_round_trip() {
        let (_dir, db) = open_temp();
        let a = sandbox("a", Some("py"), 20);
        let mut b = sandbox("b", None, 10);
        b.pid_start = u64::MAX;
        db.insert_sandbox(&a).unwrap();
        db.insert_sandbox(&b).unwrap();
        assert_eq!(db.get_sandbox("a").unwrap(), Some(a.clone()));
        assert_eq!(db.get_sandbox("b").unwrap(), Some(b.clone()));
        assert_eq!(db.get_sandbox("zz").unwrap(), None);
        assert_eq!(db.list_sandboxes().unwrap(), vec![b.clone(), a.clone()]);

        db.update_sandbox_state("a", SandboxState::Pooled).unwrap();
        assert_eq!(
            db.get_sandbox("a").unwrap().unwrap().state,
            SandboxState::Pooled
        );
        let err = db
            .update_sandbox_state("zz", SandboxState::Dead)
            .unwrap_err();
        assert!(matches!(err, StoreError::NoSandbox { .. }), "{err}");
        assert!(err.to_string().contains("`zz`"));

        let err = db.insert_sandbox(&a).unwrap_err();
        assert!(matches!(err, StoreError::SandboxExists { .. }), "{err}");

        assert_eq!(db.sandboxes_from_snapshot("py").unwrap().len(), 1);
        assert!(db.sandboxes_from_snapshot("other").unwrap().is_empty());

        assert!(db.delete_sandbox("a").unwrap());
        assert!(!db.delete_sandbox("a").unwrap());
        assert_eq!(db.list_sandboxes().unwrap(), vec![b]);
    }

    #[test]
    fn list_sandboxes_breaks_created_at_ties_by_id() {
        let (_dir, db) = open_temp();
        for id in ["c", "a", "b"] {
            db.insert_sandbox(&sandbox(id, None, 5)).unwrap();
        }
        let ids: Vec<String> = db
            .list_sandboxes()
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
    }

    #[test]
    fn snapshot_crud_round_trip_and_already_exists() {
        let (_dir, db) = open_temp();
        let base = snapshot("base", None, 1);
        let child = snapshot("child", Some("base"), 2);
        db.insert_snapshot(&base).unwrap();
        db.insert_snapshot(&child).unwrap();
        assert_eq!(db.get_snapshot("base").unwrap(), Some(base.clone()));
        assert_eq!(db.get_snapshot("nope").unwrap(), None);

        let err = db.insert_snapshot(&base).unwrap_err();
        assert!(matches!(err, StoreError::SnapshotExists { .. }), "{err}");
        assert!(
            err.to_string().contains("snapshot `base` already exists"),
            "{err}"
        );

        db.set_snapshot_status("base", SnapshotStatus::Failed, Some("disk full"))
            .unwrap();
        db.set_snapshot_pause("base", 12.5).unwrap();
        db.set_snapshot_parent("base", Some("p")).unwrap();
        assert_eq!(
            db.get_snapshot("base").unwrap().unwrap().parent.as_deref(),
            Some("p")
        );
        db.set_snapshot_parent("base", None).unwrap();
        assert!(db.set_snapshot_parent("nope", None).is_err());
        let got = db.get_snapshot("base").unwrap().unwrap();
        assert_eq!(got.status, SnapshotStatus::Failed);
        assert_eq!(got.error.as_deref(), Some("disk full"));
        assert_eq!(got.pause_ms, Some(12.5));
        db.set_snapshot_status("base", SnapshotStatus::Ready, None)
            .unwrap();
        assert_eq!(db.get_snapshot("base").unwrap().unwrap().error, None);

        assert!(matches!(
            db.set_snapshot_status("nope", SnapshotStatus::Ready, None),
            Err(StoreError::NoSnapshot { .. })
        ));
        assert!(matches!(
            db.set_snapshot_pause("nope", 1.0),
            Err(StoreError::NoSnapshot { .. })
        ));

        assert_eq!(db.children_of("base").unwrap(), ["child"]);
        assert!(db.children_of("child").unwrap().is_empty());
        let tags: Vec<String> = db
            .list_snapshots()
            .unwrap()
            .into_iter()
            .map(|s| s.tag)
            .collect();
        assert_eq!(tags, ["base", "child"]);

        assert!(db.delete_snapshot_row("child").unwrap());
        assert!(!db.delete_snapshot_row("child").unwrap());
        assert!(db.children_of("base").unwrap().is_empty());
    }

    #[test]
    fn a_failed_tag_can_be_claimed_again_and_no_other() {
        let (_dir, mut db) = open_temp();
        let mut row = snapshot("t1", None, 1);
        row.status = SnapshotStatus::Writing;
        assert_eq!(db.claim_snapshot(&row).unwrap(), None);
        let e = db.claim_snapshot(&row).unwrap_err();
        assert!(matches!(e, StoreError::SnapshotExists { .. }), "{e}");
        // Only the first of two watchers records the failure.
        assert!(db
            .transition_snapshot(
                "t1",
                SnapshotStatus::Writing,
                SnapshotStatus::Failed,
                Some("x")
            )
            .unwrap());
        assert!(!db
            .transition_snapshot(
                "t1",
                SnapshotStatus::Writing,
                SnapshotStatus::Failed,
                Some("y")
            )
            .unwrap());
        let replaced = db.claim_snapshot(&row).unwrap().unwrap();
        assert_eq!(
            (replaced.status, replaced.error.as_deref()),
            (SnapshotStatus::Failed, Some("x"))
        );
        assert_eq!(
            db.get_snapshot("t1").unwrap().unwrap().status,
            SnapshotStatus::Writing
        );
        db.set_snapshot_status("t1", SnapshotStatus::Ready, None)
            .unwrap();
        assert!(db.claim_snapshot(&row).is_err());
    }

    #[test]
    fn a_sandbox_row_written_before_its_qemu_gets_the_pid_later() {
        let (_dir, db) = open_temp();
        let mut row = sandbox("sb-1", None, 1);
        row.state = SandboxState::Starting;
        row.pid = 0;
        row.pid_start = 0;
        db.insert_sandbox(&row).unwrap();
        db.set_sandbox_pid("sb-1", 77, 88).unwrap();
        let got = db.get_sandbox("sb-1").unwrap().unwrap();
        assert_eq!(
            (got.state, got.pid, got.pid_start),
            (SandboxState::Starting, 77, 88)
        );
        assert!(matches!(
            db.set_sandbox_pid("nope", 1, 1),
            Err(StoreError::NoSandbox { .. })
        ));
        let mut other = snapshot("a", None, 1);
        other.source = Some("sb-1".into());
        db.insert_snapshot(&other).unwrap();
        db.insert_snapshot(&snapshot("b", None, 2)).unwrap();
        let tags: Vec<String> = db
            .snapshots_from_source("sb-1")
            .unwrap()
            .into_iter()
            .map(|r| r.tag)
            .collect();
        assert_eq!(tags, ["a"]);
    }

    #[test]
    fn ready_snapshot_explains_each_status() {
        let (_dir, db) = open_temp();
        db.insert_snapshot(&snapshot("py", None, 1)).unwrap();
        let err = db.ready_snapshot("py").unwrap_err();
        assert_eq!(
            err.to_string(),
            "snapshot `py` is still being written (status: writing)"
        );
        db.set_snapshot_status("py", SnapshotStatus::Failed, Some("qemu died"))
            .unwrap();
        let err = db.ready_snapshot("py").unwrap_err();
        assert_eq!(
            err.to_string(),
            "snapshot `py` failed while being written (qemu died)"
        );
        db.set_snapshot_status("py", SnapshotStatus::Ready, None)
            .unwrap();
        assert_eq!(db.ready_snapshot("py").unwrap().tag, "py");
        let err = db.ready_snapshot("zz").unwrap_err();
        assert_eq!(err.to_string(), "no snapshot `zz`");
    }

    #[test]
    fn enums_display_parse_and_serialize_lowercase() {
        for state in [
            SandboxState::Starting,
            SandboxState::Running,
            SandboxState::Pooled,
            SandboxState::Dead,
        ] {
            assert_eq!(state.to_string().parse::<SandboxState>().unwrap(), state);
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{state}\"")
            );
        }
        for status in [
            SnapshotStatus::Writing,
            SnapshotStatus::Ready,
            SnapshotStatus::Failed,
        ] {
            assert_eq!(
                status.to_string().parse::<SnapshotStatus>().unwrap(),
                status
            );
            assert_eq!(
                serde_json::to_string(&status).unwrap(),
                format!("\"{status}\"")
            );
        }
        let err = "Running".parse::<SandboxState>().unwrap_err();
        assert!(err.to_string().contains("`Running`"), "{err}");
        let row = serde_json::to_value(sandbox("x", None, 3)).unwrap();
        assert_eq!(row["state"], "running");
        assert_eq!(row["config"]["mem_mib"], 512);
    }

    #[test]
    fn reopen_keeps_data_and_migration_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("forkd.db");
        {
            let db = Db::open(&path).unwrap();
            assert_eq!(db.schema_version().unwrap(), SCHEMA_VERSION);
            db.insert_sandbox(&sandbox("a", None, 1)).unwrap();
            db.insert_snapshot(&snapshot("s", None, 1)).unwrap();
        }
        for _ in 0..2 {
            let db = Db::open(&path).unwrap();
            assert_eq!(db.schema_version().unwrap(), SCHEMA_VERSION);
            assert_eq!(db.list_sandboxes().unwrap().len(), 1);
            assert_eq!(db.list_snapshots().unwrap().len(), 1);
        }
        // A database whose version was reset (tables already there) migrates
        // again without losing anything.
        {
            let db = Db::open(&path).unwrap();
            db.conn.pragma_update(None, "user_version", 0).unwrap();
        }
        let db = Db::open(&path).unwrap();
        assert_eq!(db.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(db.list_sandboxes().unwrap().len(), 1);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("forkd.db");
        Db::open(&path)
            .unwrap()
            .conn
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let err = Db::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::SchemaTooNew { .. }), "{err}");
        assert!(err.to_string().contains("upgrade forkd"), "{err}");
    }

    #[test]
    fn concurrent_writers_from_two_handles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("forkd.db");
        const PER_THREAD: u64 = 200;
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let handles: Vec<_> = (0..2)
            .map(|t| {
                let path = path.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    // Both open a fresh file at once: migration must serialize.
                    barrier.wait();
                    let mut db = Db::open(&path).unwrap();
                    for i in 0..PER_THREAD {
                        db.insert_sandbox(&sandbox(&format!("t{t}-{i}"), Some("py"), i))
                            .unwrap();
                        db.insert_snapshot(&snapshot(&format!("s{t}-{i}"), None, i))
                            .unwrap();
                        // A read-then-write transaction must not hit SQLITE_BUSY.
                        db.transaction(|db| {
                            let n = db.list_snapshots()?.len();
                            db.set_snapshot_pause(&format!("s{t}-{i}"), n as f64)
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
        let db = Db::open(&path).unwrap();
        assert_eq!(db.list_sandboxes().unwrap().len(), 2 * PER_THREAD as usize);
        assert_eq!(db.list_snapshots().unwrap().len(), 2 * PER_THREAD as usize);
        assert_eq!(
            db.sandboxes_from_snapshot("py").unwrap().len(),
            2 * PER_THREAD as usize
        );
    }

    #[test]
    fn transaction_rolls_back_on_error() {
        let (_dir, mut db) = open_temp();
        let err = db
            .transaction(|db| {
                db.insert_snapshot(&snapshot("a", None, 1))?;
                db.insert_snapshot(&snapshot("a", None, 1))
            })
            .unwrap_err();
        assert!(matches!(err, StoreError::SnapshotExists { .. }));
        assert_eq!(db.get_snapshot("a").unwrap(), None);
    }

    #[test]
    fn verified_cache_matches_exact_stamp_and_can_be_forgotten() {
        let (_dir, db) = open_temp();
        let stamp = FileStamp {
            size: 10,
            mtime_ns: 1,
            ctime_ns: 2,
            ino: 3,
        };
        db.record_verified("/s/py/ram.img", &stamp, "abc").unwrap();
        db.record_verified("/s/py2/ram.img", &stamp, "def").unwrap();
        assert_eq!(
            db.verified_hash("/s/py/ram.img", &stamp)
                .unwrap()
                .as_deref(),
            Some("abc")
        );
        let touched = FileStamp {
            ctime_ns: 3,
            ..stamp
        };
        assert_eq!(db.verified_hash("/s/py/ram.img", &touched).unwrap(), None);
        assert_eq!(db.forget_verified_under(Path::new("/s/py")).unwrap(), 1);
        assert_eq!(db.verified_hash("/s/py/ram.img", &stamp).unwrap(), None);
        assert!(db
            .verified_hash("/s/py2/ram.img", &stamp)
            .unwrap()
            .is_some());
    }
}
