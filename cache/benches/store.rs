//! Store throughput against `cp` on the same disk, the sled tier against the file tier, and
//! blake3 with and without rayon. Prints a markdown table (no criterion: the numbers that matter
//! are seconds per 512 MiB, and a handful of repetitions is enough to see them).
//!
//! Run with `bench/cache_bench.sh` (release mode). Knobs: `WDRO_BENCH_DIR` (scratch directory,
//! default the system temp dir; put it on the disk the cache will live on), `WDRO_BENCH_MB`
//! (large blob size, default 512), `WDRO_BENCH_REPS` (default 3).
//!
//! Method. Every contender reads the same source file, which is in the page cache ("warm") unless
//! the row says "cold" (then `posix_fadvise(DONTNEED)` evicts that one file first, which needs no
//! root and leaves the rest of the machine's cache alone). After every timed write, `sync` runs
//! untimed so the next contender does not pay for the previous one's writeback. Contenders are
//! interleaved within each repetition so load from other jobs on the machine hits them alike. The
//! table reports the median and best of the repetitions; ratios use medians. It also reports CPU
//! seconds (user + system of this process's threads, or of the `cp` child), which neighbours on
//! a shared machine cannot inflate: on a busy machine wall-time ratios mostly measure how many
//! cores each contender got, CPU time says how much work it does.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use wdro_cache::{Digest, LockWait, Store, StoreOptions};

const MIB: u64 = 1024 * 1024;

struct Row {
    name: String,
    bytes: u64,
    times: Vec<Duration>,
    /// CPU seconds (user + system, this process's threads and reaped children) per repetition.
    cpu: Vec<f64>,
    baseline: Option<String>,
    note: String,
}

impl Row {
    fn median(&self) -> f64 {
        median(self.times.iter().map(|d| d.as_secs_f64()).collect())
    }
    fn best(&self) -> f64 {
        self.times.iter().map(|d| d.as_secs_f64()).fold(f64::INFINITY, f64::min)
    }
    fn mbps(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.median()
    }
}

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = t.len();
    if n % 2 == 1 {
        t[n / 2]
    } else {
        (t[n / 2 - 1] + t[n / 2]) / 2.0
    }
}

#[derive(Default)]
struct Table {
    rows: Vec<Row>,
}

impl Table {
    fn add(&mut self, name: &str, bytes: u64, baseline: Option<&str>, note: &str) {
        self.rows.push(Row {
            name: name.into(),
            bytes,
            times: Vec::new(),
            cpu: Vec::new(),
            baseline: baseline.map(String::from),
            note: note.into(),
        });
    }
    fn record(&mut self, name: &str, m: Measured) {
        let row = self.rows.iter_mut().find(|r| r.name == name).unwrap_or_else(|| panic!("no row {name}"));
        row.times.push(m.wall);
        row.cpu.push(m.cpu);
    }
    fn print(&self, title: &str) {
        println!("\n### {title}\n");
        println!("| operation | size | median s | best s | MB/s (median) | vs baseline (throughput ratio) | CPU s (median) | note |");
        println!("|---|---:|---:|---:|---:|---|---:|---|");
        for r in &self.rows {
            let vs = match &r.baseline {
                Some(b) => {
                    let base = self.rows.iter().find(|x| &x.name == b).expect("baseline row");
                    format!("{:.2}× {}", base.median() / r.median(), b.replace('`', ""))
                }
                None => "—".into(),
            };
            println!(
                "| {} | {} MiB | {:.3} | {:.3} | {:.0} | {} | {:.3} | {} |",
                r.name,
                r.bytes / MIB,
                r.median(),
                r.best(),
                r.mbps(),
                vs,
                median(r.cpu.clone()),
                r.note
            );
        }
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Incompressible-looking bytes, fast (xorshift64*), so no filesystem or cache can shortcut them.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    assert!(seed % 2 == 1, "odd seeds only, so distinct seeds give distinct data");
    let mut x = seed;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

fn sync_all() {
    let ok = Command::new("sync").status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "`sync` failed");
}

/// Evicts one file from the page cache (no root needed; other files are untouched).
fn evict(path: &Path) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::io::AsRawFd;
        let f = fs::File::open(path).unwrap();
        f.sync_all().unwrap();
        // SAFETY: plain syscall on a valid descriptor.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0, "posix_fadvise failed");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = path;
}

