//! W-FGSM and W-PGD (spec §3.1; P23, OC23 `src/attacker.py`, line by line).
//!
//! The attack moves the **whole** evaluation set at once: all N gradients are taken at the same
//! iterate (Jacobi update, gradients in batches), the direction of each image is
//! sign(g)·|g|^{s*−1}·(‖g‖_{s*}+EPS)^{q−s*}, for q = 2 normalised to unit W2 length over the set
//! with the *image* norm, and the projection onto the W_p ball around X0 is applied exactly as
//! written — even when the iterate is already feasible — then the iterate is clamped to [0, 1].
//! No random start. Reported accuracy is the minimum over iterates 1..itr (X0 not included),
//! reported loss the maximum (initialised to −∞), and the adversarial set is the first iterate
//! reaching the minimum accuracy.
//!
//! Cost: itr gradient passes + itr forward passes over N. OC23 runs a separate forward pass to
//! evaluate each iterate and then another one for the next gradient; here the evaluation of X_t
//! reuses the forward pass of the gradient at X_t (eval mode, same kernels, same numbers), so one
//! W-PGD iteration costs one forward + one backward instead of two forwards + one backward.
//!
//! Floating point follows OC23 op for op: the W2 lengths and the projection factor are
//! float32 reductions read back as f64, combined in f64 and applied as scalars, so Rust and the
//! PyTorch reference agree on which coordinates the ℓ∞ `clip` rule touches.

use tch::{nn::ModuleT, Kind, Tensor};
use wdro_stages::params::{AttackParams, L2WInfProj, LinfW2Proj, Loss, Norm};

use super::batch::{self, check_attack_input, image_norm, image_p, per_image, to_unit_float};
use super::{transport_cost, Attack, AttackResult, IterStat, MethodError, Progress};

/// Guard in directions and projections (OC23 `attacker.EPS`).
pub const EPS: f64 = 1e-8;
/// W-PGD iterations (OC23 `ITR`).
pub const ITR: u32 = 50;
/// W-PGD step = RATIO·δ/ITR (OC23 `RATIO`).
pub const RATIO: f64 = 1.875;

/// W-PGD (and, with `ratio = 1, itr = 1`, W-FGSM) under the (W_p, ℓ_s) threat, q = p/(p−1).
#[derive(Clone, Debug)]
pub struct WPgd {
    /// 1 = W∞ (pointwise), 2 = W2.
    pub q: u8,
    /// Image norm s (ℓ∞ ⇒ s* = 1, ℓ2 ⇒ s* = 2).
    pub norm: Norm,
    pub delta: f64,
    pub itr: u32,
    pub ratio: f64,
    pub loss: Loss,
    pub l2_w_inf_proj: L2WInfProj,
    pub linf_w2_proj: LinfW2Proj,
    /// Images per forward/backward batch (does not change results in eval mode).
    pub batch_size: i64,
}

impl WPgd {
    /// W-PGD with the spec defaults (50 iterations, ratio 1.875, `ball`, `clip`).
    pub fn pgd(q: u8, norm: Norm, delta: f64, loss: Loss, batch_size: i64) -> Self {
        WPgd {
            q,
            norm,
            delta,
            itr: ITR,
            ratio: RATIO,
            loss,
            l2_w_inf_proj: L2WInfProj::Ball,
            linf_w2_proj: LinfW2Proj::Clip,
            batch_size,
        }
    }

    /// W-FGSM: one step of size δ (the first-order distribution Q_δ of spec §2.2(b)).
    pub fn fgsm(q: u8, norm: Norm, delta: f64, loss: Loss, batch_size: i64) -> Self {
        WPgd { itr: 1, ratio: 1.0, ..Self::pgd(q, norm, delta, loss, batch_size) }
    }

    pub fn from_params(p: &AttackParams, batch_size: i64) -> Self {
        WPgd {
            q: p.q,
            norm: p.norm,
            delta: p.delta.0,
            itr: p.itr,
            ratio: p.ratio,
            loss: p.loss,
            l2_w_inf_proj: p.l2_w_inf_proj,
            linf_w2_proj: p.linf_w2_proj,
            batch_size,
        }
    }

    /// step = ratio·δ/itr.
    pub fn step(&self) -> f64 {
        self.ratio * self.delta / f64::from(self.itr)
    }
}

/// W2 length of a per-image field over the set with image norm s: ((1/N)Σ‖D_i‖_s²)^{1/2}
/// (OC23 `data_dist`), a float32 reduction returned as f64.
pub fn w2_length(d: &Tensor, norm: Norm) -> f64 {
    image_norm(d, image_p(norm)).pow_tensor_scalar(2).mean(None::<Kind>).pow_tensor_scalar(0.5).double_value(&[])
}

