//! Stage records (manifests): what a finished stage computation produced and how.
//! A record is small JSON keyed by its `StageKey`; it points at blobs by digest, so it maps 1:1
//! onto a remote's "manifest by key" layout.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, StageKey};

/// One output artifact of a stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputRef {
    pub digest: Digest,
    pub size: u64,
    /// Media type hint, e.g. `safetensors`, `json`, `bytes`.
    #[serde(default)]
    pub kind: String,
}

/// The manifest of one stage computation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    pub key: StageKey,
    /// Instance name in the pipeline, e.g. `attack.w2_linf_8`.
    pub stage_name: String,
    /// Stage kind, e.g. `attack`.
    pub stage_id: String,
    pub version: u32,
    /// The canonical params that went into the key.
    pub params: serde_json::Value,
    /// Input slot → digest of the artifact that was read.
    pub inputs: BTreeMap<String, Digest>,
    pub outputs: BTreeMap<String, OutputRef>,
    /// Small scalar results (accuracies, Υ, …) for reports without reading blobs.
    #[serde(default)]
    pub metrics: serde_json::Value,
    /// Environment that went into the key: libtorch version and device class.
    pub env: BTreeMap<String, String>,
    pub wdro_version: String,
    /// Seconds since the Unix epoch when the computation finished.
    pub finished_at: u64,
    pub duration_ms: u64,
}

/// A record of one `wdro run`: which stage keys it used, for `gc` reachability and `report`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: String,
    pub started_at: u64,
    pub config_digest: Digest,
    /// Stage name → key, in topological order.
    pub stages: Vec<(String, StageKey)>,
    /// Stage names that were computed (not cache hits) in this run.
    pub computed: Vec<String>,
    #[serde(default)]
    pub pinned_as: Option<String>,
}
