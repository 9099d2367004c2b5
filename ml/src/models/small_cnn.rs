//! The demo network: 2 conv + 2 dense layers for 28×28 grey images (Fashion-MNIST), trained
//! in-pipeline by the `train` checkpoint source because no pretrained Fashion-MNIST model is
//! available offline (shared/notes/offline-data.md §0).
//!
//! PyTorch equivalent (keys `conv1`, `conv2`, `fc1`, `fc2`):
//! ```text
//! conv1 = Conv2d(c, 16, 3, padding=1); relu; max_pool2d(2)
//! conv2 = Conv2d(16, 32, 3, padding=1); relu; max_pool2d(2)
//! adaptive_avg_pool2d(7)          # identity on 28×28 input; lets 32×32 input work too
//! fc1 = Linear(32*7*7, 128); relu
//! fc2 = Linear(128, num_classes)
//! ```
//!
//! Size: 206,922 parameters, about 1.2M multiply-adds per 28×28 image, so training fits the
//! 2-core CPU machines: one Fashion-MNIST epoch (60k images, batch 128) measured 20–26
//! CPU-seconds with one libtorch thread (wall 54 s on a machine loaded ~4× over its 2 cores),
//! reaching 85.6 % test accuracy after that one epoch (lr 0.05, momentum 0.9, wd 5e-4, seed 0).
//! A first version with 32/64 channels and 5×5 kernels needs ~9× the multiply-adds.

use tch::{nn, Tensor};

use super::layers::{conv2d, linear};

#[derive(Debug)]
pub struct SmallCnn {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl SmallCnn {
    pub fn new(p: &nn::Path, in_channels: i64, num_classes: i64) -> Self {
        SmallCnn {
            conv1: conv2d(p / "conv1", in_channels, 16, 3, 1, 1, true),
            conv2: conv2d(p / "conv2", 16, 32, 3, 1, 1, true),
            fc1: linear(p / "fc1", 32 * 7 * 7, 128),
            fc2: linear(p / "fc2", 128, num_classes),
        }
    }
}

impl nn::ModuleT for SmallCnn {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Tensor {
        let h = x.apply(&self.conv1).relu().max_pool2d_default(2);
        let h = h.apply(&self.conv2).relu().max_pool2d_default(2);
        let h = if h.size()[2..] == [7, 7] { h } else { h.adaptive_avg_pool2d([7, 7]) };
        h.flatten(1, -1).apply(&self.fc1).relu().apply(&self.fc2)
    }
}
