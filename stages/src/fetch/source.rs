//! Source strings → where to read from, what to call the file, and how to show the source
//! without leaking credentials.

use std::path::{Path, PathBuf};

use super::FetchError;

/// One entry of `sources`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// `http://` or `https://`. `url` is the string as written (it may carry `user:pass@`, which
    /// ureq turns into a Basic `Authorization` header); `shown` is the redacted form, the only one
    /// that may appear in errors, metrics, params or progress messages.
    Http { url: String, shown: String },
    /// A local file or directory: `file:PATH`, `file:///abs` or a plain path.
    Local { path: PathBuf, shown: String },
}

impl Source {
    pub(crate) fn parse(s: &str) -> Result<Source, FetchError> {
        let trimmed = s.trim();
        if trimmed.is_empty() {
            return Err(FetchError::BadSource { given: String::new(), why: "empty source".into() });
        }
        let lower = trimmed.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            let shown = redact_url(trimmed);
            let parsed = url::Url::parse(trimmed)
                .map_err(|e| FetchError::BadSource { given: shown.clone(), why: format!("not a valid URL ({e})") })?;
            if parsed.host_str().is_none_or(str::is_empty) {
                return Err(FetchError::BadSource { given: shown, why: "URL has no host".into() });
            }
            return Ok(Source::Http { url: trimmed.to_string(), shown });
        }
        if lower.starts_with("file://") {
            // The URL form: percent-escapes are decoded and only an empty or `localhost` host is
            // accepted, as `file://` URLs mean elsewhere.
            let path = url::Url::parse(trimmed).ok().and_then(|u| u.to_file_path().ok()).ok_or_else(|| {
                FetchError::BadSource {
                    given: trimmed.to_string(),
                    why: "a file:// URL must be file:///absolute/path (or use file:relative/path)".into(),
                }
            })?;
            return Ok(Source::Local { path, shown: trimmed.to_string() });
        }
        if lower.starts_with("file:") {
            // `file:PATH`: the rest is taken literally, relative paths against the working directory.
            let path = &trimmed["file:".len()..];
            if path.is_empty() {
                return Err(FetchError::BadSource { given: trimmed.to_string(), why: "no path after file:".into() });
            }
            return Ok(Source::Local { path: PathBuf::from(path), shown: trimmed.to_string() });
        }
        if let Some((scheme, _)) = trimmed.split_once("://") {
            if !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) {
                return Err(FetchError::BadSource {
                    given: redact_url(trimmed),
                    why: format!(
                        "unsupported scheme {scheme:?}: use https://, http://, file: or a plain path (download other \
                         schemes yourself and use a file: source with the same digest)"
                    ),
                });
            }
        }
        Ok(Source::Local { path: PathBuf::from(trimmed), shown: trimmed.to_string() })
    }

    /// The form safe to print.
    pub(crate) fn shown(&self) -> &str {
        match self {
            Source::Http { shown, .. } | Source::Local { shown, .. } => shown,
        }
    }

    pub(crate) fn is_network(&self) -> bool {
        matches!(self, Source::Http { .. })
    }
}

/// Replaces the userinfo of a URL (`https://user:pass@host/…` → `https://***@host/…`). Works on
/// the raw string, so even a URL too malformed to parse never leaks its credentials.
pub fn redact_url(s: &str) -> String {
    let Some(scheme_end) = s.find("://") else { return s.to_string() };
    let auth_start = scheme_end + 3;
    let rest = &s[auth_start..];
    let auth_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..auth_len].rfind('@') {
        Some(at) => format!("{}***{}", &s[..auth_start], &rest[at..]),
        None => s.to_string(),
    }
}

/// Removes every trace of `raw`'s credentials from `msg` (a message built from a library error
/// that may have formatted the URL itself).
pub(crate) fn scrub(msg: &str, raw: &str) -> String {
    let Some(scheme_end) = raw.find("://") else { return msg.to_string() };
    let rest = &raw[scheme_end + 3..];
    let auth_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..auth_len].rfind('@') else { return msg.to_string() };
    let userinfo = &rest[..at];
    let mut out = msg.replace(&format!("{userinfo}@"), "***@");
    for secret in [userinfo, userinfo.split_once(':').map_or("", |(_, p)| p)] {
        if secret.len() >= 3 {
            out = out.replace(secret, "***");
        }
    }
    out
}

