//! RobustBench `dm_wide_resnet.py` (DeepMind's WRN and pre-activation ResNet; spec §7.4–§7.5).
//! Swish and `nn.SiLU` are the same function, so both use `silu`. Mean/std are non-persistent
//! buffers in PyTorch (not in the state dict): here they are constants of [`Normalize`].
//!
//! TensorFlow "SAME" emulation: before a 3×3 conv with padding 0, stride 1 pads one pixel on
//! every side and stride 2 pads only right and bottom (`F.pad(v, (0, 1, 0, 1))`).

use tch::nn::{self, ModuleT};
use tch::Tensor;

use super::layers::{conv2d, linear, BatchNorm2d, Normalize};

fn same_pad(x: &Tensor, stride: i64) -> Tensor {
    if stride == 1 {
        x.constant_pad_nd([1, 1, 1, 1])
    } else {
        x.constant_pad_nd([0, 1, 0, 1])
    }
}

/// `_Block` of `DMWideResNet`.
#[derive(Debug)]
struct Block {
    batchnorm_0: BatchNorm2d,
    conv_0: nn::Conv2D,
    batchnorm_1: BatchNorm2d,
    conv_1: nn::Conv2D,
    /// 1×1, present iff in ≠ out, applied to the activated input.
    shortcut: Option<nn::Conv2D>,
    stride: i64,
}

impl Block {
    fn new(p: nn::Path, i: i64, o: i64, stride: i64) -> Self {
        Block {
            batchnorm_0: BatchNorm2d::new(&p / "batchnorm_0", i),
            conv_0: conv2d(&p / "conv_0", i, o, 3, stride, 0, false),
            batchnorm_1: BatchNorm2d::new(&p / "batchnorm_1", o),
            conv_1: conv2d(&p / "conv_1", o, o, 3, 1, 1, false),
            shortcut: (i != o).then(|| conv2d(&p / "shortcut", i, o, 1, stride, 0, false)),
            stride,
        }
    }
}

impl ModuleT for Block {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let a = self.batchnorm_0.forward_t(x, train).silu();
        let h = same_pad(&a, self.stride).apply(&self.conv_0);
        let h = self.batchnorm_1.forward_t(&h, train).silu().apply(&self.conv_1);
        match &self.shortcut {
            Some(sc) => a.apply(sc) + h,
            None => x + h,
        }
    }
}

#[derive(Debug)]
pub struct DmWideResNet {
    normalize: Option<Normalize>,
    init_conv: nn::Conv2D,
    blocks: Vec<Block>,
    batchnorm: BatchNorm2d,
    logits: nn::Linear,
}

impl DmWideResNet {
    /// Panics on a depth that is not 6n + 4 (checked by [`super::build`] first).
    pub fn new(p: &nn::Path, depth: i64, width: i64, normalize: Option<Normalize>) -> Self {
        assert!(depth >= 10 && (depth - 4) % 6 == 0, "DMWideResNet depth must be 6n+4");
        let n = (depth - 4) / 6;
        let c = [16, 16 * width, 32 * width, 64 * width];
        let layer = p / "layer";
        let mut blocks = Vec::new();
        for (g, stride) in [1, 2, 2].into_iter().enumerate() {
            let group = &layer / g / "block";
            for i in 0..n {
                let (bi, bs) = if i == 0 { (c[g], stride) } else { (c[g + 1], 1) };
                blocks.push(Block::new(&group / i, bi, c[g + 1], bs));
            }
        }
        DmWideResNet {
            normalize,
            init_conv: conv2d(p / "init_conv", 3, c[0], 3, 1, 1, false),
            blocks,
            batchnorm: BatchNorm2d::new(p / "batchnorm", c[3]),
            logits: linear(p / "logits", c[3], 10),
        }
    }
}

