//! The local store: a sled index plus a plain-file tier for large blobs.
//!
//! Layout under the cache directory:
//! * `index/` — sled: trees `blobs` (digest → bytes, small and medium blobs), `files`
//!   (digest → size, blobs kept as files), `records` (stage key → JSON), `latest`
//!   (stage name → most recent key, for `why`), `runs` (run id → JSON), `pins` (name → run id).
//! * `blobs/ab/cdef…` — large blobs, read-only files.
//! * `tmp/` — blobs being written; a file here is never referenced by the index.
//! * `quarantine/` — blobs that failed verification, kept for inspection, never read.
//! * `LOCK`, `LOCK.holder` — see [`crate::lock`].
//!
//! # Crash safety
//!
//! A crash (process killed, or power loss with `fsync` on) at any point leaves either no entry or
//! a complete one:
//! * sled-tier blobs are one sled insert each; sled recovers to a prefix of its log, so an insert
//!   is there whole or not at all, and a record (flushed by [`Store::put_record`]) is never
//!   recovered without the blob inserts that preceded it.
//! * file-tier blobs are written to `tmp/`, fsynced, renamed into `blobs/` (and the directory
//!   fsynced), and only then indexed. A crash leaves at worst a `tmp/` leftover or an un-indexed
//!   file in `blobs/`; neither is visible through the index, `verify` lists them and `gc` deletes
//!   them.
//! * a record is written only when all its output blobs are present, in one sled transaction with
//!   its `latest` pointer.
//!
//! Every read re-hashes, so even a blob damaged outside these rules (disk error, a user editing
//! `blobs/`) is caught, quarantined and reported instead of being returned.
//!
//! # Concurrency
//!
//! Other processes are excluded by the directory lock. Inside one process a `Store` is `Sync`;
//! writes share a read-gate and `verify`/`gc` take it exclusively, so they never see a write
//! half done (a `tmp/` file being filled, a file renamed but not yet indexed). `gc` still must not
//! run while a pipeline run in the same process is between storing its outputs and storing its
//! [`RunRecord`]: until then the run's records are reachable from no run and are garbage by
//! definition.

use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use sled::Transactional;

use crate::digest::{Digest, StageKey};
use crate::error::{io, CacheError, Result};
use crate::lock;
pub use crate::lock::LockWait;
use crate::record::{RunRecord, StageRecord};

/// Blobs at least this large live as plain files rather than inside sled.
///
/// Measured with `bench/cache_bench.sh` (tables in `bench/RESULTS-cache.md`): for durable puts
/// sled (insert + flush) wins up to 2 MiB — one flush covers the blob, while a file costs two
/// fsyncs (data, directory) — the file tier wins at 8 MiB and 32 MiB, and at 4 and 16 MiB the
/// runs on the shared build machine split. Space decides the tie: up to 4 MiB sled's files grow by
/// 2.1× the bytes stored, deleted large values stay on disk until sled rewrites their segments
/// (320 MiB after ten puts and removes of one 32 MiB value, where a 32 MiB file put was 7× faster),
/// sled holds values in its in-memory cache, and it cannot hand a blob to `copy_file_range`.
/// Checkpoints and attack tensors (tens to hundreds of MB) therefore go to files; params, metrics
/// and index subsets stay in sled.
pub const FILE_TIER_MIN: u64 = 4 * 1024 * 1024;

/// Tuning knobs of a [`Store`]. `Store::open` uses the defaults.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Blobs at least this large are kept as files in `blobs/` (default [`FILE_TIER_MIN`]).
    /// Changing it only affects new writes; reads find a blob in whichever tier holds it.
    pub file_tier_min: u64,
    /// fsync a file-tier blob and its directory before indexing it (default on). Off, a process
    /// crash is still safe (the page cache survives it), but after a power loss the index may name
    /// a file whose bytes never reached the disk; verify-on-read then quarantines it and the stage
    /// is recomputed. Only worth turning off for scratch caches.
    pub fsync: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { file_tier_min: FILE_TIER_MIN, fsync: true }
    }
}

/// Which tier holds a blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Inside the sled index.
    Sled,
    /// A plain file under `blobs/`.
    File,
}

/// An open cache directory. Holds the directory's lock until dropped.
pub struct Store {
    pub(crate) root: PathBuf,
    pub(crate) db: sled::Db,
    pub(crate) blobs: sled::Tree,
    pub(crate) files: sled::Tree,
    pub(crate) records: sled::Tree,
    pub(crate) latest: sled::Tree,
    pub(crate) runs: sled::Tree,
    pub(crate) pins: sled::Tree,
    opts: StoreOptions,
    /// Writers hold it shared; `verify` and `gc` hold it exclusively (see the module docs).
    gate: RwLock<()>,
    // Declared last so it is dropped last: sled must be closed before another process may open it.
    _lock: fs::File,
}

impl Store {
    /// Opens (creating if needed) the cache at `root` with default [`StoreOptions`].
    pub fn open(root: &Path, wait: LockWait<'_>) -> Result<Store> {
        Store::open_with(root, wait, StoreOptions::default())
    }

