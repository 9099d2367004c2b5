//! Leases on a remote cache: one machine computes a stage key at a time, so two people (or two
//! Slurm jobs) submitting overlapping work compute each shared stage once.
//!
//! # Design
//!
//! The only primitive every backend has is the create-if-absent write of
//! [`super::Shared::put_if_absent`] (S3 `If-None-Match: *`, a hard link on a directory, or the
//! HEAD-then-PUT fallback on HTTP/WebDAV). A lease is therefore a sequence of **generation
//! objects** per stage key:
//!
//! ```text
//! <prefix>/leases/<key>/g0000000001.json   {"holder": "host:pid:random", "gen": 1, "expires_ms": …}
//! <prefix>/leases/<key>/g0000000002.json   a takeover of generation 1 after it went stale
//! ```
//!
//! * **Acquire**: list `leases/<key>/`, read the newest generation *n*. If there is none, or it
//!   was released (deleted between the list and the read), or it is stale, create generation
//!   *n + 1* create-if-absent. Whoever creates it holds the lease.
//! * **Renew**: every `ttl / 3`, in a background task on the remote's runtime, the holder lists
//!   the generations again; if a newer one exists, or its own is gone, it has **lost** the lease
//!   ([`Lease::is_lost`]; the caller finishes anyway and says so: results are content-addressed and
//!   manifests first-writer-wins, so a late push is harmless). Otherwise it overwrites its own
//!   generation with a new expiry. Only the holder ever writes its generation's object.
//! * **Release**: the holder deletes its generation and the older ones (dead by construction),
//!   without listing (one DELETE in the common case of generation 1).
//!   Nothing is left behind on success; a crashed holder leaves one small object, which the next
//!   taker's release removes.
//! * **Waiting** ([`Remote::acquire_or_wait`]): a live lease held by someone else is polled every
//!   [`LeaseOptions::poll`] until the stage's manifest appears (then the result is used and
//!   nothing is computed) or the lease goes stale (then it is taken over). After *acquiring*, the
//!   manifest is checked once more: a holder pushes its manifest before it releases, so a lease
//!   taken right after a release always sees the finished result.
//!
//! # Races
//!
//! * Two takers of the same generation (a fresh key, or a stale lease seen by two waiters) both
//!   try to create generation *n + 1*. With [`super::CondPut::Native`] the backend refuses the
//!   second create (S3 answers 412, the directory's hard link fails with `EEXIST`), so exactly one
//!   wins; the other reads the winner's record and waits.
//! * With [`super::CondPut::HeadThenPut`] (HTTP/WebDAV, S3 clones that ignore `If-None-Match`) the
//!   create is a HEAD followed by a PUT: two takers whose HEADs both precede both PUTs both write.
//!   The taker reads its generation back after writing and gives up when it sees another holder,
//!   which catches every interleaving except the one where each reads back its own write before
//!   the other's PUT lands — a window of about one round trip. Then both compute; the remote
//!   keeps the first manifest (a different one is logged as a conflict). Racy, never wrong.
//! * A holder that stalls longer than `ttl + grace` (suspended laptop, network partition) can be
//!   taken over while still alive. It notices at its next renewal and reports it; the stage may be
//!   computed twice in that case, by design: a stalled holder must not block everyone.
//!
//! # Staleness and clocks
//!
//! A lease is stale when **either**
//! 1. the remote's own modification time of the newest generation (S3 `Last-Modified`, the file's
//!    mtime, WebDAV's `getlastmodified`; the holder's `renewed_ms` where a backend reports none)
//!    is more than `ttl + grace` before this machine's clock. This assumes this machine's clock
//!    and the storage server's agree within `grace` (NTP keeps them within milliseconds); a
//!    clock that runs *ahead* by more than `grace` can take over a live lease early (a wasted
//!    duplicate computation, never a wrong result), one that runs *behind* only delays the
//!    takeover until rule 2 fires; or
//! 2. this process has watched the same generation go un-renewed for `ttl + grace` of its own
//!    monotonic clock. This rule needs no clock agreement at all, so a skewed clock never makes a
//!    waiter wait forever.
//!
//! `ttl` is the holder's (stored in its record), `grace` the waiter's ([`LeaseOptions::grace`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use super::error::RemoteResult;
use super::{layout, validate, CondPut, Remote, Shared};
use crate::digest::{Digest, StageKey};
use crate::record::StageRecord;

