//! The result of `wdro eval`: metrics with provenance, gate outcomes, stage lines.
//!
//! Provenance of a number is the stage whose summary it came from (`clean_acc` ←
//! `clean.pretrained`, `w2_linf_acc@delta=8/255` ← `attack.pretrained.w-pgd.w2.8_255`,
//! `pointwise_acc` ← every pointwise attack), that stage's key, the evaluation table's stage and
//! key, the digest of the canonical checkpoint the model was loaded from, and the wdro version
//! that computed the stage. The mapping is derived from the input slots of the `eval.M` stage
//! (`clean`, `upsilon:<set>:<loss>`, `attack:<kind>:<q>:<norm>:<δ>`), the same slots the table
//! is built from, so it cannot drift from the table.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::evaluate::attack_metric;
use crate::gates::GateResult;

/// A stage and its key (hex), as a report cites it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageRef {
    pub stage: String,
    pub key: Option<String>,
}

/// Where one number came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The stage whose output holds the number.
    pub stage: String,
    pub stage_key: Option<String>,
    /// Every stage that fed the number (several for `pointwise_acc`).
    pub sources: Vec<StageRef>,
    /// The evaluation table that collected it.
    pub table_stage: String,
    pub table_key: Option<String>,
    /// `blake3:<hex>` of the canonical checkpoint (the `checkpoint.*` stage's `model` output).
    pub checkpoint_digest: Option<String>,
    /// The wdro version that computed `stage`.
    pub wdro_version: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricLine {
    pub name: String,
    /// `None`: the stage reported no number (NaN or missing).
    pub value: Option<f64>,
    pub provenance: Provenance,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GateLine {
    /// The gate as written.
    pub gate: String,
    pub metric: String,
    pub op: String,
    pub threshold: f64,
    pub value: Option<f64>,
    pub passed: bool,
    /// `gate failed: w2_linf_acc@delta=8/255 is 0.41, required >= 0.45`.
    pub message: String,
    pub provenance: Provenance,
}

/// One stage of the evaluation run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageLine {
    pub name: String,
    pub key: Option<String>,
    /// `hit`, `computed`, `failed` or `not_run`.
    pub outcome: String,
    pub duration_ms: u64,
    /// The failure message of a failed stage.
    #[serde(default)]
    pub message: Option<String>,
    /// The wdro version recorded with the stage's result (hits may come from an older wdro).
    #[serde(default)]
    pub wdro_version: Option<String>,
}

/// Everything `wdro eval` reports (`--report-json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The wdro that ran the evaluation.
    pub wdro_version: String,
    pub run_id: String,
    /// blake3 of the resolved config the pipeline was built from.
    pub config_digest: String,
    /// Model name in the pipeline (`pretrained`).
    pub model: String,
    /// Checkpoint source as given (`file:…`, `robustbench:…`, `https://…`, `train`).
    pub model_source: String,
    pub checkpoint_digest: Option<String>,
    /// Digest of the fetched file before conversion (`fetch.checkpoint`), when fetched.
    pub checkpoint_source_digest: Option<String>,
    /// Every seed that went into the evaluation (they are part of the stage keys).
    pub seeds: BTreeMap<String, u64>,
    /// All gates passed (true when there are none) and no stage failed.
    pub passed: bool,
    pub gates_failed: usize,
    pub metrics: Vec<MetricLine>,
    pub gates: Vec<GateLine>,
    pub stages: Vec<StageLine>,
    /// Why the evaluation did not complete, if it did not.
    #[serde(default)]
    pub error: Option<String>,
}

