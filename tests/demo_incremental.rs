//! Incremental reruns on the real demo pipeline (Fashion-MNIST, trained small CNN, Υ, attacks,
//! W-DRO fine-tuning, evaluation), at reduced sizes: only the stages whose inputs changed rerun.

use std::collections::BTreeSet;

use crate::util::{events, of_kind, Dir};

/// Reduced demo: 2,000 training images, 200 test images, few iterations.
const SMALL: &[&str] = &[
    "--set",
    "data.train_limit=2000",
    "--set",
    "data.test_limit=200",
    "--set",
    "model.train.epochs=1",
    "--set",
    "attacks.itr=3",
    "--set",
    "attacks.deltas=[\"16/255\"]",
    "--set",
    "attacks.pointwise=[\"apgd-ce\"]",
    "--set",
    "finetune.epochs=1",
    "--set",
    "finetune.inner_steps=2",
    "--set",
    "finetune.monitor_itr=2",
];

fn demo() -> Dir {
    let d = Dir::new();
    let root = env!("CARGO_MANIFEST_DIR");
    let cfg = std::fs::read_to_string(format!("{root}/configs/demo.toml")).unwrap();
    assert!(
        std::path::Path::new(&format!("{root}/.data/fashion-mnist")).exists(),
        "offline data missing: run scripts/setup.sh first"
    );
    d.write("wdro.toml", cfg.replace("file:.data/", &format!("file:{root}/.data/")));
    d
}

/// Runs with the reduced settings plus `extra`; returns the names of computed stages.
fn computed(d: &Dir, extra: &[&str]) -> BTreeSet<String> {
    let mut args: Vec<&str> = vec!["--json"];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    args.push("run");
    let out = d.wdro().args(&args).ok();
    of_kind(&events(&out), "stage_finished")
        .into_iter()
        .filter(|e| e["hit"] == false)
        .map(|e| e["stage"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn only_affected_stages_rerun() {
    let d = demo();
    let first = computed(&d, &[]);
    assert!(first.contains("finetune") && first.contains("report"), "{first:?}");

    // A second identical run computes nothing.
    assert!(computed(&d, &[]).is_empty());

    // Execution-only params rerun nothing.
    assert!(computed(&d, &["--set", "eval.batch_size=7"]).is_empty());

    // A new fine-tuning lr reruns fine-tuning and the evaluation after it, nothing else.
    let lr = computed(&d, &["--set", "finetune.lr=0.02"]);
    assert!(lr.contains("finetune"), "{lr:?}");
    for s in &lr {
        assert!(
            s == "finetune" || s == "report" || s.ends_with(".finetuned") || s.contains(".finetuned."),
            "{s} should not rerun after a fine-tuning lr change: {lr:?}"
        );
    }
    assert!(lr.iter().any(|s| s.starts_with("attack.finetuned.")), "{lr:?}");

    // A new δ in the evaluation grid reruns only the attacks at that δ and the tables.
    let delta = computed(&d, &["--set", "finetune.lr=0.02", "--set", "attacks.deltas=[\"16/255\", \"8/255\"]"]);
    assert!(!delta.is_empty());
    for s in &delta {
        let ok = (s.starts_with("attack.") && s.ends_with(".8_255")) || s.starts_with("eval.") || s == "report";
        assert!(ok, "{s} should not rerun for a new δ: {delta:?}");
    }

    // `why` names the changed field.
    let why = d.wdro().args(SMALL).args(["--set", "finetune.lr=0.05", "why", "finetune"]).ok();
    assert!(why.contains("finetune.lr") && why.contains("0.02") && why.contains("0.05"), "{why}");
}
