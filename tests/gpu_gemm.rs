//! The cuBLAS GEMM wrapper (`cuda::gemm::linear`) against `math::matmul_bt` on the
//! bf16-rounded inputs: one table of cases, one harness. Runs on the GPU, or the host emulator without one.
#![cfg(feature = "cuda")]

mod common;

use checkergen::cuda::gemm::linear;
use checkergen::math::matmul_bt;
use common::half16::{nan, round_to, to_f32, to_h};
use common::rand_vec;
use half::bf16;

/// `y (m x n) = x (m x k) w^T` for (m, k, n): f32 output with beta 1 onto a random y, and
/// bf16 output with beta 0 onto a poisoned y.
const CASES: &[(usize, usize, usize)] = &[
    (1, 1024, 3072),
    (37, 1024, 1024),
    (128, 3072, 1024),
    (5, 64, 1024),
];
/// Relative error allowed: f32 output, bf16 output.
const TOL_F32: f64 = 1e-4;
const TOL_BF16: f64 = 1e-2;

#[test]
fn gemm_matches_cpu() {
    common::run_table(
        "cuBLAS linear vs math::matmul_bt",
        CASES,
        |gpu, report, _, seed, &(m, k, n)| {
            let x = round_to::<bf16>(&rand_vec(m * k, seed + 1, 1.0));
            let w = round_to::<bf16>(&rand_vec(n * k, seed + 2, 1.0 / (k as f32).sqrt()));
            let y0 = rand_vec(m * n, seed + 3, 1.0);
            let dx = gpu.upload(&to_h::<bf16>(&x)).unwrap();
            let dw = gpu.upload(&to_h::<bf16>(&w)).unwrap();

            let mut want = y0.clone();
            matmul_bt(&x, &w, &mut want, m, k, n, 1.0);
            let mut dy = gpu.upload(&y0).unwrap();
            linear(gpu, &dx, 0, &dw, &mut dy, 0, m, k, n, 1.0).unwrap();
            let got = gpu.download(&dy).unwrap();
            report.rel(
                &format!("{m}x{k}x{n} f32 out, beta 1"),
                &got,
                &want,
                TOL_F32,
            );

            let mut want0 = vec![0.0; m * n];
            matmul_bt(&x, &w, &mut want0, m, k, n, 0.0);
            let mut dyb = gpu.upload(&nan::<bf16>(m * n)).unwrap();
            linear(gpu, &dx, 0, &dw, &mut dyb, 0, m, k, n, 0.0).unwrap();
            let got = to_f32(&gpu.download(&dyb).unwrap());
            report.rel(
                &format!("{m}x{k}x{n} bf16 out, beta 0"),
                &got,
                &want0,
                TOL_BF16,
            );
        },
    );
}
