//! W-PGD-budget (P25; spec §3.2 — the definition is [UNVERIFIED], the readings are the spec's).
//!
//! * **R1 (default)** — allocate once, then pointwise PGD per image: at the clean points,
//!   g_i = ∇x J(x_i, y_i); p = ∞ ⇒ δ_i = δ; p = 2 ⇒ δ_i = δ·‖g_i‖_{s*}/Υ with
//!   Υ = ((1/M)Σ_j‖g_j‖_{s*}²)^{1/2} over the attacked set (Υ = 0 ⇒ δ_i = δ), so
//!   ((1/M)Σδ_i²)^{1/2} = δ; radius r_i = `base_eps` + δ_i, optionally capped at `budget_cap`.
//!   Then ITR steps of per-image PGD inside ‖x' − x_i‖_s ≤ r_i with α_i = ratio·r_i/itr, no random
//!   start: ℓ∞ sign steps and clipping, ℓ2 normalised-gradient steps and ball projection, then a
//!   [0, 1] clamp. Images with r_i = 0 (ReDLR: misclassified points) stay put.
//! * **R2** — re-allocate at every iterate from the current gradients; for p = 2 the iterate is
//!   projected onto the identity-coupling W2 ball of radius δ by global rescaling (the spec notes
//!   this essentially coincides with W-PGD under the `ball`/`scale` projections).
//!
//! Accuracy, loss and the adversarial set are reported exactly as W-PGD does (min accuracy over
//! iterates, max mean loss, first argmin iterate), over the whole set. The clean gradient of R1's
//! allocation is also the first step's gradient, so R1 costs no extra gradient pass here.

use tch::{nn::ModuleT, Kind, Tensor};
use wdro_stages::params::{AttackParams, Loss, Norm};

use super::batch::{check_attack_input, image_norm, per_image, to_unit_float};
use super::wpgd::{jacobi_loop, w2_length, EPS, ITR, RATIO};
use super::{transport_cost, Attack, AttackResult, MethodError, Progress};

/// Which reading of §3.2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetReading {
    R1,
    R2,
}

impl BudgetReading {
    pub fn parse(s: &str) -> Result<Self, MethodError> {
        match s {
            "R1" | "r1" => Ok(BudgetReading::R1),
            "R2" | "r2" => Ok(BudgetReading::R2),
            other => Err(MethodError::invalid("attack.budget_reading", format!("{other:?} is not R1 or R2"))),
        }
    }
}

#[derive(Clone, Debug)]
pub struct WPgdBudget {
    pub q: u8,
    pub norm: Norm,
    pub delta: f64,
    pub itr: u32,
    pub ratio: f64,
    pub loss: Loss,
    pub reading: BudgetReading,
    /// Pointwise radius every image keeps in addition to δ_i (R1; 0 = off).
    pub base_eps: f64,
    /// Cap on r_i (R1; 0 = none).
    pub budget_cap: f64,
    pub batch_size: i64,
}

impl WPgdBudget {
    /// Reading R1 with the spec constants (50 steps, ratio 1.875, no base radius, no cap).
    pub fn r1(q: u8, norm: Norm, delta: f64, loss: Loss, batch_size: i64) -> Self {
        WPgdBudget {
            q,
            norm,
            delta,
            itr: ITR,
            ratio: RATIO,
            loss,
            reading: BudgetReading::R1,
            base_eps: 0.0,
            budget_cap: 0.0,
            batch_size,
        }
    }

    pub fn from_params(p: &AttackParams, batch_size: i64) -> Result<Self, MethodError> {
        let reading = BudgetReading::parse(&p.budget_reading)?;
        if !(p.base_eps >= 0.0 && p.budget_cap >= 0.0) {
            return Err(MethodError::invalid("attack.base_eps/budget_cap", "must be >= 0"));
        }
        if reading == BudgetReading::R2 && (p.base_eps > 0.0 || p.budget_cap > 0.0) {
            return Err(MethodError::invalid(
                "attack.base_eps/budget_cap",
                "are defined for budget_reading = \"R1\" only; set them to 0 or use R1",
            ));
        }
        Ok(WPgdBudget {
            q: p.q,
            norm: p.norm,
            delta: p.delta.0,
            itr: p.itr,
            ratio: p.ratio,
            loss: p.loss,
            reading,
            base_eps: p.base_eps,
            budget_cap: p.budget_cap,
            batch_size,
        })
    }
}

/// Per-image radii from per-image gradient norms (spec §3.2 step 2): q = 1: δ; q = 2:
/// δ·‖g_i‖/Υ with Υ = `upsilon_ref` or, when `None`, ((1/M)Σ‖g_j‖²)^{1/2} of these norms;
/// Υ = 0 ⇒ δ. Then + `base_eps`, then `min(·, cap)` when cap > 0. Returns f32 [M].
pub fn allocate(norms: &Tensor, q: u8, delta: f64, upsilon_ref: Option<f64>, base_eps: f64, cap: f64) -> Tensor {
    let mut r = if q == 1 {
        Tensor::full(norms.size(), delta, (Kind::Float, norms.device()))
    } else {
        let ups = upsilon_ref
            .unwrap_or_else(|| norms.pow_tensor_scalar(2).mean(None::<Kind>).pow_tensor_scalar(0.5).double_value(&[]));
        if ups > 0.0 && ups.is_finite() {
            norms.to_kind(Kind::Float) * (delta / ups)
        } else {
            Tensor::full(norms.size(), delta, (Kind::Float, norms.device()))
        }
    };
    if base_eps > 0.0 {
        r += base_eps;
    }
    if cap > 0.0 {
        r = r.clamp_max(cap);
    }
    r
}

