//! Tests of the remote over an in-memory store and a directory (`file://`). The HTTP and S3
//! backends are exercised against real servers by the end-to-end tests (`tests/remote_*.rs`).

use std::collections::BTreeMap;
use std::time::Duration;

use super::maint::RemoteGcOptions;
use super::*;
use crate::record::OutputRef;
use crate::store::{LockWait, Store, StoreOptions};

fn store(dir: &std::path::Path) -> Store {
    // Anything of 1 KiB or more goes to the file tier, so both tiers are exercised cheaply.
    Store::open_with(dir, LockWait::NoWait, StoreOptions { file_tier_min: 1024, fsync: false }).unwrap()
}

fn record(name: &str, outputs: &[(&str, Digest, u64)]) -> StageRecord {
    StageRecord {
        key: StageKey(Digest::of_bytes(name.as_bytes())),
        stage_name: name.to_string(),
        stage_id: "fake".into(),
        version: 1,
        params: serde_json::json!({"n": name}),
        inputs: BTreeMap::new(),
        outputs: outputs
            .iter()
            .map(|(o, d, n)| (o.to_string(), OutputRef { digest: *d, size: *n, kind: "bin".into() }))
            .collect(),
        metrics: serde_json::Value::Null,
        env: BTreeMap::new(),
        wdro_version: "test".into(),
        finished_at: 1,
        duration_ms: 1,
    }
}

fn bytes(seed: u8, n: usize) -> Vec<u8> {
    (0..n).map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[3] ^ seed).collect()
}

/// A stage with one small (sled) and one large (file-tier) output, stored locally.
fn computed(s: &Store, name: &str, seed: u8, big: usize) -> StageRecord {
    let small = bytes(seed, 100);
    let large = bytes(seed.wrapping_add(1), big);
    let ds = s.put_bytes(&small).unwrap();
    let dl = s.put_bytes(&large).unwrap();
    let rec = record(name, &[("small", ds, small.len() as u64), ("large", dl, large.len() as u64)]);
    s.put_record(&rec).unwrap();
    rec
}

fn file_remote(dir: &std::path::Path, opts: RemoteOptions) -> Remote {
    Remote::open(&format!("file://{}", dir.display()), opts).unwrap()
}

#[test]
fn push_then_pull_into_another_cache() {
    let d = tempfile::tempdir().unwrap();
    let a = store(&d.path().join("a"));
    let remote = file_remote(&d.path().join("remote"), RemoteOptions::default());
    assert_eq!(remote.conditional_put().unwrap(), CondPut::Native);
    let rec = computed(&a, "train", 1, 50_000);
    remote.push_stage(&a, &rec).unwrap();
    let sum = remote.wait_pushes();
    assert!(sum.failed.is_empty(), "{:?}", sum.failed);
    assert_eq!(sum.pushed[0].manifest, ManifestPut::Created);
    assert_eq!(sum.blobs_uploaded(), 2);
    assert_eq!(sum.bytes_uploaded(), 50_100);

    // A second user: separate cache, same remote.
    let b = store(&d.path().join("b"));
    let remote_b = file_remote(&d.path().join("remote"), RemoteOptions::default());
    let got = remote_b.get_manifest(&rec.key).unwrap().expect("manifest on the remote");
    assert_eq!(got, rec);
    // Lazy: only the small output.
    let n = remote_b.pull_stage(&b, &got, Some(&["small".to_string()])).unwrap();
    assert_eq!(n, 100);
    assert!(b.get_record(&rec.key).unwrap().is_none(), "incomplete: not recorded locally");
    let n = remote_b.pull_stage(&b, &got, None).unwrap();
    assert_eq!(n, 50_000);
    assert!(b.is_complete(&rec.key).unwrap());
    assert_eq!(b.get_bytes(&rec.outputs["large"].digest).unwrap(), bytes(2, 50_000));
    assert_eq!(remote_b.stats().pulled_bytes, 50_100);
    // Pushing the same result again uploads nothing and finds the manifest present.
    remote_b.push_stage(&b, &got).unwrap();
    let sum = remote_b.wait_pushes();
    assert_eq!(sum.pushed[0].manifest, ManifestPut::Present);
    assert_eq!(sum.bytes_uploaded(), 0);
}

