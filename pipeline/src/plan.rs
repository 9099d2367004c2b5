//! Planning: which stages are cached, which must run, and exactly why.
//!
//! The plan walks the DAG in topological order. A stage's key is known once every input digest
//! is known, and an input digest is known when its producer is cached (its [`StageRecord`] lists
//! the output digests). Below a stage that must run, keys are unknown until it finishes: those
//! stages are planned as [`Reason::Upstream`], and at run time may still turn out to be cache
//! hits if the upstream reproduces identical bytes (early cutoff, see [`crate::exec`]).
//!
//! Reasons are typed so the CLI can print them (`wdro why`), group them (a Snakemake-style
//! "Reasons:" block) and emit them as JSON, like DVC's `status --json`. Param changes are found by
//! diffing the canonical params of the most recent record of the same stage *name* against the
//! new params, field by field, recursing into nested objects; this names `finetune.lr: 0.01 →
//! 0.02` rather than "params changed". Execution-only params ([`Stage::exec_params`]) are not in
//! the key and never appear here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use wdro_cache::{CacheError, Digest, OutputRef, Remote, RemoteError, StageKey, StageRecord, Store};

use crate::graph::Pipeline;
use crate::key::{Env, KeyMaterial};
use crate::stage::{Stage, StageId};

/// What planning needs besides the pipeline and the store.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    /// The environment torch stages are keyed on (ignored for stages that do not use torch).
    pub env: Env,
    /// Stage names to rerun even when cached (`--force STAGE`).
    pub force: BTreeSet<String>,
    /// Read and hash every cached output instead of only checking that it is indexed. Costs a
    /// full read of the cache's reachable blobs; finds corrupt blobs (they are quarantined and
    /// their stages planned as [`Reason::OutputsMissing`]).
    pub verify: bool,
    /// A shared remote cache consulted after the local one (`[remote]`, `--remote`).
    pub remote: Option<Arc<Remote>>,
    /// Which outputs of remote hits are downloaded (see [`RemoteDownload`]).
    pub remote_download: RemoteDownload,
}

impl PlanOptions {
    pub fn new(env: Env) -> PlanOptions {
        PlanOptions {
            env,
            force: BTreeSet::new(),
            verify: false,
            remote: None,
            remote_download: RemoteDownload::default(),
        }
    }
}

/// Which outputs of a remote hit are pulled, Bazel's "builds without the bytes". Outputs that a
/// stage which must run will read are always pulled (lazily, when that stage starts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RemoteDownload {
    /// Only what a computing stage reads.
    Minimal,
    /// Also the outputs of the pipeline's final stages (reports, evaluation tables): the
    /// results a user looks at. The default.
    #[default]
    Toplevel,
    /// Every output of every remote hit (e.g. before going offline).
    All,
}

/// A stage the remote cache has: what planning found and what the run will download.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RemoteHit {
    /// Whether the run pulls this stage's outputs (see [`RemoteDownload`]).
    pub pull: bool,
    /// Bytes and blobs to download for it (0 when not pulled or already local).
    pub pull_bytes: u64,
    pub pull_blobs: usize,
}

/// An output a cached record should provide but cannot.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MissingOutput {
    pub output: String,
    /// The digest the record names; `None` when the record does not list the output at all
    /// (the stage declared a new output without bumping its version).
    pub digest: Option<Digest>,
}

/// Why a stage must run. One stage can have several.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Reason {
    /// No record exists for this stage name: it has never run in this cache.
    NeverRun,
    /// A declared param differs from the last record of this stage name. `field` is dotted
    /// within the stage's params (`lr`, `arch.depth`); `None` means absent on that side.
    ParamChanged { field: String, old: Option<Value>, new: Option<Value> },
    /// An input artifact differs from the one the last record read. `None`: the slot is new or gone.
    InputChanged { slot: String, old_digest: Option<Digest>, new_digest: Option<Digest> },
    /// The stage implementation's version was bumped.
    VersionChanged { old: u32, new: u32 },
    /// The stage name now refers to a different kind of stage.
    KindChanged { old: String, new: String },
    /// A torch stage's environment changed (libtorch version, device class).
    EnvChanged { field: String, old: Option<String>, new: Option<String> },
    /// A record for this exact key exists but some output blobs are gone or corrupt.
    OutputsMissing { outputs: Vec<MissingOutput> },
    /// No record for this key, yet nothing differs from the last record of this stage name:
    /// the key derivation changed (a wdro upgrade) or the record was removed.
    NotInCache { key: StageKey },
    /// Named in `--force`.
    Forced,
    /// An upstream stage must run first; this stage's key is unknown until it finishes.
    Upstream { stage: String },
    /// The remote cache has a result, but pulling it failed verification (corrupt, truncated or
    /// missing blob): it was refused and the stage is recomputed.
    RemoteRefused { error: String },
}

