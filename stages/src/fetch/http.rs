//! HTTP(S) downloads that survive flaky servers and killed runs.
//!
//! Bytes go to `scratch_dir/partial`, which outlives a failed or killed run of the same key, so
//! every attempt (in this run or a later one) resumes with `Range: bytes=N-` instead of starting
//! over: checkpoint files are hundreds of MB and the servers that host them drop connections.
//! The server's answer decides what happens to the partial: 206 from N appends, a 200 (range
//! ignored) restarts from byte 0, 416 means the partial is already complete (or stale).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::source::scrub;
use super::{FetchError, FetchExec};

/// Hard cap on requests to one source in one run. Attempts that make progress reset the retry
/// count (a server that drops every connection halfway still gets the file through), so this is
/// what bounds a server that trickles a few bytes per connection forever.
const MAX_ATTEMPTS: u32 = 1000;
/// Longest wait between two attempts, however many failures in a row.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
const PROGRESS_EVERY: u64 = 1 << 20;

/// One download of one URL into the scratch dir.
pub(crate) struct Http<'a> {
    /// The URL as written (credentials included: ureq sends them as Basic auth).
    pub url: &'a str,
    /// The redacted URL: the only form that goes into messages.
    pub shown: &'a str,
    /// Whether a digest pin will check the result. A pinned partial may be resumed from another
    /// mirror (the pin catches a mix of two different files); an unpinned one only from its own.
    pub pinned: bool,
    pub exec: &'a FetchExec,
    pub scratch: &'a Path,
    pub progress: &'a dyn Fn(u64, u64),
}

/// A complete download waiting in the scratch dir to be verified.
pub(crate) struct Downloaded {
    pub path: PathBuf,
    /// Whether some of its bytes came from an earlier request (a resume): a digest mismatch may
    /// then be the fault of a stale partial rather than of the server, so it is worth one clean
    /// download before blaming the server.
    pub resumed: bool,
}

/// Which source a partial came from and how to ask the server whether it is still the same file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct PartialMeta {
    /// blake3 of the URL as written: ties the partial to its source without writing credentials
    /// to disk.
    source: String,
    /// A strong ETag or a Last-Modified date, sent as `If-Range` so a server whose file changed
    /// answers 200 with the whole new file instead of appending new bytes to old ones.
    validator: Option<String>,
}

/// How one failed attempt ends.
enum Fail {
    /// Retrying this URL cannot help (404, 403, HTML page, bad URL): next mirror.
    Fatal(FetchError),
    /// Worth another try after a backoff. `connect`: the server was never reached (refused,
    /// DNS, connect timeout), which after all retries reads as "no network".
    Retry { detail: String, connect: bool },
}

