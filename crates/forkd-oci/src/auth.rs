//! Registry credentials and challenges, as container tools handle them:
//! Docker's `config.json` (`$DOCKER_CONFIG/config.json`, else
//! `~/.docker/config.json`; `auths` entries with a base64 `auth` or
//! `username`/`password`), and the `WWW-Authenticate` challenges a registry
//! answers 401 with (`Basic realm=…`, `Bearer realm=…,service=…,scope=…`).
//! Pure parsing plus one file read; the HTTP side lives in [`crate::client`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use crate::error::{OciError, Result};

/// Largest Docker config file read.
const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

/// A user name and password (or token used as a password).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

impl Credentials {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials {
            username: username.into(),
            password: password.into(),
        }
    }
}

/// Where Docker keeps its config: `$DOCKER_CONFIG/config.json`, else
/// `$HOME/.docker/config.json`.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| PathBuf::from(home).join(".docker/config.json"))
}

/// The credentials Docker's config holds for `registry` (`host[:port]`), if
/// any. A missing config file means none; a malformed one is an error.
pub fn docker_credentials(registry: &str) -> Result<Option<Credentials>> {
    match docker_config_path() {
        Some(path) => credentials_from_file(&path, registry),
        None => Ok(None),
    }
}

/// Like [`docker_credentials`] for a given config file.
pub fn credentials_from_file(path: &Path, registry: &str) -> Result<Option<Credentials>> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(OciError::io("read Docker config", path)(e)),
    };
    let mut text = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(OciError::io("read Docker config", path))?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(OciError::DockerConfig {
            path: path.to_owned(),
            reason: format!("larger than {MAX_CONFIG_BYTES} bytes"),
        });
    }
    credentials_from_config(&text, registry).map_err(|reason| OciError::DockerConfig {
        path: path.to_owned(),
        reason,
    })
}

#[derive(Deserialize)]
struct DockerConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Looks `registry` up in the text of a Docker config.
pub fn credentials_from_config(
    text: &[u8],
    registry: &str,
) -> std::result::Result<Option<Credentials>, String> {
    let config: DockerConfigFile =
        serde_json::from_slice(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let wanted = normalize_host(registry);
    let Some((key, entry)) = config
        .auths
        .iter()
        .find(|(key, _)| normalize_host(key) == wanted)
    else {
        return Ok(None);
    };
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|e| format!("`auths.{key}.auth` is not base64: {e}"))?;
        let decoded = String::from_utf8(decoded)
            .map_err(|_| format!("`auths.{key}.auth` does not decode to text"))?;
        let (user, pass) = decoded
            .split_once(':')
            .ok_or_else(|| format!("`auths.{key}.auth` does not decode to USER:PASSWORD"))?;
        return Ok(Some(Credentials::new(user, pass)));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(Some(Credentials::new(u, p))),
        _ => Ok(None),
    }
}

/// `https://index.docker.io/v1/` → `docker.io`; `http://h:5000/x` → `h:5000`.
fn normalize_host(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_owned()
        }
        _ => host,
    }
}

/// One challenge from a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` value (RFC 7235: scheme, then `key=value` or
/// `key="quoted value"` pairs, comma-separated). Unknown schemes are skipped;
/// a Bearer challenge without a realm is dropped.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut out = Vec::new();
    let mut rest = header.trim();
    while !rest.is_empty() {
        let scheme_end = rest.find([' ', ',']).unwrap_or(rest.len());
        let scheme = rest[..scheme_end].to_ascii_lowercase();
        rest = rest[scheme_end..].trim_start_matches([' ', ',']);
        let mut params = BTreeMap::new();
        // Parameters: key=value until a token without '=' starts the next challenge.
        while let Some(eq) = rest.find('=') {
            let key = &rest[..eq];
            if key.is_empty() || key.contains([' ', ',', '"']) {
                break;
            }
            let after = &rest[eq + 1..];
            let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
                let mut value = String::new();
                let mut chars = quoted.char_indices();
                let mut end = quoted.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, next)) = chars.next() {
                                value.push(next);
                            }
                        }
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                (value, &quoted[end.min(quoted.len())..])
            } else {
                let end = after.find(',').unwrap_or(after.len());
                (after[..end].trim().to_owned(), &after[end..])
            };
            params.insert(key.to_ascii_lowercase(), value);
            rest = remaining.trim_start_matches([' ', ',']);
        }
        match scheme.as_str() {
            "basic" => out.push(Challenge::Basic),
            "bearer" => {
                if let Some(realm) = params.remove("realm") {
                    out.push(Challenge::Bearer {
                        realm,
                        service: params.remove("service"),
                        scope: params.remove("scope"),
                    });
                }
            }
            _ => {}
        }
    }
    out
}

/// A token server's answer: `token` (Docker) or `access_token` (OAuth2).
#[derive(Deserialize)]
pub(crate) struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
}

impl TokenResponse {
    pub(crate) fn into_token(self) -> Option<String> {
        self.token
            .filter(|t| !t.is_empty())
            .or(self.access_token.filter(|t| !t.is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenge_with_quoted_commas() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(
            c,
            vec![Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            }]
        );
    }

    #[test]
    fn basic_and_unknown_and_broken() {
        assert_eq!(
            parse_challenges(r#"Basic realm="basic-realm""#),
            vec![Challenge::Basic]
        );
        assert_eq!(parse_challenges("Negotiate"), vec![]);
        assert_eq!(parse_challenges(r#"Bearer service="x""#), vec![]);
        assert_eq!(
            parse_challenges(r#"Bearer realm="unterminated"#),
            vec![Challenge::Bearer {
                realm: "unterminated".into(),
                service: None,
                scope: None
            }]
        );
        // Garbage never panics.
        for s in ["=", "\"", "Bearer =,=,\"", "Bearer realm=\"\\", ",,,"] {
            let _ = parse_challenges(s);
        }
    }

    #[test]
    fn two_challenges_in_one_header() {
        let c = parse_challenges(r#"Basic realm="r", Bearer realm="t",service=s"#);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0], Challenge::Basic);
    }

    #[test]
    fn docker_config_auth_forms() {
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et");
        let text = format!(
            r#"{{"auths":{{"127.0.0.1:5000":{{"auth":"{auth}"}},"https://index.docker.io/v1/":{{"username":"bob","password":"pw"}},"http://h.example:8080/v2/":{{"auth":"!!"}}}},"credsStore":"desktop"}}"#
        );
        let c = credentials_from_config(text.as_bytes(), "127.0.0.1:5000")
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3cr:et")
        );
        let c = credentials_from_config(text.as_bytes(), "docker.io")
            .unwrap()
            .unwrap();
        assert_eq!(c.username, "bob");
        assert!(credentials_from_config(text.as_bytes(), "other:1")
            .unwrap()
            .is_none());
        let e = credentials_from_config(text.as_bytes(), "h.example:8080").unwrap_err();
        assert!(e.contains("not base64"), "{e}");
        assert!(credentials_from_config(b"[", "x").is_err());
        assert!(!format!("{c:?}").contains("pw"));
    }
}