impl Reason {
    /// A short, stable category name for grouping (`param`, `input`, `upstream`, …).
    pub fn category(&self) -> &'static str {
        match self {
            Reason::NeverRun => "new",
            Reason::ParamChanged { .. } => "param",
            Reason::InputChanged { .. } => "input",
            Reason::VersionChanged { .. } => "version",
            Reason::KindChanged { .. } => "kind",
            Reason::EnvChanged { .. } => "env",
            Reason::OutputsMissing { .. } => "missing-output",
            Reason::NotInCache { .. } => "not-in-cache",
            Reason::Forced => "forced",
            Reason::Upstream { .. } => "upstream",
            Reason::RemoteRefused { .. } => "remote-refused",
        }
    }

    /// One line for humans; `stage` prefixes param names (`finetune.lr`).
    pub fn describe(&self, stage: &str) -> String {
        match self {
            Reason::NeverRun => "never run: no record for this stage name in the cache".to_string(),
            Reason::ParamChanged { field, old, new } => {
                format!("param {stage}.{field}: {} → {}", show_value(old), show_value(new))
            }
            Reason::InputChanged { slot, old_digest, new_digest } => {
                format!("input {slot}: {} → {}", show_digest(old_digest), show_digest(new_digest))
            }
            Reason::VersionChanged { old, new } => {
                format!("version {old} → {new} (the stage's implementation changed)")
            }
            Reason::KindChanged { old, new } => format!("stage kind {old} → {new}"),
            Reason::EnvChanged { field, old, new } => format!(
                "env {field}: {} → {}",
                old.as_deref().unwrap_or("(absent)"),
                new.as_deref().unwrap_or("(absent)")
            ),
            Reason::OutputsMissing { outputs } => {
                let list: Vec<String> = outputs
                    .iter()
                    .map(|o| match &o.digest {
                        Some(d) => format!("{} ({})", o.output, d.short()),
                        None => format!("{} (not in the record)", o.output),
                    })
                    .collect();
                if list.is_empty() {
                    "outputs missing from the cache".to_string()
                } else {
                    format!("outputs missing from the cache: {}", list.join(", "))
                }
            }
            Reason::NotInCache { key } => format!(
                "not in cache: no record for key {}, though version, params, inputs and env match the last run (the key derivation changed or the record was removed)",
                key.short()
            ),
            Reason::Forced => "forced (--force)".to_string(),
            Reason::Upstream { stage: up } => format!("upstream {up} will run"),
            Reason::RemoteRefused { error } => format!("remote copy refused: {error}"),
        }
    }
}

/// Human label for a category, used in grouped summaries.
pub fn category_label(category: &str) -> &'static str {
    match category {
        "new" => "never run",
        "param" => "params changed",
        "input" => "inputs changed",
        "version" => "code version changed",
        "kind" => "stage kind changed",
        "env" => "environment changed",
        "missing-output" => "outputs missing from the cache",
        "not-in-cache" => "not in cache",
        "forced" => "forced",
        "upstream" => "upstream will run",
        "remote-refused" => "remote copy refused",
        _ => "other",
    }
}

fn show_value(v: &Option<Value>) -> String {
    match v {
        None => "(absent)".to_string(),
        Some(v) => v.to_string(),
    }
}

fn show_digest(d: &Option<Digest>) -> String {
    match d {
        None => "(absent)".to_string(),
        Some(d) => d.short(),
    }
}

/// A stage's planned status.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Status {
    /// A complete record exists for the stage's key.
    Cached,
    /// The stage must run; never empty.
    ToRun { reasons: Vec<Reason> },
}

impl Status {
    pub fn is_cached(&self) -> bool {
        matches!(self, Status::Cached)
    }