impl Http<'_> {
    pub(crate) fn partial_path(&self) -> PathBuf {
        self.scratch.join("partial")
    }

    fn meta_path(&self) -> PathBuf {
        self.scratch.join("partial.meta")
    }

    /// Deletes the partial and its metadata (after a bad or HTML download: never reuse it).
    pub(crate) fn discard(&self) {
        let _ = fs::remove_file(self.partial_path());
        let _ = fs::remove_file(self.meta_path());
    }

    /// Deletes only the metadata (after the partial has been moved to its final place).
    pub(crate) fn forget(&self) {
        let _ = fs::remove_file(self.meta_path());
    }

    fn io_err(&self, what: &str, err: io::Error) -> FetchError {
        FetchError::Io { src: self.shown.to_string(), what: what.to_string(), err }
    }

    /// Downloads until the partial is complete, retrying with exponential backoff.
    pub(crate) fn download(&self) -> Result<Downloaded, FetchError> {
        fs::create_dir_all(self.scratch).map_err(|e| self.io_err("cannot create the scratch dir", e))?;
        let id = blake3::hash(self.url.as_bytes()).to_hex().to_string();
        let meta = read_meta(&self.meta_path());
        let ours = meta.as_ref().is_some_and(|m| m.source == id);
        if !self.pinned && !ours {
            self.discard();
        }
        let agent = self.agent();
        let mut resumed = false;
        let (mut failures, mut attempts, mut only_connect) = (0u32, 0u32, true);
        loop {
            attempts += 1;
            let before = file_len(&self.partial_path());
            match self.attempt(&agent, &id, &mut resumed) {
                Ok(()) => return Ok(Downloaded { path: self.partial_path(), resumed }),
                Err(Fail::Fatal(e)) => return Err(e),
                Err(Fail::Retry { detail, connect }) => {
                    let detail = scrub(&detail, self.url).replace('\n', " ");
                    let progressed = file_len(&self.partial_path()) > before;
                    failures = if progressed { 1 } else { failures + 1 };
                    only_connect &= connect;
                    if failures > self.exec.retries || attempts >= MAX_ATTEMPTS {
                        let url = self.shown.to_string();
                        return Err(if only_connect {
                            FetchError::NoNetwork { url, attempts, detail, hint: String::new() }
                        } else {
                            FetchError::Transfer { url, attempts, detail }
                        });
                    }
                    std::thread::sleep(backoff(self.exec.backoff_ms, failures));
                }
            }
        }
    }

    fn agent(&self) -> ureq::Agent {
        let mut b = ureq::AgentBuilder::new().user_agent(concat!("wdro-fetch/", env!("CARGO_PKG_VERSION")));
        if self.exec.timeout_s > 0 {
            let t = Duration::from_secs(self.exec.timeout_s);
            b = b.timeout_connect(t).timeout_read(t);
        }
        b.build()
    }

    /// One request: appends what arrives to the partial.
    fn attempt(&self, agent: &ureq::Agent, id: &str, resumed: &mut bool) -> Result<(), Fail> {
        let partial = self.partial_path();
        let have = file_len(&partial);
        // `identity`: ureq would otherwise ask for gzip and transparently decode, and byte ranges
        // of a decoded body mean nothing.
        let mut req = agent.get(self.url).set("Accept-Encoding", "identity");
        if have > 0 {
            req = req.set("Range", &format!("bytes={have}-"));
            let meta = read_meta(&self.meta_path()).filter(|m| m.source == id);
            if let Some(v) = meta.and_then(|m| m.validator) {
                req = req.set("If-Range", &v);
            }
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(416, r)) if have > 0 => {
                // The partial reaches (or passes) the end: complete if the sizes agree.
                return match parse_content_range(r.header("content-range")) {
                    Some(ContentRange { total: Some(t), .. }) if t == have => {
                        *resumed = true;
                        Ok(())
                    }
                    _ => {
                        self.discard();
                        Err(Fail::Retry {
                            detail: "server refused the resume range (HTTP 416); restarting from byte 0".into(),
                            connect: false,
                        })
                    }
                };
            }
            Err(ureq::Error::Status(code, r)) => {
                let detail = format!("HTTP {code} {}", r.status_text());
                return Err(if code == 408 || code == 429 || code >= 500 {
                    Fail::Retry { detail, connect: false }
                } else {
                    Fail::Fatal(FetchError::HttpStatus { url: self.shown.to_string(), status: detail })
                });
            }
            Err(ureq::Error::Transport(t)) => return Err(self.classify(&t)),
        };

        if self.pinned && is_html_content_type(resp.header("content-type")) {
            return Err(Fail::Fatal(FetchError::Html { url: self.shown.to_string() }));
        }
        let (start, total) = match resp.status() {
            206 => match parse_content_range(resp.header("content-range")) {
                Some(ContentRange { start: Some(s), total }) if s == have => (have, total),
                _ => {
                    self.discard();
                    return Err(Fail::Retry {
                        detail: format!("server answered a resume from byte {have} with another range; restarting"),
                        connect: false,
                    });
                }
            },
            200 => (0, resp.header("content-length").and_then(|v| v.trim().parse::<u64>().ok())),
            other => {
                return Err(Fail::Fatal(FetchError::HttpStatus {
                    url: self.shown.to_string(),
                    status: format!("unexpected HTTP {other} {}", resp.status_text()),
                }))
            }
        };
        let mut file = if start == 0 {
            // A 200 to a range request means the server ignored the range: start over.
            let meta = PartialMeta { source: id.to_string(), validator: validator(&resp) };
            write_meta(&self.meta_path(), &meta)
                .map_err(|e| Fail::Fatal(self.io_err("cannot write the scratch dir", e)))?;
            File::create(&partial)
        } else {
            *resumed = true;
            OpenOptions::new().append(true).open(&partial)
        }
        .map_err(|e| Fail::Fatal(self.io_err("cannot write the partial download", e)))?;

        let mut reader = resp.into_reader();
        let mut done = start;
        let mut last_report = done;
        (self.progress)(done, total.unwrap_or(0));
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    file.flush().map_err(|e| Fail::Fatal(self.io_err("cannot write the partial download", e)))?;
                    return Err(Fail::Retry {
                        detail: format!("connection dropped after {done} bytes: {e}"),
                        connect: false,
                    });
                }
            };
            file.write_all(&buf[..n]).map_err(|e| Fail::Fatal(self.io_err("cannot write the partial download", e)))?;
            done += n as u64;
            if let Some(t) = total.filter(|&t| done > t) {
                self.discard();
                return Err(Fail::Retry {
                    detail: format!("server sent more than the {t} bytes it announced; restarting"),
                    connect: false,
                });
            }
            if done - last_report >= PROGRESS_EVERY {
                last_report = done;
                (self.progress)(done, total.unwrap_or(0));
            }
        }
        file.flush().map_err(|e| Fail::Fatal(self.io_err("cannot write the partial download", e)))?;
        if let Some(t) = total.filter(|&t| done < t) {
            return Err(Fail::Retry { detail: format!("body truncated at {done} of {t} bytes"), connect: false });
        }
        (self.progress)(done, total.unwrap_or(done));
        Ok(())
    }

    fn classify(&self, t: &ureq::Transport) -> Fail {
        use ureq::ErrorKind as K;
        // Built from the parts, not `Display`, which starts with the URL as written.
        let mut detail = t.kind().to_string();
        if let Some(m) = t.message() {
            detail = format!("{detail}: {m}");
        }
        if let Some(src) = std::error::Error::source(t) {
            detail = format!("{detail}: {src}");
        }
        let detail = scrub(&detail, self.url);
        match t.kind() {
            K::Dns | K::ConnectionFailed | K::ProxyConnect => Fail::Retry { detail, connect: true },
            K::InvalidUrl
            | K::UnknownScheme
            | K::InsecureRequestHttpsOnly
            | K::InvalidProxyUrl
            | K::ProxyUnauthorized
            | K::TooManyRedirects => {
                Fail::Fatal(FetchError::Transfer { url: self.shown.to_string(), attempts: 1, detail })
            }
            _ => Fail::Retry { detail, connect: false },
        }
    }
}

