//! Config → DAG: which stages a config implies, their typed params, inputs and outputs.
//!
//! Stage names (stable, used by `why`, `--force`, `--until`, reports):
//! * `fetch.<name>` — every `[fetch.*]` section, plus `fetch.checkpoint` for downloaded models;
//! * `data.train`, `data.test` — decoded tensor bundles;
//! * `subset.upsilon` — the seeded 10 % training subset for Υ (spec §2.6);
//! * `split.val` — validation hold-out (`selected`) and the fine-tuning set (`rest`) (spec §8.5);
//! * `checkpoint.pretrained` — the model under study; `finetune` — its W-DRO fine-tuned version;
//! * per model M ∈ {pretrained, finetuned}: `clean.M`, `upsilon.M.<train10|test>.<loss>`,
//!   `attack.M.<kind>.w<q>.<δ>`, `attack.M.<pointwise kind>`, and the table `eval.M`;
//! * `report` — the before/after comparison.
//!
//! With `[shard]` (see [`crate::shard`]), `clean.M`, `upsilon.M.*` and the pointwise
//! `attack.M.<kind>` become shard stages `NAME.shard-I-of-N` (same kind, params plus the shard
//! spec) and a `merge` stage that keeps the name `NAME` and its outputs.

use std::sync::Arc;

use wdro_pipeline::{InputRef, Params, Stage};

use crate::config::{AttacksCfg, Config, ConfigError};
use crate::evaluate::{CompareStage, EvaluateStage};
use crate::fetch::{FetchExec, FetchParams, FetchStage};
use crate::params::*;
use crate::shard::{merge_slot, shard_name, MergeParams, ShardSpec, MERGE_ID, SHARD_PARAM};
use crate::worker_stage::WorkerStage;

/// Versions of each stage kind's implementation: bump when results change.
pub mod versions {
    pub const DATASET: u32 = 1;
    pub const SUBSET: u32 = 1;
    pub const CHECKPOINT: u32 = 1;
    pub const CLEAN: u32 = 1;
    pub const UPSILON: u32 = 1;
    pub const ATTACK: u32 = 1;
    /// Pointwise attacks (PGD, APGD-CE/-DLR): 2 since they batch over image ranges with
    /// per-batch seeds, which makes them shardable (the W-attacks keep [`ATTACK`]).
    pub const ATTACK_POINTWISE: u32 = 2;
    pub const MERGE: u32 = 1;
    pub const FINETUNE: u32 = 1;
    pub const EVALUATE: u32 = 1;
    pub const COMPARE: u32 = 1;
}

/// How to build worker stages: resolved device and the worker binary.
#[derive(Clone, Debug)]
pub struct BuildEnv {
    /// `cpu`, `cuda` or `cuda:N`: what the worker is told.
    pub device: String,
    pub worker: std::path::PathBuf,
    /// Refuse network fetches (`--offline`).
    pub offline: bool,
}

fn input(slot: &str, stage: &str, output: &str) -> InputRef {
    InputRef { slot: slot.into(), stage: stage.into(), output: output.into() }
}

/// A file-name-safe form of δ: `8/255` → `8_255`.
pub fn delta_slug(d: Delta) -> String {
    d.pretty().replace('/', "_")
}

fn loss_name(l: Loss) -> &'static str {
    match l {
        Loss::Ce => "ce",
        Loss::Dlr => "dlr",
        Loss::Redlr => "redlr",
    }
}

fn norm_name(n: Norm) -> &'static str {
    match n {
        Norm::Linf => "linf",
        Norm::L2 => "l2",
    }
}

fn attack_name(k: AttackKind) -> &'static str {
    match k {
        AttackKind::WFgsm => "w-fgsm",
        AttackKind::WPgd => "w-pgd",
        AttackKind::WPgdBudget => "w-pgd-budget",
        AttackKind::Pgd => "pgd",
        AttackKind::ApgdCe => "apgd-ce",
        AttackKind::ApgdDlr => "apgd-dlr",
    }
}

struct Builder<'a> {
    cfg: &'a Config,
    env: &'a BuildEnv,
    stages: Vec<Arc<dyn Stage>>,
}