    pub fn is_forced(&self) -> bool {
        self.reasons().contains(&Reason::Forced)
    }

    pub fn reasons(&self) -> &[Reason] {
        match self {
            Status::Cached => &[],
            Status::ToRun { reasons } => reasons,
        }
    }
}

/// One stage of a plan.
#[derive(Clone, Debug, Serialize)]
pub struct PlanEntry {
    pub name: String,
    pub id: StageId,
    /// `None` while an upstream stage must run first.
    pub key: Option<StageKey>,
    #[serde(flatten)]
    pub status: Status,
    /// What went into the key, for field-by-field inspection; `None` when the key is unknown.
    #[serde(skip)]
    pub key_material: Option<KeyMaterial>,
    /// Set when the stage is cached on the remote rather than locally ("cached (remote)").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteHit>,
}

/// The plan for a pipeline, in topological order.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    entries: Vec<PlanEntry>,
}

/// Counts of a plan, plus the names of the stages to run grouped by reason category.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlanSummary {
    pub total: usize,
    pub cached: usize,
    /// Of `cached`, the stages found only on the remote, and the bytes the run will pull.
    pub cached_remote: usize,
    pub pull_bytes: u64,
    pub to_run: usize,
    pub forced: usize,
    /// Reason category → stage names (in topological order).
    pub by_reason: BTreeMap<&'static str, Vec<String>>,
}

impl fmt::Display for PlanSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let noun = if self.total == 1 { "stage" } else { "stages" };
        let remote = if self.cached_remote > 0 {
            format!(" ({} on the remote, {} to pull)", self.cached_remote, human_bytes(self.pull_bytes))
        } else {
            String::new()
        };
        if self.to_run == 0 {
            return write!(f, "{} {noun}: all cached{remote}, up to date", self.total);
        }
        write!(f, "{} {noun}: {} cached{remote}, {} to run", self.total, self.cached, self.to_run)?;
        write!(f, "\nReasons:")?;
        for (cat, names) in &self.by_reason {
            write!(f, "\n  {}: {}", category_label(cat), names.join(", "))?;
        }
        Ok(())
    }
}

impl Plan {
    pub fn entries(&self) -> &[PlanEntry] {
        &self.entries
    }

    pub fn entry(&self, name: &str) -> Option<&PlanEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// True when nothing needs to run.
    pub fn is_up_to_date(&self) -> bool {
        self.entries.iter().all(|e| e.status.is_cached())
    }

    pub fn summary(&self) -> PlanSummary {
        let mut s = PlanSummary {
            total: self.entries.len(),
            cached: 0,
            cached_remote: 0,
            pull_bytes: 0,
            to_run: 0,
            forced: 0,
            by_reason: BTreeMap::new(),
        };
        for e in &self.entries {
            if let Some(r) = &e.remote {
                s.cached_remote += 1;
                s.pull_bytes += r.pull_bytes;
            }
            match &e.status {
                Status::Cached => s.cached += 1,
                Status::ToRun { reasons } => {
                    s.to_run += 1;
                    if e.status.is_forced() {
                        s.forced += 1;
                    }
                    let cats: BTreeSet<&'static str> = reasons.iter().map(Reason::category).collect();
                    for c in cats {
                        s.by_reason.entry(c).or_default().push(e.name.clone());
                    }
                }
            }
        }
        s
    }

    /// The plan as one JSON document keyed by stage name (the shape of `dvc status --json`).
    pub fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        for e in &self.entries {
            let mut v = serde_json::to_value(e).expect("plan entries serialize");
            if let Value::Object(o) = &mut v {
                o.remove("name");
            }
            m.insert(e.name.clone(), v);
        }
        Value::Object(m)
    }
}

/// Planning failed because the store could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    #[error("planning stage `{stage}`: {source}")]
    Cache {
        stage: String,
        #[source]
        source: CacheError,
    },
}

