//! Shard + merge of the data-parallel stages, run the way `wdro-worker` runs them (a `Job`,
//! files in, files out): the merged outputs are byte-identical to the unsharded stage's and the
//! metrics equal, for uneven splits and for splits with empty shards.
//!
//! A test binary of its own: the attacks seed libtorch's global generator, so nothing else may
//! draw from it while they run.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};
use wdro_ml::data::Bundle;
use wdro_ml::stage_impls;
use wdro_stages::shard::{merge_slot, MergeParams, ShardSpec, SHARD_PARAM};
use wdro_stages::worker_protocol::{Job, JobResult};

const BS: i64 = 8;

/// The tests of this binary take turns: they all seed and draw from the global generator.
static RNG: Mutex<()> = Mutex::new(());

struct Fixture {
    dir: tempfile::TempDir,
    model: PathBuf,
    data: PathBuf,
}

/// A small CNN and 45 images labelled mostly with its own predictions (so the attacks have
/// clean-correct points to attack in every batch); 45 = 5 full batches of 8 and one of 5.
fn fixture() -> Fixture {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let arch = serde_json::from_value(json!({"name": "small-cnn", "in_channels": 1, "num_classes": 10})).unwrap();
    tch::manual_seed(0);
    let net = wdro_ml::models::new_net(&arch, Device::Cpu);
    let model = dir.path().join("model.safetensors");
    wdro_ml::checkpoint::save_canonical(&net, &model).unwrap();
    let x = Tensor::randint(256, [45, 1, 28, 28], (Kind::Uint8, Device::Cpu));
    let pred = tch::no_grad(|| net.module.forward_t(&(x.to_kind(Kind::Float) / 255.0), false)).argmax(1, false);
    let wrong = Tensor::arange(45, (Kind::Int64, Device::Cpu)).remainder(5).eq(0);
    let y = (&pred + 1).remainder(10).where_self(&wrong, &pred);
    let data = dir.path().join("data.safetensors");
    Bundle::new(x, y, (0..10).map(|i| i.to_string()).collect()).unwrap().save(&data).unwrap();
    Fixture { dir, model, data }
}

impl Fixture {
    fn job(&self, id: &str, name: &str, params: Value, inputs: BTreeMap<String, PathBuf>) -> Job {
        let out = self.dir.path().join(format!("out-{name}"));
        std::fs::create_dir_all(&out).unwrap();
        Job {
            stage_id: id.into(),
            stage_name: name.into(),
            key: String::new(),
            params,
            exec_params: json!({"batch_size": BS, "threads": 1}),
            inputs,
            out_dir: out,
            scratch_dir: self.dir.path().join(format!("scratch-{name}")),
            device: "cpu".into(),
        }
    }

    fn stage_inputs(&self) -> BTreeMap<String, PathBuf> {
        BTreeMap::from([("model".to_string(), self.model.clone()), ("data".to_string(), self.data.clone())])
    }
}

fn run(id: &str, job: &Job) -> JobResult {
    let nop = |_: u64, _: u64, _: &str| {};
    match id {
        "upsilon" => stage_impls::upsilon::run(job, &nop),
        "clean" => stage_impls::clean::run(job, &nop),
        "attack" => stage_impls::attack::run(job, &nop),
        "merge" => stage_impls::merge::run(job, &nop),
        other => panic!("{other}"),
    }
    .unwrap_or_else(|e| panic!("{} failed: {e:#}", job.stage_name))
}

fn file(job: &Job, r: &JobResult, out: &str) -> Vec<u8> {
    std::fs::read(job.out_dir.join(&r.outputs[out])).unwrap()
}

fn without_wall(m: &Value) -> Value {
    let mut m = m.clone();
    m.as_object_mut().unwrap().remove("wall_s");
    m
}

