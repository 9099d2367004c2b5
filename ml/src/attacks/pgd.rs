//! Plain pointwise PGD with a random start — the "PGD-k (sanity)" check of spec §3.3, not part of
//! either paper's protocol: ℓ∞ start U(−ε, ε), ℓ2 start uniform in radius along a Gaussian
//! direction; step δ/4 (2/255 at ε = 8/255), `itr` steps, ℓ∞ sign steps + clipping or ℓ2
//! normalised steps + ball projection, [0, 1] clamp. Per-sample worst case: a point counts as
//! fooled if any iterate of any restart misclassifies it, and its adversarial image is the first
//! such iterate. Restarts attack only the points still robust (AutoAttack's convention).
//!
//! The set is walked in batches of `batch_size` images, each attacked on its own with a seed
//! derived from the seed and the batch's index ([`Pgd::run_parts`]), so the attack shards along
//! the data axis with bit-identical results (see [`super::pointwise`]).

use tch::{nn::ModuleT, Device, Kind, Tensor};
use wdro_stages::params::{AttackParams, Loss, Norm};

use super::batch::{check_attack_input, check_set, chunks, image_norm, loss_grad, per_image, to_unit_float};
use super::pointwise::{self, batch_seed, PointwiseParts, Reduction};
use super::wpgd::EPS;
use super::{Attack, AttackResult, MethodError, Progress};

#[derive(Clone, Debug)]
pub struct Pgd {
    pub norm: Norm,
    pub eps: f64,
    /// Step size (default δ/4).
    pub step: f64,
    pub itr: u32,
    pub loss: Loss,
    pub restarts: u32,
    pub seed: u64,
    pub batch_size: i64,
}

impl Pgd {
    pub fn from_params(p: &AttackParams, batch_size: i64) -> Self {
        Pgd {
            norm: p.norm,
            eps: p.delta.0,
            step: p.delta.0 / 4.0,
            itr: p.itr,
            loss: p.loss,
            restarts: p.restarts.max(1),
            seed: p.seed,
            batch_size,
        }
    }

    fn random_start(&self, x0: &Tensor) -> Tensor {
        let dev = x0.device();
        let start = match self.norm {
            Norm::Linf => (Tensor::rand(x0.size(), (Kind::Float, Device::Cpu)) * 2.0 - 1.0) * self.eps,
            Norm::L2 => {
                let g = Tensor::randn(x0.size(), (Kind::Float, Device::Cpu));
                let n = per_image(&image_norm(&g, 2.0), &g) + EPS;
                let r = per_image(&Tensor::rand([x0.size()[0]], (Kind::Float, Device::Cpu)), &g);
                g / n * r * self.eps
            }
        };
        (x0 + start.to_device(dev)).clamp(0.0, 1.0)
    }

    fn project(&self, x: &Tensor, x0: &Tensor) -> Tensor {
        match self.norm {
            Norm::Linf => (x0 + (x - x0).clamp(-self.eps, self.eps)).clamp(0.0, 1.0),
            Norm::L2 => {
                let d = x - x0;
                let n = per_image(&image_norm(&d, 2.0), &d) + EPS;
                (x0 + &d * (n.reciprocal() * self.eps).clamp_max(1.0)).clamp(0.0, 1.0)
            }
        }
    }

    fn ascent(&self, g: &Tensor) -> Tensor {
        match self.norm {
            Norm::Linf => g.sign(),
            Norm::L2 => g / (per_image(&image_norm(g, 2.0), g) + EPS),
        }
    }
}

impl Pgd {
    /// The attack on the batches of a set (or a shard of whole batches: `first_batch` is the
    /// global index of its first batch), as parts for [`pointwise::finish`]. Each batch of
    /// `batch_size` images is attacked on its own: its clean-correct points, restarts on the
    /// points still robust, random starts from the batch's seed [`pointwise::batch_seed`]; so a
    /// batch's results do not depend on the other batches. An empty set gives empty parts.
    pub fn run_parts(
        &self,
        model: &dyn ModuleT,
        images: &Tensor,
        labels: &Tensor,
        first_batch: i64,
        progress: Progress,
    ) -> Result<PointwiseParts, MethodError> {
        let n = check_set(images, labels, "attack input")?;
        if self.itr == 0 {
            return Err(MethodError::invalid("attack.itr", "must be >= 1"));
        }
        let itr = self.itr as usize;
        let x0_all = to_unit_float(images);
        let dev = x0_all.device();
        let clean = super::batch::pass(model, &x0_all, labels, self.loss, self.batch_size, false, dev);
        let mut robust = clean.correct.copy();
        let mut adv = x0_all.copy();
        let mut best_loss = clean.loss.copy();
        let mut curve_robust = Vec::new();
        let mut curve_loss = Vec::new();
        for (b, (s, blen)) in chunks(n, self.batch_size).enumerate() {
            let mut rc = vec![0i64; itr];
            let mut lc = vec![0f64; itr];
            tch::manual_seed(batch_seed(self.seed, first_batch + b as i64));
            for restart in 0..self.restarts {
                let bi = robust.narrow(0, s, blen).nonzero().squeeze_dim(1) + s;
                let len = bi.size()[0];
                if len == 0 {
                    break;
                }
                let x0 = x0_all.index_select(0, &bi);
                let y = labels.index_select(0, &bi);
                let mut x = self.random_start(&x0);
                let mut fooled = Tensor::zeros([len], (Kind::Bool, dev));
                let mut bx = x0.copy();
                for t in 0..itr {
                    let r = loss_grad(model, &x, &y, self.loss);
                    x = self.project(&(&x + self.ascent(&r.grad) * self.step), &x0);
                    let logits = tch::no_grad(|| model.forward_t(&x, false));
                    let wrong = logits.argmax(1, false).ne_tensor(&y);
                    let newly = wrong.logical_and(&fooled.logical_not());
                    bx = bx.where_self(&per_image(&newly, &bx).logical_not(), &x);
                    fooled = fooled.logical_or(&wrong);
                    let cur = crate::losses::per_sample(self.loss, &logits, &y);
                    if restart == 0 {
                        rc[t] += len - fooled.sum(Kind::Int64).int64_value(&[]);
                        lc[t] += cur.sum(Kind::Double).double_value(&[]);
                    }
                    let lb = best_loss.index_select(0, &bi);
                    let _ = best_loss.index_copy_(0, &bi, &lb.maximum(&cur));
                }
                let _ = robust.index_copy_(0, &bi, &fooled.logical_not());
                let _ = adv.index_copy_(0, &bi, &bx);
            }
            curve_robust.extend(rc);
            curve_loss.extend(lc);
            progress((s + blen) as u64, n as u64, &format!("pgd {}/{n} images", s + blen));
        }
        Ok(PointwiseParts::new(adv, robust, clean.correct, Some(best_loss), curve_robust, curve_loss, itr))
    }
}

impl Attack for Pgd {
    fn name(&self) -> &'static str {
        "pgd"
    }

    fn run(
        &self,
        model: &dyn ModuleT,
        images: &Tensor,
        labels: &Tensor,
        progress: Progress,
    ) -> Result<AttackResult, MethodError> {
        check_attack_input(images, labels)?;
        let parts = self.run_parts(model, images, labels, 0, progress)?;
        let r = pointwise::finish(Reduction::Pgd, parts, images, self.norm, self.itr as usize)?;
        Ok(r.to_device(images.device()))
    }
}
