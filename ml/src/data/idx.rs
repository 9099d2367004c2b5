//! IDX files (LeCun's MNIST format, also Fashion-MNIST): a big-endian u32 magic
//! (0x00000803 = u8 images with 3 dims, 0x00000801 = u8 labels with 1 dim), the dims as
//! big-endian u32, then the raw bytes row-major. Gzipped files are detected by their magic
//! bytes; byte offsets in errors then refer to the decompressed stream.

use std::path::Path;

use tch::{Kind, Tensor};

use super::archive::read_maybe_gz;
use super::{Bundle, DataError};

pub const IMAGES_MAGIC: u32 = 0x0000_0803;
pub const LABELS_MAGIC: u32 = 0x0000_0801;

fn be_u32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn where_(gz: bool) -> &'static str {
    if gz {
        " of the decompressed data"
    } else {
        ""
    }
}

/// Parses the header: checks the magic and that the payload has exactly the promised size.
fn parse(path: &Path, b: &[u8], gz: bool, magic: u32, what: &str) -> Result<Vec<usize>, DataError> {
    let ndim = (magic & 0xff) as usize;
    let header = 4 + 4 * ndim;
    if b.len() < 4 {
        return Err(DataError::invalid(
            path,
            Some(b.len() as u64),
            format!("truncated IDX file: no magic number{}", where_(gz)),
        ));
    }
    let found = be_u32(b, 0);
    if found != magic {
        return Err(DataError::invalid(
            path,
            Some(0),
            format!(
                "wrong IDX magic 0x{found:08x}{}: expected 0x{magic:08x} ({what}); is this the right file?",
                where_(gz)
            ),
        ));
    }
    if b.len() < header {
        return Err(DataError::invalid(path, Some(b.len() as u64), format!("truncated IDX header{}", where_(gz))));
    }
    let dims: Vec<usize> = (0..ndim).map(|k| be_u32(b, 4 + 4 * k) as usize).collect();
    let need = dims.iter().product::<usize>();
    let have = b.len() - header;
    if have < need {
        return Err(DataError::invalid(
            path,
            Some(b.len() as u64),
            format!("truncated IDX file: header promises {dims:?} = {need} bytes of data but only {have} follow{}; re-download it", where_(gz)),
        ));
    }
    if have > need {
        return Err(DataError::invalid(
            path,
            Some((header + need) as u64),
            format!("{} unexpected trailing bytes after the {dims:?} payload{}", have - need, where_(gz)),
        ));
    }
    Ok(dims)
}

/// Images as u8 [N, 1, H, W].
pub fn read_images(path: &Path) -> Result<Tensor, DataError> {
    let (b, gz) = read_maybe_gz(path)?;
    let d = parse(path, &b, gz, IMAGES_MAGIC, "u8 images, 3 dims")?;
    Ok(Tensor::from_slice(&b[16..]).view([d[0] as i64, 1, d[1] as i64, d[2] as i64]))
}

/// Labels as i64 [N]; every label must be < `num_classes`.
pub fn read_labels(path: &Path, num_classes: usize) -> Result<Tensor, DataError> {
    let (b, gz) = read_maybe_gz(path)?;
    parse(path, &b, gz, LABELS_MAGIC, "u8 labels, 1 dim")?;
    if let Some(i) = b[8..].iter().position(|&l| l as usize >= num_classes) {
        return Err(DataError::invalid(
            path,
            Some(8 + i as u64),
            format!("label {} of image {i} is out of range 0..{num_classes}{}", b[8 + i], where_(gz)),
        ));
    }
    Ok(Tensor::from_slice(&b[8..]).to_kind(Kind::Int64))
}

/// An IDX image file and its label file as a [`Bundle`].
pub fn read_idx(images: &Path, labels: &Path, classes: Vec<String>) -> Result<Bundle, DataError> {
    let x = read_images(images)?;
    let y = read_labels(labels, classes.len())?;
    let (n, m) = (x.size()[0], y.size()[0]);
    if n != m {
        return Err(DataError::invalid(
            labels,
            None,
            format!("{m} labels but {} holds {n} images; are these files from the same split?", images.display()),
        ));
    }
    Bundle::new(x, y, classes)
}

