//! Remote caches: share blobs and stage manifests with a team through a directory (NFS), an
//! HTTP/WebDAV server or S3, using the `object_store` crate.
//!
//! The remote layout ([`layout`]) is independent of the local sled index: immutable blobs by
//! blake3 digest, one small manifest ([`StageRecord`]) per stage key, run records and pins for
//! garbage collection. It is the REAPI split (action cache + CAS) with blake3 names.
//!
//! # Guarantees
//!
//! * **First writer wins.** Blobs and manifests are written create-if-absent. A different
//!   manifest for an existing key (a nondeterministic stage) is never overwritten: it is kept
//!   under `conflicts/` and reported as [`ManifestPut::Conflict`]. Whether the backend honours
//!   create-if-absent is probed once per remote ([`CondPut`]): S3 (`If-None-Match: *`) and
//!   directories (hard link of a staged file) do; HTTP/WebDAV servers cannot (object_store's
//!   `HttpStore` has no conditional PUT), and some S3 clones accept and ignore the header. There
//!   wdro falls back to HEAD-then-PUT and re-reads the manifest after writing it: two writers
//!   racing on one key within one round trip can still overwrite each other, and the loser is
//!   reported as a conflict when its read-back differs. Blobs are content-addressed, so a race on
//!   a blob writes identical bytes.
//! * **Nothing half-written is visible.** Directory writes are staged and renamed or linked into
//!   place; S3 multipart uploads appear only on completion (aborted on error); nginx's WebDAV
//!   writes a PUT body to a temp file and renames it. A blob is pushed only after its manifest's
//!   blobs are all present, and a manifest only after all its blobs.
//! * **Nothing unverified is used.** Every pulled blob is re-hashed while it streams in, and
//!   refused (never stored) when its digest or size is wrong ([`RemoteError::is_integrity`]).
//!   Local blobs are re-hashed before they are pushed. Manifests, run records and pins are
//!   bounded in size and their names validated ([`validate`]).
//! * **No credentials in output.** Errors carry the redacted URL and pass backend messages
//!   through a [`url::Redactor`]; a manifest that contains a credential is refused.
//! * **Degrade, don't fail.** The pipeline treats remote errors as misses (with a warning).
//!
//! # Sync facade
//!
//! `object_store` is async. [`Remote`] owns a small tokio runtime and exposes blocking methods,
//! so the pipeline and the CLI stay synchronous; transfers inside one call run concurrently,
//! bounded by [`RemoteOptions::jobs`] across all calls. Background pushes ([`Remote::push_stage`])
//! run on the same runtime and are awaited with [`Remote::wait_pushes`].

mod count;
pub mod error;
pub mod layout;
pub mod lease;
pub mod maint;
mod transfer;
pub mod url;
pub mod validate;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::Serialize;

pub use count::RequestCounts;
pub use error::{RemoteError, RemoteResult};
pub use lease::{Lease, LeaseInfo, LeaseOptions, LeaseRecord, Leased, TryLease};
pub use maint::{RemoteDu, RemoteGcItem, RemoteGcOptions, RemoteGcReport, RemoteLsEntry, RemoteVerifyReport};
pub use transfer::{PushHandle, PushSummary, PushedStage};
pub use url::Backend;

use crate::digest::{Digest, StageKey};
use crate::record::{RunRecord, StageRecord};

/// Whether this machine may write to the remote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RemoteMode {
    /// Pull hits, push what this machine computes (a developer's default).
    #[default]
    ReadWrite,
    /// Pull only (CI forks, untrusted machines): nothing is ever written.
    ReadOnly,
}

/// How a remote performs create-if-absent writes (probed once per remote).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum CondPut {
    /// The backend refuses a second create of the same name (S3 `If-None-Match`, hard links).
    Native,
    /// HEAD, then PUT if absent: racy within one round trip (see the module docs).
    HeadThenPut { why: String },
}