impl Builder<'_> {
    fn worker(
        &mut self,
        name: String,
        id: &'static str,
        version: u32,
        params: Params,
        inputs: Vec<InputRef>,
        outputs: &[&str],
    ) {
        let exec = Params::new().with("batch_size", self.cfg.eval.batch_size).with("threads", self.cfg.eval.threads);
        self.stages.push(Arc::new(WorkerStage {
            name,
            id,
            version,
            params,
            exec_params: exec,
            inputs,
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            device: self.env.device.clone(),
            worker: self.env.worker.clone(),
        }));
    }

    /// A data-parallel worker stage, whole (`shards` ≤ 1) or as `shards` shard stages plus a
    /// merge stage named `name` with the same outputs. `shard_outputs` are what a shard writes;
    /// `merge_extra` are inputs the merge reads besides the shards' outputs.
    #[allow(clippy::too_many_arguments)]
    fn sharded(
        &mut self,
        name: String,
        id: &'static str,
        version: u32,
        params: Params,
        inputs: Vec<InputRef>,
        outputs: &[&str],
        shards: u32,
        shard_outputs: &[&str],
        merge_extra: Vec<InputRef>,
    ) {
        if shards <= 1 {
            self.worker(name, id, version, params, inputs, outputs);
            return;
        }
        let mut merge_inputs = merge_extra;
        for index in 0..shards {
            let spec = ShardSpec { index, count: shards, batch_size: self.cfg.eval.batch_size };
            let sname = shard_name(&name, index, shards);
            self.worker(
                sname.clone(),
                id,
                version,
                params.clone().with(SHARD_PARAM, spec),
                inputs.clone(),
                shard_outputs,
            );
            merge_inputs.extend(shard_outputs.iter().map(|o| input(&merge_slot(o, index), &sname, o)));
        }
        let mp = MergeParams { of: id.to_string(), of_version: version, shards, params: params.to_value() };
        self.worker(name, MERGE_ID, versions::MERGE, Params::from_struct(&mp), merge_inputs, outputs);
    }

    fn fetch(
        &mut self,
        name: &str,
        sources: Vec<String>,
        digest: Option<String>,
        hint: String,
    ) -> Result<(), ConfigError> {
        let params = FetchParams::new(sources, digest.as_deref())
            .map_err(|e| ConfigError::Invalid(format!("fetch.{name}: {e}")))?;
        let exec =
            FetchExec { offline: self.env.offline || self.cfg.run.offline, hint: Some(hint), ..FetchExec::default() };
        self.stages.push(Arc::new(FetchStage::new(format!("fetch.{name}"), params, exec)));
        Ok(())
    }
}

