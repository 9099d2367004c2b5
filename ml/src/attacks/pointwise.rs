//! The pointwise attacks (PGD, APGD-CE/-DLR) as a data-parallel computation: a pass over image
//! batches that yields [`PointwiseParts`] (per-sample results and per-batch curve terms), and a
//! [`finish`] that reduces parts to an [`AttackResult`].
//!
//! Why the split: each batch of these attacks depends only on its own images (and a per-batch
//! seed), so a shard of whole batches produces exactly the parts the unsharded run produces for
//! those batches. [`PointwiseParts::cat`] joins shards in data order and [`finish`] applies the
//! same reductions to the joined parts as the unsharded run applies to its own, so merged results
//! are bit-identical: counts are integers, the per-iterate loss sums fold the per-batch f64
//! terms in batch order, and the per-sample reductions run over the same concatenated tensors.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};
use wdro_stages::params::Norm;

use super::{transport_cost, AttackResult, IterStat, MethodError};
use crate::checkpoint;

/// How [`finish`] turns parts into the reported loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// PGD: loss_max = mean over the clean-correct points of each point's best loss; curve loss
    /// = per-iterate loss sum / number of clean-correct points (at least 1).
    Pgd,
    /// APGD: curve loss = per-iterate best-loss sum / number of clean-correct points (NaN if
    /// none); loss_max = the last iterate's curve loss.
    Apgd,
}

/// What a pass over some batches of a set produced. Per-sample tensors are [n] on the CPU in
/// data order; per-batch tensors are [batches, itr] on the CPU in batch order.
#[derive(Debug)]
pub struct PointwiseParts {
    /// Adversarial images [n, C, H, W] f32 in [0, 1].
    pub adv: Tensor,
    /// Survived every iterate and restart (bool).
    pub robust: Tensor,
    /// Correctly classified at X0 (bool).
    pub clean_correct: Tensor,
    /// PGD: each point's best loss over its iterates (its clean loss if never attacked), f32.
    pub best_loss: Option<Tensor>,
    /// Points of the batch still robust after iterate t of the first run (i64).
    pub curve_robust: Tensor,
    /// The batch's loss sum at iterate t of the first run (f64).
    pub curve_loss: Tensor,
}

impl PointwiseParts {
    /// Number of images.
    pub fn len(&self) -> i64 {
        self.robust.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Builds parts from the per-batch curve terms collected as flat row-major vectors.
    pub(crate) fn new(
        adv: Tensor,
        robust: Tensor,
        clean_correct: Tensor,
        best_loss: Option<Tensor>,
        curve_robust: Vec<i64>,
        curve_loss: Vec<f64>,
        itr: usize,
    ) -> PointwiseParts {
        let rows = curve_robust.len().checked_div(itr).unwrap_or(0) as i64;
        let cpu = |t: Tensor| t.to_device(Device::Cpu);
        PointwiseParts {
            adv: cpu(adv.to_kind(Kind::Float)),
            robust: cpu(robust.to_kind(Kind::Bool)),
            clean_correct: cpu(clean_correct.to_kind(Kind::Bool)),
            best_loss: best_loss.map(cpu),
            curve_robust: Tensor::from_slice(&curve_robust).reshape([rows, itr as i64]),
            curve_loss: Tensor::from_slice(&curve_loss).reshape([rows, itr as i64]),
        }
    }

    /// Joins shards' parts in data order.
    pub fn cat(parts: &[PointwiseParts]) -> Result<PointwiseParts, MethodError> {
        let first = parts.first().ok_or_else(|| MethodError::invalid("pointwise merge", "no shards"))?;
        let itr = first.curve_loss.size()[1];
        if parts.iter().any(|p| p.curve_loss.size()[1] != itr || p.best_loss.is_some() != first.best_loss.is_some()) {
            return Err(MethodError::invalid("pointwise merge", "shards differ in iterations or attack"));
        }
        let cat = |f: &dyn Fn(&PointwiseParts) -> Tensor| Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 0);
        Ok(PointwiseParts {
            adv: cat(&|p| p.adv.shallow_clone()),
            robust: cat(&|p| p.robust.shallow_clone()),
            clean_correct: cat(&|p| p.clean_correct.shallow_clone()),
            best_loss: first
                .best_loss
                .as_ref()
                .map(|_| cat(&|p| p.best_loss.as_ref().expect("checked").shallow_clone())),
            curve_robust: cat(&|p| p.curve_robust.shallow_clone()),
            curve_loss: cat(&|p| p.curve_loss.shallow_clone()),
        })
    }

