//! What a sandbox keeps for its whole life, given when it is created or
//! spawned: when it ends (a time to live, movable later), how long it may
//! sit unused, its labels (`k=v`, E2B's metadata), and the environment and
//! working directory every command in it gets unless the command says
//! otherwise. The rules (when a sandbox has expired, which labels match,
//! how defaults merge into a command) are decided here once; the fleet
//! stores the facts in the sandbox's record.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::OpError;

/// Most labels one sandbox may carry.
pub const MAX_LABELS: usize = 64;
/// Longest label key.
pub const MAX_LABEL_KEY: usize = 128;
/// Longest label value.
pub const MAX_LABEL_VALUE: usize = 1024;
/// Most default environment variables one sandbox may carry.
pub const MAX_DEFAULT_ENV: usize = 1024;
/// Longest time to live or idle timeout (a year): anything longer is a
/// typo, and the end time must fit comfortably in milliseconds.
pub const MAX_LIFETIME: Duration = Duration::from_secs(366 * 86_400);

/// What a create or spawn asks a sandbox to keep for its life. Every field
/// empty: lives until killed, no labels, the agent's environment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Killed this long after it starts (movable with
    /// [`crate::Operations::set_timeout`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
    /// Killed after this long without an operation on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Environment every command gets; a command's own variables win.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
    /// Working directory of every command that names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// The guest account (`NAME`, `UID` or `UID:GID`) commands run as when
    /// they name none; root when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// A secret a front end keeps with the sandbox and checks itself (the
    /// E2B API's envd access token). Kept in the sandbox's record, never
    /// listed; every child of one spawn gets the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
}

/// Longest [`Settings::user`].
pub const MAX_USER: usize = 256;

/// Longest [`Settings::access_token`].
pub const MAX_ACCESS_TOKEN: usize = 512;

impl Settings {
    /// Whether anything besides the access token is set (a lifetime to
    /// record).
    pub fn shapes_lifetime(&self) -> bool {
        self.ttl.is_some()
            || self.idle_timeout.is_some()
            || !self.labels.is_empty()
            || !self.env.is_empty()
            || self.cwd.is_some()
            || self.user.is_some()
    }

    pub fn is_empty(&self) -> bool {
        *self == Settings::default()
    }

    /// Checks every field; the message names the field and the fix.
    pub fn validate(&self) -> Result<(), OpError> {
        for (what, d) in [("ttl", self.ttl), ("idle timeout", self.idle_timeout)] {
            if let Some(d) = d {
                check_lifetime(what, d)?;
            }
        }
        if self.labels.len() > MAX_LABELS {
            return Err(OpError::bad_input(format!(
                "a sandbox carries at most {MAX_LABELS} labels, not {}",
                self.labels.len()
            )));
        }
        for (k, v) in &self.labels {
            check_label(k, v)?;
        }
        if self.env.len() > MAX_DEFAULT_ENV {
            return Err(OpError::bad_input(format!(
                "a sandbox carries at most {MAX_DEFAULT_ENV} default environment variables, not {}",
                self.env.len()
            )));
        }
        for (k, _) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(OpError::bad_input(format!(
                    "environment variable name {k:?} is not valid: use NAME=VALUE with a NAME without `=`"
                )));
            }
        }
        if let Some(t) = &self.access_token {
            if t.is_empty()
                || t.len() > MAX_ACCESS_TOKEN
                || !t.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(OpError::bad_input(format!(
                    "an access token must be 1-{MAX_ACCESS_TOKEN} printable ASCII characters"
                )));
            }
        }
        if let Some(user) = &self.user {
            if user.is_empty() || user.len() > MAX_USER || user.contains(['\0', '\n']) {
                return Err(OpError::bad_input(format!(
                    "user {user:?} is not valid: name a guest account, a UID or UID:GID (at most {MAX_USER} bytes)"
                )));
            }
        }
        if let Some(cwd) = &self.cwd {
            if !cwd.starts_with('/') || cwd.contains('\0') {
                return Err(OpError::bad_input(format!(
                    "working directory {cwd:?} is not an absolute guest path: start it with /"
                )));
            }
        }
        Ok(())
    }
}

/// Checks a time to live or idle timeout.
pub fn check_lifetime(what: &str, d: Duration) -> Result<(), OpError> {
    if d.is_zero() || d > MAX_LIFETIME {
        return Err(OpError::bad_input(format!(
            "the {what} must be between 1 ms and 366 days, not {} s",
            d.as_secs_f64()
        )));
    }
    Ok(())
}

