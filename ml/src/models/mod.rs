//! The model zoo. Every model is a plain struct over `tch::nn::Path` whose variable names are
//! exactly PyTorch's state-dict keys, and implements `nn::ModuleT` on raw [0,1] NCHW input (any
//! normalisation, and the Keras CNN's ×255, is the model's first op, spec §7), so attacks,
//! δ and transport costs are always in [0,1] pixel units.
//!
//! ```no_run
//! use wdro_ml::models;
//! use wdro_stages::params::Arch;
//! let arch = Arch::SmallCnn { in_channels: 1, num_classes: 10 };
//! let net = models::new_net(&arch, tch::Device::Cpu);
//! let x = tch::Tensor::zeros([2, 1, 28, 28], (tch::Kind::Float, tch::Device::Cpu));
//! let logits = net.forward_t(&x, false); // [2, 10]
//! ```

pub mod dm_wide_resnet;
pub mod keras_cnn;
pub mod layers;
pub mod resnet;
pub mod small_cnn;
pub mod wide_resnet;

use tch::{nn, Device, Tensor};
use thiserror::Error;
use wdro_stages::params::Arch;

use layers::normalize_from;

/// An arch whose numbers the constructors cannot build (checked before building so that a
/// bad config is an error, not a panic).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ModelError {
    #[error("arch {arch}: {msg}")]
    BadArch { arch: String, msg: String },
}

/// A network with its variables.
pub struct Net {
    pub vs: nn::VarStore,
    pub module: Box<dyn nn::ModuleT + Send>,
    pub arch: Arch,
}

impl Net {
    /// Logits for x (float NCHW in [0,1]).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.module.forward_t(x, train)
    }

    /// Number of trainable scalars (BN running stats and counters excluded).
    pub fn n_params(&self) -> i64 {
        self.vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net").field("arch", &self.arch).field("device", &self.vs.device()).finish()
    }
}

fn bad(arch: &Arch, msg: &str) -> ModelError {
    ModelError::BadArch { arch: format!("{arch:?}"), msg: msg.to_string() }
}

/// Checks the numbers of an arch (depths, widths, normalisation lengths).
pub fn check_arch(arch: &Arch) -> Result<(), ModelError> {
    let norm_ok = |n: &Option<wdro_stages::params::Normalization>, c: usize| match n {
        Some(n) => n.mean.len() == c && n.std.len() == c && n.std.iter().all(|&s| s > 0.0),
        None => true,
    };
    match arch {
        Arch::SmallCnn { in_channels, num_classes } => {
            if *in_channels < 1 || *num_classes < 2 {
                return Err(bad(arch, "need in_channels >= 1 and num_classes >= 2"));
            }
        }
        Arch::WideResnet { depth, widen, normalize, .. } => {
            if *depth < 10 || (depth - 4) % 6 != 0 || *widen < 1 {
                return Err(bad(arch, "depth must be 6n+4 (e.g. 16, 28, 34, 70) and widen >= 1"));
            }
            if !norm_ok(normalize, 3) {
                return Err(bad(arch, "normalize needs 3 means and 3 positive stds"));
            }
        }
        Arch::DmWideResnet { depth, width, normalize } => {
            if *depth < 10 || (depth - 4) % 6 != 0 || *width < 1 {
                return Err(bad(arch, "depth must be 6n+4 (e.g. 16, 28, 70) and width >= 1"));
            }
            if !norm_ok(normalize, 3) {
                return Err(bad(arch, "normalize needs 3 means and 3 positive stds"));
            }
        }
        Arch::PreactResnet18 { normalize, .. } => {
            if !norm_ok(normalize, 3) {
                return Err(bad(arch, "normalize needs 3 means and 3 positive stds"));
            }
        }
        Arch::Resnet { depth, normalize } => {
            if ![18, 34, 50, 101, 152].contains(depth) {
                return Err(bad(arch, "depth must be 18, 34, 50, 101 or 152"));
            }
            if !norm_ok(normalize, 3) {
                return Err(bad(arch, "normalize needs 3 means and 3 positive stds"));
            }
        }
        Arch::DmPreactResnet { depth, normalize } => {
            if ![18, 34].contains(depth) {
                return Err(bad(arch, "depth must be 18 or 34"));
            }
            if !norm_ok(normalize, 3) {
                return Err(bad(arch, "normalize needs 3 means and 3 positive stds"));
            }
        }
        Arch::KerasCifarCnn => {}
    }
    Ok(())
}

/// Builds `arch`'s module with its variables under `p`. Panics on an arch that
/// [`check_arch`] rejects; use [`try_build`] for configs.
pub fn build(arch: &Arch, p: &nn::Path) -> Box<dyn nn::ModuleT + Send> {
    try_build(arch, p).unwrap_or_else(|e| panic!("{e}"))
}

