//! The registry client (OCI distribution spec v1.1, the parts forkd uses):
//! blob HEAD / GET (with `Range` to resume into a partial file) / upload
//! (POST then monolithic PUT, or chunked PATCHes for big blobs) / cross-repo
//! mount, manifest PUT / GET. Handles the 401 dance: Basic credentials, or a
//! bearer token fetched from the realm a `WWW-Authenticate` challenge names,
//! cached per scope.
//!
//! Every byte from the registry is untrusted: bodies are read with a bound,
//! blobs are hashed and counted while they stream and refused (naming the
//! blob, the size and digest expected) when they do not match. Requests time
//! out. This module never decides what to transfer; [`crate::fileset`] and
//! [`crate::image`] do.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::header::{
    HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE,
    WWW_AUTHENTICATE,
};
use reqwest::StatusCode;
use serde::Deserialize;

use crate::auth::{self, parse_challenges, Challenge, Credentials, TokenResponse};
use crate::digest::{verify, Digest, Hashing};
use crate::error::{OciError, Result};
use crate::media::{Descriptor, MANIFEST_ACCEPT, MAX_MANIFEST_BYTES};

/// Largest error body or token response read.
const MAX_SMALL_BODY: u64 = 64 * 1024;
/// A blob transfer may take its base timeout plus one second per this many bytes.
const MIN_TRANSFER_RATE: u64 = 1024 * 1024;

/// How to reach and authenticate to a registry.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Plain HTTP instead of HTTPS (a loopback or lab registry).
    pub insecure: bool,
    /// Credentials to use; `None` looks the registry up in Docker's config.
    pub credentials: Option<Credentials>,
    /// Whether to read Docker's config when `credentials` is `None`.
    pub docker_config: bool,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Timeout of one request; blob transfers get one more second per MiB.
    pub timeout: Duration,
    /// Blobs up to this size are uploaded with one PUT, larger ones in PATCHes of this size.
    pub upload_chunk_bytes: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            insecure: false,
            credentials: None,
            docker_config: true,
            connect_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(60),
            upload_chunk_bytes: 16 * 1024 * 1024,
        }
    }
}

/// How an upload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upload {
    /// The registry had the blob already (or mounted it from another repository).
    Present,
    /// The bytes were sent.
    Sent,
}

/// A client for one registry host.
pub struct Registry {
    http: Client,
    name: String,
    base: String,
    options: ClientOptions,
    credentials: Option<Credentials>,
    auth: Mutex<AuthState>,
}

#[derive(Default)]
struct AuthState {
    /// The registry asked for Basic credentials: send them on every request.
    basic: bool,
    /// Bearer tokens by scope.
    tokens: HashMap<String, String>,
}

/// What a request needs access to.
#[derive(Clone, Copy)]
enum Access<'a> {
    /// Nothing in particular (the API version check).
    Registry,
    Pull(&'a str),
    Push(&'a str),
    /// Push to the first repository, mounting from the second.
    Mount(&'a str, &'a str),
}

impl Access<'_> {
    fn scope(&self) -> String {
        match self {
            Access::Registry => String::new(),
            Access::Pull(r) => format!("repository:{r}:pull"),
            Access::Push(r) => format!("repository:{r}:pull,push"),
            Access::Mount(r, from) => format!("repository:{r}:pull,push repository:{from}:pull"),
        }
    }
}

impl Registry {
    /// A client for `registry` (`host[:port]`, as in a [`crate::Reference`]'s
    /// `api_host()`).
    pub fn new(registry: &str, options: ClientOptions) -> Result<Registry> {
        let credentials = match &options.credentials {
            Some(c) => Some(c.clone()),
            None if options.docker_config => {
                let name = if registry == "registry-1.docker.io" {
                    "docker.io"
                } else {
                    registry
                };
                auth::docker_credentials(name)?
            }
            None => None,
        };
        let scheme = if options.insecure { "http" } else { "https" };
        let http = Client::builder()
            .connect_timeout(options.connect_timeout)
            .timeout(options.timeout)
            .user_agent(concat!("forkd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| OciError::Connect {
                registry: registry.to_owned(),
                url: format!("{scheme}://{registry}"),
                source,
            })?;
        Ok(Registry {
            http,
            name: registry.to_owned(),
            base: format!("{scheme}://{registry}"),
            options,
            credentials,
            auth: Mutex::new(AuthState::default()),
        })
    }

