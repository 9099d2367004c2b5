//! RobustBench `resnet.py`: the "kuangliu" CIFAR ResNet (BasicBlock / Bottleneck; spec §7.6)
//! and PreActResNet-18 (PreActBlock / PreActBlockV2; spec §7.7). Keys: `conv1`, [`bn1`],
//! `layer{1..4}.{i}.{…}`, `…shortcut.0` (conv) / `…shortcut.1` (BN, ResNet only), [`bn`],
//! `linear`.

use tch::nn::{self, ModuleT};
use tch::Tensor;

use super::layers::{conv2d, linear, BatchNorm2d, Normalize};

fn normalized(n: &Option<Normalize>, x: &Tensor) -> Tensor {
    match n {
        Some(n) => n.apply(x),
        None => x.shallow_clone(),
    }
}

/// `shortcut = Sequential(Conv2d 1×1, BatchNorm2d)` of the post-activation blocks.
#[derive(Debug)]
struct ConvBnShortcut {
    conv: nn::Conv2D,
    bn: BatchNorm2d,
}

impl ConvBnShortcut {
    fn new(p: nn::Path, i: i64, o: i64, stride: i64) -> Self {
        ConvBnShortcut { conv: conv2d(&p / "0", i, o, 1, stride, 0, false), bn: BatchNorm2d::new(&p / "1", o) }
    }

    fn forward_t(this: &Option<Self>, x: &Tensor, train: bool) -> Tensor {
        match this {
            Some(s) => s.bn.forward_t(&x.apply(&s.conv), train),
            None => x.shallow_clone(),
        }
    }
}

/// ResNet `BasicBlock` (expansion 1) or `Bottleneck` (expansion 4).
#[derive(Debug)]
struct ResBlock {
    convs: Vec<nn::Conv2D>,
    bns: Vec<BatchNorm2d>,
    shortcut: Option<ConvBnShortcut>,
}

impl ResBlock {
    fn basic(p: nn::Path, i: i64, planes: i64, stride: i64) -> Self {
        ResBlock {
            convs: vec![
                conv2d(&p / "conv1", i, planes, 3, stride, 1, false),
                conv2d(&p / "conv2", planes, planes, 3, 1, 1, false),
            ],
            bns: vec![BatchNorm2d::new(&p / "bn1", planes), BatchNorm2d::new(&p / "bn2", planes)],
            shortcut: (stride != 1 || i != planes).then(|| ConvBnShortcut::new(&p / "shortcut", i, planes, stride)),
        }
    }

    fn bottleneck(p: nn::Path, i: i64, planes: i64, stride: i64) -> Self {
        let o = 4 * planes;
        ResBlock {
            convs: vec![
                conv2d(&p / "conv1", i, planes, 1, 1, 0, false),
                conv2d(&p / "conv2", planes, planes, 3, stride, 1, false),
                conv2d(&p / "conv3", planes, o, 1, 1, 0, false),
            ],
            bns: vec![
                BatchNorm2d::new(&p / "bn1", planes),
                BatchNorm2d::new(&p / "bn2", planes),
                BatchNorm2d::new(&p / "bn3", o),
            ],
            shortcut: (stride != 1 || i != o).then(|| ConvBnShortcut::new(&p / "shortcut", i, o, stride)),
        }
    }
}

impl ModuleT for ResBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let last = self.convs.len() - 1;
        let mut h = x.shallow_clone();
        for (k, (c, bn)) in self.convs.iter().zip(&self.bns).enumerate() {
            h = bn.forward_t(&h.apply(c), train);
            if k < last {
                h = h.relu();
            }
        }
        (h + ConvBnShortcut::forward_t(&self.shortcut, x, train)).relu()
    }
}

/// RobustBench `ResNet(block, num_blocks)`.
#[derive(Debug)]
pub struct ResNet {
    normalize: Option<Normalize>,
    conv1: nn::Conv2D,
    bn1: BatchNorm2d,
    blocks: Vec<ResBlock>,
    linear: nn::Linear,
}

