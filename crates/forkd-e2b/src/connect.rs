//! The Connect protocol as envd speaks it with the JSON codec: error codes and
//! their HTTP statuses, unary error bodies, the 5-byte envelopes of streaming
//! calls (flag byte, big-endian length, payload), the end-of-stream message,
//! and decoding of requests (content type, `Connect-Timeout-Ms`, messages).
//!
//! Only identity compression is spoken: the SDK turns compression off in both
//! directions, so a compressed envelope is refused rather than inflated (no
//! decompression bomb to bound). Envelopes are decoded incrementally with a
//! size limit checked from the header, before any payload is buffered.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Content type of unary requests and responses with the JSON codec.
pub const UNARY_JSON: &str = "application/json";
/// Content type of streaming requests and responses with the JSON codec.
pub const STREAM_JSON: &str = "application/connect+json";
/// Bytes before an envelope's payload: one flag byte and a big-endian `u32`
/// length.
pub const ENVELOPE_HEADER_LEN: usize = 5;
/// Envelope flag: the payload is compressed (refused here).
pub const FLAG_COMPRESSED: u8 = 0b01;
/// Envelope flag: the end-of-stream message, the last envelope of a response.
pub const FLAG_END_STREAM: u8 = 0b10;
/// Largest message accepted by default, unary or enveloped (4 MiB). envd's
/// own messages are far smaller: output arrives in 32 KiB chunks.
pub const DEFAULT_MAX_MESSAGE: usize = 4 << 20;
/// Longest `Connect-Timeout-Ms` value the protocol allows (10 digits).
const MAX_TIMEOUT_DIGITS: usize = 10;

/// A Connect error code. Serialized as its lower-case name (`"not_found"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Code {
    /// `canceled`
    Canceled,
    /// `unknown`
    Unknown,
    /// `invalid_argument`
    InvalidArgument,
    /// `deadline_exceeded`
    DeadlineExceeded,
    /// `not_found`
    NotFound,
    /// `already_exists`
    AlreadyExists,
    /// `permission_denied`
    PermissionDenied,
    /// `resource_exhausted`
    ResourceExhausted,
    /// `failed_precondition`
    FailedPrecondition,
    /// `aborted`
    Aborted,
    /// `out_of_range`
    OutOfRange,
    /// `unimplemented`
    Unimplemented,
    /// `internal`
    Internal,
    /// `unavailable`
    Unavailable,
    /// `data_loss`
    DataLoss,
    /// `unauthenticated`
    Unauthenticated,
}

