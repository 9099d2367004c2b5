//! Maintenance of a remote: `ls` (manifests), `du` (where the bytes are), `verify` (rehash every
//! blob, validate every manifest) and `gc` (drop what no pinned or recent run reaches).
//!
//! `verify` only reads: a corrupt blob is reported, never deleted, so it is safe to run from a
//! read-only machine; the pipeline refuses such a blob anyway. `gc` keeps everything modified
//! within a grace period, because another user may be between uploading a stage's blobs and its
//! manifest, or between its manifests and its run record.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt};
use serde::Serialize;

use super::error::{RemoteError, RemoteResult};
use super::{layout, validate, Remote, Shared};
use crate::digest::{Digest, StageKey};
use crate::maint::human;
use crate::record::{RunRecord, StageRecord};

/// A blob's name, its path, and what hashing it gave (digest, bytes) or why it failed.
type BlobCheck = (Digest, String, Result<(Digest, u64), String>);

/// One manifest on the remote.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RemoteLsEntry {
    pub key: StageKey,
    pub stage_name: String,
    pub stage_id: String,
    pub outputs: usize,
    pub bytes: u64,
    pub finished_at: u64,
    pub duration_ms: u64,
}

/// What `remote du` counted (from the listing; nothing is downloaded).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RemoteDu {
    pub blobs: usize,
    pub blob_bytes: u64,
    pub manifests: usize,
    pub manifest_bytes: u64,
    pub runs: usize,
    pub run_bytes: u64,
    pub pins: usize,
    pub conflicts: usize,
    pub conflict_bytes: u64,
    /// Anything else under the prefix (probe leftovers, foreign files).
    pub other: usize,
    pub other_bytes: u64,
}

impl fmt::Display for RemoteDu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<22} {:>8} {:>12}", "", "count", "bytes")?;
        for (what, n, b) in [
            ("blobs", self.blobs, self.blob_bytes),
            ("manifests", self.manifests, self.manifest_bytes),
            ("runs", self.runs, self.run_bytes),
            ("pins", self.pins, 0),
            ("conflicts", self.conflicts, self.conflict_bytes),
            ("other", self.other, self.other_bytes),
        ] {
            writeln!(f, "{what:<22} {n:>8} {:>12}", human(b))?;
        }
        Ok(())
    }
}

/// What `remote verify` found. Nothing is changed on the remote.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RemoteVerifyReport {
    pub blobs_checked: usize,
    pub bytes_checked: u64,
    /// `(name, actual digest)`: blobs whose bytes do not hash to their name.
    pub corrupt: Vec<(Digest, Digest)>,
    /// Blobs that could not be read, with the error.
    pub unreadable: Vec<(String, String)>,
    /// Objects under `blobs/` whose name is not a digest.
    pub foreign: Vec<String>,
    pub manifests_checked: usize,
    /// `(path, why)`: manifests that fail to parse or validate.
    pub invalid_manifests: Vec<(String, String)>,
    /// Manifests naming blobs the remote lacks or that are corrupt: `(key, stage, digests)`.
    pub incomplete_manifests: Vec<(StageKey, String, Vec<Digest>)>,
    /// Keys for which someone pushed a different manifest (a nondeterministic stage).
    pub conflicts: Vec<String>,
}

impl RemoteVerifyReport {
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty()
            && self.unreadable.is_empty()
            && self.invalid_manifests.is_empty()
            && self.incomplete_manifests.is_empty()
    }
}

