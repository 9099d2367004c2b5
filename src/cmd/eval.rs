//! `wdro eval`: evaluate one checkpoint through the cached stages, check robustness gates, write
//! JSON/JUnit/Markdown reports. Made for CI: `--frozen`, `--offline`, seeds from the config (or
//! `--seed`), no progress output unless stdout is a terminal, and distinct exit codes (0 passed,
//! 1 a gate failed, 2 usage or config, 3 data or network, 4 a stage failed, 6 frozen).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Args, ValueEnum};
use serde::Deserialize;
use serde_json::json;
use wdro_cache::{Digest, Store};
use wdro_pipeline::exec::{dry_run, execute, ExecError, ExecOptions, Observer, Outcome, RunReport};
use wdro_pipeline::graph::Pipeline;
use wdro_pipeline::plan::PlanOptions;
use wdro_pipeline::render::{HumanObserver, JsonObserver, Progress};
use wdro_stages::config::{Config, ModelCfg};
use wdro_stages::gates::{self, Gate, GateError, GateResult};
use wdro_stages::params::{Arch, Norm};
use wdro_stages::report::evaluation::{self, EvalInputs, EvalReport, StageLine};
use wdro_stages::report::{junit, markdown};

use crate::context::{build_pipeline, cache_dir, env_for, load_config, open_store};
use crate::exit::{coded, DATA, FROZEN, GATE_FAILED, STAGE_FAILED, USAGE};
use crate::{Global, ProgressArg};

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Checkpoint to evaluate: `robustbench:NAME` (or a bare RobustBench name), `https://…`,
    /// `file:PATH` or a path; default: the config's [model]. Fine-tuning is never run.
    #[arg(long, value_name = "SOURCE")]
    pub model: Option<String>,
    /// Architecture of --model: a name (`small-cnn`, `keras-cifar-cnn`, `preact-resnet18`) or a
    /// TOML table (`{ name = "wide-resnet", depth = 28, widen = 10 }`); default: the config's.
    #[arg(long, value_name = "ARCH")]
    pub arch: Option<String>,
    /// Pin for --model: `sha256:…` or `blake3:…`.
    #[arg(long)]
    pub digest: Option<String>,
    /// Threat track of a RobustBench name.
    #[arg(long, value_enum)]
    pub threat: Option<ThreatArg>,
    /// A robustness gate, e.g. 'w2_linf_acc@delta=8/255 >= 0.45' (repeatable; operators >=, <=,
    /// >, <, ==; δ as a fraction or a number). The config's [gates] apply too.
    #[arg(long = "gate", value_name = "EXPR")]
    pub gates: Vec<String>,
    /// Ignore the config's [gates] table.
    #[arg(long)]
    pub no_config_gates: bool,
    /// Fail (exit 6) if anything would have to be computed.
    #[arg(long)]
    pub frozen: bool,
    /// Seed of every seeded evaluation stage (attacks, the Υ subset); default: the config's.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write the report (metrics with provenance, gates, stages) as JSON (`-` for stdout).
    #[arg(long, value_name = "FILE")]
    pub report_json: Option<PathBuf>,
    /// Write JUnit XML: each gate a test case, each stage a test case of the `wdro.stages` suite.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Write a Markdown summary for a pull-request comment (`-` for stdout).
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum ThreatArg {
    Linf,
    L2,
}

/// The model stage `wdro eval` evaluates: the pipeline's model under study.
const MODEL: &str = "pretrained";
const TABLE: &str = "eval.pretrained";

fn usage(e: impl std::fmt::Display) -> anyhow::Error {
    coded(USAGE, e.to_string())
}

/// `small-cnn` → `{ name = "small-cnn" }`; a TOML table stays as it is.
fn parse_arch(s: &str) -> Result<Arch> {
    let s = s.trim();
    let table = if s.starts_with('{') { s.to_string() } else { format!("{{ name = {s:?} }}") };
    let v: toml::Table = toml::from_str(&format!("arch = {table}"))
        .map_err(|e| usage(format!("--arch {s}: not a name or a TOML table ({})", e.message())))?;
    let arch = v.get("arch").cloned().unwrap_or(toml::Value::Table(Default::default()));
    Arch::deserialize(arch).map_err(|e| {
        usage(format!(
            "--arch {s}: {}; architectures with required fields take a table, e.g. --arch '{{ name = \"wide-resnet\", depth = 28, widen = 10 }}'",
            e.message().split_whitespace().collect::<Vec<_>>().join(" ")
        ))
    })
}

