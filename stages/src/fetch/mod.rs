//! The `fetch` stage: bring one file (a data set archive, a checkpoint) into the pipeline,
//! verified against a digest pin.
//!
//! Why a stage of its own, and why so careful: downloads are where robustness pipelines break in
//! practice. Checkpoint hosts (Google Drive above all) answer with an HTML quota or login page and
//! a 200, mirrors disappear, connections drop halfway through multi-hundred-MB files, and a file
//! silently changed upstream changes every number downstream. So:
//!
//! * the stage key holds only the *pin* (the digest), not the URL: the same file from two mirrors
//!   is the same artifact, and moving a source from a URL to a local copy keeps every cache hit;
//! * sources are mirrors tried in order (`https://…`, `http://…`, `file:PATH`, `file:///abs`, or
//!   a plain path); each network source gets retries with exponential backoff, and downloads resume
//!   with `Range` from `scratch_dir/partial`, which survives a killed run;
//! * an HTML page, a digest mismatch or a truncated body is never cached: the bad bytes are
//!   deleted and the error names the source, the expected and the actual digest;
//! * offline (or with no network) the error says at once which URL and how to supply the file
//!   locally: a `file:` source with the same pin, so the key does not change;
//! * credentials in a URL (`https://user:pass@host/…`) are sent as Basic auth but only ever
//!   shown as `https://***@host/…`.

mod digest;
mod http;
mod local;
mod source;

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};
use wdro_pipeline::params::Params;
use wdro_pipeline::stage::{InputRef, ProgressEvent, Resources, Stage, StageCtx, StageError, StageId, StageOutputs};

pub use digest::Pin;
pub use source::redact_url;

use digest::{hash_file, Digests};
use source::Source;

/// Stage id of [`FetchStage`].
pub const FETCH_ID: &str = "fetch";
/// Bumped whenever the bytes a fetch produces for the same params could change (e.g. the tar
/// layout of directory sources).
pub const FETCH_VERSION: u32 = 1;

/// What to fetch: where from (mirrors, in order) and what it must hash to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchParams {
    /// Mirrors, tried in order until one gives a verified file. A single string is accepted too.
    #[serde(deserialize_with = "one_or_many")]
    pub sources: Vec<String>,
    /// `sha256:<hex>` or `blake3:<hex>`; absent = unpinned (accepted as is, with a warning).
    #[serde(default, skip_serializing_if = "is_unpinned")]
    pub digest: Pin,
}

fn is_unpinned(p: &Pin) -> bool {
    !p.is_pinned()
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::One(s) => vec![s],
        Raw::Many(v) => v,
    })
}

impl FetchParams {
    /// Builds and validates params from config values: `digest` is `sha256:<hex>`,
    /// `blake3:<hex>`, `none` or absent.
    pub fn new(sources: Vec<String>, digest: Option<&str>) -> Result<FetchParams, String> {
        let digest = digest.map(Pin::parse).transpose()?.unwrap_or_default();
        let params = FetchParams { sources, digest };
        params.validate()?;
        Ok(params)
    }