/// `backoff_ms · 2^(failures−1)`, capped.
fn backoff(backoff_ms: u64, failures: u32) -> Duration {
    let factor = 1u64 << failures.saturating_sub(1).min(20);
    Duration::from_millis(backoff_ms.saturating_mul(factor)).min(MAX_BACKOFF)
}

fn file_len(p: &Path) -> u64 {
    fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn read_meta(p: &Path) -> Option<PartialMeta> {
    serde_json::from_slice(&fs::read(p).ok()?).ok()
}

fn write_meta(p: &Path, m: &PartialMeta) -> io::Result<()> {
    fs::write(p, serde_json::to_vec(m).map_err(io::Error::other)?)
}

/// A validator usable in `If-Range`: a strong ETag (weak ones are not allowed there), else
/// Last-Modified.
fn validator(resp: &ureq::Response) -> Option<String> {
    resp.header("etag")
        .map(str::trim)
        .filter(|e| !e.starts_with("W/") && !e.is_empty())
        .or_else(|| resp.header("last-modified").map(str::trim))
        .map(str::to_string)
}

/// `Content-Range: bytes a-b/total`, `bytes a-b/*` or `bytes */total`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ContentRange {
    pub start: Option<u64>,
    pub total: Option<u64>,
}

pub(crate) fn parse_content_range(v: Option<&str>) -> Option<ContentRange> {
    let v = v?.trim();
    let rest = v.strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    let start = match range.trim() {
        "*" => None,
        r => Some(r.split_once('-')?.0.trim().parse().ok()?),
    };
    Some(ContentRange { start, total })
}

/// Whether a Content-Type announces an HTML page.
pub(crate) fn is_html_content_type(v: Option<&str>) -> bool {
    v.map(|v| v.trim().to_ascii_lowercase())
        .is_some_and(|v| v.starts_with("text/html") || v.starts_with("application/xhtml"))
}

/// Whether bytes look like the start of an HTML document: `<!DOCTYPE html` or `<html`, any case,
/// after an optional BOM and whitespace. What Google Drive, Dropbox and login walls send instead
/// of the file.
pub(crate) fn looks_like_html(head: &[u8]) -> bool {
    let head = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(head);
    let start = head.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(head.len());
    let head = &head[start..];
    let starts = |p: &[u8]| head.len() >= p.len() && head[..p.len()].eq_ignore_ascii_case(p);
    starts(b"<!doctype html") || starts(b"<html")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_forms() {
        assert_eq!(
            parse_content_range(Some("bytes 100-199/200")),
            Some(ContentRange { start: Some(100), total: Some(200) })
        );
        assert_eq!(parse_content_range(Some("bytes 5-9/*")), Some(ContentRange { start: Some(5), total: None }));
        assert_eq!(parse_content_range(Some("bytes */300")), Some(ContentRange { start: None, total: Some(300) }));
        assert_eq!(parse_content_range(Some("items 1-2/3")), None);
        assert_eq!(parse_content_range(Some("bytes x-2/3")), None);
        assert_eq!(parse_content_range(None), None);
    }

    #[test]
    fn html_sniffing() {
        assert!(looks_like_html(b"<!DOCTYPE html><html>"));
        assert!(looks_like_html(b"\xEF\xBB\xBF \r\n\t<HtMl lang=en>"));
        assert!(looks_like_html(b"  <!doctype HTML>"));
        assert!(!looks_like_html(b"\x1f\x8b\x08<html>"));
        assert!(!looks_like_html(b"<htm"));
        assert!(!looks_like_html(b""));
        assert!(is_html_content_type(Some("Text/HTML; charset=utf-8")));
        assert!(!is_html_content_type(Some("application/octet-stream")));
        assert!(!is_html_content_type(None));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(500, 1), Duration::from_millis(500));
        assert_eq!(backoff(500, 2), Duration::from_millis(1000));
        assert_eq!(backoff(500, 4), Duration::from_millis(4000));
        assert_eq!(backoff(500, 40), MAX_BACKOFF);
        assert_eq!(backoff(u64::MAX, 3), MAX_BACKOFF);
    }
}
