//! Maintenance of a store: `verify` (rehash everything), `du` (where the bytes are) and `gc`
//! (drop what no recent or pinned run reaches).
//!
//! All three report rather than print; the reports implement `Display` for the CLI and
//! `Serialize` for `--json`. `verify` and `gc` take the store's write gate, so in-process writers
//! wait for them (other processes are already excluded by the directory lock).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use crate::digest::{Digest, StageKey};
use crate::error::{io, Result};
use crate::record::{RunRecord, StageRecord};
use crate::store::{digest_of_key, hex_of, size_of_value, Store, Tier};

/// A blob whose bytes no longer hash to its name. It has been quarantined.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CorruptBlob {
    pub digest: Digest,
    pub actual: Digest,
    pub tier: Tier,
}

/// A record some of whose output blobs are gone; its stage will be recomputed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IncompleteRecord {
    pub key: StageKey,
    pub stage_name: String,
    pub missing: Vec<Digest>,
}

/// Something that could not be read, with the reason.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Unreadable {
    /// A digest, a record key in hex, or a run id.
    pub what: String,
    pub error: String,
}

/// What [`Store::verify`] found. `verify` changes the store only to make the index truthful:
/// corrupt blobs are quarantined and index entries of vanished files are dropped; everything else
/// it lists is left for `gc`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct VerifyReport {
    pub blobs_checked: usize,
    pub bytes_checked: u64,
    /// Quarantined by this verify.
    pub corrupt: Vec<CorruptBlob>,
    /// File-tier blobs whose file is gone; their index entries were dropped.
    pub missing_files: Vec<Digest>,
    /// Blobs that could not be read (e.g. permissions); left in place.
    pub unreadable_blobs: Vec<Unreadable>,
    pub incomplete_records: Vec<IncompleteRecord>,
    pub unreadable_records: Vec<Unreadable>,
    pub unreadable_runs: Vec<Unreadable>,
    /// Files in `blobs/` that the index does not name (an interrupted write); `gc` removes them.
    pub orphan_files: Vec<PathBuf>,
    /// Files in `tmp/` (an interrupted write); `gc` removes them.
    pub tmp_leftovers: Vec<PathBuf>,
}

impl VerifyReport {
    /// True when every blob hashed correctly and every record and run is usable.
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty()
            && self.missing_files.is_empty()
            && self.unreadable_blobs.is_empty()
            && self.incomplete_records.is_empty()
            && self.unreadable_records.is_empty()
            && self.unreadable_runs.is_empty()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "checked {} blobs ({})", self.blobs_checked, human(self.bytes_checked))?;
        for c in &self.corrupt {
            writeln!(
                f,
                "corrupt   blob {} ({} tier) hashes to {}: quarantined",
                c.digest,
                tier_name(c.tier),
                c.actual.short()
            )?;
        }
        for d in &self.missing_files {
            writeln!(f, "missing   blob {}: its file is gone, index entry dropped", d)?;
        }
        for u in &self.unreadable_blobs {
            writeln!(f, "unreadable blob {}: {}", u.what, u.error)?;
        }
        for r in &self.incomplete_records {
            let missing: Vec<String> = r.missing.iter().map(|d| d.short()).collect();
            writeln!(f, "incomplete record {} ({}): missing {}", r.key.short(), r.stage_name, missing.join(", "))?;
        }
        for u in &self.unreadable_records {
            writeln!(f, "unreadable record {}: {}", u.what, u.error)?;
        }
        for u in &self.unreadable_runs {
            writeln!(f, "unreadable run {}: {}", u.what, u.error)?;
        }
        for p in &self.orphan_files {
            writeln!(f, "orphan file {} (gc removes it)", p.display())?;
        }
        for p in &self.tmp_leftovers {
            writeln!(f, "tmp leftover {} (gc removes it)", p.display())?;
        }
        if self.is_clean() {
            writeln!(f, "cache is consistent")?;
        }
        Ok(())
    }
}

/// Disk use of one stage name.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StageUsage {
    pub stage_name: String,
    pub records: usize,
    /// Distinct present blobs among these records' outputs.
    pub blobs: usize,
    /// Their bytes. A blob shared by two stage names counts in both.
    pub bytes: u64,
}

/// What [`Store::du`] measured. Byte counts are logical (blob and JSON lengths) except
/// `index_on_disk`, which is what sled's files take, log overhead included.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DuReport {
    pub sled_blobs: usize,
    pub sled_bytes: u64,
    pub file_blobs: usize,
    pub file_bytes: u64,
    pub records: usize,
    pub record_bytes: u64,
    pub runs: usize,
    pub run_bytes: u64,
    pub quarantine_files: usize,
    pub quarantine_bytes: u64,
    pub tmp_files: usize,
    pub tmp_bytes: u64,
    pub index_on_disk: u64,
    /// Blobs that no record names as an output or input (gc will drop them).
    pub unreferenced_blobs: usize,
    pub unreferenced_bytes: u64,
    /// Per stage name, largest first.
    pub per_stage: Vec<StageUsage>,
}

impl DuReport {
    pub fn blobs(&self) -> usize {
        self.sled_blobs + self.file_blobs
    }

    pub fn blob_bytes(&self) -> u64 {
        self.sled_bytes + self.file_bytes
    }
}

impl fmt::Display for DuReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<28} {:>8} {:>12}", "", "count", "bytes")?;
        let rows = [
            ("blobs in sled", self.sled_blobs, self.sled_bytes),
            ("blobs as files", self.file_blobs, self.file_bytes),
            ("records", self.records, self.record_bytes),
            ("runs", self.runs, self.run_bytes),
            ("quarantine", self.quarantine_files, self.quarantine_bytes),
            ("tmp", self.tmp_files, self.tmp_bytes),
            ("unreferenced blobs", self.unreferenced_blobs, self.unreferenced_bytes),
        ];
        for (what, n, b) in rows {
            writeln!(f, "{what:<28} {n:>8} {:>12}", human(b))?;
        }
        writeln!(f, "{:<28} {:>8} {:>12}", "index on disk (sled)", "", human(self.index_on_disk))?;
        if !self.per_stage.is_empty() {
            writeln!(f, "\n{:<28} {:>8} {:>8} {:>12}", "stage", "records", "blobs", "bytes")?;
            for s in &self.per_stage {
                writeln!(f, "{:<28} {:>8} {:>8} {:>12}", s.stage_name, s.records, s.blobs, human(s.bytes))?;
            }
        }
        Ok(())
    }
}

