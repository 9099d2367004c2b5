//! The Slurm executor: the stages a plan must run, as Slurm job arrays.
//!
//! * **Grouping.** Every stage to run gets a *wave* (1 + the highest wave of the stages to run
//!   that it reads from; cached producers do not count). Stages of the same wave, kind and
//!   resources form one job array; an array depends (`--dependency=afterok:`) on every array that
//!   holds one of its stages' producers.
//! * **Tasks.** Task `i` of an array runs `wdro … worker --stage NAME [--key KEY]`: the worker
//!   pulls its inputs from the shared remote cache, runs the stage as a local run would, pushes
//!   the outputs and the record, and exits. The remote cache is the only coordination point: a
//!   stage whose key is already on the remote is not computed again by any job.
//! * **Following.** The client polls `squeue -h -r -t all` (works without slurmdbd), shows the
//!   same events as a local run, resubmits a failed, cancelled or vanished task up to `retries`
//!   times (rewriting the dependencies of the arrays waiting on it with `scontrol update`), and
//!   on a final failure names the task's Slurm log and cancels what can no longer run.
//! * **`--emit DIR`** writes the job scripts and a `submit.sh` that chains them with `sbatch
//!   --parsable`, for users who must submit by hand.
//!
//! * **Sweeps.** [`group_variants`] takes several variants of a pipeline (`wdro run --sweep …
//!   --executor slurm`) and submits them in one go. A stage whose key is known is identified by
//!   it; below a stage to run the key is not known yet, so a stage is identified by what its key
//!   will be made of (kind, version, params, environment and, per input, the identity of its
//!   producer). Equal identities in several variants are one task, submitted once; the task
//!   carries its variant's `--set` flags.
//!
//! A crashed client loses nothing: a rerun plans against the remote and submits only the stages
//! that are not there yet.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use wdro_cache::{StageKey, Store};

use wdro_cache::Digest;

use crate::exec::{execute, ExecError, ExecOptions, NullObserver, Observer, Outcome, RunReport};
use crate::executor::Executor;
use crate::graph::Pipeline;
use crate::key::Env;
use crate::params::canonical_json;
use crate::plan::{key_material, plan, Plan, Status};
use crate::stage::Resources;

/// Resources of one job array (`#SBATCH` lines). Unset fields are left to the cluster defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlurmResources {
    pub partition: Option<String>,
    pub gpus: u32,
    pub cpus: u32,
    /// `--mem`, e.g. `16G`.
    pub mem: Option<String>,
    /// `--time`, e.g. `04:00:00`.
    pub time: Option<String>,
    /// Extra lines, written as they are (`#SBATCH --account=lab`, `module load cuda`).
    pub extra: Vec<String>,
}

impl SlurmResources {
    /// Defaults from what the stage declares: its CPUs (at least one), GPUs and memory.
    pub fn from_stage(r: &Resources) -> SlurmResources {
        SlurmResources {
            partition: None,
            gpus: r.gpus,
            cpus: r.cpus.max(1),
            mem: (r.mem_mb > 0).then(|| format!("{}M", r.mem_mb)),
            time: None,
            extra: Vec::new(),
        }
    }
}

/// Per-kind overrides of [`SlurmResources`] (from the config's `[slurm]` table).
#[derive(Clone, Debug, Default)]
pub struct KindOverride {
    pub partition: Option<String>,
    pub gpus: Option<u32>,
    pub cpus: Option<u32>,
    pub mem: Option<String>,
    pub time: Option<String>,
    pub extra: Vec<String>,
}

/// How to submit.
#[derive(Clone, Debug)]
pub struct SlurmOptions {
    /// The command a task runs, up to (and without) `worker`: the `wdro` binary and its global
    /// flags (`--config SNAPSHOT`, `--remote URL`, `--set …`).
    pub wdro_cmd: Vec<String>,
    /// Working directory of the jobs (`--chdir`).
    pub workdir: PathBuf,
    /// Where the job scripts, `submit.sh` and the logs (`logs/`) go.
    pub script_dir: PathBuf,
    /// Default partition.
    pub partition: Option<String>,
    /// Extra lines for every script.
    pub extra: Vec<String>,
    /// Stage kind → overrides.
    pub kinds: BTreeMap<String, KindOverride>,
    /// Resubmissions of a failed task.
    pub retries: u32,
    /// Interval between `squeue` polls.
    pub poll: Duration,
    /// `export NAME=VALUE` lines in every script. Jobs must run the same `wdro-worker` with the
    /// same libtorch as the client; sbatch's default `--export=ALL` passes the client's
    /// environment, but many sites set `--export=NONE` (or `SBATCH_EXPORT=NONE`), so the
    /// variables that locate them are written into the script as well.
    pub env: Vec<(String, String)>,
}

