//! W-DRO TRADES fine-tuning (spec §4–§5, P25 Algorithm 1; every numeric default is the spec's
//! [UNVERIFIED] choice and comes from [`FinetuneParams`]).
//!
//! Per run: initialise (variant A: re-draw the last linear layer with PyTorch's default `Linear`
//! init; variant B: w ← w + σ·ξ per parameter tensor, σ relative to the tensor's std or absolute),
//! then for every epoch: Υ_ref on the fixed 10 % training subset (reading R1a, q = 2, budget
//! loss), a seeded shuffle, and per batch: augmentation, the inner maximisation of
//! [`crate::attacks::trades`] (eval mode), the outer TRADES loss in train mode
//! CE_mean(f(x), y) + β·(1/B)·Σ_i KL(f(x_i) ‖ f(x'_i)) with TRADES' three forward passes
//! (`three_pass`: f(x) for CE, then f(x'), then f(x) again inside the KL; `two_pass` reuses the
//! first f(x)), and one SGD step (momentum, weight decay, PyTorch's update rule). After every epoch:
//! W2 and W∞ W-PGD accuracy (ReDLR, `monitor_delta`, `monitor_itr` iterations) on the validation and
//! test sets, and Υ (CE and ReDLR, q = 1, 2) on the test set and the training subset (P25
//! Figures 7.2–7.4). The model kept is the best epoch by validation W2 accuracy (`best_val`) or
//! the last (`last`).
//!
//! **Determinism and resuming.** All randomness of a step (crop offsets, flips, start noise) is
//! drawn from torch's CPU generator reseeded from (seed, epoch, step), and the data order from
//! (seed, epoch); so the RNG "state" is the position (epoch, step) itself. Every `checkpoint_every`
//! steps and after every epoch the model, the SGD momentum buffers, the best snapshot, the
//! position, the epoch's running sums, Υ_ref and the log so far are written to `scratch_dir`
//! (safetensors + a JSON that is renamed into place last); a later run with the same params resumes
//! from there and, on the CPU, ends with bit-identical weights to an uninterrupted run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{nn, nn::ModuleT, Device, Kind, Reduction, Tensor};
use wdro_stages::params::{FinetuneParams, L2WInfProj, LinfW2Proj, Loss, Norm, Variant};

use crate::attacks::batch::{check_set, to_unit_float};
use crate::attacks::trades::{self, Inner, Reading};
use crate::attacks::wpgd::{WPgd, RATIO};
use crate::attacks::{Attack, MethodError, Progress};
use crate::losses;
use crate::upsilon;

/// A data set: images [N, C, H, W] (u8 or f32 in [0, 1], CPU) and labels i64 [N].
pub struct Set {
    pub images: Tensor,
    pub labels: Tensor,
}

/// The four inputs of the `finetune` stage.
pub struct Sets {
    pub train: Set,
    pub val: Set,
    /// The fixed 10 % training subset for Υ_ref and the "train" Υ curve (spec §2.6).
    pub upsilon: Set,
    pub test: Set,
}

/// Execution options (cannot change results).
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub device: Device,
    /// Images per batch in Υ and monitoring passes.
    pub eval_batch_size: i64,
    /// Where resume state lives; `None` = not resumable.
    pub scratch_dir: Option<PathBuf>,
    /// Save and stop (with [`MethodError::Stopped`]) after this many steps of this process —
    /// the hook the resume test uses to simulate a killed run.
    pub stop_after_steps: Option<u64>,
}

/// Augmentation of training batches (spec §5 step 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Augmentation {
    /// RandomCrop(padding 4, zero fill) + RandomHorizontalFlip(0.5).
    CropFlip,
    None,
}

impl Augmentation {
    pub fn parse(s: &str) -> Result<Self, MethodError> {
        match s {
            "crop-flip" | "crop_flip" | "cropflip" => Ok(Augmentation::CropFlip),
            "none" => Ok(Augmentation::None),
            other => Err(MethodError::invalid(
                "finetune.augmentation",
                format!("{other:?} is not \"crop-flip\" or \"none\""),
            )),
        }
    }
}