    /// The registry's name, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Sends the request `build` makes, answering one 401 with credentials or
    /// a bearer token; `build` is called again for the retry.
    fn send(
        &self,
        access: Access<'_>,
        action: &str,
        url: &str,
        build: &dyn Fn() -> RequestBuilder,
    ) -> Result<Response> {
        let mut retried = false;
        loop {
            let mut request = build();
            if let Some(header) = self.authorization(&access) {
                request = request.header(AUTHORIZATION, header);
            }
            let response = request.send().map_err(|source| OciError::Connect {
                registry: self.name.clone(),
                url: url.to_owned(),
                source,
            })?;
            if response.status() != StatusCode::UNAUTHORIZED {
                return Ok(response);
            }
            let challenges: Vec<Challenge> = response
                .headers()
                .get_all(WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(parse_challenges)
                .collect();
            let detail = error_text(response);
            if retried {
                return Err(match &self.credentials {
                    None => OciError::NoCredentials {
                        registry: self.name.clone(),
                    },
                    Some(c) => OciError::Unauthorized {
                        registry: self.name.clone(),
                        username: Some(c.username.clone()),
                        detail,
                    },
                });
            }
            retried = true;
            let bearer = challenges.iter().find_map(|c| match c {
                Challenge::Bearer { realm, service, .. } => Some((realm, service)),
                Challenge::Basic => None,
            });
            match bearer {
                Some((realm, service)) => {
                    let token = self.fetch_token(realm, service.as_deref(), &access)?;
                    self.lock().tokens.insert(access.scope(), token);
                }
                None if challenges.contains(&Challenge::Basic) => {
                    if self.credentials.is_none() {
                        return Err(OciError::NoCredentials {
                            registry: self.name.clone(),
                        });
                    }
                    self.lock().basic = true;
                }
                None => {
                    return Err(OciError::Unauthorized {
                        registry: self.name.clone(),
                        username: self.credentials.as_ref().map(|c| c.username.clone()),
                        detail: format!(
                            "401 to {action} without a challenge forkd understands ({detail})"
                        ),
                    })
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AuthState> {
        // A poisoned lock only means another thread panicked mid-insert; the
        // map itself is still consistent.
        self.auth.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn authorization(&self, access: &Access<'_>) -> Option<String> {
        let state = self.lock();
        if let Some(token) = state.tokens.get(&access.scope()) {
            return Some(format!("Bearer {token}"));
        }
        if state.basic {
            return self.credentials.as_ref().map(basic_header);
        }
        None
    }

    fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        access: &Access<'_>,
    ) -> Result<String> {
        let token_error = |reason: String| OciError::Token {
            realm: realm.to_owned(),
            reason,
        };
        let mut url = reqwest::Url::parse(realm)
            .map_err(|e| token_error(format!("the realm is not a URL: {e}")))?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err(token_error("the realm is not an http(s) URL".into()));
        }
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            for scope in access.scope().split(' ').filter(|s| !s.is_empty()) {
                query.append_pair("scope", scope);
            }
        }
        let mut request = self.http.get(url);
        if let Some(c) = &self.credentials {
            request = request.header(AUTHORIZATION, basic_header(c));
        }
        let response = request.send().map_err(|e| token_error(e.to_string()))?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let detail = error_text(response);
            return Err(match &self.credentials {
                None => OciError::NoCredentials {
                    registry: self.name.clone(),
                },
                Some(c) => OciError::Unauthorized {
                    registry: self.name.clone(),
                    username: Some(c.username.clone()),
                    detail: format!("the token server {realm} answered {status}: {detail}"),
                },
            });
        }
        if !status.is_success() {
            return Err(token_error(format!("{status}: {}", error_text(response))));
        }
        let body =
            read_bounded(response, MAX_SMALL_BODY).map_err(|e| token_error(e.to_string()))?;
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| token_error(format!("answer is not a token: {e}")))?;
        parsed.into_token().ok_or_else(|| {
            token_error("the answer holds neither `token` nor `access_token`".into())
        })
    }

    fn status_error(&self, action: &str, url: &str, response: Response) -> OciError {
        OciError::Status {
            registry: self.name.clone(),
            action: action.to_owned(),
            url: url.to_owned(),
            status: response.status().as_u16(),
            body: error_text(response),
        }
    }

    /// Checks `/v2/` answers (and that credentials, if asked for, work).
    pub fn ping(&self) -> Result<()> {
        let url = self.url("/v2/");
        let response = self.send(Access::Registry, "the API version check", &url, &|| {
            self.http.get(&url)
        })?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(self.status_error("the API version check", &url, response))
        }
    }

