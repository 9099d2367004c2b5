//! The two-user scenario against each remote backend (a directory, nginx WebDAV, moto S3):
//! separate local caches, one remote. A computes; B computes nothing and pulls only what it
//! needs; B changes one param and only that stage computes and is pushed; A reruns B's config
//! and computes nothing. Then a corrupted remote blob is refused, recomputed and repaired, a
//! read-only user never writes, and no credential appears in any output.

use std::path::Path;

use crate::remote_servers::{Moto, Nginx, DAV_PASSWORD, S3_SECRET};
use crate::util::{blake3_hex, events, of_kind, Dir};

/// Source files of the shared pipeline: five small ones and one in the file tier (> 4 MiB).
fn sources() -> Vec<Vec<u8>> {
    (0..6)
        .map(|i| {
            if i == 5 {
                (0..(6 << 20)).map(|j: u32| (j.wrapping_mul(2654435761) >> 24) as u8).collect()
            } else {
                format!("team file {i}\n").repeat(200 + i).into_bytes()
            }
        })
        .collect()
}

/// A user's project directory: the sources and a wdro.toml naming the remote.
fn user(url: &str, with_sources: bool) -> Dir {
    let d = Dir::new();
    let mut cfg = String::new();
    for (i, bytes) in sources().iter().enumerate() {
        if with_sources {
            d.write(&format!("src/f{i}.bin"), bytes);
        }
        cfg.push_str(&format!(
            "[fetch.f{i}]\nsources = [\"file:src/f{i}.bin\"]\ndigest = \"blake3:{}\"\n\n",
            blake3_hex(bytes)
        ));
    }
    cfg.push_str(&format!("[remote]\nurl = \"{url}\"\n"));
    d.write("wdro.toml", cfg);
    d
}

struct Team<'a> {
    url: String,
    env: Vec<(&'static str, String)>,
    /// Every stdout and stderr, to check that no credential was ever printed.
    seen: std::cell::RefCell<String>,
    secrets: &'a [&'a str],
}

impl Team<'_> {
    fn run(&self, d: &Dir, args: &[&str], code: i32) -> (String, String) {
        let mut c = d.wdro();
        for (k, v) in &self.env {
            c.cmd.env(k, v);
        }
        let (out, err) = c.args(args).code(code);
        self.seen.borrow_mut().push_str(&format!("{out}\n{err}\n"));
        (out, err)
    }

    fn json(&self, d: &Dir, args: &[&str]) -> Vec<serde_json::Value> {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        events(&self.run(d, &a, 0).0)
    }

    fn check_no_secrets(&self) {
        let seen = self.seen.borrow();
        for s in self.secrets {
            assert!(!seen.contains(s), "a credential was printed:\n{seen}");
        }
    }
}

fn computed(ev: &[serde_json::Value]) -> Vec<String> {
    of_kind(ev, "stage_finished")
        .into_iter()
        .filter(|e| e["hit"] == false)
        .map(|e| e["stage"].as_str().unwrap().to_string())
        .collect()
}

fn pulled_bytes(ev: &[serde_json::Value]) -> u64 {
    of_kind(ev, "stage_finished").iter().filter_map(|e| e["pulled_bytes"].as_u64()).sum()
}

