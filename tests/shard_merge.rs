//! Sharding along the data axis: the same tiny demo pipeline run whole (`[shard]` unset) and with
//! three shards per data-parallel stage (an uneven split on purpose), into separate caches. The
//! merged Υ, clean and pointwise-attack stages must be bit-identical to the unsharded ones: the
//! same output bytes (blake3 digests) and the same metrics (but for the wall time).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::util::Dir;

/// 500 training images (Υ on a 50-image subset: 4 batches, shards of 1, 1 and 2), 100 test
/// images in batches of 16: 7 batches, so 3 shards hold 2, 2 and 3 batches and the last one ends
/// on a partial batch.
const TINY: &[&str] = &[
    "--set",
    "data.train_limit=500",
    "--set",
    "data.test_limit=100",
    "--set",
    "model.train.epochs=1",
    "--set",
    "finetune.enabled=false",
    "--set",
    "upsilon.losses=[\"redlr\"]",
    "--set",
    "upsilon.on_test=false",
    "--set",
    "attacks.itr=3",
    "--set",
    "attacks.deltas=[\"16/255\"]",
    "--set",
    "attacks.q=[2]",
    "--set",
    "attacks.kinds=[]",
    "--set",
    "attacks.pointwise=[\"apgd-ce\"]",
    "--set",
    "eval.batch_size=16",
    "--set",
    "run.max_workers=2",
];

const SHARDED: &[&str] = &["--set", "shard.upsilon=3", "--set", "shard.pointwise=3", "--set", "shard.clean=3"];

/// The stages whose merged results must equal the unsharded ones (PGD, APGD-DLR and empty
/// shards are covered at the stage level by `ml/tests/shard_merge.rs`).
const MERGED: &[&str] = &["upsilon.pretrained.train10.redlr", "clean.pretrained", "attack.pretrained.apgd-ce"];

/// Adds a W-attack for the `plan`/`dag` checks (it is not run: the runs stay small).
const WITH_W: &[&str] = &["--set", "attacks.kinds=[\"w-fgsm\"]"];

fn project() -> Dir {
    let d = Dir::new();
    let root = env!("CARGO_MANIFEST_DIR");
    assert!(
        std::path::Path::new(&format!("{root}/.data/fashion-mnist")).exists(),
        "offline data missing: run scripts/setup.sh first"
    );
    let cfg = std::fs::read_to_string(format!("{root}/configs/demo.toml")).unwrap();
    d.write("wdro.toml", cfg.replace("file:.data/", &format!("file:{root}/.data/")));
    d
}

fn args<'a>(cache: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = TINY.to_vec();
    a.extend_from_slice(&["--set", cache]);
    a.extend_from_slice(extra);
    a
}

/// Stage name → its record (the latest per name) in the cache the args point at.
fn records(d: &Dir, a: &[&str]) -> BTreeMap<String, Value> {
    let out = d.wdro().args(a).args(["--json", "cache", "ls"]).ok();
    let recs: Vec<Value> = serde_json::from_str(out.trim()).expect("cache ls --json is a JSON list");
    let mut by_name = BTreeMap::new();
    for r in recs {
        by_name.entry(r["stage_name"].as_str().unwrap().to_string()).or_insert(r);
    }
    by_name
}

/// Metrics without the fields that legitimately differ between two computations.
fn comparable(metrics: &Value) -> Value {
    let mut m = metrics.clone();
    if let Some(o) = m.as_object_mut() {
        o.remove("wall_s");
    }
    m
}

#[test]
fn sharded_results_are_bit_identical_to_unsharded() {
    let d = project();
    let whole = args("run.cache_dir=cache-whole", &[]);
    let sharded = args("run.cache_dir=cache-sharded", SHARDED);

    // `plan` and `dag` show the shards and the merge that keeps the stage's name.
    let plan = d.wdro().args(&sharded).args(WITH_W).args(["plan"]).output();
    let plan_text = String::from_utf8_lossy(&plan.stdout).to_string() + &String::from_utf8_lossy(&plan.stderr);
    assert!(plan.status.success(), "{plan_text}");
    let dag = d.wdro().args(&sharded).args(WITH_W).args(["dag", "--format", "ascii"]).ok();
    for text in [&plan_text, &dag] {
        for base in MERGED {
            for i in 1..=3 {
                assert!(text.contains(&format!("{base}.shard-{i}-of-3")), "no shard {i} of {base} in:\n{text}");
            }
            assert!(text.contains(base), "{base} missing:\n{text}");
        }
        assert!(text.contains("attack.pretrained.w-fgsm.w2.16_255"), "{text}");
        assert!(!text.contains("w-fgsm.w2.16_255.shard"), "the W-attack must stay whole:\n{text}");
    }
    let whole_plan = d.wdro().args(&whole).args(["dag", "--format", "ascii"]).ok();
    assert!(!whole_plan.contains(".shard-"), "unsharded by default:\n{whole_plan}");

    d.wdro().args(&whole).args(["run"]).ok();
    d.wdro().args(&sharded).args(["run"]).ok();
    let a = records(&d, &whole);
    let b = records(&d, &sharded);

    // Same model in both caches (training is deterministic), so the comparison is meaningful.
    assert_eq!(a["checkpoint.pretrained"]["outputs"]["model"], b["checkpoint.pretrained"]["outputs"]["model"]);
    for name in MERGED {
        let (ra, rb) = (&a[*name], &b[*name]);
        assert_ne!(ra["stage_id"], "merge", "{name}: the unsharded run has no merge");
        assert_eq!(rb["stage_id"], "merge", "{name}: the sharded run merges");
        let (oa, ob) = (ra["outputs"].as_object().unwrap(), rb["outputs"].as_object().unwrap());
        assert_eq!(oa.keys().collect::<Vec<_>>(), ob.keys().collect::<Vec<_>>(), "{name}: output names");
        for (out, ref_a) in oa {
            if out == "summary" {
                continue; // holds wall_s; its numbers are compared below
            }
            assert_eq!(ref_a["digest"], ob[out]["digest"], "{name}: output {out} differs");
        }
        assert_eq!(comparable(&ra["metrics"]), comparable(&rb["metrics"]), "{name}: metrics differ");
        for i in 1..=3 {
            assert!(b.contains_key(&format!("{name}.shard-{i}-of-3")), "{name}: shard {i} has no record");
        }
    }
    // The uneven split: shards of 2, 2 and 3 batches of 16 test images.
    let ranges: Vec<(i64, i64)> = (1..=3)
        .map(|i| {
            let m = &b[&format!("clean.pretrained.shard-{i}-of-3")]["metrics"];
            (m["shard_start"].as_i64().unwrap(), m["shard_end"].as_i64().unwrap())
        })
        .collect();
    assert_eq!(ranges, vec![(0, 32), (32, 64), (64, 100)]);
    // The evaluation tables agree.
    assert_eq!(comparable(&a["eval.pretrained"]["metrics"]), comparable(&b["eval.pretrained"]["metrics"]));

    // Asking to shard the W-attacks is refused with the reason.
    let (_, err) = d.wdro().args(&whole).args(["--set", "shard.distributional=2", "plan"]).code(2);
    assert!(err.contains("shard.distributional") && err.contains("W2 normalisation"), "{err}");
}
