//! Helpers of the evaluation and report tests: the demo config with a tiny synthetic data set,
//! a synthetic cache of two demo-like runs, and XML checks for SVG/JUnit/HTML.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use wdro_cache::{Digest, LockWait, OutputRef, RunRecord, StageKey, StageRecord, Store};

use crate::util::{blake3_hex, Dir};

/// The repository's demo config.
pub fn demo_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/demo.toml")
}

/// Links the repository's `.data` (Fashion-MNIST, from scripts/setup.sh) into the test dir, so
/// the demo config's `file:.data/…` sources resolve.
pub fn link_data(d: &Dir) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(".data");
    assert!(
        src.join("fashion-mnist").is_dir(),
        "{} is missing: run scripts/setup.sh (it links the offline Fashion-MNIST the demo evaluates on)",
        src.display()
    );
    std::os::unix::fs::symlink(&src, d.path().join(".data")).unwrap();
}

/// The demo's reduced sizes for tests: 200 test images, 5 attack steps, one training epoch.
pub fn small() -> Vec<String> {
    ["data.test_limit=200", "attacks.itr=5", "model.train.epochs=1", "finetune.epochs=1"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn idx_images(images: &[[u8; 784]]) -> Vec<u8> {
    let mut b = vec![0, 0, 8, 3];
    b.extend((images.len() as u32).to_be_bytes());
    b.extend(28u32.to_be_bytes());
    b.extend(28u32.to_be_bytes());
    for im in images {
        b.extend_from_slice(im);
    }
    b
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 8, 1];
    b.extend((labels.len() as u32).to_be_bytes());
    b.extend_from_slice(labels);
    b
}

/// `n` 28×28 grey images of 10 easily learnt classes (a bright square whose place is the class,
/// on seeded noise), labels in round-robin order.
fn synthetic(n: usize, seed: u64) -> (Vec<[u8; 784]>, Vec<u8>) {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let mut images = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let c = (i % 10) as u8;
        let mut im = [0u8; 784];
        for p in im.iter_mut() {
            *p = (next() % 40) as u8;
        }
        let (r0, c0) = (3 + (c as usize / 5) * 13, 1 + (c as usize % 5) * 5);
        for r in r0..r0 + 8 {
            for col in c0..c0 + 5 {
                im[r * 28 + col] = 200 + (next() % 56) as u8;
            }
        }
        images.push(im);
        labels.push(c);
    }
    (images, labels)
}

/// Writes a tiny Fashion-MNIST-shaped data set (1,000 training and 200 test images) and returns
/// the `--set` overrides that point the demo's four fetch stages at it, plus small sizes for
/// training, attacks and fine-tuning. Same pipeline as the demo, seconds instead of minutes.
pub fn tiny_demo(d: &Dir) -> Vec<String> {
    let (tr, trl) = synthetic(1000, 1);
    let (te, tel) = synthetic(200, 2);
    let mut sets = Vec::new();
    for (name, bytes) in [
        ("train_images", idx_images(&tr)),
        ("train_labels", idx_labels(&trl)),
        ("test_images", idx_images(&te)),
        ("test_labels", idx_labels(&tel)),
    ] {
        let rel = format!("tiny/{name}.idx");
        d.write(&rel, &bytes);
        sets.push(format!("fetch.{name}.sources=[\"file:{rel}\"]"));
        sets.push(format!("fetch.{name}.digest=blake3:{}", blake3_hex(&bytes)));
    }
    for s in [
        "data.test_limit=200",
        "model.train.epochs=1",
        "model.train.batch_size=100",
        "attacks.itr=3",
        "finetune.epochs=2",
        "finetune.batch_size=100",
        "finetune.inner_steps=2",
        "finetune.monitor_itr=2",
        "eval.batch_size=200",
    ] {
        sets.push(s.to_string());
    }
    sets
}

/// `--set` pairs for a command line.
pub fn set_args(sets: &[String]) -> Vec<String> {
    sets.iter().flat_map(|s| ["--set".to_string(), s.clone()]).collect()
}

