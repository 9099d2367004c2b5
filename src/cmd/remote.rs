//! `wdro push | pull | remote ls | du | verify | gc | info`, and the remote cache that `run`,
//! `plan` and `why` consult (`[remote]` in wdro.toml, `--remote URL`, `--no-remote`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::json;
use wdro_cache::remote::maint::RemoteGcOptions;
use wdro_cache::{ManifestPut, PushSummary, Remote, RemoteMode, RemoteOptions, Store};
use wdro_pipeline::plan::{plan as make_plan, PlanOptions, RemoteDownload, Status};
use wdro_stages::config::{Config, RemoteDownloadCfg, RemoteModeCfg};

use crate::context::{build_pipeline, cache_dir, env_for, load_config, open_store};
use crate::exit::{coded, DATA, USAGE};
use crate::Global;

#[derive(Args, Debug)]
pub struct PushArgs {
    /// Push every record, run and pin in the local cache, not only this pipeline's stages.
    #[arg(long, conflicts_with = "stages")]
    pub all: bool,
    /// Stages to push (default: every stage of the pipeline that is cached locally).
    pub stages: Vec<String>,
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// Stages to pull with all their outputs (default: every stage the remote has).
    pub stages: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum RemoteCmd {
    /// The remote's URL (without credentials), mode and conditional-write support.
    Info,
    /// Manifests on the remote: stage, key, size, when.
    Ls,
    /// Objects and bytes on the remote, by kind.
    Du,
    /// Download and re-hash every blob, validate every manifest; exit 1 if anything is wrong.
    Verify,
    /// Remove what no pinned run and none of the last N runs reach.
    Gc(RemoteGcArgs),
}

#[derive(Args, Debug)]
pub struct RemoteGcArgs {
    /// Also keep what the newest N run records reach.
    #[arg(long, default_value_t = 5)]
    pub keep_last: usize,
    /// Never delete objects younger than this (another user may be mid-push): 30m, 24h, 7d.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub grace: Duration,
    /// Print what would be removed, change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let n: u64 = num.trim().parse().map_err(|_| format!("bad duration {s:?}: e.g. 30m, 24h, 7d"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("bad duration unit in {s:?}: use s, m, h or d")),
    };
    Ok(Duration::from_secs(n * secs))
}

/// The remote to use: none with `--no-remote`, else `--remote URL`, else `[remote]`.
pub fn open_remote(g: &Global, cfg: Option<&Config>) -> Result<Option<Arc<Remote>>> {
    if g.no_remote {
        return Ok(None);
    }
    let section = cfg.and_then(|c| c.remote.as_ref());
    let Some(url) = g.remote.clone().or_else(|| section.map(|r| r.url.clone())) else { return Ok(None) };
    // `--offline` (or run.offline) means no network: only a directory remote stays usable.
    if (g.offline || cfg.is_some_and(|c| c.run.offline)) && !url.starts_with("file:") {
        return Ok(None);
    }
    let mut opts = RemoteOptions::default();
    if let Some(r) = section {
        opts.mode = match r.mode {
            RemoteModeCfg::ReadWrite => RemoteMode::ReadWrite,
            RemoteModeCfg::ReadOnly => RemoteMode::ReadOnly,
        };
        opts.jobs = r.jobs;
        let secs = Duration::from_secs_f64;
        opts.lease.ttl = secs(r.lease_ttl_s);
        opts.lease.grace = secs(r.lease_grace_s.unwrap_or(r.lease_ttl_s));
        opts.lease.poll = secs(r.lease_poll_s);
        opts.lease.enabled = r.leases;
    }
    let remote = Remote::open(&url, opts).map_err(|e| coded(USAGE, e.to_string()))?;
    let json = g.json;
    remote.set_warning_sink(Box::new(move |msg| {
        if json {
            println!("{}", json!({"event": "remote_warning", "message": msg}));
        }
        eprintln!("warning: {msg}");
    }));
    Ok(Some(Arc::new(remote)))
}

/// Adds the remote (if any) to plan options: what `run`, `plan` and `why` call.
pub fn attach(g: &Global, cfg: &Config, o: &mut PlanOptions) -> Result<()> {
    o.remote = open_remote(g, Some(cfg))?;
    o.remote_download = match cfg.remote.as_ref().map(|r| r.download).unwrap_or_default() {
        RemoteDownloadCfg::Minimal => RemoteDownload::Minimal,
        RemoteDownloadCfg::Toplevel => RemoteDownload::Toplevel,
        RemoteDownloadCfg::All => RemoteDownload::All,
    };
    Ok(())
}

fn require(g: &Global, cfg: Option<&Config>) -> Result<Arc<Remote>> {
    open_remote(g, cfg)?.ok_or_else(|| {
        coded(
            USAGE,
            if g.no_remote {
                "--no-remote: this command needs the remote cache".to_string()
            } else {
                "no remote cache: add [remote] url = \"s3://bucket/prefix\" (or file:///dir, https://host/path) to wdro.toml, or pass --remote URL".to_string()
            },
        )
    })
}

