//! Test harness: a unique temp dir per test and a runner for the real `wdro` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A temp project directory; removed when dropped.
pub struct Dir {
    pub tmp: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Dir {
        Dir { tmp: tempfile::Builder::new().prefix("wdro-e2e-").tempdir().expect("tempdir") }
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    pub fn write(&self, rel: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path().join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// A `wdro` command running in this directory.
    pub fn wdro(&self) -> WdroCommand {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wdro"));
        cmd.current_dir(self.path()).env("NO_COLOR", "1").env_remove("WDRO_WORKER");
        WdroCommand { cmd }
    }
}

pub struct WdroCommand {
    pub cmd: Command,
}

impl WdroCommand {
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.cmd.args(args);
        self
    }

    pub fn output(mut self) -> Output {
        self.cmd.output().expect("run wdro")
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(self) -> String {
        let desc = format!("{:?}", self.cmd);
        let out = self.output();
        assert!(
            out.status.success(),
            "{desc} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and asserts the exit code; returns (stdout, stderr).
    pub fn code(self, want: i32) -> (String, String) {
        let desc = format!("{:?}", self.cmd);
        let out = self.output();
        let (so, se) =
            (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
        assert_eq!(out.status.code(), Some(want), "{desc}:\nstdout:\n{so}\nstderr:\n{se}");
        (so, se)
    }
}

/// Parses newline-delimited JSON events.
pub fn events(stdout: &str) -> Vec<serde_json::Value> {
    stdout.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).expect("json line")).collect()
}

/// Events of one kind.
pub fn of_kind<'a>(ev: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    ev.iter().filter(|e| e["event"] == kind).collect()
}

/// blake3 hex of bytes, for pins.
pub fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}
