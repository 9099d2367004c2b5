//! The local store: a sled index plus a plain-file tier for large blobs.
//!
//! Layout under the cache directory:
//! * `index/` — sled: trees `blobs` (digest → bytes, small and medium blobs), `files`
//!   (digest → size, blobs kept as files), `records` (stage key → JSON), `latest`
//!   (stage name → most recent key, for `why`), `runs` (run id → JSON), `pins` (name → run id).
//! * `blobs/ab/cdef…` — large blobs, written to `tmp/` first and renamed into place.
//! * `quarantine/` — blobs that failed verification, kept for inspection, never read.
//! * `LOCK` — an advisory lock held for the life of a [`Store`]; sled allows one process per
//!   database, so a second process waits here with a message naming the holder.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::digest::{Digest, StageKey};
use crate::error::{io, CacheError, Result};
use crate::record::{RunRecord, StageRecord};

/// Blobs at least this large live as plain files rather than inside sled (see the cache
/// benchmark in the README: sled's log-structured writes copy large values twice).
pub const FILE_TIER_MIN: u64 = 64 * 1024 * 1024;

/// What to do when another process holds the cache.
pub enum LockWait<'a> {
    /// Fail at once with [`CacheError::Locked`].
    NoWait,
    /// Wait, calling `notify(holder)` once before blocking.
    Wait(&'a dyn Fn(&str)),
}

/// An open cache directory. Holds the directory's lock until dropped.
pub struct Store {
    root: PathBuf,
    db: sled::Db,
    blobs: sled::Tree,
    files: sled::Tree,
    records: sled::Tree,
    latest: sled::Tree,
    runs: sled::Tree,
    pins: sled::Tree,
    _lock: fs::File,
}

impl Store {
    /// Opens (creating if needed) the cache at `root`.
    pub fn open(root: &Path, wait: LockWait<'_>) -> Result<Store> {
        fs::create_dir_all(root).map_err(io(root))?;
        let lock = acquire_lock(root, wait)?;
        let idx = root.join("index");
        let db = sled::Config::new()
            .path(&idx)
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
            _lock: lock,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn file_path(&self, d: &Digest) -> PathBuf {
        let h = d.to_hex();
        self.root.join("blobs").join(&h[..2]).join(&h[2..])
    }

    /// Stores bytes and returns their digest. Idempotent.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest> {
        let d = Digest::of_bytes(bytes);
        if self.has_blob(&d)? {
            return Ok(d);
        }
        if bytes.len() as u64 >= FILE_TIER_MIN {
            let tmp = self.tmp_file()?;
            fs::write(tmp.path(), bytes).map_err(io(tmp.path()))?;
            self.adopt_file(tmp, &d, bytes.len() as u64)?;
        } else {
            self.blobs.insert(d.0, bytes)?;
        }
        Ok(d)
    }

    /// Stores a file's bytes (streamed for large files) and returns their digest.
    pub fn put_file(&self, path: &Path) -> Result<Digest> {
        let size = fs::metadata(path).map_err(io(path))?.len();
        if size < FILE_TIER_MIN {
            let bytes = fs::read(path).map_err(io(path))?;
            return self.put_bytes(&bytes);
        }
        let d = Digest::of_file(path).map_err(io(path))?;
        if self.has_blob(&d)? {
            return Ok(d);
        }
        let tmp = self.tmp_file()?;
        fs::copy(path, tmp.path()).map_err(io(path))?;
        // Re-hash the copy: the source may have changed while we copied it.
        let got = Digest::of_file(tmp.path()).map_err(io(tmp.path()))?;
        if got != d {
            return Err(CacheError::Corrupt { digest: d, actual: got });
        }
        self.adopt_file(tmp, &d, size)?;
        Ok(d)
    }

    fn tmp_file(&self) -> Result<tempfile::NamedTempFile> {
        let dir = self.root.join("tmp");
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        tempfile::NamedTempFile::new_in(&dir).map_err(io(&dir))
    }

    fn adopt_file(&self, tmp: tempfile::NamedTempFile, d: &Digest, size: u64) -> Result<()> {
        tmp.as_file().sync_all().map_err(io(tmp.path()))?;
        let dest = self.file_path(d);
        let parent = dest.parent().expect("blob path has a parent");
        fs::create_dir_all(parent).map_err(io(parent))?;
        tmp.persist(&dest).map_err(|e| CacheError::Io { path: dest.clone(), source: e.error })?;
        self.files.insert(d.0, &size.to_le_bytes())?;
        Ok(())
    }

    /// True when the blob is present (not verified; reads verify).
    pub fn has_blob(&self, d: &Digest) -> Result<bool> {
        Ok(self.blobs.contains_key(d.0)? || self.files.contains_key(d.0)?)
    }

