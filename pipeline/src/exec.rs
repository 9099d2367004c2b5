//! Execution: run what the plan says must run, in parallel, and ingest the results.
//!
//! Scheduling is a ready queue with in-degree counters, driven by one dispatcher on the calling
//! thread; stages run as jobs on a dedicated rayon pool (`rayon::ThreadPool::in_place_scope`), so
//! a stage starts as soon as all its inputs are done. The pool is private to the run so that
//! stages blocked on a worker process never starve, or are starved by, other rayon users (the
//! global pool hashes blobs). Stages with `resources().worker` are additionally capped at
//! [`ExecOptions::max_workers`]: a torch worker uses every core, so two at once only thrash.
//!
//! Each job decides hit or run only when it starts, from its inputs' actual digests. That gives
//! **early cutoff**: when an upstream reruns and reproduces identical bytes, the downstream key
//! is unchanged and it is a hit. A hit whose outputs are about to be read by a stage that runs is
//! verified first (blobs hashed), so a corrupt blob is recomputed instead of failing its reader.
//!
//! Jobs talk to the dispatcher over a channel (started, progress, done). All [`Observer`] calls
//! therefore happen on the calling thread, in a well-defined order, and the observer does not
//! need to be `Sync`. On a stage failure no new stage starts; running ones finish and their
//! results are stored, so nothing computed is lost. A [`RunRecord`] is written either way, so
//! `gc` keeps what the run produced.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use wdro_cache::{
    CacheError, Digest, Lease, Leased, ManifestPut, OutputRef, PushSummary, RunRecord, StageKey, StageRecord, Store,
};

use crate::graph::{GraphError, Pipeline};
use crate::plan::{
    assess, key_material, plan, remote_lookup, remote_pulls, Plan, PlanError, PlanOptions, Reason, Verdict,
};
use crate::stage::{InputRef, ProgressEvent, Stage, StageCtx};

/// How to run a pipeline.
#[derive(Clone, Debug)]
pub struct ExecOptions {
    /// Environment, `--force` and `--verify`; the same options `wdro status` plans with.
    pub plan: PlanOptions,
    /// Run only this stage and its ancestors (`--until`).
    pub until: Option<String>,
    /// Stages with `resources().worker` running at once. 0 is treated as 1.
    pub max_workers: usize,
    /// Threads for stage jobs (in-process stages run up to this many at once).
    pub jobs: usize,
    /// Recorded in every stage record, for provenance.
    pub wdro_version: String,
    /// Digest of the config text the pipeline was built from, recorded in the run record.
    pub config_digest: Digest,
}

impl ExecOptions {
    /// One worker at a time (torch already uses all cores), one job thread per core (at least
    /// two, so a stage waiting on a worker process does not stall in-process stages).
    pub fn new(env: crate::key::Env, wdro_version: impl Into<String>) -> ExecOptions {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        ExecOptions {
            plan: PlanOptions::new(env),
            until: None,
            max_workers: 1,
            jobs: cores.max(2),
            wdro_version: wdro_version.into(),
            config_digest: Digest::of_bytes(b""),
        }
    }
}

/// What happened to one stage in a run.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// A complete record for its key was already in the cache.
    Hit,
    /// It ran and its outputs were stored.
    Computed,
    /// It ran and failed; nothing was stored for it.
    Failed { message: String },
    /// It never started because another stage failed.
    NotRun,
}

impl Outcome {
    pub fn is_hit(&self) -> bool {
        matches!(self, Outcome::Hit)
    }
    pub fn is_computed(&self) -> bool {
        matches!(self, Outcome::Computed)
    }
}

/// One stage's line in a [`RunReport`].
#[derive(Clone, Debug, Serialize)]
pub struct StageReport {
    pub name: String,
    /// `None` only for stages that never started.
    pub key: Option<StageKey>,
    #[serde(flatten)]
    pub outcome: Outcome,
    #[serde(rename = "duration_ms", serialize_with = "ser_ms")]
    pub duration: Duration,
    /// Why it ran (at run time, with the key known); the plan's reasons for stages not run.
    pub reasons: Vec<Reason>,
    /// Set for a hit served by the remote cache: the bytes pulled for it (0 when its outputs
    /// were not needed locally).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_pulled_bytes: Option<u64>,
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// The result of [`execute`], stages in topological order.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub run_id: String,
    pub stages: Vec<StageReport>,
    #[serde(rename = "elapsed_ms", serialize_with = "ser_ms")]
    pub elapsed: Duration,
    /// Transfers with the remote cache, when one was configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteRunStats>,
}

/// What a run moved to and from the remote cache.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RemoteRunStats {
    pub pulled_blobs: u64,
    pub pulled_bytes: u64,
    pub pushed_stages: usize,
    pub pushed_blobs: u64,
    pub pushed_bytes: u64,
    /// Stage names whose result differs from the one already on the remote (nondeterminism).
    pub conflicts: Vec<String>,
    /// `(stage, error)` of pushes that failed; the local results are unaffected.
    pub push_failures: Vec<(String, String)>,
}

impl RunReport {
    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.stages.iter().filter(|s| f(&s.outcome)).count()
    }
    pub fn hits(&self) -> usize {
        self.count(Outcome::is_hit)
    }
    /// Hits served by the remote cache.
    pub fn remote_hits(&self) -> usize {
        self.stages.iter().filter(|s| s.remote_pulled_bytes.is_some()).count()
    }
    pub fn computed(&self) -> usize {
        self.count(Outcome::is_computed)
    }
    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Failed { .. }))
    }
    pub fn not_run(&self) -> usize {
        self.count(|o| matches!(o, Outcome::NotRun))
    }

    pub fn stage(&self, name: &str) -> Option<&StageReport> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Bazel-style: `6 stages: 4 cache hit, 2 executed` (plus failed / not run when non-zero).
    pub fn summary_line(&self) -> String {
        let n = self.stages.len();
        let remote = match self.remote_hits() {
            0 => String::new(),
            r => format!(" ({r} remote)"),
        };
        let mut s = format!(
            "{n} {}: {} cache hit{remote}, {} executed",
            if n == 1 { "stage" } else { "stages" },
            self.hits(),
            self.computed()
        );
        if self.failed() > 0 {
            s.push_str(&format!(", {} failed", self.failed()));
        }
        if self.not_run() > 0 {
            s.push_str(&format!(", {} not run", self.not_run()));
        }
        s
    }

    /// Names of computed stages grouped by reason category (Snakemake's "Reasons:" block).
    pub fn reasons_by_category(&self) -> BTreeMap<&'static str, Vec<String>> {
        let mut m: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
        for s in self.stages.iter().filter(|s| s.outcome.is_computed()) {
            let cats: BTreeSet<&'static str> = s.reasons.iter().map(Reason::category).collect();
            for c in cats {
                m.entry(c).or_default().push(s.name.clone());
            }
        }
        m
    }
}

