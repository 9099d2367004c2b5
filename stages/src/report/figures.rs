//! The data of the paper's figures (spec §8.3), from evaluation tables and fine-tuning logs:
//!
//! * **7.1** Υ estimated on 10 % of the training set against Υ on the full test set (the
//!   reference R1), one point series per model (each loss and q a point) and the line y = x;
//! * **7.2 / 7.3** W2 / W∞ attack accuracy along the fine-tuning epochs, on the test set (solid)
//!   and the validation set (dashed), one pair of lines per fine-tuned model;
//! * **7.4** Υ along the fine-tuning, on the test set (solid) and the training subset (dashed);
//! * **accuracy against δ** (W-PGD, W2 and W∞) before and after fine-tuning, δ = 0 being the
//!   clean accuracy.
//!
//! Each builder returns `Err(reason)` when its data is absent, so `report plot` can say which
//! figure it skipped and why.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::params::Delta;

/// One line or point series.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    /// The model the series belongs to (series of one model share a colour).
    pub model: String,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Lines with markers (x sorted).
    Lines,
    /// Markers only, plus the diagonal y = x.
    ScatterDiagonal,
}

/// A figure's data and labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    /// File stem, e.g. `fig7_2_w2_finetuning`.
    pub id: String,
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub kind: Kind,
    /// y axis fixed to [0, 1] (accuracies).
    pub unit_y: bool,
    /// Integer x ticks (epochs).
    pub integer_x: bool,
    pub series: Vec<Series>,
    /// What the paper's caption says the figure shows.
    pub caption: String,
}

impl Figure {
    /// The distinct models, in series order.
    pub fn models(&self) -> Vec<String> {
        let mut seen = Vec::new();
        for s in &self.series {
            if !seen.contains(&s.model) {
                seen.push(s.model.clone());
            }
        }
        seen
    }
}

/// A model's evaluation metrics under a display label (`pretrained`, `latest~1:finetuned`).
#[derive(Clone, Debug)]
pub struct ModelTable {
    pub label: String,
    pub metrics: BTreeMap<String, Option<f64>>,
}

/// Υ of one loss on one set, both orders.
#[derive(Clone, Debug, PartialEq)]
pub struct Ups {
    pub loss: String,
    pub q1: Option<f64>,
    pub q2: Option<f64>,
}

/// One epoch of the fine-tuning log (the `finetune` stage's `log` output).
#[derive(Clone, Debug, PartialEq)]
pub struct Epoch {
    pub epoch: f64,
    pub test_w2: Option<f64>,
    pub test_winf: Option<f64>,
    pub val_w2: Option<f64>,
    pub val_winf: Option<f64>,
    pub upsilon_test: Vec<Ups>,
    pub upsilon_train: Vec<Ups>,
}

/// A fine-tuning log under a display label.
#[derive(Clone, Debug)]
pub struct FinetuneLog {
    pub label: String,
    pub epochs: Vec<Epoch>,
}