/// The client's variables that locate the worker and libtorch (see [`SlurmOptions::env`]).
pub const PASSTHROUGH_ENV: &[&str] = &["LD_LIBRARY_PATH", "WDRO_WORKER", "LIBTORCH"];

impl SlurmOptions {
    pub fn new(wdro_cmd: Vec<String>, workdir: PathBuf, script_dir: PathBuf) -> SlurmOptions {
        SlurmOptions {
            wdro_cmd,
            workdir,
            script_dir,
            partition: None,
            extra: Vec::new(),
            kinds: BTreeMap::new(),
            retries: 2,
            poll: Duration::from_millis(500),
            env: PASSTHROUGH_ENV
                .iter()
                .filter_map(|v| std::env::var(v).ok().filter(|x| !x.is_empty()).map(|x| (v.to_string(), x)))
                .collect(),
        }
    }

    /// The resources of a stage of `kind` that declares `r`.
    pub fn resources(&self, kind: &str, r: &Resources) -> SlurmResources {
        let mut s = SlurmResources::from_stage(r);
        s.partition = self.partition.clone();
        s.extra = self.extra.clone();
        if let Some(k) = self.kinds.get(kind) {
            if k.partition.is_some() {
                s.partition = k.partition.clone();
            }
            s.gpus = k.gpus.unwrap_or(s.gpus);
            s.cpus = k.cpus.unwrap_or(s.cpus);
            if k.mem.is_some() {
                s.mem = k.mem.clone();
            }
            if k.time.is_some() {
                s.time = k.time.clone();
            }
            s.extra.extend(k.extra.iter().cloned());
        }
        s
    }
}

/// One task of a job array: one stage.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    pub stage: String,
    /// Known when every producer is cached at submission; otherwise the worker derives it from
    /// the producers' records on the remote.
    pub key: Option<StageKey>,
    /// Position in its variant's pipeline.
    pub pos: usize,
    /// The variant whose pipeline the task is taken from (0 for a plain run).
    pub variant: usize,
    /// That variant's `--set KEY=VALUE` flags (empty for a plain run), passed to the worker.
    pub sets: Vec<String>,
    /// The same stage in later variants, `(variant, stage name)`: submitted once, for all.
    pub shared_with: Vec<(usize, String)>,
}

/// One job array: stages of the same wave, kind and resources.
#[derive(Clone, Debug)]
pub struct JobArray {
    /// `wdro-<wave>-<kind>`, also the Slurm job name.
    pub name: String,
    pub wave: usize,
    pub kind: String,
    pub resources: SlurmResources,
    pub tasks: Vec<Task>,
    /// Indices (into the array list) of the arrays this one waits for.
    pub deps: BTreeSet<usize>,
}

/// Groups the stages `plan` must run into job arrays, in submission order (by wave).
pub fn group(pipeline: &Pipeline, plan: &Plan, env: &Env, opts: &SlurmOptions) -> Vec<JobArray> {
    group_variants(&[VariantPlan { sets: Vec::new(), pipeline, plan, env }], opts)
}

/// One variant of a multi-variant submission.
pub struct VariantPlan<'a> {
    /// The `--set KEY=VALUE` flags that make this variant (on top of the snapshot's and the
    /// command line's).
    pub sets: Vec<String>,
    pub pipeline: &'a Pipeline,
    pub plan: &'a Plan,
    pub env: &'a Env,
}