/// The ascent direction of spec §3.1: D_i = sign(g)⊙|g|^{s*−1}·(‖g‖_{s*}+EPS)^{q−s*}; for q = 2
/// divided by (W2 length of D + EPS) so one step of size `step` has W2 length `step`.
pub fn direction(g: &Tensor, q: u8, norm: Norm) -> Tensor {
    let s = i64::from(norm.s_star());
    let q = i64::from(q);
    let gn = per_image(&image_norm(g, s as f64), g);
    let d = g.sign() * g.abs().pow_tensor_scalar(s - 1) * (gn + EPS).pow_tensor_scalar(q - s);
    if q == 1 {
        d
    } else {
        let len = w2_length(&d, norm);
        d / (len + EPS)
    }
}

/// Projection onto the W_p ball of radius δ around X0 (spec §3.1 `project`), returning
/// X0 + proj(X − X0) *before* the [0, 1] clamp. Always applied, feasible or not.
pub fn project(x: &Tensor, x0: &Tensor, q: u8, norm: Norm, delta: f64, l2: L2WInfProj, linf: LinfW2Proj) -> Tensor {
    let d = x - x0;
    if q == 1 {
        match norm {
            Norm::Linf => x0 + d.clamp(-delta, delta),
            Norm::L2 => {
                let n = per_image(&image_norm(&d, 2.0), &d) + EPS;
                match l2 {
                    L2WInfProj::Sphere => x0 + (&d * delta) / n,
                    L2WInfProj::Ball => x0 + &d * (n.reciprocal() * delta).clamp_max(1.0),
                }
            }
        }
    } else {
        let dist = w2_length(&d, norm);
        let r = 1.0f64.min(delta / (dist + EPS));
        match (norm, linf) {
            (Norm::Linf, LinfW2Proj::Clip) => {
                let c = per_image(&image_norm(&d, f64::INFINITY), &d);
                x0 + d.clamp_tensor(Some(&c * (-r)), Some(&c * r))
            }
            _ => x0 + d * r,
        }
    }
}

/// Output of [`jacobi_loop`].
pub(crate) struct LoopOut {
    pub adv: Tensor,
    pub acc_min: f64,
    pub loss_max: f64,
    pub curves: Vec<IterStat>,
    pub robust: Tensor,
    pub clean_correct: Tensor,
    pub best_iter: usize,
    pub last: Tensor,
}

/// The iterate loop shared by the W-PGD family: gradients of all N points at X_{t−1}, then
/// X_t = `update`(X_{t−1}, G, X0-pass), evaluation of X_t; tracks min accuracy (strict `<`,
/// first argmin kept) and max mean loss. `update` sees the clean pass's gradient at t = 1.
#[allow(clippy::too_many_arguments)]
pub(crate) fn jacobi_loop(
    model: &dyn ModuleT,
    x0: &Tensor,
    y: &Tensor,
    loss: Loss,
    itr: u32,
    batch_size: i64,
    name: &str,
    progress: Progress,
    update: &mut dyn FnMut(u32, &Tensor, &Tensor) -> Tensor,
) -> LoopOut {
    let dev = x0.device();
    let first = batch::pass(model, x0, y, loss, batch_size, true, dev);
    let clean_correct = first.correct.shallow_clone();
    let mut grad = first.grad.expect("requested");
    let mut x = x0.shallow_clone();
    let mut out = LoopOut {
        adv: x0.copy(),
        acc_min: 1.0,
        loss_max: f64::NEG_INFINITY,
        curves: Vec::with_capacity(itr as usize),
        robust: clean_correct.copy(),
        clean_correct,
        best_iter: 0,
        last: x0.shallow_clone(),
    };
    for t in 1..=itr {
        x = update(t, &x, &grad);
        let p = batch::pass(model, &x, y, loss, batch_size, t < itr, dev);
        let (acc, l) = (p.acc(), p.mean_loss());
        out.curves.push(IterStat { acc, loss: l });
        if acc < out.acc_min {
            out.acc_min = acc;
            out.adv = x.copy();
            out.robust = p.correct.shallow_clone();
            out.best_iter = t as usize;
        }
        if l > out.loss_max {
            out.loss_max = l;
        }
        if let Some(g) = p.grad {
            grad = g;
        }
        progress(u64::from(t), u64::from(itr), &format!("{name} iteration {t}/{itr}: acc {acc:.4} loss {l:.4}"));
    }
    out.last = x;
    out
}