    /// Opens (creating if needed) the cache at `root`. Opening never deletes anything: leftovers
    /// of a crashed writer are invisible through the index and are removed by [`Store::gc`].
    pub fn open_with(root: &Path, wait: LockWait<'_>, opts: StoreOptions) -> Result<Store> {
        fs::create_dir_all(root).map_err(io(root))?;
        let lock = lock::acquire(root, wait)?;
        let idx = root.join("index");
        let db = sled::Config::new()
            .path(&idx)
            .flush_every_ms(None)
            .open()
            .map_err(|source| CacheError::Index { path: idx.clone(), source })?;
        let tree = |n: &str| db.open_tree(n);
        Ok(Store {
            blobs: tree("blobs")?,
            files: tree("files")?,
            records: tree("records")?,
            latest: tree("latest")?,
            runs: tree("runs")?,
            pins: tree("pins")?,
            db,
            root: root.to_path_buf(),
            opts,
            gate: RwLock::new(()),
            _lock: lock,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    /// Makes every index write so far durable. sled's periodic background flush is off
    /// (`flush_every_ms(None)` in `open_with`), so durability points are explicit: this call and
    /// the flushes inside `put_record`, `put_run`, `pin`, `unpin`, `delete_record`, `remove_blob`,
    /// `quarantine`, `verify` and `gc`. Blob inserts made before a flush become durable with it,
    /// which is what the crash-safety rules above rely on.
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    pub(crate) fn gate_read(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn gate_write(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn file_path(&self, d: &Digest) -> PathBuf {
        let h = d.to_hex();
        self.root.join("blobs").join(&h[..2]).join(&h[2..])
    }

    /// Stores bytes and returns their digest. Idempotent.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest> {
        let d = Digest::of_bytes(bytes);
        let _g = self.gate_read();
        self.put_hashed_bytes(&d, bytes)?;
        Ok(d)
    }

    fn put_hashed_bytes(&self, d: &Digest, bytes: &[u8]) -> Result<()> {
        if self.has_blob(d)? {
            return Ok(());
        }
        if bytes.len() as u64 >= self.opts.file_tier_min {
            let mut tmp = self.tmp_file()?;
            tmp.as_file_mut().write_all(bytes).map_err(io(tmp.path()))?;
            self.adopt_file(tmp, d, bytes.len() as u64, false)?;
        } else {
            self.blobs.insert(d.0, bytes)?;
        }
        Ok(())
    }

    /// Stores a file's bytes and returns their digest. The file is left as it is.
    ///
    /// Large files are copied by the kernel and the *copy* is hashed while it is being made (see
    /// [`copy_and_hash`]): the digest names exactly the stored bytes even if the source changes
    /// while it is read, and hashing overlaps the copy instead of following it. The price is that
    /// storing a file that is already present costs a copy; pipeline outputs are usually new.
    pub fn put_file(&self, path: &Path) -> Result<Digest> {
        let size = fs::metadata(path).map_err(io(path))?.len();
        if size < self.opts.file_tier_min {
            let bytes = fs::read(path).map_err(io(path))?;
            let d = Digest::of_bytes(&bytes);
            let _g = self.gate_read();
            self.put_hashed_bytes(&d, &bytes)?;
            return Ok(d);
        }
        let _g = self.gate_read();
        let tmp = self.tmp_file()?;
        let src = fs::File::open(path).map_err(io(path))?;
        let (n, d) = copy_and_hash(&src, tmp.as_file(), self.opts.fsync).map_err(io(path))?;
        crash_point("put_file:copied");
        if self.has_blob(&d)? {
            return Ok(d); // `tmp` is deleted on drop
        }
        self.adopt_file(tmp, &d, n, false)?;
        Ok(d)
    }

    /// Stores a file the caller gives up (a finished worker's output) and removes it from `path`.
    ///
    /// On the same filesystem the file is renamed into the cache, so nothing is copied: only the
    /// hash (and the fsync) is paid. This is safe because the caller's name for the file is gone
    /// afterwards; a file with other hard links is copied instead, since a write through another
    /// link would change the cached bytes. Across filesystems it falls back to [`Store::put_file`].
    pub fn put_file_move(&self, path: &Path) -> Result<Digest> {
        let meta = fs::metadata(path).map_err(io(path))?;
        if meta.len() < self.opts.file_tier_min || link_count(&meta) > 1 {
            let d = self.put_file(path)?;
            fs::remove_file(path).map_err(io(path))?;
            return Ok(d);
        }
        let _g = self.gate_read();
        let tmp = self.tmp_file()?;
        // Rename over the fresh temp file: `tmp` then owns the moved bytes (and deletes them if
        // anything below fails).
        match fs::rename(path, tmp.path()) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::CrossesDevices => {
                drop(_g);
                let d = self.put_file(path)?;
                fs::remove_file(path).map_err(io(path))?;
                return Ok(d);
            }
            Err(e) => return Err(io(path)(e)),
        }
        // The temp file's handle still names the empty file we renamed over; reopen the path.
        let (_, tmp_path) = tmp.into_parts();
        let file = fs::File::open(&tmp_path).map_err(io(&*tmp_path))?;
        let tmp = tempfile::NamedTempFile::from_parts(file, tmp_path);
        // The worker's pages may still be dirty: write them back while hashing.
        let (d, synced) = std::thread::scope(|sc| {
            let sync = sc.spawn(|| if self.opts.fsync { tmp.as_file().sync_all() } else { Ok(()) });
            let d = Digest::of_file(tmp.path());
            (d, sync.join().expect("fsync thread does not panic"))
        });
        let d = d.map_err(io(tmp.path()))?;
        synced.map_err(io(tmp.path()))?;
        if !self.has_blob(&d)? {
            self.adopt_file(tmp, &d, meta.len(), true)?;
        }
        Ok(d)
    }

    fn tmp_file(&self) -> Result<tempfile::NamedTempFile> {
        let dir = self.root.join("tmp");
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        tempfile::NamedTempFile::new_in(&dir).map_err(io(&dir))
    }

    /// Moves a complete temp file into `blobs/` and indexes it, in the order that keeps a crash
    /// harmless: contents durable (unless `synced` says they already are), then the rename
    /// durable, then the index entry.
    fn adopt_file(&self, tmp: tempfile::NamedTempFile, d: &Digest, size: u64, synced: bool) -> Result<()> {
        // Read-only as a guard against accidental writes by tools (it does not stop root, which
        // is why exports are copies; see `export_to`).
        let mut perms = tmp.as_file().metadata().map_err(io(tmp.path()))?.permissions();
        perms.set_readonly(true);
        tmp.as_file().set_permissions(perms).map_err(io(tmp.path()))?;
        if self.opts.fsync && !synced {
            tmp.as_file().sync_all().map_err(io(tmp.path()))?;
        }
        crash_point("adopt:written");
        let dest = self.file_path(d);
        let parent = dest.parent().expect("blob path has a parent");
        fs::create_dir_all(parent).map_err(io(parent))?;
        tmp.persist(&dest).map_err(|e| CacheError::Io { path: dest.clone(), source: e.error })?;
        if self.opts.fsync {
            sync_dir(parent)?;
        }
        crash_point("adopt:renamed");
        self.files.insert(d.0, &size.to_le_bytes())?;
        Ok(())
    }

    /// True when the blob is indexed and, for the file tier, its file exists (not verified; reads
    /// verify). A file-tier blob whose file has vanished counts as absent, so the stage that made
    /// it is recomputed and storing it again repairs the entry.
    pub fn has_blob(&self, d: &Digest) -> Result<bool> {
        if self.blobs.contains_key(d.0)? {
            return Ok(true);
        }
        Ok(self.files.contains_key(d.0)? && self.file_path(d).exists())
    }

    /// Which tier indexes the blob, if any (the file may still be missing; see `has_blob`).
    pub fn tier_of(&self, d: &Digest) -> Result<Option<Tier>> {
        if self.blobs.contains_key(d.0)? {
            Ok(Some(Tier::Sled))
        } else if self.files.contains_key(d.0)? {
            Ok(Some(Tier::File))
        } else {
            Ok(None)
        }
    }

    /// Size of a present blob.
    pub fn blob_size(&self, d: &Digest) -> Result<Option<u64>> {
        if let Some(v) = self.blobs.get(d.0)? {
            return Ok(Some(v.len() as u64));
        }
        Ok(self.files.get(d.0)?.map(|v| size_of_value(&v)))
    }

    /// Reads and verifies a blob. A blob that fails verification is quarantined.
    pub fn get_bytes(&self, d: &Digest) -> Result<Vec<u8>> {
        let bytes = if let Some(v) = self.blobs.get(d.0)? {
            v.to_vec()
        } else if self.files.contains_key(d.0)? {
            let p = self.file_path(d);
            match fs::read(&p) {
                Ok(b) => b,
                Err(e) if e.kind() == ErrorKind::NotFound => return Err(CacheError::MissingBlob(*d)),
                Err(e) => return Err(io(&p)(e)),
            }
        } else {
            return Err(CacheError::MissingBlob(*d));
        };
        let actual = Digest::of_bytes(&bytes);
        if actual != *d {
            self.quarantine(d, &bytes)?;
            return Err(CacheError::Corrupt { digest: *d, actual });
        }
        Ok(bytes)
    }

    /// Writes a verified copy of a blob to `dest` (for worker processes, which cannot open sled).
    ///
    /// `dest` appears atomically (temp file in its directory, then rename) and is a *copy*, never
    /// a hard link into `blobs/`: a worker that rewrote its input in place would otherwise change
    /// the cached bytes, and read-only permissions do not stop a worker running as root (usual in
    /// containers). On Linux the copy is `copy_file_range`, which filesystems with reflinks (btrfs,
    /// XFS) turn into a copy-on-write clone — as cheap as a link and safe. The copy is hashed while
    /// it is made (see [`copy_and_hash`]), which verifies what the worker will actually read; if
    /// it mismatches, the blob is re-hashed to tell a corrupt blob (quarantined) from a bad copy.
    /// No fsync: the worker reads the file at once, and after a crash the job is redone anyway.
    pub fn export_to(&self, d: &Digest, dest: &Path) -> Result<()> {
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut out = export_temp(dir)?;
        if let Some(v) = self.blobs.get(d.0)? {
            let actual = Digest::of_bytes(&v);
            if actual != *d {
                self.quarantine(d, &v)?;
                return Err(CacheError::Corrupt { digest: *d, actual });
            }
            out.as_file_mut().write_all(&v).map_err(io(out.path()))?;
        } else if self.files.contains_key(d.0)? {
            let p = self.file_path(d);
            let src = match fs::File::open(&p) {
                Ok(f) => f,
                Err(e) if e.kind() == ErrorKind::NotFound => return Err(CacheError::MissingBlob(*d)),
                Err(e) => return Err(io(&p)(e)),
            };
            let (_, copied) = copy_and_hash(&src, out.as_file(), false).map_err(io(dest))?;
            if copied != *d {
                let actual = Digest::of_file(&p).map_err(io(&p))?;
                if actual != *d {
                    let _g = self.gate_read();
                    self.quarantine_inner(d, None)?;
                    return Err(CacheError::Corrupt { digest: *d, actual });
                }
                return Err(CacheError::Io {
                    path: dest.to_path_buf(),
                    source: std::io::Error::other(format!(
                        "the copy of blob {} differs from the blob, which is intact; check the disk holding it",
                        d.short()
                    )),
                });
            }
        } else {
            return Err(CacheError::MissingBlob(*d));
        }
        out.persist(dest).map_err(|e| CacheError::Io { path: dest.to_path_buf(), source: e.error })?;
        Ok(())
    }

    /// Moves a bad blob out of the index so it is never used again. A file-tier blob's file is
    /// renamed into `quarantine/` (`bytes` is then not needed and ignored); a sled-tier blob's
    /// `bytes` are written there.
    pub fn quarantine(&self, d: &Digest, bytes: &[u8]) -> Result<()> {
        let _g = self.gate_read();
        self.quarantine_inner(d, Some(bytes))
    }

    pub(crate) fn quarantine_inner(&self, d: &Digest, bytes: Option<&[u8]>) -> Result<()> {
        let q = self.root.join("quarantine");
        fs::create_dir_all(&q).map_err(io(&q))?;
        let qp = q.join(d.to_hex());
        if self.files.contains_key(d.0)? {
            match fs::rename(self.file_path(d), &qp) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io(&qp)(e)),
            }
            self.files.remove(d.0)?;
        }
        if let Some(v) = self.blobs.remove(d.0)? {
            fs::write(&qp, bytes.unwrap_or(&v)).map_err(io(&qp))?;
        }
        self.db.flush()?;
        Ok(())
    }

    /// Removes a blob from the store (index entry first, then the file, so a crash in between
    /// leaves an orphan file for `gc` rather than an entry without bytes). Returns the bytes freed,
    /// `None` when the blob was not there. Records naming it become incomplete (`is_complete`
    /// false), so their stages are recomputed.
    pub fn remove_blob(&self, d: &Digest) -> Result<Option<u64>> {
        let _g = self.gate_read();
        let freed = self.remove_blob_inner(d)?;
        self.db.flush()?;
        Ok(freed)
    }

    pub(crate) fn remove_blob_inner(&self, d: &Digest) -> Result<Option<u64>> {
        let mut freed = None;
        if let Some(v) = self.blobs.remove(d.0)? {
            freed = Some(v.len() as u64);
        }
        if let Some(v) = self.files.remove(d.0)? {
            let p = self.file_path(d);
            match fs::remove_file(&p) {
                Ok(()) => freed = Some(freed.unwrap_or(0) + size_of_value(&v)),
                Err(e) if e.kind() == ErrorKind::NotFound => freed = Some(freed.unwrap_or(0)),
                Err(e) => return Err(io(&p)(e)),
            }
            if let Some(parent) = p.parent() {
                let _ = fs::remove_dir(parent); // only succeeds when empty
            }
        }
        Ok(freed)
    }

    /// Stores a stage record after checking that all its output blobs are present, and makes it
    /// the latest record for its stage name (both in one transaction).
    pub fn put_record(&self, rec: &StageRecord) -> Result<()> {
        let _g = self.gate_read();
        for o in rec.outputs.values() {
            if !self.has_blob(&o.digest)? {
                return Err(CacheError::MissingBlob(o.digest));
            }
        }
        let json = serde_json::to_vec(rec).expect("records serialize");
        let key = rec.key.0 .0;
        let name = rec.stage_name.as_bytes();
        (&self.records, &self.latest)
            .transaction(|(r, l)| {
                r.insert(&key[..], json.as_slice())?;
                l.insert(name, &key[..])?;
                Ok::<(), sled::transaction::ConflictableTransactionError<std::convert::Infallible>>(())
            })
            .map_err(tx_err)?;
        self.db.flush()?;
        Ok(())
    }

    /// Deletes a stage record. Returns false when there was none. A `latest` pointer to it is
    /// moved to the newest remaining record of the same stage name (or removed), so `why` keeps
    /// comparing against something that exists. The record's blobs stay until `gc`.
    pub fn delete_record(&self, key: &StageKey) -> Result<bool> {
        let _g = self.gate_read();
        let Some(names) = self.delete_record_raw(&key.0 .0)? else {
            return Ok(false);
        };
        self.repoint_latest(&names)?;
        self.db.flush()?;
        Ok(true)
    }

    /// Removes a record by its raw key and every `latest` pointer to it, in one transaction.
    /// Returns the stage names whose pointer was removed, `None` if no record had that key.
    pub(crate) fn delete_record_raw(&self, key: &[u8]) -> Result<Option<Vec<Vec<u8>>>> {
        let mut names = Vec::new();
        for kv in self.latest.iter() {
            let (name, k) = kv?;
            if k.as_ref() == key {
                names.push(name.to_vec());
            }
        }
        let existed = (&self.records, &self.latest)
            .transaction(|(r, l)| {
                let existed = r.remove(key)?.is_some();
                for n in &names {
                    if l.get(n)?.as_deref() == Some(key) {
                        l.remove(n.as_slice())?;
                    }
                }
                Ok::<bool, sled::transaction::ConflictableTransactionError<std::convert::Infallible>>(existed)
            })
            .map_err(tx_err)?;
        Ok(existed.then_some(names))
    }

    /// Points `latest[name]` at the newest (by `finished_at`) readable record of each name, or
    /// removes the pointer when none is left.
    pub(crate) fn repoint_latest(&self, names: &[Vec<u8>]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let mut best: std::collections::HashMap<&[u8], (u64, [u8; 32])> = Default::default();
        for kv in self.records.iter() {
            let (k, v) = kv?;
            let Ok(rec) = serde_json::from_slice::<StageRecord>(&v) else { continue };
            let Ok(key) = <[u8; 32]>::try_from(k.as_ref()) else { continue };
            if let Some(n) = names.iter().find(|n| n.as_slice() == rec.stage_name.as_bytes()) {
                let e = best.entry(n.as_slice()).or_insert((rec.finished_at, key));
                if rec.finished_at >= e.0 {
                    *e = (rec.finished_at, key);
                }
            }
        }
        for n in names {
            match best.get(n.as_slice()) {
                Some((_, k)) => self.latest.insert(n.as_slice(), &k[..])?,
                None => self.latest.remove(n.as_slice())?,
            };
        }
        Ok(())
    }

    pub fn get_record(&self, key: &StageKey) -> Result<Option<StageRecord>> {
        match self.records.get(key.0 .0)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|source| CacheError::BadRecord { what: key.to_string(), source }),
        }
    }

    /// The most recent record stored under a stage name (what `why` compares against).
    pub fn latest_record(&self, stage_name: &str) -> Result<Option<StageRecord>> {
        match self.latest.get(stage_name.as_bytes())? {
            None => Ok(None),
            Some(k) => {
                let key = StageKey(Digest(k.as_ref().try_into().unwrap_or([0; 32])));
                self.get_record(&key)
            }
        }
    }

    /// True when the record exists and every output blob is present.
    pub fn is_complete(&self, key: &StageKey) -> Result<bool> {
        match self.get_record(key)? {
            None => Ok(false),
            Some(r) => {
                for o in r.outputs.values() {
                    if !self.has_blob(&o.digest)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
        }
    }

    pub fn records(&self) -> Result<Vec<StageRecord>> {
        let mut out = Vec::new();
        for kv in self.records.iter() {
            let (k, v) = kv?;
            let rec =
                serde_json::from_slice(&v).map_err(|source| CacheError::BadRecord { what: hex_of(&k), source })?;
            out.push(rec);
        }
        Ok(out)
    }

    pub fn put_run(&self, run: &RunRecord) -> Result<()> {
        let json = serde_json::to_vec(run).expect("runs serialize");
        let _g = self.gate_read();
        self.runs.insert(run.id.as_bytes(), json)?;
        self.db.flush()?;
        Ok(())
    }

    /// All run records, oldest first (run ids sort by time). This order is what `gc`'s
    /// "last N runs" counts in.
    pub fn runs(&self) -> Result<Vec<RunRecord>> {
        let mut out = Vec::new();
        for kv in self.runs.iter() {
            let (k, v) = kv?;
            let run = serde_json::from_slice(&v).map_err(|source| CacheError::BadRecord {
                what: format!("run {}", String::from_utf8_lossy(&k)),
                source,
            })?;
            out.push(run);
        }
        Ok(out)
    }

    /// Pins a run under a name: `gc` keeps everything it reaches, whatever `keep_last_runs` and
    /// `max_size` say.
    pub fn pin(&self, name: &str, run_id: &str) -> Result<()> {
        let _g = self.gate_read();
        self.pins.insert(name.as_bytes(), run_id.as_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// Removes a pin. Returns false when there was no pin of that name.
    pub fn unpin(&self, name: &str) -> Result<bool> {
        let _g = self.gate_read();
        let existed = self.pins.remove(name.as_bytes())?.is_some();
        self.db.flush()?;
        Ok(existed)
    }

    pub fn pins(&self) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for kv in self.pins.iter() {
            let (k, v) = kv?;
            out.push((String::from_utf8_lossy(&k).into(), String::from_utf8_lossy(&v).into()));
        }
        Ok(out)
    }

    /// Digests of every indexed blob, with sizes.
    pub fn blob_list(&self) -> Result<Vec<(Digest, u64)>> {
        let mut out = Vec::new();
        for kv in self.blobs.iter() {
            let (k, v) = kv?;
            out.push((digest_of_key(&k), v.len() as u64));
        }
        for kv in self.files.iter() {
            let (k, v) = kv?;
            out.push((digest_of_key(&k), size_of_value(&v)));
        }
        Ok(out)
    }
}

/// Bytes copied per kernel call in [`copy_and_hash`]; also the granularity of writeback hints.
const COPY_CHUNK: u64 = 8 * 1024 * 1024;

/// Copies `src` (from its current offset) into `dst`, an empty file, and returns the byte count
/// and the blake3 digest of what was written.
///
/// The copy runs on this thread, chunk by chunk, with `std::io::copy` — `copy_file_range` on
/// Linux, so the bytes never enter user space (and filesystems with reflinks clone instead). A
/// second thread follows behind, reading the chunks already written back from `dst` (page cache)
/// and hashing them, so the hash costs little wall time on top of the copy (on 2 cores the copy
/// and the hash each get one). Hashing `dst` rather than `src` means the digest names the bytes
/// that were actually stored.
///
/// With `writeback`, each finished chunk is handed to the kernel for writeback at once
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, a hint that does not wait), so the disk writes
/// while the copy goes on and the caller's final fsync only waits for the tail — durability
/// without paying for the write twice in wall time.
pub fn copy_and_hash(src: &fs::File, dst: &fs::File, writeback: bool) -> std::io::Result<(u64, Digest)> {
    use std::io::Read;
    use std::sync::{Condvar, Mutex};
    // (bytes copied so far, copy finished or failed)
    let progress = Mutex::new((0u64, false));
    let moved = Condvar::new();
    let start = dst.metadata()?.len();
    std::thread::scope(|sc| {
        let hasher = sc.spawn(|| -> std::io::Result<Digest> {
            let mut h = blake3::Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut pos = 0u64;
            loop {
                let (avail, done) = {
                    let mut g = progress.lock().unwrap_or_else(|e| e.into_inner());
                    while g.0 == pos && !g.1 {
                        g = moved.wait(g).unwrap_or_else(|e| e.into_inner());
                    }
                    *g
                };
                if pos == avail && done {
                    return Ok(Digest(*h.finalize().as_bytes()));
                }
                while pos < avail {
                    let want = ((avail - pos) as usize).min(buf.len());
                    let n = read_at(dst, &mut buf[..want], start + pos)?;
                    if n == 0 {
                        return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "copy shrank while hashing"));
                    }
                    h.update(&buf[..n]);
                    pos += n as u64;
                }
            }
        });
        let copied = (|| -> std::io::Result<u64> {
            let mut total = 0u64;
            loop {
                let n = std::io::copy(&mut src.take(COPY_CHUNK), &mut &*dst)?;
                if n == 0 {
                    return Ok(total);
                }
                if writeback {
                    start_writeback(dst, start + total, n);
                }
                total += n;
                progress.lock().unwrap_or_else(|e| e.into_inner()).0 = total;
                moved.notify_one();
            }
        })();
        progress.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        moved.notify_one();
        let digest = hasher.join().expect("hash thread does not panic");
        let total = copied?;
        Ok((total, digest?))
    })
}

