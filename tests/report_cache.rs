//! `wdro report runs | diff | plot | html` on a cache holding two demo-like runs (records built
//! with the cache library, in the formats the pipeline writes): the reports need no torch.

use crate::report_support::{check_svg, svg_texts, synthetic_cache};
use crate::util::Dir;

fn project() -> Dir {
    let d = Dir::new();
    synthetic_cache(&d.path().join("cache"));
    d
}

#[test]
fn runs_lists_ids_pins_and_relative_names() {
    let d = project();
    let out = d.wdro().args(["--cache-dir", "cache", "report", "runs"]).ok();
    assert!(out.contains("20261125T110000.000Z-1") && out.contains("latest~1, baseline"), "{out}");
    assert!(out.contains("20261125T120000.000Z-2") && out.contains("latest"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&d.wdro().args(["--cache-dir", "cache", "--json", "report", "runs"]).ok()).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[0]["pins"][0], "baseline");
    assert_eq!(v[1]["computed"], serde_json::json!(["finetune", "eval.finetuned"]));
}

#[test]
fn diff_shows_metric_deltas_and_the_stages_whose_keys_differ() {
    let d = project();
    let out = d.wdro().args(["--cache-dir", "cache", "report", "diff", "latest~1", "latest"]).ok();
    // Fine-tuned W2 accuracy at 4/255: 0.30 + 10·0.02 = 0.50 → 0.30 + 10·0.04 = 0.70.
    let row = out.lines().find(|l| l.starts_with("finetuned:w2_linf_acc@delta=4/255")).expect(&out);
    assert!(row.contains("0.5000") && row.contains("0.7000") && row.contains("+0.2000"), "{row}");
    let row = out.lines().find(|l| l.starts_with("pretrained:clean_acc")).expect(&out);
    assert!(row.trim_end().ends_with(" 0"), "unchanged metric: {row}");
    assert!(out.contains("2 stages differ (4 the same)"), "{out}");
    let ft = out.lines().find(|l| l.trim_start().starts_with("finetune ")).expect(&out);
    assert!(ft.contains("params: beta 6.0 → 3.0"), "{ft}");
    let ev = out.lines().find(|l| l.trim_start().starts_with("eval.finetuned")).expect(&out);
    assert!(ev.contains("inputs: data"), "{ev}");
    assert!(!out.contains("eval.pretrained "), "an unchanged stage is not listed: {out}");

    // Pins and id prefixes name runs too; Markdown and JSON forms.
    let md = d.wdro().args(["--cache-dir", "cache", "report", "diff", "--markdown", "baseline", "20261125T12"]).ok();
    assert!(md.contains("| finetuned | w2_linf_acc@delta=4/255 | 0.5000 | 0.7000 | +0.2000 |"), "{md}");
    let j: serde_json::Value = serde_json::from_str(
        &d.wdro().args(["--cache-dir", "cache", "--json", "report", "diff", "baseline", "latest"]).ok(),
    )
    .unwrap();
    assert_eq!(j["stages"][0]["stage"], "finetune");
    assert_eq!(j["stages"][0]["params"][0]["field"], "beta");

    let (_, err) = d.wdro().args(["--cache-dir", "cache", "report", "diff", "latest~5", "latest"]).code(2);
    assert!(err.contains("only 2 run(s)"), "{err}");
    let (_, err) = d.wdro().args(["--cache-dir", "cache", "report", "diff", "nope", "latest"]).code(2);
    assert!(err.contains("baseline") && err.lines().count() == 1, "{err}");
}

#[test]
fn plot_writes_the_papers_figures_as_valid_svg() {
    let d = project();
    let out = d.wdro().args(["--cache-dir", "cache", "report", "plot", "--out", "figs"]).ok();
    assert_eq!(out.lines().count(), 5, "{out}");
    let p = |f: &str| d.path().join("figs").join(format!("{f}.svg"));
    check_svg(
        &p("fig7_1_upsilon_estimate"),
        "Υ on the full test set (reference)",
        "Υ estimated on 10 % of the training set",
        &["pretrained", "finetuned"],
    );
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
    check_svg(
        &p("fig7_4_upsilon_finetuning"),
        "fine-tuning epoch",
        "Υ (redlr, q = 2)",
        &["finetuned test", "finetuned training subset"],
    );
    check_svg(
        &p("fig_accuracy_vs_delta"),
        "δ (× 1/255)",
        "accuracy",
        &["pretrained W₂", "pretrained W∞", "finetuned W₂", "finetuned W∞"],
    );

    // Two runs in one figure: one series per model of each run.
    d.wdro()
        .args(["--cache-dir", "cache", "report", "plot", "--run", "baseline", "--run", "latest", "--out", "two"])
        .ok();
    let svg = std::fs::read_to_string(d.path().join("two/fig7_2_w2_finetuning.svg")).unwrap();
    let texts = svg_texts(&svg);
    for s in [
        "baseline:finetuned test",
        "baseline:finetuned validation",
        "latest:finetuned test",
        "latest:finetuned validation",
    ] {
        assert!(texts.iter().any(|t| t == s), "{s} missing from {texts:?}");
    }
    check_svg(
        &d.path().join("two/fig7_1_upsilon_estimate.svg"),
        "Υ on the full test set (reference)",
        "Υ estimated on 10 % of the training set",
        &["baseline:pretrained", "baseline:finetuned", "latest:pretrained", "latest:finetuned"],
    );
}

