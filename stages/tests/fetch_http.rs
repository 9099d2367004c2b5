//! The `fetch` stage against real HTTP servers on 127.0.0.1: a small threaded server, written
//! here so that it can misbehave on purpose (drop connections halfway, answer 500, serve an HTML
//! page with a 200, ignore ranges), and local file / directory sources.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tempfile::TempDir;
use wdro_pipeline::{ProgressEvent, Stage, StageCtx, StageOutputs};
use wdro_stages::fetch::{FetchExec, FetchParams, FetchStage, Pin};

// ---------------------------------------------------------------------------------------------
// Test server

/// What the server does. Counters count down per request, so "the first N requests" misbehave.
#[derive(Clone, Default)]
struct Plan {
    /// Path → (body, Content-Type).
    files: HashMap<String, (Vec<u8>, &'static str)>,
    /// The first N requests get a 500.
    fail_500: usize,
    /// The first N responses with a body send all headers (full Content-Length) but only half
    /// the body, then close the connection.
    drop_halfway: usize,
    /// Answer every request with 200 and the whole file, as servers without range support do.
    ignore_range: bool,
}

impl Plan {
    fn file(mut self, path: &str, body: &[u8], content_type: &'static str) -> Plan {
        self.files.insert(path.to_string(), (body.to_vec(), content_type));
        self
    }
}

#[derive(Clone, Debug)]
struct Req {
    path: String,
    range: Option<String>,
    authorization: Option<String>,
}

struct Server {
    port: u16,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Req>>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(plan: Plan) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stop2, log2) = (stop.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            let mut plan = plan;
            // Bounded: ends when the test drops the server (or after a minute, whatever happens).
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop2.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => handle(stream, &mut plan, &log2),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => break,
                }
            }
        });
        Server { port, stop, log, thread: Some(thread) }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn requests(&self) -> Vec<Req> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn handle(mut s: TcpStream, plan: &mut Plan, log: &Mutex<Vec<Req>>) {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines.next().unwrap_or("").split(' ').nth(1).unwrap_or("").to_string();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let range = headers.get("range").cloned();
    log.lock().unwrap().push(Req {
        path: path.clone(),
        range: range.clone(),
        authorization: headers.get("authorization").cloned(),
    });

    if plan.fail_500 > 0 {
        plan.fail_500 -= 1;
        return respond(&mut s, "500 Internal Server Error", &[], b"boom", None);
    }
    let Some((body, ctype)) = plan.files.get(&path).cloned() else {
        return respond(&mut s, "404 Not Found", &[], b"not here", None);
    };
    let ct = ("Content-Type", ctype.to_string());
    let start = range
        .as_deref()
        .filter(|_| !plan.ignore_range)
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    let drop = plan.drop_halfway > 0;
    if drop {
        plan.drop_halfway -= 1;
    }
    let cut = |len: usize| if drop { Some(len / 2) } else { None };
    match start {
        Some(n) if n >= body.len() => respond(
            &mut s,
            "416 Range Not Satisfiable",
            &[("Content-Range", format!("bytes */{}", body.len()))],
            b"",
            None,
        ),
        Some(n) => {
            let part = &body[n..];
            let cr = ("Content-Range", format!("bytes {n}-{}/{}", body.len() - 1, body.len()));
            respond(&mut s, "206 Partial Content", &[ct, cr], part, cut(part.len()))
        }
        None => respond(&mut s, "200 OK", &[ct], &body, cut(body.len())),
    }
}