/// Wall time and CPU time of one measured operation.
#[derive(Clone, Copy)]
struct Measured {
    wall: Duration,
    cpu: f64,
}

/// CPU seconds used so far by this process (all threads) and its reaped children. CPU time is
/// what other jobs on a shared machine cannot inflate, so it is reported next to wall time.
fn cpu_now() -> f64 {
    #[cfg(target_os = "linux")]
    {
        let get = |who| {
            // SAFETY: getrusage fills the struct it is given.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            unsafe { libc::getrusage(who, &mut ru) };
            let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
            tv(ru.ru_utime) + tv(ru.ru_stime)
        };
        get(libc::RUSAGE_SELF) + get(libc::RUSAGE_CHILDREN)
    }
    #[cfg(not(target_os = "linux"))]
    0.0
}

fn time<T>(f: impl FnOnce() -> T) -> (Measured, T) {
    let c0 = cpu_now();
    let t0 = Instant::now();
    let out = f();
    let wall = t0.elapsed();
    (Measured { wall, cpu: cpu_now() - c0 }, out)
}

fn run_ok(cmd: &mut Command) {
    let st = cmd.status().expect("spawn");
    assert!(st.success(), "{cmd:?} failed");
}

fn rm(p: &Path) {
    let _ = fs::remove_file(p);
}

fn open(root: &Path, file_tier_min: u64, fsync: bool) -> Store {
    Store::open_with(root, LockWait::NoWait, StoreOptions { file_tier_min, fsync }).unwrap()
}

fn blob_file(root: &Path, d: &Digest) -> PathBuf {
    let h = d.to_hex();
    root.join("blobs").join(&h[..2]).join(&h[2..])
}

