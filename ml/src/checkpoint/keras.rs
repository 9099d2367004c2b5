//! Keras weights (`cifar-10-model`'s HDF5, converted to safetensors by `scripts/setup-data.sh`
//! with the HDF5 dataset names as keys, e.g. `conv2d/kernel:0`, optionally with the
//! `model_weights/<layer>/` prefix) → the PyTorch-named variables of
//! [`crate::models::keras_cnn::KerasCifarCnn`].
//!
//! Layouts (shared/notes/offline-data.md §3): conv kernels HWIO → OIHW (`permute(3, 2, 0, 1)`),
//! dense kernels (in, out) → (out, in) (transpose); BN gamma/beta/moving_mean/moving_variance →
//! weight/bias/running_mean/running_var.

use std::collections::BTreeMap;

use tch::Tensor;

/// Keras names contain `/` (layer/param) and usually the `:0` TensorFlow suffix.
pub fn looks_like_keras(sd: &BTreeMap<String, Tensor>) -> bool {
    !sd.is_empty() && sd.keys().all(|k| k.contains('/'))
}

/// Renames and re-lays out a Keras dict. Errors name the first key that does not map.
pub fn to_torch(sd: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, String> {
    let mut out = BTreeMap::new();
    for (key, t) in sd {
        let parts: Vec<&str> = key.split('/').collect();
        let (layer, param) = match parts.as_slice() {
            [.., layer, param] => (*layer, param.trim_end_matches(":0")),
            _ => return Err(format!("Keras key `{key}` is not `<layer>/<param>`")),
        };
        let (name, t) = match (param, t.dim()) {
            ("kernel", 4) => ("weight", t.permute([3, 2, 0, 1]).contiguous()),
            ("kernel", 2) => ("weight", t.transpose(0, 1).contiguous()),
            ("bias", 1) => ("bias", t),
            ("gamma", 1) => ("weight", t),
            ("beta", 1) => ("bias", t),
            ("moving_mean", 1) => ("running_mean", t),
            ("moving_variance", 1) => ("running_var", t),
            _ => return Err(format!("Keras key `{key}` (shape {:?}) has no PyTorch counterpart", t.size())),
        };
        let torch_key = format!("{layer}.{name}");
        if out.insert(torch_key.clone(), t).is_some() {
            return Err(format!("two Keras keys map to `{torch_key}`"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn layouts() {
        let mut sd = BTreeMap::new();
        let k = Tensor::arange(2 * 3 * 4 * 5, (Kind::Float, Device::Cpu)).view([2, 3, 4, 5]); // H W I O
        sd.insert("model_weights/conv2d/conv2d/kernel:0".to_string(), k.shallow_clone());
        sd.insert("dense/kernel:0".to_string(), Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]));
        sd.insert("batch_normalization/moving_variance:0".to_string(), Tensor::ones([5], (Kind::Float, Device::Cpu)));
        assert!(looks_like_keras(&sd));
        let t = to_torch(sd).unwrap();
        let w = &t["conv2d.weight"];
        assert_eq!(w.size(), [5, 4, 2, 3]);
        assert_eq!(w.double_value(&[4, 3, 1, 2]), k.double_value(&[1, 2, 3, 4]));
        assert_eq!(t["dense.weight"].size(), [3, 2]);
        assert!(t.contains_key("batch_normalization.running_var"));
        let mut bad = BTreeMap::new();
        bad.insert("x/weird:0".to_string(), Tensor::ones([1], (Kind::Float, Device::Cpu)));
        assert!(to_torch(bad).unwrap_err().contains("x/weird:0"));
    }
}