/// Writes a response with the full Content-Length, but only `send` bytes of the body when given.
fn respond(s: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8], send: Option<usize>) {
    let mut out = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let _ = s.write_all(out.as_bytes());
    let _ = s.write_all(&body[..send.unwrap_or(body.len())]);
    let _ = s.flush();
    let _ = s.shutdown(Shutdown::Both);
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    port
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn data(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

fn sha256_pin(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn blake3_pin(b: &[u8]) -> String {
    format!("blake3:{}", blake3::hash(b).to_hex())
}

fn fast() -> FetchExec {
    FetchExec { retries: 4, timeout_s: 5, backoff_ms: 1, offline: false, hint: None }
}

struct Run {
    result: Result<StageOutputs, String>,
    out: TempDir,
    scratch: PathBuf,
    progress: Vec<ProgressEvent>,
}

impl Run {
    fn ok(&self) -> &StageOutputs {
        self.result.as_ref().unwrap_or_else(|e| panic!("fetch failed: {e}"))
    }

    fn err(&self) -> &str {
        match &self.result {
            Ok(o) => panic!("fetch succeeded unexpectedly: {:?}", o.metrics),
            Err(e) => e,
        }
    }

    fn out_entries(&self) -> Vec<String> {
        fs::read_dir(self.out.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
    }
}

fn run_in(sources: &[&str], digest: &str, exec: FetchExec, scratch: &Path) -> Run {
    let params = FetchParams::new(sources.iter().map(|s| s.to_string()).collect(), Some(digest)).unwrap();
    let stage = FetchStage::new("fetch.t", params, exec);
    let out = tempfile::tempdir().unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let ctx = StageCtx {
        inputs: BTreeMap::new(),
        out_dir: out.path().to_path_buf(),
        scratch_dir: scratch.to_path_buf(),
        progress: Box::new(move |e| ev.lock().unwrap().push(e)),
    };
    let result = stage.run(&ctx).map_err(|e| e.0);
    let progress = events.lock().unwrap().clone();
    Run { result, out, scratch: scratch.to_path_buf(), progress }
}

fn run(sources: &[&str], digest: &str, exec: FetchExec) -> (Run, TempDir) {
    let scratch = tempfile::tempdir().unwrap();
    (run_in(sources, digest, exec, scratch.path()), scratch)
}

fn read_output(o: &StageOutputs) -> Vec<u8> {
    fs::read(&o.files["file"]).unwrap()
}

// ---------------------------------------------------------------------------------------------
// HTTP

#[test]
fn downloads_and_verifies_by_sha256() {
    let body = data(300_001, 1);
    let srv = Server::start(Plan::default().file("/w/model.pt", &body, "application/octet-stream"));
    let url = srv.url("/w/model.pt");
    let (r, _s) = run(&[&url], &sha256_pin(&body), fast());
    let o = r.ok();
    assert_eq!(read_output(o), body);
    assert_eq!(o.files["file"], r.out.path().join("model.pt"));
    assert_eq!(o.metrics["bytes"], body.len());
    assert_eq!(o.metrics["source"], url.as_str());
    assert_eq!(o.metrics["sha256"], sha256_pin(&body)["sha256:".len()..]);
    assert_eq!(o.metrics["blake3"], blake3_pin(&body)["blake3:".len()..]);
    let last = r.progress.last().expect("progress reported");
    assert_eq!((last.done, last.total), (body.len() as u64, body.len() as u64));
    let reqs = srv.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].path, "/w/model.pt");
    assert_eq!(reqs[0].range, None);
    assert!(!r.scratch.join("partial").exists(), "the partial moved to out_dir");
    assert_eq!(r.out_entries(), ["model.pt"]);
}

#[test]
fn downloads_and_verifies_by_blake3() {
    let body = data(4096, 2);
    let srv = Server::start(Plan::default().file("/ck.safetensors", &body, "application/octet-stream"));
    let (r, _s) = run(&[&srv.url("/ck.safetensors")], &blake3_pin(&body), fast());
    let o = r.ok();
    assert_eq!(read_output(o), body);
    assert_eq!(o.metrics["blake3"], blake3_pin(&body)["blake3:".len()..]);
    assert!(o.metrics.get("sha256").is_none());
}

#[test]
fn unpinned_download_records_its_blake3() {
    let body = data(1000, 3);
    let srv = Server::start(Plan::default().file("/x.bin", &body, "application/octet-stream"));
    let (r, _s) = run(&[&srv.url("/x.bin")], "none", fast());
    assert_eq!(r.ok().metrics["blake3"], blake3_pin(&body)["blake3:".len()..]);
}

#[test]
fn resumes_after_a_connection_dropped_halfway() {
    let body = data(200_000, 4);
    let plan = Plan { drop_halfway: 1, ..Plan::default() }.file("/big.bin", &body, "application/octet-stream");
    let srv = Server::start(plan);
    let (r, _s) = run(&[&srv.url("/big.bin")], &sha256_pin(&body), fast());
    assert_eq!(read_output(r.ok()), body);
    let reqs = srv.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[0].range, None);
    assert_eq!(reqs[1].range.as_deref(), Some(format!("bytes={}-", body.len() / 2).as_str()));
}

#[test]
fn resumes_every_time_a_server_keeps_dropping() {
    // Each attempt gets half of what is left: progress resets the retry count, so 6 drops with
    // retries = 2 still end in a complete file.
    let body = data(64_000, 5);
    let plan = Plan { drop_halfway: 6, ..Plan::default() }.file("/f.bin", &body, "application/octet-stream");
    let srv = Server::start(plan);
    let (r, _s) = run(&[&srv.url("/f.bin")], &blake3_pin(&body), FetchExec { retries: 2, ..fast() });
    assert_eq!(read_output(r.ok()), body);
    let reqs = srv.requests();
    assert_eq!(reqs.len(), 7);
    assert!(reqs[1..].iter().all(|q| q.range.is_some()));
}

#[test]
fn a_later_run_resumes_the_partial_of_a_failed_one() {
    let body = data(100_000, 6);
    let plan = Plan { drop_halfway: 1, ..Plan::default() }.file("/d.tar.gz", &body, "application/gzip");
    let srv = Server::start(plan);
    let scratch = tempfile::tempdir().unwrap();
    let pin = sha256_pin(&body);
    let first = run_in(&[&srv.url("/d.tar.gz")], &pin, FetchExec { retries: 0, ..fast() }, scratch.path());
    let e = first.err();
    assert!(e.starts_with("fetch.t: "), "{e}");
    assert!(e.contains("after 1 attempt:") && e.contains("connection dropped after 50000 bytes"), "{e}");
    assert!(first.out_entries().is_empty());
    assert_eq!(fs::metadata(scratch.path().join("partial")).unwrap().len(), body.len() as u64 / 2);

    let second = run_in(&[&srv.url("/d.tar.gz")], &pin, fast(), scratch.path());
    assert_eq!(read_output(second.ok()), body);
    let reqs = srv.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].range.as_deref(), Some("bytes=50000-"));
}

