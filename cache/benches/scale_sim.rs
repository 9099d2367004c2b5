//! Scale simulation of many workers sharing one remote cache (`bench/scale_sim.sh`).
//!
//! W worker processes (this binary, spawned W times), each with its own local cache, share one
//! remote and compute a synthetic DAG with the real remote, lease and push code:
//!
//! * **DAG**: 4 layers of 64 stages (256 in all); each stage of layers 1–3 reads 1–3 distinct
//!   stages of the layer before, picked by a fixed-seed splitmix64. A stage "computes" by
//!   sleeping `--stage-ms` (1000) and writing a 64-byte output.
//! * **Ideal makespan**: `max(ceil(256 / W), 4) × stage time` — every worker busy all the time,
//!   and no shorter than the critical path of 4 stages. For W = 1, 4, 16, 64 (divisors of 64) it
//!   equals the layered bound `4 × ceil(64 / W)`, so it is attainable.
//! * **Worker loop**: list the manifests (one LIST: which stages are done), pick the ready stages
//!   (every parent done, own manifest absent) — its own share first (stage i mod W), then the
//!   others in a worker-specific random order (stealing) — try their leases
//!   until one is acquired (a held lease is skipped, not waited for, and not retried for a third
//!   of the lease TTL), check the manifest once
//!   more, compute, push output + manifest, release the lease (after the push), and list again.
//!   With nothing to take it polls with exponential backoff (`--poll-min-ms` doubling up to
//!   `--poll-max-ms`).
//! * **Measured**: makespan from the common start signal to the last manifest pushed, overhead
//!   against the ideal, backend requests per stage (every request is counted by the remote's
//!   counting wrapper, see `RequestCounts`), and stages computed more than once (must be 0).
//!
//! `scale_sim --url s3://bucket/prefix --workers 1,4,16,64 [--stage-ms 1000] [--json FILE]`

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use wdro_cache::remote::{RemoteOptions, RequestCounts, TryLease};
use wdro_cache::{Digest, LockWait, OutputRef, Remote, StageKey, StageRecord, Store};

const LAYERS: usize = 4;
const WIDTH: usize = 64;
const N: usize = LAYERS * WIDTH;
const SEED: u64 = 0x5ca1e;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// Parents of each stage (stage i is in layer i / WIDTH).
fn dag() -> Vec<Vec<usize>> {
    let mut rng = Rng(SEED);
    (0..N)
        .map(|i| {
            let layer = i / WIDTH;
            if layer == 0 {
                return Vec::new();
            }
            let n = 1 + rng.below(3);
            let mut ps = BTreeSet::new();
            while ps.len() < n {
                ps.insert((layer - 1) * WIDTH + rng.below(WIDTH));
            }
            ps.into_iter().collect()
        })
        .collect()
}

