//! RobustBench `wide_resnet.py` (the TRADES-style WRN; spec §7.3). Keys: `conv1`,
//! `block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2,convShortcut}`, `bn1`, `fc`, and with
//! `sub_block1` a fourth group `sub_block1.layer.{i}…` that exists only so its checkpoint
//! weights load: RobustBench never calls it in forward.

use tch::nn::{self, ModuleT};
use tch::Tensor;

use super::layers::{conv2d, linear, BatchNorm2d, Normalize};

#[derive(Debug)]
struct BasicBlock {
    bn1: BatchNorm2d,
    conv1: nn::Conv2D,
    bn2: BatchNorm2d,
    conv2: nn::Conv2D,
    /// Present iff in ≠ out ("not equalInOut"); applied to the *activated* input.
    conv_shortcut: Option<nn::Conv2D>,
}

impl BasicBlock {
    fn new(p: nn::Path, i: i64, o: i64, stride: i64) -> Self {
        BasicBlock {
            bn1: BatchNorm2d::new(&p / "bn1", i),
            conv1: conv2d(&p / "conv1", i, o, 3, stride, 1, false),
            bn2: BatchNorm2d::new(&p / "bn2", o),
            conv2: conv2d(&p / "conv2", o, o, 3, 1, 1, false),
            conv_shortcut: (i != o).then(|| conv2d(&p / "convShortcut", i, o, 1, stride, 0, false)),
        }
    }
}

impl ModuleT for BasicBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let a = self.bn1.forward_t(x, train).relu();
        let h = a.apply(&self.conv1);
        let h = self.bn2.forward_t(&h, train).relu().apply(&self.conv2);
        match &self.conv_shortcut {
            Some(sc) => a.apply(sc) + h,
            None => x + h,
        }
    }
}

/// `NetworkBlock`: `n` blocks under `<name>.layer.{i}`.
fn network_block(p: nn::Path, n: i64, i: i64, o: i64, stride: i64) -> Vec<BasicBlock> {
    let layer = &p / "layer";
    (0..n)
        .map(|k| {
            let (bi, bs) = if k == 0 { (i, stride) } else { (o, 1) };
            BasicBlock::new(&layer / k, bi, o, bs)
        })
        .collect()
}

#[derive(Debug)]
pub struct WideResNet {
    normalize: Option<Normalize>,
    conv1: nn::Conv2D,
    blocks: [Vec<BasicBlock>; 3],
    /// Loaded, never run (see module docs).
    _sub_block1: Option<Vec<BasicBlock>>,
    bn1: BatchNorm2d,
    fc: nn::Linear,
}

impl WideResNet {
    /// Panics on a depth that is not 6n + 4 (RobustBench asserts the same); [`super::build`]
    /// checks the arch first so users get an error instead.
    pub fn new(p: &nn::Path, depth: i64, widen: i64, sub_block1: bool, normalize: Option<Normalize>) -> Self {
        assert!(depth >= 10 && (depth - 4) % 6 == 0, "WideResNet depth must be 6n+4");
        let n = (depth - 4) / 6;
        let c = [16, 16 * widen, 32 * widen, 64 * widen];
        WideResNet {
            normalize,
            conv1: conv2d(p / "conv1", 3, c[0], 3, 1, 1, false),
            blocks: [
                network_block(p / "block1", n, c[0], c[1], 1),
                network_block(p / "block2", n, c[1], c[2], 2),
                network_block(p / "block3", n, c[2], c[3], 2),
            ],
            _sub_block1: sub_block1.then(|| network_block(p / "sub_block1", n, c[0], c[1], 1)),
            bn1: BatchNorm2d::new(p / "bn1", c[3]),
            fc: linear(p / "fc", c[3], 10),
        }
    }
}

impl ModuleT for WideResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let x = match &self.normalize {
            Some(n) => n.apply(x),
            None => x.shallow_clone(),
        };
        let mut h = x.apply(&self.conv1);
        for b in self.blocks.iter().flatten() {
            h = b.forward_t(&h, train);
        }
        let h = self.bn1.forward_t(&h, train).relu().avg_pool2d([8, 8], [8, 8], [0, 0], false, true, None::<i64>);
        h.flatten(1, -1).apply(&self.fc)
    }
}