#[test]
fn restarts_when_the_server_ignores_the_range() {
    let body = data(50_000, 7);
    let plan = Plan { drop_halfway: 1, ignore_range: true, ..Plan::default() }.file(
        "/f.bin",
        &body,
        "application/octet-stream",
    );
    let srv = Server::start(plan);
    let (r, _s) = run(&[&srv.url("/f.bin")], &sha256_pin(&body), fast());
    assert_eq!(read_output(r.ok()), body);
    let reqs = srv.requests();
    assert_eq!(reqs.len(), 2);
    assert!(reqs[1].range.is_some(), "asked for a range, got the whole file, restarted");
}

#[test]
fn a_complete_partial_gets_416_and_is_verified() {
    let body = data(10_000, 8);
    let srv = Server::start(Plan::default().file("/f.bin", &body, "application/octet-stream"));
    let scratch = tempfile::tempdir().unwrap();
    fs::write(scratch.path().join("partial"), &body).unwrap();
    let r = run_in(&[&srv.url("/f.bin")], &sha256_pin(&body), fast(), scratch.path());
    assert_eq!(read_output(r.ok()), body);
    let reqs = srv.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].range.as_deref(), Some("bytes=10000-"));
}

#[test]
fn a_stale_partial_is_redownloaded_once_after_a_mismatch() {
    let body = data(10_000, 9);
    let srv = Server::start(Plan::default().file("/f.bin", &body, "application/octet-stream"));
    let scratch = tempfile::tempdir().unwrap();
    fs::write(scratch.path().join("partial"), data(4_000, 99)).unwrap();
    let r = run_in(&[&srv.url("/f.bin")], &sha256_pin(&body), fast(), scratch.path());
    assert_eq!(read_output(r.ok()), body);
    let reqs = srv.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].range.as_deref(), Some("bytes=4000-"));
    assert_eq!(reqs[1].range, None);
}

