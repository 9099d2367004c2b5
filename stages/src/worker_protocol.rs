//! The contract between the `wdro` CLI and a `wdro-worker` process.
//!
//! Why a process and files: sled admits one process per cache, libtorch costs 0.2 s and 114 MB
//! just to load, and a libtorch crash must not take the run record down. So the CLI (which holds
//! the cache) exports verified input blobs into a job directory, starts
//! `wdro-worker --job DIR/job.json`, and ingests the files the worker lists in `result.json`.
//!
//! * `job.json` — a [`Job`].
//! * stdout — one JSON [`WorkerEvent`] per line (progress, log lines).
//! * `out_dir/result.json` — a [`JobResult`], written last (its presence means success).
//! * failure — non-zero exit; the last stderr line starting with `error: ` is the message shown.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One stage computation handed to a worker.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    pub stage_id: String,
    pub stage_name: String,
    /// Hex stage key, for logs and lease names.
    pub key: String,
    /// The stage's key params (deserialize into the stage's params struct in `crate::params`).
    pub params: serde_json::Value,
    /// Execution-only params (batch size, threads): cannot change results.
    pub exec_params: serde_json::Value,
    /// Input slot → path of a verified copy of the input blob.
    pub inputs: BTreeMap<String, PathBuf>,
    pub out_dir: PathBuf,
    /// Survives a failed or killed run of the same key: resumable stages keep checkpoints here.
    pub scratch_dir: PathBuf,
    /// `auto` (cuda if available), `cpu` or `cuda`.
    pub device: String,
}

/// What the worker produced: output name → file name inside `out_dir`, plus scalar metrics.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct JobResult {
    pub outputs: BTreeMap<String, String>,
    pub metrics: serde_json::Value,
}

/// A line on the worker's stdout.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WorkerEvent {
    Progress { done: u64, total: u64, message: String },
    Log { message: String },
}

/// Name of the result file inside `out_dir`.
pub const RESULT_FILE: &str = "result.json";
