//! The pure part of forkd's E2B-compatible API (issue 13): everything about the
//! protocol E2B's published SDKs speak that can be decided without a socket, a
//! VM or a clock.
//!
//! It owns the control-plane wire types (`POST /v2/sandboxes`, list, info,
//! timeout, pause, connect, fork — [`control`]), the envd message types of the
//! `process.Process` and `filesystem.Filesystem` Connect services in their
//! proto3 JSON form ([`envd`], with the JSON mapping rules in [`pjson`]), the
//! Connect protocol itself: codes and HTTP statuses, unary errors, the 5-byte
//! stream envelopes with their end-of-stream message, request decoding
//! ([`connect`]), the route table and how a request is routed to a sandbox by
//! its `E2b-Sandbox-Id` / `E2b-Sandbox-Port` headers ([`routes`]), API keys and
//! per-sandbox access tokens compared in constant time ([`token`]), and the
//! `x-next-token` paging of `GET /v2/sandboxes` ([`paging`]), and the record
//! of a paused sandbox that `connect` resumes under its own id ([`paused`]).
//!
//! It must never do I/O and depends on no other forkd crate: the daemon binds
//! the listener, calls the fleet through the operations seam and uses these
//! types at the edge. Everything from the network is hostile input here:
//! sizes are bounded, nothing panics on any byte sequence (property-tested).
//!
//! The protocol as the SDK sends it, with captured examples, is written down in
//! `docs/e2b-protocol.md`; the types here follow it field for field.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod connect;
pub mod control;
pub mod envd;
pub mod paging;
pub mod paused;
pub mod pjson;
pub mod routes;
pub mod token;

/// The envd version forkd reports in `envdVersion`. The SDK gates features on
/// it (`docs/e2b-protocol.md` §8): 0.6.4 is the newest gate in `e2b` 2.63.0,
/// and anything from 0.4.0 on stops the SDK from naming the user `user` in
/// every call. Lower it if the agent does not implement a gated feature.
pub const ENVD_VERSION: &str = "0.6.4";

/// The `clientID` forkd puts in every sandbox answer (required by the SDK,
/// meaningless to it).
pub const CLIENT_ID: &str = "forkd";