/// Tuning of a [`Remote`].
#[derive(Clone, Debug)]
pub struct RemoteOptions {
    pub mode: RemoteMode,
    /// Blob transfers in flight at once, across all calls (default 8).
    pub jobs: usize,
    /// Blobs at least this large are uploaded in parts where the backend has multipart uploads
    /// (default 64 MiB; S3 needs parts of at least 5 MiB except the last).
    pub multipart_min: u64,
    /// Part size of multipart uploads (default 16 MiB).
    pub part_size: usize,
    /// TTL, grace and poll interval of leases on stage keys ([`lease`]).
    pub lease: LeaseOptions,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            mode: RemoteMode::ReadWrite,
            jobs: 8,
            multipart_min: 64 << 20,
            part_size: 16 << 20,
            lease: LeaseOptions::default(),
        }
    }
}

/// Outcome of writing a manifest.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ManifestPut {
    /// This writer was first.
    Created,
    /// The remote already had a manifest with the same outputs (the same result, computed by
    /// someone else or earlier).
    Present,
    /// The remote has a manifest with *different* outputs for this key: the stage is
    /// nondeterministic. The remote's manifest stays; ours is kept under `conflicts/`.
    Conflict { theirs: Box<StageRecord> },
}

/// Byte and object counters of one [`Remote`] since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TransferStats {
    pub pulled_blobs: u64,
    pub pulled_bytes: u64,
    pub pushed_blobs: u64,
    pub pushed_bytes: u64,
    pub manifests_read: u64,
    pub manifests_written: u64,
}

#[derive(Default)]
struct Counters {
    pulled_blobs: AtomicU64,
    pulled_bytes: AtomicU64,
    pushed_blobs: AtomicU64,
    pushed_bytes: AtomicU64,
    manifests_read: AtomicU64,
    manifests_written: AtomicU64,
}

/// What the async tasks share; holds no runtime, so a task may drop the last reference.
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) prefix: Path,
    pub(crate) display: String,
    pub(crate) backend: Backend,
    pub(crate) opts: RemoteOptions,
    pub(crate) redactor: url::Redactor,
    pub(crate) cond: tokio::sync::OnceCell<CondPut>,
    pub(crate) permits: tokio::sync::Semaphore,
    /// Blobs this process found corrupt or truncated on the remote. A read-write push replaces
    /// them (an overwrite with the verified bytes) instead of trusting their presence.
    pub(crate) known_bad: Mutex<std::collections::BTreeSet<Digest>>,
    counters: Counters,
    requests: Arc<count::Counters>,
}

/// A remote cache. Blocking methods; see the module docs.
pub struct Remote {
    rt: tokio::runtime::Runtime,
    pub(crate) shared: Arc<Shared>,
    /// Manifests read in this process, by key (`None`: known absent). A run plans and then
    /// re-decides each stage; this keeps that to one GET per key.
    manifests: Mutex<HashMap<StageKey, Option<StageRecord>>>,
    pending: Mutex<Vec<PushHandle>>,
    /// Set after a connection-level failure: further lookups are skipped as misses.
    unavailable: AtomicBool,
    warned: OnceLock<()>,
    sink: OnceLock<WarningSink>,
    /// Lease generations this process watched, for the clock-free staleness rule ([`lease`]).
    pub(crate) lease_seen: lease::Seen,
}

/// Where a remote's warnings go (remote trouble is reported, never fatal, to a run).
pub type WarningSink = Box<dyn Fn(&str) + Send + Sync>;

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remote").field("url", &self.shared.display).field("mode", &self.shared.opts.mode).finish()
    }
}

impl Remote {
    /// Opens a remote by URL (see [`url`] for the schemes). Does no I/O except creating a
    /// `file://` directory.
    pub fn open(url: &str, opts: RemoteOptions) -> RemoteResult<Remote> {
        let b = url::build(url)?;
        Remote::from_parts(b.store, b.prefix, b.display, b.backend, b.redactor, opts)
    }

    /// A remote over an in-memory store (tests; `object_store::memory::InMemory`).
    pub fn in_memory(opts: RemoteOptions) -> RemoteResult<Remote> {
        let store = Arc::new(object_store::memory::InMemory::new());
        Remote::from_store(store, "memory://", opts)
    }

