//! Leases on a shared remote: two processes started at the same moment for overlapping work
//! compute each shared stage exactly once. The stages are `fetch`es from a local HTTP server that
//! answers slowly (so the overlap is certain) and counts the downloads: a second computation
//! would be a second GET. A directory remote is shared by the processes.
//!
//! * Two `wdro worker --stage fetch.f0` (what two overlapping Slurm submissions run): one takes
//!   the lease and computes, the other prints who holds it, waits, and uses the pushed result.
//! * Two `wdro run` (two laptops, separate local caches) over three stages: every stage is
//!   downloaded once in all, and the leases are gone afterwards.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::util::{blake3_hex, events, of_kind, Dir};

/// An HTTP server on 127.0.0.1 that serves `/fN.bin` after `delay` and counts GETs per path.
struct SlowServer {
    port: u16,
    gets: Arc<Mutex<BTreeMap<String, usize>>>,
}

fn body(i: usize) -> Vec<u8> {
    format!("leased file {i}\n").repeat(200 + i).into_bytes()
}

impl SlowServer {
    fn start(delay: Duration) -> SlowServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let gets: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
        let g = gets.clone();
        // Detached: it dies with the test process.
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let g = g.clone();
                std::thread::spawn(move || {
                    let mut conn = conn;
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).to_string();
                    let mut parts = head.split_whitespace();
                    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("").to_string());
                    let i: Option<usize> =
                        path.strip_prefix("/f").and_then(|p| p.strip_suffix(".bin")).and_then(|n| n.parse().ok());
                    let Some(i) = i else {
                        let _ =
                            conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                        return;
                    };
                    if method == "GET" {
                        *g.lock().unwrap().entry(path).or_default() += 1;
                        std::thread::sleep(delay);
                    }
                    let b = body(i);
                    let hdr = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        b.len()
                    );
                    let _ = conn.write_all(hdr.as_bytes());
                    if method == "GET" {
                        let _ = conn.write_all(&b);
                    }
                });
            }
        });
        SlowServer { port, gets }
    }

    fn gets(&self) -> BTreeMap<String, usize> {
        self.gets.lock().unwrap().clone()
    }
}

fn project(server: &SlowServer, remote: &Path, n: usize) -> Dir {
    let d = Dir::new();
    let mut cfg = String::new();
    for i in 0..n {
        cfg.push_str(&format!(
            "[fetch.f{i}]\nsources = [\"http://127.0.0.1:{}/f{i}.bin\"]\ndigest = \"blake3:{}\"\n\n",
            server.port,
            blake3_hex(&body(i))
        ));
    }
    cfg.push_str(&format!("[remote]\nurl = \"file://{}\"\nlease_ttl_s = 5\nlease_poll_s = 0.2\n", remote.display()));
    d.write("wdro.toml", cfg);
    d
}

fn spawn(d: &Dir, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_wdro"))
        .args(args)
        .current_dir(d.path())
        .env("NO_COLOR", "1")
        .env_remove("WDRO_WORKER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wdro")
}

/// Waits for a child: (stdout events, stderr), asserting exit 0.
fn finish(c: Child) -> (Vec<serde_json::Value>, String) {
    let out = c.wait_with_output().unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
    assert!(out.status.success(), "exit {:?}\nstdout:\n{so}\nstderr:\n{se}", out.status);
    (events(&so), se)
}

fn computed(ev: &[serde_json::Value]) -> Vec<String> {
    of_kind(ev, "stage_finished")
        .into_iter()
        .filter(|e| e["hit"] == false)
        .map(|e| e["stage"].as_str().unwrap().to_string())
        .collect()
}

/// Stage name → times computed, from the remote's run records.
fn computed_on_remote(remote: &Path) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for f in std::fs::read_dir(remote.join("runs")).unwrap() {
        let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(f.unwrap().path()).unwrap()).unwrap();
        for s in rec["computed"].as_array().unwrap() {
            *m.entry(s.as_str().unwrap().to_string()).or_default() += 1;
        }
    }
    m
}

