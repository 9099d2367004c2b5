//! Plain supervised training: the `train` checkpoint source, which makes the demo's pretrained
//! model (no pretrained Fashion-MNIST network exists offline).
//!
//! SGD with momentum and weight decay (libtorch's SGD = PyTorch's `torch.optim.SGD`: decay is
//! added to the gradient of every parameter, BN included), constant learning rate,
//! cross-entropy, one pass over a fresh permutation per epoch.
//!
//! Determinism: the initialisation is [`models::reinit`] with `seed` (portable, independent of
//! torch's generator), the batch order comes from the portable SplitMix64 of
//! [`crate::data::subset`] seeded with `seed + epoch`, and `tch::manual_seed(seed)` seeds
//! dropout (the Keras CNN's). So two runs with the same seed on the CPU give the same weights
//! (with the same libtorch thread count).

use std::time::Instant;

use tch::nn::OptimizerConfig;
use tch::{nn, Device, Kind, Tensor};
use wdro_stages::params::{Arch, TrainParams};

use crate::data::subset::SplitMix64;
use crate::data::Bundle;
use crate::models::{self, Net};

/// One epoch's running statistics (train mode, averaged over the epoch's batches).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EpochStats {
    /// 1-based.
    pub epoch: u32,
    pub loss: f64,
    pub accuracy: f64,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    #[error("train: {0}")]
    Params(String),
    #[error("train: {0}")]
    Model(#[from] models::ModelError),
    #[error("train: libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

fn check(p: &TrainParams, data: &Bundle) -> Result<(), TrainError> {
    let bad = |m: &str| Err(TrainError::Params(m.to_string()));
    if data.is_empty() {
        return bad("the training set is empty");
    }
    if p.batch_size < 1 {
        return bad("batch_size must be >= 1");
    }
    if !(p.lr > 0.0 && p.lr.is_finite()) {
        return bad("lr must be a positive number");
    }
    if !((0.0..1.0).contains(&p.momentum) && p.weight_decay >= 0.0 && p.weight_decay.is_finite()) {
        return bad("momentum must be in [0, 1) and weight_decay >= 0");
    }
    Ok(())
}

/// Seeds torch, builds a fresh `arch` and trains it (see [`train`]).
pub fn train_new(
    arch: &Arch,
    data: &Bundle,
    p: &TrainParams,
    device: Device,
    on_epoch: &mut dyn FnMut(&EpochStats),
) -> Result<(Net, Vec<EpochStats>), TrainError> {
    models::check_input(arch, data.image_shape())?;
    tch::manual_seed(p.seed as i64);
    let mut net = models::try_new_net(arch, device)?;
    models::reinit(&net, "", p.seed);
    let stats = train(&mut net, data, p, on_epoch)?;
    Ok((net, stats))
}

/// Trains `net` in place for `p.epochs` epochs on `data` (on the net's device).
pub fn train(
    net: &mut Net,
    data: &Bundle,
    p: &TrainParams,
    on_epoch: &mut dyn FnMut(&EpochStats),
) -> Result<Vec<EpochStats>, TrainError> {
    check(p, data)?;
    models::check_input(&net.arch, data.image_shape())?;
    let device = net.device();
    let x_all = data.to_float(device);
    let y_all = data.labels.to_device(device);
    let n = data.len();
    let sgd = nn::Sgd { momentum: p.momentum, dampening: 0.0, wd: p.weight_decay, nesterov: false };
    let mut opt = sgd.build(&net.vs, p.lr)?;
    let mut out = Vec::with_capacity(p.epochs as usize);
    for epoch in 1..=p.epochs {
        let t0 = Instant::now();
        let mut order: Vec<i64> = (0..n as i64).collect();
        SplitMix64::new(p.seed.wrapping_add(epoch as u64)).shuffle(&mut order);
        let order = Tensor::from_slice(&order).to_device(device);
        let (mut loss_sum, mut correct) = (0.0f64, 0i64);
        let bs = p.batch_size;
        let mut start = 0i64;
        while start < n as i64 {
            let len = bs.min(n as i64 - start);
            let idx = order.narrow(0, start, len);
            let x = x_all.index_select(0, &idx);
            let y = y_all.index_select(0, &idx);
            let logits = net.forward_t(&x, true);
            let loss = logits.cross_entropy_for_logits(&y);
            opt.backward_step(&loss);
            loss_sum += loss.double_value(&[]) * len as f64;
            correct += logits.argmax(1, false).eq_tensor(&y).sum(Kind::Int64).int64_value(&[]);
            start += len;
        }
        let s = EpochStats {
            epoch,
            loss: loss_sum / n as f64,
            accuracy: correct as f64 / n as f64,
            seconds: t0.elapsed().as_secs_f64(),
        };
        on_epoch(&s);
        out.push(s);
    }
    Ok(out)
}

/// Accuracy of `net` on `data` in eval mode, batched.
pub fn accuracy(net: &Net, data: &Bundle, batch_size: usize) -> f64 {
    let device = net.device();
    let mut correct = 0i64;
    tch::no_grad(|| {
        for b in data.batches(batch_size) {
            let y = b.labels.to_device(device);
            let pred = net.forward_t(&b.to_float(device), false).argmax(1, false);
            correct += pred.eq_tensor(&y).sum(Kind::Int64).int64_value(&[]);
        }
    });
    correct as f64 / data.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two separable blobs drawn as 1×28×28 images: class = which half is bright.
    fn toy(n: i64) -> Bundle {
        let y = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(2);
        let x = Tensor::zeros([n, 1, 28, 28], (Kind::Uint8, Device::Cpu));
        for i in 0..n {
            let half = if i % 2 == 0 { 0 } else { 14 };
            let _ = x.get(i).narrow(1, half, 14).fill_(200);
        }
        Bundle::new(x, y, vec!["top".into(), "bottom".into()]).unwrap()
    }

    fn params(seed: u64) -> TrainParams {
        TrainParams { epochs: 2, lr: 0.05, momentum: 0.9, weight_decay: 5e-4, batch_size: 8, seed }
    }

    #[test]
    fn learns_and_is_deterministic() {
        let arch = Arch::SmallCnn { in_channels: 1, num_classes: 2 };
        let data = toy(32);
        let mut seen = Vec::new();
        let (net, stats) = train_new(&arch, &data, &params(3), Device::Cpu, &mut |s| seen.push(s.epoch)).unwrap();
        assert_eq!(seen, vec![1, 2]);
        assert_eq!(stats.len(), 2);
        assert_eq!(accuracy(&net, &data, 10), 1.0);
        let (net2, stats2) = train_new(&arch, &data, &params(3), Device::Cpu, &mut |_| {}).unwrap();
        assert_eq!(stats.iter().map(|s| s.loss).collect::<Vec<_>>(), stats2.iter().map(|s| s.loss).collect::<Vec<_>>());
        let (a, b) = (net.vs.variables(), net2.vs.variables());
        assert!(a.iter().all(|(k, v)| v.equal(&b[k])));
        let (_, stats3) = train_new(&arch, &data, &params(4), Device::Cpu, &mut |_| {}).unwrap();
        assert_ne!(stats[0].loss, stats3[0].loss);
    }

    #[test]
    fn bad_params_and_shapes_are_errors() {
        let arch = Arch::SmallCnn { in_channels: 3, num_classes: 2 };
        let e = train_new(&arch, &toy(4), &params(0), Device::Cpu, &mut |_| {}).unwrap_err().to_string();
        assert!(e.contains("expects images of shape [3, 28, 28]"), "{e}");
        let mut p = params(0);
        p.batch_size = 0;
        let arch = Arch::SmallCnn { in_channels: 1, num_classes: 2 };
        assert!(train_new(&arch, &toy(4), &p, Device::Cpu, &mut |_| {}).is_err());
    }
}
