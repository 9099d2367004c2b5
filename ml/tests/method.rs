//! Invariants of the method (spec §2–§5) on the committed fixture (a tiny BatchNorm CNN and 32
//! real Fashion-MNIST test images, tests/fixtures/method/): ReDLR W-PGD leaves clean-misclassified
//! points untouched, every attack stays inside its ball, V(0) = A·V_S + (1 − A)·W(0), Υ is
//! invariant to batching and merges exactly over shards, pointwise attacks report per-sample
//! worst cases, and fine-tuning resumes after an interruption to the same final weights.

use std::collections::HashMap;
use std::path::PathBuf;

use tch::{nn, nn::ModuleT, Device, Kind, Tensor};
use wdro_ml::attacks::apgd::{Apgd, ApgdLoss};
use wdro_ml::attacks::batch::image_norm;
use wdro_ml::attacks::budget::{BudgetReading, WPgdBudget};
use wdro_ml::attacks::pgd::Pgd;
use wdro_ml::attacks::wpgd::WPgd;
use wdro_ml::attacks::{combine_robust, transport_cost, Attack, MethodError};
use wdro_ml::finetune::{self, RunOptions, Set, Sets};
use wdro_ml::losses::ALL_LOSSES;
use wdro_ml::{clean, upsilon};
use wdro_stages::params::{FinetuneParams, L2WInfProj, LinfW2Proj, Loss, Norm};

#[derive(Debug)]
struct TinyNet {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    conv3: nn::Conv2D,
    bn3: nn::BatchNorm,
    fc: nn::Linear,
}

impl TinyNet {
    fn new(p: &nn::Path) -> Self {
        let c = |stride| nn::ConvConfig { stride, padding: 1, bias: false, ..Default::default() };
        TinyNet {
            conv1: nn::conv2d(p / "conv1", 1, 8, 3, c(1)),
            bn1: nn::batch_norm2d(p / "bn1", 8, Default::default()),
            conv2: nn::conv2d(p / "conv2", 8, 16, 3, c(2)),
            bn2: nn::batch_norm2d(p / "bn2", 16, Default::default()),
            conv3: nn::conv2d(p / "conv3", 16, 32, 3, c(2)),
            bn3: nn::batch_norm2d(p / "bn3", 32, Default::default()),
            fc: nn::linear(p / "fc", 32, 10, Default::default()),
        }
    }
}

impl ModuleT for TinyNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let h = x.apply(&self.conv1).apply_t(&self.bn1, train).relu();
        let h = h.apply(&self.conv2).apply_t(&self.bn2, train).relu();
        let h = h.apply(&self.conv3).apply_t(&self.bn3, train).relu();
        h.adaptive_avg_pool2d([1, 1]).flatten(1, -1).apply(&self.fc)
    }
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/method")
}

fn model() -> (nn::VarStore, TinyNet) {
    // One intra-op thread: the harness already runs tests in parallel, and oversubscribed
    // OpenMP pools spin (these tests check invariants, not bit parity with PyTorch).
    tch::set_num_threads(1);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = TinyNet::new(&vs.root());
    vs.load(fixtures().join("model.safetensors")).expect("fixture model");
    (vs, net)
}

fn data() -> (Tensor, Tensor) {
    let d: HashMap<String, Tensor> =
        Tensor::read_safetensors(fixtures().join("data.safetensors")).unwrap().into_iter().collect();
    (d["images"].shallow_clone(), d["labels"].shallow_clone())
}

const NOP: &dyn Fn(u64, u64, &str) = &|_, _, _| {};

