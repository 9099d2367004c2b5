//! Building blocks shared by the zoo, written so that (a) the variable names under a path are
//! exactly PyTorch's (`weight`, `bias`, `running_mean`, `running_var`, `num_batches_tracked`)
//! and (b) fresh layers are initialised like PyTorch's defaults, so a model trained here from
//! scratch behaves like the same model trained in PyTorch.
//!
//! Why a BatchNorm of our own: tch's `nn::BatchNorm` initialises `weight` uniformly in [0, 1]
//! (PyTorch: ones) and has no `num_batches_tracked`, so a RobustBench state dict could not be
//! loaded strictly into it nor written back out with the same keys.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// PyTorch's default init bound for conv/linear weights and biases:
/// `kaiming_uniform_(a = √5)` gives U(−1/√fan_in, 1/√fan_in).
fn torch_default_init(fan_in: i64) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform { lo: -bound, up: bound }
}

/// `nn.Conv2d(i, o, k, stride, padding, bias)` with PyTorch's default initialisation.
pub fn conv2d(p: nn::Path, i: i64, o: i64, k: i64, stride: i64, padding: i64, bias: bool) -> nn::Conv2D {
    let init = torch_default_init(i * k * k);
    let cfg = nn::ConvConfig { stride, padding, bias, ws_init: init, bs_init: init, ..Default::default() };
    nn::conv2d(p, i, o, k, cfg)
}

/// `nn.Linear(i, o)` with PyTorch's default initialisation.
pub fn linear(p: nn::Path, i: i64, o: i64) -> nn::Linear {
    let init = torch_default_init(i);
    nn::linear(p, i, o, nn::LinearConfig { ws_init: init, bs_init: Some(init), bias: true })
}

/// `nn.BatchNorm2d` with PyTorch's state-dict layout, including the int64 counter
/// `num_batches_tracked` (incremented in training mode, as PyTorch does).
#[derive(Debug)]
pub struct BatchNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub num_batches_tracked: Tensor,
    pub eps: f64,
    pub momentum: f64,
}

impl BatchNorm2d {
    /// PyTorch defaults: eps 1e-5, momentum 0.1 (spec §7.2).
    pub fn new(p: nn::Path, c: i64) -> Self {
        Self::with(p, c, 1e-5, 0.1)
    }

    /// `momentum` in PyTorch's convention: new = (1 − m)·old + m·batch.
    pub fn with(p: nn::Path, c: i64, eps: f64, momentum: f64) -> Self {
        let weight = p.var("weight", &[c], Init::Const(1.0));
        let bias = p.var("bias", &[c], Init::Const(0.0));
        let running_mean = p.zeros_no_train("running_mean", &[c]);
        let running_var = p.ones_no_train("running_var", &[c]);
        let nbt = Tensor::zeros([], (Kind::Int64, p.device()));
        let num_batches_tracked = p.add("num_batches_tracked", nbt, false);
        BatchNorm2d { weight, bias, running_mean, running_var, num_batches_tracked, eps, momentum }
    }
}

impl nn::ModuleT for BatchNorm2d {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        if train {
            tch::no_grad(|| {
                let mut n = self.num_batches_tracked.shallow_clone();
                let _ = n.g_add_scalar_(1);
            });
        }
        xs.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            self.momentum,
            self.eps,
            true,
        )
    }
}

/// Per-channel `(x − mean) / std` as the first op of forward (spec §1.1: no normalisation
/// outside the model). The constants are not variables: RobustBench's DM models register them
/// as non-persistent buffers, and the `mu`/`sigma` of the Rice/Wong/Engstrom classes are
/// class constants that their checkpoints omit. Tensors are made on the input's device at
/// each call (3 numbers: negligible), so moving the VarStore never leaves them behind.
#[derive(Debug, Clone)]
pub struct Normalize {
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl Normalize {
    pub fn new(mean: &[f64], std: &[f64]) -> Self {
        Normalize { mean: mean.iter().map(|&v| v as f32).collect(), std: std.iter().map(|&v| v as f32).collect() }
    }

    pub fn mean(&self) -> &[f32] {
        &self.mean
    }

    pub fn std(&self) -> &[f32] {
        &self.std
    }

    pub fn apply(&self, x: &Tensor) -> Tensor {
        let c = self.mean.len() as i64;
        let mean = Tensor::from_slice(&self.mean).to_device(x.device()).to_kind(x.kind()).view([1, c, 1, 1]);
        let std = Tensor::from_slice(&self.std).to_device(x.device()).to_kind(x.kind()).view([1, c, 1, 1]);
        (x - mean) / std
    }
}

// Note: do not use tch's `avg_pool2d_default`: it passes `divisor_override = 1`, i.e. it
// returns window *sums* (16× or 64× PyTorch's `F.avg_pool2d`). The models call `avg_pool2d`
// with `divisor_override = None`, which is PyTorch's average.

/// Optional normalisation from the arch params.
pub fn normalize_from(n: &Option<wdro_stages::params::Normalization>) -> Option<Normalize> {
    n.as_ref().map(|n| Normalize::new(&n.mean, &n.std))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::ModuleT;

    #[test]
    fn batchnorm_has_torch_keys_and_counts_batches() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let bn = BatchNorm2d::new(vs.root() / "bn", 4);
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort();
        assert_eq!(names, ["bn.bias", "bn.num_batches_tracked", "bn.running_mean", "bn.running_var", "bn.weight"]);
        let x = Tensor::randn([2, 4, 3, 3], (Kind::Float, tch::Device::Cpu));
        let _ = bn.forward_t(&x, true);
        let _ = bn.forward_t(&x, false);
        assert_eq!(i64::try_from(&bn.num_batches_tracked).unwrap(), 1);
        assert_eq!(bn.num_batches_tracked.kind(), Kind::Int64);
        // Running mean moved by momentum 0.1 towards the batch mean.
        let bm = x.mean_dim([0i64, 2, 3].as_slice(), false, Kind::Float) * 0.1;
        assert!(bn.running_mean.allclose(&bm, 1e-5, 1e-6, false));
    }

    #[test]
    fn normalize_is_per_channel() {
        let n = Normalize::new(&[0.5, 0.0, 1.0], &[0.5, 2.0, 1.0]);
        let x = Tensor::ones([1, 3, 1, 1], (Kind::Float, tch::Device::Cpu));
        let y = Vec::<f32>::try_from(n.apply(&x).flatten(0, -1)).unwrap();
        assert_eq!(y, vec![1.0, 0.5, 0.0]);
    }
}
