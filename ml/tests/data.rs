//! Data readers on real data: Fashion-MNIST from the Debian package (via `.data`, made by
//! scripts/setup-data.sh), the vendored foolbox PNGs, and mini CIFAR-10 archives in both
//! official layouts written by real Python (tests/reference/make_fixtures.py).

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use wdro_ml::data::{cifar, classes, idx, png_folder, subset, Bundle};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `.data/fashion-mnist`; a clear failure when setup has not run.
fn fashion_dir() -> PathBuf {
    let d = repo().join(".data/fashion-mnist");
    assert!(
        d.join("t10k-labels-idx1-ubyte.gz").exists(),
        "{} is missing: run scripts/setup.sh (or scripts/setup-data.sh) first",
        d.display()
    );
    d
}

fn fashion(split: &str) -> Bundle {
    let d = fashion_dir();
    idx::read_idx(
        &d.join(format!("{split}-images-idx3-ubyte.gz")),
        &d.join(format!("{split}-labels-idx1-ubyte.gz")),
        classes::owned(&classes::FASHION_MNIST),
    )
    .unwrap()
}

const CIFAR_FIRST20: [i64; 20] = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6];

#[test]
fn fashion_mnist_sentinels() {
    let train = fashion("train");
    let test = fashion("t10k");
    assert_eq!(train.len(), 60_000);
    assert_eq!(test.len(), 10_000);
    assert_eq!(train.image_shape(), [1, 28, 28]);
    assert_eq!(train.images.kind(), Kind::Uint8);
    assert_eq!(train.class_counts(), vec![6000; 10]);
    assert_eq!(test.class_counts(), vec![1000; 10]);
    // The label files are recognised as Fashion-MNIST's (class names for the dataset stage).
    let names = idx::class_names_for(&fashion_dir().join("t10k-labels-idx1-ubyte.gz")).unwrap();
    assert_eq!(names, classes::owned(&classes::FASHION_MNIST));
    let first: Vec<i64> = Vec::try_from(test.labels.narrow(0, 0, 20)).unwrap();
    assert_eq!(first, [9, 2, 1, 1, 6, 1, 4, 6, 5, 7, 4, 5, 7, 3, 4, 1, 2, 4, 8, 0]);
}

#[test]
fn foolbox_fashion_pngs_equal_debian_test_images() {
    let test = fashion("t10k");
    let png = png_folder::read_png_set(&repo().join("data/foolbox/fashionMNIST"), "fashionMNIST_", vec![]).unwrap();
    assert_eq!(png.len(), 20);
    assert!(png.images.equal(&test.images.narrow(0, 0, 20)), "pixels differ");
    assert!(png.labels.equal(&test.labels.narrow(0, 0, 20)), "labels differ");
}

#[test]
fn fashion_mnist_ten_percent_subset() {
    let train = fashion("train");
    let (sel, rest) = subset::split(&train, 0.1, 0, true).unwrap();
    assert_eq!(sel.class_counts(), vec![600; 10]);
    assert_eq!(rest.class_counts(), vec![5400; 10]);
    let (sel2, _) = subset::split(&train, 0.1, 0, true).unwrap();
    assert!(sel.images.equal(&sel2.images));
    let (sel3, _) = subset::split(&train, 0.1, 1, true).unwrap();
    assert!(!sel.labels.equal(&sel3.labels) || !sel.images.equal(&sel3.images));
}

#[test]
fn foolbox_cifar_pngs_match_python_decoding() {
    let b = png_folder::read_png_set(&repo().join("data/foolbox/cifar10"), "cifar10_", vec![]).unwrap();
    assert_eq!(b.images.size(), [20, 3, 32, 32]);
    assert_eq!(Vec::<i64>::try_from(&b.labels).unwrap(), CIFAR_FIRST20);
    assert_eq!(b.classes, classes::owned(&classes::CIFAR10));
    let py = wdro_ml::checkpoint::read_safetensors(&repo().join("tests/fixtures/models/inputs16.safetensors")).unwrap();
    assert!(b.images.narrow(0, 0, 16).equal(&py["x_u8"]));
}