impl fmt::Display for RemoteVerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "checked {} blobs ({}) and {} manifests",
            self.blobs_checked,
            human(self.bytes_checked),
            self.manifests_checked
        )?;
        for (d, a) in &self.corrupt {
            writeln!(f, "corrupt    blob {d}: hashes to {} (pulls refuse it)", a.short())?;
        }
        for (p, e) in &self.unreadable {
            writeln!(f, "unreadable {p}: {e}")?;
        }
        for p in &self.foreign {
            writeln!(f, "foreign    {p}: not named by a digest")?;
        }
        for (p, e) in &self.invalid_manifests {
            writeln!(f, "invalid    manifest {p}: {e}")?;
        }
        for (k, n, ds) in &self.incomplete_manifests {
            let ds: Vec<String> = ds.iter().map(|d| d.short()).collect();
            writeln!(f, "incomplete manifest {} ({n}): blobs missing or corrupt: {}", k.short(), ds.join(", "))?;
        }
        for k in &self.conflicts {
            writeln!(f, "nondeterminism: key {k} has conflicting manifests under conflicts/")?;
        }
        if self.is_clean() {
            writeln!(f, "remote is consistent")?;
        }
        Ok(())
    }
}

/// One object `gc` frees (or would free).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RemoteGcItem {
    pub path: String,
    pub bytes: u64,
    pub reason: String,
}

/// What `remote gc` did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RemoteGcReport {
    pub dry_run: bool,
    pub items: Vec<RemoteGcItem>,
    pub freed_bytes: u64,
    pub kept_runs: Vec<String>,
    pub kept_manifests: usize,
    pub kept_blobs: usize,
    pub kept_young: usize,
    pub notes: Vec<String>,
}

impl fmt::Display for RemoteGcReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run { "would free" } else { "freed" };
        for it in &self.items {
            writeln!(f, "{verb} {:>10}  {}  — {}", human(it.bytes), it.path, it.reason)?;
        }
        writeln!(
            f,
            "{verb} {} in {} objects; kept {} runs, {} manifests, {} blobs, {} objects younger than the grace period",
            human(self.freed_bytes),
            self.items.len(),
            self.kept_runs.len(),
            self.kept_manifests,
            self.kept_blobs,
            self.kept_young
        )?;
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        Ok(())
    }
}

/// `remote gc` settings.
#[derive(Clone, Debug)]
pub struct RemoteGcOptions {
    /// Keep what the newest N run records reach, besides pinned runs.
    pub keep_last_runs: usize,
    /// Never delete an object modified more recently than this.
    pub grace: Duration,
    pub dry_run: bool,
}

impl Shared {
    /// Every object under `<prefix>/<sub>` (recursive; one level at a time on WebDAV); a
    /// missing directory is empty.
    pub(crate) async fn list(&self, sub: &str) -> RemoteResult<Vec<ObjectMeta>> {
        let p = layout::join(&self.prefix, sub);
        if self.backend == super::Backend::Http {
            return self.list_by_level(p).await;
        }
        match self.store.list(Some(&p)).try_collect::<Vec<_>>().await {
            Ok(v) => Ok(v),
            Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(self.backend_err("LIST", &p, e)),
        }
    }

    /// A recursive listing one level at a time (PROPFIND `Depth: 1`): WebDAV servers such as
    /// nginx refuse `Depth: infinity`, which object_store's `HttpStore::list` sends.
    async fn list_by_level(&self, root: Path) -> RemoteResult<Vec<ObjectMeta>> {
        let mut out = Vec::new();
        let mut todo = vec![root];
        while let Some(dir) = todo.pop() {
            let prefix = if dir.as_ref().is_empty() { None } else { Some(&dir) };
            match self.store.list_with_delimiter(prefix).await {
                Ok(r) => {
                    out.extend(r.objects);
                    todo.extend(r.common_prefixes.into_iter().filter(|c| c != &dir));
                }
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.backend_err("LIST", &dir, e)),
            }
        }
        Ok(out)
    }

    fn digest_of(p: &Path) -> Option<Digest> {
        p.filename()?.parse().ok()
    }

    fn key_of(p: &Path) -> Option<StageKey> {
        layout::stem(p)?.parse().ok()
    }

    async fn read_json<T: serde::de::DeserializeOwned>(&self, p: &Path, max: u64) -> RemoteResult<Option<T>> {
        match self.get_small(p, max).await? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b).map(Some).map_err(|e| self.invalid(p.to_string(), e.to_string())),
        }
    }
}

