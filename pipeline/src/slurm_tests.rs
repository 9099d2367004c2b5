//! Grouping, scripts, `--emit` and the K8s manifests, on a small synthetic DAG.

use std::sync::Arc;

use crate::exec::testing::{env, open_store};
use crate::graph::Pipeline;
use crate::k8s::{self, K8sOptions};
use crate::params::Params;
use crate::plan::{plan, PlanOptions};
use crate::slurm::*;
use crate::stage::{InputRef, Resources, Stage, StageCtx, StageError, StageId, StageOutputs};

struct S {
    name: String,
    kind: String,
    inputs: Vec<InputRef>,
    gpus: u32,
}

impl Stage for S {
    fn name(&self) -> &str {
        &self.name
    }
    fn id(&self) -> StageId {
        StageId(self.kind.clone())
    }
    fn version(&self) -> u32 {
        1
    }
    fn params(&self) -> Params {
        Params::new().with("name", &self.name)
    }
    fn inputs(&self) -> Vec<InputRef> {
        self.inputs.clone()
    }
    fn outputs(&self) -> Vec<String> {
        vec!["out".into()]
    }
    fn resources(&self) -> Resources {
        Resources { gpus: self.gpus, cpus: 2, mem_mb: 0, worker: self.gpus > 0 }
    }
    fn run(&self, _ctx: &StageCtx) -> Result<StageOutputs, StageError> {
        Err(StageError("not run in these tests".into()))
    }
}

fn st(name: &str, kind: &str, inputs: &[&str], gpus: u32) -> Arc<dyn Stage> {
    Arc::new(S {
        name: name.into(),
        kind: kind.into(),
        inputs: inputs
            .iter()
            .map(|i| InputRef { slot: i.replace('.', "_"), stage: (*i).into(), output: "out".into() })
            .collect(),
        gpus,
    })
}

/// fetch.a, fetch.b → data (cpu) → attack.x, attack.y (gpu) → report.
fn pipeline() -> Pipeline {
    Pipeline::new(vec![
        st("fetch.a", "fetch", &[], 0),
        st("fetch.b", "fetch", &[], 0),
        st("data", "dataset", &["fetch.a", "fetch.b"], 0),
        st("attack.x", "attack", &["data"], 1),
        st("attack.y", "attack", &["data"], 1),
        st("report", "compare", &["attack.x", "attack.y"], 0),
    ])
    .unwrap()
}

fn opts(dir: &std::path::Path) -> SlurmOptions {
    let mut o = SlurmOptions::new(
        vec!["/opt/wdro".into(), "--config".into(), "snap dir/config.toml".into()],
        "/work".into(),
        dir.to_path_buf(),
    );
    o.partition = Some("cpu".into());
    o.kinds.insert(
        "attack".into(),
        KindOverride {
            partition: Some("gpu".into()),
            time: Some("04:00:00".into()),
            mem: Some("16G".into()),
            extra: vec!["#SBATCH --constraint=a100".into()],
            ..Default::default()
        },
    );
    o
}

#[test]
fn groups_by_wave_kind_and_resources_with_afterok_edges() {
    let (_d, store) = open_store();
    let p = pipeline();
    let pl = plan(&p, &store, &PlanOptions::new(env())).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let arrays = group(&p, &pl, &opts(tmp.path()));
    let names: Vec<&str> = arrays.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["wdro-0-fetch", "wdro-1-dataset", "wdro-2-attack", "wdro-3-compare"]);
    assert_eq!(arrays[0].tasks.len(), 2);
    assert!(arrays[0].tasks.iter().all(|t| t.key.is_some()), "roots have known keys");
    assert!(arrays[1].tasks[0].key.is_none(), "below a stage to run the key is unknown");
    assert_eq!(arrays[2].tasks.iter().map(|t| t.stage.as_str()).collect::<Vec<_>>(), ["attack.x", "attack.y"]);
    assert_eq!(arrays[2].resources.gpus, 1);
    assert_eq!(arrays[2].resources.partition.as_deref(), Some("gpu"));
    assert_eq!(arrays[1].deps.iter().copied().collect::<Vec<_>>(), [0]);
    assert_eq!(arrays[3].deps.iter().copied().collect::<Vec<_>>(), [2]);
}

