//! The model registry: RobustBench CIFAR-10 names → architecture, threat track, budget,
//! reference accuracies and checkpoint address (spec §7.1), plus the offline models.
//! Torch-free, so `wdro models ls` and config validation never load libtorch.
//!
//! Checkpoint addresses: the Google Drive ids of RobustBench's `model_zoo/cifar10.py` (checked
//! against that file); names whose id was not available (the 2023 entries not in the spec) say
//! "not known" and users pass `file:PATH` (never an invented id).
//! Reference accuracies are RobustBench's own (`model_info/cifar10/{Linf,L2}/<name>.json`).

use std::sync::OnceLock;

use serde::Serialize;

use crate::params::{Arch, Norm, Normalization};

/// One registered model.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    pub name: &'static str,
    /// `None` for offline models that belong to no RobustBench track.
    pub threat: Option<Norm>,
    pub arch: Arch,
    /// The pointwise budget of the track (ℓ∞ 8/255, Zhang2019Theoretically 0.031; ℓ2 0.5).
    pub eps: Option<f64>,
    /// RobustBench clean accuracy, %.
    pub clean_acc: Option<f64>,
    /// RobustBench AutoAttack (standard) robust accuracy, %.
    pub aa_acc: Option<f64>,
    pub drive_id: Option<&'static str>,
    /// Pinned digest (`sha256:…`) where known.
    pub digest: Option<&'static str>,
    /// Extra training data (informational).
    pub extra_data: &'static str,
    pub note: &'static str,
}

impl ModelInfo {
    /// Where `fetch` downloads the checkpoint from, if known.
    pub fn checkpoint_url(&self) -> Option<String> {
        self.drive_id.map(drive_url)
    }

    pub fn threat_str(&self) -> &'static str {
        match self.threat {
            Some(Norm::Linf) => "Linf",
            Some(Norm::L2) => "L2",
            None => "-",
        }
    }

    pub fn arch_str(&self) -> String {
        match &self.arch {
            Arch::SmallCnn { .. } => "SmallCnn".into(),
            Arch::WideResnet { depth, widen, .. } => format!("WideResNet-{depth}-{widen}"),
            Arch::PreactResnet18 { .. } => "PreActResNet-18".into(),
            Arch::DmWideResnet { depth, width, .. } => format!("DMWideResNet-{depth}-{width}"),
            Arch::Resnet { depth, .. } => format!("ResNet-{depth}"),
            Arch::DmPreactResnet { depth, .. } => format!("DMPreActResNet-{depth}"),
            Arch::KerasCifarCnn => "Keras CIFAR CNN".into(),
        }
    }
}

/// The direct-download form of a Google Drive file id. `confirm=t` skips the "cannot scan this
/// large file for viruses" interstitial that RobustBench's downloader handles with a cookie; if
/// Drive still serves an HTML page (quota, login), `fetch` refuses it with that diagnosis.
pub fn drive_url(id: &str) -> String {
    format!("https://drive.usercontent.google.com/download?id={id}&export=download&confirm=t")
}

fn norm_a() -> Option<Normalization> {
    crate::params::cifar_norm()
}

fn norm_b() -> Option<Normalization> {
    Some(Normalization { mean: vec![0.4914, 0.4822, 0.4465], std: vec![0.2023, 0.1994, 0.2010] })
}

fn wrn(depth: i64, widen: i64, sub_block1: bool, normalize: Option<Normalization>) -> Arch {
    Arch::WideResnet { depth, widen, sub_block1, normalize }
}

fn dm(depth: i64, width: i64) -> Arch {
    Arch::DmWideResnet { depth, width, normalize: norm_a() }
}

fn dm18() -> Arch {
    Arch::DmPreactResnet { depth: 18, normalize: norm_a() }
}

#[allow(clippy::too_many_arguments)]
fn rb(
    name: &'static str,
    threat: Norm,
    arch: Arch,
    clean: f64,
    aa: f64,
    drive_id: Option<&'static str>,
    extra_data: &'static str,
    note: &'static str,
) -> ModelInfo {
    let eps = match threat {
        Norm::Linf if name == "Zhang2019Theoretically" => 0.031,
        Norm::Linf => 8.0 / 255.0,
        Norm::L2 => 0.5,
    };
    ModelInfo {
        name,
        threat: Some(threat),
        arch,
        eps: Some(eps),
        clean_acc: Some(clean),
        aa_acc: Some(aa),
        drive_id,
        digest: None,
        extra_data,
        note,
    }
}