impl Remote {
    /// Every manifest on the remote (downloaded in parallel), newest first.
    pub fn ls(&self) -> RemoteResult<Vec<RemoteLsEntry>> {
        let s = self.shared.clone();
        self.block_on(async move {
            let metas = s.list("manifests").await?;
            let jobs = s.opts.jobs;
            let recs: Vec<Option<StageRecord>> = futures::stream::iter(metas.into_iter().map(|m| {
                let s = s.clone();
                async move {
                    let Some(key) = Shared::key_of(&m.location) else { return Ok(None) };
                    match s.read_json::<StageRecord>(&m.location, validate::MAX_MANIFEST_BYTES).await {
                        Ok(Some(r)) if validate::check_manifest(&r, &key).is_ok() => Ok(Some(r)),
                        Ok(_) | Err(RemoteError::Invalid { .. }) => Ok(None),
                        Err(e) => Err(e),
                    }
                }
            }))
            .buffer_unordered(jobs)
            .try_collect()
            .await?;
            let mut out: Vec<RemoteLsEntry> = recs
                .into_iter()
                .flatten()
                .map(|r| RemoteLsEntry {
                    key: r.key,
                    outputs: r.outputs.len(),
                    bytes: r.outputs.values().map(|o| o.size).sum(),
                    stage_name: r.stage_name,
                    stage_id: r.stage_id,
                    finished_at: r.finished_at,
                    duration_ms: r.duration_ms,
                })
                .collect();
            out.sort_by(|a, b| b.finished_at.cmp(&a.finished_at).then(a.stage_name.cmp(&b.stage_name)));
            Ok(out)
        })
    }

    /// Counts and sizes from one listing of the whole prefix.
    pub fn du(&self) -> RemoteResult<RemoteDu> {
        let s = self.shared.clone();
        self.block_on(async move {
            let mut du = RemoteDu::default();
            for m in s.list("").await? {
                let rel = m.location.as_ref().strip_prefix(s.prefix.as_ref()).unwrap_or(m.location.as_ref());
                let rel = rel.trim_start_matches('/');
                let top = rel.split('/').next().unwrap_or("");
                let (n, b) = match top {
                    "blobs" => (&mut du.blobs, Some(&mut du.blob_bytes)),
                    "manifests" => (&mut du.manifests, Some(&mut du.manifest_bytes)),
                    "runs" => (&mut du.runs, Some(&mut du.run_bytes)),
                    "pins" => (&mut du.pins, None),
                    "conflicts" => (&mut du.conflicts, Some(&mut du.conflict_bytes)),
                    _ => (&mut du.other, Some(&mut du.other_bytes)),
                };
                *n += 1;
                if let Some(b) = b {
                    *b += m.size;
                }
            }
            Ok(du)
        })
    }