impl Code {
    /// Every code, in the order of their numeric gRPC values.
    pub const ALL: [Code; 16] = [
        Code::Canceled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "data_loss",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The code named `name`, if it is one.
    pub fn parse(name: &str) -> Option<Code> {
        Code::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// The HTTP status of a unary error with this code, as connect-go sends
    /// it (and as `connectrpc`'s client maps it back).
    pub fn http_status(self) -> u16 {
        match self {
            Code::Canceled => 499,
            Code::Unknown | Code::Internal | Code::DataLoss => 500,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
            Code::DeadlineExceeded => 504,
            Code::NotFound => 404,
            Code::AlreadyExists | Code::Aborted => 409,
            Code::PermissionDenied => 403,
            Code::ResourceExhausted => 429,
            Code::Unimplemented => 501,
            Code::Unavailable => 503,
            Code::Unauthenticated => 401,
        }
    }

    /// The code the e2b SDK assigns to an error answer that carries no
    /// Connect code (a plain HTTP error from a proxy): its
    /// `PLAIN_HTTP_ERROR_CODES` table (`e2b/envd/client_shared.py`), `Unknown`
    /// for other statuses.
    pub fn from_plain_http_status(status: u16) -> Code {
        match status {
            400 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            409 => Code::AlreadyExists,
            413 | 429 => Code::ResourceExhausted,
            499 => Code::Canceled,
            500 => Code::Internal,
            501 | 505 => Code::Unimplemented,
            502 | 503 => Code::Unavailable,
            504 => Code::DeadlineExceeded,
            _ => Code::Unknown,
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Code {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Code {
    /// An unknown code name reads as `unknown`, as Connect clients do.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Ok(Code::parse(&name).unwrap_or(Code::Unknown))
    }
}

/// A Connect error: the JSON body of a failed unary call and the `error` of an
/// end-of-stream message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ConnectError {
    /// What kind of failure.
    pub code: Code,
    /// For people; the SDK puts it into its exception's text.
    #[serde(default)]
    pub message: String,
}

impl ConnectError {
    /// An error with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ConnectError {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status of this error as a unary answer.
    pub fn http_status(&self) -> u16 {
        self.code.http_status()
    }

    /// The body of this error as a unary answer (`content-type:
    /// application/json`).
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of a code and a string always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The payload of the end-of-stream envelope: `{}` on success, `error` on
/// failure, `metadata` for trailers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndStream {
    /// Why the stream failed; absent when it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ConnectError>,
    /// Trailers, each a list of values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, Vec<String>>,
}

impl EndStream {
    /// A successful end.
    pub fn ok() -> Self {
        EndStream::default()
    }

    /// An end that reports `error`.
    pub fn failed(error: ConnectError) -> Self {
        EndStream {
            error: Some(error),
            metadata: BTreeMap::new(),
        }
    }

    /// This end-of-stream message as a complete envelope.
    pub fn to_envelope(&self) -> Vec<u8> {
        let payload = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        // An error message long enough to overflow a u32 cannot come from a
        // 4 MiB-bounded world; fall back to a bare failure rather than panic.
        encode_envelope(FLAG_END_STREAM, &payload).unwrap_or_else(|_| {
            let fallback = EndStream::failed(ConnectError::new(
                Code::Internal,
                "end-of-stream message too large",
            ));
            let bytes = serde_json::to_vec(&fallback).unwrap_or_else(|_| b"{}".to_vec());
            let mut out = vec![FLAG_END_STREAM];
            out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            out.extend_from_slice(&bytes);
            out
        })
    }

    /// Parses the payload of an end-of-stream envelope.
    pub fn parse(payload: &[u8]) -> Result<EndStream, CodecError> {
        serde_json::from_slice(payload).map_err(|e| CodecError::BadJson {
            what: "end-of-stream message",
            reason: e.to_string(),
        })
    }
}

/// One envelope of a Connect stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The flag byte ([`FLAG_COMPRESSED`], [`FLAG_END_STREAM`]).
    pub flags: u8,
    /// The message bytes.
    pub payload: Vec<u8>,
}

impl Envelope {
    /// Whether this is the end-of-stream message.
    pub fn is_end_stream(&self) -> bool {
        self.flags & FLAG_END_STREAM != 0
    }

    /// Whether the payload claims to be compressed.
    pub fn is_compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }
}

/// Why bytes are not a valid envelope stream or message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// An envelope's header announced more than the limit.
    #[error(
        "a Connect envelope announces {len} bytes, more than the {max}-byte limit; \
         send smaller messages (stdin and file data in chunks)"
    )]
    TooLarge {
        /// The announced length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// The stream ended inside an envelope.
    #[error("the Connect stream ended inside an envelope: {received} of {expected} bytes arrived")]
    Truncated {
        /// Bytes of the envelope (header included) that arrived.
        received: usize,
        /// Bytes it needed.
        expected: usize,
    },
    /// A compressed envelope although identity was negotiated.
    #[error(
        "a Connect envelope is flagged compressed but no compression was negotiated; \
         send `connect-content-encoding: identity`"
    )]
    Compressed,
    /// The client sent an end-of-stream flag (only servers end streams).
    #[error("a request envelope carries the end-of-stream flag, which only responses may use")]
    UnexpectedEndStream,
    /// Flag bits the protocol does not define.
    #[error("a Connect envelope has unknown flag bits {flags:#04x}")]
    UnknownFlags {
        /// The flag byte.
        flags: u8,
    },
    /// The message is not the JSON the method expects.
    #[error("the {what} is not valid JSON for it: {reason}")]
    BadJson {
        /// Which message.
        what: &'static str,
        /// serde's reason, naming the field.
        reason: String,
    },
}