/// Every test here runs alone: the harness runs tests on parallel threads of one process, which
/// share torch's global generator, and even building a model draws from it (the layers' default
/// init, before the fixture weights are loaded), which would shift the draws of a fine-tuning
/// test running beside it (seen as a flaky bit-exact resume check).
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn redlr_wpgd_never_moves_clean_misclassified_points() {
    let _g = rng_lock();
    let (_vs, net) = model();
    let (x, y) = data();
    let x0 = x.to_kind(Kind::Float) / 255.0;
    for (q, norm, delta) in
        [(2, Norm::Linf, 8.0 / 255.0), (2, Norm::L2, 0.5), (1, Norm::Linf, 8.0 / 255.0), (1, Norm::L2, 0.5)]
    {
        let mut a = WPgd::pgd(q, norm, delta, Loss::Redlr, 16);
        a.itr = 10;
        let r = a.run(&net, &x, &y, NOP).unwrap();
        let wrong = r.clean_correct.logical_not();
        assert!(wrong.sum(Kind::Int64).int64_value(&[]) > 0, "the fixture has misclassified points");
        for it in [&r.adv, &r.last_iterate] {
            let moved = image_norm(&(it - &x0), f64::INFINITY).masked_select(&wrong);
            assert_eq!(moved.max().double_value(&[]), 0.0, "q={q} {norm:?}: a misclassified point moved");
        }
        // And the correctly classified ones did move (the budget went to them).
        let moved_ok = image_norm(&(&r.last_iterate - &x0), f64::INFINITY).masked_select(&r.clean_correct);
        assert!(moved_ok.max().double_value(&[]) > 0.0);
    }
}

#[test]
fn every_attack_stays_in_its_ball() {
    let _g = rng_lock();
    let (_vs, net) = model();
    let (x, y) = data();
    let tol = 1.0 + 1e-5;
    for (norm, delta) in [(Norm::Linf, 8.0 / 255.0), (Norm::L2, 0.5)] {
        for q in [1u8, 2] {
            for loss in [Loss::Redlr, Loss::Ce, Loss::Dlr] {
                for (l2, linf) in [(L2WInfProj::Ball, LinfW2Proj::Clip), (L2WInfProj::Sphere, LinfW2Proj::Scale)] {
                    let mut a = WPgd::pgd(q, norm, delta, loss, 16);
                    a.itr = 5;
                    a.l2_w_inf_proj = l2;
                    a.linf_w2_proj = linf;
                    let r = a.run(&net, &x, &y, NOP).unwrap();
                    for it in [&r.adv, &r.last_iterate] {
                        let c = transport_cost(&x, it, q, norm);
                        assert!(c <= delta * tol, "W-PGD q={q} {norm:?} {loss:?} {l2:?} {linf:?}: cost {c} > {delta}");
                        assert!(it.min().double_value(&[]) >= 0.0 && it.max().double_value(&[]) <= 1.0);
                    }
                    assert!((r.w_dist - transport_cost(&x, &r.adv, q, norm)).abs() < 1e-9);
                }
            }
            for reading in [BudgetReading::R1, BudgetReading::R2] {
                let mut b = WPgdBudget::r1(q, norm, delta, Loss::Redlr, 16);
                b.itr = 5;
                b.reading = reading;
                let r = b.run(&net, &x, &y, NOP).unwrap();
                let c = transport_cost(&x, &r.last_iterate, q, norm);
                assert!(c <= delta * tol, "W-PGD-budget {reading:?} q={q} {norm:?}: cost {c}");
            }
        }
        let pgd =
            Pgd { norm, eps: delta, step: delta / 4.0, itr: 5, loss: Loss::Ce, restarts: 2, seed: 1, batch_size: 16 };
        let r = pgd.run(&net, &x, &y, NOP).unwrap();
        assert!(transport_cost(&x, &r.adv, 1, norm) <= delta * tol, "PGD {norm:?}");
        assert_eq!(r.robust.logical_and(&r.clean_correct.logical_not()).sum(Kind::Int64).int64_value(&[]), 0);
        assert!(r.n_success() > 0, "PGD {norm:?} fooled nothing");
        for loss in [ApgdLoss::Ce, ApgdLoss::Dlr, ApgdLoss::DlrTargeted { n_target_classes: 3 }] {
            let a = Apgd::new(norm, delta, loss, 10, 2, 0, 16);
            let r = a.run(&net, &x, &y, NOP).unwrap();
            let c = transport_cost(&x, &r.adv, 1, norm);
            assert!(c <= delta * tol, "APGD {loss:?} {norm:?}: cost {c}");
            // Per-sample worst case: robust ⊆ clean-correct, and the reported accuracy is the
            // fraction of robust points, which the model confirms at the adversarial images.
            assert_eq!(r.robust.logical_and(&r.clean_correct.logical_not()).sum(Kind::Int64).int64_value(&[]), 0);
            assert_eq!(r.acc_min, r.n_robust() as f64 / 32.0);
            let pred = net.forward_t(&r.adv, false).argmax(1, false).eq_tensor(&y);
            let fooled = r.clean_correct.logical_and(&r.robust.logical_not());
            assert_eq!(
                pred.masked_select(&fooled).sum(Kind::Int64).int64_value(&[]),
                0,
                "a fooled point's image is not adversarial"
            );
        }
    }
}

