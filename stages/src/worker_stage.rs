//! A stage that runs in a `wdro-worker` process (every torch stage).
//!
//! The engine hands us verified input files and an output directory; we write `job.json`,
//! start the worker, relay its progress lines, and turn `result.json` into `StageOutputs`.
//! Every worker stage also gets an implicit `summary` output: its metrics as a JSON file, so
//! downstream in-process stages (evaluation tables, reports) can read numbers as content-addressed
//! inputs like any other artifact.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use wdro_pipeline::{InputRef, Params, Resources, Stage, StageCtx, StageError, StageId, StageOutputs};

use crate::worker_protocol::{Job, JobResult, WorkerEvent, RESULT_FILE};

/// The libtorch version every torch stage key includes: tch 0.26 builds only against 2.13.0.
pub const TORCH_VERSION: &str = "2.13.0";

/// The metrics as the `summary` output holds them: without wall-clock fields (`wall_s`, `*_wall_s`,
/// `seconds`), recursively. Downstream stages read the summary as a content-addressed input, so a
/// timing in it would give every rerun, and every other machine, different downstream keys for
/// bit-identical results; the timings stay in the stage record's metrics.
pub fn without_timings(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => serde_json::Value::Object(
            m.iter()
                .filter(|(k, _)| !(k.as_str() == "wall_s" || k.ends_with("_wall_s") || k.as_str() == "seconds"))
                .map(|(k, v)| (k.clone(), without_timings(v)))
                .collect(),
        ),
        serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(without_timings).collect()),
        other => other.clone(),
    }
}

/// Name of the implicit metrics output of every worker stage.
pub const SUMMARY: &str = "summary";

/// A torch stage executed by `wdro-worker`.
pub struct WorkerStage {
    pub name: String,
    pub id: &'static str,
    pub version: u32,
    pub params: Params,
    pub exec_params: Params,
    pub inputs: Vec<InputRef>,
    /// Declared outputs (without the implicit `summary`).
    pub outputs: Vec<String>,
    /// Resolved device for the worker: `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    pub worker: PathBuf,
}

impl WorkerStage {
    fn job(&self, ctx: &StageCtx) -> Job {
        Job {
            stage_id: self.id.to_string(),
            stage_name: self.name.clone(),
            key: String::new(),
            params: self.params.to_value(),
            exec_params: self.exec_params.to_value(),
            inputs: ctx.inputs.clone(),
            out_dir: ctx.out_dir.clone(),
            scratch_dir: ctx.scratch_dir.clone(),
            device: self.device.clone(),
        }
    }
}