impl CodecError {
    /// The Connect error a server answers with for this.
    pub fn to_connect_error(&self) -> ConnectError {
        let code = match self {
            CodecError::TooLarge { .. } => Code::ResourceExhausted,
            _ => Code::InvalidArgument,
        };
        ConnectError::new(code, self.to_string())
    }
}

/// Frames `payload` with `flags`. Fails only for payloads over 4 GiB.
pub fn encode_envelope(flags: u8, payload: &[u8]) -> Result<Vec<u8>, CodecError> {
    let len = u32::try_from(payload.len()).map_err(|_| CodecError::TooLarge {
        len: payload.len() as u64,
        max: u32::MAX as usize,
    })?;
    let mut out = Vec::with_capacity(ENVELOPE_HEADER_LEN + payload.len());
    out.push(flags);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Serializes `message` to JSON and frames it as a data envelope.
pub fn encode_message<T: Serialize>(message: &T) -> Result<Vec<u8>, CodecError> {
    let payload = serde_json::to_vec(message).map_err(|e| CodecError::BadJson {
        what: "response message",
        reason: e.to_string(),
    })?;
    encode_envelope(0, &payload)
}

/// Incremental envelope decoder: feed it bytes as they arrive, in any
/// split; it never holds more than one envelope (header + at most
/// `max_message` payload bytes) and checks the announced length before
/// buffering the payload.
#[derive(Debug)]
pub struct EnvelopeDecoder {
    max_message: usize,
    header: [u8; ENVELOPE_HEADER_LEN],
    header_len: usize,
    payload: Vec<u8>,
    need: Option<usize>,
}

impl EnvelopeDecoder {
    /// A decoder refusing messages over `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        EnvelopeDecoder {
            max_message,
            header: [0; ENVELOPE_HEADER_LEN],
            header_len: 0,
            payload: Vec::new(),
            need: None,
        }
    }

    /// Consumes bytes from the front of `input` until one envelope is
    /// complete (returned) or `input` is empty (`None`). Call again with the
    /// rest of `input` while it is not empty. After an error the decoder is
    /// unusable (the stream is out of step).
    pub fn feed(&mut self, input: &mut &[u8]) -> Result<Option<Envelope>, CodecError> {
        if self.need.is_none() {
            let take = (ENVELOPE_HEADER_LEN - self.header_len).min(input.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&input[..take]);
            self.header_len += take;
            *input = &input[take..];
            if self.header_len < ENVELOPE_HEADER_LEN {
                return Ok(None);
            }
            let len = u32::from_be_bytes([
                self.header[1],
                self.header[2],
                self.header[3],
                self.header[4],
            ]) as usize;
            if len > self.max_message {
                return Err(CodecError::TooLarge {
                    len: len as u64,
                    max: self.max_message,
                });
            }
            self.need = Some(len);
            self.payload = Vec::with_capacity(len.min(64 * 1024));
        }
        let need = self.need.unwrap_or(0);
        let take = (need - self.payload.len()).min(input.len());
        self.payload.extend_from_slice(&input[..take]);
        *input = &input[take..];
        if self.payload.len() < need {
            return Ok(None);
        }
        let envelope = Envelope {
            flags: self.header[0],
            payload: std::mem::take(&mut self.payload),
        };
        self.header_len = 0;
        self.need = None;
        Ok(Some(envelope))
    }

    /// Decodes every complete envelope in `input`, keeping a partial one for
    /// the next call.
    pub fn feed_all(&mut self, mut input: &[u8]) -> Result<Vec<Envelope>, CodecError> {
        let mut out = Vec::new();
        while !input.is_empty() {
            if let Some(envelope) = self.feed(&mut input)? {
                out.push(envelope);
            }
        }
        Ok(out)
    }

    /// Call when the byte stream ended: an error if it ended inside an
    /// envelope.
    pub fn finish(&self) -> Result<(), CodecError> {
        match self.need {
            None if self.header_len == 0 => Ok(()),
            None => Err(CodecError::Truncated {
                received: self.header_len,
                expected: ENVELOPE_HEADER_LEN,
            }),
            Some(need) => Err(CodecError::Truncated {
                received: ENVELOPE_HEADER_LEN + self.payload.len(),
                expected: ENVELOPE_HEADER_LEN + need,
            }),
        }
    }
}

