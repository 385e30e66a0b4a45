//! Turning request bytes into validated typed requests, with errors that name
//! the field.
//!
//! serde's own messages say *what* is wrong but not *where* ("invalid type:
//! string, expected usize at line 1 column 9"); `serde_path_to_error` supplies the
//! path (`n`, `env.PATH`, `args[2]`), and this module turns the pair into an
//! [`ApiError::InvalidField`]. It never panics on any input: the property tests
//! in `tests/decode_props.rs` feed it arbitrary bytes and JSON.

use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::validate::Validate;

/// Body limit of every route that does not set its own: 1 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;
/// Body limit of `PUT /v1/sandboxes/{id}/files`: 64 MiB of JSON, so about
/// 48 MiB of file content once base64-decoded.
pub const FILE_BODY_LIMIT: usize = 64 << 20;

/// The field name used when the whole body, not one field, is wrong.
pub const BODY: &str = "(body)";
/// The field name used when the whole query string, not one field, is wrong.
pub const QUERY: &str = "(query)";

/// Decodes and validates a JSON request body of at most `limit` bytes.
///
/// An empty (or all-whitespace) body reads as `{}`, so routes whose fields are
/// all optional (branch) can be called without one.
pub fn decode_json<T>(body: &[u8], limit: usize) -> Result<T, ApiError>
where
    T: DeserializeOwned + Validate,
{
    if body.len() > limit {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    // serde would also read a struct from an array (`["py", 3]`); the API only
    // speaks objects.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::field(BODY, "must be a JSON object"));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(json_error)?;
    de.end()
        .map_err(|e| ApiError::field(BODY, format!("trailing data after the JSON value: {e}")))?;
    value.validate()?;
    Ok(value)
}

/// Decodes and validates a query string (without the `?`; `None` when the URL
/// has none).
pub fn decode_query<T>(query: Option<&str>) -> Result<T, ApiError>
where
    T: DeserializeOwned + Validate,
{
    let query = query.unwrap_or("");
    let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
    let value: T = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        field_error(&path, &message, QUERY)
    })?;
    value.validate()?;
    Ok(value)
}

fn json_error(err: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = err.path().to_string();
    let inner = err.into_inner();
    if inner.is_syntax() || inner.is_eof() || inner.is_io() {
        return ApiError::field(BODY, format!("not valid JSON: {inner}"));
    }
    // serde_json appends the position; the field name says more.
    let message = inner.to_string();
    let suffix = format!(" at line {} column {}", inner.line(), inner.column());
    let message = message.strip_suffix(&suffix).unwrap_or(&message);
    field_error(&path, message, BODY)
}

/// Picks the field to name: serde reports unknown and missing fields in the
/// message with the *parent's* path, everything else at the field's own path.
fn field_error(path: &str, message: &str, whole: &str) -> ApiError {
    let parent = if path == "." { "" } else { path };
    let join = |name: &str| {
        if parent.is_empty() {
            name.to_owned()
        } else {
            format!("{parent}.{name}")
        }
    };
    if let Some(name) = backticked_after(message, "unknown field `") {
        // The path already ends in the unknown key.
        let field = if name.is_empty() {
            join("\"\"")
        } else if path.rsplit('.').next() == Some(name) {
            path.to_owned()
        } else {
            join(name)
        };
        let expected = message
            .split_once(", expected ")
            .map(|(_, rest)| {
                let rest = rest.strip_prefix("one of ").unwrap_or(rest);
                format!("; known fields: {rest}")
            })
            .unwrap_or_default();
        return ApiError::field(field, format!("unknown field{expected}"));
    }
    if let Some(name) = backticked_after(message, "missing field `") {
        return ApiError::field(join(name), "missing required field");
    }
    if parent.is_empty() {
        let message = if message.starts_with("invalid type") && message.contains("expected struct")
        {
            "must be a JSON object".to_owned()
        } else {
            message.to_owned()
        };
        return ApiError::field(whole, message);
    }
    ApiError::field(parent, message)
}

