//! `wdro run --sweep KEY=V1,V2,…`: run the matrix of variants through one cache and print one
//! comparison table, plus which shared stages each run computed (the proof that upstream stages
//! ran once).
//!
//! With `--executor slurm` every variant's stages to run are submitted in one go, each stage
//! shared by several variants once (see `wdro_pipeline::slurm::group_variants`); when the jobs
//! are done, each variant runs locally as usual, where every stage is now a remote hit, which
//! pulls the results, records the run and fills the table. `--emit DIR` (slurm or k8s) only
//! writes the scripts or manifests of that one submission.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::Result;
use serde_json::json;
use wdro_cache::Digest;
use wdro_pipeline::exec::{dry_run, execute, ExecError, ExecOptions, Observer, Outcome};
use wdro_pipeline::graph::Pipeline;
use wdro_pipeline::k8s::{self, K8sOptions};
use wdro_pipeline::plan::PlanOptions;
use wdro_pipeline::render::{HumanObserver, JsonObserver, Progress};
use wdro_pipeline::slurm::{self, SlurmExecutor};
use wdro_stages::config::Config;
use wdro_stages::sweep::{self, Variant, VariantRun};

use crate::cmd::run::{cluster_setup, RunArgs};
use crate::cmd::worker::ExecutorArg;
use crate::context::{build_pipeline, cache_dir, config_path, env_for, open_store};
use crate::exit::{coded, DATA, FROZEN, STAGE_FAILED, USAGE};
use crate::{Global, ProgressArg};

struct Built {
    variant: Variant,
    cfg: Config,
    pipeline: Pipeline,
}

fn progress(p: ProgressArg) -> Progress {
    match p {
        ProgressArg::Auto => Progress::Auto,
        ProgressArg::Always => Progress::Always,
        ProgressArg::Never => Progress::Never,
    }
}

/// Builds every variant's config and pipeline first, so a bad value fails before anything runs.
fn build_all(g: &Global, a: &RunArgs, variants: Vec<Variant>) -> Result<Vec<Built>> {
    let path = config_path(g)?;
    let mut out = Vec::new();
    for variant in variants {
        let mut sets = g.sets.clone();
        sets.extend(variant.sets.iter().cloned());
        let mut cfg =
            Config::load(&path, &sets).map_err(|e| coded(USAGE, format!("sweep variant `{}`: {e}", variant.label)))?;
        if g.offline {
            cfg.run.offline = true;
        }
        let mut pipeline = build_pipeline(&cfg)?;
        if let Some(u) = &a.until {
            pipeline = pipeline.subgraph_until(u).map_err(|e| coded(USAGE, e.to_string()))?;
        }
        for f in &a.force {
            if !pipeline.contains(f) {
                let near = wdro_stages::config::closest(f, pipeline.names().into_iter());
                return Err(coded(USAGE, format!("no stage named `{f}`{near}; `wdro dag` lists the stage names")));
            }
        }
        out.push(Built { variant, cfg, pipeline });
    }
    Ok(out)
}