/// Per stage (topological position): its key when known, otherwise a digest of what its key will
/// be made of: kind, version, params, environment and, per input slot, the producer's identity and
/// output name. Equal identities get equal keys once their producers finish (by induction: the
/// producers are the same tasks, whose one result the remote keeps), so they are one task.
pub fn identities(pipeline: &Pipeline, plan: &Plan, env: &Env) -> Vec<Digest> {
    let entries = plan.entries();
    let mut ids: Vec<Digest> = Vec::with_capacity(pipeline.len());
    for (p, e) in entries.iter().enumerate().take(pipeline.len()) {
        if let Some(k) = e.key {
            ids.push(k.0);
            continue;
        }
        let (stage, inputs, _) = pipeline.at(p);
        let m = key_material(stage.as_ref(), BTreeMap::new(), env);
        let ins: BTreeMap<&str, String> = inputs
            .iter()
            .map(|i| {
                let q = pipeline.position(&i.stage).expect("validated input names a stage");
                (i.slot.as_str(), format!("{}/{}", ids[q].to_hex(), i.output))
            })
            .collect();
        let doc = serde_json::json!({
            "schema": "wdro-slurm-identity-1",
            "id": m.id.0,
            "version": m.version,
            "params": m.params.to_value(),
            "env": m.env,
            "inputs": ins,
        });
        ids.push(Digest::of_bytes(canonical_json(&doc).as_bytes()));
    }
    ids
}

