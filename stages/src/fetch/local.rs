//! Local sources: a file is copied (hashing as it goes); a directory becomes a deterministic tar,
//! so that the same tree gives the same bytes, and hence the same digest and cache key, whoever
//! made it, whenever, on whatever file system.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;

use super::digest::{Digests, Hasher};

/// Copies `src` to `dest`, returning the digests of the bytes written. `progress(done, total)`.
pub(crate) fn copy_file(
    src: &Path,
    dest: &Path,
    want_sha256: bool,
    progress: &dyn Fn(u64, u64),
) -> io::Result<Digests> {
    let mut input = File::open(src)?;
    let total = input.metadata()?.len();
    let mut out = BufWriter::new(File::create(dest)?);
    let mut h = Hasher::new(want_sha256);
    let mut buf = vec![0u8; 1 << 16];
    let mut last_report = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&buf[..n])?;
        h.update(&buf[..n]);
        let d = h.bytes();
        if d - last_report >= 1 << 20 {
            last_report = d;
            progress(d, total);
        }
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    let d = h.finish();
    progress(d.bytes, d.bytes.max(total));
    Ok(d)
}

/// Writes `dir` as a tar to `dest`. Deterministic by construction: entries in byte order of their
/// names, depth first, paths relative to `dir` (so the directory's own name and location do not
/// matter), mtime 0, uid/gid 0, no user/group names, modes normalised to 0755 (directories and
/// executables) / 0644 (other files), symlinks stored as links, never followed (no cycles, no
/// escaping the tree). Sockets, fifos and devices are refused: they have no content to fetch.
pub(crate) fn tar_dir(dir: &Path, dest: &Path) -> io::Result<()> {
    let mut b = tar::Builder::new(BufWriter::new(File::create(dest)?));
    b.follow_symlinks(false);
    add_dir(&mut b, dir, Path::new(""))?;
    let mut w = b.into_inner()?;
    w.flush()?;
    w.into_inner().map_err(|e| e.into_error())?.sync_all()
}

fn add_dir<W: Write>(b: &mut tar::Builder<W>, abs: &Path, rel: &Path) -> io::Result<()> {
    let mut entries = fs::read_dir(abs)?.collect::<Result<Vec<_>, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let abs_p = e.path();
        let rel_p = rel.join(e.file_name());
        let meta = fs::symlink_metadata(&abs_p)?;
        let ft = meta.file_type();
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            b.append_data(&mut h, &rel_p, io::empty())?;
            add_dir(b, &abs_p, &rel_p)?;
        } else if ft.is_file() {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(if is_executable(&meta) { 0o755 } else { 0o644 });
            h.set_size(meta.len());
            let reader = ExactReader { inner: File::open(&abs_p)?, left: meta.len(), path: &abs_p };
            b.append_data(&mut h, &rel_p, reader)?;
        } else if ft.is_symlink() {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_mode(0o777);
            h.set_size(0);
            b.append_link(&mut h, &rel_p, fs::read_link(&abs_p)?)?;
        } else {
            return Err(io::Error::other(format!("{} is not a regular file, directory or symlink", abs_p.display())));
        }
    }
    Ok(())
}

#[cfg(unix)]
fn is_executable(meta: &fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn is_executable(_meta: &fs::Metadata) -> bool {
    false
}

/// Reads exactly the size recorded in the tar header: a file that grows or shrinks while being
/// archived is an error rather than a corrupt tar.
struct ExactReader<'a> {
    inner: File,
    left: u64,
    path: &'a Path,
}

impl Read for ExactReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(io::Error::other(format!("{} grew while it was being archived", self.path.display()))),
            };
        }
        let cap = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..cap])?;
        if n == 0 {
            return Err(io::Error::other(format!("{} shrank while it was being archived", self.path.display())));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Content fingerprint of an unpinned local source, so that editing the file (or a file in the
/// directory) changes the stage key even though the config did not change — the same contract
/// DVC gives for a changed dependency. A file hashes its bytes; a directory hashes the sorted
/// list of (relative path, size, blake3 of the bytes). `missing` when the path does not exist
/// (the run then fails with the fetch error that names it).
pub(crate) fn fingerprint(path: &Path) -> String {
    fn walk(abs: &Path, rel: &Path, h: &mut blake3::Hasher) -> io::Result<()> {
        let mut entries: Vec<_> = fs::read_dir(abs)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let r = rel.join(e.file_name());
            if p.is_dir() {
                walk(&p, &r, h)?;
            } else {
                let mut fh = blake3::Hasher::new();
                fh.update_mmap(&p)?;
                h.update(r.to_string_lossy().as_bytes());
                h.update(&[0]);
                h.update(&fs::metadata(&p)?.len().to_le_bytes());
                h.update(fh.finalize().as_bytes());
            }
        }
        Ok(())
    }
    let mut h = blake3::Hasher::new();
    let r = if path.is_dir() {
        walk(path, Path::new(""), &mut h)
    } else if path.is_file() {
        h.update_mmap(path).map(|_| ())
    } else {
        return "missing".into();
    };
    match r {
        Ok(()) => format!("blake3:{}", h.finalize().to_hex()),
        Err(e) => format!("unreadable: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_is_independent_of_mtime_and_location() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for root in [a.path(), b.path()] {
            fs::create_dir_all(root.join("t/sub/empty")).unwrap();
            fs::write(root.join("t/z.txt"), b"zz").unwrap();
            fs::write(root.join("t/a.txt"), b"aa").unwrap();
            fs::write(root.join("t/sub/m.bin"), vec![7u8; 3000]).unwrap();
        }
        // Different mtimes for the second tree.
        let f = File::options().write(true).open(b.path().join("t/a.txt")).unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(12345)).unwrap();
        let out = tempfile::tempdir().unwrap();
        tar_dir(&a.path().join("t"), &out.path().join("1.tar")).unwrap();
        tar_dir(&b.path().join("t"), &out.path().join("2.tar")).unwrap();
        let one = fs::read(out.path().join("1.tar")).unwrap();
        assert_eq!(one, fs::read(out.path().join("2.tar")).unwrap());

        let mut ar = tar::Archive::new(&one[..]);
        let names: Vec<String> =
            ar.entries().unwrap().map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["a.txt", "sub", "sub/empty", "sub/m.bin", "z.txt"]);
        let mut ar = tar::Archive::new(&one[..]);
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            assert_eq!(h.mtime().unwrap(), 0);
            assert_eq!(h.uid().unwrap(), 0);
            assert!(matches!(h.mode().unwrap(), 0o644 | 0o755));
        }
    }

    #[test]
    fn copy_hashes_what_it_writes() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("src"), b"abc").unwrap();
        let seen = std::sync::Mutex::new(Vec::new());
        let dg =
            copy_file(&d.path().join("src"), &d.path().join("dst"), true, &|a, b| seen.lock().unwrap().push((a, b)))
                .unwrap();
        assert_eq!(fs::read(d.path().join("dst")).unwrap(), b"abc");
        assert_eq!(dg.bytes, 3);
        assert!(dg.sha256.is_some());
        assert_eq!(seen.lock().unwrap().last(), Some(&(3, 3)));
    }
}