    /// Checks that there is at least one source and that every source parses, so a config can
    /// be rejected before anything runs.
    pub fn validate(&self) -> Result<(), String> {
        if self.sources.is_empty() {
            return Err(FetchError::NoSources.to_string());
        }
        for s in &self.sources {
            Source::parse(s).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The sources with URL credentials redacted: the form for params, logs and metrics.
    pub fn shown_sources(&self) -> Vec<String> {
        self.sources
            .iter()
            .map(|s| Source::parse(s).map(|p| p.shown().to_string()).unwrap_or_else(|_| redact_url(s)))
            .collect()
    }
}

/// How to fetch: settings that cannot change the verified result, hence not in the key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FetchExec {
    /// Retries per network source after the first attempt (an attempt that made progress resets
    /// the count, so a server dropping every connection halfway still delivers via resume).
    pub retries: u32,
    /// Connect timeout and longest silence while reading, in seconds (0 = no read timeout). Not a
    /// limit on the whole download, which may legitimately take long.
    pub timeout_s: u64,
    /// Wait before the first retry; doubles on each further failure in a row (capped at 60 s).
    pub backoff_ms: u64,
    /// Never touch the network: network sources fail at once with a hint to use a local copy.
    pub offline: bool,
    /// How to supply the file without a network, when the stage knows better than the generic
    /// "use a file: source" (e.g. `--set model.file=PATH` for a checkpoint).
    #[serde(default)]
    pub hint: Option<String>,
}

impl Default for FetchExec {
    fn default() -> Self {
        FetchExec { retries: 4, timeout_s: 30, backoff_ms: 500, offline: false, hint: None }
    }
}

/// Why a fetch failed. Every message is one line, names the source (credentials redacted) and,
/// where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no sources given: set sources = [\"https://…\"] or a file: path")]
    NoSources,
    #[error("bad source {given:?}: {why}")]
    BadSource { given: String, why: String },
    #[error("cannot download {url} (offline / no network): {hint}")]
    Offline { url: String, hint: String },
    #[error("cannot reach {url} after {} (no network? {detail}): {hint}", attempts_text(*.attempts))]
    NoNetwork { url: String, attempts: u32, detail: String, hint: String },
    #[error(
        "{url} served an HTML page instead of the file (Google Drive quota or login page?): open it in a \
         browser, download the file and use a file: source with the same digest"
    )]
    Html { url: String },
    #[error("{url}: {status}")]
    HttpStatus { url: String, status: String },
    #[error("{url}: download failed after {}: {detail}", attempts_text(*.attempts))]
    Transfer { url: String, attempts: u32, detail: String },
    #[error("digest mismatch for {src}: expected {expected}, actual {actual} (the file was deleted, not cached)")]
    Mismatch { src: String, expected: String, actual: String },
    #[error("{src}: {what}: {err}")]
    Io { src: String, what: String, err: io::Error },
    #[error("all {n} sources failed: {list}")]
    AllFailed { n: usize, list: String },
}

fn attempts_text(n: u32) -> String {
    if n == 1 {
        "1 attempt".to_string()
    } else {
        format!("{n} attempts")
    }
}

impl FetchError {
    /// The no-network errors come without a hint from the downloader; the caller knows the file
    /// name and pin that make a useful one.
    fn with_hint(self, hint: &str) -> FetchError {
        match self {
            FetchError::NoNetwork { url, attempts, detail, .. } => {
                FetchError::NoNetwork { url, attempts, detail, hint: hint.to_string() }
            }
            other => other,
        }
    }
}

/// How to get the file in without a network, for the error messages.
fn local_hint(file_name: &str, pin: &Pin) -> String {
    let keep = if pin.is_pinned() { " with the same digest (the cache key stays the same)" } else { "" };
    format!("download it elsewhere and use a file:/path/to/{file_name} source{keep}")
}

/// A verified file in `out_dir`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    pub path: PathBuf,
    pub bytes: u64,
    /// The source actually used (credentials redacted).
    pub source: String,
    pub blake3: String,
    /// Present when the pin was sha256.
    pub sha256: Option<String>,
    /// Present for md5 pins.
    pub md5: Option<String>,
}

impl Fetched {
    /// `{"bytes", "source", "blake3", "sha256"?}`.
    pub fn metrics(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("bytes".into(), self.bytes.into());
        m.insert("source".into(), self.source.clone().into());
        m.insert("blake3".into(), self.blake3.clone().into());
        if let Some(s) = &self.sha256 {
            m.insert("sha256".into(), s.clone().into());
        }
        if let Some(s) = &self.md5 {
            m.insert("md5".into(), s.clone().into());
        }
        serde_json::Value::Object(m)
    }
}

