//! Run references and what a run used.
//!
//! A run is named by its id (`20261125T224700.123Z-4242`), a unique prefix of it, `latest`,
//! `latest~N` (N runs before the latest) or a pin name (`wdro cache pin NAME`). Run records list
//! the (stage name, key) pairs a run used; the stage records behind those keys hold the params,
//! the metrics (an evaluation table's flat `metrics` map) and the output digests.

use std::collections::BTreeMap;

use serde_json::Value;
use wdro_cache::{RunRecord, StageRecord, Store};

use super::ReportError;

/// Resolves a run reference against the store's run records.
pub fn resolve(store: &Store, spec: &str) -> Result<RunRecord, ReportError> {
    let runs = store.runs()?;
    resolve_in(&runs, &store.pins()?, spec)
}

/// [`resolve`] over given runs (oldest first) and pins (name → run id).
pub fn resolve_in(runs: &[RunRecord], pins: &[(String, String)], spec: &str) -> Result<RunRecord, ReportError> {
    let err = |msg: String| ReportError::Run { spec: spec.to_string(), msg };
    if runs.is_empty() {
        return Err(err("the cache has no run records yet; run `wdro run` or `wdro eval` first".into()));
    }
    let s = spec.trim();
    if let Some(rest) = s.strip_prefix("latest") {
        let back = match rest {
            "" => 0,
            r => r
                .strip_prefix('~')
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| err("write latest or latest~N, e.g. latest~1 for the run before the latest".into()))?,
        };
        return runs.iter().rev().nth(back).cloned().ok_or_else(|| {
            err(format!("only {} run(s) are recorded, so latest~{} does not exist", runs.len(), runs.len()))
        });
    }
    if let Some((_, id)) = pins.iter().find(|(name, _)| name == s) {
        return runs
            .iter()
            .find(|r| &r.id == id)
            .cloned()
            .ok_or_else(|| err(format!("the pin points at run {id}, which is no longer recorded")));
    }
    if let Some(r) = runs.iter().find(|r| r.id == s) {
        return Ok(r.clone());
    }
    let hits: Vec<&RunRecord> = runs.iter().filter(|r| r.id.starts_with(s)).collect();
    match hits.len() {
        1 => Ok(hits[0].clone()),
        0 => Err(err(format!(
            "no such run or pin; use latest, latest~N, a pin ({}) or a run id from `wdro report runs`",
            if pins.is_empty() {
                "none yet".to_string()
            } else {
                pins.iter().map(|p| p.0.as_str()).collect::<Vec<_>>().join(", ")
            }
        ))),
        n => Err(err(format!("{n} runs start with this prefix; give more characters (see `wdro report runs`)"))),
    }
}

/// The latest run (newest first) for which `pred` holds.
pub fn latest_where(store: &Store, pred: impl Fn(&RunRecord) -> bool) -> Result<Option<RunRecord>, ReportError> {
    Ok(store.runs()?.into_iter().rev().find(|r| pred(r)))
}

/// Whether the run used an evaluation table.
pub fn has_eval(r: &RunRecord) -> bool {
    r.stages.iter().any(|(n, _)| n.starts_with("eval."))
}

/// A run with the stage records it used.
#[derive(Clone, Debug)]
pub struct LoadedRun {
    /// How the user named it (`latest`, a pin, an id); used as a label in reports.
    pub label: String,
    pub record: RunRecord,
    /// Stage name → record, for the stages whose records are still in the cache.
    pub stages: BTreeMap<String, StageRecord>,
    /// Stages the run used whose records are gone (`gc`).
    pub missing: Vec<String>,
}

impl LoadedRun {
    pub fn load(store: &Store, label: &str, record: RunRecord) -> Result<LoadedRun, ReportError> {
        let mut stages = BTreeMap::new();
        let mut missing = Vec::new();
        for (name, key) in &record.stages {
            match store.get_record(key)? {
                Some(r) => {
                    stages.insert(name.clone(), r);
                }
                None => missing.push(name.clone()),
            }
        }
        Ok(LoadedRun { label: label.to_string(), record, stages, missing })
    }

