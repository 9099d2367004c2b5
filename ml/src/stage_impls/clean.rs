//! `clean`: clean accuracy A, V(0) and W(0) for CE/DLR/ReDLR (spec §6.2.1, [`crate::clean`]).
//! Inputs `model` (canonical safetensors), `data` (bundle); output `per_sample`
//! (safetensors: `pred` i64, `correct` u8, `margin`, `loss_ce`, `loss_dlr`, `loss_redlr` f32).
//!
//! Metrics: `acc`, `n_images`, `n_correct`, `loss.{ce,dlr,redlr}` = V(0),
//! `loss_cond.{…}` = W(0) (null when A = 1, with `loss_cond_defined = false`), `loss_correct.{…}`
//! = V_S, `margin_mean`, `device`, `dtype`, `wall_s`.
//!
//! A shard (params with a `shard` spec) writes the per-sample results of its image range (and
//! `n_images`, `n_correct`, `shard_start`, `shard_end`); [`merge`] concatenates them and computes
//! the statistics from the concatenation, bit-identical to the unsharded stage.
//!
//! This file also holds the small helpers the four method stages share (exec params, device,
//! model and bundle loading).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, Context};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};
use wdro_stages::params::{Arch, CleanParams};
use wdro_stages::shard::{split_params, MergeParams, ShardSpec};
use wdro_stages::worker_protocol::{Job, JobResult};

use crate::checkpoint;
use crate::clean;
use crate::data::Bundle;
use crate::losses::{loss_name, ALL_LOSSES};
use crate::models::Net;

pub const OUTPUT: &str = "per_sample.safetensors";

/// Execution params shared by the method stages (cannot change results).
#[derive(Clone, Debug)]
pub(crate) struct Exec {
    pub batch_size: i64,
    pub device: Device,
    /// Fine-tuning only: stop (resumably) after this many steps.
    pub stop_after_steps: Option<u64>,
}

/// Reads `job.exec_params` (`batch_size`, default 256; `threads`, 0 = libtorch's default;
/// `stop_after_steps`) and `job.device`, and applies the thread count.
pub(crate) fn exec(job: &Job, stage: &str) -> anyhow::Result<Exec> {
    let e = &job.exec_params;
    let batch_size = e.get("batch_size").and_then(Value::as_i64).unwrap_or(256);
    if batch_size < 1 {
        anyhow::bail!("{stage}: exec param batch_size must be >= 1 (got {batch_size}); set eval.batch_size");
    }
    if let Some(t) = e.get("threads").and_then(Value::as_i64).filter(|t| *t > 0) {
        tch::set_num_threads(t as i32);
    }
    let device = crate::device::parse_device(&job.device).map_err(|m| anyhow!("{stage}: {m}"))?;
    let stop_after_steps = e.get("stop_after_steps").and_then(Value::as_u64);
    Ok(Exec { batch_size, device, stop_after_steps })
}

pub(crate) fn input<'a>(job: &'a Job, stage: &str, slot: &str) -> anyhow::Result<&'a Path> {
    job.inputs.get(slot).map(|p| p.as_path()).ok_or_else(|| anyhow!("{stage}: the job has no input `{slot}`"))
}

/// The `model` input loaded into a fresh `arch` network on `device`, in eval mode use.
pub(crate) fn load_model(job: &Job, stage: &str, arch: &Arch, device: Device) -> anyhow::Result<Net> {
    let path = input(job, stage, "model")?;
    checkpoint::load_net(arch, path, device).with_context(|| format!("{stage}: loading input `model`"))
}

pub(crate) fn load_bundle(job: &Job, stage: &str, slot: &str) -> anyhow::Result<Bundle> {
    let path = input(job, stage, slot)?;
    Bundle::load(path).with_context(|| format!("{stage}: loading input `{slot}`"))
}

