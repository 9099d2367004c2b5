//! From a remote URL to an `object_store` backend (one factory, as sccache's
//! `storage_from_config`), plus the redaction that keeps credentials out of every message.
//!
//! * `file:///abs/dir` (or `file:rel/dir`): a local or NFS directory, [`LocalFileSystem`] with
//!   fsync. Writes go to a staged file and are linked or renamed into place.
//! * `http(s)://host/path`: a WebDAV-ish server (PUT/GET/HEAD/DELETE, PROPFIND for listing), e.g.
//!   nginx's dav module. `user:password@` in the URL becomes a Basic `Authorization` header and
//!   is removed from the URL, so it cannot appear in a request error.
//! * `s3://bucket/prefix`: S3 or an S3-compatible server. Endpoint, region and credentials come
//!   from the standard AWS environment (`AWS_ENDPOINT_URL`, `AWS_REGION`/`AWS_DEFAULT_REGION`,
//!   `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE`), then
//!   from the shared files `~/.aws/credentials` and `~/.aws/config` for what the environment
//!   leaves unset. An `http://` endpoint (a test server such as moto) is allowed explicitly.

use std::collections::BTreeMap;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::http::HttpBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{BackoffConfig, ClientOptions, HeaderMap, HeaderValue, ObjectStore, RetryConfig};

use super::error::{RemoteError, RemoteResult};

/// Which kind of backend a remote is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    File,
    Http,
    S3,
    Memory,
}

impl Backend {
    /// Multipart uploads exist on this backend (HTTP/WebDAV has only whole-object PUT).
    pub fn has_multipart(self) -> bool {
        !matches!(self, Backend::Http)
    }
}

pub(crate) struct Built {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: Path,
    pub display: String,
    pub backend: Backend,
    pub redactor: Redactor,
}

/// Replaces known secrets (and any `user:password@` in URLs) in text that is about to be shown.
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    pub(crate) fn new(secrets: Vec<String>) -> Redactor {
        Redactor { secrets: secrets.into_iter().filter(|s| s.len() >= 4).collect() }
    }

    pub(crate) fn secrets(&self) -> &[String] {
        &self.secrets
    }

    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in &self.secrets {
            out = out.replace(s.as_str(), "***");
        }
        strip_userinfo(&out)
    }
}

/// `scheme://user:pw@host/…` → `scheme://***@host/…`, anywhere in a text.
fn strip_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        let after = &rest[i + 3..];
        let end = after.find(|c: char| c == '/' || c.is_whitespace() || c == '"' || c == ')').unwrap_or(after.len());
        match after[..end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                rest = &after[at..];
            }
            None => rest = after,
        }
    }
    out.push_str(rest);
    out
}

/// Timeouts and retries for network backends: a dead remote must cost seconds, not the
/// 3-minute default retry budget (the cache must never hold a run hostage).
fn client_options(allow_http: bool) -> ClientOptions {
    ClientOptions::new()
        .with_allow_http(allow_http)
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(300))
}

fn retry() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 3,
        retry_timeout: Duration::from_secs(30),
    }
}

pub(crate) fn build(url: &str) -> RemoteResult<Built> {
    let bad = |msg: &str| RemoteError::BadUrl { url: strip_userinfo(url), msg: msg.to_string() };
    if let Some(rest) = url.strip_prefix("file:") {
        let dir = match rest.strip_prefix("//") {
            Some(abs) if abs.starts_with('/') => PathBuf::from(abs),
            Some(_) => {
                return Err(bad("file URLs name a local directory: file:///absolute/path or file:relative/path"))
            }
            None => PathBuf::from(rest),
        };
        return build_file(&dir).map_err(|e| bad(&e));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return build_http(url).map_err(|e| bad(&e));
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        return build_s3(rest).map_err(|e| bad(&e));
    }
    Err(bad("unsupported scheme: use file:///dir, http(s)://host/path or s3://bucket/prefix"))
}

