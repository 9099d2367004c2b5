//! `wdro worker --stage NAME [--key KEY]` (hidden): one stage of a cluster run, and the client
//! side of `wdro run --executor slurm|k8s`.
//!
//! A worker loads the run's config snapshot, plans against the shared remote cache, and:
//! * exits 0 at once when the stage's result is already on the remote (another job, an earlier
//!   submission or a teammate computed it: nothing is computed twice);
//! * refuses (exit 2) when a stage it reads is not on the remote yet — it never computes
//!   upstream stages, which are other jobs' work;
//! * otherwise runs the stage exactly as a local run does (`execute` with `--until STAGE`: the
//!   inputs are pulled, the stage's `run` is called, outputs and the record are pushed), and
//!   fails if the push failed, so a dependent job never starts without its inputs;
//! * `execute` takes the stage key's lease on the remote first (`wdro_cache::remote::lease`):
//!   when another job of an overlapping submission holds it, the worker prints the holder and
//!   waits until that job's result is on the remote (then it exits 0 having computed nothing) or
//!   the lease goes stale (then it takes over and computes).
//!
//! Its local cache is a fresh temporary directory unless `--cache-dir` is given, so workers
//! sharing a node never contend for a cache lock.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Args, ValueEnum};
use wdro_cache::{LockWait, StageKey, Store};
use wdro_pipeline::exec::{execute, ExecOptions, Observer};
use wdro_pipeline::executor::Executor;
use wdro_pipeline::graph::Pipeline;
use wdro_pipeline::k8s::{self, K8sOptions};
use wdro_pipeline::plan::{plan as make_plan, PlanOptions, RemoteDownload};
use wdro_pipeline::render::{HumanObserver, JsonObserver, Progress};
use wdro_pipeline::slurm::{self, SlurmExecutor};
use wdro_stages::config::Config;

use crate::context::{build_pipeline, env_for, load_config};
use crate::exit::{coded, STAGE_FAILED, USAGE};
use crate::Global;

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The stage to compute (its instance name).
    #[arg(long)]
    pub stage: Option<String>,
    /// Its key, when known at submission: the worker checks it (or finds the stage by it).
    #[arg(long)]
    pub key: Option<String>,
}

/// `--executor`.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExecutorArg {
    /// This machine (rayon), the default.
    #[default]
    Local,
    /// Slurm job arrays coordinated through the remote cache.
    Slurm,
    /// Kubernetes Indexed Jobs (only with --emit).
    K8s,
}

fn no_remote() -> anyhow::Error {
    coded(
        USAGE,
        "cluster executors coordinate only through the shared remote cache: add [remote] url = \"file:///shared/dir\" (or s3://…, https://…) to the config, or pass --remote URL",
    )
}

