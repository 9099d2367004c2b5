//! Per-sample losses of the method (spec §2.5): CE, DLR, ReDLR, the targeted DLR of APGD-T and
//! the TRADES KL term.
//!
//! Every loss takes logits `z` [B, m] and labels `y` [B] (i64) and returns per-sample values [B]
//! (the KL term also has a summed form, as TRADES uses it). The DLR family is written with an
//! ascending sort + `gather`, the same ops OC23 (`src/loss_fns.py`) and AutoAttack
//! (`autopgd_base.py::dlr_loss`) use, so autograd routes the input gradient to exactly the same
//! logits (z_y, z_(2) or z_(1), and z_(1), z_(3) in the denominator) as PyTorch does. On exact
//! ties of the maximum the sort order (and so whether `top = y`) may differ between CPU and CUDA;
//! that is a measure-zero event the spec says not to "fix".

use tch::{Kind, Reduction, Tensor};
use wdro_stages::params::Loss;

/// Denominator guard of DLR/ReDLR (OC23 `loss_fns.EPS`, AutoAttack's `1e-12`).
pub const DLR_EPS: f64 = 1e-12;

/// Per-sample loss J(z, y) for the three losses of spec §2.5.
pub fn per_sample(loss: Loss, logits: &Tensor, y: &Tensor) -> Tensor {
    match loss {
        Loss::Ce => ce(logits, y),
        Loss::Dlr => dlr(logits, y),
        Loss::Redlr => redlr(logits, y),
    }
}

/// Lower-case name used in metrics and summaries (`ce`, `dlr`, `redlr`; the serde form of [`Loss`]).
pub fn loss_name(loss: Loss) -> &'static str {
    match loss {
        Loss::Ce => "ce",
        Loss::Dlr => "dlr",
        Loss::Redlr => "redlr",
    }
}

/// All three losses, in the order the clean and Υ stages report them.
pub const ALL_LOSSES: [Loss; 3] = [Loss::Ce, Loss::Dlr, Loss::Redlr];

/// CE = logsumexp(z) − z_y (PyTorch `cross_entropy`, reduction none).
pub fn ce(logits: &Tensor, y: &Tensor) -> Tensor {
    logits.cross_entropy_loss::<Tensor>(y, None, Reduction::None, -100, 0.0)
}

/// Ascending sort of the logits plus z_y and the indicator 1{top = y}, shared by DLR and ReDLR.
struct Sorted {
    sorted: Tensor,
    z_y: Tensor,
    top_is_y: Tensor,
}

fn sorted(logits: &Tensor, y: &Tensor) -> Sorted {
    let (sorted, idx) = logits.sort(1, false);
    let m = logits.size()[1];
    let top_is_y = idx.select(1, m - 1).eq_tensor(y).to_kind(Kind::Float);
    let z_y = logits.gather(1, &y.unsqueeze(1), false).squeeze_dim(1);
    Sorted { sorted, z_y, top_is_y }
}

/// The denominator z_(1) − z_(3) + EPS.
fn dlr_den(s: &Sorted, m: i64) -> Tensor {
    s.sorted.select(1, m - 1) - s.sorted.select(1, m - 3) + DLR_EPS
}

/// DLR = −(z_y − (top = y ? z_(2) : z_(1))) / (z_(1) − z_(3) + 1e−12) (Croce & Hein 2020).
/// Needs at least 3 classes.
pub fn dlr(logits: &Tensor, y: &Tensor) -> Tensor {
    let m = logits.size()[1];
    let s = sorted(logits, y);
    let num = &s.z_y
        - s.sorted.select(1, m - 2) * &s.top_is_y
        - s.sorted.select(1, m - 1) * (s.top_is_y.ones_like() - &s.top_is_y);
    -num / dlr_den(&s, m)
}

/// ReDLR = −(z_y − z_(2)) / (z_(1) − z_(3) + 1e−12) · 1{top = y} (P23's rectified DLR, OC23 form):
/// DLR on points whose sort-top is y, exactly 0 (with zero input gradient) elsewhere.
pub fn redlr(logits: &Tensor, y: &Tensor) -> Tensor {
    let m = logits.size()[1];
    let s = sorted(logits, y);
    let num = &s.z_y - s.sorted.select(1, m - 2);
    -num / dlr_den(&s, m) * &s.top_is_y
}

/// Targeted DLR of APGD-T (spec §3.3, AutoAttack `dlr_loss_targeted`):
/// −(z_y − z_t) / (z_(1) − (z_(3) + z_(4))/2 + 1e−12). Needs at least 4 classes.
pub fn dlr_targeted(logits: &Tensor, y: &Tensor, y_target: &Tensor) -> Tensor {
    let m = logits.size()[1];
    let (sorted, _) = logits.sort(1, false);
    let z_y = logits.gather(1, &y.unsqueeze(1), false).squeeze_dim(1);
    let z_t = logits.gather(1, &y_target.unsqueeze(1), false).squeeze_dim(1);
    let den = sorted.select(1, m - 1) - (sorted.select(1, m - 3) + sorted.select(1, m - 4)) * 0.5 + DLR_EPS;
    -(z_y - z_t) / den
}