#[test]
fn robust_masks_combine_per_sample() {
    let _g = rng_lock();
    let a = Tensor::from_slice(&[true, true, false, false]);
    let b = Tensor::from_slice(&[true, false, true, false]);
    let c = combine_robust(&[&a, &b]).unwrap();
    assert_eq!(Vec::<bool>::try_from(c).unwrap(), vec![true, false, false, false]);
    assert!(combine_robust(&[]).is_none());
}

#[test]
fn clean_identity_v0_is_mixture_of_conditionals() {
    let _g = rng_lock();
    let (_vs, net) = model();
    let (x, y) = data();
    let c = clean::evaluate(&net, &x, &y, 7, Device::Cpu, NOP).unwrap();
    assert!(c.acc > 0.0 && c.acc < 1.0);
    for l in ALL_LOSSES {
        let s = c.loss(l);
        let mix = c.acc * s.v_s + (1.0 - c.acc) * s.w0;
        assert!((s.v0 - mix).abs() < 1e-9, "{l:?}: V(0) {} vs A·V_S + (1−A)·W(0) {mix}", s.v0);
        assert!(((s.w0 - s.v0) - c.acc * (s.w0 - s.v_s)).abs() < 1e-9);
    }
    // Margins are positive exactly on the correctly classified points (no ties here).
    let pos = c.per_sample.margin.gt(0.0);
    assert!(pos.eq_tensor(&c.per_sample.correct).all().int64_value(&[]) == 1);
}

#[test]
fn upsilon_is_batch_invariant_and_merges_exactly() {
    let _g = rng_lock();
    let (_vs, net) = model();
    let (x, y) = data();
    let full = upsilon::grad_norms(&net, &x, &y, Loss::Redlr, Norm::Linf, 32, Device::Cpu, NOP).unwrap();
    let small = upsilon::grad_norms(&net, &x, &y, Loss::Redlr, Norm::Linf, 5, Device::Cpu, NOP).unwrap();
    assert!(full.norms.allclose(&small.norms, 1e-5, 1e-7, false));
    let a = upsilon::grad_norms(
        &net,
        &x.narrow(0, 0, 20),
        &y.narrow(0, 0, 20),
        Loss::Redlr,
        Norm::Linf,
        32,
        Device::Cpu,
        NOP,
    )
    .unwrap();
    let b = upsilon::grad_norms(
        &net,
        &x.narrow(0, 20, 12),
        &y.narrow(0, 20, 12),
        Loss::Redlr,
        Norm::Linf,
        32,
        Device::Cpu,
        NOP,
    )
    .unwrap();
    let m = upsilon::UpsilonStats::merge(&[a, b]).unwrap();
    for q in [1, 2] {
        assert!((m.upsilon(q) - full.upsilon(q)).abs() <= 1e-6 * full.upsilon(q), "q={q}");
    }
    // ReDLR gradients vanish on misclassified points, which still count in the mean.
    let c = clean::evaluate(&net, &x, &y, 32, Device::Cpu, NOP).unwrap();
    let zero = full.norms.masked_select(&c.per_sample.correct.logical_not());
    assert_eq!(zero.abs().max().double_value(&[]), 0.0);
}

