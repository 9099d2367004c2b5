//! `dataset`: decode a data set in one of the official layouts into a [`Bundle`] (output
//! `data`, u8 NCHW). Inputs: `images` + `labels` for IDX, `archive` (a tar, tar.gz or
//! directory) for the CIFAR-10 binary/python archives and foolbox-style PNG sets.

use anyhow::{anyhow, Context};
use serde_json::json;
use wdro_stages::params::{DatasetFormat, DatasetParams};
use wdro_stages::worker_protocol::{Job, JobResult};

use crate::data::{cifar, idx, png_folder, Bundle};

/// File name of the output bundle inside `out_dir`.
pub const OUTPUT: &str = "data.safetensors";

fn input<'a>(job: &'a Job, slot: &str) -> anyhow::Result<&'a std::path::Path> {
    job.inputs.get(slot).map(|p| p.as_path()).ok_or_else(|| anyhow!("dataset: the job has no input `{slot}`"))
}

/// Count, shape, class names and histogram, mean pixel value in [0,1] (a cheap sentinel:
/// e.g. ≈ 0.4766 for the full CIFAR-10 test set, spec §8.4).
pub fn bundle_metrics(b: &Bundle) -> serde_json::Value {
    let mean = if b.is_empty() {
        0.0
    } else {
        b.images.to_kind(tch::Kind::Double).mean(tch::Kind::Double).double_value(&[])
            / if b.images.kind() == tch::Kind::Uint8 { 255.0 } else { 1.0 }
    };
    json!({
        "num_images": b.len(),
        "image_shape": b.image_shape(),
        "classes": b.classes,
        "class_counts": b.class_counts(),
        "pixel_mean": mean,
    })
}

pub fn run(job: &Job, progress: &dyn Fn(u64, u64, &str)) -> anyhow::Result<JobResult> {
    let p: DatasetParams = serde_json::from_value(job.params.clone()).context("dataset: bad params")?;
    progress(0, 1, "decoding");
    let b = match p.format {
        DatasetFormat::Idx => {
            let (images, labels) = (input(job, "images")?, input(job, "labels")?);
            idx::read_idx(images, labels, idx::class_names_for(labels)?)?
        }
        DatasetFormat::Cifar10Binary => cifar::read_binary(input(job, "archive")?, &p.split)?,
        DatasetFormat::Cifar10Python => cifar::read_python(input(job, "archive")?, &p.split)?,
        DatasetFormat::PngFolder => png_folder::read_png_set(input(job, "archive")?, &p.prefix, vec![])?,
    };
    let b = if p.limit > 0 { b.head(p.limit as usize) } else { b };
    b.save(&job.out_dir.join(OUTPUT))?;
    progress(1, 1, &format!("{} images", b.len()));
    Ok(JobResult { outputs: [("data".to_string(), OUTPUT.to_string())].into(), metrics: bundle_metrics(&b) })
}
