//! `wdro.toml`: the typed run configuration, `--set` overrides, and errors that name the key,
//! the allowed values and the closest match.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::params::{Arch, AttackKind, DatasetFormat, Delta, L2WInfProj, LinfW2Proj, Loss, Norm, TrainParams, Variant};

/// A config problem, one line: names the key and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {msg}")]
    Parse { path: String, msg: String },
    #[error("--set {arg}: {msg}")]
    Set { arg: String, msg: String },
    #[error("config: {0}")]
    Invalid(String),
    #[error("config {path}: cannot read it ({source}); pass an existing file with --config")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The whole run configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub run: RunCfg,
    /// Named `fetch` stages: `[fetch.NAME] sources = [...], digest = "sha256:…"`.
    #[serde(default)]
    pub fetch: BTreeMap<String, FetchCfg>,
    #[serde(default)]
    pub data: Option<DataCfg>,
    #[serde(default)]
    pub model: Option<ModelCfg>,
    #[serde(default)]
    pub upsilon: Option<UpsilonCfg>,
    #[serde(default)]
    pub attacks: Option<AttacksCfg>,
    #[serde(default)]
    pub finetune: Option<FinetuneCfg>,
    #[serde(default)]
    pub eval: EvalCfg,
    /// `[shard]`: split data-parallel stages into shards along the data axis (default: whole;
    /// then not written, so unsharded configs render and digest as before).
    #[serde(default, skip_serializing_if = "ShardCfg::is_whole")]
    pub shard: ShardCfg,
    /// CI gates, `metric = ">= 0.45"` (see `wdro eval --gate`).
    #[serde(default)]
    pub gates: BTreeMap<String, String>,
    /// A remote cache shared with a team (`--remote URL` overrides the URL, `--no-remote` ignores it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteCfg>,
    /// `[slurm]`: resources of the jobs `wdro run --executor slurm` submits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm: Option<SlurmCfg>,
}

/// `[slurm]`: partition, per-stage-kind resources and extra `#SBATCH` lines.
///
/// ```toml
/// [slurm]
/// partition = "gpu"
/// retries = 2
/// extra = ["#SBATCH --account=lab"]
/// [slurm.kinds.attack]
/// gpus = 1
/// cpus = 8
/// mem = "32G"
/// time = "04:00:00"
/// ```
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmCfg {
    #[serde(default)]
    pub partition: Option<String>,
    /// Resubmissions of a failed or cancelled task before the run fails.
    #[serde(default = "slurm_retries")]
    pub retries: u32,
    /// Extra lines for every job script (`#SBATCH --account=…`, `module load …`).
    #[serde(default)]
    pub extra: Vec<String>,
    /// Stage kind (`fetch`, `dataset`, `attack`, …) → resources; unset fields use the defaults.
    #[serde(default)]
    pub kinds: BTreeMap<String, SlurmKindCfg>,
    /// `wdro` binary the jobs run (default: the submitting binary's path).
    #[serde(default)]
    pub wdro: Option<String>,
}

/// Resources of one stage kind's jobs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmKindCfg {
    #[serde(default)]
    pub partition: Option<String>,
    #[serde(default)]
    pub gpus: Option<u32>,
    #[serde(default)]
    pub cpus: Option<u32>,
    /// `--mem`, e.g. `16G` or `4000M`.
    #[serde(default)]
    pub mem: Option<String>,
    /// `--time`, e.g. `02:00:00`.
    #[serde(default)]
    pub time: Option<String>,
    #[serde(default)]
    pub extra: Vec<String>,
}

fn slurm_retries() -> u32 {
    2
}

