//! The code interpreter's `POST /execute` (port 49999) over the seam's
//! stateful `eval`: the sandbox's one persistent Python interpreter is the
//! default context, so variables live on between `run_code` calls and into
//! forks. The answer is E2B's NDJSON, written when the cell has finished
//! (`eval` is not streamed). Other contexts (`/contexts`) are not served.

use std::sync::Arc;

use axum::extract::Request;
use axum::response::Response;
use forkd_e2b::envd::files::error_body;
use forkd_e2b::routes::RouteMatch;
use serde::Deserialize;
use serde_json::json;

use super::{blocking, read_body, reply, E2b};

/// Largest `/execute` request.
const MAX_BODY: usize = 4 << 20;

#[derive(Deserialize)]
struct Execute {
    code: String,
    #[serde(default)]
    context_id: Option<String>,
    #[serde(default)]
    language: Option<String>,
}

/// Dispatches a code-interpreter route for sandbox `id` (token checked).
pub(crate) async fn dispatch(e2b: Arc<E2b>, id: String, m: RouteMatch, req: Request) -> Response {
    let not_served = |what: &str| {
        reply(
            502,
            "application/json",
            error_body(
                502,
                &format!("port is not open: forkd's code interpreter serves only /execute in the default Python context, not {what}"),
            ),
        )
    };
    if m.route.path != "/execute" {
        return not_served(m.route.path);
    }
    let body = match read_body(req.into_body(), MAX_BODY).await {
        Ok(b) => b,
        Err(msg) => return reply(400, "text/plain", msg.into_bytes()),
    };
    let exec: Execute = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => {
            return reply(
                400,
                "text/plain",
                format!("the body is not an /execute request: {e}").into_bytes(),
            )
        }
    };
    if exec.context_id.is_some() {
        return reply(
            404,
            "text/plain",
            b"forkd serves only the default context: leave `context` out".to_vec(),
        );
    }
    if exec.language.as_deref().is_some_and(|l| l != "python") {
        return reply(
            400,
            "text/plain",
            b"forkd's code interpreter runs Python only".to_vec(),
        );
    }
    let ops = e2b.ops.clone();
    let out = match blocking(move || ops.eval(&id, &exec.code, None)).await {
        Ok(o) => o,
        Err(e) => {
            let status = super::control::status_of(&e);
            return reply(status, "text/plain", e.message.into_bytes());
        }
    };
    let mut lines =
        vec![json!({"type": "number_of_executions", "execution_count": out.execution_count})];
    if !out.stdout.is_empty() {
        lines.push(json!({"type": "stdout", "text": out.stdout}));
    }
    if !out.stderr.is_empty() {
        lines.push(json!({"type": "stderr", "text": out.stderr}));
    }
    if let Some(v) = &out.value {
        lines.push(json!({"type": "result", "is_main_result": true, "text": v}));
    }
    if let Some(e) = &out.error {
        lines.push(
            json!({"type": "error", "name": e.name, "value": e.value, "traceback": e.traceback}),
        );
    }
    lines.push(json!({"type": "end_of_execution"}));
    let mut text = String::new();
    for l in lines {
        text.push_str(&l.to_string());
        text.push('\n');
    }
    reply(200, "application/x-ndjson", text.into_bytes())
}
