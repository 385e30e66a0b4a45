//! Secrets of the E2B API: the control-plane API keys (`X-API-KEY`, read from
//! `--e2b-api-key-file`) and each sandbox's envd access token
//! (`X-Access-Token`, made from host randomness at create). Both are
//! compared in constant time; neither prints in `Debug`.
//!
//! No randomness is drawn here (this crate does no I/O): the daemon passes
//! [`ACCESS_TOKEN_RANDOM_BYTES`] bytes from the OS to
//! [`AccessToken::from_random`].

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use subtle::ConstantTimeEq;

/// Random bytes in an access token (256 bits).
pub const ACCESS_TOKEN_RANDOM_BYTES: usize = 32;
/// Shortest API key accepted in the key file.
pub const MIN_API_KEY_LEN: usize = 16;
/// Longest token or key accepted from a header or a file line.
pub const MAX_SECRET_LEN: usize = 512;
/// Prefix of forkd access tokens (tells them apart in logs and state).
const ACCESS_TOKEN_PREFIX: &str = "fkd_";

/// Why a secret was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No header at all.
    #[error("missing `{header}` header; the SDK sends it when E2B_API_KEY (control plane) or the sandbox's envdAccessToken (envd) is set")]
    Missing {
        /// The header name.
        header: &'static str,
    },
    /// A header that matches no secret.
    #[error("the `{header}` header does not match; check E2B_API_KEY, or connect to the sandbox again to get its current access token")]
    Mismatch {
        /// The header name.
        header: &'static str,
    },
    /// A stored token that is not one forkd made.
    #[error("stored access token is malformed: {reason}")]
    Malformed {
        /// What is wrong.
        reason: &'static str,
    },
    /// The API key file has no usable key.
    #[error("the E2B API key file has no key of at least {MIN_API_KEY_LEN} characters; put one key per line (e.g. `head -c 32 /dev/urandom | base64`)")]
    NoKeys,
    /// A key in the file is too short or too long.
    #[error("line {line} of the E2B API key file holds a key of {len} characters; keys must be {MIN_API_KEY_LEN} to {MAX_SECRET_LEN} printable characters")]
    BadKey {
        /// 1-based line number.
        line: usize,
        /// Its length.
        len: usize,
    },
}