/// `[remote]`: where the team's shared cache lives and how this machine uses it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteCfg {
    /// `file:///shared/dir`, `http(s)://host/path` (WebDAV) or `s3://bucket/prefix` (endpoint,
    /// region and credentials from the standard AWS environment and ~/.aws files).
    pub url: String,
    /// `read-write` (pull hits, push results) or `read-only` (CI forks, untrusted machines).
    #[serde(default)]
    pub mode: RemoteModeCfg,
    /// What to download for remote hits: `toplevel` (the final results), `minimal` (only what a
    /// computing stage reads) or `all`.
    #[serde(default)]
    pub download: RemoteDownloadCfg,
    /// Transfers in flight at once.
    #[serde(default = "remote_jobs")]
    pub jobs: usize,
    /// Take a lease on the remote before computing a stage, so that concurrent overlapping runs
    /// compute each shared stage once (read-write remotes only).
    #[serde(default = "yes")]
    pub leases: bool,
    /// Lease time-to-live in seconds; the holder renews every third of it.
    #[serde(default = "lease_ttl")]
    pub lease_ttl_s: f64,
    /// Extra seconds after a lease's expiry before it counts as stale (default: the TTL).
    #[serde(default)]
    pub lease_grace_s: Option<f64>,
    /// How often a run waiting for someone else's lease polls the remote, in seconds.
    #[serde(default = "lease_poll")]
    pub lease_poll_s: f64,
}

fn lease_ttl() -> f64 {
    60.0
}

fn lease_poll() -> f64 {
    2.0
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RemoteModeCfg {
    #[default]
    ReadWrite,
    ReadOnly,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RemoteDownloadCfg {
    Minimal,
    #[default]
    Toplevel,
    All,
}

fn remote_jobs() -> usize {
    8
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunCfg {
    #[serde(default = "default_name")]
    pub name: String,
    /// `auto`, `cpu`, `cuda`.
    #[serde(default = "auto")]
    pub device: String,
    /// Cache directory (relative paths are relative to the working directory).
    #[serde(default = "default_cache")]
    pub cache_dir: String,
    /// Torch stages running at once (each uses all CPU threads or one GPU).
    #[serde(default = "one_usize")]
    pub max_workers: usize,
    /// Never touch the network: network fetches fail at once with a hint.
    #[serde(default)]
    pub offline: bool,
}

impl Default for RunCfg {
    fn default() -> Self {
        RunCfg { name: default_name(), device: auto(), cache_dir: default_cache(), max_workers: 1, offline: false }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchCfg {
    pub sources: Vec<String>,
    #[serde(default)]
    pub digest: Option<String>,
}

/// Data sets: which fetched files hold the train and test splits.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataCfg {
    pub format: DatasetFormat,
    /// Input slot → fetch name, e.g. `{ images = "train_images", labels = "train_labels" }`.
    /// Absent for evaluation-only configs.
    #[serde(default)]
    pub train: Option<BTreeMap<String, String>>,
    pub test: BTreeMap<String, String>,
    /// Evaluate on the first N test images (file order); 0 = all.
    #[serde(default)]
    pub test_limit: u64,
    /// Use only the first N training images (file order); 0 = all. For quick runs and tests.
    #[serde(default)]
    pub train_limit: u64,
    /// PNG folders: file-name prefix to keep (e.g. `cifar10_`).
    #[serde(default)]
    pub prefix: String,
    /// Validation hold-out for fine-tuning (spec §8.5), seeded and stratified.
    #[serde(default = "val_fraction")]
    pub val_fraction: f64,
    /// Seed of the validation draw. Defaults to 1 so that, with the default Υ subset
    /// (fraction 0.1, seed 0), validation and Υ use different images (spec §8.5: separate subsets).
    #[serde(default = "one_u64")]
    pub val_seed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelCfg {
    /// `train`, `robustbench:NAME`, `https://…`, `file:PATH`.
    pub source: String,
    /// Architecture; optional for `robustbench:` names (taken from the registry).
    #[serde(default)]
    pub arch: Option<Arch>,
    /// Pin for downloaded or local checkpoints: `sha256:…` or `blake3:…`.
    #[serde(default)]
    pub digest: Option<String>,
    /// Threat track for RobustBench names: `linf` or `l2`.
    #[serde(default)]
    pub threat: Option<Norm>,
    /// Training settings for `source = "train"`.
    #[serde(default)]
    pub train: Option<TrainParams>,
    /// A local copy of the checkpoint, tried before the download (offline use, air-gapped
    /// clusters); verified against the same pin, so it shares the cache key.
    #[serde(default)]
    pub file: Option<String>,
}

/// Υ estimation (spec §2.6).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpsilonCfg {
    /// Fraction of the training set (P25: 0.1).
    #[serde(default = "tenth")]
    pub fraction: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "upsilon_losses")]
    pub losses: Vec<Loss>,
    /// Also compute Υ on the evaluation (test) set, the P23 protocol and Figure 7.1's reference.
    #[serde(default = "yes")]
    pub on_test: bool,
}

/// The evaluation attacks (spec §6.2).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttacksCfg {
    /// Image norm of the threat: `linf` or `l2`.
    pub norm: Norm,
    #[serde(default = "redlr")]
    pub loss: Loss,
    /// δ grid, e.g. `["2/255", "4/255", "8/255"]`.
    pub deltas: Vec<Delta>,
    /// Wasserstein orders: 1 = W∞ (pointwise), 2 = W2.
    #[serde(default = "both_q")]
    pub q: Vec<u8>,
    /// Distributional attacks over the grid.
    #[serde(default = "default_kinds")]
    pub kinds: Vec<AttackKind>,
    /// Pointwise attacks for the pointwise robust accuracy, at `pointwise_eps`.
    #[serde(default)]
    pub pointwise: Vec<AttackKind>,
    #[serde(default)]
    pub pointwise_eps: Option<Delta>,
    #[serde(default = "itr50")]
    pub itr: u32,
    #[serde(default = "ratio")]
    pub ratio: f64,
    #[serde(default = "ball")]
    pub l2_w_inf_proj: L2WInfProj,
    #[serde(default = "clip")]
    pub linf_w2_proj: LinfW2Proj,
    #[serde(default = "r1")]
    pub budget_reading: String,
    #[serde(default)]
    pub base_eps: f64,
    #[serde(default)]
    pub budget_cap: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "one_u32")]
    pub restarts: u32,
}

