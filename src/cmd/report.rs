//! `wdro report runs | diff | plot | html`: reports from the cache's run and stage records.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::json;
use wdro_cache::Store;
use wdro_stages::report::diff::{self, RunSide};
use wdro_stages::report::evaluation::EvalReport;
use wdro_stages::report::figures::{self, FinetuneLog, ModelTable};
use wdro_stages::report::html::{self, HtmlRun, Page};
use wdro_stages::report::runs::{self, LoadedRun};
use wdro_stages::report::{plot, ReportError};

use crate::context::{cache_dir, load_config, open_store};
use crate::exit::{coded, USAGE};
use crate::Global;

#[derive(Subcommand, Debug)]
pub enum ReportCmd {
    /// List the recorded runs, oldest first: id, pins, stages used and computed.
    Runs,
    /// Compare two runs metric by metric (with deltas) and name the stages whose keys differ.
    Diff(DiffArgs),
    /// Draw the paper's figures 7.1–7.4 and accuracy against δ as SVG files.
    Plot(PlotArgs),
    /// Write one self-contained HTML page with the tables, gates and figures.
    Html(HtmlArgs),
}

#[derive(Args, Debug)]
pub struct DiffArgs {
    /// A run: its id (or a unique prefix), `latest`, `latest~N` or a pin name.
    pub run_a: String,
    /// The run to compare it with.
    pub run_b: String,
    /// Markdown tables instead of aligned text.
    #[arg(long)]
    pub markdown: bool,
}

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Runs to plot (repeatable; their models are compared in one figure); default: the latest
    /// run with an evaluation table.
    #[arg(long = "run", value_name = "RUN")]
    pub runs: Vec<String>,
    /// Directory for the SVG files.
    #[arg(long, default_value = "wdro-report")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct HtmlArgs {
    /// Runs to report (repeatable); default: the latest run with an evaluation table.
    #[arg(long = "run", value_name = "RUN")]
    pub runs: Vec<String>,
    /// Gate results to include: `wdro eval --report-json` files (repeatable).
    #[arg(long = "eval-json", value_name = "FILE")]
    pub evals: Vec<PathBuf>,
    /// The page to write.
    #[arg(long, default_value = "wdro-report.html")]
    pub out: PathBuf,
}

/// Report errors: unknown runs and empty reports are usage errors.
fn map(e: ReportError) -> anyhow::Error {
    match e {
        ReportError::Run { .. } | ReportError::Nothing(_) | ReportError::Write { .. } => coded(USAGE, e.to_string()),
        other => other.into(),
    }
}

fn store(g: &Global) -> Result<Store> {
    // Reports need only the cache location, not a valid pipeline.
    let dir = match load_config(g) {
        Ok((_, cfg)) => cache_dir(g, &cfg),
        Err(e) => match &g.cache_dir {
            Some(d) => d.clone(),
            None => return Err(e),
        },
    };
    if !dir.exists() {
        return Err(coded(
            USAGE,
            format!("no cache at {}: run `wdro run` or `wdro eval` first, or pass --cache-dir", dir.display()),
        ));
    }
    open_store(g, &dir)
}

/// The runs named on the command line, else the latest run with an evaluation table.
fn load_runs(s: &Store, specs: &[String]) -> Result<Vec<LoadedRun>> {
    if specs.is_empty() {
        let r = runs::latest_where(s, runs::has_eval)
            .map_err(map)?
            .ok_or_else(|| coded(USAGE, "no run with an evaluation table yet: run `wdro run` or `wdro eval` first"))?;
        return Ok(vec![LoadedRun::load(s, "latest", r).map_err(map)?]);
    }
    specs
        .iter()
        .map(|spec| {
            let r = runs::resolve(s, spec).map_err(map)?;
            LoadedRun::load(s, spec, r).map_err(map)
        })
        .collect()
}

/// Models (evaluation tables) and fine-tuning logs of the runs, labelled by run when several.
fn figure_data(s: &Store, loaded: &[LoadedRun]) -> Result<(Vec<ModelTable>, Vec<FinetuneLog>)> {
    let many = loaded.len() > 1;
    let label = |l: &LoadedRun, m: &str| if many { format!("{}:{m}", l.label) } else { m.to_string() };
    let mut models = Vec::new();
    let mut logs = Vec::new();
    for l in loaded {
        for (m, metrics) in l.tables() {
            models.push(ModelTable { label: label(l, &m), metrics });
        }
        if let Some(v) = l.output_json(s, "finetune", "log").map_err(map)? {
            match figures::parse_finetune_log(&v) {
                Ok(epochs) => logs.push(FinetuneLog { label: label(l, "finetuned"), epochs }),
                Err(e) => eprintln!("note: run {}: {e}", l.label),
            }
        }
    }
    Ok((models, logs))
}

