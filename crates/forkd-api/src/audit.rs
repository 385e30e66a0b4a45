//! Audit-log records: one JSON line per mutating call (the routes whose
//! [`Route::mutating`](crate::routes::Route::mutating) is set), saying when, who,
//! what, on what, and how it ended.
//!
//! This module only formats; the server appends the line to its audit file.

use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::routes::Route;

/// How a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// It did what was asked (2xx).
    Ok,
    /// It was refused before doing anything (4xx: bad input, no token, a
    /// conflict, a limit).
    Rejected,
    /// It failed while doing it (5xx).
    Failed,
}

impl Outcome {
    /// The outcome an HTTP status means.
    pub fn from_status(status: u16) -> Self {
        match status {
            0..=399 => Self::Ok,
            400..=499 => Self::Rejected,
            _ => Self::Failed,
        }
    }
}

/// One line of the audit log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When the call was answered (Unix milliseconds).
    pub time_unix_ms: u64,
    /// Who called: `uid:<n>` for a UNIX-socket peer, `tcp:<addr>` (plus
    /// `+token` when it presented the token) for TCP.
    pub caller: String,
    /// The route's operation id (`spawnSandboxes`, `branch`, ...).
    pub operation: String,
    /// What it acted on: a sandbox id, a snapshot tag, or `-`.
    pub target: String,
    /// `ok`, `rejected` or `failed`.
    pub outcome: Outcome,
    /// The HTTP status sent.
    pub status: u16,
    /// The error message sent, for non-2xx answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AuditRecord {
    /// The record of one call to `route`, answered with `result`.
    pub fn new(
        time_unix_ms: u64,
        caller: impl Into<String>,
        route: &Route,
        target: impl Into<String>,
        result: Result<u16, &ApiError>,
    ) -> Self {
        let (status, error) = match result {
            Ok(status) => (status, None),
            Err(e) => (e.status(), Some(e.to_string())),
        };
        let target = target.into();
        Self {
            time_unix_ms,
            caller: caller.into(),
            operation: route.operation_id.to_owned(),
            target: if target.is_empty() {
                "-".to_owned()
            } else {
                target
            },
            outcome: Outcome::from_status(status),
            status,
            error,
        }
    }

    /// The record as one line of JSON, newline-terminated. JSON escapes every
    /// control character, so a hostile field cannot start a second line.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self)
            .unwrap_or_else(|e| format!("{{\"error\":\"cannot encode audit record: {e}\"}}"));
        line.push('\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::{by_operation, ROUTES};

    #[test]
    fn one_line_per_record() {
        let route = by_operation("branch").unwrap();
        let record = AuditRecord::new(
            1_700_000_000_000,
            "tcp:10.0.0.1:5000+token",
            route,
            "sb-1\nforged line",
            Err(&ApiError::conflict("tag `a` exists")),
        );
        let line = record.to_line();
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.ends_with('\n'));
        let back: AuditRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back, record);
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["outcome"], "rejected");
        assert_eq!(value["status"], 409);
        assert_eq!(value["operation"], "branch");
    }

    #[test]
    fn outcomes() {
        let route = by_operation("deleteSandbox").unwrap();
        let ok = AuditRecord::new(1, "uid:1000", route, "", Ok(204));
        assert_eq!(
            (ok.outcome, ok.target.as_str(), ok.error),
            (Outcome::Ok, "-", None)
        );
        assert_eq!(Outcome::from_status(500), Outcome::Failed);
        assert_eq!(Outcome::from_status(429), Outcome::Rejected);
    }

    #[test]
    fn every_mutating_route_is_a_non_get() {
        for r in ROUTES.iter().filter(|r| r.mutating) {
            assert_ne!(r.method, crate::routes::Method::Get, "{}", r.operation_id);
        }
    }
}
