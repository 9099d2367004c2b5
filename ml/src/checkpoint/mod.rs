//! Checkpoints in, canonical state dicts out.
//!
//! Reading ([`read_state_dict`]) accepts, detected by content rather than name:
//! * safetensors (what wdro writes, and RobustBench weights exported from Python);
//! * PyTorch zip `.pt` files as `torch.save` writes them, including the usual
//!   `torch.save(model.state_dict())` OrderedDict that tch's own loader rejects
//!   (shared/notes/libtorch-setup.md §5), nested checkpoints and fp16 weights — through a
//!   data-only unpickler that refuses every global a state dict does not need ([`pickle`]);
//! * Keras weights converted to safetensors by `scripts/setup-data.sh` (Keras names and
//!   layouts; mapped by [`keras`]).
//!
//! Loading into a [`Net`] ([`load_into`]) is strict like PyTorch's `load_state_dict`: missing
//! keys, unexpected keys and shape mismatches are errors naming every offender. Writing
//! ([`save_canonical`]) produces sorted keys, f32 float tensors and i64 counters, so the same
//! weights fetched from two URLs become one cache blob.

pub mod keras;
pub mod pickle;
pub mod torch_zip;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use tch::{Device, Kind, Tensor};
use wdro_stages::params::Arch;

use crate::models::{self, Net};

/// Why a checkpoint could not be read or loaded. Every message is one line naming the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    #[error("checkpoint {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {}: {msg}", path.display())]
    Invalid { path: PathBuf, msg: String },
    #[error("checkpoint {} does not fit {arch}: {msg}", path.display())]
    Mismatch { path: PathBuf, arch: String, msg: String },
    #[error(transparent)]
    Model(#[from] models::ModelError),
}

fn invalid(path: &Path, msg: impl Into<String>) -> CheckpointError {
    CheckpointError::Invalid { path: path.to_path_buf(), msg: msg.into() }
}

/// File formats, by magic bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `PK\x03\x04`: a zip, i.e. a `torch.save` file (new serialization).
    TorchZip,
    /// A pickle at offset 0: `torch.save(..., _use_new_zipfile_serialization=False)`.
    TorchLegacy,
    /// u64 header length then `{`.
    Safetensors,
    /// `\x89HDF\r\n\x1a\n`.
    Hdf5,
    Unknown,
}

pub fn detect(head: &[u8]) -> Format {
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        Format::TorchZip
    } else if head.starts_with(b"\x89HDF\r\n\x1a\n") {
        Format::Hdf5
    } else if head.len() >= 9 && head[8] == b'{' {
        Format::Safetensors
    } else if head.first() == Some(&0x80) {
        Format::TorchLegacy
    } else {
        Format::Unknown
    }
}

/// Reads any supported checkpoint into name → tensor (CPU, dtypes as stored), after removing
/// RobustBench's `module.` then `model.` key prefixes.
pub fn read_state_dict(path: &Path) -> Result<BTreeMap<String, Tensor>, CheckpointError> {
    let mut head = [0u8; 16];
    let n = {
        use std::io::Read;
        let mut f =
            std::fs::File::open(path).map_err(|e| CheckpointError::Io { path: path.to_path_buf(), source: e })?;
        f.read(&mut head).map_err(|e| CheckpointError::Io { path: path.to_path_buf(), source: e })?
    };
    let sd = match detect(&head[..n]) {
        Format::TorchZip => torch_zip::read(path)?,
        Format::Safetensors => read_safetensors(path)?,
        Format::TorchLegacy => {
            return Err(invalid(
                path,
                "legacy (pre-1.6, non-zip) torch.save format is not supported: re-save it with \
                 torch.save(torch.load(f), g) under torch >= 1.6 (new zipfile serialization)",
            ))
        }
        Format::Hdf5 => {
            return Err(invalid(
                path,
                "HDF5 (Keras) weights must be converted to safetensors first: run scripts/setup-data.sh",
            ))
        }
        Format::Unknown => {
            return Err(invalid(path, "not a checkpoint: expected a torch.save .pt (zip) or a .safetensors file"))
        }
    };
    Ok(strip_prefixes(sd))
}

