//! Moving blobs and manifests between the local [`Store`] and a [`Remote`].
//!
//! * **Pull**: each blob is streamed into a temp file under the store's `tmp/` (or memory, below
//!   the store's file-tier threshold) and hashed as it arrives; a wrong size stops the download
//!   at once, a wrong digest refuses the blob. Only verified bytes enter the store.
//! * **Push**: a local blob is snapshotted (sled-tier bytes are read, and so verified, by the
//!   store; file-tier blobs are memory-mapped read-only files) and re-hashed before it leaves;
//!   a blob the remote already has (HEAD) is skipped. Large blobs go up as multipart uploads
//!   where the backend has them, parts in parallel; an upload that fails is aborted, so no
//!   partial object ever becomes visible. The manifest is written only after all its blobs.
//!
//! Transfers run on the remote's runtime; the number of blob transfers in flight is bounded by
//! [`super::RemoteOptions::jobs`] across all callers.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::{GetResultPayload, ObjectStoreExt, PutPayload};
use serde::Serialize;

use super::error::{RemoteError, RemoteResult};
use super::{layout, ManifestPut, Remote, Shared};
use crate::digest::{Digest, StageKey};
use crate::record::StageRecord;
use crate::store::{Store, Tier};

/// Upload parts of one multipart upload in flight at once.
const PARTS_IN_FLIGHT: usize = 4;

/// What a push of one stage did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PushedStage {
    pub stage_name: String,
    pub key: StageKey,
    /// Blobs uploaded by this push (those the remote already had are not counted).
    pub blobs_uploaded: u64,
    pub bytes_uploaded: u64,
    pub manifest: ManifestPut,
}

/// The pushes of a run or a `wdro push`, in the order they were started.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PushSummary {
    pub pushed: Vec<PushedStage>,
    /// `(stage name, error)` for pushes that failed; the local results are unaffected.
    pub failed: Vec<(String, String)>,
}

impl PushSummary {
    pub fn bytes_uploaded(&self) -> u64 {
        self.pushed.iter().map(|p| p.bytes_uploaded).sum()
    }

    pub fn blobs_uploaded(&self) -> u64 {
        self.pushed.iter().map(|p| p.blobs_uploaded).sum()
    }

    pub fn conflicts(&self) -> impl Iterator<Item = &PushedStage> {
        self.pushed.iter().filter(|p| matches!(p.manifest, ManifestPut::Conflict { .. }))
    }
}

/// A push running in the background.
pub struct PushHandle {
    stage_name: String,
    task: tokio::task::JoinHandle<RemoteResult<PushedStage>>,
}

/// A blob snapshotted for upload.
enum Source {
    Mem(Bytes),
    File(PathBuf),
}

/// A verified download, not yet in the store.
enum Pulled {
    Mem(Digest, Bytes),
    File(Digest, PathBuf),
}

impl Remote {
    /// Starts pushing a stage's output blobs and then its manifest, in the background. The
    /// blobs are snapshotted now, so the caller may go on using the store; call
    /// [`Remote::wait_pushes`] before the store is dropped or the process exits.
    pub fn push_stage(&self, store: &Store, rec: &StageRecord) -> RemoteResult<()> {
        self.push_stage_leased(store, rec, None)
    }

