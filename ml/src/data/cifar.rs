//! CIFAR-10 archives (spec §8.4): `cifar-10-binary.tar.gz` and `cifar-10-python.tar.gz`, or
//! the same trees unpacked into a directory.
//!
//! * Binary: `cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin`, records of 3073 bytes
//!   (label, then 1024 R, 1024 G, 1024 B pixels = CHW), class names in `batches.meta.txt`.
//! * Python: `cifar-10-batches-py/{data_batch_1..5,test_batch}`, pickled dicts with `data`
//!   (a numpy uint8 array 10000×3072, same CHW rows) and `labels` (a list of ints); class
//!   names in `batches.meta` (`label_names`). Read with the data-only pickle reader: the only
//!   globals allowed are numpy's array reconstruction (`_reconstruct`, `ndarray`, `dtype`) and
//!   `_codecs.encode`, which Python 3 uses for bytes in protocol-2 pickles.
//!
//! The training split is `data_batch_1..5` concatenated in that order; test is `test_batch`
//! (file order kept, as torchvision and OC23 do).

use std::path::Path;

use tch::{Kind, Tensor};

use super::archive::{base_name, member_path, read_members};
use super::{classes, Bundle, DataError};
use crate::checkpoint::pickle::{Allow, Obj, Pickle};

const RECORD: usize = 3073;
const PIXELS: usize = 3072;

/// Which batch files make a split.
fn batch_names(archive: &Path, split: &str) -> Result<Vec<String>, DataError> {
    match split {
        "train" => Ok((1..=5).map(|i| format!("data_batch_{i}")).collect()),
        "test" => Ok(vec!["test_batch".to_string()]),
        other => Err(DataError::invalid(archive, None, format!("unknown split {other:?}: use \"train\" or \"test\""))),
    }
}

/// Looks up the members named `names` (base names, in that order) under any directory.
fn pick<'a>(
    archive: &Path,
    members: &'a [(String, Vec<u8>)],
    names: &[String],
    layout: &str,
) -> Result<Vec<(&'a str, &'a [u8])>, DataError> {
    names
        .iter()
        .map(|n| {
            members.iter().find(|(m, _)| base_name(m) == n).map(|(m, d)| (m.as_str(), d.as_slice())).ok_or_else(|| {
                DataError::invalid(archive, None, format!("no member `{n}`: not a {layout} archive (spec §8.4)"))
            })
        })
        .collect()
}

/// Parses one binary batch file: u8 images [N, 3, 32, 32] and i64 labels.
pub fn parse_binary_batch(origin: &Path, bytes: &[u8]) -> Result<(Tensor, Tensor), DataError> {
    // Bytes in whole records; anything after them is a partial (truncated) record.
    let whole = bytes.len() - bytes.len() % RECORD;
    if bytes.is_empty() || whole != bytes.len() {
        return Err(DataError::invalid(
            origin,
            Some(whole as u64),
            format!("size {} is not a positive multiple of the 3073-byte record (truncated?)", bytes.len()),
        ));
    }
    let n = bytes.len() / RECORD;
    let mut labels = Vec::with_capacity(n);
    let mut pixels = Vec::with_capacity(n * PIXELS);
    for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
        if rec[0] > 9 {
            return Err(DataError::invalid(
                origin,
                Some((i * RECORD) as u64),
                format!("label {} of record {i} is out of range 0..10", rec[0]),
            ));
        }
        labels.push(rec[0] as i64);
        pixels.extend_from_slice(&rec[1..]);
    }
    Ok((Tensor::from_slice(&pixels).view([n as i64, 3, 32, 32]), Tensor::from_slice(&labels)))
}

/// Reads the `split` of a CIFAR-10 binary archive.
pub fn read_binary(archive: &Path, split: &str) -> Result<Bundle, DataError> {
    let mut names: Vec<String> = batch_names(archive, split)?.into_iter().map(|n| n + ".bin").collect();
    let wanted = names.clone();
    let members = read_members(archive, &|m| {
        let b = base_name(m);
        b == "batches.meta.txt" || wanted.iter().any(|w| w == b)
    })?;
    names.push("batches.meta.txt".to_string());
    let picked = pick(archive, &members, &names, "CIFAR-10 binary")?;
    let (meta_name, meta) = picked[picked.len() - 1];
    let class_names: Vec<String> =
        String::from_utf8_lossy(meta).lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
    if class_names.len() != 10 {
        return Err(DataError::invalid(
            &member_path(archive, meta_name),
            None,
            format!("expected 10 class names, found {}", class_names.len()),
        ));
    }
    let mut parts = Vec::new();
    for &(name, data) in &picked[..picked.len() - 1] {
        let (x, y) = parse_binary_batch(&member_path(archive, name), data)?;
        parts.push(Bundle::new(x, y, class_names.clone())?);
    }
    Bundle::concat(&parts)
}

