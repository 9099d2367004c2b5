//! `upsilon`: Υ = (mean_i ‖∇x J_i‖_{s*}^q)^{1/q} for q = 1 and 2 from one streamed gradient pass
//! (spec §2.1, §2.6, [`crate::upsilon`]). Inputs `model`, `data`; output `grad_norms`
//! (safetensors `norms` f32 [N], data order).
//!
//! Metrics: `upsilon_q1`, `upsilon_q2`, the exact-merge sums `sum_q1` = Σ‖g‖, `sum_q2` = Σ‖g‖²
//! and `n_images` (shards merge as Υ_q = (Σ sum_q / Σ n)^{1/q}), `loss_fn`, `norm`, `s_star`,
//! `device`, `dtype`, `wall_s`.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context;
use serde_json::json;
use wdro_stages::params::UpsilonParams;
use wdro_stages::worker_protocol::{Job, JobResult};

use super::clean::{device_name, exec, load_bundle, load_model, num, write_tensors};
use crate::losses::loss_name;
use crate::upsilon;

pub const OUTPUT: &str = "grad_norms.safetensors";

pub fn run(job: &Job, progress: &dyn Fn(u64, u64, &str)) -> anyhow::Result<JobResult> {
    const STAGE: &str = "upsilon";
    let t0 = Instant::now();
    let p: UpsilonParams = serde_json::from_value(job.params.clone()).context("upsilon: bad params")?;
    let ex = exec(job, STAGE)?;
    let net = load_model(job, STAGE, &p.arch, ex.device)?;
    let data = load_bundle(job, STAGE, "data")?;
    let u = upsilon::grad_norms(
        net.module.as_ref(),
        &data.images,
        &data.labels,
        p.loss,
        p.norm,
        ex.batch_size,
        ex.device,
        progress,
    )?;
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
        "device": device_name(ex.device),
        "dtype": "float32",
        "wall_s": t0.elapsed().as_secs_f64(),
    });
    Ok(JobResult { outputs: [("grad_norms".to_string(), OUTPUT.to_string())].into(), metrics })
}
