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
//!
//! Pointwise kinds shard along the data axis: a shard (params with a `shard` spec) attacks its
//! whole batches and writes `adv` (its images) and `parts` ([`PointwiseParts`]: per-sample flags
//! and best losses, per-batch curve terms); [`merge`] joins the shards and reduces them exactly
//! as the unsharded stage does. The W-attacks refuse a shard spec.

use std::time::Instant;

use anyhow::{anyhow, Context};
use serde_json::json;
use tch::{Device, Kind};
use wdro_stages::params::{AttackKind, AttackParams};
use wdro_stages::shard::{split_params, MergeParams, ShardSpec};
use wdro_stages::worker_protocol::{Job, JobResult};

use super::clean::{device_name, exec, load_bundle, load_model, num, shard_range};
use crate::attacks::pointwise::{self, PointwiseParts, Reduction};
use crate::attacks::{self, AttackResult};
use crate::data::Bundle;
use crate::losses::loss_name;

pub const ADV: &str = "adv.safetensors";
pub const CURVES: &str = "curves.json";

pub const PARTS: &str = "parts.safetensors";

fn is_pointwise(k: AttackKind) -> bool {
    matches!(k, AttackKind::Pgd | AttackKind::ApgdCe | AttackKind::ApgdDlr)
}

pub fn run(job: &Job, progress: &dyn Fn(u64, u64, &str)) -> anyhow::Result<JobResult> {
    const STAGE: &str = "attack";
    let t0 = Instant::now();
    let (own, shard) = split_params(&job.params).map_err(|m| anyhow!("{STAGE}: {m}"))?;
    let p: AttackParams = serde_json::from_value(own).context("attack: bad params")?;
    if let Some(spec) = shard {
        return run_shard(job, &p, &spec, progress, t0);
    }
    let ex = exec(job, STAGE)?;
    let attack = attacks::from_params(&p, ex.batch_size)?;
    let net = load_model(job, STAGE, &p.arch, ex.device)?;
    let data = load_bundle(job, STAGE, "data")?;
    // The attacks hold the set on the model's device (u8 until converted: 1 byte per pixel).
    let images = data.images.to_device(ex.device);
    let labels = data.labels.to_device(ex.device);
    let r = attack.run(net.module.as_ref(), &images, &labels, progress)?;
    finish(job, &p, attack.name(), &r, &data, ex.device, t0)
}

/// One shard of a pointwise attack: the attack's parts on the shard's whole batches.
fn run_shard(
    job: &Job,
    p: &AttackParams,
    spec: &ShardSpec,
    progress: &dyn Fn(u64, u64, &str),
    t0: Instant,
) -> anyhow::Result<JobResult> {
    const STAGE: &str = "attack";
    if !is_pointwise(p.attack) {
        anyhow::bail!(
            "attack: {:?} cannot be sharded: the W-attacks couple all images through the global W2 normalisation",
            p.attack
        );
    }
    let mut ex = exec(job, STAGE)?;
    let net = load_model(job, STAGE, &p.arch, ex.device)?;
    let data = load_bundle(job, STAGE, "data")?;
    let n = data.len() as i64;
    let (start, end) = shard_range(Some(spec), n, &mut ex);
    let images = data.images.narrow(0, start, end - start).to_device(ex.device);
    let labels = data.labels.narrow(0, start, end - start).to_device(ex.device);
    let parts = match attacks::from_params(p, ex.batch_size)?.name() {
        "pgd" => attacks::pgd::Pgd::from_params(p, ex.batch_size).run_parts(
            net.module.as_ref(),
            &images,
            &labels,
            spec.first_batch(n),
            progress,
        )?,
        _ => attacks::apgd::Apgd::from_params(p, ex.batch_size)?.run_parts(
            net.module.as_ref(),
            &images,
            &labels,
            progress,
        )?,
    };
    let adv = Bundle::new(parts.adv.shallow_clone(), labels.to_device(Device::Cpu), data.classes.clone())?;
    adv.save(&job.out_dir.join(ADV)).context("attack: writing adv")?;
    parts.save(&job.out_dir.join(PARTS))?;
    let metrics = json!({
        "attack": attacks::from_params(p, ex.batch_size)?.name(),
        "n_images": end - start,
        "n_robust": parts.robust.sum(Kind::Int64).int64_value(&[]),
        "n_clean_correct": parts.clean_correct.sum(Kind::Int64).int64_value(&[]),
        "shard_start": start,
        "shard_end": end,
        "device": device_name(ex.device),
        "wall_s": t0.elapsed().as_secs_f64(),
    });
    Ok(JobResult {
        outputs: [("adv".to_string(), ADV.to_string()), ("parts".to_string(), PARTS.to_string())].into(),
        metrics,
    })
}

/// Merge of pointwise-attack shards: parts joined in data order and reduced by the same
/// [`pointwise::finish`] the unsharded attack uses.
pub fn merge(job: &Job, mp: &MergeParams) -> anyhow::Result<JobResult> {
    let t0 = Instant::now();
    let p: AttackParams = serde_json::from_value(mp.params.clone()).context("attack merge: bad params")?;
    if !is_pointwise(p.attack) {
        anyhow::bail!("attack merge: {:?} is not a pointwise attack and is never sharded", p.attack);
    }
    let ex = exec(job, "merge")?;
    let data = load_bundle(job, "merge", "data")?;
    let advs = super::merge::shard_inputs(job, mp, "adv")?;
    let parts = super::merge::shard_inputs(job, mp, "parts")?
        .into_iter()
        .zip(advs)
        .map(|(pp, ap)| {
            let adv = Bundle::load(ap).with_context(|| format!("attack merge: reading {}", ap.display()))?;
            Ok(PointwiseParts::load(pp, adv.images)?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let joined = PointwiseParts::cat(&parts)?;
    if joined.len() != data.len() as i64 {
        anyhow::bail!("attack merge: the shards hold {} images, the data set {}", joined.len(), data.len());
    }
    let reduction = if p.attack == AttackKind::Pgd { Reduction::Pgd } else { Reduction::Apgd };
    let r = pointwise::finish(reduction, joined, &data.images, p.norm, p.itr as usize)?;
    let name = attacks::from_params(&p, ex.batch_size)?.name();
    finish(job, &p, name, &r, &data, ex.device, t0)
}

/// Writes `adv` and `curves` and builds the metrics (the same for a whole stage and a merge).
fn finish(
    job: &Job,
    p: &AttackParams,
    name: &str,
    r: &AttackResult,
    data: &Bundle,
    device: Device,
    t0: Instant,
) -> anyhow::Result<JobResult> {
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
        "attack": name,
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
        "device": device_name(device),
        "dtype": "float32",
        "wall_s": t0.elapsed().as_secs_f64(),
    });
    if is_pointwise(p.attack) {
        let robust = Vec::<bool>::try_from(r.robust.to_device(Device::Cpu).to_kind(Kind::Bool))?;
        metrics["robust"] = json!(robust);
    }
    Ok(JobResult {
        outputs: [("adv".to_string(), ADV.to_string()), ("curves".to_string(), CURVES.to_string())].into(),
        metrics,
    })
}
