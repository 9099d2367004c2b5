//! The inner maximisation of (W-DRO) TRADES (spec §4.1, §4.3): produces the detached adversarial
//! batch x' that the outer loss compares with x through KL(f(x) ‖ f(x')). The model is used in
//! eval mode here (`forward_t(…, false)`); the caller switches to train mode for the outer loss.
//!
//! Readings (flag `reading`):
//! * **R1a (default)** / **R1b** — W-PGD-budget radii: g_i = ∇x J_budget(x_i, y_i) at the clean
//!   batch; p = 2 ⇒ δ_i = δ·‖g_i‖_{s*}/Υ_ref with Υ_ref the q = 2 sensitivity of the fixed 10 %
//!   training subset (R1a, recomputed by the caller at each epoch start) or of the batch (R1b);
//!   p = ∞ ⇒ δ_i = δ. Then TRADES' inner PGD inside each image's ball: start x + 0.001·ξ,
//!   K steps of ascent on Σ_i KL(f(x_i) ‖ f(x'_i)) with p_nat computed once (detached); ℓ∞ sign
//!   steps α_i = (0.007/0.031)·r_i and clipping, ℓ2 normalised steps 2r_i/K and ball projection;
//!   [0, 1] clamp after each step.
//! * **R2** — batch-level W-PGD on the KL objective: start x + 0.001·ξ, K iterations of §3.1
//!   W-PGD with J_i = KL_i, the batch as the data set, step RATIO·δ/K, `ball`/`scale` projections.
//! * R3 (double-backprop penalty) is not implemented (the spec keeps it only in case P25's
//!   Algorithm 1 uses the sensitivity itself as a regulariser).
//!
//! The start noise ξ ~ N(0, I) is an argument so a step is reproducible (the fine-tuning loop
//! draws it from a per-step seed; the cross-check fixture stores it).

use tch::{nn::ModuleT, Kind, Tensor};
use wdro_stages::params::{L2WInfProj, LinfW2Proj, Loss, Norm};

use super::batch::{image_norm, loss_grad, per_image};
use super::budget::allocate;
use super::wpgd::{direction, project, EPS, RATIO};
use super::MethodError;
use crate::losses;

/// TRADES' ℓ∞ step/ε ratio (train script: α = 0.007 at ε = 0.031).
pub const TRADES_STEP_RATIO: f64 = 0.007 / 0.031;
/// Std of TRADES' Gaussian start x + 0.001·N(0, I).
pub const START_NOISE: f64 = 0.001;

/// §4.3 reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reading {
    R1a,
    R1b,
    R2,
}

impl Reading {
    pub fn parse(s: &str) -> Result<Self, MethodError> {
        match s {
            "R1a" | "r1a" => Ok(Reading::R1a),
            "R1b" | "r1b" => Ok(Reading::R1b),
            "R2" | "r2" => Ok(Reading::R2),
            "R3" | "r3" => Err(MethodError::invalid(
                "finetune.reading",
                "R3 (explicit first-order penalty) is not implemented; use R1a (default), R1b or R2",
            )),
            other => Err(MethodError::invalid("finetune.reading", format!("{other:?} is not R1a, R1b or R2"))),
        }
    }
}

/// Configuration of the inner maximisation.
#[derive(Clone, Debug)]
pub struct Inner {
    pub reading: Reading,
    /// 1 = W∞ (plain TRADES with ε = δ), 2 = W2.
    pub q: u8,
    pub norm: Norm,
    pub delta: f64,
    /// K inner steps.
    pub steps: u32,
    /// Loss of the budget allocation (R1a/R1b).
    pub budget_loss: Loss,
}

/// Per-image radii of R1a/R1b (eval mode): δ for q = 1, δ·‖g_i‖_{s*}/Υ_ref for q = 2.
/// `upsilon_ref` is required for R1a and ignored otherwise.
pub fn radii(
    model: &dyn ModuleT,
    x: &Tensor,
    y: &Tensor,
    inner: &Inner,
    upsilon_ref: Option<f64>,
) -> Result<Tensor, MethodError> {
    let b = x.size()[0];
    if inner.q == 1 {
        return Ok(Tensor::full([b], inner.delta, (Kind::Float, x.device())));
    }
    let ups = match inner.reading {
        Reading::R1a => Some(
            upsilon_ref
                .ok_or_else(|| MethodError::invalid("finetune", "reading R1a needs Υ_ref of the training subset"))?,
        ),
        _ => None,
    };
    let g = loss_grad(model, x, y, inner.budget_loss).grad;
    let norms = image_norm(&g, f64::from(inner.norm.s_star()));
    Ok(allocate(&norms, 2, inner.delta, ups, 0.0, 0.0))
}

