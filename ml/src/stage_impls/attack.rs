//! `attack`: one attack of spec §3 on the `data` input with the `model` input
//! ([`crate::attacks::from_params`]). Outputs `adv` (bundle: f32 images in [0, 1], labels, the
//! input's classes) and `curves` (JSON list of `{iter, acc, loss}` per iterate).
//!
//! Metrics (spec §6.3 fields): `attack`, `loss_fn`, `q`, `norm`, `s_star`, `delta`, `delta_str`,
//! `ratio`, `itr`, `l2_w_inf_proj`, `linf_w2_proj`, `n_images`, `acc_min`, `loss_max`, `w_dist`
//! (identity-coupling cost achieved), `clean_acc`, `n_clean_correct`, `n_robust`, `n_success`
//! (clean-correct points the attack fooled), `best_iter`, `seed`, `device`, `dtype`, `wall_s`;
//! pointwise kinds (`pgd`, `apgd-ce`, `apgd-dlr`) add `robust` (per-sample bools) so the
//! evaluation table can take the per-sample worst case over attacks.

use std::time::Instant;

use anyhow::Context;
use serde_json::json;
use tch::{Device, Kind};
use wdro_stages::params::{AttackKind, AttackParams};
use wdro_stages::worker_protocol::{Job, JobResult};

use super::clean::{device_name, exec, load_bundle, load_model, num};
use crate::attacks;
use crate::data::Bundle;
use crate::losses::loss_name;

pub const ADV: &str = "adv.safetensors";
pub const CURVES: &str = "curves.json";

pub fn run(job: &Job, progress: &dyn Fn(u64, u64, &str)) -> anyhow::Result<JobResult> {
    const STAGE: &str = "attack";
    let t0 = Instant::now();
    let p: AttackParams = serde_json::from_value(job.params.clone()).context("attack: bad params")?;
    let ex = exec(job, STAGE)?;
    let attack = attacks::from_params(&p, ex.batch_size)?;
    let net = load_model(job, STAGE, &p.arch, ex.device)?;
    let data = load_bundle(job, STAGE, "data")?;
    // The attacks hold the set on the model's device (u8 until converted: 1 byte per pixel).
    let images = data.images.to_device(ex.device);
    let labels = data.labels.to_device(ex.device);
    let r = attack.run(net.module.as_ref(), &images, &labels, progress)?;

    let adv = Bundle::new(
        r.adv.to_device(Device::Cpu).to_kind(Kind::Float),
        data.labels.shallow_clone(),
        data.classes.clone(),
    )?;
    adv.save(&job.out_dir.join(ADV)).context("attack: writing adv")?;
    let curves: Vec<_> = r
        .curves
        .iter()
        .enumerate()
        .map(|(i, c)| json!({"iter": i + 1, "acc": num(c.acc), "loss": num(c.loss)}))
        .collect();
    std::fs::write(job.out_dir.join(CURVES), serde_json::to_vec_pretty(&curves)?).context("attack: writing curves")?;

    let n = data.labels.size()[0];
    let n_clean = r.clean_correct.sum(Kind::Int64).int64_value(&[]);
    let mut metrics = json!({
        "attack": attack.name(),
        "loss_fn": loss_name(p.loss),
        "q": p.q,
        "norm": p.norm,
        "s_star": p.norm.s_star(),
        "delta": p.delta.0,
        "delta_str": p.delta.pretty(),
        "ratio": p.ratio,
        "itr": p.itr,
        "l2_w_inf_proj": p.l2_w_inf_proj,
        "linf_w2_proj": p.linf_w2_proj,
        "budget_reading": p.budget_reading,
        "n_images": n,
        "acc_min": num(r.acc_min),
        "loss_max": num(r.loss_max),
        "w_dist": num(r.w_dist),
        "clean_acc": n_clean as f64 / n as f64,
        "n_clean_correct": n_clean,
        "n_robust": r.n_robust(),
        "n_success": r.n_success(),
        "best_iter": r.best_iter,
        "seed": p.seed,
        "device": device_name(ex.device),
        "dtype": "float32",
        "wall_s": t0.elapsed().as_secs_f64(),
    });
    if matches!(p.attack, AttackKind::Pgd | AttackKind::ApgdCe | AttackKind::ApgdDlr) {
        let robust = Vec::<bool>::try_from(r.robust.to_device(Device::Cpu).to_kind(Kind::Bool))?;
        metrics["robust"] = json!(robust);
    }
    Ok(JobResult {
        outputs: [("adv".to_string(), ADV.to_string()), ("curves".to_string(), CURVES.to_string())].into(),
        metrics,
    })
}
