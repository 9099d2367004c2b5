//! `wdro-cache`: the content-addressed artifact store behind every wdro stage.
//!
//! * **Blobs** are immutable byte strings named by their blake3 [`Digest`]. They are verified on
//!   every read; a blob whose bytes no longer hash to its name is quarantined and reported as
//!   [`CacheError::Corrupt`], never returned.
//! * **Stage records** ([`StageRecord`]) map a [`StageKey`] to the digests of the stage's outputs
//!   plus its params, metrics and timings. **Run records** list the keys one `wdro run` used, so
//!   `gc` can keep what recent runs and pins reach.
//! * [`Store::verify`] rehashes everything, [`Store::du`] says where the bytes are and
//!   [`Store::gc`] drops what neither the last N runs nor a pin reaches (see [`maint`]).
//! * The index is a sled database; the layout (blobs by digest, small manifests by key) maps 1:1
//!   onto a remote store: [`Remote`] shares blobs and manifests with a team through a directory,
//!   HTTP/WebDAV or S3 (see [`remote`]), verifying every pulled blob before it is stored.
//!
//! This crate knows bytes, digests and manifests. It never knows torch.
//!
//! ```no_run
//! let store = wdro_cache::Store::open(std::path::Path::new(".wdro/cache"), wdro_cache::LockWait::NoWait).unwrap();
//! let d = store.put_bytes(b"hello").unwrap();
//! assert_eq!(store.get_bytes(&d).unwrap(), b"hello");
//! ```

pub mod digest;
pub mod error;
pub mod lock;
pub mod maint;
pub mod record;
pub mod remote;
pub mod store;

pub use digest::{Digest, StageKey};
pub use error::{CacheError, Result};
pub use maint::{
    CorruptBlob, DuReport, GcItem, GcOptions, GcReason, GcReport, GcTarget, IncompleteRecord, StageUsage, Unreadable,
    VerifyReport,
};
pub use record::{OutputRef, RunRecord, StageRecord};
pub use remote::{
    Backend, CondPut, Lease, LeaseInfo, LeaseOptions, Leased, ManifestPut, PushSummary, PushedStage, Remote,
    RemoteError, RemoteMode, RemoteOptions, TransferStats,
};
pub use store::{LockWait, Store, StoreOptions, Tier, FILE_TIER_MIN};