#[test]
fn a_different_manifest_for_a_key_is_a_conflict_and_never_overwrites() {
    let d = tempfile::tempdir().unwrap();
    let remote = Remote::in_memory(RemoteOptions::default()).unwrap();
    let a = store(&d.path().join("a"));
    let first = computed(&a, "attack", 1, 10);
    remote.push_stage(&a, &first).unwrap();
    assert_eq!(remote.wait_pushes().pushed[0].manifest, ManifestPut::Created);
    // Same key, different bytes: a nondeterministic stage.
    let b = store(&d.path().join("b"));
    let mut other = computed(&b, "attack", 7, 10);
    other.key = first.key;
    b.put_record(&other).unwrap();
    remote.forget_manifest(&first.key);
    remote.push_stage(&b, &other).unwrap();
    let sum = remote.wait_pushes();
    match &sum.pushed[0].manifest {
        ManifestPut::Conflict { theirs } => assert_eq!(theirs.outputs, first.outputs),
        m => panic!("expected a conflict, got {m:?}"),
    }
    remote.forget_manifest(&first.key);
    assert_eq!(remote.get_manifest(&first.key).unwrap().unwrap().outputs, first.outputs, "first writer wins");
    let v = remote.verify().unwrap();
    assert_eq!(v.conflicts, vec![first.key.to_string()]);
}

#[test]
fn corrupt_or_truncated_remote_blobs_are_refused_and_never_stored() {
    let d = tempfile::tempdir().unwrap();
    let rdir = d.path().join("remote");
    let remote = file_remote(&rdir, RemoteOptions::default());
    let a = store(&d.path().join("a"));
    let rec = computed(&a, "fetch", 3, 20_000);
    remote.push_stage(&a, &rec).unwrap();
    assert!(remote.wait_pushes().failed.is_empty());
    let large = rec.outputs["large"].digest;
    let h = large.to_hex();
    let blob = rdir.join("blobs").join(&h[..2]).join(&h);
    let mut b = std::fs::read(&blob).unwrap();
    b[500] ^= 0xff;
    std::fs::write(&blob, &b).unwrap();

    let fresh = store(&d.path().join("b"));
    let err = remote.pull_stage(&fresh, &rec, None).unwrap_err();
    assert!(matches!(err, RemoteError::Corrupt { digest, .. } if digest == large), "{err}");
    assert!(err.is_integrity());
    assert!(!fresh.has_blob(&large).unwrap(), "a corrupt blob never enters the store");
    assert!(fresh.get_record(&rec.key).unwrap().is_none());
    assert_eq!(std::fs::read_dir(d.path().join("b/tmp")).unwrap().count(), 0, "no download left behind");
    let v = remote.verify().unwrap();
    assert_eq!(v.corrupt.len(), 1);
    assert_eq!(v.incomplete_manifests.len(), 1);
    assert!(!v.is_clean());

    // Truncated: the size check refuses it before reading.
    std::fs::write(&blob, &b[..100]).unwrap();
    let err = remote.pull_stage(&fresh, &rec, None).unwrap_err();
    assert!(matches!(err, RemoteError::WrongSize { expected: 20_000, actual: 100, .. }), "{err}");
}

#[test]
fn multipart_uploads_large_blobs_in_parts() {
    let d = tempfile::tempdir().unwrap();
    let opts = RemoteOptions { multipart_min: 6 << 20, part_size: 5 << 20, ..Default::default() };
    let remote = file_remote(&d.path().join("remote"), opts);
    let a = store(&d.path().join("a"));
    let rec = computed(&a, "finetune", 9, 12 << 20);
    remote.push_stage(&a, &rec).unwrap();
    let sum = remote.wait_pushes();
    assert!(sum.failed.is_empty(), "{:?}", sum.failed);
    let b = store(&d.path().join("b"));
    remote.pull_stage(&b, &rec, None).unwrap();
    assert_eq!(b.get_bytes(&rec.outputs["large"].digest).unwrap(), bytes(10, 12 << 20));
}