#[test]
fn retries_on_500() {
    let body = data(5_000, 10);
    let plan = Plan { fail_500: 2, ..Plan::default() }.file("/f.bin", &body, "application/octet-stream");
    let srv = Server::start(plan);
    let (r, _s) = run(&[&srv.url("/f.bin")], &sha256_pin(&body), fast());
    assert_eq!(read_output(r.ok()), body);
    assert_eq!(srv.requests().len(), 3);
}

#[test]
fn gives_up_after_the_retries() {
    let body = data(5_000, 11);
    let plan = Plan { fail_500: 100, ..Plan::default() }.file("/f.bin", &body, "application/octet-stream");
    let srv = Server::start(plan);
    let url = srv.url("/f.bin");
    let (r, _s) = run(&[&url], &sha256_pin(&body), FetchExec { retries: 2, ..fast() });
    let e = r.err();
    assert!(e.contains(&url) && e.contains("after 3 attempts") && e.contains("HTTP 500"), "{e}");
    assert_eq!(srv.requests().len(), 3);
    assert!(r.out_entries().is_empty());
}

#[test]
fn falls_back_to_the_next_mirror_after_a_404() {
    let body = data(7_000, 12);
    let dead = Server::start(Plan::default());
    let good = Server::start(Plan::default().file("/m/f.bin", &body, "application/octet-stream"));
    let (a, b) = (dead.url("/m/f.bin"), good.url("/m/f.bin"));
    let (r, _s) = run(&[&a, &b], &sha256_pin(&body), fast());
    let o = r.ok();
    assert_eq!(read_output(o), body);
    assert_eq!(o.metrics["source"], b.as_str());
    assert_eq!(dead.requests().len(), 1, "a 404 is not retried");
    assert_eq!(good.requests().len(), 1);
}

#[test]
fn falls_back_to_the_next_mirror_after_refused_connections() {
    let body = data(7_000, 13);
    let good = Server::start(Plan::default().file("/f.bin", &body, "application/octet-stream"));
    let refused = format!("http://127.0.0.1:{}/f.bin", closed_port());
    let (r, _s) = run(&[&refused, &good.url("/f.bin")], &sha256_pin(&body), FetchExec { retries: 1, ..fast() });
    assert_eq!(read_output(r.ok()), body);
    assert_eq!(r.ok().metrics["source"], good.url("/f.bin").as_str());
}

#[test]
fn all_mirrors_failing_lists_each() {
    let body = data(100, 14);
    let dead = Server::start(Plan::default());
    let (a, b) = (dead.url("/a.bin"), dead.url("/b.bin"));
    let (r, _s) = run(&[&a, &b], &sha256_pin(&body), fast());
    let e = r.err();
    assert!(e.contains("all 2 sources failed") && e.contains(&a) && e.contains(&b) && e.contains("404"), "{e}");
    assert!(!e.contains('\n'));
}

#[test]
fn an_html_page_is_an_error_and_never_cached() {
    let page = b"<!DOCTYPE html><html><body>Google Drive - Quota exceeded</body></html>";
    let srv = Server::start(Plan::default().file("/uc", page, "text/html; charset=utf-8"));
    let url = srv.url("/uc");
    let (r, _s) = run(&[&url], &sha256_pin(b"the real checkpoint"), fast());
    let e = r.err();
    assert!(e.contains(&url) && e.contains("served an HTML page instead of the file"), "{e}");
    assert!(e.contains("Google Drive quota or login page?"), "{e}");
    assert!(r.out_entries().is_empty());
    assert!(!r.scratch.join("partial").exists());
    assert_eq!(srv.requests().len(), 1, "an HTML page is not retried");
}

#[test]
fn an_html_body_is_caught_whatever_the_content_type() {
    let page = b" \r\n<HTML><head><title>Sign in</title></head></HTML>";
    let srv = Server::start(Plan::default().file("/file.bin", page, "application/octet-stream"));
    let url = srv.url("/file.bin");
    for pin in ["none".to_string(), sha256_pin(b"real")] {
        let (r, _s) = run(&[&url], &pin, fast());
        assert!(r.err().contains("served an HTML page"), "{}", r.err());
        assert!(r.out_entries().is_empty());
        assert!(!r.scratch.join("partial").exists());
    }
}