    /// [`Remote::push_stage`], then releases `lease` (the stage's, see [`super::lease`]) once the
    /// manifest is written or the push failed: a waiter sees the result before the lease goes.
    pub fn push_stage_leased(&self, store: &Store, rec: &StageRecord, lease: Option<super::Lease>) -> RemoteResult<()> {
        self.shared.check_writable()?;
        let mut blobs: BTreeMap<Digest, (u64, Source)> = BTreeMap::new();
        for o in rec.outputs.values() {
            if blobs.contains_key(&o.digest) {
                continue;
            }
            let src = match store.tier_of(&o.digest)? {
                Some(Tier::Sled) => Source::Mem(Bytes::from(store.get_bytes(&o.digest)?)),
                Some(Tier::File) => Source::File(store.file_path(&o.digest)),
                None => return Err(crate::CacheError::MissingBlob(o.digest).into()),
            };
            blobs.insert(o.digest, (o.size, src));
        }
        // A negative lookup memoized while planning is stale once this push lands.
        self.forget_manifest(&rec.key);
        let shared = self.shared.clone();
        let rec = rec.clone();
        let stage_name = rec.stage_name.clone();
        let task = self.rt.spawn(async move {
            let out = shared.push_stage(rec, blobs).await;
            if let Some(l) = lease {
                let _ = l.release_async().await;
            }
            out
        });
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).push(PushHandle { stage_name, task });
        Ok(())
    }

    /// Waits for every background push started so far.
    pub fn wait_pushes(&self) -> PushSummary {
        let handles: Vec<PushHandle> = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let mut sum = PushSummary::default();
        for h in handles {
            match self.block_on(h.task) {
                Ok(Ok(p)) => sum.pushed.push(p),
                Ok(Err(e)) => sum.failed.push((h.stage_name, e.to_string())),
                Err(e) => sum.failed.push((h.stage_name, format!("push task failed: {e}"))),
            }
        }
        sum
    }

    /// Pulls blobs into `store`, verified, in parallel. Blobs already in the store are skipped.
    /// Returns the bytes downloaded. On any integrity failure nothing of that blob is stored and
    /// the first error is returned (the other verified blobs are kept: they are correct).
    pub fn pull_blobs(&self, store: &Store, blobs: &[(Digest, u64)]) -> RemoteResult<u64> {
        let mut want: BTreeMap<Digest, u64> = BTreeMap::new();
        for (d, size) in blobs {
            if !store.has_blob(d)? {
                want.insert(*d, *size);
            }
        }
        if want.is_empty() {
            return Ok(0);
        }
        let tmp = store.root().join("tmp");
        std::fs::create_dir_all(&tmp).map_err(|source| RemoteError::Io {
            remote: self.display().to_string(),
            path: tmp.clone(),
            source,
        })?;
        let small_max = store.options().file_tier_min;
        let shared = self.shared.clone();
        let jobs = shared.opts.jobs;
        let results: Vec<RemoteResult<Pulled>> = self.block_on(async move {
            futures::stream::iter(want.into_iter().map(|(d, size)| {
                let s = shared.clone();
                let tmp = tmp.clone();
                async move { s.pull_blob(d, size, tmp, small_max).await }
            }))
            .buffer_unordered(jobs)
            .collect()
            .await
        });
        let mut bytes = 0u64;
        let mut first_err = None;
        for r in results {
            match r {
                Ok(Pulled::Mem(d, b)) => {
                    let got = store.put_bytes(&b)?;
                    debug_assert_eq!(got, d);
                    bytes += b.len() as u64;
                }
                Ok(Pulled::File(d, path)) => {
                    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    let got = store.put_file_move(&path);
                    if got.is_err() {
                        let _ = std::fs::remove_file(&path);
                    }
                    if got? != d {
                        return Err(crate::CacheError::MissingBlob(d).into());
                    }
                    bytes += size;
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(bytes),
        }
    }

    /// Pulls the named outputs of a remote manifest (all of them with `None`), then stores the
    /// manifest locally when every output is present, so the stage becomes a local hit.
    /// Returns the bytes downloaded.
    pub fn pull_stage(&self, store: &Store, rec: &StageRecord, outputs: Option<&[String]>) -> RemoteResult<u64> {
        let blobs: Vec<(Digest, u64)> = rec
            .outputs
            .iter()
            .filter(|(name, _)| outputs.is_none_or(|o| o.contains(name)))
            .map(|(_, o)| (o.digest, o.size))
            .collect();
        let n = self.pull_blobs(store, &blobs)?;
        let mut complete = true;
        for o in rec.outputs.values() {
            complete &= store.has_blob(&o.digest)?;
        }
        if complete && store.get_record(&rec.key)?.is_none() {
            store.put_record(rec)?;
        }
        Ok(n)
    }
}

impl Shared {
    async fn push_stage(
        self: Arc<Self>,
        rec: StageRecord,
        blobs: BTreeMap<Digest, (u64, Source)>,
    ) -> RemoteResult<PushedStage> {
        let jobs = self.opts.jobs;
        let uploaded: Vec<u64> = futures::stream::iter(blobs.into_iter().map(|(d, (size, src))| {
            let s = self.clone();
            async move { s.push_blob(d, size, src).await }
        }))
        .buffer_unordered(jobs)
        .try_collect()
        .await?;
        let manifest = self.put_manifest(&rec).await?;
        Ok(PushedStage {
            stage_name: rec.stage_name.clone(),
            key: rec.key,
            blobs_uploaded: uploaded.iter().filter(|&&n| n > 0).count() as u64,
            bytes_uploaded: uploaded.iter().sum(),
            manifest,
        })
    }

    /// Uploads one blob unless the remote has it. Returns the bytes uploaded (0: present).
    async fn push_blob(self: Arc<Self>, d: Digest, size: u64, src: Source) -> RemoteResult<u64> {
        let p = layout::blob(&self.prefix, &d);
        let _permit = self.permits.acquire().await.expect("the semaphore is never closed");
        let repair = self.known_bad.lock().unwrap_or_else(|e| e.into_inner()).contains(&d);
        if repair {
            self.check_writable()?;
        } else if let Some(m) = self.head(&p, "HEAD").await? {
            if m.size == size {
                return Ok(0);
            }
            return Err(self.invalid(
                format!("blob {}", d.short()),
                format!("{} bytes on the remote, {size} locally; `wdro remote verify` checks the remote", m.size),
            ));
        }
        let bytes = match src {
            Source::Mem(b) => b,
            Source::File(path) => {
                let remote = self.display.clone();
                tokio::task::spawn_blocking(move || map_verified(&path, &d, &remote))
                    .await
                    .map_err(|e| self.backend_err("read", &p, e))??
            }
        };
        let n = bytes.len() as u64;
        if n >= self.opts.multipart_min && self.backend.has_multipart() {
            let mut up = self.store.put_multipart(&p).await.map_err(|e| self.backend_err("PUT (multipart)", &p, e))?;
            let parts: Vec<_> = (0..bytes.len())
                .step_by(self.opts.part_size)
                .map(|a| {
                    let b = (a + self.opts.part_size).min(bytes.len());
                    up.put_part(PutPayload::from_bytes(bytes.slice(a..b)))
                })
                .collect();
            let sent: Result<Vec<()>, _> =
                futures::stream::iter(parts).buffer_unordered(PARTS_IN_FLIGHT).try_collect().await;
            let done = match sent {
                Ok(_) => up.complete().await.map(|_| ()),
                Err(e) => Err(e),
            };
            if let Err(e) = done {
                let _ = up.abort().await;
                return Err(self.backend_err("PUT (multipart)", &p, e));
            }
        } else if repair {
            // Replace the bad copy: staged and renamed (directory), atomic (S3), or a temp file
            // renamed by the server (nginx WebDAV); readers never see a partial blob.
            self.store.put(&p, PutPayload::from_bytes(bytes)).await.map_err(|e| self.backend_err("PUT", &p, e))?;
        } else {
            self.put_if_absent(&p, PutPayload::from_bytes(bytes)).await?;
        }
        if repair {
            self.known_bad.lock().unwrap_or_else(|e| e.into_inner()).remove(&d);
        }
        self.count_push(n);
        Ok(n)
    }

    /// Downloads one blob, hashing as it streams; see the module docs. A blob that fails
    /// verification is remembered as bad (see `Shared::known_bad`).
    async fn pull_blob(self: Arc<Self>, d: Digest, size: u64, tmp: PathBuf, small_max: u64) -> RemoteResult<Pulled> {
        let r = self.clone().pull_blob_inner(d, size, tmp, small_max).await;
        if let Err(RemoteError::Corrupt { .. } | RemoteError::WrongSize { .. }) = &r {
            self.known_bad.lock().unwrap_or_else(|e| e.into_inner()).insert(d);
        }
        r
    }

    async fn pull_blob_inner(
        self: Arc<Self>,
        d: Digest,
        size: u64,
        tmp: PathBuf,
        small_max: u64,
    ) -> RemoteResult<Pulled> {
        let p = layout::blob(&self.prefix, &d);
        let _permit = self.permits.acquire().await.expect("the semaphore is never closed");
        let remote = self.display.clone();
        let r = match self.store.get(&p).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Err(RemoteError::MissingBlob { remote, digest: d }),
            Err(e) => return Err(self.backend_err("GET", &p, e)),
        };
        if r.meta.size != size {
            return Err(RemoteError::WrongSize { remote, digest: d, expected: size, actual: r.meta.size });
        }
        let mut hasher = blake3::Hasher::new();
        let mut total = 0u64;
        let too_big = |total: u64| total > size;
        let out = if size < small_max {
            let mut buf = Vec::with_capacity(size as usize);
            let mut stream = r.into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| self.backend_err("GET", &p, e))?;
                total += chunk.len() as u64;
                if too_big(total) {
                    return Err(RemoteError::WrongSize { remote, digest: d, expected: size, actual: total });
                }
                buf.extend_from_slice(&chunk);
            }
            hasher.update(&buf);
            Pulled::Mem(d, Bytes::from(buf))
        } else {
            let file = tempfile::Builder::new()
                .prefix("pull-")
                .tempfile_in(&tmp)
                .map_err(|source| RemoteError::Io { remote: remote.clone(), path: tmp.clone(), source })?;
            let fpath = file.path().to_path_buf();
            let io = |source| RemoteError::Io { remote: remote.clone(), path: fpath.clone(), source };
            match r.payload {
                GetResultPayload::File(src, _) => {
                    // A directory remote: let the kernel copy, hashing what was written.
                    let dst = file.as_file().try_clone().map_err(io)?;
                    let (n, got) = tokio::task::spawn_blocking(move || crate::store::copy_and_hash(&src, &dst, false))
                        .await
                        .map_err(|e| self.backend_err("GET", &p, e))?
                        .map_err(io)?;
                    total = n;
                    if n != size {
                        return Err(RemoteError::WrongSize { remote, digest: d, expected: size, actual: n });
                    }
                    if got != d {
                        return Err(RemoteError::Corrupt { remote, digest: d, actual: got });
                    }
                    let path = file.into_temp_path().keep().map_err(|e| io(e.error))?;
                    self.count_pull(total);
                    return Ok(Pulled::File(d, path));
                }
                GetResultPayload::Stream(mut stream) => {
                    let mut w = std::io::BufWriter::with_capacity(1 << 20, file.as_file());
                    while let Some(chunk) = stream.next().await {
                        let chunk = chunk.map_err(|e| self.backend_err("GET", &p, e))?;
                        total += chunk.len() as u64;
                        if too_big(total) {
                            return Err(RemoteError::WrongSize { remote, digest: d, expected: size, actual: total });
                        }
                        hasher.update(&chunk);
                        w.write_all(&chunk).map_err(io)?;
                    }
                    w.flush().map_err(io)?;
                }
            }
            let path = file.into_temp_path().keep().map_err(|e| io(e.error))?;
            Pulled::File(d, path)
        };
        if total != size {
            if let Pulled::File(_, path) = &out {
                let _ = std::fs::remove_file(path);
            }
            return Err(RemoteError::WrongSize { remote, digest: d, expected: size, actual: total });
        }
        let got = Digest(*hasher.finalize().as_bytes());
        if got != d {
            if let Pulled::File(_, path) = &out {
                let _ = std::fs::remove_file(path);
            }
            return Err(RemoteError::Corrupt { remote, digest: d, actual: got });
        }
        self.count_pull(total);
        Ok(out)
    }
}

/// Memory-maps a file-tier blob and checks its digest (never upload a corrupt local blob).
fn map_verified(path: &std::path::Path, d: &Digest, remote: &str) -> RemoteResult<Bytes> {
    let io = |source| RemoteError::Io { remote: remote.to_string(), path: path.to_path_buf(), source };
    let f = std::fs::File::open(path).map_err(io)?;
    // SAFETY: file-tier blobs are read-only files that the store never modifies in place, and
    // this process holds the cache lock, so no other wdro truncates or rewrites it meanwhile.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(io)?;
    let actual = Digest::of_bytes(&map);
    if actual != *d {
        return Err(RemoteError::LocalCorrupt { digest: *d, actual });
    }
    Ok(Bytes::from_owner(map))
}
