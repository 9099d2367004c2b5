//! `checkpoint`: the model under study as a canonical safetensors state dict (output `model`;
//! see [`crate::checkpoint`]). Source `train` trains `arch` on input `train` (a bundle) with
//! `train` params ([`crate::train`]); any other source reads input `file` (a fetched `.pt`,
//! `.safetensors`, or Keras weights converted by scripts/setup-data.sh) and loads it strictly.

use anyhow::{anyhow, bail, Context};
use serde_json::json;
use wdro_stages::params::CheckpointParams;
use wdro_stages::worker_protocol::{Job, JobResult};

use crate::checkpoint;
use crate::data::Bundle;
use crate::device::parse_device;
use crate::{models, train};

pub const OUTPUT: &str = "model.safetensors";

pub fn run(job: &Job, progress: &dyn Fn(u64, u64, &str)) -> anyhow::Result<JobResult> {
    let p: CheckpointParams = serde_json::from_value(job.params.clone()).context("checkpoint: bad params")?;
    models::check_arch(&p.arch)?;
    let out = job.out_dir.join(OUTPUT);
    let metrics = if p.source == "train" {
        let tp = p.train.as_ref().ok_or_else(|| anyhow!("checkpoint: source \"train\" needs [model.train] params"))?;
        let data_path = job.inputs.get("train").ok_or_else(|| anyhow!("checkpoint: the job has no input `train`"))?;
        let data = Bundle::load(data_path)?;
        let device = parse_device(&job.device).map_err(|e| anyhow!("checkpoint: {e}"))?;
        let epochs = tp.epochs as u64;
        progress(0, epochs, "training");
        let mut report = |s: &train::EpochStats| {
            progress(
                s.epoch as u64,
                epochs,
                &format!("epoch {}: loss {:.4}, train acc {:.4}", s.epoch, s.loss, s.accuracy),
            )
        };
        let (net, stats) = train::train_new(&p.arch, &data, tp, device, &mut report)?;
        checkpoint::save_canonical(&net, &out)?;
        json!({
            "source": "train",
            "n_params": net.n_params(),
            "epochs": stats,
            "final_train_loss": stats.last().map(|s| s.loss),
            "final_train_accuracy": stats.last().map(|s| s.accuracy),
        })
    } else {
        if p.train.is_some() {
            bail!("checkpoint: [model.train] params only apply to source \"train\" (source is {:?})", p.source);
        }
        let file = job.inputs.get("file").ok_or_else(|| anyhow!("checkpoint: the job has no input `file`"))?;
        progress(0, 1, "loading");
        let mut net = models::try_new_net(&p.arch, tch::Device::Cpu)?;
        let r = checkpoint::load_file(&mut net, file)?;
        checkpoint::save_canonical(&net, &out)?;
        progress(1, 1, &format!("{} tensors", r.loaded));
        json!({
            "source": p.source,
            "n_params": net.n_params(),
            "tensors_loaded": r.loaded,
            "counters_filled": r.filled_counters.len(),
            "constants_checked": r.ignored,
        })
    };
    Ok(JobResult { outputs: [("model".to_string(), OUTPUT.to_string())].into(), metrics })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use wdro_stages::params::{Arch, TrainParams};

    fn job(dir: &std::path::Path, stage: &str, params: serde_json::Value, inputs: &[(&str, PathBuf)]) -> Job {
        let out = dir.join(format!("out-{stage}"));
        std::fs::create_dir_all(&out).unwrap();
        Job {
            stage_id: stage.into(),
            stage_name: stage.into(),
            key: "00".into(),
            params,
            exec_params: json!({}),
            inputs: inputs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<BTreeMap<_, _>>(),
            out_dir: out,
            scratch_dir: dir.join("scratch"),
            device: "cpu".into(),
        }
    }

    /// dataset (PNG folder) → subset → checkpoint(train) → checkpoint(file) round trip.
    #[test]
    fn stages_chain() {
        let d = tempfile::tempdir().unwrap();
        let pngs = d.path().join("pngs");
        std::fs::create_dir_all(&pngs).unwrap();
        for i in 0..8u8 {
            let img: Vec<u8> = (0..28 * 28).map(|k| if (k / 28 < 14) == (i % 2 == 0) { 200 } else { 0 }).collect();
            let name = format!("toy_{i:02}_{}.png", i % 2);
            std::fs::write(pngs.join(name), crate::data::png_folder::encode_png(1, 28, 28, &img)).unwrap();
        }
        let noop = |_: u64, _: u64, _: &str| {};
        let j = job(
            d.path(),
            "dataset",
            json!({"format": "png-folder", "split": "test", "prefix": "toy_", "limit": 6}),
            &[("archive", pngs)],
        );
        let r = crate::stage_impls::dataset::run(&j, &noop).unwrap();
        assert_eq!(r.metrics["num_images"], 6);
        assert_eq!(r.metrics["class_counts"], json!([3, 3]));
        let data = j.out_dir.join(&r.outputs["data"]);

        let j = job(d.path(), "subset", json!({"fraction": 0.5, "seed": 0}), &[("data", data.clone())]);
        let r = crate::stage_impls::subset::run(&j, &noop).unwrap();
        assert_eq!(r.metrics["selected_class_counts"], json!([2, 2]));
        assert_eq!(r.metrics["num_rest"], 2);

        let arch = Arch::SmallCnn { in_channels: 1, num_classes: 2 };
        let tp = TrainParams { epochs: 1, lr: 0.01, momentum: 0.9, weight_decay: 0.0, batch_size: 4, seed: 0 };
        let params = json!({"source": "train", "arch": arch, "train": tp});
        let j = job(d.path(), "checkpoint", params, &[("train", data)]);
        let r = run(&j, &noop).unwrap();
        assert_eq!(r.metrics["epochs"].as_array().unwrap().len(), 1);
        let model = j.out_dir.join(&r.outputs["model"]);

        let j2 = job(d.path(), "checkpoint2", json!({"source": "file:x", "arch": arch}), &[("file", model.clone())]);
        let r2 = run(&j2, &noop).unwrap();
        assert_eq!(r2.metrics["n_params"], r.metrics["n_params"]);
        let again = j2.out_dir.join(&r2.outputs["model"]);
        assert_eq!(std::fs::read(model).unwrap(), std::fs::read(again).unwrap());

        let bad = job(d.path(), "checkpoint3", json!({"source": "train", "arch": arch}), &[]);
        assert!(run(&bad, &noop).unwrap_err().to_string().contains("needs [model.train]"));
    }
}