#[cfg(unix)]
fn read_at(f: &fs::File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    loop {
        match f.read_at(buf, off) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

#[cfg(windows)]
fn read_at(f: &fs::File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    use std::os::windows::fs::FileExt;
    f.seek_read(buf, off)
}

/// Asks the kernel to start writing a range to disk now (a hint; `fsync` still decides).
#[cfg(target_os = "linux")]
fn start_writeback(f: &fs::File, off: u64, len: u64) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a plain syscall on a valid descriptor; failure only loses the hint.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), off as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_: &fs::File, _: u64, _: u64) {}

pub(crate) fn hex_of(k: &[u8]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn digest_of_key(k: &[u8]) -> Digest {
    Digest(k.try_into().unwrap_or([0; 32]))
}

pub(crate) fn size_of_value(v: &[u8]) -> u64 {
    u64::from_le_bytes(v.try_into().unwrap_or([0; 8]))
}

fn tx_err(e: sled::transaction::TransactionError<std::convert::Infallible>) -> CacheError {
    match e {
        sled::transaction::TransactionError::Storage(s) => CacheError::Sled(s),
        sled::transaction::TransactionError::Abort(never) => match never {},
    }
}

/// A temp file next to an export destination, readable by group and others like a file made by
/// `File::create` under the usual umask (worker containers may run as another user).
fn export_temp(dir: &Path) -> Result<tempfile::NamedTempFile> {
    let mut b = tempfile::Builder::new();
    b.prefix(".wdro-export");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        b.permissions(fs::Permissions::from_mode(0o644));
    }
    b.tempfile_in(dir).map_err(io(dir))
}

