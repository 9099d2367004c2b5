//! PyTorch `.pt` files as `torch.save` writes them since 1.6 (zip serialization): a zip with
//! `<archive>/data.pkl` (the pickled object), `<archive>/data/<key>` (one raw little-endian
//! storage per key), `<archive>/byteorder` and `<archive>/version`.
//!
//! The pickle is read by the data-only reader with a state-dict allow-list (see
//! [`STATE_DICT_ALLOW`]); tensors are `torch._utils._rebuild_tensor_v2(storage, offset, size,
//! stride, requires_grad, hooks[, metadata])` calls whose storage is a persistent id
//! `('storage', torch.<Type>Storage, key, location, numel)`. Views (offsets, strides) are
//! honoured and materialised as contiguous copies.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

use tch::{Kind, Tensor};

use super::pickle::{Allow, Obj, Pickle};
use super::CheckpointError;

/// The only globals a state dict needs.
pub const STATE_DICT_ALLOW: Allow = Allow {
    pairs: &[
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch", "FloatStorage"),
        ("torch", "DoubleStorage"),
        ("torch", "HalfStorage"),
        ("torch", "BFloat16Storage"),
        ("torch", "LongStorage"),
        ("torch", "IntStorage"),
        ("torch", "ShortStorage"),
        ("torch", "CharStorage"),
        ("torch", "ByteStorage"),
        ("torch", "BoolStorage"),
    ],
    label: "state-dict",
};

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

struct Reader<'a> {
    path: &'a Path,
    zip: zip::ZipArchive<std::fs::File>,
    prefix: String,
    storages: HashMap<String, Tensor>,
}

impl Reader<'_> {
    fn bad(&self, msg: impl Into<String>) -> CheckpointError {
        CheckpointError::Invalid { path: self.path.to_path_buf(), msg: msg.into() }
    }

    fn member(&mut self, name: &str) -> Result<Vec<u8>, CheckpointError> {
        let full = format!("{}{name}", self.prefix);
        let path = self.path.to_path_buf();
        let mut f = self.zip.by_name(&full).map_err(|e| CheckpointError::Invalid {
            path: path.clone(),
            msg: format!("zip member {full}: {e} (truncated or corrupt file? re-download it)"),
        })?;
        let mut out = Vec::with_capacity(f.size() as usize);
        f.read_to_end(&mut out).map_err(|e| CheckpointError::Invalid {
            path,
            msg: format!("zip member {full}: {e} (truncated or corrupt file? re-download it)"),
        })?;
        Ok(out)
    }

    /// The storage of a persistent id, as a flat tensor of its dtype (cached per key: tensors
    /// may share a storage).
    fn storage(&mut self, pid: &Obj) -> Result<Tensor, CheckpointError> {
        let t = pid.as_seq().ok_or_else(|| self.bad("persistent id is not a tuple"))?;
        if t.len() != 5 || t[0].as_text() != Some("storage") {
            return Err(self.bad(format!("unexpected persistent id {pid:?}")));
        }
        let kind = match &t[1] {
            Obj::Global { module, name } if module == "torch" => storage_kind(name),
            _ => None,
        }
        .ok_or_else(|| self.bad(format!("unsupported storage type {}", t[1].kind())))?;
        let key = t[2].as_text().ok_or_else(|| self.bad("storage key is not a str"))?.to_string();
        let numel = t[4].as_int().ok_or_else(|| self.bad("storage numel is not an int"))?;
        if let Some(s) = self.storages.get(&key) {
            return Ok(s.shallow_clone());
        }
        let bytes = self.member(&format!("data/{key}"))?;
        let need = numel as usize * kind.elt_size_in_bytes();
        if bytes.len() != need {
            return Err(self.bad(format!(
                "storage {key} holds {} bytes but {numel} × {kind:?} needs {need} (truncated file?)",
                bytes.len()
            )));
        }
        let s =
            Tensor::f_from_data_size(&bytes, &[numel], kind).map_err(|e| self.bad(format!("storage {key}: {e}")))?;
        self.storages.insert(key, s.shallow_clone());
        Ok(s)
    }

    /// A tensor from a `_rebuild_tensor_v2` / `_rebuild_parameter` call.
    fn tensor(&mut self, name: &str, o: &Obj) -> Result<Tensor, CheckpointError> {
        let Obj::Call { args, .. } = o else {
            return Err(self.bad(format!("`{name}` is a {}, not a tensor", o.kind())));
        };
        let a = args.as_seq().unwrap_or(&[]);
        match o.call_target() {
            Some(("torch._utils", "_rebuild_parameter")) => {
                let inner = a.first().ok_or_else(|| self.bad(format!("`{name}`: empty _rebuild_parameter")))?;
                self.tensor(name, inner)
            }
            Some(("torch._utils", "_rebuild_tensor_v2")) => {
                if a.len() < 4 {
                    return Err(self.bad(format!("`{name}`: _rebuild_tensor_v2 with {} args", a.len())));
                }
                let Obj::PersId(pid) = &a[0] else {
                    return Err(self.bad(format!("`{name}`: storage is not a persistent id")));
                };
                let storage = self.storage(pid)?;
                let offset = a[1].as_int().ok_or_else(|| self.bad(format!("`{name}`: bad storage offset")))?;
                let ints = |o: &Obj| -> Option<Vec<i64>> { o.as_seq()?.iter().map(|d| d.as_int()).collect() };
                let size = ints(&a[2]).ok_or_else(|| self.bad(format!("`{name}`: bad size")))?;
                let stride = ints(&a[3]).ok_or_else(|| self.bad(format!("`{name}`: bad stride")))?;
                if size.len() != stride.len() || size.iter().chain(&stride).any(|&v| v < 0) || offset < 0 {
                    return Err(self.bad(format!("`{name}`: inconsistent size {size:?} / stride {stride:?}")));
                }
                let numel = storage.size()[0];
                let empty = size.contains(&0);
                let last = offset + size.iter().zip(&stride).map(|(s, st)| (s - 1).max(0) * st).sum::<i64>();
                if !empty && last >= numel {
                    return Err(self.bad(format!(
                        "`{name}`: view {size:?} stride {stride:?} offset {offset} reaches past its {numel}-element storage"
                    )));
                }
                if empty {
                    return Ok(Tensor::zeros(size.as_slice(), (storage.kind(), tch::Device::Cpu)));
                }
                Ok(storage.as_strided(size.as_slice(), stride.as_slice(), offset).contiguous())
            }
            _ => Err(self.bad(format!("`{name}` is a {}, not a tensor", o.kind()))),
        }
    }
}