    /// Writes everything but `adv` (which goes into its own bundle) as safetensors.
    pub fn save(&self, path: &Path) -> Result<(), MethodError> {
        let mut t = BTreeMap::new();
        t.insert("robust".to_string(), self.robust.to_kind(Kind::Uint8));
        t.insert("clean_correct".to_string(), self.clean_correct.to_kind(Kind::Uint8));
        if let Some(b) = &self.best_loss {
            t.insert("best_loss".to_string(), b.shallow_clone());
        }
        t.insert("curve_robust".to_string(), self.curve_robust.shallow_clone());
        t.insert("curve_loss".to_string(), self.curve_loss.shallow_clone());
        checkpoint::write_safetensors(&t, path)
            .map_err(|e| MethodError::invalid("pointwise parts", format!("writing {}: {e}", path.display())))
    }

    /// Reads what [`PointwiseParts::save`] wrote, with the adversarial images of the same shard.
    pub fn load(path: &Path, adv: Tensor) -> Result<PointwiseParts, MethodError> {
        let bad = |m: String| MethodError::invalid(format!("pointwise parts {}", path.display()), m);
        let mut t = checkpoint::read_safetensors(path).map_err(|e| bad(e.to_string()))?;
        let mut take = |k: &str| t.remove(k).ok_or_else(|| bad(format!("no tensor `{k}`")));
        let p = PointwiseParts {
            robust: take("robust")?.to_kind(Kind::Bool),
            clean_correct: take("clean_correct")?.to_kind(Kind::Bool),
            curve_robust: take("curve_robust")?,
            curve_loss: take("curve_loss")?,
            best_loss: t.remove("best_loss"),
            adv: adv.to_device(Device::Cpu).to_kind(Kind::Float),
        };
        let n = p.len();
        if p.clean_correct.size()[0] != n
            || p.adv.size()[0] != n
            || p.best_loss.as_ref().is_some_and(|b| b.size()[0] != n)
        {
            return Err(bad(format!("per-sample tensors disagree in length with the {n} robust flags")));
        }
        if p.curve_robust.dim() != 2 || p.curve_robust.size() != p.curve_loss.size() {
            return Err(bad("curve tensors must both be [batches, itr]".into()));
        }
        Ok(p)
    }
}

/// Reduces parts (of a whole set, or its shards joined) to the attack's result, on the CPU.
/// `x0`: the clean images of the same points (u8 or f32, any device), for the transport cost.
pub fn finish(
    reduction: Reduction,
    parts: PointwiseParts,
    x0: &Tensor,
    norm: Norm,
    itr: usize,
) -> Result<AttackResult, MethodError> {
    let n = parts.len();
    if n == 0 {
        return Err(MethodError::invalid("attack input", "the data set is empty"));
    }
    if parts.curve_loss.size()[1] != itr as i64 {
        return Err(MethodError::invalid(
            "pointwise parts",
            format!("curves have {} iterates, not {itr}", parts.curve_loss.size()[1]),
        ));
    }
    // Per-iterate sums over batches: integer counts, and the f64 loss terms folded in batch
    // order (the order the unsharded run accumulates them in).
    let rows = parts.curve_loss.size()[0] as usize;
    let cr = Vec::<i64>::try_from(parts.curve_robust.reshape([-1]))?;
    let cl = Vec::<f64>::try_from(parts.curve_loss.reshape([-1]))?;
    let mut robust_per_iter = vec![0i64; itr];
    let mut loss_per_iter = vec![0f64; itr];
    for b in 0..rows {
        for t in 0..itr {
            robust_per_iter[t] += cr[b * itr + t];
            loss_per_iter[t] += cl[b * itr + t];
        }
    }
    let n_clean = parts.clean_correct.sum(Kind::Int64).int64_value(&[]);
    let (curves, loss_max): (Vec<IterStat>, f64) = match reduction {
        Reduction::Pgd => {
            let attacked = n_clean.max(1) as f64;
            let curves = robust_per_iter
                .iter()
                .zip(&loss_per_iter)
                .map(|(r, l)| IterStat { acc: *r as f64 / n as f64, loss: l / attacked })
                .collect();
            let best = parts.best_loss.as_ref().ok_or_else(|| MethodError::invalid("pgd parts", "no best_loss"))?;
            let lm = (best.to_kind(Kind::Double) * parts.clean_correct.to_kind(Kind::Double))
                .sum(Kind::Double)
                .double_value(&[])
                / attacked;
            (curves, lm)
        }
        Reduction::Apgd => {
            let curves = robust_per_iter
                .iter()
                .zip(&loss_per_iter)
                .map(|(r, l)| IterStat {
                    acc: *r as f64 / n as f64,
                    loss: if n_clean > 0 { l / n_clean as f64 } else { f64::NAN },
                })
                .collect::<Vec<_>>();
            let lm = curves.last().map(|c: &IterStat| c.loss).unwrap_or(f64::NAN);
            (curves, lm)
        }
    };
    let acc = parts.robust.sum(Kind::Int64).int64_value(&[]) as f64 / n as f64;
    let w_dist = transport_cost(&x0.to_device(Device::Cpu), &parts.adv, 1, norm);
    Ok(AttackResult {
        last_iterate: parts.adv.shallow_clone(),
        adv: parts.adv,
        acc_min: acc,
        loss_max,
        curves,
        w_dist,
        robust: parts.robust,
        clean_correct: parts.clean_correct,
        best_iter: itr,
    })
}

