//! Typed params of every stage kind. These structs are the contract between the stage catalogue
//! (which builds them from the config and hashes them into keys) and `wdro-worker` (which
//! deserializes them from `job.json`). Defaults follow `shared/spec/method.md`; every
//! [UNVERIFIED] choice of the spec is a field here with the spec's default.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// A perturbation budget in raw-pixel units. Accepts `0.5`, `"8/255"` or `"0.031"` in configs;
/// always serializes as the f64 value so `8/255` and `0.03137254901960784` key the same.
#[derive(Clone, Copy, PartialEq, PartialOrd, Serialize)]
#[serde(transparent)]
pub struct Delta(pub f64);

impl Delta {
    pub fn parse(s: &str) -> Result<Delta, String> {
        let s = s.trim();
        let v = if let Some((a, b)) = s.split_once('/') {
            let a: f64 = a.trim().parse().map_err(|_| format!("bad numerator in {s:?}"))?;
            let b: f64 = b.trim().parse().map_err(|_| format!("bad denominator in {s:?}"))?;
            if b == 0.0 {
                return Err(format!("zero denominator in {s:?}"));
            }
            a / b
        } else {
            s.parse().map_err(|_| format!("{s:?} is not a number or a fraction like 8/255"))?
        };
        if !v.is_finite() || v < 0.0 {
            return Err(format!("{s:?} must be a finite number >= 0"));
        }
        Ok(Delta(v))
    }

    /// Human form: a short decimal as is (`0.5`, `0.031`), else `k/255` when k is a multiple of
    /// 0.1 to 1e-6 (`8/255`, `0.5/255`), else the number.
    pub fn pretty(&self) -> String {
        let plain = format!("{}", self.0);
        if plain.len() <= 6 || self.0 <= 0.0 {
            return plain;
        }
        let k10 = self.0 * 2550.0;
        if (k10 - k10.round()).abs() < 1e-6 {
            format!("{}/255", k10.round() / 10.0)
        } else {
            plain
        }
    }
}

impl fmt::Debug for Delta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.pretty())
    }
}

impl<'de> Deserialize<'de> for Delta {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(f64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(v) => Delta::parse(&v.to_string()).map_err(serde::de::Error::custom),
            Raw::S(s) => Delta::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// Per-sample loss J (spec §2.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Loss {
    Ce,
    Dlr,
    Redlr,
}

/// Image norm of the threat model: ℓ∞ (s = ∞, dual s* = 1) or ℓ2 (s = s* = 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    Linf,
    L2,
}

impl Norm {
    /// The dual (gradient) norm index s*.
    pub fn s_star(self) -> u8 {
        match self {
            Norm::Linf => 1,
            Norm::L2 => 2,
        }
    }
}

/// Data set file layouts the `dataset` stage reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetFormat {
    /// MNIST / Fashion-MNIST IDX, gzipped or not; inputs `images`, `labels`.
    Idx,
    /// `cifar-10-binary.tar.gz`; input `archive`.
    Cifar10Binary,
    /// `cifar-10-python.tar.gz`; input `archive`.
    Cifar10Python,
    /// A tar of PNGs named `<set>_<index>_<label>.png` (foolbox's layout); input `archive`.
    PngFolder,
}

/// `dataset`: decode files into a tensor bundle (safetensors: `images` u8 NCHW, `labels` i64;
/// metadata `classes` = JSON list of class names). Output `data`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetParams {
    pub format: DatasetFormat,
    /// `train` or `test` (which CIFAR batches to read; ignored for IDX/PNG).
    pub split: String,
    /// Keep only the first `limit` images (file order); 0 = all.
    #[serde(default)]
    pub limit: u64,
    /// PNG folders: keep files whose name starts with this prefix (e.g. `cifar10_`).
    #[serde(default)]
    pub prefix: String,
}

/// `subset`: seeded stratified fraction. Outputs `selected` and `rest` (same bundle format).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubsetParams {
    pub fraction: f64,
    pub seed: u64,
    #[serde(default = "yes")]
    pub stratified: bool,
}

