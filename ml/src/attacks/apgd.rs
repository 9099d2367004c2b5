//! APGD (Croce & Hein 2020), ported from fra31/auto-attack `autoattack/autopgd_base.py`
//! (`APGDAttack.attack_single_run` / `perturb`, `APGDAttack_targeted.perturb`) for ℓ∞ and ℓ2:
//! random start eps·normalize(U(−1,1)) (ℓ∞) or eps·normalize(N(0,I)) (ℓ2) drawn on the CPU
//! generator after `manual_seed(seed)` (reset per batch, as AutoAttack calls `perturb` per
//! batch); step 2·eps; momentum 0.75 (1.0 at the first step); checkpoints every k iterations,
//! k starting at ⌊0.22·n_iter⌋ and shrinking by ⌊0.03·n_iter⌋ down to ⌊0.06·n_iter⌋; at a
//! checkpoint the step halves and the iterate restarts from the best point where the loss
//! oscillated (≤ 75 % increasing steps) or neither improved nor was reduced last time.
//! Restarts attack only points still robust. A point is fooled if any iterate misclassifies it
//! (per-sample worst case); its adversarial image is the latest fooling iterate (AA's
//! `x_best_adv`).
//!
//! The set is walked in batches of `batch_size` images; each batch is one `perturb` call on its
//! clean-correct points ([`Apgd::run_parts`]), so the attack shards along the data axis with
//! bit-identical results (see [`super::pointwise`]).
//!
//! Loss: CE (APGD-CE), DLR (APGD-DLR) or the targeted DLR of APGD-T (targets = the 2nd…(n+1)th
//! highest clean logits).

use tch::{nn::ModuleT, Device, Kind, Tensor};
use wdro_stages::params::{AttackKind, AttackParams, Norm};

use super::batch::{check_attack_input, check_set, chunks, image_norm, per_image, to_unit_float};
use super::pointwise::{self, PointwiseParts, Reduction};
use super::{Attack, AttackResult, MethodError, Progress};
use crate::losses;

/// The loss APGD maximises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApgdLoss {
    Ce,
    Dlr,
    /// APGD-T with this many target classes (AutoAttack standard: 9).
    DlrTargeted {
        n_target_classes: u32,
    },
}

#[derive(Clone, Debug)]
pub struct Apgd {
    pub norm: Norm,
    pub eps: f64,
    pub n_iter: u32,
    pub n_restarts: u32,
    pub seed: u64,
    pub loss: ApgdLoss,
    /// ρ of the oscillation check (AA `thr_decr`, 0.75).
    pub rho: f64,
    pub batch_size: i64,
}

impl Apgd {
    pub fn new(norm: Norm, eps: f64, loss: ApgdLoss, n_iter: u32, n_restarts: u32, seed: u64, batch_size: i64) -> Self {
        Apgd { norm, eps, n_iter, n_restarts, seed, loss, rho: 0.75, batch_size }
    }

    pub fn from_params(p: &AttackParams, batch_size: i64) -> Result<Self, MethodError> {
        let loss = match p.attack {
            AttackKind::ApgdCe => ApgdLoss::Ce,
            AttackKind::ApgdDlr => ApgdLoss::Dlr,
            other => return Err(MethodError::invalid("attack.attack", format!("{other:?} is not an APGD attack"))),
        };
        Ok(Apgd::new(p.norm, p.delta.0, loss, p.itr, p.restarts.max(1), p.seed, batch_size))
    }

    fn normalize(&self, x: &Tensor) -> Tensor {
        let flat = x.view([x.size()[0], -1]);
        let t = match self.norm {
            Norm::Linf => flat.abs().amax(1, false),
            Norm::L2 => flat.pow_tensor_scalar(2).sum_dim_intlist(-1, false, None::<Kind>).sqrt(),
        };
        x / (per_image(&t, x) + 1e-12)
    }

    fn criterion(&self, logits: &Tensor, y: &Tensor, y_target: Option<&Tensor>) -> Tensor {
        match (self.loss, y_target) {
            (ApgdLoss::Ce, _) => losses::ce(logits, y),
            (ApgdLoss::Dlr, _) => losses::dlr(logits, y),
            (ApgdLoss::DlrTargeted { .. }, Some(t)) => losses::dlr_targeted(logits, y, t),
            (ApgdLoss::DlrTargeted { .. }, None) => unreachable!("targeted APGD always has targets"),
        }
    }

    fn grad(&self, model: &dyn ModuleT, x: &Tensor, y: &Tensor, yt: Option<&Tensor>) -> (Tensor, Tensor, Tensor) {
        let xr = x.detach().set_requires_grad(true);
        let logits = model.forward_t(&xr, false);
        let li = self.criterion(&logits, y, yt);
        let g = Tensor::run_backward(&[li.sum(None::<Kind>)], &[&xr], false, false).pop().expect("one gradient");
        (logits.detach(), li.detach(), g)
    }