#[test]
fn first_order_prediction_tracks_wfgsm_for_small_delta() {
    let _g = rng_lock();
    // Spec §6.4: V(0) + δΥ approximates the W-FGSM loss as δ → 0 (q = 2, CE). The images are
    // squeezed into [0.25, 0.75] so that the [0, 1] clamp (which Fashion-MNIST's black
    // background would hit at once) does not cut the first-order move.
    let (_vs, net) = model();
    let (x, y) = data();
    let x = x.to_kind(Kind::Float) / 255.0 * 0.5 + 0.25;
    let c = clean::evaluate(&net, &x, &y, 32, Device::Cpu, NOP).unwrap();
    let u = upsilon::grad_norms(&net, &x, &y, Loss::Ce, Norm::L2, 32, Device::Cpu, NOP).unwrap();
    let v0 = c.loss(Loss::Ce).v0;
    let mut errs = Vec::new();
    for delta in [1e-1, 1e-2, 1e-3] {
        let r = WPgd::fgsm(2, Norm::L2, delta, Loss::Ce, 32).run(&net, &x, &y, NOP).unwrap();
        let pred = delta * u.upsilon(2);
        errs.push(((r.loss_max - v0) - pred).abs() / pred);
    }
    assert!(errs[2] < errs[0] && errs[2] < 0.02, "relative errors of V(0) + δΥ at δ = 0.1, 0.01, 0.001: {errs:?}");
}

fn params(json: serde_json::Value) -> FinetuneParams {
    let mut base = serde_json::json!({
        "arch": {"name": "small-cnn", "in_channels": 1, "num_classes": 10},
        "variant": "A", "sigma": 0.01, "sigma_mode": "relative", "reading": "R1a",
        "epochs": 2, "lr": 0.01, "lr_schedule": "cosine", "momentum": 0.9, "weight_decay": 5e-4,
        "batch_size": 8, "beta": 6.0, "delta": "8/255", "q": 2, "norm": "linf", "budget_loss": "ce",
        "inner_steps": 2, "keep_pointwise_term": false, "trades_forward": "three_pass",
        "augmentation": "crop-flip", "seed": 3, "select": "best_val", "checkpoint_every": 2,
        "monitor_delta": "8/255", "monitor_itr": 2
    });
    for (k, v) in json.as_object().unwrap() {
        base[k] = v.clone();
    }
    serde_json::from_value(base).unwrap()
}

fn sets() -> Sets {
    let (x, y) = data();
    let s = |a: i64, n: i64| Set { images: x.narrow(0, a, n), labels: y.narrow(0, a, n) };
    Sets { train: s(0, 24), val: s(24, 8), upsilon: s(0, 16), test: s(16, 16) }
}