/// Groups the stages to run of every variant into job arrays, in submission order (by wave).
/// A stage with the same identity ([`identities`]) in several variants becomes one task (taken
/// from the first variant that has it). Waves are depths in the deduplicated graph.
pub fn group_variants(variants: &[VariantPlan<'_>], opts: &SlurmOptions) -> Vec<JobArray> {
    struct Node {
        task: Task,
        kind: String,
        res: SlurmResources,
        deps: BTreeSet<usize>,
        wave: usize,
    }
    let mut nodes: Vec<Node> = Vec::new();
    let mut by_id: BTreeMap<Digest, usize> = BTreeMap::new();
    for (v, vp) in variants.iter().enumerate() {
        let ids = identities(vp.pipeline, vp.plan, vp.env);
        let deps = vp.pipeline.dense_deps();
        let entries = vp.plan.entries();
        for p in 0..vp.pipeline.len() {
            if entries[p].status.is_cached() {
                continue;
            }
            if let Some(&n) = by_id.get(&ids[p]) {
                nodes[n].task.shared_with.push((v, entries[p].name.clone()));
                continue;
            }
            let ndeps: BTreeSet<usize> =
                deps[p].iter().filter(|&&d| !entries[d].status.is_cached()).map(|d| by_id[&ids[*d]]).collect();
            let wave = ndeps.iter().map(|&d| nodes[d].wave + 1).max().unwrap_or(0);
            let stage = vp.pipeline.at(p).0;
            let kind = stage.id().0;
            let res = opts.resources(&kind, &stage.resources());
            by_id.insert(ids[p], nodes.len());
            nodes.push(Node {
                task: Task {
                    stage: entries[p].name.clone(),
                    key: entries[p].key,
                    pos: p,
                    variant: v,
                    sets: vp.sets.clone(),
                    shared_with: Vec::new(),
                },
                kind,
                res,
                deps: ndeps,
                wave,
            });
        }
    }
    let mut groups: BTreeMap<(usize, String, SlurmResources), Vec<usize>> = BTreeMap::new();
    for (n, node) in nodes.iter().enumerate() {
        groups.entry((node.wave, node.kind.clone(), node.res.clone())).or_default().push(n);
    }
    let mut arrays: Vec<JobArray> = Vec::new();
    let mut array_of: BTreeMap<usize, usize> = BTreeMap::new();
    let mut per_kind: BTreeMap<(usize, String), usize> = BTreeMap::new();
    for ((w, kind, res), members) in groups {
        let n = per_kind.entry((w, kind.clone())).or_default();
        let name = if *n == 0 { format!("wdro-{w}-{kind}") } else { format!("wdro-{w}-{kind}-{n}") };
        *n += 1;
        let idx = arrays.len();
        let mut adeps = BTreeSet::new();
        for &m in &members {
            array_of.insert(m, idx);
            for d in &nodes[m].deps {
                if let Some(&a) = array_of.get(d) {
                    adeps.insert(a);
                }
            }
        }
        let tasks = members.iter().map(|&m| nodes[m].task.clone()).collect();
        arrays.push(JobArray { name, wave: w, kind, resources: res, tasks, deps: adeps });
    }
    arrays
}

/// Single-quotes a word for bash.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The file name of an array's script.
pub fn script_name(index: usize, a: &JobArray) -> String {
    format!("{index:03}-{}.sbatch", a.name)
}

/// The Slurm log of one task (the scripts' `--output` pattern, expanded).
pub fn log_path(opts: &SlurmOptions, a: &JobArray, job_id: &str, task: usize) -> PathBuf {
    opts.script_dir.join("logs").join(format!("{}-{job_id}_{task}.out", a.name))
}

/// The batch script of one array.
pub fn script(a: &JobArray, opts: &SlurmOptions) -> String {
    let mut s = String::from("#!/bin/bash\n");
    let r = &a.resources;
    let _ = writeln!(s, "#SBATCH --job-name={}", a.name);
    let _ = writeln!(s, "#SBATCH --array=0-{}", a.tasks.len().saturating_sub(1));
    let _ = writeln!(s, "#SBATCH --output={}/logs/%x-%A_%a.out", opts.script_dir.display());
    let _ = writeln!(s, "#SBATCH --chdir={}", opts.workdir.display());
    if let Some(p) = &r.partition {
        let _ = writeln!(s, "#SBATCH --partition={p}");
    }
    let _ = writeln!(s, "#SBATCH --cpus-per-task={}", r.cpus.max(1));
    if r.gpus > 0 {
        let _ = writeln!(s, "#SBATCH --gpus-per-task={}", r.gpus);
    }
    if let Some(m) = &r.mem {
        let _ = writeln!(s, "#SBATCH --mem={m}");
    }
    if let Some(t) = &r.time {
        let _ = writeln!(s, "#SBATCH --time={t}");
    }
    for e in &r.extra {
        let _ = writeln!(s, "{e}");
    }
    s.push_str("set -euo pipefail\n");
    for (k, v) in &opts.env {
        let _ = writeln!(s, "export {k}={}", shell_quote(v));
    }
    s.push_str("# one stage per array task; wdro worker pulls inputs from the remote cache and pushes results\n");
    s.push_str("case \"${SLURM_ARRAY_TASK_ID:?not an array task}\" in\n");
    let with_sets = a.tasks.iter().any(|t| !t.sets.is_empty());
    for (i, t) in a.tasks.iter().enumerate() {
        let mut args = format!("--stage {}", shell_quote(&t.stage));
        if let Some(k) = t.key {
            let _ = write!(args, " --key {k}");
        }
        if with_sets {
            let sets: Vec<String> = t.sets.iter().map(|x| format!("--set {}", shell_quote(x))).collect();
            let _ = writeln!(s, "  {i}) SETS=({}); ARGS=({args}) ;;", sets.join(" "));
        } else {
            let _ = writeln!(s, "  {i}) ARGS=({args}) ;;");
        }
    }
    s.push_str("  *) echo \"no task $SLURM_ARRAY_TASK_ID in this array\" >&2; exit 2 ;;\nesac\n");
    let cmd: Vec<String> = opts.wdro_cmd.iter().map(|w| shell_quote(w)).collect();
    // The variant's flags go before `worker`, after the command line's, so they win; the
    // `${A[@]+…}` form keeps an empty array legal under `set -u` in bash before 4.4.
    let sets = if with_sets { " ${SETS[@]+\"${SETS[@]}\"}" } else { "" };
    let _ = writeln!(s, "exec {}{sets} worker \"${{ARGS[@]}}\"", cmd.join(" "));
    s
}

/// `afterok:` of the arrays `a` waits for, as job ids in `ids`.
fn dependency(a: &JobArray, ids: &[String]) -> Option<String> {
    let d: Vec<String> = a.deps.iter().map(|&i| format!("afterok:{}", ids[i])).collect();
    (!d.is_empty()).then(|| d.join(","))
}

/// Writes one script per array and `submit.sh` (chaining them with `sbatch --parsable`).
/// Returns the written paths, `submit.sh` last.
pub fn emit(arrays: &[JobArray], opts: &SlurmOptions) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(opts.script_dir.join("logs"))?;
    let mut written = Vec::new();
    let mut submit = String::from("#!/bin/bash\n# Submits the wdro job arrays in order; the DAG edges become --dependency=afterok.\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\n");
    let vars: Vec<String> = (0..arrays.len()).map(|i| format!("$J{i}")).collect();
    for (i, a) in arrays.iter().enumerate() {
        let name = script_name(i, a);
        let path = opts.script_dir.join(&name);
        std::fs::write(&path, script(a, opts))?;
        written.push(path);
        let dep = dependency(a, &vars).map(|d| format!(" --dependency={d}")).unwrap_or_default();
        let _ = writeln!(submit, "J{i}=$(sbatch --parsable{dep} {name} | cut -d';' -f1)");
        let _ = writeln!(submit, "echo \"{name}: job $J{i}\"");
    }
    let path = opts.script_dir.join("submit.sh");
    std::fs::write(&path, submit)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    written.push(path);
    Ok(written)
}