impl TokenError {
    /// The HTTP status to answer with (401 for a request, not for a file).
    pub fn http_status(&self) -> u16 {
        401
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// A sandbox's envd access token.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(String);

impl AccessToken {
    /// The header envd reads it from.
    pub const HEADER: &'static str = "X-Access-Token";

    /// A token from `bytes` of OS randomness: `fkd_` + unpadded base64url.
    pub fn from_random(bytes: &[u8; ACCESS_TOKEN_RANDOM_BYTES]) -> Self {
        AccessToken(format!(
            "{ACCESS_TOKEN_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(bytes)
        ))
    }

    /// A token as stored in the state database; refuses anything
    /// [`from_random`](Self::from_random) cannot have made.
    pub fn parse(stored: &str) -> Result<Self, TokenError> {
        let body = stored
            .strip_prefix(ACCESS_TOKEN_PREFIX)
            .ok_or(TokenError::Malformed {
                reason: "it lacks the fkd_ prefix",
            })?;
        match URL_SAFE_NO_PAD.decode(body) {
            Ok(bytes) if bytes.len() == ACCESS_TOKEN_RANDOM_BYTES => {
                Ok(AccessToken(stored.to_owned()))
            }
            _ => Err(TokenError::Malformed {
                reason: "it is not 32 bytes of base64url",
            }),
        }
    }

    /// The token, for the create answer and the state database.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Checks a presented `X-Access-Token` in constant time.
    pub fn verify(&self, presented: Option<&str>) -> Result<(), TokenError> {
        let presented = presented.ok_or(TokenError::Missing {
            header: Self::HEADER,
        })?;
        if ct_eq(presented.trim().as_bytes(), self.0.as_bytes()) {
            Ok(())
        } else {
            Err(TokenError::Mismatch {
                header: Self::HEADER,
            })
        }
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken(<redacted>)")
    }
}

/// The control-plane API keys.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKeys(Vec<String>);

impl ApiKeys {
    /// The header the SDK sends the key in.
    pub const HEADER: &'static str = "X-API-KEY";

    /// Keys from the contents of `--e2b-api-key-file`: one per line, blank
    /// lines and `#` comments skipped, surrounding whitespace trimmed.
    pub fn from_file_contents(contents: &str) -> Result<Self, TokenError> {
        let mut keys = Vec::new();
        for (i, line) in contents.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let printable = line.bytes().all(|b| b.is_ascii_graphic());
            if line.len() < MIN_API_KEY_LEN || line.len() > MAX_SECRET_LEN || !printable {
                return Err(TokenError::BadKey {
                    line: i + 1,
                    len: line.chars().count(),
                });
            }
            keys.push(line.to_owned());
        }
        if keys.is_empty() {
            return Err(TokenError::NoKeys);
        }
        Ok(ApiKeys(keys))
    }

    /// Checks a presented `X-API-KEY` against every key, each in constant
    /// time and without stopping at the first match.
    pub fn verify(&self, presented: Option<&str>) -> Result<(), TokenError> {
        let presented = presented.ok_or(TokenError::Missing {
            header: Self::HEADER,
        })?;
        let presented = presented.trim().as_bytes();
        let mut ok = false;
        for key in &self.0 {
            ok |= ct_eq(presented, key.as_bytes());
        }
        if ok {
            Ok(())
        } else {
            Err(TokenError::Mismatch {
                header: Self::HEADER,
            })
        }
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true for a value built by [`from_file_contents`](Self::from_file_contents).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys(<{} redacted>)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_tokens_are_made_checked_and_stored() {
        let a = AccessToken::from_random(&[7; 32]);
        let b = AccessToken::from_random(&[8; 32]);
        assert_ne!(a, b);
        assert!(a.expose().starts_with("fkd_"));
        assert_eq!(a.expose().len(), 4 + 43);
        a.verify(Some(a.expose())).unwrap();
        a.verify(Some(&format!(" {} ", a.expose()))).unwrap();
        assert_eq!(
            a.verify(Some(b.expose())),
            Err(TokenError::Mismatch {
                header: "X-Access-Token"
            })
        );
        assert_eq!(
            a.verify(None),
            Err(TokenError::Missing {
                header: "X-Access-Token"
            })
        );
        assert_eq!(
            a.verify(Some("")),
            Err(TokenError::Mismatch {
                header: "X-Access-Token"
            })
        );
        assert_eq!(AccessToken::parse(a.expose()).unwrap(), a);
        for bad in [
            "",
            "fkd_",
            "tok-123",
            "fkd_AAAA",
            &format!("xyz_{}", &a.expose()[4..]),
        ] {
            assert!(AccessToken::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(format!("{a:?}"), "AccessToken(<redacted>)");
        assert!(!format!("{:?}", TokenError::Mismatch { header: "X" }).contains(a.expose()));
    }

    #[test]
    fn api_key_file() {
        let keys = ApiKeys::from_file_contents(
            "# forkd keys\n\n  e2b_0123456789abcdef  \nsecond-key-0123456789\n",
        )
        .unwrap();
        assert_eq!(keys.len(), 2);
        keys.verify(Some("e2b_0123456789abcdef")).unwrap();
        keys.verify(Some("second-key-0123456789")).unwrap();
        assert_eq!(
            keys.verify(Some("e2b_0123456789abcdeX")),
            Err(TokenError::Mismatch {
                header: "X-API-KEY"
            })
        );
        assert_eq!(
            keys.verify(None),
            Err(TokenError::Missing {
                header: "X-API-KEY"
            })
        );
        assert_eq!(
            ApiKeys::from_file_contents("# only a comment\n"),
            Err(TokenError::NoKeys)
        );
        assert_eq!(
            ApiKeys::from_file_contents("short\n"),
            Err(TokenError::BadKey { line: 1, len: 5 })
        );
        assert!(ApiKeys::from_file_contents("has a space in the key 12345\n").is_err());
        assert_eq!(format!("{keys:?}"), "ApiKeys(<2 redacted>)");
    }
}