/// Plans `pipeline` against `store`. Reads only the index (and, with `verify`, cached blobs);
/// writes nothing except quarantining blobs that fail verification.
pub fn plan(pipeline: &Pipeline, store: &Store, opts: &PlanOptions) -> Result<Plan, PlanError> {
    let n = pipeline.len();
    let pos: BTreeMap<&str, usize> = pipeline.names().into_iter().enumerate().map(|(i, s)| (s, i)).collect();
    let mut known: Vec<Option<BTreeMap<String, OutputRef>>> = vec![None; n];
    let mut entries = Vec::with_capacity(n);
    let mut prefetched = vec![false; n];
    for p in 0..n {
        if opts.remote.is_some() && !prefetched[p] {
            prefetch(pipeline, store, opts, &pos, &known, p, &mut prefetched);
        }
        let (stage, inputs, outputs) = pipeline.at(p);
        let name = stage.name();
        let cache_err = |source| PlanError::Cache { stage: name.to_string(), source };
        let forced = opts.force.contains(name);
        let mut digests = BTreeMap::new();
        let mut upstream = BTreeSet::new();
        for input in inputs {
            match &known[pos[input.stage.as_str()]] {
                Some(outs) => {
                    let o = outs.get(&input.output).expect("a cached producer's record lists its declared outputs");
                    digests.insert(input.slot.clone(), o.digest);
                }
                None => {
                    upstream.insert(input.stage.clone());
                }
            }
        }
        let entry = if upstream.is_empty() {
            let material = key_material(stage.as_ref(), digests, &opts.env);
            let key = material.key();
            let mut remote = None;
            let status = match assess(store, name, &material, &key, outputs, forced, opts.verify).map_err(cache_err)? {
                Verdict::Hit(rec) => {
                    known[p] = Some(rec.outputs);
                    Status::Cached
                }
                Verdict::Run(reasons) => match remote_lookup(opts, store, &key, outputs, forced).map_err(cache_err)? {
                    Some(rec) => {
                        known[p] = Some(rec.outputs);
                        remote = Some(RemoteHit { pull: false, pull_bytes: 0, pull_blobs: 0 });
                        Status::Cached
                    }
                    None => Status::ToRun { reasons },
                },
            };
            PlanEntry {
                name: name.to_string(),
                id: stage.id(),
                key: Some(key),
                status,
                key_material: Some(material),
                remote,
            }
        } else {
            let mut reasons: Vec<Reason> = Vec::new();
            if forced {
                reasons.push(Reason::Forced);
            }
            reasons.extend(upstream.into_iter().map(|stage| Reason::Upstream { stage }));
            let partial = key_material(stage.as_ref(), BTreeMap::new(), &opts.env);
            match store.latest_record(name).map_err(cache_err)? {
                None => reasons.push(Reason::NeverRun),
                Some(rec) => reasons.extend(diff_record(&rec, &partial, false)),
            }
            PlanEntry {
                name: name.to_string(),
                id: stage.id(),
                key: None,
                status: Status::ToRun { reasons },
                key_material: None,
                remote: None,
            }
        };
        entries.push(entry);
    }
    // What the run will download for each remote hit.
    let cached: Vec<bool> = entries.iter().map(|e| e.status.is_cached()).collect();
    let pulls = remote_pulls(&pipeline.dense_deps(), &cached, opts.remote_download);
    for (p, e) in entries.iter_mut().enumerate() {
        if let Some(r) = &mut e.remote {
            r.pull = pulls[p];
            if r.pull {
                for o in known[p].iter().flat_map(|outs| outs.values()) {
                    if !store
                        .has_blob(&o.digest)
                        .map_err(|source| PlanError::Cache { stage: e.name.clone(), source })?
                    {
                        r.pull_bytes += o.size;
                        r.pull_blobs += 1;
                    }
                }
            }
        }
    }
    Ok(Plan { entries })
}

/// Fetches, in one parallel batch, the remote manifests of every stage from `from` on whose key
/// is computable now (all inputs known) and that the local cache cannot serve; marks them so the
/// next batch starts after the next undecided stage. Keeps a fully-remote plan to a few round
/// trips instead of one per stage.
fn prefetch(
    pipeline: &Pipeline,
    store: &Store,
    opts: &PlanOptions,
    pos: &BTreeMap<&str, usize>,
    known: &[Option<BTreeMap<String, OutputRef>>],
    from: usize,
    prefetched: &mut [bool],
) {
    let Some(remote) = &opts.remote else { return };
    let mut keys = Vec::new();
    for (q, done) in prefetched.iter_mut().enumerate().skip(from) {
        if *done || opts.force.contains(pipeline.at(q).0.name()) {
            continue;
        }
        let (stage, inputs, _) = pipeline.at(q);
        let mut digests = BTreeMap::new();
        let complete = inputs.iter().all(|i| match &known[pos[i.stage.as_str()]] {
            Some(outs) => outs.get(&i.output).map(|o| digests.insert(i.slot.clone(), o.digest)).is_some(),
            None => false,
        });
        if complete {
            *done = true;
            let key = key_material(stage.as_ref(), digests, &opts.env).key();
            if !store.is_complete(&key).unwrap_or(false) {
                keys.push(key);
            }
        }
    }
    remote.prefetch_manifests(&keys);
}