/// RobustBench `utils.load_model`: drop `module.` then `model.` from the keys. (RobustBench
/// drops the first len(prefix) characters of any key *containing* the prefix; in real
/// checkpoints it is always a prefix, and only prefixes are removed here.)
pub fn strip_prefixes(sd: BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    let strip = |sd: BTreeMap<String, Tensor>, p: &str| -> BTreeMap<String, Tensor> {
        sd.into_iter().map(|(k, v)| (k.strip_prefix(p).map(str::to_string).unwrap_or(k), v)).collect()
    };
    strip(strip(sd, "module."), "model.")
}

fn st_kind(d: Dtype) -> Option<Kind> {
    Some(match d {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Reads every tensor of a safetensors file.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|e| CheckpointError::Io { path: path.to_path_buf(), source: e })?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| invalid(path, format!("unreadable safetensors ({e:?}): truncated or corrupt file?")))?;
    let mut out = BTreeMap::new();
    for (name, v) in st.tensors() {
        let kind = st_kind(v.dtype())
            .ok_or_else(|| invalid(path, format!("`{name}` has unsupported dtype {:?}", v.dtype())))?;
        let shape: Vec<i64> = v.shape().iter().map(|&d| d as i64).collect();
        let t =
            Tensor::f_from_data_size(v.data(), &shape, kind).map_err(|e| invalid(path, format!("`{name}`: {e}")))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// What [`load_into`] did besides copying.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LoadReport {
    /// Variables copied from the file.
    pub loaded: usize,
    /// BN counters absent from the file (older checkpoints, Keras), set to 0.
    pub filled_counters: Vec<String>,
    /// Keys of the file that are not variables but were checked and accepted
    /// (`mu`/`sigma`/`mean`/`std` equal to the arch's normalisation constants).
    pub ignored: Vec<String>,
}

/// Keys a checkpoint may carry that are class constants here, not variables.
const NORM_KEYS: [&str; 4] = ["mu", "sigma", "mean", "std"];

fn arch_norm(arch: &Arch) -> Option<&wdro_stages::params::Normalization> {
    match arch {
        Arch::WideResnet { normalize, .. }
        | Arch::PreactResnet18 { normalize, .. }
        | Arch::Resnet { normalize, .. }
        | Arch::DmWideResnet { normalize, .. }
        | Arch::DmPreactResnet { normalize, .. } => normalize.as_ref(),
        Arch::SmallCnn { .. } | Arch::KerasCifarCnn => None,
    }
}

/// Copies `sd` into `net`'s variables strictly (see the module docs). Float tensors are cast
/// to the variable's kind (f32), counters to i64. Keras-named dicts are mapped first.
pub fn load_into(net: &mut Net, sd: BTreeMap<String, Tensor>, origin: &Path) -> Result<LoadReport, CheckpointError> {
    let sd = if matches!(net.arch, Arch::KerasCifarCnn) && keras::looks_like_keras(&sd) {
        keras::to_torch(sd).map_err(|m| invalid(origin, m))?
    } else {
        sd
    };
    let arch_s = format!("{:?}", net.arch);
    let mismatch = |msg: String| CheckpointError::Mismatch { path: origin.to_path_buf(), arch: arch_s.clone(), msg };
    let vars: HashMap<String, Tensor> = net.vs.variables();
    let mut report = LoadReport::default();

    let mut unexpected = Vec::new();
    for (k, v) in &sd {
        if vars.contains_key(k) {
            continue;
        }
        if NORM_KEYS.contains(&k.as_str()) {
            let Some(norm) = arch_norm(&net.arch) else {
                return Err(mismatch(format!(
                    "the file has normalisation constant `{k}` but the arch has no `normalize`; set it to the \
                     model's mean/std"
                )));
            };
            let want = if k == "mu" || k == "mean" { &norm.mean } else { &norm.std };
            let got = Vec::<f64>::try_from(v.to_kind(Kind::Double).flatten(0, -1)).unwrap_or_default();
            if got.len() != want.len() || got.iter().zip(want).any(|(a, b)| (a - b).abs() > 1e-6) {
                return Err(mismatch(format!("`{k}` in the file is {got:?} but the arch's normalize has {want:?}")));
            }
            report.ignored.push(k.clone());
            continue;
        }
        unexpected.push(k.clone());
    }
    let mut missing = Vec::new();
    let mut shapes = Vec::new();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in &names {
        match sd.get(*name) {
            None if name.ends_with(".num_batches_tracked") => report.filled_counters.push((*name).clone()),
            None => missing.push((*name).clone()),
            Some(t) if t.size() != vars[*name].size() => {
                shapes.push(format!("{name}: file {:?} vs model {:?}", t.size(), vars[*name].size()))
            }
            Some(_) => {}
        }
    }
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("missing keys [{}]", missing.join(", ")));
    }
    if !unexpected.is_empty() {
        problems.push(format!("unexpected keys [{}]", unexpected.join(", ")));
    }
    if !shapes.is_empty() {
        problems.push(format!("shape mismatches [{}]", shapes.join("; ")));
    }
    if !problems.is_empty() {
        return Err(mismatch(problems.join("; ")));
    }
    tch::no_grad(|| -> Result<(), CheckpointError> {
        for name in names {
            let mut var = vars[name].shallow_clone();
            match sd.get(name) {
                Some(src) => {
                    let src = if src.is_floating_point() != var.is_floating_point()
                        && !name.ends_with("num_batches_tracked")
                    {
                        return Err(mismatch(format!(
                            "`{name}` is {:?} in the file but {:?} in the model",
                            src.kind(),
                            var.kind()
                        )));
                    } else {
                        src.to_kind(var.kind()).to_device(var.device())
                    };
                    var.f_copy_(&src).map_err(|e| mismatch(format!("`{name}`: {e}")))?;
                    report.loaded += 1;
                }
                None => {
                    let _ = var.zero_();
                }
            }
        }
        Ok(())
    })?;
    Ok(report)
}

