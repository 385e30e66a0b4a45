//! The API's one error type and its mapping to HTTP status codes.
//!
//! Every handler error ends up as an [`ApiError`]; the server turns it into a
//! status line, an optional `Retry-After` header and the legacy-compatible body
//! `{"error": "..."}` ([`ErrorBody`]). The mapping lives here so that no handler
//! picks a status code by itself.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The body of every 4xx and 5xx answer: `{"error": "human-readable message"}`,
/// as the runtime forkd grew from sent it, with forkd's structured fields
/// beside it for errors of the operations themselves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    /// What went wrong and, where there is one, how to fix it.
    pub error: String,
    /// forkd: the kind of failure (`bad_input`, `not_found`, `conflict`,
    /// `busy`, `unprocessable`, `permission_denied`, `internal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// forkd: what went wrong, without the advice in `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// forkd: the advice as data (`{"do": "list_snapshots"}`, ...), for
    /// clients that word it themselves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<serde_json::Value>,
}

/// Everything an API call can fail with, each variant carrying its HTTP status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400: the body or query is not what the route accepts. `field` names the
    /// offending field (`n`, `env.PATH`, `args[2]`), or `(body)` / `(query)` when
    /// the whole thing is wrong.
    #[error("invalid `{field}`: {message}")]
    InvalidField {
        /// The offending field's path.
        field: String,
        /// What is wrong with it.
        message: String,
    },

    /// 400: the request is well-formed JSON but not valid for another reason
    /// (not tied to one field).
    #[error("{0}")]
    BadRequest(String),

    /// 401: no bearer token, or the wrong one.
    #[error("{0}")]
    Unauthorized(String),

    /// 404: the named sandbox, snapshot or route does not exist.
    #[error("{what} `{name}` not found")]
    NotFound {
        /// `sandbox`, `snapshot`, `file` or `route`.
        what: &'static str,
        /// The id, tag or path that was asked for.
        name: String,
    },

    /// 404 with a message of its own (e.g. from the fleet, which names what is
    /// missing and how to list what exists).
    #[error("{0}")]
    Gone(String),

    /// 409: the target exists but its state forbids the call (a tag that is
    /// taken, a snapshot still being written, a snapshot others depend on).
    #[error("{message}")]
    Conflict {
        /// What conflicts, and how to resolve it.
        message: String,
        /// Tags that depend on the target, for refused snapshot deletions.
        dependents: Vec<String>,
    },

    /// 413: the body is larger than the route accepts.
    #[error("request body is larger than the limit of {limit} bytes for this route")]
    PayloadTooLarge {
        /// The route's body limit in bytes.
        limit: usize,
    },

    /// 422: the request is valid, but the target cannot do what it asks.
    #[error("{0}")]
    Unprocessable(String),

    /// 429: a concurrency limit is reached; retry after `retry_after_secs`.
    #[error(
        "too many concurrent {what} operations (limit {limit}); retry in {retry_after_secs} s"
    )]
    TooManyRequests {
        /// The kind of operation (`spawn`, `branch`).
        what: &'static str,
        /// How many may run at once.
        limit: usize,
        /// The `Retry-After` to send.
        retry_after_secs: u64,
    },

    /// 503: the daemon cannot serve the call now (shutting down, a dependency
    /// such as QEMU unavailable).
    #[error("{0}")]
    Unavailable(String),

    /// 500: forkd itself failed.
    #[error("{0}")]
    Internal(String),

    /// An operation failed: its status follows its kind, its text is its
    /// message with the hint worded for API callers.
    #[error("{}", api_text(.0))]
    Op(forkd_ops::OpError),
}

impl From<forkd_ops::OpError> for ApiError {
    fn from(e: forkd_ops::OpError) -> ApiError {
        ApiError::Op(e)
    }
}

