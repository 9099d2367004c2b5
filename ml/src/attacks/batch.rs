//! Batched passes over a whole data set in eval mode: per-sample losses, correctness and the
//! input gradient of the summed loss (spec §2.1: "backpropagate their **sum** to the input, so
//! each g_i is the unscaled gradient of its own loss"). Υ, the clean stage and every attack go
//! through these, so they all see the same numbers.
//!
//! Data may be u8 (a data-set bundle, converted per batch as `x / 255`, spec §1.1) or f32 in
//! [0, 1] (an adversarial bundle or an attack iterate); batches are moved to the model's device
//! on the fly, so a u8 set on the CPU costs N·3072 bytes and device memory stays one batch.

use tch::{nn::ModuleT, Device, Kind, Tensor};
use wdro_stages::params::{Loss, Norm};

use super::MethodError;
use crate::losses;

/// `x` as float32 in [0, 1]: u8 images become `x / 255` (torchvision `ToTensor`), float images
/// are cast to f32 unchanged.
pub fn to_unit_float(x: &Tensor) -> Tensor {
    match x.kind() {
        Kind::Uint8 => x.to_kind(Kind::Float) / 255.0,
        Kind::Float => x.shallow_clone(),
        _ => x.to_kind(Kind::Float),
    }
}

/// `(start, len)` of consecutive batches covering `0..n`.
pub fn chunks(n: i64, batch_size: i64) -> impl Iterator<Item = (i64, i64)> {
    let bs = batch_size.max(1);
    (0..n).step_by(bs as usize).map(move |s| (s, bs.min(n - s)))
}

/// Checks an image set [N, C, H, W] and its labels [N] (i64, ≥ 0) before any batch runs, so a
/// bad input is an error naming the input rather than a libtorch panic mid-run.
/// [`check_set`] for an attack's whole input, which must hold at least one image (an attack on
/// nothing has no accuracy to report).
pub fn check_attack_input(images: &Tensor, labels: &Tensor) -> Result<i64, MethodError> {
    let n = check_set(images, labels, "attack input")?;
    if n == 0 {
        return Err(MethodError::invalid("attack input", "the data set is empty"));
    }
    Ok(n)
}

pub fn check_set(images: &Tensor, labels: &Tensor, what: &str) -> Result<i64, MethodError> {
    let s = images.size();
    if s.len() != 4 {
        return Err(MethodError::invalid(what, format!("images must be [N, C, H, W], got {s:?}")));
    }
    if !matches!(images.kind(), Kind::Uint8 | Kind::Float) {
        return Err(MethodError::invalid(what, format!("images must be u8 or f32, got {:?}", images.kind())));
    }
    let l = labels.size();
    if l.len() != 1 || l[0] != s[0] {
        return Err(MethodError::invalid(what, format!("labels must be [{}], got {l:?}", s[0])));
    }
    if labels.kind() != Kind::Int64 {
        return Err(MethodError::invalid(what, format!("labels must be i64, got {:?}", labels.kind())));
    }
    if s[0] > 0 && labels.min().int64_value(&[]) < 0 {
        return Err(MethodError::invalid(what, "labels must be >= 0"));
    }
    Ok(s[0])
}

/// Per-image norm over all non-batch dims (C·H·W entries; spec §1.3): ℓ1, ℓ2 or ℓ∞ by `p`.
pub fn image_norm(x: &Tensor, p: f64) -> Tensor {
    let dims: Vec<i64> = (1..x.dim() as i64).collect();
    x.norm_scalaropt_dim(p, dims.as_slice(), false)
}

/// The image norm s of a threat (ℓ∞ or ℓ2) as a `p` for [`image_norm`].
pub fn image_p(norm: Norm) -> f64 {
    match norm {
        Norm::Linf => f64::INFINITY,
        Norm::L2 => 2.0,
    }
}

