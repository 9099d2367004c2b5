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

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file())).unwrap_or(false)
}

/// A running throw-away cluster; stopped (jobs cancelled, daemons killed, dir removed) on drop.
struct Cluster {
    tmp: PathBuf,
}

impl Cluster {
    fn start() -> Option<Cluster> {
        let missing: Vec<&str> =
            ["slurmctld", "slurmd", "munged", "sbatch", "squeue"].into_iter().filter(|b| !on_path(b)).collect();
        if !missing.is_empty() {
            eprintln!(
                "SKIPPED slurm_cluster: {} not found on PATH; install with scripts/setup-test-servers.sh (Debian slurmctld slurmd slurm-client munge)",
                missing.join(", ")
            );
            return None;
        }
        let tmp = tempfile::Builder::new().prefix("wdro-slurm-").tempdir().unwrap().keep();
        let c = Cluster { tmp };
        let out = Command::new(script("slurm-up.sh"))
            .env("SLURM_TMP", &c.tmp)
            .env("SLURM_NODE_CPUS", "8")
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

    fn conf(&self) -> PathBuf {
        self.tmp.join("etc/slurm.conf")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(script("slurm-down.sh")).env("SLURM_TMP", &self.tmp).status();
    }
}

fn script(name: &str) -> PathBuf {
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
