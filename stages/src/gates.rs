//! Robustness gates for CI: `w2_linf_acc@delta=8/255 >= 0.45`.
//!
//! A gate is a metric of an evaluation table (`eval.M`'s flat `metrics` map), an operator
//! (`>=`, `<=`, `>`, `<`, `==`) and a threshold. Gates come from `wdro eval --gate EXPR` or from
//! the config's `[gates]` table (`"w2_linf_acc@delta=8/255" = ">= 0.45"`).
//!
//! Metric names are normalised before they are looked up, so a gate may write δ as a fraction or
//! as a number (`@delta=8/255`, `@delta=0.0313725490196`, `@δ=8/255` all name the same metric),
//! in any case and with spaces. A name the table does not have is an error that lists the
//! table's metrics and names the closest one: a typo must never turn into a silently passing
//! gate.
//!
//! ```
//! use wdro_stages::gates::Gate;
//! let g = Gate::parse("W2_linf_acc @ delta = 0.031372549019607843 >= 0.45").unwrap();
//! assert_eq!(g.metric, "w2_linf_acc@delta=8/255");
//! let metrics = [("w2_linf_acc@delta=8/255".to_string(), Some(0.41))].into_iter().collect();
//! let r = g.check(&metrics).unwrap();
//! assert!(!r.passed);
//! assert_eq!(r.message(), "gate failed: w2_linf_acc@delta=8/255 is 0.41, required >= 0.45");
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::params::Delta;

/// A gate problem: one line naming the gate and the fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum GateError {
    #[error("gate {gate:?}: {msg}")]
    Parse { gate: String, msg: String },
    #[error(
        "gate {gate:?}: no metric `{metric}` in the evaluation table; closest: `{closest}`; available: {}",
        available.join(", ")
    )]
    UnknownMetric { gate: String, metric: String, closest: String, available: Vec<String> },
    #[error("gate {gate:?}: the evaluation table has no metrics at all; check that `eval.*` ran")]
    NoMetrics { gate: String },
}

/// Comparison operator of a gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Op {
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "==")]
    Eq,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Ge => ">=",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Lt => "<",
            Op::Eq => "==",
        }
    }

    /// `==` compares with a tolerance of 1e-9 (relative to the larger magnitude, at least
    /// absolute 1e-12): table values are computed floats.
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Op::Ge => value >= threshold,
            Op::Le => value <= threshold,
            Op::Gt => value > threshold,
            Op::Lt => value < threshold,
            Op::Eq => (value - threshold).abs() <= 1e-9 * value.abs().max(threshold.abs()).max(1e-3),
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed gate.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Gate {
    /// The text as the user wrote it.
    pub source: String,
    /// The normalised metric name (`w2_linf_acc@delta=8/255`).
    pub metric: String,
    pub op: Op,
    pub threshold: f64,
}

/// The outcome of one gate against a table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GateResult {
    pub gate: Gate,
    /// The table's own name for the metric (may differ in δ spelling from the gate's).
    pub metric: String,
    /// `None` when the stage produced no number (NaN or missing): the gate fails.
    pub value: Option<f64>,
    pub passed: bool,
}

impl GateResult {
    /// `gate passed: clean_acc is 0.83, required >= 0.8` or `gate failed: …`.
    pub fn message(&self) -> String {
        let value = match self.value {
            Some(v) => fmt_num(v),
            None => "missing (the stage reported no number)".into(),
        };
        format!(
            "gate {}: {} is {value}, required {} {}",
            if self.passed { "passed" } else { "failed" },
            self.metric,
            self.gate.op,
            fmt_num(self.gate.threshold)
        )
    }
}