fn key(run: &str, i: usize) -> StageKey {
    StageKey(Digest::of_bytes(format!("scale-sim/{run}/{i}").as_bytes()))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn num(args: &[String], name: &str, default: u64) -> u64 {
    arg(args, name).map(|v| v.parse().unwrap_or_else(|_| panic!("{name} {v}: not a number"))).unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes `--bench`; ignore it.
    if arg(&args, "--worker").is_some() {
        worker(&args);
    } else if args.iter().any(|a| a == "--url") {
        parent(&args);
    } else {
        eprintln!(
            "scale_sim: pass --url s3://bucket/prefix (or file:///dir) --workers 1,4,16,64; see bench/scale_sim.sh"
        );
    }
}

#[derive(Default)]
struct Outcome {
    makespan_s: f64,
    exited_s: f64,
    computed: BTreeMap<usize, usize>,
    requests: RequestCounts,
    leases_refused: u64,
    polls: u64,
}

fn parent(args: &[String]) {
    let url = arg(args, "--url").unwrap();
    let workers: Vec<usize> = arg(args, "--workers")
        .unwrap_or_else(|| "1,4,16,64".into())
        .split(',')
        .map(|w| w.trim().parse().expect("--workers 1,4,16"))
        .collect();
    let stage_ms = num(args, "--stage-ms", 1000);
    let (pmin, pmax) = (num(args, "--poll-min-ms", 25), num(args, "--poll-max-ms", 250));
    let mut rows = Vec::new();
    println!(
        "{:>3} | {:>7} | {:>10} | {:>10} | {:>14} | {:>17} | {:>6}",
        "W", "ideal s", "makespan s", "overhead %", "requests/stage", "computed twice", "missed"
    );
    for &w in &workers {
        let run = format!("{}-w{w}", now_ms());
        let o = run_once(&url, &run, w, stage_ms, pmin, pmax);
        let ideal = ((N.div_ceil(w)).max(LAYERS) as f64) * stage_ms as f64 / 1000.0;
        let twice = o.computed.values().filter(|&&n| n > 1).count();
        let missed = N - o.computed.len();
        let per_stage = o.requests.total() as f64 / N as f64;
        let overhead = 100.0 * (o.makespan_s - ideal) / ideal;
        println!(
            "{w:>3} | {ideal:>7.1} | {:>10.2} | {overhead:>10.1} | {per_stage:>14.1} | {twice:>17} | {missed:>6}",
            o.makespan_s
        );
        rows.push(serde_json::json!({
            "workers": w, "ideal_s": ideal, "makespan_s": o.makespan_s, "all_exited_s": o.exited_s,
            "overhead_pct": overhead, "requests_per_stage": per_stage, "requests": o.requests,
            "computed_twice": twice, "missed": missed, "leases_refused": o.leases_refused, "idle_polls": o.polls,
            "stage_ms": stage_ms, "poll_min_ms": pmin, "poll_max_ms": pmax,
        }));
    }
    if let Some(p) = arg(args, "--json") {
        std::fs::write(&p, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    }
}

fn run_once(url: &str, run: &str, w: usize, stage_ms: u64, pmin: u64, pmax: u64) -> Outcome {
    let exe = std::env::current_exe().unwrap();
    let mut kids: Vec<_> = (0..w)
        .map(|i| {
            Command::new(&exe)
                .args([
                    "--worker",
                    &i.to_string(),
                    "--of",
                    &w.to_string(),
                    "--run",
                    run,
                    "--url",
                    &format!("{url}/{run}"),
                ])
                .args(["--stage-ms", &stage_ms.to_string(), "--poll-min-ms", &pmin.to_string()])
                .args(["--poll-max-ms", &pmax.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn a worker")
        })
        .collect();
    let mut outs: Vec<_> = kids.iter_mut().map(|k| BufReader::new(k.stdout.take().unwrap())).collect();
    for o in &mut outs {
        let mut l = String::new();
        o.read_line(&mut l).unwrap();
        assert_eq!(l.trim(), "ready", "a worker failed to start");
    }
    let t0 = now_ms();
    let start = Instant::now();
    for k in &mut kids {
        writeln!(k.stdin.as_mut().unwrap(), "go").unwrap();
    }
    let mut o = Outcome::default();
    let mut last_end = t0;
    for (k, out) in kids.iter_mut().zip(&mut outs) {
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("worker result {l:?}: {e}"));
        for c in v["computed"].as_array().unwrap() {
            *o.computed.entry(c[0].as_u64().unwrap() as usize).or_default() += 1;
            last_end = last_end.max(c[2].as_u64().unwrap());
        }
        let r: RequestCounts = RequestCounts {
            get: v["requests"]["get"].as_u64().unwrap(),
            head: v["requests"]["head"].as_u64().unwrap(),
            put: v["requests"]["put"].as_u64().unwrap(),
            list: v["requests"]["list"].as_u64().unwrap(),
            delete: v["requests"]["delete"].as_u64().unwrap(),
            multipart: v["requests"]["multipart"].as_u64().unwrap(),
        };
        o.requests.get += r.get;
        o.requests.head += r.head;
        o.requests.put += r.put;
        o.requests.list += r.list;
        o.requests.delete += r.delete;
        o.requests.multipart += r.multipart;
        o.leases_refused += v["leases_refused"].as_u64().unwrap();
        o.polls += v["idle_polls"].as_u64().unwrap();
        assert!(k.wait().unwrap().success(), "a worker failed");
    }
    o.exited_s = start.elapsed().as_secs_f64();
    o.makespan_s = (last_end - t0) as f64 / 1000.0;
    o
}

fn worker(args: &[String]) {
    let id: u64 = num(args, "--worker", 0);
    let of: u64 = num(args, "--of", 1);
    let run = arg(args, "--run").unwrap();
    let url = arg(args, "--url").unwrap();
    let stage = Duration::from_millis(num(args, "--stage-ms", 1000));
    let (pmin, pmax) =
        (Duration::from_millis(num(args, "--poll-min-ms", 25)), Duration::from_millis(num(args, "--poll-max-ms", 250)));
    let parents = dag();
    let keys: Vec<StageKey> = (0..N).map(|i| key(&run, i)).collect();
    let index: BTreeMap<StageKey, usize> = keys.iter().enumerate().map(|(i, k)| (*k, i)).collect();
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path(), LockWait::NoWait).unwrap();
    let remote = Remote::open(&url, RemoteOptions::default()).unwrap();
    // Probe conditional puts before the start signal (once per process in real use too).
    remote.conditional_put().unwrap();
    let before = remote.requests();
    println!("ready");
    std::io::stdout().flush().unwrap();
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).unwrap();

    let mut rng = Rng(SEED ^ (id + 1).wrapping_mul(0x2545f4914f6cdd1d));
    let mut computed: Vec<(usize, u64, u64)> = Vec::new();
    let (mut refused, mut polls) = (0u64, 0u64);
    let mut backoff = pmin;
    // A lease held by a live worker is not retried for a third of the TTL: its manifest will
    // appear in a listing first, and a crashed holder's lease is stale only after TTL + grace.
    let mut held: BTreeMap<usize, Instant> = BTreeMap::new();
    let retry_held = remote.options().lease.ttl / 3;
    loop {
        let done: BTreeSet<usize> =
            remote.manifest_keys().unwrap().iter().filter_map(|k| index.get(k).copied()).collect();
        if done.len() == N {
            break;
        }
        let mut ready: Vec<usize> =
            (0..N).filter(|i| !done.contains(i) && parents[*i].iter().all(|p| done.contains(p))).collect();
        // This worker's share first (stage i belongs to worker i mod W), then the others in a
        // random order (work stealing): workers rarely collide on a lease.
        rng.shuffle(&mut ready);
        ready.sort_by_key(|&s| (s as u64) % of != id);
        let mut did = false;
        for s in ready {
            if held.get(&s).is_some_and(|t: &Instant| t.elapsed() < retry_held) {
                continue;
            }
            let lease = match remote.try_lease(&keys[s], &format!("s{s}")) {
                Ok(TryLease::Acquired(l)) => l,
                Ok(TryLease::Held(_)) | Err(_) => {
                    refused += 1;
                    held.insert(s, Instant::now());
                    continue;
                }
            };
            // The previous holder may have pushed and released since the listing.
            remote.forget_manifest(&keys[s]);
            if remote.get_manifest(&keys[s]).unwrap().is_some() {
                lease.release().unwrap();
                continue;
            }
            let start = now_ms();
            std::thread::sleep(stage);
            let out = format!("stage {s} of {run}, computed by worker {id}\n").into_bytes();
            let d = store.put_bytes(&out).unwrap();
            let rec = StageRecord {
                key: keys[s],
                stage_name: format!("s{s}"),
                stage_id: "sleep".into(),
                version: 1,
                params: serde_json::json!({"i": s}),
                inputs: parents[s]
                    .iter()
                    .map(|p| (format!("in{p}"), Digest::of_bytes(format!("{p}").as_bytes())))
                    .collect(),
                outputs: BTreeMap::from([(
                    "out".to_string(),
                    OutputRef { digest: d, size: out.len() as u64, kind: "bytes".into() },
                )]),
                metrics: serde_json::Value::Null,
                env: BTreeMap::new(),
                wdro_version: "scale-sim".into(),
                finished_at: 0,
                duration_ms: stage.as_millis() as u64,
            };
            store.put_record(&rec).unwrap();
            remote.push_stage_leased(&store, &rec, Some(lease)).unwrap();
            let sum = remote.wait_pushes();
            assert!(sum.failed.is_empty(), "push failed: {:?}", sum.failed);
            computed.push((s, start, now_ms()));
            did = true;
            break;
        }
        if did {
            backoff = pmin;
        } else {
            polls += 1;
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(pmax);
        }
    }
    let r = remote.requests();
    let d = RequestCounts {
        get: r.get - before.get,
        head: r.head - before.head,
        put: r.put - before.put,
        list: r.list - before.list,
        delete: r.delete - before.delete,
        multipart: r.multipart - before.multipart,
    };
    println!(
        "{}",
        serde_json::json!({"computed": computed, "requests": d, "leases_refused": refused, "idle_polls": polls})
    );
}
