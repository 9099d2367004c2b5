//! Parameter sweeps: `wdro run --sweep finetune.beta=1,3,6 --sweep finetune.delta=4/255,8/255`.
//!
//! Each `--sweep KEY=V1,V2,…` is an axis; the variants are the cartesian product (the first
//! axis varies slowest), each one a list of `--set` overrides. Every variant runs through the
//! same cache, so stages upstream of the swept fields have the same key in every variant and
//! are computed at most once; [`sharing`] proves it from the run records (which stages each run
//! used and which it computed). [`comparison`] lays the variants' evaluation metrics side by
//! side.
//!
//! ```
//! use wdro_stages::sweep::{expand, parse_axis};
//! let axes = [parse_axis("finetune.beta=1,3").unwrap(), parse_axis("finetune.delta=4/255,8/255").unwrap()];
//! let v = expand(&axes);
//! assert_eq!(v.len(), 4);
//! assert_eq!(v[1].sets, ["finetune.beta=1", "finetune.delta=8/255"]);
//! assert_eq!(v[1].label, "beta=1 delta=8/255");
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use serde::Serialize;

/// A bad `--sweep`, one line with the fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("--sweep {arg}: {msg}")]
pub struct SweepError {
    pub arg: String,
    pub msg: String,
}

/// One axis: a config key and its values (TOML literals or plain strings, as `--set` takes).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Axis {
    pub key: String,
    pub values: Vec<String>,
}

/// Splits on commas outside brackets, braces and quotes, so `attacks.deltas=["4/255","8/255"],["8/255"]`
/// is two values.
fn split_values(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut depth, mut quote, mut cur) = (0i32, None::<char>, String::new());
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '[' | '{') => depth += 1,
            (None, ']' | '}') => depth -= 1,
            (None, ',') if depth == 0 => {
                out.push(std::mem::take(&mut cur).trim().to_string());
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur.trim().to_string());
    out
}

/// Parses `KEY=V1,V2,…`.
pub fn parse_axis(arg: &str) -> Result<Axis, SweepError> {
    let err = |msg: &str| SweepError { arg: arg.to_string(), msg: msg.to_string() };
    let (key, vals) = arg.split_once('=').ok_or_else(|| err("expected KEY=V1,V2,…, e.g. finetune.beta=1,3,6"))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(err("bad key; write a config path such as finetune.beta"));
    }
    let values = split_values(vals);
    if values.iter().any(String::is_empty) {
        return Err(err("empty value; separate values with single commas, e.g. 1,3,6"));
    }
    let distinct: BTreeSet<&String> = values.iter().collect();
    if distinct.len() != values.len() {
        return Err(err("a value is listed twice"));
    }
    Ok(Axis { key: key.to_string(), values })
}

/// Parses every `--sweep`; a key may appear only once.
pub fn parse_axes(args: &[String]) -> Result<Vec<Axis>, SweepError> {
    let mut axes: Vec<Axis> = Vec::new();
    for a in args {
        let axis = parse_axis(a)?;
        if axes.iter().any(|x| x.key == axis.key) {
            return Err(SweepError {
                arg: a.clone(),
                msg: format!("{} is swept twice; put all its values in one --sweep", axis.key),
            });
        }
        axes.push(axis);
    }
    Ok(axes)
}

/// One point of the matrix.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Variant {
    /// `--set` overrides, in axis order.
    pub sets: Vec<String>,
    /// `beta=1 delta=8/255` (the last segment of each key, unless that is ambiguous).
    pub label: String,
}

/// The cartesian product, first axis slowest.
pub fn expand(axes: &[Axis]) -> Vec<Variant> {
    let short: Vec<String> = axes
        .iter()
        .map(|a| {
            let last = a.key.rsplit('.').next().unwrap_or(&a.key);
            let clash = axes.iter().filter(|b| b.key.rsplit('.').next() == Some(last)).count() > 1;
            if clash {
                a.key.clone()
            } else {
                last.to_string()
            }
        })
        .collect();
    let mut out = vec![(Vec::new(), Vec::new())];
    for (a, name) in axes.iter().zip(&short) {
        out = out
            .into_iter()
            .flat_map(|(sets, labels): (Vec<String>, Vec<String>)| {
                a.values.iter().map(move |v| {
                    let mut s = sets.clone();
                    s.push(format!("{}={v}", a.key));
                    let mut l = labels.clone();
                    l.push(format!("{name}={v}"));
                    (s, l)
                })
            })
            .collect();
    }
    out.into_iter().map(|(sets, labels)| Variant { sets, label: labels.join(" ") }).collect()
}

/// What one variant's run did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VariantRun {
    pub label: String,
    pub run_id: String,
    /// (stage, key) as the run record lists them.
    pub stages: Vec<(String, String)>,
    /// Stages this run computed (not cache hits).
    pub computed: Vec<String>,
    /// Model → evaluation metrics.
    pub tables: BTreeMap<String, BTreeMap<String, Option<f64>>>,
}