/// One step of per-image PGD inside per-image balls ‖x' − x0_i‖_s ≤ r_i (spec §3.2 step 3):
/// step size α_i, ℓ∞ sign step + clip, ℓ2 normalised step + ball projection, then [0, 1].
pub fn pointwise_step(x: &Tensor, x0: &Tensor, g: &Tensor, radii: &Tensor, alpha: &Tensor, norm: Norm) -> Tensor {
    let r = per_image(radii, x);
    let a = per_image(alpha, x);
    match norm {
        Norm::Linf => {
            let moved = x + a * g.sign();
            moved.maximum(&(x0 - &r)).minimum(&(x0 + &r)).clamp(0.0, 1.0)
        }
        Norm::L2 => {
            let gn = per_image(&image_norm(g, 2.0), g) + EPS;
            let moved = x + a * (g / gn);
            let d = moved - x0;
            let n = per_image(&image_norm(&d, 2.0), &d) + EPS;
            (x0 + &d * (r / n).clamp_max(1.0)).clamp(0.0, 1.0)
        }
    }
}

impl Attack for WPgdBudget {
    fn name(&self) -> &'static str {
        "w-pgd-budget"
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
        let s_star = f64::from(self.norm.s_star());
        let per_step = self.ratio / f64::from(self.itr);
        let mut radii: Option<Tensor> = None;
        let (q, norm, delta, reading) = (self.q, self.norm, self.delta, self.reading);
        let (base_eps, cap) = (self.base_eps, self.budget_cap);
        let mut update = |t: u32, x: &Tensor, g: &Tensor| -> Tensor {
            let r = match reading {
                BudgetReading::R1 => {
                    if t == 1 {
                        radii = Some(allocate(&image_norm(g, s_star), q, delta, None, base_eps, cap));
                    }
                    radii.as_ref().expect("allocated at t = 1").shallow_clone()
                }
                BudgetReading::R2 => allocate(&image_norm(g, s_star), q, delta, None, 0.0, 0.0),
            };
            let alpha = &r * per_step;
            match reading {
                BudgetReading::R1 => pointwise_step(x, &x0, g, &r, &alpha, norm),
                BudgetReading::R2 if q == 1 => pointwise_step(x, &x0, g, &r, &alpha, norm),
                BudgetReading::R2 => {
                    // Step with the current allocation inside the whole budget, then rescale the
                    // set's displacement onto the W2 ball of radius δ.
                    let big = Tensor::full(r.size(), f64::INFINITY, (Kind::Float, r.device()));
                    let moved = pointwise_step(x, &x0, g, &big, &alpha, norm);
                    let d = &moved - &x0;
                    let dist = w2_length(&d, norm);
                    let rho = 1.0f64.min(delta / (dist + EPS));
                    (&x0 + d * rho).clamp(0.0, 1.0)
                }
            }
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

    #[test]
    fn allocation_has_rms_delta() {
        let norms = Tensor::from_slice(&[0.0f32, 1.0, 2.0, 3.0]);
        let r = allocate(&norms, 2, 0.5, None, 0.0, 0.0);
        let rms = r.pow_tensor_scalar(2).mean(Kind::Float).sqrt().double_value(&[]);
        assert!((rms - 0.5).abs() < 1e-6);
        assert_eq!(r.double_value(&[0]), 0.0);
        let z = allocate(&Tensor::zeros([3], (Kind::Float, Device::Cpu)), 2, 0.5, None, 0.0, 0.0);
        assert_eq!(Vec::<f32>::try_from(z).unwrap(), vec![0.5; 3]);
        let capped = allocate(&norms, 2, 0.5, None, 0.1, 0.6);
        assert!(capped.max().double_value(&[]) <= 0.6 + 1e-7);
        assert!((capped.double_value(&[0]) - 0.1).abs() < 1e-7);
    }

    #[test]
    fn pointwise_step_stays_in_its_ball() {
        tch::manual_seed(5);
        let x0 = Tensor::rand([4, 3, 4, 4], (Kind::Float, Device::Cpu));
        let r = Tensor::from_slice(&[0.0f32, 0.01, 0.1, 0.3]);
        for norm in [Norm::Linf, Norm::L2] {
            let mut x = x0.copy();
            for _ in 0..5 {
                let g = Tensor::randn([4, 3, 4, 4], (Kind::Float, Device::Cpu));
                x = pointwise_step(&x, &x0, &g, &r, &(&r * 0.5), norm);
            }
            let p = if norm == Norm::Linf { f64::INFINITY } else { 2.0 };
            let d = Vec::<f32>::try_from(image_norm(&(&x - &x0), p)).unwrap();
            let rv = Vec::<f32>::try_from(&r).unwrap();
            for (di, ri) in d.iter().zip(&rv) {
                assert!(*di <= ri * (1.0 + 1e-5) + 1e-7, "{norm:?}: {di} > {ri}");
            }
            assert_eq!(d[0], 0.0);
        }
    }
}