fn human(b: u64) -> String {
    wdro_cache::maint::human(b)
}

fn print_pushes(g: &Global, sum: &PushSummary) {
    for p in &sum.pushed {
        let what = match &p.manifest {
            ManifestPut::Created => "pushed",
            ManifestPut::Present => "already on the remote",
            ManifestPut::Conflict { .. } => "CONFLICT (nondeterministic: the remote keeps its first result)",
        };
        if g.json {
            println!(
                "{}",
                json!({"event": "remote_push", "stage": p.stage_name, "key": p.key, "blobs": p.blobs_uploaded,
                       "bytes": p.bytes_uploaded, "manifest": p.manifest})
            );
        } else {
            eprintln!(
                "  {:<40} {what} [key {}] ({} in {} blobs)",
                p.stage_name,
                p.key.short(),
                human(p.bytes_uploaded),
                p.blobs_uploaded
            );
        }
    }
    for (stage, e) in &sum.failed {
        if g.json {
            println!("{}", json!({"event": "remote_push_failed", "stage": stage, "error": e}));
        }
        eprintln!("  {stage:<40} FAILED: {e}");
    }
}

/// Pushes pins and the run records they name (gc on the remote keeps what pins reach).
fn push_pins(store: &Store, remote: &Remote) -> Result<usize> {
    let runs = store.runs()?;
    let mut n = 0;
    for (name, id) in store.pins()? {
        if let Some(run) = runs.iter().find(|r| r.id == id) {
            remote.put_run(run)?;
            remote.put_pin(&name, &id)?;
            n += 1;
        }
    }
    Ok(n)
}

pub fn push(g: &Global, a: &PushArgs) -> Result<i32> {
    let (_, cfg) = load_config(g)?;
    let remote = require(g, Some(&cfg))?;
    if remote.is_read_only() {
        return Err(coded(USAGE, format!("remote {} is read-only (remote.mode = \"read-only\")", remote.display())));
    }
    let store = open_store(g, &cache_dir(g, &cfg))?;
    let t0 = std::time::Instant::now();
    let mut skipped = Vec::new();
    if a.all {
        for rec in store.records()? {
            if store.is_complete(&rec.key)? {
                remote.push_stage(&store, &rec)?;
            }
        }
        for run in store.runs()? {
            remote.put_run(&run)?;
        }
    } else {
        let pipeline = build_pipeline(&cfg)?;
        for n in &a.stages {
            if !pipeline.contains(n) {
                let near = wdro_stages::config::closest(n, pipeline.names().into_iter());
                return Err(coded(USAGE, format!("no stage named `{n}`{near}; `wdro dag` lists the stage names")));
            }
        }
        let plan = make_plan(&pipeline, &store, &PlanOptions::new(env_for(&cfg)))?;
        for e in plan.entries() {
            if !a.stages.is_empty() && !a.stages.contains(&e.name) {
                continue;
            }
            match (&e.status, e.key) {
                (Status::Cached, Some(k)) => match store.get_record(&k)? {
                    Some(rec) => remote.push_stage(&store, &rec)?,
                    None => skipped.push(e.name.clone()),
                },
                _ => skipped.push(e.name.clone()),
            }
        }
    }
    let pins = push_pins(&store, &remote)?;
    let sum = remote.wait_pushes();
    print_pushes(g, &sum);
    for s in &skipped {
        eprintln!("  {s:<40} not pushed: not in the local cache (run it first)");
    }
    let created = sum.pushed.iter().filter(|p| p.manifest == ManifestPut::Created).count();
    let summary = format!(
        "pushed {created} of {} stages to {} ({} in {} blobs, {pins} pins) in {:.2} s",
        sum.pushed.len(),
        remote.display(),
        human(sum.bytes_uploaded()),
        sum.blobs_uploaded(),
        t0.elapsed().as_secs_f64()
    );
    if g.json {
        println!(
            "{}",
            json!({"event": "push_summary", "stages": sum.pushed.len(), "created": created, "bytes": sum.bytes_uploaded(),
                   "blobs": sum.blobs_uploaded(), "pins": pins, "failed": sum.failed.len(), "skipped": skipped})
        );
    }
    eprintln!("{summary}");
    if !sum.failed.is_empty() {
        return Err(coded(DATA, format!("{} push(es) failed; see above", sum.failed.len())));
    }
    if !a.stages.is_empty() && !skipped.is_empty() {
        return Err(coded(USAGE, format!("not in the local cache: {}", skipped.join(", "))));
    }
    Ok(0)
}