/// Largest lease record accepted (they are a few hundred bytes).
const MAX_LEASE_BYTES: u64 = 16 << 10;

/// How leases are taken, renewed and waited for (`[remote] lease_ttl_s`, `lease_poll_s`).
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseOptions {
    /// Whether runs take leases at all (`[remote] leases`, default true). Read-only remotes
    /// never do.
    pub enabled: bool,
    /// How long a lease lives without renewal; renewed every `ttl / 3` (default 60 s).
    pub ttl: Duration,
    /// Extra time after the expiry before a lease counts as stale, to absorb clock skew and a
    /// slow renewal (default: 60 s).
    pub grace: Duration,
    /// How often a waiter polls the manifest and the lease (default 2 s).
    pub poll: Duration,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        LeaseOptions {
            enabled: true,
            ttl: Duration::from_secs(60),
            grace: Duration::from_secs(60),
            poll: Duration::from_secs(2),
        }
    }
}

/// The JSON body of one lease generation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// `host:pid:random`: unique per acquisition, so a holder recognises its own write.
    pub holder: String,
    pub host: String,
    pub pid: u32,
    /// The stage's instance name, for messages ("held by … for finetune").
    pub stage: String,
    pub key: StageKey,
    pub gen: u64,
    /// Unix milliseconds on the holder's clock.
    pub created_ms: u64,
    pub renewed_ms: u64,
    pub expires_ms: u64,
    pub ttl_ms: u64,
    /// Renewals so far: a changing number tells a waiter the holder is alive.
    pub renewals: u64,
}

/// A lease someone else holds, as a waiter sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LeaseInfo {
    pub record: LeaseRecord,
    /// The remote's modification time of the generation (unix ms), where the backend has one.
    pub modified_ms: Option<u64>,
}

impl LeaseInfo {
    /// `host pid N (stage S, generation G, renewed Xs ago)`, for "waiting for …" lines.
    pub fn describe(&self) -> String {
        let r = &self.record;
        let age = now_ms().saturating_sub(self.modified_ms.unwrap_or(r.renewed_ms)) / 1000;
        format!("{} pid {} (stage {}, lease generation {}, renewed {age} s ago)", r.host, r.pid, r.stage, r.gen)
    }
}

/// Outcome of [`Remote::try_lease`].
pub enum TryLease {
    Acquired(Lease),
    /// Someone else holds a live lease.
    Held(LeaseInfo),
}

/// Outcome of [`Remote::acquire_or_wait`].
pub enum Leased {
    /// This process holds the lease and the remote has no result yet: compute.
    Acquired(Lease),
    /// The result appeared on the remote (computed by the holder): use it, compute nothing.
    Done(Box<StageRecord>),
}

/// A held lease. Renewed in the background until [`Lease::release`]; dropping it stops the
/// renewal and deletes the generation in the background (best effort; it expires otherwise).
pub struct Lease {
    shared: Arc<Shared>,
    rt: tokio::runtime::Handle,
    key: StageKey,
    gen: u64,
    holder: String,
    lost: Arc<AtomicBool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    renewal: Option<tokio::task::JoinHandle<()>>,
}

/// What a waiter remembers per key for staleness rule 2 (see the module docs).
#[derive(Default)]
pub(crate) struct Seen(Mutex<HashMap<StageKey, (u64, u64, Instant)>>);

impl Seen {
    /// True when `rec` (same generation, same renewal count) was first seen at least `limit` ago.
    fn unchanged_for(&self, rec: &LeaseRecord, limit: Duration) -> bool {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(rec.key).or_insert((rec.gen, rec.renewals, Instant::now()));
        if (e.0, e.1) != (rec.gen, rec.renewals) {
            *e = (rec.gen, rec.renewals, Instant::now());
        }
        e.2.elapsed() >= limit
    }
}

