//! `upsilon`: Υ = (mean_i ‖∇x J_i‖_{s*}^q)^{1/q} for q = 1 and 2 from one streamed gradient pass
//! (spec §2.1, §2.6, [`crate::upsilon`]). Inputs `model`, `data`; output `grad_norms`
//! (safetensors `norms` f32 [N], data order).
//!
//! Metrics: `upsilon_q1`, `upsilon_q2`, the sums `sum_q1` = Σ‖g‖, `sum_q2` = Σ‖g‖²,
//! `n_images`, `loss_fn`, `norm`, `s_star`, `device`, `dtype`, `wall_s`.
//!
//! A shard (params with a `shard` spec) computes the norms of its image range and adds
//! `shard_start`, `shard_end`; [`merge`] concatenates the shards' norms and recomputes the sums
//! from the concatenation, so its outputs and metrics equal the unsharded stage's bit for bit.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{anyhow, Context};
use serde_json::json;
use wdro_stages::params::UpsilonParams;
use wdro_stages::shard::{split_params, MergeParams};
use wdro_stages::worker_protocol::{Job, JobResult};

use super::clean::{device_name, exec, load_bundle, load_model, num, shard_range, write_tensors};
use super::merge::shard_inputs;
use crate::checkpoint::read_safetensors;
use crate::losses::loss_name;
use crate::upsilon;

pub const OUTPUT: &str = "grad_norms.safetensors";

pub fn run(job: &Job, progress: &dyn Fn(u64, u64, &str)) -> anyhow::Result<JobResult> {
    const STAGE: &str = "upsilon";
    let t0 = Instant::now();
    let (own, shard) = split_params(&job.params).map_err(|m| anyhow!("{STAGE}: {m}"))?;
    let p: UpsilonParams = serde_json::from_value(own).context("upsilon: bad params")?;
    let mut ex = exec(job, STAGE)?;
    let net = load_model(job, STAGE, &p.arch, ex.device)?;
    let data = load_bundle(job, STAGE, "data")?;
    let (start, end) = shard_range(shard.as_ref(), data.len() as i64, &mut ex);
    let u = upsilon::grad_norms(
        net.module.as_ref(),
        &data.images.narrow(0, start, end - start),
        &data.labels.narrow(0, start, end - start),
        p.loss,
        p.norm,
        ex.batch_size,
        ex.device,
        progress,
    )?;
    let mut r = finish(job, &p, &u, ex.device, t0)?;
    if shard.is_some() {
        r.metrics["shard_start"] = json!(start);
        r.metrics["shard_end"] = json!(end);
    }
    Ok(r)
}

/// Merge of `upsilon` shards: the norms concatenated, the sums recomputed from them
/// ([`upsilon::UpsilonStats::merge`]).
pub fn merge(job: &Job, mp: &MergeParams) -> anyhow::Result<JobResult> {
    let t0 = Instant::now();
    let p: UpsilonParams = serde_json::from_value(mp.params.clone()).context("upsilon merge: bad params")?;
    let ex = exec(job, "merge")?;
    let parts = shard_inputs(job, mp, "grad_norms")?
        .into_iter()
        .map(|path| {
            let mut t = read_safetensors(path).with_context(|| format!("upsilon merge: reading {}", path.display()))?;
            let norms = t.remove("norms").ok_or_else(|| anyhow!("upsilon merge: {} has no `norms`", path.display()))?;
            Ok(upsilon::UpsilonStats::from_norms(p.loss, p.norm, norms))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let u = upsilon::UpsilonStats::merge(&parts)?;
    finish(job, &p, &u, ex.device, t0)
}

/// Writes `grad_norms` and builds the metrics (the same for a whole stage and a merge).
fn finish(
    job: &Job,
    p: &UpsilonParams,
    u: &upsilon::UpsilonStats,
    device: tch::Device,
    t0: Instant,
) -> anyhow::Result<JobResult> {
    write_tensors(&job.out_dir.join(OUTPUT), &BTreeMap::from([("norms".to_string(), u.norms.shallow_clone())]))?;
    let metrics = json!({
        "upsilon_q1": num(u.upsilon(1)),
        "upsilon_q2": num(u.upsilon(2)),
        "sum_q1": u.sum_q1,
        "sum_q2": u.sum_q2,
        "n_images": u.n,
        "loss_fn": loss_name(p.loss),
        "norm": p.norm,
        "s_star": p.norm.s_star(),
        "device": device_name(device),
        "dtype": "float32",
        "wall_s": t0.elapsed().as_secs_f64(),
    });
    Ok(JobResult { outputs: [("grad_norms".to_string(), OUTPUT.to_string())].into(), metrics })
}