/// Why a run did not complete. One line each.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("cannot start {jobs} stage threads ({source}); lower --jobs")]
    Pool {
        jobs: usize,
        #[source]
        source: rayon::ThreadPoolBuildError,
    },
    #[error("recording run {run_id} in the cache: {source}")]
    RecordRun {
        run_id: String,
        #[source]
        source: CacheError,
    },
    #[error("stage `{stage}` failed: {message}{}", if others.is_empty() { String::new() } else { format!(" (also failed: {})", others.join(", ")) })]
    StageFailed {
        stage: String,
        message: String,
        /// Other stages that failed in the same run.
        others: Vec<String>,
        /// What every stage did; completed stages are in the cache.
        report: Box<RunReport>,
    },
}

/// Receives run events. All calls come from the thread that called [`execute`], in order.
pub trait Observer {
    /// Once, before any stage starts.
    fn planned(&self, _plan: &Plan) {}
    /// A stage is about to run (not sent for cache hits), with why.
    fn stage_started(&self, _stage: &str, _key: &StageKey, _reasons: &[Reason]) {}
    fn progress(&self, _stage: &str, _done: u64, _total: u64, _message: &str) {}
    /// A stage finished: `hit` from the cache, or computed and stored.
    fn stage_finished(&self, _stage: &str, _hit: bool, _duration: Duration, _key: &StageKey) {}
    fn stage_failed(&self, _stage: &str, _message: &str) {}
    /// A stage waits for another machine's lease on its key (`holder` describes it); sent when
    /// the wait starts and when the holder changes. It then finishes as a remote hit or runs.
    fn stage_waiting(&self, _stage: &str, _key: &StageKey, _holder: &str) {}
    /// A stage was served by the remote cache, `pulled_bytes` downloaded for it (0 when its
    /// outputs are not needed locally). Defaults to a plain hit.
    fn stage_remote_hit(&self, stage: &str, duration: Duration, key: &StageKey, _pulled_bytes: u64) {
        self.stage_finished(stage, true, duration, key)
    }
    /// Once, after the run waited for its background pushes to the remote cache.
    fn remote_pushed(&self, _summary: &PushSummary) {}
    /// Once, at the end, also after a failure.
    fn summary(&self, _report: &RunReport) {}
}

/// An observer that ignores everything (library use, tests).
pub struct NullObserver;
impl Observer for NullObserver {}

/// The plan `execute` would follow, without running anything (`--dry-run`).
pub fn dry_run(pipeline: &Pipeline, store: &Store, opts: &ExecOptions) -> Result<Plan, ExecError> {
    let sub;
    let pipeline = match &opts.until {
        Some(u) => {
            sub = pipeline.subgraph_until(u)?;
            &sub
        }
        None => pipeline,
    };
    Ok(plan(pipeline, store, &opts.plan)?)
}

enum Msg {
    Started { pos: usize, key: StageKey, reasons: Vec<Reason> },
    Progress { pos: usize, ev: ProgressEvent },
    Waiting { pos: usize, key: StageKey, holder: String },
    Done { pos: usize, done: JobDone },
}

struct JobDone {
    key: Option<StageKey>,
    duration: Duration,
    result: Result<JobOk, String>,
    reasons: Vec<Reason>,
}

struct JobOk {
    hit: bool,
    outputs: BTreeMap<String, OutputRef>,
    /// A remote hit: the bytes pulled for it.
    remote: Option<u64>,
}

