//! The demo pipeline and fault scenarios through a real single-node Slurm (see
//! `tests/slurm_cluster.rs` for the cluster), with a directory remote as the only coordination
//! point. Skipped, with the reason printed, only when the Slurm or munge binaries are missing.
//!
//! * `slurm_sweep_of_the_demo`: the demo at a reduced size, as a 2 × 2 sweep
//!   (`finetune.beta=1,6` × `finetune.lr=0.01,0.02`) in one submission. Every stage is computed
//!   exactly once across the sweep (counted per key from the remote's run records), the stages
//!   shared by the variants are one task each, and every variant's keys and output digests equal
//!   a local-executor sweep's, every output included (wall-clock timings live only in the stage
//!   records' metrics, never in an output). Then an overlapping sweep (`beta=6,9`, `lr=0.01`)
//!   submits and computes only the stages of the new variant.
//! * `slurm_cancelled_task_and_killed_client`: a fetch from a local HTTP server that answers
//!   slowly keeps one array task running; the test `scancel`s it, the client resubmits it and
//!   rewrites the dependency of the `data.train` job waiting on it, and the run completes with every
//!   stage computed once and a clean remote. Then the client itself is SIGKILLed mid-run; a rerun
//!   submits only what is still missing.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::slurm_cluster::{computed_keys_on_remote, Cluster};
use crate::util::{events, of_kind, Dir};

/// The demo at a size that runs a 2 × 2 sweep through Slurm in a few minutes on 2 cores: 1,000
/// training and 100 test images, one epoch, one δ, W-PGD (W2) only, APGD-CE, few iterations.
const SMALL: &[&str] = &[
    "data.train_limit=1000",
    "data.test_limit=100",
    "model.train.epochs=1",
    "upsilon.losses=[\"ce\"]",
    "attacks.itr=2",
    "attacks.deltas=[\"16/255\"]",
    "attacks.q=[2]",
    "attacks.kinds=[\"w-pgd\"]",
    "attacks.pointwise=[\"apgd-ce\"]",
    "finetune.epochs=1",
    "finetune.inner_steps=1",
    "finetune.monitor_itr=1",
];

const SWEEP: &[&str] = &["--sweep", "finetune.beta=1,6", "--sweep", "finetune.lr=0.01,0.02"];

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".data")
}

/// A project with the demo config (absolute data paths) and, optionally, a directory remote.
fn demo(remote: Option<&Path>, edit: impl Fn(String) -> String) -> Dir {
    let d = Dir::new();
    let root = env!("CARGO_MANIFEST_DIR");
    assert!(data_dir().join("fashion-mnist").exists(), "offline data missing: run scripts/setup.sh first");
    let mut cfg = std::fs::read_to_string(format!("{root}/configs/demo.toml")).unwrap();
    cfg = cfg.replace("file:.data/", &format!("file:{root}/.data/"));
    cfg = edit(cfg);
    if let Some(r) = remote {
        cfg.push_str(&format!("\n[remote]\nurl = \"file://{}\"\n\n[slurm]\nretries = 2\n", r.display()));
    }
    d.write("wdro.toml", cfg);
    d
}

fn small_args() -> Vec<String> {
    SMALL.iter().flat_map(|s| ["--set".to_string(), s.to_string()]).collect()
}

/// `wdro --json <SMALL> run <args>` in `d` (on `cluster` when given), bounded by `secs`.
fn wdro_run(d: &Dir, cluster: Option<&Cluster>, args: &[&str], secs: u32) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", &secs.to_string(), env!("CARGO_BIN_EXE_wdro"), "--json"])
        .args(small_args())
        .arg("run")
        .args(args)
        .current_dir(d.path())
        .env("NO_COLOR", "1")
        .env_remove("WDRO_WORKER");
    if let Some(c) = cluster {
        cmd.env("SLURM_CONF", c.conf());
    }
    cmd
}

fn ok(mut cmd: Command) -> (Vec<serde_json::Value>, String) {
    let out = cmd.output().expect("run wdro");
    let (so, se) = (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
    assert_eq!(out.status.code(), Some(0), "{cmd:?}\nstdout:\n{so}\nstderr:\n{se}");
    (events(&so), se)
}

/// Variant label → (stage → key), from the `sweep_summary` event.
fn variant_keys(ev: &[serde_json::Value]) -> BTreeMap<String, BTreeMap<String, String>> {
    let s = of_kind(ev, "sweep_summary");
    assert_eq!(s.len(), 1, "{ev:?}");
    s[0]["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let stages = v["stages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_str().unwrap().to_string()))
                .collect();
            (v["label"].as_str().unwrap().to_string(), stages)
        })
        .collect()
}

fn plain(key: &str) -> String {
    key.trim_start_matches("blake3:").to_string()
}