/// W-DRO TRADES fine-tuning (spec §4–§5); defaults are the spec's.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneCfg {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "variant_a")]
    pub variant: Variant,
    #[serde(default = "sigma")]
    pub sigma: f64,
    #[serde(default = "relative")]
    pub sigma_mode: String,
    #[serde(default = "r1a")]
    pub reading: String,
    #[serde(default = "ten_u32")]
    pub epochs: u32,
    #[serde(default = "lr")]
    pub lr: f64,
    #[serde(default = "cosine")]
    pub lr_schedule: String,
    #[serde(default = "momentum")]
    pub momentum: f64,
    #[serde(default = "wd")]
    pub weight_decay: f64,
    #[serde(default = "bs128")]
    pub batch_size: i64,
    #[serde(default = "beta")]
    pub beta: f64,
    /// Training budget δ (default: the attacks' largest δ).
    #[serde(default)]
    pub delta: Option<Delta>,
    #[serde(default = "two_u8")]
    pub q: u8,
    #[serde(default = "ce")]
    pub budget_loss: Loss,
    #[serde(default = "ten_u32")]
    pub inner_steps: u32,
    #[serde(default)]
    pub keep_pointwise_term: bool,
    #[serde(default = "three_pass")]
    pub trades_forward: String,
    /// `crop-flip` for 32×32 RGB, `none` otherwise; default chosen from the data format.
    #[serde(default)]
    pub augmentation: Option<String>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "best_val")]
    pub select: String,
    #[serde(default = "ckpt_every")]
    pub checkpoint_every: u32,
    /// δ of the per-epoch W2/W∞ monitoring attacks (default: the training δ).
    #[serde(default)]
    pub monitor_delta: Option<Delta>,
    #[serde(default = "monitor_itr")]
    pub monitor_itr: u32,
}

/// Execution-only evaluation settings: never part of a stage key.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalCfg {
    #[serde(default = "bs256")]
    pub batch_size: i64,
    /// Torch threads per worker (0 = libtorch's default).
    #[serde(default)]
    pub threads: u32,
}

/// `[shard]`: how many shards each data-parallel stage kind is split into along the data axis
/// (see `crate::shard`). 1 (the default) keeps the stage whole, with today's stage keys; N > 1
/// gives N shard stages over whole batches of `eval.batch_size` plus a merge stage that keeps
/// the stage's name and outputs and is bit-identical to the unsharded result.
///
/// ```toml
/// [shard]
/// upsilon = 4     # every upsilon.M.<set>.<loss>
/// pointwise = 4   # attack.M.pgd / apgd-ce / apgd-dlr
/// clean = 2       # clean.M
/// ```
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardCfg {
    #[serde(default = "one_u32")]
    pub upsilon: u32,
    #[serde(default = "one_u32")]
    pub pointwise: u32,
    #[serde(default = "one_u32")]
    pub clean: u32,
    /// Only here to refuse it with the reason: the W-attacks cannot be sharded.
    #[serde(default = "one_u32", skip_serializing)]
    pub distributional: u32,
}

