//! Checkpoint loading against files written by real PyTorch 2.13 (see
//! tests/reference/make_fixtures.py): OrderedDict state dicts, nested + `module.`-prefixed +
//! fp16 checkpoints, non-contiguous views, and the files that must be refused.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use wdro_ml::checkpoint::{self, CheckpointError};
use wdro_ml::models;
use wdro_stages::params::{cifar_norm, Arch};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/models").join(name)
}

fn inputs16() -> Tensor {
    let t = checkpoint::read_safetensors(&fixture("inputs16.safetensors")).unwrap();
    t["x_u8"].to_kind(Kind::Float) / 255.0
}

/// max |a − b| / max |b|.
fn max_rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let d = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[]);
    d / b.to_kind(Kind::Double).abs().max().double_value(&[]).max(1e-12)
}

fn wrn16_2() -> Arch {
    Arch::WideResnet { depth: 16, widen: 2, sub_block1: false, normalize: None }
}

fn dmwrn16_2() -> Arch {
    Arch::DmWideResnet { depth: 16, width: 2, normalize: cifar_norm() }
}

#[test]
fn torch_save_state_dicts_give_pytorch_logits() {
    let x = inputs16();
    let want = checkpoint::read_safetensors(&fixture("pt_logits.safetensors")).unwrap();
    for (file, arch, key) in
        [("wrn16_2.pt", wrn16_2(), "wrn16_2"), ("dmwrn16_2_fp16_nested.pt", dmwrn16_2(), "dmwrn16_2_fp16_nested")]
    {
        let net = checkpoint::load_net(&arch, &fixture(file), Device::Cpu).unwrap();
        let got = tch::no_grad(|| net.forward_t(&x, false));
        let err = max_rel_err(&got, &want[key]);
        eprintln!("{file}: max |Δ| / max |ref| = {err:.2e}");
        assert!(err < 1e-4, "{file}: {err:e}");
        // Every float variable is f32 after loading fp16; counters stay i64.
        for (k, v) in net.vs.variables() {
            let want_kind = if k.ends_with("num_batches_tracked") { Kind::Int64 } else { Kind::Float };
            assert_eq!(v.kind(), want_kind, "{file}: {k}");
        }
    }
}

#[test]
fn ordered_dict_keys_and_counters_are_read() {
    let sd = checkpoint::read_state_dict(&fixture("wrn16_2.pt")).unwrap();
    assert_eq!(sd["conv1.weight"].size(), [16, 3, 3, 3]);
    assert_eq!(sd["block1.layer.0.convShortcut.weight"].size(), [32, 16, 1, 1]);
    let nbt = &sd["bn1.num_batches_tracked"];
    assert_eq!(nbt.kind(), Kind::Int64);
    assert!(nbt.int64_value(&[]) >= 1);
    // Nested under `state_dict`, with `module.` stripped, fp16 as stored.
    let sd = checkpoint::read_state_dict(&fixture("dmwrn16_2_fp16_nested.pt")).unwrap();
    assert!(sd.contains_key("init_conv.weight") && !sd.keys().any(|k| k.starts_with("module.")));
    assert_eq!(sd["logits.weight"].kind(), Kind::Half);
}

#[test]
fn views_offsets_strides_and_shared_storages() {
    let pt = checkpoint::read_state_dict(&fixture("views.pt")).unwrap();
    let st = checkpoint::read_safetensors(&fixture("views.safetensors")).unwrap();
    assert_eq!(pt.keys().collect::<Vec<_>>(), st.keys().collect::<Vec<_>>());
    for (k, v) in &pt {
        assert_eq!(v.kind(), st[k].kind(), "{k}");
        assert!(v.equal(&st[k]), "{k}: {v:?} vs {:?}", st[k]);
    }
    assert_eq!(
        Vec::<f32>::try_from(pt["offset_slice"].flatten(0, -1)).unwrap(),
        vec![8.0, 9.0, 10.0, 14.0, 15.0, 16.0]
    );
}

fn one_line(e: &CheckpointError) -> String {
    let s = e.to_string();
    assert!(!s.contains('\n'), "multi-line error: {s}");
    s
}

#[test]
fn malicious_pickle_is_refused_by_name() {
    let e = checkpoint::read_state_dict(&fixture("malicious.pt")).unwrap_err();
    let s = one_line(&e);
    // os.system pickles as posix.system on Linux.
    assert!(s.contains("malicious.pt") && s.contains("refusing pickle global posix.system"), "{s}");
    assert!(s.contains("only state-dict globals are allowed"), "{s}");
}

#[test]
fn truncated_and_legacy_files_are_clear_errors() {
    let s = one_line(&checkpoint::read_state_dict(&fixture("truncated.pt")).unwrap_err());
    assert!(s.contains("truncated.pt") && s.contains("truncated or corrupt"), "{s}");
    let s = one_line(&checkpoint::read_state_dict(&fixture("legacy.pt")).unwrap_err());
    assert!(s.contains("legacy.pt") && s.contains("re-save it with torch.save"), "{s}");
    let d = tempfile::tempdir().unwrap();
    let junk = d.path().join("junk.bin");
    std::fs::write(&junk, b"hello world, not a checkpoint").unwrap();
    let s = one_line(&checkpoint::read_state_dict(&junk).unwrap_err());
    assert!(s.contains("junk.bin") && s.contains("not a checkpoint"), "{s}");
}

#[test]
fn wrong_arch_lists_the_offending_keys() {
    let arch = Arch::WideResnet { depth: 16, widen: 4, sub_block1: true, normalize: None };
    let e = checkpoint::load_net(&arch, &fixture("wrn16_2.pt"), Device::Cpu).unwrap_err();
    let s = one_line(&e);
    assert!(s.contains("does not fit WideResnet"), "{s}");
    assert!(s.contains("missing keys [sub_block1.layer.0.bn1.bias"), "{s}");
    assert!(s.contains("fc.weight: file [10, 128] vs model [10, 256]"), "{s}");
}

#[test]
fn canonical_output_is_one_blob_per_weights() {
    // The same weights from a .pt (OrderedDict) and from the canonical file re-loaded give
    // byte-identical canonical files and identical logits.
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.safetensors"), d.path().join("b.safetensors"));
    let net = checkpoint::load_net(&wrn16_2(), &fixture("wrn16_2.pt"), Device::Cpu).unwrap();
    checkpoint::save_canonical(&net, &a).unwrap();
    let net2 = checkpoint::load_net(&wrn16_2(), &a, Device::Cpu).unwrap();
    checkpoint::save_canonical(&net2, &b).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let x = inputs16();
    let (y1, y2) = tch::no_grad(|| (net.forward_t(&x, false), net2.forward_t(&x, false)));
    assert!(y1.equal(&y2));
    let sd = checkpoint::read_safetensors(&a).unwrap();
    assert_eq!(sd.len(), net.vs.variables().len());
    assert!(sd.values().all(|t| matches!(t.kind(), Kind::Float | Kind::Int64)));
}

#[test]
fn n_params_counts_trainables() {
    let net = models::new_net(&wrn16_2(), Device::Cpu);
    let sd = checkpoint::read_state_dict(&fixture("wrn16_2.pt")).unwrap();
    let want: i64 = sd
        .iter()
        .filter(|(k, _)| !k.contains("running_") && !k.ends_with("num_batches_tracked"))
        .map(|(_, v)| v.numel() as i64)
        .sum();
    assert_eq!(net.n_params(), want);
}
