//! The report and sweep scenarios on the demo pipeline (configs/demo.toml, pointed at a
//! tiny synthetic Fashion-MNIST-shaped data set so that fine-tuning takes seconds): two cached
//! runs → `report diff` and `report plot`; a 3 × 2 sweep that computes Υ and the pretrained
//! evaluation once, proven by the run records. Needs the torch worker.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::report_support::{check_svg, demo_config, set_args, tiny_demo};
use crate::util::{events, Dir};

fn demo(d: &Dir, sets: &[String]) -> crate::util::WdroCommand {
    d.wdro().args(["--config", demo_config().to_str().unwrap(), "--progress", "never"]).args(set_args(sets))
}

fn runs(d: &Dir) -> Vec<Value> {
    let out = d.wdro().args(["--cache-dir", ".wdro/cache", "--json", "report", "runs"]).ok();
    serde_json::from_str::<Value>(&out).unwrap().as_array().unwrap().clone()
}

#[test]
fn diff_and_plot_two_cached_demo_runs() {
    let d = Dir::new();
    let sets = tiny_demo(&d);
    let out = demo(&d, &sets).args(["run"]).ok();
    assert!(out.contains("clean_acc"), "the before/after table: {out}");
    let mut changed = sets.clone();
    changed.push("finetune.beta=3.0".into());
    demo(&d, &changed).args(["run"]).ok();

    let diff = d.wdro().args(["--cache-dir", ".wdro/cache", "report", "diff", "latest~1", "latest"]).ok();
    // The pretrained side is shared, the fine-tuned side moved.
    let row = diff.lines().find(|l| l.starts_with("pretrained:clean_acc")).expect(&diff);
    assert!(row.trim_end().ends_with(" 0"), "{row}");
    assert!(diff.lines().any(|l| l.starts_with("finetuned:w2_linf_acc@delta=16/255")), "{diff}");
    let ft = diff.lines().find(|l| l.trim_start().starts_with("finetune ")).expect(&diff);
    assert!(ft.contains("params: beta 6.0 → 3.0"), "{ft}");
    for same in ["upsilon.pretrained", "eval.pretrained", "checkpoint.pretrained"] {
        assert!(!diff.lines().any(|l| l.trim_start().starts_with(same)), "{same} has the same key: {diff}");
    }
    let j: Value = serde_json::from_str(
        &d.wdro().args(["--cache-dir", ".wdro/cache", "--json", "report", "diff", "latest~1", "latest"]).ok(),
    )
    .unwrap();
    let changed: Vec<&str> = j["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert!(changed.contains(&"finetune") && changed.contains(&"eval.finetuned") && changed.contains(&"report"));
    assert!(changed.iter().all(|s| !s.contains("pretrained")), "{changed:?}");

    d.wdro().args(["--cache-dir", ".wdro/cache", "report", "plot", "--out", "figs"]).ok();
    let p = |f: &str| d.path().join("figs").join(format!("{f}.svg"));
    let ups_x = "Υ on the full test set (reference)";
    let ups_y = "Υ estimated on 10 % of the training set";
    check_svg(&p("fig7_1_upsilon_estimate"), ups_x, ups_y, &["pretrained", "finetuned"]);
    check_svg(
        &p("fig7_2_w2_finetuning"),
        "fine-tuning epoch",
        "W₂ attack accuracy",
        &["finetuned test", "finetuned validation"],
    );
    check_svg(
        &p("fig7_3_winf_finetuning"),
        "fine-tuning epoch",
        "W∞ attack accuracy",
        &["finetuned test", "finetuned validation"],
    );
    let svg = std::fs::read_to_string(p("fig7_4_upsilon_finetuning")).unwrap();
    assert!(crate::report_support::svg_texts(&svg).iter().any(|t| t == "finetuned training subset"));
    check_svg(
        &p("fig_accuracy_vs_delta"),
        "δ (× 1/255)",
        "accuracy",
        &["pretrained W₂", "pretrained W∞", "finetuned W₂", "finetuned W∞"],
    );
    // Both runs in one figure, a series per model of each.
    d.wdro()
        .args(["--cache-dir", ".wdro/cache", "report", "plot", "--run", "latest~1", "--run", "latest", "--out", "both"])
        .ok();
    check_svg(
        &d.path().join("both/fig7_2_w2_finetuning.svg"),
        "fine-tuning epoch",
        "W₂ attack accuracy",
        &["latest~1:finetuned test", "latest:finetuned test"],
    );
    d.wdro().args(["--cache-dir", ".wdro/cache", "report", "html", "--out", "report.html"]).ok();
    let html = std::fs::read_to_string(d.path().join("report.html")).unwrap();
    assert_eq!(html.matches("<svg").count(), 5);
}

#[test]
fn sweep_3x2_computes_upsilon_and_the_pretrained_evaluation_once() {
    let d = Dir::new();
    let mut sets = tiny_demo(&d);
    // Six fine-tunings and evaluations: one epoch, W-PGD only, one Υ loss.
    for s in ["finetune.epochs=1", "attacks.kinds=[\"w-pgd\"]", "attacks.pointwise=[]", "upsilon.losses=[\"redlr\"]"] {
        sets.push(s.to_string());
    }
    let out = demo(&d, &sets)
        .args(["--json", "run", "--sweep", "finetune.beta=1,3,6", "--sweep", "finetune.delta=4/255,16/255"])
        .ok();
    let ev = events(&out);
    let variants: Vec<&Value> = ev.iter().filter(|e| e["event"] == "sweep_variant").collect();
    assert_eq!(variants.len(), 6);
    assert_eq!(variants[1]["label"], "beta=1 delta=16/255");
    let summary = ev.iter().find(|e| e["event"] == "sweep_summary").expect("one summary");
    assert_eq!(summary["comparison"]["variants"].as_array().unwrap().len(), 6);

    // The proof, from the run records: six runs; every pretrained stage has one key in all six
    // and was computed by exactly one of them; each variant computed its own fine-tuning.
    let all = runs(&d);
    assert_eq!(all.len(), 6);
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut computed: BTreeMap<String, usize> = BTreeMap::new();
    for r in &all {
        for s in r["stages"].as_array().unwrap() {
            keys.entry(s["stage"].as_str().unwrap().into()).or_default().push(s["key"].as_str().unwrap().into());
        }
        for c in r["computed"].as_array().unwrap() {
            *computed.entry(c.as_str().unwrap().into()).or_default() += 1;
        }
    }
    let upstream: Vec<&String> = keys
        .keys()
        .filter(|s| {
            s.starts_with("upsilon.pretrained")
                || s.starts_with("attack.pretrained")
                || *s == "eval.pretrained"
                || *s == "subset.upsilon"
        })
        .collect();
    assert!(upstream.iter().any(|s| s.starts_with("upsilon.pretrained.train10")), "{keys:?}");
    for s in &upstream {
        let k = &keys[*s];
        assert_eq!(k.len(), 6, "{s} used by every variant");
        assert!(k.iter().all(|x| x == &k[0]), "{s}: one key in all variants");
        assert_eq!(computed.get(*s), Some(&1), "{s} computed once");
    }
    assert_eq!(computed.get("finetune"), Some(&6));
    let ft: std::collections::BTreeSet<&String> = keys["finetune"].iter().collect();
    assert_eq!(ft.len(), 6, "six distinct fine-tunings");
    // The sweep's own account agrees.
    let shared = summary["shared"].as_array().unwrap();
    let eval_pre = shared.iter().find(|s| s["stage"] == "eval.pretrained").unwrap();
    assert_eq!(eval_pre["variants"].as_array().unwrap().len(), 6);
    assert_eq!(eval_pre["computed_in"], serde_json::json!(["beta=1 delta=4/255"]));

    // Human form: one comparison table with a column per variant; rerunning computes nothing.
    let out = demo(&d, &sets)
        .args(["run", "--sweep", "finetune.beta=1,3,6", "--sweep", "finetune.delta=4/255,16/255"])
        .output();
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("#6  beta=6 delta=16/255  (run ") && table.contains(", 0 of "), "{table}");
    let header = table.lines().find(|l| l.starts_with("metric")).unwrap();
    assert_eq!(header.split_whitespace().count(), 7, "{header}");
    assert!(table.lines().any(|l| l.starts_with("finetuned:w2_linf_acc@delta=16/255")), "{table}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("eval.pretrained") && err.contains("6 variants"), "{err}");
}
