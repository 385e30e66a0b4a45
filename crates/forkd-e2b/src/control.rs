//! The control plane's wire types: the JSON bodies of `POST /v2/sandboxes`,
//! `GET /v2/sandboxes` (and its query), `GET /sandboxes/{id}`,
//! `POST /sandboxes/{id}/timeout`, `/pause`, `POST /v2/sandboxes/{id}/connect`
//! and `POST /sandboxes/{id}/fork`, with the field names the generated models
//! in `e2b/api/client/models/` use (e2b 2.63.0), and the `{code, message}`
//! error body every failure must carry (the SDK parses it unconditionally).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::pjson;

/// Longest accepted `templateID`.
pub const MAX_TEMPLATE_ID: usize = 256;
/// Most metadata entries on a sandbox.
pub const MAX_METADATA: usize = 64;
/// Longest metadata key or value.
pub const MAX_METADATA_LEN: usize = 1024;
/// Most `envVars` entries.
pub const MAX_ENV_VARS: usize = 1024;
/// Longest sandbox lifetime accepted in `timeout` (24 h, E2B's Pro limit).
pub const MAX_TIMEOUT_SECS: u64 = 86_400;
/// The lifetime of a sandbox created without `timeout` (E2B's default).
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;
/// The lifetime of fork children when the request has no `timeout` (E2B's
/// API default).
pub const DEFAULT_FORK_TIMEOUT_SECS: u64 = 15;
/// Most children in one fork (the SDK refuses more itself).
pub const MAX_FORK_COUNT: u32 = 20;

/// The error body of every control-plane failure: `{"code": <HTTP status>,
/// "message": …}`. A non-JSON body makes the SDK raise `JSONDecodeError`
/// from inside its generated client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// The HTTP status, repeated.
    pub code: u16,
    /// For people.
    pub message: String,
}

impl ApiError {
    /// An error with HTTP status `code`.
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }

    /// 400 naming what is wrong.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, message)
    }

    /// 404 for a sandbox id.
    pub fn sandbox_not_found(id: &str) -> Self {
        ApiError::new(404, format!("sandbox {id} not found"))
    }

    /// The body as bytes.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// `NewSandboxV2`: the body of `POST /v2/sandboxes`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NewSandbox {
    /// A forkd snapshot tag or guest image name (`base` = the default image).
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Lifetime in seconds; [`DEFAULT_TIMEOUT_SECS`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// Pause instead of kill at the timeout.
    #[serde(rename = "autoPause", default, skip_serializing_if = "Option::is_none")]
    pub auto_pause: Option<bool>,
    /// Whether that pause keeps memory.
    #[serde(
        rename = "autoPauseMemory",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub auto_pause_memory: Option<bool>,
    /// `{"enabled": bool}`: resume on traffic.
    #[serde(
        rename = "autoResume",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub auto_resume: Option<serde_json::Value>,
    /// Note the snake case: that is what the SDK sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_internet_access: Option<bool>,
    /// Egress rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<serde_json::Value>,
    /// Saved with the sandbox, returned by info and list, filterable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Environment of every process in the sandbox.
    #[serde(rename = "envVars", default, skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<BTreeMap<String, String>>,
    /// MCP gateway configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<serde_json::Value>,
    /// Workload identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iam: Option<serde_json::Value>,
    /// Volumes.
    #[serde(
        rename = "volumeMounts",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub volume_mounts: Option<serde_json::Value>,
}

impl NewSandbox {
    /// Checks the fields forkd acts on; 400 naming the field otherwise.
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.template_id.is_empty() || self.template_id.len() > MAX_TEMPLATE_ID {
            return Err(ApiError::bad_request(format!(
                "templateID must be 1 to {MAX_TEMPLATE_ID} bytes: a forkd snapshot tag or image name"
            )));
        }
        if let Some(t) = self.timeout {
            check_timeout("timeout", t)?;
        }
        if let Some(m) = &self.metadata {
            check_metadata(m)?;
        }
        if let Some(env) = &self.env_vars {
            if env.len() > MAX_ENV_VARS {
                return Err(ApiError::bad_request(format!(
                    "envVars has {} entries; at most {MAX_ENV_VARS} are accepted",
                    env.len()
                )));
            }
            crate::envd::check_envs("envVars", env)
                .map_err(|e| ApiError::bad_request(e.message))?;
        }
        Ok(())
    }

    /// The lifetime asked for.
    pub fn timeout_secs(&self) -> u64 {
        self.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS)
    }

    /// The requested features forkd does not implement, by field name, so
    /// the daemon can refuse them (400) instead of silently ignoring them.
    pub fn unsupported_fields(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.auto_pause == Some(true) {
            out.push("autoPause");
        }
        if self.auto_resume.is_some() {
            out.push("autoResume");
        }
        if self.network.is_some() {
            out.push("network");
        }
        if self.mcp.as_ref().is_some_and(|v| !v.is_null()) {
            out.push("mcp");
        }
        if self.iam.is_some() {
            out.push("iam");
        }
        if self.volume_mounts.is_some() {
            out.push("volumeMounts");
        }
        out
    }
}