fn build_file(dir: &FsPath) -> Result<Built, String> {
    if dir.as_os_str().is_empty() {
        return Err("empty directory".into());
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let abs = std::fs::canonicalize(dir).map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?;
    let fs = LocalFileSystem::new_with_prefix(&abs).map_err(|e| e.to_string())?.with_fsync(true);
    Ok(Built {
        store: Arc::new(fs),
        prefix: Path::default(),
        display: format!("file://{}", abs.display()),
        backend: Backend::File,
        redactor: Redactor::default(),
    })
}

fn build_http(raw: &str) -> Result<Built, String> {
    let mut u = url::Url::parse(raw).map_err(|e| e.to_string())?;
    let mut secrets = Vec::new();
    let mut headers = HeaderMap::new();
    if !u.username().is_empty() || u.password().is_some() {
        let user = percent_decode(u.username());
        let pass = u.password().map(percent_decode).unwrap_or_default();
        let token = base64(format!("{user}:{pass}").as_bytes());
        let mut v = HeaderValue::from_str(&format!("Basic {token}")).map_err(|e| e.to_string())?;
        v.set_sensitive(true);
        headers.insert("authorization", v);
        secrets.extend([pass, token].into_iter().filter(|s| !s.is_empty()));
        u.set_username("").map_err(|_| "cannot strip the user name")?;
        u.set_password(None).map_err(|_| "cannot strip the password")?;
    }
    if u.query().is_some() {
        return Err("a query string is not allowed in a remote URL (it could carry a token)".into());
    }
    // No trailing slash: object_store appends path segments, and an empty last segment would
    // make `dir//blobs`, which WebDAV servers refuse for PROPFIND.
    let clean = u.to_string().trim_end_matches('/').to_string();
    // The store is rooted at the origin and the URL's path becomes the key prefix: HttpStore
    // reports listed paths from the server root (the PROPFIND hrefs), so keys must be too.
    let path = u.path().trim_matches('/').to_string();
    let mut origin = u.clone();
    origin.set_path("");
    let opts = client_options(u.scheme() == "http").with_default_headers(headers);
    let store = HttpBuilder::new()
        .with_url(origin.to_string().trim_end_matches('/'))
        .with_client_options(opts)
        .with_retry(retry())
        .build()
        .map_err(|e| e.to_string())?;
    Ok(Built {
        store: Arc::new(store),
        prefix: super::layout::join(&Path::default(), &percent_decode(&path)),
        display: clean.clone(),
        backend: Backend::Http,
        redactor: Redactor::new(secrets),
    })
}

fn build_s3(rest: &str) -> Result<Built, String> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() || bucket.contains('@') || bucket.contains(':') {
        return Err("expected s3://bucket/prefix (credentials come from the AWS environment, never the URL)".into());
    }
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let files = AwsFiles::load();
    let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let mut secrets = Vec::new();
    let key = env("AWS_ACCESS_KEY_ID").or_else(|| files.get("aws_access_key_id"));
    let secret = env("AWS_SECRET_ACCESS_KEY").or_else(|| files.get("aws_secret_access_key"));
    let token = env("AWS_SESSION_TOKEN").or_else(|| files.get("aws_session_token"));
    if let (Some(k), Some(s)) = (&key, &secret) {
        b = b.with_access_key_id(k).with_secret_access_key(s);
        secrets.push(s.clone());
    }
    if let Some(t) = &token {
        b = b.with_token(t);
        secrets.push(t.clone());
    }
    let region = env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")).or_else(|| files.get("region"));
    b = b.with_region(region.unwrap_or_else(|| "us-east-1".into()));
    let endpoint = env("AWS_ENDPOINT_URL_S3").or_else(|| env("AWS_ENDPOINT_URL")).or_else(|| files.get("endpoint_url"));
    let mut display = format!("s3://{bucket}/{prefix}").trim_end_matches('/').to_string();
    let mut allow_http = false;
    if let Some(ep) = &endpoint {
        allow_http = ep.starts_with("http://");
        b = b.with_endpoint(ep.clone());
        display.push_str(&format!(" (endpoint {})", strip_userinfo(ep)));
    }
    let store = b.with_client_options(client_options(allow_http)).with_retry(retry()).build().map_err(|e| {
        let r = Redactor::new(secrets.clone());
        r.redact(&e.to_string())
    })?;
    Ok(Built {
        store: Arc::new(store),
        prefix: super::layout::join(&Path::default(), prefix),
        display,
        backend: Backend::S3,
        redactor: Redactor::new(secrets),
    })
}