fn get_num(v: &Value, paths: &[&str]) -> Option<f64> {
    for p in paths {
        let mut cur = v;
        let mut ok = true;
        for k in p.split('.') {
            match cur.get(k) {
                Some(x) => cur = x,
                None => {
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            if let Some(x) = cur.as_f64().filter(|x| x.is_finite()) {
                return Some(x);
            }
        }
    }
    None
}

fn parse_ups(v: Option<&Value>) -> Vec<Ups> {
    match v {
        // [{"loss": "redlr", "q1": 1.0, "q2": 1.2}, …]
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|e| {
                Some(Ups {
                    loss: e.get("loss")?.as_str()?.to_string(),
                    q1: get_num(e, &["q1", "upsilon_q1"]),
                    q2: get_num(e, &["q2", "upsilon_q2"]),
                })
            })
            .collect(),
        // {"redlr": {"q1": …, "q2": …}} or {"redlr": 1.2} (q = 2)
        Some(Value::Object(o)) => o
            .iter()
            .map(|(loss, e)| match e.as_f64() {
                Some(x) => Ups { loss: loss.clone(), q1: None, q2: Some(x) },
                None => Ups { loss: loss.clone(), q1: get_num(e, &["q1"]), q2: get_num(e, &["q2"]) },
            })
            .collect(),
        Some(Value::Number(n)) => vec![Ups { loss: "-".into(), q1: None, q2: n.as_f64() }],
        _ => Vec::new(),
    }
}

/// Reads a fine-tuning log: a list of epochs, or an object with `log`/`epochs`. Each epoch
/// has `epoch`, `test`/`val` objects with `w2_acc`/`winf_acc` (or flat `test_w2_acc`, …) and
/// `upsilon_test`/`upsilon_train` lists of `{loss, q1, q2}`.
pub fn parse_finetune_log(v: &Value) -> Result<Vec<Epoch>, String> {
    let list = match v {
        Value::Array(a) => a,
        Value::Object(o) => o
            .get("log")
            .or_else(|| o.get("epochs"))
            .and_then(Value::as_array)
            .ok_or("the fine-tuning log has no `log` or `epochs` list")?,
        _ => return Err("the fine-tuning log is not a JSON list or object".into()),
    };
    let epochs: Vec<Epoch> = list
        .iter()
        .enumerate()
        .map(|(i, e)| Epoch {
            epoch: get_num(e, &["epoch"]).unwrap_or((i + 1) as f64),
            test_w2: get_num(e, &["test.w2_acc", "test_w2_acc"]),
            test_winf: get_num(e, &["test.winf_acc", "test_winf_acc"]),
            val_w2: get_num(e, &["val.w2_acc", "val_w2_acc"]),
            val_winf: get_num(e, &["val.winf_acc", "val_winf_acc"]),
            upsilon_test: parse_ups(e.get("upsilon_test")),
            upsilon_train: parse_ups(e.get("upsilon_train")),
        })
        .collect();
    if epochs.is_empty() {
        return Err("the fine-tuning log has no epochs".into());
    }
    Ok(epochs)
}

/// Figure 7.1.
pub fn upsilon_estimate(models: &[ModelTable]) -> Result<Figure, String> {
    let mut series = Vec::new();
    for m in models {
        let mut pts = Vec::new();
        for (name, v) in &m.metrics {
            let Some(rest) = name.strip_prefix("upsilon_train10_") else { continue };
            let reference = format!("upsilon_test_{rest}");
            if let (Some(est), Some(Some(r))) = (v, m.metrics.get(&reference)) {
                pts.push((*r, *est));
            }
        }
        if !pts.is_empty() {
            series.push(Series { name: m.label.clone(), model: m.label.clone(), points: pts, dashed: false });
        }
    }
    if series.is_empty() {
        return Err("no model has Υ on both the 10 % training subset and the test set (needs [upsilon] with data.train and on_test = true)".into());
    }
    Ok(Figure {
        id: "fig7_1_upsilon_estimate".into(),
        title: "Υ from 10 % of the training set vs. on the full test set".into(),
        x_desc: "Υ on the full test set (reference)".into(),
        y_desc: "Υ estimated on 10 % of the training set".into(),
        kind: Kind::ScatterDiagonal,
        unit_y: false,
        integer_x: false,
        series,
        caption: "Figure 7.1: Υ estimated from 10 % of the training set and its reference value, one point per loss and q, one series per model; on the diagonal the estimate is exact.".into(),
    })
}

/// Which Wasserstein order of figures 7.2 (W2) and 7.3 (W∞).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    W2,
    Winf,
}