/// For each stage, whether a remote hit of it is pulled: its outputs are read by a stage that
/// must run, or it is a final stage under [`RemoteDownload::Toplevel`], or everything is wanted.
pub(crate) fn remote_pulls(deps: &[Vec<usize>], cached: &[bool], mode: RemoteDownload) -> Vec<bool> {
    let mut dependents = vec![Vec::new(); deps.len()];
    for (i, ds) in deps.iter().enumerate() {
        for &d in ds {
            dependents[d].push(i);
        }
    }
    (0..deps.len())
        .map(|i| match mode {
            RemoteDownload::All => true,
            RemoteDownload::Toplevel => dependents[i].is_empty() || dependents[i].iter().any(|&j| !cached[j]),
            RemoteDownload::Minimal => dependents[i].iter().any(|&j| !cached[j]),
        })
        .collect()
}

/// The remote's manifest for a key the local cache cannot serve, when it provides every
/// declared output. Remote trouble is a miss (with a warning through the remote's sink), never
/// a planning error: the cache must not break the build. A local record for the key whose blobs
/// are gone is only completed from the remote when both agree on the outputs.
pub(crate) fn remote_lookup(
    opts: &PlanOptions,
    store: &Store,
    key: &StageKey,
    outputs: &[String],
    forced: bool,
) -> Result<Option<StageRecord>, CacheError> {
    let Some(remote) = &opts.remote else { return Ok(None) };
    if forced || remote.is_unavailable() {
        return Ok(None);
    }
    let rec = match remote.get_manifest(key) {
        Ok(Some(rec)) => rec,
        Ok(None) => return Ok(None),
        Err(e @ RemoteError::Invalid { .. }) => {
            remote.warn(&e.to_string());
            return Ok(None);
        }
        Err(e) => {
            if remote.mark_unavailable() {
                remote.warn(&format!("{e}; continuing without the remote cache"));
            }
            return Ok(None);
        }
    };
    if outputs.iter().any(|o| !rec.outputs.contains_key(o)) {
        return Ok(None);
    }
    if let Some(local) = store.get_record(key)? {
        if local.outputs != rec.outputs {
            return Ok(None);
        }
    }
    Ok(Some(rec))
}

fn human_bytes(b: u64) -> String {
    wdro_cache::maint::human(b)
}

/// The key material of a stage given its input digests. The environment enters only for stages
/// that use torch: CPU-only I/O stages give the same bytes whatever libtorch is installed.
pub(crate) fn key_material(stage: &dyn Stage, inputs: BTreeMap<String, Digest>, env: &Env) -> KeyMaterial {
    KeyMaterial {
        id: stage.id(),
        version: stage.version(),
        params: stage.params(),
        inputs,
        env: if stage.uses_torch() { env.to_map() } else { BTreeMap::new() },
    }
}

/// The decision for a stage whose key is known.
pub(crate) enum Verdict {
    Hit(Box<StageRecord>),
    Run(Vec<Reason>),
}

/// Decides hit or run for a known key; shared by the planner and the executor so that
/// `wdro why` and `wdro run` can never disagree.
pub(crate) fn assess(
    store: &Store,
    name: &str,
    material: &KeyMaterial,
    key: &StageKey,
    outputs: &[String],
    forced: bool,
    verify: bool,
) -> Result<Verdict, CacheError> {
    let mut reasons = Vec::new();
    if forced {
        reasons.push(Reason::Forced);
    }
    if let Some(rec) = store.get_record(key)? {
        let missing = missing_outputs(store, &rec, outputs, verify)?;
        if missing.is_empty() && store.is_complete(key)? {
            if forced {
                return Ok(Verdict::Run(reasons));
            }
            return Ok(Verdict::Hit(Box::new(rec)));
        }
        reasons.push(Reason::OutputsMissing { outputs: missing });
        return Ok(Verdict::Run(reasons));
    }
    match store.latest_record(name)? {
        None => reasons.push(Reason::NeverRun),
        Some(rec) => {
            let diffs = diff_record(&rec, material, true);
            if diffs.is_empty() {
                reasons.push(Reason::NotInCache { key: *key });
            }
            reasons.extend(diffs);
        }
    }
    Ok(Verdict::Run(reasons))
}