/// What one training step needs besides the batch.
#[derive(Clone, Debug)]
pub struct StepConfig {
    pub inner: Inner,
    pub beta: f64,
    /// TRADES' three train-mode forward passes (spec §4.1) or two.
    pub three_pass: bool,
    /// Extra pointwise TRADES term: (ε, β_pw) (spec §4.3 `keep_pointwise_term`).
    pub pointwise: Option<(f64, f64)>,
}

impl StepConfig {
    pub fn from_params(p: &FinetuneParams) -> Result<Self, MethodError> {
        if p.q != 1 && p.q != 2 {
            return Err(MethodError::invalid("finetune.q", format!("must be 1 or 2, got {}", p.q)));
        }
        let three_pass = match p.trades_forward.as_str() {
            "three_pass" | "three-pass" => true,
            "two_pass" | "two-pass" => false,
            other => {
                return Err(MethodError::invalid(
                    "finetune.trades_forward",
                    format!("{other:?} is not three_pass or two_pass"),
                ))
            }
        };
        let pw_eps = match p.norm {
            Norm::Linf => 8.0 / 255.0,
            Norm::L2 => 0.5,
        };
        Ok(StepConfig {
            inner: Inner {
                reading: Reading::parse(&p.reading)?,
                q: p.q,
                norm: p.norm,
                delta: p.delta.0,
                steps: p.inner_steps,
                budget_loss: p.budget_loss,
            },
            beta: p.beta,
            three_pass,
            pointwise: p.keep_pointwise_term.then_some((pw_eps, p.beta)),
        })
    }
}

/// SGD with momentum and weight decay, PyTorch's rule (dampening 0, no Nesterov):
/// d = g + wd·w; buf = d (first step) or momentum·buf + d; w ← w − lr·buf. Written out here
/// (instead of tch's C++ optimizer) because the momentum buffers must be saved for resuming.
pub struct Sgd {
    pub momentum: f64,
    pub weight_decay: f64,
    params: Vec<(String, Tensor)>,
    bufs: Vec<Option<Tensor>>,
}

impl Sgd {
    /// Over the trainable variables of `vs`, in name order.
    pub fn new(vs: &nn::VarStore, momentum: f64, weight_decay: f64) -> Self {
        let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let bufs = params.iter().map(|_| None).collect();
        Sgd { momentum, weight_decay, params, bufs }
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in self.params.iter_mut() {
            p.zero_grad();
        }
    }

    pub fn step(&mut self, lr: f64) {
        tch::no_grad(|| {
            for ((_, p), buf) in self.params.iter_mut().zip(self.bufs.iter_mut()) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let d = if self.weight_decay != 0.0 { g + &*p * self.weight_decay } else { g };
                let d = if self.momentum != 0.0 {
                    let b = match buf.take() {
                        None => d.detach().copy(),
                        Some(b) => b * self.momentum + d,
                    };
                    *buf = Some(b.shallow_clone());
                    b
                } else {
                    d
                };
                let _ = p.g_sub_(&(d * lr));
            }
        });
    }

    /// Momentum buffers by parameter name (for the resume state).
    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .zip(&self.bufs)
            .filter_map(|((n, _), b)| b.as_ref().map(|b| (n.clone(), b.shallow_clone())))
            .collect()
    }

    /// Restores buffers saved by [`Sgd::buffers`] (names not present stay empty).
    pub fn set_buffers(&mut self, saved: &BTreeMap<String, Tensor>) {
        for ((n, p), buf) in self.params.iter().zip(self.bufs.iter_mut()) {
            *buf = saved.get(n).map(|t| t.to_device(p.device()));
        }
    }
}