    /// Downloads and rehashes every blob, validates every manifest and checks that its blobs
    /// exist and are sound. Changes nothing.
    pub fn verify(&self) -> RemoteResult<RemoteVerifyReport> {
        let s = self.shared.clone();
        self.block_on(async move {
            let mut rep = RemoteVerifyReport::default();
            let blobs = s.list("blobs").await?;
            let mut present: BTreeSet<Digest> = BTreeSet::new();
            let mut named: Vec<(Digest, ObjectMeta)> = Vec::new();
            for m in blobs {
                match Shared::digest_of(&m.location) {
                    Some(d) => named.push((d, m)),
                    None => rep.foreign.push(m.location.to_string()),
                }
            }
            let jobs = s.opts.jobs;
            let checked: Vec<BlobCheck> = futures::stream::iter(named.into_iter().map(|(d, m)| {
                let s = s.clone();
                async move {
                    let _permit = s.permits.acquire().await.expect("the semaphore is never closed");
                    let r = async {
                        let mut stream = s
                            .store
                            .get(&m.location)
                            .await
                            .map_err(|e| s.redactor.redact(&e.to_string()))?
                            .into_stream();
                        let mut h = blake3::Hasher::new();
                        let mut n = 0u64;
                        while let Some(c) = stream.next().await {
                            let c = c.map_err(|e| s.redactor.redact(&e.to_string()))?;
                            n += c.len() as u64;
                            h.update(&c);
                        }
                        Ok::<_, String>((Digest(*h.finalize().as_bytes()), n))
                    }
                    .await;
                    (d, m.location.to_string(), r)
                }
            }))
            .buffer_unordered(jobs)
            .collect()
            .await;
            let mut bad: BTreeSet<Digest> = BTreeSet::new();
            for (d, path, r) in checked {
                match r {
                    Ok((actual, n)) => {
                        rep.blobs_checked += 1;
                        rep.bytes_checked += n;
                        if actual == d {
                            present.insert(d);
                        } else {
                            rep.corrupt.push((d, actual));
                            bad.insert(d);
                        }
                    }
                    Err(e) => {
                        rep.unreadable.push((path, e));
                        bad.insert(d);
                    }
                }
            }
            for m in s.list("manifests").await? {
                rep.manifests_checked += 1;
                let path = m.location.to_string();
                let Some(key) = Shared::key_of(&m.location) else {
                    rep.invalid_manifests.push((path, "not named by a stage key".into()));
                    continue;
                };
                let rec = match s.read_json::<StageRecord>(&m.location, validate::MAX_MANIFEST_BYTES).await {
                    Ok(Some(r)) => r,
                    Ok(None) => continue,
                    Err(RemoteError::Invalid { msg, .. }) => {
                        rep.invalid_manifests.push((path, msg));
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if let Err(msg) = validate::check_manifest(&rec, &key) {
                    rep.invalid_manifests.push((path, msg));
                    continue;
                }
                let missing: Vec<Digest> = rec
                    .outputs
                    .values()
                    .map(|o| o.digest)
                    .filter(|d| !present.contains(d) || bad.contains(d))
                    .collect();
                if !missing.is_empty() {
                    rep.incomplete_manifests.push((key, rec.stage_name, missing));
                }
            }
            let conflicts: BTreeSet<String> = s
                .list("conflicts")
                .await?
                .iter()
                .filter_map(|m| m.location.parts().nth_back(1).map(|p| p.as_ref().to_string()))
                .collect();
            rep.conflicts = conflicts.into_iter().collect();
            Ok(rep)
        })
    }

    /// Garbage collection by reachability from pinned runs and the newest runs; see the module
    /// docs for the grace period. With `dry_run`, reports only.
    pub fn gc(&self, o: &RemoteGcOptions) -> RemoteResult<RemoteGcReport> {
        if !o.dry_run {
            self.shared.check_writable()?;
        }
        let s = self.shared.clone();
        let o = o.clone();
        self.block_on(async move {
            let mut rep = RemoteGcReport { dry_run: o.dry_run, ..Default::default() };
            let now = std::time::SystemTime::now();
            let young = |m: &ObjectMeta| {
                let t = std::time::UNIX_EPOCH + Duration::from_secs(m.last_modified.timestamp().max(0) as u64);
                now.duration_since(t).unwrap_or_default() < o.grace
            };
            // Pins → run ids.
            let mut pinned: BTreeSet<String> = BTreeSet::new();
            for m in s.list("pins").await? {
                match s.read_json::<serde_json::Value>(&m.location, validate::MAX_PIN_BYTES).await {
                    Ok(Some(v)) => match v["run"].as_str() {
                        Some(r) => {
                            pinned.insert(r.to_string());
                        }
                        None => rep.notes.push(format!("pin {} names no run", m.location)),
                    },
                    Ok(None) => {}
                    Err(e) => rep.notes.push(format!("pin {} is unreadable: {e}", m.location)),
                }
            }
            // Runs: pinned plus the newest N (run ids sort by time).
            let run_metas = s.list("runs").await?;
            let mut ids: Vec<(String, ObjectMeta)> =
                run_metas.into_iter().filter_map(|m| Some((layout::stem(&m.location)?, m))).collect();
            ids.sort_by(|a, b| a.0.cmp(&b.0));
            let newest: BTreeSet<String> = ids.iter().rev().take(o.keep_last_runs).map(|(id, _)| id.clone()).collect();
            let mut keys: BTreeSet<StageKey> = BTreeSet::new();
            let mut garbage: Vec<(ObjectMeta, String)> = Vec::new();
            for (id, m) in &ids {
                let keep = pinned.contains(id) || newest.contains(id);
                if !keep {
                    garbage.push((m.clone(), format!("run not pinned and not among the last {}", o.keep_last_runs)));
                    continue;
                }
                match s.read_json::<RunRecord>(&m.location, validate::MAX_RUN_BYTES).await {
                    Ok(Some(run)) if validate::check_run(&run, id).is_ok() => {
                        keys.extend(run.stages.iter().map(|(_, k)| *k));
                        rep.kept_runs.push(id.clone());
                    }
                    Ok(_) | Err(RemoteError::Invalid { .. }) => {
                        garbage.push((m.clone(), "unreadable or invalid run record".into()))
                    }
                    Err(e) => return Err(e),
                }
            }
            for p in &pinned {
                if !ids.iter().any(|(id, _)| id == p) {
                    rep.notes.push(format!("a pin names run {p}, which is not on the remote"));
                }
            }
            // Manifests reached by kept runs → blobs.
            let mut blobs: BTreeSet<Digest> = BTreeSet::new();
            for m in s.list("manifests").await? {
                let Some(key) = Shared::key_of(&m.location) else {
                    garbage.push((m, "not named by a stage key".into()));
                    continue;
                };
                if !keys.contains(&key) {
                    garbage.push((m, "manifest not used by any kept run".into()));
                    continue;
                }
                match s.read_json::<StageRecord>(&m.location, validate::MAX_MANIFEST_BYTES).await {
                    Ok(Some(r)) if validate::check_manifest(&r, &key).is_ok() => {
                        rep.kept_manifests += 1;
                        blobs.extend(r.outputs.values().map(|o| o.digest));
                        blobs.extend(r.inputs.values().copied());
                    }
                    Ok(_) | Err(RemoteError::Invalid { .. }) => garbage.push((m, "invalid manifest".into())),
                    Err(e) => return Err(e),
                }
            }
            for m in s.list("blobs").await? {
                match Shared::digest_of(&m.location) {
                    Some(d) if blobs.contains(&d) => rep.kept_blobs += 1,
                    Some(_) => garbage.push((m, "blob not reached from any kept manifest".into())),
                    None => garbage.push((m, "not named by a digest".into())),
                }
            }
            for m in s.list("probe").await? {
                garbage.push((m, "conditional-put probe leftover".into()));
            }
            let mut delete: Vec<Path> = Vec::new();
            for (m, reason) in garbage {
                if young(&m) {
                    rep.kept_young += 1;
                    continue;
                }
                rep.freed_bytes += m.size;
                rep.items.push(RemoteGcItem { path: m.location.to_string(), bytes: m.size, reason });
                delete.push(m.location);
            }
            if !o.dry_run {
                let jobs = s.opts.jobs;
                futures::stream::iter(delete.into_iter().map(|p| {
                    let s = s.clone();
                    async move {
                        match s.store.delete(&p).await {
                            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                            Err(e) => Err(s.backend_err("DELETE", &p, e)),
                        }
                    }
                }))
                .buffer_unordered(jobs)
                .try_collect::<Vec<()>>()
                .await?;
            }
            Ok(rep)
        })
    }

    /// Run records on the remote, by id (oldest first). Invalid ones are skipped.
    pub fn runs(&self) -> RemoteResult<BTreeMap<String, RunRecord>> {
        let s = self.shared.clone();
        self.block_on(async move {
            let mut out = BTreeMap::new();
            for m in s.list("runs").await? {
                let Some(id) = layout::stem(&m.location) else { continue };
                if let Ok(Some(r)) = s.read_json::<RunRecord>(&m.location, validate::MAX_RUN_BYTES).await {
                    if validate::check_run(&r, &id).is_ok() {
                        out.insert(id, r);
                    }
                }
            }
            Ok(out)
        })
    }
}