/// `--model` as a `model.source`: prefixed forms as they are, an existing path as `file:`, a
/// bare RobustBench name as `robustbench:NAME`.
fn model_source(m: &str, threat: Norm) -> Result<String> {
    let m = m.trim();
    if ["robustbench:", "http://", "https://", "file:"].iter().any(|p| m.starts_with(p)) {
        return Ok(m.to_string());
    }
    if Path::new(m).is_file() {
        return Ok(format!("file:{m}"));
    }
    if wdro_stages::registry::lookup(m, threat).is_some() {
        return Ok(format!("robustbench:{m}"));
    }
    let near = wdro_stages::gates::nearest(m, wdro_stages::registry::all().iter().map(|x| x.name)).unwrap_or_default();
    Err(usage(format!(
        "--model {m}: not a file, a URL or a known RobustBench name (closest: {near}); give file:PATH, https://…, robustbench:NAME (`wdro models ls`)"
    )))
}

/// The config `wdro eval` runs: the base config with the --model/--arch/--seed overrides and
/// fine-tuning switched off.
fn eval_config(g: &Global, a: &EvalArgs) -> Result<Config> {
    let (_, mut cfg) = load_config(g)?;
    if let Some(m) = &a.model {
        let base = cfg.model.clone();
        let threat = match a.threat {
            Some(ThreatArg::Linf) => Some(Norm::Linf),
            Some(ThreatArg::L2) => Some(Norm::L2),
            None => base.as_ref().and_then(|b| b.threat),
        };
        let source = model_source(m, threat.unwrap_or(Norm::Linf))?;
        let arch = match &a.arch {
            Some(s) => Some(parse_arch(s)?),
            // RobustBench names take theirs from the registry.
            None if source.starts_with("robustbench:") => None,
            None => base.as_ref().and_then(|b| b.arch.clone()),
        };
        if arch.is_none() && !source.starts_with("robustbench:") {
            return Err(usage(format!(
                "--model {m} needs --arch (e.g. --arch small-cnn), or a config whose [model] has arch"
            )));
        }
        // Through TOML so fields added to [model] later get their defaults.
        let mut t = toml::Table::new();
        t.insert("source".into(), toml::Value::String(source));
        let mut model = ModelCfg::deserialize(toml::Value::Table(t)).map_err(|e| usage(format!("--model {m}: {e}")))?;
        model.arch = arch;
        model.digest = a.digest.clone();
        model.threat = threat;
        cfg.model = Some(model);
    } else if a.arch.is_some() || a.digest.is_some() {
        return Err(usage("--arch and --digest describe --model; pass --model too"));
    }
    if cfg.model.is_none() || cfg.data.is_none() {
        return Err(usage(
            "nothing to evaluate: the config needs [data] (the test set) and a model, from [model] or --model",
        ));
    }
    if let Some(f) = cfg.finetune.as_mut() {
        f.enabled = false;
    }
    if let Some(s) = a.seed {
        if let Some(at) = cfg.attacks.as_mut() {
            at.seed = s;
        }
        if let Some(u) = cfg.upsilon.as_mut() {
            u.seed = s;
        }
    }
    cfg.validate().map_err(usage)?;
    Ok(cfg)
}

/// Every seed that went into the evaluation's keys.
fn seeds(cfg: &Config) -> BTreeMap<String, u64> {
    let mut s = BTreeMap::new();
    if let Some(a) = &cfg.attacks {
        s.insert("attacks.seed".into(), a.seed);
    }
    if let Some(u) = &cfg.upsilon {
        s.insert("upsilon.seed".into(), u.seed);
    }
    if let Some(t) = cfg.model.as_ref().and_then(|m| m.train.as_ref()) {
        s.insert("model.train.seed".into(), t.seed);
    }
    s
}

/// Progress only when stdout is a terminal (a CI log is not), unless `--progress always`.
fn progress(g: &Global) -> Progress {
    match g.progress {
        ProgressArg::Always => Progress::Always,
        ProgressArg::Never => Progress::Never,
        ProgressArg::Auto if std::io::stdout().is_terminal() => Progress::Auto,
        ProgressArg::Auto => Progress::Never,
    }
}

fn outcome(o: &Outcome) -> (&'static str, Option<String>) {
    match o {
        Outcome::Hit => ("hit", None),
        Outcome::Computed => ("computed", None),
        Outcome::Failed { message } => ("failed", Some(message.clone())),
        Outcome::NotRun => ("not_run", None),
    }
}

fn stage_lines(store: &Store, report: &RunReport) -> Vec<StageLine> {
    report
        .stages
        .iter()
        .map(|s| {
            let (o, message) = outcome(&s.outcome);
            let version = s.key.and_then(|k| store.get_record(&k).ok().flatten()).map(|r| r.wdro_version);
            StageLine {
                name: s.name.clone(),
                key: s.key.map(|k| k.to_string()),
                outcome: o.into(),
                duration_ms: s.duration.as_millis() as u64,
                message,
                wdro_version: version,
            }
        })
        .collect()
}

