//! `wdro-stages`: the stage catalogue (ids, versions, typed params, inputs, outputs, resources)
//! and config → DAG. Torch-free: torch stages run in `wdro-worker` processes, which read the
//! params structs of [`params`] through the [`worker_protocol`].

pub mod catalogue;
pub mod config;
pub mod evaluate;
pub mod fetch;
pub mod gates;
pub mod params;
pub mod registry;
pub mod report;
pub mod shard;
pub mod sweep;
pub mod worker_protocol;
pub mod worker_stage;