/// What `gc` keeps and how far it may go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcOptions {
    /// Keep everything the newest `keep_last_runs` run records reach (plus pinned runs).
    pub keep_last_runs: usize,
    /// After removing garbage, if the store is still larger than this many bytes, drop the
    /// oldest unpinned runs (never the newest run) together with the blobs and records only they
    /// reach, oldest first, until it fits.
    pub max_size: Option<u64>,
    /// Report what would be freed; change nothing.
    pub dry_run: bool,
}

/// What one gc item is.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GcTarget {
    Blob {
        digest: Digest,
        tier: Tier,
    },
    /// `key` is hex (an unreadable record's key may not be a valid digest).
    Record {
        key: String,
        stage_name: Option<String>,
    },
    Run {
        id: String,
    },
    /// An index entry whose blob file is gone.
    IndexEntry {
        digest: Digest,
    },
    File {
        path: PathBuf,
    },
}

impl fmt::Display for GcTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GcTarget::Blob { digest, tier } => write!(f, "blob {} ({})", digest.short(), tier_name(*tier)),
            GcTarget::Record { key, stage_name: Some(n) } => write!(f, "record {} ({n})", &key[..key.len().min(12)]),
            GcTarget::Record { key, stage_name: None } => write!(f, "record {}", &key[..key.len().min(12)]),
            GcTarget::Run { id } => write!(f, "run {id}"),
            GcTarget::IndexEntry { digest } => write!(f, "index entry {}", digest.short()),
            GcTarget::File { path } => write!(f, "file {}", path.display()),
        }
    }
}

/// Why gc frees an item.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum GcReason {
    Unreachable { keep_last_runs: usize },
    OldRun { keep_last_runs: usize },
    OverSize { run: String, max_size: u64 },
    IncompleteRecord { missing: Digest },
    UnreadableRecord { error: String },
    UnreadableRun { error: String },
    MissingFile,
    OrphanFile,
    TmpLeftover,
    Quarantine,
}

impl fmt::Display for GcReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GcReason::Unreachable { keep_last_runs } => {
                write!(f, "unreachable: not used by the last {keep_last_runs} runs or any pin")
            }
            GcReason::OldRun { keep_last_runs } => {
                write!(f, "old run: not among the last {keep_last_runs} runs and not pinned")
            }
            GcReason::OverSize { run, max_size } => {
                write!(f, "over max size {}: only used by run {run}, the oldest unpinned run kept", human(*max_size))
            }
            GcReason::IncompleteRecord { missing } => {
                write!(f, "incomplete record: output blob {} is gone", missing.short())
            }
            GcReason::UnreadableRecord { error } => write!(f, "unreadable record: {error}"),
            GcReason::UnreadableRun { error } => write!(f, "unreadable run record: {error}"),
            GcReason::MissingFile => write!(f, "index entry whose file is gone"),
            GcReason::OrphanFile => write!(f, "orphan file: in blobs/ but not indexed (an interrupted write)"),
            GcReason::TmpLeftover => write!(f, "tmp leftover of an interrupted write"),
            GcReason::Quarantine => write!(f, "quarantine: failed verification earlier"),
        }
    }
}

/// One thing gc freed (or would free, in a dry run).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GcItem {
    pub target: GcTarget,
    pub reason: GcReason,
    pub bytes: u64,
}

/// What [`Store::gc`] did. Sizes are logical bytes: blobs + record and run JSON + files in
/// `tmp/`, `quarantine/` and orphans in `blobs/`. sled returns the space of deleted values to
/// the filesystem lazily, as it rewrites its log segments.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub items: Vec<GcItem>,
    pub freed_bytes: u64,
    pub size_before: u64,
    pub size_after: u64,
    /// Run ids kept, oldest first.
    pub kept_runs: Vec<String>,
    pub kept_records: usize,
    pub kept_blobs: usize,
    /// Things the user should know: pins naming unknown runs, a `max_size` that could not be met.
    pub notes: Vec<String>,
}

impl fmt::Display for GcReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run { "would free" } else { "freed" };
        for it in &self.items {
            writeln!(f, "{verb} {:>10}  {}  — {}", human(it.bytes), it.target, it.reason)?;
        }
        writeln!(
            f,
            "{verb} {} in {} items; {} → {}; kept {} runs, {} records, {} blobs",
            human(self.freed_bytes),
            self.items.len(),
            human(self.size_before),
            human(self.size_after),
            self.kept_runs.len(),
            self.kept_records,
            self.kept_blobs
        )?;
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        Ok(())
    }
}

impl Store {
    /// Rehashes every blob (in parallel across blobs with rayon; large blobs also hash in
    /// parallel internally), quarantines corrupt ones, drops index entries of vanished files, and
    /// lists incomplete and unreadable records and runs and crash leftovers.
    pub fn verify(&self) -> Result<VerifyReport> {
        let _g = self.gate_write();
        let mut rep = VerifyReport::default();

        let mut all: Vec<(Digest, Tier)> = Vec::new();
        for k in self.blobs.iter().keys() {
            all.push((digest_of_key(&k?), Tier::Sled));
        }
        for k in self.files.iter().keys() {
            all.push((digest_of_key(&k?), Tier::File));
        }
        enum Outcome {
            Good(u64),
            Corrupt(CorruptBlob, u64),
            Missing(Digest),
            Unreadable(Digest, String),
        }
        let outcomes: Vec<Outcome> = all
            .par_iter()
            .map(|&(d, tier)| -> Result<Option<Outcome>> {
                let (actual, len) = match tier {
                    Tier::Sled => match self.blobs.get(d.0)? {
                        None => return Ok(None),
                        Some(v) => (Digest::of_bytes(&v), v.len() as u64),
                    },
                    Tier::File => {
                        let p = self.file_path(&d);
                        match fs::metadata(&p).and_then(|m| Ok((Digest::of_file(&p)?, m.len()))) {
                            Ok(x) => x,
                            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Some(Outcome::Missing(d))),
                            Err(e) => return Ok(Some(Outcome::Unreadable(d, e.to_string()))),
                        }
                    }
                };
                Ok(Some(if actual == d {
                    Outcome::Good(len)
                } else {
                    Outcome::Corrupt(CorruptBlob { digest: d, actual, tier }, len)
                }))
            })
            .filter_map(|r| r.transpose())
            .collect::<Result<_>>()?;