    /// `attack_single_run`: returns (acc per sample after all iterates, x_best_adv, per-iterate
    /// robust counts, per-iterate best-loss sums).
    fn single_run(
        &self,
        model: &dyn ModuleT,
        x: &Tensor,
        y: &Tensor,
        yt: Option<&Tensor>,
    ) -> (Tensor, Tensor, Vec<i64>, Vec<f64>) {
        let dev = x.device();
        let n_iter = self.n_iter as usize;
        let n_iter_2 = ((0.22 * n_iter as f64) as usize).max(1);
        let n_iter_min = ((0.06 * n_iter as f64) as usize).max(1);
        let size_decr = ((0.03 * n_iter as f64) as usize).max(1);
        let b = x.size()[0];
        let t = match self.norm {
            Norm::Linf => Tensor::rand(x.size(), (Kind::Float, Device::Cpu)).to_device(dev) * 2.0 - 1.0,
            Norm::L2 => Tensor::randn(x.size(), (Kind::Float, Device::Cpu)).to_device(dev),
        };
        let mut x_adv = (x + x.ones_like() * self.eps * self.normalize(&t)).clamp(0.0, 1.0);
        let mut x_best = x_adv.copy();
        let mut x_best_adv = x_adv.copy();
        let loss_steps = Tensor::zeros([n_iter as i64, b], (Kind::Float, dev));
        let (logits, loss_indiv, mut grad) = self.grad(model, &x_adv, y, yt);
        let mut grad_best = grad.copy();
        let mut acc = logits.argmax(1, false).eq_tensor(y);
        let mut loss_best = loss_indiv.copy();
        let mut step_size = Tensor::full([b, 1, 1, 1], 2.0 * self.eps, (Kind::Float, dev));
        let mut x_adv_old = x_adv.copy();
        let mut k = n_iter_2;
        let mut counter3 = 0usize;
        let mut loss_best_last_check = loss_best.copy();
        let mut reduced_last_check = loss_best.ones_like();
        let mut robust_counts = Vec::with_capacity(n_iter);
        let mut loss_sums = Vec::with_capacity(n_iter);
        let lo = x - self.eps;
        let hi = x + self.eps;
        for i in 0..n_iter {
            let next = tch::no_grad(|| {
                let grad2 = &x_adv - &x_adv_old;
                x_adv_old = x_adv.copy();
                let a = if i > 0 { 0.75 } else { 1.0 };
                match self.norm {
                    Norm::Linf => {
                        let x1 = &x_adv + &step_size * grad.sign();
                        let x1 = x1.maximum(&lo).minimum(&hi).clamp(0.0, 1.0);
                        let x1 = (&x_adv + (&x1 - &x_adv) * a + grad2 * (1.0 - a)).maximum(&lo).minimum(&hi);
                        x1.clamp(0.0, 1.0)
                    }
                    Norm::L2 => {
                        let proj = |z: &Tensor| -> Tensor {
                            let d = z - x;
                            let l2 = per_image(&image_norm(&d, 2.0), &d);
                            (x + self.normalize(&d) * (x.ones_like() * self.eps).minimum(&l2)).clamp(0.0, 1.0)
                        };
                        let x1 = proj(&(&x_adv + &step_size * self.normalize(&grad)));
                        let x1 = &x_adv + (&x1 - &x_adv) * a + grad2 * (1.0 - a);
                        proj(&x1)
                    }
                }
            });
            x_adv = next;
            let (logits, loss_indiv, g) = self.grad(model, &x_adv, y, yt);
            grad = g;
            let pred = logits.argmax(1, false).eq_tensor(y);
            acc = acc.logical_and(&pred);
            let fooled_now = per_image(&pred.logical_not(), &x_adv);
            x_best_adv = x_adv.where_self(&fooled_now, &x_best_adv);
            loss_steps.get(i as i64).copy_(&loss_indiv);
            let improved = loss_indiv.gt_tensor(&loss_best);
            let imp_img = per_image(&improved, &x_adv);
            x_best = x_adv.where_self(&imp_img, &x_best);
            grad_best = grad.where_self(&imp_img, &grad_best);
            loss_best = loss_indiv.where_self(&improved, &loss_best);
            robust_counts.push(acc.sum(Kind::Int64).int64_value(&[]));
            loss_sums.push(loss_best.sum(Kind::Double).double_value(&[]));
            counter3 += 1;
            if counter3 == k {
                // check_oscillation(loss_steps, i, k, k3 = rho); Python's index −1 wraps.
                let mut tcount = Tensor::zeros([b], (Kind::Float, dev));
                for c5 in 0..k {
                    let cur = (i as i64) - c5 as i64;
                    let prev = (cur - 1).rem_euclid(n_iter as i64);
                    tcount += loss_steps.get(cur).gt_tensor(&loss_steps.get(prev)).to_kind(Kind::Float);
                }
                let fl_osc = tcount.le(k as f64 * self.rho).to_kind(Kind::Float);
                let no_impr = (reduced_last_check.ones_like() - &reduced_last_check)
                    * loss_best_last_check.ge_tensor(&loss_best).to_kind(Kind::Float);
                let fl_osc = fl_osc.maximum(&no_impr);
                reduced_last_check = fl_osc.copy();
                loss_best_last_check = loss_best.copy();
                if fl_osc.sum(Kind::Float).double_value(&[]) > 0.0 {
                    let m = fl_osc.gt(0.0);
                    let mi = per_image(&m, &x_adv);
                    step_size = (&step_size / 2.0).where_self(&mi, &step_size);
                    x_adv = x_best.where_self(&mi, &x_adv);
                    grad = grad_best.where_self(&mi, &grad);
                }
                k = k.saturating_sub(size_decr).max(n_iter_min);
                counter3 = 0;
            }
        }
        (acc, x_best_adv, robust_counts, loss_sums)
    }
}

