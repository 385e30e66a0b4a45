//! Who may talk to the daemon, and where it may listen.
//!
//! The rules (issue 5): a UNIX socket by default (mode 0600, or 0660 for a
//! group); TCP only on request, default `127.0.0.1:8889`; never unauthenticated
//! on a non-loopback address; bearer tokens of at least 16 bytes, compared in
//! constant time. [`ListenPolicy::new`] is the one place that decides whether a
//! configuration may start; the server only binds what it returns.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// Shortest bearer token accepted at start.
pub const MIN_TOKEN_LEN: usize = 16;
/// The TCP address used when TCP is enabled without one: the legacy runtime's.
pub const DEFAULT_TCP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8889);

/// Why a listen configuration is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The configured token is shorter than [`MIN_TOKEN_LEN`].
    #[error(
        "the API token is {len} bytes long; use at least {MIN_TOKEN_LEN} \
         (e.g. `head -c 32 /dev/urandom | base64`)"
    )]
    TokenTooShort {
        /// Its length in bytes.
        len: usize,
    },

    /// TCP on a non-loopback address without a token.
    #[error(
        "refusing to listen on {addr} without a token: it is not a loopback address; \
         pass a token file, or listen on 127.0.0.1 or a UNIX socket"
    )]
    UnauthenticatedNonLoopback {
        /// The address asked for.
        addr: SocketAddr,
    },

    /// The listen address is not in a form [`ListenAddr::parse`] knows.
    #[error(
        "cannot parse listen address {input:?}: use unix:/path/to/socket, \
         tcp:127.0.0.1:8889, or host:port with a numeric host"
    )]
    BadListenAddr {
        /// What was given.
        input: String,
    },
}

/// A bearer token that passed the length rule. Its `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(String);

impl BearerToken {
    /// Accepts `token` if it is at least [`MIN_TOKEN_LEN`] bytes long.
    pub fn new(token: impl Into<String>) -> Result<Self, AuthError> {
        let token = token.into();
        if token.len() < MIN_TOKEN_LEN {
            return Err(AuthError::TokenTooShort { len: token.len() });
        }
        Ok(Self(token))
    }

    /// A token as read from a token file: surrounding whitespace (the trailing
    /// newline editors add) is not part of it.
    pub fn from_file_contents(contents: &str) -> Result<Self, AuthError> {
        Self::new(contents.trim())
    }

    /// The token itself, for clients that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// Compares two byte strings without a data-dependent early exit. The length
/// is not secret (a mismatch in length returns at once).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// Checks an `Authorization` header against `token`: `Bearer <token>`, scheme
/// case-insensitive. A 401 otherwise, saying what was missing.
pub fn check_bearer(header: Option<&str>, token: &BearerToken) -> Result<(), ApiError> {
    let Some(header) = header else {
        return Err(ApiError::Unauthorized(
            "missing `Authorization: Bearer <token>` header".to_owned(),
        ));
    };
    let presented = header
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, rest)| rest.trim());
    match presented {
        Some(presented) if constant_time_eq(presented.as_bytes(), token.expose().as_bytes()) => {
            Ok(())
        }
        Some(_) => Err(ApiError::Unauthorized("invalid bearer token".to_owned())),
        None => Err(ApiError::Unauthorized(
            "the `Authorization` header must be `Bearer <token>`".to_owned(),
        )),
    }
}

/// Where the daemon listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A UNIX socket at this path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl ListenAddr {
    /// Parses `unix:/path`, `tcp:host:port`, a bare `host:port`, or a bare
    /// absolute path (a UNIX socket). `host` is an IP address or `localhost`
    /// (no name resolution happens here).
    pub fn parse(input: &str) -> Result<Self, AuthError> {
        let bad = || AuthError::BadListenAddr {
            input: input.to_owned(),
        };
        if let Some(path) = input.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if input.starts_with('/') {
            return Ok(Self::Unix(PathBuf::from(input)));
        }
        let hostport = input.strip_prefix("tcp:").unwrap_or(input);
        if let Ok(addr) = hostport.parse::<SocketAddr>() {
            return Ok(Self::Tcp(addr));
        }
        match hostport.rsplit_once(':') {
            Some(("localhost", port)) => {
                let port = port.parse::<u16>().map_err(|_| bad())?;
                Ok(Self::Tcp(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    port,
                )))
            }
            _ => Err(bad()),
        }
    }

    /// Whether only this host can connect (a UNIX socket or a loopback IP).
    pub fn is_local(&self) -> bool {
        match self {
            Self::Unix(_) => true,
            Self::Tcp(addr) => addr.ip().is_loopback(),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// Who may open the UNIX socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketAccess {
    /// The daemon's user only (mode 0600).
    Owner,
    /// The daemon's user and this group (mode 0660, group set by the server).
    Group(String),
}

impl SocketAccess {
    /// The permission bits to give the socket file.
    pub fn mode(&self) -> u32 {
        match self {
            Self::Owner => 0o600,
            Self::Group(_) => 0o660,
        }
    }
}

/// A listen configuration that passed every rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenPolicy {
    addr: ListenAddr,
    token: Option<BearerToken>,
}