fn check_label(k: &str, v: &str) -> Result<(), OpError> {
    let key_ok = !k.is_empty()
        && k.len() <= MAX_LABEL_KEY
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
    if !key_ok {
        return Err(OpError::bad_input(format!(
            "label key {k:?} is not valid: use 1-{MAX_LABEL_KEY} letters, digits, `.`, `_`, `-` or `/`"
        )));
    }
    if v.len() > MAX_LABEL_VALUE || v.contains('\0') {
        return Err(OpError::bad_input(format!(
            "the value of label {k:?} is not valid: at most {MAX_LABEL_VALUE} bytes, no NUL"
        )));
    }
    Ok(())
}

/// Parses `k=v` (a label, or an environment variable).
pub fn parse_pair(what: &str, s: &str) -> Result<(String, String), OpError> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(OpError::bad_input(format!(
            "{what} {s:?} is not KEY=VALUE: write it as e.g. team=search"
        ))),
    }
}

/// Whether a sandbox carrying `labels` has every label of `wanted`.
pub fn labels_match(labels: &BTreeMap<String, String>, wanted: &[(String, String)]) -> bool {
    wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A sandbox's lifetime as its record keeps it and the seam reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lifetime {
    /// Killed at this time (Unix milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ends_at_ms: Option<u64>,
    /// Killed this long after `last_active_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    /// The last operation on it (Unix milliseconds).
    #[serde(default)]
    pub last_active_ms: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// Why a sandbox's time is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Its end time passed.
    Ttl,
    /// Nothing used it for its idle timeout.
    Idle,
}

impl std::fmt::Display for Expiry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Expiry::Ttl => "its time to live ran out",
            Expiry::Idle => "it was idle for its idle timeout",
        })
    }
}

/// How often at most the last-activity time of a sandbox is written: an
/// idle timeout is enforced to within this.
pub const ACTIVITY_GRANULARITY_MS: u64 = 1000;

impl Lifetime {
    /// Nothing set: lives until killed, no labels, no defaults.
    pub fn is_unset(&self) -> bool {
        *self == Lifetime::default()
    }

    /// The lifetime a sandbox started at `now_ms` with `settings` gets.
    pub fn start(settings: &Settings, now_ms: u64) -> Lifetime {
        Lifetime {
            ends_at_ms: settings.ttl.map(|d| now_ms.saturating_add(millis(d))),
            idle_timeout_ms: settings.idle_timeout.map(millis),
            last_active_ms: now_ms,
            labels: settings.labels.clone(),
            env: settings.env.clone(),
            cwd: settings.cwd.clone(),
            user: settings.user.clone(),
        }
    }

