//! Sharding along the data axis: one data-parallel stage (Υ, clean evaluation, a pointwise
//! attack) becomes N shard stages over contiguous image ranges plus a merge stage that keeps the
//! original stage's name and outputs, so evaluation tables, reports and `why` do not change.
//!
//! Why shards are whole batches: a stage walks its set in batches of `eval.batch_size`, and
//! libtorch kernels (and the per-batch seeds of the attacks) may give different bits for the same
//! image in a different batch. A shard that starts on a batch boundary runs exactly the batches
//! the unsharded stage runs, so its per-sample results are byte-identical; the merge then
//! concatenates them and applies the *same* reductions to the concatenated tensors as the
//! unsharded stage does, so the merged outputs and metrics are bit-identical too. The set size is
//! not known when the DAG is built (it is the output of an upstream stage), so a shard carries
//! its index, the shard count and the batch size, and the worker computes its range at run time
//! ([`ShardSpec::range`]); `batch_size` is a key param of shard stages for that reason.
//!
//! W-FGSM, W-PGD and W-PGD-budget are never sharded: their W2 step normalises the gradient over
//! the whole set, which couples every image to every other one.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The key param that marks a shard stage (next to the stage kind's own params).
pub const SHARD_PARAM: &str = "shard";

/// Stage kind of merge stages.
pub const MERGE_ID: &str = "merge";

/// Which part of the data a shard stage covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardSpec {
    /// 0-based shard index, `< count`.
    pub index: u32,
    /// Number of shards of the stage.
    pub count: u32,
    /// The batch size shards are aligned to (`eval.batch_size`).
    pub batch_size: i64,
}

impl ShardSpec {
    /// `[start, end)` of this shard in a set of `n` images: the `ceil(n / batch_size)` batches
    /// are split into `count` contiguous runs of ⌊b/count⌋ or ⌈b/count⌉ batches (earlier shards
    /// take the shorter runs), so only the last shard ends on a partial batch. With fewer
    /// batches than shards, some shards are empty.
    pub fn range(&self, n: i64) -> (i64, i64) {
        let bs = self.batch_size.max(1);
        let batches = (n.max(0) + bs - 1) / bs;
        let count = i64::from(self.count.max(1));
        let b0 = i64::from(self.index) * batches / count;
        let b1 = (i64::from(self.index) + 1) * batches / count;
        ((b0 * bs).min(n.max(0)), (b1 * bs).min(n.max(0)))
    }

    /// Index of the first batch of the shard in the whole set (for per-batch seeds).
    pub fn first_batch(&self, n: i64) -> i64 {
        self.range(n).0 / self.batch_size.max(1)
    }

    /// Checks the spec (a hand-edited job or a bad config would otherwise give odd ranges).
    pub fn validate(&self) -> Result<(), String> {
        if self.count == 0 || self.index >= self.count {
            return Err(format!("shard {} of {}: the index must be below the count", self.index, self.count));
        }
        if self.batch_size < 1 {
            return Err(format!("shard batch_size must be >= 1 (got {})", self.batch_size));
        }
        Ok(())
    }
}

/// Name of shard `index` (0-based) of `count` of the stage `name`: `NAME.shard-1-of-3`.
pub fn shard_name(name: &str, index: u32, count: u32) -> String {
    format!("{name}.shard-{}-of-{count}", index + 1)
}

/// Splits a job's params into the stage kind's own params and the shard spec, if any.
pub fn split_params(params: &Value) -> Result<(Value, Option<ShardSpec>), String> {
    let mut own = params.clone();
    let spec = match own.as_object_mut().and_then(|m| m.remove(SHARD_PARAM)) {
        None => None,
        Some(v) => {
            let s: ShardSpec = serde_json::from_value(v).map_err(|e| format!("bad `{SHARD_PARAM}` param: {e}"))?;
            s.validate()?;
            Some(s)
        }
    };
    Ok((own, spec))
}

/// Params of a merge stage: which stage kind it merges, how many shards, and that kind's params
/// (so the merged metrics can name the attack, loss, δ, … exactly as the unsharded stage does).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeParams {
    /// `upsilon`, `clean` or `attack`.
    pub of: String,
    /// That kind's implementation version: the merge runs the kind's reductions, so a version
    /// bump of the kind must also change the merge's key (even when the shards' bytes do not).
    pub of_version: u32,
    pub shards: u32,
    /// The merged stage kind's params (without the shard spec).
    pub params: Value,
}

/// Input slot of output `output` of shard `index` in a merge stage: `grad_norms.0`.
pub fn merge_slot(output: &str, index: u32) -> String {
    format!("{output}.{index}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(index: u32, count: u32, batch_size: i64) -> ShardSpec {
        ShardSpec { index, count, batch_size }
    }

    #[test]
    fn ranges_tile_the_set_on_batch_boundaries() {
        for n in [0i64, 1, 7, 16, 100, 101, 1000] {
            for bs in [1i64, 3, 16, 256] {
                for count in 1..=5u32 {
                    let mut next = 0;
                    for i in 0..count {
                        let (s, e) = spec(i, count, bs).range(n);
                        assert_eq!(s, next, "n={n} bs={bs} {i}/{count}");
                        assert!(e >= s);
                        assert!(s % bs == 0, "shard starts on a batch boundary");
                        assert!(e == n || e % bs == 0, "only the last shard ends on a partial batch");
                        next = e;
                    }
                    assert_eq!(next, n, "shards cover the set: n={n} bs={bs} count={count}");
                }
            }
        }
    }

    #[test]
    fn uneven_split_and_empty_shards() {
        // 100 images in batches of 16: 7 batches, 3 shards of 2, 2 and 3 batches.
        let r: Vec<_> = (0..3).map(|i| spec(i, 3, 16).range(100)).collect();
        assert_eq!(r, vec![(0, 32), (32, 64), (64, 100)]);
        assert_eq!(spec(2, 3, 16).first_batch(100), 4);
        // One batch, three shards: two are empty.
        let r: Vec<_> = (0..3).map(|i| spec(i, 3, 256).range(100)).collect();
        assert_eq!(r, vec![(0, 0), (0, 0), (0, 100)]);
    }

    #[test]
    fn params_split_and_validate() {
        let p = serde_json::json!({"loss": "ce", "shard": {"index": 1, "count": 3, "batch_size": 8}});
        let (own, s) = split_params(&p).unwrap();
        assert_eq!(own, serde_json::json!({"loss": "ce"}));
        assert_eq!(s, Some(spec(1, 3, 8)));
        assert_eq!(split_params(&own).unwrap().1, None);
        let bad = serde_json::json!({"shard": {"index": 3, "count": 3, "batch_size": 8}});
        assert!(split_params(&bad).unwrap_err().contains("index"));
        assert_eq!(shard_name("clean.pretrained", 0, 3), "clean.pretrained.shard-1-of-3");
    }
}
