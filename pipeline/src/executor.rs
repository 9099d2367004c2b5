//! Executors: where the stages of a plan run. One trait, two implementations here and in
//! [`crate::slurm`]:
//!
//! * [`LocalExecutor`], the default: [`crate::exec::execute`] on this machine (rayon, bounded torch
//!   workers), unchanged;
//! * [`crate::slurm::SlurmExecutor`]: the stages that must run become Slurm job arrays, each task
//!   running `wdro worker`, coordinated only through the shared remote cache.

use wdro_cache::Store;

use crate::exec::{execute, ExecError, ExecOptions, Observer, RunReport};
use crate::graph::Pipeline;

/// Runs a pipeline somewhere and reports what each stage did.
pub trait Executor {
    /// `local`, `slurm`, …
    fn name(&self) -> &'static str;
    fn run(
        &self,
        pipeline: &Pipeline,
        store: &Store,
        opts: &ExecOptions,
        observer: &dyn Observer,
    ) -> Result<RunReport, ExecError>;
}

/// In-process execution on this machine: exactly [`execute`].
pub struct LocalExecutor;

impl Executor for LocalExecutor {
    fn name(&self) -> &'static str {
        "local"
    }
    fn run(
        &self,
        pipeline: &Pipeline,
        store: &Store,
        opts: &ExecOptions,
        observer: &dyn Observer,
    ) -> Result<RunReport, ExecError> {
        execute(pipeline, store, opts, observer)
    }
}