impl AttackResult {
    /// The result with its tensors on `device` (the attacks' contract: results stay on the
    /// input's device).
    pub fn to_device(self, device: Device) -> AttackResult {
        AttackResult {
            adv: self.adv.to_device(device),
            last_iterate: self.last_iterate.to_device(device),
            robust: self.robust.to_device(device),
            clean_correct: self.clean_correct.to_device(device),
            ..self
        }
    }
}

/// The seed of batch `batch` (global index in the set) of an attack seeded with `seed`
/// (splitmix64), so a batch's random start does not depend on which shard runs it.
pub fn batch_seed(seed: u64, batch: i64) -> i64 {
    let mut z = seed.wrapping_add((batch as u64).wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as i64 & i64::MAX
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(n: i64, rows: usize, itr: usize, off: f64) -> PointwiseParts {
        let cr: Vec<i64> = (0..rows * itr).map(|i| i as i64 % 3).collect();
        let cl: Vec<f64> = (0..rows * itr).map(|i| 0.1 * i as f64 + off + 1e16 * (i % 2) as f64).collect();
        let robust = Tensor::from_slice(&(0..n).map(|i| i % 2 == 0).collect::<Vec<_>>());
        let cc = Tensor::from_slice(&(0..n).map(|i| i % 3 != 0).collect::<Vec<_>>());
        let best = Tensor::from_slice(&(0..n).map(|i| (i as f32).sqrt() + off as f32).collect::<Vec<_>>());
        PointwiseParts::new(
            Tensor::zeros([n, 1, 2, 2], (Kind::Float, Device::Cpu)),
            robust,
            cc,
            Some(best),
            cr,
            cl,
            itr,
        )
    }

    #[test]
    fn joined_parts_reduce_like_the_whole() {
        let a = parts(5, 2, 3, 0.3);
        let b = parts(0, 0, 3, 0.0);
        let c = parts(4, 1, 3, 7.7);
        let whole = PointwiseParts::cat(&[a, b, c]).unwrap();
        assert_eq!(whole.len(), 9);
        assert_eq!(whole.curve_loss.size(), vec![3, 3]);
        let x0 = Tensor::zeros([9, 1, 2, 2], (Kind::Uint8, Device::Cpu));
        let r = finish(Reduction::Pgd, whole, &x0, Norm::Linf, 3).unwrap();
        // Iterate 0: rows 0 and 1 of `a`, then row 0 of `c`, folded in that order; 5 clean-correct.
        let want: f64 = ((0.0 + 0.3) + (0.1 * 3.0 + 0.3 + 1e16)) + 7.7;
        assert_eq!(r.curves[0].loss.to_bits(), (want / 5.0).to_bits());
        assert_eq!(r.acc_min, 5.0 / 9.0);
        let e = finish(Reduction::Apgd, parts(0, 0, 3, 0.0), &x0.narrow(0, 0, 0), Norm::Linf, 3).unwrap_err();
        assert!(e.to_string().contains("empty"));
    }

    #[test]
    fn parts_round_trip_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = parts(4, 1, 2, 0.5);
        let path = dir.path().join("parts.safetensors");
        p.save(&path).unwrap();
        let q = PointwiseParts::load(&path, p.adv.shallow_clone()).unwrap();
        assert!(q.robust.equal(&p.robust) && q.clean_correct.equal(&p.clean_correct));
        assert!(q.curve_loss.equal(&p.curve_loss) && q.best_loss.unwrap().equal(p.best_loss.as_ref().unwrap()));
        let e = PointwiseParts::load(&path, p.adv.narrow(0, 0, 3)).unwrap_err();
        assert!(e.to_string().contains("disagree"), "{e}");
    }

    #[test]
    fn batch_seeds_differ_and_are_stable() {
        assert_ne!(batch_seed(0, 0), batch_seed(0, 1));
        assert_ne!(batch_seed(0, 1), batch_seed(1, 0));
        assert_eq!(batch_seed(7, 3), batch_seed(7, 3));
        assert!(batch_seed(u64::MAX, i64::MAX) >= 0);
    }
}