impl Remote {
    /// Tries once to take the lease on `key`: acquired, or held by someone else (live). Never
    /// waits. Read-only remotes cannot hold leases (an error: callers skip leases there).
    pub fn try_lease(&self, key: &StageKey, stage: &str) -> RemoteResult<TryLease> {
        let s = self.shared.clone();
        let (k, st) = (*key, stage.to_string());
        let got = self.block_on(async move { s.try_lease(&k, &st).await })?;
        Ok(match got {
            Attempt::Won(holder, gen) => TryLease::Acquired(self.start_lease(*key, gen, holder)),
            Attempt::Held(info) => {
                let o = &self.shared.opts.lease;
                let limit = Duration::from_millis(info.record.ttl_ms) + o.grace;
                if self.lease_seen.unchanged_for(&info.record, limit) {
                    // Stale by rule 2: take over the generation we watched go un-renewed.
                    let s = self.shared.clone();
                    let (k, st, g) = (*key, stage.to_string(), info.record.gen);
                    match self.block_on(async move { s.create_gen(&k, &st, g + 1).await })? {
                        Some(holder) => TryLease::Acquired(self.start_lease(*key, g + 1, holder)),
                        None => TryLease::Held(info),
                    }
                } else {
                    TryLease::Held(info)
                }
            }
        })
    }

    /// Takes the lease on `key`, waiting while someone else holds it (see the module docs).
    /// `on_wait` is called at each poll with the current holder. The caller computes after
    /// [`Leased::Acquired`] and then pushes and releases; [`Leased::Done`] carries the manifest
    /// the holder pushed.
    pub fn acquire_or_wait(
        &self,
        key: &StageKey,
        stage: &str,
        on_wait: &mut dyn FnMut(&LeaseInfo),
    ) -> RemoteResult<Leased> {
        loop {
            match self.try_lease(key, stage)? {
                TryLease::Acquired(lease) => {
                    // The previous holder pushes its manifest before releasing: look once more.
                    self.forget_manifest(key);
                    return match self.get_manifest(key)? {
                        Some(rec) => {
                            lease.release()?;
                            Ok(Leased::Done(Box::new(rec)))
                        }
                        None => Ok(Leased::Acquired(lease)),
                    };
                }
                TryLease::Held(info) => {
                    on_wait(&info);
                    std::thread::sleep(self.shared.opts.lease.poll);
                    self.forget_manifest(key);
                    if let Some(rec) = self.get_manifest(key)? {
                        return Ok(Leased::Done(Box::new(rec)));
                    }
                }
            }
        }
    }

    /// The stage keys that have a manifest on the remote: one listing (a page per 1000 keys on
    /// S3) instead of a request per key, for schedulers that watch many stages at once.
    pub fn manifest_keys(&self) -> RemoteResult<std::collections::BTreeSet<StageKey>> {
        let s = self.shared.clone();
        self.block_on(async move {
            let metas = s.list("manifests").await?;
            Ok(metas.iter().filter_map(|m| layout::stem(&m.location)?.parse().ok()).collect())
        })
    }

    fn start_lease(&self, key: StageKey, gen: u64, holder: String) -> Lease {
        let lost = Arc::new(AtomicBool::new(false));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = self.rt.spawn(self.shared.clone().renew_loop(key, gen, holder.clone(), lost.clone(), rx));
        Lease {
            shared: self.shared.clone(),
            rt: self.rt.handle().clone(),
            key,
            gen,
            holder,
            lost,
            stop: Some(tx),
            renewal: Some(task),
        }
    }
}

impl Lease {
    pub fn key(&self) -> &StageKey {
        &self.key
    }

    pub fn generation(&self) -> u64 {
        self.gen
    }

    /// `host:pid:random` of this acquisition.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// True once a renewal found a newer generation (or ours deleted): someone took the lease
    /// over, typically because this process stalled for longer than the TTL plus grace.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// Stops the renewal and deletes this generation and the older ones. Blocking; call it
    /// outside the remote's runtime (async code uses `release_async`).
    pub fn release(mut self) -> RemoteResult<()> {
        let rt = self.rt.clone();
        let (shared, key, gen) = self.take();
        rt.block_on(async move { shared.release(&key, gen).await })
    }

