//! Content digests. Every artifact and every stage key is a blake3 digest; the newtypes keep the
//! two from being confused (a `StageKey` names a computation, a `Digest` names bytes).

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Buffers above this size are hashed with blake3's rayon-parallel tree mode; below it the
/// thread hand-off costs more than it saves (blake3 docs recommend ~128 KiB as the crossover).
const PARALLEL_HASH_MIN: usize = 128 * 1024;

/// A blake3 digest of some bytes, shown as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Hashes a byte slice (multi-threaded for large inputs).
    pub fn of_bytes(bytes: &[u8]) -> Digest {
        let mut h = blake3::Hasher::new();
        if bytes.len() >= PARALLEL_HASH_MIN {
            h.update_rayon(bytes);
        } else {
            h.update(bytes);
        }
        Digest(*h.finalize().as_bytes())
    }

    /// Hashes a file by streaming it (memory-mapped through blake3 where possible).
    pub fn of_file(path: &Path) -> std::io::Result<Digest> {
        let mut h = blake3::Hasher::new();
        match h.update_mmap_rayon(path) {
            Ok(_) => Ok(Digest(*h.finalize().as_bytes())),
            Err(_) => {
                let mut h = blake3::Hasher::new();
                let mut f = std::fs::File::open(path)?;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                Ok(Digest(*h.finalize().as_bytes()))
            }
        }
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex characters, for human-facing tables.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

/// Error for a string that is not 64 hex characters.
#[derive(Debug, thiserror::Error)]
#[error("not a blake3 digest (want 64 hex characters): {0:?}")]
pub struct BadDigest(pub String);

impl FromStr for Digest {
    type Err = BadDigest;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        if s.len() != 64 || hex::decode_to_slice(s, &mut out).is_err() {
            return Err(BadDigest(s.chars().take(80).collect()));
        }
        Ok(Digest(out))
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The key of one stage computation: blake3 over its id, version, declared params, input
/// digests and environment (see `wdro-pipeline`'s `key` module). Same encoding as `Digest`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StageKey(pub Digest);

impl StageKey {
    pub fn short(&self) -> String {
        self.0.short()
    }
}

impl fmt::Display for StageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for StageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StageKey({})", self.0.short())
    }
}

impl FromStr for StageKey {
    type Err = BadDigest;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(StageKey(s.parse()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        // blake3 of the empty input, from the blake3 test vectors.
        assert_eq!(Digest::of_bytes(b"").to_hex(), "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262");
    }

    #[test]
    fn parallel_and_serial_agree() {
        let big: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7) as u8).collect();
        let serial = Digest(*blake3::hash(&big).as_bytes());
        assert_eq!(Digest::of_bytes(&big), serial);
    }

    #[test]
    fn hex_roundtrip_and_rejects() {
        let d = Digest::of_bytes(b"abc");
        assert_eq!(d.to_hex().parse::<Digest>().unwrap(), d);
        assert!("xyz".parse::<Digest>().is_err());
        assert!(d.to_hex()[..63].parse::<Digest>().is_err());
    }
}