/// Why talking to Slurm failed.
#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    #[error("cannot run `{cmd}` ({source}); is Slurm installed and SLURM_CONF set?")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed: {stderr}")]
    Failed { cmd: String, stderr: String },
    #[error("writing the job scripts to {dir}: {source}")]
    Write {
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

fn slurm(cmd: &str, args: &[String]) -> Result<String, SlurmError> {
    let full = format!("{cmd} {}", args.join(" "));
    let out =
        Command::new(cmd).args(args).output().map_err(|source| SlurmError::Spawn { cmd: full.clone(), source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().replace('\n', " ");
        return Err(SlurmError::Failed { cmd: full, stderr });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `sbatch --parsable …`: the job id.
fn sbatch(script: &Path, array: Option<&str>, dependency: Option<&str>) -> Result<String, SlurmError> {
    let mut args = vec!["--parsable".to_string()];
    if let Some(a) = array {
        args.push(format!("--array={a}"));
    }
    if let Some(d) = dependency {
        args.push(format!("--dependency={d}"));
    }
    args.push(script.display().to_string());
    let out = slurm("sbatch", &args)?;
    Ok(out.trim().split(';').next().unwrap_or("").to_string())
}

/// What the client knows about one task.
#[derive(Clone, Debug, PartialEq)]
enum TaskState {
    Submitted,
    Running,
    Done,
    Failed(String),
    /// Never ran: something it depends on failed.
    Blocked,
}

const FAILED_STATES: &[&str] =
    &["FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"];

/// Submits `arrays` and follows them until every task completed or failed for good.
/// Returns, per array and task, `Ok(())` or the failure message (with the log path).
pub fn submit_and_follow(
    arrays: &[JobArray],
    opts: &SlurmOptions,
    observer: &dyn Observer,
) -> Result<Vec<Vec<Result<(), String>>>, SlurmError> {
    emit(arrays, opts).map_err(|source| SlurmError::Write { dir: opts.script_dir.display().to_string(), source })?;
    let scripts: Vec<PathBuf> =
        arrays.iter().enumerate().map(|(i, a)| opts.script_dir.join(script_name(i, a))).collect();
    let mut ids: Vec<String> = Vec::new();
    // Per array: the job id of each task's latest submission, and the attempts.
    let mut current: Vec<Vec<String>> = Vec::new();
    let mut attempts: Vec<Vec<u32>> = Vec::new();
    let mut state: Vec<Vec<TaskState>> = Vec::new();
    let mut started: Vec<Vec<Instant>> = Vec::new();
    for (i, a) in arrays.iter().enumerate() {
        let id = sbatch(&scripts[i], None, dependency(a, &ids).as_deref())?;
        ids.push(id.clone());
        current.push(vec![id; a.tasks.len()]);
        attempts.push(vec![0; a.tasks.len()]);
        state.push(vec![TaskState::Submitted; a.tasks.len()]);
        started.push(vec![Instant::now(); a.tasks.len()]);
    }
    let mut missing: BTreeMap<(usize, usize), u32> = BTreeMap::new();
    loop {
        let active: BTreeSet<String> = (0..arrays.len())
            .flat_map(|i| (0..arrays[i].tasks.len()).map(move |t| (i, t)))
            .filter(|&(i, t)| matches!(state[i][t], TaskState::Submitted | TaskState::Running))
            .map(|(i, t)| current[i][t].clone())
            .collect();
        if active.is_empty() {
            break;
        }
        let list: Vec<String> = active.iter().cloned().collect();
        let out = slurm(
            "squeue",
            &[
                "-h".into(),
                "-r".into(),
                "-t".into(),
                "all".into(),
                "-o".into(),
                "%F|%K|%T".into(),
                "-j".into(),
                list.join(","),
            ],
        )
        .unwrap_or_default();
        let mut seen: BTreeMap<(String, String), String> = BTreeMap::new();
        let mut jobs_seen: BTreeSet<String> = BTreeSet::new();
        for line in out.lines() {
            let f: Vec<&str> = line.trim().split('|').collect();
            if f.len() == 3 {
                jobs_seen.insert(f[0].to_string());
                seen.insert((f[0].to_string(), f[1].to_string()), f[2].to_string());
            }
        }
        let mut resubmit: Vec<(usize, usize)> = Vec::new();
        for i in 0..arrays.len() {
            for t in 0..arrays[i].tasks.len() {
                if !matches!(state[i][t], TaskState::Submitted | TaskState::Running) {
                    continue;
                }
                let stage = &arrays[i].tasks[t].stage;
                let job = &current[i][t];
                let st = match seen.get(&(job.clone(), t.to_string())) {
                    Some(s) => s.split_whitespace().next().unwrap_or("").to_string(),
                    None => {
                        // A pending task cancelled with scancel leaves no record at all.
                        let n = missing.entry((i, t)).or_default();
                        *n += 1;
                        if jobs_seen.contains(job) || *n >= 10 {
                            "CANCELLED".to_string()
                        } else {
                            continue;
                        }
                    }
                };
                missing.remove(&(i, t));
                match st.as_str() {
                    "RUNNING" | "COMPLETING" if state[i][t] == TaskState::Submitted => {
                        state[i][t] = TaskState::Running;
                        started[i][t] = Instant::now();
                        let key = arrays[i].tasks[t].key.unwrap_or(StageKey(wdro_cache::Digest::of_bytes(b"")));
                        observer.stage_started(stage, &key, &[]);
                    }
                    "COMPLETED" => {
                        state[i][t] = TaskState::Done;
                        if let Some(k) = arrays[i].tasks[t].key {
                            observer.stage_finished(stage, false, started[i][t].elapsed(), &k);
                        }
                    }
                    s if FAILED_STATES.contains(&s) => {
                        let log = log_path(opts, &arrays[i], job, t);
                        if attempts[i][t] < opts.retries {
                            attempts[i][t] += 1;
                            resubmit.push((i, t));
                            eprintln!(
                                "slurm: {stage} (job {job}_{t}) {s}; resubmitting (attempt {} of {}); log: {}",
                                attempts[i][t] + 1,
                                opts.retries + 1,
                                log.display()
                            );
                        } else {
                            let msg = format!(
                                "Slurm job {job}_{t} ended {s} after {} attempt(s); log: {}",
                                attempts[i][t] + 1,
                                log.display()
                            );
                            observer.stage_failed(stage, &msg);
                            state[i][t] = TaskState::Failed(msg);
                        }
                    }
                    _ => {}
                }
            }
        }
        // Resubmit failed tasks, then point the arrays waiting on them at the new jobs.
        let mut changed: BTreeSet<usize> = BTreeSet::new();
        for (i, t) in resubmit {
            let dep = dependency_now(&arrays[i], &ids, &current);
            match sbatch(&scripts[i], Some(&t.to_string()), dep.as_deref()) {
                Ok(id) => {
                    current[i][t] = id;
                    state[i][t] = TaskState::Submitted;
                    changed.insert(i);
                }
                Err(e) => state[i][t] = TaskState::Failed(format!("resubmitting failed: {e}")),
            }
        }
        for (j, a) in arrays.iter().enumerate() {
            if a.deps.iter().any(|d| changed.contains(d)) {
                if let Some(dep) = dependency_now(a, &ids, &current) {
                    let pending: BTreeSet<&String> = (0..a.tasks.len())
                        .filter(|&t| state[j][t] == TaskState::Submitted)
                        .map(|t| &current[j][t])
                        .collect();
                    for id in pending {
                        let _ =
                            slurm("scontrol", &["update".into(), format!("JobId={id}"), format!("Dependency={dep}")]);
                    }
                }
            }
        }
        // A final failure: cancel what waits on it, transitively.
        let mut blocked: BTreeSet<usize> = BTreeSet::new();
        for (j, a) in arrays.iter().enumerate() {
            let failed_dep = a.deps.iter().any(|&d| {
                blocked.contains(&d) || state[d].iter().any(|s| matches!(s, TaskState::Failed(_) | TaskState::Blocked))
            });
            if failed_dep {
                blocked.insert(j);
                for t in 0..a.tasks.len() {
                    if state[j][t] == TaskState::Submitted {
                        let _ = slurm("scancel", &[format!("{}_{t}", current[j][t])]);
                        state[j][t] = TaskState::Blocked;
                    }
                }
            }
        }
        std::thread::sleep(opts.poll);
    }
    Ok(state
        .into_iter()
        .map(|ts| {
            ts.into_iter()
                .map(|s| match s {
                    TaskState::Done => Ok(()),
                    TaskState::Failed(m) => Err(m),
                    _ => Err(String::new()),
                })
                .collect()
        })
        .collect())
}

/// The dependency of array `a` given resubmissions: an upstream array whose tasks were all
/// submitted once is `afterok:ID`; one with resubmitted tasks is `afterany:ID` plus `afterok:`
/// each resubmission (a resubmitted task's original failure must not block forever).
fn dependency_now(a: &JobArray, ids: &[String], current: &[Vec<String>]) -> Option<String> {
    let mut d: Vec<String> = Vec::new();
    for &u in &a.deps {
        let retried: BTreeSet<&String> = current[u].iter().filter(|id| **id != ids[u]).collect();
        if retried.is_empty() {
            d.push(format!("afterok:{}", ids[u]));
        } else {
            d.push(format!("afterany:{}", ids[u]));
            d.extend(retried.into_iter().map(|id| format!("afterok:{id}")));
        }
    }
    (!d.is_empty()).then(|| d.join(","))
}

/// `--executor slurm`: the plan's stages to run as job arrays (or only their scripts, `emit`).
pub struct SlurmExecutor {
    pub opts: SlurmOptions,
    /// Write the scripts and `submit.sh` to `opts.script_dir`, submit nothing.
    pub emit_only: bool,
}

/// One variant of a sweep submitted to Slurm ([`SlurmExecutor::submit_variants`]).
pub struct Variant<'a> {
    /// For messages: `finetune.beta=1 finetune.lr=0.01`.
    pub label: String,
    /// The `--set KEY=VALUE` flags of this variant, on top of the command line's.
    pub sets: Vec<String>,
    pub pipeline: &'a Pipeline,
    /// Its options: environment, `--force`, the remote.
    pub opts: &'a ExecOptions,
}

impl SlurmExecutor {
    /// The arrays for the current plan (what `--emit` writes).
    pub fn arrays(
        &self,
        pipeline: &Pipeline,
        store: &Store,
        opts: &ExecOptions,
    ) -> Result<(Plan, Vec<JobArray>), ExecError> {
        let p = plan(pipeline, store, &opts.plan)?;
        let arrays = group(pipeline, &p, &opts.plan.env, &self.opts);
        Ok((p, arrays))
    }

    /// Plans every variant and groups all their stages to run into one set of arrays, each
    /// shared stage once.
    pub fn variant_arrays(
        &self,
        variants: &[Variant<'_>],
        store: &Store,
    ) -> Result<(Vec<Plan>, Vec<JobArray>), ExecError> {
        let mut plans = Vec::new();
        for v in variants {
            plans.push(plan(v.pipeline, store, &v.opts.plan)?);
        }
        let vps: Vec<VariantPlan<'_>> = variants
            .iter()
            .zip(&plans)
            .map(|(v, p)| VariantPlan { sets: v.sets.clone(), pipeline: v.pipeline, plan: p, env: &v.opts.plan.env })
            .collect();
        let arrays = group_variants(&vps, &self.opts);
        Ok((plans, arrays))
    }

    /// Submits the arrays of [`Self::variant_arrays`], follows them to the end, and returns per
    /// variant the stages the jobs computed for it (a shared stage counts for the variant whose
    /// task it was). Afterwards every stage of every variant is on the remote: a local run of
    /// each variant pulls and records it. A task that failed for good is an error naming the
    /// stage, its variant and its Slurm log.
    pub fn submit_variants(
        &self,
        variants: &[Variant<'_>],
        plans: &[Plan],
        arrays: &[JobArray],
        observer: &dyn Observer,
    ) -> Result<Vec<BTreeSet<String>>, ExecError> {
        let first = plans.first().cloned().unwrap_or_default();
        let results =
            submit_and_follow(arrays, &self.opts, observer).map_err(|e| slurm_failure(&first, e.to_string()))?;
        let mut computed: Vec<BTreeSet<String>> = vec![BTreeSet::new(); variants.len()];
        let mut failures: Vec<(usize, String, String)> = Vec::new();
        for (a, rs) in arrays.iter().zip(&results) {
            for (t, r) in a.tasks.iter().zip(rs) {
                match r {
                    Ok(()) => {
                        computed[t.variant].insert(t.stage.clone());
                    }
                    Err(m) if !m.is_empty() => failures.push((t.variant, t.stage.clone(), m.clone())),
                    Err(_) => {}
                }
            }
        }
        if let Some(((v, stage, message), rest)) = failures.split_first() {
            let mut report = report_from_plan(&plans[*v]);
            for s in &mut report.stages {
                if computed[*v].contains(&s.name) {
                    s.outcome = Outcome::Computed;
                } else if let Some((_, _, m)) = failures.iter().find(|(fv, n, _)| fv == v && *n == s.name) {
                    s.outcome = Outcome::Failed { message: m.clone() };
                }
            }
            let label = &variants[*v].label;
            let stage = if label.is_empty() { stage.clone() } else { format!("{stage} [{label}]") };
            return Err(ExecError::StageFailed {
                stage,
                message: message.clone(),
                others: rest.iter().map(|(_, s, _)| s.clone()).collect(),
                report: Box::new(report),
            });
        }
        // The plans memoized "absent" for the keys the jobs computed: forget that, so that the
        // local runs that follow see the results.
        for (v, p) in variants.iter().zip(plans) {
            if let Some(remote) = &v.opts.plan.remote {
                for k in p.entries().iter().filter(|e| !e.status.is_cached()).filter_map(|e| e.key) {
                    remote.forget_manifest(&k);
                }
            }
        }
        Ok(computed)
    }
}

impl Executor for SlurmExecutor {
    fn name(&self) -> &'static str {
        "slurm"
    }

    /// Submits, follows, then runs the pipeline locally, where every stage is now a (remote) hit:
    /// that pulls the results and records the run as a local run does. Stages computed by the
    /// jobs are reported as computed.
    fn run(
        &self,
        pipeline: &Pipeline,
        store: &Store,
        opts: &ExecOptions,
        observer: &dyn Observer,
    ) -> Result<RunReport, ExecError> {
        let sub;
        let pipeline = match &opts.until {
            Some(u) => {
                sub = pipeline.subgraph_until(u)?;
                &sub
            }
            None => pipeline,
        };
        let variants = [Variant { label: String::new(), sets: Vec::new(), pipeline, opts }];
        let (plans, arrays) = self.variant_arrays(&variants, store)?;
        observer.planned(&plans[0]);
        let computed = match self.submit_variants(&variants, &plans, &arrays, observer) {
            Ok(mut c) => c.remove(0),
            Err(e) => {
                if let ExecError::StageFailed { report, .. } = &e {
                    observer.summary(report);
                }
                return Err(e);
            }
        };
        let mut report = execute(pipeline, store, opts, &NullObserver)?;
        // A task whose key was unknown at submission could not be reported when its job
        // finished: report it now, with the key the local run found.
        let unknown: BTreeSet<&str> =
            arrays.iter().flat_map(|a| &a.tasks).filter(|t| t.key.is_none()).map(|t| t.stage.as_str()).collect();
        for s in &mut report.stages {
            if computed.contains(&s.name) {
                s.outcome = Outcome::Computed;
                s.remote_pulled_bytes = None;
                if let (true, Some(k)) = (unknown.contains(s.name.as_str()), s.key) {
                    observer.stage_finished(&s.name, false, s.duration, &k);
                }
            }
        }
        observer.summary(&report);
        Ok(report)
    }
}

fn report_from_plan(p: &Plan) -> RunReport {
    RunReport {
        run_id: String::new(),
        stages: p
            .entries()
            .iter()
            .map(|e| crate::exec::StageReport {
                name: e.name.clone(),
                key: e.key,
                outcome: if e.status.is_cached() { Outcome::Hit } else { Outcome::NotRun },
                duration: Duration::ZERO,
                reasons: match &e.status {
                    Status::Cached => Vec::new(),
                    Status::ToRun { reasons } => reasons.clone(),
                },
                remote_pulled_bytes: None,
            })
            .collect(),
        elapsed: Duration::ZERO,
        remote: None,
    }
}

fn slurm_failure(p: &Plan, message: String) -> ExecError {
    let first = p.entries().iter().find(|e| !e.status.is_cached()).map(|e| e.name.clone()).unwrap_or_default();
    ExecError::StageFailed { stage: first, message, others: Vec::new(), report: Box::new(report_from_plan(p)) }
}

#[cfg(test)]
#[path = "slurm_tests.rs"]
mod tests;