/// Globals a CIFAR python batch may name. numpy ≥ 2 writes `numpy._core.multiarray`.
pub const NUMPY_ALLOW: Allow = Allow {
    pairs: &[
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    ],
    label: "numpy-array",
};

/// Bytes of a pickled `bytes`: a bytes object, or Python 3's protocol-2 form
/// `_codecs.encode(str, 'latin1')`.
fn pickled_bytes(o: &Obj) -> Option<std::borrow::Cow<'_, [u8]>> {
    match o {
        Obj::Bytes(b) => Some(std::borrow::Cow::Borrowed(b.as_slice())),
        Obj::Call { args, .. } if o.call_target() == Some(("_codecs", "encode")) => {
            let a = args.as_seq()?;
            let (Obj::Str(s), Some("latin1" | "latin-1")) = (a.first()?, a.get(1).and_then(|e| e.as_text())) else {
                return None;
            };
            s.chars().map(|c| u8::try_from(c as u32).ok()).collect::<Option<Vec<u8>>>().map(std::borrow::Cow::Owned)
        }
        _ => None,
    }
}

/// A pickled numpy uint8 array: `_reconstruct(ndarray, (0,), b'b')` + BUILD state
/// `(version, shape, dtype('u1'), is_fortran, raw bytes)`. Returns (shape, bytes in C order).
pub fn numpy_u8_array(o: &Obj) -> Result<(Vec<i64>, Vec<u8>), String> {
    let target = o.call_target().map(|(m, n)| format!("{m}.{n}"));
    if !matches!(target.as_deref(), Some("numpy.core.multiarray._reconstruct" | "numpy._core.multiarray._reconstruct"))
    {
        return Err(format!("expected a numpy array, found {}", o.kind()));
    }
    let Obj::Call { state: Some(state), .. } = o else {
        return Err("numpy array without state".into());
    };
    let st = state.as_seq().ok_or("numpy array state is not a tuple")?;
    if st.len() != 5 {
        return Err(format!("numpy array state has {} items, expected 5", st.len()));
    }
    let shape: Vec<i64> = st[1]
        .as_seq()
        .ok_or("numpy shape is not a tuple")?
        .iter()
        .map(|d| d.as_int().filter(|&d| d >= 0).ok_or("bad numpy dimension"))
        .collect::<Result<_, _>>()?;
    let dtype = match st[2].call_target() {
        Some(("numpy", "dtype")) => match &st[2] {
            Obj::Call { args, .. } => args.as_seq().and_then(|a| a.first()).and_then(|t| t.as_text()).unwrap_or(""),
            _ => "",
        },
        _ => return Err(format!("numpy dtype is {}", st[2].kind())),
    };
    if dtype != "u1" {
        return Err(format!("numpy dtype {dtype:?} is not supported (CIFAR data is uint8 'u1')"));
    }
    if st[3].as_int() != Some(0) {
        return Err("Fortran-order numpy arrays are not supported".into());
    }
    let raw = pickled_bytes(&st[4]).ok_or("numpy array data is not bytes")?;
    let n: i64 = shape.iter().product();
    if raw.len() as i64 != n {
        return Err(format!("numpy array {shape:?} needs {n} bytes, pickle holds {}", raw.len()));
    }
    Ok((shape, raw.into_owned()))
}

fn parse_pickle(origin: &Path, bytes: &[u8]) -> Result<Obj, DataError> {
    let bad = |e: String| DataError::invalid(origin, None, e);
    Pickle::parse(bytes, &NUMPY_ALLOW).and_then(|p| p.resolve()).map_err(|e| bad(e.to_string()))
}

/// Parses one python batch (the pickled dict).
pub fn parse_python_batch(origin: &Path, bytes: &[u8]) -> Result<(Tensor, Tensor), DataError> {
    let bad = |e: String| DataError::invalid(origin, None, e);
    let d = parse_pickle(origin, bytes)?;
    let data = d.get("data").ok_or_else(|| bad("no key `data` in the batch dict".into()))?;
    let (shape, raw) = numpy_u8_array(data).map_err(|e| bad(format!("`data`: {e}")))?;
    if shape.len() != 2 || shape[1] != PIXELS as i64 {
        return Err(bad(format!("`data` has shape {shape:?}, expected [N, 3072]")));
    }
    let labels =
        d.get("labels").and_then(|l| l.as_seq()).ok_or_else(|| bad("no list `labels` in the batch dict".into()))?;
    let labels: Vec<i64> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| match l.as_int() {
            Some(v @ 0..=9) => Ok(v),
            _ => Err(bad(format!("label {i} is {l:?}, expected an int in 0..10"))),
        })
        .collect::<Result<_, _>>()?;
    if labels.len() as i64 != shape[0] {
        return Err(bad(format!("{} labels for {} images", labels.len(), shape[0])));
    }
    Ok((Tensor::from_slice(&raw).view([shape[0], 3, 32, 32]), Tensor::from_slice(&labels).to_kind(Kind::Int64)))
}

