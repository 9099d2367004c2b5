//! The foundation scenario on a real pipeline of `fetch` stages: plan, run, rerun (all hits),
//! a changed param (only that stage reruns, `why` names the field), a corrupt blob (`verify`
//! reports it, `run` recomputes it), and a second process that waits for the cache.

use crate::util::{blake3_hex, events, of_kind, Dir};

/// Six local files, one over the 4 MiB file-tier threshold so a test can corrupt it on disk.
fn project() -> Dir {
    let d = Dir::new();
    let mut cfg = String::new();
    for i in 0..6 {
        let bytes: Vec<u8> = if i == 5 {
            (0..(5 * 1024 * 1024 + 4096)).map(|j: u32| (j.wrapping_mul(2654435761) >> 24) as u8).collect()
        } else {
            format!("file number {i}\n").repeat(100 + i).into_bytes()
        };
        d.write(&format!("src/f{i}.bin"), &bytes);
        cfg.push_str(&format!(
            "[fetch.f{i}]\nsources = [\"file:src/f{i}.bin\"]\ndigest = \"blake3:{}\"\n\n",
            blake3_hex(&bytes)
        ));
    }
    d.write("wdro.toml", cfg);
    d
}

#[test]
fn plan_run_rerun_change_corrupt() {
    let d = project();

    // Fresh: everything to run, reason "never run".
    let ev = events(&d.wdro().args(["--json", "plan"]).ok());
    let plan = of_kind(&ev, "plan_stage");
    assert_eq!(plan.len(), 6, "{ev:?}");
    assert!(plan.iter().all(|s| s["status"] == "to_run"), "{plan:?}");
    assert!(plan.iter().all(|s| s["reasons"][0]["reason"] == "never_run"), "{plan:?}");

    // Run: six computed.
    let ev = events(&d.wdro().args(["--json", "run"]).ok());
    let fin = of_kind(&ev, "stage_finished");
    assert_eq!(fin.len(), 6);
    assert!(fin.iter().all(|e| e["hit"] == false));

    // Rerun: six hits, nothing computed.
    let ev = events(&d.wdro().args(["--json", "run"]).ok());
    let fin = of_kind(&ev, "stage_finished");
    assert_eq!(fin.len(), 6);
    assert!(fin.iter().all(|e| e["hit"] == true), "{fin:?}");

    // Change one param: only that stage reruns, and `why` names the field and both values.
    let new = b"a different file\n".repeat(10);
    d.write("src/g.bin", &new);
    let set_src = "fetch.f2.sources=[\"file:src/g.bin\"]".to_string();
    let set_pin = format!("fetch.f2.digest=blake3:{}", blake3_hex(&new));
    let why = d.wdro().args(["--set", &set_src, "--set", &set_pin, "why", "fetch.f2"]).ok();
    assert!(why.contains("fetch.f2") && why.contains("digest"), "{why}");
    assert!(why.contains(&blake3_hex(&new)[..12]), "why should show the new value: {why}");
    let ev = events(&d.wdro().args(["--json", "--set", &set_src, "--set", &set_pin, "run"]).ok());
    let ran: Vec<_> = of_kind(&ev, "stage_finished").into_iter().filter(|e| e["hit"] == false).collect();
    assert_eq!(ran.len(), 1, "{ev:?}");
    assert_eq!(ran[0]["stage"], "fetch.f2");

    // Corrupt one byte of the large (file-tier) blob: verify reports it, run recomputes it.
    let blobs = d.path().join(".wdro/cache/blobs");
    let victim =
        walk(&blobs).into_iter().max_by_key(|p| std::fs::metadata(p).unwrap().len()).expect("a file-tier blob");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&victim, bytes).unwrap();
    let (out, err) = d.wdro().args(["cache", "verify"]).code(1);
    assert!(format!("{out}{err}").contains("corrupt"), "{out}{err}");
    let ev = events(&d.wdro().args(["--json", "run"]).ok());
    let ran: Vec<_> = of_kind(&ev, "stage_finished").into_iter().filter(|e| e["hit"] == false).collect();
    assert_eq!(ran.len(), 1, "only the corrupted stage recomputes: {ev:?}");
    assert_eq!(ran[0]["stage"], "fetch.f5");
    d.wdro().args(["cache", "verify"]).ok();
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn unknown_key_is_a_usage_error_with_closest_match() {
    let d = project();
    let (_, err) = d.wdro().args(["--set", "fetch.f1.digets=x", "plan"]).code(2);
    assert!(err.contains("did you mean `digest`"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[test]
fn second_process_waits_for_the_cache_and_no_wait_fails_fast() {
    let d = project();
    d.wdro().args(["run"]).ok();
    // Hold the cache with a long-running process: `cache lock` keeps the lock for N ms.
    let mut holder = d.wdro().args(["cache", "lock", "--ms", "3000"]).cmd.spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let (_, err) = d.wdro().args(["--no-wait", "plan"]).code(5);
    assert!(err.contains("in use by pid"), "{err}");
    let out = d.wdro().args(["plan"]).output();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("waiting for the cache"), "the waiter says what it waits for: {err}");
    holder.wait().unwrap();
}

#[test]
fn cache_export_writes_an_output_verified() {
    let d = project();
    d.wdro().args(["run"]).ok();
    // A small (sled-tier) output to stdout, by stage name; the only output needs no name.
    let out = d.wdro().args(["cache", "export", "fetch.f1", "-o", "-"]).output();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, "file number 1\n".repeat(101).into_bytes());
    // A file-tier output to a file, by key prefix and output name.
    let rec: serde_json::Value =
        serde_json::from_str(&d.wdro().args(["cache", "show", "fetch.f5"]).ok()).expect("record JSON");
    let key = &rec["key"].as_str().unwrap()[..12];
    let dest = d.path().join("exported.bin");
    d.wdro().args(["cache", "export", key, "file", "-o", dest.to_str().unwrap()]).ok();
    let src = std::fs::read(d.path().join("src/f5.bin")).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), src);
    // A wrong output name: usage error naming the outputs there are.
    let (_, err) = d.wdro().args(["cache", "export", "fetch.f1", "nope", "-o", "-"]).code(2);
    assert!(err.contains("no output \"nope\"") && err.contains("file"), "{err}");
}
