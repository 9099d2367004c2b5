//! `wdro eval`'s usage, frozen and data errors on the demo config: each has its own exit code
//! and one line that names the thing and the fix, and none computes anything it should not.

use crate::report_support::{assert_xml, demo_config};
use crate::util::Dir;

fn eval(d: &Dir) -> crate::util::WdroCommand {
    d.wdro().args(["--config", demo_config().to_str().unwrap(), "eval"])
}

fn runs_recorded(d: &Dir) -> usize {
    if !d.path().join(".wdro/cache").exists() {
        return 0;
    }
    let out = d.wdro().args(["--cache-dir", ".wdro/cache", "--json", "report", "runs"]).ok();
    serde_json::from_str::<serde_json::Value>(&out).unwrap().as_array().unwrap().len()
}

#[test]
fn unknown_gate_metric_is_a_usage_error_before_anything_runs() {
    let d = Dir::new();
    let (_, err) = eval(&d).args(["--gate", "w2_linf_acc@delta=8/255 >= 0.45"]).code(2);
    assert_eq!(err.lines().count(), 1, "{err}");
    // The demo's grid is 4/255 and 16/255: the closest name and the available ones are listed.
    assert!(err.contains("no metric `w2_linf_acc@delta=8/255`"), "{err}");
    assert!(err.contains("closest: `w2_linf_acc@delta=4/255`"), "{err}");
    assert!(err.contains("available: clean_acc,") && err.contains("winf_linf_acc@delta=16/255"), "{err}");
    assert_eq!(runs_recorded(&d), 0, "nothing may run for a bad gate");

    // A gate from the config's [gates] table is checked the same way; --no-config-gates skips it.
    let (_, err) = eval(&d).args(["--set", "gates.clean_accuracy=>= 0.8"]).code(2);
    assert!(err.contains("closest: `clean_acc`"), "{err}");
    let (_, err) = eval(&d).args(["--set", "gates.clean_accuracy=>= 0.8", "--no-config-gates", "--frozen"]).code(6);
    assert!(err.contains("--frozen"), "{err}");
}

#[test]
fn gate_syntax_and_flag_errors_are_usage_errors() {
    let d = Dir::new();
    for (args, want) in [
        (vec!["--gate", "clean_acc 0.8"], "no operator"),
        (vec!["--gate", "clean_acc >= high"], "not a number"),
        (vec!["--gate", "clean_acc => 0.8"], "unknown operator"),
        (vec!["--arch", "small-cnn"], "pass --model too"),
        (vec!["--model", "Zhang2019Theoreticaly"], "closest: Zhang2019Theoretically"),
        (vec!["--model", "file:ckpt.pt", "--arch", "smal-cnn"], "small-cnn"),
        (vec!["--model", "file:ckpt.pt", "--arch", "wide-resnet"], "depth"),
    ] {
        let (_, err) = eval(&d).args(&args).code(2);
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
    let (_, err) = d.wdro().args(["eval", "--config", "nope.toml"]).code(2);
    assert!(err.contains("nope.toml"), "{err}");
}

#[test]
fn frozen_fails_with_6_when_the_cache_lacks_results() {
    let d = Dir::new();
    let (_, err) = eval(&d).args(["--frozen", "--gate", "clean_acc >= 0.5"]).code(6);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("would have to be computed") && err.contains("data.test"), "{err}");
    assert!(err.contains("wdro pull"), "the fix is named: {err}");
    assert_eq!(runs_recorded(&d), 0);
}

#[test]
fn missing_data_is_exit_3_and_the_junit_file_names_the_stage() {
    let d = Dir::new();
    // No .data link here: the demo's file sources do not exist.
    let (_, err) = eval(&d)
        .args(["--offline", "--gate", "clean_acc >= 0.5", "--junit", "out/junit.xml", "--report-json", "out/r.json"])
        .code(3);
    assert!(err.contains("fetch."), "{err}");
    assert_eq!(err.lines().filter(|l| l.starts_with("error:")).count(), 1, "{err}");
    let xml = std::fs::read_to_string(d.path().join("out/junit.xml")).unwrap();
    assert_xml(&xml, "junit");
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let stages = doc.descendants().find(|n| n.attribute("name") == Some("wdro.stages")).unwrap();
    let errors: Vec<_> = stages
        .children()
        .filter(|c| c.has_tag_name("testcase") && c.children().any(|e| e.has_tag_name("error")))
        .map(|c| c.attribute("name").unwrap().to_string())
        .collect();
    assert!(!errors.is_empty() && errors.iter().all(|n| n.starts_with("fetch.")), "{errors:?}");
    assert!(stages.children().any(|c| c.children().any(|e| e.has_tag_name("skipped"))), "later stages are skipped");
    // The gate is still a test case: not passed, since the table was never computed.
    let gates = doc.descendants().find(|n| n.attribute("name") == Some("wdro.gates")).unwrap();
    assert_eq!(gates.attribute("tests"), Some("1"));
    assert_eq!(gates.attribute("failures"), Some("1"));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(d.path().join("out/r.json")).unwrap()).unwrap();
    assert_eq!(r["passed"], false);
    assert_eq!(r["gates"][0]["value"], serde_json::Value::Null);
    assert!(r["error"].as_str().unwrap().contains("fetch."), "{r}");
}
