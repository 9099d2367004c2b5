//! Shared set-up of every command: the resolved config, the cache, the pipeline.

use std::path::{Path, PathBuf};

use anyhow::Result;
use wdro_cache::{LockWait, Store};
use wdro_pipeline::graph::Pipeline;
use wdro_pipeline::Env;
use wdro_stages::catalogue::{self, BuildEnv};
use wdro_stages::config::Config;
use wdro_stages::worker_stage::{find_worker, TORCH_VERSION};

use crate::exit::{coded, USAGE};
use crate::Global;

/// The config file to use: `--config`, else `./wdro.toml`, else `configs/demo.toml`.
pub fn config_path(g: &Global) -> Result<PathBuf> {
    if let Some(p) = &g.config {
        return Ok(p.clone());
    }
    for cand in ["wdro.toml", "configs/demo.toml"] {
        if Path::new(cand).is_file() {
            return Ok(PathBuf::from(cand));
        }
    }
    Err(coded(USAGE, "no config: pass --config FILE, or run from a directory with wdro.toml or configs/demo.toml"))
}

pub fn load_config(g: &Global) -> Result<(PathBuf, Config)> {
    let path = config_path(g)?;
    let mut cfg = Config::load(&path, &g.sets)?;
    if g.offline {
        cfg.run.offline = true;
    }
    Ok((path, cfg))
}

pub fn cache_dir(g: &Global, cfg: &Config) -> PathBuf {
    g.cache_dir.clone().unwrap_or_else(|| PathBuf::from(&cfg.run.cache_dir))
}

/// Opens the cache, waiting (with one message naming the holder) unless `--no-wait`.
pub fn open_store(g: &Global, dir: &Path) -> Result<Store> {
    let json = g.json;
    let notify = move |holder: &str| {
        if json {
            println!("{}", serde_json::json!({"event": "waiting_for_cache", "holder": holder}));
        }
        eprintln!(
            "waiting for the cache at {}: it is in use by {holder} (use --no-wait to fail instead)",
            dir.display()
        );
    };
    let wait = if g.no_wait { LockWait::NoWait } else { LockWait::Wait(&notify) };
    Ok(Store::open(dir, wait)?)
}

/// Device class for keys, and the device string the worker gets.
///
/// `auto` means CUDA when a GPU device node exists; the worker double-checks and fails with a
/// clear message if its libtorch has no CUDA. CPU and CUDA results differ in the last bits,
/// so the class is part of every torch stage key.
pub fn resolve_device(cfg: &Config) -> (String, String) {
    let d = cfg.run.device.as_str();
    let worker_dev = match d {
        "auto" => {
            if Path::new("/dev/nvidia0").exists() {
                "cuda".to_string()
            } else {
                "cpu".to_string()
            }
        }
        other => other.to_string(),
    };
    let class = if worker_dev.starts_with("cuda") { "cuda" } else { "cpu" };
    (class.to_string(), worker_dev)
}

pub fn env_for(cfg: &Config) -> Env {
    Env { torch_version: TORCH_VERSION.to_string(), device_class: resolve_device(cfg).0 }
}

pub fn build_pipeline(cfg: &Config) -> Result<Pipeline> {
    let (_, device) = resolve_device(cfg);
    let worker = find_worker().unwrap_or_else(|_| PathBuf::from("wdro-worker"));
    let env = BuildEnv { device, worker, offline: cfg.run.offline };
    let stages = catalogue::build(cfg, &env)?;
    if stages.is_empty() {
        return Err(coded(USAGE, "the config defines no stages: add [fetch.NAME] sections or [data]/[model]"));
    }
    Pipeline::new(stages).map_err(|e| coded(USAGE, e.to_string()))
}
