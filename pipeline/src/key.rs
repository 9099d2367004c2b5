//! Stage keys: blake3 over (stage id, version, canonical declared params, input digests,
//! environment). Execution-only params never enter the key, so changing them reruns nothing.

use std::collections::BTreeMap;

use wdro_cache::{Digest, StageKey};

use crate::params::{canonical_json, Params};
use crate::stage::StageId;

/// The environment a torch stage's result depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Env {
    /// e.g. `2.13.0`.
    pub torch_version: String,
    /// `cpu` or `cuda`: results differ between them in the last bits.
    pub device_class: String,
}

impl Env {
    pub fn to_map(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("device_class".to_string(), self.device_class.clone()),
            ("torch_version".to_string(), self.torch_version.clone()),
        ])
    }
}

/// Everything that goes into a key, in one place so `why` can diff it field by field.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyMaterial {
    pub id: StageId,
    pub version: u32,
    pub params: Params,
    pub inputs: BTreeMap<String, Digest>,
    /// Empty for stages that do not use torch.
    pub env: BTreeMap<String, String>,
}

impl KeyMaterial {
    pub fn key(&self) -> StageKey {
        let doc = serde_json::json!({
            "schema": 1,
            "id": self.id.0,
            "version": self.version,
            "params": self.params.to_value(),
            "inputs": self.inputs.iter().map(|(k, v)| (k.clone(), v.to_hex())).collect::<BTreeMap<_, _>>(),
            "env": self.env,
        });
        StageKey(Digest::of_bytes(canonical_json(&doc).as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn km() -> KeyMaterial {
        KeyMaterial {
            id: StageId("attack".into()),
            version: 1,
            params: Params::new().with("delta", 0.03),
            inputs: BTreeMap::from([("model".into(), Digest::of_bytes(b"m"))]),
            env: BTreeMap::new(),
        }
    }

    #[test]
    fn every_field_changes_the_key() {
        let base = km().key();
        let mut m = km();
        m.version = 2;
        assert_ne!(m.key(), base);
        let mut m = km();
        m.params = Params::new().with("delta", 0.031);
        assert_ne!(m.key(), base);
        let mut m = km();
        m.inputs.insert("model".into(), Digest::of_bytes(b"n"));
        assert_ne!(m.key(), base);
        let mut m = km();
        m.env.insert("device_class".into(), "cuda".into());
        assert_ne!(m.key(), base);
        assert_eq!(km().key(), base);
    }
}