    /// A remote over any `ObjectStore` (tests, embedding).
    pub fn from_store(store: Arc<dyn ObjectStore>, display: &str, opts: RemoteOptions) -> RemoteResult<Remote> {
        Remote::from_parts(store, Path::default(), display.into(), Backend::Memory, url::Redactor::default(), opts)
    }

    fn from_parts(
        store: Arc<dyn ObjectStore>,
        prefix: Path,
        display: String,
        backend: Backend,
        redactor: url::Redactor,
        mut opts: RemoteOptions,
    ) -> RemoteResult<Remote> {
        opts.jobs = opts.jobs.max(1);
        opts.part_size = opts.part_size.max(5 << 20);
        let requests = Arc::new(count::Counters::default());
        let store: Arc<dyn ObjectStore> = Arc::new(count::Counting { inner: store, counts: requests.clone() });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("wdro-remote")
            .enable_all()
            .build()
            .map_err(|source| RemoteError::Io { remote: display.clone(), path: "tokio runtime".into(), source })?;
        let shared = Arc::new(Shared {
            store,
            prefix,
            backend,
            redactor,
            cond: tokio::sync::OnceCell::new(),
            permits: tokio::sync::Semaphore::new(opts.jobs),
            known_bad: Mutex::new(Default::default()),
            requests,
            opts,
            display,
            counters: Counters::default(),
        });
        Ok(Remote {
            rt,
            shared,
            manifests: Mutex::new(HashMap::new()),
            pending: Mutex::new(Vec::new()),
            unavailable: AtomicBool::new(false),
            warned: OnceLock::new(),
            sink: OnceLock::new(),
            lease_seen: lease::Seen::default(),
        })
    }

    /// Sends warnings (refused blobs, an unreachable remote, nondeterminism) to `sink` instead of
    /// stderr. Can be set once.
    pub fn set_warning_sink(&self, sink: WarningSink) {
        let _ = self.sink.set(sink);
    }

    /// Reports a warning through the sink (default: a `warning:` line on stderr).
    pub fn warn(&self, msg: &str) {
        let msg = self.shared.redactor.redact(msg);
        match self.sink.get() {
            Some(f) => f(&msg),
            None => eprintln!("warning: {msg}"),
        }
    }

    /// The URL without credentials, for messages.
    pub fn display(&self) -> &str {
        &self.shared.display
    }

    pub fn mode(&self) -> RemoteMode {
        self.shared.opts.mode
    }

    pub fn is_read_only(&self) -> bool {
        self.shared.opts.mode == RemoteMode::ReadOnly
    }

    pub fn backend(&self) -> Backend {
        self.shared.backend
    }

    pub fn options(&self) -> &RemoteOptions {
        &self.shared.opts
    }

    pub fn stats(&self) -> TransferStats {
        let c = &self.shared.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TransferStats {
            pulled_blobs: l(&c.pulled_blobs),
            pulled_bytes: l(&c.pulled_bytes),
            pushed_blobs: l(&c.pushed_blobs),
            pushed_bytes: l(&c.pushed_bytes),
            manifests_read: l(&c.manifests_read),
            manifests_written: l(&c.manifests_written),
        }
    }

    /// Backend requests made so far, by kind (see [`RequestCounts`]).
    pub fn requests(&self) -> RequestCounts {
        self.shared.requests.snapshot()
    }

    pub(crate) fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// How create-if-absent works on this remote (probes on first use; read-only remotes are
    /// never probed since they never write).
    pub fn conditional_put(&self) -> RemoteResult<CondPut> {
        if self.is_read_only() {
            return Ok(CondPut::HeadThenPut { why: "read-only: never writes".into() });
        }
        let s = self.shared.clone();
        self.block_on(async move { s.cond().await.cloned() })
    }

    /// True once a connection-level error made this process stop asking the remote.
    pub fn is_unavailable(&self) -> bool {
        self.unavailable.load(Ordering::Relaxed)
    }

    /// Records a connection-level failure; returns true the first time (warn once).
    pub fn mark_unavailable(&self) -> bool {
        self.unavailable.store(true, Ordering::Relaxed);
        self.warned.set(()).is_ok()
    }