/// [`read_state_dict`] + [`load_into`].
pub fn load_file(net: &mut Net, path: &Path) -> Result<LoadReport, CheckpointError> {
    let sd = read_state_dict(path)?;
    load_into(net, sd, path)
}

/// A new network of `arch` on `device` with the weights of `path` (any supported format; for
/// stage inputs this is the canonical safetensors of the `checkpoint` stage).
pub fn load_net(arch: &Arch, path: &Path, device: Device) -> Result<Net, CheckpointError> {
    let mut net = models::try_new_net(arch, Device::Cpu)?;
    load_file(&mut net, path)?;
    if device != Device::Cpu {
        net.vs.set_device(device);
    }
    Ok(net)
}

/// The canonical state dict of `net`: keys sorted, float variables as f32, integer ones
/// (BN counters) as i64, contiguous CPU tensors.
pub fn canonical_state_dict(net: &Net) -> BTreeMap<String, Tensor> {
    net.vs
        .variables()
        .into_iter()
        .map(|(k, v)| {
            let kind = if v.is_floating_point() { Kind::Float } else { Kind::Int64 };
            let t = v.detach().to_device(Device::Cpu).to_kind(kind).contiguous();
            (k, t)
        })
        .collect()
}

/// Writes [`canonical_state_dict`] as safetensors, without metadata: equal weights give equal
/// bytes.
pub fn save_canonical(net: &Net, path: &Path) -> Result<(), CheckpointError> {
    write_safetensors(&canonical_state_dict(net), path)
}