        for o in outcomes {
            match o {
                Outcome::Good(len) => {
                    rep.blobs_checked += 1;
                    rep.bytes_checked += len;
                }
                Outcome::Corrupt(c, len) => {
                    rep.blobs_checked += 1;
                    rep.bytes_checked += len;
                    self.quarantine_inner(&c.digest, None)?;
                    rep.corrupt.push(c);
                }
                Outcome::Missing(d) => {
                    self.files.remove(d.0)?;
                    rep.missing_files.push(d);
                }
                Outcome::Unreadable(d, error) => rep.unreadable_blobs.push(Unreadable { what: d.to_string(), error }),
            }
        }

        for kv in self.records.iter() {
            let (k, v) = kv?;
            match serde_json::from_slice::<StageRecord>(&v) {
                Err(e) => rep.unreadable_records.push(Unreadable { what: hex_of(&k), error: e.to_string() }),
                Ok(rec) => {
                    let mut missing = Vec::new();
                    for o in rec.outputs.values() {
                        if !self.has_blob(&o.digest)? && !missing.contains(&o.digest) {
                            missing.push(o.digest);
                        }
                    }
                    if !missing.is_empty() {
                        rep.incomplete_records.push(IncompleteRecord {
                            key: rec.key,
                            stage_name: rec.stage_name,
                            missing,
                        });
                    }
                }
            }
        }
        for kv in self.runs.iter() {
            let (k, v) = kv?;
            if let Err(e) = serde_json::from_slice::<RunRecord>(&v) {
                rep.unreadable_runs.push(Unreadable { what: String::from_utf8_lossy(&k).into(), error: e.to_string() });
            }
        }
        rep.orphan_files = self.orphan_files()?.into_iter().map(|(p, _)| p).collect();
        rep.tmp_leftovers = list_files(&self.root.join("tmp"))?.into_iter().map(|(p, _)| p).collect();
        self.db.flush()?;
        Ok(rep)
    }

    /// Where the cache's bytes are.
    pub fn du(&self) -> Result<DuReport> {
        let _g = self.gate_read();
        let mut rep = DuReport::default();
        let mut sizes: HashMap<Digest, u64> = HashMap::new();
        for kv in self.blobs.iter() {
            let (k, v) = kv?;
            rep.sled_blobs += 1;
            rep.sled_bytes += v.len() as u64;
            sizes.insert(digest_of_key(&k), v.len() as u64);
        }
        for kv in self.files.iter() {
            let (k, v) = kv?;
            rep.file_blobs += 1;
            rep.file_bytes += size_of_value(&v);
            sizes.insert(digest_of_key(&k), size_of_value(&v));
        }
        let mut referenced: HashSet<Digest> = HashSet::new();
        let mut stages: BTreeMap<String, (usize, HashSet<Digest>)> = BTreeMap::new();
        for kv in self.records.iter() {
            let (_, v) = kv?;
            rep.records += 1;
            rep.record_bytes += v.len() as u64;
            let Ok(rec) = serde_json::from_slice::<StageRecord>(&v) else { continue };
            let e = stages.entry(rec.stage_name.clone()).or_default();
            e.0 += 1;
            for o in rec.outputs.values() {
                referenced.insert(o.digest);
                if sizes.contains_key(&o.digest) {
                    e.1.insert(o.digest);
                }
            }
            referenced.extend(rec.inputs.values().copied());
        }
        for kv in self.runs.iter() {
            let (_, v) = kv?;
            rep.runs += 1;
            rep.run_bytes += v.len() as u64;
        }
        for (d, s) in &sizes {
            if !referenced.contains(d) {
                rep.unreferenced_blobs += 1;
                rep.unreferenced_bytes += s;
            }
        }
        rep.per_stage = stages
            .into_iter()
            .map(|(stage_name, (records, blobs))| StageUsage {
                stage_name,
                records,
                blobs: blobs.len(),
                bytes: blobs.iter().map(|d| sizes[d]).sum(),
            })
            .collect();
        rep.per_stage.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.stage_name.cmp(&b.stage_name)));
        let q = list_files(&self.root.join("quarantine"))?;
        rep.quarantine_files = q.len();
        rep.quarantine_bytes = q.iter().map(|(_, s)| s).sum();
        let t = list_files(&self.root.join("tmp"))?;
        rep.tmp_files = t.len();
        rep.tmp_bytes = t.iter().map(|(_, s)| s).sum();
        rep.index_on_disk = self.db.size_on_disk()?;
        Ok(rep)
    }

    /// Garbage collection. Keeps every record and blob reachable from the newest
    /// `keep_last_runs` runs (in [`Store::runs`] order) and from pinned runs; a record reaches its
    /// output blobs and, when present, its input blobs (so a kept stage can be rerun from the
    /// cache). Everything else is freed, along with the run records not kept, records that are
    /// unreadable or whose outputs are gone, index entries of vanished files, orphan files in
    /// `blobs/`, `tmp/` leftovers and the quarantine. See [`GcOptions::max_size`] for the size
    /// cap. `dry_run` computes the same report and changes nothing.
    ///
    /// Deletion order keeps a crash mid-gc harmless: run records, then stage records (flushed),
    /// then blobs (index entry before file), then loose files.
    pub fn gc(&self, opts: GcOptions) -> Result<GcReport> {
        let _g = self.gate_write();
        let n_keep = opts.keep_last_runs;
        let mut items: Vec<GcItem> = Vec::new();
        let mut notes: Vec<String> = Vec::new();

        // Blobs present, by tier. File-tier entries without a file are freed as index entries.
        let mut present: HashMap<Digest, (Tier, u64)> = HashMap::new();
        for kv in self.blobs.iter() {
            let (k, v) = kv?;
            present.insert(digest_of_key(&k), (Tier::Sled, v.len() as u64));
        }
        let mut dead_entries: Vec<Digest> = Vec::new();
        for kv in self.files.iter() {
            let (k, v) = kv?;
            let d = digest_of_key(&k);
            if self.file_path(&d).exists() {
                present.insert(d, (Tier::File, size_of_value(&v)));
            } else {
                dead_entries.push(d);
                items.push(GcItem {
                    target: GcTarget::IndexEntry { digest: d },
                    reason: GcReason::MissingFile,
                    bytes: 0,
                });
            }
        }

        // Records: readable and complete ones are candidates; the rest are freed now.
        let mut records: HashMap<StageKey, (StageRecord, u64)> = HashMap::new();
        let mut dead_records: Vec<Vec<u8>> = Vec::new();
        for kv in self.records.iter() {
            let (k, v) = kv?;
            let bytes = v.len() as u64;
            match serde_json::from_slice::<StageRecord>(&v) {
                Err(e) => {
                    items.push(GcItem {
                        target: GcTarget::Record { key: hex_of(&k), stage_name: None },
                        reason: GcReason::UnreadableRecord { error: e.to_string() },
                        bytes,
                    });
                    dead_records.push(k.to_vec());
                }
                Ok(rec) => {
                    if let Some(o) = rec.outputs.values().find(|o| !present.contains_key(&o.digest)) {
                        items.push(GcItem {
                            target: GcTarget::Record { key: hex_of(&k), stage_name: Some(rec.stage_name.clone()) },
                            reason: GcReason::IncompleteRecord { missing: o.digest },
                            bytes,
                        });
                        dead_records.push(k.to_vec());
                    } else if k.len() == 32 {
                        records.insert(StageKey(digest_of_key(&k)), (rec, bytes));
                    } else {
                        items.push(GcItem {
                            target: GcTarget::Record { key: hex_of(&k), stage_name: Some(rec.stage_name.clone()) },
                            reason: GcReason::UnreadableRecord { error: "key is not a 32-byte stage key".into() },
                            bytes,
                        });
                        dead_records.push(k.to_vec());
                    }
                }
            }
        }

        // Runs, oldest first; which are kept.
        let mut runs: Vec<(RunRecord, u64)> = Vec::new();
        let mut dead_runs: Vec<Vec<u8>> = Vec::new();
        for kv in self.runs.iter() {
            let (k, v) = kv?;
            match serde_json::from_slice::<RunRecord>(&v) {
                Ok(r) => runs.push((r, v.len() as u64)),
                Err(e) => {
                    items.push(GcItem {
                        target: GcTarget::Run { id: String::from_utf8_lossy(&k).into() },
                        reason: GcReason::UnreadableRun { error: e.to_string() },
                        bytes: v.len() as u64,
                    });
                    dead_runs.push(k.to_vec());
                }
            }
        }
        let pinned: HashSet<String> = self.pins()?.into_iter().map(|(_, id)| id).collect();
        for (name, id) in self.pins()? {
            if !runs.iter().any(|(r, _)| r.id == id) {
                notes.push(format!("pin {name:?} names run {id:?}, which does not exist (`unpin` it)"));
            }
        }
        let first_recent = runs.len().saturating_sub(n_keep);
        let mut kept: Vec<usize> = Vec::new();
        for (i, (r, bytes)) in runs.iter().enumerate() {
            if i >= first_recent || pinned.contains(&r.id) {
                kept.push(i);
            } else {
                items.push(GcItem {
                    target: GcTarget::Run { id: r.id.clone() },
                    reason: GcReason::OldRun { keep_last_runs: n_keep },
                    bytes: *bytes,
                });
                dead_runs.push(r.id.as_bytes().to_vec());
            }
        }

        // Reachability, counted per kept run so max_size can find what only one run uses.
        let reach = |run: &RunRecord| -> (HashSet<StageKey>, HashSet<Digest>) {
            let mut recs = HashSet::new();
            let mut blobs = HashSet::new();
            for (_, key) in &run.stages {
                if let Some((rec, _)) = records.get(key) {
                    recs.insert(*key);
                    for d in rec.outputs.values().map(|o| &o.digest).chain(rec.inputs.values()) {
                        if present.contains_key(d) {
                            blobs.insert(*d);
                        }
                    }
                }
            }
            (recs, blobs)
        };
        let reaches: HashMap<usize, (HashSet<StageKey>, HashSet<Digest>)> =
            kept.iter().map(|&i| (i, reach(&runs[i].0))).collect();
        let mut rec_refs: HashMap<StageKey, usize> = HashMap::new();
        let mut blob_refs: HashMap<Digest, usize> = HashMap::new();
        for (recs, blobs) in reaches.values() {
            for k in recs {
                *rec_refs.entry(*k).or_default() += 1;
            }
            for d in blobs {
                *blob_refs.entry(*d).or_default() += 1;
            }
        }

        let mut freed_records: HashSet<StageKey> = HashSet::new();
        let mut freed_blobs: HashSet<Digest> = HashSet::new();
        let mut sorted_records: Vec<(&StageKey, &(StageRecord, u64))> = records.iter().collect();
        sorted_records.sort_by_key(|(k, _)| **k);
        for (k, (rec, bytes)) in sorted_records {
            if !rec_refs.contains_key(k) {
                items.push(GcItem {
                    target: GcTarget::Record { key: k.to_string(), stage_name: Some(rec.stage_name.clone()) },
                    reason: GcReason::Unreachable { keep_last_runs: n_keep },
                    bytes: *bytes,
                });
                freed_records.insert(*k);
            }
        }
        let mut sorted_blobs: Vec<(&Digest, &(Tier, u64))> = present.iter().collect();
        sorted_blobs.sort_by_key(|(d, _)| **d);
        for (d, (tier, bytes)) in sorted_blobs {
            if !blob_refs.contains_key(d) {
                items.push(GcItem {
                    target: GcTarget::Blob { digest: *d, tier: *tier },
                    reason: GcReason::Unreachable { keep_last_runs: n_keep },
                    bytes: *bytes,
                });
                freed_blobs.insert(*d);
            }
        }

        // Loose files.
        let mut loose: Vec<PathBuf> = Vec::new();
        for (p, bytes) in self.orphan_files()? {
            items.push(GcItem { target: GcTarget::File { path: p.clone() }, reason: GcReason::OrphanFile, bytes });
            loose.push(p);
        }
        for (p, bytes) in list_files(&self.root.join("tmp"))? {
            items.push(GcItem { target: GcTarget::File { path: p.clone() }, reason: GcReason::TmpLeftover, bytes });
            loose.push(p);
        }
        for (p, bytes) in list_files(&self.root.join("quarantine"))? {
            items.push(GcItem { target: GcTarget::File { path: p.clone() }, reason: GcReason::Quarantine, bytes });
            loose.push(p);
        }

        let freed_so_far: u64 = items.iter().map(|i| i.bytes).sum();
        let kept_bytes = |kept: &[usize], rec_refs: &HashMap<StageKey, usize>, blob_refs: &HashMap<Digest, usize>| {
            kept.iter().map(|&i| runs[i].1).sum::<u64>()
                + rec_refs.keys().map(|k| records[k].1).sum::<u64>()
                + blob_refs.keys().map(|d| present[d].1).sum::<u64>()
        };
        let mut size_after = kept_bytes(&kept, &rec_refs, &blob_refs);
        let size_before = size_after + freed_so_far;

        // Size cap: drop the oldest unpinned runs (never the newest) and what only they reach.
        if let Some(max) = opts.max_size {
            let newest = runs.len().checked_sub(1);
            let candidates: Vec<usize> =
                kept.iter().copied().filter(|&i| Some(i) != newest && !pinned.contains(&runs[i].0.id)).collect();
            for i in candidates {
                if size_after <= max {
                    break;
                }
                let id = runs[i].0.id.clone();
                let reason = || GcReason::OverSize { run: id.clone(), max_size: max };
                items.push(GcItem { target: GcTarget::Run { id: id.clone() }, reason: reason(), bytes: runs[i].1 });
                dead_runs.push(id.as_bytes().to_vec());
                kept.retain(|&j| j != i);
                let (recs, blobs) = &reaches[&i];
                let mut recs: Vec<&StageKey> = recs.iter().collect();
                recs.sort();
                for k in recs {
                    let n = rec_refs.get_mut(k).expect("counted above");
                    *n -= 1;
                    if *n == 0 {
                        rec_refs.remove(k);
                        let (rec, bytes) = &records[k];
                        items.push(GcItem {
                            target: GcTarget::Record { key: k.to_string(), stage_name: Some(rec.stage_name.clone()) },
                            reason: reason(),
                            bytes: *bytes,
                        });
                        freed_records.insert(*k);
                    }
                }
                let mut blobs: Vec<&Digest> = blobs.iter().collect();
                blobs.sort();
                for d in blobs {
                    let n = blob_refs.get_mut(d).expect("counted above");
                    *n -= 1;
                    if *n == 0 {
                        blob_refs.remove(d);
                        let (tier, bytes) = present[d];
                        items.push(GcItem { target: GcTarget::Blob { digest: *d, tier }, reason: reason(), bytes });
                        freed_blobs.insert(*d);
                    }
                }
                size_after = kept_bytes(&kept, &rec_refs, &blob_refs);
            }
            if size_after > max {
                notes.push(format!(
                    "still {} over max size {}: what is left belongs to pinned runs or the newest run, which gc never drops",
                    human(size_after - max),
                    human(max)
                ));
            }
        }

        let report = GcReport {
            dry_run: opts.dry_run,
            freed_bytes: items.iter().map(|i| i.bytes).sum(),
            items,
            size_before,
            size_after,
            kept_runs: kept.iter().map(|&i| runs[i].0.id.clone()).collect(),
            kept_records: rec_refs.len(),
            kept_blobs: blob_refs.len(),
            notes,
        };
        if opts.dry_run {
            return Ok(report);
        }

        // Apply, in crash-safe order.
        for id in &dead_runs {
            self.runs.remove(id.as_slice())?;
        }
        let mut touched_names: Vec<Vec<u8>> = Vec::new();
        let record_keys = dead_records.iter().cloned().chain(freed_records.iter().map(|k| k.0 .0.to_vec()));
        for k in record_keys {
            if let Some(names) = self.delete_record_raw(&k)? {
                touched_names.extend(names);
            }
        }
        // Also repair pointers that already named a missing record.
        for kv in self.latest.iter() {
            let (name, k) = kv?;
            if !self.records.contains_key(&k)? && !touched_names.iter().any(|n| n.as_slice() == name.as_ref()) {
                touched_names.push(name.to_vec());
            }
        }
        self.repoint_latest(&touched_names)?;
        self.db.flush()?;
        for d in &dead_entries {
            self.files.remove(d.0)?;
        }
        for d in &freed_blobs {
            self.remove_blob_inner(d)?;
        }
        self.db.flush()?;
        for p in &loose {
            remove_loose(p)?;
        }
        Ok(report)
    }

    /// Files under `blobs/` that the `files` index does not name, with their sizes.
    fn orphan_files(&self) -> Result<Vec<(PathBuf, u64)>> {
        let dir = self.root.join("blobs");
        let mut out = Vec::new();
        for (sub, _) in list_entries(&dir)? {
            if !sub.is_dir() {
                out.push((sub.clone(), fs::metadata(&sub).map(|m| m.len()).unwrap_or(0)));
                continue;
            }
            let prefix = sub.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            for (p, size) in list_files(&sub)? {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let indexed = match format!("{prefix}{name}").parse::<Digest>() {
                    Ok(d) => self.files.contains_key(d.0)?,
                    Err(_) => false,
                };
                if !indexed {
                    out.push((p, size));
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

fn tier_name(t: Tier) -> &'static str {
    match t {
        Tier::Sled => "sled",
        Tier::File => "file",
    }
}

/// Entries of a directory (empty when it does not exist), sorted, with file sizes.
fn list_entries(dir: &Path) -> Result<Vec<(PathBuf, u64)>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir)(e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(io(dir))?;
        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
        out.push((e.path(), len));
    }
    out.sort();
    Ok(out)
}

/// Plain files (and anything else that is not a directory) directly in `dir`.
fn list_files(dir: &Path) -> Result<Vec<(PathBuf, u64)>> {
    Ok(list_entries(dir)?.into_iter().filter(|(p, _)| !p.is_dir()).collect())
}

fn remove_loose(p: &Path) -> Result<()> {
    match fs::remove_file(p) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io(p)(e)),
    }
    if let Some(parent) = p.parent() {
        if parent.parent().and_then(|pp| pp.file_name()) == Some("blobs".as_ref()) {
            let _ = fs::remove_dir(parent); // an emptied blobs/ab/ shard
        }
    }
    Ok(())
}

