//! `wdro run --executor slurm` against a real single-node Slurm (munge + slurmctld + slurmd),
//! started by this test from `scripts/slurm-up.sh` under a temp dir on loopback with random
//! ports, and always stopped by `scripts/slurm-down.sh` (a Drop guard). A directory remote is the
//! only coordination point. Skipped, with the reason printed, only when the Slurm or munge
//! binaries are missing (`scripts/setup-test-servers.sh` installs them).
//!
//! Scenario: four `fetch` stages, one of whose sources is missing at first. The run submits one
//! array; the broken task fails, is resubmitted (`retries = 1`), fails again and is reported with
//! its Slurm log; the three others are computed once each. With the file restored, a rerun
//! submits only the missing stage. A third run submits nothing. Every stage was computed exactly
//! once (the remote's run records), and the keys and outputs equal a local run's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::util::{blake3_hex, events, of_kind, Dir};

pub(crate) fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file())).unwrap_or(false)
}

/// A running throw-away cluster; stopped (jobs cancelled, daemons killed, dir removed) on drop.
pub(crate) struct Cluster {
    pub(crate) tmp: PathBuf,
}

impl Cluster {
    fn start() -> Option<Cluster> {
        Cluster::start_named("slurm_cluster", 8)
    }

    /// Starts a cluster advertising `cpus` CPUs, or prints why `test` is skipped and returns None.
    pub(crate) fn start_named(test: &str, cpus: u32) -> Option<Cluster> {
        let missing: Vec<&str> =
            ["slurmctld", "slurmd", "munged", "sbatch", "squeue"].into_iter().filter(|b| !on_path(b)).collect();
        if !missing.is_empty() {
            eprintln!(
                "SKIPPED {test}: {} not found on PATH; install with scripts/setup-test-servers.sh (Debian slurmctld slurmd slurm-client munge)",
                missing.join(", ")
            );
            return None;
        }
        let tmp = tempfile::Builder::new().prefix("wdro-slurm-").tempdir().unwrap().keep();
        let c = Cluster { tmp };
        let out = Command::new(script("slurm-up.sh"))
            .env("SLURM_TMP", &c.tmp)
            .env("SLURM_NODE_CPUS", cpus.to_string())
            .output()
            .expect("run slurm-up.sh");
        assert!(
            out.status.success(),
            "slurm-up.sh failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Some(c)
    }

    pub(crate) fn conf(&self) -> PathBuf {
        self.tmp.join("etc/slurm.conf")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(script("slurm-down.sh")).env("SLURM_TMP", &self.tmp).status();
    }
}

pub(crate) fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name)
}

fn sources() -> Vec<Vec<u8>> {
    (0..4).map(|i| format!("slurm file {i}\n").repeat(50 + i).into_bytes()).collect()
}

fn project(remote: Option<&Path>) -> Dir {
    let d = Dir::new();
    let mut cfg = String::new();
    for (i, b) in sources().iter().enumerate() {
        d.write(&format!("src/f{i}.bin"), b);
        cfg.push_str(&format!(
            "[fetch.f{i}]\nsources = [\"file:src/f{i}.bin\"]\ndigest = \"blake3:{}\"\n\n",
            blake3_hex(b)
        ));
    }
    if let Some(r) = remote {
        cfg.push_str(&format!("[remote]\nurl = \"file://{}\"\n\n[slurm]\nretries = 1\n", r.display()));
    }
    d.write("wdro.toml", cfg);
    d
}

