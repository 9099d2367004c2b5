//! `wdro cache ls | show | export | verify | du | gc | pin | lock`.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use wdro_cache::{GcOptions, StageKey, Store};

use crate::context::{cache_dir, load_config, open_store};
use crate::exit::{coded, USAGE};
use crate::Global;

#[derive(Subcommand, Debug)]
pub enum CacheCmd {
    /// List stage records: stage name, key, outputs, size, when.
    Ls,
    /// Show one stage record (a key or a unique key prefix, or a stage name for its latest record).
    Show { key: String },
    /// Write one output of a stage record to a file, verified against its digest (`-o -` for
    /// stdout): `wdro cache export report report -o report.json`.
    Export {
        /// A key, a unique key prefix, or a stage name (its latest record).
        key: String,
        /// The output's name (optional when the stage has one output).
        output: Option<String>,
        /// Destination file, `-` for stdout.
        #[arg(short, long)]
        out: std::path::PathBuf,
    },
    /// Re-hash every blob; quarantine corrupt ones; exit 1 if anything is wrong.
    Verify,
    /// Disk usage by tier and by stage.
    Du,
    /// Remove what the last N runs and the pins do not reach.
    Gc(GcArgs),
    /// Pin the most recent run (or a run id) under a name so gc keeps it.
    Pin {
        name: String,
        #[arg(long)]
        run: Option<String>,
    },
    /// Hold the cache lock for a while (e.g. while copying the cache directory for a backup).
    Lock {
        #[arg(long, default_value_t = 10_000)]
        ms: u64,
    },
}

#[derive(Args, Debug)]
pub struct GcArgs {
    /// Keep everything reachable from the records of the last N runs.
    #[arg(long, default_value_t = 5)]
    pub keep_last: usize,
    /// After removing garbage, also drop the oldest runs' data until the cache fits (e.g. 10G).
    #[arg(long, value_parser = parse_size)]
    pub max_size: Option<u64>,
    /// Print what would be freed, change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_uppercase();
            let m: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("unknown size unit in {s:?}: use K, M, G or T")),
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("bad size {s:?}: e.g. 500M or 10G"))?;
    Ok((v * mult as f64) as u64)
}

fn store(g: &Global) -> Result<Store> {
    // Cache commands work without a valid pipeline; only the cache location is needed.
    let dir = match load_config(g) {
        Ok((_, cfg)) => cache_dir(g, &cfg),
        Err(e) => match &g.cache_dir {
            Some(d) => d.clone(),
            None => return Err(e),
        },
    };
    open_store(g, &dir)
}

fn when(secs: u64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let ago = now.saturating_sub(secs);
    match ago {
        0..=59 => format!("{ago}s ago"),
        60..=3599 => format!("{}m ago", ago / 60),
        3600..=86399 => format!("{}h ago", ago / 3600),
        _ => format!("{}d ago", ago / 86400),
    }
}

pub fn dispatch(g: &Global, c: &CacheCmd) -> Result<i32> {
    let s = store(g)?;
    match c {
        CacheCmd::Ls => {
            let mut recs = s.records()?;
            recs.sort_by(|a, b| a.stage_name.cmp(&b.stage_name).then(b.finished_at.cmp(&a.finished_at)));
            if g.json {
                println!("{}", serde_json::to_string(&recs)?);
                return Ok(0);
            }
            println!("{:<44} {:<12} {:>10} {:>9}  finished", "stage", "key", "size", "took");
            for r in recs {
                let size: u64 = r.outputs.values().map(|o| o.size).sum();
                println!(
                    "{:<44} {:<12} {:>10} {:>8.1}s  {}",
                    r.stage_name,
                    r.key.short(),
                    wdro_cache::maint::human(size),
                    r.duration_ms as f64 / 1000.0,
                    when(r.finished_at)
                );
            }
        }
        CacheCmd::Show { key } => {
            let rec = find_record(&s, key)?;
            println!("{}", serde_json::to_string_pretty(&rec)?);
        }
        CacheCmd::Export { key, output, out } => {
            let rec = find_record(&s, key)?;
            let name = match (output, rec.outputs.len()) {
                (Some(o), _) => o.clone(),
                (None, 1) => rec.outputs.keys().next().cloned().unwrap_or_default(),
                (None, _) => {
                    return Err(coded(
                        USAGE,
                        format!(
                            "{} has {} outputs ({}): name the one to export",
                            rec.stage_name,
                            rec.outputs.len(),
                            rec.outputs.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    ))
                }
            };
            let o = rec.outputs.get(&name).ok_or_else(|| {
                coded(
                    USAGE,
                    format!(
                        "{} has no output {name:?}; its outputs: {}",
                        rec.stage_name,
                        rec.outputs.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                )
            })?;
            if out.as_os_str() == "-" {
                use std::io::Write as _;
                let bytes = s.get_bytes(&o.digest)?;
                std::io::stdout().lock().write_all(&bytes)?;
            } else {
                s.export_to(&o.digest, out)?;
                eprintln!(
                    "wrote {} ({}, {} of {})",
                    out.display(),
                    wdro_cache::maint::human(o.size),
                    name,
                    rec.stage_name
                );
            }
        }
        CacheCmd::Verify => {
            let rep = s.verify()?;
            if g.json {
                println!("{}", serde_json::to_string(&rep)?);
            } else {
                print!("{rep}");
            }
            return Ok(if rep.is_clean() { 0 } else { 1 });
        }
        CacheCmd::Du => {
            let rep = s.du()?;
            if g.json {
                println!("{}", serde_json::to_string(&rep)?);
            } else {
                print!("{rep}");
            }
        }
        CacheCmd::Gc(a) => {
            let rep = s.gc(GcOptions { keep_last_runs: a.keep_last, max_size: a.max_size, dry_run: a.dry_run })?;
            if g.json {
                println!("{}", serde_json::to_string(&rep)?);
            } else {
                print!("{rep}");
            }
        }
        CacheCmd::Pin { name, run } => {
            let id = match run {
                Some(r) => r.clone(),
                None => s
                    .runs()?
                    .last()
                    .map(|r| r.id.clone())
                    .ok_or_else(|| coded(USAGE, "no run to pin yet: run `wdro run` first"))?,
            };
            if !s.runs()?.iter().any(|r| r.id == id) {
                return Err(coded(USAGE, format!("no run {id:?} in the cache (see `wdro cache runs` in --json ls)")));
            }
            s.pin(name, &id)?;
            eprintln!("pinned run {id} as {name:?}");
        }
        CacheCmd::Lock { ms } => {
            eprintln!("holding the cache lock for {ms} ms");
            std::thread::sleep(std::time::Duration::from_millis(*ms));
        }
    }
    Ok(0)
}

/// A full key, a unique key prefix, or a stage name (its latest record).
fn find_record(s: &Store, q: &str) -> Result<wdro_cache::StageRecord> {
    if let Ok(k) = q.parse::<StageKey>() {
        return s.get_record(&k)?.with_context(|| format!("no record with key {q}"));
    }
    if let Some(r) = s.latest_record(q)? {
        return Ok(r);
    }
    let hits: Vec<_> = s.records()?.into_iter().filter(|r| r.key.to_string().starts_with(q)).collect();
    match hits.len() {
        1 => Ok(hits.into_iter().next().unwrap()),
        0 => Err(coded(
            USAGE,
            format!("no record matches {q:?}: give a key, a key prefix or a stage name (see `wdro cache ls`)"),
        )),
        n => Err(coded(USAGE, format!("{n} records match the prefix {q:?}: give more characters"))),
    }
}