impl ApiError {
    /// A 400 naming `field`.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidField {
            field: field.into(),
            message: message.into(),
        }
    }

    /// A 404 for the sandbox `id`.
    pub fn sandbox_not_found(id: &str) -> Self {
        Self::NotFound {
            what: "sandbox",
            name: id.to_owned(),
        }
    }

    /// A 404 for the snapshot `tag`.
    pub fn snapshot_not_found(tag: &str) -> Self {
        Self::NotFound {
            what: "snapshot",
            name: tag.to_owned(),
        }
    }

    /// The 409 for deleting a snapshot others still depend on; the message names
    /// every dependent and the two ways out.
    pub fn snapshot_has_dependents(tag: &str, dependents: Vec<String>) -> Self {
        let names = dependents
            .iter()
            .map(|d| format!("`{d}`"))
            .collect::<Vec<_>>()
            .join(", ");
        Self::Conflict {
            message: format!(
                "snapshot `{tag}` has dependents: {names}; delete them first, \
                 or pass ?cascade=true to delete them too, or ?force=true to orphan them"
            ),
            dependents,
        }
    }

    /// A 409 for any other state conflict.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::Conflict {
            message: message.into(),
            dependents: Vec::new(),
        }
    }

    /// The HTTP status code.
    pub fn status(&self) -> u16 {
        match self {
            Self::InvalidField { .. } | Self::BadRequest(_) => 400,
            Self::Unauthorized(_) => 401,
            Self::NotFound { .. } | Self::Gone(_) => 404,
            Self::Conflict { .. } => 409,
            Self::PayloadTooLarge { .. } => 413,
            Self::Unprocessable(_) => 422,
            Self::TooManyRequests { .. } => 429,
            Self::Unavailable(_) => 503,
            Self::Internal(_) => 500,
            Self::Op(e) => match e.kind {
                forkd_ops::ErrorKind::BadInput => 400,
                forkd_ops::ErrorKind::PermissionDenied => 403,
                forkd_ops::ErrorKind::NotFound => 404,
                forkd_ops::ErrorKind::Conflict | forkd_ops::ErrorKind::Busy => 409,
                forkd_ops::ErrorKind::Unprocessable => 422,
                forkd_ops::ErrorKind::Internal => 500,
            },
        }
    }

    /// The value of the `Retry-After` header (seconds), for 429.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Self::TooManyRequests {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        }
    }

    /// The field a 400 names, if it names one.
    pub fn field_name(&self) -> Option<&str> {
        match self {
            Self::InvalidField { field, .. } => Some(field),
            _ => None,
        }
    }

    /// The JSON body to send.
    pub fn body(&self) -> ErrorBody {
        match self {
            Self::Op(e) => ErrorBody {
                error: self.to_string(),
                kind: Some(e.kind.as_str().to_string()),
                message: Some(e.message.clone()),
                hint: e
                    .hint
                    .as_ref()
                    .map(|h| serde_json::to_value(h).expect("hints serialise")),
            },
            _ => ErrorBody {
                error: self.to_string(),
                kind: None,
                message: None,
                hint: None,
            },
        }
    }
}

/// A hint worded for API callers.
pub fn api_hint(hint: &forkd_ops::Hint) -> String {
    use forkd_ops::Hint as H;
    match hint {
        H::ListSandboxes => "GET /v1/sandboxes lists them".into(),
        H::ListSnapshots => "GET /v1/snapshots lists them".into(),
        H::KillSandbox { id } => format!("remove it with DELETE /v1/sandboxes/{id}"),
        H::RemoveSnapshot { tag } => format!("delete it with DELETE /v1/snapshots/{tag}"),
        H::WaitForSnapshot { tag } => {
            format!("retry when GET /v1/snapshots/{tag}/info says ready")
        }
        H::BranchLive { id } => {
            format!("branch it live instead: POST /v1/sandboxes/{id}/branch with mode `live`")
        }
        H::RemoveDependentsOrForce { .. } => {
            "delete them first, or pass ?cascade=true to delete them too, or ?force=true to orphan them".into()
        }
        H::PickAnotherTag { tag } => {
            format!("pick another tag or delete it with DELETE /v1/snapshots/{tag}")
        }
        H::BuildImage { image } => format!("the daemon builds image `{image}` on first use"),
        H::UsePythonImage => "boot it with image `debian-python`".into(),
        H::ProvideToken => "send `Authorization: Bearer <token>` with the daemon's token (its --token-file or $FORKD_TOKEN)".into(),
    }
}

/// An operation's error as an API caller reads it: the message, then the
/// hint in API terms.
pub fn api_text(e: &forkd_ops::OpError) -> String {
    match &e.hint {
        Some(h) => format!("{}; {}", e.message, api_hint(h)),
        None => e.message.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_retry_after() {
        let cases = [
            (ApiError::field("n", "x"), 400),
            (ApiError::BadRequest("x".into()), 400),
            (ApiError::Unauthorized("x".into()), 401),
            (ApiError::sandbox_not_found("sb1"), 404),
            (ApiError::Gone("x".into()), 404),
            (ApiError::conflict("x"), 409),
            (ApiError::PayloadTooLarge { limit: 1 }, 413),
            (ApiError::Unprocessable("x".into()), 422),
            (
                ApiError::TooManyRequests {
                    what: "spawn",
                    limit: 4,
                    retry_after_secs: 2,
                },
                429,
            ),
            (ApiError::Unavailable("x".into()), 503),
            (ApiError::Internal("x".into()), 500),
        ];
        for (err, status) in cases {
            assert_eq!(err.status(), status, "{err:?}");
            assert_eq!(err.retry_after_secs().is_some(), status == 429, "{err:?}");
        }
    }

    #[test]
    fn dependents_are_named_in_the_409() {
        let err = ApiError::snapshot_has_dependents("base", vec!["a".into(), "b".into()]);
        assert_eq!(err.status(), 409);
        let body = serde_json::to_value(err.body()).unwrap();
        let text = body["error"].as_str().unwrap();
        assert!(text.contains("`a`, `b`"), "{text}");
        assert!(text.contains("cascade=true"), "{text}");
    }
}
