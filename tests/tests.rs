//! End-to-end tests: each drives the built `wdro` binary in a temp directory.

mod util;

mod cli_fetch;
mod demo_incremental;
mod readme;
#[macro_use]
mod remote_servers;
mod remote_team;
mod slurm_cluster;