/// Result of one training step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepOut {
    /// The outer loss CE + β·KL (+ pointwise term) before the update.
    pub loss: f64,
    pub loss_nat: f64,
    pub loss_rob: f64,
    /// Correct predictions of the train-mode f(x) used for CE.
    pub n_correct: i64,
}

/// One W-DRO TRADES step on a batch already augmented and on the model's device: inner
/// maximisation (eval mode), outer loss (train mode), backward, SGD update with `lr`.
/// `noise` (and `noise_pw` for the pointwise term) are the N(0, I) start draws.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: &dyn ModuleT,
    sgd: &mut Sgd,
    lr: f64,
    x: &Tensor,
    y: &Tensor,
    noise: &Tensor,
    noise_pw: Option<&Tensor>,
    cfg: &StepConfig,
    upsilon_ref: Option<f64>,
) -> Result<StepOut, MethodError> {
    let x_adv = trades::inner_max(model, x, y, noise, &cfg.inner, upsilon_ref)?;
    let x_pw = match (cfg.pointwise, noise_pw) {
        (Some((eps, _)), Some(nz)) => {
            let r = Tensor::full([x.size()[0]], eps, (Kind::Float, x.device()));
            Some(trades::trades_pgd(model, x, nz, &r, cfg.inner.steps, cfg.inner.norm))
        }
        (Some(_), None) => {
            return Err(MethodError::invalid("train_step", "keep_pointwise_term needs a second noise draw"))
        }
        _ => None,
    };
    sgd.zero_grad();
    let inv_b = 1.0 / x.size()[0] as f64;
    let logits = model.forward_t(x, true);
    let loss_nat = logits.cross_entropy_loss::<Tensor>(y, None, Reduction::Mean, -100, 0.0);
    let logits_adv = model.forward_t(&x_adv, true);
    let nat = if cfg.three_pass { model.forward_t(x, true) } else { logits.shallow_clone() };
    let loss_rob = losses::trades_kl_sum(&logits_adv, &nat) * inv_b;
    let mut loss = &loss_nat + &loss_rob * cfg.beta;
    if let (Some(xp), Some((_, beta_pw))) = (&x_pw, cfg.pointwise) {
        let lp = model.forward_t(xp, true);
        let nat2 = if cfg.three_pass { model.forward_t(x, true) } else { logits.shallow_clone() };
        loss += losses::trades_kl_sum(&lp, &nat2) * inv_b * beta_pw;
    }
    loss.backward();
    let n_correct = logits.argmax(1, false).eq_tensor(y).sum(Kind::Int64).int64_value(&[]);
    sgd.step(lr);
    Ok(StepOut {
        loss: loss.double_value(&[]),
        loss_nat: loss_nat.double_value(&[]),
        loss_rob: loss_rob.double_value(&[]),
        n_correct,
    })
}

/// Variant A: re-draws `<last>.weight` ~ kaiming_uniform(a = √5) and `<last>.bias` ~
/// U(±1/√fan_in) (PyTorch `Linear.reset_parameters`, same draw order) from torch's generator.
pub fn reinit_linear(vs: &nn::VarStore, last: &str) -> Result<(), MethodError> {
    let vars = vs.variables();
    let mut w = vars
        .get(&format!("{last}.weight"))
        .ok_or_else(|| MethodError::invalid("finetune.variant A", format!("the model has no variable {last}.weight")))?
        .shallow_clone();
    let fan_in = *w.size().last().unwrap_or(&1) as f64;
    let gain = (2.0f64 / (1.0 + 5.0)).sqrt();
    let bound = 3.0f64.sqrt() * (gain / fan_in.sqrt());
    tch::no_grad(|| {
        let _ = w.uniform_(-bound, bound);
        if let Some(b) = vars.get(&format!("{last}.bias")) {
            let bb = if fan_in > 0.0 { 1.0 / fan_in.sqrt() } else { 0.0 };
            let _ = b.shallow_clone().uniform_(-bb, bb);
        }
    });
    Ok(())
}

