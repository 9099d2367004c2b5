//! The cache directory's advisory lock.
//!
//! sled allows one process per database, and `gc` must not delete what a concurrent run is about
//! to reference, so one [`crate::Store`] per cache directory is open at a time. The lock is an
//! `flock` on `LOCK`: the kernel releases it when the holder's file descriptor closes, including
//! when the holder crashes or is killed, so a lock can never go stale. Who holds it is written to
//! `LOCK.holder` (pid and command line) so a waiter can say what it waits for — the thing DVC
//! users miss when a parallel `dvc repro` fails with "Unable to acquire lock" (anchors A.1, C.2).
//!
//! `LOCK.holder` is replaced atomically (written to a temporary name, then renamed), so a reader
//! sees either the previous holder's line or the new one, never a torn line. It is not removed on
//! exit: a leftover names a process that no longer runs, which is harmless because the `flock`,
//! not the file, decides who holds the cache. In the short window after one holder exits and
//! before the next writes its line, a waiter may name the previous holder.

use std::fs;
use std::io::ErrorKind;
use std::path::Path;

use fs4::fs_std::FileExt;

use crate::error::{io, CacheError, Result};

/// What to do when another process (or another `Store` in this process) holds the cache.
pub enum LockWait<'a> {
    /// Fail at once with [`CacheError::Locked`], naming the holder.
    NoWait,
    /// Wait until the holder releases the cache, calling `notify(holder)` exactly once before
    /// blocking (so a CLI can print "waiting for pid 123 (wdro run …)"). Not called when the lock
    /// is free.
    Wait(&'a dyn Fn(&str)),
}

const LOCK: &str = "LOCK";
const HOLDER: &str = "LOCK.holder";

/// Takes the lock on `root/LOCK` and records this process as its holder. The returned file holds
/// the lock until it is dropped.
pub(crate) fn acquire(root: &Path, wait: LockWait<'_>) -> Result<fs::File> {
    let path = root.join(LOCK);
    let f =
        fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path).map_err(io(&path))?;
    // fs4 maps EWOULDBLOCK to `Ok(false)`; any error here is a real one (e.g. ENOLCK on NFS).
    if !f.try_lock_exclusive().map_err(io(&path))? {
        let holder = read_holder(root);
        match wait {
            LockWait::NoWait => {
                return Err(CacheError::Locked { path: root.to_path_buf(), holder });
            }
            LockWait::Wait(notify) => {
                notify(&holder);
                // A blocking flock wakes the moment the holder closes its descriptor; no polling.
                loop {
                    match f.lock_exclusive() {
                        Ok(()) => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) => return Err(io(&path)(e)),
                    }
                }
            }
        }
    }
    write_holder(root)?;
    Ok(f)
}

/// The holder line of the cache at `root`, for messages. Falls back to a generic phrase when the
/// holder has not written its line yet.
pub fn read_holder(root: &Path) -> String {
    match fs::read_to_string(root.join(HOLDER)) {
        Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
        _ => "another process (it has not written LOCK.holder yet)".to_string(),
    }
}

/// This process, as a waiter should see it: `pid 1234 (wdro run -c exp.toml)`.
pub(crate) fn holder_line() -> String {
    let args: Vec<String> = std::env::args().collect();
    let mut cmd = if args.is_empty() { "unknown command".to_string() } else { args.join(" ") };
    if cmd.chars().count() > 200 {
        cmd = cmd.chars().take(200).collect::<String>() + "…";
    }
    format!("pid {} ({})", std::process::id(), cmd.replace('\n', " "))
}

fn write_holder(root: &Path) -> Result<()> {
    let tmp = root.join(format!("{HOLDER}.{}.tmp", std::process::id()));
    fs::write(&tmp, holder_line() + "\n").map_err(io(&tmp))?;
    let dest = root.join(HOLDER);
    fs::rename(&tmp, &dest).map_err(io(&dest))?;
    Ok(())
}
