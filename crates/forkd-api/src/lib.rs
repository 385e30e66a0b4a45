//! The pure part of forkd's daemon REST API: everything about the API that can
//! be decided without a socket, a VM or a database.
//!
//! It owns the wire types of every `/v1` route ([`types`]) and their one
//! conversion to and from the operations seam ([`convert`]), turning request
//! bytes into validated requests with errors that name the field ([`decode`],
//! [`validate`]), the one error type and its HTTP status codes ([`error`]), who
//! may call and where the daemon may listen ([`auth`]), the route table and the
//! OpenAPI document built from it ([`routes`]), concurrency caps ([`limits`]),
//! Prometheus text ([`metrics`]) and audit-log lines ([`audit`]).
//!
//! It must never do I/O: no sockets, no files, no clock, no VMs. The server
//! crate binds the socket, calls `forkd-core`, reads the time and writes the
//! lines this crate formats, so everything here is testable in microseconds.
//!
//! The legacy routes keep the wire format of the runtime forkd grew from (TCP
//! default `127.0.0.1:8889`, `Authorization: Bearer`, errors as
//! `{"error": "..."}`), so its clients work unchanged.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod audit;
pub mod auth;
pub mod convert;
pub mod decode;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod routes;
pub mod types;
pub mod validate;

pub use decode::{decode_json, decode_query, DEFAULT_BODY_LIMIT, FILE_BODY_LIMIT};
pub use error::{ApiError, ErrorBody};
pub use validate::Validate;
