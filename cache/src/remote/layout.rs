//! Where things live on a remote, independent of the local sled index:
//!
//! ```text
//! <prefix>/blobs/ab/abcdef…            immutable blob, named by its blake3 digest
//! <prefix>/manifests/ab/abcdef….json   StageRecord JSON, named by its stage key (first writer wins)
//! <prefix>/runs/<run id>.json          RunRecord JSON (immutable, for gc reachability)
//! <prefix>/pins/<name>.json            {"name": …, "run": <run id>} (a mutable pointer)
//! <prefix>/conflicts/<key>/<digest>.json   a different manifest someone tried to push for <key>
//! <prefix>/probe/<pid>-<nanos>         short-lived object of the conditional-put probe
//! <prefix>/leases/<key>/g<gen>.json   a lease generation on a stage key (see `lease`), deleted on release
//! ```
//!
//! Two-character fan-out keeps directories small on file and WebDAV remotes (as in Pants'
//! `base/xx/yy` and the local `blobs/ab/` tier).

use object_store::path::Path;

use crate::digest::{Digest, StageKey};

pub(crate) fn join(prefix: &Path, rel: &str) -> Path {
    let mut p = prefix.clone();
    for part in rel.split('/').filter(|s| !s.is_empty()) {
        p = p.clone().join(part);
    }
    p
}

pub(crate) fn blob(prefix: &Path, d: &Digest) -> Path {
    let h = d.to_hex();
    join(prefix, &format!("blobs/{}/{h}", &h[..2]))
}

pub(crate) fn manifest(prefix: &Path, k: &StageKey) -> Path {
    let h = k.to_string();
    join(prefix, &format!("manifests/{}/{h}.json", &h[..2]))
}

pub(crate) fn run(prefix: &Path, id: &str) -> Path {
    join(prefix, &format!("runs/{id}.json"))
}

pub(crate) fn pin(prefix: &Path, name: &str) -> Path {
    join(prefix, &format!("pins/{name}.json"))
}

pub(crate) fn conflict(prefix: &Path, k: &StageKey, d: &Digest) -> Path {
    join(prefix, &format!("conflicts/{k}/{d}.json"))
}

pub(crate) fn probe(prefix: &Path, tag: &str) -> Path {
    join(prefix, &format!("probe/{tag}"))
}

/// Relative to the prefix (what `Shared::list` takes).
pub(crate) fn lease_dir(k: &StageKey) -> String {
    format!("leases/{k}")
}

/// Zero-padded so that names sort by generation on every backend.
pub(crate) fn lease(prefix: &Path, k: &StageKey, gen: u64) -> Path {
    join(prefix, &format!("leases/{k}/g{gen:010}.json"))
}

/// The last path segment without `.json`, for listing runs, pins and manifests.
pub(crate) fn stem(p: &Path) -> Option<String> {
    let name = p.filename()?;
    Some(name.strip_suffix(".json").unwrap_or(name).to_string())
}

/// A name that may become one path segment on every backend: run ids and pin names.
pub(crate) fn is_safe_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let p = Path::from("team/cache");
        let d = Digest::of_bytes(b"x");
        let h = d.to_hex();
        assert_eq!(blob(&p, &d).as_ref(), format!("team/cache/blobs/{}/{h}", &h[..2]));
        assert_eq!(manifest(&p, &StageKey(d)).as_ref(), format!("team/cache/manifests/{}/{h}.json", &h[..2]));
        assert_eq!(run(&Path::default(), "20261125T2200-1").as_ref(), "runs/20261125T2200-1.json");
        assert_eq!(stem(&pin(&p, "paper")).as_deref(), Some("paper"));
        assert_eq!(lease(&p, &StageKey(d), 3).as_ref(), format!("team/cache/leases/{h}/g0000000003.json"));
        assert!(is_safe_segment("20251125T220000.000Z-42"));
        assert!(!is_safe_segment("../x") && !is_safe_segment("a/b") && !is_safe_segment(".."));
    }
}