/// The dual (gradient) norm s* as a `p` for [`image_norm`].
pub fn dual_p(norm: Norm) -> f64 {
    f64::from(norm.s_star())
}

/// Reshapes a per-image vector [N] to [N, 1, 1, 1] (broadcast against images).
pub fn per_image(v: &Tensor, like: &Tensor) -> Tensor {
    let mut shape = vec![-1i64];
    shape.extend(std::iter::repeat_n(1, like.dim() - 1));
    v.reshape(shape.as_slice())
}

/// One batch: logits (detached), per-sample losses (detached) and ∇x Σ_i J_i.
pub struct GradBatch {
    pub logits: Tensor,
    pub loss: Tensor,
    pub grad: Tensor,
}

/// Input gradient of the summed per-sample loss at `x` (eval mode). Only the input gradient is
/// requested from autograd (like `torch.autograd.grad(loss.sum(), x)`), so parameter `.grad`
/// fields are untouched.
pub fn loss_grad(model: &dyn ModuleT, x: &Tensor, y: &Tensor, loss: Loss) -> GradBatch {
    let x = x.detach().set_requires_grad(true);
    let logits = model.forward_t(&x, false);
    let l = losses::per_sample(loss, &logits, y);
    let grad = Tensor::run_backward(&[l.sum(Kind::Float)], &[&x], false, false).pop().expect("one input, one gradient");
    GradBatch { logits: logits.detach(), loss: l.detach(), grad }
}

/// A pass over the whole set at one point X.
pub struct Pass {
    /// 1{argmax f(X_i) = y_i} [N] (bool, on the set's device).
    pub correct: Tensor,
    /// J(X_i, y_i) [N] f32.
    pub loss: Tensor,
    /// ∇x J(X_i, y_i) [N, C, H, W] when requested.
    pub grad: Option<Tensor>,
}

impl Pass {
    /// Fraction of correctly classified points (exact count / N).
    pub fn acc(&self) -> f64 {
        let n = self.correct.size()[0];
        if n == 0 {
            return f64::NAN;
        }
        self.correct.sum(Kind::Int64).int64_value(&[]) as f64 / n as f64
    }

    /// Mean loss over all N points (float32 mean, as OC23 `eval`).
    pub fn mean_loss(&self) -> f64 {
        self.loss.mean(Kind::Float).double_value(&[])
    }
}

/// Evaluates (and, with `with_grad`, differentiates) J over the whole set in batches of
/// `batch_size`, eval mode. Results live on `out_device`; batches run on `model_device`.
pub fn pass(
    model: &dyn ModuleT,
    x: &Tensor,
    y: &Tensor,
    loss: Loss,
    batch_size: i64,
    with_grad: bool,
    model_device: Device,
) -> Pass {
    let n = x.size()[0];
    let out_device = x.device();
    let correct = Tensor::zeros([n], (Kind::Bool, out_device));
    let losses = Tensor::zeros([n], (Kind::Float, out_device));
    let grad = with_grad.then(|| Tensor::zeros(x.size(), (Kind::Float, out_device)));
    for (s, len) in chunks(n, batch_size) {
        let xb = to_unit_float(&x.narrow(0, s, len)).to_device(model_device);
        let yb = y.narrow(0, s, len).to_device(model_device);
        let (logits, lb) = if let Some(g) = &grad {
            let r = loss_grad(model, &xb, &yb, loss);
            g.narrow(0, s, len).copy_(&r.grad.to_device(out_device));
            (r.logits, r.loss)
        } else {
            tch::no_grad(|| {
                let logits = model.forward_t(&xb, false);
                let l = losses::per_sample(loss, &logits, &yb);
                (logits, l)
            })
        };
        correct.narrow(0, s, len).copy_(&logits.argmax(1, false).eq_tensor(&yb).to_device(out_device));
        losses.narrow(0, s, len).copy_(&lb.to_device(out_device));
    }
    Pass { correct, loss: losses, grad }
}