/// Lease objects left on the remote (none once every holder released).
fn leases_left(remote: &Path) -> usize {
    fn walk(p: &Path) -> usize {
        match std::fs::read_dir(p) {
            Ok(rd) => rd.flatten().map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 }).sum(),
            Err(_) => 0,
        }
    }
    walk(&remote.join("leases"))
}

#[test]
fn two_workers_for_one_stage_compute_it_once() {
    let server = SlowServer::start(Duration::from_millis(2500));
    let remote_dir = tempfile::tempdir().unwrap();
    let remote = remote_dir.path().join("remote");
    let d = project(&server, &remote, 1);
    let args = ["--json", "worker", "--stage", "fetch.f0"];
    let (a, b) = (spawn(&d, &args), spawn(&d, &args));
    let (ea, sa) = finish(a);
    let (eb, sb) = finish(b);

    assert_eq!(server.gets(), BTreeMap::from([("/f0.bin".to_string(), 1)]), "downloaded once in all");
    let (ca, cb) = (computed(&ea), computed(&eb));
    assert_eq!(ca.len() + cb.len(), 1, "exactly one worker computes:\n{ea:?}\n{eb:?}");
    let (waiter, waiter_err) = if ca.is_empty() { (&ea, &sa) } else { (&eb, &sb) };
    let waits = of_kind(waiter, "stage_waiting");
    assert!(!waits.is_empty(), "the other waits for the lease:\n{waiter:?}\n{waiter_err}");
    let holder = waits[0]["holder"].as_str().unwrap();
    assert!(holder.contains("pid") && holder.contains("fetch.f0"), "{holder}");
    let hit = of_kind(waiter, "stage_finished");
    assert!(hit.len() == 1 && hit[0]["hit"] == true && hit[0]["cache"] == "remote", "{waiter:?}");

    assert_eq!(computed_on_remote(&remote), BTreeMap::from([("fetch.f0".to_string(), 1)]));
    assert_eq!(leases_left(&remote), 0, "the lease is released after the push");
}

#[test]
fn two_overlapping_runs_compute_each_stage_once() {
    let server = SlowServer::start(Duration::from_millis(1200));
    let remote_dir = tempfile::tempdir().unwrap();
    let remote = remote_dir.path().join("remote");
    // Two people: separate project directories, so separate local caches.
    let (d1, d2) = (project(&server, &remote, 3), project(&server, &remote, 3));
    let (a, b) = (spawn(&d1, &["--json", "run"]), spawn(&d2, &["--json", "run"]));
    let (ea, _) = finish(a);
    let (eb, _) = finish(b);

    let gets = server.gets();
    assert_eq!(gets.len(), 3, "{gets:?}");
    assert!(gets.values().all(|&n| n == 1), "each file downloaded once in all: {gets:?}");
    let mut all = computed(&ea);
    all.extend(computed(&eb));
    all.sort();
    assert_eq!(all, ["fetch.f0", "fetch.f1", "fetch.f2"], "{ea:?}\n{eb:?}");
    // Both runs end with every stage available (computed here or a remote hit).
    for ev in [&ea, &eb] {
        assert_eq!(of_kind(ev, "stage_finished").len(), 3, "{ev:?}");
    }
    let once = computed_on_remote(&remote);
    assert_eq!(once.len(), 3, "{once:?}");
    assert!(once.values().all(|&n| n == 1), "{once:?}");
    assert_eq!(leases_left(&remote), 0);

    // A read-only remote takes no leases and never fails because of them.
    let ro = Dir::new();
    let cfg = std::fs::read_to_string(d1.path().join("wdro.toml")).unwrap();
    ro.write("wdro.toml", cfg.replace("lease_ttl_s", "mode = \"read-only\"\nlease_ttl_s"));
    let ev = events(&ro.wdro().args(["--json", "run"]).ok());
    assert!(of_kind(&ev, "stage_waiting").is_empty());
    assert_eq!(computed(&ev).len(), 0, "read-only: pulled from the remote, {ev:?}");
}
