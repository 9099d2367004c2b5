//! Clean evaluation (spec §6.2.1; OC23 `eval(cond=True)`): accuracy A, V(0) = E_P[J] and
//! W(0) = E_P[J | S^c] (mean loss over misclassified points; NaN when A = 1, flagged) for CE,
//! DLR and ReDLR, plus V_S = E_P[J | S] and per-sample predictions, correctness and margins.
//!
//! Identity used by the tests (spec §2.3): V(0) = A·V_S + (1 − A)·W(0). Inference mode
//! (`no_grad`, eval-mode BatchNorm), batched; the set may be u8 on the CPU.

use tch::{nn::ModuleT, Device, Kind, Tensor};
use wdro_stages::params::Loss;

use crate::attacks::batch::{check_set, chunks, to_unit_float};
use crate::attacks::{MethodError, Progress};
use crate::losses::{self, ALL_LOSSES};

/// V(0), W(0) and V_S of one loss.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct LossStats {
    /// Mean over all N points.
    pub v0: f64,
    /// Mean over misclassified points (NaN if there are none).
    pub w0: f64,
    /// Mean over correctly classified points (NaN if there are none).
    pub v_s: f64,
}

/// Per-sample clean results, all [N] on the CPU.
#[derive(Debug)]
pub struct PerSample {
    /// argmax f(x_i) (first index on ties) — i64.
    pub pred: Tensor,
    pub correct: Tensor,
    /// z_y − max_{k≠y} z_k — f32.
    pub margin: Tensor,
    /// J_i for CE, DLR, ReDLR (in [`ALL_LOSSES`] order) — f32.
    pub losses: [Tensor; 3],
}

#[derive(Debug)]
pub struct CleanStats {
    pub n: i64,
    pub n_correct: i64,
    /// A = n_correct / n.
    pub acc: f64,
    /// Per loss, in [`ALL_LOSSES`] order.
    pub stats: [LossStats; 3],
    pub per_sample: PerSample,
}

impl CleanStats {
    pub fn loss(&self, loss: Loss) -> LossStats {
        let i = ALL_LOSSES.iter().position(|l| *l == loss).expect("all losses listed");
        self.stats[i]
    }
}

fn masked_mean(v: &Tensor, mask: &Tensor) -> f64 {
    let k = mask.sum(Kind::Int64).int64_value(&[]);
    if k == 0 {
        return f64::NAN;
    }
    (v.to_kind(Kind::Double) * mask.to_kind(Kind::Double)).sum(Kind::Double).double_value(&[]) / k as f64
}

/// Evaluates the model on the whole set in batches on `device`.
pub fn evaluate(
    model: &dyn ModuleT,
    images: &Tensor,
    labels: &Tensor,
    batch_size: i64,
    device: Device,
    progress: Progress,
) -> Result<CleanStats, MethodError> {
    let n = check_set(images, labels, "clean data")?;
    if n == 0 {
        return Err(MethodError::invalid("clean data", "the data set is empty"));
    }
    CleanStats::from_per_sample(per_sample(model, images, labels, batch_size, device, progress)?)
}

/// The per-sample pass of [`evaluate`] (an empty set gives empty tensors): what a shard of the
/// clean stage computes on its image range.
pub fn per_sample(
    model: &dyn ModuleT,
    images: &Tensor,
    labels: &Tensor,
    batch_size: i64,
    device: Device,
    progress: Progress,
) -> Result<PerSample, MethodError> {
    let n = check_set(images, labels, "clean data")?;
    let cpu = (Kind::Float, Device::Cpu);
    let pred = Tensor::zeros([n], (Kind::Int64, Device::Cpu));
    let margin = Tensor::zeros([n], cpu);
    let ls = [Tensor::zeros([n], cpu), Tensor::zeros([n], cpu), Tensor::zeros([n], cpu)];
    for (s, len) in chunks(n, batch_size) {
        let x = to_unit_float(&images.narrow(0, s, len).to_device(device));
        let y = labels.narrow(0, s, len).to_device(device);
        let logits = tch::no_grad(|| model.forward_t(&x, false));
        let m = logits.size().get(1).copied().unwrap_or(0);
        if m < 3 {
            return Err(MethodError::invalid(
                "model",
                format!("DLR/ReDLR need at least 3 classes, the model has {m} outputs"),
            ));
        }
        let ymax = y.max().int64_value(&[]);
        if ymax >= m {
            return Err(MethodError::invalid(
                "clean data",
                format!("label {ymax} is out of range for a model with {m} outputs"),
            ));
        }
        pred.narrow(0, s, len).copy_(&logits.argmax(1, false).to_device(Device::Cpu));
        margin.narrow(0, s, len).copy_(&losses::margin(&logits, &y).to_device(Device::Cpu));
        for (t, loss) in ls.iter().zip(ALL_LOSSES) {
            t.narrow(0, s, len).copy_(&losses::per_sample(loss, &logits, &y).to_device(Device::Cpu));
        }
        progress((s + len) as u64, n as u64, "clean evaluation");
    }
    let correct = pred.eq_tensor(&labels.to_device(Device::Cpu));
    Ok(PerSample { pred, correct, margin, losses: ls })
}

impl PerSample {
    /// Concatenates shards' per-sample results in data order (`correct` may be u8 or bool).
    pub fn cat(parts: &[PerSample]) -> Result<PerSample, MethodError> {
        if parts.is_empty() {
            return Err(MethodError::invalid("clean merge", "no shards"));
        }
        let cat = |f: &dyn Fn(&PerSample) -> Tensor| Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 0);
        Ok(PerSample {
            pred: cat(&|p| p.pred.shallow_clone()),
            correct: cat(&|p| p.correct.to_kind(Kind::Bool)),
            margin: cat(&|p| p.margin.shallow_clone()),
            losses: [0, 1, 2].map(|i| cat(&|p| p.losses[i].shallow_clone())),
        })
    }
}

impl CleanStats {
    /// The statistics of [`evaluate`] from per-sample results (of the whole set, or of its shards
    /// concatenated: the reductions run over the same tensor either way, so they are bit-identical).
    pub fn from_per_sample(per_sample: PerSample) -> Result<CleanStats, MethodError> {
        let n = per_sample.pred.size()[0];
        if n == 0 {
            return Err(MethodError::invalid("clean data", "the data set is empty"));
        }
        let correct = per_sample.correct.to_kind(Kind::Bool);
        let wrong = correct.logical_not();
        let n_correct = correct.sum(Kind::Int64).int64_value(&[]);
        let ls = &per_sample.losses;
        let stats = [0, 1, 2].map(|i| LossStats {
            v0: ls[i].to_kind(Kind::Double).mean(Kind::Double).double_value(&[]),
            w0: masked_mean(&ls[i], &wrong),
            v_s: masked_mean(&ls[i], &correct),
        });
        Ok(CleanStats {
            n,
            n_correct,
            acc: n_correct as f64 / n as f64,
            stats,
            per_sample: PerSample { correct, ..per_sample },
        })
    }
}
