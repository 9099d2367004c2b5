//! `wdro-worker --job DIR/job.json`: runs one torch stage for the `wdro` CLI.
//!
//! Protocol (see `wdro_stages::worker_protocol`): progress as JSON lines on stdout,
//! `result.json` in the job's out_dir on success, and on failure a non-zero exit with a last
//! stderr line `error: <one line>`. libtorch's C++ backtraces never reach the user: only the
//! first line of a torch error is kept.

use std::io::Write;
use std::path::PathBuf;

use wdro_ml::stage_impls;
use wdro_stages::worker_protocol::{Job, JobResult, WorkerEvent, RESULT_FILE};

fn progress(done: u64, total: u64, message: &str) {
    let ev = WorkerEvent::Progress { done, total, message: message.to_string() };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", serde_json::to_string(&ev).expect("event serializes"));
    let _ = out.flush();
}

fn run(job: &Job) -> anyhow::Result<JobResult> {
    if let Some(t) = job.exec_params.get("threads").and_then(|t| t.as_i64()).filter(|t| *t > 0) {
        tch::set_num_threads(t as i32);
    }
    match job.stage_id.as_str() {
        "dataset" => stage_impls::dataset::run(job, &progress),
        "subset" => stage_impls::subset::run(job, &progress),
        "checkpoint" => stage_impls::checkpoint::run(job, &progress),
        "clean" => stage_impls::clean::run(job, &progress),
        "upsilon" => stage_impls::upsilon::run(job, &progress),
        "attack" => stage_impls::attack::run(job, &progress),
        "finetune" => stage_impls::finetune::run(job, &progress),
        "merge" => stage_impls::merge::run(job, &progress),
        other => {
            anyhow::bail!("this wdro-worker has no stage kind {other:?}; rebuild it from the same checkout as wdro")
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let job_path = match args.iter().position(|a| a == "--job").and_then(|i| args.get(i + 1)) {
        Some(p) => PathBuf::from(p),
        None => {
            if args.iter().any(|a| a == "--probe") {
                println!(
                    "{}",
                    serde_json::json!({"cuda": tch::Cuda::is_available(), "cuda_devices": tch::Cuda::device_count(), "threads": tch::get_num_threads()})
                );
                return;
            }
            eprintln!("error: usage: wdro-worker --job JOB.json (started by `wdro run`, not by hand)");
            std::process::exit(2);
        }
    };
    let job: Job =
        match std::fs::read(&job_path).map_err(anyhow::Error::from).and_then(|b| Ok(serde_json::from_slice(&b)?)) {
            Ok(j) => j,
            Err(e) => {
                eprintln!("error: cannot read job file {}: {e}", job_path.display());
                std::process::exit(2);
            }
        };
    match run(&job) {
        Ok(result) => {
            let path = job.out_dir.join(RESULT_FILE);
            let bytes = serde_json::to_vec_pretty(&result).expect("result serializes");
            if let Err(e) = std::fs::write(&path, bytes) {
                eprintln!("error: cannot write {}: {e}", path.display());
                std::process::exit(1);
            }
        }
        Err(e) => {
            // The whole chain on one line; torch errors keep only their first line.
            let msg = e
                .chain()
                .map(|c| c.to_string().lines().next().unwrap_or("").to_string())
                .collect::<Vec<_>>()
                .join(": ");
            eprintln!("error: {msg}");
            std::process::exit(1);
        }
    }
}