/// TRADES KL term summed over classes and batch: `KLDivLoss(size_average=False)` of
/// (log_softmax(f(x')), softmax(f(x))) = Σ_i KL(p_nat,i ‖ p_adv,i) (spec §2.5). Gradients flow
/// into both arguments unless the caller detaches `logits_nat`.
pub fn trades_kl_sum(logits_adv: &Tensor, logits_nat: &Tensor) -> Tensor {
    logits_adv.log_softmax(1, Kind::Float).kl_div(&logits_nat.softmax(1, Kind::Float), Reduction::Sum, false)
}

/// Per-sample TRADES KL, KL(p_nat,i ‖ p_adv,i) [B] (used as the loss J_i of the batch-level
/// W-PGD reading R2 and for Υ_KL).
pub fn trades_kl_per_sample(logits_adv: &Tensor, logits_nat: &Tensor) -> Tensor {
    logits_adv
        .log_softmax(1, Kind::Float)
        .kl_div(&logits_nat.softmax(1, Kind::Float), Reduction::None, false)
        .sum_dim_intlist(1, false, Kind::Float)
}

/// Per-sample margin z_y − max_{k≠y} z_k (positive iff correctly classified, ties aside).
pub fn margin(logits: &Tensor, y: &Tensor) -> Tensor {
    let z_y = logits.gather(1, &y.unsqueeze(1), false).squeeze_dim(1);
    let others = logits.scatter_value(1, &y.unsqueeze(1), f64::NEG_INFINITY);
    z_y - others.amax(1, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn t(v: &[f32], rows: i64) -> Tensor {
        Tensor::from_slice(v).view([rows, -1])
    }

    #[test]
    fn dlr_and_redlr_values() {
        // Correct (top = y = 0): DLR = -(3-1)/(3-0); misclassified (y = 2, top = 0): (3-0)/(3-0).
        let z = t(&[3.0, 1.0, 0.0, -1.0, 3.0, 1.0, 0.0, -1.0], 2);
        let y = Tensor::from_slice(&[0i64, 2]);
        let d = Vec::<f32>::try_from(dlr(&z, &y)).unwrap();
        assert!((d[0] + 2.0 / 3.0).abs() < 1e-6, "{d:?}");
        assert!((d[1] - 1.0).abs() < 1e-6, "{d:?}");
        let r = Vec::<f32>::try_from(redlr(&z, &y)).unwrap();
        assert!((r[0] + 2.0 / 3.0).abs() < 1e-6);
        assert_eq!(r[1], 0.0);
    }

    #[test]
    fn redlr_gradient_is_zero_on_misclassified() {
        let z = t(&[0.5, 2.0, 0.1, 1.0, 3.0, 0.2, 0.0, -1.0], 2).set_requires_grad(true);
        let y = Tensor::from_slice(&[1i64, 2]);
        let l = redlr(&z, &y).sum(Kind::Float);
        let g = Tensor::run_backward(&[l], &[&z], false, false).pop().unwrap();
        let row1 = Vec::<f32>::try_from(g.get(1)).unwrap();
        assert!(row1.iter().all(|v| *v == 0.0), "{row1:?}");
        let row0 = Vec::<f32>::try_from(g.get(0)).unwrap();
        assert!(row0.iter().any(|v| *v != 0.0));
    }

    #[test]
    fn ce_matches_logsumexp() {
        let z = Tensor::randn([4, 5], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 1, 2, 4]);
        let want = z.logsumexp(1, false) - z.gather(1, &y.unsqueeze(1), false).squeeze_dim(1);
        assert!(ce(&z, &y).allclose(&want, 1e-5, 1e-6, false));
    }

    #[test]
    fn kl_is_zero_at_equal_logits_and_sums() {
        let z = Tensor::randn([3, 10], (Kind::Float, Device::Cpu));
        assert!(trades_kl_sum(&z, &z).double_value(&[]).abs() < 1e-6);
        let a = Tensor::randn([3, 10], (Kind::Float, Device::Cpu));
        let s = trades_kl_sum(&a, &z).double_value(&[]);
        let p = trades_kl_per_sample(&a, &z).sum(Kind::Float).double_value(&[]);
        assert!((s - p).abs() < 1e-5 && s > 0.0);
    }

    #[test]
    fn margin_sign_matches_correctness() {
        let z = t(&[3.0, 1.0, 0.0, 3.0, 1.0, 0.0], 2);
        let y = Tensor::from_slice(&[0i64, 1]);
        let m = Vec::<f32>::try_from(margin(&z, &y)).unwrap();
        assert_eq!(m, vec![2.0, -2.0]);
    }

    #[test]
    fn targeted_dlr_value() {
        let z = t(&[4.0, 3.0, 2.0, 1.0, 0.0], 1);
        let y = Tensor::from_slice(&[0i64]);
        let yt = Tensor::from_slice(&[1i64]);
        let v = dlr_targeted(&z, &y, &yt).double_value(&[0]);
        // -(4-3)/(4 - (2+1)/2)
        assert!((v + 1.0 / 2.5).abs() < 1e-6);
    }
}
