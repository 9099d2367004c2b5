//! Digest pins and file hashing.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// What a fetched file must hash to. Written `blake3:<64 hex>` or `sha256:<64 hex>` (sha256
/// because that is what upstream projects publish; blake3 because it is wdro's own digest). An
/// absent pin (or `none`) means: accept whatever arrives and record its blake3, with a warning,
/// because a changed upstream file then goes unnoticed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum Pin {
    #[default]
    None,
    /// Lowercase hex of a 32-byte blake3 digest.
    Blake3(String),
    /// Lowercase hex of a 32-byte sha256 digest.
    Sha256(String),
    /// Lowercase hex of a 16-byte MD5 digest: only because some upstreams publish nothing else
    /// (CIFAR-10's official archives). Weak against tampering; wdro still records the blake3.
    Md5(String),
}

impl Pin {
    /// Parses `blake3:<hex>`, `sha256:<hex>` or `none`/empty. Hex is case-insensitive and
    /// normalised to lowercase so two spellings of one pin key the same.
    pub fn parse(s: &str) -> Result<Pin, String> {
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("none") {
            return Ok(Pin::None);
        }
        let (algo, hex) =
            s.split_once(':').ok_or_else(|| format!("digest {s:?} must look like sha256:<hex> or blake3:<hex>"))?;
        let hex = hex.trim().to_ascii_lowercase();
        let algo = algo.trim().to_ascii_lowercase();
        let want = if algo == "md5" { 32 } else { 64 };
        if hex.len() != want || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("digest {s:?}: expected {want} hex digits after {algo}:, got {}", hex.len()));
        }
        match algo.as_str() {
            "blake3" => Ok(Pin::Blake3(hex)),
            "sha256" => Ok(Pin::Sha256(hex)),
            "md5" => Ok(Pin::Md5(hex)),
            other => Err(format!("digest {s:?}: unknown algorithm {other:?} (use sha256, blake3 or md5)")),
        }
    }

    pub fn is_pinned(&self) -> bool {
        !matches!(self, Pin::None)
    }

    /// Whether checking this pin needs a sha256 of the file.
    pub(crate) fn wants_sha256(&self) -> bool {
        matches!(self, Pin::Sha256(_) | Pin::Md5(_))
    }

    /// `Err((expected, actual))`, both as `algo:hex`, when `d` does not match.
    pub(crate) fn check(&self, d: &Digests) -> Result<(), (String, String)> {
        let (expected, actual) = match self {
            Pin::None => return Ok(()),
            Pin::Blake3(h) => (h, Some(&d.blake3)),
            Pin::Sha256(h) => (h, d.sha256.as_ref()),
            Pin::Md5(h) => (h, d.md5.as_ref()),
        };
        let algo = match self {
            Pin::Blake3(_) => "blake3",
            Pin::Md5(_) => "md5",
            _ => "sha256",
        };
        match actual {
            Some(a) if a == expected => Ok(()),
            a => Err((format!("{algo}:{expected}"), format!("{algo}:{}", a.map_or("?", String::as_str)))),
        }
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pin::None => f.write_str("none"),
            Pin::Blake3(h) => write!(f, "blake3:{h}"),
            Pin::Sha256(h) => write!(f, "sha256:{h}"),
            Pin::Md5(h) => write!(f, "md5:{h}"),
        }
    }
}

impl FromStr for Pin {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Pin::parse(s)
    }
}

impl Serialize for Pin {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Pin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Pin::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Size and digests of a file's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Digests {
    pub bytes: u64,
    pub blake3: String,
    /// Only computed when the pin is sha256 (it costs a second, slower hash).
    pub sha256: Option<String>,
    /// Computed alongside sha256 (for md5 pins).
    pub md5: Option<String>,
}

/// Incremental blake3 (+ optional sha256), fed while copying so files are read once.
pub(crate) struct Hasher {
    b3: blake3::Hasher,
    sha: Option<Sha256>,
    md5: Option<md5::Md5>,
    bytes: u64,
}

impl Hasher {
    pub(crate) fn new(want_sha256: bool) -> Hasher {
        Hasher {
            b3: blake3::Hasher::new(),
            sha: want_sha256.then(Sha256::new),
            md5: want_sha256.then(md5::Md5::new),
            bytes: 0,
        }
    }

    pub(crate) fn update(&mut self, buf: &[u8]) {
        self.b3.update(buf);
        if let Some(s) = &mut self.sha {
            s.update(buf);
        }
        if let Some(m) = &mut self.md5 {
            m.update(buf);
        }
        self.bytes += buf.len() as u64;
    }

    /// Bytes fed so far.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    pub(crate) fn finish(self) -> Digests {
        Digests {
            bytes: self.bytes,
            blake3: self.b3.finalize().to_hex().to_string(),
            sha256: self.sha.map(|s| hex::encode(s.finalize())),
            md5: self.md5.map(|m| hex::encode(m.finalize())),
        }
    }
}

pub(crate) fn hash_file(path: &Path, want_sha256: bool) -> io::Result<Digests> {
    let mut f = File::open(path)?;
    let mut h = Hasher::new(want_sha256);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(h.finish()),
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABC_SHA256: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn parse_and_display_round_trip() {
        let p = Pin::parse(&format!("SHA256:{}", ABC_SHA256.to_uppercase())).unwrap();
        assert_eq!(p, Pin::Sha256(ABC_SHA256.into()));
        assert_eq!(p.to_string(), format!("sha256:{ABC_SHA256}"));
        assert_eq!(Pin::parse("").unwrap(), Pin::None);
        assert_eq!(Pin::parse("none").unwrap(), Pin::None);
        assert!(Pin::parse("md5:abcd").is_err());
        let m = Pin::parse("md5:C32A1D4AB5D03F1284B67883E8D87530").unwrap();
        assert_eq!(m.to_string(), "md5:c32a1d4ab5d03f1284b67883e8d87530");
        assert!(Pin::parse("sha256:abcd").unwrap_err().contains("64 hex"));
        assert!(Pin::parse(&format!("blake3:{}", "g".repeat(64))).is_err());
        assert!(Pin::parse(ABC_SHA256).is_err());
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Pin>(&json).unwrap(), p);
    }

    #[test]
    fn hasher_matches_known_digests_and_checks() {
        let mut h = Hasher::new(true);
        h.update(b"a");
        h.update(b"bc");
        let d = h.finish();
        assert_eq!(d.bytes, 3);
        assert_eq!(d.sha256.as_deref(), Some(ABC_SHA256));
        assert_eq!(d.md5.as_deref(), Some("900150983cd24fb0d6963f7d28e17f72"));
        assert!(Pin::Md5("900150983cd24fb0d6963f7d28e17f72".into()).check(&d).is_ok());
        assert_eq!(d.blake3, blake3::hash(b"abc").to_hex().to_string());
        assert!(Pin::Sha256(ABC_SHA256.into()).check(&d).is_ok());
        assert!(Pin::Blake3(d.blake3.clone()).check(&d).is_ok());
        let (exp, act) = Pin::Blake3("0".repeat(64)).check(&d).unwrap_err();
        assert_eq!(exp, format!("blake3:{}", "0".repeat(64)));
        assert_eq!(act, format!("blake3:{}", d.blake3));
        assert!(Pin::None.check(&d).is_ok());
    }
}