/// `blake3:<hex>` of output `out` of the stage's record in this run.
fn output_digest(store: &Store, report: &RunReport, stage: &str, out: &str) -> Option<String> {
    let key = report.stage(stage)?.key?;
    let rec = store.get_record(&key).ok()??;
    Some(format!("blake3:{}", rec.outputs.get(out)?.digest))
}

fn slots(p: &Pipeline) -> Vec<(String, String)> {
    p.inputs_of(TABLE).unwrap_or(&[]).iter().map(|i| (i.slot.clone(), i.stage.clone())).collect()
}

/// Checks gate names against the metrics the table will have, before anything is computed.
fn check_gate_names(gates: &[Gate], slots: &[(String, String)]) -> Result<()> {
    let predicted: BTreeMap<String, Option<f64>> =
        evaluation::metric_sources(slots).into_keys().map(|k| (k, Some(0.0))).collect();
    for g in gates {
        if let Err(e @ (GateError::UnknownMetric { .. } | GateError::NoMetrics { .. })) = g.check(&predicted) {
            return Err(usage(e));
        }
    }
    Ok(())
}

fn write_out(path: &Path, text: &str) -> Result<()> {
    if path == Path::new("-") {
        print!("{text}");
        return Ok(());
    }
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| usage(format!("cannot create {}: {e}", d.display())))?;
    }
    std::fs::write(path, text).map_err(|e| usage(format!("cannot write {}: {e}; check the path", path.display())))
}

fn write_reports(a: &EvalArgs, r: &EvalReport) -> Result<()> {
    if let Some(p) = &a.report_json {
        write_out(p, &(serde_json::to_string_pretty(r)? + "\n"))?;
    }
    if let Some(p) = &a.junit {
        write_out(p, &junit::to_junit(r))?;
    }
    if let Some(p) = &a.markdown {
        write_out(p, &markdown::to_markdown(r))?;
    }
    Ok(())
}

/// The human summary on stdout: metrics with their stage and key, then the gates.
fn print_summary(r: &EvalReport) {
    println!(
        "{} {} (checkpoint {})",
        TABLE,
        r.model_source,
        r.checkpoint_digest.as_deref().map(|d| &d[..d.len().min(19)]).unwrap_or("-")
    );
    let w = r.metrics.iter().map(|m| m.name.len()).max().unwrap_or(6).max(6);
    println!("  {:<w$}  {:>8}  stage (key)", "metric", "value");
    for m in &r.metrics {
        println!(
            "  {:<w$}  {:>8}  {} ({})",
            m.name,
            m.value.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into()),
            m.provenance.stage,
            m.provenance.stage_key.as_deref().map(|k| &k[..k.len().min(12)]).unwrap_or("-")
        );
    }
    if !r.gates.is_empty() {
        println!("gates: {} of {} passed", r.gates.len() - r.gates_failed, r.gates.len());
        for gl in &r.gates {
            println!("  {}  {}", if gl.passed { "pass" } else { "FAIL" }, gl.message);
        }
    }
}