/// Output name → digest, from the remote's manifest of `key`.
fn outputs(remote: &Path, key: &str) -> BTreeMap<String, String> {
    let k = plain(key);
    let path = remote.join("manifests").join(&k[..2]).join(format!("{k}.json"));
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap();
    rec["outputs"].as_object().unwrap().iter().map(|(n, o)| (n.clone(), o["digest"].as_str().unwrap().into())).collect()
}

fn all_keys(v: &BTreeMap<String, BTreeMap<String, String>>) -> BTreeSet<String> {
    v.values().flat_map(|s| s.values().map(|k| plain(k))).collect()
}

#[test]
fn slurm_sweep_of_the_demo() {
    let t0 = Instant::now();
    let Some(cluster) = Cluster::start_named("slurm_sweep_of_the_demo", 4) else { return };
    let remote_dir = tempfile::tempdir().unwrap();
    let remote = remote_dir.path().join("remote");
    let d = demo(Some(&remote), |c| c);

    // 1. The 2 × 2 sweep in one Slurm submission.
    let mut args: Vec<&str> = SWEEP.to_vec();
    args.extend(["--executor", "slurm"]);
    let (ev, err) = ok(wdro_run(&d, Some(&cluster), &args, 900));
    let t_slurm = t0.elapsed();
    let sub = of_kind(&ev, "sweep_submit");
    assert_eq!(sub.len(), 1, "{ev:?}\n{err}");
    let keys = variant_keys(&ev);
    assert_eq!(keys.len(), 4, "{keys:?}");
    let union = all_keys(&keys);
    // One task per distinct key: shared stages were submitted once, not once per variant.
    assert_eq!(sub[0]["tasks"].as_u64().unwrap() as usize, union.len(), "{:?}", sub[0]);
    let stages_per_variant = keys.values().next().unwrap().len();
    assert!(union.len() < 4 * stages_per_variant, "the variants share upstream stages");
    assert!(sub[0]["shared_tasks"].as_u64().unwrap() > 0, "{:?}", sub[0]);
    // Every stage of every variant was computed exactly once, by some job.
    let once = computed_keys_on_remote(&remote);
    assert_eq!(once.keys().cloned().collect::<BTreeSet<_>>(), union, "{once:?}");
    assert!(once.values().all(|&n| n == 1), "computed more than once: {once:?}");
    // Shared upstream stages have one key across the variants.
    let train: BTreeSet<&String> = keys.values().map(|s| &s["checkpoint.pretrained"]).collect();
    assert_eq!(train.len(), 1, "{keys:?}");
    let ft: BTreeSet<&String> = keys.values().map(|s| &s["finetune"]).collect();
    assert_eq!(ft.len(), 4, "{keys:?}");

    // 2. The same sweep with the local executor (its own cache and remote): same keys, same bytes.
    let local_remote = remote_dir.path().join("local-remote");
    let local = demo(Some(&local_remote), |c| c);
    let (lev, _) = ok(wdro_run(&local, None, SWEEP, 900));
    let t_local = t0.elapsed() - t_slurm;
    let lkeys = variant_keys(&lev);
    // Every key and every output byte equal, the evaluation tables and the report included:
    // timings are kept out of content-addressed outputs (see `worker_stage::without_timings`).
    assert_eq!(lkeys.keys().collect::<Vec<_>>(), keys.keys().collect::<Vec<_>>());
    let mut compared = 0;
    for (label, stages) in &keys {
        let local_stages = &lkeys[label];
        assert_eq!(local_stages.keys().collect::<Vec<_>>(), stages.keys().collect::<Vec<_>>(), "{label}");
        for (stage, key) in stages {
            assert_eq!(&local_stages[stage], key, "{label}: key of {stage}");
            assert_eq!(outputs(&remote, key), outputs(&local_remote, key), "{label}: outputs of {stage}");
            compared += 1;
        }
    }
    assert!(compared > 4 * 20, "{compared}");

    // 3. An overlapping sweep: beta=6, lr=0.01 exists; only beta=9's own stages are new.
    let t2 = Instant::now();
    let (ev2, err2) = ok(wdro_run(
        &d,
        Some(&cluster),
        &["--sweep", "finetune.beta=6,9", "--sweep", "finetune.lr=0.01", "--executor", "slurm"],
        600,
    ));
    let keys2 = variant_keys(&ev2);
    let new: BTreeSet<String> = all_keys(&keys2).difference(&union).cloned().collect();
    assert!(!new.is_empty() && new.len() < stages_per_variant, "{new:?}");
    let sub2 = of_kind(&ev2, "sweep_submit");
    assert_eq!(sub2[0]["tasks"].as_u64().unwrap() as usize, new.len(), "{:?}\n{err2}", sub2[0]);
    let once2 = computed_keys_on_remote(&remote);
    assert!(once2.values().all(|&n| n == 1), "computed more than once: {once2:?}");
    let computed2: BTreeSet<String> = once2.keys().filter(|k| !once.contains_key(*k)).cloned().collect();
    assert_eq!(computed2, new, "only the new variant's stages were computed");
    // The jobs' events name only new stages as computed.
    for e in of_kind(&ev2, "stage_finished").into_iter().filter(|e| e["hit"] == false) {
        let s = e["stage"].as_str().unwrap();
        assert!(s == "finetune" || s == "report" || s.contains("finetuned"), "{s} recomputed: {ev2:?}");
    }
    drop(cluster);
    eprintln!(
        "slurm_sweep_of_the_demo: {} distinct stages for 4 variants ({} per variant); slurm sweep {:.1} s, local sweep {:.1} s, overlapping sweep {:.1} s ({} new stages); total {:.1} s",
        union.len(),
        stages_per_variant,
        t_slurm.as_secs_f64(),
        t_local.as_secs_f64(),
        t2.elapsed().as_secs_f64(),
        new.len(),
        t0.elapsed().as_secs_f64()
    );
}

