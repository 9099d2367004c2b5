//! Cross-checks of the model zoo against real PyTorch (fixtures written by
//! tests/reference/make_fixtures.py): the state-dict keys must be exactly PyTorch's and the
//! logits on the first 16 CIFAR-10 test images must agree to 1e-4 relative.
//!
//! The large models use closed-form weights (`formula_fill`, mirrored from the script) so no
//! weights are committed; the real `.pt` round trips are in checkpoint.rs.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};
use wdro_ml::checkpoint;
use wdro_ml::models::{self, Net};
use wdro_stages::params::{cifar_norm, Arch, Normalization};

/// Mirror of `formula_fill` in make_fixtures.py.
fn formula_fill(net: &mut Net) {
    let vars = net.vs.variables();
    let keys: Vec<&String> = vars.keys().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    tch::no_grad(|| {
        for (j, k) in keys.iter().enumerate() {
            let mut t = vars[*k].shallow_clone();
            if k.ends_with("num_batches_tracked") {
                let _ = t.zero_();
                continue;
            }
            let n = t.numel() as i64;
            let b = (Tensor::arange(n, (Kind::Double, Device::Cpu)) * 0.37 + 1.3 * j as f64)
                .sin()
                .view(t.size().as_slice());
            let v = if k.ends_with("running_var") {
                &b * &b * 0.5 + 1.0
            } else if k.ends_with("running_mean") || k.ends_with("bias") {
                b * 0.1
            } else if t.dim() == 1 {
                b * 0.1 + 1.0
            } else {
                let fan_in = n / t.size()[0];
                b * (2.0 / fan_in as f64).sqrt()
            };
            t.copy_(&v.to_kind(t.kind()));
        }
    });
}

fn engstrom_norm() -> Option<Normalization> {
    Some(Normalization { mean: vec![0.4914, 0.4822, 0.4465], std: vec![0.2023, 0.1994, 0.2010] })
}

fn formula_cases() -> Vec<(&'static str, Arch)> {
    vec![
        ("preact18_wong", Arch::PreactResnet18 { bn_before_fc: false, v2_shortcut: false, normalize: cifar_norm() }),
        ("preact18_rice_l2", Arch::PreactResnet18 { bn_before_fc: true, v2_shortcut: true, normalize: cifar_norm() }),
        ("resnet18", Arch::Resnet { depth: 18, normalize: None }),
        ("resnet50_engstrom", Arch::Resnet { depth: 50, normalize: engstrom_norm() }),
        ("dmpreact18", Arch::DmPreactResnet { depth: 18, normalize: cifar_norm() }),
        ("wrn16_2_sub_norm", Arch::WideResnet { depth: 16, widen: 2, sub_block1: true, normalize: cifar_norm() }),
        ("dmwrn28_2", Arch::DmWideResnet { depth: 28, width: 2, normalize: cifar_norm() }),
    ]
}