fn runs_cmd(g: &Global, s: &Store) -> Result<i32> {
    let all = s.runs()?;
    let pins = s.pins()?;
    let pinned = |id: &str| pins.iter().filter(|p| p.1 == id).map(|p| p.0.clone()).collect::<Vec<_>>();
    if g.json {
        let v: Vec<_> = all
            .iter()
            .map(|r| {
                json!({"id": r.id, "started_at": r.started_at, "config_digest": r.config_digest.to_string(),
                       "pins": pinned(&r.id), "stages": r.stages.iter().map(|(n, k)| json!({"stage": n, "key": k.to_string()})).collect::<Vec<_>>(),
                       "computed": r.computed})
            })
            .collect();
        println!("{}", serde_json::to_string(&v)?);
        return Ok(0);
    }
    if all.is_empty() {
        eprintln!("no runs recorded yet");
        return Ok(0);
    }
    println!("{:<28} {:>6} {:>9}  {:<24} pins", "run", "stages", "computed", "evaluated");
    let n = all.len();
    for (i, r) in all.iter().enumerate() {
        let evals: Vec<&str> = r.stages.iter().filter_map(|(s, _)| s.strip_prefix("eval.")).collect();
        let mut names = pinned(&r.id);
        let back = n - 1 - i;
        names.insert(0, if back == 0 { "latest".into() } else { format!("latest~{back}") });
        println!(
            "{:<28} {:>6} {:>9}  {:<24} {}",
            r.id,
            r.stages.len(),
            r.computed.len(),
            if evals.is_empty() { "-".to_string() } else { evals.join(",") },
            names.join(", ")
        );
    }
    Ok(0)
}

pub fn dispatch(g: &Global, c: &ReportCmd) -> Result<i32> {
    let s = store(g)?;
    match c {
        ReportCmd::Runs => runs_cmd(g, &s),
        ReportCmd::Diff(a) => {
            let la = load_runs(&s, std::slice::from_ref(&a.run_a))?.remove(0);
            let lb = load_runs(&s, std::slice::from_ref(&a.run_b))?.remove(0);
            let d = diff::diff(&RunSide::from_loaded(&la), &RunSide::from_loaded(&lb));
            if g.json {
                println!("{}", serde_json::to_string(&d)?);
            } else if a.markdown {
                print!("{}", diff::render_markdown(&d));
            } else {
                print!("{}", diff::render_text(&d));
            }
            Ok(0)
        }
        ReportCmd::Plot(a) => {
            let loaded = load_runs(&s, &a.runs)?;
            let (models, logs) = figure_data(&s, &loaded)?;
            let (figs, skipped) = figures::all(&models, &logs);
            for why in &skipped {
                eprintln!("note: not drawn: {why}");
            }
            if figs.is_empty() {
                return Err(coded(USAGE, "nothing to plot: the runs have no evaluation tables or fine-tuning logs"));
            }
            std::fs::create_dir_all(&a.out)
                .map_err(|e| coded(USAGE, format!("cannot create {}: {e}", a.out.display())))?;
            let mut written = Vec::new();
            for f in &figs {
                let svg = plot::render(f).map_err(|e| coded(USAGE, e))?;
                let path = a.out.join(format!("{}.svg", f.id));
                wdro_stages::report::write_file(&path, svg).map_err(map)?;
                written.push(json!({"figure": f.id, "path": path, "series": f.series.iter().map(|x| &x.name).collect::<Vec<_>>()}));
                if !g.json {
                    println!("{}", path.display());
                }
            }
            if g.json {
                println!("{}", json!({"event": "plots", "written": written, "skipped": skipped}));
            }
            Ok(0)
        }
        ReportCmd::Html(a) => {
            let loaded = load_runs(&s, &a.runs)?;
            let (models, logs) = figure_data(&s, &loaded)?;
            let (figs, skipped) = figures::all(&models, &logs);
            let mut figures = Vec::new();
            for f in figs {
                let svg = plot::render(&f).map_err(|e| coded(USAGE, e))?;
                figures.push((f, svg));
            }
            let mut evals = Vec::new();
            for p in &a.evals {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| coded(USAGE, format!("--eval-json {}: {e}", p.display())))?;
                let r: EvalReport = serde_json::from_str(&text).map_err(|e| {
                    coded(USAGE, format!("--eval-json {}: not a `wdro eval --report-json` file ({e})", p.display()))
                })?;
                evals.push(r);
            }
            let runs = loaded
                .iter()
                .map(|l| HtmlRun {
                    label: l.label.clone(),
                    id: l.record.id.clone(),
                    config_digest: l.record.config_digest.to_string(),
                    tables: l.tables(),
                    table_keys: l
                        .record
                        .stages
                        .iter()
                        .filter_map(|(n, k)| Some((n.strip_prefix("eval.")?.to_string(), k.to_string())))
                        .collect(),
                    stages: l
                        .record
                        .stages
                        .iter()
                        .map(|(n, k)| (n.clone(), k.to_string(), l.record.computed.contains(n)))
                        .collect(),
                })
                .collect();
            let page = Page { wdro_version: env!("CARGO_PKG_VERSION").into(), runs, evals, figures, skipped };
            if let Some(d) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(d).map_err(|e| coded(USAGE, format!("cannot create {}: {e}", d.display())))?;
            }
            wdro_stages::report::write_file(&a.out, html::to_html(&page)).map_err(map)?;
            if g.json {
                println!("{}", json!({"event": "html", "path": a.out}));
            } else {
                println!("{}", a.out.display());
            }
            Ok(0)
        }
    }
}