#[cfg(unix)]
fn link_count(meta: &fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.nlink()
}

#[cfg(not(unix))]
fn link_count(_: &fs::Metadata) -> u64 {
    1
}

/// Makes a rename into `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Fault injection for the crash tests: aborts the process the `n`th time it passes the point
/// named by `WDRO_CACHE_CRASH_AT=name@n` (`name` alone means the first time). Compiled only into
/// this crate's unit tests.
#[cfg(test)]
pub(crate) fn crash_point(name: &str) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static HITS: AtomicUsize = AtomicUsize::new(0);
    let Ok(spec) = std::env::var("WDRO_CACHE_CRASH_AT") else { return };
    let (want, nth) = match spec.split_once('@') {
        Some((w, n)) => (w.to_string(), n.parse::<usize>().expect("WDRO_CACHE_CRASH_AT=name@n")),
        None => (spec.clone(), 1),
    };
    if want == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 == nth {
        eprintln!("crash point {spec}: aborting");
        std::process::abort();
    }
}

#[cfg(not(test))]
#[inline(always)]
pub(crate) fn crash_point(_: &str) {}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::process::{Command, Output};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use crate::record::OutputRef;

    /// Options that put anything of 1 KiB or more in the file tier, so tests exercise it cheaply.
    pub(crate) fn small_file_tier() -> StoreOptions {
        StoreOptions { file_tier_min: 1024, fsync: true }
    }

    pub(crate) fn record(name: &str, seed: u8, outputs: &[(&str, Digest, u64)], finished_at: u64) -> StageRecord {
        StageRecord {
            key: StageKey(Digest::of_bytes(&[name.as_bytes(), &[seed]].concat())),
            stage_name: name.to_string(),
            stage_id: name.split('.').next().unwrap_or(name).to_string(),
            version: 1,
            params: serde_json::json!({ "seed": seed }),
            inputs: BTreeMap::new(),
            outputs: outputs
                .iter()
                .map(|(slot, d, size)| (slot.to_string(), OutputRef { digest: *d, size: *size, kind: "bytes".into() }))
                .collect(),
            metrics: serde_json::Value::Null,
            env: BTreeMap::new(),
            wdro_version: "test".into(),
            finished_at,
            duration_ms: 1,
        }
    }

    /// Runs one test of this binary in a child process with extra environment variables (the
    /// child takes the role the variables select). Used for real-second-process and crash tests.
    pub(crate) fn run_self(test: &str, envs: &[(&str, String)]) -> Command {
        let mut c = Command::new(std::env::current_exe().expect("test binary path"));
        c.args([test, "--exact", "--nocapture", "--test-threads=1"]);
        for (k, v) in envs {
            c.env(k, v);
        }
        c
    }

    pub(crate) fn describe(o: &Output) -> String {
        format!(
            "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    #[test]
    fn copy_and_hash_matches_the_bytes_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0usize, 1, COPY_CHUNK as usize, 2 * COPY_CHUNK as usize + 12_345] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 256) as u8).collect();
            let src = dir.path().join("src");
            fs::write(&src, &bytes).unwrap();
            let dst = tempfile::NamedTempFile::new_in(dir.path()).unwrap();
            let (n, d) = copy_and_hash(&fs::File::open(&src).unwrap(), dst.as_file(), len % 2 == 0).unwrap();
            assert_eq!(n, len as u64);
            assert_eq!(d, Digest::of_bytes(&bytes), "len {len}");
            assert_eq!(fs::read(dst.path()).unwrap(), bytes);
        }
    }

    #[test]
    fn put_get_roundtrip_and_corruption_is_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), LockWait::NoWait).unwrap();
        let d = s.put_bytes(b"some tensor bytes").unwrap();
        assert_eq!(s.get_bytes(&d).unwrap(), b"some tensor bytes");
        // Corrupt it behind the store's back.
        s.blobs.insert(d.0, &b"some tensor bytez"[..]).unwrap();
        assert!(matches!(s.get_bytes(&d), Err(CacheError::Corrupt { .. })));
        assert!(!s.has_blob(&d).unwrap());
        assert!(dir.path().join("quarantine").join(d.to_hex()).exists());
    }

    #[test]
    fn file_tier_put_export_and_move() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_with(&dir.path().join("c"), LockWait::NoWait, small_file_tier()).unwrap();
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let src = dir.path().join("src.bin");
        fs::write(&src, &bytes).unwrap();
        let d = s.put_file(&src).unwrap();
        assert_eq!(d, Digest::of_bytes(&bytes));
        assert_eq!(s.tier_of(&d).unwrap(), Some(Tier::File));
        assert!(src.exists(), "put_file leaves the source");
        assert_eq!(s.blob_size(&d).unwrap(), Some(bytes.len() as u64));
        assert!(fs::metadata(s.file_path(&d)).unwrap().permissions().readonly());
        // Idempotent: a second put adds nothing and leaves no temp file.
        assert_eq!(s.put_file(&src).unwrap(), d);
        assert_eq!(fs::read_dir(dir.path().join("c/tmp")).unwrap().count(), 0);

        let out = dir.path().join("job/in.bin");
        fs::create_dir_all(out.parent().unwrap()).unwrap();
        s.export_to(&d, &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), bytes);
        assert!(!fs::metadata(&out).unwrap().permissions().readonly(), "exports are the worker's own copy");
        assert_eq!(s.get_bytes(&d).unwrap(), bytes);

        // Small blobs export from sled.
        let small = s.put_bytes(b"tiny").unwrap();
        assert_eq!(s.tier_of(&small).unwrap(), Some(Tier::Sled));
        s.export_to(&small, &dir.path().join("job/tiny")).unwrap();
        assert_eq!(fs::read(dir.path().join("job/tiny")).unwrap(), b"tiny");

        // put_file_move renames the worker's output in.
        let other: Vec<u8> = bytes.iter().map(|b| b ^ 0x5a).collect();
        let moved = dir.path().join("job/out.bin");
        fs::write(&moved, &other).unwrap();
        let d2 = s.put_file_move(&moved).unwrap();
        assert!(!moved.exists());
        assert_eq!(s.get_bytes(&d2).unwrap(), other);

        // A hard-linked output is copied, so writing through the other link cannot reach the cache.
        let linked = dir.path().join("job/linked.bin");
        let alias = dir.path().join("job/alias.bin");
        let third: Vec<u8> = bytes.iter().map(|b| b ^ 0x33).collect();
        fs::write(&linked, &third).unwrap();
        fs::hard_link(&linked, &alias).unwrap();
        let d3 = s.put_file_move(&linked).unwrap();
        fs::write(&alias, b"overwritten").unwrap();
        assert_eq!(s.get_bytes(&d3).unwrap(), third);
    }

    #[test]
    fn export_of_corrupt_file_blob_quarantines_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_with(&dir.path().join("c"), LockWait::NoWait, small_file_tier()).unwrap();
        let d = s.put_bytes(&[7u8; 5000]).unwrap();
        let p = s.file_path(&d);
        let mut perms = fs::metadata(&p).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        fs::set_permissions(&p, perms).unwrap();
        fs::write(&p, [8u8; 5000]).unwrap();
        let out = dir.path().join("x.bin");
        match s.export_to(&d, &out) {
            Err(CacheError::Corrupt { digest, .. }) => assert_eq!(digest, d),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(!out.exists(), "no partial export is left behind");
        assert!(!s.has_blob(&d).unwrap());
        assert!(dir.path().join("c/quarantine").join(d.to_hex()).exists());
    }

    #[test]
    fn vanished_file_counts_as_missing_and_put_repairs_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_with(dir.path(), LockWait::NoWait, small_file_tier()).unwrap();
        let bytes = vec![3u8; 4096];
        let d = s.put_bytes(&bytes).unwrap();
        let rec = record("train", 1, &[("model", d, 4096)], 10);
        s.put_record(&rec).unwrap();
        assert!(s.is_complete(&rec.key).unwrap());
        fs::remove_file(s.file_path(&d)).unwrap();
        assert!(!s.has_blob(&d).unwrap());
        assert!(!s.is_complete(&rec.key).unwrap());
        assert!(matches!(s.get_bytes(&d), Err(CacheError::MissingBlob(_))));
        s.put_bytes(&bytes).unwrap();
        assert!(s.is_complete(&rec.key).unwrap());
    }

    #[test]
    fn put_record_needs_blobs_and_delete_record_repoints_latest() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), LockWait::NoWait).unwrap();
        let absent = Digest::of_bytes(b"never stored");
        let bad = record("eval", 0, &[("m", absent, 12)], 1);
        assert!(matches!(s.put_record(&bad), Err(CacheError::MissingBlob(_))));
        assert!(s.get_record(&bad.key).unwrap().is_none());

        let d = s.put_bytes(b"metrics").unwrap();
        let old = record("eval", 1, &[("m", d, 7)], 100);
        let new = record("eval", 2, &[("m", d, 7)], 200);
        s.put_record(&old).unwrap();
        s.put_record(&new).unwrap();
        assert_eq!(s.latest_record("eval").unwrap().unwrap().key, new.key);
        assert!(s.delete_record(&new.key).unwrap());
        assert!(!s.delete_record(&new.key).unwrap());
        assert_eq!(s.latest_record("eval").unwrap().unwrap().key, old.key);
        assert!(s.delete_record(&old.key).unwrap());
        assert!(s.latest_record("eval").unwrap().is_none());
        assert!(s.has_blob(&d).unwrap(), "blobs stay until gc");
        assert_eq!(s.remove_blob(&d).unwrap(), Some(7));
        assert_eq!(s.remove_blob(&d).unwrap(), None);
    }

    #[test]
    fn second_open_fails_fast_with_holder() {
        let dir = tempfile::tempdir().unwrap();
        let _s = Store::open(dir.path(), LockWait::NoWait).unwrap();
        // fs4 locks are per open file description, so a second open in-process conflicts too.
        match Store::open(dir.path(), LockWait::NoWait) {
            Err(CacheError::Locked { holder, .. }) => {
                assert!(holder.contains(&format!("pid {}", std::process::id())), "{holder}")
            }
            other => panic!("expected Locked, got {:?}", other.err()),
        }
    }

    #[test]
    fn waiter_is_notified_once_and_gets_the_cache_when_released() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path(), LockWait::NoWait).unwrap();
        first.put_bytes(b"from the first holder").unwrap();
        let root = dir.path().to_path_buf();
        let calls = AtomicUsize::new(0);
        let seen = Mutex::new(String::new());
        std::thread::scope(|sc| {
            let waiter = sc.spawn(|| {
                let t0 = Instant::now();
                let notify = |h: &str| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    *seen.lock().unwrap() = h.to_string();
                };
                let s = Store::open(&root, LockWait::Wait(&notify)).unwrap();
                (t0.elapsed(), s.get_bytes(&Digest::of_bytes(b"from the first holder")).unwrap())
            });
            // Release only once the waiter has announced that it waits.
            let t0 = Instant::now();
            while calls.load(Ordering::SeqCst) == 0 {
                assert!(t0.elapsed() < Duration::from_secs(30), "waiter never called notify");
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(200));
            drop(first);
            let (waited, bytes) = waiter.join().unwrap();
            assert!(waited >= Duration::from_millis(200), "waited only {waited:?}");
            assert_eq!(bytes, b"from the first holder");
        });
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(seen.lock().unwrap().contains(&format!("pid {}", std::process::id())));
    }

    const LOCK_TEST: &str = "store::tests::second_process_waits_for_the_holder_and_names_it";

    /// Parent: holds the cache and starts this test binary again as a second process. Child
    /// (`WDRO_LOCK_CHILD_DIR` set): checks that `NoWait` fails naming the parent, then waits.
    #[test]
    fn second_process_waits_for_the_holder_and_names_it() {
        if let Ok(root) = std::env::var("WDRO_LOCK_CHILD_DIR") {
            let root = PathBuf::from(root);
            let parent_pid = std::env::var("WDRO_LOCK_PARENT_PID").unwrap();
            match Store::open(&root, LockWait::NoWait) {
                Err(e @ CacheError::Locked { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(&format!("pid {parent_pid} (")), "{msg}");
                    println!("CHILD nowait: {msg}");
                }
                other => panic!("expected Locked, got {:?}", other.err()),
            }
            let notify = |h: &str| {
                println!("CHILD waiting for {h}");
                fs::write(root.join("child-is-waiting"), h).unwrap();
            };
            let s = Store::open(&root, LockWait::Wait(&notify)).unwrap();
            let d = s.put_bytes(b"written by the second process").unwrap();
            assert_eq!(s.get_bytes(&Digest::of_bytes(b"written by the parent")).unwrap(), b"written by the parent");
            println!("CHILD acquired, stored {}", d.short());
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), LockWait::NoWait).unwrap();
        s.put_bytes(b"written by the parent").unwrap();
        let child = run_self(
            LOCK_TEST,
            &[
                ("WDRO_LOCK_CHILD_DIR", dir.path().display().to_string()),
                ("WDRO_LOCK_PARENT_PID", std::process::id().to_string()),
            ],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
        let marker = dir.path().join("child-is-waiting");
        let t0 = Instant::now();
        while !marker.exists() {
            assert!(t0.elapsed() < Duration::from_secs(60), "child never started waiting");
            std::thread::sleep(Duration::from_millis(20));
        }
        let holder = fs::read_to_string(&marker).unwrap();
        assert!(holder.starts_with(&format!("pid {} (", std::process::id())), "{holder}");
        std::thread::sleep(Duration::from_millis(200));
        drop(s);
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", describe(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("CHILD nowait: the cache at"), "{stdout}");
        assert!(stdout.contains("CHILD acquired"), "{stdout}");
        // The child held the lock last and said so atomically.
        let holder = lock::read_holder(dir.path());
        assert!(holder.starts_with("pid ") && !holder.contains(&format!("pid {} (", std::process::id())), "{holder}");
        let s = Store::open(dir.path(), LockWait::NoWait).unwrap();
        assert!(s.has_blob(&Digest::of_bytes(b"written by the second process")).unwrap());
    }
}