fn main() {
    // `cargo bench` passes `--bench`; anything else is ignored.
    let big = env_u64("WDRO_BENCH_MB", 512) * MIB;
    let mid = 32 * MIB;
    let reps = env_u64("WDRO_BENCH_REPS", 3).max(1) as usize;
    let base = std::env::var_os("WDRO_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    fs::create_dir_all(&base).unwrap();
    let scratch = tempfile::tempdir_in(&base).unwrap();
    let dir = scratch.path();
    let load = || {
        fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    };
    println!("## wdro-cache store benchmark\n");
    println!("- scratch dir: `{}` (cp and the store write to the same filesystem)", dir.display());
    println!(
        "- rayon threads: {}, available parallelism: {}",
        rayon::current_num_threads(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!("- repetitions: {reps}; load average at start: {}", load());

    // ---------------------------------------------------------------- hashing, in memory
    let data = pseudo_random(big as usize, 0x9e37_79b9_7f4a_7c15);
    let mut hash = Table::default();
    hash.add("blake3 single-threaded (`Hasher::update`)", big, None, "in memory");
    hash.add(
        "blake3 rayon (`Hasher::update_rayon`)",
        big,
        Some("blake3 single-threaded (`Hasher::update`)"),
        "in memory",
    );
    hash.add(
        "`Digest::of_bytes` (rayon above 128 KiB)",
        big,
        Some("blake3 single-threaded (`Hasher::update`)"),
        "in memory",
    );
    let mut expect = None;
    for _ in 0..reps {
        let (t, h1) = time(|| blake3::Hasher::new().update(&data).finalize());
        hash.record("blake3 single-threaded (`Hasher::update`)", t);
        let (t, h2) = time(|| blake3::Hasher::new().update_rayon(&data).finalize());
        hash.record("blake3 rayon (`Hasher::update_rayon`)", t);
        let (t, d) = time(|| Digest::of_bytes(&data));
        hash.record("`Digest::of_bytes` (rayon above 128 KiB)", t);
        assert_eq!(h1, h2);
        assert_eq!(d.0, *h1.as_bytes());
        expect = Some(d);
    }
    let expect = expect.unwrap();

    // ---------------------------------------------------------------- large blob vs cp
    let src = dir.join("src.bin");
    {
        let mut f = fs::File::create(&src).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    drop(data);
    sync_all();
    let mut t = Table::default();
    let cp = "`cp` (warm source)";
    let cp_sync = "`cp` + `sync FILE` (warm source)";
    let cp_blob = "`cp` of the blob file out of the cache";
    t.add(cp, big, None, "coreutils 9 `cp` uses copy_file_range, as `put_file` does");
    t.add(cp_sync, big, None, "`cp` with the durability `put_file` guarantees");
    t.add("`put_file`, fsync on (default)", big, Some(cp), "copy + hash the copy + fsync + rename + index");
    t.add("`put_file`, fsync on (default) ", big, Some(cp_sync), "same numbers, compared with a durable cp");
    t.add("`put_file`, fsync off", big, Some(cp), "copy + hash + rename + index");
    t.add(
        "`put_file_move`, fsync on",
        big,
        Some(cp_sync),
        "rename in + hash ∥ fsync of a freshly written (dirty) file; no copy",
    );
    t.add(cp_blob, big, None, "baseline for export");
    t.add("`export_to` (copy + verify the copy)", big, Some(cp_blob), "no fsync: a worker reads it at once");
    t.add("`get_bytes` (read + verify into memory)", big, None, "");
    t.add("`cp` (cold source)", big, None, "source evicted with fadvise first");
    t.add("`put_file`, fsync on, cold source", big, Some("`cp` (cold source)"), "");
    t.add("`Digest::of_file` (mmap + rayon), warm", big, None, "hash of a cached file");

    let root_sync = dir.join("cache-fsync");
    let root_nosync = dir.join("cache-nosync");
    let dst = dir.join("dst.bin");
    let moved = dir.join("moved.bin");
    for rep in 0..reps {
        eprintln!("large blob: repetition {}/{reps}", rep + 1);
        // cp, warm.
        let (d, _) = time(|| run_ok(Command::new("cp").arg(&src).arg(&dst)));
        t.record(cp, d);
        sync_all();
        rm(&dst);
        // cp + sync FILE.
        let (d, _) =
            time(|| run_ok(Command::new("sh").arg("-c").arg("cp \"$0\" \"$1\" && sync \"$1\"").arg(&src).arg(&dst)));
        t.record(cp_sync, d);
        rm(&dst);
        sync_all();
        // put_file, fsync on.
        {
            let s = open(&root_sync, wdro_cache::FILE_TIER_MIN, true);
            let (d, got) = time(|| s.put_file(&src).unwrap());
            assert_eq!(got, expect);
            t.record("`put_file`, fsync on (default)", d);
            t.record("`put_file`, fsync on (default) ", d);
            sync_all();
            // export_to and its cp baseline read the blob just stored.
            let blob = blob_file(&root_sync, &expect);
            let (d, _) = time(|| run_ok(Command::new("cp").arg(&blob).arg(&dst)));
            t.record(cp_blob, d);
            sync_all();
            rm(&dst);
            let (d, _) = time(|| s.export_to(&expect, &dst).unwrap());
            t.record("`export_to` (copy + verify the copy)", d);
            sync_all();
            rm(&dst);
            let (d, bytes) = time(|| s.get_bytes(&expect).unwrap());
            assert_eq!(bytes.len() as u64, big);
            drop(bytes);
            t.record("`get_bytes` (read + verify into memory)", d);
            let (d, h) = time(|| Digest::of_file(&src).unwrap());
            assert_eq!(h, expect);
            t.record("`Digest::of_file` (mmap + rayon), warm", d);
            s.remove_blob(&expect).unwrap();
        }
        sync_all();
        // put_file, fsync off.
        {
            let s = open(&root_nosync, wdro_cache::FILE_TIER_MIN, false);
            let (d, _) = time(|| s.put_file(&src).unwrap());
            t.record("`put_file`, fsync off", d);
            sync_all();
            s.remove_blob(&expect).unwrap();
        }
        sync_all();
        // put_file_move: the file to move is made untimed and left dirty, like a worker's
        // fresh output, so the timed part includes writing it back.
        {
            run_ok(Command::new("cp").arg(&src).arg(&moved));
            let s = open(&root_sync, wdro_cache::FILE_TIER_MIN, true);
            let (d, got) = time(|| s.put_file_move(&moved).unwrap());
            assert_eq!(got, expect);
            t.record("`put_file_move`, fsync on", d);
            s.remove_blob(&expect).unwrap();
        }
        sync_all();
        // Cold source.
        evict(&src);
        let (d, _) = time(|| run_ok(Command::new("cp").arg(&src).arg(&dst)));
        t.record("`cp` (cold source)", d);
        sync_all();
        rm(&dst);
        evict(&src);
        {
            let s = open(&root_sync, wdro_cache::FILE_TIER_MIN, true);
            let (d, _) = time(|| s.put_file(&src).unwrap());
            t.record("`put_file`, fsync on, cold source", d);
            s.remove_blob(&expect).unwrap();
        }
        sync_all();
        // Re-warm the source for the next repetition's warm rows.
        Digest::of_file(&src).unwrap();
    }
    rm(&src);

    // ---------------------------------------------------------------- 32 MiB: sled vs file tier
    let mid_data = pseudo_random(mid as usize, 43);
    let mid_src = dir.join("mid.bin");
    fs::write(&mid_src, &mid_data).unwrap();
    let mid_digest = Digest::of_bytes(&mid_data);
    drop(mid_data);
    sync_all();
    let mut m = Table::default();
    let sled_put = "sled tier: `put_file` + `flush`";
    let sled_put_nf = "sled tier: `put_file`, no flush";
    let sled_get = "sled tier: `get_bytes`";
    let sled_exp = "sled tier: `export_to`";
    let file_put = "file tier: `put_file`, fsync on";
    let file_put_nf = "file tier: `put_file`, fsync off";
    let file_get = "file tier: `get_bytes`";
    let file_exp = "file tier: `export_to`";
    let mid_cp = "`cp` (warm source)";
    m.add(mid_cp, mid, None, "");
    m.add(sled_put, mid, Some(file_put), "durable; vs the durable file tier");
    m.add(file_put, mid, Some(mid_cp), "durable");
    m.add(sled_put_nf, mid, Some(file_put_nf), "not durable until the next flush");
    m.add(file_put_nf, mid, Some(mid_cp), "");
    m.add(sled_get, mid, Some(file_get), "");
    m.add(file_get, mid, None, "");
    m.add(sled_exp, mid, Some(file_exp), "");
    m.add(file_exp, mid, None, "");
    let mid_reps = reps.max(5);
    let sled_root = dir.join("cache-sled");
    let file_root = dir.join("cache-file");
    let mut sled_disk_peak = 0u64;
    for rep in 0..mid_reps {
        eprintln!("32 MiB blob: repetition {}/{mid_reps}", rep + 1);
        let (d, _) = time(|| run_ok(Command::new("cp").arg(&mid_src).arg(&dst)));
        m.record(mid_cp, d);
        sync_all();
        rm(&dst);
        for (root, tier_min, put, put_nf, get, exp) in [
            (&sled_root, u64::MAX, sled_put, sled_put_nf, sled_get, sled_exp),
            (&file_root, MIB, file_put, file_put_nf, file_get, file_exp),
        ] {
            for fsync in [true, false] {
                let s = open(root, tier_min, fsync);
                let (d, got) = time(|| {
                    let got = s.put_file(&mid_src).unwrap();
                    if fsync && tier_min == u64::MAX {
                        s.flush().unwrap();
                    }
                    got
                });
                assert_eq!(got, mid_digest);
                m.record(if fsync { put } else { put_nf }, d);
                sync_all();
                if fsync {
                    let (d, b) = time(|| s.get_bytes(&mid_digest).unwrap());
                    assert_eq!(b.len() as u64, mid);
                    m.record(get, d);
                    let (d, _) = time(|| s.export_to(&mid_digest, &dst).unwrap());
                    m.record(exp, d);
                    rm(&dst);
                }
                if tier_min == u64::MAX {
                    sled_disk_peak = sled_disk_peak.max(s.du().unwrap().index_on_disk);
                }
                s.remove_blob(&mid_digest).unwrap();
                sync_all();
            }
        }
    }
    let sled_disk_after = open(&sled_root, u64::MAX, true).du().unwrap().index_on_disk;

    // ---------------------------------------------------------------- tier crossover sweep
    // Durable puts of distinct blobs through `put_bytes`: sled (insert + flush) against the file
    // tier (write + fsync + rename + dir fsync + index insert); then verified reads.
    let mut sweep = Vec::new();
    for size in [256 * 1024, MIB, 2 * MIB, 4 * MIB, 8 * MIB, 16 * MIB, 32 * MIB] {
        let n = ((128 * MIB) / size).clamp(6, 24) as usize;
        eprintln!("tier sweep: {} KiB x {n}", size / 1024);
        let blobs: Vec<Vec<u8>> = (0..n).map(|i| pseudo_random(size as usize, size + 2 * i as u64 + 1)).collect();
        let mut row = (size, n, [0f64; 4], 0u64);
        for (ti, tier_min) in [u64::MAX, 1].into_iter().enumerate() {
            let root = dir.join(format!("sweep-{size}-{ti}"));
            let s = open(&root, tier_min, true);
            let disk0 = s.du().unwrap().index_on_disk;
            let mut puts = Vec::new();
            let mut digests = Vec::new();
            sync_all();
            for b in &blobs {
                let (d, got) = time(|| {
                    let got = s.put_bytes(b).unwrap();
                    if tier_min == u64::MAX {
                        s.flush().unwrap();
                    }
                    got
                });
                puts.push(d.wall.as_secs_f64());
                digests.push(got);
            }
            sync_all();
            let mut gets = Vec::new();
            for d in &digests {
                let (t, b) = time(|| s.get_bytes(d).unwrap());
                assert_eq!(b.len() as u64, size);
                gets.push(t.wall.as_secs_f64());
            }
            puts.sort_by(|a, b| a.partial_cmp(b).unwrap());
            gets.sort_by(|a, b| a.partial_cmp(b).unwrap());
            row.2[ti * 2] = puts[puts.len() / 2];
            row.2[ti * 2 + 1] = gets[gets.len() / 2];
            if tier_min == u64::MAX {
                row.3 = s.du().unwrap().index_on_disk.saturating_sub(disk0);
            }
            drop(s);
            let _ = fs::remove_dir_all(&root);
            sync_all();
        }
        sweep.push(row);
    }

    hash.print(&format!("blake3 hashing, {} MiB in memory", big / MIB));
    t.print(&format!("{} MiB blob (file tier) against `cp` on the same disk", big / MIB));
    m.print("32 MiB blob: sled tier against file tier");
    println!(
        "\nsled's files (`Db::size_on_disk`) while it held the 32 MiB blob: up to {:.1} MiB; after {} puts and removes of that one blob: {:.1} MiB (sled reclaims deleted values lazily)",
        sled_disk_peak as f64 / MIB as f64,
        2 * mid_reps,
        sled_disk_after as f64 / MIB as f64
    );
    println!("\n### Tier crossover: durable `put_bytes` and verified `get_bytes`, median per blob\n");
    println!("| blob size | blobs | sled put + flush ms | file put (fsync) ms | sled get ms | file get ms | sled index growth / bytes stored |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for (size, n, t, growth) in &sweep {
        println!(
            "| {} KiB | {n} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1}× |",
            size / 1024,
            t[0] * 1e3,
            t[2] * 1e3,
            t[1] * 1e3,
            t[3] * 1e3,
            *growth as f64 / (*size as f64 * *n as f64)
        );
    }
    println!("\nload average at end: {}", load());
}
