//! kernels/norm.cu against f32 CPU references on random inputs (skips without a GPU).
#![cfg(feature = "cuda")]

mod common;

use checkergen::cuda::norm;
use half::bf16;

fn rand_vec(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            scale * (checkergen::rng::token_uniform(seed as u64, 0, 0, i as u32) as f32 * 2.0 - 1.0)
        })
        .collect()
}

fn to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

#[test]
fn rmsnorm_adaln_matches_cpu() {
    let Some(gpu) = common::gpu_or_skip("rmsnorm_adaln") else {
        return;
    };
    for &(rows, n, c) in &[
        (1usize, 1usize, 128usize),
        (3, 5, 1024),
        (4, 64, 512),
        (2, 7, 96),
    ] {
        let t = rows * n;
        let x = rand_vec(t * c, 1, 2.0);
        let w = rand_vec(c, 2, 1.0);
        let m = rand_vec(rows * 4 * c, 3, 1.0);
        let dx = gpu.upload(&x).unwrap();
        let dw = gpu.upload(&w).unwrap();
        let dm = gpu.upload(&m).unwrap();
        for (with_mod, off) in [(true, 0usize), (true, 2 * c), (false, 0)] {
            // Poison the output so unwritten elements show.
            let mut out = gpu.upload(&vec![bf16::from_f32(f32::NAN); t * c]).unwrap();
            let modulation = with_mod.then_some((&dm, off));
            norm::rmsnorm_adaln(&gpu, &dx, &dw, modulation, &mut out, t, n, c, 1e-6).unwrap();
            let got = to_f32(&gpu.download(&out).unwrap());
            let mut want = vec![0.0f32; t * c];
            for tok in 0..t {
                let xr = &x[tok * c..(tok + 1) * c];
                let inv = 1.0 / (xr.iter().map(|v| v * v).sum::<f32>() / c as f32 + 1e-6).sqrt();
                for i in 0..c {
                    let mut v = xr[i] * inv * w[i];
                    if with_mod {
                        let mr = &m[(tok / n) * 4 * c + off..];
                        v = v * mr[c + i] + mr[i];
                    }
                    want[tok * c + i] = v;
                }
            }
            let (rel, abs) = common::rel_err(&got, &want);
            println!(
                "rmsnorm rows {rows} n {n} C {c} mod {with_mod}/{off}: rel {rel:.2e} max abs {abs:.2e}"
            );
            assert!(got.iter().all(|v| v.is_finite()));
            assert!(rel < 1e-2, "rel err {rel}");
        }
    }
}

#[test]
fn silu_mul_and_bias_match_cpu() {
    let Some(gpu) = common::gpu_or_skip("silu_mul") else {
        return;
    };
    let (t, f) = (37usize, 3072usize);
    let g: Vec<f32> = rand_vec(t * 2 * f, 4, 4.0);
    let gb: Vec<bf16> = g.iter().map(|&v| bf16::from_f32(v)).collect();
    let dg = gpu.upload(&gb).unwrap();
    let mut dh = gpu.upload(&vec![bf16::from_f32(f32::NAN); t * f]).unwrap();
    norm::silu_mul(&gpu, &dg, &mut dh, t, f).unwrap();
    let got = to_f32(&gpu.download(&dh).unwrap());
    let want: Vec<f32> = (0..t * f)
        .map(|i| {
            let (r, j) = (i / f, i % f);
            let a = gb[r * 2 * f + j].to_f32();
            let b = gb[r * 2 * f + f + j].to_f32();
            a / (1.0 + (-a).exp()) * b
        })
        .collect();
    let (rel, _) = common::rel_err(&got, &want);
    println!("silu_mul T {t} F {f}: rel {rel:.2e}");
    assert!(rel < 1e-2);

    let (rows, n) = (5usize, 4096usize);
    let y = rand_vec(rows * n, 5, 3.0);
    let b = rand_vec(n, 6, 1.0);
    let mut dy = gpu.upload(&y).unwrap();
    let db = gpu.upload(&b).unwrap();
    norm::add_bias_f32(&gpu, &mut dy, &db, rows, n).unwrap();
    let got = gpu.download(&dy).unwrap();
    let want: Vec<f32> = (0..rows * n).map(|i| y[i] + b[i % n]).collect();
    let (rel, _) = common::rel_err(&got, &want);
    assert!(rel < 1e-6, "bias rel {rel}");
}