#[test]
fn read_only_never_writes() {
    let d = tempfile::tempdir().unwrap();
    let remote = Remote::in_memory(RemoteOptions { mode: RemoteMode::ReadOnly, ..Default::default() }).unwrap();
    let a = store(d.path());
    let rec = computed(&a, "x", 1, 10);
    assert!(matches!(remote.push_stage(&a, &rec), Err(RemoteError::ReadOnly { .. })));
    assert!(matches!(remote.put_manifest(&rec), Err(RemoteError::ReadOnly { .. })));
    assert!(matches!(remote.put_pin("p", "r"), Err(RemoteError::ReadOnly { .. })));
    assert!(remote.get_manifest(&rec.key).unwrap().is_none());
}

#[test]
fn invalid_manifests_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let rdir = d.path().join("remote");
    let remote = file_remote(&rdir, RemoteOptions::default());
    let mut rec = record("evil", &[]);
    let p = rdir.join(layout::manifest(&object_store::path::Path::default(), &rec.key).as_ref());
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    rec.outputs.insert("../../x".into(), OutputRef { digest: Digest::of_bytes(b""), size: 0, kind: "".into() });
    std::fs::write(&p, serde_json::to_vec(&rec).unwrap()).unwrap();
    let e = remote.get_manifest(&rec.key).unwrap_err().to_string();
    assert!(e.contains("invalid") && e.contains("path separator"), "{e}");
    std::fs::write(&p, vec![b' '; (validate::MAX_MANIFEST_BYTES + 1) as usize]).unwrap();
    let remote = file_remote(&rdir, RemoteOptions::default());
    let e = remote.get_manifest(&rec.key).unwrap_err().to_string();
    assert!(e.contains("more than the limit"), "{e}");
    // A manifest with a credential in it is never pushed.
    let mut leaky = record("leaky", &[]);
    leaky.params = serde_json::json!({"sources": ["https://bob:hunter2@example.org/data"]});
    let e = remote.put_manifest(&leaky).unwrap_err().to_string();
    assert!(e.contains("refusing to push") && !e.contains("hunter2"), "{e}");
}