/// Network architectures of the model zoo (spec §7). Variable names match PyTorch's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Arch {
    /// 2 conv + 2 dense CNN for 28×28 grey images (the demo).
    SmallCnn {
        #[serde(default = "one")]
        in_channels: i64,
        #[serde(default = "ten")]
        num_classes: i64,
    },
    /// RobustBench `wide_resnet.py`.
    WideResnet {
        depth: i64,
        widen: i64,
        #[serde(default)]
        sub_block1: bool,
        /// Mean/std applied inside forward (Rice2020Overfitting's `mu`/`sigma`).
        #[serde(default)]
        normalize: Option<Normalization>,
    },
    /// RobustBench `resnet.py` PreActResNet-18.
    PreactResnet18 {
        #[serde(default)]
        bn_before_fc: bool,
        #[serde(default)]
        v2_shortcut: bool,
        #[serde(default)]
        normalize: Option<Normalization>,
    },
    /// RobustBench `dm_wide_resnet.py` DMWideResNet (Swish/SiLU, mean/std inside).
    DmWideResnet {
        depth: i64,
        width: i64,
        #[serde(default = "cifar_norm")]
        normalize: Option<Normalization>,
    },
    /// RobustBench `resnet.py` ResNet ("kuangliu" CIFAR ResNet): depth 18/34 (BasicBlock) or
    /// 50/101/152 (Bottleneck). ResNet-18: Sehwag2021Proxy_R18, Addepalli2022Efficient_RN18;
    /// ResNet-50 + mu/sigma (B): Engstrom2019Robustness (spec §7.6).
    Resnet {
        depth: i64,
        #[serde(default)]
        normalize: Option<Normalization>,
    },
    /// RobustBench `dm_wide_resnet.py` DMPreActResNet (depth 18 or 34; Swish; mean/std inside;
    /// spec §7.5): Rebuffi2021Fixing_R18_ddpm, Rade2021Helper_R18_ddpm, Gowal2021Improving_R18_ddpm_100m.
    DmPreactResnet {
        #[serde(default = "eighteen")]
        depth: i64,
        #[serde(default = "cifar_norm")]
        normalize: Option<Normalization>,
    },
    /// The Keras CNN of the `cifar-10-model` wheel (ReLU before BN, eps 1e-3). Trained on 0..255
    /// pixels; like every model here it takes [0,1] input and scales by 255 inside forward.
    KerasCifarCnn,
}

/// Per-channel mean/std normalisation applied as the model's first op.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normalization {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

/// Plain supervised training for the `train` checkpoint source (the demo's pretrained model).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    pub epochs: u32,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub batch_size: i64,
    pub seed: u64,
}

/// `checkpoint`: produce a canonical safetensors state dict (output `model`). Source is
/// `train`, `robustbench:NAME`, `https://…` or `file:PATH`; non-train sources read input `file`
/// (a `fetch` output); `train` reads input `train`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointParams {
    pub source: String,
    pub arch: Arch,
    #[serde(default)]
    pub train: Option<TrainParams>,
}

/// `clean`: clean accuracy, V(0) and W(0) for CE/DLR/ReDLR, per-sample margins.
/// Inputs `model`, `data`; output `per_sample` (safetensors), metrics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CleanParams {
    pub arch: Arch,
}

/// `upsilon`: Υ = (mean_i ‖∇x J_i‖_{s*}^q)^{1/q} (spec §2.1), streamed over batches.
/// Inputs `model`, `data`; output `grad_norms` (safetensors, per-sample ‖g_i‖_{s*}).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpsilonParams {
    pub arch: Arch,
    pub loss: Loss,
    pub norm: Norm,
}

/// W∞-ℓ2 projection of W-PGD (spec §3.1): `ball` = paper parity, `sphere` = OC23's code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum L2WInfProj {
    Ball,
    Sphere,
}

/// W2-ℓ∞ projection of W-PGD (spec §3.1): `clip` = OC23, `scale` = plain rescale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinfW2Proj {
    Clip,
    Scale,
}

/// Attack algorithms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackKind {
    /// One W-PGD step of size δ (spec §3.1; the first-order distribution Q_δ of §2.2(b)).
    WFgsm,
    /// Spec §3.1.
    WPgd,
    /// Spec §3.2 (reading R1 or R2 via `budget_reading`).
    WPgdBudget,
    /// Pointwise PGD with random start (sanity check, spec §3.3).
    Pgd,
    /// Croce & Hein 2020 APGD with CE.
    ApgdCe,
    /// Croce & Hein 2020 APGD with DLR.
    ApgdDlr,
}