/// Fetches `params` into `out_dir/<file name>`: tries each source in order, verifies the pin,
/// leaves nothing unverified behind in `out_dir`. `name` (the stage instance) is only used in
/// warnings printed to stderr.
pub fn fetch_artifact(
    name: &str,
    params: &FetchParams,
    exec: &FetchExec,
    out_dir: &Path,
    scratch_dir: &Path,
    progress: &dyn Fn(ProgressEvent),
) -> Result<Fetched, FetchError> {
    if params.sources.is_empty() {
        return Err(FetchError::NoSources);
    }
    let sources = params.sources.iter().map(|s| Source::parse(s)).collect::<Result<Vec<_>, _>>()?;
    if exec.offline && sources.iter().all(Source::is_network) {
        return Err(offline_error(&sources[0], &params.digest, exec));
    }
    fs::create_dir_all(out_dir).map_err(|err| FetchError::Io {
        src: out_dir.display().to_string(),
        what: "cannot create the output dir".into(),
        err,
    })?;

    let mut errors = Vec::new();
    for (i, src) in sources.iter().enumerate() {
        let result = match src {
            Source::Http { .. } if exec.offline => Err(offline_error(src, &params.digest, exec)),
            Source::Http { url, shown } => fetch_http(url, shown, params, exec, out_dir, scratch_dir, progress),
            Source::Local { path, shown } => fetch_local(path, shown, &params.digest, out_dir, progress),
        };
        match result {
            Ok(f) => {
                if !params.digest.is_pinned() {
                    eprintln!(
                        "warning: {name}: {} is unpinned; got blake3:{}: add digest = \"blake3:{}\" so a changed \
                         upstream file is caught",
                        f.source, f.blake3, f.blake3
                    );
                }
                return Ok(f);
            }
            Err(e) => {
                if i + 1 < sources.len() {
                    eprintln!("warning: {name}: {e}; trying the next source");
                }
                errors.push(e);
            }
        }
    }
    if errors.len() == 1 {
        return Err(errors.pop().expect("one error"));
    }
    let list = errors.iter().enumerate().map(|(i, e)| format!("[{}] {e}", i + 1)).collect::<Vec<_>>().join("; ");
    Err(FetchError::AllFailed { n: errors.len(), list })
}

fn offline_error(src: &Source, pin: &Pin, exec: &FetchExec) -> FetchError {
    let name = match src {
        Source::Http { url, .. } => source::url_file_name(url),
        Source::Local { path, .. } => source::local_file_name(path, false),
    };
    FetchError::Offline {
        url: src.shown().to_string(),
        hint: exec.hint.clone().unwrap_or_else(|| local_hint(&name, pin)),
    }
}

fn fetch_http(
    url: &str,
    shown: &str,
    params: &FetchParams,
    exec: &FetchExec,
    out_dir: &Path,
    scratch_dir: &Path,
    progress: &dyn Fn(ProgressEvent),
) -> Result<Fetched, FetchError> {
    let file_name = source::url_file_name(url);
    let message = format!("downloading {shown}");
    let report = |done, total| progress(ProgressEvent { done, total, message: message.clone() });
    let dl =
        http::Http { url, shown, pinned: params.digest.is_pinned(), exec, scratch: scratch_dir, progress: &report };
    let io_err = |what: &str, err| FetchError::Io { src: shown.to_string(), what: what.to_string(), err };
    let mut part = dl
        .download()
        .map_err(|e| e.with_hint(&exec.hint.clone().unwrap_or_else(|| local_hint(&file_name, &params.digest))))?;
    let mut retried_clean = false;
    loop {
        if looks_like_html_file(&part.path).map_err(|e| io_err("cannot read the download", e))? {
            dl.discard();
            return Err(FetchError::Html { url: shown.to_string() });
        }
        let d =
            hash_file(&part.path, params.digest.wants_sha256()).map_err(|e| io_err("cannot hash the download", e))?;
        match params.digest.check(&d) {
            Ok(()) => {
                let dest = out_dir.join(&file_name);
                move_file(&part.path, &dest).map_err(|e| io_err("cannot move the download into the output dir", e))?;
                dl.forget();
                return Ok(fetched(dest, shown, d));
            }
            Err((expected, actual)) => {
                dl.discard();
                if part.resumed && !retried_clean {
                    // Part of the bytes came from an earlier request, maybe for an older file
                    // or another mirror: one clean download before blaming the server.
                    retried_clean = true;
                    part = dl.download().map_err(|e| {
                        e.with_hint(&exec.hint.clone().unwrap_or_else(|| local_hint(&file_name, &params.digest)))
                    })?;
                    continue;
                }
                return Err(FetchError::Mismatch { src: shown.to_string(), expected, actual });
            }
        }
    }
}