impl ShardCfg {
    /// Nothing is sharded.
    pub fn is_whole(&self) -> bool {
        self.upsilon == 1 && self.pointwise == 1 && self.clean == 1
    }
}

impl Default for ShardCfg {
    fn default() -> Self {
        ShardCfg { upsilon: 1, pointwise: 1, clean: 1, distributional: 1 }
    }
}

/// The most shards of one stage: more would only add merge inputs, never speed.
pub const MAX_SHARDS: u32 = 1024;

impl Default for EvalCfg {
    fn default() -> Self {
        EvalCfg { batch_size: 256, threads: 0 }
    }
}

fn default_name() -> String {
    "wdro".into()
}
fn auto() -> String {
    "auto".into()
}
fn default_cache() -> String {
    ".wdro/cache".into()
}
fn one_usize() -> usize {
    1
}
fn one_u64() -> u64 {
    1
}
fn one_u32() -> u32 {
    1
}
fn two_u8() -> u8 {
    2
}
fn ten_u32() -> u32 {
    10
}
fn itr50() -> u32 {
    50
}
fn monitor_itr() -> u32 {
    10
}
fn ckpt_every() -> u32 {
    50
}
fn ratio() -> f64 {
    1.875
}
fn tenth() -> f64 {
    0.1
}
fn val_fraction() -> f64 {
    0.1
}
fn yes() -> bool {
    true
}
fn redlr() -> Loss {
    Loss::Redlr
}
fn ce() -> Loss {
    Loss::Ce
}
fn upsilon_losses() -> Vec<Loss> {
    vec![Loss::Ce, Loss::Redlr]
}
fn both_q() -> Vec<u8> {
    vec![1, 2]
}
fn default_kinds() -> Vec<AttackKind> {
    vec![AttackKind::WFgsm, AttackKind::WPgd, AttackKind::WPgdBudget]
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
fn r1a() -> String {
    "R1a".into()
}
fn variant_a() -> Variant {
    Variant::A
}
fn sigma() -> f64 {
    0.01
}
fn relative() -> String {
    "relative".into()
}
fn lr() -> f64 {
    0.01
}
fn cosine() -> String {
    "cosine".into()
}
fn momentum() -> f64 {
    0.9
}
fn wd() -> f64 {
    5e-4
}
fn bs128() -> i64 {
    128
}
fn bs256() -> i64 {
    256
}
fn beta() -> f64 {
    6.0
}
fn three_pass() -> String {
    "three_pass".into()
}
fn best_val() -> String {
    "best_val".into()
}

impl Config {
    /// Reads a config file and applies `--set` overrides (`stage.key=value`, value as a TOML
    /// literal, else a string).
    pub fn load(path: &Path, sets: &[String]) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::from_toml_str(&text, &path.display().to_string(), sets)
    }

    pub fn from_toml_str(text: &str, origin: &str, sets: &[String]) -> Result<Config, ConfigError> {
        let mut doc: toml::Value = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: origin.into(), msg: one_line(&e.to_string()) })?;
        for s in sets {
            apply_set(&mut doc, s)?;
        }
        let cfg: Config = Config::deserialize(doc.clone())
            .map_err(|e| ConfigError::Parse { path: origin.into(), msg: explain_serde(&e.to_string(), &doc) })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Cross-field checks serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !["auto", "cpu", "cuda"].contains(&self.run.device.as_str()) && !self.run.device.starts_with("cuda:") {
            return bad(format!("run.device = {:?}: allowed values are auto, cpu, cuda, cuda:N", self.run.device));
        }
        if self.run.max_workers == 0 {
            return bad("run.max_workers must be >= 1".into());
        }
        if self.shard.distributional != 1 {
            return bad(format!(
                "shard.distributional = {}: W-FGSM, W-PGD and W-PGD-budget couple all images through the global W2 normalisation, so they always run whole; remove the key (shard.pointwise shards PGD/APGD)",
                self.shard.distributional
            ));
        }
        for (k, v) in
            [("upsilon", self.shard.upsilon), ("pointwise", self.shard.pointwise), ("clean", self.shard.clean)]
        {
            if v == 0 || v > MAX_SHARDS {
                return bad(format!("shard.{k} = {v}: must be between 1 (whole) and {MAX_SHARDS}"));
            }
        }
        if self.eval.batch_size < 1 {
            return bad(format!("eval.batch_size = {}: must be >= 1", self.eval.batch_size));
        }
        if let Some(r) = &self.remote {
            let ok = ["file:", "http://", "https://", "s3://"].iter().any(|p| r.url.starts_with(p));
            if !ok {
                return bad(format!(
                    "remote.url = {:?}: use file:///shared/dir, https://host/path or s3://bucket/prefix",
                    r.url
                ));
            }
            if r.jobs == 0 {
                return bad("remote.jobs must be >= 1".into());
            }
            for (name, v) in [
                ("lease_ttl_s", Some(r.lease_ttl_s)),
                ("lease_grace_s", r.lease_grace_s),
                ("lease_poll_s", Some(r.lease_poll_s)),
            ] {
                if let Some(v) = v {
                    if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
                        return bad(format!("remote.{name} = {v}: use a number of seconds above 0 (e.g. 60)"));
                    }
                }
            }
        }
        for (name, f) in &self.fetch {
            if f.sources.is_empty() {
                return bad(format!("fetch.{name}.sources is empty: give at least one URL or file: path"));
            }
        }
        if let Some(d) = &self.data {
            for (split, m) in d.train.iter().map(|m| ("train", m)).chain([("test", &d.test)]) {
                for (slot, fetch) in m {
                    if !self.fetch.contains_key(fetch) {
                        return bad(format!(
                            "data.{split}.{slot} = {fetch:?} names no [fetch.{fetch}] section{}",
                            closest(fetch, self.fetch.keys().map(|s| s.as_str()))
                        ));
                    }
                }
            }
            if !(0.0..1.0).contains(&d.val_fraction) {
                return bad(format!("data.val_fraction = {}: must be in [0, 1)", d.val_fraction));
            }
            if let (Some(u), Some(_)) = (&self.upsilon, self.finetune.as_ref().filter(|f| f.enabled)) {
                if u.fraction == d.val_fraction && u.seed == d.val_seed {
                    return bad(format!(
                        "the validation split and the Υ subset would be the same images (fraction {}, seed {}): change data.val_seed or upsilon.seed",
                        u.fraction, u.seed
                    ));
                }
            }
        }
        if let Some(u) = &self.upsilon {
            if !(u.fraction > 0.0 && u.fraction <= 1.0) {
                return bad(format!("upsilon.fraction = {}: must be in (0, 1]", u.fraction));
            }
        }
        if let Some(a) = &self.attacks {
            if a.deltas.is_empty() {
                return bad("attacks.deltas is empty: give at least one budget, e.g. [\"8/255\"]".into());
            }
            if let Some(q) = a.q.iter().find(|q| **q != 1 && **q != 2) {
                return bad(format!("attacks.q contains {q}: allowed values are 1 (W∞) and 2 (W2)"));
            }
            if a.itr == 0 {
                return bad("attacks.itr must be >= 1".into());
            }
            if !a.pointwise.is_empty() && a.pointwise_eps.is_none() {
                return bad(
                    "attacks.pointwise is set but attacks.pointwise_eps is missing (e.g. \"8/255\" or 0.5)".into()
                );
            }
            if !["R1", "R2"].contains(&a.budget_reading.as_str()) {
                return bad(format!("attacks.budget_reading = {:?}: allowed values are R1, R2", a.budget_reading));
            }
        }
        if let Some(f) = &self.finetune {
            let check = |k: &str, v: &str, allowed: &[&str]| -> Result<(), ConfigError> {
                if allowed.contains(&v) {
                    Ok(())
                } else {
                    Err(ConfigError::Invalid(format!(
                        "finetune.{k} = {v:?}: allowed values are {}{}",
                        allowed.join(", "),
                        closest(v, allowed.iter().copied())
                    )))
                }
            };
            check("reading", &f.reading, &["R1a", "R1b", "R2", "R3"])?;
            check("lr_schedule", &f.lr_schedule, &["cosine", "step"])?;
            check("sigma_mode", &f.sigma_mode, &["relative", "absolute"])?;
            check("trades_forward", &f.trades_forward, &["three_pass", "two_pass"])?;
            check("select", &f.select, &["best_val", "last"])?;
            if let Some(a) = &f.augmentation {
                check("augmentation", a, &["crop-flip", "none"])?;
            }
            if f.q != 1 && f.q != 2 {
                return bad(format!("finetune.q = {}: allowed values are 1 (W∞) and 2 (W2)", f.q));
            }
            if f.enabled && self.data.as_ref().and_then(|d| d.train.as_ref()).is_none() {
                return bad(
                    "finetune.enabled = true needs training data: set data.train, or finetune.enabled = false".into()
                );
            }
        }
        if let Some(m) = &self.model {
            let s = m.source.as_str();
            let known = s == "train"
                || s.starts_with("robustbench:")
                || s.starts_with("http://")
                || s.starts_with("https://")
                || s.starts_with("file:");
            if !known {
                return bad(format!("model.source = {s:?}: use train, robustbench:NAME, https://…, or file:PATH"));
            }
            if s == "train" && m.train.is_none() {
                return bad("model.source = \"train\" needs a [model.train] section (epochs, lr, momentum, weight_decay, batch_size, seed)".into());
            }
            if s != "train" && !s.starts_with("robustbench:") && m.arch.is_none() {
                return bad(format!("model.arch is required for model.source = {s:?}"));
            }
        }
        Ok(())
    }

    /// The resolved config as TOML (for `wdro config show`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

