//! `wdro run --sweep KEY=V1,V2,…`: run the matrix of variants through one cache and print one
//! comparison table, plus which shared stages each run computed (the proof that upstream stages
//! ran once).

use std::collections::BTreeSet;

use anyhow::Result;
use serde_json::json;
use wdro_cache::Digest;
use wdro_pipeline::exec::{dry_run, execute, ExecError, ExecOptions, Observer, Outcome};
use wdro_pipeline::graph::Pipeline;
use wdro_pipeline::plan::PlanOptions;
use wdro_pipeline::render::{HumanObserver, JsonObserver, Progress};
use wdro_stages::config::Config;
use wdro_stages::sweep::{self, Variant, VariantRun};

use crate::cmd::run::RunArgs;
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
    if a.executor != crate::cmd::worker::ExecutorArg::Local || a.emit.is_some() {
        return Err(coded(USAGE, "--sweep runs its variants on this machine: drop --executor/--emit, or submit one variant at a time with --set"));
    }
    let axes = sweep::parse_axes(&a.sweep).map_err(|e| coded(USAGE, e.to_string()))?;
    let built = build_all(g, a, sweep::expand(&axes))?;
    let dirs: BTreeSet<_> = built.iter().map(|b| cache_dir(g, &b.cfg)).collect();
    if dirs.len() > 1 {
        return Err(coded(USAGE, "the sweep changes run.cache_dir; all variants must share one cache"));
    }
    let store = open_store(g, &cache_dir(g, &built[0].cfg))?;
    let n = built.len();
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
        let mut opts = ExecOptions::new(env_for(&b.cfg), env!("CARGO_PKG_VERSION"));
        opts.plan = PlanOptions::new(env_for(&b.cfg));
        opts.plan.force = a.force.iter().cloned().collect();
        super::remote::attach(g, &b.cfg, &mut opts.plan)?;
        opts.max_workers = b.cfg.run.max_workers;
        opts.config_digest = Digest::of_bytes(b.cfg.to_toml().as_bytes());
        if a.dry_run || a.frozen {
            let p = dry_run(&b.pipeline, &store, &opts)?;
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
        let report = match execute(&b.pipeline, &store, &opts, observer.as_ref()) {
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
            computed: report.stages.iter().filter(|s| s.outcome.is_computed()).map(|s| s.name.clone()).collect(),
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