    /// Model name (`pretrained`, `finetuned`) → evaluation metrics, from the `eval.M` records.
    pub fn tables(&self) -> BTreeMap<String, BTreeMap<String, Option<f64>>> {
        self.stages
            .iter()
            .filter_map(|(n, r)| Some((n.strip_prefix("eval.")?.to_string(), crate::gates::metrics_of(&r.metrics))))
            .collect()
    }

    /// The JSON output `output` of stage `stage`, read from the store.
    pub fn output_json(&self, store: &Store, stage: &str, output: &str) -> Result<Option<Value>, ReportError> {
        let Some(rec) = self.stages.get(stage) else { return Ok(None) };
        let Some(o) = rec.outputs.get(output) else { return Ok(None) };
        let bytes = store.get_bytes(&o.digest)?;
        Ok(serde_json::from_slice(&bytes).ok())
    }

    /// The key of a stage in this run, as text.
    pub fn key_of(&self, stage: &str) -> Option<String> {
        self.record.stages.iter().find(|(n, _)| n == stage).map(|(_, k)| k.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wdro_cache::{Digest, StageKey};

    fn run(id: &str) -> RunRecord {
        RunRecord {
            id: id.into(),
            started_at: 0,
            config_digest: Digest::of_bytes(b""),
            stages: vec![("eval.pretrained".into(), StageKey(Digest::of_bytes(id.as_bytes())))],
            computed: vec![],
            pinned_as: None,
        }
    }

    #[test]
    fn latest_pins_ids_and_prefixes() {
        let runs = vec![run("20261125T100000.000Z-1"), run("20261125T110000.000Z-2"), run("20261126T090000.000Z-3")];
        let pins = vec![("baseline".to_string(), "20261125T100000.000Z-1".to_string())];
        let id = |s: &str| resolve_in(&runs, &pins, s).map(|r| r.id);
        assert_eq!(id("latest").unwrap(), "20261126T090000.000Z-3");
        assert_eq!(id("latest~1").unwrap(), "20261125T110000.000Z-2");
        assert_eq!(id("latest~2").unwrap(), "20261125T100000.000Z-1");
        assert!(id("latest~3").unwrap_err().to_string().contains("only 3 run(s)"));
        assert!(id("latest~x").unwrap_err().to_string().contains("latest~N"));
        assert_eq!(id("baseline").unwrap(), "20261125T100000.000Z-1");
        assert_eq!(id("20261126").unwrap(), "20261126T090000.000Z-3");
        assert!(id("20261125").unwrap_err().to_string().contains("2 runs start with"));
        let e = id("nope").unwrap_err().to_string();
        assert!(e.contains("baseline") && e.contains("wdro report runs"), "{e}");
        assert!(resolve_in(&[], &[], "latest").unwrap_err().to_string().contains("no run records"));
    }

    #[test]
    fn loads_records_and_tables() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), wdro_cache::LockWait::NoWait).unwrap();
        let table = serde_json::json!({"metrics": {"clean_acc": 0.9}});
        let d = store.put_bytes(&serde_json::to_vec(&table).unwrap()).unwrap();
        let key = StageKey(Digest::of_bytes(b"k"));
        let rec = StageRecord {
            key,
            stage_name: "eval.pretrained".into(),
            stage_id: "evaluate".into(),
            version: 1,
            params: serde_json::json!({"model": "pretrained"}),
            inputs: Default::default(),
            outputs: [("table".to_string(), wdro_cache::OutputRef { digest: d, size: 1, kind: "json".into() })].into(),
            metrics: table["metrics"].clone(),
            env: Default::default(),
            wdro_version: "0.1.0".into(),
            finished_at: 0,
            duration_ms: 0,
        };
        store.put_record(&rec).unwrap();
        let mut r = run("20261125T100000.000Z-1");
        r.stages = vec![("eval.pretrained".into(), key), ("gone".into(), StageKey(Digest::of_bytes(b"x")))];
        store.put_run(&r).unwrap();
        let l = LoadedRun::load(&store, "latest", resolve(&store, "latest").unwrap()).unwrap();
        assert_eq!(l.missing, ["gone"]);
        assert_eq!(l.tables()["pretrained"]["clean_acc"], Some(0.9));
        assert_eq!(l.output_json(&store, "eval.pretrained", "table").unwrap().unwrap(), table);
        assert_eq!(l.key_of("eval.pretrained").unwrap(), key.to_string());
        assert!(has_eval(&l.record));
    }
}
