//! The ADM metrics (src/eval/metrics.rs) against the evaluator's own numbers
//! (golden/public/eval/metrics.safetensors), the activation file format and the evaluation
//! inputs (src/eval/activations.rs, src/eval/input.rs), and their one-line refusals.

mod common;

use checkergen::eval::activations::{
    Activations, FidStats, POOL_DIM, SPATIAL_DIM, read_activations, read_statistics,
    write_activations,
};
use checkergen::eval::input::{ImageFormat, ImageSource, InputKind, input_kind};
use checkergen::eval::metrics::{
    Features, Statistics, StatsAccumulator, frechet_distance, inception_score, manifold_radii,
    precision_recall, statistics,
};
use checkergen::io::npz::{NpzWriter, npy_header};
use checkergen::rng::XorShift32;
use std::path::{Path, PathBuf};

/// A fresh scratch directory for one test.
fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cg-evalm-{test}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn golden_f64(st: &safetensors::SafeTensors, name: &str) -> f64 {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F64, "{name}");
    f64::from_le_bytes(t.data()[..8].try_into().unwrap())
}

fn golden_matrix(st: &safetensors::SafeTensors, name: &str) -> (Vec<f32>, usize) {
    let t = st.tensor(name).unwrap();
    let dim = *t.shape().last().unwrap();
    (common::golden_f32s(st, name), dim)
}