    /// [`Lease::release`] from async code (a background push releases when it is done).
    pub(crate) async fn release_async(mut self) -> RemoteResult<()> {
        let (shared, key, gen) = self.take();
        shared.release(&key, gen).await
    }

    fn take(&mut self) -> (Arc<Shared>, StageKey, u64) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.renewal.take() {
            t.abort();
        }
        (self.shared.clone(), self.key, self.gen)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.stop.is_some() {
            let (shared, key, gen) = self.take();
            self.rt.spawn(async move {
                let _ = shared.release(&key, gen).await;
            });
        }
    }
}

enum Attempt {
    Won(String, u64),
    Held(LeaseInfo),
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// `host:pid:random`, fresh per acquisition.
fn new_holder() -> (String, String) {
    let host = hostname();
    let local = 0u8;
    let seed = format!("{}:{}:{:p}:{:?}", now_ms(), std::process::id(), &local, std::thread::current().id());
    let nonce = Digest::of_bytes(format!("{seed}:{:?}", Instant::now()).as_bytes()).to_hex();
    (format!("{host}:{}:{}", std::process::id(), &nonce[..12]), host)
}

fn gen_of(p: &Path) -> Option<u64> {
    layout::stem(p)?.strip_prefix('g')?.parse().ok()
}

impl Shared {
    /// The generations of `key`'s lease, ascending.
    async fn gens(&self, key: &StageKey) -> RemoteResult<Vec<u64>> {
        let mut v: Vec<u64> =
            self.list(&layout::lease_dir(key)).await?.iter().filter_map(|m| gen_of(&m.location)).collect();
        v.sort_unstable();
        Ok(v)
    }

