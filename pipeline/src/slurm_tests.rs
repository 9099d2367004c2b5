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
    /// A param a sweep changes.
    lr: f64,
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
        Params::new().with("name", &self.name).with("lr", self.lr)
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
    st_lr(name, kind, inputs, gpus, 0.0)
}

fn st_lr(name: &str, kind: &str, inputs: &[&str], gpus: u32, lr: f64) -> Arc<dyn Stage> {
    Arc::new(S {
        lr,
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

/// The same DAG where `attack.x` has a param a sweep varies.
fn variant(lr: f64) -> Pipeline {
    Pipeline::new(vec![
        st("fetch.a", "fetch", &[], 0),
        st("fetch.b", "fetch", &[], 0),
        st("data", "dataset", &["fetch.a", "fetch.b"], 0),
        st_lr("attack.x", "attack", &["data"], 1, lr),
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
    let arrays = group(&p, &pl, &env(), &opts(tmp.path()));
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
    let arrays = group(&p, &pl, &env(), &o);
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
    let arrays = group(&p, &pl, &env(), &opts(tmp.path()));
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
    assert!(c["command"][2].as_str().unwrap().contains("--remote s3://bucket/cache \"$@\""));
    assert!(c["command"][2].as_str().unwrap().contains(") set -- worker --stage attack.x"));
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

#[test]
fn variants_share_equal_stages_and_keep_their_own() {
    let (_d, store) = open_store();
    let ps: Vec<Pipeline> = [0.1, 0.2, 0.1].into_iter().map(variant).collect();
    let plans: Vec<_> = ps.iter().map(|p| plan(p, &store, &PlanOptions::new(env())).unwrap()).collect();
    let e = env();
    let sets = ["x=1", "x=2", "x=1"];
    let vps: Vec<VariantPlan<'_>> = ps
        .iter()
        .zip(&plans)
        .zip(sets)
        .map(|((p, pl), s)| VariantPlan { sets: vec![s.to_string()], pipeline: p, plan: pl, env: &e })
        .collect();
    // Identities: equal where the stage and everything upstream is equal, different below a change.
    let ids: Vec<Vec<wdro_cache::Digest>> = vps.iter().map(|v| identities(v.pipeline, v.plan, &e)).collect();
    assert_eq!(ids[0], ids[2]);
    assert_eq!(ids[0][..3], ids[1][..3], "fetch.a, fetch.b, data");
    let pos = |n: &str| ps[0].names().iter().position(|x| *x == n).unwrap();
    assert_ne!(ids[0][pos("attack.x")], ids[1][pos("attack.x")]);
    assert_eq!(ids[0][pos("attack.y")], ids[1][pos("attack.y")]);
    assert_ne!(ids[0][pos("report")], ids[1][pos("report")]);
    let tmp = tempfile::tempdir().unwrap();
    let arrays = group_variants(&vps, &opts(tmp.path()));
    let tasks: Vec<(String, usize)> =
        arrays.iter().flat_map(|a| a.tasks.iter().map(|t| (t.stage.clone(), t.variant))).collect();
    // 6 + 2 (attack.x and report of the second variant); the third variant adds nothing.
    assert_eq!(
        tasks,
        [
            ("fetch.a".to_string(), 0),
            ("fetch.b".into(), 0),
            ("data".into(), 0),
            ("attack.x".into(), 0),
            ("attack.y".into(), 0),
            ("attack.x".into(), 1),
            ("report".into(), 0),
            ("report".into(), 1)
        ]
    );
    let data = &arrays[1].tasks[0];
    assert_eq!(data.shared_with, [(1, "data".to_string()), (2, "data".to_string())]);
    let names: Vec<&str> = arrays.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["wdro-0-fetch", "wdro-1-dataset", "wdro-2-attack", "wdro-3-compare"]);
    assert_eq!(arrays[3].deps.iter().copied().collect::<Vec<_>>(), [2]);

    // The scripts pass each task's variant flags before `worker`, after the global ones.
    let mut o = opts(tmp.path());
    o.wdro_cmd = vec!["echo".into(), "--set".into(), "global=1".into()];
    o.env = vec![("LD_LIBRARY_PATH".into(), "/opt/torch lib".into())];
    let files = emit(&arrays, &o).unwrap();
    let attack = std::fs::read_to_string(&files[2]).unwrap();
    assert!(attack.lines().any(|l| l == "export LD_LIBRARY_PATH='/opt/torch lib'"), "{attack}");
    let run = |task: &str| {
        let out = std::process::Command::new("bash")
            .arg(&files[2])
            .env("SLURM_ARRAY_TASK_ID", task)
            .output()
            .expect("bash runs the script");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    assert_eq!(run("0"), "--set global=1 --set x=1 worker --stage attack.x");
    assert_eq!(run("2"), "--set global=1 --set x=2 worker --stage attack.x");
    // K8s: the same flags in the pod's command.
    let ko = K8sOptions {
        image: "wdro:latest".into(),
        namespace: None,
        config_text: String::new(),
        wdro_args: vec!["--remote".into(), "file:///r".into()],
        parallelism: 4,
        dir: tmp.path().join("k8s"),
    };
    let job = k8s::job(&arrays[2], &ko);
    let script = job["spec"]["template"]["spec"]["containers"][0]["command"][2].as_str().unwrap();
    assert!(script.contains("  2) set -- --set x=2 worker --stage attack.x ;;"), "{script}");
}

#[test]
fn a_cached_stage_is_not_submitted_in_any_variant() {
    use crate::exec::testing::FakeStage;
    use crate::exec::{execute, ExecOptions, NullObserver};
    let (_d, store) = open_store();
    let mk = |lr: f64| {
        Pipeline::new(vec![
            FakeStage::new("fetch").param("url", "http://x").build(),
            FakeStage::new("train").param("lr", lr).input("data", "fetch", "out").build(),
            FakeStage::new("eval").input("model", "train", "out").build(),
        ])
        .unwrap()
    };
    // Variant lr=1 already ran: its stages are cached, and fetch is cached for every variant.
    execute(&mk(1.0), &store, &ExecOptions::new(env(), "t"), &NullObserver).unwrap();
    let ps = [mk(1.0), mk(2.0), mk(3.0)];
    let plans: Vec<_> = ps.iter().map(|p| plan(p, &store, &PlanOptions::new(env())).unwrap()).collect();
    let e = env();
    let vps: Vec<VariantPlan<'_>> =
        ps.iter().zip(&plans).map(|(p, pl)| VariantPlan { sets: Vec::new(), pipeline: p, plan: pl, env: &e }).collect();
    let tmp = tempfile::tempdir().unwrap();
    let arrays = group_variants(&vps, &opts(tmp.path()));
    let tasks: Vec<(String, usize, bool)> =
        arrays.iter().flat_map(|a| a.tasks.iter().map(|t| (t.stage.clone(), t.variant, t.key.is_some()))).collect();
    // train has a known key (its input is cached); eval's is unknown until train finishes.
    assert_eq!(
        tasks,
        [
            ("train".to_string(), 1, true),
            ("train".into(), 2, true),
            ("eval".into(), 1, false),
            ("eval".into(), 2, false)
        ]
    );
    assert_eq!(arrays.len(), 2);
    assert_eq!(arrays[1].deps.iter().copied().collect::<Vec<_>>(), [0]);
}
