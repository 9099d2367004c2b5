//! Canonical params. A stage's params serialize to JSON with sorted keys and shortest
//! round-trip floats, so equal params always hash equal whatever order a config wrote them in.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A flat-or-nested map of param name → JSON value, always key-sorted.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Params(pub BTreeMap<String, serde_json::Value>);

impl Params {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a param (builder style).
    pub fn with(mut self, k: &str, v: impl Serialize) -> Self {
        self.0.insert(k.to_string(), serde_json::to_value(v).expect("param serializes"));
        self
    }

    /// Builds params from any serializable struct (its fields become the params).
    pub fn from_struct(v: &impl Serialize) -> Self {
        match serde_json::to_value(v).expect("params serialize") {
            serde_json::Value::Object(m) => Params(m.into_iter().collect()),
            other => Params(BTreeMap::from([("value".to_string(), other)])),
        }
    }

    /// Canonical bytes: JSON with every object's keys sorted at every depth.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let v = serde_json::to_value(self).expect("params serialize");
        canonical_json(&v).into_bytes()
    }

    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_slice(&self.canonical_bytes()).expect("canonical json parses")
    }
}

/// JSON text with object keys sorted recursively (serde_json's `preserve_order` may be on).
pub fn canonical_json(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<_, _> = m.iter().collect();
            let parts: Vec<String> = sorted
                .into_iter()
                .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap(), canonical_json(v)))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => format!("[{}]", a.iter().map(canonical_json).collect::<Vec<_>>().join(",")),
        other => serde_json::to_string(other).unwrap(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_does_not_matter() {
        let a = Params::new().with("lr", 0.01).with("beta", 6.0);
        let b = Params::new().with("beta", 6.0).with("lr", 0.01);
        assert_eq!(a.canonical_bytes(), b.canonical_bytes());
        assert_eq!(String::from_utf8(a.canonical_bytes()).unwrap(), r#"{"beta":6.0,"lr":0.01}"#);
    }

    #[test]
    fn nested_objects_are_sorted() {
        let v: serde_json::Value = serde_json::from_str(r#"{"z":{"b":1,"a":2},"a":[{"y":1,"x":2}]}"#).unwrap();
        assert_eq!(canonical_json(&v), r#"{"a":[{"x":2,"y":1}],"z":{"a":2,"b":1}}"#);
    }
}