/// Runs `pipeline` (or its `--until` subgraph) against `store`. See the module docs.
pub fn execute(
    pipeline: &Pipeline,
    store: &Store,
    opts: &ExecOptions,
    observer: &dyn Observer,
) -> Result<RunReport, ExecError> {
    let t0 = Instant::now();
    let started_at = SystemTime::now();
    let sub;
    let pipeline = match &opts.until {
        Some(u) => {
            sub = pipeline.subgraph_until(u)?;
            &sub
        }
        None => pipeline,
    };
    let plan = plan(pipeline, store, &opts.plan)?;
    observer.planned(&plan);

    let n = pipeline.len();
    let deps = pipeline.dense_deps();
    let mut dependents = vec![Vec::new(); n];
    for (i, ds) in deps.iter().enumerate() {
        for &d in ds {
            dependents[d].push(i);
        }
    }
    let entries = plan.entries();
    // Verify a hit's blobs when a stage expected to run will read them.
    let verify: Vec<bool> =
        (0..n).map(|i| opts.plan.verify || dependents[i].iter().any(|&j| !entries[j].status.is_cached())).collect();
    let is_worker: Vec<bool> = (0..n).map(|i| pipeline.at(i).0.resources().worker).collect();
    let cached: Vec<bool> = entries.iter().map(|e| e.status.is_cached()).collect();
    let pulls = remote_pulls(&deps, &cached, opts.plan.remote_download);
    let stats0 = opts.plan.remote.as_ref().map(|r| r.stats());
    let max_workers = opts.max_workers.max(1);
    let jobs = opts.jobs.max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(jobs)
        .thread_name(|i| format!("wdro-stage-{i}"))
        .build()
        .map_err(|source| ExecError::Pool { jobs, source })?;

    let mut remaining: Vec<usize> = deps.iter().map(Vec::len).collect();
    let mut ready: BTreeSet<usize> = (0..n).filter(|&i| remaining[i] == 0).collect();
    let mut outputs: Vec<Option<BTreeMap<String, OutputRef>>> = vec![None; n];
    let mut reports: Vec<Option<StageReport>> = vec![None; n];
    let mut failures: Vec<(String, String)> = Vec::new();
    let mut remote_pulled: Vec<Option<u64>> = vec![None; n];
    let (mut running, mut running_workers) = (0usize, 0usize);
    let (tx, rx) = mpsc::channel::<Msg>();

    pool.in_place_scope(|scope| loop {
        if failures.is_empty() {
            for pos in ready.clone() {
                if is_worker[pos] {
                    if running_workers >= max_workers {
                        continue;
                    }
                    running_workers += 1;
                }
                ready.remove(&pos);
                running += 1;
                let (stage, inputs, outs) = pipeline.at(pos);
                let job = Job {
                    pos,
                    stage: stage.as_ref(),
                    inputs: resolve_inputs(pipeline, inputs, &outputs),
                    outputs: outs,
                    forced: opts.plan.force.contains(stage.name()),
                    verify: verify[pos],
                    pull: pulls[pos],
                    store,
                    opts,
                    tx: tx.clone(),
                };
                scope.spawn(move |_| job.run());
            }
        }
        if running == 0 {
            break;
        }
        match rx.recv().expect("the dispatcher holds a sender, so the channel stays open") {
            Msg::Started { pos, key, reasons } => observer.stage_started(pipeline.at(pos).0.name(), &key, &reasons),
            Msg::Waiting { pos, key, holder } => observer.stage_waiting(pipeline.at(pos).0.name(), &key, &holder),
            Msg::Progress { pos, ev } => {
                if reports[pos].is_none() {
                    observer.progress(pipeline.at(pos).0.name(), ev.done, ev.total, &ev.message)
                }
            }
            Msg::Done { pos, done } => {
                running -= 1;
                if is_worker[pos] {
                    running_workers -= 1;
                }
                let name = pipeline.at(pos).0.name().to_string();
                let outcome = match done.result {
                    Ok(ok) => {
                        let key = done.key.expect("a finished stage has a key");
                        match ok.remote {
                            Some(n) => observer.stage_remote_hit(&name, done.duration, &key, n),
                            None => observer.stage_finished(&name, ok.hit, done.duration, &key),
                        }
                        remote_pulled[pos] = ok.remote;
                        outputs[pos] = Some(ok.outputs);
                        for &j in &dependents[pos] {
                            remaining[j] -= 1;
                            if remaining[j] == 0 {
                                ready.insert(j);
                            }
                        }
                        if ok.hit {
                            Outcome::Hit
                        } else {
                            Outcome::Computed
                        }
                    }
                    Err(message) => {
                        observer.stage_failed(&name, &message);
                        failures.push((name.clone(), message.clone()));
                        Outcome::Failed { message }
                    }
                };
                reports[pos] = Some(StageReport {
                    name,
                    key: done.key,
                    outcome,
                    duration: done.duration,
                    reasons: done.reasons,
                    remote_pulled_bytes: remote_pulled[pos],
                });
            }
        }
    });

    let stages: Vec<StageReport> = reports
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|| StageReport {
                name: entries[i].name.clone(),
                key: entries[i].key,
                outcome: Outcome::NotRun,
                duration: Duration::ZERO,
                reasons: entries[i].status.reasons().to_vec(),
                remote_pulled_bytes: None,
            })
        })
        .collect();
    let run_id = run_id(started_at);
    let record = RunRecord {
        id: run_id.clone(),
        started_at: started_at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        config_digest: opts.config_digest,
        stages: stages
            .iter()
            .filter(|s| matches!(s.outcome, Outcome::Hit | Outcome::Computed))
            .filter_map(|s| s.key.map(|k| (s.name.clone(), k)))
            .collect(),
        computed: stages.iter().filter(|s| s.outcome.is_computed()).map(|s| s.name.clone()).collect(),
        pinned_as: None,
    };
    let recorded = store.put_run(&record);
    let remote = finish_remote(opts, &record, stats0, observer);
    let report = RunReport { run_id: run_id.clone(), stages, elapsed: t0.elapsed(), remote };
    observer.summary(&report);
    if let Some(((stage, message), rest)) = failures.split_first() {
        return Err(ExecError::StageFailed {
            stage: stage.clone(),
            message: message.clone(),
            others: rest.iter().map(|(s, _)| s.clone()).collect(),
            report: Box::new(report),
        });
    }
    recorded.map_err(|source| ExecError::RecordRun { run_id, source })?;
    Ok(report)
}

/// Waits for the run's background pushes, pushes the run record when the run pushed anything
/// (so the remote's gc sees what it uses), and reports the run's transfers.
fn finish_remote(
    opts: &ExecOptions,
    record: &RunRecord,
    stats0: Option<wdro_cache::TransferStats>,
    observer: &dyn Observer,
) -> Option<RemoteRunStats> {
    let remote = opts.plan.remote.as_ref()?;
    let pushes = remote.wait_pushes();
    if !pushes.pushed.is_empty() || !pushes.failed.is_empty() {
        observer.remote_pushed(&pushes);
    }
    for p in pushes.conflicts() {
        remote.warn(&format!(
            "nondeterminism: stage {} [key {}] produced outputs that differ from the result already on {}; the remote keeps the first result (ours is logged under conflicts/)",
            p.stage_name,
            p.key.short(),
            remote.display()
        ));
    }
    for (stage, e) in &pushes.failed {
        remote.warn(&format!("pushing {stage} failed: {e}"));
    }
    if !pushes.pushed.is_empty() && !remote.is_read_only() {
        if let Err(e) = remote.put_run(record) {
            remote.warn(&format!("pushing run record {}: {e}", record.id));
        }
    }
    let now = remote.stats();
    let before = stats0.unwrap_or_default();
    Some(RemoteRunStats {
        pulled_blobs: now.pulled_blobs - before.pulled_blobs,
        pulled_bytes: now.pulled_bytes - before.pulled_bytes,
        pushed_stages: pushes.pushed.iter().filter(|p| p.manifest == ManifestPut::Created).count(),
        pushed_blobs: pushes.blobs_uploaded(),
        pushed_bytes: pushes.bytes_uploaded(),
        conflicts: pushes.conflicts().map(|p| p.stage_name.clone()).collect(),
        push_failures: pushes.failed,
    })
}

/// Slot → the producer's output ref, for a stage whose producers have all finished.
fn resolve_inputs(
    pipeline: &Pipeline,
    inputs: &[InputRef],
    outputs: &[Option<BTreeMap<String, OutputRef>>],
) -> BTreeMap<String, (InputRef, OutputRef)> {
    inputs
        .iter()
        .map(|i| {
            let p = pipeline.position(&i.stage).expect("validated input names a stage");
            let o = outputs[p].as_ref().expect("a ready stage's producers have finished")[&i.output].clone();
            (i.slot.clone(), (i.clone(), o))
        })
        .collect()
}

/// One stage's work, run on a pool thread. Always sends exactly one `Done`.
struct Job<'a> {
    pos: usize,
    stage: &'a dyn Stage,
    inputs: BTreeMap<String, (InputRef, OutputRef)>,
    outputs: &'a [String],
    forced: bool,
    verify: bool,
    /// Pull this stage's outputs when it is a remote hit (see `plan::remote_pulls`).
    pull: bool,
    store: &'a Store,
    opts: &'a ExecOptions,
    tx: mpsc::Sender<Msg>,
}