/// Builds every stage the config implies.
pub fn build(cfg: &Config, env: &BuildEnv) -> Result<Vec<Arc<dyn Stage>>, ConfigError> {
    let mut b = Builder { cfg, env, stages: Vec::new() };
    for (name, f) in &cfg.fetch {
        let file =
            f.sources.iter().rev().find_map(|u| u.rsplit('/').next()).filter(|f| !f.is_empty()).unwrap_or("FILE");
        let keep = if f.digest.is_some() { " (same digest, same cache key)" } else { "" };
        let hint =
            format!("download it elsewhere and pass --set 'fetch.{name}.sources=[\"file:/path/to/{file}\"]'{keep}");
        b.fetch(name, f.sources.clone(), f.digest.clone(), hint)?;
    }
    let Some(data) = &cfg.data else {
        return Ok(b.stages);
    };

    // Data sets.
    let mut splits = vec![("test", &data.test, data.test_limit)];
    if let Some(train) = &data.train {
        splits.insert(0, ("train", train, data.train_limit));
    }
    for (split, slots, limit) in splits {
        let p = DatasetParams { format: data.format, split: split.into(), limit, prefix: data.prefix.clone() };
        let inputs = slots.iter().map(|(slot, f)| input(slot, &format!("fetch.{f}"), "file")).collect();
        b.worker(format!("data.{split}"), "dataset", versions::DATASET, Params::from_struct(&p), inputs, &["data"]);
    }
    let has_train = data.train.is_some();
    let upsilon = cfg.upsilon.clone();
    if has_train {
        if let Some(u) = &upsilon {
            let p = SubsetParams { fraction: u.fraction, seed: u.seed, stratified: true };
            b.worker(
                "subset.upsilon".into(),
                "subset",
                versions::SUBSET,
                Params::from_struct(&p),
                vec![input("data", "data.train", "data")],
                &["selected", "rest"],
            );
        }
    }
    let finetune = cfg.finetune.as_ref().filter(|f| f.enabled);
    if finetune.is_some() {
        let p = SubsetParams { fraction: data.val_fraction, seed: data.val_seed, stratified: true };
        b.worker(
            "split.val".into(),
            "subset",
            versions::SUBSET,
            Params::from_struct(&p),
            vec![input("data", "data.train", "data")],
            &["selected", "rest"],
        );
    }

    // The model under study.
    let Some(model) = &cfg.model else {
        return Ok(b.stages);
    };
    let arch = resolve_arch(model)?;
    let ck_inputs = if model.source == "train" {
        if !has_train {
            return Err(ConfigError::Invalid("model.source = \"train\" needs data.train".into()));
        }
        vec![input("train", "data.train", "data")]
    } else {
        let (mut sources, digest) = checkpoint_sources(model)?;
        if let Some(f) = &model.file {
            sources.insert(0, if f.contains(':') { f.clone() } else { format!("file:{f}") });
        }
        let what = model
            .source
            .strip_prefix("robustbench:")
            .map(|n| format!("{n}.pt"))
            .unwrap_or_else(|| model.source.rsplit('/').next().unwrap_or("checkpoint.pt").to_string());
        let hint = format!(
            "download {what} elsewhere and pass --set model.file=/path/to/{what} (it is verified against the same pin)"
        );
        b.fetch("checkpoint", sources, digest, hint)?;
        vec![input("file", "fetch.checkpoint", "file")]
    };
    let ckp = CheckpointParams { source: model.source.clone(), arch: arch.clone(), train: model.train.clone() };
    b.worker(
        "checkpoint.pretrained".into(),
        "checkpoint",
        versions::CHECKPOINT,
        Params::from_struct(&ckp),
        ck_inputs,
        &["model"],
    );

    let mut models = vec![("pretrained", ("checkpoint.pretrained", "model"))];
    if let Some(f) = finetune {
        let attacks = cfg.attacks.as_ref();
        let norm = attacks.map(|a| a.norm).unwrap_or(Norm::Linf);
        let delta = f
            .delta
            .or_else(|| {
                attacks.and_then(|a| {
                    a.deltas.iter().copied().fold(None, |m: Option<Delta>, d| {
                        Some(if m.is_some_and(|m| m.0 >= d.0) { m.unwrap() } else { d })
                    })
                })
            })
            .ok_or_else(|| {
                ConfigError::Invalid("finetune.delta is not set and there is no attacks.deltas to take it from".into())
            })?;
        let augmentation = f.augmentation.clone().unwrap_or_else(|| {
            if matches!(data.format, DatasetFormat::Cifar10Binary | DatasetFormat::Cifar10Python) {
                "crop-flip".into()
            } else {
                "none".into()
            }
        });
        let p = FinetuneParams {
            arch: arch.clone(),
            variant: f.variant,
            sigma: f.sigma,
            sigma_mode: f.sigma_mode.clone(),
            reading: f.reading.clone(),
            epochs: f.epochs,
            lr: f.lr,
            lr_schedule: f.lr_schedule.clone(),
            momentum: f.momentum,
            weight_decay: f.weight_decay,
            batch_size: f.batch_size,
            beta: f.beta,
            delta,
            q: f.q,
            norm,
            budget_loss: f.budget_loss,
            inner_steps: f.inner_steps,
            keep_pointwise_term: f.keep_pointwise_term,
            trades_forward: f.trades_forward.clone(),
            augmentation,
            seed: f.seed,
            select: f.select.clone(),
            checkpoint_every: f.checkpoint_every,
            monitor_delta: f.monitor_delta.unwrap_or(delta),
            monitor_itr: f.monitor_itr,
        };
        let ups = if upsilon.is_some() { "subset.upsilon" } else { "split.val" };
        let inputs = vec![
            input("model", "checkpoint.pretrained", "model"),
            input("train", "split.val", "rest"),
            input("val", "split.val", "selected"),
            input("upsilon_data", ups, "selected"),
            input("test", "data.test", "data"),
        ];
        b.worker("finetune".into(), "finetune", versions::FINETUNE, Params::from_struct(&p), inputs, &["model", "log"]);
        models.push(("finetuned", ("finetune", "model")));
    }

    // Evaluation of each model.
    for (m, (mstage, mout)) in &models {
        let mut eval_inputs = Vec::new();
        let cp = CleanParams { arch: arch.clone() };
        let cname = format!("clean.{m}");
        b.sharded(
            cname.clone(),
            "clean",
            versions::CLEAN,
            Params::from_struct(&cp),
            vec![input("model", mstage, mout), input("data", "data.test", "data")],
            &["per_sample"],
            cfg.shard.clean,
            &["per_sample"],
            vec![],
        );
        eval_inputs.push(input("clean", &cname, "summary"));

        if let Some(u) = &upsilon {
            let norm = cfg.attacks.as_ref().map(|a| a.norm).unwrap_or(Norm::Linf);
            let mut losses = u.losses.clone();
            if let Some(a) = &cfg.attacks {
                if !losses.contains(&a.loss) {
                    losses.push(a.loss);
                }
            }
            let mut sets = Vec::new();
            if has_train {
                sets.push(("train10", ("subset.upsilon", "selected")));
            }
            if u.on_test || !has_train {
                sets.push(("test", ("data.test", "data")));
            }
            for (set, (dstage, dout)) in &sets {
                for l in &losses {
                    let p = UpsilonParams { arch: arch.clone(), loss: *l, norm };
                    let name = format!("upsilon.{m}.{set}.{}", loss_name(*l));
                    b.sharded(
                        name.clone(),
                        "upsilon",
                        versions::UPSILON,
                        Params::from_struct(&p),
                        vec![input("model", mstage, mout), input("data", dstage, dout)],
                        &["grad_norms"],
                        cfg.shard.upsilon,
                        &["grad_norms"],
                        vec![],
                    );
                    eval_inputs.push(input(&format!("upsilon:{set}:{}", loss_name(*l)), &name, "summary"));
                }
            }
        }

        if let Some(a) = &cfg.attacks {
            for (kind, q, delta) in attack_grid(a) {
                let p = attack_params(a, &arch, kind, q, delta);
                let name = if is_pointwise(kind) {
                    format!("attack.{m}.{}", attack_name(kind))
                } else {
                    format!(
                        "attack.{m}.{}.w{}.{}",
                        attack_name(kind),
                        if q == 1 { "inf".to_string() } else { q.to_string() },
                        delta_slug(delta)
                    )
                };
                let inputs = vec![input("model", mstage, mout), input("data", "data.test", "data")];
                if is_pointwise(kind) {
                    // Shards write their adversarial images and the per-sample/per-batch parts
                    // the merge reduces; the merge reads the clean set for labels and the
                    // transport cost.
                    b.sharded(
                        name.clone(),
                        "attack",
                        versions::ATTACK_POINTWISE,
                        Params::from_struct(&p),
                        inputs,
                        &["adv", "curves"],
                        cfg.shard.pointwise,
                        &["adv", "parts"],
                        vec![input("data", "data.test", "data")],
                    );
                } else {
                    // W-attacks couple all images through the global W2 normalisation: whole.
                    b.worker(
                        name.clone(),
                        "attack",
                        versions::ATTACK,
                        Params::from_struct(&p),
                        inputs,
                        &["adv", "curves"],
                    );
                }
                eval_inputs.push(input(
                    &format!("attack:{}:{}:{}:{}", attack_name(kind), q, norm_name(a.norm), delta.0),
                    &name,
                    "summary",
                ));
            }
        }
        b.stages.push(Arc::new(EvaluateStage::new(
            format!("eval.{m}"),
            m.to_string(),
            versions::EVALUATE,
            eval_inputs,
        )));
    }
    if models.len() == 2 {
        b.stages.push(Arc::new(CompareStage::new(
            "report".into(),
            versions::COMPARE,
            vec![input("before", "eval.pretrained", "table"), input("after", "eval.finetuned", "table")],
        )));
    }
    Ok(b.stages)
}