    /// The manifest for `key`, validated; `None` when the remote has none. Memoized.
    pub fn get_manifest(&self, key: &StageKey) -> RemoteResult<Option<StageRecord>> {
        if let Some(m) = self.manifests.lock().unwrap_or_else(|e| e.into_inner()).get(key) {
            return Ok(m.clone());
        }
        let s = self.shared.clone();
        let k = *key;
        let got = self.block_on(async move { s.get_manifest(&k).await })?;
        self.manifests.lock().unwrap_or_else(|e| e.into_inner()).insert(*key, got.clone());
        Ok(got)
    }

    /// Fetches the manifests of `keys` in parallel (bounded by `jobs`) into the memo, so that the
    /// lookups that follow cost nothing: a planner knows many keys at once (every stage whose
    /// inputs are known) but decides stages one by one. Errors are not memoized; the lookup
    /// that follows repeats the request and reports it.
    pub fn prefetch_manifests(&self, keys: &[StageKey]) {
        let todo: Vec<StageKey> = {
            let memo = self.manifests.lock().unwrap_or_else(|e| e.into_inner());
            let mut v: Vec<StageKey> = keys.iter().filter(|k| !memo.contains_key(k)).copied().collect();
            v.sort();
            v.dedup();
            v
        };
        if todo.len() < 2 || self.is_unavailable() {
            return;
        }
        let s = self.shared.clone();
        let jobs = s.opts.jobs;
        let got: Vec<(StageKey, RemoteResult<Option<StageRecord>>)> = self.block_on(async move {
            use futures::StreamExt;
            futures::stream::iter(todo.into_iter().map(|k| {
                let s = s.clone();
                async move { (k, s.get_manifest(&k).await) }
            }))
            .buffer_unordered(jobs)
            .collect()
            .await
        });
        let mut memo = self.manifests.lock().unwrap_or_else(|e| e.into_inner());
        for (k, r) in got {
            if let Ok(m) = r {
                memo.insert(k, m);
            }
        }
    }

    /// Forgets a memoized manifest (after refusing its blobs, so a later lookup re-reads it).
    pub fn forget_manifest(&self, key: &StageKey) {
        self.manifests.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }

    /// Writes a manifest create-if-absent. Its blobs must already be on the remote.
    pub fn put_manifest(&self, rec: &StageRecord) -> RemoteResult<ManifestPut> {
        let s = self.shared.clone();
        let r = rec.clone();
        let out = self.block_on(async move { s.put_manifest(&r).await })?;
        let stored = match &out {
            ManifestPut::Conflict { theirs } => (**theirs).clone(),
            _ => rec.clone(),
        };
        self.manifests.lock().unwrap_or_else(|e| e.into_inner()).insert(rec.key, Some(stored));
        Ok(out)
    }

    /// Uploads a run record (immutable; an existing one with the same id is left alone).
    pub fn put_run(&self, run: &RunRecord) -> RemoteResult<bool> {
        let s = self.shared.clone();
        let r = run.clone();
        self.block_on(async move { s.put_run(&r).await })
    }

    /// Points a pin at a run (pins are mutable: the last writer wins).
    pub fn put_pin(&self, name: &str, run_id: &str) -> RemoteResult<()> {
        let s = self.shared.clone();
        let (n, r) = (name.to_string(), run_id.to_string());
        self.block_on(async move { s.put_pin(&n, &r).await })
    }

    /// Size of a blob on the remote, `None` when absent.
    pub fn blob_size(&self, d: &Digest) -> RemoteResult<Option<u64>> {
        let s = self.shared.clone();
        let d = *d;
        self.block_on(async move { s.head(&layout::blob(&s.prefix, &d), "HEAD").await.map(|m| m.map(|m| m.size)) })
    }
}

impl Shared {
    pub(crate) fn backend_err(&self, op: &'static str, path: &Path, e: impl fmt::Display) -> RemoteError {
        RemoteError::Backend {
            remote: self.display.clone(),
            op,
            path: path.to_string(),
            msg: self.redactor.redact(&e.to_string()),
        }
    }