#[test]
fn html_is_one_self_contained_page() {
    let d = project();
    d.write(
        "eval.json",
        serde_json::to_string(&serde_json::json!({
            "wdro_version": "0.1.0", "run_id": "r", "config_digest": "c", "model": "pretrained",
            "model_source": "file:ckpt.safetensors", "checkpoint_digest": "blake3:ab", "checkpoint_source_digest": null,
            "seeds": {}, "passed": false, "gates_failed": 1, "metrics": [], "stages": [], "error": null,
            "gates": [{"gate": "clean_acc >= 0.9", "metric": "clean_acc", "op": ">=", "threshold": 0.9, "value": 0.86,
                       "passed": false, "message": "gate failed: clean_acc is 0.86, required >= 0.9",
                       "provenance": {"stage": "clean.pretrained", "stage_key": "0123456789abcdef", "sources": [],
                                      "table_stage": "eval.pretrained", "table_key": null, "checkpoint_digest": null,
                                      "wdro_version": "0.1.0"}}]
        }))
        .unwrap(),
    );
    let out = d
        .wdro()
        .args(["--cache-dir", "cache", "report", "html", "--eval-json", "eval.json", "--out", "r/index.html"])
        .ok();
    assert_eq!(out.trim(), "r/index.html");
    let html = std::fs::read_to_string(d.path().join("r/index.html")).unwrap();
    assert_eq!(html.matches("<svg").count(), 5);
    assert!(html.contains("<th>pretrained</th><th>finetuned</th><th>change</th>"));
    assert!(html.contains("clean_acc &gt;= 0.9") && html.contains("FAIL"));
    for forbidden in ["<script", "<link", "src=", "href=\"http", "url("] {
        assert!(!html.contains(forbidden), "the page must not load anything: found {forbidden}");
    }
    crate::report_support::assert_xml(html.trim_start_matches("<!DOCTYPE html>\n"), "the page body");
    let (_, err) = d.wdro().args(["--cache-dir", "cache", "report", "html", "--eval-json", "missing.json"]).code(2);
    assert!(err.contains("missing.json"), "{err}");
}

#[test]
fn reports_on_an_empty_cache_say_what_to_do() {
    let d = Dir::new();
    let (_, err) = d.wdro().args(["--cache-dir", "cache", "report", "plot"]).code(2);
    assert!(err.contains("wdro run") && err.lines().count() == 1, "{err}");
    std::fs::create_dir_all(d.path().join("cache")).unwrap();
    let (_, err) = d.wdro().args(["--cache-dir", "cache", "report", "diff", "latest", "latest~1"]).code(2);
    assert!(err.contains("no run records"), "{err}");
}

#[test]
fn sweep_errors_and_dry_run_need_no_worker() {
    let d = Dir::new();
    let cfg = crate::report_support::demo_config();
    let run = |args: &[&str]| d.wdro().args(["--config", cfg.to_str().unwrap(), "run"]).args(args);
    let (_, err) = run(&["--sweep", "finetune.beta"]).code(2);
    assert!(err.contains("expected KEY=V1,V2"), "{err}");
    let (_, err) = run(&["--sweep", "finetune.betta=1,3"]).code(2);
    assert!(err.contains("sweep variant `betta=1`") && err.contains("did you mean `beta`"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let (_, err) = run(&["--sweep", "finetune.beta=1", "--sweep", "finetune.beta=2"]).code(2);
    assert!(err.contains("swept twice"), "{err}");
    // A cluster sweep needs the shared remote cache, its only coordination point.
    let (_, err) = run(&["--sweep", "finetune.beta=1,3", "--executor", "slurm"]).code(2);
    assert!(err.contains("shared remote cache") && err.contains("--remote URL"), "{err}");
    // A dry run plans every variant and computes nothing.
    let (_, err) = run(&["--sweep", "finetune.beta=1,3", "--dry-run"]).code(0);
    assert!(err.contains("sweep 1/2: beta=1") && err.contains("sweep 2/2: beta=3"), "{err}");
    assert!(err.contains("stages to run"), "{err}");
    let (_, err) = run(&["--sweep", "finetune.beta=1,3", "--frozen"]).code(6);
    assert!(err.contains("2 of 2 variants"), "{err}");
}
