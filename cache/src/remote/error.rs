//! Errors of the remote cache. Every message names the remote by its *redacted* URL (no user
//! info, no query string) and passes backend messages through [`super::url::Redactor`], so a
//! credential never reaches a log line, an error or a JSON event.

use crate::digest::{Digest, StageKey};
use crate::error::CacheError;

/// What went wrong talking to a remote cache.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    #[error("remote URL {url}: {msg}")]
    BadUrl { url: String, msg: String },
    #[error("remote {remote}: {op} {path}: {msg}")]
    Backend { remote: String, op: &'static str, path: String, msg: String },
    #[error("remote {remote}: blob {digest} is corrupt (its bytes hash to {actual}); refused, nothing stored")]
    Corrupt { remote: String, digest: Digest, actual: Digest },
    #[error("remote {remote}: blob {digest} has {actual} bytes where its manifest says {expected}; refused")]
    WrongSize { remote: String, digest: Digest, expected: u64, actual: u64 },
    #[error("remote {remote}: blob {digest} is missing (evicted or never fully pushed)")]
    MissingBlob { remote: String, digest: Digest },
    #[error("remote {remote}: no manifest for stage key {key}")]
    MissingManifest { remote: String, key: StageKey },
    #[error("remote {remote}: {what} is invalid ({msg}); ignored")]
    Invalid { remote: String, what: String, msg: String },
    #[error("remote {remote} is read-only (mode = \"read-only\"); pushing needs mode = \"read-write\"")]
    ReadOnly { remote: String },
    #[error("refusing to push {what}: it contains {hint}; remove the credential from the config")]
    Secret { what: String, hint: String },
    #[error("local blob {digest} is corrupt (hashes to {actual}); not pushed — `wdro cache verify` quarantines it")]
    LocalCorrupt { digest: Digest, actual: Digest },
    #[error("remote {remote}: I/O on {path}: {source}")]
    Io {
        remote: String,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Local(#[from] CacheError),
}

impl RemoteError {
    /// True for the integrity failures of a pulled blob (corrupt, wrong size, missing): the
    /// caller refuses the remote hit and recomputes the stage.
    pub fn is_integrity(&self) -> bool {
        matches!(self, RemoteError::Corrupt { .. } | RemoteError::WrongSize { .. } | RemoteError::MissingBlob { .. })
    }
}

pub type RemoteResult<T> = std::result::Result<T, RemoteError>;
