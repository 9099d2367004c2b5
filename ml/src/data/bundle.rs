//! The tensor bundle every data stage produces: a safetensors file with `images` (u8 NCHW for
//! data sets, f32 NCHW in [0,1] for adversarial sets), `labels` (i64 [N]) and metadata
//! `classes` (JSON list of class names).
//!
//! Why safetensors: data-only (no pickle), memory-layout = file-layout, readable from Python
//! (`safetensors.torch.load_file`) for cross-checks, and byte-deterministic for a given content,
//! so equal data sets are one cache blob.

use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use tch::{Device, Kind, Tensor};

use super::DataError;

/// Images + labels + class names. Invariants (checked by [`Bundle::new`] and [`Bundle::load`]):
/// `images` is 4-D NCHW, u8 or f32; `labels` is i64 [N] with the same N; every label is in
/// `0..classes.len()`. Tensors live on the CPU.
#[derive(Debug)]
pub struct Bundle {
    pub images: Tensor,
    pub labels: Tensor,
    pub classes: Vec<String>,
}

/// One batch from [`Bundle::batches`]: rows `start..start + labels.size()[0]`, tensors in the
/// bundle's own kind (narrowed views, no copy).
#[derive(Debug)]
pub struct Batch {
    pub start: usize,
    pub images: Tensor,
    pub labels: Tensor,
}

impl Batch {
    /// Images as f32 in [0,1] on `device` (u8 is divided by 255).
    pub fn to_float(&self, device: Device) -> Tensor {
        to_float(&self.images, device)
    }
}

fn to_float(images: &Tensor, device: Device) -> Tensor {
    match images.kind() {
        Kind::Uint8 => images.to_device(device).to_kind(Kind::Float) / 255.0,
        _ => images.to_device(device).to_kind(Kind::Float),
    }
}

impl Clone for Bundle {
    fn clone(&self) -> Self {
        Bundle { images: self.images.copy(), labels: self.labels.copy(), classes: self.classes.clone() }
    }
}

impl Bundle {
    /// Validates and builds a bundle (errors name `<in-memory bundle>`; see [`Bundle::load`] for files).
    pub fn new(images: Tensor, labels: Tensor, classes: Vec<String>) -> Result<Bundle, DataError> {
        let b = Bundle { images, labels, classes };
        b.validate(Path::new("<in-memory bundle>"))?;
        Ok(b)
    }