/// Variant B: every trainable tensor w ← w + σ_w·ξ, ξ ~ N(0, I), σ_w = σ·std(w) (`relative`,
/// unbiased std, 0 for one-element tensors) or σ (`absolute`); tensors in name order.
pub fn perturb_weights(vs: &nn::VarStore, sigma: f64, mode: &str) -> Result<(), MethodError> {
    let relative = match mode {
        "relative" => true,
        "absolute" => false,
        other => {
            return Err(MethodError::invalid("finetune.sigma_mode", format!("{other:?} is not relative or absolute")))
        }
    };
    let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (_, mut w) in params {
            let s = if relative {
                if w.numel() > 1 {
                    sigma * w.std(true).double_value(&[])
                } else {
                    0.0
                }
            } else {
                sigma
            };
            let xi = Tensor::randn(w.size(), (Kind::Float, Device::Cpu)).to_device(w.device());
            let _ = w.g_add_(&(xi * s));
        }
    });
    Ok(())
}

/// Random crop (zero padding 4) + horizontal flip (p = 0.5) per image, drawn from torch's
/// generator: offsets `randint(0, 9, [B, 2])`, then flips `rand([B]) < 0.5`.
pub fn crop_flip(x: &Tensor) -> Tensor {
    let s = x.size();
    let (b, h, w) = (s[0], s[2], s[3]);
    let offs = Vec::<i64>::try_from(Tensor::randint(9, [b, 2], (Kind::Int64, Device::Cpu)).view([-1])).expect("i64");
    let flips = Vec::<bool>::try_from(Tensor::rand([b], (Kind::Float, Device::Cpu)).lt(0.5)).expect("bool");
    let padded = x.constant_pad_nd([4, 4, 4, 4]);
    let rows: Vec<Tensor> = (0..b as usize)
        .map(|i| {
            let img = padded.get(i as i64).narrow(1, offs[2 * i], h).narrow(2, offs[2 * i + 1], w);
            if flips[i] {
                img.flip([2])
            } else {
                img
            }
        })
        .collect();
    Tensor::stack(&rows, 0)
}

/// Accuracy/loss of the monitoring attacks on one set.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Monitor {
    pub clean_acc: f64,
    pub w2_acc: f64,
    pub w2_loss: f64,
    pub winf_acc: f64,
    pub winf_loss: f64,
}

/// Υ of one loss on one set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpsilonEntry {
    pub loss: String,
    pub q1: f64,
    pub q2: f64,
}

/// One epoch's log line (P25 Figures 7.2–7.4 series).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochLog {
    /// 1-based.
    pub epoch: u32,
    pub lr: f64,
    pub steps: u64,
    pub train_loss: f64,
    pub train_loss_nat: f64,
    pub train_loss_rob: f64,
    pub train_acc: f64,
    /// Υ_ref (R1a, q = 2, budget loss, training subset) used during the epoch.
    pub upsilon_ref: Option<f64>,
    pub val: Monitor,
    pub test: Monitor,
    pub upsilon_test: Vec<UpsilonEntry>,
    pub upsilon_train: Vec<UpsilonEntry>,
    pub wall_s: f64,
}

/// What [`finetune`] returns; the var store then holds the selected weights.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub log: Vec<EpochLog>,
    /// Epoch with the best validation W2 accuracy (1-based).
    pub best_epoch: Option<u32>,
    /// Epoch whose weights were kept.
    pub selected_epoch: u32,
}

/// Running sums of the current epoch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Accum {
    loss: f64,
    nat: f64,
    rob: f64,
    correct: i64,
    seen: i64,
    steps: u64,
}

/// The JSON half of the resume state.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ResumeState {
    version: u32,
    params: serde_json::Value,
    epoch: u32,
    step: u64,
    global_step: u64,
    accum: Accum,
    upsilon_ref: Option<f64>,
    log: Vec<EpochLog>,
    best: Option<(u32, f64)>,
    tensors: String,
    epoch_wall_s: f64,
}

