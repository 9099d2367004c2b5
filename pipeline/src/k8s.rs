//! `--executor k8s --emit DIR`: Kubernetes Indexed Job manifests, one file per wave.
//!
//! The same grouping as Slurm ([`crate::slurm::group`]): each job array becomes an Indexed Job
//! (`completionMode: Indexed`, `completions` = its stages) whose pod picks its stage from
//! `JOB_COMPLETION_INDEX` and runs `wdro worker`. Kubernetes has no job dependencies, so the
//! waves are separate files (`wave-000.yaml`, …) to apply one after the other (`kubectl apply
//! -f wave-000.yaml && kubectl wait --for=condition=complete job -l wdro/wave=0 …`). The config
//! snapshot is a ConfigMap mounted at `/etc/wdro`; remote credentials come from the optional
//! Secret `wdro-remote` (as environment, e.g. `AWS_ACCESS_KEY_ID`).
//!
//! Each document is written as JSON, which is YAML (1.2 is a superset of JSON), so the files
//! are valid YAML for `kubectl apply` without a YAML serializer.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::slurm::{shell_quote, JobArray};

/// What the manifests need besides the arrays.
#[derive(Clone, Debug)]
pub struct K8sOptions {
    pub image: String,
    pub namespace: Option<String>,
    /// The config text, stored in the ConfigMap `wdro-config` as `config.toml`.
    pub config_text: String,
    /// Global flags after `wdro`, without `--config` (the snapshot is added): `--remote URL`, …
    pub wdro_args: Vec<String>,
    /// Pods running at once per Job.
    pub parallelism: u32,
    pub dir: PathBuf,
}

/// DNS-1123 label: lower case, `-`, at most 63 characters.
fn label(s: &str) -> String {
    let mut l: String =
        s.to_ascii_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    l.truncate(63);
    l.trim_matches('-').to_string()
}

/// The Indexed Job of one array.
pub fn job(a: &JobArray, opts: &K8sOptions) -> Value {
    let mut script = String::from("set -eu\ncase \"$JOB_COMPLETION_INDEX\" in\n");
    for (i, t) in a.tasks.iter().enumerate() {
        let key = t.key.map(|k| format!(" --key {k}")).unwrap_or_default();
        // A sweep variant's `--set` flags go before `worker`, after the global ones, so they win.
        let sets: String = t.sets.iter().map(|x| format!("--set {} ", shell_quote(x))).collect();
        script.push_str(&format!("  {i}) set -- {sets}worker --stage {}{key} ;;\n", shell_quote(&t.stage)));
    }
    script.push_str("  *) echo \"no task $JOB_COMPLETION_INDEX\" >&2; exit 2 ;;\nesac\n");
    let args: Vec<String> = opts.wdro_args.iter().map(|a| shell_quote(a)).collect();
    script.push_str(&format!("exec wdro --config /etc/wdro/config.toml {} \"$@\"\n", args.join(" ")));
    let r = &a.resources;
    let mut requests = serde_json::Map::new();
    requests.insert("cpu".into(), json!(r.cpus.max(1).to_string()));
    if let Some(m) = &r.mem {
        requests.insert("memory".into(), json!(k8s_mem(m)));
    }
    let mut limits = serde_json::Map::new();
    if r.gpus > 0 {
        limits.insert("nvidia.com/gpu".into(), json!(r.gpus.to_string()));
    }
    let mut resources = serde_json::Map::new();
    resources.insert("requests".into(), Value::Object(requests));
    if !limits.is_empty() {
        resources.insert("limits".into(), Value::Object(limits));
    }
    let mut metadata = json!({
        "name": label(&a.name),
        "labels": {"app.kubernetes.io/name": "wdro", "wdro/wave": a.wave.to_string(), "wdro/kind": label(&a.kind)}
    });
    if let Some(ns) = &opts.namespace {
        metadata["namespace"] = json!(ns);
    }
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "completionMode": "Indexed",
            "completions": a.tasks.len(),
            "parallelism": (a.tasks.len() as u32).min(opts.parallelism.max(1)),
            "backoffLimit": 2 * a.tasks.len(),
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "wdro", "wdro/wave": a.wave.to_string()}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "stage",
                        "image": opts.image,
                        "command": ["/bin/sh", "-c", script],
                        "envFrom": [{"secretRef": {"name": "wdro-remote", "optional": true}}],
                        "resources": Value::Object(resources),
                        "volumeMounts": [{"name": "config", "mountPath": "/etc/wdro", "readOnly": true}]
                    }],
                    "volumes": [{"name": "config", "configMap": {"name": "wdro-config"}}]
                }
            }
        }
    })
}

/// `16G` → `16Gi`, `4000M` → `4000Mi`; anything else unchanged.
fn k8s_mem(m: &str) -> String {
    match m.chars().last() {
        Some(c @ ('K' | 'M' | 'G' | 'T')) if m[..m.len() - 1].chars().all(|d| d.is_ascii_digit()) => {
            format!("{}{c}i", &m[..m.len() - 1])
        }
        _ => m.to_string(),
    }
}

/// The ConfigMap holding the config snapshot.
pub fn config_map(opts: &K8sOptions) -> Value {
    let mut metadata = json!({"name": "wdro-config", "labels": {"app.kubernetes.io/name": "wdro"}});
    if let Some(ns) = &opts.namespace {
        metadata["namespace"] = json!(ns);
    }
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": {"config.toml": opts.config_text}})
}

/// Writes `config.yaml` (the ConfigMap) and `wave-NNN.yaml` (that wave's Jobs). Returns the paths.
pub fn emit(arrays: &[JobArray], opts: &K8sOptions) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(&opts.dir)?;
    let mut written = Vec::new();
    let doc = |v: &Value| serde_json::to_string_pretty(v).expect("JSON values serialize");
    let path = opts.dir.join("config.yaml");
    std::fs::write(&path, format!("{}\n", doc(&config_map(opts))))?;
    written.push(path);
    let mut waves: BTreeMap<usize, Vec<&JobArray>> = BTreeMap::new();
    for a in arrays {
        waves.entry(a.wave).or_default().push(a);
    }
    for (w, arrays) in waves {
        let docs: Vec<String> = arrays.iter().map(|a| doc(&job(a, opts))).collect();
        let path = opts.dir.join(format!("wave-{w:03}.yaml"));
        std::fs::write(&path, format!("---\n{}\n", docs.join("\n---\n")))?;
        written.push(path);
    }
    Ok(written)
}
