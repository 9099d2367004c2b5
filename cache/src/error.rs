use std::path::PathBuf;

use crate::digest::{Digest, StageKey};

/// Errors of the artifact store. Each message names the thing and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache blob {digest} is corrupt (its bytes hash to {actual}); it was quarantined, rerun to recompute it")]
    Corrupt { digest: Digest, actual: Digest },
    #[error("cache blob {0} is missing; rerun to recompute it (or `wdro pull` it from a remote)")]
    MissingBlob(Digest),
    #[error("no stage record for key {0} in the cache")]
    MissingRecord(StageKey),
    #[error("the cache at {path} is in use by {holder}; rerun without --no-wait to wait for it")]
    Locked { path: PathBuf, holder: String },
    #[error("cache index at {path} cannot be opened: {source}")]
    Index {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("cache index error: {0}")]
    Sled(#[from] sled::Error),
    #[error("cache record {what} is unreadable ({source}); `wdro cache verify` lists it, `wdro cache gc` drops it")]
    BadRecord {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cache I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = CacheError> = std::result::Result<T, E>;

pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CacheError {
    let path = path.into();
    move |source| CacheError::Io { path, source }
}