/// Inception Score, FID and sFID within 1e-3 relative and precision / recall within 0.003 of
/// the numbers the ADM evaluator's code (TF 2.21, numpy 2, scipy) computed from the same
/// activations.
#[test]
fn golden_metrics_match_the_adm_evaluator() {
    let Some(golden) = common::golden_dir() else {
        return;
    };
    let bytes = std::fs::read(golden.join("public/eval/metrics.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (mut worst_rel, mut worst_abs) = (0f64, 0f64);
    for case in ["a", "b"] {
        let g = |n: &str| golden_matrix(&st, &format!("{case}_{n}"));
        let (rp, dp) = g("ref_pool");
        let (rs, ds) = g("ref_spatial");
        let (sp, _) = g("sample_pool");
        let (ss, _) = g("sample_spatial");
        let (w, classes) = g("softmax_w");
        let rpf = Features::new("ref pool", &rp, dp).unwrap();
        let spf = Features::new("sample pool", &sp, dp).unwrap();
        let rsf = Features::new("ref spatial", &rs, ds).unwrap();
        let ssf = Features::new("sample spatial", &ss, ds).unwrap();
        // The evaluator's W is (D, 1008); ours is fc.weight's (1008, D).
        let mut wt = vec![0f32; w.len()];
        for i in 0..dp {
            for c in 0..classes {
                wt[c * dp + i] = w[i * classes + c];
            }
        }
        let is = inception_score(&spf, &wt, classes).unwrap();
        let fid = frechet_distance(&statistics(&spf).unwrap(), &statistics(&rpf).unwrap()).unwrap();
        let sfid =
            frechet_distance(&statistics(&ssf).unwrap(), &statistics(&rsf).unwrap()).unwrap();
        let pr = precision_recall(&rpf, &spf).unwrap();
        let want = |n: &str| golden_f64(&st, &format!("{case}_{n}"));
        for (name, got, exp) in [
            ("inception_score", is, want("inception_score")),
            ("fid", fid.distance, want("fid")),
            ("sfid", sfid.distance, want("sfid")),
        ] {
            let rel = (got - exp).abs() / exp.abs();
            println!("case {case} {name}: {got:.9} vs {exp:.9} (relative error {rel:.2e})");
            assert!(rel <= 1e-3, "case {case} {name}: {got} vs {exp}");
            worst_rel = worst_rel.max(rel);
        }
        assert!(!fid.eps_retry && !sfid.eps_retry);
        for (name, got, exp) in [
            ("precision", pr.precision, want("precision")),
            ("recall", pr.recall, want("recall")),
        ] {
            let abs = (got - exp).abs();
            println!("case {case} {name}: {got:.6} vs {exp:.6} (absolute error {abs:.4})");
            assert!(abs <= 0.003, "case {case} {name}: {got} vs {exp}");
            worst_abs = worst_abs.max(abs);
        }
        assert_eq!(pr.f32_blocks, 0, "norms < 65504: float16 throughout");
    }
    println!(
        "worst: IS/FID/sFID relative error {worst_rel:.2e} (tolerance 1e-3), precision/recall \
         absolute error {worst_abs:.4} (tolerance 0.003)"
    );
}

fn rand_rows(n: usize, d: usize, seed: u32, scale: f32) -> Vec<f32> {
    let mut r = XorShift32(seed);
    // Non-negative like pool_3 activations, with some column structure.
    (0..n * d)
        .map(|i| {
            (r.next_u32() as f32 / u32::MAX as f32) * scale * (1.0 + (i % d) as f32 / d as f32)
        })
        .collect()
}

/// Streamed statistics (batches of uneven sizes, several merge chunks) equal a two-pass f64
/// mean and `np.cov` computed here, and the Frechet distance of diagonal covariances is its
/// closed form.
#[test]
fn statistics_stream_and_frechet_closed_form() {
    let (n, d) = (2600, 24);
    let x = rand_rows(n, d, 7, 3.0);
    let mut acc = StatsAccumulator::new("x", d);
    let mut at = 0;
    for (k, b) in [1usize, 2, 1500, 3, 700, 394].iter().enumerate() {
        acc.add(&x[at * d..(at + b) * d]).unwrap();
        at += b;
        assert_eq!(acc.count(), at, "batch {k}");
    }
    assert_eq!(at, n);
    let s = acc.finish().unwrap();
    let mut mu = vec![0f64; d];
    for r in x.chunks(d) {
        for (m, &v) in mu.iter_mut().zip(r) {
            *m += v as f64 / n as f64;
        }
    }
    let mut worst = 0f64;
    for i in 0..d {
        worst = worst.max((s.mu[i] - mu[i]).abs() / mu[i].abs());
        for j in 0..d {
            let c: f64 = x
                .chunks(d)
                .map(|r| (r[i] as f64 - mu[i]) * (r[j] as f64 - mu[j]))
                .sum::<f64>()
                / (n - 1) as f64;
            worst = worst.max((s.sigma[i * d + j] - c).abs() / c.abs().max(1e-3));
        }
    }
    println!("streamed statistics vs two-pass np.cov: worst relative error {worst:.2e}");
    assert!(worst < 1e-12, "{worst}");

    // Diagonal covariances commute: FD = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2.
    let a: Vec<f64> = (0..d).map(|i| 0.5 + i as f64).collect();
    let b: Vec<f64> = (0..d).map(|i| 2.0 + 0.3 * i as f64).collect();
    let diag = |v: &[f64]| {
        let mut m = vec![0f64; d * d];
        (0..d).for_each(|i| m[i * d + i] = v[i]);
        m
    };
    let s1 = Statistics::new("s1", vec![1.0; d], diag(&a)).unwrap();
    let s2 = Statistics::new("s2", vec![0.5; d], diag(&b)).unwrap();
    let want: f64 = d as f64 * 0.25
        + a.iter()
            .zip(&b)
            .map(|(x, y)| (x.sqrt() - y.sqrt()).powi(2))
            .sum::<f64>();
    let got = frechet_distance(&s1, &s2).unwrap();
    let rel = (got.distance - want).abs() / want;
    println!(
        "Frechet distance of diagonal covariances: {} vs {want} ({rel:.2e})",
        got.distance
    );
    assert!(rel < 1e-12 && !got.eps_retry);
    // A set against itself: 0 up to rounding of the traces.
    let same = frechet_distance(&s, &s).unwrap().distance;
    let tr: f64 = (0..d).map(|i| s.sigma[i * d + i]).sum();
    println!("Frechet distance of a set to itself: {same:.3e} (traces {tr:.3e})");
    assert!(same.abs() < 1e-9 * tr);
}

/// All pairwise squared distances in f64, the k = 3 radii and precision / recall from them:
/// the manifold estimator without float16.
fn exact_pr(a: &[f32], b: &[f32], d: usize) -> (f64, f64) {
    let dist = |x: &[f32], y: &[f32]| -> f64 {
        x.iter()
            .zip(y)
            .map(|(&u, &v)| (u as f64 - v as f64).powi(2))
            .sum()
    };
    let radii = |s: &[f32]| -> Vec<f64> {
        s.chunks(d)
            .map(|x| {
                let mut v: Vec<f64> = s.chunks(d).map(|y| dist(x, y)).collect();
                v.sort_by(f64::total_cmp);
                v[3]
            })
            .collect()
    };
    let (ra, rb) = (radii(a), radii(b));
    let prec = b
        .chunks(d)
        .filter(|y| a.chunks(d).zip(&ra).any(|(x, r)| dist(x, y) <= *r))
        .count() as f64
        / (b.len() / d) as f64;
    let rec = a
        .chunks(d)
        .filter(|x| b.chunks(d).zip(&rb).any(|(y, r)| dist(x, y) <= *r))
        .count() as f64
        / (a.len() / d) as f64;
    (prec, rec)
}

/// Activations whose float16 norms overflow (past 65,504) take the evaluator's float32
/// path in every block, and then agree with exact distances; small ones stay in float16
/// and agree within the golden tolerance.
#[test]
fn precision_recall_float32_fallback() {
    let d = 64;
    let a = rand_rows(300, d, 11, 1.0);
    let b: Vec<f32> = rand_rows(260, d, 12, 1.0)
        .iter()
        .map(|v| v * 0.9 + 0.05)
        .collect();
    let (ep, er) = exact_pr(&a, &b, d);
    let f16 = precision_recall(
        &Features::new("a", &a, d).unwrap(),
        &Features::new("b", &b, d).unwrap(),
    )
    .unwrap();
    // x 64: squared norms ~ 4096 x 64 x 1.3 > 65,504 (float16 infinity); powers of two keep
    // every f32 distance exactly 4096 times the unscaled one.
    let (a64, b64): (Vec<f32>, Vec<f32>) = (
        a.iter().map(|v| v * 64.0).collect(),
        b.iter().map(|v| v * 64.0).collect(),
    );
    let f32p = precision_recall(
        &Features::new("a", &a64, d).unwrap(),
        &Features::new("b", &b64, d).unwrap(),
    )
    .unwrap();
    println!(
        "exact {ep:.4}/{er:.4}; float16 {:.4}/{:.4} ({} f32 blocks); scaled x64 {:.4}/{:.4} ({} f32 blocks)",
        f16.precision, f16.recall, f16.f32_blocks, f32p.precision, f32p.recall, f32p.f32_blocks
    );
    assert_eq!(f16.f32_blocks, 0);
    assert_eq!(f32p.f32_blocks, 3, "radii of both sets and the cross pass");
    let worst = (f32p.precision - ep).abs().max((f32p.recall - er).abs());
    println!("float32 path against exact distances: worst absolute error {worst:.4}");
    assert!(worst <= 1.0 / 260.0, "{worst}");
    let worst16 = (f16.precision - ep).abs().max((f16.recall - er).abs());
    println!("float16 path against exact distances: worst absolute error {worst16:.4}");
    assert!(worst16 <= 0.02, "{worst16}");
    // The radii are the 4th smallest distance, the row's own 0 included.
    let (r, _) = manifold_radii(&Features::new("a", &a64, d).unwrap()).unwrap();
    assert!(r.iter().all(|&v| v > 0.0));
}

/// Bad input to the metrics: one line each, naming what is wrong.
#[test]
fn metrics_refuse_bad_input() {
    let err = |r: anyhow::Result<()>| -> String {
        let e = format!("{:#}", r.unwrap_err());
        assert!(!e.contains('\n'), "one line: {e}");
        println!("refused: {e}");
        e
    };
    let mut x = rand_rows(10, 4, 3, 1.0);
    x[13] = f32::NAN;
    assert!(
        err(Features::new("f.npz", &x, 4).map(|_| ()))
            .contains("f.npz: activation 1 of row 3 is NaN")
    );
    x[13] = f32::INFINITY;
    assert!(err(Features::new("f.npz", &x, 4).map(|_| ())).contains("inf"));
    assert!(err(Features::new("f.npz", &x[..7], 4).map(|_| ())).contains("not whole rows"));
    let y = rand_rows(10, 4, 4, 1.0);
    let one = Features::new("one.npz", &y[..4], 4).unwrap();
    assert!(err(statistics(&one).map(|_| ())).contains("one.npz: 1 image: the covariance"));
    let three = Features::new("three.npz", &y[..12], 4).unwrap();
    let ten = Features::new("ten.npz", &y, 4).unwrap();
    assert!(
        err(precision_recall(&ten, &three).map(|_| ()))
            .contains("three.npz: 3 images; precision and recall need more than k = 3")
    );
    let y5 = rand_rows(10, 5, 5, 1.0);
    let five = Features::new("five.npz", &y5, 5).unwrap();
    assert!(err(precision_recall(&ten, &five).map(|_| ())).contains("width"));
    let (s4, s5) = (statistics(&ten).unwrap(), statistics(&five).unwrap());
    assert!(err(frechet_distance(&s4, &s5).map(|_| ())).contains("dimension 4 against 5"));
    assert!(err(inception_score(&ten, &[0.0; 12], 4).map(|_| ())).contains("not 4 classes x 4"));
    assert!(
        err(Statistics::new("r.npz", vec![0.0; 2], vec![0.0; 3]).map(|_| ()))
            .contains("r.npz: sigma has 3 values")
    );
    assert!(
        err(Statistics::new("r.npz", vec![0.0; 2], vec![1.0, 0.5, 0.0, 1.0]).map(|_| ()))
            .contains("not symmetric")
    );
    assert!(
        err(Statistics::new("r.npz", vec![f64::NAN, 0.0], vec![1.0, 0.0, 0.0, 1.0]).map(|_| ()))
            .contains("mu[0] is NaN")
    );
}

fn small_acts(n: usize, seed: u32) -> Activations {
    Activations {
        pool: rand_rows(n, POOL_DIM, seed, 1.0),
        spatial: rand_rows(n, SPATIAL_DIM, seed + 1, 2.0),
    }
}

/// Write an `.npz` of raw entries (name, descr, shape, data bytes).
fn write_npz(path: &Path, entries: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    let mut w = NpzWriter::create(path).unwrap();
    for (name, descr, shape, data) in entries {
        let mut e = npy_header(descr, shape);
        e.extend_from_slice(data);
        w.entry(&format!("{name}.npy"), &e).unwrap();
    }
    w.finish().unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f64_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// An activation file written and read back is the same, statistics included; without
/// statistics they are computed; wrong widths, shapes, NaN and partial statistics are
/// refused in one line naming the file; an input is never the output.
#[test]
fn activation_file_round_trip_and_refusals() {
    let dir = scratch("acts");
    let acts = small_acts(5, 21);
    let stats = acts.statistics("acts").unwrap();
    let p = dir.join("acts.npz");
    write_activations(&p, &acts, &stats, &[]).unwrap();
    assert!(!dir.join("acts.npz.partial").exists());
    let back = read_activations(&p).unwrap();
    assert_eq!(back.acts, acts);
    assert_eq!(back.stats.as_ref(), Some(&stats));
    assert_eq!(read_statistics(&p).unwrap(), Some(stats.clone()));
    assert_eq!(input_kind(&p).unwrap(), InputKind::Activations);
    println!(
        "round trip: {} rows, statistics equal bit for bit",
        back.acts.rows()
    );

    // No statistics in the file: computed (the same numbers).
    let bare = dir.join("bare.npz");
    write_npz(
        &bare,
        &[
            ("pool_3", "<f4", vec![5, POOL_DIM], f32_bytes(&acts.pool)),
            (
                "spatial",
                "<f4",
                vec![5, SPATIAL_DIM],
                f32_bytes(&acts.spatial),
            ),
        ],
    );
    let b = read_activations(&bare).unwrap();
    assert!(b.stats.is_none());
    assert_eq!(b.fid_stats("bare").unwrap(), stats);

    // The output is an input: refused, the input untouched.
    let before = std::fs::read(&bare).unwrap();
    let e = write_activations(&bare, &acts, &stats, &[&bare]).unwrap_err();
    println!("refused: {e:#}");
    assert!(format!("{e:#}").contains("same file as the input"));
    assert_eq!(std::fs::read(&bare).unwrap(), before);

    let refused = |name: &str, entries: &[(&str, &str, Vec<usize>, Vec<u8>)], want: &str| {
        let f = dir.join(name);
        write_npz(&f, entries);
        let e = format!(
            "{:#}",
            read_activations(&f)
                .and_then(|a| a.fid_stats("x").map(|_| ()))
                .unwrap_err()
        );
        println!("refused: {e}");
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains(name) && e.contains(want), "{e} lacks {want}");
    };
    let pool = || ("pool_3", "<f4", vec![5, POOL_DIM], f32_bytes(&acts.pool));
    let spatial = || {
        (
            "spatial",
            "<f4",
            vec![5, SPATIAL_DIM],
            f32_bytes(&acts.spatial),
        )
    };
    refused(
        "narrow.npz",
        &[
            (
                "pool_3",
                "<f4",
                vec![5, 1000],
                f32_bytes(&acts.pool[..5000]),
            ),
            spatial(),
        ],
        "pool_3 has shape [5, 1000]; expected [N, 2048]",
    );
    refused(
        "rows.npz",
        &[
            pool(),
            (
                "spatial",
                "<f4",
                vec![4, SPATIAL_DIM],
                f32_bytes(&acts.spatial[..4 * SPATIAL_DIM]),
            ),
        ],
        "pool_3 has 5 rows but spatial 4",
    );
    let mut nan = acts.spatial.clone();
    nan[SPATIAL_DIM + 7] = f32::NAN;
    refused(
        "nan.npz",
        &[
            pool(),
            ("spatial", "<f4", vec![5, SPATIAL_DIM], f32_bytes(&nan)),
        ],
        "spatial: activation 7 of row 1 is NaN",
    );
    refused(
        "ints.npz",
        &[
            ("pool_3", "<i4", vec![5, POOL_DIM], f32_bytes(&acts.pool)),
            spatial(),
        ],
        "dtype \"<i4\"",
    );
    refused("half.npz", &[pool()], "has pool_3 but not spatial");
    let mu = || ("mu", "<f8", vec![POOL_DIM], f64_bytes(&stats.pool.mu));
    refused(
        "partial_stats.npz",
        &[pool(), spatial(), mu()],
        "no sigma (mu, sigma, mu_s, sigma_s go together)",
    );
    refused(
        "bad_stats.npz",
        &[
            pool(),
            spatial(),
            mu(),
            ("sigma", "<f8", vec![POOL_DIM], f64_bytes(&stats.pool.mu)),
            (
                "mu_s",
                "<f8",
                vec![SPATIAL_DIM],
                f64_bytes(&stats.spatial.mu),
            ),
            (
                "sigma_s",
                "<f8",
                vec![SPATIAL_DIM, SPATIAL_DIM],
                f64_bytes(&stats.spatial.sigma),
            ),
        ],
        "sigma has shape [2048]; expected [2048, 2048]",
    );
    // The writer checks widths before it creates anything.
    let short = Activations {
        pool: acts.pool[..POOL_DIM * 2].to_vec(),
        spatial: acts.spatial.clone(),
    };
    let none = dir.join("none.npz");
    assert!(write_activations(&none, &short, &stats, &[]).is_err());
    assert!(!none.exists() && !dir.join("none.npz.partial").exists());
    std::fs::remove_dir_all(&dir).ok();
}

fn image_bytes(n: usize, side: usize, seed: u32) -> Vec<u8> {
    let mut r = XorShift32(seed);
    (0..n * side * side * 3)
        .map(|_| r.next_u32() as u8)
        .collect()
}

/// The image readers: an ADM `.npz` and a generate `.npz` stream the file's bytes in
/// batches; a PNG folder in sorted name order; an ADM reference's statistics are read
/// beside its images; bad arrays and mixed sizes are refused in one line naming the file.
#[test]
fn image_inputs_stream_and_refuse() {
    let dir = scratch("inputs");
    let (n, side) = (7, 6);
    let px = image_bytes(n, side, 5);
    let adm = dir.join("ref.npz");
    let acts = small_acts(3, 9);
    let stats = acts.statistics("x").unwrap();
    let FidStats { pool, spatial } = &stats;
    write_npz(
        &adm,
        &[
            ("arr_0", "|u1", vec![n, side, side, 3], px.clone()),
            ("mu", "<f8", vec![POOL_DIM], f64_bytes(&pool.mu)),
            (
                "sigma",
                "<f8",
                vec![POOL_DIM, POOL_DIM],
                f64_bytes(&pool.sigma),
            ),
            ("mu_s", "<f8", vec![SPATIAL_DIM], f64_bytes(&spatial.mu)),
            (
                "sigma_s",
                "<f8",
                vec![SPATIAL_DIM, SPATIAL_DIM],
                f64_bytes(&spatial.sigma),
            ),
        ],
    );
    assert_eq!(input_kind(&adm).unwrap(), InputKind::Images);
    assert_eq!(read_statistics(&adm).unwrap().as_ref(), Some(&stats));
    let mut src = ImageSource::open(&adm).unwrap();
    assert_eq!(
        (src.len(), src.side(), src.format()),
        (n, side, ImageFormat::AdmNpz)
    );
    let mut got = Vec::new();
    let mut sizes = Vec::new();
    while let Some(b) = src.next_batch(3).unwrap() {
        assert_eq!(b.first, got.len() / (side * side * 3));
        sizes.push(b.count);
        got.extend_from_slice(&b.pixels);
    }
    assert_eq!(sizes, [3, 3, 1]);
    assert_eq!(got, px);
    assert!(src.next_batch(3).unwrap().is_none());
    println!("ADM .npz: {n} images of {side} px in batches {sizes:?}, bytes equal");

    // generate's layout: arr_0, arr_1 labels, checkergen.json.
    let gen_npz = dir.join("gen.npz");
    let mut w = NpzWriter::create(&gen_npz).unwrap();
    let mut a0 = npy_header("|u1", &[n, side, side, 3]);
    a0.extend_from_slice(&px);
    w.entry("arr_0.npy", &a0).unwrap();
    let mut a1 = npy_header("<i8", &[n]);
    a1.extend((0..n as i64).flat_map(|l| l.to_le_bytes()));
    w.entry("arr_1.npy", &a1).unwrap();
    w.entry("checkergen.json", b"{}").unwrap();
    w.finish().unwrap();
    let mut g = ImageSource::open(&gen_npz).unwrap();
    assert_eq!(g.format(), ImageFormat::GenerateNpz);
    assert_eq!(g.next_batch(100).unwrap().unwrap().pixels, px);
    assert!(read_statistics(&gen_npz).unwrap().is_none());

    let refused = |path: &Path, want: &str| {
        let e = format!("{:#}", ImageSource::open(path).err().expect("refused"));
        println!("refused: {e}");
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.contains(&path.display().to_string()) && e.contains(want),
            "{e} lacks {want}"
        );
    };
    let bad = |name: &str, descr: &str, shape: Vec<usize>, want: &str| {
        let p = dir.join(name);
        let bytes: usize = shape.iter().product::<usize>() * if descr == "<f4" { 4 } else { 1 };
        write_npz(&p, &[("arr_0", descr, shape, vec![0; bytes])]);
        refused(&p, want);
    };
    bad("float.npz", "<f4", vec![2, 4, 4, 3], "dtype \"<f4\"");
    bad("rgba.npz", "|u1", vec![2, 4, 4, 4], "4 channels");
    bad("wide.npz", "|u1", vec![2, 4, 5, 3], "4 x 5 is not square");
    bad("nchw.npz", "|u1", vec![2, 3, 4, 4], "4 channels");
    bad("flat.npz", "|u1", vec![2, 48], "shape [2, 48]");
    bad("empty.npz", "|u1", vec![0, 4, 4, 3], "no images");
    let neither = dir.join("neither.npz");
    write_npz(&neither, &[("arr_1", "|u1", vec![2], vec![0, 1])]);
    let e = format!("{:#}", input_kind(&neither).unwrap_err());
    println!("refused: {e}");
    assert!(e.contains("neither images (arr_0) nor activations"));

    // A PNG folder: sorted names, batches, then a file of another size is refused by name.
    let pngs = dir.join("pngs");
    std::fs::create_dir_all(&pngs).unwrap();
    let img = side * side * 3;
    for i in [2, 0, 1] {
        checkergen::io::image::write_rgb_png(
            &pngs.join(format!("sample_{i:05}.png")),
            side,
            side,
            &px[i * img..(i + 1) * img],
        )
        .unwrap();
    }
    std::fs::write(pngs.join("notes.txt"), "not an image").unwrap();
    assert_eq!(input_kind(&pngs).unwrap(), InputKind::Images);
    let mut f = ImageSource::open(&pngs).unwrap();
    assert_eq!(
        (f.len(), f.side(), f.format()),
        (3, side, ImageFormat::PngFolder)
    );
    let b1 = f.next_batch(2).unwrap().unwrap();
    let b2 = f.next_batch(2).unwrap().unwrap();
    assert_eq!((b1.count, b2.count), (2, 1));
    assert_eq!([b1.pixels, b2.pixels].concat(), px[..3 * img]);
    println!("PNG folder: 3 images in sorted order, pixels equal");
    checkergen::io::image::write_rgb_png(
        &pngs.join("sample_00003.png"),
        side + 1,
        side + 1,
        &image_bytes(1, side + 1, 3),
    )
    .unwrap();
    refused(&pngs.join(""), "sample_00003.png: image is 7x7, but");
    let odd = dir.join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    checkergen::io::image::write_rgb_png(&odd.join("a.png"), 4, 3, &[0; 36]).unwrap();
    refused(&odd, "a.png: image is 4x3, not square");
    let empty = dir.join("nopng");
    std::fs::create_dir_all(&empty).unwrap();
    refused(&empty, "no .png files");
    std::fs::remove_dir_all(&dir).ok();
}

/// round_f16 agrees with the `half` crate's conversion on normal, subnormal, overflowing
/// and tie values.
#[test]
fn round_f16_matches_half() {
    let mut s = 0x1234_5678u32;
    let mut checked = 0usize;
    let mut check = |x: f32| {
        let want = half::f16::from_f32(x).to_f32();
        let got = checkergen::eval::metrics::round_f16(x);
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "{x:e}: {got:e} vs half's {want:e}"
        );
        checked += 1;
    };
    for _ in 0..200_000 {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        // Exponents spread over float16's range and beyond.
        let e = (s % 48) as i32 - 30;
        let m = (s >> 8) as f32 / (1u32 << 24) as f32 + 1.0;
        let x = m * 2f32.powi(e) * if s & 1 == 1 { -1.0 } else { 1.0 };
        check(x);
        check(f32::from_bits(s));
    }
    for x in [
        0.0,
        -0.0,
        65504.0,
        65519.99,
        65520.0,
        65536.0,
        1e9,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        2f32.powi(-24),
        2f32.powi(-25),
        3.0 * 2f32.powi(-25),
        6.1e-5,
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
    ] {
        check(x);
    }
    println!("round_f16: {checked} values equal to half's conversion");
}