impl ListenPolicy {
    /// Checks a configuration: a token, when given, must be long enough; a
    /// non-loopback TCP address needs one.
    pub fn new(addr: ListenAddr, token: Option<&str>) -> Result<Self, AuthError> {
        let token = token.map(BearerToken::new).transpose()?;
        if let ListenAddr::Tcp(tcp) = &addr {
            if token.is_none() && !tcp.ip().is_loopback() {
                return Err(AuthError::UnauthenticatedNonLoopback { addr: *tcp });
            }
        }
        Ok(Self { addr, token })
    }

    /// Where to listen.
    pub fn addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// The token every authenticated route requires, if any.
    pub fn token(&self) -> Option<&BearerToken> {
        self.token.as_ref()
    }

    /// Checks one request's `Authorization` header: always `Ok` when no token
    /// is configured or the route is open (`/healthz`).
    pub fn authorize(
        &self,
        route_requires_auth: bool,
        header: Option<&str>,
    ) -> Result<(), ApiError> {
        match &self.token {
            Some(token) if route_requires_auth => check_bearer(header, token),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123";

    #[test]
    fn short_tokens_are_refused() {
        let err = BearerToken::new("short").unwrap_err();
        assert_eq!(err, AuthError::TokenTooShort { len: 5 });
        assert!(BearerToken::new("x".repeat(15)).is_err());
        assert!(BearerToken::new("x".repeat(16)).is_ok());
        assert!(BearerToken::from_file_contents(&format!("{TOKEN}\n")).is_ok());
        assert!(BearerToken::from_file_contents("  short-token \n").is_err());
        let debug = format!("{:?}", BearerToken::new(TOKEN).unwrap());
        assert!(!debug.contains(TOKEN), "{debug}");
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn bearer_header() {
        let token = BearerToken::new(TOKEN).unwrap();
        assert!(check_bearer(Some(&format!("Bearer {TOKEN}")), &token).is_ok());
        assert!(check_bearer(Some(&format!("bearer {TOKEN}")), &token).is_ok());
        for bad in [
            None,
            Some(TOKEN.to_owned()),
            Some(format!("Basic {TOKEN}")),
            Some("Bearer wrong-token-wrong-token".to_owned()),
            Some(format!("Bearer {TOKEN}x")),
            Some("Bearer ".to_owned()),
        ] {
            let err = check_bearer(bad.as_deref(), &token).unwrap_err();
            assert_eq!(err.status(), 401, "{bad:?}");
        }
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            ListenAddr::parse("unix:/run/forkd.sock").unwrap(),
            ListenAddr::Unix("/run/forkd.sock".into())
        );
        assert_eq!(
            ListenAddr::parse("/run/forkd.sock").unwrap(),
            ListenAddr::Unix("/run/forkd.sock".into())
        );
        assert_eq!(
            ListenAddr::parse("tcp:127.0.0.1:8889").unwrap(),
            ListenAddr::Tcp(DEFAULT_TCP)
        );
        assert_eq!(
            ListenAddr::parse("127.0.0.1:8889").unwrap(),
            ListenAddr::Tcp(DEFAULT_TCP)
        );
        assert_eq!(
            ListenAddr::parse("localhost:8889").unwrap(),
            ListenAddr::Tcp(DEFAULT_TCP)
        );
        assert!(ListenAddr::parse("[::1]:9000").unwrap().is_local());
        assert!(!ListenAddr::parse("0.0.0.0:8889").unwrap().is_local());
        for bad in [
            "unix:",
            "example.com:80",
            "127.0.0.1",
            "tcp:",
            "localhost:http",
            "",
        ] {
            assert!(ListenAddr::parse(bad).is_err(), "{bad:?}");
        }
        let addr = ListenAddr::parse("tcp:[::1]:1").unwrap();
        assert_eq!(ListenAddr::parse(&addr.to_string()).unwrap(), addr);
    }

    #[test]
    fn listen_policy() {
        let any = ListenAddr::parse("0.0.0.0:8889").unwrap();
        assert_eq!(
            ListenPolicy::new(any.clone(), None).unwrap_err(),
            AuthError::UnauthenticatedNonLoopback {
                addr: "0.0.0.0:8889".parse().unwrap()
            }
        );
        assert!(matches!(
            ListenPolicy::new(any.clone(), Some("short")),
            Err(AuthError::TokenTooShort { .. })
        ));
        let open = ListenPolicy::new(ListenAddr::Tcp(DEFAULT_TCP), None).unwrap();
        assert!(open.authorize(true, None).is_ok());
        let unix = ListenPolicy::new(ListenAddr::Unix("/tmp/s".into()), Some("short"));
        assert!(
            unix.is_err(),
            "short tokens are refused on a UNIX socket too"
        );

        let guarded = ListenPolicy::new(any, Some(TOKEN)).unwrap();
        assert_eq!(guarded.authorize(true, None).unwrap_err().status(), 401);
        assert!(
            guarded.authorize(false, None).is_ok(),
            "open routes need no token"
        );
        assert!(guarded
            .authorize(true, Some(&format!("Bearer {TOKEN}")))
            .is_ok());
    }

    #[test]
    fn socket_modes() {
        assert_eq!(SocketAccess::Owner.mode(), 0o600);
        assert_eq!(SocketAccess::Group("forkd".into()).mode(), 0o660);
    }
}