/// Bytes for people: 1.5 GiB, 12.0 MiB, 800 B.
pub fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::CacheError;
    use crate::store::tests::{describe, record, run_self, small_file_tier};
    use crate::store::LockWait;

    fn gc(s: &Store, keep_last_runs: usize, max_size: Option<u64>, dry_run: bool) -> GcReport {
        let rep = s.gc(GcOptions { keep_last_runs, max_size, dry_run }).unwrap();
        println!("{rep}");
        rep
    }

    fn run(id: &str, stages: &[&StageRecord]) -> RunRecord {
        RunRecord {
            id: id.to_string(),
            started_at: 0,
            config_digest: Digest::of_bytes(id.as_bytes()),
            stages: stages.iter().map(|r| (r.stage_name.clone(), r.key)).collect(),
            computed: Vec::new(),
            pinned_as: None,
        }
    }

    fn freed<'a>(rep: &'a GcReport, target: &GcTarget) -> Option<&'a GcItem> {
        rep.items.iter().find(|i| &i.target == target)
    }

    fn blob_target(s: &Store, d: Digest) -> GcTarget {
        GcTarget::Blob { digest: d, tier: s.tier_of(&d).unwrap().expect("blob is indexed") }
    }

    fn record_target(r: &StageRecord) -> GcTarget {
        GcTarget::Record { key: r.key.to_string(), stage_name: Some(r.stage_name.clone()) }
    }

    fn make_writable(p: &Path) {
        let mut perms = fs::metadata(p).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        fs::set_permissions(p, perms).unwrap();
    }

    const CRASH_TEST: &str = "maint::tests::crash_mid_write_leaves_no_entry_and_gc_cleans_up";

    /// Parent: for each fault-injection point, runs this test again as a child process that stores
    /// a complete record and then aborts in the middle of storing a large blob; then checks that
    /// `open` works, the interrupted blob is invisible, `verify` lists the leftover and `gc`
    /// removes it.
    #[test]
    fn crash_mid_write_leaves_no_entry_and_gc_cleans_up() {
        let committed = vec![1u8; 5000];
        let interrupted: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
        let rec = record("train", 1, &[("model", Digest::of_bytes(&committed), 5000)], 1);
        if let Ok(root) = std::env::var("WDRO_CRASH_CHILD_DIR") {
            let root = PathBuf::from(root);
            let s = Store::open_with(&root.join("cache"), LockWait::NoWait, small_file_tier()).unwrap();
            s.put_bytes(&committed).unwrap();
            s.put_record(&rec).unwrap();
            s.put_run(&run("run-001", &[&rec])).unwrap();
            // A sled-tier blob that is never flushed: after the crash it is either there whole or
            // absent, and unreachable either way.
            s.put_bytes(b"unflushed small blob").unwrap();
            s.put_file(&root.join("big.bin")).unwrap();
            panic!("the crash point did not fire");
        }
        // The committed blob passes the `adopt:*` points first, so the crash is at their 2nd pass.
        for point in ["put_file:copied", "adopt:written@2", "adopt:renamed@2"] {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join("big.bin"), &interrupted).unwrap();
            let out = run_self(
                CRASH_TEST,
                &[
                    ("WDRO_CRASH_CHILD_DIR", dir.path().display().to_string()),
                    ("WDRO_CACHE_CRASH_AT", point.to_string()),
                ],
            )
            .output()
            .unwrap();
            assert!(!out.status.success(), "child should have crashed at {point}: {}", describe(&out));
            assert!(
                String::from_utf8_lossy(&out.stderr).contains(&format!("crash point {point}")),
                "{}",
                describe(&out)
            );

            let root = dir.path().join("cache");
            let s = Store::open_with(&root, LockWait::NoWait, small_file_tier()).unwrap();
            let big = Digest::of_bytes(&interrupted);
            assert!(s.is_complete(&rec.key).unwrap(), "{point}: committed record survives");
            assert!(!s.has_blob(&big).unwrap(), "{point}: interrupted blob is not visible");
            assert!(s.records().unwrap().iter().all(|r| r.key == rec.key));

            let v = s.verify().unwrap();
            println!("{point}:\n{v}");
            assert!(v.is_clean(), "{point}: {v}");
            let (orphans, tmps) = if point.starts_with("adopt:renamed") { (1, 0) } else { (0, 1) };
            assert_eq!(v.orphan_files.len(), orphans, "{point}: {v}");
            assert_eq!(v.tmp_leftovers.len(), tmps, "{point}: {v}");

            let dry = gc(&s, 1, None, true);
            let leftover = dry
                .items
                .iter()
                .find(|i| matches!(i.reason, GcReason::OrphanFile | GcReason::TmpLeftover))
                .expect("gc lists the leftover");
            assert_eq!(leftover.bytes, interrupted.len() as u64);
            assert_eq!(s.verify().unwrap(), v, "dry run changed nothing");

            let rep = gc(&s, 1, None, false);
            assert_eq!(rep.items.len(), dry.items.len());
            let v = s.verify().unwrap();
            assert!(v.is_clean() && v.orphan_files.is_empty() && v.tmp_leftovers.is_empty(), "{v}");
            assert!(s.is_complete(&rec.key).unwrap());
            assert!(!s.has_blob(&Digest::of_bytes(b"unflushed small blob")).unwrap(), "unreachable: gc dropped it");
            // Storing the interrupted blob again works and is complete.
            assert_eq!(s.put_file(&dir.path().join("big.bin")).unwrap(), big);
            assert_eq!(s.get_bytes(&big).unwrap(), interrupted);
        }
    }

    /// Three runs share a `fetch` output; each trains its own model. Run 1 is pinned.
    struct Fixture {
        _dir: tempfile::TempDir,
        s: Store,
        shared: Digest,
        models: [Digest; 3],
        stray: Digest,
        fetch: StageRecord,
        trains: [StageRecord; 3],
    }

    fn fixture(model_size: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_with(dir.path(), LockWait::NoWait, small_file_tier()).unwrap();
        let shared = s.put_bytes(b"dataset").unwrap();
        let fetch = record("fetch", 0, &[("data", shared, 7)], 1);
        s.put_record(&fetch).unwrap();
        let mut models = Vec::new();
        let mut trains = Vec::new();
        // Finish times 1, 3, 2: run-002 trained last in wall time order of finish.
        for (i, finished) in [(1u8, 10u64), (2, 30), (3, 20)] {
            let m = s.put_bytes(&vec![i; model_size]).unwrap();
            let mut t = record("train", i, &[("model", m, model_size as u64)], finished);
            t.inputs.insert("data".into(), shared);
            s.put_record(&t).unwrap();
            s.put_run(&run(&format!("run-00{i}"), &[&fetch, &t])).unwrap();
            models.push(m);
            trains.push(t);
        }
        // The latest `train` record is run-002's (largest finished_at among those kept later
        // matters when gc repoints it).
        s.put_record(&trains[1]).unwrap();
        let stray = s.put_bytes(b"stored but never recorded").unwrap();
        Fixture {
            _dir: dir,
            s,
            shared,
            models: models.try_into().unwrap(),
            stray,
            fetch,
            trains: trains.try_into().unwrap(),
        }
    }

    #[test]
    fn gc_keeps_last_runs_and_pins_and_dry_run_changes_nothing() {
        let f = fixture(2000);
        let s = &f.s;
        s.pin("paper", "run-001").unwrap();
        s.pin("typo", "run-999").unwrap();
        let du_before = s.du().unwrap();

        let dry = gc(s, 1, None, true);
        assert!(dry.dry_run);
        assert_eq!(s.du().unwrap(), du_before, "dry run changed nothing");
        assert_eq!(s.runs().unwrap().len(), 3);

        let rep = gc(s, 1, None, false);
        assert_eq!(rep.items, dry.items, "dry run reports exactly what gc does");
        let unreachable = GcReason::Unreachable { keep_last_runs: 1 };
        assert_eq!(
            freed(&rep, &GcTarget::Run { id: "run-002".into() }).unwrap().reason,
            GcReason::OldRun { keep_last_runs: 1 }
        );
        assert_eq!(freed(&rep, &record_target(&f.trains[1])).unwrap().reason, unreachable);
        let model2 = freed(&rep, &GcTarget::Blob { digest: f.models[1], tier: Tier::File }).unwrap();
        assert_eq!((model2.reason.clone(), model2.bytes), (unreachable.clone(), 2000));
        assert_eq!(freed(&rep, &GcTarget::Blob { digest: f.stray, tier: Tier::Sled }).unwrap().reason, unreachable);
        assert_eq!(rep.items.len(), 4, "{rep}");
        assert_eq!(rep.freed_bytes, rep.items.iter().map(|i| i.bytes).sum::<u64>());
        assert_eq!(rep.size_before - rep.freed_bytes, rep.size_after);
        assert_eq!(rep.kept_runs, ["run-001", "run-003"]);
        assert_eq!((rep.kept_records, rep.kept_blobs), (3, 3));
        assert!(rep.notes.iter().any(|n| n.contains("run-999")), "{:?}", rep.notes);
        assert!(rep.to_string().contains("unreachable: not used by the last 1 runs or any pin"));

        for d in [f.shared, f.models[0], f.models[2]] {
            assert!(s.has_blob(&d).unwrap());
        }
        assert!(!s.has_blob(&f.models[1]).unwrap() && !s.has_blob(&f.stray).unwrap());
        assert!(!s.file_path(&f.models[1]).exists());
        assert!(s.is_complete(&f.fetch.key).unwrap() && s.is_complete(&f.trains[0].key).unwrap());
        assert_eq!(s.runs().unwrap().iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["run-001", "run-003"]);
        // `latest` pointed at the dropped run-002 record; it now names the newest that is left.
        assert_eq!(s.latest_record("train").unwrap().unwrap().key, f.trains[2].key);
        assert!(s.verify().unwrap().is_clean());
        // A second gc has nothing left to do.
        assert!(gc(s, 1, None, false).items.is_empty());
    }

    #[test]
    fn gc_max_size_drops_oldest_unpinned_runs_but_never_the_newest() {
        let f = fixture(10_000);
        let s = &f.s;
        let total = s.du().unwrap();
        assert_eq!(total.file_bytes, 30_000);

        // Everything is reachable; the cap forces run-001 (oldest) out, and that is enough.
        let rep = gc(s, 3, Some(25_000), true);
        let over = GcReason::OverSize { run: "run-001".into(), max_size: 25_000 };
        assert_eq!(freed(&rep, &GcTarget::Run { id: "run-001".into() }).unwrap().reason, over);
        assert_eq!(freed(&rep, &record_target(&f.trains[0])).unwrap().reason, over);
        assert_eq!(freed(&rep, &blob_target(s, f.models[0])).unwrap().reason, over);
        assert!(freed(&rep, &blob_target(s, f.shared)).is_none(), "shared with later runs");
        assert_eq!(
            rep.items.iter().filter(|i| !matches!(i.reason, GcReason::OverSize { .. })).count(),
            1,
            "only the stray blob"
        );
        assert!(rep.size_after <= 25_000 && rep.notes.is_empty(), "{rep}");

        // With run-001 pinned and a cap nothing can meet: run-002 goes, run-003 (newest) stays.
        s.pin("paper", "run-001").unwrap();
        let rep = gc(s, 3, Some(1000), false);
        assert!(freed(&rep, &GcTarget::Run { id: "run-001".into() }).is_none());
        assert!(freed(&rep, &GcTarget::Run { id: "run-002".into() }).is_some());
        assert!(freed(&rep, &GcTarget::Run { id: "run-003".into() }).is_none());
        assert_eq!(rep.kept_runs, ["run-001", "run-003"]);
        assert!(rep.notes.iter().any(|n| n.contains("over max size")), "{:?}", rep.notes);
        assert!(s.has_blob(&f.models[0]).unwrap() && s.has_blob(&f.models[2]).unwrap());
        assert!(!s.has_blob(&f.models[1]).unwrap());
        assert_eq!(s.du().unwrap().file_bytes, 20_000);
    }

    #[test]
    fn verify_quarantines_corrupt_blobs_and_lists_bad_records_then_gc_drops_them() {
        let f = fixture(3000);
        let s = &f.s;
        // Corrupt run-003's model file, delete run-002's, and corrupt a sled-tier blob.
        let p3 = s.file_path(&f.models[2]);
        make_writable(&p3);
        fs::write(&p3, vec![0u8; 3000]).unwrap();
        fs::remove_file(s.file_path(&f.models[1])).unwrap();
        s.blobs.insert(f.shared.0, &b"datasex"[..]).unwrap();
        s.records.insert([9u8; 32], &b"{not json"[..]).unwrap();
        s.runs.insert("run-bad", &b"nope"[..]).unwrap();

        let v = s.verify().unwrap();
        println!("{v}");
        assert!(!v.is_clean());
        let mut corrupt: Vec<(Digest, Tier)> = v.corrupt.iter().map(|c| (c.digest, c.tier)).collect();
        corrupt.sort_by_key(|c| c.0);
        let mut want = vec![(f.models[2], Tier::File), (f.shared, Tier::Sled)];
        want.sort_by_key(|c| c.0);
        assert_eq!(corrupt, want);
        assert_eq!(v.missing_files, [f.models[1]]);
        assert_eq!(v.blobs_checked, 4, "shared, model 1, model 3, stray");
        assert_eq!(v.unreadable_records.len(), 1);
        assert_eq!(v.unreadable_runs.len(), 1);
        let mut incomplete: Vec<StageKey> = v.incomplete_records.iter().map(|r| r.key).collect();
        incomplete.sort();
        let mut want: Vec<StageKey> = vec![f.fetch.key, f.trains[1].key, f.trains[2].key];
        want.sort();
        assert_eq!(incomplete, want);
        for d in [f.models[1], f.models[2], f.shared] {
            assert!(!s.has_blob(&d).unwrap());
        }
        assert!(s.root.join("quarantine").join(f.models[2].to_hex()).exists());
        assert!(matches!(s.get_bytes(&f.models[2]), Err(CacheError::MissingBlob(_))));

        let rep = gc(s, 10, None, false);
        let reasons: Vec<String> = rep.items.iter().map(|i| i.reason.to_string()).collect();
        assert_eq!(reasons.iter().filter(|r| r.starts_with("quarantine")).count(), 2, "{rep}");
        assert_eq!(reasons.iter().filter(|r| r.starts_with("incomplete record")).count(), 3, "{rep}");
        assert_eq!(reasons.iter().filter(|r| r.starts_with("unreadable record")).count(), 1, "{rep}");
        assert_eq!(reasons.iter().filter(|r| r.starts_with("unreadable run record")).count(), 1, "{rep}");
        let v = s.verify().unwrap();
        assert!(v.is_clean(), "{v}");
        assert_eq!(s.records().unwrap().len(), 1, "only run-001's train record is whole");
        assert!(s.latest_record("fetch").unwrap().is_none());
        assert_eq!(s.du().unwrap().quarantine_files, 0);
    }

    #[test]
    fn du_counts_tiers_stages_and_leftovers() {
        let f = fixture(2048);
        let s = &f.s;
        fs::write(s.root.join("tmp").join("leftover"), [0u8; 100]).unwrap();
        let du = s.du().unwrap();
        println!("{du}");
        assert_eq!((du.sled_blobs, du.sled_bytes), (2, 7 + "stored but never recorded".len() as u64));
        assert_eq!((du.file_blobs, du.file_bytes), (3, 3 * 2048));
        assert_eq!(du.blobs(), 5);
        assert_eq!(du.records, 4);
        assert_eq!(du.runs, 3);
        assert_eq!((du.tmp_files, du.tmp_bytes), (1, 100));
        assert_eq!((du.unreferenced_blobs, du.unreferenced_bytes), (1, "stored but never recorded".len() as u64));
        assert_eq!(
            du.per_stage,
            [
                StageUsage { stage_name: "train".into(), records: 3, blobs: 3, bytes: 3 * 2048 },
                StageUsage { stage_name: "fetch".into(), records: 1, blobs: 1, bytes: 7 },
            ]
        );
        assert!(du.index_on_disk > 0);
        assert!(du.to_string().contains("blobs as files"));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(800), "800 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(512 << 20), "512.0 MiB");
    }
}
