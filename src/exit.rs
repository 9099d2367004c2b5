//! Exit codes, distinct and documented (README "Exit codes"), so scripts and CI can branch.

/// A robustness gate failed (`wdro eval --gate`).
#[allow(dead_code)]
pub const GATE_FAILED: i32 = 1;
/// Bad command line or config.
pub const USAGE: i32 = 2;
/// Data or network problem (a download, a missing or malformed file).
pub const DATA: i32 = 3;
/// A stage failed for another reason.
pub const STAGE_FAILED: i32 = 4;
/// The cache is held by another wdro and `--no-wait` was given.
pub const BUSY: i32 = 5;
/// `--frozen` and something would have to be computed.
pub const FROZEN: i32 = 6;

/// Errors the CLI raises itself carry their exit code.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct Coded {
    pub code: i32,
    pub msg: String,
}

pub fn coded(code: i32, msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Coded { code, msg: msg.into() })
}

/// Picks the exit code for an error.
pub fn classify(e: &anyhow::Error) -> i32 {
    if let Some(c) = e.downcast_ref::<Coded>() {
        return c.code;
    }
    if e.downcast_ref::<wdro_stages::config::ConfigError>().is_some() {
        return USAGE;
    }
    if let Some(c) = e.downcast_ref::<wdro_cache::CacheError>() {
        if matches!(c, wdro_cache::CacheError::Locked { .. }) {
            return BUSY;
        }
    }
    STAGE_FAILED
}