fn mini(name: &str) -> PathBuf {
    repo().join("tests/fixtures/data").join(name)
}

#[test]
fn cifar_binary_and_python_archives_agree_with_the_pngs() {
    let png = png_folder::read_png_set(&repo().join("data/foolbox/cifar10"), "cifar10_", vec![]).unwrap();
    for (name, read) in [
        ("cifar-10-binary-mini.tar.gz", cifar::read_binary as fn(&Path, &str) -> _),
        ("cifar-10-python-mini.tar.gz", cifar::read_python),
    ] {
        let test = read(&mini(name), "test").unwrap();
        assert_eq!(test.len(), 20, "{name}");
        assert!(test.images.equal(&png.images), "{name}: test pixels differ from the PNGs");
        assert_eq!(Vec::<i64>::try_from(&test.labels).unwrap(), CIFAR_FIRST20, "{name}");
        assert_eq!(test.classes, classes::owned(&classes::CIFAR10), "{name}");
        // data_batch_i holds images 4(i-1)..4i-1: the concatenation is the 20 images in order.
        let train = read(&mini(name), "train").unwrap();
        assert!(train.images.equal(&png.images), "{name}: train batches out of order");
        let e = read(&mini(name), "validation").unwrap_err().to_string();
        assert!(e.contains("unknown split"), "{e}");
    }
}

#[test]
fn cifar_archive_errors_are_one_line_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    // A python-layout archive read as binary: members missing.
    let e = cifar::read_binary(&mini("cifar-10-python-mini.tar.gz"), "test").unwrap_err().to_string();
    assert!(e.contains("cifar-10-python-mini.tar.gz") && e.contains("no member `test_batch.bin`"), "{e}");
    // A truncated archive.
    let bytes = std::fs::read(mini("cifar-10-binary-mini.tar.gz")).unwrap();
    let cut = d.path().join("cut.tar.gz");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = cifar::read_binary(&cut, "test").unwrap_err().to_string();
    assert!(e.contains("cut.tar.gz") && !e.contains('\n'), "{e}");
    // A pickle that names a forbidden global inside a python-layout archive.
    let dir = d.path().join("tree/cifar-10-batches-py");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("test_batch"), b"\x80\x02cos\nsystem\nq\x00.").unwrap();
    // {'label_names': ['c0', …, 'c9']} as protocol-2 opcodes.
    let mut meta = b"\x80\x02}\x8c\x0blabel_names](".to_vec();
    for i in 0..10u8 {
        meta.extend_from_slice(&[0x8c, 2, b'c', b'0' + i]);
    }
    meta.extend_from_slice(b"es.");
    std::fs::write(dir.join("batches.meta"), meta).unwrap();
    let e = cifar::read_python(&d.path().join("tree"), "test").unwrap_err().to_string();
    assert!(e.contains("refusing pickle global os.system"), "{e}");
}

#[test]
fn bundles_roundtrip_and_float_conversion() {
    let b = cifar::read_binary(&mini("cifar-10-binary-mini.tar.gz"), "test").unwrap();
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("test.safetensors");
    b.save(&p).unwrap();
    let c = Bundle::load(&p).unwrap();
    assert!(c.images.equal(&b.images) && c.labels.equal(&b.labels) && c.classes == b.classes);
    let x = c.to_float(Device::Cpu);
    assert_eq!(x.kind(), Kind::Float);
    let mean = x.mean(Kind::Double).double_value(&[]);
    let want = b.images.to_kind(Kind::Double).mean(Kind::Double).double_value(&[]) / 255.0;
    assert!((mean - want).abs() < 1e-6, "{mean} vs {want}");
    // f32 (adversarial) bundles pass through unchanged.
    let adv = Bundle::new(x.shallow_clone(), c.labels.shallow_clone(), c.classes.clone()).unwrap();
    assert!(adv.to_float(Device::Cpu).equal(&x));
    let sel = c.select(&Tensor::from_slice(&[19i64, 0]));
    assert_eq!(Vec::<i64>::try_from(&sel.labels).unwrap(), vec![6, 3]);
}
