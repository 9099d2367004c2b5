//! Timing of wdro's two hot loops against the PyTorch reference (bench/ml_bench.sh runs both):
//!
//! * `wpgd DIR` — W-PGD (q = 2, ℓ∞, δ = 8/255, ReDLR) over the 512 images of DIR on the
//!   WideResNet-16-4 of DIR; seconds per iteration = run time / `itr`, min over `repeats`;
//! * `trades DIR` — one W-DRO TRADES step (reading R1a, K = 10, β = 6, three-pass forward, SGD
//!   momentum 0.9) on the first 128 images; min over `repeats` steps after one warm-up step.
//!
//! DIR is written by `tests/reference/method_reference.py bench-setup DIR` (the weights and
//! images both sides use). Options `batch=B itr=K repeats=R threads=T` (defaults 128, 5, 3, 2).
//! Prints one JSON line.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use wdro_ml::attacks::trades::{Inner, Reading};
use wdro_ml::attacks::wpgd::WPgd;
use wdro_ml::attacks::Attack;
use wdro_ml::checkpoint;
use wdro_ml::finetune::{train_step, Sgd, StepConfig};
use wdro_ml::upsilon;
use wdro_stages::params::{Arch, Loss, Norm};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let (Some(which), Some(dir)) = (args.first(), args.get(1)) else {
        eprintln!("usage: ml_bench <wpgd|trades> DIR [batch=B itr=K repeats=R threads=T]");
        std::process::exit(2);
    };
    let kw: HashMap<&str, i64> = args[2..]
        .iter()
        .filter_map(|a| a.split_once('='))
        .map(|(k, v)| (k, v.parse().expect("integer option")))
        .collect();
    let batch = *kw.get("batch").unwrap_or(&128);
    let itr = *kw.get("itr").unwrap_or(&5) as u32;
    let repeats = *kw.get("repeats").unwrap_or(&3) as usize;
    tch::set_num_threads(*kw.get("threads").unwrap_or(&2) as i32);
    let dir = PathBuf::from(dir);

    let arch = Arch::WideResnet { depth: 16, widen: 4, sub_block1: false, normalize: None };
    let net = checkpoint::load_net(&arch, &dir.join("model.safetensors"), Device::Cpu).expect("load WRN-16-4");
    let data: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("data.safetensors")).expect("bench data").into_iter().collect();
    let (x, y) = (&data["images"], &data["labels"]);
    let model = net.module.as_ref();
    // The zoo's WRN must compute what PyTorch's does before its speed means anything.
    let z = tch::no_grad(|| model.forward_t(&x.narrow(0, 0, 8), false));
    let dz = (z - &data["logits8"]).abs().max().double_value(&[]);
    assert!(dz < 1e-4, "WRN-16-4 logits differ from PyTorch's by {dz}");

    let mut times = Vec::new();
    match which.as_str() {
        "wpgd" => {
            let attack = |itr| WPgd { itr, ..WPgd::pgd(2, Norm::Linf, 8.0 / 255.0, Loss::Redlr, batch) };
            attack(1).run(model, &x.narrow(0, 0, 64), &y.narrow(0, 0, 64), &|_, _, _| {}).expect("warm-up");
            for _ in 0..repeats {
                let t = Instant::now();
                attack(itr).run(model, x, y, &|_, _, _| {}).expect("W-PGD");
                times.push(t.elapsed().as_secs_f64() / f64::from(itr));
            }
        }
        "trades" => {
            let (xb, yb) = (x.narrow(0, 0, 128), y.narrow(0, 0, 128));
            let u = upsilon::grad_norms(model, &xb, &yb, Loss::Ce, Norm::Linf, batch, Device::Cpu, &|_, _, _| {})
                .expect("Υ_ref");
            let cfg = StepConfig {
                inner: Inner {
                    reading: Reading::R1a,
                    q: 2,
                    norm: Norm::Linf,
                    delta: 8.0 / 255.0,
                    steps: 10,
                    budget_loss: Loss::Ce,
                },
                beta: 6.0,
                three_pass: true,
                pointwise: None,
            };
            let mut sgd = Sgd::new(&net.vs, 0.9, 5e-4);
            tch::manual_seed(0);
            for k in 0..=repeats {
                let noise = Tensor::randn(xb.size(), (Kind::Float, Device::Cpu));
                let t = Instant::now();
                train_step(model, &mut sgd, 0.01, &xb, &yb, &noise, None, &cfg, Some(u.upsilon(2))).expect("step");
                if k > 0 {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
        }
        other => panic!("unknown bench {other:?}: use wpgd or trades"),
    }
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "{}",
        serde_json::json!({"impl": "wdro", "bench": which, "seconds": best, "all": times,
                           "threads": tch::get_num_threads(), "batch_size": batch})
    );
}