/// Decodes one request envelope of a streaming call into `T`: refuses
/// compressed envelopes, end-of-stream flags and unknown flag bits.
pub fn decode_request_envelope<T: DeserializeOwned>(envelope: &Envelope) -> Result<T, CodecError> {
    if envelope.flags & !(FLAG_COMPRESSED | FLAG_END_STREAM) != 0 {
        return Err(CodecError::UnknownFlags {
            flags: envelope.flags,
        });
    }
    if envelope.is_compressed() {
        return Err(CodecError::Compressed);
    }
    if envelope.is_end_stream() {
        return Err(CodecError::UnexpectedEndStream);
    }
    decode_json(&envelope.payload, "request message")
}

/// Decodes a unary request body into `T` (the body must already be bounded
/// by the server to [`DEFAULT_MAX_MESSAGE`] or its own limit).
pub fn decode_unary_request<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    decode_json(body, "request message")
}

fn decode_json<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, CodecError> {
    // An empty unary body is the empty message, as Connect allows.
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice(bytes).map_err(|e| CodecError::BadJson {
        what,
        reason: e.to_string(),
    })
}

/// Which kind of call a content type announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    /// `application/json`
    Unary,
    /// `application/connect+json`
    Streaming,
}

/// Checks a request's `content-type` against what the route expects; a
/// `;charset=utf-8` parameter is accepted. The error is for a 415 answer.
pub fn check_content_type(content_type: Option<&str>, expected: CallKind) -> Result<(), String> {
    let value = content_type.unwrap_or("");
    let media = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let want = match expected {
        CallKind::Unary => UNARY_JSON,
        CallKind::Streaming => STREAM_JSON,
    };
    if media == want {
        Ok(())
    } else {
        Err(format!(
            "this Connect method takes `content-type: {want}` (the JSON codec), not `{value}`"
        ))
    }
}

/// Parses `Connect-Timeout-Ms`: absent → no deadline; otherwise 1 to 10
/// decimal digits. `0` means no deadline, as envd treats it.
pub fn parse_timeout_ms(header: Option<&str>) -> Result<Option<Duration>, ConnectError> {
    let Some(value) = header else {
        return Ok(None);
    };
    let value = value.trim();
    if value.is_empty()
        || value.len() > MAX_TIMEOUT_DIGITS
        || !value.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            format!(
                "connect-timeout-ms must be 1 to {MAX_TIMEOUT_DIGITS} decimal digits, got {value:?}"
            ),
        ));
    }
    let ms: u64 = value.parse().map_err(|_| {
        ConnectError::new(
            Code::InvalidArgument,
            format!("connect-timeout-ms {value:?} is not a number"),
        )
    })?;
    Ok((ms > 0).then(|| Duration::from_millis(ms)))
}

/// The header in which the SDK asks for keepalive messages on a quiet
/// stream, in whole seconds (`e2b.connection_config.KEEPALIVE_PING_HEADER`).
pub const KEEPALIVE_HEADER: &str = "keepalive-ping-interval";

/// Keepalive interval when the client names none (the SDK's own value).
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(50);

/// Shortest and longest keepalive interval a client gets.
pub const KEEPALIVE_BOUNDS: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(600));