impl Job<'_> {
    fn run(self) {
        let t = Instant::now();
        let mut key = None;
        let mut reasons = Vec::new();
        let result = catch_unwind(AssertUnwindSafe(|| self.decide_and_run(&mut key, &mut reasons)))
            .unwrap_or_else(|p| Err(format!("panicked: {}; this is a bug in the stage", panic_text(&p))));
        let done = JobDone { key, duration: t.elapsed(), result, reasons };
        let _ = self.tx.send(Msg::Done { pos: self.pos, done });
    }

    fn decide_and_run(&self, key_out: &mut Option<StageKey>, reasons_out: &mut Vec<Reason>) -> Result<JobOk, String> {
        let t = Instant::now();
        let name = self.stage.name();
        let digests = self.inputs.iter().map(|(s, (_, o))| (s.clone(), o.digest)).collect();
        let material = key_material(self.stage, digests, &self.opts.plan.env);
        let key = material.key();
        *key_out = Some(key);
        let cache = |e: CacheError| format!("cache error: {e}");
        let reasons = match assess(self.store, name, &material, &key, self.outputs, self.forced, self.verify)
            .map_err(cache)?
        {
            Verdict::Hit(rec) => {
                // Keep "latest" pointing at what this stage last used, so `why` diffs against it.
                // Records shared with another stage name are left as they are.
                if rec.stage_name == name && self.store.latest_record(name).map_err(cache)?.map(|r| r.key) != Some(key)
                {
                    self.store.put_record(&rec).map_err(cache)?;
                }
                return Ok(JobOk { hit: true, outputs: rec.outputs, remote: None });
            }
            Verdict::Run(reasons) => reasons,
        };
        let mut reasons = reasons;
        if let Some(remote) = &self.opts.plan.remote {
            if let Some(rec) =
                remote_lookup(&self.opts.plan, self.store, &key, self.outputs, self.forced).map_err(cache)?
            {
                if !self.pull {
                    return Ok(JobOk { hit: true, outputs: rec.outputs, remote: Some(0) });
                }
                match remote.pull_stage(self.store, &rec, None) {
                    Ok(n) => return Ok(JobOk { hit: true, outputs: rec.outputs, remote: Some(n) }),
                    Err(e) => {
                        // Refused (corrupt, truncated, missing) or unreachable: recompute.
                        remote.forget_manifest(&key);
                        remote.warn(&format!("stage {name}: {e}; recomputing it"));
                        reasons.push(Reason::RemoteRefused { error: e.to_string() });
                    }
                }
            }
        }
        let lease = match self.lease(&key, &mut reasons) {
            LeaseStep::Compute(l) => l,
            LeaseStep::Hit(ok) => return Ok(ok),
        };
        *reasons_out = reasons.clone();
        let _ = self.tx.send(Msg::Started { pos: self.pos, key, reasons });

        let root = self.store.root();
        let work_parent = root.join("work");
        std::fs::create_dir_all(&work_parent).map_err(|e| io_msg(&work_parent, e))?;
        let work = tempfile::Builder::new()
            .prefix(&format!("{}-", file_safe(name)))
            .tempdir_in(&work_parent)
            .map_err(|e| io_msg(&work_parent, e))?;
        let (in_dir, out_dir) = (work.path().join("in"), work.path().join("out"));
        let scratch_dir = root.join("scratch").join(key.to_string());
        for d in [&in_dir, &out_dir, &scratch_dir] {
            std::fs::create_dir_all(d).map_err(|e| io_msg(d, e))?;
        }
        let mut ctx_inputs = BTreeMap::new();
        for (slot, (input, o)) in &self.inputs {
            let ext = if o.kind.is_empty() || o.kind == "bytes" { String::new() } else { format!(".{}", o.kind) };
            let path = in_dir.join(format!("{}{ext}", file_safe(slot)));
            if let Some(remote) = &self.opts.plan.remote {
                // Lazily pull an input a remote hit upstream did not download.
                if !self.store.has_blob(&o.digest).map_err(cache)? {
                    remote.pull_blobs(self.store, &[(o.digest, o.size)]).map_err(|e| {
                        format!(
                            "pulling input `{slot}` (output `{}` of stage `{}`) from the remote: {e}; rerun to recompute `{}`",
                            input.output, input.stage, input.stage
                        )
                    })?;
                }
            }
            self.store.export_to(&o.digest, &path).map_err(|e| {
                format!("reading input `{slot}` (output `{}` of stage `{}`): {e}", input.output, input.stage)
            })?;
            ctx_inputs.insert(slot.clone(), path);
        }
        let tx = self.tx.clone();
        let pos = self.pos;
        let ctx = StageCtx {
            inputs: ctx_inputs,
            out_dir: out_dir.clone(),
            scratch_dir: scratch_dir.clone(),
            progress: Box::new(move |ev| {
                let _ = tx.send(Msg::Progress { pos, ev });
            }),
        };
        let produced = self.stage.run(&ctx).map_err(|e| e.0)?;

        let declared: BTreeSet<&String> = self.outputs.iter().collect();
        for o in self.outputs {
            if !produced.files.contains_key(o) {
                return Err(format!(
                    "did not produce declared output `{o}`; make run() write it and list it in StageOutputs.files"
                ));
            }
        }
        if let Some(extra) = produced.files.keys().find(|k| !declared.contains(k)) {
            return Err(format!(
                "produced undeclared output `{extra}`; add it to outputs() and bump the stage version"
            ));
        }
        let mut outputs = BTreeMap::new();
        for (o, path) in &produced.files {
            let path = if path.is_absolute() { path.clone() } else { out_dir.join(path) };
            let size = std::fs::metadata(&path)
                .map_err(|e| format!("output `{o}` was listed as {} but cannot be read: {e}", path.display()))?
                .len();
            // Files the stage wrote into its own out_dir are moved into the cache (no copy:
            // ~60 % less CPU for large tensors); anything elsewhere is copied, never moved.
            let stored =
                if path.starts_with(&out_dir) { self.store.put_file_move(&path) } else { self.store.put_file(&path) };
            let digest = stored.map_err(|e| format!("storing output `{o}`: {e}"))?;
            let kind = path.extension().and_then(|e| e.to_str()).unwrap_or("bytes").to_string();
            outputs.insert(o.clone(), OutputRef { digest, size, kind });
        }
        let record = StageRecord {
            key,
            stage_name: name.to_string(),
            stage_id: material.id.0.clone(),
            version: material.version,
            params: material.params.to_value(),
            inputs: material.inputs.clone(),
            outputs: outputs.clone(),
            metrics: produced.metrics,
            env: material.env.clone(),
            wdro_version: self.opts.wdro_version.clone(),
            finished_at: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            duration_ms: t.elapsed().as_millis() as u64,
        };
        self.store.put_record(&record).map_err(|e| format!("storing the stage record: {e}"))?;
        if let Some(remote) = &self.opts.plan.remote {
            if !remote.is_read_only() && !remote.is_unavailable() {
                if lease.as_ref().is_some_and(|l| l.is_lost()) {
                    remote.warn(&format!(
                        "stage {name}: our lease on key {} was taken over while computing (this process stalled longer than the lease TTL plus grace); pushing anyway: the remote keeps the first result",
                        key.short()
                    ));
                }
                // In the background; `execute` waits for it before returning. The lease is
                // released once the manifest is on the remote.
                if let Err(e) = remote.push_stage_leased(self.store, &record, lease) {
                    remote.warn(&format!("pushing {name}: {e}"));
                }
            }
        }
        // Checkpoints are only useful to a rerun of the same key, which is now a cache hit.
        let _ = std::fs::remove_dir_all(&scratch_dir);
        Ok(JobOk { hit: false, outputs, remote: None })
    }
}