/// Writes a name → tensor map as safetensors (CPU f32/f64/f16/i64/i32/u8/bool tensors).
pub fn write_safetensors(sd: &BTreeMap<String, Tensor>, path: &Path) -> Result<(), CheckpointError> {
    let mut bufs = Vec::with_capacity(sd.len());
    for (k, t) in sd {
        let t = t.to_device(Device::Cpu).contiguous();
        let dtype = match t.kind() {
            Kind::Float => Dtype::F32,
            Kind::Double => Dtype::F64,
            Kind::Half => Dtype::F16,
            Kind::BFloat16 => Dtype::BF16,
            Kind::Int64 => Dtype::I64,
            Kind::Int => Dtype::I32,
            Kind::Uint8 => Dtype::U8,
            Kind::Bool => Dtype::BOOL,
            other => return Err(invalid(path, format!("`{k}`: cannot write kind {other:?}"))),
        };
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        bufs.push((k.as_str(), dtype, shape, crate::data::bundle::tensor_bytes(&t)));
    }
    let views: Vec<(&str, TensorView)> = bufs
        .iter()
        .map(|(k, d, s, b)| Ok((*k, TensorView::new(*d, s.clone(), b).map_err(|e| invalid(path, format!("{e:?}")))?)))
        .collect::<Result<_, CheckpointError>>()?;
    safetensors::serialize_to_file(views, &None, path).map_err(|e| invalid(path, format!("cannot write: {e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Arch {
        Arch::SmallCnn { in_channels: 1, num_classes: 10 }
    }

    #[test]
    fn detect_formats() {
        assert_eq!(detect(b"PK\x03\x04rest"), Format::TorchZip);
        assert_eq!(detect(b"\x80\x02\x8a\x0a"), Format::TorchLegacy);
        assert_eq!(detect(b"\x10\0\0\0\0\0\0\0{\"a\""), Format::Safetensors);
        assert_eq!(detect(b"\x89HDF\r\n\x1a\n"), Format::Hdf5);
        assert_eq!(detect(b"hello"), Format::Unknown);
    }

    #[test]
    fn canonical_roundtrip_is_byte_stable() {
        tch::manual_seed(1);
        let net = models::new_net(&small(), Device::Cpu);
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a.safetensors"), d.path().join("b.safetensors"));
        save_canonical(&net, &a).unwrap();
        let net2 = load_net(&small(), &a, Device::Cpu).unwrap();
        save_canonical(&net2, &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    }

    #[test]
    fn strict_errors_list_offenders() {
        tch::manual_seed(1);
        let net = models::new_net(&small(), Device::Cpu);
        let mut sd = canonical_state_dict(&net);
        sd.remove("fc2.bias");
        sd.insert("extra.weight".into(), Tensor::zeros([1], (Kind::Float, Device::Cpu)));
        sd.insert("fc1.bias".into(), Tensor::zeros([3], (Kind::Float, Device::Cpu)));
        let mut net2 = models::new_net(&small(), Device::Cpu);
        let e = load_into(&mut net2, sd, Path::new("x.safetensors")).unwrap_err().to_string();
        assert!(e.starts_with("checkpoint x.safetensors does not fit SmallCnn"), "{e}");
        assert!(e.contains("missing keys [fc2.bias]"), "{e}");
        assert!(e.contains("unexpected keys [extra.weight]"), "{e}");
        assert!(e.contains("fc1.bias: file [3] vs model [128]"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn prefixes_are_stripped() {
        let mut sd = BTreeMap::new();
        sd.insert("module.model.fc.weight".to_string(), Tensor::zeros([1], (Kind::Float, Device::Cpu)));
        sd.insert("model.fc.bias".to_string(), Tensor::zeros([1], (Kind::Float, Device::Cpu)));
        let keys: Vec<String> = strip_prefixes(sd).into_keys().collect();
        assert_eq!(keys, ["fc.bias", "fc.weight"]);
    }

    #[test]
    fn norm_constants_are_checked_not_loaded() {
        let arch = Arch::PreactResnet18 {
            bn_before_fc: false,
            v2_shortcut: false,
            normalize: wdro_stages::params::cifar_norm(),
        };
        let net = models::new_net(&arch, Device::Cpu);
        let mut sd = canonical_state_dict(&net);
        sd.insert("mu".into(), Tensor::from_slice(&[0.4914f32, 0.4822, 0.4465]).view([1, 3, 1, 1]));
        let mut n2 = models::new_net(&arch, Device::Cpu);
        let copy = sd.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
        let r = load_into(&mut n2, copy, Path::new("w.pt")).unwrap();
        assert_eq!(r.ignored, ["mu"]);
        sd.insert("sigma".into(), Tensor::from_slice(&[1f32, 1.0, 1.0]).view([1, 3, 1, 1]));
        let e = load_into(&mut n2, sd, Path::new("w.pt")).unwrap_err().to_string();
        assert!(e.contains("`sigma` in the file is [1.0, 1.0, 1.0]"), "{e}");
    }
}