/// A loopback HTTP server that waits `delay` before each answer and counts requests. It serves
/// `body`, or `body` reversed for a path containing `other`.
struct SlowServer {
    port: u16,
    requests: Arc<AtomicUsize>,
}

impl SlowServer {
    fn start(body: Vec<u8>, delay: Duration) -> SlowServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        let body = Arc::new(body);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let (count, body) = (count.clone(), body.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let mut req = Vec::new();
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(delay);
                    let first = String::from_utf8_lossy(&req).lines().next().unwrap_or("").to_string();
                    let body: Vec<u8> =
                        if first.contains("other") { body.iter().rev().copied().collect() } else { body.to_vec() };
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes());
                    let _ = s.write_all(&body);
                });
            }
        });
        SlowServer { port, requests }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(secs), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn squeue(c: &Cluster, args: &[&str]) -> String {
    let out = Command::new("squeue").args(args).env("SLURM_CONF", c.conf()).output().unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The job id and task index of the running task that computes `stage`, from the submission's
/// scripts under `<cache>/slurm/` and squeue.
fn running_task(d: &Dir, c: &Cluster, stage: &str) -> Option<String> {
    let base = d.path().join(".wdro/cache/slurm");
    for sub in std::fs::read_dir(&base).ok()? {
        let sub = sub.ok()?.path();
        for f in std::fs::read_dir(&sub).ok()? {
            let f = f.ok()?.path();
            if f.extension().is_none_or(|e| e != "sbatch") {
                continue;
            }
            let text = std::fs::read_to_string(&f).ok()?;
            let name = text.lines().find_map(|l| l.strip_prefix("#SBATCH --job-name="))?.to_string();
            let Some(idx) = text
                .lines()
                .find(|l| l.contains(&format!("--stage {stage} ")) || l.ends_with(&format!("--stage {stage}) ;;")))
                .and_then(|l| l.trim().split(')').next())
            else {
                continue;
            };
            for line in squeue(c, &["-h", "-r", "-n", &name, "-t", "R", "-o", "%F|%K"]).lines() {
                let (job, task) = line.trim().split_once('|')?;
                if task == idx {
                    return Some(format!("{job}_{task}"));
                }
            }
        }
    }
    None
}

/// True while the client runs; its output if it ended early.
fn alive(c: &mut Child, log: &Path) -> bool {
    if let Some(st) = c.try_wait().unwrap() {
        let so = std::fs::read_to_string(log.with_extension("out")).unwrap_or_default();
        let se = std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
        panic!("the client ended early ({st}):\n{so}\n{se}");
    }
    true
}

fn spawn(mut cmd: Command, log: &Path) -> Child {
    let out = std::fs::File::create(log.with_extension("out")).unwrap();
    let err = std::fs::File::create(log.with_extension("err")).unwrap();
    cmd.stdout(Stdio::from(out)).stderr(Stdio::from(err)).spawn().unwrap()
}

#[test]
fn slurm_cancelled_task_and_killed_client() {
    let t0 = Instant::now();
    let Some(cluster) = Cluster::start_named("slurm_cancelled_task_and_killed_client", 8) else { return };
    let labels = std::fs::read(data_dir().join("fashion-mnist/train-labels-idx1-ubyte.gz")).unwrap();
    let other: Vec<u8> = labels.iter().rev().copied().collect();
    let server = SlowServer::start(labels, Duration::from_secs(4));
    let remote_dir = tempfile::tempdir().unwrap();
    let remote = remote_dir.path().join("remote");
    let port = server.port;
    let url = move |round: u32| format!("http://127.0.0.1:{port}/train-labels-idx1-ubyte.gz?round={round}");
    let project = |round: u32| {
        let u = url(round);
        demo(Some(&remote), move |c| {
            c.replace(
                &format!(
                    "sources = [\"file:{}/.data/fashion-mnist/train-labels-idx1-ubyte.gz\"]",
                    env!("CARGO_MANIFEST_DIR")
                ),
                &format!("sources = [\"{u}\"]"),
            )
        })
    };
    let d = project(1);
    assert!(std::fs::read_to_string(d.path().join("wdro.toml")).unwrap().contains("?round=1"));
    let logs = tempfile::tempdir().unwrap();

    // 1. scancel the running fetch task: the client resubmits it and the data.train job still runs.
    let mut client = spawn(
        wdro_run(&d, Some(&cluster), &["--until", "data.train", "--executor", "slurm"], 300),
        &logs.path().join("c1"),
    );
    wait_until("the slow fetch to start", 120, || {
        alive(&mut client, &logs.path().join("c1")) && server.requests() >= 1
    });
    let mut task = None;
    wait_until("the fetch task to show as running", 30, || {
        task = running_task(&d, &cluster, "fetch.train_labels");
        task.is_some()
    });
    let task = task.unwrap();
    let st = Command::new("scancel").arg(&task).env("SLURM_CONF", cluster.conf()).status().unwrap();
    assert!(st.success());
    let status = client.wait().unwrap();
    let so = std::fs::read_to_string(logs.path().join("c1.out")).unwrap();
    let se = std::fs::read_to_string(logs.path().join("c1.err")).unwrap();
    assert!(status.success(), "client failed after scancel {task}:\n{so}\n{se}");
    assert!(se.contains("CANCELLED; resubmitting"), "{se}");
    assert!(server.requests() >= 2, "the fetch ran again");
    let ev = events(&so);
    let done: BTreeSet<&str> = of_kind(&ev, "stage_finished").iter().map(|e| e["stage"].as_str().unwrap()).collect();
    assert!(done.contains("data.train") && done.contains("fetch.train_labels"), "{ev:?}");
    let once = computed_keys_on_remote(&remote);
    assert_eq!(once.len(), 3, "two fetches and the training set: {once:?}");
    assert!(once.values().all(|&n| n == 1), "{once:?}");
    // Nothing partial on the remote: every blob verifies, every manifest is complete.
    let v = Command::new(env!("CARGO_BIN_EXE_wdro")).args(["remote", "verify"]).current_dir(d.path()).output().unwrap();
    assert!(v.status.success(), "{}{}", String::from_utf8_lossy(&v.stdout), String::from_utf8_lossy(&v.stderr));

    // 2. The client is SIGKILLed while its job runs (a new fetch, of other bytes).
    let d2 = project(1);
    let mut cfg = std::fs::read_to_string(d2.path().join("wdro.toml")).unwrap();
    cfg.push_str(&format!(
        "\n[fetch.other]\nsources = [\"http://127.0.0.1:{port}/other\"]\ndigest = \"blake3:{}\"\n",
        crate::util::blake3_hex(&other)
    ));
    d2.write("wdro.toml", cfg);
    let before = server.requests();
    let mut client = spawn(
        wdro_run(&d2, Some(&cluster), &["--until", "fetch.other", "--executor", "slurm"], 300),
        &logs.path().join("c2"),
    );
    wait_until("the second slow fetch to start", 120, || {
        alive(&mut client, &logs.path().join("c2")) && server.requests() > before
    });
    client.kill().unwrap();
    let _ = client.wait();
    // The killed client's jobs go on; wait until they left the queue.
    wait_until("the killed client's jobs to finish", 120, || squeue(&cluster, &["-h", "-o", "%i"]).trim().is_empty());
    let (ev, _) = ok(wdro_run(&d2, Some(&cluster), &["--until", "fetch.other", "--executor", "slurm"], 300));
    let computed: Vec<&str> = of_kind(&ev, "stage_finished")
        .into_iter()
        .filter(|e| e["hit"] == false)
        .map(|e| e["stage"].as_str().unwrap())
        .collect();
    assert!(computed.is_empty(), "the killed client's job finished the fetch; nothing is submitted again: {ev:?}");
    assert_eq!(of_kind(&ev, "summary")[0]["hits"], 1, "{ev:?}");
    let once = computed_keys_on_remote(&remote);
    assert_eq!(once.len(), 4, "the killed client's job computed and pushed fetch.other: {once:?}");
    assert!(once.values().all(|&n| n == 1), "{once:?}");
    drop(cluster);
    eprintln!("slurm_cancelled_task_and_killed_client: {:.1} s", t0.elapsed().as_secs_f64());
}
