//! `wdro run | plan | why | dag`.

use std::collections::BTreeSet;

use anyhow::Result;
use clap::{Args, ValueEnum};
use serde_json::json;
use wdro_cache::Digest;
use wdro_pipeline::exec::{dry_run, execute, ExecError, ExecOptions, Observer};
use wdro_pipeline::graph::Pipeline;
use wdro_pipeline::plan::{explain, plan as make_plan, Plan, PlanOptions, Status};
use wdro_pipeline::render::{to_ascii, to_dot, to_mermaid, HumanObserver, JsonObserver, Progress};
use wdro_stages::config::Config;

use crate::context::{build_pipeline, cache_dir, env_for, load_config, open_store};
use crate::exit::{coded, DATA, FROZEN, STAGE_FAILED, USAGE};
use crate::{Global, ProgressArg};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Rerun this stage even if cached (repeatable).
    #[arg(long)]
    pub force: Vec<String>,
    /// Run only this stage and what it needs.
    #[arg(long)]
    pub until: Option<String>,
    /// Show what would run, run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Fail (exit 6) if anything would have to be computed.
    #[arg(long)]
    pub frozen: bool,
    /// Sweep a config field: `--sweep finetune.beta=1,3,6` (repeatable). Runs the matrix of
    /// all axes through the cache and prints one comparison table.
    #[arg(long, value_name = "KEY=V1,V2,…")]
    pub sweep: Vec<String>,
    /// Where stages run: local (this machine), slurm (job arrays coordinated through the remote
    /// cache), k8s (Indexed Job manifests; needs --emit).
    #[arg(long, value_enum, default_value = "local")]
    pub executor: super::worker::ExecutorArg,
    /// With --executor slurm|k8s: write the job scripts / manifests to DIR, submit nothing.
    #[arg(long, value_name = "DIR")]
    pub emit: Option<std::path::PathBuf>,
    /// Container image of the K8s manifests.
    #[arg(long, default_value = "wdro:latest")]
    pub image: String,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    #[arg(long)]
    pub force: Vec<String>,
    #[arg(long)]
    pub until: Option<String>,
    /// Hash every cached output (finds corrupt blobs; slower).
    #[arg(long)]
    pub verify: bool,
    /// Exit 1 when anything would run (like `dvc status -q`).
    #[arg(long, short = 'q')]
    pub check: bool,
}

#[derive(Args, Debug)]
pub struct WhyArgs {
    /// Stage name, e.g. `finetune` or `attack.pretrained.w-pgd.w2.8_255`.
    pub stage: String,
}