fn fetch_local(
    path: &Path,
    shown: &str,
    pin: &Pin,
    out_dir: &Path,
    progress: &dyn Fn(ProgressEvent),
) -> Result<Fetched, FetchError> {
    let io_err = |what: &str, err| FetchError::Io { src: shown.to_string(), what: what.to_string(), err };
    let meta = fs::metadata(path).map_err(|e| io_err("cannot read", e))?;
    let is_dir = meta.is_dir();
    let file_name = source::local_file_name(path, is_dir);
    let dest = out_dir.join(&file_name);
    // Written under a temporary name first: a failed copy or a mismatch leaves no file that
    // looks like an output, and a source that *is* the destination is never truncated.
    let tmp = out_dir.join(format!(".{file_name}.fetching"));
    let message = format!("copying {shown}");
    let report = |done, total| progress(ProgressEvent { done, total, message: message.clone() });
    let result = if is_dir {
        local::tar_dir(path, &tmp).and_then(|()| {
            let d = hash_file(&tmp, pin.wants_sha256())?;
            report(d.bytes, d.bytes);
            Ok(d)
        })
    } else {
        local::copy_file(path, &tmp, pin.wants_sha256(), &report)
    };
    let d = match result {
        Ok(d) => d,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(if is_dir { "cannot archive the directory" } else { "cannot copy" }, e));
        }
    };
    if let Err((expected, actual)) = pin.check(&d) {
        let _ = fs::remove_file(&tmp);
        return Err(FetchError::Mismatch { src: shown.to_string(), expected, actual });
    }
    fs::rename(&tmp, &dest).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err("cannot move the copy into the output dir", e)
    })?;
    Ok(fetched(dest, shown, d))
}

fn fetched(path: PathBuf, shown: &str, d: Digests) -> Fetched {
    Fetched { path, bytes: d.bytes, source: shown.to_string(), blake3: d.blake3, sha256: d.sha256, md5: d.md5 }
}

/// Checks the first KiB of a finished download (covers pages that arrived over several resumed
/// requests, and unpinned fetches, where no Content-Type check applies).
fn looks_like_html_file(p: &Path) -> io::Result<bool> {
    let mut head = Vec::with_capacity(1024);
    fs::File::open(p)?.take(1024).read_to_end(&mut head)?;
    Ok(http::looks_like_html(&head))
}

/// Rename, or copy + delete when scratch and output live on different file systems.
fn move_file(from: &Path, to: &Path) -> io::Result<()> {
    if fs::rename(from, to).is_ok() {
        return Ok(());
    }
    let tmp = to.with_file_name(format!(
        ".{}.fetching",
        to.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    ));
    let copied = fs::copy(from, &tmp).and_then(|_| fs::rename(&tmp, to));
    if copied.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    copied?;
    fs::remove_file(from)
}

/// The `fetch` stage: one instance per file the pipeline needs.
#[derive(Clone, Debug)]
pub struct FetchStage {
    /// Instance name, e.g. `fetch.cifar10`; prefixes every error.
    pub name: String,
    pub params: FetchParams,
    pub exec: FetchExec,
}

impl FetchStage {
    pub fn new(name: impl Into<String>, params: FetchParams, exec: FetchExec) -> Self {
        FetchStage { name: name.into(), params, exec }
    }
}

impl Stage for FetchStage {
    fn name(&self) -> &str {
        &self.name
    }

    fn id(&self) -> StageId {
        StageId(FETCH_ID.to_string())
    }

    fn version(&self) -> u32 {
        FETCH_VERSION
    }

    /// The pin alone: the same bytes from any mirror (or a local copy) are the same artifact.
    /// Unpinned, the sources are all that identifies the file, so they are the key.
    fn params(&self) -> Params {
        match &self.params.digest {
            Pin::None => {
                let p = Params::new().with("digest", "none").with("sources", self.params.shown_sources());
                // An unpinned local file keys on its current content, so editing it reruns.
                match self.params.sources.first().map(|s| Source::parse(s)) {
                    Some(Ok(Source::Local { path, .. })) => p.with("content", local::fingerprint(&path)),
                    _ => p,
                }
            }
            pin => Params::new().with("digest", pin.to_string()),
        }
    }

    fn exec_params(&self) -> Params {
        Params::new()
            .with("sources", self.params.shown_sources())
            .with("retries", self.exec.retries)
            .with("timeout_s", self.exec.timeout_s)
            .with("backoff_ms", self.exec.backoff_ms)
            .with("offline", self.exec.offline)
    }

    fn inputs(&self) -> Vec<InputRef> {
        Vec::new()
    }

    fn outputs(&self) -> Vec<String> {
        vec!["file".to_string()]
    }