/// Runs `id` whole and as `count` shards + merge; asserts identical outputs and metrics.
fn check(f: &Fixture, id: &str, tag: &str, params: Value, count: u32, shard_outputs: &[&str]) -> Vec<(i64, i64)> {
    let whole_job = f.job(id, &format!("{tag}-whole"), params.clone(), f.stage_inputs());
    let whole = run(id, &whole_job);
    let mut merge_inputs = BTreeMap::new();
    if id == "attack" {
        merge_inputs.insert("data".to_string(), f.data.clone());
    }
    let mut ranges = Vec::new();
    for index in 0..count {
        let mut p = params.clone();
        p[SHARD_PARAM] = serde_json::to_value(ShardSpec { index, count, batch_size: BS }).unwrap();
        let j = f.job(id, &format!("{tag}-shard{index}of{count}"), p, f.stage_inputs());
        let r = run(id, &j);
        ranges.push((r.metrics["shard_start"].as_i64().unwrap(), r.metrics["shard_end"].as_i64().unwrap()));
        for o in shard_outputs {
            merge_inputs.insert(merge_slot(o, index), j.out_dir.join(&r.outputs[*o]));
        }
    }
    let mp = MergeParams { of: id.into(), of_version: 1, shards: count, params: params.clone() };
    let mj = f.job("merge", &format!("{tag}-merge{count}"), serde_json::to_value(&mp).unwrap(), merge_inputs);
    let merged = run("merge", &mj);
    assert_eq!(whole.outputs.keys().collect::<Vec<_>>(), merged.outputs.keys().collect::<Vec<_>>(), "{tag}");
    for out in whole.outputs.keys() {
        let (a, b) = (file(&whole_job, &whole, out), file(&mj, &merged, out));
        assert!(a == b, "{tag} with {count} shards: output {out} differs ({} vs {} bytes)", a.len(), b.len());
    }
    assert_eq!(without_wall(&whole.metrics), without_wall(&merged.metrics), "{tag} with {count} shards");
    ranges
}

fn arch() -> Value {
    json!({"name": "small-cnn", "in_channels": 1, "num_classes": 10})
}

#[test]
fn merged_shards_are_bit_identical_to_the_whole_stage() {
    let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let f = fixture();
    // 6 batches into 4 shards: 1, 2, 1 and 2 batches, the last one partial.
    let r = check(&f, "upsilon", "ups", json!({"arch": arch(), "loss": "redlr", "norm": "linf"}), 4, &["grad_norms"]);
    assert_eq!(r, vec![(0, 8), (8, 24), (24, 32), (32, 45)]);
    // 6 batches into 8 shards: two shards are empty.
    let r = check(&f, "upsilon", "ups-l2", json!({"arch": arch(), "loss": "ce", "norm": "l2"}), 8, &["grad_norms"]);
    assert_eq!(r.iter().filter(|(s, e)| s == e).count(), 2, "{r:?}");
    check(&f, "clean", "clean", json!({"arch": arch()}), 3, &["per_sample"]);
    check(&f, "clean", "clean8", json!({"arch": arch()}), 8, &["per_sample"]);
    for (kind, count) in [("apgd-ce", 3), ("apgd-dlr", 4), ("pgd", 3), ("pgd", 8)] {
        let p = json!({"arch": arch(), "attack": kind, "loss": "ce", "q": 1, "norm": "linf", "delta": "8/255",
                       "itr": 4, "restarts": 2, "seed": 3});
        check(&f, "attack", &format!("{kind}-{count}"), p, count, &["adv", "parts"]);
    }
}

#[test]
fn w_attacks_refuse_a_shard_spec() {
    let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let f = fixture();
    let mut p = json!({"arch": arch(), "attack": "w-pgd", "loss": "redlr", "q": 2, "norm": "linf",
                       "delta": "8/255", "itr": 2});
    p[SHARD_PARAM] = json!({"index": 0, "count": 2, "batch_size": BS});
    let j = f.job("attack", "wpgd-shard", p, f.stage_inputs());
    let e = stage_impls::attack::run(&j, &|_, _, _| {}).unwrap_err().to_string();
    assert!(e.contains("cannot be sharded") && e.contains("W2 normalisation"), "{e}");
}