    fn validate(&self, path: &Path) -> Result<(), DataError> {
        let bad = |msg: String| DataError::Invalid { path: path.to_path_buf(), offset: None, msg };
        let s = self.images.size();
        if s.len() != 4 {
            return Err(bad(format!("images must be 4-D NCHW, found shape {s:?}")));
        }
        if !matches!(self.images.kind(), Kind::Uint8 | Kind::Float) {
            return Err(bad(format!("images must be u8 or f32, found {:?}", self.images.kind())));
        }
        if self.labels.kind() != Kind::Int64 || self.labels.dim() != 1 {
            return Err(bad(format!(
                "labels must be i64 [N], found {:?} {:?}",
                self.labels.kind(),
                self.labels.size()
            )));
        }
        if self.labels.size()[0] != s[0] {
            return Err(bad(format!("{} images but {} labels", s[0], self.labels.size()[0])));
        }
        if self.classes.is_empty() {
            return Err(bad("no class names".into()));
        }
        if s[0] > 0 {
            let lo = self.labels.min().int64_value(&[]);
            let hi = self.labels.max().int64_value(&[]);
            if lo < 0 || hi >= self.classes.len() as i64 {
                return Err(bad(format!("labels span {lo}..={hi} but there are {} classes", self.classes.len())));
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// [C, H, W] of one image.
    pub fn image_shape(&self) -> [i64; 3] {
        let s = self.images.size();
        [s[1], s[2], s[3]]
    }

    /// All images as f32 in [0,1] on `device` (u8 / 255; f32 bundles pass through).
    pub fn to_float(&self, device: Device) -> Tensor {
        to_float(&self.images, device)
    }

    /// The rows at `index` (i64 [K], any order, repeats allowed), as a new bundle.
    pub fn select(&self, index: &Tensor) -> Bundle {
        let index = index.to_device(Device::Cpu).to_kind(Kind::Int64);
        Bundle {
            images: self.images.index_select(0, &index),
            labels: self.labels.index_select(0, &index),
            classes: self.classes.clone(),
        }
    }

    /// The first `n` rows (all if `n` ≥ len).
    pub fn head(&self, n: usize) -> Bundle {
        let n = n.min(self.len()) as i64;
        Bundle {
            images: self.images.narrow(0, 0, n),
            labels: self.labels.narrow(0, 0, n),
            classes: self.classes.clone(),
        }
    }

    /// Number of images per class, indexed by class.
    pub fn class_counts(&self) -> Vec<i64> {
        let counts = self.labels.bincount::<Tensor>(None, self.classes.len() as i64);
        Vec::<i64>::try_from(&counts).expect("bincount of i64 labels is i64")
    }

    /// Consecutive batches in file order (the last one may be short). Panics if
    /// `batch_size` < 1.
    pub fn batches(&self, batch_size: usize) -> impl Iterator<Item = Batch> + '_ {
        assert!(batch_size >= 1, "batch_size must be >= 1");
        (0..self.len()).step_by(batch_size).map(move |start| {
            let n = batch_size.min(self.len() - start) as i64;
            Batch {
                start,
                images: self.images.narrow(0, start as i64, n),
                labels: self.labels.narrow(0, start as i64, n),
            }
        })
    }

    /// Concatenates bundles with the same classes and image shape/kind (e.g. CIFAR's 5
    /// training batches).
    pub fn concat(parts: &[Bundle]) -> Result<Bundle, DataError> {
        let first = parts.first().ok_or_else(|| DataError::Invalid {
            path: PathBuf::from("<concat>"),
            offset: None,
            msg: "nothing to concatenate".into(),
        })?;
        for p in parts {
            if p.classes != first.classes
                || p.images.kind() != first.images.kind()
                || p.image_shape() != first.image_shape()
            {
                return Err(DataError::Invalid {
                    path: PathBuf::from("<concat>"),
                    offset: None,
                    msg: "parts differ in classes, image kind or image shape".into(),
                });
            }
        }
        let images: Vec<&Tensor> = parts.iter().map(|p| &p.images).collect();
        let labels: Vec<&Tensor> = parts.iter().map(|p| &p.labels).collect();
        Bundle::new(Tensor::cat(&images, 0), Tensor::cat(&labels, 0), first.classes.clone())
    }

    /// Writes the bundle as safetensors (tensors `images`, `labels`; metadata `classes`).
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        let images = self.images.to_device(Device::Cpu).contiguous();
        let labels = self.labels.to_device(Device::Cpu).contiguous();
        let img_bytes = tensor_bytes(&images);
        let lab_bytes = tensor_bytes(&labels);
        let dtype = if images.kind() == Kind::Uint8 { Dtype::U8 } else { Dtype::F32 };
        let shape = |t: &Tensor| t.size().iter().map(|&d| d as usize).collect::<Vec<_>>();
        let views = vec![
            ("images", TensorView::new(dtype, shape(&images), &img_bytes).map_err(|e| st_err(path, e))?),
            ("labels", TensorView::new(Dtype::I64, shape(&labels), &lab_bytes).map_err(|e| st_err(path, e))?),
        ];
        let mut meta = std::collections::HashMap::new();
        meta.insert("classes".to_string(), serde_json::to_string(&self.classes).expect("strings serialize"));
        safetensors::serialize_to_file(views, &Some(meta), path).map_err(|e| st_err(path, e))
    }

    /// Reads and validates a bundle written by [`Bundle::save`] (or any safetensors file with
    /// the same tensors and metadata).
    pub fn load(path: &Path) -> Result<Bundle, DataError> {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| st_err(path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| st_err(path, e))?;
        let bad = |msg: String| DataError::Invalid { path: path.to_path_buf(), offset: None, msg };
        let classes_json = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("classes"))
            .ok_or_else(|| bad("no `classes` metadata (not a wdro data bundle)".into()))?;
        let classes: Vec<String> = serde_json::from_str(classes_json)
            .map_err(|e| bad(format!("metadata `classes` is not a JSON list of strings: {e}")))?;
        let get = |name: &str| -> Result<Tensor, DataError> {
            let v = st.tensor(name).map_err(|_| bad(format!("no tensor `{name}` (not a wdro data bundle)")))?;
            let kind = match v.dtype() {
                Dtype::U8 => Kind::Uint8,
                Dtype::F32 => Kind::Float,
                Dtype::I64 => Kind::Int64,
                other => return Err(bad(format!("tensor `{name}` has unsupported dtype {other:?}"))),
            };
            let shape: Vec<i64> = v.shape().iter().map(|&d| d as i64).collect();
            Tensor::f_from_data_size(v.data(), &shape, kind).map_err(|e| bad(format!("tensor `{name}`: {e}")))
        };
        let b = Bundle { images: get("images")?, labels: get("labels")?, classes };
        b.validate(path)?;
        Ok(b)
    }
}