    /// Size of a present blob.
    pub fn blob_size(&self, d: &Digest) -> Result<Option<u64>> {
        if let Some(v) = self.blobs.get(d.0)? {
            return Ok(Some(v.len() as u64));
        }
        Ok(self.files.get(d.0)?.map(|v| u64::from_le_bytes(v.as_ref().try_into().unwrap_or([0; 8]))))
    }

    /// Reads and verifies a blob. A blob that fails verification is quarantined.
    pub fn get_bytes(&self, d: &Digest) -> Result<Vec<u8>> {
        let bytes = if let Some(v) = self.blobs.get(d.0)? {
            v.to_vec()
        } else if self.files.contains_key(d.0)? {
            let p = self.file_path(d);
            fs::read(&p).map_err(io(&p))?
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
    pub fn export_to(&self, d: &Digest, dest: &Path) -> Result<()> {
        let bytes = self.get_bytes(d)?;
        let mut f = fs::File::create(dest).map_err(io(dest))?;
        f.write_all(&bytes).map_err(io(dest))?;
        Ok(())
    }

    /// Moves a bad blob out of the index so it is never used again.
    pub fn quarantine(&self, d: &Digest, bytes: &[u8]) -> Result<()> {
        let q = self.root.join("quarantine");
        fs::create_dir_all(&q).map_err(io(&q))?;
        let qp = q.join(d.to_hex());
        fs::write(&qp, bytes).map_err(io(&qp))?;
        self.blobs.remove(d.0)?;
        if self.files.remove(d.0)?.is_some() {
            let _ = fs::remove_file(self.file_path(d));
        }
        self.db.flush()?;
        Ok(())
    }

    /// Stores a stage record after checking that all its output blobs are present, and makes it
    /// the latest record for its stage name.
    pub fn put_record(&self, rec: &StageRecord) -> Result<()> {
        for o in rec.outputs.values() {
            if !self.has_blob(&o.digest)? {
                return Err(CacheError::MissingBlob(o.digest));
            }
        }
        let json = serde_json::to_vec(rec).expect("records serialize");
        self.records.insert(rec.key.0 .0, json)?;
        self.latest.insert(rec.stage_name.as_bytes(), &rec.key.0 .0)?;
        self.db.flush()?;
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
            let rec = serde_json::from_slice(&v)
                .map_err(|source| CacheError::BadRecord { what: hex_of(&k), source })?;
            out.push(rec);
        }
        Ok(out)
    }

    pub fn put_run(&self, run: &RunRecord) -> Result<()> {
        let json = serde_json::to_vec(run).expect("runs serialize");
        self.runs.insert(run.id.as_bytes(), json)?;
        self.db.flush()?;
        Ok(())
    }

    /// All run records, oldest first (run ids sort by time).
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

    pub fn pin(&self, name: &str, run_id: &str) -> Result<()> {
        self.pins.insert(name.as_bytes(), run_id.as_bytes())?;
        self.db.flush()?;
        Ok(())
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
            out.push((Digest(k.as_ref().try_into().unwrap_or([0; 32])), v.len() as u64));
        }
        for kv in self.files.iter() {
            let (k, v) = kv?;
            let size = u64::from_le_bytes(v.as_ref().try_into().unwrap_or([0; 8]));
            out.push((Digest(k.as_ref().try_into().unwrap_or([0; 32])), size));
        }
        Ok(out)
    }
}

fn hex_of(k: &[u8]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

fn acquire_lock(root: &Path, wait: LockWait<'_>) -> Result<fs::File> {
    use fs4::fs_std::FileExt;
    let path = root.join("LOCK");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io(&path))?;
    let got = f.try_lock_exclusive().map_err(io(&path))?;
    if !got {
        let holder = fs::read_to_string(root.join("LOCK.holder")).unwrap_or_else(|_| "another process".into());
        let holder = holder.trim().to_string();
        match wait {
            LockWait::NoWait => return Err(CacheError::Locked { path: root.to_path_buf(), holder }),
            LockWait::Wait(notify) => {
                notify(&holder);
                loop {
                    if f.try_lock_exclusive().map_err(io(&path))? {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
    let me = format!(
        "pid {} ({})",
        std::process::id(),
        std::env::args().collect::<Vec<_>>().join(" ").chars().take(200).collect::<String>()
    );
    let hp = root.join("LOCK.holder");
    fs::write(&hp, me).map_err(io(&hp))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn second_open_fails_fast_with_holder() {
        let dir = tempfile::tempdir().unwrap();
        let _s = Store::open(dir.path(), LockWait::NoWait).unwrap();
        // fs4 locks are per open file description, so a second open in-process conflicts too.
        match Store::open(dir.path(), LockWait::NoWait) {
            Err(CacheError::Locked { holder, .. }) => assert!(holder.contains("pid")),
            other => panic!("expected Locked, got {:?}", other.err()),
        }
    }
}