fn backticked_after<'m>(message: &'m str, prefix: &str) -> Option<&'m str> {
    let rest = message.strip_prefix(prefix)?;
    rest.split_once('`').map(|(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::*;

    fn err<T: DeserializeOwned + Validate + std::fmt::Debug>(body: &str) -> ApiError {
        decode_json::<T>(body.as_bytes(), DEFAULT_BODY_LIMIT).unwrap_err()
    }

    fn field<T: DeserializeOwned + Validate + std::fmt::Debug>(body: &str) -> String {
        let e = err::<T>(body);
        assert_eq!(e.status(), 400, "{e}");
        e.field_name().expect("a field-naming error").to_owned()
    }

    #[test]
    fn legacy_spawn_defaults() {
        let r: SpawnRequest = decode_json(br#"{"snapshot_tag":"py"}"#, DEFAULT_BODY_LIMIT).unwrap();
        assert_eq!(r.n, 1);
        assert!(!r.per_child_netns && !r.prewarm && !r.live_fork && !r.hugepages);
        assert_eq!(r.memory_limit_mib, None);
    }

    #[test]
    fn every_legacy_spawn_field_is_known() {
        let body = r#"{"snapshot_tag":"py","n":10,"per_child_netns":true,
            "memory_limit_mib":256,"prewarm":true,"live_fork":true,"hugepages":true}"#;
        let r: SpawnRequest = decode_json(body.as_bytes(), DEFAULT_BODY_LIMIT).unwrap();
        assert_eq!((r.n, r.memory_limit_mib), (10, Some(256)));
    }

    #[test]
    fn unknown_field_is_named() {
        let e = err::<SpawnRequest>(r#"{"snapshot_tag":"py","nn":3}"#);
        assert_eq!(e.field_name(), Some("nn"));
        let e = err::<SpawnRequest>(r#"{"":1}"#);
        assert_eq!(e.field_name(), Some("\"\""));
        assert!(e.to_string().contains("unknown field"), "{e}");
        assert!(
            e.to_string().contains("`snapshot_tag`"),
            "lists known fields: {e}"
        );
    }

    #[test]
    fn wrong_type_is_named() {
        assert_eq!(
            field::<SpawnRequest>(r#"{"snapshot_tag":"py","n":"ten"}"#),
            "n"
        );
        assert_eq!(
            field::<SpawnRequest>(r#"{"snapshot_tag":"py","n":-1}"#),
            "n"
        );
        assert_eq!(
            field::<SpawnRequest>(r#"{"snapshot_tag":"py","n":2.5}"#),
            "n"
        );
        assert_eq!(
            field::<SpawnRequest>(r#"{"snapshot_tag":7}"#),
            "snapshot_tag"
        );
        assert_eq!(field::<ExecRequest>(r#"{"args":["ls",3]}"#), "args[1]");
        assert_eq!(
            field::<ExecRequest>(r#"{"args":["ls"],"env":{"A":1}}"#),
            "env.A"
        );
        assert_eq!(field::<BranchRequest>(r#"{"mode":"fast"}"#), "mode");
        assert_eq!(field::<BranchRequest>(r#"{"wait":"no"}"#), "wait");
    }

    #[test]
    fn wrong_type_message_has_no_position_noise() {
        let e = err::<SpawnRequest>(r#"{"snapshot_tag":"py","n":"ten"}"#);
        assert!(!e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn missing_field_is_named() {
        assert_eq!(field::<SpawnRequest>(r#"{"n":3}"#), "snapshot_tag");
        assert_eq!(field::<ExecRequest>("{}"), "args");
        assert_eq!(field::<SpawnRequest>(""), "snapshot_tag");
    }

    #[test]
    fn n_out_of_range_is_refused_naming_n() {
        for n in [0, 1001, 1_000_000] {
            let body = format!(r#"{{"snapshot_tag":"py","n":{n}}}"#);
            assert_eq!(field::<SpawnRequest>(&body), "n", "n={n}");
        }
        let body = r#"{"snapshot_tag":"py","n":1000}"#;
        assert!(decode_json::<SpawnRequest>(body.as_bytes(), DEFAULT_BODY_LIMIT).is_ok());
    }

    #[test]
    fn bad_tags_are_refused_everywhere() {
        for tag in ["", "../etc", ".hidden", "a b", "a/b", &"t".repeat(65)] {
            let q = serde_json::to_string(tag).unwrap();
            assert_eq!(
                field::<SpawnRequest>(&format!(r#"{{"snapshot_tag":{q}}}"#)),
                "snapshot_tag"
            );
            assert_eq!(field::<BranchRequest>(&format!(r#"{{"tag":{q}}}"#)), "tag");
            assert_eq!(
                field::<BranchRequest>(&format!(r#"{{"parent_tag":{q}}}"#)),
                "parent_tag"
            );
            assert_eq!(field::<BootRequest>(&format!(r#"{{"tag":{q}}}"#)), "tag");
        }
    }

    #[test]
    fn oversize_body_is_413() {
        let body = format!(r#"{{"code":"{}"}}"#, "x".repeat(100));
        let e = decode_json::<EvalRequest>(body.as_bytes(), 64).unwrap_err();
        assert_eq!(e.status(), 413);
        assert!(decode_json::<EvalRequest>(body.as_bytes(), body.len()).is_ok());
    }

    #[test]
    fn not_json_and_not_an_object() {
        let e = err::<SpawnRequest>("{\"snapshot_tag\":");
        assert_eq!(e.field_name(), Some(BODY));
        assert!(e.to_string().contains("not valid JSON"), "{e}");
        let e = err::<SpawnRequest>("[1,2]");
        assert_eq!(e.field_name(), Some(BODY));
        assert!(e.to_string().contains("JSON object"), "{e}");
        let e = err::<SpawnRequest>(r#"{"snapshot_tag":"py"} {}"#);
        assert_eq!(e.field_name(), Some(BODY));
    }

    #[test]
    fn legacy_branch_booleans_are_accepted() {
        let r: BranchRequest = decode_json(b"", DEFAULT_BODY_LIMIT).unwrap();
        assert_eq!(r, BranchRequest::default());
        assert_eq!(r.effective_mode(), BranchMode::Live);

        let r: BranchRequest =
            decode_json(br#"{"diff":true,"measure_diff":true}"#, DEFAULT_BODY_LIMIT).unwrap();
        assert_eq!(r.effective_mode(), BranchMode::Live);

        let r: BranchRequest = decode_json(
            br#"{"tag":"cp-1","live":true,"wait":false,"parent_tag":"py"}"#,
            DEFAULT_BODY_LIMIT,
        )
        .unwrap();
        assert_eq!(r.wait, Some(false));

        let r: BranchRequest = decode_json(br#"{"mode":"full"}"#, DEFAULT_BODY_LIMIT).unwrap();
        assert_eq!(r.effective_mode(), BranchMode::Full);
        let r: BranchRequest = decode_json(br#"{"mode":"diff"}"#, DEFAULT_BODY_LIMIT).unwrap();
        assert_eq!(r.effective_mode(), BranchMode::Live);
    }

    #[test]
    fn contradictory_branch_flags_are_refused() {
        assert_eq!(
            field::<BranchRequest>(r#"{"diff":true,"live":true}"#),
            "live"
        );
        assert_eq!(
            field::<BranchRequest>(r#"{"mode":"full","live":true}"#),
            "mode"
        );
    }

    #[test]
    fn exec_legacy_and_rich() {
        let r: ExecRequest = decode_json(br#"{"args":["ls"]}"#, DEFAULT_BODY_LIMIT).unwrap();
        assert_eq!(r.timeout_secs, 30);
        let r: ExecRequest = decode_json(
            br#"{"args":["sh","-c","cat"],"timeout_secs":5,"env":{"A":"1"},"cwd":"/tmp","stdin_b64":"aGk="}"#,
            DEFAULT_BODY_LIMIT,
        )
        .unwrap();
        assert_eq!(r.env["A"], "1");
        assert_eq!(field::<ExecRequest>(r#"{"args":[]}"#), "args");
        assert_eq!(field::<ExecRequest>(r#"{"args":[""]}"#), "args[0]");
        assert_eq!(
            field::<ExecRequest>(r#"{"args":["ls"],"timeout_secs":0}"#),
            "timeout_secs"
        );
        assert_eq!(
            field::<ExecRequest>(r#"{"args":["ls"],"env":{"A=B":"1"}}"#),
            "env.A=B"
        );
        assert_eq!(
            field::<ExecRequest>(r#"{"args":["ls"],"cwd":"tmp"}"#),
            "cwd"
        );
        assert_eq!(
            field::<ExecRequest>(r#"{"args":["ls"],"stdin_b64":"***"}"#),
            "stdin_b64"
        );
    }

    #[test]
    fn files() {
        let r: FileWriteRequest = decode_json(
            br#"{"path":"/tmp/x","content_b64":"aGVsbG8=","mode":420}"#,
            FILE_BODY_LIMIT,
        )
        .unwrap();
        assert_eq!(r.content().unwrap(), b"hello");
        assert_eq!(
            field::<FileWriteRequest>(r#"{"path":"/x","content_b64":"%%"}"#),
            "content_b64"
        );
        assert_eq!(
            field::<FileWriteRequest>(r#"{"path":"/x","content_b64":"","mode":4096}"#),
            "mode"
        );
    }

    #[test]
    fn boot_and_pool() {
        let r: BootRequest = decode_json(b"{}", DEFAULT_BODY_LIMIT).unwrap();
        assert_eq!(r.image, Image::Busybox);
        let r: BootRequest = decode_json(
            br#"{"image":"debian-python","memory_mib":512}"#,
            DEFAULT_BODY_LIMIT,
        )
        .unwrap();
        assert_eq!(r.image, Image::DebianPython);
        assert_eq!(field::<BootRequest>(r#"{"image":"ubuntu"}"#), "image");
        assert_eq!(field::<BootRequest>(r#"{"memory_mib":1}"#), "memory_mib");
        assert_eq!(field::<PoolRequest>(r#"{"size":1001}"#), "size");
    }

    #[test]
    fn queries() {
        let q: DeleteSnapshotQuery = decode_query(None).unwrap();
        assert_eq!(q, DeleteSnapshotQuery::default());
        let q: DeleteSnapshotQuery = decode_query(Some("cascade=true")).unwrap();
        assert!(q.cascade && !q.force);
        let e = decode_query::<DeleteSnapshotQuery>(Some("cascade=true&force=true")).unwrap_err();
        assert_eq!(e.field_name(), Some("force"));
        let e = decode_query::<DeleteSnapshotQuery>(Some("recursive=true")).unwrap_err();
        assert_eq!(e.field_name(), Some("recursive"));
        let e = decode_query::<DeleteSnapshotQuery>(Some("force=yes")).unwrap_err();
        assert_eq!(e.field_name(), Some("force"));
        let q: FileReadQuery = decode_query(Some("path=%2Fetc%2Fhostname")).unwrap();
        assert_eq!(q.path, "/etc/hostname");
        let e = decode_query::<FileReadQuery>(None).unwrap_err();
        assert_eq!(e.field_name(), Some("path"));
    }
}