fn check_timeout(field: &str, t: u64) -> Result<(), ApiError> {
    if t == 0 || t > MAX_TIMEOUT_SECS {
        return Err(ApiError::bad_request(format!(
            "{field} must be 1 to {MAX_TIMEOUT_SECS} seconds, got {t}"
        )));
    }
    Ok(())
}

fn check_metadata(m: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if m.len() > MAX_METADATA {
        return Err(ApiError::bad_request(format!(
            "metadata has {} entries; at most {MAX_METADATA} are accepted",
            m.len()
        )));
    }
    for (k, v) in m {
        if k.is_empty() || k.len() > MAX_METADATA_LEN || v.len() > MAX_METADATA_LEN {
            return Err(ApiError::bad_request(format!(
                "metadata keys must be 1 to {MAX_METADATA_LEN} bytes and values at most \
                 {MAX_METADATA_LEN}; {k:?} is not"
            )));
        }
    }
    Ok(())
}

/// `Sandbox`: the answer of create (201), connect (200/201) and of each
/// successful fork child.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedSandbox {
    /// The template it was made from.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Its id.
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// Required by the SDK; [`crate::CLIENT_ID`].
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// [`crate::ENVD_VERSION`]; the SDK gates features on it.
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
    /// Template alias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// The sandbox's envd access token (`X-Access-Token`).
    #[serde(
        rename = "envdAccessToken",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub envd_access_token: Option<String>,
    /// When set, the code-interpreter SDK sends it as
    /// `E2B-Traffic-Access-Token` on every port-49999 call.
    #[serde(
        rename = "trafficAccessToken",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub traffic_access_token: Option<String>,
    /// Keep absent: a domain would make the SDK build its own sandbox URLs
    /// only when `E2B_SANDBOX_URL` is unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// `SandboxState`
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    /// Running.
    Running,
    /// Paused (a memory snapshot; resumed by connect).
    Paused,
}

impl SandboxState {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
        }
    }

    /// The state named `s`.
    pub fn parse(s: &str) -> Option<SandboxState> {
        match s {
            "running" => Some(SandboxState::Running),
            "paused" => Some(SandboxState::Paused),
            _ => None,
        }
    }
}

mod rfc3339 {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&pjson::format_rfc3339(*t).map_err(serde::ser::Error::custom)?)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let s = String::deserialize(d)?;
        pjson::parse_rfc3339(&s).map_err(serde::de::Error::custom)
    }
}

/// `ListedSandbox`: one entry of `GET /v2/sandboxes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedSandbox {
    /// The template.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Its id.
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// [`crate::CLIENT_ID`].
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// When it started.
    #[serde(rename = "startedAt", with = "rfc3339")]
    pub started_at: OffsetDateTime,
    /// When its timeout kills it.
    #[serde(rename = "endAt", with = "rfc3339")]
    pub end_at: OffsetDateTime,
    /// vCPUs.
    #[serde(rename = "cpuCount")]
    pub cpu_count: u32,
    /// Guest RAM in MiB.
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    /// Disk in MiB.
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    /// Running or paused.
    pub state: SandboxState,
    /// [`crate::ENVD_VERSION`].
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
    /// Template alias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Its metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// `SandboxDetail`: the answer of `GET /sandboxes/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxDetail {
    /// Everything a list entry has.
    #[serde(flatten)]
    pub listed: ListedSandbox,
    /// The envd token (E2B returns it here too).
    #[serde(
        rename = "envdAccessToken",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub envd_access_token: Option<String>,
    /// `{"autoResume": bool, "onTimeout": "kill"|"pause"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<Lifecycle>,
}

/// `SandboxLifecycle`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lifecycle {
    /// Whether traffic resumes it.
    #[serde(rename = "autoResume")]
    pub auto_resume: bool,
    /// `kill` or `pause`.
    #[serde(rename = "onTimeout")]
    pub on_timeout: String,
}

/// `SandboxTimeoutRequest`: body of `POST /sandboxes/{id}/timeout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeoutRequest {
    /// Seconds from now.
    pub timeout: u64,
}