/// The scenario; `corrupt(blob_rel_path, bytes)` overwrites a remote object behind wdro's back.
fn scenario(t: &Team, corrupt: &dyn Fn(&str, &[u8])) {
    let srcs = sources();
    let total: u64 = srcs.iter().map(|s| s.len() as u64).sum();
    let a = user(&t.url, true);
    let b = user(&t.url, false);

    // A computes everything and pushes it.
    let ev = t.json(&a, &["run"]);
    assert_eq!(computed(&ev).len(), 6, "{ev:?}");
    let pushes = of_kind(&ev, "remote_push");
    assert_eq!(pushes.len(), 6, "{ev:?}");
    assert!(pushes.iter().all(|p| p["manifest"]["outcome"] == "created"), "{pushes:?}");

    // B (no sources at all) plans: everything is cached on the remote, with the bytes to pull.
    let ev = t.json(&b, &["plan"]);
    let plan = of_kind(&ev, "plan_stage");
    assert!(plan.iter().all(|s| s["status"] == "cached" && s["cache"] == "remote"), "{plan:?}");
    let to_pull: u64 = plan.iter().map(|s| s["pull_bytes"].as_u64().unwrap()).sum();
    assert_eq!(to_pull, total);
    let (_, err) = t.run(&b, &["plan"], 0);
    assert!(err.contains("cached (remote, "), "{err}");

    // B runs: computes nothing. With download = minimal it pulls nothing at all; with the
    // default (toplevel) it pulls exactly the final results, once.
    let ev = t.json(&b, &["--set", "remote.download=minimal", "run"]);
    assert!(computed(&ev).is_empty(), "{ev:?}");
    assert!(of_kind(&ev, "stage_finished").iter().all(|e| e["cache"] == "remote"), "{ev:?}");
    assert_eq!(pulled_bytes(&ev), 0);
    let ev = t.json(&b, &["run"]);
    assert!(computed(&ev).is_empty(), "{ev:?}");
    assert_eq!(pulled_bytes(&ev), total);
    let ev = t.json(&b, &["run"]);
    assert!(of_kind(&ev, "stage_finished").iter().all(|e| e["cache"] == "local"), "now local: {ev:?}");

    // B changes one param: only that stage computes, and only it is pushed.
    let new = b"a new version of file 2, made by B\n".repeat(300);
    b.write("src/g.bin", &new);
    let set_src = "fetch.f2.sources=[\"file:src/g.bin\"]".to_string();
    let set_pin = format!("fetch.f2.digest=blake3:{}", blake3_hex(&new));
    let ev = t.json(&b, &["--set", &set_src, "--set", &set_pin, "run"]);
    assert_eq!(computed(&ev), ["fetch.f2"]);
    let pushes = of_kind(&ev, "remote_push");
    assert_eq!(pushes.len(), 1, "{ev:?}");
    assert_eq!(pushes[0]["stage"], "fetch.f2");

    // A reruns B's config (A does not even have src/g.bin): nothing computes; A pulls only B's
    // new result.
    let ev = t.json(&a, &["--set", &set_src, "--set", &set_pin, "run"]);
    assert!(computed(&ev).is_empty(), "{ev:?}");
    assert_eq!(pulled_bytes(&ev), new.len() as u64);

    // A corrupted remote blob (same size, one byte flipped) is refused, never used: C recomputes
    // that stage alone, and its push repairs the remote.
    let victim = &srcs[5];
    let h = blake3_hex(victim);
    let mut bad = victim.clone();
    bad[12345] ^= 0xff;
    corrupt(&format!("blobs/{}/{h}", &h[..2]), &bad);
    let (out, _) = t.run(&a, &["remote", "verify"], 1);
    assert!(out.contains("corrupt") && out.contains(&h), "{out}");
    let c = user(&t.url, true);
    let (out, err) = t.run(&c, &["--json", "run"], 0);
    let ev = events(&out);
    assert_eq!(computed(&ev), ["fetch.f5"], "{ev:?}");
    assert!(err.contains("corrupt") && err.contains("recomputing"), "{err}");
    let started = of_kind(&ev, "stage_started");
    assert_eq!(started[0]["reasons"].as_array().unwrap().last().unwrap()["reason"], "remote_refused");
    t.run(&a, &["remote", "verify"], 0);
    t.run(&c, &["cache", "verify"], 0);

    // Read-only: computes locally, never writes to the remote.
    let du_before = t.run(&a, &["--json", "remote", "du"], 0).0;
    let e = user(&t.url, true);
    e.write("src/h.bin", b"only for E\n");
    let ro = ["--set", "remote.mode=read-only"];
    let set_h = "fetch.f0.sources=[\"file:src/h.bin\"]";
    let pin_h = format!("fetch.f0.digest=blake3:{}", blake3_hex(b"only for E\n"));
    let ev = t.json(&e, &[ro[0], ro[1], "--set", set_h, "--set", &pin_h, "run"]);
    assert_eq!(computed(&ev), ["fetch.f0"]);
    assert!(of_kind(&ev, "remote_push").is_empty());
    assert_eq!(t.run(&a, &["--json", "remote", "du"], 0).0, du_before, "read-only wrote to the remote");
    let (_, err) = t.run(&e, &[ro[0], ro[1], "push"], 2);
    assert!(err.contains("read-only"), "{err}");

    // Pins reach the remote; gc --dry-run keeps what they reach.
    t.run(&a, &["cache", "pin", "baseline"], 0);
    t.run(&a, &["push"], 0);
    let (out, _) = t.run(&a, &["remote", "gc", "--dry-run", "--grace", "0", "--keep-last", "0"], 0);
    assert!(out.contains("kept 1 runs"), "{out}");
    let (out, _) = t.run(&a, &["remote", "ls"], 0);
    assert!(out.contains("fetch.f5"), "{out}");
    t.check_no_secrets();
}

#[test]
fn team_shares_a_directory_remote() {
    let remote = tempfile::tempdir().unwrap();
    let url = format!("file://{}", remote.path().display());
    let t = Team { url, env: vec![], seen: Default::default(), secrets: &[] };
    let root = remote.path().to_path_buf();
    scenario(&t, &|rel, bytes| write_over(&root.join(rel), bytes));
}

#[test]
fn team_shares_an_s3_remote() {
    let moto = require_server!(Moto::start());
    let t = Team { url: moto.url("team/cache"), env: moto.env(), seen: Default::default(), secrets: &[S3_SECRET] };
    scenario(&t, &|rel, bytes| moto.put_raw(&format!("team/cache/{rel}"), bytes));
    let (out, _) = t.run(&user(&t.url, false), &["remote", "info"], 0);
    assert!(out.contains("native create-if-absent") || out.contains("HEAD-then-PUT"), "{out}");
}

#[test]
fn team_shares_an_http_webdav_remote() {
    let nginx = require_server!(Nginx::start());
    let t = Team { url: nginx.url("cache"), env: vec![], seen: Default::default(), secrets: &[DAV_PASSWORD] };
    let root = nginx.root.join("cache");
    scenario(&t, &|rel, bytes| write_over(&root.join(rel), bytes));
    let (out, _) = t.run(&user(&t.url, false), &["remote", "info"], 0);
    assert!(out.contains("HEAD-then-PUT"), "HTTP has no conditional PUT: {out}");
    assert!(!out.contains(DAV_PASSWORD));
}

fn write_over(p: &Path, bytes: &[u8]) {
    let mut perms = std::fs::metadata(p).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(p, perms).unwrap();
    std::fs::write(p, bytes).unwrap();
}