/// f64 → JSON number, NaN/∞ → null.
pub(crate) fn num(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

pub(crate) fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

pub(crate) fn write_tensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> anyhow::Result<()> {
    checkpoint::write_safetensors(tensors, path).with_context(|| format!("writing {}", path.display()))
}

/// `[start, end)` of the job's images: a shard's range (whose batch size then becomes the
/// one the computation uses, so the batches are the unsharded stage's), else the whole set.
pub(crate) fn shard_range(shard: Option<&ShardSpec>, n: i64, ex: &mut Exec) -> (i64, i64) {
    match shard {
        Some(s) => {
            ex.batch_size = s.batch_size;
            s.range(n)
        }
        None => (0, n),
    }
}

pub fn run(job: &Job, progress: &dyn Fn(u64, u64, &str)) -> anyhow::Result<JobResult> {
    const STAGE: &str = "clean";
    let t0 = Instant::now();
    let (own, shard) = split_params(&job.params).map_err(|m| anyhow!("{STAGE}: {m}"))?;
    let p: CleanParams = serde_json::from_value(own).context("clean: bad params")?;
    let mut ex = exec(job, STAGE)?;
    let net = load_model(job, STAGE, &p.arch, ex.device)?;
    let data = load_bundle(job, STAGE, "data")?;
    let Some(spec) = shard else {
        let c = clean::evaluate(net.module.as_ref(), &data.images, &data.labels, ex.batch_size, ex.device, progress)?;
        return finish(job, &c, ex.device, t0);
    };
    let (start, end) = shard_range(Some(&spec), data.len() as i64, &mut ex);
    let ps = clean::per_sample(
        net.module.as_ref(),
        &data.images.narrow(0, start, end - start),
        &data.labels.narrow(0, start, end - start),
        ex.batch_size,
        ex.device,
        progress,
    )?;
    write_per_sample(&job.out_dir.join(OUTPUT), &ps)?;
    let n_correct = ps.correct.sum(Kind::Int64).int64_value(&[]);
    let metrics = json!({
        "n_images": end - start,
        "n_correct": n_correct,
        "shard_start": start,
        "shard_end": end,
        "device": device_name(ex.device),
        "wall_s": t0.elapsed().as_secs_f64(),
    });
    Ok(JobResult { outputs: [("per_sample".to_string(), OUTPUT.to_string())].into(), metrics })
}

/// Merge of `clean` shards: per-sample results concatenated, statistics recomputed from them.
pub fn merge(job: &Job, mp: &MergeParams) -> anyhow::Result<JobResult> {
    let t0 = Instant::now();
    let _: CleanParams = serde_json::from_value(mp.params.clone()).context("clean merge: bad params")?;
    let ex = exec(job, "merge")?;
    let parts = super::merge::shard_inputs(job, mp, "per_sample")?
        .into_iter()
        .map(|path| read_per_sample(path).with_context(|| format!("clean merge: reading {}", path.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let c = clean::CleanStats::from_per_sample(clean::PerSample::cat(&parts)?)?;
    finish(job, &c, ex.device, t0)
}

fn write_per_sample(path: &Path, ps: &clean::PerSample) -> anyhow::Result<()> {
    let mut t = BTreeMap::new();
    t.insert("pred".to_string(), ps.pred.shallow_clone());
    t.insert("correct".to_string(), ps.correct.to_kind(Kind::Uint8));
    t.insert("margin".to_string(), ps.margin.shallow_clone());
    for (l, v) in ALL_LOSSES.iter().zip(&ps.losses) {
        t.insert(format!("loss_{}", loss_name(*l)), v.shallow_clone());
    }
    write_tensors(path, &t)
}

fn read_per_sample(path: &Path) -> anyhow::Result<clean::PerSample> {
    let mut t = checkpoint::read_safetensors(path)?;
    let mut take = |k: &str| t.remove(k).ok_or_else(|| anyhow!("no tensor `{k}`"));
    Ok(clean::PerSample {
        pred: take("pred")?,
        correct: take("correct")?,
        margin: take("margin")?,
        losses: [take("loss_ce")?, take("loss_dlr")?, take("loss_redlr")?],
    })
}

/// Writes `per_sample` and builds the metrics (the same for a whole stage and a merge).
fn finish(job: &Job, c: &clean::CleanStats, device: Device, t0: Instant) -> anyhow::Result<JobResult> {
    let ps = &c.per_sample;
    write_per_sample(&job.out_dir.join(OUTPUT), ps)?;
    let per = |f: &dyn Fn(&clean::LossStats) -> f64| -> Value {
        ALL_LOSSES
            .iter()
            .map(|l| (loss_name(*l).to_string(), num(f(&c.loss(*l)))))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let metrics = json!({
        "acc": c.acc,
        "n_images": c.n,
        "n_correct": c.n_correct,
        "loss": per(&|s| s.v0),
        "loss_cond": per(&|s| s.w0),
        "loss_cond_defined": c.n_correct < c.n,
        "loss_correct": per(&|s| s.v_s),
        "margin_mean": ps.margin.mean(Kind::Double).double_value(&[]),
        "device": device_name(device),
        "dtype": "float32",
        "wall_s": t0.elapsed().as_secs_f64(),
    });
    Ok(JobResult { outputs: [("per_sample".to_string(), OUTPUT.to_string())].into(), metrics })
}
