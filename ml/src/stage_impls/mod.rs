//! One module per worker stage kind. Each exposes
//! `pub fn run(job: &Job, progress: &dyn Fn(u64, u64, &str)) -> anyhow::Result<JobResult>`:
//! it deserializes `job.params` into its params struct from `wdro_stages::params`, reads
//! `job.inputs`, writes its outputs into `job.out_dir` and returns their file names + metrics.

pub mod attack;
pub mod checkpoint;
pub mod clean;
pub mod dataset;
pub mod finetune;
pub mod merge;
pub mod subset;
pub mod upsilon;