impl TimeoutRequest {
    /// 1 s to 24 h.
    pub fn validate(&self) -> Result<(), ApiError> {
        check_timeout("timeout", self.timeout)
    }
}

/// `SandboxPauseRequest`: body of `POST /sandboxes/{id}/pause`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseRequest {
    /// Keep memory (the default) or only the disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
    /// Refuse (503) when the guest agent does not answer.
    #[serde(
        rename = "requireHealthyGuest",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub require_healthy_guest: Option<bool>,
}

/// `ConnectSandboxV2`: body of `POST /v2/sandboxes/{id}/connect`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectRequest {
    /// New lifetime from now (only ever extends a running sandbox's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// `false`: cold-boot from disk instead of restoring memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
}

impl ConnectRequest {
    /// 1 s to 24 h when given.
    pub fn validate(&self) -> Result<(), ApiError> {
        self.timeout.map_or(Ok(()), |t| check_timeout("timeout", t))
    }
}

/// `SandboxForkRequest`: body of `POST /sandboxes/{id}/fork`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkRequest {
    /// Children's lifetime; [`DEFAULT_FORK_TIMEOUT_SECS`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// How many children; 1 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
}

impl ForkRequest {
    /// Count 1..=20, timeout 1 s to 24 h.
    pub fn validate(&self) -> Result<(), ApiError> {
        if let Some(c) = self.count {
            if c == 0 || c > MAX_FORK_COUNT {
                return Err(ApiError::bad_request(format!(
                    "count must be 1 to {MAX_FORK_COUNT}, got {c}"
                )));
            }
        }
        self.timeout.map_or(Ok(()), |t| check_timeout("timeout", t))
    }

    /// Children to make.
    pub fn count(&self) -> u32 {
        self.count.unwrap_or(1)
    }

    /// Their lifetime.
    pub fn timeout_secs(&self) -> u64 {
        self.timeout.unwrap_or(DEFAULT_FORK_TIMEOUT_SECS)
    }
}

/// `SandboxForkResult`: one entry per requested child in the 201 answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForkResult {
    /// The child started.
    Sandbox(CreatedSandbox),
    /// It did not; `code` picks the SDK's exception (429 rate limit, 503
    /// busy, 404 not found, other → generic).
    Error(ApiError),
}

/// The query of `GET /v2/sandboxes`, decoded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Pairs every listed sandbox's metadata must contain.
    pub metadata: BTreeMap<String, String>,
    /// States to include; empty = running and paused.
    pub states: Vec<SandboxState>,
    /// Only sandboxes started at or after this instant.
    pub started_after: Option<OffsetDateTime>,
    /// Only sandboxes of this template.
    pub template: Option<String>,
    /// Newest first (`desc`) or oldest first (`asc`, the default here).
    pub descending: bool,
    /// `nextToken` from the previous page's `x-next-token`.
    pub next_token: Option<String>,
    /// Page size, when asked for.
    pub limit: Option<u32>,
}

/// Largest page of `GET /v2/sandboxes`.
pub const MAX_LIST_LIMIT: u32 = 100;

impl ListQuery {
    /// Parses a raw query string (without `?`). `metadata` is decoded the
    /// three times the SDK encodes it (`docs/e2b-protocol.md` §2.2).
    pub fn parse(query: &str) -> Result<ListQuery, ApiError> {
        if query.len() > 64 * 1024 {
            return Err(ApiError::bad_request(
                "the query string is longer than 64 KiB",
            ));
        }
        let mut q = ListQuery::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "metadata" => {
                    for (mk, mv) in form_urlencoded::parse(v.as_bytes()) {
                        let key = percent_decode(&mk)?;
                        let value = percent_decode(&mv)?;
                        q.metadata.insert(key, value);
                    }
                    check_metadata(&q.metadata)?;
                }
                "state" => {
                    for s in v.split(',').filter(|s| !s.is_empty()) {
                        let state = SandboxState::parse(s).ok_or_else(|| {
                            ApiError::bad_request(format!(
                                "state must be running or paused, got {s:?}"
                            ))
                        })?;
                        if !q.states.contains(&state) {
                            q.states.push(state);
                        }
                    }
                }
                "startedAfter" => {
                    q.started_after =
                        Some(pjson::parse_rfc3339(&v).map_err(ApiError::bad_request)?);
                }
                "template" => {
                    if v.len() > MAX_TEMPLATE_ID {
                        return Err(ApiError::bad_request("template is too long"));
                    }
                    q.template = Some(v.into_owned());
                }
                "order" => {
                    q.descending = match v.as_ref() {
                        "asc" => false,
                        "desc" => true,
                        other => {
                            return Err(ApiError::bad_request(format!(
                                "order must be asc or desc, got {other:?}"
                            )))
                        }
                    }
                }
                "nextToken" => q.next_token = Some(v.into_owned()),
                "limit" => {
                    let n: u32 = v.parse().map_err(|_| {
                        ApiError::bad_request(format!("limit must be a number, got {v:?}"))
                    })?;
                    if n == 0 || n > MAX_LIST_LIMIT {
                        return Err(ApiError::bad_request(format!(
                            "limit must be 1 to {MAX_LIST_LIMIT}, got {n}"
                        )));
                    }
                    q.limit = Some(n);
                }
                _ => {}
            }
        }
        Ok(q)
    }

    /// Whether a sandbox passes the filters (not the paging).
    pub fn matches(
        &self,
        state: SandboxState,
        template: &str,
        started_at: OffsetDateTime,
        metadata: &BTreeMap<String, String>,
    ) -> bool {
        (self.states.is_empty() || self.states.contains(&state))
            && self.template.as_deref().is_none_or(|t| t == template)
            && self.started_after.is_none_or(|after| started_at >= after)
            && self
                .metadata
                .iter()
                .all(|(k, v)| metadata.get(k) == Some(v))
    }
}

