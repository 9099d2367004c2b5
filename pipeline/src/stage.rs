//! The `Stage` trait: what the engine needs to know about a stage to key, plan and run it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::params::Params;

/// Stage kind, e.g. `fetch`, `attack`. Part of the key.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StageId(pub String);

impl fmt::Display for StageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for StageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StageId({})", self.0)
    }
}

/// An input slot of a stage, wired to an output of another stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRef {
    /// The slot name the stage reads, e.g. `model`.
    pub slot: String,
    /// Producing stage's instance name.
    pub stage: String,
    /// Output name on the producing stage.
    pub output: String,
}

/// Resources a stage asks for (used by executors to schedule).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    pub cpus: u32,
    pub gpus: u32,
    pub mem_mb: u64,
    /// True for stages that run in a `wdro-worker` process (torch), false for in-process I/O.
    pub worker: bool,
}

/// Where a running stage reads its inputs and writes its outputs. Inputs are verified copies of
/// cache blobs; outputs are files the engine hashes and ingests after `run` returns.
pub struct StageCtx {
    pub inputs: BTreeMap<String, PathBuf>,
    pub out_dir: PathBuf,
    /// A directory that survives a failed or killed run of the same key (resumable stages keep
    /// checkpoints here); removed when the stage completes.
    pub scratch_dir: PathBuf,
    pub progress: Box<dyn Fn(ProgressEvent) + Send + Sync>,
}

/// Progress reported by a running stage.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProgressEvent {
    pub done: u64,
    pub total: u64,
    #[serde(default)]
    pub message: String,
}

/// What a stage produced: output name → file (under `out_dir`) and scalar metrics.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StageOutputs {
    pub files: BTreeMap<String, PathBuf>,
    pub metrics: serde_json::Value,
}

/// A stage failure, as one line that names the stage's problem and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StageError(pub String);

/// A node of the pipeline.
pub trait Stage: Send + Sync {
    /// Instance name, unique in the pipeline (e.g. `attack.w2_linf`).
    fn name(&self) -> &str;
    fn id(&self) -> StageId;
    /// Bumped whenever the implementation changes its results; part of the key.
    fn version(&self) -> u32;
    /// The params that can change the result: canonicalised into the key.
    fn params(&self) -> Params;
    /// Params that cannot change the result (batch size in eval, threads): not in the key.
    fn exec_params(&self) -> Params {
        Params::default()
    }
    fn inputs(&self) -> Vec<InputRef>;
    /// Names of the outputs `run` produces.
    fn outputs(&self) -> Vec<String>;
    fn resources(&self) -> Resources {
        Resources::default()
    }
    /// Whether the key includes the libtorch version and device class (torch stages do).
    fn uses_torch(&self) -> bool {
        self.resources().worker
    }
    fn run(&self, ctx: &StageCtx) -> Result<StageOutputs, StageError>;
}
