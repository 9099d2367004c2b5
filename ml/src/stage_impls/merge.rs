//! `merge`: joins the shards of a data-parallel stage (see `wdro_stages::shard`) into the
//! outputs and metrics the unsharded stage would have written, bit for bit. Params
//! `MergeParams { of, of_version, shards, params }`; inputs `<output>.<i>` for each shard output
//! and shard i (plus `data` for attacks). The per-kind work lives next to each kind's stage:
//! [`super::upsilon::merge`], [`super::clean::merge`], [`super::attack::merge`].

use anyhow::Context;
use wdro_stages::shard::{merge_slot, MergeParams};
use wdro_stages::worker_protocol::{Job, JobResult};

use super::clean::input;

pub fn run(job: &Job, progress: &dyn Fn(u64, u64, &str)) -> anyhow::Result<JobResult> {
    let mp: MergeParams = serde_json::from_value(job.params.clone()).context("merge: bad params")?;
    if mp.shards == 0 {
        anyhow::bail!("merge: shards must be >= 1");
    }
    progress(0, u64::from(mp.shards), &format!("merging {} shards of {}", mp.shards, mp.of));
    let r = match mp.of.as_str() {
        "upsilon" => super::upsilon::merge(job, &mp),
        "clean" => super::clean::merge(job, &mp),
        "attack" => super::attack::merge(job, &mp),
        other => anyhow::bail!("merge: stage kind {other:?} cannot be sharded (upsilon, clean and attack can)"),
    }?;
    progress(u64::from(mp.shards), u64::from(mp.shards), "merged");
    Ok(r)
}

/// The input files of output `output` of every shard, in shard (= data) order.
pub(crate) fn shard_inputs<'a>(
    job: &'a Job,
    mp: &MergeParams,
    output: &str,
) -> anyhow::Result<Vec<&'a std::path::Path>> {
    (0..mp.shards).map(|i| input(job, "merge", &merge_slot(output, i))).collect()
}