/// A stage whose key is the same in several variants.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Shared {
    pub stage: String,
    pub key: String,
    /// Labels of the variants that used this key.
    pub variants: Vec<String>,
    /// Labels of the variants whose run computed it (at most one when the cache works).
    pub computed_in: Vec<String>,
}

/// Stages used with the same key by two or more variants, in first-use order.
pub fn sharing(runs: &[VariantRun]) -> Vec<Shared> {
    let mut order: Vec<(String, String)> = Vec::new();
    let mut by: BTreeMap<(String, String), (Vec<String>, Vec<String>)> = BTreeMap::new();
    for r in runs {
        for (stage, key) in &r.stages {
            let k = (stage.clone(), key.clone());
            let e = by.entry(k.clone()).or_insert_with(|| {
                order.push(k.clone());
                (Vec::new(), Vec::new())
            });
            e.0.push(r.label.clone());
            if r.computed.contains(stage) {
                e.1.push(r.label.clone());
            }
        }
    }
    order
        .into_iter()
        .filter_map(|k| {
            let (variants, computed_in) = by.remove(&k)?;
            (variants.len() > 1).then_some(Shared { stage: k.0, key: k.1, variants, computed_in })
        })
        .collect()
}

/// The headline metrics of a table: clean, pointwise, W-PGD over δ, Υ.
fn headline(name: &str) -> bool {
    if matches!(name, "clean_acc" | "pointwise_acc" | "upsilon") {
        return true;
    }
    let Some((base, _)) = name.split_once("@delta=") else { return false };
    let mut parts = base.split('_');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some("w2" | "winf"), Some(_), Some("acc"), None)
    )
}

/// Rows (model, metric) × columns (variants), headline metrics only.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Comparison {
    pub variants: Vec<String>,
    pub rows: Vec<(String, String, Vec<Option<f64>>)>,
}

pub fn comparison(runs: &[VariantRun]) -> Comparison {
    let mut keys: BTreeSet<(u8, String, String)> = BTreeSet::new();
    for r in runs {
        for (model, t) in &r.tables {
            let rank = match model.as_str() {
                "pretrained" => 0,
                "finetuned" => 1,
                _ => 2,
            };
            keys.extend(t.keys().filter(|n| headline(n)).map(|n| (rank, model.clone(), n.clone())));
        }
    }
    let mut keys: Vec<(u8, String, String)> = keys.into_iter().collect();
    keys.sort_by(|a, b| {
        (a.0, &a.1, crate::report::metric_order(&a.2)).cmp(&(b.0, &b.1, crate::report::metric_order(&b.2)))
    });
    let rows = keys
        .into_iter()
        .map(|(_, model, name)| {
            let vals =
                runs.iter().map(|r| r.tables.get(&model).and_then(|t| t.get(&name).copied().flatten())).collect();
            (model, name, vals)
        })
        .collect();
    Comparison { variants: runs.iter().map(|r| r.label.clone()).collect(), rows }
}

/// The comparison as aligned text: a legend of the variants (`#1 beta=1 delta=4/255`), then one
/// row per metric and one column per variant.
pub fn render(runs: &[VariantRun], c: &Comparison) -> String {
    let mut s = String::new();
    for (i, r) in runs.iter().enumerate() {
        let _ = writeln!(
            s,
            "#{:<2} {}  (run {}, {} of {} stages computed)",
            i + 1,
            r.label,
            r.run_id,
            r.computed.len(),
            r.stages.len()
        );
    }
    s.push('\n');
    let w = c.rows.iter().map(|(m, n, _)| m.len() + 1 + n.len()).max().unwrap_or(6).max(6);
    let _ = write!(s, "{:<w$}", "metric");
    for i in 0..c.variants.len() {
        let _ = write!(s, "  {:>8}", format!("#{}", i + 1));
    }
    s.push('\n');
    for (model, name, vals) in &c.rows {
        let _ = write!(s, "{:<w$}", format!("{model}:{name}"));
        for v in vals {
            let _ = write!(s, "  {:>8}", v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into()));
        }
        s.push('\n');
    }
    s
}

