//! The sensitivity Υ = (E_P ‖∇x J(x, y)‖_{s*}^q)^{1/q} (spec §2.1, §2.6; OC23 `loss_grad` +
//! `comp_upsilon`).
//!
//! Eval mode, no augmentation, float32. Per batch: per-sample losses J_i, backprop of their
//! **sum** to the input (so g_i is the unscaled gradient of J_i), per-sample ‖g_i‖_{s*} over
//! (C, H, W); then Υ_q = ((1/N) Σ_i ‖g_i‖^q)^{1/q} over **all** N points (zero gradients
//! included), no EPS. Batches are streamed (u8 images stay on the CPU and are converted per
//! batch), so memory is flat in N: only the N norms are kept.
//!
//! [`UpsilonStats`] keeps Σ‖g‖ and Σ‖g‖² in f64 next to N, so Υ for q = 1 and q = 2 come from
//! one gradient pass. Shards of a data set merge exactly ([`UpsilonStats::merge`]): the merge
//! concatenates the per-sample norms and reduces the concatenation with the same call the
//! unsharded stage uses, so the sums are bit-identical (adding per-shard f64 partial sums would
//! not be: float addition is not associative).

use tch::{nn::ModuleT, Device, Kind, Tensor};
use wdro_stages::params::{Loss, Norm};

use crate::attacks::batch::{check_set, chunks, dual_p, image_norm, loss_grad, to_unit_float};
use crate::attacks::{MethodError, Progress};

/// Per-sample gradient norms of one loss on one set, and the sums Υ is made of.
#[derive(Debug)]
pub struct UpsilonStats {
    pub loss: Loss,
    pub norm: Norm,
    /// ‖∇x J(x_i, y_i)‖_{s*} [N], f32 on the CPU, in data order.
    pub norms: Tensor,
    pub n: i64,
    /// Σ_i ‖g_i‖_{s*} (f64).
    pub sum_q1: f64,
    /// Σ_i ‖g_i‖_{s*}² (f64).
    pub sum_q2: f64,
}

impl UpsilonStats {
    /// Builds the sums from per-sample norms.
    pub fn from_norms(loss: Loss, norm: Norm, norms: Tensor) -> Self {
        let d = norms.to_kind(Kind::Double);
        let n = norms.size()[0];
        let sum_q1 = if n > 0 { d.sum(Kind::Double).double_value(&[]) } else { 0.0 };
        let sum_q2 = if n > 0 { d.pow_tensor_scalar(2).sum(Kind::Double).double_value(&[]) } else { 0.0 };
        UpsilonStats { loss, norm, norms, n, sum_q1, sum_q2 }
    }

    /// Υ_q = ((1/N) Σ ‖g_i‖^q)^{1/q}; NaN for an empty set or q ∉ {1, 2}.
    pub fn upsilon(&self, q: u8) -> f64 {
        upsilon_from_sums(self.n, self.sum_q1, self.sum_q2, q)
    }

    /// Concatenates shards (same loss and norm, in data order) and recomputes the sums from the
    /// concatenated norms, exactly as [`UpsilonStats::from_norms`] does for the whole set.
    pub fn merge(parts: &[UpsilonStats]) -> Result<UpsilonStats, MethodError> {
        let first = parts.first().ok_or_else(|| MethodError::invalid("upsilon merge", "no shards"))?;
        if parts.iter().any(|p| p.loss != first.loss || p.norm != first.norm) {
            return Err(MethodError::invalid("upsilon merge", "shards differ in loss or norm"));
        }
        let norms = Tensor::cat(&parts.iter().map(|p| p.norms.shallow_clone()).collect::<Vec<_>>(), 0);
        Ok(UpsilonStats::from_norms(first.loss, first.norm, norms))
    }
}

/// Υ from the merged sums: q = 1: Σ‖g‖/N; q = 2: (Σ‖g‖²/N)^{1/2}.
pub fn upsilon_from_sums(n: i64, sum_q1: f64, sum_q2: f64, q: u8) -> f64 {
    if n <= 0 {
        return f64::NAN;
    }
    match q {
        1 => sum_q1 / n as f64,
        2 => (sum_q2 / n as f64).sqrt(),
        _ => f64::NAN,
    }
}

/// Per-sample ‖∇x J(x_i, y_i)‖_{s*} over a set, streamed in batches on `device` (eval mode).
/// `images`: [N, C, H, W] u8 or f32 in [0, 1], any device; `labels`: i64 [N].
#[allow(clippy::too_many_arguments)]
pub fn grad_norms(
    model: &dyn ModuleT,
    images: &Tensor,
    labels: &Tensor,
    loss: Loss,
    norm: Norm,
    batch_size: i64,
    device: Device,
    progress: Progress,
) -> Result<UpsilonStats, MethodError> {
    let n = check_set(images, labels, "upsilon data")?;
    let norms = Tensor::zeros([n], (Kind::Float, Device::Cpu));
    let p = dual_p(norm);
    for (s, len) in chunks(n, batch_size) {
        let x = to_unit_float(&images.narrow(0, s, len).to_device(device));
        let y = labels.narrow(0, s, len).to_device(device);
        let g = loss_grad(model, &x, &y, loss).grad;
        norms.narrow(0, s, len).copy_(&image_norm(&g, p).to_device(Device::Cpu));
        progress((s + len) as u64, n as u64, "gradient norms");
    }
    Ok(UpsilonStats::from_norms(loss, norm, norms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsilon_from_norms_and_merge() {
        let a = UpsilonStats::from_norms(Loss::Ce, Norm::L2, Tensor::from_slice(&[1.0f32, 2.0]));
        let b = UpsilonStats::from_norms(Loss::Ce, Norm::L2, Tensor::from_slice(&[0.0f32, 3.0]));
        let m = UpsilonStats::merge(&[a, b]).unwrap();
        assert_eq!(m.n, 4);
        assert!((m.upsilon(1) - 1.5).abs() < 1e-12);
        assert!((m.upsilon(2) - (14.0f64 / 4.0).sqrt()).abs() < 1e-12);
        assert!(upsilon_from_sums(0, 0.0, 0.0, 2).is_nan());
    }

    #[test]
    fn merge_is_bit_identical_to_the_whole_set() {
        // Values whose f64 partial sums round differently from the whole-tensor reduction.
        let v: Vec<f32> = (0..1001).map(|i| 1.0 + (i as f32).sin() * 1e-3 + (i % 7) as f32 * 1e4).collect();
        let whole = UpsilonStats::from_norms(Loss::Ce, Norm::Linf, Tensor::from_slice(&v));
        let parts: Vec<_> = [0..100, 100..101, 101..101, 101..1001]
            .into_iter()
            .map(|r| UpsilonStats::from_norms(Loss::Ce, Norm::Linf, Tensor::from_slice(&v[r])))
            .collect();
        let m = UpsilonStats::merge(&parts).unwrap();
        assert_eq!(m.n, whole.n);
        assert_eq!(m.sum_q1.to_bits(), whole.sum_q1.to_bits());
        assert_eq!(m.sum_q2.to_bits(), whole.sum_q2.to_bits());
        assert_eq!(m.upsilon(2).to_bits(), whole.upsilon(2).to_bits());
        assert!(m.norms.equal(&whole.norms));
    }
}