pub fn pull(g: &Global, a: &PullArgs) -> Result<i32> {
    let (_, cfg) = load_config(g)?;
    let remote = require(g, Some(&cfg))?;
    let store = open_store(g, &cache_dir(g, &cfg))?;
    let pipeline = build_pipeline(&cfg)?;
    for n in &a.stages {
        if !pipeline.contains(n) {
            let near = wdro_stages::config::closest(n, pipeline.names().into_iter());
            return Err(coded(USAGE, format!("no stage named `{n}`{near}; `wdro dag` lists the stage names")));
        }
    }
    let t0 = std::time::Instant::now();
    let mut o = PlanOptions::new(env_for(&cfg));
    o.remote = Some(remote.clone());
    let plan = make_plan(&pipeline, &store, &o)?;
    let (mut bytes, mut pulled, mut failed) = (0u64, 0usize, 0usize);
    for e in plan.entries() {
        if !a.stages.is_empty() && !a.stages.contains(&e.name) {
            continue;
        }
        let status = match (&e.status, &e.remote, e.key) {
            (Status::Cached, Some(_), Some(k)) => match remote.get_manifest(&k) {
                Ok(Some(rec)) => match remote.pull_stage(&store, &rec, None) {
                    Ok(n) => {
                        bytes += n;
                        pulled += 1;
                        format!("pulled {}", human(n))
                    }
                    Err(e) => {
                        failed += 1;
                        format!("REFUSED: {e}")
                    }
                },
                Ok(None) => "not on the remote".to_string(),
                Err(e) => {
                    failed += 1;
                    format!("FAILED: {e}")
                }
            },
            (Status::Cached, None, _) => "already local".to_string(),
            _ => "not on the remote (would run)".to_string(),
        };
        if g.json {
            println!("{}", json!({"event": "remote_pull", "stage": e.name, "status": status}));
        } else {
            eprintln!("  {:<40} {status}", e.name);
        }
    }
    eprintln!(
        "pulled {pulled} stages ({}) from {} in {:.2} s",
        human(bytes),
        remote.display(),
        t0.elapsed().as_secs_f64()
    );
    if g.json {
        println!("{}", json!({"event": "pull_summary", "stages": pulled, "bytes": bytes, "failed": failed}));
    }
    if failed > 0 {
        return Err(coded(DATA, format!("{failed} stage(s) could not be pulled; see above")));
    }
    Ok(0)
}

pub fn dispatch(g: &Global, c: &RemoteCmd) -> Result<i32> {
    // Remote commands work without a valid pipeline: `--remote URL` alone is enough.
    let cfg = match load_config(g) {
        Ok((_, cfg)) => Some(cfg),
        Err(e) if g.remote.is_none() => return Err(e),
        Err(_) => None,
    };
    let remote = require(g, cfg.as_ref())?;
    let out = |v: serde_json::Value, text: String| {
        if g.json {
            println!("{v}");
        } else {
            print!("{text}");
        }
    };
    match c {
        RemoteCmd::Info => {
            let cond = remote.conditional_put().map_err(|e| coded(DATA, e.to_string()))?;
            let mode = match remote.mode() {
                RemoteMode::ReadWrite => "read-write",
                RemoteMode::ReadOnly => "read-only",
            };
            out(
                json!({"url": remote.display(), "backend": remote.backend(), "mode": mode, "conditional_put": cond}),
                format!(
                    "url:             {}\nbackend:         {:?}\nmode:            {mode}\nconditional put: {}\n",
                    remote.display(),
                    remote.backend(),
                    match &cond {
                        wdro_cache::CondPut::Native => "native create-if-absent".to_string(),
                        wdro_cache::CondPut::HeadThenPut { why } => format!("HEAD-then-PUT fallback ({why})"),
                    }
                ),
            );
        }
        RemoteCmd::Ls => {
            let ls = remote.ls().map_err(|e| coded(DATA, e.to_string()))?;
            let mut text = format!("{:<44} {:<12} {:>10} {:>9}\n", "stage", "key", "size", "took");
            for e in &ls {
                text.push_str(&format!(
                    "{:<44} {:<12} {:>10} {:>8.1}s\n",
                    e.stage_name,
                    e.key.short(),
                    human(e.bytes),
                    e.duration_ms as f64 / 1000.0
                ));
            }
            out(serde_json::to_value(&ls)?, text);
        }
        RemoteCmd::Du => {
            let du = remote.du().map_err(|e| coded(DATA, e.to_string()))?;
            out(serde_json::to_value(&du)?, du.to_string());
        }
        RemoteCmd::Verify => {
            let rep = remote.verify().map_err(|e| coded(DATA, e.to_string()))?;
            out(serde_json::to_value(&rep)?, rep.to_string());
            return Ok(if rep.is_clean() { 0 } else { 1 });
        }
        RemoteCmd::Gc(a) => {
            let o = RemoteGcOptions { keep_last_runs: a.keep_last, grace: a.grace, dry_run: a.dry_run };
            let rep = remote.gc(&o).map_err(|e| coded(DATA, e.to_string()))?;
            out(serde_json::to_value(&rep)?, rep.to_string());
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("3w").is_err());
    }
}