fn percent_decode(s: &str) -> Result<String, ApiError> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| ApiError::bad_request("metadata filter is not UTF-8 after decoding"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> OffsetDateTime {
        pjson::parse_rfc3339(s).unwrap()
    }

    #[test]
    fn create_request_as_the_sdk_sends_it() {
        let r: NewSandbox = serde_json::from_str(
            r#"{"templateID":"base","timeout":120,"metadata":{"k":"v"},"envVars":{"FOO":"bar"}}"#,
        )
        .unwrap();
        r.validate().unwrap();
        assert_eq!(r.template_id, "base");
        assert_eq!(r.timeout_secs(), 120);
        assert_eq!(r.env_vars.as_ref().unwrap()["FOO"], "bar");
        assert!(r.unsupported_fields().is_empty());
        let r: NewSandbox =
            serde_json::from_str(r#"{"templateID":"base","metadata":{},"envVars":{}}"#).unwrap();
        assert_eq!(r.timeout_secs(), DEFAULT_TIMEOUT_SECS);
        let r: NewSandbox = serde_json::from_str(
            r#"{"templateID":"x","autoPause":true,"network":{},"allow_internet_access":false,"mcp":null}"#,
        )
        .unwrap();
        assert_eq!(r.unsupported_fields(), ["autoPause", "network"]);
        assert_eq!(r.allow_internet_access, Some(false));
        for bad in [
            r#"{"templateID":""}"#,
            r#"{"templateID":"b","timeout":0}"#,
            r#"{"templateID":"b","timeout":90000}"#,
            r#"{"templateID":"b","envVars":{"A=B":"x"}}"#,
            r#"{"templateID":"b","metadata":{"":"x"}}"#,
        ] {
            let r: NewSandbox = serde_json::from_str(bad).unwrap();
            assert_eq!(r.validate().unwrap_err().code, 400, "{bad}");
        }
        assert!(serde_json::from_str::<NewSandbox>(r#"{"timeout":1}"#).is_err());
    }

    #[test]
    fn answers_have_the_sdk_field_names() {
        let c = CreatedSandbox {
            template_id: "base".into(),
            sandbox_id: "sbx-1".into(),
            client_id: crate::CLIENT_ID.into(),
            envd_version: crate::ENVD_VERSION.into(),
            alias: None,
            envd_access_token: Some("tok".into()),
            traffic_access_token: None,
            domain: None,
        };
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"templateID":"base","sandboxID":"sbx-1","clientID":"forkd","envdVersion":"0.6.4","envdAccessToken":"tok"}"#
        );
        let listed = ListedSandbox {
            template_id: "base".into(),
            sandbox_id: "sbx-1".into(),
            client_id: "forkd".into(),
            started_at: t("2026-12-01T10:00:00Z"),
            end_at: t("2026-12-01T10:05:00Z"),
            cpu_count: 2,
            memory_mb: 512,
            disk_size_mb: 1024,
            state: SandboxState::Running,
            envd_version: "0.6.4".into(),
            alias: None,
            metadata: [("k".to_string(), "v".to_string())].into(),
        };
        let detail = SandboxDetail {
            listed: listed.clone(),
            envd_access_token: Some("tok".into()),
            lifecycle: None,
        };
        assert_eq!(
            serde_json::to_string(&detail).unwrap(),
            r#"{"templateID":"base","sandboxID":"sbx-1","clientID":"forkd","startedAt":"2026-12-01T10:00:00Z","endAt":"2026-12-01T10:05:00Z","cpuCount":2,"memoryMB":512,"diskSizeMB":1024,"state":"running","envdVersion":"0.6.4","metadata":{"k":"v"},"envdAccessToken":"tok"}"#
        );
        let back: SandboxDetail =
            serde_json::from_str(&serde_json::to_string(&detail).unwrap()).unwrap();
        assert_eq!(back, detail);
        let fork = vec![
            ForkResult::Sandbox(c),
            ForkResult::Error(ApiError::new(429, "too many children")),
        ];
        let json = serde_json::to_string(&fork).unwrap();
        assert!(json.starts_with(r#"[{"sandbox":{"templateID""#), "{json}");
        assert!(
            json.ends_with(r#"{"error":{"code":429,"message":"too many children"}}]"#),
            "{json}"
        );
        assert_eq!(
            ApiError::sandbox_not_found("x").to_json(),
            br#"{"code":404,"message":"sandbox x not found"}"#
        );
    }

    #[test]
    fn small_requests() {
        let r: TimeoutRequest = serde_json::from_str(r#"{"timeout":30}"#).unwrap();
        r.validate().unwrap();
        assert!(TimeoutRequest { timeout: 0 }.validate().is_err());
        let p: PauseRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(p, PauseRequest::default());
        let p: PauseRequest =
            serde_json::from_str(r#"{"memory":false,"requireHealthyGuest":true}"#).unwrap();
        assert_eq!(
            (p.memory, p.require_healthy_guest),
            (Some(false), Some(true))
        );
        let c: ConnectRequest = serde_json::from_str(r#"{"timeout":60}"#).unwrap();
        c.validate().unwrap();
        let f: ForkRequest = serde_json::from_str(r#"{"timeout":60,"count":2}"#).unwrap();
        f.validate().unwrap();
        assert_eq!((f.count(), f.timeout_secs()), (2, 60));
        let f: ForkRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(
            (f.count(), f.timeout_secs()),
            (1, DEFAULT_FORK_TIMEOUT_SECS)
        );
        assert!(ForkRequest {
            count: Some(21),
            timeout: None
        }
        .validate()
        .is_err());
        assert!(ForkRequest {
            count: Some(0),
            timeout: None
        }
        .validate()
        .is_err());
        assert!(serde_json::from_str::<ForkRequest>(r#"{"count":-1}"#).is_err());
    }

    #[test]
    fn list_query_decodes_the_captured_request() {
        // Sandbox.list(query=SandboxQuery(metadata={"k y": "v&w"}, state=[RUNNING]), limit=10)
        let q = ListQuery::parse(
            "metadata=k%252520y%3Dv%252526w&state=running&nextToken=page2&limit=10",
        )
        .unwrap();
        assert_eq!(q.metadata["k y"], "v&w");
        assert_eq!(q.states, [SandboxState::Running]);
        assert_eq!(q.next_token.as_deref(), Some("page2"));
        assert_eq!(q.limit, Some(10));
        let q = ListQuery::parse("state=running,paused&order=desc&startedAfter=2026-12-01T11%3A00%3A00%2B01%3A00&template=base").unwrap();
        assert_eq!(q.states.len(), 2);
        assert!(q.descending);
        assert_eq!(q.started_after, Some(t("2026-12-01T10:00:00Z")));
        let md: BTreeMap<String, String> = [("k".to_string(), "v".to_string())].into();
        assert!(q.matches(SandboxState::Paused, "base", t("2026-12-01T10:00:00Z"), &md));
        assert!(!q.matches(
            SandboxState::Paused,
            "other",
            t("2026-12-01T10:00:00Z"),
            &md
        ));
        assert!(!q.matches(SandboxState::Paused, "base", t("2026-12-01T09:59:59Z"), &md));
        let q = ListQuery::parse("metadata=k%3Dv").unwrap();
        assert!(q.matches(SandboxState::Running, "x", t("2026-12-01T10:00:00Z"), &md));
        assert!(!q.matches(
            SandboxState::Running,
            "x",
            t("2026-12-01T10:00:00Z"),
            &BTreeMap::new()
        ));
        assert_eq!(ListQuery::parse("").unwrap(), ListQuery::default());
        for bad in [
            "state=dead",
            "order=up",
            "limit=0",
            "limit=101",
            "limit=x",
            "startedAfter=now",
            "metadata=%2525FF%3Dx",
        ] {
            assert_eq!(ListQuery::parse(bad).unwrap_err().code, 400, "{bad}");
        }
    }
}