fn weights(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn finetune_resumes_to_the_same_weights() {
    let _g = rng_lock();
    let sets = sets();
    for extra in [
        serde_json::json!({}),
        serde_json::json!({"variant": "B", "reading": "R2", "select": "last", "keep_pointwise_term": true, "trades_forward": "two_pass", "lr_schedule": "step"}),
    ] {
        let p = params(extra.clone());
        // Uninterrupted run.
        let (vs1, net1) = model();
        let opts = RunOptions { device: Device::Cpu, eval_batch_size: 16, scratch_dir: None, stop_after_steps: None };
        let full = finetune::finetune(&vs1, &net1, "fc", &p, &sets, &opts, NOP).unwrap();
        assert_eq!(full.log.len(), 2);
        assert_eq!(full.log[0].steps, 3);
        // Interrupted after 4 steps (mid-epoch 2), then resumed from the scratch directory.
        let dir = tempfile::tempdir().unwrap();
        let (vs2, net2) = model();
        let opts2 =
            RunOptions { scratch_dir: Some(dir.path().to_path_buf()), stop_after_steps: Some(4), ..opts.clone() };
        match finetune::finetune(&vs2, &net2, "fc", &p, &sets, &opts2, NOP) {
            Err(MethodError::Stopped(4)) => {}
            other => panic!("expected a stop after 4 steps, got {other:?}"),
        }
        let (vs3, net3) = model();
        let resumed_from = std::cell::Cell::new(None);
        let note = |done: u64, _: u64, msg: &str| {
            if msg.starts_with("resuming") {
                resumed_from.set(Some(done));
            }
        };
        let opts3 = RunOptions { stop_after_steps: None, ..opts2.clone() };
        let resumed = finetune::finetune(&vs3, &net3, "fc", &p, &sets, &opts3, &note).unwrap();
        assert_eq!(resumed_from.get(), Some(4), "{extra}: the second run must continue at step 4, not restart");
        for ((n1, w1), (n3, w3)) in weights(&vs1).iter().zip(weights(&vs3).iter()) {
            assert_eq!(n1, n3);
            assert!(w1.equal(w3), "{extra}: {n1} differs between the uninterrupted and the resumed run");
        }
        assert_eq!(full.selected_epoch, resumed.selected_epoch);
        for (a, b) in full.log.iter().zip(&resumed.log) {
            assert_eq!((a.train_loss, a.val, a.test, a.upsilon_ref), (b.train_loss, b.val, b.test, b.upsilon_ref));
        }
        // The fine-tuned weights are not the pretrained ones.
        let (vs0, _) = model();
        assert!(
            !weights(&vs0)[0].1.equal(&weights(&vs1)[0].1)
                || !weights(&vs0).last().unwrap().1.equal(&weights(&vs1).last().unwrap().1)
        );
    }
}

#[test]
fn finetune_rejects_unknown_choices() {
    let _g = rng_lock();
    let (vs, net) = model();
    let opts = RunOptions { device: Device::Cpu, eval_batch_size: 16, scratch_dir: None, stop_after_steps: None };
    for (k, v) in [
        ("reading", "R3"),
        ("augmentation", "mixup"),
        ("lr_schedule", "linear"),
        ("select", "best"),
        ("trades_forward", "one"),
    ] {
        let p = params(serde_json::json!({ k: v }));
        let e = finetune::finetune(&vs, &net, "fc", &p, &sets(), &opts, NOP).unwrap_err();
        assert!(e.to_string().contains(k), "{k}: {e}");
    }
}

/// Runs the four method stages the way `wdro-worker` does (a `Job`, files in, files out) on the
/// zoo's small CNN and the fixture images, and checks the outputs and the metric keys the
/// evaluation table reads.
#[test]
fn stage_impls_write_outputs_and_metrics() {
    use serde_json::json;
    use wdro_ml::data::Bundle;
    use wdro_ml::stage_impls;
    use wdro_stages::worker_protocol::Job;

    let _g = rng_lock();
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let arch = json!({"name": "small-cnn", "in_channels": 1, "num_classes": 10});
    tch::manual_seed(0);
    let net = wdro_ml::models::new_net(&serde_json::from_value(arch.clone()).unwrap(), Device::Cpu);
    let model = dir.path().join("model.safetensors");
    wdro_ml::checkpoint::save_canonical(&net, &model).unwrap();
    let (x, y) = data();
    let data_path = dir.path().join("data.safetensors");
    Bundle::new(x, y, (0..10).map(|i| i.to_string()).collect()).unwrap().save(&data_path).unwrap();

    let job = |name: &str, params: serde_json::Value, slots: &[&str]| {
        let out = dir.path().join(format!("out-{name}"));
        std::fs::create_dir_all(&out).unwrap();
        let mut inputs: std::collections::BTreeMap<String, PathBuf> =
            slots.iter().map(|s| (s.to_string(), data_path.clone())).collect();
        inputs.insert("model".into(), model.clone());
        Job {
            stage_id: name.into(),
            stage_name: name.into(),
            key: String::new(),
            params,
            exec_params: json!({"batch_size": 16, "threads": 1}),
            inputs,
            out_dir: out,
            scratch_dir: dir.path().join(format!("scratch-{name}")),
            device: "cpu".into(),
        }
    };
    let nop = |_: u64, _: u64, _: &str| {};

    let j = job("clean", json!({"arch": arch}), &["data"]);
    let r = stage_impls::clean::run(&j, &nop).unwrap();
    assert!(j.out_dir.join(&r.outputs["per_sample"]).exists());
    for k in ["acc", "loss", "loss_cond", "n_images"] {
        assert!(r.metrics.get(k).is_some(), "clean metric {k}");
    }
    assert!(r.metrics["loss"]["redlr"].is_number());

    let j = job("upsilon", json!({"arch": arch, "loss": "redlr", "norm": "linf"}), &["data"]);
    let r = stage_impls::upsilon::run(&j, &nop).unwrap();
    assert!(j.out_dir.join(&r.outputs["grad_norms"]).exists());
    let (q1, q2) = (r.metrics["upsilon_q1"].as_f64().unwrap(), r.metrics["upsilon_q2"].as_f64().unwrap());
    assert!(q2 >= q1 && q1 >= 0.0, "Υ_2 ≥ Υ_1 (power means): {q1} {q2}");

    for (kind, q) in [("w-pgd", 2), ("w-fgsm", 1), ("w-pgd-budget", 2), ("pgd", 1), ("apgd-ce", 1), ("apgd-dlr", 1)] {
        let p =
            json!({"arch": arch, "attack": kind, "loss": "redlr", "q": q, "norm": "linf", "delta": "8/255", "itr": 3});
        let j = job(kind, p, &["data"]);
        let r = stage_impls::attack::run(&j, &nop).unwrap();
        let adv = Bundle::load(&j.out_dir.join(&r.outputs["adv"])).unwrap();
        assert_eq!(adv.images.kind(), Kind::Float);
        assert_eq!(adv.len(), 32);
        let curves: serde_json::Value =
            serde_json::from_slice(&std::fs::read(j.out_dir.join(&r.outputs["curves"])).unwrap()).unwrap();
        assert!(!curves.as_array().unwrap().is_empty());
        for k in ["acc_min", "loss_max", "w_dist", "n_success", "loss_fn", "delta_str"] {
            assert!(r.metrics.get(k).is_some(), "{kind}: metric {k}");
        }
        assert!(r.metrics["w_dist"].as_f64().unwrap() <= 8.0 / 255.0 * (1.0 + 1e-5));
        assert_eq!(r.metrics.get("robust").is_some(), matches!(kind, "pgd" | "apgd-ce" | "apgd-dlr"), "{kind}");
    }

    let p = json!({
        "arch": arch, "variant": "B", "sigma": 0.01, "sigma_mode": "relative", "reading": "R1a",
        "epochs": 1, "lr": 0.01, "lr_schedule": "cosine", "momentum": 0.9, "weight_decay": 5e-4,
        "batch_size": 16, "beta": 6.0, "delta": "8/255", "q": 2, "norm": "linf", "budget_loss": "ce",
        "inner_steps": 2, "keep_pointwise_term": false, "trades_forward": "three_pass",
        "augmentation": "none", "seed": 0, "select": "best_val", "checkpoint_every": 1,
        "monitor_delta": "8/255", "monitor_itr": 2
    });
    let j = job("finetune", p, &["train", "val", "upsilon_data", "test"]);
    let r = stage_impls::finetune::run(&j, &nop).unwrap();
    let log: serde_json::Value =
        serde_json::from_slice(&std::fs::read(j.out_dir.join(&r.outputs["log"])).unwrap()).unwrap();
    assert_eq!(log["epochs"].as_array().unwrap().len(), 1);
    assert_eq!(r.metrics["selected_epoch"], json!(1));
    assert!(r.metrics["test_w2_acc"].is_number() && r.metrics["upsilon_train_redlr_q2"].is_number());
    wdro_ml::checkpoint::load_net(
        &serde_json::from_value(arch).unwrap(),
        &j.out_dir.join(&r.outputs["model"]),
        Device::Cpu,
    )
    .expect("the fine-tuned model loads into the zoo arch");
}