impl Stage for WorkerStage {
    fn name(&self) -> &str {
        &self.name
    }
    fn id(&self) -> StageId {
        StageId(self.id.to_string())
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn params(&self) -> Params {
        self.params.clone()
    }
    fn exec_params(&self) -> Params {
        self.exec_params.clone()
    }
    fn inputs(&self) -> Vec<InputRef> {
        self.inputs.clone()
    }
    fn outputs(&self) -> Vec<String> {
        let mut o = self.outputs.clone();
        o.push(SUMMARY.to_string());
        o
    }
    fn resources(&self) -> Resources {
        // A merge only concatenates and reduces shard files on the CPU: it never needs a GPU, so
        // a cluster does not hold one for it.
        let gpu = self.device.starts_with("cuda") && self.id != crate::shard::MERGE_ID;
        Resources { cpus: 0, gpus: u32::from(gpu), mem_mb: 0, worker: true }
    }
    fn run(&self, ctx: &StageCtx) -> Result<StageOutputs, StageError> {
        let job = self.job(ctx);
        let job_dir = ctx.out_dir.join(".job");
        std::fs::create_dir_all(&job_dir)
            .map_err(|e| StageError(format!("{}: cannot create {}: {e}", self.name, job_dir.display())))?;
        let job_path = job_dir.join("job.json");
        std::fs::write(&job_path, serde_json::to_vec_pretty(&job).expect("job serializes"))
            .map_err(|e| StageError(format!("{}: cannot write {}: {e}", self.name, job_path.display())))?;
        let result = run_worker(&self.worker, &job_path, &self.name, ctx)?;
        let _ = std::fs::remove_dir_all(&job_dir);
        let mut out = StageOutputs::default();
        for (name, file) in &result.outputs {
            if file.contains('/') || file.contains("..") {
                return Err(StageError(format!("{}: worker named an output outside its out_dir: {file:?}", self.name)));
            }
            out.files.insert(name.clone(), ctx.out_dir.join(file));
        }
        let summary = ctx.out_dir.join("summary.json");
        std::fs::write(
            &summary,
            serde_json::to_vec_pretty(&without_timings(&result.metrics)).expect("metrics serialize"),
        )
        .map_err(|e| StageError(format!("{}: cannot write {}: {e}", self.name, summary.display())))?;
        out.files.insert(SUMMARY.to_string(), summary);
        out.metrics = result.metrics;
        Ok(out)
    }
}

/// Starts the worker, relays progress, and returns its result or its one-line error.
fn run_worker(worker: &Path, job_path: &Path, name: &str, ctx: &StageCtx) -> Result<JobResult, StageError> {
    let mut child = Command::new(worker)
        .arg("--job")
        .arg(job_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            StageError(format!(
                "{name}: cannot start {} ({e}); build it with `cargo build --release --workspace` or set WDRO_WORKER",
                worker.display()
            ))
        })?;
    let stderr = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut s);
        s
    });
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        match serde_json::from_str::<WorkerEvent>(&line) {
            Ok(WorkerEvent::Progress { done, total, message }) => {
                (ctx.progress)(wdro_pipeline::ProgressEvent { done, total, message })
            }
            Ok(WorkerEvent::Log { message }) => {
                (ctx.progress)(wdro_pipeline::ProgressEvent { done: 0, total: 0, message })
            }
            Err(_) => {}
        }
    }
    let status = child.wait().map_err(|e| StageError(format!("{name}: waiting for the worker failed: {e}")))?;
    let stderr = err_thread.join().unwrap_or_default();
    if !status.success() {
        let msg =
            stderr.lines().rev().find_map(|l| l.strip_prefix("error: ")).map(str::to_string).unwrap_or_else(|| {
                let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
                format!(
                    "worker exited with {status} (a crash inside libtorch?); last output: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                )
            });
        return Err(StageError(format!("{name}: {msg}")));
    }
    let rp = ctx.out_dir.join(RESULT_FILE);
    let text = std::fs::read(&rp)
        .map_err(|e| StageError(format!("{name}: worker exited 0 but wrote no {} ({e})", rp.display())))?;
    let res: JobResult = serde_json::from_slice(&text)
        .map_err(|e| StageError(format!("{name}: worker wrote an unreadable {}: {e}", rp.display())))?;
    let _ = std::fs::remove_file(&rp);
    Ok(res)
}

/// Finds the `wdro-worker` binary: `$WDRO_WORKER`, else next to the running executable (also
/// one level up, for test binaries under `target/*/deps`).
pub fn find_worker() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("WDRO_WORKER") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate the wdro executable: {e}"))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    for cand in [dir.join("wdro-worker"), dir.join("..").join("wdro-worker")] {
        if cand.is_file() {
            return Ok(cand);
        }
    }
    Err(format!(
        "wdro-worker not found next to {}: build it with `cargo build --release --workspace` (or set WDRO_WORKER)",
        exe.display()
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn only_compute_stages_ask_for_the_gpu() {
        use wdro_pipeline::{Params, Stage};
        let stage = |id: &'static str, device: &str| super::WorkerStage {
            name: id.into(),
            id,
            version: 1,
            params: Params::new(),
            exec_params: Params::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            device: device.into(),
            worker: "wdro-worker".into(),
        };
        assert_eq!(stage("attack", "cuda:0").resources().gpus, 1);
        assert_eq!(stage(crate::shard::MERGE_ID, "cuda:0").resources().gpus, 0);
        assert_eq!(stage("attack", "cpu").resources().gpus, 0);
    }

    #[test]
    fn summaries_carry_no_timings() {
        let m = json!({"acc": 0.5, "wall_s": 1.2, "seconds": 4,
                       "epochs": [{"epoch": 1, "wall_s": 3.0, "epoch_wall_s": 2.0, "acc": [0.1]}]});
        assert_eq!(super::without_timings(&m), json!({"acc": 0.5, "epochs": [{"epoch": 1, "acc": [0.1]}]}));
    }
}
