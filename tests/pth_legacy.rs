//! The legacy (torch < 1.6) `torch.save` format: the golden Inception weights file
//! (`../shared/golden/public/eval/inception_random.pth`, float16, 566 tensors), and the same
//! small state dict written in both formats by tools/make_pth_fixture.py
//! (tests/fixtures/pth/pair_zip.pth, pair_legacy.pth), which must read identically.

mod common;

use checkergen::io::pth::{PthCheckpoint, PthDtype, PthTensor, read_state_dict};
use std::collections::BTreeMap;

fn pth_fixture(name: &str) -> std::path::PathBuf {
    common::fixture("pth").join(name)
}

/// Every tensor of the checkpoint's top-level state dict.
fn read_all(ck: &PthCheckpoint) -> BTreeMap<String, PthTensor> {
    let sd = ck.root_state_dict().unwrap();
    sd.iter()
        .map(|(n, info)| (n.clone(), ck.read_tensor(n, info).unwrap()))
        .collect()
}

#[test]
fn inception_random_golden_loads() {
    let Some(golden) = common::golden_dir() else {
        return;
    };
    let path = golden.join("public/eval/inception_random.pth");
    let ck = PthCheckpoint::open(&path).unwrap();
    assert_eq!(ck.format(), "legacy");
    assert!(ck.root_is_state_dict());
    let all = read_all(&ck);
    assert_eq!(all.len(), 566);
    let count = |d: PthDtype| all.values().filter(|t| t.dtype == d).count();
    // float16 weights and BatchNorm statistics; int64 num_batches_tracked per BatchNorm.
    assert_eq!((count(PthDtype::F16), count(PthDtype::I64)), (472, 94));
    for (name, shape) in [
        ("Conv2d_1a_3x3.conv.weight", &[32, 3, 3, 3][..]),
        ("Conv2d_1a_3x3.bn.running_var", &[32]),
        ("Mixed_5b.branch1x1.conv.weight", &[64, 192, 1, 1]),
        ("Mixed_6d.branch1x1.conv.weight", &[192, 768, 1, 1]),
        ("Mixed_7c.branch_pool.conv.weight", &[192, 2048, 1, 1]),
        ("fc.weight", &[1008, 2048]),
        ("fc.bias", &[1008]),
    ] {
        let t = all.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(t.shape, shape, "{name}");
        assert_eq!(t.data.len(), t.numel() * 2, "{name}");
    }
    let mut worst = (0usize, String::new());
    for (name, t) in &all {
        let v = t.to_f32();
        assert_eq!(v.len(), t.numel(), "{name}");
        let bad = v.iter().filter(|x| !x.is_finite()).count();
        if bad > worst.0 {
            worst = (bad, name.clone());
        }
        if name.ends_with("running_var") {
            assert!(v.iter().all(|&x| x > 0.0), "{name}: a variance <= 0");
        }
    }
    println!(
        "inception_random.pth: 566 tensors, non-finite values: {} (worst tensor {:?})",
        worst.0, worst.1
    );
    assert_eq!(worst.0, 0);
    // Checksums from an independent reader (Python's pickle + struct on the same bytes, run
    // once by hand): [sum, sum of v[i] * (i % 13 + 1), first, last] of the row-major values.
    // float16 values are exact in f64, so only the summation order differs.
    let expect: [(&str, [f64; 4]); 5] = [
        (
            "Conv2d_1a_3x3.conv.weight",
            [
                6.9087443351745605,
                70.05137276649475,
                -0.415283203125,
                -0.32177734375,
            ],
        ),
        (
            "Conv2d_1a_3x3.bn.running_var",
            [
                17.685089111328125,
                132.89816284179688,
                1.587890625,
                0.306640625,
            ],
        ),
        (
            "Mixed_6d.branch1x1.conv.weight",
            [
                -16.63127839565277,
                -140.88002574443817,
                0.0028629302978515625,
                -0.0100555419921875,
            ],
        ),
        (
            "fc.weight",
            [
                -13.944635093212128,
                -19.546826422214508,
                -0.0166473388671875,
                -0.0242767333984375,
            ],
        ),
        (
            "fc.bias",
            [
                0.2051408886909485,
                0.4373769164085388,
                0.00015866756439208984,
                -0.0050048828125,
            ],
        ),
    ];
    let mut worst_rel = 0.0f64;
    for (name, [sum, wsum, first, last]) in expect {
        let v = all[name].to_f32();
        let s: f64 = v.iter().map(|&x| x as f64).sum();
        let w: f64 = v
            .iter()
            .enumerate()
            .map(|(i, &x)| x as f64 * (i % 13 + 1) as f64)
            .sum();
        for (got, want) in [(s, sum), (w, wsum)] {
            worst_rel = worst_rel.max((got - want).abs() / want.abs());
        }
        assert_eq!(
            (v[0] as f64, v[v.len() - 1] as f64),
            (first, last),
            "{name}"
        );
    }
    println!("checksums against the independent reader: worst relative error {worst_rel:.2e}");
    assert!(worst_rel < 1e-12, "{worst_rel}");
    // num_batches_tracked: one int64 element each.
    let nbt = &all["Conv2d_1a_3x3.bn.num_batches_tracked"];
    assert_eq!((nbt.shape.as_slice(), nbt.data.len()), (&[][..], 8));
}