/// `wdro --json run --executor slurm`, bounded by `timeout`.
fn slurm_run(d: &Dir, c: &Cluster, code: i32) -> (Vec<serde_json::Value>, String) {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", "180", env!("CARGO_BIN_EXE_wdro"), "--json", "run", "--executor", "slurm"])
        .current_dir(d.path())
        .env("SLURM_CONF", c.conf())
        .env("NO_COLOR", "1");
    let out = cmd.output().expect("run wdro");
    let (so, se) = (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
    assert_eq!(out.status.code(), Some(code), "stdout:\n{so}\nstderr:\n{se}");
    (events(&so), se)
}

fn computed(ev: &[serde_json::Value]) -> Vec<String> {
    let mut v: Vec<String> = of_kind(ev, "stage_finished")
        .into_iter()
        .filter(|e| e["hit"] == false)
        .map(|e| e["stage"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// Stage key → times computed, from the remote's run records (each job that computed a stage
/// pushes a run record naming it).
pub(crate) fn computed_keys_on_remote(remote: &Path) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(remote.join("runs")) else { return m };
    for f in dir {
        let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(f.unwrap().path()).unwrap()).unwrap();
        let keys: std::collections::BTreeMap<&str, &str> = rec["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_str().unwrap(), p[1].as_str().unwrap()))
            .collect();
        for s in rec["computed"].as_array().unwrap() {
            let key = keys.get(s.as_str().unwrap()).expect("a computed stage is listed with its key");
            *m.entry(key.to_string()).or_default() += 1;
        }
    }
    m
}

/// Stage name → times computed, from the remote's run records.
fn computed_on_remote(remote: &Path) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for f in std::fs::read_dir(remote.join("runs")).unwrap() {
        let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(f.unwrap().path()).unwrap()).unwrap();
        for s in rec["computed"].as_array().unwrap() {
            *m.entry(s.as_str().unwrap().to_string()).or_default() += 1;
        }
    }
    m
}

#[test]
fn slurm_executor_on_a_real_cluster() {
    let t0 = Instant::now();
    let Some(cluster) = Cluster::start() else { return };
    let remote_dir = tempfile::tempdir().unwrap();
    let remote = remote_dir.path().join("remote");
    let d = project(Some(&remote));
    let f3 = std::fs::read(d.path().join("src/f3.bin")).unwrap();
    std::fs::remove_file(d.path().join("src/f3.bin")).unwrap();

    // 1. One array of four tasks; f3 fails twice (retries = 1) and is reported with its log.
    let (ev, err) = slurm_run(&d, &cluster, 4);
    assert_eq!(computed(&ev), ["fetch.f0", "fetch.f1", "fetch.f2"], "{ev:?}\n{err}");
    let failed = of_kind(&ev, "stage_failed");
    assert_eq!(failed.len(), 1, "{ev:?}");
    assert_eq!(failed[0]["stage"], "fetch.f3");
    let msg = failed[0]["error"].as_str().unwrap();
    assert!(msg.contains("after 2 attempt(s)") && msg.contains("log: "), "{msg}");
    let log = PathBuf::from(msg.rsplit("log: ").next().unwrap());
    let log_text = std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    assert!(log_text.contains("f3.bin"), "the log names the missing source:\n{log_text}");
    assert!(err.contains("resubmitting"), "{err}");

    // 2. The source restored: a rerun submits only the missing stage.
    std::fs::write(d.path().join("src/f3.bin"), &f3).unwrap();
    let (ev, err) = slurm_run(&d, &cluster, 0);
    assert_eq!(computed(&ev), ["fetch.f3"], "{ev:?}\n{err}");

    // 3. Nothing left: nothing submitted, nothing computed.
    let (ev, _) = slurm_run(&d, &cluster, 0);
    assert!(computed(&ev).is_empty(), "{ev:?}");

    // Each stage computed exactly once across all jobs.
    let once = computed_on_remote(&remote);
    assert_eq!(once.len(), 4, "{once:?}");
    assert!(once.values().all(|&n| n == 1), "{once:?}");

    // The same keys and bytes as a local run.
    let local = project(None);
    let lev = events(&local.wdro().args(["--json", "run"]).ok());
    for e in of_kind(&lev, "stage_finished") {
        let key = e["key"].as_str().unwrap();
        let manifest = remote.join("manifests").join(&key[..2]).join(format!("{key}.json"));
        let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
        let i: usize = e["stage"].as_str().unwrap().trim_start_matches("fetch.f").parse().unwrap();
        assert_eq!(
            rec["outputs"]["file"]["digest"].as_str().unwrap().trim_start_matches("blake3:"),
            blake3_hex(&sources()[i])
        );
    }
    drop(cluster);
    eprintln!("slurm_cluster: {:.1} s including cluster start and stop", t0.elapsed().as_secs_f64());
}

/// A DNS-1123 label (Job, container and volume names).
fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A Kubernetes resource quantity (`2`, `500m`, `64Mi`, `1.5Gi`).
fn quantity(s: &str) -> bool {
    let num_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, suffix) = s.split_at(num_end);
    !num.is_empty()
        && num.parse::<f64>().is_ok()
        && ["", "m", "k", "M", "G", "T", "Ki", "Mi", "Gi", "Ti"].contains(&suffix)
}

/// The keys an object may have (a structural check in the spirit of `kubernetes-validate --strict`).
fn only_keys(v: &serde_json::Value, allowed: &[&str], at: &str) {
    for k in v.as_object().unwrap_or_else(|| panic!("{at} is not an object: {v}")).keys() {
        assert!(allowed.contains(&k.as_str()), "unexpected field {at}.{k}");
    }
}