#[test]
fn formula_models_match_pytorch_keys_and_logits() {
    let (x, _) = inputs16();
    let path = fixture("models/formula_logits.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let logits: BTreeMap<String, Tensor> = checkpoint::read_safetensors(&path).unwrap();
    let mut errs = Vec::new();
    for (name, arch) in formula_cases() {
        let mut net = models::new_net(&arch, Device::Cpu);
        let want_keys: Vec<String> = serde_json::from_str(&meta[&format!("keys:{name}")]).unwrap();
        let mut have_keys: Vec<String> = net.vs.variables().into_keys().collect();
        have_keys.sort();
        assert_eq!(have_keys, want_keys, "{name}: variable names differ from PyTorch's state-dict keys");
        formula_fill(&mut net);
        let got = tch::no_grad(|| net.forward_t(&x, false));
        let err = max_rel_err(&got, &logits[name]);
        eprintln!("{name}: max |Δ| / max |ref| = {err:.2e}");
        errs.push((name, err));
    }
    for (name, err) in errs {
        assert!(err < 1e-4, "{name}: logits differ from PyTorch by {err:e} (relative)");
    }
}

#[test]
fn every_arch_builds_and_runs_on_its_input_shape() {
    let archs = [
        Arch::SmallCnn { in_channels: 1, num_classes: 10 },
        Arch::SmallCnn { in_channels: 3, num_classes: 10 },
        Arch::WideResnet { depth: 10, widen: 1, sub_block1: false, normalize: None },
        Arch::DmWideResnet { depth: 10, width: 1, normalize: cifar_norm() },
        Arch::DmPreactResnet { depth: 34, normalize: cifar_norm() },
        Arch::Resnet { depth: 34, normalize: None },
        Arch::KerasCifarCnn,
    ];
    for a in archs {
        let net = models::new_net(&a, Device::Cpu);
        let [c, h, w] = models::input_shape(&a);
        let h = if matches!(a, Arch::SmallCnn { in_channels: 3, .. }) { 32 } else { h };
        let x = Tensor::rand([3, c, h, w], (Kind::Float, Device::Cpu));
        let y = net.forward_t(&x, true);
        assert_eq!(y.size(), [3, 10], "{a:?}");
        y.sum(Kind::Float).backward();
        assert_eq!(models::input_scale(&a), 1.0);
    }
}

#[test]
fn training_mode_updates_batchnorm_like_pytorch() {
    // BN in train mode: batch statistics, running stats move by momentum 0.1, counter + 1.
    let arch = Arch::WideResnet { depth: 10, widen: 1, sub_block1: false, normalize: None };
    let net = models::new_net(&arch, Device::Cpu);
    let x = Tensor::rand([4, 3, 32, 32], (Kind::Float, Device::Cpu));
    let _ = net.forward_t(&x, true);
    let v = net.vs.variables();
    assert_eq!(v["bn1.num_batches_tracked"].int64_value(&[]), 1);
    assert!(v["block1.layer.0.bn1.running_mean"].abs().sum(Kind::Float).double_value(&[]) > 0.0);
}

/// The real pretrained Keras CNN (cifar-10-model 7.4.0) on the 20 real CIFAR-10 test images:
/// 20/20 correct and the reference outputs of shared/notes/offline-data.md §3 to 1e-3.
#[test]
fn keras_cifar_cnn_is_20_of_20_with_reference_outputs() {
    let weights = data_dir().join("cifar-10-model/cnn_model.safetensors");
    let net = checkpoint::load_net(&Arch::KerasCifarCnn, &weights, Device::Cpu).unwrap();
    let b = wdro_ml::data::png_folder::read_png_set(&repo().join("data/foolbox/cifar10"), "cifar10_", vec![]).unwrap();
    let x = b.to_float(Device::Cpu);
    let out = tch::no_grad(|| net.forward_t(&x, false));
    let pred = Vec::<i64>::try_from(out.argmax(1, false)).unwrap();
    let labels = Vec::<i64>::try_from(&b.labels).unwrap();
    let correct = pred.iter().zip(&labels).filter(|(a, b)| a == b).count();
    eprintln!("Keras CIFAR CNN: {correct}/20 correct");
    assert_eq!(correct, 20, "predictions {pred:?} vs labels {labels:?}");
    let reference: [[f64; 10]; 3] = [
        [2.0994, 0.0, 3.5553, 8.4945, 1.4380, 5.3128, 2.6331, 2.7686, 0.1344, 1.0188],
        [6.2629, 9.9790, 0.0, 0.7599, 1.0268, 0.0, 0.7616, 0.0, 13.3875, 6.2300],
        [4.1770, 6.2271, 0.2312, 0.6535, 0.0, 0.0, 0.0, 0.0, 6.9927, 5.1762],
    ];
    let mut worst = 0f64;
    for (i, r) in reference.iter().enumerate() {
        let got = Vec::<f64>::try_from(out.get(i as i64).to_kind(Kind::Double)).unwrap();
        for (g, w) in got.iter().zip(r) {
            worst = worst.max((g - w).abs());
            assert!((g - w).abs() < 1e-3, "image {i}: {got:?} vs reference {r:?}");
        }
    }
    eprintln!("Keras CIFAR CNN: max |Δ| to the 4-decimal reference outputs = {worst:.1e}");
    // The input-range mistake (feeding 0..255 to a model that scales by 255 itself) is visible.
    let wrong = tch::no_grad(|| net.forward_t(&(&x / 255.0), false)).argmax(1, false);
    let wrong_correct = Vec::<i64>::try_from(wrong).unwrap().iter().zip(&labels).filter(|(a, b)| a == b).count();
    assert!(wrong_correct <= 4, "{wrong_correct}");
}

// ---- helpers (each test file is its own crate; kept inline rather than in a shared module)

fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn fixture(rel: &str) -> std::path::PathBuf {
    repo().join("tests/fixtures").join(rel)
}

/// `.data` (made by scripts/setup-data.sh); a clear failure when it is missing.
fn data_dir() -> std::path::PathBuf {
    let d = repo().join(".data");
    assert!(
        d.join("cifar-10-model/cnn_model.safetensors").exists(),
        "{} is missing: run scripts/setup.sh (or scripts/setup-data.sh) first",
        d.display()
    );
    d
}

/// The 16 fixture images as f32 [0,1] and their labels.
fn inputs16() -> (Tensor, Tensor) {
    let t = checkpoint::read_safetensors(&fixture("models/inputs16.safetensors")).unwrap();
    (t["x_u8"].to_kind(Kind::Float) / 255.0, t["labels"].shallow_clone())
}

/// max |a − b| / max |b|.
fn max_rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let d = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[]);
    d / b.to_kind(Kind::Double).abs().max().double_value(&[]).max(1e-12)
}