#[test]
fn a_wrong_digest_names_expected_and_actual_and_caches_nothing() {
    let body = data(3_000, 15);
    let srv = Server::start(Plan::default().file("/f.bin", &body, "application/octet-stream"));
    let url = srv.url("/f.bin");
    let wrong = blake3_pin(b"something else");
    let (r, _s) = run(&[&url], &wrong, fast());
    let e = r.err();
    assert!(e.contains("digest mismatch") && e.contains(&url), "{e}");
    assert!(e.contains(&format!("expected {wrong}")), "{e}");
    assert!(e.contains(&format!("actual {}", blake3_pin(&body))), "{e}");
    assert!(r.out_entries().is_empty());
    assert!(!r.scratch.join("partial").exists());
    assert_eq!(srv.requests().len(), 1);
}

#[test]
fn offline_fails_at_once_naming_the_url() {
    let srv = Server::start(Plan::default().file("/cifar-10-binary.tar.gz", b"x", "application/gzip"));
    let url = srv.url("/cifar-10-binary.tar.gz");
    let t = Instant::now();
    let (r, _s) = run(&[&url], &sha256_pin(b"x"), FetchExec { offline: true, ..fast() });
    let e = r.err();
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(!e.contains('\n'));
    assert!(e.starts_with(&format!("fetch.t: cannot download {url} (offline / no network)")), "{e}");
    assert!(e.contains("file:/path/to/cifar-10-binary.tar.gz") && e.contains("same digest"), "{e}");
    assert!(srv.requests().is_empty());
}

#[test]
fn offline_still_uses_a_local_mirror() {
    let d = tempfile::tempdir().unwrap();
    let local = d.path().join("f.bin");
    fs::write(&local, b"local bytes").unwrap();
    let srv = Server::start(Plan::default());
    let local_src = format!("file:{}", local.display());
    let (r, _s) =
        run(&[&srv.url("/f.bin"), &local_src], &sha256_pin(b"local bytes"), FetchExec { offline: true, ..fast() });
    assert_eq!(read_output(r.ok()), b"local bytes");
    assert_eq!(r.ok().metrics["source"], local_src.as_str());
    assert!(srv.requests().is_empty());
}

#[test]
fn refused_connections_end_in_a_no_network_error() {
    let url = format!("http://127.0.0.1:{}/model.pt", closed_port());
    let (r, _s) = run(&[&url], &sha256_pin(b"x"), FetchExec { retries: 2, ..fast() });
    let e = r.err();
    assert!(!e.contains('\n'));
    assert!(e.contains(&format!("cannot reach {url} after 3 attempts (no network?")), "{e}");
    assert!(e.contains("file:/path/to/model.pt"), "{e}");
}

#[test]
fn url_credentials_are_sent_but_never_shown() {
    let body = data(2_000, 16);
    let srv = Server::start(Plan::default().file("/private.bin", &body, "application/octet-stream"));
    let with_creds = |path: &str| format!("http://alice:s3cret@127.0.0.1:{}{path}", srv.port);
    let shown = |path: &str| format!("http://***@127.0.0.1:{}{path}", srv.port);

    let (ok, _s) = run(&[&with_creds("/private.bin")], &sha256_pin(&body), fast());
    assert_eq!(ok.ok().metrics["source"], shown("/private.bin").as_str());
    assert_eq!(srv.requests()[0].authorization.as_deref(), Some("Basic YWxpY2U6czNjcmV0"));

    let (missing, _s) = run(&[&with_creds("/missing.bin")], &sha256_pin(&body), fast());
    let (wrong, _s2) = run(&[&with_creds("/private.bin")], &sha256_pin(b"other"), fast());
    let refused = format!("http://alice:s3cret@127.0.0.1:{}/x.bin", closed_port());
    let (down, _s3) = run(&[&refused], &sha256_pin(b"x"), FetchExec { retries: 1, ..fast() });
    let (offline, _s4) = run(&[&refused], &sha256_pin(b"x"), FetchExec { offline: true, ..fast() });
    for e in [missing.err(), wrong.err(), down.err(), offline.err()] {
        assert!(!e.contains("s3cret") && !e.contains("alice"), "{e}");
        assert!(e.contains("http://***@127.0.0.1:"), "{e}");
    }
    assert!(missing.err().contains(&shown("/missing.bin")));
}