/// `attack`: inputs `model`, `data`; outputs `adv` (safetensors `images` f32 NCHW,
/// `labels`), `curves` (JSON per-iterate accuracy and loss); metrics `acc_min`, `loss_max`,
/// `w_dist` (the identity-coupling transport cost actually used).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttackParams {
    pub arch: Arch,
    pub attack: AttackKind,
    pub loss: Loss,
    /// 1 = W∞ (pointwise), 2 = W2 (distributional).
    pub q: u8,
    pub norm: Norm,
    pub delta: Delta,
    #[serde(default = "itr50")]
    pub itr: u32,
    #[serde(default = "ratio")]
    pub ratio: f64,
    #[serde(default = "ball")]
    pub l2_w_inf_proj: L2WInfProj,
    #[serde(default = "clip")]
    pub linf_w2_proj: LinfW2Proj,
    /// W-PGD-budget: `R1` (allocate once) or `R2` (re-allocate each iteration).
    #[serde(default = "r1")]
    pub budget_reading: String,
    /// W-PGD-budget: pointwise radius every image keeps in addition to its δ_i.
    #[serde(default)]
    pub base_eps: f64,
    /// W-PGD-budget: cap on each image's radius (0 = none).
    #[serde(default)]
    pub budget_cap: f64,
    /// Random-start attacks (PGD, APGD restarts).
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "one_u32")]
    pub restarts: u32,
}

/// Fine-tuning initialisation (spec §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Variant {
    /// Re-initialise the last layer.
    A,
    /// Perturb every parameter by σ·N(0, I).
    B,
}

/// `finetune` (spec §4–§5, Algorithm 1). Inputs `model`, `train`, `val`, `upsilon_data`,
/// `test`; outputs `model` (best by `select`), `log` (JSON per-epoch series: loss, accuracies,
/// W2/W∞ attack accuracy on val and test, Υ on test and train); resumable through scratch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneParams {
    pub arch: Arch,
    pub variant: Variant,
    /// Variant B: σ, relative to each tensor's std (`sigma_mode = relative`) or absolute.
    pub sigma: f64,
    pub sigma_mode: String,
    /// `R1a`, `R1b`, `R2` or `R3` (spec §4.3).
    pub reading: String,
    pub epochs: u32,
    pub lr: f64,
    /// `cosine` or `step`.
    pub lr_schedule: String,
    pub momentum: f64,
    pub weight_decay: f64,
    pub batch_size: i64,
    pub beta: f64,
    /// Training budget δ and threat.
    pub delta: Delta,
    pub q: u8,
    pub norm: Norm,
    /// Loss for the budget allocation and Υ_ref.
    pub budget_loss: Loss,
    /// Inner TRADES steps K.
    pub inner_steps: u32,
    pub keep_pointwise_term: bool,
    /// `three_pass` (TRADES) or `two_pass`.
    pub trades_forward: String,
    /// RandomCrop(padding) + horizontal flip for CIFAR-like data; `none` for grey data.
    pub augmentation: String,
    pub seed: u64,
    /// `best_val` or `last`.
    pub select: String,
    /// Resumable checkpoint every K steps.
    pub checkpoint_every: u32,
    /// δ for the per-epoch W2/W∞ evaluation curves (spec Figures 7.2–7.3).
    pub monitor_delta: Delta,
    /// Iterations of the per-epoch monitoring W-PGD (cheaper than the final evaluation).
    pub monitor_itr: u32,
}

fn yes() -> bool {
    true
}
fn one() -> i64 {
    1
}
fn ten() -> i64 {
    10
}
fn eighteen() -> i64 {
    18
}
fn one_u32() -> u32 {
    1
}
fn itr50() -> u32 {
    50
}
fn ratio() -> f64 {
    1.875
}
fn ball() -> L2WInfProj {
    L2WInfProj::Ball
}
fn clip() -> LinfW2Proj {
    LinfW2Proj::Clip
}
fn r1() -> String {
    "R1".into()
}
/// RobustBench normalisation (A): CIFAR-10 mean/std.
pub fn cifar_norm() -> Option<Normalization> {
    Some(Normalization { mean: vec![0.4914, 0.4822, 0.4465], std: vec![0.2471, 0.2435, 0.2616] })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_forms_agree() {
        let a: Delta = serde_json::from_str("\"8/255\"").unwrap();
        let b: Delta = serde_json::from_str(&format!("{}", 8.0 / 255.0)).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.pretty(), "8/255");
        assert_eq!(Delta::parse("0.5/255").unwrap().pretty(), "0.5/255");
        assert_eq!(Delta(0.5).pretty(), "0.5");
        assert_eq!(Delta(0.031).pretty(), "0.031");
        assert!(Delta::parse("-1").is_err());
        assert!(Delta::parse("1/0").is_err());
        assert!(Delta::parse("abc").is_err());
    }

    #[test]
    fn arch_is_tagged() {
        let a: Arch = serde_json::from_str(r#"{"name":"wide-resnet","depth":28,"widen":10}"#).unwrap();
        assert!(matches!(a, Arch::WideResnet { depth: 28, widen: 10, sub_block1: false, .. }));
    }
}