const STATE_JSON: &str = "finetune-state.json";

/// serde_json does not round-trip every f64 exactly (its default parser may be off by one ulp),
/// which would make a resumed run's log differ from an uninterrupted one; so the resume JSON
/// stores every non-integer number as its bit pattern (`"f64:<hex>"`).
fn encode_floats(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Number(n) if n.is_f64() => Value::String(format!("f64:{:016x}", n.as_f64().expect("f64").to_bits())),
        Value::Array(a) => Value::Array(a.into_iter().map(encode_floats).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, encode_floats(v))).collect()),
        other => other,
    }
}

fn decode_floats(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::String(s) if s.starts_with("f64:") => u64::from_str_radix(&s[4..], 16)
            .ok()
            .and_then(|b| serde_json::Number::from_f64(f64::from_bits(b)))
            .map(Value::Number)
            .unwrap_or(Value::String(s)),
        Value::Array(a) => Value::Array(a.into_iter().map(decode_floats).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, decode_floats(v))).collect()),
        other => other,
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Seed of the data order of `epoch`, and of step `step` of it (u64::MAX = the order itself).
fn derived_seed(seed: u64, epoch: u32, step: u64) -> i64 {
    (splitmix(splitmix(seed ^ splitmix(u64::from(epoch) + 1)) ^ step) >> 1) as i64
}

/// Learning rate of epoch `e` (0-based): `cosine` = lr·½(1 + cos(π e/E)), `step` = lr·0.1^k with
/// k = [e ≥ E/2] + [e ≥ 3E/4], `constant` = lr.
pub fn lr_at(schedule: &str, lr: f64, e: u32, epochs: u32) -> Result<f64, MethodError> {
    let (e, n) = (f64::from(e), f64::from(epochs.max(1)));
    match schedule {
        "cosine" => Ok(lr * 0.5 * (1.0 + (std::f64::consts::PI * e / n).cos())),
        "step" => Ok(lr * 0.1f64.powi(i32::from(e >= 0.5 * n) + i32::from(e >= 0.75 * n))),
        "constant" => Ok(lr),
        other => {
            Err(MethodError::invalid("finetune.lr_schedule", format!("{other:?} is not cosine, step or constant")))
        }
    }
}

fn io_err(path: &Path, e: std::io::Error) -> MethodError {
    MethodError::Io { path: path.to_path_buf(), source: e }
}

fn snapshot(vs: &nn::VarStore) -> BTreeMap<String, Tensor> {
    vs.variables().into_iter().map(|(n, t)| (n, t.detach().to_device(Device::Cpu).copy())).collect()
}

fn restore(vs: &nn::VarStore, snap: &BTreeMap<String, Tensor>) -> Result<(), MethodError> {
    let vars = vs.variables();
    tch::no_grad(|| -> Result<(), MethodError> {
        for (n, mut v) in vars {
            let src = snap
                .get(&n)
                .ok_or_else(|| MethodError::invalid("finetune resume state", format!("variable {n} is missing")))?;
            v.f_copy_(src)?;
        }
        Ok(())
    })
}

struct Saved {
    state: ResumeState,
    model: BTreeMap<String, Tensor>,
    momentum: BTreeMap<String, Tensor>,
    best: Option<BTreeMap<String, Tensor>>,
}

