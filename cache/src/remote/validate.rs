//! Checks on everything read from a remote before it is trusted, and on everything written to
//! one before it leaves the machine.
//!
//! A remote is shared, so its manifests are untrusted input: a name in a manifest later becomes
//! part of a file name in a stage's work directory, and an output kind becomes a file extension.
//! Pulled manifests are therefore bounded in size and count, and every name is checked to be a
//! plain name (no `/`, `\`, `..`, NUL or control characters). Blobs need no such check: their
//! bytes are re-hashed before use.

use crate::digest::StageKey;
use crate::record::{RunRecord, StageRecord};

/// Largest manifest accepted (records are a few KiB: params, digests, small metrics).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Largest run record accepted (a run of 10,000 stages is ~1.5 MiB).
pub const MAX_RUN_BYTES: u64 = 8 << 20;
/// Largest pin object accepted.
pub const MAX_PIN_BYTES: u64 = 4 << 10;
/// Largest blob a manifest may declare (1 TiB).
pub const MAX_BLOB_BYTES: u64 = 1 << 40;
const MAX_ENTRIES: usize = 1024;
const MAX_NAME: usize = 256;
const MAX_KIND: usize = 32;

/// A stage, output, slot or env name that is safe to use in a file name.
pub(crate) fn check_name(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_NAME {
        return Err(format!("{what} has length {} (allowed 1..={MAX_NAME})", s.len()));
    }
    if s.chars().any(|c| c.is_control() || c == '/' || c == '\\') {
        return Err(format!("{what} {s:?} contains a path separator or control character"));
    }
    if s.starts_with('.') || s.contains("..") {
        return Err(format!("{what} {s:?} is a path-traversal or hidden name"));
    }
    Ok(())
}

fn check_kind(s: &str) -> Result<(), String> {
    if s.len() > MAX_KIND || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(format!("output kind {s:?} is not a plain extension ([A-Za-z0-9_-]{{0,{MAX_KIND}}})"));
    }
    Ok(())
}

/// Validates a manifest pulled for `key`.
pub(crate) fn check_manifest(rec: &StageRecord, key: &StageKey) -> Result<(), String> {
    if rec.key != *key {
        return Err(format!("it names key {} but is stored under {}", rec.key.short(), key.short()));
    }
    check_name("stage name", &rec.stage_name)?;
    check_name("stage kind", &rec.stage_id)?;
    if rec.outputs.len() > MAX_ENTRIES || rec.inputs.len() > MAX_ENTRIES || rec.env.len() > MAX_ENTRIES {
        return Err(format!("more than {MAX_ENTRIES} outputs, inputs or env entries"));
    }
    for (name, o) in &rec.outputs {
        check_name("output name", name)?;
        check_kind(&o.kind)?;
        if o.size > MAX_BLOB_BYTES {
            return Err(format!("output {name} declares {} bytes (limit {MAX_BLOB_BYTES})", o.size));
        }
    }
    for slot in rec.inputs.keys() {
        check_name("input slot", slot)?;
    }
    for (k, v) in &rec.env {
        check_name("env key", k)?;
        if v.len() > MAX_NAME {
            return Err(format!("env {k} value is longer than {MAX_NAME}"));
        }
    }
    if rec.wdro_version.len() > MAX_NAME {
        return Err("wdro_version is too long".into());
    }
    Ok(())
}

/// Validates a run record pulled from `runs/<id>.json`.
pub(crate) fn check_run(run: &RunRecord, id: &str) -> Result<(), String> {
    if run.id != id {
        return Err(format!("it names run {} but is stored as {id}", run.id));
    }
    if run.stages.len() > 100_000 {
        return Err("more than 100000 stages".into());
    }
    for (name, _) in &run.stages {
        check_name("stage name", name)?;
    }
    Ok(())
}

/// Finds credentials in text about to be pushed: a URL with user info (`scheme://user:pw@host`)
/// or any of `secrets` (the remote's own keys). Returns a description without the secret.
pub(crate) fn find_secret(text: &str, secrets: &[String]) -> Option<String> {
    if secrets.iter().any(|s| s.len() >= 4 && text.contains(s.as_str())) {
        return Some("the remote's credential".into());
    }
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let after = &rest[i + 3..];
        let end = after.find(|c: char| c == '/' || c == '"' || c.is_whitespace() || c == '?').unwrap_or(after.len());
        let authority = &after[..end];
        if let Some(at) = authority.rfind('@') {
            if authority[..at].contains(':') {
                return Some("a URL with a user name and password".into());
            }
        }
        rest = after;
    }
    None
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::digest::Digest;
    use crate::record::OutputRef;

    fn rec() -> StageRecord {
        let d = Digest::of_bytes(b"x");
        StageRecord {
            key: StageKey(d),
            stage_name: "attack.w2_linf_8".into(),
            stage_id: "attack".into(),
            version: 1,
            params: serde_json::json!({}),
            inputs: [("model".to_string(), d)].into(),
            outputs: [("adv".to_string(), OutputRef { digest: d, size: 1, kind: "safetensors".into() })].into(),
            metrics: serde_json::Value::Null,
            env: BTreeMap::new(),
            wdro_version: "0.1.0".into(),
            finished_at: 0,
            duration_ms: 0,
        }
    }

    #[test]
    fn accepts_a_normal_manifest() {
        let r = rec();
        check_manifest(&r, &r.key).unwrap();
    }

    #[test]
    fn rejects_traversal_kinds_sizes_and_wrong_keys() {
        let bad = |f: &dyn Fn(&mut StageRecord)| {
            let mut r = rec();
            f(&mut r);
            check_manifest(&r, &rec().key).unwrap_err()
        };
        assert!(bad(&|r| r.stage_name = "../../etc".into()).contains("path separator"));
        assert!(bad(&|r| r.stage_name = "..".into()).contains("traversal"));
        assert!(bad(&|r| r.stage_name = "a..b".into()).contains("traversal"));
        let d = Digest::of_bytes(b"x");
        assert!(bad(&|r| {
            r.outputs.insert("o".into(), OutputRef { digest: d, size: 1, kind: "../x".into() });
        })
        .contains("kind"));
        assert!(bad(&|r| {
            r.outputs.insert("o".into(), OutputRef { digest: d, size: MAX_BLOB_BYTES + 1, kind: "".into() });
        })
        .contains("declares"));
        assert!(bad(&|r| {
            r.inputs.insert("a\0b".into(), d);
        })
        .contains("control"));
        assert!(bad(&|r| r.key = StageKey(Digest::of_bytes(b"y"))).contains("stored under"));
    }

    #[test]
    fn finds_credentials() {
        assert!(find_secret(r#"{"sources":["https://bob:hunter2@example.org/x"]}"#, &[]).is_some());
        assert!(find_secret(r#"{"sources":["https://example.org/x?a=b@c"]}"#, &[]).is_none());
        assert!(find_secret(r#"{"sources":["https://token@example.org/x"]}"#, &[]).is_none());
        assert!(find_secret("abc SECRETKEY def", &["SECRETKEY".into()]).is_some());
    }
}
