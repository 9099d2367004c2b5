//! End-to-end tests: each drives the built `wdro` binary in a temp directory.

mod util;

mod ci_recipes;
mod cli_fetch;
mod demo_incremental;
mod eval_demo;
mod eval_gates;
mod lease_overlap;
mod readme;
mod report_cache;
mod report_demo;
mod report_support;
#[macro_use]
mod remote_servers;
mod remote_team;
mod shard_merge;
mod slurm_cluster;
mod slurm_demo;