    /// In-process I/O: no worker, no torch, one core for hashing.
    fn resources(&self) -> Resources {
        Resources { cpus: 1, gpus: 0, mem_mb: 64, worker: false }
    }

    fn run(&self, ctx: &StageCtx) -> Result<StageOutputs, StageError> {
        let f = fetch_artifact(&self.name, &self.params, &self.exec, &ctx.out_dir, &ctx.scratch_dir, &*ctx.progress)
            .map_err(|e| StageError(format!("{}: {e}", self.name).replace(['\n', '\r'], " ")))?;
        let metrics = f.metrics();
        Ok(StageOutputs { files: BTreeMap::from([("file".to_string(), f.path)]), metrics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN_A: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    fn stage(sources: &[&str], digest: &str) -> FetchStage {
        FetchStage::new(
            "fetch.t",
            FetchParams {
                sources: sources.iter().map(|s| s.to_string()).collect(),
                digest: Pin::parse(digest).unwrap(),
            },
            FetchExec::default(),
        )
    }

    #[test]
    fn key_params_hold_only_the_pin() {
        let a = stage(&["https://a.example/x.bin"], PIN_A);
        let b = stage(&["https://b.example/y.bin", "file:/tmp/x.bin"], PIN_A);
        assert_eq!(a.params(), b.params());
        assert_eq!(String::from_utf8(a.params().canonical_bytes()).unwrap(), format!("{{\"digest\":\"{PIN_A}\"}}"));
        assert_ne!(a.exec_params(), b.exec_params());
        assert_eq!(a.id().0, "fetch");
        assert_eq!(a.version(), 1);
        assert!(a.inputs().is_empty());
        assert_eq!(a.outputs(), ["file"]);
        assert!(!a.resources().worker);
        assert!(!a.uses_torch());
    }

    #[test]
    fn unpinned_key_holds_the_redacted_sources() {
        let a = stage(&["https://u:pw@a.example/x.bin"], "");
        let v = a.params().to_value();
        assert_eq!(v["digest"], "none");
        assert_eq!(v["sources"], serde_json::json!(["https://***@a.example/x.bin"]));
        assert_ne!(a.params(), stage(&["https://a.example/other.bin"], "").params());
        let e = a.exec_params().to_value();
        assert_eq!(e["sources"], serde_json::json!(["https://***@a.example/x.bin"]));
        assert_eq!(e["retries"], 4);
        assert_eq!(e["backoff_ms"], 500);
        assert_eq!(e["offline"], false);
    }

    #[test]
    fn params_serde() {
        let p: FetchParams = serde_json::from_str(&format!(r#"{{"sources":"file:x","digest":"{PIN_A}"}}"#)).unwrap();
        assert_eq!(p.sources, ["file:x"]);
        assert!(p.digest.is_pinned());
        let back: FetchParams = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        let unpinned: FetchParams = toml::from_str("sources = [\"a\", \"b\"]").unwrap();
        assert_eq!(unpinned.digest, Pin::None);
        assert!(!serde_json::to_string(&unpinned).unwrap().contains("digest"));
        assert!(serde_json::from_str::<FetchParams>(r#"{"sources":[],"url":"x"}"#).is_err());
        assert!(serde_json::from_str::<FetchParams>(r#"{"sources":[],"digest":"md5:00"}"#).is_err());
        let e: FetchExec = toml::from_str("retries = 1").unwrap();
        assert_eq!(e, FetchExec { retries: 1, ..FetchExec::default() });
        assert!(toml::from_str::<FetchExec>("retry = 1").is_err());
    }

    #[test]
    fn validate_catches_bad_sources() {
        assert!(stage(&[], PIN_A).params.validate().unwrap_err().contains("no sources"));
        assert!(stage(&["s3://b/k"], PIN_A).params.validate().unwrap_err().contains("unsupported scheme"));
        assert!(stage(&["https://h/x", "file:y", "/z"], PIN_A).params.validate().is_ok());
        let p = FetchParams::new(vec!["https://h/x".into()], Some(PIN_A)).unwrap();
        assert_eq!(p.digest.to_string(), PIN_A);
        assert_eq!(FetchParams::new(vec!["x".into()], None).unwrap().digest, Pin::None);
        assert!(FetchParams::new(vec!["x".into()], Some("sha1:00")).is_err());
        assert!(FetchParams::new(vec![], Some(PIN_A)).is_err());
    }
}