/// Declared outputs the record cannot provide. With `verify`, each blob is read and hashed; a
/// corrupt one is quarantined by the store and reported here instead of failing the plan.
fn missing_outputs(
    store: &Store,
    rec: &StageRecord,
    outputs: &[String],
    verify: bool,
) -> Result<Vec<MissingOutput>, CacheError> {
    let mut missing = Vec::new();
    for name in outputs {
        let Some(o) = rec.outputs.get(name) else {
            missing.push(MissingOutput { output: name.clone(), digest: None });
            continue;
        };
        let present = if verify {
            match store.get_bytes(&o.digest) {
                Ok(_) => true,
                Err(CacheError::Corrupt { .. } | CacheError::MissingBlob(_) | CacheError::Io { .. }) => false,
                Err(e) => return Err(e),
            }
        } else {
            store.has_blob(&o.digest)?
        };
        if !present {
            missing.push(MissingOutput { output: name.clone(), digest: Some(o.digest) });
        }
    }
    Ok(missing)
}

/// Field-by-field differences between a stored record and new key material. With
/// `compare_inputs` false (inputs not yet known) input slots are not compared.
pub(crate) fn diff_record(rec: &StageRecord, new: &KeyMaterial, compare_inputs: bool) -> Vec<Reason> {
    let mut out = Vec::new();
    if rec.stage_id != new.id.0 {
        out.push(Reason::KindChanged { old: rec.stage_id.clone(), new: new.id.0.clone() });
    }
    if rec.version != new.version {
        out.push(Reason::VersionChanged { old: rec.version, new: new.version });
    }
    let empty = serde_json::Map::new();
    let new_params = new.params.to_value();
    let old_obj = rec.params.as_object().unwrap_or(&empty);
    let new_obj = new_params.as_object().unwrap_or(&empty);
    diff_objects("", old_obj, new_obj, &mut out);
    let env_fields: BTreeSet<&String> = rec.env.keys().chain(new.env.keys()).collect();
    for f in env_fields {
        let (o, n) = (rec.env.get(f), new.env.get(f));
        if o != n {
            out.push(Reason::EnvChanged { field: f.clone(), old: o.cloned(), new: n.cloned() });
        }
    }
    if compare_inputs {
        let slots: BTreeSet<&String> = rec.inputs.keys().chain(new.inputs.keys()).collect();
        for s in slots {
            let (o, n) = (rec.inputs.get(s), new.inputs.get(s));
            if o != n {
                out.push(Reason::InputChanged { slot: s.clone(), old_digest: o.copied(), new_digest: n.copied() });
            }
        }
    }
    out
}

fn diff_objects(
    prefix: &str,
    old: &serde_json::Map<String, Value>,
    new: &serde_json::Map<String, Value>,
    out: &mut Vec<Reason>,
) {
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for k in keys {
        let field = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match (old.get(k), new.get(k)) {
            (Some(Value::Object(a)), Some(Value::Object(b))) => diff_objects(&field, a, b, out),
            (a, b) if a != b => out.push(Reason::ParamChanged { field, old: a.cloned(), new: b.cloned() }),
            _ => {}
        }
    }
}