/// TRADES' inner PGD inside per-image balls of radius `radii` [B] around x (spec §4.1 step 2 with
/// per-image radii, §4.3 R1 step 3). With all radii = ε and ℓ∞ this is TRADES' own loop.
pub fn trades_pgd(model: &dyn ModuleT, x: &Tensor, noise: &Tensor, radii: &Tensor, steps: u32, norm: Norm) -> Tensor {
    let logits_nat = tch::no_grad(|| model.forward_t(x, false));
    let r = per_image(radii, x);
    let alpha = match norm {
        Norm::Linf => &r * TRADES_STEP_RATIO,
        Norm::L2 => &r * (2.0 / f64::from(steps.max(1))),
    };
    let (lo, hi) = (x - &r, x + &r);
    let mut x_adv = x + noise * START_NOISE;
    for _ in 0..steps {
        let xa = x_adv.detach().set_requires_grad(true);
        let kl = losses::trades_kl_sum(&model.forward_t(&xa, false), &logits_nat);
        let g = Tensor::run_backward(&[kl], &[&xa], false, false).pop().expect("one gradient");
        x_adv = tch::no_grad(|| match norm {
            Norm::Linf => (&xa + &alpha * g.sign()).maximum(&lo).minimum(&hi).clamp(0.0, 1.0),
            Norm::L2 => {
                let gn = per_image(&image_norm(&g, 2.0), &g) + EPS;
                let moved = &xa + &alpha * (&g / gn);
                let d = moved - x;
                let n = per_image(&image_norm(&d, 2.0), &d) + EPS;
                (x + &d * (&r / n).clamp_max(1.0)).clamp(0.0, 1.0)
            }
        });
    }
    x_adv.detach()
}

/// Reading R2: K iterations of §3.1 W-PGD on J_i = KL(f(x_i) ‖ f(x'_i)) over the batch, from
/// x + 0.001·ξ, step RATIO·δ/K, projections `ball` (W∞-ℓ2) and `scale` (W2-ℓ∞).
pub fn wpgd_kl(model: &dyn ModuleT, x: &Tensor, noise: &Tensor, q: u8, norm: Norm, delta: f64, steps: u32) -> Tensor {
    let logits_nat = tch::no_grad(|| model.forward_t(x, false));
    let step = RATIO * delta / f64::from(steps.max(1));
    let mut x_adv = x + noise * START_NOISE;
    for _ in 0..steps {
        let xa = x_adv.detach().set_requires_grad(true);
        let kl = losses::trades_kl_per_sample(&model.forward_t(&xa, false), &logits_nat).sum(None::<Kind>);
        let g = Tensor::run_backward(&[kl], &[&xa], false, false).pop().expect("one gradient");
        x_adv = tch::no_grad(|| {
            let moved = &xa + direction(&g, q, norm) * step;
            project(&moved, x, q, norm, delta, L2WInfProj::Ball, LinfW2Proj::Scale).clamp(0.0, 1.0)
        });
    }
    x_adv.detach()
}

/// x' for one batch under `inner` (eval mode). `noise` ~ N(0, I), shape of `x`.
pub fn inner_max(
    model: &dyn ModuleT,
    x: &Tensor,
    y: &Tensor,
    noise: &Tensor,
    inner: &Inner,
    upsilon_ref: Option<f64>,
) -> Result<Tensor, MethodError> {
    match inner.reading {
        Reading::R1a | Reading::R1b => {
            let r = radii(model, x, y, inner, upsilon_ref)?;
            Ok(trades_pgd(model, x, noise, &r, inner.steps, inner.norm))
        }
        Reading::R2 => Ok(wpgd_kl(model, x, noise, inner.q, inner.norm, inner.delta, inner.steps)),
    }
}
