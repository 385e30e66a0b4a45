//! Sandbox lifetimes on this host: the [`Lifetime`] a sandbox keeps in its
//! record (key `lifetime` of the row's `config`, so it survives every
//! restart of whoever enforces it), and its enforcement. A sandbox whose
//! time is up is killed by whichever forkd process meets it first: any
//! operation on it, a listing, or the daemon's housekeeping. The rules
//! (when time is up, how defaults merge) are `forkd_ops::lifetime`'s.

use forkd_ops::lifetime::Expiry;
use forkd_ops::{Lifetime, SandboxState, Settings};
use forkd_store::SandboxRow;

use super::Fleet;
use crate::CoreError;

/// The key of a row's `config` that holds its lifetime.
const KEY: &str = "lifetime";

/// The key of a row's `config` that holds the secret a front end keeps with
/// the sandbox (`Settings::access_token`).
const TOKEN_KEY: &str = "access_token";

/// The access token recorded in `row`, if any.
pub fn access_token_of(row: &SandboxRow) -> Option<String> {
    row.config
        .get(TOKEN_KEY)
        .and_then(|v| v.as_str())
        .map(str::to_owned)
}

/// The lifetime recorded in `row` (none: lives until killed).
pub fn of(row: &SandboxRow) -> Lifetime {
    row.config
        .get(KEY)
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default()
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Fleet {
    pub(crate) fn write_lifetime(&self, id: &str, life: &Lifetime) -> Result<(), CoreError> {
        let value = serde_json::to_value(life).map_err(|e| CoreError::BadRecord {
            id: id.into(),
            reason: e.to_string(),
        })?;
        self.db().set_sandbox_config_key(id, KEY, &value)?;
        Ok(())
    }

    /// Gives a sandbox that just started its settings. Nothing to write for
    /// empty settings.
    pub fn start_lifetime(&self, id: &str, settings: &Settings) -> Result<(), CoreError> {
        self.write_access_token(id, settings)?;
        if settings.shapes_lifetime() {
            self.write_lifetime(id, &Lifetime::start(settings, now_ms()))?;
        }
        Ok(())
    }

    /// Records `settings.access_token` (if any) beside the lifetime.
    pub(crate) fn write_access_token(
        &self,
        id: &str,
        settings: &Settings,
    ) -> Result<(), CoreError> {
        if let Some(token) = &settings.access_token {
            self.db()
                .set_sandbox_config_key(id, TOKEN_KEY, &serde_json::json!(token))?;
        }
        Ok(())
    }

    /// Moves a sandbox's end time to `ttl` from now (`None`: no end time).
    pub fn set_timeout(&self, id: &str, ttl: Option<std::time::Duration>) -> Result<(), CoreError> {
        if let Some(d) = ttl {
            forkd_ops::lifetime::check_lifetime("ttl", d)
                .map_err(|e| CoreError::BadRequest(e.message))?;
        }
        let (row, _) = self.sandbox(id)?;
        let mut life = self.enforce(&row)?;
        let now = now_ms();
        life.ends_at_ms =
            ttl.map(|d| now.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
        life.last_active_ms = now;
        self.write_lifetime(id, &life)
    }

    /// Checks a sandbox about to be used: one whose time is up is killed
    /// (its use fails saying so); otherwise the use counts as activity.
    /// Returns its lifetime.
    pub(crate) fn enforce(&self, row: &SandboxRow) -> Result<Lifetime, CoreError> {
        let mut life = of(row);
        if !life.is_bounded() || row.state == SandboxState::Pooled {
            return Ok(life);
        }
        let now = now_ms();
        if life.expired(now) == Some(Expiry::Idle) && self.busy(&row.id) {
            // A call of this process is inside the sandbox right now (a long
            // exec, a followed process): that is activity, not idleness.
            life.last_active_ms = now;
        }
        if let Some(why) = life.expired(now) {
            // Someone else may be killing it at the same moment: either way
            // it is gone.
            let _ = self.kill(&row.id);
            return Err(CoreError::Expired {
                id: row.id.clone(),
                why,
            });
        }
        if life.wants_touch(now) {
            life.last_active_ms = now;
            self.db()
                .set_sandbox_config_key(&row.id, KEY, &serde_json::json!(life))?;
        }
        Ok(life)
    }

    /// The lifetime of sandbox `id`, enforced as by [`Fleet::enforce`].
    pub(crate) fn lifetime(&self, id: &str) -> Result<Lifetime, CoreError> {
        let (row, _) = self.sandbox(id)?;
        self.enforce(&row)
    }

    /// Whether a call of this process holds sandbox `id`'s agent session
    /// (only a long-lived fleet shares sessions and can tell).
    fn busy(&self, id: &str) -> bool {
        self.sessions.as_ref().is_some_and(|s| s.busy(id))
    }

    /// Kills every sandbox whose time is up; returns them with why. A
    /// sandbox busy in a call of this process is not idle, whatever its
    /// record says.
    pub fn reap_expired(&self) -> Result<Vec<(String, Expiry)>, CoreError> {
        let rows = self.db().list_sandboxes()?;
        let now = now_ms();
        let mut reaped = Vec::new();
        for row in rows {
            if row.state == SandboxState::Pooled {
                continue;
            }
            let mut life = of(&row);
            let mut why = life.expired(now);
            if why == Some(Expiry::Idle) && self.busy(&row.id) {
                // Busy in a call of this process (a long exec or a followed
                // process): written down as activity, so that another forkd
                // process that meets it does not take it for idle either.
                life.last_active_ms = now;
                self.write_lifetime(&row.id, &life)?;
                why = None;
            }
            if let Some(why) = why {
                if self.kill(&row.id).is_ok() {
                    reaped.push((row.id, why));
                }
            }
        }
        Ok(reaped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_without_a_lifetime_lives_until_killed() {
        let row = SandboxRow {
            id: "sb-1".into(),
            state: SandboxState::Running,
            pid: 1,
            pid_start: 1,
            run_dir: "/r".into(),
            snapshot: None,
            config: serde_json::json!({"image": "busybox"}),
            created_at: 1,
        };
        assert_eq!(of(&row), Lifetime::default());
        let mut row = row;
        row.config["lifetime"] = serde_json::json!({"ends_at_ms": 9, "labels": {"a": "b"}});
        let life = of(&row);
        assert_eq!(life.ends_at_ms, Some(9));
        assert_eq!(life.expired(9), Some(Expiry::Ttl));
        assert_eq!(life.labels.get("a").map(String::as_str), Some("b"));
    }
}