/// Figures 7.2 and 7.3.
pub fn attack_along_finetuning(logs: &[FinetuneLog], order: Order) -> Result<Figure, String> {
    let (name, sym, id, fig) = match order {
        Order::W2 => ("W2", "W₂", "fig7_2_w2_finetuning", "7.2"),
        Order::Winf => ("Winf", "W∞", "fig7_3_winf_finetuning", "7.3"),
    };
    let mut series = Vec::new();
    for l in logs {
        let pick = |e: &Epoch, test: bool| match (order, test) {
            (Order::W2, true) => e.test_w2,
            (Order::W2, false) => e.val_w2,
            (Order::Winf, true) => e.test_winf,
            (Order::Winf, false) => e.val_winf,
        };
        for (test, set) in [(true, "test"), (false, "validation")] {
            let pts: Vec<(f64, f64)> = l.epochs.iter().filter_map(|e| Some((e.epoch, pick(e, test)?))).collect();
            if !pts.is_empty() {
                series.push(Series {
                    name: format!("{} {set}", l.label),
                    model: l.label.clone(),
                    points: pts,
                    dashed: !test,
                });
            }
        }
    }
    if series.is_empty() {
        return Err(format!("no fine-tuning log with {name} attack accuracy (needs a finetune stage)"));
    }
    Ok(Figure {
        id: id.into(),
        title: format!("{sym} attack accuracy along fine-tuning"),
        x_desc: "fine-tuning epoch".into(),
        y_desc: format!("{sym} attack accuracy"),
        kind: Kind::Lines,
        unit_y: true,
        integer_x: true,
        series,
        caption: format!("Figure {fig}: accuracy under the {sym} attack along fine-tuning, on the test set (solid) and the validation set (dashed)."),
    })
}

/// The loss whose Υ a log reports: `redlr` if present, else the first.
fn ups_loss(logs: &[FinetuneLog]) -> Option<String> {
    let losses: BTreeSet<String> =
        logs.iter().flat_map(|l| l.epochs.iter().flat_map(|e| e.upsilon_test.iter().map(|u| u.loss.clone()))).collect();
    if losses.contains("redlr") {
        Some("redlr".into())
    } else {
        losses.into_iter().next()
    }
}

/// Figure 7.4.
pub fn upsilon_along_finetuning(logs: &[FinetuneLog]) -> Result<Figure, String> {
    let loss = ups_loss(logs).ok_or("no fine-tuning log with Υ per epoch (needs a finetune stage)")?;
    let mut series = Vec::new();
    for l in logs {
        for (test, set) in [(true, "test"), (false, "training subset")] {
            let pts: Vec<(f64, f64)> = l
                .epochs
                .iter()
                .filter_map(|e| {
                    let list = if test { &e.upsilon_test } else { &e.upsilon_train };
                    Some((e.epoch, list.iter().find(|u| u.loss == loss)?.q2?))
                })
                .collect();
            if !pts.is_empty() {
                series.push(Series {
                    name: format!("{} {set}", l.label),
                    model: l.label.clone(),
                    points: pts,
                    dashed: !test,
                });
            }
        }
    }
    if series.is_empty() {
        return Err("no fine-tuning log with Υ per epoch (needs a finetune stage)".into());
    }
    Ok(Figure {
        id: "fig7_4_upsilon_finetuning".into(),
        title: format!("Υ ({loss}, q = 2) along fine-tuning"),
        x_desc: "fine-tuning epoch".into(),
        y_desc: format!("Υ ({loss}, q = 2)"),
        kind: Kind::Lines,
        unit_y: false,
        integer_x: true,
        series,
        caption: "Figure 7.4: Υ along fine-tuning, on the test set (solid) and the training subset (dashed).".into(),
    })
}