impl ResNet {
    /// Depth 18/34 (BasicBlock) or 50/101/152 (Bottleneck); panics otherwise (checked by
    /// [`super::build`] first).
    pub fn new(p: &nn::Path, depth: i64, normalize: Option<Normalize>) -> Self {
        let (counts, bottleneck) = match depth {
            18 => ([2, 2, 2, 2], false),
            34 => ([3, 4, 6, 3], false),
            50 => ([3, 4, 6, 3], true),
            101 => ([3, 4, 23, 3], true),
            152 => ([3, 8, 36, 3], true),
            _ => panic!("ResNet depth must be 18, 34, 50, 101 or 152"),
        };
        let expansion = if bottleneck { 4 } else { 1 };
        let mut blocks = Vec::new();
        let mut inp = 64;
        for (l, (&n, planes)) in counts.iter().zip([64, 128, 256, 512]).enumerate() {
            let layer = p / format!("layer{}", l + 1);
            for i in 0..n {
                let stride = if i == 0 && l > 0 { 2 } else { 1 };
                let b = if bottleneck {
                    ResBlock::bottleneck(&layer / i, inp, planes, stride)
                } else {
                    ResBlock::basic(&layer / i, inp, planes, stride)
                };
                blocks.push(b);
                inp = planes * expansion;
            }
        }
        ResNet {
            normalize,
            conv1: conv2d(p / "conv1", 3, 64, 3, 1, 1, false),
            bn1: BatchNorm2d::new(p / "bn1", 64),
            blocks,
            linear: linear(p / "linear", 512 * expansion, 10),
        }
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let x = normalized(&self.normalize, x);
        let mut h = self.bn1.forward_t(&x.apply(&self.conv1), train).relu();
        for b in &self.blocks {
            h = b.forward_t(&h, train);
        }
        h.avg_pool2d([4, 4], [4, 4], [0, 0], false, true, None::<i64>).flatten(1, -1).apply(&self.linear)
    }
}

/// `PreActBlock` (shortcut on the raw input) or `PreActBlockV2` (shortcut on the activated
/// input); the shortcut is `shortcut.0`, a 1×1 conv without BN.
#[derive(Debug)]
struct PreActBlock {
    bn1: BatchNorm2d,
    conv1: nn::Conv2D,
    bn2: BatchNorm2d,
    conv2: nn::Conv2D,
    shortcut: Option<nn::Conv2D>,
    v2: bool,
}

impl PreActBlock {
    fn new(p: nn::Path, i: i64, o: i64, stride: i64, v2: bool) -> Self {
        PreActBlock {
            bn1: BatchNorm2d::new(&p / "bn1", i),
            conv1: conv2d(&p / "conv1", i, o, 3, stride, 1, false),
            bn2: BatchNorm2d::new(&p / "bn2", o),
            conv2: conv2d(&p / "conv2", o, o, 3, 1, 1, false),
            shortcut: (stride != 1 || i != o).then(|| conv2d(&p / "shortcut" / "0", i, o, 1, stride, 0, false)),
            v2,
        }
    }
}

impl ModuleT for PreActBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let a = self.bn1.forward_t(x, train).relu();
        let sc = match &self.shortcut {
            Some(c) if self.v2 => a.apply(c),
            Some(c) => x.apply(c),
            None => x.shallow_clone(),
        };
        let h = a.apply(&self.conv1);
        let h = self.bn2.forward_t(&h, train).relu().apply(&self.conv2);
        h + sc
    }
}

/// RobustBench `PreActResNet(PreActBlock[V2], [2, 2, 2, 2], bn_before_fc)`.
#[derive(Debug)]
pub struct PreActResNet18 {
    normalize: Option<Normalize>,
    conv1: nn::Conv2D,
    blocks: Vec<PreActBlock>,
    bn: Option<BatchNorm2d>,
    linear: nn::Linear,
}

impl PreActResNet18 {
    pub fn new(p: &nn::Path, bn_before_fc: bool, v2_shortcut: bool, normalize: Option<Normalize>) -> Self {
        let mut blocks = Vec::new();
        let mut inp = 64;
        for (l, planes) in [64, 128, 256, 512].into_iter().enumerate() {
            let layer = p / format!("layer{}", l + 1);
            for i in 0..2 {
                let stride = if i == 0 && l > 0 { 2 } else { 1 };
                blocks.push(PreActBlock::new(&layer / i, inp, planes, stride, v2_shortcut));
                inp = planes;
            }
        }
        PreActResNet18 {
            normalize,
            conv1: conv2d(p / "conv1", 3, 64, 3, 1, 1, false),
            blocks,
            bn: bn_before_fc.then(|| BatchNorm2d::new(p / "bn", 512)),
            linear: linear(p / "linear", 512, 10),
        }
    }
}

impl ModuleT for PreActResNet18 {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let x = normalized(&self.normalize, x);
        let mut h = x.apply(&self.conv1);
        for b in &self.blocks {
            h = b.forward_t(&h, train);
        }
        if let Some(bn) = &self.bn {
            h = bn.forward_t(&h, train).relu();
        }
        h.avg_pool2d([4, 4], [4, 4], [0, 0], false, true, None::<i64>).flatten(1, -1).apply(&self.linear)
    }
}