/// Applies one `a.b.c=value` override to the TOML document.
fn apply_set(doc: &mut toml::Value, arg: &str) -> Result<(), ConfigError> {
    let err = |msg: String| ConfigError::Set { arg: arg.to_string(), msg };
    let (path, raw) = arg.split_once('=').ok_or_else(|| err("expected KEY=VALUE, e.g. finetune.lr=0.02".into()))?;
    let parts: Vec<&str> = path.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(err(format!("bad key {path:?}")));
    }
    let value = parse_literal(raw.trim());
    let mut cur = doc;
    for (i, p) in parts.iter().enumerate() {
        let table = cur.as_table_mut().ok_or_else(|| err(format!("{} is not a table", parts[..i].join("."))))?;
        if i + 1 == parts.len() {
            table.insert(p.to_string(), value);
            return Ok(());
        }
        cur = table.entry(p.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
    }
    unreachable!("parts is non-empty")
}

/// `0.02` → float, `[1, 2]` → array, `true` → bool, anything else → string.
fn parse_literal(raw: &str) -> toml::Value {
    let wrapped = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&wrapped) {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Turns serde's "unknown field `lrr`, expected one of `lr`, …" into a message with the
/// closest match.
fn explain_serde(msg: &str, _doc: &toml::Value) -> String {
    let msg = one_line(msg);
    if let Some(rest) = msg.split("unknown field `").nth(1) {
        let bad = rest.split('`').next().unwrap_or("");
        let expected: Vec<&str> = rest.split('`').skip(2).step_by(2).collect();
        return format!(
            "unknown key `{bad}`; allowed keys here: {}{}",
            expected.join(", "),
            closest(bad, expected.iter().copied())
        );
    }
    if let Some(rest) = msg.split("unknown variant `").nth(1) {
        let bad = rest.split('`').next().unwrap_or("");
        let expected: Vec<&str> = rest.split('`').skip(2).step_by(2).collect();
        return format!(
            "unknown value `{bad}`; allowed values: {}{}",
            expected.join(", "),
            closest(bad, expected.iter().copied())
        );
    }
    msg
}

/// `; did you mean `x`?` for the nearest candidate within a small edit distance.
pub fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> String {
    let best = candidates.map(|c| (levenshtein(word, c), c)).min();
    match best {
        Some((d, c)) if d <= 3.max(word.len() / 3) && d > 0 => format!("; did you mean `{c}`?"),
        _ => String::new(),
    }
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[fetch.a]
sources = ["file:x"]
[finetune]
enabled = false
"#;

    #[test]
    fn set_overrides_and_types() {
        let c = Config::from_toml_str(MIN, "t", &["finetune.lr=0.02".into(), "run.name=hello".into()]).unwrap();
        assert_eq!(c.finetune.unwrap().lr, 0.02);
        assert_eq!(c.run.name, "hello");
    }

    #[test]
    fn unknown_key_names_closest() {
        let e = Config::from_toml_str(MIN, "t", &["finetune.lrr=0.02".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown key `lrr`"), "{e}");
        assert!(e.contains("did you mean `lr`?"), "{e}");
    }

    #[test]
    fn bad_value_names_allowed() {
        let e = Config::from_toml_str(MIN, "t", &["finetune.reading=R9".into()]).unwrap_err().to_string();
        assert!(e.contains("finetune.reading") && e.contains("R1a, R1b, R2, R3"), "{e}");
        let e = Config::from_toml_str(MIN, "t", &["finetune.variant=C".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown value `C`"), "{e}");
    }

    #[test]
    fn set_syntax_errors() {
        assert!(Config::from_toml_str(MIN, "t", &["nonsense".into()]).is_err());
        assert!(Config::from_toml_str(MIN, "t", &["a..b=1".into()]).is_err());
    }

    #[test]
    fn remote_section() {
        let text = format!("{MIN}\n[remote]\nurl = \"s3://team-cache/wdro\"\nmode = \"read-only\"\n");
        let c = Config::from_toml_str(&text, "t", &[]).unwrap();
        let r = c.remote.unwrap();
        assert_eq!((r.mode, r.download, r.jobs), (RemoteModeCfg::ReadOnly, RemoteDownloadCfg::Toplevel, 8));
        assert!(r.leases && r.lease_ttl_s == 60.0 && r.lease_poll_s == 2.0 && r.lease_grace_s.is_none());
        let e = Config::from_toml_str(&text, "t", &["remote.lease_ttl_s=0".into()]).unwrap_err().to_string();
        assert!(e.contains("remote.lease_ttl_s"), "{e}");
        let e = Config::from_toml_str(&text, "t", &["remote.mode=read-mostly".into()]).unwrap_err().to_string();
        assert!(e.contains("read-write") && e.contains("read-only"), "{e}");
        let e = Config::from_toml_str(&text, "t", &["remote.url=ftp://x".into()]).unwrap_err().to_string();
        assert!(e.contains("remote.url"), "{e}");
        assert!(Config::from_toml_str(MIN, "t", &[]).unwrap().remote.is_none());
    }

    #[test]
    fn shard_section() {
        let c = Config::from_toml_str(MIN, "t", &[]).unwrap();
        assert_eq!((c.shard.upsilon, c.shard.pointwise, c.shard.clean), (1, 1, 1));
        let c = Config::from_toml_str(MIN, "t", &["shard.upsilon=4".into(), "shard.clean=2".into()]).unwrap();
        assert_eq!((c.shard.upsilon, c.shard.pointwise, c.shard.clean), (4, 1, 2));
        assert!(!c.to_toml().contains("distributional"), "the refused key is not shown");
        assert!(c.to_toml().contains("[shard]"));
        assert!(!Config::from_toml_str(MIN, "t", &[]).unwrap().to_toml().contains("[shard]"));
        let e = Config::from_toml_str(MIN, "t", &["shard.distributional=2".into()]).unwrap_err().to_string();
        assert!(e.contains("shard.distributional") && e.contains("W2 normalisation"), "{e}");
        let e = Config::from_toml_str(MIN, "t", &["shard.pointwise=0".into()]).unwrap_err().to_string();
        assert!(e.contains("shard.pointwise = 0"), "{e}");
        let e = Config::from_toml_str(MIN, "t", &["shard.wpgd=2".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown key `wpgd`") && e.contains("pointwise"), "{e}");
    }

    #[test]
    fn levenshtein_basics() {
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(closest("lrr", ["lr", "beta"].into_iter()), "; did you mean `lr`?");
    }
}