/// Accuracy against δ (W-PGD), W2 solid and W∞ dashed, δ = 0 being clean accuracy.
pub fn accuracy_vs_delta(models: &[ModelTable]) -> Result<Figure, String> {
    let mut series = Vec::new();
    let mut norms = BTreeSet::new();
    for m in models {
        for (w, sym, dashed) in [("w2", "W₂", false), ("winf", "W∞", true)] {
            let mut pts: Vec<(f64, f64)> = Vec::new();
            for (name, v) in &m.metrics {
                let Some((base, d)) = name.split_once("@delta=") else { continue };
                let Some(norm) = base.strip_prefix(&format!("{w}_")).and_then(|r| r.strip_suffix("_acc")) else {
                    continue;
                };
                if norm.contains('_') {
                    continue; // fgsm_acc, budget_acc, pointwise kinds
                }
                if let (Some(v), Ok(d)) = (v, Delta::parse(d)) {
                    norms.insert(norm.to_string());
                    pts.push((d.0, *v));
                }
            }
            if pts.is_empty() {
                continue;
            }
            if let Some(Some(c)) = m.metrics.get("clean_acc") {
                pts.push((0.0, *c));
            }
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            series.push(Series { name: format!("{} {sym}", m.label), model: m.label.clone(), points: pts, dashed });
        }
    }
    if series.is_empty() {
        return Err(
            "no evaluation table with W-PGD accuracies over δ (needs [attacks] with kinds = [\"w-pgd\"])".into()
        );
    }
    // ℓ∞ budgets read best in units of 1/255.
    let scale255 = norms.len() == 1 && norms.contains("linf");
    if scale255 {
        for s in &mut series {
            for p in &mut s.points {
                p.0 *= 255.0;
            }
        }
    }
    Ok(Figure {
        id: "fig_accuracy_vs_delta".into(),
        title: "W-PGD accuracy against δ, before and after fine-tuning".into(),
        x_desc: if scale255 { "δ (× 1/255)".into() } else { "δ".into() },
        y_desc: "accuracy".into(),
        kind: Kind::Lines,
        unit_y: true,
        integer_x: false,
        series,
        caption: "Accuracy under W-PGD against the budget δ (W₂ solid, W∞ dashed); δ = 0 is the clean accuracy.".into(),
    })
}