/// [`build`] after [`check_arch`].
pub fn try_build(arch: &Arch, p: &nn::Path) -> Result<Box<dyn nn::ModuleT + Send>, ModelError> {
    check_arch(arch)?;
    Ok(match arch {
        Arch::SmallCnn { in_channels, num_classes } => {
            Box::new(small_cnn::SmallCnn::new(p, *in_channels, *num_classes))
        }
        Arch::WideResnet { depth, widen, sub_block1, normalize } => {
            Box::new(wide_resnet::WideResNet::new(p, *depth, *widen, *sub_block1, normalize_from(normalize)))
        }
        Arch::PreactResnet18 { bn_before_fc, v2_shortcut, normalize } => {
            Box::new(resnet::PreActResNet18::new(p, *bn_before_fc, *v2_shortcut, normalize_from(normalize)))
        }
        Arch::Resnet { depth, normalize } => Box::new(resnet::ResNet::new(p, *depth, normalize_from(normalize))),
        Arch::DmWideResnet { depth, width, normalize } => {
            Box::new(dm_wide_resnet::DmWideResNet::new(p, *depth, *width, normalize_from(normalize)))
        }
        Arch::DmPreactResnet { depth, normalize } => {
            Box::new(dm_wide_resnet::DmPreActResNet::new(p, *depth, normalize_from(normalize)))
        }
        Arch::KerasCifarCnn => Box::new(keras_cnn::KerasCifarCnn::new(p)),
    })
}

/// A fresh network (PyTorch-default initialisation, draws from torch's global RNG: call
/// `tch::manual_seed` first for a reproducible init). Panics on an invalid arch; see
/// [`try_new_net`].
pub fn new_net(arch: &Arch, device: Device) -> Net {
    try_new_net(arch, device).unwrap_or_else(|e| panic!("{e}"))
}

/// [`new_net`] returning an error for an invalid arch.
pub fn try_new_net(arch: &Arch, device: Device) -> Result<Net, ModelError> {
    let vs = nn::VarStore::new(device);
    let module = try_build(arch, &vs.root())?;
    Ok(Net { vs, module, arch: arch.clone() })
}

/// The classifier layer's module name (spec §7.8), e.g. for fine-tuning variant A: its
/// `<name>.weight` and `<name>.bias` are the variables to re-initialise.
pub fn last_layer(arch: &Arch) -> &'static str {
    match arch {
        Arch::SmallCnn { .. } => "fc2",
        Arch::WideResnet { .. } => "fc",
        Arch::DmWideResnet { .. } | Arch::DmPreactResnet { .. } => "logits",
        Arch::PreactResnet18 { .. } | Arch::Resnet { .. } => "linear",
        Arch::KerasCifarCnn => "dense_2",
    }
}

/// Input features of [`last_layer`] (spec §7.8).
pub fn last_layer_in_features(arch: &Arch) -> i64 {
    match arch {
        Arch::SmallCnn { .. } => 128,
        Arch::WideResnet { widen, .. } => 64 * widen,
        Arch::DmWideResnet { width, .. } => 64 * width,
        Arch::DmPreactResnet { .. } | Arch::PreactResnet18 { .. } => 512,
        Arch::Resnet { depth, .. } => {
            if *depth >= 50 {
                2048
            } else {
                512
            }
        }
        Arch::KerasCifarCnn => 512,
    }
}

/// The factor between the [0,1] images callers feed and what the model multiplies in:
/// always 1, because every model takes [0,1] input (the Keras CNN's ×255 is inside its
/// forward). Kept so callers can assert the convention instead of assuming it.
pub fn input_scale(_arch: &Arch) -> f64 {
    1.0
}

/// Expected input image shape [C, H, W] for an arch (what the model was designed for).
pub fn input_shape(arch: &Arch) -> [i64; 3] {
    match arch {
        Arch::SmallCnn { in_channels, .. } => [*in_channels, 28, 28],
        _ => [3, 32, 32],
    }
}

/// Re-initialises the trainable variables whose names start with `prefix` ("" = all) like
/// PyTorch's defaults, drawing from the portable SplitMix64 of [`crate::data::subset`] instead
/// of torch's global generator, so an initialisation depends only on `seed` (not on the
/// device, the libtorch build, or other threads using torch's RNG).
///
/// Rules, in sorted variable-name order (one RNG stream): a weight with ≥ 2 dims (conv,
/// linear) and the bias next to it get U(−1/√fan_in, 1/√fan_in), fan_in = weight numel /
/// out-dim; a 1-D `weight` (BatchNorm) is set to 1 and its bias to 0. Running statistics and
/// counters are not trainable and keep their values. E.g. fine-tuning variant A:
/// `reinit(&net, models::last_layer(&net.arch), seed)`.
pub fn reinit(net: &Net, prefix: &str, seed: u64) {
    let vars = net.vs.variables();
    let mut names: Vec<&String> = vars.keys().filter(|k| k.starts_with(prefix)).collect();
    names.sort();
    let mut rng = crate::data::subset::SplitMix64::new(seed);
    tch::no_grad(|| {
        for name in names {
            let mut v = vars[name].shallow_clone();
            if !v.requires_grad() || !v.is_floating_point() {
                continue;
            }
            let module = name.rsplit_once('.').map(|(m, _)| m).unwrap_or("");
            let weight = vars.get(&format!("{module}.weight"));
            let fan_in = match weight {
                Some(w) if w.dim() >= 2 => Some(w.numel() as i64 / w.size()[0]),
                _ => None,
            };
            let (n, dev, kind) = (v.numel(), v.device(), v.kind());
            let new = match fan_in {
                Some(f) => {
                    let b = 1.0 / (f as f64).sqrt();
                    let vals: Vec<f32> = (0..n)
                        .map(|_| {
                            ((rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64) * 2.0 - 1.0) as f32 * b as f32
                        })
                        .collect();
                    Tensor::from_slice(&vals)
                }
                None if name.ends_with(".weight") => Tensor::ones([n as i64], (tch::Kind::Float, Device::Cpu)),
                None => Tensor::zeros([n as i64], (tch::Kind::Float, Device::Cpu)),
            };
            v.copy_(&new.view(v.size().as_slice()).to_kind(kind).to_device(dev));
        }
    });
}