/// What a job does after trying to take the stage's lease.
enum LeaseStep {
    /// Compute, holding the lease if one was taken.
    Compute(Option<Lease>),
    /// Another machine finished the stage while this one waited for its lease.
    Hit(JobOk),
}

impl Job<'_> {
    /// Takes the stage key's lease on a read-write remote before computing, waiting while
    /// another machine holds it (see `wdro_cache::remote::lease`). Leases never fail a run: a
    /// read-only remote, disabled leases or `--force` skip them, and a remote error computes
    /// without one, with a warning.
    fn lease(&self, key: &StageKey, reasons: &mut Vec<Reason>) -> LeaseStep {
        let Some(remote) = &self.opts.plan.remote else { return LeaseStep::Compute(None) };
        if !remote.options().lease.enabled || remote.is_read_only() || remote.is_unavailable() || self.forced {
            return LeaseStep::Compute(None);
        }
        let name = self.stage.name();
        let mut last = String::new();
        let got = remote.acquire_or_wait(key, name, &mut |info| {
            if info.record.holder != last {
                last = info.record.holder.clone();
                let _ = self.tx.send(Msg::Waiting { pos: self.pos, key: *key, holder: info.describe() });
            }
        });
        match got {
            Ok(Leased::Acquired(l)) => LeaseStep::Compute(Some(l)),
            Ok(Leased::Done(_)) => {
                // Validated as any remote hit (outputs complete, not forced).
                let rec = match remote_lookup(&self.opts.plan, self.store, key, self.outputs, self.forced) {
                    Ok(Some(rec)) => rec,
                    _ => return LeaseStep::Compute(None),
                };
                if !self.pull {
                    return LeaseStep::Hit(JobOk { hit: true, outputs: rec.outputs, remote: Some(0) });
                }
                match remote.pull_stage(self.store, &rec, None) {
                    Ok(n) => LeaseStep::Hit(JobOk { hit: true, outputs: rec.outputs, remote: Some(n) }),
                    Err(e) => {
                        remote.forget_manifest(key);
                        remote.warn(&format!("stage {name}: {e}; recomputing it"));
                        reasons.push(Reason::RemoteRefused { error: e.to_string() });
                        LeaseStep::Compute(None)
                    }
                }
            }
            Err(e) => {
                remote.warn(&format!(
                    "stage {name}: cannot take a lease on {}: {e}; computing without one",
                    remote.display()
                ));
                LeaseStep::Compute(None)
            }
        }
    }
}

fn io_msg(path: &Path, e: std::io::Error) -> String {
    format!("cannot create {}: {e}; check free space and permissions in the cache directory", path.display())
}