    /// The size of blob `digest` in `repo` if the registry has it.
    pub fn blob_size(&self, repo: &str, digest: &Digest) -> Result<Option<u64>> {
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"));
        let action = format!("a check for blob {digest}");
        let response = self.send(Access::Pull(repo), &action, &url, &|| self.http.head(&url))?;
        match response.status() {
            StatusCode::OK => Ok(Some(content_length(response.headers()).unwrap_or(0))),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.status_error(&action, &url, response)),
        }
    }

    fn transfer_timeout(&self, size: u64) -> Duration {
        self.options.timeout + Duration::from_secs(size / MIN_TRANSFER_RATE)
    }

    /// Downloads blob `desc` into memory, verified. Refused up front when the
    /// descriptor's size exceeds `limit`.
    pub fn fetch_blob_bytes(
        &self,
        repo: &str,
        desc: &Descriptor,
        what: &str,
        limit: u64,
    ) -> Result<Vec<u8>> {
        if desc.size > limit {
            return Err(OciError::TooLarge {
                what: format!("{what} {}", desc.digest),
                limit,
            });
        }
        let url = self.url(&format!("/v2/{repo}/blobs/{}", desc.digest));
        let action = format!("a download of {what} {}", desc.digest);
        let timeout = self.transfer_timeout(desc.size);
        let response = self.send(Access::Pull(repo), &action, &url, &|| {
            self.http.get(&url).timeout(timeout)
        })?;
        if !response.status().is_success() {
            return Err(self.status_error(&action, &url, response));
        }
        let mut reader = Hashing::new(response.take(desc.size + 1));
        let mut bytes = Vec::with_capacity(desc.size.min(limit) as usize);
        reader
            .read_to_end(&mut bytes)
            .map_err(|e| self.body_error(&action, &url, e))?;
        let (digest, size, _) = reader.finish();
        verify(what, &desc.digest, desc.size, &digest, size)?;
        Ok(bytes)
    }

    /// Opens blob `desc` as a stream of at most `desc.size + 1` bytes, for a
    /// caller that hashes and verifies as it reads (image layers).
    pub fn blob_reader(
        &self,
        repo: &str,
        desc: &Descriptor,
        what: &str,
    ) -> Result<Box<dyn Read + Send>> {
        let url = self.url(&format!("/v2/{repo}/blobs/{}", desc.digest));
        let action = format!("a download of {what} {}", desc.digest);
        let timeout = self.transfer_timeout(desc.size);
        let response = self.send(Access::Pull(repo), &action, &url, &|| {
            self.http.get(&url).timeout(timeout)
        })?;
        if !response.status().is_success() {
            return Err(self.status_error(&action, &url, response));
        }
        Ok(Box::new(response.take(desc.size + 1)))
    }

    fn body_error(&self, action: &str, url: &str, e: std::io::Error) -> OciError {
        OciError::Status {
            registry: self.name.clone(),
            action: action.to_owned(),
            url: url.to_owned(),
            status: 0,
            body: format!("the transfer broke off: {e}"),
        }
    }

    /// Downloads blob `desc` into the file `dest`, verified; returns the bytes
    /// received. A partial `dest` left by an interrupted call is resumed with
    /// a `Range` request (a complete one is only verified); a `dest` whose
    /// content turns out wrong is deleted, so the next call starts over.
    pub fn fetch_blob_to_file(
        &self,
        repo: &str,
        desc: &Descriptor,
        what: &str,
        dest: &Path,
    ) -> Result<u64> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dest)
            .map_err(OciError::io("open download file", dest))?;
        let mut have = file.metadata().map_err(OciError::io("stat", dest))?.len();
        if have >= desc.size {
            let mut hashing = Hashing::new(std::io::sink());
            std::io::copy(&mut (&mut file).take(desc.size + 1), &mut hashing)
                .map_err(OciError::io("read", dest))?;
            let (digest, size, _) = hashing.finish();
            if size == desc.size && digest == desc.digest {
                return Ok(0);
            }
            have = 0;
        }
        let result = self.fetch_into(repo, desc, what, dest, &mut file, have);
        if let Err(OciError::SizeMismatch { .. } | OciError::DigestMismatch { .. }) = &result {
            let _ = fs::remove_file(dest);
        }
        result
    }

    fn fetch_into(
        &self,
        repo: &str,
        desc: &Descriptor,
        what: &str,
        dest: &Path,
        file: &mut File,
        have: u64,
    ) -> Result<u64> {
        let url = self.url(&format!("/v2/{repo}/blobs/{}", desc.digest));
        let action = format!("a download of {what} {}", desc.digest);
        let timeout = self.transfer_timeout(desc.size - have);
        let response = self.send(Access::Pull(repo), &action, &url, &|| {
            let request = self.http.get(&url).timeout(timeout);
            if have > 0 {
                request.header(RANGE, format!("bytes={have}-"))
            } else {
                request
            }
        })?;
        let start = match response.status() {
            StatusCode::PARTIAL_CONTENT if range_start(response.headers()) == Some(have) => have,
            StatusCode::OK => 0,
            _ => return Err(self.status_error(&action, &url, response)),
        };
        // Hash what is already there, then stream the rest behind it.
        file.set_len(start)
            .map_err(OciError::io("truncate", dest))?;
        file.seek(SeekFrom::Start(0))
            .map_err(OciError::io("seek", dest))?;
        let mut hashing = Hashing::new(std::io::sink());
        std::io::copy(&mut (&mut *file).take(start), &mut hashing)
            .map_err(OciError::io("read", dest))?;
        // One byte more than promised is enough to tell a too-long blob.
        let mut body = response.take(desc.size - start + 1);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = body
                .read(&mut buf)
                .map_err(|e| self.body_error(&action, &url, e))?;
            if n == 0 {
                break;
            }
            file.write_all(&buf[..n])
                .map_err(OciError::io("write", dest))?;
            hashing
                .write_all(&buf[..n])
                .map_err(OciError::io("hash", dest))?;
        }
        let (digest, size, _) = hashing.finish();
        verify(what, &desc.digest, desc.size, &digest, size)?;
        file.sync_all().map_err(OciError::io("fsync", dest))?;
        Ok(size - start)
    }

    /// Uploads `data` as blob `digest` (one PUT, or PATCHes for big blobs).
    pub fn push_blob(&self, repo: &str, digest: &Digest, data: &[u8]) -> Result<()> {
        self.push_blob_from(repo, digest, data.len() as u64, &mut &data[..])
    }

    /// Uploads `size` bytes read from `reader` as blob `digest`; the registry
    /// checks the digest when the upload completes.
    pub fn push_blob_from(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
        reader: &mut dyn Read,
    ) -> Result<()> {
        let action = format!("an upload of blob {digest}");
        let start_url = self.url(&format!("/v2/{repo}/blobs/uploads/"));
        let response = self.send(Access::Push(repo), &action, &start_url, &|| {
            self.http.post(&start_url).header(CONTENT_LENGTH, 0)
        })?;
        if response.status() != StatusCode::ACCEPTED {
            return Err(self.status_error(&action, &start_url, response));
        }
        let mut location = self.location(&response, &action, &start_url)?;
        let chunk = self.options.upload_chunk_bytes.max(1);
        if size <= chunk as u64 {
            let mut data = Vec::with_capacity(size as usize);
            reader
                .take(size)
                .read_to_end(&mut data)
                .map_err(OciError::io("read blob to upload", digest.to_string()))?;
            return self.finish_upload(repo, &action, &location, digest, data);
        }
        let mut offset = 0u64;
        let mut buf = Vec::with_capacity(chunk);
        while offset < size {
            buf.clear();
            reader
                .take((chunk as u64).min(size - offset))
                .read_to_end(&mut buf)
                .map_err(OciError::io("read blob to upload", digest.to_string()))?;
            if buf.is_empty() {
                break;
            }
            let end = offset + buf.len() as u64 - 1;
            let timeout = self.transfer_timeout(buf.len() as u64);
            let response = self.send(Access::Push(repo), &action, &location, &|| {
                self.http
                    .patch(&location)
                    .timeout(timeout)
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_RANGE, format!("{offset}-{end}"))
                    .body(buf.clone())
            })?;
            if response.status() != StatusCode::ACCEPTED {
                return Err(self.status_error(&action, &location, response));
            }
            location = self.location(&response, &action, &location)?;
            offset = end + 1;
        }
        self.finish_upload(repo, &action, &location, digest, Vec::new())
    }

    fn finish_upload(
        &self,
        repo: &str,
        action: &str,
        location: &str,
        digest: &Digest,
        data: Vec<u8>,
    ) -> Result<()> {
        let separator = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{separator}digest={digest}");
        let timeout = self.transfer_timeout(data.len() as u64);
        let response = self.send(Access::Push(repo), action, &url, &|| {
            self.http
                .put(&url)
                .timeout(timeout)
                .header(CONTENT_TYPE, "application/octet-stream")
                .body(data.clone())
        })?;
        if response.status() != StatusCode::CREATED {
            return Err(self.status_error(action, &url, response));
        }
        Ok(())
    }

    /// Asks the registry to link blob `digest` from repository `from` into
    /// `repo` without sending it; `Upload::Sent` is never returned.
    pub fn mount_blob(&self, repo: &str, digest: &Digest, from: &str) -> Result<Option<Upload>> {
        let url = self.url(&format!(
            "/v2/{repo}/blobs/uploads/?mount={digest}&from={from}"
        ));
        let action = format!("a mount of blob {digest} from {from}");
        let response = self.send(Access::Mount(repo, from), &action, &url, &|| {
            self.http.post(&url).header(CONTENT_LENGTH, 0)
        })?;
        match response.status() {
            StatusCode::CREATED => Ok(Some(Upload::Present)),
            // The registry started an ordinary upload instead; it expires unused.
            StatusCode::ACCEPTED => Ok(None),
            _ => Err(self.status_error(&action, &url, response)),
        }
    }

    /// Uploads `data` unless the registry has it: HEAD first.
    pub fn ensure_blob(&self, repo: &str, digest: &Digest, data: &[u8]) -> Result<Upload> {
        if self.blob_size(repo, digest)?.is_some() {
            return Ok(Upload::Present);
        }
        self.push_blob(repo, digest, data)?;
        Ok(Upload::Sent)
    }

    fn location(&self, response: &Response, action: &str, url: &str) -> Result<String> {
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| OciError::Status {
                registry: self.name.clone(),
                action: action.to_owned(),
                url: url.to_owned(),
                status: response.status().as_u16(),
                body: "the answer has no Location header".into(),
            })?;
        Ok(
            if location.starts_with("http://") || location.starts_with("https://") {
                location.to_owned()
            } else if location.starts_with('/') {
                format!("{}{location}", self.base)
            } else {
                format!("{}/{location}", self.base)
            },
        )
    }

    /// Stores `bytes` as manifest `reference` (a tag or a digest) of `repo`;
    /// returns its digest.
    pub fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Digest> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(OciError::TooLarge {
                what: format!("manifest {repo}:{reference}"),
                limit: MAX_MANIFEST_BYTES as u64,
            });
        }
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"));
        let action = format!("storing manifest {repo}:{reference}");
        let response = self.send(Access::Push(repo), &action, &url, &|| {
            self.http
                .put(&url)
                .header(CONTENT_TYPE, media_type)
                .body(bytes.to_vec())
        })?;
        if response.status() != StatusCode::CREATED {
            return Err(self.status_error(&action, &url, response));
        }
        Ok(Digest::of(bytes))
    }

    /// Fetches manifest `reference` of `repo`: (media type, bytes, digest).
    /// When `reference` is a digest, the bytes are checked against it.
    pub fn get_manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<(Option<String>, Vec<u8>, Digest)> {
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"));
        let action = format!("a fetch of manifest {repo}:{reference}");
        let response = self.send(Access::Pull(repo), &action, &url, &|| {
            self.http.get(&url).header(ACCEPT, MANIFEST_ACCEPT)
        })?;
        if !response.status().is_success() {
            return Err(self.status_error(&action, &url, response));
        }
        let media_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|t| t.split(';').next().unwrap_or(t).trim().to_owned());
        let bytes =
            read_bounded(response, MAX_MANIFEST_BYTES as u64).map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidData => OciError::TooLarge {
                    what: format!("manifest {repo}:{reference}"),
                    limit: MAX_MANIFEST_BYTES as u64,
                },
                _ => self.body_error(&action, &url, e),
            })?;
        let digest = Digest::of(&bytes);
        if let Ok(expected) = Digest::parse(reference) {
            if expected != digest {
                return Err(OciError::DigestMismatch {
                    what: "manifest".into(),
                    digest: expected,
                    actual: digest,
                });
            }
        }
        Ok((media_type, bytes, digest))
    }
}