/// Every figure the data allows, and a reason for each one it does not.
pub fn all(models: &[ModelTable], logs: &[FinetuneLog]) -> (Vec<Figure>, Vec<String>) {
    let mut figs = Vec::new();
    let mut skipped = Vec::new();
    for r in [
        upsilon_estimate(models),
        attack_along_finetuning(logs, Order::W2),
        attack_along_finetuning(logs, Order::Winf),
        upsilon_along_finetuning(logs),
        accuracy_vs_delta(models),
    ] {
        match r {
            Ok(f) => figs.push(f),
            Err(e) => skipped.push(e),
        }
    }
    (figs, skipped)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub fn tables() -> Vec<ModelTable> {
        let t = |c: f64, s: f64| ModelTable {
            label: String::new(),
            metrics: crate::gates::metrics_of(&json!({"metrics": {
                "clean_acc": c,
                "w2_linf_acc@delta=4/255": 0.6 * s, "w2_linf_acc@delta=16/255": 0.2 * s,
                "winf_linf_acc@delta=4/255": 0.7 * s, "winf_linf_acc@delta=16/255": 0.4 * s,
                "w2_linf_fgsm_acc@delta=4/255": 0.65,
                "winf_linf_apgd-ce_acc@delta=16/255": 0.3,
                "upsilon_train10_ce_q1": 1.0 * s, "upsilon_train10_ce_q2": 1.4 * s,
                "upsilon_test_ce_q1": 1.1 * s, "upsilon_test_ce_q2": 1.5 * s,
                "upsilon_train10_redlr_q2": 0.8 * s, "upsilon_test_redlr_q2": null,
                "upsilon": 0.8 * s,
            }})),
        };
        let mut a = t(0.85, 1.0);
        a.label = "pretrained".into();
        let mut b = t(0.82, 1.2);
        b.label = "finetuned".into();
        vec![a, b]
    }

    /// The worker's log format (`ml::finetune::EpochLog` serialized in a `log` list).
    pub fn log_json() -> Value {
        let epoch = |e: u32, x: f64| {
            json!({
                "epoch": e, "lr": 0.01, "steps": 10, "train_loss": 1.0, "train_loss_nat": 0.5, "train_loss_rob": 0.5,
                "train_acc": 0.8, "upsilon_ref": 1.0,
                "val": {"clean_acc": 0.8, "w2_acc": 0.30 + x, "w2_loss": 1.0, "winf_acc": 0.50 + x, "winf_loss": 0.8},
                "test": {"clean_acc": 0.79, "w2_acc": 0.28 + x, "w2_loss": 1.0, "winf_acc": 0.48 + x, "winf_loss": 0.8},
                "upsilon_test": [{"loss": "ce", "q1": 1.0, "q2": 1.5 - x}, {"loss": "redlr", "q1": 0.7, "q2": 0.9 - x}],
                "upsilon_train": [{"loss": "ce", "q1": 1.0, "q2": 1.4 - x}, {"loss": "redlr", "q1": 0.7, "q2": 0.85 - x}],
                "wall_s": 3.0
            })
        };
        json!({"log": [epoch(1, 0.0), epoch(2, 0.05), epoch(3, 0.08)], "best_epoch": 3, "selected_epoch": 3})
    }

    pub fn logs() -> Vec<FinetuneLog> {
        vec![FinetuneLog { label: "finetuned".into(), epochs: parse_finetune_log(&log_json()).unwrap() }]
    }

    #[test]
    fn log_formats() {
        let e = parse_finetune_log(&log_json()).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[1].epoch, 2.0);
        assert!((e[1].val_w2.unwrap() - 0.35).abs() < 1e-12);
        assert_eq!(e[0].upsilon_train[1], Ups { loss: "redlr".into(), q1: Some(0.7), q2: Some(0.85) });
        // A bare list with flat keys and Υ as a map.
        let flat = json!([{"test_w2_acc": 0.3, "val_winf_acc": 0.5, "upsilon_test": {"redlr": 0.9}}]);
        let e = parse_finetune_log(&flat).unwrap();
        assert_eq!((e[0].epoch, e[0].test_w2, e[0].val_winf), (1.0, Some(0.3), Some(0.5)));
        assert_eq!(e[0].upsilon_test[0].q2, Some(0.9));
        assert!(parse_finetune_log(&json!({"x": 1})).is_err());
        assert!(parse_finetune_log(&json!([])).is_err());
    }

    #[test]
    fn figure_7_1_one_series_per_model_points_per_loss_and_q() {
        let f = upsilon_estimate(&tables()).unwrap();
        assert_eq!(f.models(), ["pretrained", "finetuned"]);
        assert_eq!(f.series[0].points, [(1.1, 1.0), (1.5, 1.4)], "redlr has no test reference");
    }

    #[test]
    fn figures_7_2_to_7_4_test_solid_validation_dashed() {
        let f = attack_along_finetuning(&logs(), Order::W2).unwrap();
        assert_eq!(f.series.len(), 2);
        assert!(!f.series[0].dashed && f.series[1].dashed);
        assert_eq!(f.series[0].points[2].0, 3.0);
        assert!((f.series[0].points[2].1 - 0.36).abs() < 1e-12);
        let f = attack_along_finetuning(&logs(), Order::Winf).unwrap();
        assert_eq!(f.series[1].points[0], (1.0, 0.5));
        let f = upsilon_along_finetuning(&logs()).unwrap();
        assert!(f.title.contains("redlr"));
        assert_eq!(f.series[1].points[0], (1.0, 0.85));
    }

    #[test]
    fn accuracy_against_delta_starts_at_clean() {
        let f = accuracy_vs_delta(&tables()).unwrap();
        assert_eq!(f.series.len(), 4);
        assert_eq!(f.x_desc, "δ (× 1/255)");
        let s = &f.series[0];
        assert_eq!(s.name, "pretrained W₂");
        assert_eq!(s.points.len(), 3, "clean + two δ, no FGSM or budget points");
        assert_eq!(s.points[0], (0.0, 0.85));
        assert!((s.points[2].0 - 16.0).abs() < 1e-9);
    }

    #[test]
    fn missing_data_gives_reasons() {
        let (figs, skipped) = all(&tables(), &[]);
        assert_eq!(figs.len(), 2);
        assert_eq!(skipped.len(), 3);
        assert!(skipped[0].contains("finetune"), "{skipped:?}");
        let (figs, _) = all(&tables(), &logs());
        assert_eq!(figs.len(), 5);
    }
}