fn file_safe(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect()
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// A run id that sorts by time: `20261125T220000.123Z-<pid>` (UTC, milliseconds).
pub fn run_id(at: SystemTime) -> String {
    let d = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{y:04}{m:02}{day:02}T{:02}{:02}{:02}.{:03}Z-{}",
        s / 3600,
        s % 3600 / 60,
        s % 60,
        d.subsec_millis(),
        std::process::id()
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
pub(crate) mod testing {
    //! A fake stage that writes its params and the contents of its inputs into each output,
    //! so any change upstream shows in the bytes (or, with `constant`, never does).

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use wdro_cache::{LockWait, Store};

    use crate::key::Env;
    use crate::params::Params;
    use crate::stage::{InputRef, ProgressEvent, Resources, Stage, StageCtx, StageError, StageId, StageOutputs};

    pub fn env() -> Env {
        Env { torch_version: "2.4.0".into(), device_class: "cpu".into() }
    }

    pub fn open_store() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path(), LockWait::NoWait).unwrap();
        (d, s)
    }

    /// (stage, "start" | "end", when).
    pub type Log = Arc<Mutex<Vec<(String, &'static str, Instant)>>>;

    #[derive(Clone)]
    pub struct FakeStage {
        name: String,
        version: u32,
        params: Params,
        exec_params: Params,
        inputs: Vec<InputRef>,
        outputs: Vec<String>,
        torch: bool,
        worker: bool,
        sleep: Duration,
        fail: Option<String>,
        panic: bool,
        constant: Option<String>,
        omit: Vec<String>,
        log: Option<Log>,
        runs: Arc<AtomicUsize>,
    }

    impl FakeStage {
        #[allow(clippy::new_ret_no_self)]
        pub fn new(name: &str) -> FakeStage {
            FakeStage {
                name: name.into(),
                version: 1,
                params: Params::new(),
                exec_params: Params::new(),
                inputs: Vec::new(),
                outputs: vec!["out".into()],
                torch: false,
                worker: false,
                sleep: Duration::ZERO,
                fail: None,
                panic: false,
                constant: None,
                omit: Vec::new(),
                log: None,
                runs: Arc::new(AtomicUsize::new(0)),
            }
        }
        pub fn param(mut self, k: &str, v: impl serde::Serialize) -> Self {
            self.params = self.params.with(k, v);
            self
        }
        pub fn exec_param(mut self, k: &str, v: impl serde::Serialize) -> Self {
            self.exec_params = self.exec_params.with(k, v);
            self
        }
        pub fn input(mut self, slot: &str, stage: &str, output: &str) -> Self {
            self.inputs.push(InputRef { slot: slot.into(), stage: stage.into(), output: output.into() });
            self
        }
        pub fn outputs(mut self, outs: &[&str]) -> Self {
            self.outputs = outs.iter().map(|s| s.to_string()).collect();
            self
        }
        pub fn version(mut self, v: u32) -> Self {
            self.version = v;
            self
        }
        pub fn torch(mut self) -> Self {
            self.torch = true;
            self
        }
        pub fn worker(mut self) -> Self {
            self.worker = true;
            self
        }
        pub fn sleep_ms(mut self, ms: u64) -> Self {
            self.sleep = Duration::from_millis(ms);
            self
        }
        pub fn fail(mut self, msg: &str) -> Self {
            self.fail = Some(msg.into());
            self
        }
        pub fn panics(mut self) -> Self {
            self.panic = true;
            self
        }
        /// Every output gets these bytes whatever the params and inputs.
        pub fn constant(mut self, s: &str) -> Self {
            self.constant = Some(s.into());
            self
        }
        /// Declared but not written.
        pub fn omit(mut self, output: &str) -> Self {
            self.omit.push(output.into());
            self
        }
        pub fn log(mut self, log: &Log) -> Self {
            self.log = Some(log.clone());
            self
        }
        pub fn counter(mut self, runs: &Arc<AtomicUsize>) -> Self {
            self.runs = runs.clone();
            self
        }
        pub fn build(self) -> Arc<dyn Stage> {
            Arc::new(self)
        }

        fn note(&self, what: &'static str) {
            if let Some(l) = &self.log {
                l.lock().unwrap().push((self.name.clone(), what, Instant::now()));
            }
        }
    }

    impl Stage for FakeStage {
        fn name(&self) -> &str {
            &self.name
        }
        /// Per-name kinds, so that two fake stages never share a key by accident.
        fn id(&self) -> StageId {
            StageId(format!("fake-{}", self.name))
        }
        fn version(&self) -> u32 {
            self.version
        }
        fn params(&self) -> Params {
            self.params.clone()
        }
        fn exec_params(&self) -> Params {
            self.exec_params.clone()
        }
        fn inputs(&self) -> Vec<InputRef> {
            self.inputs.clone()
        }
        fn outputs(&self) -> Vec<String> {
            self.outputs.clone()
        }
        fn resources(&self) -> Resources {
            Resources { worker: self.worker, ..Resources::default() }
        }
        fn uses_torch(&self) -> bool {
            self.torch
        }
        fn run(&self, ctx: &StageCtx) -> Result<StageOutputs, StageError> {
            self.note("start");
            self.runs.fetch_add(1, Ordering::SeqCst);
            std::fs::write(ctx.scratch_dir.join("checkpoint"), b"step 1").unwrap();
            std::thread::sleep(self.sleep);
            (ctx.progress)(ProgressEvent { done: 1, total: 2, message: "half way".into() });
            if self.panic {
                panic!("index out of bounds");
            }
            if let Some(msg) = &self.fail {
                self.note("end");
                return Err(StageError(msg.clone()));
            }
            let mut inputs = serde_json::Map::new();
            for (slot, path) in &ctx.inputs {
                inputs.insert(slot.clone(), std::fs::read_to_string(path).unwrap().into());
            }
            let body = match &self.constant {
                Some(c) => c.clone(),
                None => serde_json::json!({"params": self.params, "inputs": inputs}).to_string(),
            };
            let mut out = StageOutputs { metrics: serde_json::json!({"len": body.len()}), ..Default::default() };
            for o in self.outputs.iter().filter(|o| !self.omit.contains(o)) {
                let file = format!("{o}.json");
                std::fs::write(ctx.out_dir.join(&file), &body).unwrap();
                out.files.insert(o.clone(), file.into());
            }
            self.note("end");
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::testing::{env, open_store, FakeStage, Log};
    use super::*;

    fn opts() -> ExecOptions {
        let mut o = ExecOptions::new(env(), "0.1.0-test");
        o.jobs = 4;
        o
    }

    fn times(log: &Log, stage: &str, what: &str) -> Instant {
        log.lock().unwrap().iter().find(|(s, w, _)| s == stage && *w == what).unwrap().2
    }

    #[test]
    fn independent_stages_overlap() {
        let (_d, store) = open_store();
        let log = Log::default();
        let p = Pipeline::new(vec![
            FakeStage::new("a").sleep_ms(300).log(&log).build(),
            FakeStage::new("b").sleep_ms(300).log(&log).build(),
            FakeStage::new("c").input("x", "a", "out").input("y", "b", "out").log(&log).build(),
        ])
        .unwrap();
        let report = execute(&p, &store, &opts(), &NullObserver).unwrap();
        assert_eq!(report.computed(), 3);
        let last_start = times(&log, "a", "start").max(times(&log, "b", "start"));
        let first_end = times(&log, "a", "end").min(times(&log, "b", "end"));
        assert!(last_start < first_end, "a and b did not run at the same time");
        // c starts only once both inputs are done.
        assert!(times(&log, "c", "start") > times(&log, "a", "end").max(times(&log, "b", "end")));
    }

    #[test]
    fn worker_stages_respect_max_workers() {
        let (_d, store) = open_store();
        let log = Log::default();
        let p = Pipeline::new(vec![
            FakeStage::new("w1").worker().sleep_ms(100).log(&log).build(),
            FakeStage::new("w2").worker().sleep_ms(100).log(&log).build(),
        ])
        .unwrap();
        execute(&p, &store, &opts(), &NullObserver).unwrap();
        let (s1, e1, s2, e2) = (
            times(&log, "w1", "start"),
            times(&log, "w1", "end"),
            times(&log, "w2", "start"),
            times(&log, "w2", "end"),
        );
        assert!(e1 <= s2 || e2 <= s1, "two worker stages ran at once with max_workers = 1");
    }

    #[test]
    fn failure_keeps_completed_results_and_names_the_stage() {
        let (_d, store) = open_store();
        let p = |fail: bool| {
            let b = FakeStage::new("b");
            let b = if fail { b.fail("out of memory; lower batch_size") } else { b };
            Pipeline::new(vec![
                FakeStage::new("a").sleep_ms(300).build(),
                b.build(),
                FakeStage::new("c").input("x", "a", "out").build(),
                FakeStage::new("d").input("x", "b", "out").build(),
            ])
            .unwrap()
        };
        let err = execute(&p(true), &store, &opts(), &NullObserver).unwrap_err();
        assert_eq!(err.to_string(), "stage `b` failed: out of memory; lower batch_size");
        let ExecError::StageFailed { report, .. } = err else { panic!("not a stage failure") };
        let outcomes: Vec<_> = report.stages.iter().map(|s| (s.name.as_str(), s.outcome.clone())).collect();
        assert_eq!(
            outcomes,
            [
                ("a", Outcome::Computed),
                ("b", Outcome::Failed { message: "out of memory; lower batch_size".into() }),
                ("c", Outcome::NotRun),
                ("d", Outcome::NotRun),
            ]
        );
        // a's result is in the cache, b's checkpoint directory survives for a resumed run.
        let a_key = report.stage("a").unwrap().key.unwrap();
        assert!(store.is_complete(&a_key).unwrap());
        let b_key = report.stage("b").unwrap().key.unwrap();
        assert!(store.root().join("scratch").join(b_key.to_string()).join("checkpoint").exists());
        assert!(!store.root().join("scratch").join(a_key.to_string()).exists());
        // The run was recorded with the stage it completed, so gc keeps a's outputs.
        let runs = store.runs().unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].stages, [("a".to_string(), a_key)]);
        // Fixed, the rerun reuses a.
        let report = execute(&p(false), &store, &opts(), &NullObserver).unwrap();
        assert!(report.stage("a").unwrap().outcome.is_hit());
        assert_eq!(report.summary_line(), "4 stages: 1 cache hit, 3 executed");
        assert!(!store.root().join("scratch").join(b_key.to_string()).exists());
    }

    #[test]
    fn early_cutoff_when_upstream_reproduces_its_bytes() {
        let (_d, store) = open_store();
        let runs = Arc::new(AtomicUsize::new(0));
        let p = |comment: &str| {
            Pipeline::new(vec![
                FakeStage::new("up").param("comment", comment).constant("same bytes").build(),
                FakeStage::new("down").input("x", "up", "out").counter(&runs).build(),
            ])
            .unwrap()
        };
        execute(&p("first"), &store, &opts(), &NullObserver).unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let report = execute(&p("second"), &store, &opts(), &NullObserver).unwrap();
        assert!(report.stage("up").unwrap().outcome.is_computed());
        assert!(report.stage("down").unwrap().outcome.is_hit());
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // The same holds for --force.
        let mut o = opts();
        o.plan.force.insert("up".into());
        let report = execute(&p("second"), &store, &o, &NullObserver).unwrap();
        assert_eq!(report.stage("up").unwrap().reasons, [Reason::Forced]);
        assert!(report.stage("down").unwrap().outcome.is_hit());
    }

    #[test]
    fn downstream_of_a_changed_stage_gets_a_concrete_reason_at_run_time() {
        let (_d, store) = open_store();
        let p = |lr: f64| {
            Pipeline::new(vec![
                FakeStage::new("train").param("lr", lr).build(),
                FakeStage::new("eval").input("model", "train", "out").build(),
            ])
            .unwrap()
        };
        execute(&p(0.01), &store, &opts(), &NullObserver).unwrap();
        let report = execute(&p(0.02), &store, &opts(), &NullObserver).unwrap();
        let eval = report.stage("eval").unwrap();
        assert!(eval.outcome.is_computed());
        assert!(matches!(&eval.reasons[..], [Reason::InputChanged { slot, .. }] if slot == "model"));
        // "latest" follows what was used: flipping back diffs against 0.02, and is a hit.
        let report = execute(&p(0.01), &store, &opts(), &NullObserver).unwrap();
        assert_eq!(report.hits(), 2);
        assert_eq!(store.latest_record("train").unwrap().unwrap().params["lr"], serde_json::json!(0.01));
    }

    #[test]
    fn undeclared_or_missing_outputs_fail_the_stage() {
        let (_d, store) = open_store();
        let p = Pipeline::new(vec![FakeStage::new("s").outputs(&["model", "log"]).omit("log").build()]).unwrap();
        let err = execute(&p, &store, &opts(), &NullObserver).unwrap_err();
        assert_eq!(
            err.to_string(),
            "stage `s` failed: did not produce declared output `log`; make run() write it and list it in StageOutputs.files"
        );
    }

    #[test]
    fn a_panicking_stage_fails_instead_of_hanging() {
        let (_d, store) = open_store();
        let p = Pipeline::new(vec![FakeStage::new("s").panics().build()]).unwrap();
        let err = execute(&p, &store, &opts(), &NullObserver).unwrap_err();
        assert_eq!(err.to_string(), "stage `s` failed: panicked: index out of bounds; this is a bug in the stage");
    }

    #[test]
    fn records_runs_and_stage_records() {
        let (_d, store) = open_store();
        let p = Pipeline::new(vec![
            FakeStage::new("t").param("lr", 0.1).torch().build(),
            FakeStage::new("e").input("m", "t", "out").build(),
        ])
        .unwrap();
        let r1 = execute(&p, &store, &opts(), &NullObserver).unwrap();
        let rec = store.latest_record("t").unwrap().unwrap();
        assert_eq!(rec.env, env().to_map());
        assert_eq!(rec.wdro_version, "0.1.0-test");
        assert_eq!(rec.params, serde_json::json!({"lr": 0.1}));
        assert_eq!(rec.outputs["out"].kind, "json");
        assert_eq!(rec.metrics["len"], serde_json::json!(rec.outputs["out"].size));
        assert!(store.latest_record("e").unwrap().unwrap().env.is_empty());
        let e_in = store.latest_record("e").unwrap().unwrap().inputs;
        assert_eq!(e_in["m"], rec.outputs["out"].digest);
        let r2 = execute(&p, &store, &opts(), &NullObserver).unwrap();
        let runs = store.runs().unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].computed, ["t", "e"]);
        assert!(runs[1].computed.is_empty());
        assert_eq!(runs[1].stages, runs[0].stages);
        assert_eq!(runs[1].stages[0].0, "t");
        assert!(r1.run_id <= r2.run_id);
        // The work directories are gone.
        assert_eq!(std::fs::read_dir(store.root().join("work")).unwrap().count(), 0);
    }

    #[test]
    fn until_runs_only_ancestors() {
        let (_d, store) = open_store();
        let p = Pipeline::new(vec![
            FakeStage::new("a").build(),
            FakeStage::new("b").input("x", "a", "out").build(),
            FakeStage::new("c").input("x", "b", "out").build(),
        ])
        .unwrap();
        let mut o = opts();
        o.until = Some("b".into());
        assert_eq!(dry_run(&p, &store, &o).unwrap().entries().len(), 2);
        let r = execute(&p, &store, &o, &NullObserver).unwrap();
        assert_eq!(r.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        o.until = Some("zz".into());
        assert!(matches!(execute(&p, &store, &o, &NullObserver), Err(ExecError::Graph(_))));
    }

    #[test]
    fn run_ids_sort_by_time() {
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        let pid = std::process::id();
        assert_eq!(run_id(at(1_764_108_000)), format!("20251125T220000.000Z-{pid}"));
        assert_eq!(run_id(at(951_782_400)), format!("20000229T000000.000Z-{pid}"));
        assert_eq!(run_id(at(4_102_444_799)), format!("20991231T235959.000Z-{pid}"));
        assert_eq!(run_id(UNIX_EPOCH + Duration::from_millis(1_500)), format!("19700101T000001.500Z-{pid}"));
    }

    #[test]
    fn store_is_shareable_across_threads() {
        fn is_sync<T: Sync>() {}
        is_sync::<Store>();
        is_sync::<Pipeline>();
    }
}