pub fn run_sweep(g: &Global, a: &RunArgs) -> Result<i32> {
    if a.emit.is_some() && a.executor == ExecutorArg::Local {
        return Err(coded(USAGE, "--emit writes cluster jobs: add --executor slurm or --executor k8s"));
    }
    if a.executor == ExecutorArg::K8s && a.emit.is_none() {
        return Err(coded(USAGE, "--executor k8s only writes manifests: pass --emit DIR (and kubectl apply them)"));
    }
    let axes = sweep::parse_axes(&a.sweep).map_err(|e| coded(USAGE, e.to_string()))?;
    let built = build_all(g, a, sweep::expand(&axes))?;
    let dirs: BTreeSet<_> = built.iter().map(|b| cache_dir(g, &b.cfg)).collect();
    if dirs.len() > 1 {
        return Err(coded(USAGE, "the sweep changes run.cache_dir; all variants must share one cache"));
    }
    let store = open_store(g, &cache_dir(g, &built[0].cfg))?;
    let n = built.len();
    let mut all_opts: Vec<ExecOptions> = Vec::new();
    for b in &built {
        let mut opts = ExecOptions::new(env_for(&b.cfg), env!("CARGO_PKG_VERSION"));
        opts.plan = PlanOptions::new(env_for(&b.cfg));
        opts.plan.force = a.force.iter().cloned().collect();
        super::remote::attach(g, &b.cfg, &mut opts.plan)?;
        opts.max_workers = b.cfg.run.max_workers;
        opts.config_digest = Digest::of_bytes(b.cfg.to_toml().as_bytes());
        all_opts.push(opts);
    }
    // On a cluster: one submission for all variants first; the loop below then only pulls.
    let mut by_jobs: Option<Vec<BTreeSet<String>>> = None;
    if a.executor != ExecutorArg::Local && !(a.dry_run || a.frozen) {
        match submit_cluster(g, a, &built, &all_opts, &store)? {
            Some(c) => by_jobs = Some(c),
            None => return Ok(0),
        }
    }
    let mut results: Vec<VariantRun> = Vec::new();
    let mut stale = Vec::new();
    for (i, b) in built.iter().enumerate() {
        let label = &b.variant.label;
        if g.json {
            println!(
                "{}",
                json!({"event": "sweep_variant", "index": i + 1, "of": n, "label": label, "sets": b.variant.sets})
            );
        } else {
            eprintln!("sweep {}/{n}: {label}", i + 1);
        }
        let opts = &all_opts[i];
        if a.dry_run || a.frozen {
            let p = dry_run(&b.pipeline, &store, opts)?;
            let to_run: Vec<&str> =
                p.entries().iter().filter(|e| !e.status.is_cached()).map(|e| e.name.as_str()).collect();
            if g.json {
                println!("{}", json!({"event": "sweep_plan", "label": label, "to_run": to_run}));
            } else {
                eprintln!(
                    "  {} of {} stages to run{}",
                    to_run.len(),
                    p.entries().len(),
                    if to_run.is_empty() { String::new() } else { format!(": {}", to_run.join(", ")) }
                );
            }
            if !to_run.is_empty() {
                stale.push(label.clone());
            }
            continue;
        }
        let observer: Box<dyn Observer> =
            if g.json { Box::new(JsonObserver::stdout()) } else { Box::new(HumanObserver::new(progress(g.progress))) };
        let report = match execute(&b.pipeline, &store, opts, observer.as_ref()) {
            Ok(r) => r,
            Err(ExecError::StageFailed { stage, message, .. }) => {
                let id = b.pipeline.stage(&stage).map(|s| s.id().0).unwrap_or_default();
                let code = if matches!(id.as_str(), "fetch" | "dataset") { DATA } else { STAGE_FAILED };
                return Err(coded(
                    code,
                    format!("sweep variant `{label}`: stage `{stage}` failed: {message}; finished stages and variants are cached, rerun to continue"),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        let mut tables = std::collections::BTreeMap::new();
        for s in &report.stages {
            if let (Some(model), Some(key)) = (s.name.strip_prefix("eval."), s.key) {
                if let Some(rec) = store.get_record(&key)? {
                    tables.insert(model.to_string(), wdro_stages::gates::metrics_of(&rec.metrics));
                }
            }
        }
        results.push(VariantRun {
            label: label.clone(),
            run_id: report.run_id.clone(),
            stages: report
                .stages
                .iter()
                .filter(|s| matches!(s.outcome, Outcome::Hit | Outcome::Computed))
                .filter_map(|s| s.key.map(|k| (s.name.clone(), k.to_string())))
                .collect(),
            computed: match &by_jobs {
                // The local run only pulled: the jobs computed (the task of each shared stage
                // belongs to the first variant that has it).
                Some(c) => report.stages.iter().filter(|s| c[i].contains(&s.name)).map(|s| s.name.clone()).collect(),
                None => report.stages.iter().filter(|s| s.outcome.is_computed()).map(|s| s.name.clone()).collect(),
            },
            tables,
        });
    }
    if a.dry_run || a.frozen {
        if a.frozen && !stale.is_empty() {
            return Err(coded(
                FROZEN,
                format!("--frozen: {} of {n} variants would compute stages ({})", stale.len(), stale.join("; ")),
            ));
        }
        return Ok(0);
    }
    let cmp = sweep::comparison(&results);
    let shared = sweep::sharing(&results);
    if g.json {
        println!("{}", json!({"event": "sweep_summary", "variants": results, "comparison": cmp, "shared": shared}));
    } else {
        print!("{}", sweep::render(&results, &cmp));
        eprint!("\n{}", sweep::render_sharing(&results, &shared));
    }
    Ok(0)
}

/// Submits every variant's stages to run as one set of Slurm job arrays (a stage shared by
/// several variants once), follows them to the end, and returns per variant the stages the jobs
/// computed for it. With `--emit DIR`, writes the scripts (or the K8s manifests) and returns
/// `None`.
fn submit_cluster(
    g: &Global,
    a: &RunArgs,
    built: &[Built],
    all_opts: &[ExecOptions],
    store: &wdro_cache::Store,
) -> Result<Option<Vec<BTreeSet<String>>>> {
    let Some(remote) = all_opts[0].plan.remote.clone() else {
        return Err(coded(
            USAGE,
            "cluster executors coordinate only through the shared remote cache: add [remote] url = \"file:///shared/dir\" (or s3://…, https://…) to the config, or pass --remote URL",
        ));
    };
    let setup = cluster_setup(g, &built[0].cfg, remote.display(), a.emit.as_deref())?;
    let ex = SlurmExecutor { opts: setup.slurm, emit_only: a.emit.is_some() };
    let variants: Vec<slurm::Variant<'_>> = built
        .iter()
        .zip(all_opts)
        .map(|(b, o)| slurm::Variant {
            label: b.variant.label.clone(),
            sets: b.variant.sets.clone(),
            pipeline: &b.pipeline,
            opts: o,
        })
        .collect();
    let (plans, arrays) = ex.variant_arrays(&variants, store)?;
    let to_run: usize = plans.iter().map(|p| p.summary().to_run).sum();
    let tasks: usize = arrays.iter().map(|x| x.tasks.len()).sum();
    let shared: usize = arrays.iter().flat_map(|x| &x.tasks).filter(|t| !t.shared_with.is_empty()).count();
    let executor = format!("{:?}", a.executor).to_lowercase();
    if g.json {
        println!(
            "{}",
            json!({"event": "sweep_submit", "executor": executor, "variants": built.len(), "stages_to_run": to_run,
                   "tasks": tasks, "shared_tasks": shared, "jobs": arrays.len(), "dir": setup.dir,
                   "emit_only": a.emit.is_some()})
        );
    } else {
        eprintln!(
            "sweep on {executor}: {} variants, {to_run} stage(s) to run → {tasks} task(s) in {} job(s) ({shared} shared by several variants, submitted once)",
            built.len(),
            arrays.len()
        );
    }
    if let Some(d) = &a.emit {
        emit_files(g, a.executor, d, &ex, &arrays, &setup.config_text, &setup.global, &a.image)?;
        return Ok(None);
    }
    let observer: Box<dyn Observer> =
        if g.json { Box::new(JsonObserver::stdout()) } else { Box::new(HumanObserver::new(progress(g.progress))) };
    match ex.submit_variants(&variants, &plans, &arrays, observer.as_ref()) {
        Ok(c) => {
            if !g.json {
                eprintln!("slurm scripts and logs: {}", setup.dir.display());
            }
            Ok(Some(c))
        }
        Err(ExecError::StageFailed { stage, message, .. }) => Err(coded(
            STAGE_FAILED,
            format!("stage `{stage}` failed on Slurm: {message}; finished stages are on the remote, rerun the sweep to submit only what is missing"),
        )),
        Err(e) => Err(e.into()),
    }
}

#[allow(clippy::too_many_arguments)]
fn emit_files(
    g: &Global,
    executor: ExecutorArg,
    dir: &Path,
    ex: &SlurmExecutor,
    arrays: &[slurm::JobArray],
    config_text: &str,
    global: &[String],
    image: &str,
) -> Result<()> {
    let files = match executor {
        ExecutorArg::K8s => k8s::emit(
            arrays,
            &K8sOptions {
                image: image.to_string(),
                namespace: None,
                config_text: config_text.to_string(),
                wdro_args: global.to_vec(),
                parallelism: 16,
                dir: ex.opts.script_dir.clone(),
            },
        )?,
        _ => slurm::emit(arrays, &ex.opts)?,
    };
    if g.json {
        println!(
            "{}",
            json!({"event": "emitted", "dir": dir, "jobs": arrays.len(),
                   "files": files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>()})
        );
    } else {
        eprintln!("wrote {} job(s) to {}", arrays.len(), ex.opts.script_dir.display());
        for f in &files {
            println!("{}", f.display());
        }
    }
    Ok(())
}