/// Is `o` a dict whose values are all tensors (a state dict)?
fn is_state_dict(o: &Obj) -> bool {
    match o {
        Obj::Dict(items) => {
            !items.is_empty()
                && items.iter().all(|(_, v)| {
                    matches!(v.call_target(), Some(("torch._utils", "_rebuild_tensor_v2" | "_rebuild_parameter")))
                })
        }
        _ => false,
    }
}

/// Reads the state dict of a zip `.pt` (bare, or nested under `state_dict`,
/// `model_state_dict` or `model`). Keys are returned as stored (prefix stripping is the
/// caller's, see [`super::strip_prefixes`]).
pub fn read(path: &Path) -> Result<BTreeMap<String, Tensor>, CheckpointError> {
    let file = std::fs::File::open(path).map_err(|e| CheckpointError::Io { path: path.to_path_buf(), source: e })?;
    let zip = zip::ZipArchive::new(file).map_err(|e| CheckpointError::Invalid {
        path: path.to_path_buf(),
        msg: format!("not a readable zip ({e}): truncated or corrupt .pt file; re-download it"),
    })?;
    let pkl = zip.file_names().find(|n| n.ends_with("/data.pkl") || *n == "data.pkl").map(str::to_string).ok_or_else(
        || CheckpointError::Invalid {
            path: path.to_path_buf(),
            msg: "zip has no data.pkl: not a torch.save checkpoint (TorchScript archives are not supported)".into(),
        },
    )?;
    let prefix = pkl.strip_suffix("data.pkl").expect("found by suffix").to_string();
    let mut r = Reader { path, zip, prefix, storages: HashMap::new() };
    if let Ok(bo) = r.member("byteorder") {
        if bo.trim_ascii() != b"little" {
            return Err(r.bad(format!("byteorder {:?} is not supported (little only)", String::from_utf8_lossy(&bo))));
        }
    }
    let data = r.member("data.pkl")?;
    let root = Pickle::parse(&data, &STATE_DICT_ALLOW).and_then(|p| p.resolve()).map_err(|e| r.bad(e.to_string()))?;
    let sd = if is_state_dict(&root) {
        &root
    } else {
        ["state_dict", "model_state_dict", "model"]
            .iter()
            .find_map(|k| root.get(k).filter(|v| is_state_dict(v)))
            .ok_or_else(|| {
                r.bad(format!(
                    "no state dict found: the pickle is a {} that is neither a dict of tensors nor has one under \
                     `state_dict`, `model_state_dict` or `model`",
                    root.kind()
                ))
            })?
    };
    let Obj::Dict(items) = sd else { unreachable!("is_state_dict checked") };
    let mut out = BTreeMap::new();
    for (k, v) in items {
        let name = k.as_text().ok_or_else(|| r.bad(format!("state-dict key {k:?} is not a str")))?.to_string();
        let t = r.tensor(&name, v)?;
        if out.insert(name.clone(), t).is_some() {
            return Err(r.bad(format!("duplicate key `{name}`")));
        }
    }
    Ok(out)
}
