//! Attacks (spec §3): the distributional W-FGSM / W-PGD of P23 ([`wpgd`]), P25's W-PGD-budget
//! ([`budget`]), and the pointwise PGD (sanity) and APGD-CE/-DLR/-T of Croce & Hein 2020
//! ([`pgd`], [`apgd`]); plus the TRADES inner maximisations used by fine-tuning ([`trades`]) and
//! the batched loss/gradient passes they share ([`batch`]).
//!
//! Every attack implements [`Attack`]: it takes an eval-mode model, the clean images X0
//! ([N, C, H, W], u8 or f32 in [0, 1]) and labels, and returns an [`AttackResult`] with the
//! adversarial set, the reported accuracy/loss, the per-iterate curve, the transport cost actually
//! used and the per-sample robustness mask. Pointwise robust accuracy over several attacks is the
//! per-sample AND of their masks ([`combine_robust`]), the AutoAttack convention.
//!
//! ```no_run
//! use wdro_ml::attacks::{wpgd::WPgd, Attack};
//! use wdro_stages::params::{Loss, Norm, L2WInfProj, LinfW2Proj};
//! # fn f(model: &dyn tch::nn::ModuleT, x: &tch::Tensor, y: &tch::Tensor) {
//! let attack = WPgd::pgd(2, Norm::Linf, 8.0 / 255.0, Loss::Redlr, 256);
//! let r = attack.run(model, x, y, &|_, _, _| {}).unwrap();
//! println!("W2 acc {} loss {} cost {}", r.acc_min, r.loss_max, r.w_dist);
//! # }
//! ```

pub mod apgd;
pub mod batch;
pub mod budget;
pub mod pgd;
pub mod pointwise;
pub mod trades;
pub mod wpgd;

use tch::{nn::ModuleT, Kind, TchError, Tensor};
use thiserror::Error;
use wdro_stages::params::{AttackKind, AttackParams, Norm};

/// Errors of the method modules (attacks, Υ, clean evaluation, fine-tuning).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MethodError {
    /// A parameter or input that cannot be used; `what` names it, `msg` says what is expected.
    #[error("{what}: {msg}")]
    Invalid { what: String, msg: String },
    #[error("libtorch: {0}")]
    Torch(#[from] TchError),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Fine-tuning stopped on request (`stop_after_steps`) after saving its resume state.
    #[error("stopped after {0} steps on request; run again to resume")]
    Stopped(u64),
}

impl MethodError {
    pub fn invalid(what: impl Into<String>, msg: impl Into<String>) -> Self {
        MethodError::Invalid { what: what.into(), msg: msg.into() }
    }
}

/// Progress callback: (done, total, message).
pub type Progress<'a> = &'a dyn Fn(u64, u64, &str);

/// Accuracy and mean loss of one iterate.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IterStat {
    pub acc: f64,
    pub loss: f64,
}

/// What an attack returns.
#[derive(Debug)]
pub struct AttackResult {
    /// The adversarial set [N, C, H, W], f32 in [0, 1], on the input's device.
    pub adv: Tensor,
    /// Reported adversarial accuracy: W-PGD family: min over iterates of the set accuracy (spec
    /// §3.1); pointwise attacks: fraction of points no iterate/restart fooled.
    pub acc_min: f64,
    /// Max over iterates of the mean loss (W-PGD family; −∞ before the first iterate), or, for
    /// the pointwise attacks, the mean over the attacked (clean-correct) points of each point's
    /// best loss (APGD: of its first run).
    pub loss_max: f64,
    /// Per-iterate accuracy and mean loss, iterates 1..itr.
    pub curves: Vec<IterStat>,
    /// Identity-coupling transport cost of `adv` (spec §1.2): q = 2: ((1/N)Σ‖Δ_i‖_s²)^{1/2};
    /// q = 1: max_i ‖Δ_i‖_s.
    pub w_dist: f64,
    /// 1{point i is correctly classified at `adv`} [N] bool (for pointwise attacks: survived
    /// every iterate and restart).
    pub robust: Tensor,
    /// 1{point i is correctly classified at X0} [N] bool.
    pub clean_correct: Tensor,
    /// The final iterate (W-PGD family; equals `adv` for the pointwise attacks).
    pub last_iterate: Tensor,
    /// The iterate `adv` came from (1-based; 0 = X0 itself, which happens when no iterate
    /// lowered the accuracy below 1).
    pub best_iter: usize,
}

