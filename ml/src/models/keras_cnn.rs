//! The pretrained CIFAR-10 CNN of the `cifar-10-model` 7.4.0 wheel (Keras 2.9 HDF5;
//! shared/notes/offline-data.md §3), re-expressed on NCHW tensors.
//!
//! Variable names are the Keras layer names with PyTorch's parameter names
//! (`conv2d.weight`, `batch_normalization_3.running_var`, `dense_2.bias`, …), so the mapping
//! from the HDF5 (`model_weights/conv2d/conv2d/kernel:0`) is a rename plus a layout change
//! (see `checkpoint::keras`).
//!
//! Input range: the Keras model was trained on raw 0..255 pixels. Every other model in the
//! zoo takes [0,1] pixels, so forward multiplies by 255 first: attacks, δ and the transport
//! cost stay in [0,1] units for all models (spec §1.1).
//!
//! Per block: Conv (3×3, valid, bias) → ReLU → BatchNorm(eps 1e-3). Keras momentum 0.15
//! (new = 0.15·old + 0.85·batch) is PyTorch momentum 0.85. The output layer has a ReLU.

use tch::nn::{self, ModuleT};
use tch::Tensor;

use super::layers::{conv2d, linear, BatchNorm2d};

/// Keras `BatchNormalization` defaults of this model, in PyTorch's conventions.
pub const KERAS_BN_EPS: f64 = 1e-3;
pub const KERAS_BN_TORCH_MOMENTUM: f64 = 0.85;

/// Conv layers: (name, in, out); each followed by a BN named `batch_normalization[_k]`.
pub const CONVS: [(&str, i64, i64); 6] = [
    ("conv2d", 3, 64),
    ("conv2d_1", 64, 64),
    ("conv2d_2", 64, 128),
    ("conv2d_3", 128, 128),
    ("conv2d_4", 128, 64),
    ("conv2d_5", 64, 64),
];
/// Dense layers: (name, in, out).
pub const DENSES: [(&str, i64, i64); 3] = [("dense", 64, 1024), ("dense_1", 1024, 512), ("dense_2", 512, 10)];

/// Name of the k-th BN layer, as Keras numbers them.
pub fn bn_name(k: usize) -> String {
    if k == 0 {
        "batch_normalization".to_string()
    } else {
        format!("batch_normalization_{k}")
    }
}

#[derive(Debug)]
pub struct KerasCifarCnn {
    convs: Vec<(nn::Conv2D, BatchNorm2d)>,
    denses: Vec<nn::Linear>,
}

impl KerasCifarCnn {
    pub fn new(p: &nn::Path) -> Self {
        let convs = CONVS
            .iter()
            .enumerate()
            .map(|(k, &(name, i, o))| {
                let bn = BatchNorm2d::with(p / bn_name(k), o, KERAS_BN_EPS, KERAS_BN_TORCH_MOMENTUM);
                (conv2d(p / name, i, o, 3, 1, 0, true), bn)
            })
            .collect();
        let denses = DENSES.iter().map(|&(name, i, o)| linear(p / name, i, o)).collect();
        KerasCifarCnn { convs, denses }
    }
}

impl ModuleT for KerasCifarCnn {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut h = x * 255.0;
        for (k, (conv, bn)) in self.convs.iter().enumerate() {
            h = bn.forward_t(&h.apply(conv).relu(), train);
            // max_pooling2d after blocks 2 and 4 (2×2/2); the third pool is 1×1 (identity).
            if k == 1 || k == 3 {
                h = h.max_pool2d_default(2);
            }
        }
        let mut h = h.flatten(1, -1);
        for (k, d) in self.denses.iter().enumerate() {
            h = h.apply(d).relu();
            if k < 2 {
                h = h.dropout(0.2, train);
            }
        }
        h
    }
}