/// Name of the output file for a URL: the last path segment, percent-decoded and made safe;
/// `download` when the URL has none (e.g. `https://host/` or `…/uc?id=…` gives `uc`).
pub(crate) fn url_file_name(url: &str) -> String {
    let last = url::Url::parse(url)
        .ok()
        .and_then(|u| u.path_segments().and_then(|mut s| s.next_back().map(str::to_string)))
        .unwrap_or_default();
    sanitize(&percent_decode(&last)).unwrap_or_else(|| "download".to_string())
}

/// Name of the output file for a local source: its file name, `<dir>.tar` for a directory.
pub(crate) fn local_file_name(path: &Path, is_dir: bool) -> String {
    let base = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .or_else(|| {
            std::fs::canonicalize(path).ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        })
        .and_then(|n| sanitize(&n));
    match (base, is_dir) {
        (Some(b), true) => format!("{b}.tar"),
        (Some(b), false) => b,
        (None, true) => "dir.tar".to_string(),
        (None, false) => "file".to_string(),
    }
}

/// A file name that cannot escape `out_dir` or confuse a terminal.
fn sanitize(name: &str) -> Option<String> {
    let cleaned: String =
        name.chars().map(|c| if c == '/' || c == '\\' || c.is_control() { '_' } else { c }).take(200).collect();
    let cleaned = cleaned.trim().to_string();
    if cleaned.is_empty() || cleaned == "." || cleaned == ".." {
        None
    } else {
        Some(cleaned)
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() && b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit() {
            let hex = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
            out.push(hex(b[i + 1]) * 16 + hex(b[i + 2]));
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kinds() {
        assert!(matches!(Source::parse("https://h/x.bin").unwrap(), Source::Http { .. }));
        assert!(matches!(Source::parse("HTTP://h/x.bin").unwrap(), Source::Http { .. }));
        assert_eq!(
            Source::parse("file:data/x.bin").unwrap(),
            Source::Local { path: "data/x.bin".into(), shown: "file:data/x.bin".into() }
        );
        assert_eq!(
            Source::parse("file:///abs/a%20b.bin").unwrap(),
            Source::Local { path: "/abs/a b.bin".into(), shown: "file:///abs/a%20b.bin".into() }
        );
        assert_eq!(Source::parse("/abs/x").unwrap(), Source::Local { path: "/abs/x".into(), shown: "/abs/x".into() });
        assert!(Source::parse("file://otherhost/x").is_err());
        assert!(Source::parse("ftp://h/x").unwrap_err().to_string().contains("unsupported scheme"));
        assert!(Source::parse("").is_err());
        assert!(Source::parse("https://").is_err());
    }

    #[test]
    fn redacts_userinfo() {
        assert_eq!(redact_url("https://u:p@host/a/b?c=d"), "https://***@host/a/b?c=d");
        assert_eq!(redact_url("https://u@host"), "https://***@host");
        assert_eq!(redact_url("https://host/a@b"), "https://host/a@b");
        assert_eq!(redact_url("https://u:p@ss@host/x"), "https://***@host/x");
        assert_eq!(redact_url("/plain/path"), "/plain/path");
        let s = Source::parse("https://alice:s3cret@host/f.bin").unwrap();
        assert_eq!(s.shown(), "https://***@host/f.bin");
    }

    #[test]
    fn scrub_removes_credentials_anywhere() {
        let raw = "https://alice:s3cret@host/f";
        assert_eq!(scrub("GET https://alice:s3cret@host/f: failed", raw), "GET https://***@host/f: failed");
        assert_eq!(scrub("password s3cret rejected", raw), "password *** rejected");
        assert_eq!(scrub("nothing here", "https://host/f"), "nothing here");
    }

    #[test]
    fn file_names() {
        assert_eq!(url_file_name("https://h/a/cifar-10-binary.tar.gz"), "cifar-10-binary.tar.gz");
        assert_eq!(url_file_name("https://h/a/b%20c.pt?x=1#y"), "b c.pt");
        assert_eq!(url_file_name("https://h/a/%2e%2e"), "download");
        assert_eq!(url_file_name("https://h/a/x%2Fy"), "x_y");
        assert_eq!(url_file_name("https://h/"), "download");
        assert_eq!(url_file_name("https://drive.google.com/uc?id=1&export=download"), "uc");
        assert_eq!(local_file_name(Path::new("/d/model.pt"), false), "model.pt");
        assert_eq!(local_file_name(Path::new("/d/imgs"), true), "imgs.tar");
        assert_eq!(percent_decode("a%zzb%4"), "a%zzb%4");
    }
}