#[derive(Args, Debug)]
pub struct DagArgs {
    #[arg(long, value_enum, default_value = "ascii")]
    pub format: DagFormat,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum DagFormat {
    Ascii,
    Dot,
    Mermaid,
}

struct Loaded {
    cfg: Config,
    config_bytes: Vec<u8>,
    pipeline: Pipeline,
}

fn load(g: &Global, until: Option<&str>) -> Result<Loaded> {
    let (path, cfg) = load_config(g)?;
    let mut config_bytes = std::fs::read(&path).unwrap_or_default();
    for s in &g.sets {
        config_bytes.extend_from_slice(b"\n#--set ");
        config_bytes.extend_from_slice(s.as_bytes());
    }
    let mut pipeline = build_pipeline(&cfg)?;
    if let Some(u) = until {
        pipeline = pipeline.subgraph_until(u).map_err(|e| coded(USAGE, e.to_string()))?;
    }
    Ok(Loaded { cfg, config_bytes, pipeline })
}

fn check_names(p: &Pipeline, names: &[String]) -> Result<()> {
    for n in names {
        if !p.contains(n) {
            let near = wdro_stages::config::closest(n, p.names().into_iter());
            return Err(coded(USAGE, format!("no stage named `{n}`{near}; `wdro dag` lists the stage names")));
        }
    }
    Ok(())
}

fn progress_mode(p: ProgressArg) -> Progress {
    match p {
        ProgressArg::Auto => Progress::Auto,
        ProgressArg::Always => Progress::Always,
        ProgressArg::Never => Progress::Never,
    }
}

fn plan_options(cfg: &Config, force: &[String]) -> PlanOptions {
    let mut o = PlanOptions::new(env_for(cfg));
    o.force = force.iter().cloned().collect::<BTreeSet<_>>();
    o
}

/// Prints a plan: one JSON line per stage, or an aligned table on stderr with the reasons.
fn print_plan(g: &Global, plan: &Plan) {
    if g.json {
        for e in plan.entries() {
            let (status, reasons) = match &e.status {
                Status::Cached => ("cached", vec![]),
                Status::ToRun { reasons } => {
                    ("to_run", reasons.iter().map(|r| serde_json::to_value(r).unwrap_or_default()).collect())
                }
            };
            println!(
                "{}",
                json!({"event": "plan_stage", "stage": e.name, "id": e.id.0, "key": e.key.map(|k| k.to_string()),
                       "status": status, "cache": match (status, &e.remote) {
                           ("cached", Some(_)) => json!("remote"), ("cached", None) => json!("local"), _ => json!(null) },
                       "pull_bytes": e.remote.as_ref().map(|r| r.pull_bytes), "reasons": reasons})
            );
        }
        let s = plan.summary();
        println!("{}", json!({"event": "plan_summary", "total": s.total, "cached": s.cached, "to_run": s.to_run}));
        return;
    }
    let w = plan.entries().iter().map(|e| e.name.len()).max().unwrap_or(10);
    for e in plan.entries() {
        match &e.status {
            Status::Cached => match &e.remote {
                None => eprintln!("  {:<w$}  cached (local)", e.name),
                Some(r) if r.pull_bytes > 0 => {
                    eprintln!("  {:<w$}  cached (remote, {} to pull)", e.name, wdro_cache::maint::human(r.pull_bytes))
                }
                Some(_) => eprintln!("  {:<w$}  cached (remote)", e.name),
            },
            Status::ToRun { reasons } => {
                let why: Vec<String> = reasons.iter().map(|r| r.describe(&e.name)).collect();
                eprintln!("  {:<w$}  to run: {}", e.name, why.join("; "));
            }
        }
    }
    eprintln!("{}", plan.summary());
}

pub fn plan(g: &Global, a: &PlanArgs) -> Result<i32> {
    let l = load(g, a.until.as_deref())?;
    check_names(&l.pipeline, &a.force)?;
    let store = open_store(g, &cache_dir(g, &l.cfg))?;
    let mut o = plan_options(&l.cfg, &a.force);
    o.verify = a.verify;
    super::remote::attach(g, &l.cfg, &mut o)?;
    let p = make_plan(&l.pipeline, &store, &o)?;
    print_plan(g, &p);
    Ok(if a.check && !p.is_up_to_date() { 1 } else { 0 })
}

pub fn why(g: &Global, a: &WhyArgs) -> Result<i32> {
    let l = load(g, None)?;
    check_names(&l.pipeline, std::slice::from_ref(&a.stage))?;
    let store = open_store(g, &cache_dir(g, &l.cfg))?;
    let mut o = plan_options(&l.cfg, &[]);
    super::remote::attach(g, &l.cfg, &mut o)?;
    let p = make_plan(&l.pipeline, &store, &o)?;
    if g.json {
        let e = p.entry(&a.stage).expect("checked");
        println!("{}", serde_json::to_string(e)?);
    } else {
        println!("{}", explain(&p, &a.stage));
    }
    Ok(0)
}

pub fn dag(g: &Global, a: &DagArgs) -> Result<i32> {
    let l = load(g, None)?;
    // Colour by status when the cache is free; drawing never waits for a running pipeline.
    let dir = cache_dir(g, &l.cfg);
    let plan = wdro_cache::Store::open(&dir, wdro_cache::LockWait::NoWait)
        .ok()
        .and_then(|s| make_plan(&l.pipeline, &s, &plan_options(&l.cfg, &[])).ok());
    let text = match a.format {
        DagFormat::Ascii => to_ascii(&l.pipeline, plan.as_ref()),
        DagFormat::Dot => to_dot(&l.pipeline, plan.as_ref()),
        DagFormat::Mermaid => to_mermaid(&l.pipeline, plan.as_ref()),
    };
    print!("{text}");
    Ok(0)
}

pub fn run(g: &Global, a: &RunArgs) -> Result<i32> {
    if !a.sweep.is_empty() {
        return super::sweep::run_sweep(g, a);
    }
    let l = load(g, a.until.as_deref())?;
    check_names(&l.pipeline, &a.force)?;
    let store = open_store(g, &cache_dir(g, &l.cfg))?;
    let mut opts = ExecOptions::new(env_for(&l.cfg), env!("CARGO_PKG_VERSION"));
    opts.plan = plan_options(&l.cfg, &a.force);
    super::remote::attach(g, &l.cfg, &mut opts.plan)?;
    opts.max_workers = l.cfg.run.max_workers;
    opts.config_digest = Digest::of_bytes(&l.config_bytes);
    if a.dry_run || a.frozen {
        let p = dry_run(&l.pipeline, &store, &opts)?;
        print_plan(g, &p);
        if a.frozen && !p.is_up_to_date() {
            return Err(coded(FROZEN, format!("--frozen: {} stage(s) would have to be computed", p.summary().to_run)));
        }
        if a.dry_run {
            return Ok(0);
        }
    }
    let observer: Box<dyn Observer> =
        if g.json { Box::new(JsonObserver::stdout()) } else { Box::new(HumanObserver::new(progress_mode(g.progress))) };
    if a.executor != super::worker::ExecutorArg::Local {
        let (ex, emit, img) = (a.executor, a.emit.as_deref(), a.image.as_str());
        return super::worker::run_cluster(g, ex, emit, img, &l.cfg, &l.pipeline, &store, &opts, observer.as_ref());
    }
    match execute(&l.pipeline, &store, &opts, observer.as_ref()) {
        Ok(report) => {
            if !g.json {
                print_results(&store, &l.pipeline, &report);
            }
            Ok(0)
        }
        Err(ExecError::StageFailed { stage, message, others, .. }) => {
            let id = l.pipeline.stage(&stage).map(|s| s.id().0).unwrap_or_default();
            let code = if matches!(id.as_str(), "fetch" | "dataset") { DATA } else { STAGE_FAILED };
            let also = if others.is_empty() { String::new() } else { format!(" (also failed: {})", others.join(", ")) };
            Err(coded(code, format!("{message}{also}; finished stages are cached, rerun to continue")))
        }
        Err(e) => Err(e.into()),
    }
}

/// After a run: the before/after table (or each evaluation table) on stdout.
fn print_results(store: &wdro_cache::Store, p: &Pipeline, report: &wdro_pipeline::exec::RunReport) {
    let output = |stage: &str, out: &str| -> Option<serde_json::Value> {
        let key = report.stage(stage)?.key?;
        let rec = store.get_record(&key).ok()??;
        let d = rec.outputs.get(out)?.digest;
        serde_json::from_slice(&store.get_bytes(&d).ok()?).ok()
    };
    if p.contains("report") {
        if let Some(r) = output("report", "report") {
            println!("{}", wdro_stages::evaluate::render_rows(&r));
            print!("{}", wdro_stages::evaluate::render_bounds(&r));
        }
        return;
    }
    for name in p.names() {
        if name.starts_with("eval.") {
            if let Some(t) = output(name, "table") {
                let rows = wdro_stages::evaluate::compare(&json!({}), &t);
                println!("{name}");
                println!("{}", wdro_stages::evaluate::render_rows(&rows));
                print!("{}", wdro_stages::evaluate::render_bounds(&rows));
            }
        }
    }
}

/// What a cluster submission needs from the command line and the config: the Slurm options
/// (the binary, the config snapshot, the remote, `[slurm]`), the snapshot's text, the global
/// flags every task gets, and the directory of the scripts and logs.
///
/// Used by `wdro run --executor slurm|k8s` (`worker::run_cluster`) and by sweeps.
pub(crate) struct ClusterSetup {
    pub slurm: wdro_pipeline::slurm::SlurmOptions,
    pub dir: std::path::PathBuf,
    pub config_text: String,
    pub global: Vec<String>,
}

pub(crate) fn cluster_setup(
    g: &Global,
    cfg: &Config,
    remote_display: &str,
    emit: Option<&std::path::Path>,
) -> Result<ClusterSetup> {
    use std::path::PathBuf;
    use wdro_pipeline::slurm::{KindOverride, SlurmOptions};
    let absolute = |p: &std::path::Path| -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir().map(|c| c.join(p)).unwrap_or_else(|_| p.to_path_buf())
        }
    };
    let url = g
        .remote
        .clone()
        .or_else(|| cfg.remote.as_ref().map(|r| r.url.clone()))
        .unwrap_or_else(|| remote_display.to_string());
    let config_text = std::fs::read_to_string(absolute(&crate::context::config_path(g)?))?;
    let dir = match emit {
        Some(d) => absolute(d),
        None => {
            let stamp =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
            absolute(&cache_dir(g, cfg)).join("slurm").join(format!("{stamp}-{}", std::process::id()))
        }
    };
    std::fs::create_dir_all(&dir)?;
    let snapshot = dir.join("config.toml");
    std::fs::write(&snapshot, &config_text)?;
    let mut global: Vec<String> = vec!["--remote".into(), url];
    for s in &g.sets {
        global.push("--set".into());
        global.push(s.clone());
    }
    if g.offline {
        global.push("--offline".into());
    }
    // Without a [slurm] section the options' default retries hold (a derived Default would be 0).
    let retries = cfg.slurm.as_ref().map(|s| s.retries);
    let sc = cfg.slurm.clone().unwrap_or_default();
    let wdro =
        sc.wdro.clone().map(PathBuf::from).or_else(|| std::env::current_exe().ok()).unwrap_or_else(|| "wdro".into());
    let mut cmd = vec![wdro.display().to_string(), "--config".into(), snapshot.display().to_string()];
    cmd.extend(global.iter().cloned());
    let mut so = SlurmOptions::new(cmd, std::env::current_dir()?, dir.clone());
    so.partition = sc.partition.clone();
    so.extra = sc.extra.clone();
    so.retries = retries.unwrap_or(so.retries);
    for (kind, k) in &sc.kinds {
        so.kinds.insert(
            kind.clone(),
            KindOverride {
                partition: k.partition.clone(),
                gpus: k.gpus,
                cpus: k.cpus,
                mem: k.mem.clone(),
                time: k.time.clone(),
                extra: k.extra.clone(),
            },
        );
    }
    Ok(ClusterSetup { slurm: so, dir, config_text, global })
}