/// Reads the `split` of a CIFAR-10 python archive.
pub fn read_python(archive: &Path, split: &str) -> Result<Bundle, DataError> {
    let mut names = batch_names(archive, split)?;
    let wanted = names.clone();
    let members = read_members(archive, &|m| {
        let b = base_name(m);
        b == "batches.meta" || wanted.iter().any(|w| w == b)
    })?;
    names.push("batches.meta".to_string());
    let picked = pick(archive, &members, &names, "CIFAR-10 python")?;
    let (meta_name, meta) = picked[picked.len() - 1];
    let meta_path = member_path(archive, meta_name);
    let m = parse_pickle(&meta_path, meta)?;
    let class_names: Vec<String> = m
        .get("label_names")
        .and_then(|l| l.as_seq())
        .map(|l| l.iter().filter_map(|s| s.as_text().map(str::to_string)).collect())
        .unwrap_or_default();
    if class_names.len() != 10 {
        return Err(DataError::invalid(&meta_path, None, "expected `label_names` with 10 class names"));
    }
    let mut parts = Vec::new();
    for &(name, data) in &picked[..picked.len() - 1] {
        let (x, y) = parse_python_batch(&member_path(archive, name), data)?;
        parts.push(Bundle::new(x, y, class_names.clone())?);
    }
    Bundle::concat(&parts)
}

/// The standard class names, for callers that build CIFAR bundles from other sources.
pub fn class_names() -> Vec<String> {
    classes::owned(&classes::CIFAR10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_batch_layout_and_errors() {
        let mut b = vec![0u8; 2 * RECORD];
        b[0] = 3;
        b[1] = 11; // record 0, R channel, pixel (0,0)
        b[1 + 1024] = 22; // G channel
        b[RECORD] = 9;
        b[RECORD + 1 + 2048 + 33] = 44; // record 1, B channel, pixel (1,1)
        let (x, y) = parse_binary_batch(Path::new("t.bin"), &b).unwrap();
        assert_eq!(x.size(), [2, 3, 32, 32]);
        assert_eq!(Vec::<i64>::try_from(&y).unwrap(), vec![3, 9]);
        assert_eq!(x.int64_value(&[0, 0, 0, 0]), 11);
        assert_eq!(x.int64_value(&[0, 1, 0, 0]), 22);
        assert_eq!(x.int64_value(&[1, 2, 1, 1]), 44);

        let e = parse_binary_batch(Path::new("t.bin"), &b[..RECORD + 5]).unwrap_err().to_string();
        assert!(
            e.contains("t.bin") && e.contains("multiple of the 3073-byte record") && e.contains("at byte 3073"),
            "{e}"
        );
        b[RECORD] = 10;
        let e = parse_binary_batch(Path::new("t.bin"), &b).unwrap_err().to_string();
        assert!(e.contains("label 10 of record 1") && e.contains("at byte 3073"), "{e}");
    }

    /// The official files are Python-2 pickles: str keys and array data as BINSTRING bytes,
    /// `numpy.core.multiarray._reconstruct`. A 1-image batch written opcode by opcode.
    #[test]
    fn python2_style_batch() {
        let mut p = b"\x80\x02}q\x00(U\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02".to_vec();
        p.extend_from_slice(b"cnumpy\nndarray\nq\x03K\x00\x85U\x01b\x87Rq\x04(K\x01K\x01M\x00\x0c\x86");
        p.extend_from_slice(b"cnumpy\ndtype\nq\x05U\x02u1K\x00K\x01\x87Rq\x06");
        p.extend_from_slice(b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T\x00\x0c\x00\x00");
        p.extend((0..PIXELS).map(|i| (i % 251) as u8));
        p.extend_from_slice(b"tbU\x06labelsq\x07]q\x08K\x07aU\x0bbatch_labelU\x01xu.");
        let (x, y) = parse_python_batch(Path::new("data_batch_1"), &p).unwrap();
        assert_eq!(x.size(), [1, 3, 32, 32]);
        assert_eq!(Vec::<i64>::try_from(&y).unwrap(), vec![7]);
        assert_eq!(x.int64_value(&[0, 2, 31, 31]), (3071 % 251) as i64);
    }

    #[test]
    fn codecs_encode_bytes() {
        let o = Obj::Call {
            func: Box::new(Obj::Global { module: "_codecs".into(), name: "encode".into() }),
            args: Box::new(Obj::Tuple(vec![Obj::Str("a\u{ff}".into()), Obj::Str("latin1".into())])),
            state: None,
        };
        assert_eq!(pickled_bytes(&o).unwrap().as_ref(), &[b'a', 0xff]);
    }

    #[test]
    fn split_names() {
        assert!(batch_names(Path::new("a"), "val").unwrap_err().to_string().contains("unknown split"));
        assert_eq!(batch_names(Path::new("a"), "train").unwrap().len(), 5);
    }
}