/// What [`build`] needs; the CLI fills it from the pipeline, the run report and the store.
pub struct EvalInputs {
    pub wdro_version: String,
    pub run_id: String,
    pub config_digest: String,
    pub model: String,
    pub model_source: String,
    pub seeds: BTreeMap<String, u64>,
    /// Name of the evaluation table stage (`eval.pretrained`).
    pub table_stage: String,
    /// The table stage's input slots → producing stage.
    pub slots: Vec<(String, String)>,
    pub stages: Vec<StageLine>,
    /// The table's metrics (empty when the table was not computed).
    pub metrics: BTreeMap<String, Option<f64>>,
    pub checkpoint_digest: Option<String>,
    pub checkpoint_source_digest: Option<String>,
    pub gates: Vec<GateResult>,
    pub error: Option<String>,
}

fn parse_attack_slot(slot: &str) -> Option<(String, u8, String, f64)> {
    let mut it = slot.split(':');
    if it.next()? != "attack" {
        return None;
    }
    Some((it.next()?.to_string(), it.next()?.parse().ok()?, it.next()?.to_string(), it.next()?.parse().ok()?))
}

fn is_pointwise(kind: &str) -> bool {
    matches!(kind, "pgd" | "apgd-ce" | "apgd-dlr")
}

/// Metric name → the stages it is computed from, from the table stage's input slots. The names
/// are exactly those the table will have, so gates can be checked before anything runs.
pub fn metric_sources(slots: &[(String, String)]) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut ups_train = Vec::new();
    let mut ups_test = Vec::new();
    for (slot, stage) in slots {
        if slot == "clean" {
            m.entry("clean_acc".into()).or_default().push(stage.clone());
        } else if let Some(rest) = slot.strip_prefix("upsilon:") {
            let Some((set, loss)) = rest.split_once(':') else { continue };
            for q in ["q1", "q2"] {
                m.entry(format!("upsilon_{set}_{loss}_{q}")).or_default().push(stage.clone());
            }
            if set == "train10" {
                ups_train.push(stage.clone());
            } else {
                ups_test.push(stage.clone());
            }
        } else if let Some((kind, q, norm, delta)) = parse_attack_slot(slot) {
            m.entry(attack_metric(&kind, q, &norm, delta)).or_default().push(stage.clone());
            if is_pointwise(&kind) {
                m.entry("pointwise_acc".into()).or_default().push(stage.clone());
            }
        }
    }
    // The headline Υ is one of these (the attack loss, q = 2, train10 first); [`refine`] picks it.
    let ups = if ups_train.is_empty() { ups_test } else { ups_train };
    if !ups.is_empty() {
        m.insert("upsilon".into(), ups);
    }
    m
}

/// Narrows the headline `upsilon` to the stage whose q = 2 value it equals.
pub fn refine(sources: &mut BTreeMap<String, Vec<String>>, metrics: &BTreeMap<String, Option<f64>>) {
    let Some(Some(u)) = metrics.get("upsilon") else { return };
    for set in ["train10", "test"] {
        for (name, v) in metrics {
            let is_q2 = name.starts_with(&format!("upsilon_{set}_")) && name.ends_with("_q2");
            if is_q2 && *v == Some(*u) {
                if let Some(src) = sources.get(name).cloned() {
                    sources.insert("upsilon".into(), src);
                    return;
                }
            }
        }
    }
}

