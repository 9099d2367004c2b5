//! The demo network: 2 conv + 2 dense layers for 28×28 grey images (Fashion-MNIST), trained
//! in-pipeline by the `train` checkpoint source because no pretrained Fashion-MNIST model is
//! available offline (shared/notes/offline-data.md §0).
//!
//! PyTorch equivalent (keys `conv1`, `conv2`, `fc1`, `fc2`):
//! ```text
//! conv1 = Conv2d(c, 32, 5, padding=2); relu; max_pool2d(2)
//! conv2 = Conv2d(32, 64, 5, padding=2); relu; max_pool2d(2)
//! adaptive_avg_pool2d(7)          # identity on 28×28 input; lets 32×32 input work too
//! fc1 = Linear(64*7*7, 128); relu
//! fc2 = Linear(128, num_classes)
//! ```

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
            conv1: conv2d(p / "conv1", in_channels, 32, 5, 1, 2, true),
            conv2: conv2d(p / "conv2", 32, 64, 5, 1, 2, true),
            fc1: linear(p / "fc1", 64 * 7 * 7, 128),
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