impl Attack for Apgd {
    fn name(&self) -> &'static str {
        match self.loss {
            ApgdLoss::Ce => "apgd-ce",
            ApgdLoss::Dlr => "apgd-dlr",
            ApgdLoss::DlrTargeted { .. } => "apgd-t",
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
        if self.n_iter == 0 {
            return Err(MethodError::invalid("attack.itr", "must be >= 1"));
        }
        let parts = self.run_parts(model, images, labels, progress)?;
        let r = pointwise::finish(Reduction::Apgd, parts, images, self.norm, self.n_iter as usize)?;
        Ok(r.to_device(images.device()))
    }
}

impl Apgd {
    /// The attack on the batches of a set (or a shard of whole batches), as parts for
    /// [`pointwise::finish`]. Each batch of `batch_size` images is one AutoAttack `perturb` call
    /// on its clean-correct points (seed reset to `seed`, restarts and targets on the points
    /// still robust), so a batch's results do not depend on the other batches. An empty set
    /// gives empty parts.
    pub fn run_parts(
        &self,
        model: &dyn ModuleT,
        images: &Tensor,
        labels: &Tensor,
        progress: Progress,
    ) -> Result<PointwiseParts, MethodError> {
        let n = check_set(images, labels, "attack input")?;
        if self.n_iter == 0 {
            return Err(MethodError::invalid("attack.itr", "must be >= 1"));
        }
        let x_all = to_unit_float(images);
        let dev = x_all.device();
        let loss_for_clean = match self.loss {
            ApgdLoss::Ce => wdro_stages::params::Loss::Ce,
            _ => wdro_stages::params::Loss::Dlr,
        };
        let clean = super::batch::pass(model, &x_all, labels, loss_for_clean, self.batch_size, false, dev);
        let mut robust = clean.correct.copy();
        let mut adv = x_all.copy();
        let n_iter = self.n_iter as usize;
        let mut curve_robust = Vec::new();
        let mut curve_loss = Vec::new();
        for (s, blen) in chunks(n, self.batch_size) {
            let mut rcb = vec![0i64; n_iter];
            let mut lcb = vec![0f64; n_iter];
            let bi = robust.narrow(0, s, blen).nonzero().squeeze_dim(1) + s;
            let len = bi.size()[0];
            if len > 0 {
                // One AutoAttack `perturb` call: seed reset, restarts (and targets) on the still-robust.
                let x = x_all.index_select(0, &bi);
                let y = labels.index_select(0, &bi);
                let mut acc = Tensor::ones([len], (Kind::Bool, dev));
                let mut badv = x.copy();
                tch::manual_seed(self.seed as i64);
                let targets: Vec<Option<i64>> = match self.loss {
                    ApgdLoss::DlrTargeted { n_target_classes } => (2..n_target_classes as i64 + 2).map(Some).collect(),
                    _ => vec![None],
                };
                let mut first_run = true;
                for target_class in targets {
                    for _ in 0..self.n_restarts {
                        let ind = acc.nonzero().squeeze_dim(1);
                        if ind.size()[0] == 0 {
                            continue;
                        }
                        let xf = x.index_select(0, &ind);
                        let yf = y.index_select(0, &ind);
                        let yt = target_class.map(|tc| {
                            let out = tch::no_grad(|| model.forward_t(&xf, false));
                            let m = out.size()[1];
                            out.sort(1, false).1.select(1, m - tc)
                        });
                        let (acc_curr, adv_curr, rc, ls) = self.single_run(model, &xf, &yf, yt.as_ref());
                        if first_run {
                            for t in 0..n_iter {
                                rcb[t] += rc[t];
                                lcb[t] += ls[t];
                            }
                            first_run = false;
                        }
                        let fooled = acc_curr.logical_not().nonzero().squeeze_dim(1);
                        let gi = ind.index_select(0, &fooled);
                        let _ = acc.index_fill_(0, &gi, 0);
                        let _ = badv.index_copy_(0, &gi, &adv_curr.index_select(0, &fooled));
                    }
                }
                let _ = robust.index_copy_(0, &bi, &acc);
                let _ = adv.index_copy_(0, &bi, &badv);
            }
            curve_robust.extend(rcb);
            curve_loss.extend(lcb);
            progress((s + blen) as u64, n as u64, &format!("{} {}/{n} images", self.name(), s + blen));
        }
        Ok(PointwiseParts::new(adv, robust, clean.correct, None, curve_robust, curve_loss, n_iter))
    }
}