/// Raw little-endian bytes of a contiguous CPU tensor.
pub(crate) fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let n = t.numel() * t.kind().elt_size_in_bytes();
    let mut out = vec![0u8; n];
    t.copy_data_u8(&mut out, t.numel());
    out
}

fn st_err(path: &Path, e: safetensors::SafeTensorError) -> DataError {
    DataError::Invalid { path: path.to_path_buf(), offset: None, msg: format!("safetensors: {e}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy(n: i64, kind: Kind) -> Bundle {
        let images =
            Tensor::arange(n * 2 * 3 * 3, (Kind::Int64, Device::Cpu)).remainder(256).to_kind(kind).view([n, 2, 3, 3]);
        let labels = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(3);
        Bundle::new(images, labels, vec!["a".into(), "b".into(), "c".into()]).unwrap()
    }

    #[test]
    fn save_load_roundtrip_u8_and_f32() {
        let dir = tempfile::tempdir().unwrap();
        for kind in [Kind::Uint8, Kind::Float] {
            let b = toy(7, kind);
            let p = dir.path().join("b.safetensors");
            b.save(&p).unwrap();
            let c = Bundle::load(&p).unwrap();
            assert_eq!(c.classes, b.classes);
            assert_eq!(c.images.kind(), kind);
            assert!(c.images.equal(&b.images));
            assert!(c.labels.equal(&b.labels));
            // Deterministic bytes: saving again gives the same file.
            let p2 = dir.path().join("b2.safetensors");
            c.save(&p2).unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(&p2).unwrap());
        }
    }

    #[test]
    fn validation_names_the_problem() {
        let images = Tensor::zeros([2, 1, 2, 2], (Kind::Uint8, Device::Cpu));
        let e = Bundle::new(images.shallow_clone(), Tensor::from_slice(&[0i64, 5]), vec!["a".into(), "b".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("labels span 0..=5 but there are 2 classes"), "{e}");
        let e = Bundle::new(images, Tensor::from_slice(&[0i64]), vec!["a".into()]).unwrap_err().to_string();
        assert!(e.contains("2 images but 1 labels"), "{e}");
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("junk.safetensors");
        std::fs::write(&p, b"not safetensors").unwrap();
        let e = Bundle::load(&p).unwrap_err().to_string();
        assert!(e.contains("junk.safetensors"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn batches_select_counts_float() {
        let b = toy(7, Kind::Uint8);
        let sizes: Vec<(usize, i64)> = b.batches(3).map(|x| (x.start, x.labels.size()[0])).collect();
        assert_eq!(sizes, vec![(0, 3), (3, 3), (6, 1)]);
        assert_eq!(b.class_counts(), vec![3, 2, 2]);
        let s = b.select(&Tensor::from_slice(&[6i64, 0]));
        assert_eq!(Vec::<i64>::try_from(&s.labels).unwrap(), vec![0, 0]);
        let f = b.to_float(Device::Cpu);
        assert_eq!(f.kind(), Kind::Float);
        assert!((f.max().double_value(&[]) - 125.0 / 255.0).abs() < 1e-6);
        let c = Bundle::concat(&[b.head(2), b.select(&Tensor::from_slice(&[2i64]))]).unwrap();
        assert_eq!(c.len(), 3);
    }
}