impl ModuleT for DmWideResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let x = match &self.normalize {
            Some(n) => n.apply(x),
            None => x.shallow_clone(),
        };
        let mut h = x.apply(&self.init_conv);
        for b in &self.blocks {
            h = b.forward_t(&h, train);
        }
        let h = self.batchnorm.forward_t(&h, train).silu().avg_pool2d([8, 8], [8, 8], [0, 0], false, true, None::<i64>);
        h.flatten(1, -1).apply(&self.logits)
    }
}

/// `_PreActBlock` of `DMPreActResNet`: the shortcut is a 3×3 conv on the *raw* input.
#[derive(Debug)]
struct PreActBlock {
    batchnorm_0: BatchNorm2d,
    conv_2d_1: nn::Conv2D,
    batchnorm_1: BatchNorm2d,
    conv_2d_2: nn::Conv2D,
    shortcut: Option<nn::Conv2D>,
    stride: i64,
}

impl PreActBlock {
    fn new(p: nn::Path, i: i64, o: i64, stride: i64) -> Self {
        PreActBlock {
            batchnorm_0: BatchNorm2d::new(&p / "batchnorm_0", i),
            conv_2d_1: conv2d(&p / "conv_2d_1", i, o, 3, stride, 0, false),
            batchnorm_1: BatchNorm2d::new(&p / "batchnorm_1", o),
            conv_2d_2: conv2d(&p / "conv_2d_2", o, o, 3, 1, 1, false),
            shortcut: (stride != 1 || i != o).then(|| conv2d(&p / "shortcut", i, o, 3, stride, 0, false)),
            stride,
        }
    }
}

impl ModuleT for PreActBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let a = self.batchnorm_0.forward_t(x, train).silu();
        let sc = match &self.shortcut {
            Some(sc) => same_pad(x, self.stride).apply(sc),
            None => x.shallow_clone(),
        };
        let h = same_pad(&a, self.stride).apply(&self.conv_2d_1);
        let h = self.batchnorm_1.forward_t(&h, train).silu().apply(&self.conv_2d_2);
        h + sc
    }
}

#[derive(Debug)]
pub struct DmPreActResNet {
    normalize: Option<Normalize>,
    conv_2d: nn::Conv2D,
    blocks: Vec<PreActBlock>,
    batchnorm: BatchNorm2d,
    logits: nn::Linear,
}

impl DmPreActResNet {
    /// Depth 18 ((2,2,2,2) blocks) or 34 ((3,4,6,3)); panics otherwise (checked by
    /// [`super::build`] first).
    pub fn new(p: &nn::Path, depth: i64, normalize: Option<Normalize>) -> Self {
        let counts = match depth {
            18 => [2, 2, 2, 2],
            34 => [3, 4, 6, 3],
            _ => panic!("DMPreActResNet depth must be 18 or 34"),
        };
        let widths = [64, 128, 256, 512];
        let mut blocks = Vec::new();
        let mut inp = 64;
        for (j, (&n, &o)) in counts.iter().zip(&widths).enumerate() {
            let layer = p / format!("layer_{j}");
            for i in 0..n {
                let stride = if i == 0 && j > 0 { 2 } else { 1 };
                blocks.push(PreActBlock::new(&layer / i, inp, o, stride));
                inp = o;
            }
        }
        DmPreActResNet {
            normalize,
            conv_2d: conv2d(p / "conv_2d", 3, 64, 3, 1, 1, false),
            blocks,
            batchnorm: BatchNorm2d::new(p / "batchnorm", 512),
            logits: linear(p / "logits", 512, 10),
        }
    }
}

impl ModuleT for DmPreActResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let x = match &self.normalize {
            Some(n) => n.apply(x),
            None => x.shallow_clone(),
        };
        let mut h = x.apply(&self.conv_2d);
        for b in &self.blocks {
            h = b.forward_t(&h, train);
        }
        let h = self.batchnorm.forward_t(&h, train).silu().avg_pool2d([4, 4], [4, 4], [0, 0], false, true, None::<i64>);
        h.flatten(1, -1).apply(&self.logits)
    }
}