/// Parses XML and returns the document text again (roxmltree borrows it).
pub fn assert_xml(text: &str, what: &str) {
    if let Err(e) = roxmltree::Document::parse(text) {
        panic!("{what} is not well-formed XML: {e}\n{}", &text[..text.len().min(2000)]);
    }
}

/// Texts of all `<text>` elements of an SVG, trimmed.
pub fn svg_texts(svg: &str) -> Vec<String> {
    let doc = roxmltree::Document::parse(svg).expect("valid SVG");
    doc.descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .map(|t| t.trim().to_string())
        .collect()
}

/// An SVG a browser opens: well-formed, `<svg>` root with a size, both axis descriptions as
/// text, one legend entry per expected series, drawn lines and markers.
pub fn check_svg(path: &Path, x_desc: &str, y_desc: &str, series: &[&str]) {
    let svg = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_xml(&svg, &path.display().to_string());
    let doc = roxmltree::Document::parse(&svg).unwrap();
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg", "{}", path.display());
    assert_eq!(root.tag_name().namespace(), Some("http://www.w3.org/2000/svg"));
    assert!(root.attribute("width").is_some() && root.attribute("viewBox").is_some());
    let texts = svg_texts(&svg);
    assert!(texts.iter().any(|t| t == x_desc), "{}: x axis {x_desc:?} not in {texts:?}", path.display());
    assert!(texts.iter().any(|t| t == y_desc), "{}: y axis {y_desc:?} not in {texts:?}", path.display());
    for s in series {
        assert!(texts.iter().any(|t| t == s), "{}: no series {s:?} in {texts:?}", path.display());
    }
    let ticks = texts.iter().filter(|t| t.parse::<f64>().is_ok()).count();
    assert!(ticks >= 4, "{}: axes without tick labels", path.display());
    let markers = doc.descendants().filter(|n| n.has_tag_name("circle")).count();
    assert!(markers >= series.len(), "{}: {markers} markers for {} series", path.display(), series.len());
}

fn key(s: &str) -> StageKey {
    StageKey(Digest::of_bytes(s.as_bytes()))
}

fn record(
    store: &Store,
    name: &str,
    params: Value,
    metrics: Value,
    input: &str,
    outputs: &[(&str, Value)],
) -> StageRecord {
    let mut outs = std::collections::BTreeMap::new();
    for (o, v) in outputs {
        let bytes = serde_json::to_vec(v).unwrap();
        let d = store.put_bytes(&bytes).unwrap();
        outs.insert(o.to_string(), OutputRef { digest: d, size: bytes.len() as u64, kind: "json".into() });
    }
    let rec = StageRecord {
        key: key(&format!("{name}{params}{metrics}")),
        stage_name: name.into(),
        stage_id: name.split('.').next().unwrap().into(),
        version: 1,
        params,
        inputs: [("data".to_string(), Digest::of_bytes(input.as_bytes()))].into(),
        outputs: outs,
        metrics,
        env: [("torch".to_string(), "2.13.0".to_string()), ("device".to_string(), "cpu".to_string())].into(),
        wdro_version: "0.1.0".into(),
        finished_at: 1_764_000_000,
        duration_ms: 1000,
    };
    store.put_record(&rec).unwrap();
    rec
}

/// Evaluation metrics shaped like the demo's `eval.M` tables.
pub fn table(clean: f64, rob: f64, ups: f64) -> Value {
    json!({
        "clean_acc": clean, "pointwise_acc": rob * 0.8,
        "w2_linf_acc@delta=4/255": rob, "w2_linf_acc@delta=16/255": rob * 0.5,
        "winf_linf_acc@delta=4/255": rob * 1.2, "winf_linf_acc@delta=16/255": rob * 0.8,
        "w2_linf_fgsm_acc@delta=4/255": rob * 1.1,
        "winf_linf_apgd-ce_acc@delta=16/255": rob * 0.8,
        "upsilon_train10_ce_q1": ups * 0.9, "upsilon_train10_ce_q2": ups * 1.3,
        "upsilon_test_ce_q1": ups, "upsilon_test_ce_q2": ups * 1.4,
        "upsilon_train10_redlr_q1": ups * 0.5, "upsilon_train10_redlr_q2": ups * 0.7,
        "upsilon_test_redlr_q1": ups * 0.55, "upsilon_test_redlr_q2": ups * 0.75,
        "upsilon": ups * 0.7,
    })
}

