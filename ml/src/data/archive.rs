//! Reading the members of an archive input: a tar (gzipped or not, detected by the gzip magic
//! bytes, not the name, because cache blobs have no meaningful names) or a directory (a
//! `file:` source that was not packed). Members are returned with '/'-separated paths relative
//! to the archive root, without a leading `./`.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::DataError;

/// Reads a whole file, gunzipping it when it starts with the gzip magic 1f 8b. Returns the
/// bytes and whether they were decompressed (offsets in errors then refer to the
/// decompressed stream).
pub fn read_maybe_gz(path: &Path) -> Result<(Vec<u8>, bool), DataError> {
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..]).read_to_end(&mut out).map_err(|e| {
            DataError::invalid(path, None, format!("corrupt or truncated gzip stream: {e}; re-download the file"))
        })?;
        Ok((out, true))
    } else {
        Ok((raw, false))
    }
}

/// Members of `path` (tar, tar.gz or directory) whose relative path satisfies `want`, in
/// archive order (sorted by path for directories).
pub fn read_members(path: &Path, want: &dyn Fn(&str) -> bool) -> Result<Vec<(String, Vec<u8>)>, DataError> {
    if path.is_dir() {
        let mut files = Vec::new();
        walk(path, path, &mut files)?;
        files.sort();
        let mut out = Vec::new();
        for (rel, full) in files {
            if want(&rel) {
                out.push((rel, std::fs::read(&full).map_err(|e| DataError::io(&full, e))?));
            }
        }
        return Ok(out);
    }
    let (bytes, _) = read_maybe_gz(path)?;
    let tar_err = |e: std::io::Error| {
        DataError::invalid(path, None, format!("not a readable tar archive ({e}); expected a .tar or .tar.gz"))
    };
    let mut ar = tar::Archive::new(&bytes[..]);
    let mut out = Vec::new();
    for entry in ar.entries().map_err(tar_err)? {
        let mut entry = entry.map_err(tar_err)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path().map_err(tar_err)?.to_string_lossy().trim_start_matches("./").to_string();
        if want(&name) {
            let mut data = Vec::with_capacity(entry.size() as usize);
            entry.read_to_end(&mut data).map_err(tar_err)?;
            out.push((name, data));
        }
    }
    Ok(out)
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<(), DataError> {
    for e in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let e = e.map_err(|e| DataError::io(dir, e))?;
        let p = e.path();
        if p.is_dir() {
            walk(root, &p, out)?;
        } else {
            let rel = p.strip_prefix(root).expect("walk stays under root");
            let rel = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
            out.push((rel, p));
        }
    }
    Ok(())
}

/// The last '/'-component of a member path.
pub fn base_name(member: &str) -> &str {
    member.rsplit('/').next().unwrap_or(member)
}

/// A path naming a member inside an archive, for error messages: `archive.tar.gz[member]`.
pub fn member_path(archive: &Path, member: &str) -> PathBuf {
    PathBuf::from(format!("{}[{member}]", archive.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_gz_and_dir_give_the_same_members() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/a.bin"), b"hello").unwrap();
        std::fs::write(src.join("b.txt"), b"x").unwrap();
        let tgz = dir.path().join("a.tgz");
        let f = std::fs::File::create(&tgz).unwrap();
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(f, flate2::Compression::fast()));
        b.append_dir_all(".", &src).unwrap();
        b.into_inner().unwrap().finish().unwrap();
        let want = |n: &str| n.ends_with(".bin");
        let from_tar = read_members(&tgz, &want).unwrap();
        let from_dir = read_members(&src, &want).unwrap();
        assert_eq!(from_tar, vec![("sub/a.bin".to_string(), b"hello".to_vec())]);
        assert_eq!(from_tar, from_dir);
    }

    #[test]
    fn garbage_is_one_line_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.tar.gz");
        std::fs::write(&p, [0x1f, 0x8b, 8, 0, 0, 0]).unwrap();
        let e = read_members(&p, &|_| true).unwrap_err().to_string();
        assert!(e.contains("x.tar.gz") && !e.contains('\n'), "{e}");
    }
}