    /// Whether (and why) the sandbox's time is up at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> Option<Expiry> {
        if self.ends_at_ms.is_some_and(|end| now_ms >= end) {
            return Some(Expiry::Ttl);
        }
        match self.idle_timeout_ms {
            Some(idle) if now_ms >= self.last_active_ms.saturating_add(idle) => Some(Expiry::Idle),
            _ => None,
        }
    }

    /// Whether an operation at `now_ms` should be written down as activity
    /// (only when an idle timeout needs it, and not more than once per
    /// [`ACTIVITY_GRANULARITY_MS`]).
    pub fn wants_touch(&self, now_ms: u64) -> bool {
        self.idle_timeout_ms.is_some()
            && now_ms.saturating_sub(self.last_active_ms) >= ACTIVITY_GRANULARITY_MS
    }

    /// Whether any rule can end the sandbox.
    pub fn is_bounded(&self) -> bool {
        self.ends_at_ms.is_some() || self.idle_timeout_ms.is_some()
    }

    /// A command with the sandbox's default environment and working
    /// directory under its own: the command's variables win, its own
    /// working directory wins.
    pub fn apply(&self, env: &mut Vec<(String, String)>, cwd: &mut Option<String>) {
        if !self.env.is_empty() {
            let mut merged: Vec<(String, String)> = self
                .env
                .iter()
                .filter(|(k, _)| !env.iter().any(|(own, _)| own == k))
                .cloned()
                .collect();
            merged.append(env);
            *env = merged;
        }
        if cwd.is_none() {
            cwd.clone_from(&self.cwd);
        }
    }

    /// A command's account: its own when it names one, else the sandbox's
    /// default (from the image it was created from), else root (`None`).
    pub fn apply_user(&self, user: &mut Option<String>) {
        if user.is_none() {
            user.clone_from(&self.user);
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            ttl: Some(Duration::from_secs(10)),
            idle_timeout: Some(Duration::from_secs(3)),
            labels: [("team".to_string(), "a".to_string())].into(),
            env: vec![("A".into(), "1".into()), ("B".into(), "2".into())],
            cwd: Some("/tmp".into()),
            user: None,
            access_token: None,
        }
    }

    #[test]
    fn an_access_token_is_checked_and_shapes_no_lifetime() {
        let only_token = Settings {
            access_token: Some("fkd_abc".into()),
            ..Settings::default()
        };
        assert!(only_token.validate().is_ok());
        assert!(!only_token.shapes_lifetime());
        assert!(settings().shapes_lifetime());
        for bad in ["", "with space", "tab\t", &"x".repeat(MAX_ACCESS_TOKEN + 1)] {
            let s = Settings {
                access_token: Some(bad.to_string()),
                ..Settings::default()
            };
            assert!(s.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_sandbox_expires_at_its_end_time_or_after_idling() {
        let life = Lifetime::start(&settings(), 1_000);
        assert_eq!(life.ends_at_ms, Some(11_000));
        assert_eq!(life.expired(3_999), None);
        assert_eq!(life.expired(4_000), Some(Expiry::Idle));
        let mut busy = life.clone();
        busy.last_active_ms = 9_000;
        assert_eq!(busy.expired(10_999), None);
        assert_eq!(busy.expired(11_000), Some(Expiry::Ttl));
        assert_eq!(
            Lifetime::start(&Settings::default(), 5).expired(u64::MAX),
            None
        );
        assert!(!Lifetime::start(&Settings::default(), 5).is_bounded());
    }

    #[test]
    fn activity_is_written_only_when_an_idle_timeout_needs_it() {
        let life = Lifetime::start(&settings(), 1_000);
        assert!(!life.wants_touch(1_500));
        assert!(life.wants_touch(2_000));
        let unbounded = Lifetime::start(&Settings::default(), 1_000);
        assert!(!unbounded.wants_touch(1_000_000));
    }

    #[test]
    fn a_commands_own_env_and_cwd_win() {
        let life = Lifetime::start(&settings(), 0);
        let mut env = vec![("B".to_string(), "own".to_string())];
        let mut cwd = None;
        life.apply(&mut env, &mut cwd);
        assert_eq!(
            env,
            vec![("A".into(), "1".into()), ("B".into(), "own".into())]
        );
        assert_eq!(cwd.as_deref(), Some("/tmp"));
        let mut cwd = Some("/root".to_string());
        life.apply(&mut env, &mut cwd);
        assert_eq!(cwd.as_deref(), Some("/root"));
    }

    #[test]
    fn labels_match_when_all_wanted_are_there() {
        let labels: BTreeMap<String, String> =
            [("a".into(), "1".into()), ("b".into(), "2".into())].into();
        assert!(labels_match(&labels, &[]));
        assert!(labels_match(&labels, &[("a".into(), "1".into())]));
        assert!(!labels_match(
            &labels,
            &[("a".into(), "1".into()), ("b".into(), "3".into())]
        ));
        assert!(!labels_match(&labels, &[("c".into(), "1".into())]));
    }

    #[test]
    fn bad_settings_say_what_to_fix() {
        assert!(settings().validate().is_ok());
        let mut s = settings();
        s.ttl = Some(Duration::ZERO);
        assert!(s.validate().unwrap_err().message.contains("ttl"));
        let mut s = settings();
        s.labels.insert("bad key".into(), "x".into());
        assert!(s.validate().unwrap_err().message.contains("label key"));
        let mut s = settings();
        s.cwd = Some("tmp".into());
        assert!(s.validate().unwrap_err().message.contains("absolute"));
        let mut s = settings();
        s.env.push(("".into(), "x".into()));
        assert!(s.validate().is_err());
        assert_eq!(
            parse_pair("label", "k=v=w").unwrap(),
            ("k".into(), "v=w".into())
        );
        assert!(parse_pair("label", "=v").is_err());
        assert!(parse_pair("label", "kv").is_err());
    }
}
