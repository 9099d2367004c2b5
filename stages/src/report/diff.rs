//! `wdro report diff RUN_A RUN_B`: every evaluation metric of both runs with its change, and
//! the stages whose keys differ, each with why (the param fields that changed with old → new
//! values, the inputs that changed, the stage version or environment).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use serde::Serialize;
use serde_json::Value;
use wdro_cache::StageRecord;

use super::markdown::{cell, short};
use super::runs::LoadedRun;

/// One side of a diff.
#[derive(Clone, Debug)]
pub struct RunSide {
    /// How the user named the run.
    pub label: String,
    pub id: String,
    /// Stage name → key (hex), as the run record lists them.
    pub stages: Vec<(String, String)>,
    /// Model → evaluation metrics.
    pub tables: BTreeMap<String, BTreeMap<String, Option<f64>>>,
    /// Stage name → its record (when still in the cache).
    pub records: BTreeMap<String, StageRecord>,
}

impl RunSide {
    pub fn from_loaded(l: &LoadedRun) -> RunSide {
        RunSide {
            label: l.label.clone(),
            id: l.record.id.clone(),
            stages: l.record.stages.iter().map(|(n, k)| (n.clone(), k.to_string())).collect(),
            tables: l.tables(),
            records: l.stages.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MetricRow {
    pub model: String,
    pub metric: String,
    pub a: Option<f64>,
    pub b: Option<f64>,
    /// b − a.
    pub delta: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ParamChange {
    pub field: String,
    pub a: Value,
    pub b: Value,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StageChange {
    pub stage: String,
    pub a_key: Option<String>,
    pub b_key: Option<String>,
    /// One line: `params: beta 6 → 3`, `inputs: model`, `only in B`, ….
    pub why: String,
    pub params: Vec<ParamChange>,
    pub inputs: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunDiff {
    pub a: String,
    pub b: String,
    pub a_id: String,
    pub b_id: String,
    pub rows: Vec<MetricRow>,
    pub stages: Vec<StageChange>,
    /// Stages present in both runs with the same key.
    pub same_stages: usize,
}

/// `{"a": {"b": 1}}` → `a.b = 1`.
fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(o) if !o.is_empty() => {
            for (k, x) in o {
                flatten(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, x, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

fn param_changes(a: &Value, b: &Value) -> Vec<ParamChange> {
    let (mut fa, mut fb) = (BTreeMap::new(), BTreeMap::new());
    flatten("", a, &mut fa);
    flatten("", b, &mut fb);
    let fields: BTreeSet<&String> = fa.keys().chain(fb.keys()).collect();
    fields
        .into_iter()
        .filter(|f| fa.get(*f) != fb.get(*f))
        .map(|f| ParamChange {
            field: f.clone(),
            a: fa.get(f).cloned().unwrap_or(Value::Null),
            b: fb.get(f).cloned().unwrap_or(Value::Null),
        })
        .collect()
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "(unset)".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn explain(stage: &str, a: Option<&StageRecord>, b: Option<&StageRecord>) -> (String, Vec<ParamChange>, Vec<String>) {
    let (Some(a), Some(b)) = (a, b) else {
        return (
            format!("{stage}: a record is no longer in the cache (gc), so only the keys are known"),
            vec![],
            vec![],
        );
    };
    let params = param_changes(&a.params, &b.params);
    let inputs: Vec<String> = a
        .inputs
        .keys()
        .chain(b.inputs.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|s| a.inputs.get(*s) != b.inputs.get(*s))
        .cloned()
        .collect();
    let mut why = Vec::new();
    if !params.is_empty() {
        why.push(format!(
            "params: {}",
            params
                .iter()
                .map(|p| format!("{} {} → {}", p.field, show(&p.a), show(&p.b)))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !inputs.is_empty() {
        why.push(format!("inputs: {}", inputs.join(", ")));
    }
    if a.version != b.version {
        why.push(format!("version {} → {}", a.version, b.version));
    }
    if a.env != b.env {
        let keys: BTreeSet<&String> = a.env.keys().chain(b.env.keys()).collect();
        for k in keys.into_iter().filter(|k| a.env.get(*k) != b.env.get(*k)) {
            why.push(format!(
                "env {k} {} → {}",
                a.env.get(k).map(String::as_str).unwrap_or("(unset)"),
                b.env.get(k).map(String::as_str).unwrap_or("(unset)")
            ));
        }
    }
    if why.is_empty() {
        why.push("key differs (key schema changed)".into());
    }
    (why.join("; "), params, inputs)
}

/// Compares two runs.
pub fn diff(a: &RunSide, b: &RunSide) -> RunDiff {
    let mut rows = Vec::new();
    let models: BTreeSet<&String> = a.tables.keys().chain(b.tables.keys()).collect();
    let empty = BTreeMap::new();
    for m in models {
        let (ta, tb) = (a.tables.get(m).unwrap_or(&empty), b.tables.get(m).unwrap_or(&empty));
        let mut names: Vec<&String> = ta.keys().chain(tb.keys()).collect::<BTreeSet<_>>().into_iter().collect();
        names.sort_by_key(|n| super::metric_order(n));
        for n in names {
            let (va, vb) = (ta.get(n).copied().flatten(), tb.get(n).copied().flatten());
            rows.push(MetricRow {
                model: m.clone(),
                metric: n.clone(),
                a: va,
                b: vb,
                delta: va.zip(vb).map(|(x, y)| y - x),
            });
        }
    }
    let ka: BTreeMap<&str, &str> = a.stages.iter().map(|(n, k)| (n.as_str(), k.as_str())).collect();
    let kb: BTreeMap<&str, &str> = b.stages.iter().map(|(n, k)| (n.as_str(), k.as_str())).collect();
    // Stages in A's order, then those only in B.
    let mut order: Vec<&str> = a.stages.iter().map(|(n, _)| n.as_str()).collect();
    order.extend(b.stages.iter().map(|(n, _)| n.as_str()).filter(|n| !ka.contains_key(n)));
    let mut stages = Vec::new();
    let mut same = 0;
    for n in order {
        match (ka.get(n), kb.get(n)) {
            (Some(x), Some(y)) if x == y => same += 1,
            (x, y) => {
                let (why, params, inputs) = match (x, y) {
                    (Some(_), None) => (format!("only in {}", a.label), vec![], vec![]),
                    (None, Some(_)) => (format!("only in {}", b.label), vec![], vec![]),
                    _ => explain(n, a.records.get(n), b.records.get(n)),
                };
                stages.push(StageChange {
                    stage: n.to_string(),
                    a_key: x.map(|s| s.to_string()),
                    b_key: y.map(|s| s.to_string()),
                    why,
                    params,
                    inputs,
                });
            }
        }
    }
    RunDiff {
        a: a.label.clone(),
        b: b.label.clone(),
        a_id: a.id.clone(),
        b_id: b.id.clone(),
        rows,
        stages,
        same_stages: same,
    }
}

fn num(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into())
}

fn signed(v: Option<f64>) -> String {
    match v {
        Some(x) if x.abs() < 5e-5 => "0".into(),
        Some(x) => format!("{x:+.4}"),
        None => "-".into(),
    }
}

fn key12(k: &Option<String>) -> String {
    k.as_deref().map(|k| k[..k.len().min(12)].to_string()).unwrap_or_else(|| "-".into())
}

/// Aligned text: the metric table, then the stages whose keys differ.
pub fn render_text(d: &RunDiff) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "A = {} ({})\nB = {} ({})\n", d.a, d.a_id, d.b, d.b_id);
    if d.rows.is_empty() {
        s.push_str("no evaluation tables in either run\n");
    } else {
        let w = d.rows.iter().map(|r| r.model.len() + 1 + r.metric.len()).max().unwrap_or(6).max(6);
        let _ = writeln!(s, "{:<w$}  {:>9}  {:>9}  {:>9}", "metric", "A", "B", "B - A");
        for r in &d.rows {
            let _ = writeln!(
                s,
                "{:<w$}  {:>9}  {:>9}  {:>9}",
                format!("{}:{}", r.model, r.metric),
                num(r.a),
                num(r.b),
                signed(r.delta)
            );
        }
    }
    s.push('\n');
    if d.stages.is_empty() {
        let _ = writeln!(s, "all {} stages have the same keys", d.same_stages);
    } else {
        let _ = writeln!(s, "{} stages differ ({} the same):", d.stages.len(), d.same_stages);
        let w = d.stages.iter().map(|c| c.stage.len()).max().unwrap_or(5);
        for c in &d.stages {
            let _ = writeln!(s, "  {:<w$}  {} → {}  {}", c.stage, key12(&c.a_key), key12(&c.b_key), c.why);
        }
    }
    s
}

/// The same as Markdown tables.
pub fn render_markdown(d: &RunDiff) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "### wdro report diff: {} → {}\n", cell(&d.a), cell(&d.b));
    if !d.rows.is_empty() {
        let _ = writeln!(s, "| model | metric | {} | {} | change |\n|---|---|---:|---:|---:|", cell(&d.a), cell(&d.b));
        for r in &d.rows {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                cell(&r.model),
                cell(&r.metric),
                num(r.a),
                num(r.b),
                signed(r.delta)
            );
        }
        s.push('\n');
    }
    if d.stages.is_empty() {
        let _ = writeln!(s, "All {} stages have the same keys.", d.same_stages);
    } else {
        let _ = writeln!(s, "| stage | key A | key B | why |\n|---|---|---|---|");
        for c in &d.stages {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                cell(&c.stage),
                short(c.a_key.as_deref()),
                short(c.b_key.as_deref()),
                cell(&c.why)
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use wdro_cache::{Digest, StageKey};

    fn rec(name: &str, params: Value, input: &[u8]) -> StageRecord {
        let key = StageKey(Digest::of_bytes(format!("{name}{params}{input:?}").as_bytes()));
        StageRecord {
            key,
            stage_name: name.into(),
            stage_id: "x".into(),
            version: 1,
            params,
            inputs: [("model".to_string(), Digest::of_bytes(input))].into(),
            outputs: Default::default(),
            metrics: Value::Null,
            env: [("device".to_string(), "cpu".to_string())].into(),
            wdro_version: "0.1.0".into(),
            finished_at: 0,
            duration_ms: 0,
        }
    }

    fn side(label: &str, beta: f64, acc: f64) -> RunSide {
        let recs = vec![
            rec("checkpoint.pretrained", json!({"arch": {"name": "small-cnn"}}), b"data"),
            rec("finetune", json!({"beta": beta, "lr": 0.01}), b"model"),
            rec("eval.finetuned", json!({"model": "finetuned"}), format!("ft{beta}").as_bytes()),
        ];
        RunSide {
            label: label.into(),
            id: format!("id-{label}"),
            stages: recs.iter().map(|r| (r.stage_name.clone(), r.key.to_string())).collect(),
            tables: [(
                "finetuned".to_string(),
                [("clean_acc".to_string(), Some(0.8)), ("w2_linf_acc@delta=8/255".to_string(), Some(acc))].into(),
            )]
            .into(),
            records: recs.into_iter().map(|r| (r.stage_name.clone(), r)).collect(),
        }
    }

    #[test]
    fn metrics_with_deltas_and_changed_stages_with_reasons() {
        let d = diff(&side("latest~1", 6.0, 0.40), &side("latest", 3.0, 0.45));
        assert_eq!(d.rows.len(), 2);
        assert_eq!(d.rows[0].metric, "clean_acc");
        assert_eq!(d.rows[0].delta, Some(0.0));
        assert!((d.rows[1].delta.unwrap() - 0.05).abs() < 1e-12);
        assert_eq!(d.same_stages, 1);
        assert_eq!(d.stages.len(), 2);
        assert_eq!(d.stages[0].stage, "finetune");
        assert_eq!(d.stages[0].why, "params: beta 6.0 → 3.0");
        assert_eq!(d.stages[1].why, "inputs: model");
        let t = render_text(&d);
        assert!(t.contains("finetuned:w2_linf_acc@delta=8/255") && t.contains("+0.0500"), "{t}");
        assert!(t.contains("2 stages differ (1 the same)"), "{t}");
        let m = render_markdown(&d);
        assert!(m.contains("| finetuned | w2_linf_acc@delta=8/255 | 0.4000 | 0.4500 | +0.0500 |"), "{m}");
        assert!(m.contains("| finetune |"), "{m}");
    }

    #[test]
    fn stages_only_in_one_run_and_identical_runs() {
        let a = side("A", 6.0, 0.4);
        let mut b = side("B", 6.0, 0.4);
        assert!(diff(&a, &b).stages.is_empty());
        assert!(render_text(&diff(&a, &b)).contains("all 3 stages have the same keys"));
        b.stages.push(("report".into(), "f".repeat(64)));
        b.stages.retain(|(n, _)| n != "eval.finetuned");
        let d = diff(&a, &b);
        assert_eq!(d.stages.iter().map(|c| c.why.as_str()).collect::<Vec<_>>(), ["only in A", "only in B"]);
    }

    #[test]
    fn nested_params_flatten() {
        let c = param_changes(
            &json!({"arch": {"name": "a", "depth": 28}}),
            &json!({"arch": {"name": "a", "depth": 34}, "x": 1}),
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].field, "arch.depth");
        assert_eq!(show(&c[1].a), "(unset)");
    }
}
