//! `wdro`: the thin command-line front end. It plans, hashes and serves the cache in
//! milliseconds and starts `wdro-worker` processes only for torch stages that must run; it never
//! links libtorch (loading it alone costs 0.2 s and 114 MB).

mod cmd;
mod context;
mod exit;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Wasserstein distributional robustness of image classifiers, as a cached workflow graph.
#[derive(Parser, Debug)]
#[command(name = "wdro", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Config file (default: ./wdro.toml if present, else configs/demo.toml).
    #[arg(long, short = 'c', global = true)]
    pub config: Option<PathBuf>,
    /// Override a config field: `--set finetune.lr=0.02` (repeatable).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Cache directory (overrides run.cache_dir).
    #[arg(long, global = true)]
    pub cache_dir: Option<PathBuf>,
    /// One JSON event per line on stdout instead of human output.
    #[arg(long, global = true)]
    pub json: bool,
    /// Progress bars: auto (only on a terminal), always, never.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    pub progress: ProgressArg,
    /// Fail at once if another wdro holds the cache, instead of waiting.
    #[arg(long, global = true)]
    pub no_wait: bool,
    /// Never use the network.
    #[arg(long, global = true)]
    pub offline: bool,
    /// Remote cache URL (overrides [remote] url): file:///dir, https://host/path, s3://bucket/prefix.
    #[arg(long, global = true, value_name = "URL")]
    pub remote: Option<String>,
    /// Ignore any remote cache for this command.
    #[arg(long, global = true, conflicts_with = "remote")]
    pub no_remote: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressArg {
    Auto,
    Always,
    Never,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the pipeline: reuse cached stages, compute the rest.
    Run(cmd::run::RunArgs),
    /// Show what is cached and what would run, with the reason.
    Plan(cmd::run::PlanArgs),
    /// Explain why a stage would rerun (the exact changed field or input).
    Why(cmd::run::WhyArgs),
    /// Draw the pipeline graph, coloured by status.
    Dag(cmd::run::DagArgs),
    /// Show the resolved config.
    #[command(subcommand)]
    Config(cmd::config::ConfigCmd),
    /// Inspect and maintain the cache.
    #[command(subcommand)]
    Cache(cmd::cache::CacheCmd),
    /// The model registry (RobustBench names and offline models).
    #[command(subcommand)]
    Models(cmd::models::ModelsCmd),
    /// Evaluate a checkpoint through the cached stages and check robustness gates (CI).
    Eval(cmd::eval::EvalArgs),
    /// Reports from cached runs: list runs, diff two runs, plot the figures, one HTML page.
    #[command(subcommand)]
    Report(cmd::report::ReportCmd),
    /// Upload this pipeline's cached results (or --all) to the remote cache.
    Push(cmd::remote::PushArgs),
    /// Download results from the remote cache into the local one.
    Pull(cmd::remote::PullArgs),
    /// Inspect and maintain the remote cache.
    #[command(subcommand)]
    Remote(cmd::remote::RemoteCmd),
    /// Compute one stage for a cluster job (`--executor slurm|k8s`): pull inputs from the
    /// remote cache, run, push, exit.
    #[command(hide = true)]
    Worker(cmd::worker::WorkerArgs),
}

fn main() {
    let cli = Cli::parse();
    let code = match cmd::dispatch(&cli) {
        Ok(code) => code,
        Err(e) => {
            let code = exit::classify(&e);
            // One line: the cause chain joined, no backtrace.
            let msg = e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ");
            let msg = msg.lines().next().unwrap_or("").to_string();
            if cli.global.json {
                println!("{}", serde_json::json!({"event": "error", "message": msg, "exit_code": code}));
            }
            eprintln!("error: {msg}");
            code
        }
    };
    std::process::exit(code);
}