#[test]
fn zip_and_legacy_fixtures_read_the_same() {
    let zip = PthCheckpoint::open(pth_fixture("pair_zip.pth")).unwrap();
    let legacy = PthCheckpoint::open(pth_fixture("pair_legacy.pth")).unwrap();
    assert_eq!((zip.format(), legacy.format()), ("zip", "legacy"));
    let (z, l) = (read_all(&zip), read_all(&legacy));
    assert_eq!(
        z.keys().collect::<Vec<_>>(),
        l.keys().collect::<Vec<_>>(),
        "tensor names"
    );
    assert_eq!(z.len(), 19);
    for (name, t) in &z {
        assert_eq!(t, &l[name], "{name}: zip and legacy differ");
    }
    // The values the fixture tool wrote (exact in their dtypes).
    let expect: [(&str, PthDtype, &[usize], &[f32]); 10] = [
        (
            "f32",
            PthDtype::F32,
            &[2, 3],
            &[-3.0, -2.5, -2.0, -1.5, -1.0, -0.5],
        ),
        (
            "f32_t",
            PthDtype::F32,
            &[3, 2],
            &[-3.0, -1.5, -2.5, -1.0, -2.0, -0.5],
        ),
        ("f32_tail", PthDtype::F32, &[4], &[1.0, 1.5, 2.0, 2.5]),
        (
            "f16",
            PthDtype::F16,
            &[4],
            &[1.5, -2.0, 0.099975586, 65504.0],
        ),
        ("bf16", PthDtype::BF16, &[2, 2], &[1.0, -0.5, 3.0, 1024.0]),
        ("f64", PthDtype::F64, &[3], &[0.1, -1e30, 2.5]),
        (
            "i64",
            PthDtype::I64,
            &[5],
            &[0.0, -7.0, 1099511627776.0, 3.0, 5.0],
        ),
        ("flag", PthDtype::Bool, &[3], &[1.0, 0.0, 1.0]),
        ("view", PthDtype::F32, &[2, 2], &[12.0, 13.0, 14.0, 15.0]),
        ("extra.7", PthDtype::F32, &[1], &[7.0]),
    ];
    for (name, dtype, shape, values) in expect {
        let t = &l[name];
        assert_eq!((t.dtype, t.shape.as_slice()), (dtype, shape), "{name}");
        assert_eq!(t.data.len(), t.numel() * dtype.size(), "{name}");
        assert_eq!(t.to_f32(), values, "{name}");
    }
    // The public entry point takes either format.
    let a = read_state_dict(pth_fixture("pair_legacy.pth"), "model").unwrap();
    assert_eq!(a, l);
}