// ---------------------------------------------------------------------------------------------
// Local sources

#[test]
fn local_files_by_plain_path_and_file_urls() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("cifar-10-binary.tar.gz");
    let body = data(70_000, 17);
    fs::write(&p, &body).unwrap();
    let pin = sha256_pin(&body);
    for src in [p.display().to_string(), format!("file:{}", p.display()), format!("file://{}", p.display())] {
        let (r, _s) = run(&[&src], &pin, fast());
        let o = r.ok();
        assert_eq!(read_output(o), body);
        assert_eq!(o.files["file"], r.out.path().join("cifar-10-binary.tar.gz"));
        assert_eq!(o.metrics["source"], src.as_str());
        assert_eq!(o.metrics["bytes"], body.len());
        assert_eq!(r.out_entries(), ["cifar-10-binary.tar.gz"]);
    }
}

#[test]
fn a_local_file_with_the_wrong_digest_is_not_kept() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("f.bin");
    fs::write(&p, b"abc").unwrap();
    let (r, _s) = run(&[&p.display().to_string()], &sha256_pin(b"abd"), fast());
    let e = r.err();
    assert!(e.contains("digest mismatch") && e.contains(&sha256_pin(b"abd")) && e.contains(&sha256_pin(b"abc")), "{e}");
    assert!(r.out_entries().is_empty());
    assert_eq!(fs::read(&p).unwrap(), b"abc", "the source is untouched");
}

#[test]
fn a_missing_local_file_is_named() {
    let (r, _s) = run(&["file:/definitely/not/here.bin"], "none", fast());
    let e = r.err();
    assert!(e.contains("file:/definitely/not/here.bin") && e.contains("cannot read"), "{e}");
}

#[test]
fn a_local_directory_becomes_a_deterministic_tar() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("imgs");
    fs::create_dir_all(root.join("b/nested")).unwrap();
    fs::write(root.join("a.png"), data(500, 18)).unwrap();
    fs::write(root.join("b/c.png"), data(700, 19)).unwrap();
    fs::write(root.join("b/nested/d.png"), data(900, 20)).unwrap();

    let src = format!("file:{}", root.display());
    let (first, _s1) = run(&[&src], "none", fast());
    // Touch a file: a new mtime must not change the tar.
    let f = fs::File::options().write(true).open(root.join("a.png")).unwrap();
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(3600)).unwrap();
    drop(f);
    let b3 = first.ok().metrics["blake3"].as_str().unwrap().to_string();
    let (second, _s2) = run(&[&src], &format!("blake3:{b3}"), fast());
    assert_eq!(second.ok().metrics["blake3"], b3.as_str());
    assert_eq!(second.ok().files["file"], second.out.path().join("imgs.tar"));
    assert_eq!(read_output(first.ok()), read_output(second.ok()));

    let tar_bytes = read_output(second.ok());
    let mut ar = tar::Archive::new(&tar_bytes[..]);
    let names: Vec<String> =
        ar.entries().unwrap().map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["a.png", "b", "b/c.png", "b/nested", "b/nested/d.png"]);

    // Same tree elsewhere under another name: same artifact.
    let copy = d.path().join("elsewhere/other");
    fs::create_dir_all(copy.join("b/nested")).unwrap();
    for f in ["a.png", "b/c.png", "b/nested/d.png"] {
        fs::copy(root.join(f), copy.join(f)).unwrap();
    }
    let (third, _s3) = run(&[&copy.display().to_string()], &format!("blake3:{b3}"), fast());
    assert_eq!(third.ok().metrics["blake3"], b3.as_str());
}

#[test]
fn pin_type_is_public_and_parses() {
    assert!(Pin::parse(&sha256_pin(b"x")).unwrap().is_pinned());
    assert!(!Pin::parse("none").unwrap().is_pinned());
}