/// The fine-tuning log in the worker's format (`{"log": [EpochLog, …]}`).
pub fn finetune_log(epochs: u32, gain: f64) -> Value {
    let e = |i: u32| {
        let x = gain * f64::from(i);
        json!({
            "epoch": i, "lr": 0.01, "steps": 8, "train_loss": 1.0 - x, "train_loss_nat": 0.5, "train_loss_rob": 0.5,
            "train_acc": 0.7 + x, "upsilon_ref": 1.0,
            "val": {"clean_acc": 0.8, "w2_acc": 0.30 + x, "w2_loss": 1.0, "winf_acc": 0.5 + x, "winf_loss": 0.8},
            "test": {"clean_acc": 0.79, "w2_acc": 0.28 + x, "w2_loss": 1.0, "winf_acc": 0.48 + x, "winf_loss": 0.8},
            "upsilon_test": [{"loss": "ce", "q1": 1.0, "q2": 1.5 - x}, {"loss": "redlr", "q1": 0.7, "q2": 0.9 - x}],
            "upsilon_train": [{"loss": "ce", "q1": 1.0, "q2": 1.4 - x}, {"loss": "redlr", "q1": 0.7, "q2": 0.85 - x}],
            "wall_s": 2.0
        })
    };
    json!({"log": (1..=epochs).map(e).collect::<Vec<_>>(), "best_epoch": epochs, "selected_epoch": epochs})
}

/// A cache with two demo-like runs that differ in `finetune.beta` (6 → 3): the same upstream
/// stages, a different fine-tuning and evaluation of the fine-tuned model.
pub fn synthetic_cache(dir: &Path) {
    let store = Store::open(dir, LockWait::NoWait).unwrap();
    let shared = [
        record(&store, "data.train", json!({"format": "idx", "split": "train"}), json!({}), "raw", &[]),
        record(
            &store,
            "checkpoint.pretrained",
            json!({"source": "train"}),
            json!({}),
            "train",
            &[("model", json!("weights"))],
        ),
        record(
            &store,
            "upsilon.pretrained.train10.redlr",
            json!({"loss": "redlr"}),
            json!({"upsilon_q2": 1.0}),
            "model",
            &[],
        ),
        record(&store, "eval.pretrained", json!({"model": "pretrained"}), table(0.86, 0.30, 1.0), "summaries", &[]),
    ];
    for (i, beta, gain) in [(1, 6.0, 0.02), (2, 3.0, 0.04)] {
        let ft = record(
            &store,
            "finetune",
            json!({"beta": beta, "lr": 0.01, "epochs": 3}),
            json!({}),
            "model",
            &[("log", finetune_log(3, gain)), ("model", json!(format!("ft{beta}")))],
        );
        let ev = record(
            &store,
            "eval.finetuned",
            json!({"model": "finetuned"}),
            table(0.84, 0.30 + 10.0 * gain, 0.8 - gain),
            &format!("finetuned-{beta}"),
            &[],
        );
        let mut stages: Vec<(String, StageKey)> = shared.iter().map(|r| (r.stage_name.clone(), r.key)).collect();
        stages.push(("finetune".into(), ft.key));
        stages.push(("eval.finetuned".into(), ev.key));
        store
            .put_run(&RunRecord {
                id: format!("20261125T1{i}0000.000Z-{i}"),
                started_at: 1_764_000_000 + i,
                config_digest: Digest::of_bytes(format!("cfg{beta}").as_bytes()),
                computed: if i == 1 {
                    stages.iter().map(|s| s.0.clone()).collect()
                } else {
                    vec!["finetune".into(), "eval.finetuned".into()]
                },
                stages,
                pinned_as: None,
            })
            .unwrap();
    }
    store.pin("baseline", "20261125T110000.000Z-1").unwrap();
}
