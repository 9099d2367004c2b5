//! PNG sets in foolbox's layout: files named `<prefix><index>_<label>.png` (e.g.
//! `cifar10_03_0.png`: image 3, label 0; foolbox's own loader takes the label from the last
//! `_` field), read from a tar (how the fetch stage packs a directory source) or a directory.
//! Images are sorted by index; grey images give 1 channel, RGB 3; all must share one shape.

use std::path::Path;

use tch::Tensor;

use super::archive::{base_name, member_path, read_members};
use super::{classes, Bundle, DataError};

/// Default class names for a foolbox prefix: CIFAR-10, Fashion-MNIST and MNIST names; for
/// anything else the labels' decimal strings 0..=max.
pub fn default_classes(prefix: &str, max_label: i64) -> Vec<String> {
    match prefix {
        "cifar10_" => classes::owned(&classes::CIFAR10),
        "fashionMNIST_" => classes::owned(&classes::FASHION_MNIST),
        "mnist_" => classes::owned(&classes::DIGITS),
        _ => (0..=max_label.max(0)).map(|i| i.to_string()).collect(),
    }
}

/// `(index, label)` from `<prefix><index>_<label>.png`.
fn parse_name(base: &str, prefix: &str) -> Option<(u64, i64)> {
    let stem = base.strip_prefix(prefix)?.strip_suffix(".png")?;
    let (idx, label) = stem.rsplit_once('_')?;
    Some((idx.parse().ok()?, label.parse().ok()?))
}

/// Decodes an 8-bit grey or RGB PNG (palette and 16-bit are converted) to CHW u8.
pub fn decode_png(origin: &Path, bytes: &[u8]) -> Result<(Vec<i64>, Vec<u8>), DataError> {
    let bad = |m: String| DataError::invalid(origin, None, m);
    let mut dec = png::Decoder::new(std::io::Cursor::new(bytes));
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = dec.read_info().map_err(|e| bad(format!("not a readable PNG: {e}")))?;
    let mut buf = vec![0; reader.output_buffer_size().ok_or_else(|| bad("PNG too large".into()))?];
    let info = reader.next_frame(&mut buf).map_err(|e| bad(format!("corrupt PNG data: {e}")))?;
    let c = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::Rgb => 3,
        other => return Err(bad(format!("PNG colour type {other:?} is not supported (need grey or RGB, no alpha)"))),
    };
    let (h, w) = (info.height as usize, info.width as usize);
    let hwc = &buf[..h * w * c];
    // HWC → CHW
    let mut chw = vec![0u8; h * w * c];
    for (p, px) in hwc.chunks_exact(c).enumerate() {
        for (ch, &v) in px.iter().enumerate() {
            chw[ch * h * w + p] = v;
        }
    }
    Ok((vec![c as i64, h as i64, w as i64], chw))
}

/// Reads every `<prefix>*_<label>.png` of `path` (tar, tar.gz or directory). `class_names`
/// empty = [`default_classes`].
pub fn read_png_set(path: &Path, prefix: &str, class_names: Vec<String>) -> Result<Bundle, DataError> {
    let members = read_members(path, &|m| parse_name(base_name(m), prefix).is_some())?;
    if members.is_empty() {
        return Err(DataError::invalid(path, None, format!("no files named `{prefix}<index>_<label>.png`")));
    }
    let mut items = Vec::with_capacity(members.len());
    for (name, data) in &members {
        let (idx, label) = parse_name(base_name(name), prefix).expect("filtered above");
        let origin = member_path(path, name);
        let (shape, chw) = decode_png(&origin, data)?;
        items.push((idx, label, shape, chw, name.clone()));
    }
    items.sort_by_key(|t| t.0);
    for w in items.windows(2) {
        if w[0].0 == w[1].0 {
            return Err(DataError::invalid(
                path,
                None,
                format!("two files with index {}: {} and {}", w[0].0, w[0].4, w[1].4),
            ));
        }
    }
    let shape = items[0].2.clone();
    if let Some(odd) = items.iter().find(|t| t.2 != shape) {
        return Err(DataError::invalid(
            &member_path(path, &odd.4),
            None,
            format!("image shape {:?} differs from the first image's {shape:?}", odd.2),
        ));
    }
    let max_label = items.iter().map(|t| t.1).max().unwrap_or(0);
    let class_names = if class_names.is_empty() { default_classes(prefix, max_label) } else { class_names };
    let pixels: Vec<u8> = items.iter().flat_map(|t| t.3.iter().copied()).collect();
    let labels: Vec<i64> = items.iter().map(|t| t.1).collect();
    let n = items.len() as i64;
    let images = Tensor::from_slice(&pixels).view([n, shape[0], shape[1], shape[2]]);
    Bundle::new(images, Tensor::from_slice(&labels), class_names).map_err(|e| match e {
        DataError::Invalid { msg, .. } => DataError::invalid(path, None, msg),
        other => other,
    })
}

/// Encodes CHW u8 as an 8-bit grey or RGB PNG (tests and fixtures).
pub fn encode_png(c: usize, h: usize, w: usize, chw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
        enc.set_color(if c == 1 { png::ColorType::Grayscale } else { png::ColorType::Rgb });
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().expect("in-memory PNG header");
        let mut hwc = vec![0u8; c * h * w];
        for p in 0..h * w {
            for ch in 0..c {
                hwc[p * c + ch] = chw[ch * h * w + p];
            }
        }
        wr.write_image_data(&hwc).expect("in-memory PNG data");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(parse_name("cifar10_03_0.png", "cifar10_"), Some((3, 0)));
        assert_eq!(parse_name("cifar100_03_0.png", "cifar10_"), None);
        assert_eq!(parse_name("cifar10_x_0.png", "cifar10_"), None);
    }

    #[test]
    fn roundtrip_rgb_and_grey_dir() {
        let d = tempfile::tempdir().unwrap();
        let rgb: Vec<u8> = (0..3 * 2 * 4).map(|v| v as u8 * 10).collect();
        std::fs::write(d.path().join("cifar10_01_8.png"), encode_png(3, 2, 4, &rgb)).unwrap();
        std::fs::write(d.path().join("cifar10_00_3.png"), encode_png(3, 2, 4, &[7; 24])).unwrap();
        std::fs::write(d.path().join("mnist_00_7.png"), encode_png(1, 2, 2, &[1, 2, 3, 4])).unwrap();
        let b = read_png_set(d.path(), "cifar10_", vec![]).unwrap();
        assert_eq!(b.images.size(), [2, 3, 2, 4]);
        assert_eq!(Vec::<i64>::try_from(&b.labels).unwrap(), vec![3, 8]);
        assert_eq!(b.classes[3], "cat");
        let got: Vec<u8> = Vec::<u8>::try_from(b.images.get(1).flatten(0, -1)).unwrap();
        assert_eq!(got, rgb);
        let m = read_png_set(d.path(), "mnist_", vec![]).unwrap();
        assert_eq!(m.images.size(), [1, 1, 2, 2]);
        let e = read_png_set(d.path(), "svhn_", vec![]).unwrap_err().to_string();
        assert!(e.contains("no files named `svhn_<index>_<label>.png`"), "{e}");
    }

    #[test]
    fn corrupt_png_names_member() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a_0_1.png"), b"\x89PNG\r\n\x1a\nbroken").unwrap();
        let e = read_png_set(d.path(), "a_", vec![]).unwrap_err().to_string();
        assert!(e.contains("a_0_1.png") && !e.contains('\n'), "{e}");
    }
}