    /// A generation's record and the remote's modification time; `None` when absent (released).
    async fn read_gen(&self, key: &StageKey, gen: u64) -> RemoteResult<Option<LeaseInfo>> {
        let p = layout::lease(&self.prefix, key, gen);
        let r = match self.store.get(&p).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.backend_err("GET", &p, e)),
        };
        if r.meta.size > MAX_LEASE_BYTES {
            return Err(self.invalid(p.to_string(), "lease record too large"));
        }
        let modified = r.meta.last_modified.timestamp_millis();
        let b = r.bytes().await.map_err(|e| self.backend_err("GET", &p, e))?;
        let record: LeaseRecord = serde_json::from_slice(&b).map_err(|e| self.invalid(p.to_string(), e.to_string()))?;
        if record.key != *key || record.gen != gen {
            return Err(self.invalid(p.to_string(), "lease record names another key or generation"));
        }
        // A backend without modification times reports the epoch.
        let modified_ms = (modified > 0).then_some(modified as u64);
        Ok(Some(LeaseInfo { record, modified_ms }))
    }

    async fn try_lease(&self, key: &StageKey, stage: &str) -> RemoteResult<Attempt> {
        self.check_writable()?;
        // Each lost create means another taker made progress (it holds the lease now, or held
        // and already released it): look again, a bounded number of times.
        for _ in 0..16 {
            let newest = self.gens(key).await?.last().copied();
            let next = match newest {
                None => 1,
                Some(g) => match self.read_gen(key, g).await? {
                    None => g + 1,
                    Some(info) => {
                        let base = info.modified_ms.unwrap_or(info.record.renewed_ms);
                        let limit = info.record.ttl_ms + self.opts.lease.grace.as_millis() as u64;
                        if now_ms() > base + limit {
                            g + 1
                        } else {
                            return Ok(Attempt::Held(info));
                        }
                    }
                },
            };
            if let Some(holder) = self.create_gen(key, stage, next).await? {
                return Ok(Attempt::Won(holder, next));
            }
        }
        Err(self.invalid(format!("lease {}", key.short()), "changing too fast to take (16 lost races in a row)"))
    }

    /// Creates generation `gen` create-if-absent. Returns the holder id when this process won.
    async fn create_gen(&self, key: &StageKey, stage: &str, gen: u64) -> RemoteResult<Option<String>> {
        let (holder, host) = new_holder();
        let now = now_ms();
        let ttl_ms = self.opts.lease.ttl.as_millis() as u64;
        let rec = LeaseRecord {
            holder: holder.clone(),
            host,
            pid: std::process::id(),
            stage: stage.to_string(),
            key: *key,
            gen,
            created_ms: now,
            renewed_ms: now,
            expires_ms: now + ttl_ms,
            ttl_ms,
            renewals: 0,
        };
        let json = serde_json::to_vec(&rec).expect("lease records serialize");
        if let Some(hint) = validate::find_secret(&String::from_utf8_lossy(&json), self.redactor.secrets()) {
            return Err(super::RemoteError::Secret { what: "a lease record".into(), hint });
        }
        let p = layout::lease(&self.prefix, key, gen);
        if !self.put_if_absent(&p, PutPayload::from(json)).await? {
            return Ok(None);
        }
        if matches!(self.cond().await?, CondPut::HeadThenPut { .. }) {
            // Racy backend: the last PUT wins, so read back whose generation it is.
            match self.read_gen(key, gen).await? {
                Some(i) if i.record.holder == holder => {}
                _ => return Ok(None),
            }
        }
        Ok(Some(holder))
    }

    /// Renews every `ttl / 3` until stopped or lost.
    async fn renew_loop(
        self: Arc<Self>,
        key: StageKey,
        gen: u64,
        holder: String,
        lost: Arc<AtomicBool>,
        mut stop: tokio::sync::oneshot::Receiver<()>,
    ) {
        let ttl = self.opts.lease.ttl;
        let every = (ttl / 3).max(Duration::from_millis(10));
        let created = now_ms();
        let mut renewals = 0u64;
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(every) => {}
            }
            match self.renew(&key, gen, &holder, created, renewals + 1).await {
                Ok(true) => renewals += 1,
                Ok(false) => {
                    lost.store(true, Ordering::Relaxed);
                    return;
                }
                // A failed renewal is retried at the next tick; the lease may go stale meanwhile.
                Err(_) => {}
            }
        }
    }

    /// One renewal. `Ok(false)`: the lease was lost (a newer generation, or ours deleted).
    async fn renew(&self, key: &StageKey, gen: u64, holder: &str, created: u64, renewals: u64) -> RemoteResult<bool> {
        let gens = self.gens(key).await?;
        if gens.last() != Some(&gen) {
            return Ok(false);
        }
        let Some(mut info) = self.read_gen(key, gen).await? else { return Ok(false) };
        if info.record.holder != holder {
            return Ok(false);
        }
        let now = now_ms();
        info.record.renewed_ms = now;
        info.record.expires_ms = now + info.record.ttl_ms;
        info.record.renewals = renewals;
        info.record.created_ms = info.record.created_ms.min(created);
        let p = layout::lease(&self.prefix, key, gen);
        let json = serde_json::to_vec(&info.record).expect("lease records serialize");
        self.store.put(&p, PutPayload::from(json)).await.map_err(|e| self.backend_err("PUT", &p, e))?;
        Ok(true)
    }

    /// Deletes generation `gen`, then the older ones (left by crashed holders that were taken
    /// over), newest first. No listing: an acquirer always reads the newest generation, so a
    /// missing older one never matters, and a DELETE of an absent object is a no-op.
    async fn release(&self, key: &StageKey, gen: u64) -> RemoteResult<()> {
        let mut first_err = None;
        for g in (1..=gen).rev() {
            let p = layout::lease(&self.prefix, key, g);
            match self.store.delete(&p).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    first_err.get_or_insert(self.backend_err("DELETE", &p, e));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::RemoteOptions;

    fn opts(ttl_ms: u64, grace_ms: u64) -> RemoteOptions {
        RemoteOptions {
            lease: LeaseOptions {
                enabled: true,
                ttl: Duration::from_millis(ttl_ms),
                grace: Duration::from_millis(grace_ms),
                poll: Duration::from_millis(20),
            },
            ..Default::default()
        }
    }

    fn key(i: u32) -> StageKey {
        StageKey(Digest::of_bytes(&i.to_le_bytes()))
    }

    fn acquired(t: TryLease) -> Lease {
        match t {
            TryLease::Acquired(l) => l,
            TryLease::Held(i) => panic!("held by {}", i.describe()),
        }
    }

    fn held(t: TryLease) -> LeaseInfo {
        match t {
            TryLease::Acquired(l) => panic!("acquired generation {}", l.generation()),
            TryLease::Held(i) => i,
        }
    }

    #[test]
    fn acquire_refuse_release_reacquire() {
        let r = Remote::in_memory(opts(60_000, 60_000)).unwrap();
        let other = Remote::from_store(r.shared.store.clone(), "memory://", opts(60_000, 60_000)).unwrap();
        let l = acquired(r.try_lease(&key(1), "a").unwrap());
        assert_eq!(l.generation(), 1);
        let info = held(other.try_lease(&key(1), "a").unwrap());
        assert_eq!(info.record.holder, l.holder());
        assert!(info.describe().contains("stage a, lease generation 1"), "{}", info.describe());
        // Another key is independent.
        let l2 = acquired(other.try_lease(&key(2), "b").unwrap());
        l.release().unwrap();
        let l3 = acquired(other.try_lease(&key(1), "a").unwrap());
        assert_eq!(l3.generation(), 1, "a released lease leaves nothing behind");
        l3.release().unwrap();
        l2.release().unwrap();
        let s = r.shared.clone();
        let all = r.block_on(async move { s.list("").await }).unwrap();
        assert!(all.iter().all(|m| !m.location.as_ref().starts_with("leases")), "{all:?}");
    }

    #[test]
    fn renewal_keeps_a_lease_live_past_its_ttl() {
        let r = Remote::in_memory(opts(300, 100)).unwrap();
        let other = Remote::from_store(r.shared.store.clone(), "memory://", opts(300, 100)).unwrap();
        let l = acquired(r.try_lease(&key(1), "a").unwrap());
        let first = held(other.try_lease(&key(1), "a").unwrap());
        std::thread::sleep(Duration::from_millis(900));
        let later = held(other.try_lease(&key(1), "a").unwrap());
        assert_eq!(later.record.gen, 1);
        assert!(later.record.renewals >= 2, "renewed every ttl/3: {later:?}");
        assert!(later.record.expires_ms > first.record.expires_ms);
        assert!(!l.is_lost());
        l.release().unwrap();
    }

    #[test]
    fn stale_lease_is_taken_over_and_the_old_holder_learns_it() {
        let r = Remote::in_memory(opts(200, 100)).unwrap();
        let other = Remote::from_store(r.shared.store.clone(), "memory://", opts(200, 100)).unwrap();
        let mut l = acquired(r.try_lease(&key(1), "a").unwrap());
        // Simulate a stalled holder: no renewals.
        l.take();
        let _ = l.stop.take();
        held(other.try_lease(&key(1), "a").unwrap());
        std::thread::sleep(Duration::from_millis(400));
        let t = acquired(other.try_lease(&key(1), "a").unwrap());
        assert_eq!(t.generation(), 2);
        // The stalled holder's next renewal sees generation 2.
        let s = r.shared.clone();
        let (k, h) = (key(1), l.holder().to_string());
        assert!(!r.block_on(async move { s.renew(&k, 1, &h, 0, 1).await }).unwrap());
        t.release().unwrap();
        assert!(r.block_on(r.shared.gens(&key(1))).unwrap().is_empty(), "release removes older generations");
    }

    #[test]
    fn a_renewing_holder_loses_to_a_takeover_and_says_so() {
        let r = Remote::in_memory(opts(150, 50)).unwrap();
        let l = acquired(r.try_lease(&key(1), "a").unwrap());
        // Someone creates generation 2 (a takeover by a skewed clock, say).
        let s = r.shared.clone();
        assert!(r.block_on(async move { s.create_gen(&key(1), "a", 2).await }).unwrap().is_some());
        std::thread::sleep(Duration::from_millis(200));
        assert!(l.is_lost());
    }

    #[test]
    fn unchanged_generation_goes_stale_without_trusting_clocks() {
        // A lease whose record and modification time look fresh forever (a holder whose clock
        // runs ahead) but which nobody renews is taken over after ttl + grace of watching.
        let r = Remote::in_memory(opts(100, 100)).unwrap();
        let rec = LeaseRecord {
            holder: "h:1:x".into(),
            host: "h".into(),
            pid: 1,
            stage: "a".into(),
            key: key(3),
            gen: 1,
            created_ms: 0,
            renewed_ms: u64::MAX / 4,
            expires_ms: u64::MAX / 4,
            ttl_ms: 100,
            renewals: 0,
        };
        let seen = Seen::default();
        assert!(!seen.unchanged_for(&rec, Duration::from_millis(200)));
        std::thread::sleep(Duration::from_millis(250));
        assert!(seen.unchanged_for(&rec, Duration::from_millis(200)));
        let renewed = LeaseRecord { renewals: 1, ..rec };
        assert!(!seen.unchanged_for(&renewed, Duration::from_millis(200)), "a renewal resets the watch");
        drop(r);
    }

    #[test]
    fn exactly_one_of_many_concurrent_takers_wins_on_a_directory_remote() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        for round in 0..5u32 {
            let remotes: Vec<Remote> = (0..8).map(|_| Remote::open(&url, opts(60_000, 60_000)).unwrap()).collect();
            assert_eq!(remotes[0].conditional_put().unwrap(), CondPut::Native);
            let barrier = std::sync::Barrier::new(remotes.len());
            let wins: Vec<Option<Lease>> = std::thread::scope(|sc| {
                let hs: Vec<_> = remotes
                    .iter()
                    .map(|r| {
                        let b = &barrier;
                        sc.spawn(move || {
                            b.wait();
                            match r.try_lease(&key(100 + round), "x").unwrap() {
                                TryLease::Acquired(l) => Some(l),
                                TryLease::Held(_) => None,
                            }
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let won: Vec<Lease> = wins.into_iter().flatten().collect();
            assert_eq!(won.len(), 1, "round {round}: exactly one taker wins");
            won.into_iter().for_each(|l| l.release().unwrap());
        }
    }

    #[test]
    fn acquire_or_wait_returns_the_holders_result() {
        let r = Arc::new(Remote::in_memory(opts(60_000, 60_000)).unwrap());
        let other = Remote::from_store(r.shared.store.clone(), "memory://", opts(60_000, 60_000)).unwrap();
        let k = key(7);
        let l = acquired(r.try_lease(&k, "s").unwrap());
        let rec = StageRecord {
            key: k,
            stage_name: "s".into(),
            stage_id: "s".into(),
            version: 1,
            params: serde_json::json!({}),
            inputs: Default::default(),
            outputs: Default::default(),
            metrics: serde_json::Value::Null,
            env: Default::default(),
            wdro_version: "t".into(),
            finished_at: 0,
            duration_ms: 0,
        };
        let (r2, rec2) = (r.clone(), rec.clone());
        let holder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            r2.put_manifest(&rec2).unwrap();
            l.release().unwrap();
        });
        let mut waits = 0;
        match other.acquire_or_wait(&k, "s", &mut |i| {
            waits += 1;
            assert_eq!(i.record.stage, "s");
        }) {
            Ok(Leased::Done(got)) => assert_eq!(*got, rec),
            Ok(Leased::Acquired(_)) => panic!("acquired although the holder pushed a result"),
            Err(e) => panic!("{e}"),
        }
        assert!(waits >= 1);
        holder.join().unwrap();
        // With no holder and no result, it acquires at once.
        assert!(matches!(other.acquire_or_wait(&key(8), "t", &mut |_| panic!("no wait")), Ok(Leased::Acquired(_))));
    }

    #[test]
    fn read_only_remotes_take_no_leases() {
        let r = Remote::in_memory(RemoteOptions { mode: super::super::RemoteMode::ReadOnly, ..Default::default() })
            .unwrap();
        assert!(r.try_lease(&key(1), "a").is_err());
    }
}