pub fn eval(g: &Global, a: &EvalArgs) -> Result<i32> {
    let cfg = eval_config(g, a)?;
    let empty = BTreeMap::new();
    let gate_list = gates::collect(if a.no_config_gates { &empty } else { &cfg.gates }, &a.gates).map_err(usage)?;
    let full = build_pipeline(&cfg)?;
    if !full.contains(TABLE) {
        return Err(usage("the config implies no evaluation table: it needs [data] and [model]"));
    }
    let pipeline = full.subgraph_until(TABLE).map_err(usage)?;
    let slots = slots(&pipeline);
    check_gate_names(&gate_list, &slots)?;

    let store = open_store(g, &cache_dir(g, &cfg))?;
    let mut opts = ExecOptions::new(env_for(&cfg), env!("CARGO_PKG_VERSION"));
    opts.plan = PlanOptions::new(env_for(&cfg));
    // The team remote (`[remote]`, `--remote URL`): its results count as cached, also for --frozen.
    super::remote::attach(g, &cfg, &mut opts.plan)?;
    opts.max_workers = cfg.run.max_workers;
    opts.config_digest = Digest::of_bytes(cfg.to_toml().as_bytes());
    if a.frozen {
        let p = dry_run(&pipeline, &store, &opts)?;
        if !p.is_up_to_date() {
            let names: Vec<&str> =
                p.entries().iter().filter(|e| !e.status.is_cached()).map(|e| e.name.as_str()).collect();
            let more = if names.len() > 4 { format!(" and {} more", names.len() - 4) } else { String::new() };
            return Err(coded(
                FROZEN,
                format!(
                    "--frozen: {} stage(s) would have to be computed ({}{more}); restore the cache (wdro pull) or drop --frozen",
                    names.len(),
                    names[..names.len().min(4)].join(", ")
                ),
            ));
        }
    }
    let observer: Box<dyn Observer> =
        if g.json { Box::new(JsonObserver::stdout()) } else { Box::new(HumanObserver::new(progress(g))) };
    let (report, error) = match execute(&pipeline, &store, &opts, observer.as_ref()) {
        Ok(r) => (r, None),
        Err(ExecError::StageFailed { stage, message, report, .. }) => {
            let id = pipeline.stage(&stage).map(|s| s.id().0).unwrap_or_default();
            let code = if matches!(id.as_str(), "fetch" | "dataset") { DATA } else { STAGE_FAILED };
            (*report, Some((code, format!("stage `{stage}` failed: {message}"))))
        }
        Err(e) => return Err(e.into()),
    };
    let lines = stage_lines(&store, &report);
    let metrics = report
        .stage(TABLE)
        .and_then(|s| s.key)
        .and_then(|k| store.get_record(&k).ok().flatten())
        .map(|r| gates::metrics_of(&r.metrics))
        .unwrap_or_default();
    let results = if error.is_none() {
        gate_list.iter().map(|gt| gt.check(&metrics)).collect::<Result<Vec<_>, _>>().map_err(usage)?
    } else {
        // The table was not computed: every gate is reported, as not passed, with no value.
        gate_list
            .iter()
            .map(|gt| GateResult { gate: gt.clone(), metric: gt.metric.clone(), value: None, passed: false })
            .collect()
    };
    let r = evaluation::build(EvalInputs {
        wdro_version: env!("CARGO_PKG_VERSION").into(),
        run_id: report.run_id.clone(),
        config_digest: opts.config_digest.to_string(),
        model: MODEL.into(),
        model_source: cfg.model.as_ref().map(|m| m.source.clone()).unwrap_or_default(),
        seeds: seeds(&cfg),
        table_stage: TABLE.into(),
        slots,
        stages: lines,
        metrics,
        checkpoint_digest: output_digest(&store, &report, "checkpoint.pretrained", "model"),
        checkpoint_source_digest: output_digest(&store, &report, "fetch.checkpoint", "file"),
        gates: results,
        error: error.as_ref().map(|e| e.1.clone()),
    });
    write_reports(a, &r)?;
    if g.json {
        println!("{}", json!({"event": "eval_report", "report": r}));
    } else if error.is_none() {
        print_summary(&r);
    }
    if let Some((code, msg)) = error {
        return Err(coded(code, format!("{msg}; finished stages are cached, rerun to continue")));
    }
    if r.gates_failed > 0 {
        let failed: Vec<&str> = r.gates.iter().filter(|x| !x.passed).map(|x| x.message.as_str()).collect();
        let msg = if failed.len() == 1 {
            failed[0].to_string()
        } else {
            format!("{} gates failed: {}", failed.len(), failed.join("; "))
        };
        return Err(coded(GATE_FAILED, msg));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names_and_tables() {
        assert!(matches!(parse_arch("small-cnn").unwrap(), Arch::SmallCnn { .. }));
        assert!(matches!(
            parse_arch("{ name = \"wide-resnet\", depth = 28, widen = 10 }").unwrap(),
            Arch::WideResnet { depth: 28, widen: 10, .. }
        ));
        let e = parse_arch("wide-resnet").unwrap_err().to_string();
        assert!(e.contains("missing field `depth`") && e.contains("--arch '{"), "{e}");
        let e = parse_arch("smal-cnn").unwrap_err().to_string();
        assert!(e.contains("unknown variant") && e.contains("small-cnn"), "{e}");
    }

    #[test]
    fn model_sources() {
        assert_eq!(model_source("file:x.pt", Norm::Linf).unwrap(), "file:x.pt");
        assert_eq!(model_source("https://h/x.pt", Norm::Linf).unwrap(), "https://h/x.pt");
        assert_eq!(model_source("Cargo.toml", Norm::Linf).unwrap(), "file:Cargo.toml");
        let name = wdro_stages::registry::all().iter().find(|m| m.threat == Some(Norm::Linf)).unwrap().name;
        assert_eq!(model_source(name, Norm::Linf).unwrap(), format!("robustbench:{name}"));
        let e = model_source("Zhang2019Theoreticaly", Norm::Linf).unwrap_err().to_string();
        assert!(e.contains("closest: Zhang2019Theoretically"), "{e}");
    }
}
