//! What forkd keeps of a paused sandbox: E2B's `pause` turns a sandbox into
//! a memory snapshot and stops it, and `connect` must bring it back under
//! the same id, with the same envd access token (the SDK's `sbx.connect()`
//! keeps the token it had), metadata and default environment; `list` and
//! `get_info` show it meanwhile with state `paused`. The fleet forgets a
//! sandbox once it is stopped, so the E2B front end keeps this record beside
//! the snapshot. Only the record and its bounded JSON form live here; the
//! daemon stores it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::control::{ListedSandbox, SandboxState};

/// Largest record accepted when read back.
pub const MAX_RECORD: usize = 256 * 1024;

/// Why a stored record was not read.
#[derive(Debug, thiserror::Error)]
pub enum PausedError {
    /// Larger than [`MAX_RECORD`].
    #[error(
        "the record of a paused sandbox holds {0} bytes, more than {MAX_RECORD}; remove the file"
    )]
    TooLarge(usize),
    /// Not the JSON of a record.
    #[error("the record of a paused sandbox is unreadable ({0}); remove the file")]
    Unreadable(serde_json::Error),
    /// Its id is not the one it is filed under.
    #[error("the record filed as sandbox {filed} names sandbox {named}; remove the file")]
    WrongId {
        /// The id it was looked up by.
        filed: String,
        /// The id inside.
        named: String,
    },
}

/// A paused sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PausedSandbox {
    /// Its E2B sandbox id (the forkd sandbox id it had and will have again).
    pub sandbox_id: String,
    /// The template it was created from, as E2B named it.
    pub template_id: String,
    /// The forkd snapshot holding its memory and disk.
    pub snapshot: String,
    /// The envd access token it keeps across the pause.
    pub envd_access_token: Option<String>,
    /// Unix seconds of its first start.
    pub started_at: i64,
    /// Unix milliseconds of the pause.
    pub paused_at_ms: i64,
    /// vCPUs.
    pub cpu_count: u32,
    /// Guest RAM in MiB.
    pub memory_mb: u64,
    /// Its metadata (forkd labels).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// The default environment of its commands.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The default working directory of its commands.
    #[serde(default)]
    pub cwd: Option<String>,
    /// The guest account its commands run as by default (an image's `User`).
    #[serde(default)]
    pub user: Option<String>,
}

impl PausedSandbox {
    /// The record as stored.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// A stored record, checked to be the one of sandbox `id`.
    pub fn from_json(id: &str, bytes: &[u8]) -> Result<PausedSandbox, PausedError> {
        if bytes.len() > MAX_RECORD {
            return Err(PausedError::TooLarge(bytes.len()));
        }
        let r: PausedSandbox = serde_json::from_slice(bytes).map_err(PausedError::Unreadable)?;
        if r.sandbox_id != id {
            return Err(PausedError::WrongId {
                filed: id.to_owned(),
                named: r.sandbox_id,
            });
        }
        Ok(r)
    }

    /// How `GET /v2/sandboxes` and `GET /sandboxes/{id}` show it: paused,
    /// its end time the instant it was paused (it has no lifetime running).
    pub fn listed(&self) -> ListedSandbox {
        let started_at = OffsetDateTime::from_unix_timestamp(self.started_at)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let end_at =
            OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.paused_at_ms) * 1_000_000)
                .unwrap_or(started_at);
        ListedSandbox {
            template_id: self.template_id.clone(),
            sandbox_id: self.sandbox_id.clone(),
            client_id: crate::CLIENT_ID.to_owned(),
            started_at,
            end_at,
            cpu_count: self.cpu_count,
            memory_mb: self.memory_mb,
            disk_size_mb: 0,
            state: SandboxState::Paused,
            envd_version: crate::ENVD_VERSION.to_owned(),
            alias: None,
            metadata: self.metadata.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> PausedSandbox {
        PausedSandbox {
            sandbox_id: "sb-1".into(),
            template_id: "base".into(),
            snapshot: "e2b-paused-sb-1-1".into(),
            envd_access_token: Some("fkd_x".into()),
            started_at: 1_700_000_000,
            paused_at_ms: 1_700_000_060_500,
            cpu_count: 2,
            memory_mb: 512,
            metadata: [("k".to_string(), "v".to_string())].into(),
            env: vec![("A".into(), "1".into())],
            cwd: Some("/tmp".into()),
            user: Some("app".into()),
        }
    }

    #[test]
    fn a_record_round_trips_and_lists_as_paused() {
        let r = record();
        assert_eq!(PausedSandbox::from_json("sb-1", &r.to_json()).unwrap(), r);
        let l = r.listed();
        assert_eq!(l.state, SandboxState::Paused);
        assert_eq!(l.sandbox_id, "sb-1");
        assert_eq!(l.metadata.get("k").map(String::as_str), Some("v"));
        assert_eq!(l.started_at.unix_timestamp(), 1_700_000_000);
        assert_eq!(l.end_at.unix_timestamp(), 1_700_000_060);
    }

    #[test]
    fn a_bad_record_is_refused_with_its_reason() {
        let r = record();
        assert!(matches!(
            PausedSandbox::from_json("sb-2", &r.to_json()),
            Err(PausedError::WrongId { .. })
        ));
        assert!(matches!(
            PausedSandbox::from_json("sb-1", b"{not json"),
            Err(PausedError::Unreadable(_))
        ));
        let big = vec![b' '; MAX_RECORD + 1];
        assert!(matches!(
            PausedSandbox::from_json("sb-1", &big),
            Err(PausedError::TooLarge(_))
        ));
        // Out-of-range times do not panic.
        let mut odd = r;
        odd.started_at = i64::MAX;
        odd.paused_at_ms = i64::MIN;
        let _ = odd.listed();
    }
}
