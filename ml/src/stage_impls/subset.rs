//! `subset`: seeded (stratified) fraction of a bundle (input `data`) → outputs `selected` and
//! `rest`, both in file order. The draw is documented in [`crate::data::subset`].

use anyhow::{anyhow, Context};
use serde_json::json;
use wdro_stages::params::SubsetParams;
use wdro_stages::worker_protocol::{Job, JobResult};

use crate::data::{subset, Bundle};

pub const SELECTED: &str = "selected.safetensors";
pub const REST: &str = "rest.safetensors";

pub fn run(job: &Job, progress: &dyn Fn(u64, u64, &str)) -> anyhow::Result<JobResult> {
    let p: SubsetParams = serde_json::from_value(job.params.clone()).context("subset: bad params")?;
    let data = job.inputs.get("data").ok_or_else(|| anyhow!("subset: the job has no input `data`"))?;
    let b = Bundle::load(data)?;
    progress(0, 1, "drawing");
    let (sel, rest) = subset::split(&b, p.fraction, p.seed, p.stratified)?;
    sel.save(&job.out_dir.join(SELECTED))?;
    rest.save(&job.out_dir.join(REST))?;
    progress(1, 1, &format!("{} selected, {} rest", sel.len(), rest.len()));
    Ok(JobResult {
        outputs: [("selected".to_string(), SELECTED.to_string()), ("rest".to_string(), REST.to_string())].into(),
        metrics: json!({
            "num_selected": sel.len(),
            "num_rest": rest.len(),
            "selected_class_counts": sel.class_counts(),
            "rest_class_counts": rest.class_counts(),
        }),
    })
}