    pub(crate) fn invalid(&self, what: impl Into<String>, msg: impl Into<String>) -> RemoteError {
        RemoteError::Invalid { remote: self.display.clone(), what: what.into(), msg: msg.into() }
    }

    fn count(&self, c: fn(&Counters) -> &AtomicU64, n: u64) {
        c(&self.counters).fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn count_pull(&self, bytes: u64) {
        self.count(|c| &c.pulled_blobs, 1);
        self.count(|c| &c.pulled_bytes, bytes);
    }

    pub(crate) fn count_push(&self, bytes: u64) {
        self.count(|c| &c.pushed_blobs, 1);
        self.count(|c| &c.pushed_bytes, bytes);
    }

    pub(crate) fn check_writable(&self) -> RemoteResult<()> {
        if self.opts.mode == RemoteMode::ReadOnly {
            return Err(RemoteError::ReadOnly { remote: self.display.clone() });
        }
        Ok(())
    }

    /// HEAD: `None` when absent.
    pub(crate) async fn head(&self, p: &Path, op: &'static str) -> RemoteResult<Option<object_store::ObjectMeta>> {
        match self.store.head(p).await {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.backend_err(op, p, e)),
        }
    }

    /// GET a small object whole, refusing it above `max` bytes. `None` when absent.
    pub(crate) async fn get_small(&self, p: &Path, max: u64) -> RemoteResult<Option<Bytes>> {
        let r = match self.store.get(p).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.backend_err("GET", p, e)),
        };
        if r.meta.size > max {
            return Err(self.invalid(p.to_string(), format!("{} bytes, more than the limit of {max}", r.meta.size)));
        }
        let b = r.bytes().await.map_err(|e| self.backend_err("GET", p, e))?;
        if b.len() as u64 > max {
            return Err(self.invalid(p.to_string(), format!("more than the limit of {max} bytes")));
        }
        Ok(Some(b))
    }

    async fn cond(&self) -> RemoteResult<&CondPut> {
        self.cond.get_or_try_init(|| self.probe()).await
    }

    /// Writes a probe object twice with create-if-absent: a backend that refuses the second
    /// write honours conditional puts; one that does not support them, or accepts both writes
    /// (a server that ignores `If-None-Match`), gets the explicit HEAD-then-PUT fallback.
    async fn probe(&self) -> RemoteResult<CondPut> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let p = layout::probe(&self.prefix, &format!("{}-{nanos}", std::process::id()));
        let create = || PutOptions { mode: PutMode::Create, ..Default::default() };
        let first = self.store.put_opts(&p, PutPayload::from_static(b"probe"), create()).await;
        let out = match first {
            Err(object_store::Error::NotImplemented { .. }) | Err(object_store::Error::NotSupported { .. }) => {
                CondPut::HeadThenPut { why: format!("the {:?} backend has no create-if-absent PUT", self.backend) }
            }
            Err(e) => return Err(self.backend_err("PUT (conditional-put probe)", &p, e)),
            Ok(_) => match self.store.put_opts(&p, PutPayload::from_static(b"probe2"), create()).await {
                Err(object_store::Error::AlreadyExists { .. }) | Err(object_store::Error::Precondition { .. }) => {
                    CondPut::Native
                }
                Ok(_) => CondPut::HeadThenPut {
                    why: "the server accepted a second create-if-absent PUT (it ignores If-None-Match)".into(),
                },
                Err(e) => return Err(self.backend_err("PUT (conditional-put probe)", &p, e)),
            },
        };
        let _ = self.store.delete(&p).await;
        Ok(out)
    }

    /// Create-if-absent write. Returns false when the object already existed.
    pub(crate) async fn put_if_absent(&self, p: &Path, payload: PutPayload) -> RemoteResult<bool> {
        self.check_writable()?;
        match self.cond().await? {
            CondPut::Native => {
                let o = PutOptions { mode: PutMode::Create, ..Default::default() };
                match self.store.put_opts(p, payload, o).await {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::AlreadyExists { .. }) | Err(object_store::Error::Precondition { .. }) => {
                        Ok(false)
                    }
                    Err(e) => Err(self.backend_err("PUT", p, e)),
                }
            }
            CondPut::HeadThenPut { .. } => {
                if self.head(p, "HEAD").await?.is_some() {
                    return Ok(false);
                }
                self.store.put(p, payload).await.map_err(|e| self.backend_err("PUT", p, e))?;
                Ok(true)
            }
        }
    }

    async fn get_manifest(&self, key: &StageKey) -> RemoteResult<Option<StageRecord>> {
        let p = layout::manifest(&self.prefix, key);
        let _permit = self.permits.acquire().await.expect("the semaphore is never closed");
        let Some(bytes) = self.get_small(&p, validate::MAX_MANIFEST_BYTES).await? else { return Ok(None) };
        self.count(|c| &c.manifests_read, 1);
        let rec: StageRecord = serde_json::from_slice(&bytes)
            .map_err(|e| self.invalid(format!("manifest {}", key.short()), e.to_string()))?;
        validate::check_manifest(&rec, key).map_err(|m| self.invalid(format!("manifest {}", key.short()), m))?;
        Ok(Some(rec))
    }

    async fn put_manifest(&self, rec: &StageRecord) -> RemoteResult<ManifestPut> {
        self.check_writable()?;
        let json = serde_json::to_vec(rec).expect("records serialize");
        let text = String::from_utf8_lossy(&json);
        if let Some(hint) = validate::find_secret(&text, self.redactor.secrets()) {
            return Err(RemoteError::Secret { what: format!("the manifest of {}", rec.stage_name), hint });
        }
        validate::check_manifest(rec, &rec.key)
            .map_err(|m| self.invalid(format!("manifest {}", rec.key.short()), m))?;
        let p = layout::manifest(&self.prefix, &rec.key);
        let _permit = self.permits.acquire().await.expect("the semaphore is never closed");
        let created = self.put_if_absent(&p, PutPayload::from(json.clone())).await?;
        let native = matches!(self.cond().await?, CondPut::Native);
        if created && native {
            self.count(|c| &c.manifests_written, 1);
            return Ok(ManifestPut::Created);
        }
        // Not first (or a racy backend): compare with what the remote holds now.
        let theirs = match self.get_small(&p, validate::MAX_MANIFEST_BYTES).await? {
            Some(b) => serde_json::from_slice::<StageRecord>(&b).ok(),
            None => None,
        };
        match theirs {
            Some(t) if t.outputs == rec.outputs => {
                if created {
                    self.count(|c| &c.manifests_written, 1);
                    Ok(ManifestPut::Created)
                } else {
                    Ok(ManifestPut::Present)
                }
            }
            Some(t) => {
                let cp = layout::conflict(&self.prefix, &rec.key, &Digest::of_bytes(&json));
                let _ = self.put_if_absent(&cp, PutPayload::from(json)).await;
                Ok(ManifestPut::Conflict { theirs: Box::new(t) })
            }
            None => Err(self.invalid(format!("manifest {}", rec.key.short()), "unreadable after writing it")),
        }
    }

    async fn put_run(&self, run: &RunRecord) -> RemoteResult<bool> {
        if !layout::is_safe_segment(&run.id) {
            return Err(self.invalid(format!("run id {:?}", run.id), "not a plain name"));
        }
        let json = serde_json::to_vec(run).expect("runs serialize");
        self.put_if_absent(&layout::run(&self.prefix, &run.id), PutPayload::from(json)).await
    }

    async fn put_pin(&self, name: &str, run_id: &str) -> RemoteResult<()> {
        self.check_writable()?;
        if !layout::is_safe_segment(name) || !layout::is_safe_segment(run_id) {
            return Err(self.invalid(format!("pin {name:?}"), "pin names and run ids must be plain names"));
        }
        let json = serde_json::to_vec(&serde_json::json!({"name": name, "run": run_id})).expect("json");
        let p = layout::pin(&self.prefix, name);
        self.store.put(&p, PutPayload::from(json)).await.map_err(|e| self.backend_err("PUT", &p, e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
