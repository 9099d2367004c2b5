//! `wdro-pipeline`: the DAG engine. Generic over the [`Stage`] trait; never knows torch.
//!
//! * [`key`]: stage keys from (id, version, declared params, input digests, environment).
//! * [`graph`]: the petgraph DAG, with cycle and missing-input errors that name the stages.
//! * [`mod@plan`]: what is cached and what must run, and why (field-level diffs against the most
//!   recent record of the same stage name).
//! * [`exec`]: parallel execution with rayon (early cutoff, bounded torch workers), ingest into
//!   the cache, run records, and the [`Observer`] seam for run events.
//! * [`render`]: ASCII, DOT and mermaid drawings coloured by status; the JSON and human observers.

pub mod exec;
pub mod executor;
pub mod graph;
pub mod k8s;
pub mod key;
pub mod params;
pub mod plan;
pub mod render;
pub mod slurm;
pub mod stage;

pub use exec::{dry_run, execute, ExecError, ExecOptions, NullObserver, Observer, Outcome, RunReport, StageReport};
pub use executor::{Executor, LocalExecutor};
pub use graph::{GraphError, Pipeline};
pub use key::{Env, KeyMaterial};
pub use params::Params;
pub use plan::{explain, plan, MissingOutput, Plan, PlanEntry, PlanError, PlanOptions, PlanSummary, Reason, Status};
pub use render::{to_ascii, to_dot, to_mermaid, HumanObserver, JsonObserver, Progress, TermPolicy};
pub use stage::{InputRef, ProgressEvent, Resources, Stage, StageCtx, StageError, StageId, StageOutputs};