/// Every registered model, RobustBench Linf first, then L2, then the offline models.
pub fn all() -> &'static [ModelInfo] {
    static ALL: OnceLock<Vec<ModelInfo>> = OnceLock::new();
    ALL.get_or_init(|| {
        use Norm::{Linf, L2};
        let std_drive = Some("1t98aEuzeTL8P7Kpd5DIrCoCL21BNZUhC");
        vec![
            rb(
                "Standard",
                Linf,
                wrn(28, 10, false, None),
                94.78,
                0.0,
                std_drive,
                "none",
                "not robust; same weights on both tracks",
            ),
            rb(
                "Zhang2019Theoretically",
                Linf,
                wrn(34, 10, true, None),
                84.92,
                53.08,
                Some("1hPz9QQwyM7QSuWu-ANG_uXR-29xtL8t_"),
                "none",
                "TRADES; eps 0.031",
            ),
            rb(
                "Carmon2019Unlabeled",
                Linf,
                wrn(28, 10, true, None),
                89.69,
                59.53,
                Some("15tUx-gkZMYx7BfEOw1GY5OKC-jECIsPQ"),
                "500k unlabeled (real)",
                "",
            ),
            rb(
                "Rice2020Overfitting",
                Linf,
                wrn(34, 20, false, norm_a()),
                85.34,
                53.42,
                Some("1vC_Twazji7lBjeMQvAD9uEQxi9Nx2oG-"),
                "none",
                "mu/sigma buffers",
            ),
            rb(
                "Wong2020Fast",
                Linf,
                Arch::PreactResnet18 { bn_before_fc: false, v2_shortcut: false, normalize: norm_a() },
                83.34,
                43.21,
                Some("1Re--_lf3jCEw9bnQqGkjw3J7v2tSZKrv"),
                "none",
                "mu/sigma buffers",
            ),
            rb(
                "Engstrom2019Robustness",
                Linf,
                Arch::Resnet { depth: 50, normalize: norm_b() },
                87.03,
                49.25,
                Some("1etqmQsksNIWBvBQ4r8ZFk_3FJlLWr8Rr"),
                "none",
                "mu/sigma (B)",
            ),
            rb(
                "Addepalli2022Efficient_RN18",
                Linf,
                Arch::Resnet { depth: 18, normalize: None },
                85.71,
                52.48,
                Some("1m5vhdzIUUKhDbsZdOG9z76Eyp6f4xe_f"),
                "none",
                "",
            ),
            rb(
                "Addepalli2022Efficient_WRN_34_10",
                Linf,
                wrn(34, 10, false, None),
                88.71,
                57.81,
                Some("1--dVDtZhAk4D2zMtTDwIGnImuCGxTcBA"),
                "none",
                "",
            ),
            rb("Cui2023Decoupled_WRN-34-10", Linf, wrn(34, 10, false, None), 85.31, 57.09, None, "none", ""),
            rb(
                "Sehwag2021Proxy_R18",
                Linf,
                Arch::Resnet { depth: 18, normalize: None },
                84.59,
                55.54,
                Some("1-ZgoSlD_AMhtXdnUElilxVXnzK2DcHuu"),
                "10M synthetic",
                "",
            ),
            rb(
                "Rebuffi2021Fixing_R18_ddpm",
                Linf,
                dm18(),
                83.53,
                56.66,
                Some("1--dxE66AsgBSUsuK2sXCTrsYUV9B5f95"),
                "1M synthetic",
                "Swish",
            ),
            rb(
                "Rade2021Helper_R18_ddpm",
                Linf,
                dm18(),
                86.86,
                57.09,
                Some("1f2yJUo-jxCQNk589frzriv6wPyrQEZdX"),
                "1M synthetic",
                "Swish",
            ),
            rb(
                "Rebuffi2021Fixing_28_10_cutmix_ddpm",
                Linf,
                dm(28, 10),
                87.33,
                60.75,
                Some("1-0EChXbc6pOvx26O17av263bCeqIAz6s"),
                "1M synthetic",
                "Swish",
            ),
            rb(
                "Gowal2021Improving_R18_ddpm_100m",
                Linf,
                dm18(),
                87.35,
                58.63,
                Some("1-0EuCJashqSXEkkd1DOzFA4tH8KL2kim"),
                "100M synthetic",
                "Swish",
            ),
            rb(
                "Gowal2021Improving_28_10_ddpm_100m",
                Linf,
                dm(28, 10),
                87.50,
                63.44,
                Some("12L8YE6VBgUDKyW6GMSNefSYj2gg4LEKx"),
                "100M synthetic",
                "Swish",
            ),
            rb(
                "Gowal2021Improving_70_16_ddpm_100m",
                Linf,
                dm(70, 16),
                88.74,
                66.11,
                Some("10qBoDG_NomJBrRFeTsSwEcJF1GA-sjC4"),
                "100M synthetic",
                "Swish",
            ),
            rb("Xu2023Exploring_WRN-28-10", Linf, dm(28, 10), 93.69, 63.89, None, "10M synthetic", "SiLU"),
            rb("Cui2023Decoupled_WRN-28-10", Linf, dm(28, 10), 92.16, 67.73, None, "20M synthetic", "SiLU"),
            rb(
                "Wang2023Better_WRN-28-10",
                Linf,
                dm(28, 10),
                92.44,
                67.31,
                Some("1-6MYKJdECDVGaWjj6GgqvaT95BGKhUvI"),
                "20M synthetic",
                "SiLU",
            ),
            rb(
                "Wang2023Better_WRN-70-16",
                Linf,
                dm(70, 16),
                93.25,
                70.69,
                Some("1-RF7ZSS-PAh6bfQcuqx4lh9bc9BUGnap"),
                "50M synthetic",
                "SiLU",
            ),
            rb(
                "Standard",
                L2,
                wrn(28, 10, false, None),
                94.78,
                0.0,
                std_drive,
                "none",
                "not robust; same weights on both tracks",
            ),
            rb(
                "Engstrom2019Robustness",
                L2,
                Arch::Resnet { depth: 50, normalize: norm_b() },
                90.83,
                69.24,
                Some("1O8rGa6xOUIRwQ-M4ESrCjzknby8TM2ZE"),
                "none",
                "mu/sigma (B)",
            ),
            rb(
                "Sehwag2021Proxy_R18",
                L2,
                Arch::Resnet { depth: 18, normalize: None },
                89.76,
                74.41,
                Some("1zPjjZj9wujBNkAmHHHIikem6_aIjMhXG"),
                "10M synthetic",
                "",
            ),
            rb(
                "Rade2021Helper_R18_ddpm",
                L2,
                dm18(),
                90.57,
                76.15,
                Some("1VWrStAYy5CrUR18sjcpq_LKLpeqgUaoQ"),
                "1M synthetic",
                "Swish",
            ),
            rb(
                "Rebuffi2021Fixing_28_10_cutmix_ddpm",
                L2,
                dm(28, 10),
                91.79,
                78.80,
                Some("1-DUKcvfDzeWwt0NK7q2XvU-dIi8up8B0"),
                "1M synthetic",
                "Swish",
            ),
            rb(
                "Wang2023Better_WRN-28-10",
                L2,
                dm(28, 10),
                95.16,
                83.68,
                Some("1-fwKiJXEqHHUngt8wKsNnHuD4vAPvPXC"),
                "50M synthetic",
                "SiLU",
            ),
            rb("Wang2023Better_WRN-70-16", L2, dm(70, 16), 95.54, 84.97, None, "50M synthetic", "SiLU"),
            rb(
                "Rice2020Overfitting",
                L2,
                Arch::PreactResnet18 { bn_before_fc: true, v2_shortcut: true, normalize: norm_a() },
                88.67,
                67.68,
                Some("1jo-31utiYNBVzLM0NxUEWz0teo3Z0xa7"),
                "none",
                "PreActBlockV2, bn before fc, mu/sigma",
            ),
            ModelInfo {
                name: "cifar-10-model",
                threat: None,
                arch: Arch::KerasCifarCnn,
                eps: None,
                clean_acc: None,
                aa_acc: None,
                drive_id: None,
                digest: None,
                extra_data: "none",
                note: "offline: the real pretrained Keras CNN of the PyPI wheel cifar-10-model 7.4.0 (non-robust)",
            },
            ModelInfo {
                name: "demo-small-cnn",
                threat: None,
                arch: Arch::SmallCnn { in_channels: 1, num_classes: 10 },
                eps: None,
                clean_acc: None,
                aa_acc: None,
                drive_id: None,
                digest: None,
                extra_data: "none",
                note: "offline: trained inside the demo pipeline on Fashion-MNIST (model.source = \"train\")",
            },
        ]
    })
}

/// A RobustBench name on a threat track.
pub fn lookup(name: &str, threat: Norm) -> Option<&'static ModelInfo> {
    all().iter().find(|m| m.name == name && m.threat == Some(threat))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_models_are_registered() {
        let z = lookup("Zhang2019Theoretically", Norm::Linf).unwrap();
        assert!(matches!(z.arch, Arch::WideResnet { depth: 34, widen: 10, sub_block1: true, .. }));
        assert_eq!(z.eps, Some(0.031));
        let w = lookup("Wang2023Better_WRN-28-10", Norm::L2).unwrap();
        assert!(w.checkpoint_url().unwrap().contains("1-fwKiJXEqHHUngt8wKsNnHuD4vAPvPXC"));
        assert!(lookup("Zhang2019Theoretically", Norm::L2).is_none());
        assert!(lookup("Standard", Norm::L2).is_some());
    }

    #[test]
    fn names_are_unique_per_track() {
        let mut seen = std::collections::BTreeSet::new();
        for m in all() {
            assert!(seen.insert((m.name, m.threat_str())), "duplicate {}", m.name);
        }
    }
}