pub fn worker(g: &Global, a: &WorkerArgs) -> Result<i32> {
    let (_, cfg) = load_config(g)?;
    let pipeline = build_pipeline(&cfg)?;
    let remote = super::remote::open_remote(g, Some(&cfg))?.ok_or_else(no_remote)?;
    let _tmp;
    let dir = match &g.cache_dir {
        Some(d) => d.clone(),
        None => {
            let nanos =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
            let d = std::env::temp_dir().join(format!("wdro-worker-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&d)?;
            _tmp = RemoveOnDrop(d.clone());
            d
        }
    };
    let store = Store::open(&dir, LockWait::NoWait)?;
    let mut po = PlanOptions::new(env_for(&cfg));
    po.remote = Some(remote);
    po.remote_download = RemoteDownload::Minimal;
    let want: Option<StageKey> = match &a.key {
        Some(k) => Some(k.parse().map_err(|e| coded(USAGE, format!("--key {k}: {e}")))?),
        None => None,
    };
    let p = make_plan(&pipeline, &store, &po)?;
    let entry = match (&a.stage, want) {
        (Some(s), _) => {
            p.entry(s).ok_or_else(|| coded(USAGE, format!("no stage named `{s}` in the config snapshot")))?
        }
        (None, Some(k)) => p.entries().iter().find(|e| e.key == Some(k)).ok_or_else(|| {
            coded(USAGE, format!("no stage with key {k} (its inputs may not be on the remote yet); pass --stage NAME"))
        })?,
        (None, None) => return Err(coded(USAGE, "wdro worker needs --stage NAME or --key KEY")),
    };
    let name = entry.name.clone();
    if let (Some(w), Some(k)) = (want, entry.key) {
        if w != k {
            return Err(coded(
                USAGE,
                format!("stage `{name}` has key {k} here, not {w}: the config snapshot or the environment differs from the submitter's"),
            ));
        }
    }
    if entry.status.is_cached() {
        println!(
            "wdro worker: {name} is already on the remote [key {}]; nothing to compute",
            entry.key.map(|k| k.short()).unwrap_or_default()
        );
        return Ok(0);
    }
    let sub = pipeline.subgraph_until(&name).map_err(|e| coded(USAGE, e.to_string()))?;
    if let Some(up) = p.entries().iter().find(|e| sub.contains(&e.name) && e.name != name && !e.status.is_cached()) {
        return Err(coded(
            USAGE,
            format!("stage `{name}` reads `{}`, which is not on the remote yet; its job must finish first", up.name),
        ));
    }
    let mut opts = ExecOptions::new(env_for(&cfg), env!("CARGO_PKG_VERSION"));
    opts.plan = po;
    opts.until = Some(name.clone());
    opts.max_workers = cfg.run.max_workers;
    let observer: Box<dyn Observer> =
        if g.json { Box::new(JsonObserver::stdout()) } else { Box::new(HumanObserver::new(Progress::Never)) };
    let report = match execute(&pipeline, &store, &opts, observer.as_ref()) {
        Ok(r) => r,
        Err(e) => return Err(coded(STAGE_FAILED, e.to_string())),
    };
    let st = report.stage(&name).expect("the target is in its own subgraph");
    if let (Some(w), Some(k)) = (want, st.key) {
        if w != k {
            return Err(coded(STAGE_FAILED, format!("stage `{name}` ran with key {k}, not the submitted {w}")));
        }
    }
    if let Some(r) = &report.remote {
        if let Some((s, e)) = r.push_failures.first() {
            return Err(coded(
                STAGE_FAILED,
                format!(
                    "pushing {s} to the remote failed: {e}; the job fails so that nothing waits on a missing result"
                ),
            ));
        }
    }
    println!(
        "wdro worker: {name} {} [key {}]",
        if st.outcome.is_computed() { "computed and pushed" } else { "was a hit" },
        st.key.map(|k| k.short()).unwrap_or_default()
    );
    Ok(0)
}

/// A temporary worker cache, removed when the worker exits.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `wdro run --executor slurm|k8s [--emit DIR]`, after the usual set-up of `run`.
#[allow(clippy::too_many_arguments)]
pub fn run_cluster(
    g: &Global,
    executor: ExecutorArg,
    emit: Option<&Path>,
    image: &str,
    cfg: &Config,
    pipeline: &Pipeline,
    store: &Store,
    opts: &ExecOptions,
    observer: &dyn Observer,
) -> Result<i32> {
    let Some(remote) = &opts.plan.remote else { return Err(no_remote()) };
    if executor == ExecutorArg::K8s && emit.is_none() {
        return Err(coded(USAGE, "--executor k8s only writes manifests: pass --emit DIR (and kubectl apply them)"));
    }
    // One setup for single runs and sweeps (config snapshot, global flags, [slurm] options with
    // their defaults when the section is absent).
    let crate::cmd::run::ClusterSetup { slurm: so, dir, config_text, global } =
        crate::cmd::run::cluster_setup(g, cfg, remote.display(), emit)?;
    let ex = SlurmExecutor { opts: so, emit_only: emit.is_some() };
    if let Some(_d) = emit {
        let (p, arrays) = ex.arrays(pipeline, store, opts)?;
        let files = match executor {
            ExecutorArg::K8s => k8s::emit(
                &arrays,
                &K8sOptions {
                    image: image.to_string(),
                    namespace: None,
                    config_text,
                    wdro_args: global,
                    parallelism: 16,
                    dir: dir.clone(),
                },
            )?,
            _ => slurm::emit(&arrays, &ex.opts)?,
        };
        let n: usize = arrays.iter().map(|a| a.tasks.len()).sum();
        if g.json {
            println!(
                "{}",
                serde_json::json!({"event": "emitted", "executor": format!("{executor:?}").to_lowercase(), "dir": dir,
                    "stages": n, "cached": p.summary().cached, "jobs": arrays.len(),
                    "files": files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>()})
            );
        } else {
            eprintln!("{}", p.summary());
            eprintln!("wrote {} job(s) for {n} stage(s) to {}", arrays.len(), dir.display());
            for f in &files {
                println!("{}", f.display());
            }
        }
        return Ok(0);
    }
    match ex.run(pipeline, store, opts, observer) {
        Ok(report) => {
            if !g.json {
                eprintln!("slurm scripts and logs: {}", dir.display());
            }
            let _ = report;
            Ok(0)
        }
        Err(wdro_pipeline::ExecError::StageFailed { stage, message, .. }) => {
            Err(coded(STAGE_FAILED, format!("stage `{stage}` failed on Slurm: {message}; finished stages are on the remote, rerun to submit only what is missing")))
        }
        Err(e) => Err(e.into()),
    }
}