/// Assembles the report.
pub fn build(inp: EvalInputs) -> EvalReport {
    let mut sources = metric_sources(&inp.slots);
    refine(&mut sources, &inp.metrics);
    let by_name: BTreeMap<&str, &StageLine> = inp.stages.iter().map(|s| (s.name.as_str(), s)).collect();
    let table_key = by_name.get(inp.table_stage.as_str()).and_then(|s| s.key.clone());
    let provenance = |metric: &str| -> Provenance {
        let stages = sources.get(metric).cloned().unwrap_or_else(|| vec![inp.table_stage.clone()]);
        let refs: Vec<StageRef> = stages
            .iter()
            .map(|s| StageRef { stage: s.clone(), key: by_name.get(s.as_str()).and_then(|l| l.key.clone()) })
            .collect();
        let primary = refs[0].clone();
        let version = by_name
            .get(primary.stage.as_str())
            .and_then(|l| l.wdro_version.clone())
            .unwrap_or_else(|| inp.wdro_version.clone());
        Provenance {
            stage: primary.stage,
            stage_key: primary.key,
            sources: refs,
            table_stage: inp.table_stage.clone(),
            table_key: table_key.clone(),
            checkpoint_digest: inp.checkpoint_digest.clone(),
            wdro_version: version,
        }
    };
    let mut names: Vec<&String> = inp.metrics.keys().collect();
    names.sort_by_key(|n| super::metric_order(n));
    let metrics: Vec<MetricLine> = names
        .into_iter()
        .map(|n| MetricLine { name: n.clone(), value: inp.metrics[n], provenance: provenance(n) })
        .collect();
    let gates: Vec<GateLine> = inp
        .gates
        .iter()
        .map(|g| GateLine {
            gate: g.gate.source.clone(),
            metric: g.metric.clone(),
            op: g.gate.op.as_str().to_string(),
            threshold: g.gate.threshold,
            value: g.value,
            passed: g.passed,
            message: g.message(),
            provenance: provenance(&g.metric),
        })
        .collect();
    let gates_failed = gates.iter().filter(|g| !g.passed).count();
    let stage_failed = inp.stages.iter().any(|s| s.outcome == "failed") || inp.error.is_some();
    EvalReport {
        wdro_version: inp.wdro_version,
        run_id: inp.run_id,
        config_digest: inp.config_digest,
        model: inp.model,
        model_source: inp.model_source,
        checkpoint_digest: inp.checkpoint_digest,
        checkpoint_source_digest: inp.checkpoint_source_digest,
        seeds: inp.seeds,
        passed: gates_failed == 0 && !stage_failed,
        gates_failed,
        metrics,
        gates,
        stages: inp.stages,
        error: inp.error,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::gates::Gate;

    pub fn slots() -> Vec<(String, String)> {
        [
            ("clean", "clean.pretrained"),
            ("upsilon:train10:ce", "upsilon.pretrained.train10.ce"),
            ("upsilon:train10:redlr", "upsilon.pretrained.train10.redlr"),
            ("upsilon:test:redlr", "upsilon.pretrained.test.redlr"),
            ("attack:w-pgd:2:linf:0.03137254901960784", "attack.pretrained.w-pgd.w2.8_255"),
            ("attack:w-pgd:1:linf:0.03137254901960784", "attack.pretrained.w-pgd.winf.8_255"),
            ("attack:apgd-ce:1:linf:0.03137254901960784", "attack.pretrained.apgd-ce"),
            ("attack:apgd-dlr:1:linf:0.03137254901960784", "attack.pretrained.apgd-dlr"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
    }

    pub fn metrics() -> BTreeMap<String, Option<f64>> {
        crate::gates::metrics_of(&serde_json::json!({"metrics": {
            "clean_acc": 0.83, "pointwise_acc": 0.40,
            "w2_linf_acc@delta=8/255": 0.41, "winf_linf_acc@delta=8/255": 0.52,
            "winf_linf_apgd-ce_acc@delta=8/255": 0.43, "winf_linf_apgd-dlr_acc@delta=8/255": 0.44,
            "upsilon_train10_ce_q1": 0.9, "upsilon_train10_ce_q2": 1.1,
            "upsilon_train10_redlr_q1": 0.7, "upsilon_train10_redlr_q2": 0.95,
            "upsilon_test_redlr_q1": 0.72, "upsilon_test_redlr_q2": 0.97,
            "upsilon": 0.95,
        }}))
    }

    fn line(name: &str, outcome: &str) -> StageLine {
        StageLine {
            name: name.into(),
            key: Some(format!("{:0>64}", name.len())),
            outcome: outcome.into(),
            duration_ms: 1200,
            message: None,
            wdro_version: Some("0.0.9".into()),
        }
    }

    pub fn report() -> EvalReport {
        let mut stages: Vec<StageLine> = slots().iter().map(|(_, s)| line(s, "hit")).collect();
        stages.push(line("checkpoint.pretrained", "computed"));
        stages.push(line("eval.pretrained", "computed"));
        let m = metrics();
        let gates = ["w2_linf_acc@delta=8/255 >= 0.45", "clean_acc >= 0.8", "upsilon <= 1.2"]
            .iter()
            .map(|g| Gate::parse(g).unwrap().check(&m).unwrap())
            .collect();
        build(EvalInputs {
            wdro_version: "0.1.0".into(),
            run_id: "20261125T220000.000Z-42".into(),
            config_digest: "c".repeat(64),
            model: "pretrained".into(),
            model_source: "file:ckpt.safetensors".into(),
            seeds: [("attacks.seed".to_string(), 0)].into(),
            table_stage: "eval.pretrained".into(),
            slots: slots(),
            stages,
            metrics: m,
            checkpoint_digest: Some(format!("blake3:{}", "ab".repeat(32))),
            checkpoint_source_digest: None,
            gates,
            error: None,
        })
    }

    #[test]
    fn sources_follow_the_slots() {
        let s = metric_sources(&slots());
        assert_eq!(s["clean_acc"], ["clean.pretrained"]);
        assert_eq!(s["w2_linf_acc@delta=8/255"], ["attack.pretrained.w-pgd.w2.8_255"]);
        assert_eq!(s["winf_linf_acc@delta=8/255"], ["attack.pretrained.w-pgd.winf.8_255"]);
        assert_eq!(s["pointwise_acc"], ["attack.pretrained.apgd-ce", "attack.pretrained.apgd-dlr"]);
        assert_eq!(s["upsilon_test_redlr_q2"], ["upsilon.pretrained.test.redlr"]);
        assert_eq!(s["upsilon"].len(), 2, "before refinement: every train10 Υ");
        // Every predicted name is a name the evaluation table really produces.
        let mut summaries = BTreeMap::new();
        for (slot, _) in slots() {
            summaries
                .insert(slot, serde_json::json!({"acc": 0.5, "acc_min": 0.5, "upsilon_q1": 1.0, "upsilon_q2": 1.0}));
        }
        let table = crate::evaluate::evaluation_table("pretrained", &summaries);
        let real: Vec<String> = table["metrics"].as_object().unwrap().keys().cloned().collect();
        for name in s.keys() {
            assert!(real.contains(name), "{name} not in {real:?}");
        }
    }

    #[test]
    fn every_number_carries_provenance() {
        let r = report();
        let w2 = r.metrics.iter().find(|m| m.name == "w2_linf_acc@delta=8/255").unwrap();
        assert_eq!(w2.provenance.stage, "attack.pretrained.w-pgd.w2.8_255");
        assert_eq!(w2.provenance.stage_key.as_deref().unwrap().len(), 64);
        assert_eq!(w2.provenance.table_stage, "eval.pretrained");
        assert!(w2.provenance.table_key.is_some());
        assert_eq!(w2.provenance.checkpoint_digest.as_deref(), Some(format!("blake3:{}", "ab".repeat(32)).as_str()));
        assert_eq!(w2.provenance.wdro_version, "0.0.9", "the version that computed the stage");
        let ups = r.metrics.iter().find(|m| m.name == "upsilon").unwrap();
        assert_eq!(ups.provenance.stage, "upsilon.pretrained.train10.redlr", "refined by value");
        assert_eq!(r.metrics[0].name, "clean_acc");
        assert!(!r.passed);
        assert_eq!(r.gates_failed, 1);
        assert_eq!(r.gates[0].message, "gate failed: w2_linf_acc@delta=8/255 is 0.41, required >= 0.45");
        assert_eq!(r.gates[0].provenance.stage, "attack.pretrained.w-pgd.w2.8_255");
        let back: EvalReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}