/// Schema-level checks of one Indexed Job (batch/v1) as `--executor k8s` writes it. Returns the
/// pod's shell script.
fn check_indexed_job(j: &serde_json::Value, want_gpus: bool) -> String {
    only_keys(j, &["apiVersion", "kind", "metadata", "spec"], "job");
    assert_eq!(j["apiVersion"], "batch/v1");
    assert_eq!(j["kind"], "Job");
    only_keys(&j["metadata"], &["name", "namespace", "labels"], "metadata");
    let name = j["metadata"]["name"].as_str().unwrap();
    assert!(dns_label(name), "metadata.name {name:?}");
    for (k, v) in j["metadata"]["labels"].as_object().unwrap() {
        assert!(v.is_string() && k.len() <= 253, "label {k}: {v}");
    }
    let spec = &j["spec"];
    only_keys(spec, &["completionMode", "completions", "parallelism", "backoffLimit", "template"], "spec");
    assert_eq!(spec["completionMode"], "Indexed");
    let completions = spec["completions"].as_u64().expect("spec.completions is an integer");
    let parallelism = spec["parallelism"].as_u64().expect("spec.parallelism is an integer");
    assert!(completions >= 1 && (1..=completions).contains(&parallelism), "{spec}");
    assert!(spec["backoffLimit"].is_u64());
    only_keys(&spec["template"], &["metadata", "spec"], "spec.template");
    let pod = &spec["template"]["spec"];
    only_keys(pod, &["restartPolicy", "containers", "volumes"], "pod");
    assert!(["Never", "OnFailure"].contains(&pod["restartPolicy"].as_str().unwrap()), "{pod}");
    let volumes: Vec<&str> = pod["volumes"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    let containers = pod["containers"].as_array().unwrap();
    assert!(!containers.is_empty());
    let c = &containers[0];
    only_keys(c, &["name", "image", "command", "envFrom", "env", "resources", "volumeMounts"], "container");
    assert!(dns_label(c["name"].as_str().unwrap()));
    assert!(!c["image"].as_str().unwrap().is_empty());
    let cmd = c["command"].as_array().expect("command is a list");
    assert!(cmd.iter().all(|a| a.is_string()) && !cmd.is_empty());
    only_keys(&c["resources"], &["requests", "limits"], "resources");
    for part in ["requests", "limits"] {
        if let Some(m) = c["resources"][part].as_object() {
            for (k, v) in m {
                assert!(quantity(v.as_str().expect("a quantity is a string")), "resources.{part}.{k} = {v}");
            }
        }
    }
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"].is_string(), want_gpus, "{}", c["resources"]);
    // The remote's credentials: an optional Secret as environment.
    let secret = &c["envFrom"][0]["secretRef"];
    assert_eq!(secret["name"], "wdro-remote");
    for m in c["volumeMounts"].as_array().unwrap() {
        assert!(volumes.contains(&m["name"].as_str().unwrap()), "volumeMount {m} names no volume");
    }
    cmd.last().unwrap().as_str().unwrap().to_string()
}

/// Splits a manifest file into its documents (each JSON, hence YAML).
fn documents(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .split("\n---\n")
        .map(|d| d.trim().trim_start_matches("---").trim())
        .filter(|d| !d.is_empty())
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}

#[test]
fn k8s_manifests_pass_schema_checks() {
    let d = project(None);
    let mut cfg = std::fs::read_to_string(d.path().join("wdro.toml")).unwrap();
    cfg.push_str("[slurm.kinds.fetch]\ngpus = 1\nmem = \"2G\"\n");
    d.write("wdro.toml", cfg);
    let out = d.path().join("k8s");
    let so = d
        .wdro()
        .args(["--remote", "s3://team/cache", "run", "--executor", "k8s", "--image", "reg/wdro:1", "--emit"])
        .args([&out])
        .ok();
    assert!(so.contains("wave-000.yaml"), "{so}");
    let cm = documents(&out.join("config.yaml"));
    assert_eq!(cm[0]["apiVersion"], "v1");
    assert_eq!(cm[0]["kind"], "ConfigMap");
    assert!(cm[0]["data"]["config.toml"].as_str().unwrap().contains("[fetch.f0]"));
    let jobs = documents(&out.join("wave-000.yaml"));
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["spec"]["completions"], 4);
    assert_eq!(jobs[0]["spec"]["template"]["spec"]["containers"][0]["image"], "reg/wdro:1");
    assert_eq!(jobs[0]["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"], "2Gi");
    let script = check_indexed_job(&jobs[0], true);
    // The pod's script picks the stage by JOB_COMPLETION_INDEX and runs the worker with the remote.
    let bin = tempfile::tempdir().unwrap();
    let fake = bin.path().join("wdro");
    std::fs::write(&fake, "#!/bin/sh\necho \"$@\"\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!("{}:{}", bin.path().display(), std::env::var("PATH").unwrap_or_default());
    let run = |i: &str| {
        let o = Command::new("sh").args(["-c", &script]).env("JOB_COMPLETION_INDEX", i).env("PATH", &path).output();
        o.unwrap()
    };
    let o = run("2");
    let line = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{line}{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        line.starts_with("--config /etc/wdro/config.toml --remote s3://team/cache worker --stage fetch.f2 --key "),
        "{line}"
    );
    assert!(!run("4").status.success(), "an index beyond completions fails");

    // A sweep emits one set of manifests, each stage the variants share once; no GPU requested
    // without the override.
    let d2 = project(None);
    d2.write("wdro.toml", std::fs::read_to_string(d.path().join("wdro.toml")).unwrap().replace("gpus = 1\n", ""));
    let out2 = d2.path().join("k8s");
    d2.wdro()
        .args(["--remote", "s3://team/cache", "run", "--sweep", "run.name=a,b", "--executor", "k8s", "--emit"])
        .args([&out2])
        .ok();
    let jobs = documents(&out2.join("wave-000.yaml"));
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["spec"]["completions"], 4, "the fetches are shared by both variants");
    let script = check_indexed_job(&jobs[0], false);
    assert!(script.contains("set -- --set run.name=a worker --stage fetch.f0"), "{script}");
}
