//! `wdro-pipeline`: the DAG engine. Generic over the [`Stage`] trait; never knows torch.
//!
//! * [`key`]: stage keys from (id, version, declared params, input digests, environment).
//! * [`graph`]: the petgraph DAG, with cycle and missing-input errors that name the stages.
//! * [`plan`]: what is cached and what must run, and why (field-level diffs against the most
//!   recent record of the same stage name).
//! * [`exec`]: parallel execution with rayon, progress bars or JSON events, ingest into the cache.
//! * [`render`]: ASCII, DOT and mermaid drawings coloured by status.

pub mod exec;
pub mod graph;
pub mod key;
pub mod params;
pub mod plan;
pub mod render;
pub mod stage;

pub use key::{Env, KeyMaterial};
pub use params::Params;
pub use stage::{InputRef, ProgressEvent, Resources, Stage, StageCtx, StageError, StageId, StageOutputs};