/// Shortest faithful text of a number: up to 6 decimals, trailing zeros dropped.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    if v != 0.0 && v.abs() < 1e-4 {
        return format!("{v:e}");
    }
    let s = format!("{v:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

impl Gate {
    /// Parses `METRIC OP NUMBER`.
    pub fn parse(text: &str) -> Result<Gate, GateError> {
        let err = |msg: &str| GateError::Parse { gate: text.to_string(), msg: msg.to_string() };
        let t = text.trim();
        // Metric names contain `=` (`@delta=8/255`) but never `<`, `>` or `==`.
        let (pos, op, len) = if let Some(p) = t.find(['<', '>']) {
            let eq = t[p + 1..].starts_with('=');
            let op = match (&t[p..p + 1], eq) {
                ("<", true) => Op::Le,
                ("<", false) => Op::Lt,
                (">", true) => Op::Ge,
                _ => Op::Gt,
            };
            (p, op, if eq { 2 } else { 1 })
        } else if let Some(p) = t.find("==") {
            (p, Op::Eq, 2)
        } else {
            return Err(err(
                "no operator; write METRIC OP NUMBER with OP one of >=, <=, >, <, ==, e.g. 'clean_acc >= 0.8'",
            ));
        };
        let (lhs, rhs) = (t[..pos].trim(), t[pos + len..].trim());
        if lhs.is_empty() {
            return Err(err("no metric before the operator, e.g. 'clean_acc >= 0.8'"));
        }
        if rhs.starts_with(['=', '<', '>']) || lhs.ends_with(['=', '!']) {
            return Err(err("unknown operator; use one of >=, <=, >, <, =="));
        }
        let threshold = parse_number(rhs).map_err(|m| err(&format!("threshold {rhs:?}: {m}")))?;
        let metric = normalize_metric(lhs).map_err(|m| err(&m))?;
        Ok(Gate { source: t.to_string(), metric, op, threshold })
    }

    /// A `[gates]` entry: `metric = ">= 0.45"`.
    pub fn from_config(metric: &str, condition: &str) -> Result<Gate, GateError> {
        let mut g = Gate::parse(&format!("{metric} {condition}")).map_err(|e| match e {
            GateError::Parse { msg, .. } => GateError::Parse { gate: format!("[gates] {metric} = {condition:?}"), msg },
            other => other,
        })?;
        g.source = format!("{} {}", metric.trim(), condition.trim());
        Ok(g)
    }

    /// Looks the metric up in `metrics` (the table's names → values, `None` for null) and
    /// compares.
    pub fn check(&self, metrics: &BTreeMap<String, Option<f64>>) -> Result<GateResult, GateError> {
        if metrics.is_empty() {
            return Err(GateError::NoMetrics { gate: self.source.clone() });
        }
        let name = resolve_metric(&self.metric, metrics.keys().map(String::as_str)).ok_or_else(|| {
            let available: Vec<String> = metrics.keys().cloned().collect();
            GateError::UnknownMetric {
                gate: self.source.clone(),
                metric: self.metric.clone(),
                closest: nearest(&self.metric, available.iter().map(String::as_str)).unwrap_or_default(),
                available,
            }
        })?;
        let value = metrics[&name].filter(|v| v.is_finite());
        let passed = value.is_some_and(|v| self.op.holds(v, self.threshold));
        Ok(GateResult { gate: self.clone(), metric: name, value, passed })
    }
}

/// Gates from the config's `[gates]` table followed by the command line's, in that order.
pub fn collect(config: &BTreeMap<String, String>, cli: &[String]) -> Result<Vec<Gate>, GateError> {
    let mut out = Vec::new();
    for (m, c) in config {
        out.push(Gate::from_config(m, c)?);
    }
    for g in cli {
        out.push(Gate::parse(g)?);
    }
    Ok(out)
}

fn parse_number(s: &str) -> Result<f64, String> {
    let v = if s.contains('/') {
        Delta::parse(s)?.0
    } else {
        s.parse::<f64>().map_err(|_| "not a number; write e.g. 0.45".to_string())?
    };
    if v.is_finite() {
        Ok(v)
    } else {
        Err("must be finite".into())
    }
}

/// Lower case, no spaces, `δ`/`eps` → `delta`, δ in canonical form (`8/255` where exact).
pub fn normalize_metric(raw: &str) -> Result<String, String> {
    let s: String = raw.chars().filter(|c| !c.is_whitespace()).collect::<String>().to_lowercase();
    let s = s.replace("δ", "delta").replace("@eps=", "@delta=").replace("w∞", "winf").replace("w_inf", "winf");
    match s.split_once("@delta=") {
        Some((base, d)) => {
            if base.is_empty() {
                return Err("no metric name before @delta".into());
            }
            let d = Delta::parse(d).map_err(|e| format!("bad δ: {e}"))?;
            Ok(format!("{base}@delta={}", d.pretty()))
        }
        None => Ok(s),
    }
}

/// The table's name for a normalised metric: exact, else the same base with a numerically equal
/// δ (tolerance 1e-6 relative), so `@delta=0.0314` does not match but a full-precision
/// `8/255` typed as a decimal does.
pub fn resolve_metric<'a>(metric: &str, names: impl Iterator<Item = &'a str>) -> Option<String> {
    let names: Vec<&str> = names.collect();
    if names.contains(&metric) {
        return Some(metric.to_string());
    }
    let (base, d) = split_delta(metric)?;
    names
        .into_iter()
        .find(|n| split_delta(n).is_some_and(|(b, nd)| b == base && (nd - d).abs() <= 1e-6 * d.abs().max(1e-12)))
        .map(str::to_string)
}

