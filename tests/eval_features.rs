//! The FID Inception-v3 (src/eval/inception.rs) against torch-fidelity 0.4.0 run in float64
//! (../shared/golden/public/eval: features.safetensors with inception_random.pth), and its
//! weight-file checks. Tolerance (issue 24): every array within 5e-4 of the float64 truth,
//! error = max abs error / max abs value of the truth, per array and image size.

mod common;

use checkergen::eval::inception::{Inception, LOGITS_DIM, POOL_DIM, SPATIAL_DIM, tensor_shapes};
use checkergen::model::file::{Tensor, TensorMap, load_safetensors};

const TOL: f64 = 5e-4;

/// max |got - want| / max |want|.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, &v| m.max((v as f64).abs()));
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()));
    assert!(scale > 0.0, "an all-zero golden array would test nothing");
    err / scale
}

#[test]
fn features_match_torch_fidelity_f64() {
    let Some(golden) = common::golden_dir() else {
        return;
    };
    let dir = golden.join("public/eval");
    let net = Inception::load(dir.join("inception_random.pth")).unwrap();
    let (g, _) = load_safetensors(&dir.join("features.safetensors")).unwrap();
    let mut failures = Vec::new();
    for n in [256usize, 64, 299, 512] {
        let imgs = &g[&format!("images_{n}")];
        assert_eq!(imgs.shape[1..], [n, n, 3]);
        let count = imgs.shape[0];
        let bytes: Vec<u8> = imgs.data.iter().map(|&v| v as u8).collect();
        let f = net.features(&bytes, count, n).unwrap();
        for (name, got, dim) in [
            ("pool", &f.pool, POOL_DIM),
            ("spatial", &f.spatial, SPATIAL_DIM),
            ("logits", &f.logits, LOGITS_DIM),
        ] {
            let want = &g[&format!("{name}_{n}")];
            assert_eq!(want.shape, [count, dim]);
            let e = rel_err(got, &want.data);
            // torch-fidelity's own float32 for scale.
            let e32 = rel_err(&g[&format!("{name}_{n}_f32")].data, &want.data);
            println!(
                "n = {n:3} {name:7}: worst error {e:.3e} (torch-fidelity f32: {e32:.3e}; tolerance {TOL:e})"
            );
            if e > TOL {
                failures.push(format!("{name}_{n}: {e:.3e}"));
            }
        }
    }
    assert!(failures.is_empty(), "over {TOL:e}: {failures:?}");
}

/// Deterministic small random weights of the real shapes (variances kept near 1).
fn synthetic_weights() -> TensorMap {
    let mut s = 0x9e37_79b9u32;
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        s as f32 / u32::MAX as f32 - 0.5
    };
    tensor_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data = if name.ends_with("running_var") || name.ends_with("bn.weight") {
                (0..n).map(|_| 1.0 + 0.2 * rnd()).collect()
            } else {
                (0..n).map(|_| 0.1 * rnd()).collect()
            };
            (name, Tensor::new(shape, data))
        })
        .collect()
}

#[test]
fn missing_or_misshaped_tensor_is_named() {
    let w = synthetic_weights();
    assert_eq!(w.len(), 472, "convs x 5 + fc.weight + fc.bias");
    assert!(Inception::from_tensors(&w, "ok.pth").is_ok());
    // The error loading `w` as "w.pth" (printed under `what`); loading must fail.
    let refusal = |w: &TensorMap, what: &str| {
        let e = Inception::from_tensors(w, "w.pth").err().expect("loaded");
        println!("{what}: {e}");
        e.to_string()
    };

    let mut missing = w.clone();
    missing.remove("Mixed_6d.branch7x7dbl_3.bn.running_var");
    let e = refusal(&missing, "missing");
    assert!(
        e.contains("w.pth") && e.contains("'Mixed_6d.branch7x7dbl_3.bn.running_var' is missing")
    );

    let mut bad = w.clone();
    bad.insert(
        "Mixed_7c.branch3x3_2b.conv.weight".into(),
        Tensor::new(vec![384, 384, 1, 3], vec![0.0; 384 * 384 * 3]),
    );
    let e = refusal(&bad, "misshaped");
    assert!(
        e.contains("w.pth")
            && e.contains("'Mixed_7c.branch3x3_2b.conv.weight' has shape [384, 384, 1, 3], expected [384, 384, 3, 1]")
    );

    let mut fc = w.clone();
    fc.insert(
        "fc.weight".into(),
        Tensor::new(vec![1000, 2048], vec![0.0; 1000 * 2048]),
    );
    let e = refusal(&fc, "fc");
    assert!(e.contains("'fc.weight' has shape [1000, 2048]"));

    let mut nan = w;
    nan.get_mut("Conv2d_1a_3x3.conv.weight").unwrap().data[5] = f32::NAN;
    let e = refusal(&nan, "nan");
    assert!(e.contains("'Conv2d_1a_3x3.conv.weight' has a non-finite value"));
}

#[test]
fn bad_image_buffer_is_an_error() {
    let net = Inception::from_tensors(&synthetic_weights(), "synthetic").unwrap();
    let e = net.features(&[0u8; 10], 1, 2).err().unwrap().to_string();
    println!("{e}");
    assert!(e.contains("10 bytes for 1 images of 2 x 2 x 3"));
    assert!(net.features(&[], 1, 0).is_err());
    let f = net.features(&[], 0, 8).unwrap();
    assert!(f.pool.is_empty() && f.logits.is_empty());
}