#[test]
fn emit_writes_scripts_and_a_submit_chain() {
    let (_d, store) = open_store();
    let p = pipeline();
    let pl = plan(&p, &store, &PlanOptions::new(env())).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(tmp.path());
    let arrays = group(&p, &pl, &o);
    let files = emit(&arrays, &o).unwrap();
    assert_eq!(files.len(), 5);
    let attack = std::fs::read_to_string(tmp.path().join("002-wdro-2-attack.sbatch")).unwrap();
    for line in [
        "#SBATCH --array=0-1",
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-task=1",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --mem=16G",
        "#SBATCH --time=04:00:00",
        "#SBATCH --constraint=a100",
        "#SBATCH --chdir=/work",
        "  0) ARGS=(--stage attack.x) ;;",
        "exec /opt/wdro --config 'snap dir/config.toml' worker \"${ARGS[@]}\"",
    ] {
        assert!(attack.lines().any(|l| l == line), "missing {line:?} in:\n{attack}");
    }
    let fetch = std::fs::read_to_string(tmp.path().join("000-wdro-0-fetch.sbatch")).unwrap();
    assert!(fetch.contains("#SBATCH --partition=cpu") && fetch.contains("--stage fetch.a --key "), "{fetch}");
    let submit = std::fs::read_to_string(tmp.path().join("submit.sh")).unwrap();
    assert!(submit.contains("J0=$(sbatch --parsable 000-wdro-0-fetch.sbatch"), "{submit}");
    assert!(submit.contains("J2=$(sbatch --parsable --dependency=afterok:$J1 002-wdro-2-attack.sbatch"), "{submit}");
    assert!(submit.contains("--dependency=afterok:$J2 003-wdro-3-compare.sbatch"), "{submit}");
    // bash accepts the scripts.
    for f in &files {
        let ok = std::process::Command::new("bash").arg("-n").arg(f).status().map(|s| s.success()).unwrap_or(true);
        assert!(ok, "bash -n {}", f.display());
    }
}

#[test]
fn k8s_manifests_are_indexed_jobs_per_wave() {
    let (_d, store) = open_store();
    let p = pipeline();
    let pl = plan(&p, &store, &PlanOptions::new(env())).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let arrays = group(&p, &pl, &opts(tmp.path()));
    let ko = K8sOptions {
        image: "wdro:latest".into(),
        namespace: Some("ml".into()),
        config_text: "[fetch.a]\nsources = []\n".into(),
        wdro_args: vec!["--remote".into(), "s3://bucket/cache".into()],
        parallelism: 4,
        dir: tmp.path().join("k8s"),
    };
    let files = k8s::emit(&arrays, &ko).unwrap();
    assert_eq!(files.len(), 5, "{files:?}");
    let wave2 = std::fs::read_to_string(tmp.path().join("k8s/wave-002.yaml")).unwrap();
    let docs: Vec<serde_json::Value> = wave2
        .split("\n---\n")
        .map(|d| d.trim_start_matches("---\n"))
        .map(|d| serde_json::from_str(d).expect("each document is JSON, hence YAML"))
        .collect();
    assert_eq!(docs.len(), 1);
    let j = &docs[0];
    assert_eq!(j["apiVersion"], "batch/v1");
    assert_eq!(j["kind"], "Job");
    assert_eq!(j["metadata"]["name"], "wdro-2-attack");
    assert_eq!(j["metadata"]["namespace"], "ml");
    let spec = &j["spec"];
    assert_eq!(spec["completionMode"], "Indexed");
    assert_eq!(spec["completions"], 2);
    assert!(spec["parallelism"].is_u64() && spec["backoffLimit"].is_u64());
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    let c = &pod["containers"][0];
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1");
    assert_eq!(c["resources"]["requests"]["memory"], "16Gi");
    assert!(c["command"][2].as_str().unwrap().contains("JOB_COMPLETION_INDEX"));
    assert!(c["command"][2].as_str().unwrap().contains("--remote s3://bucket/cache worker"));
    assert_eq!(c["envFrom"][0]["secretRef"]["name"], "wdro-remote");
    assert_eq!(pod["volumes"][0]["configMap"]["name"], "wdro-config");
    let cm: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("k8s/config.yaml")).unwrap()).unwrap();
    assert_eq!(cm["kind"], "ConfigMap");
    // Only the keys of the Job schema (a structural check in the spirit of `--strict`).
    let allowed_spec = ["completionMode", "completions", "parallelism", "backoffLimit", "template"];
    for k in spec.as_object().unwrap().keys() {
        assert!(allowed_spec.contains(&k.as_str()), "unexpected spec.{k}");
    }
}