fn split_delta(name: &str) -> Option<(&str, f64)> {
    let (base, d) = name.split_once("@delta=")?;
    Some((base, Delta::parse(d).ok()?.0))
}

/// The candidate with the smallest edit distance (ties: the first in order).
pub fn nearest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<String> {
    candidates.map(|c| (levenshtein(word, c), c)).min_by_key(|(d, _)| *d).map(|(_, c)| c.to_string())
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Reads the flat `metrics` object of an evaluation table into name → value (`null` → `None`).
pub fn metrics_of(table: &serde_json::Value) -> BTreeMap<String, Option<f64>> {
    let m = table.get("metrics").unwrap_or(table);
    m.as_object()
        .map(|o| o.iter().filter(|(_, v)| v.is_number() || v.is_null()).map(|(k, v)| (k.clone(), v.as_f64())).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> BTreeMap<String, Option<f64>> {
        metrics_of(&serde_json::json!({"metrics": {
            "clean_acc": 0.8312,
            "pointwise_acc": 0.402,
            "w2_linf_acc@delta=4/255": 0.61,
            "w2_linf_acc@delta=8/255": 0.4123,
            "winf_linf_acc@delta=8/255": 0.52,
            "w2_linf_fgsm_acc@delta=8/255": 0.55,
            "upsilon": 1.05,
            "upsilon_test_redlr_q2": null,
        }}))
    }

    #[test]
    fn operators_parse() {
        for (t, op, th) in [
            ("clean_acc >= 0.8", Op::Ge, 0.8),
            ("clean_acc<=0.8", Op::Le, 0.8),
            ("clean_acc > 1e-1", Op::Gt, 0.1),
            ("clean_acc < .5", Op::Lt, 0.5),
            ("clean_acc == 1", Op::Eq, 1.0),
            ("upsilon <= 6/5", Op::Le, 1.2),
        ] {
            let g = Gate::parse(t).unwrap();
            assert_eq!(
                (g.metric.as_str(), g.op, g.threshold),
                (if t.starts_with('u') { "upsilon" } else { "clean_acc" }, op, th),
                "{t}"
            );
        }
    }

    #[test]
    fn delta_spellings_normalise_to_the_table_names() {
        for t in [
            "w2_linf_acc@delta=8/255 >= 0.4",
            "W2_LINF_ACC @ delta = 8/255 >= 0.4",
            "w2_linf_acc@δ=8/255 >= 0.4",
            "w2_linf_acc@delta=0.03137254901960784 >= 0.4",
            "w2_linf_acc@delta=16/510 >= 0.4",
        ] {
            let g = Gate::parse(t).unwrap();
            assert_eq!(g.metric, "w2_linf_acc@delta=8/255", "{t}");
            let r = g.check(&table()).unwrap();
            assert_eq!(r.metric, "w2_linf_acc@delta=8/255");
            assert!(r.passed, "{t}");
        }
        // A δ printed as a decimal in the table still matches a fraction in the gate.
        let m: BTreeMap<String, Option<f64>> = [("w2_l2_acc@delta=0.5".to_string(), Some(0.3))].into();
        assert!(Gate::parse("w2_l2_acc@delta=1/2 > 0.2").unwrap().check(&m).unwrap().passed);
    }

    #[test]
    fn failure_message_names_metric_threshold_and_value() {
        let r = Gate::parse("w2_linf_acc@delta=8/255 >= 0.45").unwrap().check(&table()).unwrap();
        assert!(!r.passed);
        assert_eq!(r.value, Some(0.4123));
        assert_eq!(r.message(), "gate failed: w2_linf_acc@delta=8/255 is 0.4123, required >= 0.45");
        let r = Gate::parse("upsilon <= 1.2").unwrap().check(&table()).unwrap();
        assert!(r.passed);
        assert_eq!(r.message(), "gate passed: upsilon is 1.05, required <= 1.2");
    }

    #[test]
    fn missing_values_fail() {
        let r = Gate::parse("upsilon_test_redlr_q2 <= 100").unwrap().check(&table()).unwrap();
        assert!(!r.passed);
        assert!(r.message().contains("missing"), "{}", r.message());
    }

    #[test]
    fn unknown_metric_names_available_and_closest() {
        let e = Gate::parse("w2_linf_acc@delta=2/255 >= 0.4").unwrap().check(&table()).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("closest: `w2_linf_acc@delta=4/255`"), "{s}");
        assert!(s.contains("available: clean_acc, pointwise_acc"), "{s}");
        assert_eq!(s.lines().count(), 1);
        let e = Gate::parse("clean_ac >= 0.4").unwrap().check(&table()).unwrap_err().to_string();
        assert!(e.contains("closest: `clean_acc`"), "{e}");
        let e = Gate::parse("clean_acc >= 0.4").unwrap().check(&BTreeMap::new()).unwrap_err();
        assert!(matches!(e, GateError::NoMetrics { .. }));
    }

    #[test]
    fn syntax_errors_say_how_to_write_a_gate() {
        for (t, want) in [
            ("clean_acc 0.8", "no operator"),
            (">= 0.8", "no metric"),
            ("clean_acc >= abc", "not a number"),
            ("clean_acc => 0.8", "unknown operator"),
            ("clean_acc >== 0.8", "unknown operator"),
            ("clean_acc >= inf", "finite"),
            ("@delta=8/255 >= 0.1", "no metric name"),
            ("w2@delta=x >= 0.1", "bad δ"),
        ] {
            let e = Gate::parse(t).unwrap_err().to_string();
            assert!(e.contains(want), "{t}: {e}");
        }
    }

    #[test]
    fn config_gates_come_first() {
        let cfg: BTreeMap<String, String> = [("clean_acc".to_string(), ">= 0.8".to_string())].into();
        let gates = collect(&cfg, &["upsilon <= 1.2".into()]).unwrap();
        assert_eq!(gates.len(), 2);
        assert_eq!(gates[0].source, "clean_acc >= 0.8");
        let bad: BTreeMap<String, String> = [("clean_acc".to_string(), "0.8".to_string())].into();
        let e = collect(&bad, &[]).unwrap_err().to_string();
        assert!(e.contains("[gates] clean_acc"), "{e}");
    }

    #[test]
    fn equality_is_tolerant_and_numbers_print_short() {
        assert!(Op::Eq.holds(0.1 + 0.2, 0.3));
        assert!(!Op::Eq.holds(0.31, 0.3));
        assert_eq!(fmt_num(0.45), "0.45");
        assert_eq!(fmt_num(1.0), "1");
        assert_eq!(fmt_num(0.412345678), "0.412346");
        assert_eq!(fmt_num(3e-7), "3e-7");
    }
}