/// The keepalive interval of a stream from `Keepalive-Ping-Interval`:
/// [`DEFAULT_KEEPALIVE`] when absent or not a number of seconds, clamped to
/// [`KEEPALIVE_BOUNDS`] (a client cannot make the daemon spin or go silent
/// for hours).
pub fn keepalive_interval(header: Option<&str>) -> Duration {
    let Some(secs) = header.and_then(|v| v.trim().parse::<u64>().ok()) else {
        return DEFAULT_KEEPALIVE;
    };
    Duration::from_secs(secs).clamp(KEEPALIVE_BOUNDS.0, KEEPALIVE_BOUNDS.1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn codes_round_trip_and_map_to_connect_go_statuses() {
        for code in Code::ALL {
            assert_eq!(Code::parse(code.as_str()), Some(code));
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(serde_json::from_str::<Code>(&json).unwrap(), code);
        }
        assert_eq!(Code::NotFound.http_status(), 404);
        assert_eq!(Code::AlreadyExists.http_status(), 409);
        assert_eq!(Code::DeadlineExceeded.http_status(), 504);
        assert_eq!(Code::Unauthenticated.http_status(), 401);
        assert_eq!(Code::Canceled.http_status(), 499);
        assert_eq!(Code::ResourceExhausted.http_status(), 429);
        assert_eq!(Code::Unavailable.http_status(), 503);
        assert_eq!(Code::parse("no_such_code"), None);
        assert_eq!(
            serde_json::from_str::<Code>("\"no_such_code\"").unwrap(),
            Code::Unknown
        );
    }

    #[test]
    fn the_sdk_reads_every_unary_error_status_back_as_its_code() {
        // The SDK's plain-HTTP table is its fallback when a body has no
        // Connect code; for every code whose status is unambiguous it must
        // give the code back, so a proxy in between changes nothing.
        for code in [
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::NotFound,
            Code::AlreadyExists,
            Code::ResourceExhausted,
            Code::Canceled,
            Code::Internal,
            Code::Unimplemented,
            Code::Unavailable,
            Code::DeadlineExceeded,
        ] {
            assert_eq!(Code::from_plain_http_status(code.http_status()), code);
        }
        assert_eq!(Code::from_plain_http_status(418), Code::Unknown);
    }

    #[test]
    fn unary_error_body_is_what_the_sdk_parses() {
        let e = ConnectError::new(Code::NotFound, "process with pid 404 not found");
        assert_eq!(
            e.to_json(),
            br#"{"code":"not_found","message":"process with pid 404 not found"}"#
        );
        assert_eq!(e.http_status(), 404);
    }

    #[test]
    fn end_stream_envelopes_match_the_captured_bytes() {
        assert_eq!(EndStream::ok().to_envelope(), b"\x02\x00\x00\x00\x02{}");
        let failed = EndStream::failed(ConnectError::new(
            Code::NotFound,
            "process with pid 404 not found",
        ));
        let bytes = failed.to_envelope();
        assert_eq!(bytes[0], FLAG_END_STREAM);
        assert_eq!(
            &bytes[5..],
            br#"{"error":{"code":"not_found","message":"process with pid 404 not found"}}"#
        );
        let mut decoder = EnvelopeDecoder::new(DEFAULT_MAX_MESSAGE);
        let envs = decoder.feed_all(&bytes).unwrap();
        assert_eq!(envs.len(), 1);
        assert!(envs[0].is_end_stream());
        assert_eq!(EndStream::parse(&envs[0].payload).unwrap(), failed);
        let with_trailers =
            EndStream::parse(br#"{"metadata":{"x-a":["1","2"]},"error":{"code":"weird"}}"#)
                .unwrap();
        assert_eq!(with_trailers.metadata["x-a"], vec!["1", "2"]);
        assert_eq!(with_trailers.error.unwrap().code, Code::Unknown);
    }

    /// The request body the SDK sent for `commands.run("echo hi", envs={"A":
    /// "1"}, cwd="/tmp", user="root", timeout=30)`, captured on the wire
    /// (docs/e2b-protocol.md §4.1).
    const CAPTURED_START: &str = "00000000687b2270726f63657373223a7b22636d64223a222f62696e2f62617368222c2261726773223a5b222d6c222c222d63222c226563686f206869225d2c22656e7673223a7b2241223a2231227d2c22637764223a222f746d70227d2c22737464696e223a66616c73657d";
    /// The `StreamInput` body of `commands.stream_input(42, ["a", b"b"])`.
    const CAPTURED_STREAM_INPUT: &str = "00000000207b227374617274223a7b2270726f63657373223a7b22706964223a34327d7d7d00000000237b2264617461223a7b22696e707574223a7b22737464696e223a2259513d3d227d7d7d00000000237b2264617461223a7b22696e707574223a7b22737464696e223a2259673d3d227d7d7d";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn decodes_the_captured_sdk_requests() {
        use crate::envd::process::{
            ProcessInput, StartRequest, StreamInputData, StreamInputRequest,
        };
        let mut decoder = EnvelopeDecoder::new(DEFAULT_MAX_MESSAGE);
        let envs = decoder.feed_all(&unhex(CAPTURED_START)).unwrap();
        decoder.finish().unwrap();
        assert_eq!(envs.len(), 1);
        let start: StartRequest = decode_request_envelope(&envs[0]).unwrap();
        let process = start.process.unwrap();
        assert_eq!(process.cmd, "/bin/bash");
        assert_eq!(process.args, ["-l", "-c", "echo hi"]);
        assert_eq!(process.envs["A"], "1");
        assert_eq!(process.cwd.as_deref(), Some("/tmp"));
        assert_eq!(start.stdin, Some(false));

        let envs = decoder.feed_all(&unhex(CAPTURED_STREAM_INPUT)).unwrap();
        let msgs: Vec<StreamInputRequest> = envs
            .iter()
            .map(|e| decode_request_envelope(e).unwrap())
            .collect();
        assert_eq!(msgs.len(), 3);
        match &msgs[1] {
            StreamInputRequest::Data(StreamInputData { input }) => {
                assert_eq!(input, &Some(ProcessInput::Stdin(b"a".to_vec())))
            }
            other => panic!("expected data, got {other:?}"),
        }
    }

    #[test]
    fn refuses_oversized_compressed_and_client_end_stream_envelopes() {
        let mut decoder = EnvelopeDecoder::new(16);
        let mut input: &[u8] = &[0, 0, 0, 0, 17, b'x'];
        assert_eq!(
            decoder.feed(&mut input),
            Err(CodecError::TooLarge { len: 17, max: 16 })
        );
        let compressed = Envelope {
            flags: FLAG_COMPRESSED,
            payload: b"{}".to_vec(),
        };
        assert_eq!(
            decode_request_envelope::<serde_json::Value>(&compressed),
            Err(CodecError::Compressed)
        );
        let end = Envelope {
            flags: FLAG_END_STREAM,
            payload: b"{}".to_vec(),
        };
        assert_eq!(
            decode_request_envelope::<serde_json::Value>(&end),
            Err(CodecError::UnexpectedEndStream)
        );
        let odd = Envelope {
            flags: 0x80,
            payload: b"{}".to_vec(),
        };
        assert_eq!(
            decode_request_envelope::<serde_json::Value>(&odd),
            Err(CodecError::UnknownFlags { flags: 0x80 })
        );
        assert_eq!(
            CodecError::TooLarge { len: 17, max: 16 }
                .to_connect_error()
                .code,
            Code::ResourceExhausted
        );
    }

    #[test]
    fn finish_reports_a_truncated_stream() {
        let mut decoder = EnvelopeDecoder::new(64);
        decoder.feed_all(&[0, 0, 0]).unwrap();
        assert_eq!(
            decoder.finish(),
            Err(CodecError::Truncated {
                received: 3,
                expected: 5
            })
        );
        decoder.feed_all(&[0, 4, b'{']).unwrap();
        assert_eq!(
            decoder.finish(),
            Err(CodecError::Truncated {
                received: 6,
                expected: 9
            })
        );
        decoder.feed_all(b"}  ").unwrap();
        decoder.finish().unwrap();
    }

    #[test]
    fn bad_json_names_the_problem_and_empty_body_is_the_empty_message() {
        let err = decode_unary_request::<crate::envd::filesystem::StatRequest>(b"{\"path\": 3}")
            .unwrap_err();
        assert!(err.to_string().contains("not valid JSON"), "{err}");
        assert_eq!(err.to_connect_error().code, Code::InvalidArgument);
        let empty: crate::envd::process::ListRequest = decode_unary_request(b"").unwrap();
        assert_eq!(empty, crate::envd::process::ListRequest {});
    }

    #[test]
    fn content_types() {
        assert!(check_content_type(Some("application/json"), CallKind::Unary).is_ok());
        assert!(
            check_content_type(Some("application/json; charset=utf-8"), CallKind::Unary).is_ok()
        );
        assert!(check_content_type(Some("application/connect+json"), CallKind::Streaming).is_ok());
        assert!(check_content_type(Some("application/proto"), CallKind::Unary).is_err());
        assert!(check_content_type(Some("application/json"), CallKind::Streaming).is_err());
        assert!(check_content_type(None, CallKind::Unary).is_err());
    }

    #[test]
    fn timeout_header() {
        assert_eq!(parse_timeout_ms(None).unwrap(), None);
        assert_eq!(
            parse_timeout_ms(Some("60000")).unwrap(),
            Some(Duration::from_secs(60))
        );
        assert_eq!(parse_timeout_ms(Some("0")).unwrap(), None);
        for bad in ["", "-1", "1.5", "12345678901", "ten", "+5"] {
            assert_eq!(
                parse_timeout_ms(Some(bad)).unwrap_err().code,
                Code::InvalidArgument,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn keepalive_header() {
        assert_eq!(keepalive_interval(None), DEFAULT_KEEPALIVE);
        assert_eq!(keepalive_interval(Some("50")), Duration::from_secs(50));
        assert_eq!(keepalive_interval(Some(" 7 ")), Duration::from_secs(7));
        assert_eq!(keepalive_interval(Some("0")), KEEPALIVE_BOUNDS.0);
        assert_eq!(keepalive_interval(Some("99999999999")), KEEPALIVE_BOUNDS.1);
        for bad in ["", "-1", "1.5", "ten"] {
            assert_eq!(keepalive_interval(Some(bad)), DEFAULT_KEEPALIVE, "{bad:?}");
        }
    }

    proptest! {
        /// Any bytes, split anywhere: the decoder never panics, never holds
        /// more than one bounded envelope, and either decodes or errors.
        #[test]
        fn decoder_never_panics_and_stays_bounded(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
            splits in proptest::collection::vec(0usize..4096, 0..16),
            max in 0usize..2048,
        ) {
            let mut decoder = EnvelopeDecoder::new(max);
            let mut cuts: Vec<usize> = splits.into_iter().map(|s| s % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut last = 0;
            'outer: for cut in cuts.into_iter().chain(std::iter::once(bytes.len())) {
                let mut chunk = &bytes[last..cut.max(last)];
                last = cut.max(last);
                while !chunk.is_empty() {
                    match decoder.feed(&mut chunk) {
                        Ok(Some(env)) => {
                            prop_assert!(env.payload.len() <= max);
                            let _ = decode_request_envelope::<serde_json::Value>(&env);
                            let _ = EndStream::parse(&env.payload);
                        }
                        Ok(None) => {}
                        Err(_) => break 'outer,
                    }
                    prop_assert!(decoder.payload.len() <= max);
                    prop_assert!(decoder.payload.capacity() <= 2 * max + 64 * 1024);
                }
            }
            let _ = decoder.finish();
        }

        /// Whatever is encoded decodes back identically, in any split.
        #[test]
        fn envelopes_round_trip_in_any_split(
            messages in proptest::collection::vec((0u8..4, proptest::collection::vec(any::<u8>(), 0..300)), 0..8),
            split in 1usize..64,
        ) {
            let mut wire = Vec::new();
            for (flags, payload) in &messages {
                wire.extend(encode_envelope(*flags, payload).unwrap());
            }
            let mut decoder = EnvelopeDecoder::new(300);
            let mut out = Vec::new();
            for chunk in wire.chunks(split) {
                out.extend(decoder.feed_all(chunk).unwrap());
            }
            decoder.finish().unwrap();
            prop_assert_eq!(out.len(), messages.len());
            for (env, (flags, payload)) in out.iter().zip(&messages) {
                prop_assert_eq!(env.flags, *flags);
                prop_assert_eq!(&env.payload, payload);
            }
        }
    }
}