/// The text of `wdro why STAGE`: the status line, then one indented line per reason.
pub fn explain(plan: &Plan, name: &str) -> String {
    let Some(e) = plan.entry(name) else {
        return format!("no stage named `{name}` in the pipeline; `wdro dag` lists the stage names");
    };
    match (&e.status, &e.key) {
        (Status::Cached, Some(k)) => {
            format!("{name}: cached [key {}]\n  up to date: a complete record exists for this key", k.short())
        }
        (Status::Cached, None) => format!("{name}: cached"),
        (Status::ToRun { reasons }, key) => {
            let ups: Vec<&str> = reasons
                .iter()
                .filter_map(|r| match r {
                    Reason::Upstream { stage } => Some(stage.as_str()),
                    _ => None,
                })
                .collect();
            let mut s = match key {
                Some(k) => format!("{name}: will run [key {}]", k.short()),
                None => format!("{name}: will run (key unknown until {} finishes)", ups.join(", ")),
            };
            for r in reasons {
                s.push_str("\n  ");
                s.push_str(&r.describe(name));
            }
            if key.is_none() {
                s.push_str(&format!(
                    "\n  ({name} may still be a cache hit if {} reproduces identical outputs)",
                    ups.join(", ")
                ));
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::testing::{env, open_store, FakeStage};
    use crate::exec::{execute, ExecOptions, NullObserver};

    fn chain(lr: f64, depth: u32) -> Pipeline {
        Pipeline::new(vec![
            FakeStage::new("fetch").param("url", "http://x").build(),
            FakeStage::new("finetune")
                .param("lr", lr)
                .param("arch", serde_json::json!({"depth": depth, "width": 2}))
                .exec_param("batch", 64)
                .input("data", "fetch", "out")
                .build(),
            FakeStage::new("eval").input("model", "finetune", "out").input("data", "fetch", "out").build(),
        ])
        .unwrap()
    }

    fn run(p: &Pipeline, store: &Store) {
        execute(p, store, &ExecOptions::new(env(), "test"), &NullObserver).unwrap();
    }

    #[test]
    fn fresh_store_plans_every_stage_never_run() {
        let (_d, store) = open_store();
        let plan = plan(&chain(0.01, 18), &store, &PlanOptions::new(env())).unwrap();
        let statuses: Vec<_> = plan.entries().iter().map(|e| (e.name.as_str(), e.status.clone())).collect();
        assert_eq!(statuses[0], ("fetch", Status::ToRun { reasons: vec![Reason::NeverRun] }));
        assert_eq!(
            statuses[1],
            ("finetune", Status::ToRun { reasons: vec![Reason::Upstream { stage: "fetch".into() }, Reason::NeverRun] })
        );
        assert!(plan.entries()[0].key.is_some());
        assert!(plan.entries()[1].key.is_none());
        assert_eq!(plan.summary().to_run, 3);
        assert!(explain(&plan, "finetune").starts_with("finetune: will run (key unknown until fetch finishes)\n"));
    }

    #[test]
    fn run_then_plan_is_all_cached() {
        let (_d, store) = open_store();
        let p = chain(0.01, 18);
        run(&p, &store);
        let plan = plan(&p, &store, &PlanOptions::new(env())).unwrap();
        assert!(plan.is_up_to_date(), "{:?}", plan);
        assert!(plan.entries().iter().all(|e| e.key.is_some() && e.key_material.is_some()));
        assert_eq!(plan.summary().to_string(), "3 stages: all cached, up to date");
        assert!(explain(&plan, "eval").starts_with("eval: cached [key "));
    }

    #[test]
    fn param_change_names_field_and_downstream_is_upstream() {
        let (_d, store) = open_store();
        run(&chain(0.01, 18), &store);
        let plan = plan(&chain(0.02, 34), &store, &PlanOptions::new(env())).unwrap();
        assert_eq!(plan.entry("fetch").unwrap().status, Status::Cached);
        assert_eq!(
            plan.entry("finetune").unwrap().status.reasons(),
            [
                Reason::ParamChanged {
                    field: "arch.depth".into(),
                    old: Some(serde_json::json!(18)),
                    new: Some(serde_json::json!(34))
                },
                Reason::ParamChanged {
                    field: "lr".into(),
                    old: Some(serde_json::json!(0.01)),
                    new: Some(serde_json::json!(0.02))
                },
            ]
        );
        assert_eq!(plan.entry("eval").unwrap().status.reasons(), [Reason::Upstream { stage: "finetune".into() }]);
        assert_eq!(
            explain(&plan, "finetune").lines().skip(1).collect::<Vec<_>>(),
            ["  param finetune.arch.depth: 18 → 34", "  param finetune.lr: 0.01 → 0.02"]
        );
        let summary = plan.summary().to_string();
        assert_eq!(
            summary,
            "3 stages: 1 cached, 2 to run\nReasons:\n  params changed: finetune\n  upstream will run: eval"
        );
        let json = plan.to_json();
        assert_eq!(json["finetune"]["status"], "to_run");
        assert_eq!(json["finetune"]["reasons"][1]["reason"], "param_changed");
        assert_eq!(json["finetune"]["reasons"][1]["field"], "lr");
        assert_eq!(json["eval"]["key"], Value::Null);
    }

    #[test]
    fn exec_param_change_reruns_nothing() {
        let (_d, store) = open_store();
        run(&chain(0.01, 18), &store);
        let p = Pipeline::new(vec![
            FakeStage::new("fetch").param("url", "http://x").exec_param("threads", 8).build(),
            FakeStage::new("finetune")
                .param("lr", 0.01)
                .param("arch", serde_json::json!({"width": 2, "depth": 18}))
                .exec_param("batch", 512)
                .input("data", "fetch", "out")
                .build(),
            FakeStage::new("eval").input("model", "finetune", "out").input("data", "fetch", "out").build(),
        ])
        .unwrap();
        assert!(plan(&p, &store, &PlanOptions::new(env())).unwrap().is_up_to_date());
        let report = execute(&p, &store, &ExecOptions::new(env(), "test"), &NullObserver).unwrap();
        assert_eq!(report.computed(), 0);
    }

    #[test]
    fn version_env_and_force_reasons() {
        let (_d, store) = open_store();
        let torch = |v: u32| FakeStage::new("train").version(v).torch().build();
        run(&Pipeline::new(vec![torch(1), FakeStage::new("io").build()]).unwrap(), &store);
        let mut opts = PlanOptions::new(Env { torch_version: "2.5.0".into(), device_class: "cpu".into() });
        opts.force.insert("io".into());
        let plan = plan(&Pipeline::new(vec![torch(2), FakeStage::new("io").build()]).unwrap(), &store, &opts).unwrap();
        assert_eq!(
            plan.entry("train").unwrap().status.reasons(),
            [
                Reason::VersionChanged { old: 1, new: 2 },
                Reason::EnvChanged {
                    field: "torch_version".into(),
                    old: Some("2.4.0".into()),
                    new: Some("2.5.0".into())
                },
            ]
        );
        // The env is not part of an I/O stage's key: only --force reruns it.
        assert_eq!(plan.entry("io").unwrap().status.reasons(), [Reason::Forced]);
        assert!(plan.entry("io").unwrap().status.is_forced());
        assert_eq!(
            explain(&plan, "train").lines().nth(1).unwrap(),
            "  version 1 → 2 (the stage's implementation changed)"
        );
    }

    #[test]
    fn missing_blob_is_outputs_missing() {
        let (_d, store) = open_store();
        let p = chain(0.01, 18);
        run(&p, &store);
        let rec = store.latest_record("finetune").unwrap().unwrap();
        let d = rec.outputs["out"].digest;
        let bytes = store.get_bytes(&d).unwrap();
        // What `get_bytes` does to a blob whose bytes no longer match: move it out of the index.
        store.quarantine(&d, &bytes).unwrap();
        let plan = plan(&p, &store, &PlanOptions::new(env())).unwrap();
        assert_eq!(
            plan.entry("finetune").unwrap().status.reasons(),
            [Reason::OutputsMissing { outputs: vec![MissingOutput { output: "out".into(), digest: Some(d) }] }]
        );
        // Its key is still known, so eval's key is unknown (finetune must run first).
        assert_eq!(plan.entry("eval").unwrap().status.reasons(), [Reason::Upstream { stage: "finetune".into() }]);
        // Recomputing reproduces the same bytes, so eval is a hit (early cutoff).
        let report = execute(&p, &store, &ExecOptions::new(env(), "test"), &NullObserver).unwrap();
        let computed: Vec<_> =
            report.stages.iter().filter(|s| s.outcome.is_computed()).map(|s| s.name.as_str()).collect();
        assert_eq!(computed, ["finetune"]);
        assert!(store.has_blob(&d).unwrap());
    }

    #[test]
    fn unknown_stage_in_explain() {
        let plan = Plan::default();
        assert_eq!(explain(&plan, "x"), "no stage named `x` in the pipeline; `wdro dag` lists the stage names");
    }
}
