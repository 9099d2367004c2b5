//! Data sets: readers for the official layouts and the cached tensor bundle format.
//!
//! * [`bundle`]: [`Bundle`], the safetensors file every data stage writes and reads.
//! * [`idx`]: MNIST/Fashion-MNIST IDX files (gzipped or not).
//! * [`cifar`]: CIFAR-10 binary and python archives (spec §8.4).
//! * [`png_folder`]: foolbox-style `<prefix><index>_<label>.png` sets, as a tar or a directory.
//! * [`subset`]: seeded stratified subsets with a portable RNG.
//!
//! Every error is one line naming the file (and the byte offset where one makes sense).

pub mod archive;
pub mod bundle;
pub mod cifar;
pub mod idx;
pub mod png_folder;
pub mod subset;

use std::path::{Path, PathBuf};

pub use bundle::{Batch, Bundle};

/// Errors of the data readers and the bundle format.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {msg}{}", path.display(), offset.map(|o| format!(" (at byte {o})")).unwrap_or_default())]
    Invalid { path: PathBuf, offset: Option<u64>, msg: String },
}

impl DataError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io { path: path.to_path_buf(), source }
    }

    pub(crate) fn invalid(path: &Path, offset: Option<u64>, msg: impl Into<String>) -> Self {
        DataError::Invalid { path: path.to_path_buf(), offset, msg: msg.into() }
    }
}

/// Class names of the data sets wdro knows, in label order.
pub mod classes {
    /// CIFAR-10 (spec §8.4).
    pub const CIFAR10: [&str; 10] =
        ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];
    /// Fashion-MNIST (Xiao et al. 2017; shared/notes/offline-data.md §1).
    pub const FASHION_MNIST: [&str; 10] =
        ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];
    /// MNIST digits.
    pub const DIGITS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];

    pub fn owned(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }
}