fn save_state(
    dir: &Path,
    st: &ResumeState,
    vs: &nn::VarStore,
    sgd: &Sgd,
    best: Option<&BTreeMap<String, Tensor>>,
) -> Result<(), MethodError> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for (n, t) in snapshot(vs) {
        named.push((format!("model.{n}"), t));
    }
    for (n, t) in sgd.buffers() {
        named.push((format!("momentum.{n}"), t.to_device(Device::Cpu)));
    }
    if let Some(b) = best {
        for (n, t) in b {
            named.push((format!("best.{n}"), t.shallow_clone()));
        }
    }
    let tensors = format!("finetune-state-{}.safetensors", st.global_step);
    let tpath = dir.join(&tensors);
    Tensor::write_safetensors(&named, &tpath)?;
    let mut st = st.clone();
    let old = read_state_json(dir).map(|s| s.tensors);
    st.tensors = tensors.clone();
    let tmp = dir.join(format!("{STATE_JSON}.tmp"));
    let json = encode_floats(serde_json::to_value(&st).expect("state serializes"));
    std::fs::write(&tmp, serde_json::to_vec(&json).expect("json")).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, dir.join(STATE_JSON)).map_err(|e| io_err(dir, e))?;
    if let Some(old) = old.filter(|o| *o != tensors) {
        let _ = std::fs::remove_file(dir.join(old));
    }
    Ok(())
}

fn read_state_json(dir: &Path) -> Option<ResumeState> {
    let bytes = std::fs::read(dir.join(STATE_JSON)).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    serde_json::from_value(decode_floats(v)).ok()
}

fn load_state(dir: &Path, params: &serde_json::Value) -> Result<Option<Saved>, MethodError> {
    let Some(state) = read_state_json(dir) else { return Ok(None) };
    if state.version != 1 || &state.params != params {
        return Ok(None);
    }
    let tpath = dir.join(&state.tensors);
    let mut model = BTreeMap::new();
    let mut momentum = BTreeMap::new();
    let mut best = BTreeMap::new();
    // A state whose tensors cannot be read (a crash between the two writes cannot cause this,
    // but a half-copied scratch directory can) is ignored: the run starts afresh.
    let Ok(list) = Tensor::read_safetensors(&tpath) else { return Ok(None) };
    for (n, t) in list {
        if let Some(k) = n.strip_prefix("model.") {
            model.insert(k.to_string(), t);
        } else if let Some(k) = n.strip_prefix("momentum.") {
            momentum.insert(k.to_string(), t);
        } else if let Some(k) = n.strip_prefix("best.") {
            best.insert(k.to_string(), t);
        }
    }
    let best = (!best.is_empty()).then_some(best);
    Ok(Some(Saved { state, model, momentum, best }))
}

fn upsilon_entries(
    model: &dyn ModuleT,
    set: &Set,
    norm: Norm,
    opts: &RunOptions,
) -> Result<Vec<UpsilonEntry>, MethodError> {
    [Loss::Ce, Loss::Redlr]
        .iter()
        .map(|l| {
            let u = upsilon::grad_norms(
                model,
                &set.images,
                &set.labels,
                *l,
                norm,
                opts.eval_batch_size,
                opts.device,
                &|_, _, _| {},
            )?;
            Ok(UpsilonEntry { loss: losses::loss_name(*l).into(), q1: u.upsilon(1), q2: u.upsilon(2) })
        })
        .collect()
}

fn monitor(model: &dyn ModuleT, set: &Set, p: &FinetuneParams, opts: &RunOptions) -> Result<Monitor, MethodError> {
    let x = to_unit_float(&set.images.to_device(opts.device));
    let y = set.labels.to_device(opts.device);
    let attack = |q: u8| WPgd {
        q,
        norm: p.norm,
        delta: p.monitor_delta.0,
        itr: p.monitor_itr.max(1),
        ratio: RATIO,
        loss: Loss::Redlr,
        l2_w_inf_proj: L2WInfProj::Ball,
        linf_w2_proj: LinfW2Proj::Clip,
        batch_size: opts.eval_batch_size,
    };
    let w2 = attack(2).run(model, &x, &y, &|_, _, _| {})?;
    let wi = attack(1).run(model, &x, &y, &|_, _, _| {})?;
    let n = y.size()[0] as f64;
    Ok(Monitor {
        clean_acc: w2.clean_correct.sum(Kind::Int64).int64_value(&[]) as f64 / n,
        w2_acc: w2.acc_min,
        w2_loss: w2.loss_max,
        winf_acc: wi.acc_min,
        winf_loss: wi.loss_max,
    })
}