impl Attack for WPgd {
    fn name(&self) -> &'static str {
        if self.itr == 1 && self.ratio == 1.0 {
            "w-fgsm"
        } else {
            "w-pgd"
        }
    }

    fn run(
        &self,
        model: &dyn ModuleT,
        images: &Tensor,
        labels: &Tensor,
        progress: Progress,
    ) -> Result<AttackResult, MethodError> {
        check_attack_input(images, labels)?;
        if self.q != 1 && self.q != 2 {
            return Err(MethodError::invalid("attack.q", "must be 1 or 2"));
        }
        let x0 = to_unit_float(images);
        let step = self.step();
        let mut update = |_t: u32, x: &Tensor, g: &Tensor| -> Tensor {
            let d = direction(g, self.q, self.norm);
            let moved = x + d * step;
            project(&moved, &x0, self.q, self.norm, self.delta, self.l2_w_inf_proj, self.linf_w2_proj).clamp(0.0, 1.0)
        };
        let out =
            jacobi_loop(model, &x0, labels, self.loss, self.itr, self.batch_size, self.name(), progress, &mut update);
        let w_dist = transport_cost(&x0, &out.adv, self.q, self.norm);
        Ok(AttackResult {
            adv: out.adv,
            acc_min: out.acc_min,
            loss_max: out.loss_max,
            curves: out.curves,
            w_dist,
            robust: out.robust,
            clean_correct: out.clean_correct,
            best_iter: out.best_iter,
            last_iterate: out.last,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn rand_set(n: i64) -> Tensor {
        Tensor::rand([n, 3, 4, 4], (Kind::Float, Device::Cpu))
    }

    #[test]
    fn q2_step_has_w2_length_step() {
        tch::manual_seed(1);
        let g = Tensor::randn([7, 3, 4, 4], (Kind::Float, Device::Cpu));
        for norm in [Norm::Linf, Norm::L2] {
            let d = direction(&g, 2, norm);
            let len = w2_length(&(d * 0.3), norm);
            assert!((len - 0.3).abs() < 1e-5, "{norm:?}: {len}");
        }
    }

    #[test]
    fn q1_directions_have_unit_norm() {
        tch::manual_seed(2);
        let g = Tensor::randn([5, 3, 4, 4], (Kind::Float, Device::Cpu));
        let d = direction(&g, 1, Norm::Linf);
        assert!(image_norm(&d, f64::INFINITY).allclose(
            &Tensor::ones([5], (Kind::Float, Device::Cpu)),
            1e-6,
            1e-6,
            false
        ));
        let d = direction(&g, 1, Norm::L2);
        assert!(image_norm(&d, 2.0).allclose(&Tensor::ones([5], (Kind::Float, Device::Cpu)), 1e-5, 1e-5, false));
    }

    #[test]
    fn zero_gradient_gives_zero_direction() {
        let g = Tensor::zeros([2, 3, 4, 4], (Kind::Float, Device::Cpu));
        for q in [1, 2] {
            for norm in [Norm::Linf, Norm::L2] {
                assert_eq!(direction(&g, q, norm).abs().max().double_value(&[]), 0.0);
            }
        }
    }

    #[test]
    fn projections_are_feasible() {
        tch::manual_seed(3);
        let x0 = rand_set(6);
        let delta = 0.05;
        let x = &x0 + Tensor::randn([6, 3, 4, 4], (Kind::Float, Device::Cpu)) * 0.2;
        for (q, norm) in [(1, Norm::Linf), (1, Norm::L2), (2, Norm::Linf), (2, Norm::L2)] {
            for (l2, linf) in [(L2WInfProj::Ball, LinfW2Proj::Clip), (L2WInfProj::Sphere, LinfW2Proj::Scale)] {
                let p = project(&x, &x0, q, norm, delta, l2, linf).clamp(0.0, 1.0);
                let cost = transport_cost(&x0, &p, q, norm);
                assert!(cost <= delta * (1.0 + 1e-5), "q={q} {norm:?} {l2:?} {linf:?}: {cost}");
            }
        }
        // Ball leaves feasible points (almost) alone; sphere pushes them to the sphere.
        let small = &x0 + Tensor::full([6, 3, 4, 4], 0.001, (Kind::Float, Device::Cpu));
        let b = project(&small, &x0, 1, Norm::L2, delta, L2WInfProj::Ball, LinfW2Proj::Clip);
        assert!(b.allclose(&small, 1e-6, 1e-6, false));
        let s = project(&small, &x0, 1, Norm::L2, delta, L2WInfProj::Sphere, LinfW2Proj::Clip);
        let n = image_norm(&(s - &x0), 2.0);
        assert!(n.allclose(&Tensor::full([6], delta, (Kind::Float, Device::Cpu)), 1e-4, 1e-6, false));
    }
}