/// One line per shared stage: `subset.upsilon  shared by 6 variants, computed once (#1)` or
/// `… computed by an earlier run` when every variant hit the cache.
pub fn render_sharing(runs: &[VariantRun], shared: &[Shared]) -> String {
    let idx =
        |label: &str| runs.iter().position(|r| r.label == label).map(|i| format!("#{}", i + 1)).unwrap_or_default();
    let mut s = String::new();
    if shared.is_empty() {
        s.push_str("no stage is shared between the variants\n");
        return s;
    }
    let w = shared.iter().map(|x| x.stage.len()).max().unwrap_or(5);
    let _ = writeln!(s, "stages shared by the variants (same key), and which run computed them:");
    for x in shared {
        let how = match x.computed_in.len() {
            0 => "from the cache (computed before this sweep)".to_string(),
            1 => format!("computed once ({})", idx(&x.computed_in[0])),
            n => {
                format!("computed {n} times ({})", x.computed_in.iter().map(|l| idx(l)).collect::<Vec<_>>().join(", "))
            }
        };
        let _ = writeln!(s, "  {:<w$}  {} variants, {how}", x.stage, x.variants.len());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_parse_and_reject() {
        assert_eq!(parse_axis("finetune.beta=1, 3 ,6").unwrap().values, ["1", "3", "6"]);
        assert_eq!(
            parse_axis(r#"attacks.deltas=["4/255","8/255"],["8/255"]"#).unwrap().values,
            [r#"["4/255","8/255"]"#, r#"["8/255"]"#]
        );
        assert_eq!(parse_axis(r#"run.name="a,b",c"#).unwrap().values, [r#""a,b""#, "c"]);
        for (a, want) in [
            ("finetune.beta", "expected KEY="),
            ("=1,2", "bad key"),
            ("a..b=1", "bad key"),
            ("finetune.beta=1,,2", "empty value"),
            ("finetune.beta=1,1", "twice"),
        ] {
            let e = parse_axis(a).unwrap_err().to_string();
            assert!(e.contains(want), "{a}: {e}");
        }
        let e = parse_axes(&["finetune.beta=1".into(), "finetune.beta=2".into()]).unwrap_err().to_string();
        assert!(e.contains("swept twice"), "{e}");
    }

    #[test]
    fn matrix_is_the_cartesian_product_first_axis_slowest() {
        let axes = parse_axes(&["finetune.beta=1,3,6".into(), "finetune.delta=4/255,8/255".into()]).unwrap();
        let v = expand(&axes);
        assert_eq!(v.len(), 6);
        assert_eq!(v[0].label, "beta=1 delta=4/255");
        assert_eq!(v[5].sets, ["finetune.beta=6", "finetune.delta=8/255"]);
        // Clashing last segments keep the full key.
        let v = expand(&parse_axes(&["finetune.seed=0,1".into(), "attacks.seed=2".into()]).unwrap());
        assert_eq!(v[1].label, "finetune.seed=1 attacks.seed=2");
        assert_eq!(expand(&[]).len(), 1, "no axes: one variant, the config itself");
    }

    fn runs() -> Vec<VariantRun> {
        let t = |x: f64| -> BTreeMap<String, BTreeMap<String, Option<f64>>> {
            [
                ("pretrained".to_string(), [("clean_acc".to_string(), Some(0.85))].into()),
                (
                    "finetuned".to_string(),
                    [
                        ("clean_acc".to_string(), Some(0.8 + x)),
                        ("w2_linf_acc@delta=8/255".to_string(), Some(0.4 + x)),
                        ("w2_linf_fgsm_acc@delta=8/255".to_string(), Some(0.5)),
                        ("upsilon_test_ce_q2".to_string(), Some(1.0)),
                    ]
                    .into(),
                ),
            ]
            .into()
        };
        let stages = |ft: &str| {
            vec![
                ("upsilon.pretrained.train10.ce".to_string(), "k1".to_string()),
                ("eval.pretrained".into(), "k2".into()),
                ("finetune".into(), ft.into()),
            ]
        };
        vec![
            VariantRun {
                label: "beta=1".into(),
                run_id: "r1".into(),
                stages: stages("f1"),
                computed: vec!["upsilon.pretrained.train10.ce".into(), "eval.pretrained".into(), "finetune".into()],
                tables: t(0.0),
            },
            VariantRun {
                label: "beta=3".into(),
                run_id: "r2".into(),
                stages: stages("f3"),
                computed: vec!["finetune".into()],
                tables: t(0.01),
            },
            VariantRun {
                label: "beta=6".into(),
                run_id: "r3".into(),
                stages: stages("f6"),
                computed: vec!["finetune".into()],
                tables: t(0.02),
            },
        ]
    }

    #[test]
    fn shared_stages_are_computed_once() {
        let s = sharing(&runs());
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].stage, "upsilon.pretrained.train10.ce");
        assert_eq!(s[0].variants.len(), 3);
        assert_eq!(s[0].computed_in, ["beta=1"]);
        let text = render_sharing(&runs(), &s);
        assert!(text.contains("eval.pretrained                3 variants, computed once (#1)"), "{text}");
    }

    #[test]
    fn comparison_has_headline_metrics_per_variant() {
        let r = runs();
        let c = comparison(&r);
        let names: Vec<String> = c.rows.iter().map(|(m, n, _)| format!("{m}:{n}")).collect();
        assert_eq!(names, ["pretrained:clean_acc", "finetuned:clean_acc", "finetuned:w2_linf_acc@delta=8/255"]);
        let got: Vec<f64> = c.rows[2].2.iter().map(|v| v.unwrap()).collect();
        assert!(got.iter().zip([0.4, 0.41, 0.42]).all(|(a, b)| (a - b).abs() < 1e-12), "{got:?}");
        let text = render(&r, &c);
        assert!(text.contains("#1  beta=1  (run r1, 3 of 3 stages computed)"), "{text}");
        assert!(text.contains("finetuned:w2_linf_acc@delta=8/255    0.4000    0.4100    0.4200"), "{text}");
    }
}