fn is_pointwise(k: AttackKind) -> bool {
    matches!(k, AttackKind::Pgd | AttackKind::ApgdCe | AttackKind::ApgdDlr)
}

/// (kind, q, δ) for every evaluation attack: distributional kinds over q × δ (W-PGD-budget only
/// for q = 2, where it differs from W-PGD), pointwise kinds once at `pointwise_eps`.
pub fn attack_grid(a: &AttacksCfg) -> Vec<(AttackKind, u8, Delta)> {
    let mut out = Vec::new();
    for kind in &a.kinds {
        if is_pointwise(*kind) {
            continue;
        }
        for q in &a.q {
            if *kind == AttackKind::WPgdBudget && *q == 1 {
                continue;
            }
            for d in &a.deltas {
                out.push((*kind, *q, *d));
            }
        }
    }
    if let Some(eps) = a.pointwise_eps {
        for kind in a.pointwise.iter().chain(a.kinds.iter().filter(|k| is_pointwise(**k))) {
            out.push((*kind, 1, eps));
        }
    }
    out
}

fn attack_params(a: &AttacksCfg, arch: &Arch, kind: AttackKind, q: u8, delta: Delta) -> AttackParams {
    AttackParams {
        arch: arch.clone(),
        attack: kind,
        loss: match kind {
            AttackKind::ApgdCe => Loss::Ce,
            AttackKind::ApgdDlr => Loss::Dlr,
            _ => a.loss,
        },
        q,
        norm: a.norm,
        delta,
        itr: a.itr,
        ratio: a.ratio,
        l2_w_inf_proj: a.l2_w_inf_proj,
        linf_w2_proj: a.linf_w2_proj,
        budget_reading: a.budget_reading.clone(),
        base_eps: a.base_eps,
        budget_cap: a.budget_cap,
        seed: a.seed,
        restarts: a.restarts,
    }
}