/// sha256 of the *decompressed* Fashion-MNIST label files (shared/notes/offline-data.md §1):
/// IDX has no place for class names, and cache blobs have no meaningful file names, so the
/// names are chosen by recognising the content.
const FASHION_LABEL_SHA256: [&str; 2] = [
    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", // train-labels
    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", // t10k-labels
];

/// Class names for an IDX label file: Fashion-MNIST's names for the official Fashion-MNIST
/// label files, otherwise the digits "0".."9" (MNIST and anything else with labels < 10).
pub fn class_names_for(labels: &Path) -> Result<Vec<String>, DataError> {
    use sha2::Digest;
    let (b, _) = read_maybe_gz(labels)?;
    let digest: String = sha2::Sha256::digest(&b).iter().map(|x| format!("{x:02x}")).collect();
    let names: &[&str] = if FASHION_LABEL_SHA256.contains(&digest.as_str()) {
        &super::classes::FASHION_MNIST
    } else {
        &super::classes::DIGITS
    };
    Ok(super::classes::owned(names))
}

/// Writes an uncompressed IDX file (tests and fixtures).
pub fn encode(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let magic = 0x0000_0800u32 | dims.len() as u32;
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::classes;
    use std::io::Write;

    fn write(dir: &Path, name: &str, bytes: &[u8], gz: bool) -> std::path::PathBuf {
        let p = dir.join(name);
        if gz {
            let mut e = flate2::write::GzEncoder::new(std::fs::File::create(&p).unwrap(), flate2::Compression::fast());
            e.write_all(bytes).unwrap();
            e.finish().unwrap();
        } else {
            std::fs::write(&p, bytes).unwrap();
        }
        p
    }

    #[test]
    fn reads_plain_and_gz() {
        let d = tempfile::tempdir().unwrap();
        let pix: Vec<u8> = (0..2 * 3 * 4).map(|v| v as u8).collect();
        for gz in [false, true] {
            let im = write(d.path(), "im", &encode(&[2, 3, 4], &pix), gz);
            let lb = write(d.path(), "lb", &encode(&[2], &[7, 1]), gz);
            let b = read_idx(&im, &lb, classes::owned(&classes::DIGITS)).unwrap();
            assert_eq!(b.images.size(), [2, 1, 3, 4]);
            assert_eq!(b.images.int64_value(&[1, 0, 2, 3]), 23);
            assert_eq!(Vec::<i64>::try_from(&b.labels).unwrap(), vec![7, 1]);
        }
    }

    #[test]
    fn errors_name_file_and_offset() {
        let d = tempfile::tempdir().unwrap();
        let digits = || classes::owned(&classes::DIGITS);
        let im = write(d.path(), "im.gz", &encode(&[2, 2, 2], &[0; 7]), true);
        let e = read_images(&im).unwrap_err().to_string();
        assert!(e.contains("im.gz") && e.contains("truncated") && e.contains("at byte 23"), "{e}");

        let lb = write(d.path(), "lb", &encode(&[3], &[1, 10, 2]), false);
        let e = read_labels(&lb, 10).unwrap_err().to_string();
        assert!(e.contains("label 10 of image 1 is out of range 0..10") && e.contains("at byte 9"), "{e}");

        let e = read_images(&lb).unwrap_err().to_string();
        assert!(e.contains("wrong IDX magic 0x00000801") && e.contains("at byte 0"), "{e}");

        let im = write(d.path(), "im2", &encode(&[2, 1, 1], &[0, 0]), false);
        let lb = write(d.path(), "lb2", &encode(&[3], &[0, 0, 0]), false);
        let e = read_idx(&im, &lb, digits()).unwrap_err().to_string();
        assert!(e.contains("3 labels but") && e.contains("holds 2 images"), "{e}");

        let im = write(d.path(), "im3", &encode(&[1, 1, 1], &[0, 9]), false);
        let e = read_images(&im).unwrap_err().to_string();
        assert!(e.contains("1 unexpected trailing bytes"), "{e}");
        assert!(!e.contains('\n'));
    }
}