/// Fine-tunes the model whose variables are `vs` (module `model`, last linear layer named
/// `last_layer`) per `p`. On success `vs` holds the selected weights.
pub fn finetune(
    vs: &nn::VarStore,
    model: &dyn ModuleT,
    last_layer: &str,
    p: &FinetuneParams,
    sets: &Sets,
    opts: &RunOptions,
    progress: Progress,
) -> Result<Outcome, MethodError> {
    let cfg = StepConfig::from_params(p)?;
    let aug = Augmentation::parse(&p.augmentation)?;
    let select_best = match p.select.as_str() {
        "best_val" | "best-val" => true,
        "last" => false,
        other => return Err(MethodError::invalid("finetune.select", format!("{other:?} is not best_val or last"))),
    };
    lr_at(&p.lr_schedule, p.lr, 0, p.epochs)?;
    if p.batch_size < 1 {
        return Err(MethodError::invalid("finetune.batch_size", "must be >= 1"));
    }
    for (name, s) in [("train", &sets.train), ("val", &sets.val), ("upsilon_data", &sets.upsilon), ("test", &sets.test)]
    {
        if check_set(&s.images, &s.labels, name)? == 0 {
            return Err(MethodError::invalid(name, "the data set is empty"));
        }
    }
    let n_train = sets.train.labels.size()[0];
    let steps_per_epoch = ((n_train + p.batch_size - 1) / p.batch_size) as u64;
    let total_steps = steps_per_epoch * u64::from(p.epochs);
    let params_json = serde_json::to_value(p).expect("params serialize");
    let mut sgd = Sgd::new(vs, p.momentum, p.weight_decay);
    let saved = match &opts.scratch_dir {
        Some(d) => load_state(d, &params_json)?,
        None => None,
    };
    let mut best_snap: Option<BTreeMap<String, Tensor>> = None;
    let mut st = match saved {
        Some(s) => {
            restore(vs, &s.model)?;
            sgd.set_buffers(&s.momentum);
            best_snap = s.best;
            progress(
                s.state.global_step,
                total_steps,
                &format!("resuming at epoch {} step {}", s.state.epoch + 1, s.state.step),
            );
            s.state
        }
        None => {
            tch::manual_seed(p.seed as i64);
            match p.variant {
                Variant::A => reinit_linear(vs, last_layer)?,
                Variant::B => perturb_weights(vs, p.sigma, &p.sigma_mode)?,
            }
            ResumeState {
                version: 1,
                params: params_json.clone(),
                epoch: 0,
                step: 0,
                global_step: 0,
                accum: Accum::default(),
                upsilon_ref: None,
                log: Vec::new(),
                best: None,
                tensors: String::new(),
                epoch_wall_s: 0.0,
            }
        }
    };
    let mut steps_this_run = 0u64;
    let save = |st: &ResumeState, sgd: &Sgd, best: Option<&BTreeMap<String, Tensor>>| -> Result<(), MethodError> {
        match &opts.scratch_dir {
            Some(d) => save_state(d, st, vs, sgd, best),
            None => Ok(()),
        }
    };
    while st.epoch < p.epochs {
        let e = st.epoch;
        let lr = lr_at(&p.lr_schedule, p.lr, e, p.epochs)?;
        let t0 = Instant::now();
        if st.step == 0 {
            st.accum = Accum::default();
            st.epoch_wall_s = 0.0;
            st.upsilon_ref = if cfg.inner.reading == Reading::R1a && cfg.inner.q == 2 {
                let u = upsilon::grad_norms(
                    model,
                    &sets.upsilon.images,
                    &sets.upsilon.labels,
                    p.budget_loss,
                    p.norm,
                    opts.eval_batch_size,
                    opts.device,
                    &|_, _, _| {},
                )?;
                Some(u.upsilon(2))
            } else {
                None
            };
        }
        let wall_before = st.epoch_wall_s;
        tch::manual_seed(derived_seed(p.seed, e, u64::MAX));
        let perm = Tensor::randperm(n_train, (Kind::Int64, Device::Cpu));
        for step in st.step..steps_per_epoch {
            tch::manual_seed(derived_seed(p.seed, e, step));
            let start = step as i64 * p.batch_size;
            let idx = perm.narrow(0, start, p.batch_size.min(n_train - start));
            let mut x = to_unit_float(&sets.train.images.index_select(0, &idx));
            if aug == Augmentation::CropFlip {
                x = crop_flip(&x);
            }
            let noise = Tensor::randn(x.size(), (Kind::Float, Device::Cpu));
            let noise_pw = cfg.pointwise.map(|_| Tensor::randn(x.size(), (Kind::Float, Device::Cpu)));
            let y = sets.train.labels.index_select(0, &idx).to_device(opts.device);
            let x = x.to_device(opts.device);
            let out = train_step(
                model,
                &mut sgd,
                lr,
                &x,
                &y,
                &noise.to_device(opts.device),
                noise_pw.map(|n| n.to_device(opts.device)).as_ref(),
                &cfg,
                st.upsilon_ref,
            )?;
            let b = idx.size()[0];
            st.accum.loss += out.loss * b as f64;
            st.accum.nat += out.loss_nat * b as f64;
            st.accum.rob += out.loss_rob * b as f64;
            st.accum.correct += out.n_correct;
            st.accum.seen += b;
            st.accum.steps += 1;
            st.step = step + 1;
            st.global_step += 1;
            steps_this_run += 1;
            progress(
                st.global_step,
                total_steps,
                &format!("epoch {}/{} step {}/{steps_per_epoch}: loss {:.4}", e + 1, p.epochs, step + 1, out.loss),
            );
            let stop = opts.stop_after_steps == Some(steps_this_run);
            if stop || (p.checkpoint_every > 0 && st.global_step % u64::from(p.checkpoint_every) == 0) {
                st.epoch_wall_s = wall_before + t0.elapsed().as_secs_f64();
                save(&st, &sgd, best_snap.as_ref())?;
            }
            if stop {
                return Err(MethodError::Stopped(steps_this_run));
            }
        }
        progress(st.global_step, total_steps, &format!("epoch {} evaluation", e + 1));
        let val = monitor(model, &sets.val, p, opts)?;
        let test = monitor(model, &sets.test, p, opts)?;
        let upsilon_test = upsilon_entries(model, &sets.test, p.norm, opts)?;
        let upsilon_train = upsilon_entries(model, &sets.upsilon, p.norm, opts)?;
        let seen = st.accum.seen.max(1) as f64;
        st.log.push(EpochLog {
            epoch: e + 1,
            lr,
            steps: st.accum.steps,
            train_loss: st.accum.loss / seen,
            train_loss_nat: st.accum.nat / seen,
            train_loss_rob: st.accum.rob / seen,
            train_acc: st.accum.correct as f64 / seen,
            upsilon_ref: st.upsilon_ref,
            val,
            test,
            upsilon_test,
            upsilon_train,
            wall_s: wall_before + t0.elapsed().as_secs_f64(),
        });
        if st.best.is_none_or(|(_, b)| val.w2_acc > b) {
            st.best = Some((e + 1, val.w2_acc));
            if select_best {
                best_snap = Some(snapshot(vs));
            }
        }
        st.epoch = e + 1;
        st.step = 0;
        save(&st, &sgd, best_snap.as_ref())?;
    }
    let best_epoch = st.best.map(|(e, _)| e);
    let selected_epoch = match (&best_snap, best_epoch) {
        (Some(snap), Some(be)) if select_best => {
            restore(vs, snap)?;
            be
        }
        _ => p.epochs,
    };
    Ok(Outcome { log: st.log, best_epoch, selected_epoch })
}
