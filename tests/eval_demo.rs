//! The end-to-end scenario: `wdro eval` on the demo checkpoint (Fashion-MNIST, the small
//! CNN the demo trains), with one passing and one failing gate; exit codes, JUnit and JSON
//! contents; then `--frozen` from the warm cache, and the exported checkpoint evaluated as a
//! file through the same cached stages. Needs the torch worker (`cargo build --workspace`).

use serde_json::Value;

use crate::report_support::{assert_xml, demo_config, link_data, set_args, small};
use crate::util::Dir;

const PASS: &str = "clean_acc >= 0.2";
const FAIL: &str = "w2_linf_acc@delta=16/255 >= 0.999";

fn eval(d: &Dir, extra: &[&str]) -> crate::util::WdroCommand {
    d.wdro()
        .args(["--config", demo_config().to_str().unwrap(), "--progress", "never"])
        .args(set_args(&small()))
        .args(["eval"])
        .args(extra)
}

fn read_json(d: &Dir, rel: &str) -> Value {
    serde_json::from_slice(&std::fs::read(d.path().join(rel)).unwrap()).unwrap()
}

#[test]
fn eval_demo_checkpoint_with_a_passing_and_a_failing_gate() {
    let d = Dir::new();
    link_data(&d);

    // Passing gates only: exit 0, every number with provenance.
    let out = eval(&d, &["--gate", PASS, "--gate", "upsilon <= 1e6", "--report-json", "ok.json"]).ok();
    assert!(out.contains("pass  gate passed: clean_acc is"), "{out}");
    let ok = read_json(&d, "ok.json");
    assert_eq!(ok["passed"], true);
    assert_eq!(ok["model_source"], "train");
    assert_eq!(ok["seeds"]["attacks.seed"], 0);
    let ckpt = ok["checkpoint_digest"].as_str().unwrap().to_string();
    assert!(ckpt.starts_with("blake3:") && ckpt.len() == 7 + 64, "{ckpt}");
    for m in ok["metrics"].as_array().unwrap() {
        let p = &m["provenance"];
        assert_eq!(p["stage_key"].as_str().map(str::len), Some(64), "{m}");
        assert_eq!(p["checkpoint_digest"], ckpt.as_str(), "{m}");
        assert_eq!(p["wdro_version"], env!("CARGO_PKG_VERSION"), "{m}");
        assert_eq!(p["table_stage"], "eval.pretrained");
    }
    let clean = ok["metrics"].as_array().unwrap().iter().find(|m| m["name"] == "clean_acc").unwrap();
    assert_eq!(clean["provenance"]["stage"], "clean.pretrained");
    let w2 = ok["metrics"].as_array().unwrap().iter().find(|m| m["name"] == "w2_linf_acc@delta=16/255").unwrap();
    assert_eq!(w2["provenance"]["stage"], "attack.pretrained.w-pgd.w2.16_255");
    let w2_value = w2["value"].as_f64().unwrap();
    assert!(w2_value < 0.999, "the failing gate below must fail: {w2_value}");
    assert!(!ok["stages"].as_array().unwrap().iter().any(|s| s["name"] == "finetune"), "eval never fine-tunes");

    // One passing and one failing gate: exit 1, the message names metric, threshold and value.
    let (_, err) = eval(
        &d,
        &[
            "--gate",
            PASS,
            "--gate",
            FAIL,
            "--junit",
            "ci/junit.xml",
            "--report-json",
            "ci/r.json",
            "--markdown",
            "ci/r.md",
        ],
    )
    .code(1);
    let line = err.lines().find(|l| l.starts_with("error:")).unwrap();
    assert!(line.contains("w2_linf_acc@delta=16/255") && line.contains("0.999"), "{line}");
    assert!(line.contains(&format!("is {}", wdro_stages::gates::fmt_num(w2_value))), "the value is named: {line}");

    let r = read_json(&d, "ci/r.json");
    assert_eq!(r["passed"], false);
    assert_eq!(r["gates_failed"], 1);
    assert_eq!(r["gates"][0]["passed"], true);
    assert_eq!(r["gates"][1]["passed"], false);
    assert_eq!(r["gates"][1]["threshold"], 0.999);
    assert_eq!(r["gates"][1]["value"].as_f64(), Some(w2_value));
    assert_eq!(r["gates"][1]["provenance"]["stage"], "attack.pretrained.w-pgd.w2.16_255");
    assert!(r["stages"].as_array().unwrap().iter().all(|s| s["outcome"] == "hit"), "second eval: all cache hits");

    let xml = std::fs::read_to_string(d.path().join("ci/junit.xml")).unwrap();
    assert_xml(&xml, "junit");
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let suite = |name: &str| {
        doc.descendants().find(|n| n.has_tag_name("testsuite") && n.attribute("name") == Some(name)).unwrap()
    };
    let gates = suite("wdro.gates");
    assert_eq!(gates.attribute("tests"), Some("2"));
    assert_eq!(gates.attribute("failures"), Some("1"));
    let cases: Vec<_> = gates.children().filter(|c| c.has_tag_name("testcase")).collect();
    assert_eq!(cases[0].attribute("name"), Some(PASS));
    assert!(!cases[0].children().any(|c| c.has_tag_name("failure")));
    let f = cases[1].children().find(|c| c.has_tag_name("failure")).expect("failing gate has <failure>");
    assert!(f.attribute("message").unwrap().contains("w2_linf_acc@delta=16/255"));
    let stages = suite("wdro.stages");
    let names: Vec<&str> =
        stages.children().filter(|c| c.has_tag_name("testcase")).filter_map(|c| c.attribute("name")).collect();
    for s in ["checkpoint.pretrained", "clean.pretrained", "attack.pretrained.w-pgd.w2.16_255", "eval.pretrained"] {
        assert!(names.contains(&s), "{s} not a test case: {names:?}");
    }
    assert!(doc
        .descendants()
        .any(|n| n.attribute("name") == Some("checkpoint_digest") && n.attribute("value") == Some(ckpt.as_str())));
    let md = std::fs::read_to_string(d.path().join("ci/r.md")).unwrap();
    assert!(md.contains("1 of 2 gates failed") && md.contains("**FAIL**"), "{md}");

    // Frozen from the warm cache: nothing to compute, same gates, same exit code.
    eval(&d, &["--frozen", "--gate", PASS]).ok();
    eval(&d, &["--frozen", "--gate", FAIL]).code(1);
    // A changed evaluation setting would compute: frozen refuses with 6.
    let (_, err) = eval(&d, &["--frozen", "--seed", "7"]).code(6);
    assert!(err.contains("would have to be computed"), "{err}");

    // The checkpoint exported from the cache, evaluated as a file, gives the same numbers.
    let store = wdro_cache::Store::open(&d.path().join(".wdro/cache"), wdro_cache::LockWait::NoWait).unwrap();
    let rec = store.latest_record("checkpoint.pretrained").unwrap().unwrap();
    let bytes = store.get_bytes(&rec.outputs["model"].digest).unwrap();
    drop(store);
    d.write("ckpt.safetensors", &bytes);
    eval(
        &d,
        &["--model", "file:ckpt.safetensors", "--arch", "small-cnn", "--report-json", "file.json", "--gate", PASS],
    )
    .ok();
    let f = read_json(&d, "file.json");
    assert_eq!(f["model_source"], "file:ckpt.safetensors");
    assert!(f["checkpoint_source_digest"].as_str().unwrap().starts_with("blake3:"));
    let val =
        |r: &Value, n: &str| r["metrics"].as_array().unwrap().iter().find(|m| m["name"] == n).unwrap()["value"].clone();
    for n in ["clean_acc", "w2_linf_acc@delta=16/255", "upsilon"] {
        assert_eq!(val(&f, n), val(&ok, n), "{n}: the same weights give the same numbers");
    }

    // stdout is a pipe here: no bars, no carriage returns, no colour codes, from the cache.
    let out = d
        .wdro()
        .args(["--config", demo_config().to_str().unwrap()])
        .args(set_args(&small()))
        .args(["eval", "--gate", PASS])
        .output();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let all = [out.stdout.as_slice(), out.stderr.as_slice()].concat();
    assert!(!all.contains(&b'\r') && !all.contains(&0x1b), "interactive output in a pipe");
    // --json: stage events, then one eval_report event, on stdout.
    let stdout = d
        .wdro()
        .args(["--config", demo_config().to_str().unwrap(), "--json"])
        .args(set_args(&small()))
        .args(["eval", "--gate", PASS])
        .ok();
    let ev = crate::util::events(&stdout);
    let last = ev.last().unwrap();
    assert_eq!(last["event"], "eval_report");
    assert_eq!(last["report"]["passed"], true);
    assert!(ev.iter().any(|e| e["event"] == "stage_finished" && e["hit"] == true), "{stdout}");
}