#[cfg(test)]
mod remote_tests {
    //! Two users with separate local caches sharing one remote (in memory or a directory).

    use std::sync::Arc;

    use wdro_cache::{LockWait, Remote, RemoteOptions};

    use super::testing::{env, FakeStage};
    use super::*;
    use crate::plan::RemoteDownload;

    fn chain(leaf_param: u32) -> Pipeline {
        Pipeline::new(vec![
            FakeStage::new("big").param("n", 1).build(),
            FakeStage::new("mid").input("x", "big", "out").build(),
            FakeStage::new("leaf").param("p", leaf_param).input("x", "mid", "out").build(),
        ])
        .unwrap()
    }

    fn opts(remote: &Arc<Remote>) -> ExecOptions {
        let mut o = ExecOptions::new(env(), "test");
        o.plan.remote = Some(remote.clone());
        o.jobs = 2;
        o
    }

    fn computed(r: &RunReport) -> Vec<&str> {
        r.stages.iter().filter(|s| s.outcome.is_computed()).map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn second_user_computes_nothing_and_pulls_only_what_it_needs() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(&dir.path().join("a"), LockWait::NoWait).unwrap();
        let b = Store::open(&dir.path().join("b"), LockWait::NoWait).unwrap();
        let remote = Arc::new(Remote::in_memory(RemoteOptions::default()).unwrap());

        let ra = execute(&chain(1), &a, &opts(&remote), &NullObserver).unwrap();
        assert_eq!(computed(&ra), ["big", "mid", "leaf"]);
        let stats = ra.remote.clone().unwrap();
        assert_eq!((stats.pushed_stages, stats.pushed_blobs), (3, 3));

        // B plans: everything cached on the remote; only the final stage's output is pulled.
        let plan = plan(&chain(1), &b, &opts(&remote).plan).unwrap();
        assert!(plan.is_up_to_date());
        let pulls: Vec<(bool, usize)> =
            plan.entries().iter().map(|e| e.remote.as_ref().map(|r| (r.pull, r.pull_blobs)).unwrap()).collect();
        assert_eq!(pulls, [(false, 0), (false, 0), (true, 1)]);
        assert_eq!(plan.summary().cached_remote, 3);
        assert!(plan.summary().to_string().contains("3 on the remote"), "{}", plan.summary());

        let rb = execute(&chain(1), &b, &opts(&remote), &NullObserver).unwrap();
        assert!(computed(&rb).is_empty());
        assert_eq!(rb.remote_hits(), 3);
        assert!(rb.summary_line().starts_with("3 stages: 3 cache hit (3 remote), 0 executed"), "{}", rb.summary_line());
        let leaf = a.latest_record("leaf").unwrap().unwrap();
        assert!(b.is_complete(&leaf.key).unwrap(), "the final result is local now");
        let mid = a.latest_record("mid").unwrap().unwrap();
        assert!(!b.has_blob(&mid.outputs["out"].digest).unwrap(), "intermediates stay on the remote");
        assert_eq!(rb.remote.as_ref().unwrap().pulled_blobs, 1);

        // B changes the leaf's param: only the leaf computes; it lazily pulls mid's output.
        let rb2 = execute(&chain(2), &b, &opts(&remote), &NullObserver).unwrap();
        assert_eq!(computed(&rb2), ["leaf"]);
        let s = rb2.remote.clone().unwrap();
        assert_eq!((s.pulled_blobs, s.pushed_stages), (1, 1));
        assert!(b.has_blob(&mid.outputs["out"].digest).unwrap());
        assert!(!b.has_blob(&a.latest_record("big").unwrap().unwrap().outputs["out"].digest).unwrap());

        // A reruns B's config: nothing computes.
        let ra2 = execute(&chain(2), &a, &opts(&remote), &NullObserver).unwrap();
        assert!(computed(&ra2).is_empty(), "{:?}", ra2.stages);
        assert_eq!(ra2.remote_hits(), 1);

        // Minimal download pulls nothing for a fully cached run.
        let c = Store::open(&dir.path().join("c"), LockWait::NoWait).unwrap();
        let mut o = opts(&remote);
        o.plan.remote_download = RemoteDownload::Minimal;
        let rc = execute(&chain(2), &c, &o, &NullObserver).unwrap();
        assert!(computed(&rc).is_empty());
        assert_eq!(rc.remote.unwrap().pulled_blobs, 0);
    }

