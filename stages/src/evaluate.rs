//! The evaluation table (`eval.M`) and the before/after comparison (`report`): in-process,
//! torch-free stages that read the `summary` JSON of the clean, Υ and attack stages and compute
//! the P23 first-order bounds (spec §2.3, §6.2). Because they read summaries as inputs, a new δ
//! reruns only its attacks and these cheap aggregations.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};
use wdro_pipeline::{InputRef, Params, Stage, StageCtx, StageError, StageId, StageOutputs};

use crate::params::Delta;

fn read_json(path: &Path, stage: &str) -> Result<Value, StageError> {
    let bytes = std::fs::read(path).map_err(|e| StageError(format!("{stage}: cannot read {}: {e}", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|e| StageError(format!("{stage}: {} is not JSON: {e}", path.display())))
}

/// Looks a number up by trying several key paths (`a.b`), so the table tolerates summaries
/// written by older workers.
fn num(v: &Value, paths: &[&str]) -> Option<f64> {
    for p in paths {
        let mut cur = v;
        let mut ok = true;
        for k in p.split('.') {
            match cur.get(k) {
                Some(n) => cur = n,
                None => {
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            if let Some(x) = cur.as_f64() {
                return Some(x);
            }
            if cur.is_null() {
                return Some(f64::NAN);
            }
        }
    }
    None
}

fn fnum(x: Option<f64>) -> Value {
    match x {
        Some(v) if v.is_finite() => json!(v),
        _ => Value::Null,
    }
}

/// One parsed attack input slot: `attack:<kind>:<q>:<norm>:<delta>`.
#[derive(Clone, Debug)]
struct AttackSlot {
    kind: String,
    q: u8,
    norm: String,
    delta: f64,
}

fn parse_attack_slot(slot: &str) -> Option<AttackSlot> {
    let mut it = slot.split(':');
    if it.next()? != "attack" {
        return None;
    }
    Some(AttackSlot {
        kind: it.next()?.to_string(),
        q: it.next()?.parse().ok()?,
        norm: it.next()?.to_string(),
        delta: it.next()?.parse().ok()?,
    })
}

/// The flat metric name used by gates and diffs: `w2_linf_acc@delta=8/255`.
pub fn attack_metric(kind: &str, q: u8, norm: &str, delta: f64) -> String {
    let w = if q == 1 { "winf" } else { "w2" };
    let suffix = match kind {
        "w-pgd" => "acc".to_string(),
        "w-fgsm" => "fgsm_acc".to_string(),
        "w-pgd-budget" => "budget_acc".to_string(),
        other => format!("{other}_acc"),
    };
    format!("{w}_{norm}_{suffix}@delta={}", Delta(delta).pretty())
}

/// `eval.M`: the evaluation table of one model.
pub struct EvaluateStage {
    name: String,
    model: String,
    version: u32,
    inputs: Vec<InputRef>,
}

impl EvaluateStage {
    pub fn new(name: String, model: String, version: u32, inputs: Vec<InputRef>) -> Self {
        EvaluateStage { name, model, version, inputs }
    }
}

impl Stage for EvaluateStage {
    fn name(&self) -> &str {
        &self.name
    }
    fn id(&self) -> StageId {
        StageId("evaluate".into())
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn params(&self) -> Params {
        Params::new().with("model", &self.model)
    }
    fn inputs(&self) -> Vec<InputRef> {
        self.inputs.clone()
    }
    fn outputs(&self) -> Vec<String> {
        vec!["table".into()]
    }
    fn run(&self, ctx: &StageCtx) -> Result<StageOutputs, StageError> {
        let mut summaries = BTreeMap::new();
        for (slot, path) in &ctx.inputs {
            summaries.insert(slot.clone(), read_json(path, &self.name)?);
        }
        let table = evaluation_table(&self.model, &summaries);
        let path = ctx.out_dir.join("table.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&table).expect("json"))
            .map_err(|e| StageError(format!("{}: cannot write {}: {e}", self.name, path.display())))?;
        Ok(StageOutputs { files: BTreeMap::from([("table".into(), path)]), metrics: table["metrics"].clone() })
    }
}

/// Builds the table from the summaries keyed by input slot.
pub fn evaluation_table(model: &str, s: &BTreeMap<String, Value>) -> Value {
    let null = Value::Null;
    let clean = s.get("clean").unwrap_or(&null);
    let acc = num(clean, &["acc", "clean_acc"]);
    let mut metrics = serde_json::Map::new();
    metrics.insert("clean_acc".into(), fnum(acc));

    // Υ rows: slot upsilon:<set>:<loss>.
    let mut upsilon_rows = Vec::new();
    let mut ups: BTreeMap<(String, String), (Option<f64>, Option<f64>)> = BTreeMap::new();
    for (slot, v) in s {
        let parts: Vec<&str> = slot.split(':').collect();
        if parts.len() == 3 && parts[0] == "upsilon" {
            let q1 = num(v, &["upsilon_q1", "upsilon.q1"]);
            let q2 = num(v, &["upsilon_q2", "upsilon.q2"]);
            ups.insert((parts[1].into(), parts[2].into()), (q1, q2));
            upsilon_rows.push(json!({"set": parts[1], "loss": parts[2], "q1": fnum(q1), "q2": fnum(q2)}));
            metrics.insert(format!("upsilon_{}_{}_q1", parts[1], parts[2]), fnum(q1));
            metrics.insert(format!("upsilon_{}_{}_q2", parts[1], parts[2]), fnum(q2));
        }
    }

    // Attacks.
    let mut attack_rows = Vec::new();
    let mut by_key: BTreeMap<(String, u8, String, u64), (&Value, AttackSlot)> = BTreeMap::new();
    let mut attack_loss: Option<String> = None;
    let mut pointwise: Vec<(String, Option<f64>)> = Vec::new();
    for (slot, v) in s {
        if let Some(a) = parse_attack_slot(slot) {
            let acc_min = num(v, &["acc_min", "acc"]);
            let loss_max = num(v, &["loss_max", "loss"]);
            let loss = v.get("loss_fn").or_else(|| v.get("loss_name")).and_then(|x| x.as_str()).map(str::to_string);
            if matches!(a.kind.as_str(), "w-pgd" | "w-fgsm" | "w-pgd-budget") && attack_loss.is_none() {
                attack_loss = loss.clone();
            }
            let name = attack_metric(&a.kind, a.q, &a.norm, a.delta);
            metrics.insert(name.clone(), fnum(acc_min));
            if matches!(a.kind.as_str(), "pgd" | "apgd-ce" | "apgd-dlr") {
                pointwise.push((a.kind.clone(), acc_min));
            }
            attack_rows.push(json!({
                "metric": name, "attack": a.kind, "q": a.q, "norm": a.norm, "delta": a.delta,
                "delta_str": Delta(a.delta).pretty(), "acc_min": fnum(acc_min), "loss_max": fnum(loss_max),
                "w_dist": fnum(num(v, &["w_dist"])), "loss": loss,
            }));
            by_key.insert((a.kind.clone(), a.q, a.norm.clone(), a.delta.to_bits()), (v, a));
        }
    }
    // Pointwise robust accuracy: worst case per sample when the attacks report per-sample
    // robustness, else the minimum over attacks (an upper bound of the worst case).
    if !pointwise.is_empty() {
        let masks: Vec<Vec<bool>> = s
            .iter()
            .filter_map(|(slot, v)| {
                let a = parse_attack_slot(slot)?;
                if !matches!(a.kind.as_str(), "pgd" | "apgd-ce" | "apgd-dlr") {
                    return None;
                }
                v.get("robust")
                    .and_then(|r| r.as_array())
                    .map(|r| r.iter().map(|b| b.as_bool().unwrap_or(b.as_u64() == Some(1))).collect())
            })
            .collect();
        let worst =
            if masks.len() == pointwise.len() && !masks.is_empty() && masks.iter().all(|m| m.len() == masks[0].len()) {
                let n = masks[0].len();
                let robust = (0..n).filter(|i| masks.iter().all(|m| m[*i])).count();
                Some(robust as f64 / n.max(1) as f64)
            } else {
                pointwise.iter().filter_map(|(_, a)| *a).reduce(f64::min)
            };
        metrics.insert("pointwise_acc".into(), fnum(worst));
    }

    // Bounds per (q, norm, δ) from W-FGSM, W-PGD, Υ on the evaluation set, V(0) and W(0).
    let loss = attack_loss.unwrap_or_else(|| "redlr".into());
    let v0 = num(clean, &[&format!("loss.{loss}"), &format!("v0_{loss}"), &format!("V0.{loss}")]);
    let w0 = num(clean, &[&format!("loss_cond.{loss}"), &format!("w0_{loss}"), &format!("W0.{loss}")]);
    let mut bounds = Vec::new();
    for ((kind, q, norm, bits), (v, a)) in &by_key {
        if kind != "w-fgsm" {
            continue;
        }
        let delta = f64::from_bits(*bits);
        let upsilon = ups
            .get(&("test".to_string(), loss.clone()))
            .or_else(|| ups.get(&("train10".to_string(), loss.clone())))
            .and_then(|(q1, q2)| if *q == 1 { *q1 } else { *q2 });
        let fgsm_acc = num(v, &["acc_min", "acc"]);
        let fgsm_loss = num(v, &["loss_max", "loss"]);
        let pgd = by_key.get(&("w-pgd".to_string(), *q, norm.clone(), *bits));
        let pgd_acc = pgd.and_then(|(pv, _)| num(pv, &["acc_min"]));
        let pgd_loss = pgd.and_then(|(pv, _)| num(pv, &["loss_max"]));
        let ratio = |x: Option<f64>| match (x, acc) {
            (Some(x), Some(a)) if a > 0.0 => Some(x / a),
            _ => None,
        };
        let gap = match (w0, v0) {
            (Some(w), Some(v)) => Some(w - v),
            _ => None,
        };
        let r_l_tilde = match (w0, fgsm_loss, gap) {
            (Some(w), Some(l), Some(g)) if g != 0.0 => Some((w - l) / g),
            _ => None,
        };
        let r_l_bar = match (upsilon, gap) {
            (Some(u), Some(g)) if g != 0.0 => Some(1.0 - delta * u / g),
            _ => None,
        };
        let r_l = match (r_l_tilde, r_l_bar) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let first_order = match (v0, upsilon) {
            (Some(v), Some(u)) => Some(v + delta * u),
            _ => None,
        };
        let _ = a;
        bounds.push(json!({
            "q": q, "norm": norm, "delta": delta, "delta_str": Delta(delta).pretty(), "loss": loss,
            "R_u": fnum(ratio(fgsm_acc)), "R_l_tilde": fnum(r_l_tilde), "R_l_bar": fnum(r_l_bar), "R_l": fnum(r_l),
            "R_u_pgd": fnum(ratio(pgd_acc)),
            "A_u": fnum(fgsm_acc), "A_l": fnum(r_l.zip(acc).map(|(r, a)| r * a)),
            "first_order_loss": fnum(first_order), "w_fgsm_loss": fnum(fgsm_loss), "w_pgd_loss_max": fnum(pgd_loss),
            "upsilon": fnum(upsilon),
        }));
    }
    // The headline Υ for gates: the attack loss, q = 2, on the 10 % training subset if present.
    if let Some((_, q2)) =
        ups.get(&("train10".to_string(), loss.clone())).or_else(|| ups.get(&("test".to_string(), loss.clone())))
    {
        metrics.insert("upsilon".into(), fnum(*q2));
    }
    json!({
        "model": model,
        "clean": clean,
        "upsilon": upsilon_rows,
        "attacks": attack_rows,
        "bounds": bounds,
        "metrics": Value::Object(metrics),
    })
}

/// `report`: before/after fine-tuning, metric by metric.
pub struct CompareStage {
    name: String,
    version: u32,
    inputs: Vec<InputRef>,
}

impl CompareStage {
    pub fn new(name: String, version: u32, inputs: Vec<InputRef>) -> Self {
        CompareStage { name, version, inputs }
    }
}

impl Stage for CompareStage {
    fn name(&self) -> &str {
        &self.name
    }
    fn id(&self) -> StageId {
        StageId("compare".into())
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn params(&self) -> Params {
        Params::new()
    }
    fn inputs(&self) -> Vec<InputRef> {
        self.inputs.clone()
    }
    fn outputs(&self) -> Vec<String> {
        vec!["report".into()]
    }
    fn run(&self, ctx: &StageCtx) -> Result<StageOutputs, StageError> {
        let get = |slot: &str| -> Result<Value, StageError> {
            let p = ctx.inputs.get(slot).ok_or_else(|| StageError(format!("{}: missing input {slot}", self.name)))?;
            read_json(p, &self.name)
        };
        let before = get("before")?;
        let after = get("after")?;
        let report = compare(&before, &after);
        let path = ctx.out_dir.join("report.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&report).expect("json"))
            .map_err(|e| StageError(format!("{}: cannot write {}: {e}", self.name, path.display())))?;
        Ok(StageOutputs { files: BTreeMap::from([("report".into(), path)]), metrics: report["metrics"].clone() })
    }
}

/// Rows {metric, before, after, change} over the union of both tables' metrics.
pub fn compare(before: &Value, after: &Value) -> Value {
    let empty = serde_json::Map::new();
    let b = before["metrics"].as_object().unwrap_or(&empty);
    let a = after["metrics"].as_object().unwrap_or(&empty);
    let mut names: Vec<&String> = b.keys().chain(a.keys()).collect();
    names.sort_by_key(|n| metric_order(n));
    names.dedup();
    let mut rows = Vec::new();
    let mut metrics = serde_json::Map::new();
    for n in names {
        let bv = b.get(n).and_then(Value::as_f64);
        let av = a.get(n).and_then(Value::as_f64);
        rows.push(
            json!({"metric": n, "before": fnum(bv), "after": fnum(av), "change": fnum(av.zip(bv).map(|(x, y)| x - y))}),
        );
        metrics.insert(format!("before.{n}"), fnum(bv));
        metrics.insert(format!("after.{n}"), fnum(av));
    }
    json!({"rows": rows, "metrics": Value::Object(metrics), "before": before, "after": after})
}

/// Clean first, then pointwise, then the attack grid, then Υ.
fn metric_order(n: &str) -> (u8, String) {
    let rank = if n == "clean_acc" {
        0
    } else if n == "pointwise_acc" {
        1
    } else if n.contains("acc@") {
        2
    } else if n.ends_with("_acc") {
        3
    } else {
        4
    };
    (rank, n.to_string())
}

/// The first-order view of each evaluated model (spec §2.3, §6.2): per (q, δ), the clean loss
/// V(0), Υ, the prediction V(0) + δ·Υ beside the measured W-FGSM and W-PGD losses, and the P23
/// accuracy bounds A_l ≤ A(δ) ≤ A_u. Printed after the before/after rows so a reader can see at
/// once whether the linearisation holds at the budgets evaluated.
pub fn render_bounds(report: &Value) -> String {
    let f = |v: &Value| v.as_f64().map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into());
    let mut out = String::new();
    for side in ["before", "after"] {
        let t = &report[side];
        let Some(bounds) = t["bounds"].as_array().filter(|b| !b.is_empty()) else { continue };
        let model = t["model"].as_str().unwrap_or(side);
        out.push_str(&format!(
            "\nfirst-order bounds, {side} ({model}):\n{:<6} {:>8} {:>9} {:>9} {:>12} {:>10} {:>10} {:>8} {:>8}\n",
            "ball", "delta", "V(0)", "upsilon", "V(0)+d*Ups", "W-FGSM L", "W-PGD L", "A_l", "A_u"
        ));
        for b in bounds {
            let loss = b["loss"].as_str().unwrap_or("redlr");
            let ball = format!(
                "{}-{}",
                if b["q"].as_u64() == Some(1) { "Winf" } else { "W2" },
                b["norm"].as_str().unwrap_or("")
            );
            out.push_str(&format!(
                "{:<6} {:>8} {:>9} {:>9} {:>12} {:>10} {:>10} {:>8} {:>8}\n",
                ball.trim_end_matches("-linf"),
                b["delta_str"].as_str().unwrap_or("?"),
                f(&t["clean"]["loss"][loss]),
                f(&b["upsilon"]),
                f(&b["first_order_loss"]),
                f(&b["w_fgsm_loss"]),
                f(&b["w_pgd_loss_max"]),
                f(&b["A_l"]),
                f(&b["A_u"]),
            ));
        }
    }
    out
}

/// Renders rows as an aligned text table (`wdro run` prints it after the demo).
pub fn render_rows(report: &Value) -> String {
    let mut out = String::new();
    let rows = report["rows"].as_array().cloned().unwrap_or_default();
    let w = rows.iter().map(|r| r["metric"].as_str().unwrap_or("").len()).max().unwrap_or(6).max(6);
    out.push_str(&format!("{:<w$}  {:>9}  {:>9}  {:>9}\n", "metric", "before", "after", "change"));
    let f = |v: &Value| v.as_f64().map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into());
    for r in rows {
        out.push_str(&format!(
            "{:<w$}  {:>9}  {:>9}  {:>9}\n",
            r["metric"].as_str().unwrap_or(""),
            f(&r["before"]),
            f(&r["after"]),
            r["change"].as_f64().map(|x| format!("{x:+.4}")).unwrap_or_else(|| "-".into())
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_follow_the_spec_identities() {
        // A = 0.8, V0 = -0.5, W0 = 0 (ReDLR), Υ_test(q=2) = 2, δ = 0.01, W-FGSM acc 0.6 loss -0.45.
        let mut s = BTreeMap::new();
        s.insert("clean".to_string(), json!({"acc": 0.8, "loss": {"redlr": -0.5}, "loss_cond": {"redlr": 0.0}}));
        s.insert("upsilon:test:redlr".to_string(), json!({"upsilon_q1": 1.5, "upsilon_q2": 2.0}));
        s.insert(
            "attack:w-fgsm:2:linf:0.01".to_string(),
            json!({"acc_min": 0.6, "loss_max": -0.45, "loss_fn": "redlr"}),
        );
        s.insert("attack:w-pgd:2:linf:0.01".to_string(), json!({"acc_min": 0.5, "loss_max": -0.4, "loss_fn": "redlr"}));
        let t = evaluation_table("m", &s);
        let b = &t["bounds"][0];
        assert!((b["R_u"].as_f64().unwrap() - 0.75).abs() < 1e-12);
        // R̃l = (0 - (-0.45)) / (0 - (-0.5)) = 0.9 ; R̄l = 1 - 0.01*2/0.5 = 0.96 ; Rl = 0.9
        assert!((b["R_l_tilde"].as_f64().unwrap() - 0.9).abs() < 1e-12);
        assert!((b["R_l_bar"].as_f64().unwrap() - 0.96).abs() < 1e-12);
        assert!((b["R_l"].as_f64().unwrap() - 0.9).abs() < 1e-12);
        assert!((b["R_u_pgd"].as_f64().unwrap() - 0.625).abs() < 1e-12);
        assert!((b["first_order_loss"].as_f64().unwrap() - (-0.48)).abs() < 1e-12);
        assert_eq!(t["metrics"]["w2_linf_acc@delta=0.01"], json!(0.5));
        assert_eq!(t["metrics"]["clean_acc"], json!(0.8));
        // The printed view shows the prediction beside the measured losses.
        let text = render_bounds(&compare(&json!({}), &t));
        let row = text.lines().find(|l| l.starts_with("W2")).expect("a W2 row");
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells, ["W2", "0.01", "-0.5000", "2.0000", "-0.4800", "-0.4500", "-0.4000", "0.7200", "0.6000"]);
    }

    #[test]
    fn pointwise_worst_case_per_sample() {
        let mut s = BTreeMap::new();
        s.insert("clean".to_string(), json!({"acc": 1.0}));
        s.insert(
            "attack:apgd-ce:1:linf:0.03".to_string(),
            json!({"acc_min": 0.5, "robust": [true, true, false, false]}),
        );
        s.insert(
            "attack:apgd-dlr:1:linf:0.03".to_string(),
            json!({"acc_min": 0.5, "robust": [true, false, true, false]}),
        );
        let t = evaluation_table("m", &s);
        assert_eq!(t["metrics"]["pointwise_acc"], json!(0.25));
    }

    #[test]
    fn compare_rows_have_changes() {
        let b = json!({"metrics": {"clean_acc": 0.9, "w2_linf_acc@delta=8/255": 0.2}});
        let a = json!({"metrics": {"clean_acc": 0.88, "w2_linf_acc@delta=8/255": 0.3}});
        let r = compare(&b, &a);
        assert_eq!(r["rows"][0]["metric"], "clean_acc");
        assert!((r["rows"][1]["change"].as_f64().unwrap() - 0.1).abs() < 1e-12);
        assert!(render_rows(&r).contains("+0.1000"));
    }
}