fn basic_header(c: &Credentials) -> String {
    let raw = format!("{}:{}", c.username, c.password);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The first byte of a `Content-Range: bytes START-END/TOTAL` header.
fn range_start(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(CONTENT_RANGE)?.to_str().ok()?;
    let range = value.strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

fn read_bounded(response: Response, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    crate::digest::Bounded::new(response, limit).read_to_end(&mut out)?;
    Ok(out)
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<ErrorItem>,
}

#[derive(Deserialize)]
struct ErrorItem {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// A short readable text of an error answer: the OCI `errors` list if the
/// body has one, else the start of the body.
fn error_text(response: Response) -> String {
    let status = response.status();
    let mut body = Vec::new();
    let _ = response.take(MAX_SMALL_BODY).read_to_end(&mut body);
    describe_error_body(status.as_u16(), &body)
}

pub(crate) fn describe_error_body(status: u16, body: &[u8]) -> String {
    if let Ok(parsed) = serde_json::from_slice::<ErrorBody>(body) {
        let items: Vec<String> = parsed
            .errors
            .iter()
            .map(|e| format!("{} ({})", e.message, e.code))
            .collect();
        if !items.is_empty() {
            return items.join("; ");
        }
    }
    let text: String = String::from_utf8_lossy(body).chars().take(300).collect();
    let text = text.trim();
    if text.is_empty() {
        format!("HTTP {status} with an empty body")
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_read_well() {
        assert_eq!(
            describe_error_body(404, br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry","detail":"x"}]}"#),
            "blob unknown to registry (BLOB_UNKNOWN)"
        );
        assert_eq!(describe_error_body(500, b""), "HTTP 500 with an empty body");
        assert_eq!(describe_error_body(502, b"  bad gateway\n"), "bad gateway");
    }

    #[test]
    fn content_range_start() {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_RANGE, "bytes 100-199/200".parse().unwrap());
        assert_eq!(range_start(&h), Some(100));
        h.insert(CONTENT_RANGE, "items 1-2".parse().unwrap());
        assert_eq!(range_start(&h), None);
    }

    #[test]
    fn scopes() {
        assert_eq!(Access::Pull("a/b").scope(), "repository:a/b:pull");
        assert_eq!(Access::Push("a").scope(), "repository:a:pull,push");
        assert_eq!(
            Access::Mount("a", "b").scope(),
            "repository:a:pull,push repository:b:pull"
        );
    }
}