    #[test]
    fn a_corrupt_remote_blob_is_refused_recomputed_and_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let rdir = dir.path().join("remote");
        let url = format!("file://{}", rdir.display());
        let a = Store::open(&dir.path().join("a"), LockWait::NoWait).unwrap();
        let remote = Arc::new(Remote::open(&url, RemoteOptions::default()).unwrap());
        execute(&chain(1), &a, &opts(&remote), &NullObserver).unwrap();
        let leaf = a.latest_record("leaf").unwrap().unwrap();
        let h = leaf.outputs["out"].digest.to_hex();
        let blob = rdir.join("blobs").join(&h[..2]).join(&h);
        let mut bytes = std::fs::read(&blob).unwrap();
        bytes[3] ^= 0x20;
        std::fs::write(&blob, &bytes).unwrap();

        let b = Store::open(&dir.path().join("b"), LockWait::NoWait).unwrap();
        let remote_b = Arc::new(Remote::open(&url, RemoteOptions::default()).unwrap());
        let warnings = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let w = warnings.clone();
        remote_b.set_warning_sink(Box::new(move |m| w.lock().unwrap().push(m.to_string())));
        let rb = execute(&chain(1), &b, &opts(&remote_b), &NullObserver).unwrap();
        assert_eq!(computed(&rb), ["leaf"], "only the stage whose blob was corrupt recomputes");
        let leaf_b = rb.stage("leaf").unwrap();
        assert!(matches!(&leaf_b.reasons[..], [.., Reason::RemoteRefused { error }] if error.contains("corrupt")));
        assert!(warnings.lock().unwrap().iter().any(|m| m.contains("corrupt") && m.contains("recomputing")));
        assert_eq!(b.get_bytes(&leaf.outputs["out"].digest).unwrap().len() as u64, leaf.outputs["out"].size);
        // The read-write push replaced the bad copy: a third user pulls it cleanly.
        assert!(remote_b.verify().unwrap().is_clean());
        let c = Store::open(&dir.path().join("c"), LockWait::NoWait).unwrap();
        let remote_c = Arc::new(Remote::open(&url, RemoteOptions::default()).unwrap());
        let rc = execute(&chain(1), &c, &opts(&remote_c), &NullObserver).unwrap();
        assert!(computed(&rc).is_empty());
    }
}