/// Checks that images of shape [C, H, W] fit `arch` (channels, and the 32×32 the CIFAR
/// models' fixed 8×8 / 4×4 pooling assumes), so a data/model mix-up is an error, not a
/// libtorch panic deep inside forward.
pub fn check_input(arch: &Arch, image_shape: [i64; 3]) -> Result<(), ModelError> {
    let want = input_shape(arch);
    let ok = match arch {
        Arch::SmallCnn { .. } => image_shape[0] == want[0] && image_shape[1] >= 8 && image_shape[2] >= 8,
        _ => image_shape == want,
    };
    if ok {
        Ok(())
    } else {
        Err(bad(arch, &format!("expects images of shape {want:?} (C, H, W), the data has {image_shape:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reinit_is_seeded_and_pytorch_like() {
        let arch = Arch::SmallCnn { in_channels: 1, num_classes: 10 };
        let (a, b) = (new_net(&arch, Device::Cpu), new_net(&arch, Device::Cpu));
        reinit(&a, "", 5);
        reinit(&b, "", 5);
        let (va, vb) = (a.vs.variables(), b.vs.variables());
        assert!(va.iter().all(|(k, v)| v.equal(&vb[k])));
        let w = &va["fc1.weight"];
        let bound = 1.0 / (1568f64).sqrt();
        assert!(w.abs().max().double_value(&[]) <= bound);
        assert!(w.std(true).double_value(&[]) > 0.5 * bound / 3f64.sqrt());
        let before = va["conv1.weight"].copy();
        reinit(&a, "fc2", 6);
        assert!(a.vs.variables()["conv1.weight"].equal(&before));
        assert!(!a.vs.variables()["fc2.weight"].equal(&vb["fc2.weight"]));
        let d = new_net(&Arch::WideResnet { depth: 10, widen: 1, sub_block1: false, normalize: None }, Device::Cpu);
        reinit(&d, "", 1);
        let vd = d.vs.variables();
        assert!(vd["bn1.weight"].equal(&Tensor::ones([64], (tch::Kind::Float, Device::Cpu))));
        assert!(vd["fc.bias"].abs().max().double_value(&[]) <= 1.0 / 8.0);
    }

    #[test]
    fn input_shapes_are_checked() {
        let small = Arch::SmallCnn { in_channels: 1, num_classes: 10 };
        assert!(check_input(&small, [1, 28, 28]).is_ok());
        let e = check_input(&small, [3, 32, 32]).unwrap_err().to_string();
        assert!(e.contains("expects images of shape [1, 28, 28]"), "{e}");
        assert!(check_input(&Arch::KerasCifarCnn, [1, 28, 28]).is_err());
    }

    #[test]
    fn bad_arch_is_an_error() {
        let a = Arch::WideResnet { depth: 27, widen: 2, sub_block1: false, normalize: None };
        let e = try_new_net(&a, Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("6n+4"), "{e}");
    }

    #[test]
    fn last_layer_exists_with_in_features() {
        let archs = [
            Arch::SmallCnn { in_channels: 1, num_classes: 10 },
            Arch::WideResnet { depth: 10, widen: 1, sub_block1: false, normalize: None },
            Arch::DmWideResnet { depth: 10, width: 1, normalize: wdro_stages::params::cifar_norm() },
            Arch::KerasCifarCnn,
        ];
        for a in &archs {
            let net = new_net(a, Device::Cpu);
            let vars = net.vs.variables();
            let w = &vars[&format!("{}.weight", last_layer(a))];
            assert_eq!(w.size()[1], last_layer_in_features(a), "{a:?}");
            let [c, h, wd] = input_shape(a);
            let x = Tensor::zeros([2, c, h, wd], (tch::Kind::Float, Device::Cpu));
            assert_eq!(net.forward_t(&x, false).size(), [2, 10]);
        }
    }
}