#[test]
fn gc_keeps_what_pinned_and_recent_runs_reach() {
    let d = tempfile::tempdir().unwrap();
    let remote = file_remote(&d.path().join("remote"), RemoteOptions::default());
    let a = store(&d.path().join("a"));
    let old = computed(&a, "old", 1, 2000);
    let pinned = computed(&a, "pinned", 2, 2000);
    let new = computed(&a, "new", 3, 2000);
    for r in [&old, &pinned, &new] {
        remote.push_stage(&a, r).unwrap();
    }
    assert!(remote.wait_pushes().failed.is_empty());
    let run = |id: &str, r: &StageRecord| RunRecord {
        id: id.into(),
        started_at: 0,
        config_digest: Digest::of_bytes(b""),
        stages: vec![(r.stage_name.clone(), r.key)],
        computed: vec![],
        pinned_as: None,
    };
    assert!(remote.put_run(&run("20260101T000000.000Z-1", &old)).unwrap());
    assert!(remote.put_run(&run("20260102T000000.000Z-1", &pinned)).unwrap());
    assert!(remote.put_run(&run("20260103T000000.000Z-1", &new)).unwrap());
    assert!(!remote.put_run(&run("20260103T000000.000Z-1", &new)).unwrap(), "immutable");
    remote.put_pin("paper", "20260102T000000.000Z-1").unwrap();
    let o = RemoteGcOptions { keep_last_runs: 1, grace: Duration::ZERO, dry_run: true };
    let rep = remote.gc(&o).unwrap();
    let paths: Vec<&str> = rep.items.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(rep.kept_runs, ["20260102T000000.000Z-1", "20260103T000000.000Z-1"], "{rep}");
    assert_eq!(rep.kept_manifests, 2);
    assert_eq!(rep.kept_blobs, 4);
    assert_eq!(paths.len(), 4, "old run, its manifest, its two blobs: {paths:?}");
    assert!(paths.iter().any(|p| p.contains(&old.key.to_string())));
    assert!(remote.get_manifest(&old.key).unwrap().is_some(), "dry run deletes nothing");
    // With a grace period, young objects are kept even when unreachable.
    let rep = remote.gc(&RemoteGcOptions { grace: Duration::from_secs(3600), ..o.clone() }).unwrap();
    assert!(rep.items.is_empty() && rep.kept_young == 4, "{rep}");
    let rep = remote.gc(&RemoteGcOptions { dry_run: false, ..o }).unwrap();
    assert_eq!(rep.items.len(), 4);
    remote.forget_manifest(&old.key);
    assert!(remote.get_manifest(&old.key).unwrap().is_none());
    assert!(remote.verify().unwrap().is_clean());
    let du = remote.du().unwrap();
    assert_eq!((du.blobs, du.manifests, du.runs, du.pins), (4, 2, 2, 1));
    let ls = remote.ls().unwrap();
    assert_eq!(ls.len(), 2);
}

/// An in-memory store whose create-if-absent is missing (like HTTP/WebDAV) or silently ignored
/// (like some S3 clones): the conditional-put probe must notice and fall back to HEAD-then-PUT.
#[derive(Debug)]
struct NoCondPut {
    inner: object_store::memory::InMemory,
    ignore: bool,
}

impl std::fmt::Display for NoCondPut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NoCondPut")
    }
}

#[async_trait::async_trait]
impl object_store::ObjectStore for NoCondPut {
    async fn put_opts(
        &self,
        location: &object_store::path::Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        if opts.mode != PutMode::Overwrite && !self.ignore {
            return Err(object_store::Error::NotImplemented {
                operation: "conditional put".into(),
                implementer: "NoCondPut".into(),
            });
        }
        self.inner.put_opts(location, payload, PutOptions::default()).await
    }
    async fn put_multipart_opts(
        &self,
        location: &object_store::path::Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &object_store::path::Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[test]
fn backends_without_conditional_put_fall_back_to_head_then_put() {
    for ignore in [false, true] {
        let backend = std::sync::Arc::new(NoCondPut { inner: object_store::memory::InMemory::new(), ignore });
        let remote = Remote::from_store(backend, "nocond://", RemoteOptions::default()).unwrap();
        match remote.conditional_put().unwrap() {
            CondPut::HeadThenPut { why } => {
                assert!(why.contains(if ignore { "ignores If-None-Match" } else { "no create-if-absent" }), "{why}")
            }
            CondPut::Native => panic!("the probe must detect the missing conditional put (ignore = {ignore})"),
        }
        let d = tempfile::tempdir().unwrap();
        let a = store(&d.path().join("a"));
        let first = computed(&a, "s", 1, 10);
        remote.push_stage(&a, &first).unwrap();
        assert_eq!(remote.wait_pushes().pushed[0].manifest, ManifestPut::Created);
        // First writer still wins: a different manifest is reported, not written.
        let b = store(&d.path().join("b"));
        let mut other = computed(&b, "s", 9, 10);
        other.key = first.key;
        b.put_record(&other).unwrap();
        remote.push_stage(&b, &other).unwrap();
        assert!(matches!(remote.wait_pushes().pushed[0].manifest, ManifestPut::Conflict { .. }));
        remote.forget_manifest(&first.key);
        assert_eq!(remote.get_manifest(&first.key).unwrap().unwrap().outputs, first.outputs);
    }
}