fn resolve_arch(model: &crate::config::ModelCfg) -> Result<Arch, ConfigError> {
    if let Some(a) = &model.arch {
        return Ok(a.clone());
    }
    if let Some(name) = model.source.strip_prefix("robustbench:") {
        let threat = model.threat.unwrap_or(Norm::Linf);
        return crate::registry::lookup(name, threat).map(|m| m.arch.clone()).ok_or_else(|| {
            ConfigError::Invalid(format!(
                "model.source = {:?}: no RobustBench CIFAR-10 {threat:?} model of that name{}; `wdro models ls` lists them",
                model.source,
                crate::config::closest(name, crate::registry::all().iter().map(|m| m.name))
            ))
        });
    }
    Err(ConfigError::Invalid("model.arch is required".into()))
}

fn checkpoint_sources(model: &crate::config::ModelCfg) -> Result<(Vec<String>, Option<String>), ConfigError> {
    if let Some(name) = model.source.strip_prefix("robustbench:") {
        let threat = model.threat.unwrap_or(Norm::Linf);
        let info = crate::registry::lookup(name, threat)
            .ok_or_else(|| ConfigError::Invalid(format!("unknown RobustBench model {name:?}")))?;
        let url = info.checkpoint_url().ok_or_else(|| {
            ConfigError::Invalid(format!(
                "RobustBench model {name}: no checkpoint address is known to wdro; download the .pt yourself and use model.source = \"file:PATH\" with model.arch"
            ))
        })?;
        let digest = model.digest.clone().or_else(|| info.digest.map(str::to_string));
        return Ok((vec![url], digest));
    }
    Ok((vec![model.source.clone()], model.digest.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = r#"
[fetch.ti]
sources = ["file:ti"]
[fetch.tl]
sources = ["file:tl"]
[data]
format = "idx"
train = { images = "ti", labels = "tl" }
test = { images = "ti", labels = "tl" }
[model]
source = "train"
arch = { name = "small-cnn" }
[model.train]
epochs = 1
lr = 0.05
momentum = 0.9
weight_decay = 5e-4
batch_size = 128
seed = 0
[upsilon]
losses = ["ce"]
[attacks]
norm = "linf"
deltas = ["8/255"]
q = [2]
kinds = ["w-pgd"]
pointwise = ["apgd-ce"]
pointwise_eps = "8/255"
[finetune]
enabled = false
[eval]
batch_size = 16
"#;

    fn stages(sets: &[&str]) -> Vec<Arc<dyn Stage>> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let cfg = Config::from_toml_str(CFG, "t", &sets).unwrap();
        let env = BuildEnv { device: "cpu".into(), worker: "wdro-worker".into(), offline: true };
        build(&cfg, &env).unwrap()
    }

    fn find<'a>(s: &'a [Arc<dyn Stage>], name: &str) -> &'a Arc<dyn Stage> {
        s.iter().find(|x| x.name() == name).unwrap_or_else(|| panic!("no stage {name}"))
    }

    #[test]
    fn unsharded_by_default() {
        let s = stages(&[]);
        assert!(s.iter().all(|x| !x.name().contains(".shard-") && x.id().0 != MERGE_ID));
        let a = find(&s, "attack.pretrained.apgd-ce");
        assert_eq!((a.id().0.as_str(), a.version()), ("attack", versions::ATTACK_POINTWISE));
        assert!(!a.params().0.contains_key(SHARD_PARAM));
        assert_eq!(find(&s, "attack.pretrained.w-pgd.w2.8_255").version(), versions::ATTACK);
    }

    #[test]
    fn shards_and_merge_keep_names_and_outputs() {
        let s = stages(&["shard.upsilon=3", "shard.pointwise=3", "shard.clean=2"]);
        let names: Vec<&str> = s.iter().map(|x| x.name()).collect();
        for base in ["upsilon.pretrained.train10.ce", "upsilon.pretrained.test.ce", "attack.pretrained.apgd-ce"] {
            let merge = find(&s, base);
            assert_eq!(merge.id().0, MERGE_ID);
            for i in 0..3 {
                let sh = find(&s, &shard_name(base, i, 3));
                let spec: ShardSpec = serde_json::from_value(sh.params().0[SHARD_PARAM].clone()).unwrap();
                assert_eq!(spec, ShardSpec { index: i, count: 3, batch_size: 16 });
                // Without the spec, a shard's params are the whole stage's.
                let mut own = sh.params();
                own.0.remove(SHARD_PARAM);
                assert_eq!(merge.params().0["params"], own.to_value());
                assert!(merge.inputs().iter().any(|r| r.stage == sh.name()));
            }
        }
        assert_eq!(find(&s, "attack.pretrained.apgd-ce").outputs(), vec!["adv", "curves", "summary"]);
        assert_eq!(find(&s, "upsilon.pretrained.test.ce").outputs(), vec!["grad_norms", "summary"]);
        assert_eq!(find(&s, "clean.pretrained").inputs().len(), 2);
        assert!(names.contains(&"clean.pretrained.shard-2-of-2"));
        // The W-attack stays whole; the evaluation table reads the merged names.
        assert_eq!(find(&s, "attack.pretrained.w-pgd.w2.8_255").id().0, "attack");
        assert!(!names.iter().any(|n| n.starts_with("attack.pretrained.w-pgd") && n.contains("shard")));
        assert_eq!(find(&s, "attack.pretrained.apgd-ce").params().0["of_version"], versions::ATTACK_POINTWISE);
        let eval = find(&s, "eval.pretrained");
        assert!(eval.inputs().iter().all(|r| !r.stage.contains(".shard-")));
        // Shard boundaries follow the batch size, so it is part of the shard keys.
        let s2 = stages(&["shard.upsilon=3", "eval.batch_size=32"]);
        let a = find(&s, "upsilon.pretrained.test.ce.shard-1-of-3").params();
        let b = find(&s2, "upsilon.pretrained.test.ce.shard-1-of-3").params();
        assert_ne!(a, b);
    }
}
