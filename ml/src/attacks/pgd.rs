//! Plain pointwise PGD with a random start — the "PGD-k (sanity)" check of spec §3.3, not part of
//! either paper's protocol: ℓ∞ start U(−ε, ε), ℓ2 start uniform in radius along a Gaussian
//! direction; step δ/4 (2/255 at ε = 8/255), `itr` steps, ℓ∞ sign steps + clipping or ℓ2
//! normalised steps + ball projection, [0, 1] clamp. Per-sample worst case: a point counts as
//! fooled if any iterate of any restart misclassifies it, and its adversarial image is the first
//! such iterate. Restarts attack only the points still robust (AutoAttack's convention).

use tch::{nn::ModuleT, Device, Kind, Tensor};
use wdro_stages::params::{AttackParams, Loss, Norm};

use super::batch::{check_set, chunks, image_norm, loss_grad, per_image, to_unit_float};
use super::wpgd::EPS;
use super::{transport_cost, Attack, AttackResult, IterStat, MethodError, Progress};

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
        let n = check_set(images, labels, "attack input")?;
        if n == 0 {
            return Err(MethodError::invalid("attack input", "the data set is empty"));
        }
        let x0_all = to_unit_float(images);
        let dev = x0_all.device();
        let clean = super::batch::pass(model, &x0_all, labels, self.loss, self.batch_size, false, dev);
        let mut robust = clean.correct.copy();
        let mut adv = x0_all.copy();
        let mut best_loss = clean.loss.copy();
        let mut robust_per_iter = vec![0i64; self.itr as usize];
        let mut loss_per_iter = vec![0f64; self.itr as usize];
        tch::manual_seed(self.seed as i64);
        let total = u64::from(self.restarts) * n as u64;
        let mut done = 0u64;
        for restart in 0..self.restarts {
            let idx = robust.nonzero().squeeze_dim(1);
            let m = idx.size()[0];
            for (s, len) in chunks(m, self.batch_size) {
                let bi = idx.narrow(0, s, len);
                let x0 = x0_all.index_select(0, &bi);
                let y = labels.index_select(0, &bi);
                let mut x = self.random_start(&x0);
                let mut fooled = Tensor::zeros([len], (Kind::Bool, dev));
                let mut bx = x0.copy();
                for t in 0..self.itr as usize {
                    let r = loss_grad(model, &x, &y, self.loss);
                    x = self.project(&(&x + self.ascent(&r.grad) * self.step), &x0);
                    let logits = tch::no_grad(|| model.forward_t(&x, false));
                    let wrong = logits.argmax(1, false).ne_tensor(&y);
                    let newly = wrong.logical_and(&fooled.logical_not());
                    bx = bx.where_self(&per_image(&newly, &bx).logical_not(), &x);
                    fooled = fooled.logical_or(&wrong);
                    let cur = crate::losses::per_sample(self.loss, &logits, &y);
                    if restart == 0 {
                        robust_per_iter[t] += len - fooled.sum(Kind::Int64).int64_value(&[]);
                        loss_per_iter[t] += cur.sum(Kind::Double).double_value(&[]);
                    }
                    let lb = best_loss.index_select(0, &bi);
                    let _ = best_loss.index_copy_(0, &bi, &lb.maximum(&cur));
                }
                let _ = robust.index_copy_(0, &bi, &fooled.logical_not());
                let _ = adv.index_copy_(0, &bi, &bx);
                done += len as u64;
                progress(done, total, &format!("pgd restart {} batch at {}/{m}", restart + 1, s + len));
            }
        }
        let acc = robust.sum(Kind::Int64).int64_value(&[]) as f64 / n as f64;
        // Curves follow the first restart: robust fraction of the whole set after iterate t
        // (clean-misclassified points count as not robust) and the mean loss over the attacked
        // points at iterate t.
        let attacked = clean.correct.sum(Kind::Int64).int64_value(&[]).max(1) as f64;
        let curves = robust_per_iter
            .iter()
            .zip(&loss_per_iter)
            .map(|(r, l)| IterStat { acc: *r as f64 / n as f64, loss: l / attacked })
            .collect();
        let w_dist = transport_cost(&x0_all, &adv, 1, self.norm);
        Ok(AttackResult {
            last_iterate: adv.shallow_clone(),
            adv,
            acc_min: acc,
            loss_max: (best_loss.to_kind(Kind::Double) * clean.correct.to_kind(Kind::Double))
                .sum(Kind::Double)
                .double_value(&[])
                / attacked,
            curves,
            w_dist,
            robust,
            clean_correct: clean.correct,
            best_iter: self.itr as usize,
        })
    }
}
