//! `finetune`: W-DRO TRADES fine-tuning (spec §4–§5, [`crate::finetune`]). Inputs `model`,
//! `train`, `val`, `upsilon_data`, `test`; outputs `model` (canonical safetensors of the selected
//! epoch) and `log` (JSON: params, per-epoch series, best/selected epoch). Resumable: the state
//! lives in `job.scratch_dir`, which survives a failed or killed run of the same key; exec param
//! `stop_after_steps` stops (resumably) after that many steps of this process.
//!
//! Metrics: `epochs`, `best_epoch`, `selected_epoch`, `steps`, and for the selected epoch
//! `val_w2_acc`, `val_winf_acc`, `test_w2_acc`, `test_winf_acc`, `test_clean_acc`, `train_loss`,
//! `upsilon_test_<loss>_q{1,2}`, `upsilon_train_<loss>_q{1,2}`; plus `device`, `wall_s`.

use std::time::Instant;

use anyhow::Context;
use serde_json::json;
use wdro_stages::params::FinetuneParams;
use wdro_stages::worker_protocol::{Job, JobResult};

use super::clean::{device_name, exec, load_bundle, load_model, num};
use crate::checkpoint;
use crate::finetune::{self, RunOptions, Set, Sets};
use crate::models;

pub const MODEL: &str = "model.safetensors";
pub const LOG: &str = "log.json";

pub fn run(job: &Job, progress: &dyn Fn(u64, u64, &str)) -> anyhow::Result<JobResult> {
    const STAGE: &str = "finetune";
    let t0 = Instant::now();
    let p: FinetuneParams = serde_json::from_value(job.params.clone()).context("finetune: bad params")?;
    let ex = exec(job, STAGE)?;
    let net = load_model(job, STAGE, &p.arch, ex.device)?;
    let set = |slot: &str| -> anyhow::Result<Set> {
        let b = load_bundle(job, STAGE, slot)?;
        Ok(Set { images: b.images, labels: b.labels })
    };
    let sets = Sets { train: set("train")?, val: set("val")?, upsilon: set("upsilon_data")?, test: set("test")? };
    let opts = RunOptions {
        device: ex.device,
        eval_batch_size: ex.batch_size,
        scratch_dir: Some(job.scratch_dir.clone()),
        stop_after_steps: ex.stop_after_steps,
    };
    let out =
        finetune::finetune(&net.vs, net.module.as_ref(), models::last_layer(&p.arch), &p, &sets, &opts, progress)?;
    checkpoint::save_canonical(&net, &job.out_dir.join(MODEL)).context("finetune: writing model")?;
    let log = json!({
        "params": &p,
        "epochs": &out.log,
        "best_epoch": out.best_epoch,
        "selected_epoch": out.selected_epoch,
        "select": &p.select,
    });
    // The log is a content-addressed output (reports read it): per-epoch wall times would make
    // two bit-identical fine-tunings differ, so they go to the record's metrics instead.
    let log = wdro_stages::worker_stage::without_timings(&log);
    std::fs::write(job.out_dir.join(LOG), serde_json::to_vec_pretty(&log)?).context("finetune: writing log")?;

    let mut metrics = json!({
        "epochs": p.epochs,
        "best_epoch": out.best_epoch,
        "selected_epoch": out.selected_epoch,
        "steps": out.log.iter().map(|e| e.steps).sum::<u64>(),
        "device": device_name(ex.device),
        "dtype": "float32",
        "wall_s": t0.elapsed().as_secs_f64(),
        "epoch_wall_s": out.log.iter().map(|e| e.wall_s).collect::<Vec<_>>(),
    });
    if let Some(e) = out.log.iter().find(|e| e.epoch == out.selected_epoch) {
        metrics["val_w2_acc"] = num(e.val.w2_acc);
        metrics["val_winf_acc"] = num(e.val.winf_acc);
        metrics["test_w2_acc"] = num(e.test.w2_acc);
        metrics["test_winf_acc"] = num(e.test.winf_acc);
        metrics["test_clean_acc"] = num(e.test.clean_acc);
        metrics["train_loss"] = num(e.train_loss);
        for (set, entries) in [("test", &e.upsilon_test), ("train", &e.upsilon_train)] {
            for u in entries.iter() {
                metrics[format!("upsilon_{set}_{}_q1", u.loss)] = num(u.q1);
                metrics[format!("upsilon_{set}_{}_q2", u.loss)] = num(u.q2);
            }
        }
    }
    Ok(JobResult {
        outputs: [("model".to_string(), MODEL.to_string()), ("log".to_string(), LOG.to_string())].into(),
        metrics,
    })
}