impl AttackResult {
    /// Points correctly classified at X0 and misclassified at `adv`.
    pub fn n_success(&self) -> i64 {
        self.clean_correct.logical_and(&self.robust.logical_not()).sum(Kind::Int64).int64_value(&[])
    }

    pub fn n_robust(&self) -> i64 {
        self.robust.sum(Kind::Int64).int64_value(&[])
    }
}

/// An attack on a whole evaluation set.
pub trait Attack {
    /// The name used in records (`w-pgd`, `apgd-ce`, …).
    fn name(&self) -> &'static str;
    /// Runs the attack with `model` in eval mode. `images` may be u8 or f32 in [0, 1]; all work
    /// happens on the images' device (which must be the model's), results stay there.
    fn run(
        &self,
        model: &dyn ModuleT,
        images: &Tensor,
        labels: &Tensor,
        progress: Progress,
    ) -> Result<AttackResult, MethodError>;
}

/// Builds the attack an `attack` stage's params describe; `batch_size` only splits the work.
pub fn from_params(p: &AttackParams, batch_size: i64) -> Result<Box<dyn Attack>, MethodError> {
    let delta = p.delta.0;
    if !(delta.is_finite() && delta >= 0.0) {
        return Err(MethodError::invalid("attack.delta", "must be a finite number >= 0"));
    }
    if p.itr == 0 {
        return Err(MethodError::invalid("attack.itr", "must be >= 1"));
    }
    let q = p.q;
    let needs_q = matches!(p.attack, AttackKind::WFgsm | AttackKind::WPgd | AttackKind::WPgdBudget);
    if needs_q && q != 1 && q != 2 {
        return Err(MethodError::invalid("attack.q", format!("must be 1 (W∞) or 2 (W2), got {q}")));
    }
    Ok(match p.attack {
        AttackKind::WFgsm => Box::new(wpgd::WPgd { ratio: 1.0, itr: 1, ..wpgd::WPgd::from_params(p, batch_size) }),
        AttackKind::WPgd => Box::new(wpgd::WPgd::from_params(p, batch_size)),
        AttackKind::WPgdBudget => Box::new(budget::WPgdBudget::from_params(p, batch_size)?),
        AttackKind::Pgd => Box::new(pgd::Pgd::from_params(p, batch_size)),
        AttackKind::ApgdCe | AttackKind::ApgdDlr => Box::new(apgd::Apgd::from_params(p, batch_size)?),
    })
}

/// Per-sample AND of robustness masks: a point is robust only if no attack fooled it.
pub fn combine_robust(masks: &[&Tensor]) -> Option<Tensor> {
    let (first, rest) = masks.split_first()?;
    Some(rest.iter().fold(first.to_kind(Kind::Bool), |acc, m| acc.logical_and(m)))
}

/// Identity-coupling transport cost between X0 and X (spec §1.2, OC23 `data_dist`):
/// q = 2: ((1/N) Σ ‖X_i − X0_i‖_s²)^{1/2}; q = 1: max_i ‖X_i − X0_i‖_s. X0 may be u8.
pub fn transport_cost(x0: &Tensor, x: &Tensor, q: u8, norm: Norm) -> f64 {
    if x.size()[0] == 0 {
        return 0.0;
    }
    let d = batch::image_norm(&(x - batch::to_unit_float(x0).to_device(x.device())), batch::image_p(norm));
    if q == 1 {
        d.max().double_value(&[])
    } else {
        d.pow_tensor_scalar(2).mean(Kind::Float).pow_tensor_scalar(0.5).double_value(&[])
    }
}