/// The profile's entries of `~/.aws/credentials` and `~/.aws/config` (credentials win).
struct AwsFiles {
    values: BTreeMap<String, String>,
}

impl AwsFiles {
    fn load() -> AwsFiles {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let file = |var: &str, rel: &str| {
            std::env::var_os(var).map(PathBuf::from).or_else(|| home.as_ref().map(|h| h.join(".aws").join(rel)))
        };
        let profile = std::env::var("AWS_PROFILE").ok().filter(|p| !p.is_empty()).unwrap_or_else(|| "default".into());
        let mut values = BTreeMap::new();
        if let Some(p) = file("AWS_CONFIG_FILE", "config") {
            let section = if profile == "default" { "default".to_string() } else { format!("profile {profile}") };
            values.extend(read_ini_section(&p, &section));
        }
        if let Some(p) = file("AWS_SHARED_CREDENTIALS_FILE", "credentials") {
            values.extend(read_ini_section(&p, &profile));
        }
        AwsFiles { values }
    }

    fn get(&self, k: &str) -> Option<String> {
        self.values.get(k).cloned()
    }
}

fn read_ini_section(path: &FsPath, section: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(text) = std::fs::read_to_string(path) else { return out };
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == section;
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for c in input.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 { T[(n >> 6) as usize & 63] as char } else { '=' });
        out.push(if c.len() > 2 { T[n as usize & 63] as char } else { '=' });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_userinfo_and_secrets() {
        let r = Redactor::new(vec!["s3cr3tKEY".into()]);
        let msg = "GET https://bob:hunter2@dav.example/x failed; key s3cr3tKEY rejected";
        let out = r.redact(msg);
        assert!(!out.contains("hunter2") && !out.contains("bob") && !out.contains("s3cr3tKEY"), "{out}");
        assert!(out.contains("https://***@dav.example/x"), "{out}");
    }

    #[test]
    fn http_credentials_move_to_a_header() {
        let b = build("http://alice:p%40ss@127.0.0.1:9/cache").unwrap();
        assert_eq!(b.display, "http://127.0.0.1:9/cache");
        assert_eq!(b.backend, Backend::Http);
        assert!(b.redactor.secrets().contains(&"p@ss".to_string()));
        let e = build("http://127.0.0.1:9/cache?token=abc").err().unwrap().to_string();
        assert!(e.contains("query string"), "{e}");
    }

    #[test]
    fn base64_and_percent() {
        assert_eq!(base64(b"alice:p@ss"), "YWxpY2U6cEBzcw==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(percent_decode("p%40ss%"), "p@ss%");
    }

    #[test]
    fn ini_sections() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config");
        std::fs::write(
            &p,
            "[default]\nregion = eu-west-1\n[profile team]\nregion=us-east-2\nendpoint_url = http://x\n",
        )
        .unwrap();
        assert_eq!(read_ini_section(&p, "default")["region"], "eu-west-1");
        assert_eq!(read_ini_section(&p, "profile team")["endpoint_url"], "http://x");
    }

    #[test]
    fn bad_urls() {
        assert!(build("ftp://x").is_err());
        assert!(build("s3://user:pw@bucket/x").is_err());
        assert!(build("file://relative").is_err());
    }
}
