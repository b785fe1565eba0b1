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

// ---------------------------------------------------------------------------------------------
// The call value: what cuBLAS receives is what the emulator checks.

use checkergen::cuda::Gpu;
use checkergen::cuda::gemm::{ComputeType, DataType, GemmCall, Op, Operand, gemm};

/// A row-major `y (m x n) = x (m x k) w^T` as the column-major call `linear` makes, but with
/// every operand in a padded buffer: W stored (k x n) with ld k + pad_a, X (k x m) with
/// ld k + pad_b, Y (n x m) with ld n + pad_c, so that the three leading dimensions differ.
#[derive(Debug, Clone, Copy)]
struct Padded {
    m: usize,
    k: usize,
    n: usize,
    pads: (usize, usize, usize),
}

/// A named change to a call.
type Plant = (&'static str, fn(&mut GemmCall));

/// Wrong fields planted in a correct call: each must make the call refused or its result wrong.
const PLANTS: &[Plant] = &[
    ("op A T -> N", |c| c.trans_a = Op::CUBLAS_OP_N),
    ("op B N -> T", |c| c.trans_b = Op::CUBLAS_OP_T),
    ("lda <-> ldb", |c| std::mem::swap(&mut c.a.ld, &mut c.b.ld)),
    ("lda <-> ldc (C and D)", |c| {
        std::mem::swap(&mut c.a.ld, &mut c.c.ld);
        c.d.ld = c.c.ld;
    }),
    ("A and B bf16 -> f16", |c| {
        c.a.dtype = DataType::CUDA_R_16F;
        c.b.dtype = DataType::CUDA_R_16F;
    }),
    ("A alone bf16 -> f16", |c| c.a.dtype = DataType::CUDA_R_16F),
    ("C and D f32 -> bf16", |c| {
        c.c.dtype = DataType::CUDA_R_16BF;
        c.d.dtype = DataType::CUDA_R_16BF;
    }),
    ("compute 32F -> 16F", |c| {
        c.compute = ComputeType::CUBLAS_COMPUTE_16F
    }),
    ("D rows <-> cols", |c| {
        std::mem::swap(&mut c.d.rows, &mut c.d.cols);
        c.c = c.d;
    }),
];

/// One case's buffers: (call, W, X, Y as uploaded, reference y, Y's ld). Every buffer has room
/// for twice the largest matrix any plant can describe, so a planted call stays in bounds on
/// a real GPU too (cuBLAS would not notice an overrun there).
fn padded_case(
    gpu: &Gpu,
    p: &Padded,
    seed: u64,
) -> (GemmCall, Vec<f32>, checkergen::cuda::DevBuf<f32>, Vec<f32>) {
    let Padded { m, k, n, pads } = *p;
    let (lda, ldb, ldc) = (k + pads.0, k + pads.1, n + pads.2);
    let cap = 2 * lda.max(ldb).max(ldc) * m.max(n).max(k);
    let x = round_to::<bf16>(&rand_vec(m * k, seed + 1, 1.0));
    let w = round_to::<bf16>(&rand_vec(n * k, seed + 2, 1.0 / (k as f32).sqrt()));
    // Padding holds other values, so reading it shows.
    let mut wb = round_to::<bf16>(&rand_vec(cap, seed + 3, 1.0));
    let mut xb = round_to::<bf16>(&rand_vec(cap, seed + 4, 1.0));
    for j in 0..n {
        wb[j * lda..j * lda + k].copy_from_slice(&w[j * k..(j + 1) * k]);
    }
    for i in 0..m {
        xb[i * ldb..i * ldb + k].copy_from_slice(&x[i * k..(i + 1) * k]);
    }
    let mut want = vec![0.0; m * n];
    matmul_bt(&x, &w, &mut want, m, k, n, 0.0);
    let y0 = rand_vec(cap, seed + 5, 1.0);
    let dw = gpu.upload(&to_h::<bf16>(&wb)).unwrap();
    let dx = gpu.upload(&to_h::<bf16>(&xb)).unwrap();
    let dy = gpu.upload(&y0).unwrap();
    let bf = DataType::CUDA_R_16BF;
    let call = GemmCall::strided(
        Op::CUBLAS_OP_T,
        (n, m, k),
        [
            Operand {
                ptr: gpu.ptr(&dw),
                dtype: bf,
                ld: lda,
                stride: 0,
            },
            Operand {
                ptr: gpu.ptr(&dx),
                dtype: bf,
                ld: ldb,
                stride: 0,
            },
            Operand {
                ptr: gpu.ptr(&dy),
                dtype: DataType::CUDA_R_32F,
                ld: ldc,
                stride: 0,
            },
        ],
        0.0,
        1,
    );
    // The weights and inputs must outlive the calls: leak them for the test's lifetime.
    std::mem::forget((dw, dx));
    (call, want, dy, y0)
}

/// Y's (m x n) row-major values read back with the correct layout.
fn read_y(gpu: &Gpu, dy: &checkergen::cuda::DevBuf<f32>, p: &Padded) -> Vec<f32> {
    let ldc = p.n + p.pads.2;
    let all = gpu.download(dy).unwrap();
    (0..p.m)
        .flat_map(|i| all[i * ldc..i * ldc + p.n].to_vec())
        .collect()
}

#[test]
fn planted_bugs_in_the_call_are_refused_or_wrong() {
    let cases = [
        // n == k: flipping op(A) keeps the shapes consistent, so the result must be wrong.
        Padded {
            m: 24,
            k: 32,
            n: 32,
            pads: (8, 16, 4),
        },
        Padded {
            m: 20,
            k: 48,
            n: 40,
            pads: (16, 8, 20),
        },
    ];
    common::run_table(
        "GemmCall: correct vs planted bugs",
        &cases,
        |gpu, report, label, seed, p| {
            let (call, want, mut dy, y0) = padded_case(gpu, p, seed);
            gemm(gpu, call).unwrap();
            let got = read_y(gpu, &dy, p);
            report.rel(&format!("{label} correct call"), &got, &want, TOL_F32);
            for (name, plant) in PLANTS {
                let mut bad = call;
                plant(&mut bad);
                gpu.upload_into(&y0, &mut dy, 0).unwrap();
                let caught = match gemm(gpu, bad).and_then(|()| gpu.sync()) {
                    Err(e) => {
                        let e = format!("{e:#}");
                        println!("  plant {name:24}: refused ({})", &e[..e.len().min(110)]);
                        true
                    }
                    Ok(()) => {
                        let got = read_y(gpu, &dy, p);
                        let (rel, _) = common::rel_err(&got, &want);
                        println!("  plant {name:24}: ran, rel err {rel:.2e} (wrong if > 1e-1)");
                        rel.is_nan() || rel > 0.1
                    }
                };
                report.check(
                    &format!("{label} plant {name}"),
                    "missed (1: it ran and matched the reference)",
                    if caught { 0.0 } else { 1.0 },
                    0.5,
                );
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Batch invariance: a row's result does not depend on how many rows the GEMM has.

/// Rows of the full run that differ bitwise from the run with `m` rows: (elements differing,
/// max abs difference).
fn differing(sub: &[f32], full: &[f32]) -> (usize, f32) {
    sub.iter().zip(full).fold((0, 0.0f32), |(n, mx), (a, b)| {
        if a.to_bits() == b.to_bits() {
            (n, mx)
        } else {
            (n + 1, mx.max((a - b).abs()))
        }
    })
}

/// `linear` with every M from 1 to a few hundred (up to 1024 on a GPU) on the same first rows
/// gives bitwise the rows of the largest M, for weight shapes (K, N) of the engine, f32 and
/// bf16 outputs: the pinned cuBLASLt algorithm (no split-K) is what makes this hold on a
/// GPU; on the emulator it checks the host model keeps the same promise.
#[test]
fn rows_do_not_depend_on_the_batch() {
    let gpu = common::gpu("gemm batch invariance");
    let max_m = if common::on_emu(&gpu) { 136 } else { 1024 };
    let ms: Vec<usize> = [1, 2, 3, 5, 8, 16, 17, 33, 64, 100, 128, 255, 256, 512, 777]
        .into_iter()
        .filter(|&m| m < max_m)
        .collect();
    let mut bad = Vec::new();
    for &(k, n) in &[
        (1024, 3072),
        (3072, 1024),
        (64, 1024),
        (1024, 4096),
        (256, 8),
    ] {
        let x = round_to::<bf16>(&rand_vec(max_m * k, 11, 1.0));
        let w = round_to::<bf16>(&rand_vec(n * k, 12, 1.0 / (k as f32).sqrt()));
        let dx = gpu.upload(&to_h::<bf16>(&x)).unwrap();
        let dw = gpu.upload(&to_h::<bf16>(&w)).unwrap();
        let run_f32 = |m: usize| {
            let mut dy = gpu.upload(&vec![f32::NAN; m * n]).unwrap();
            linear(&gpu, &dx, 0, &dw, &mut dy, 0, m, k, n, 0.0).unwrap();
            gpu.download(&dy).unwrap()
        };
        let run_bf16 = |m: usize| {
            let mut dy = gpu.upload(&nan::<bf16>(m * n)).unwrap();
            linear(&gpu, &dx, 0, &dw, &mut dy, 0, m, k, n, 0.0).unwrap();
            to_f32(&gpu.download(&dy).unwrap())
        };
        let (full, fullb) = (run_f32(max_m), run_bf16(max_m));
        let mut want = vec![0.0; max_m * n];
        matmul_bt(&x, &w, &mut want, max_m, k, n, 0.0);
        let (rel, _) = common::rel_err(&full, &want);
        assert!(
            rel < TOL_F32,
            "K {k} N {n}: rel err {rel:.2e} against matmul_bt"
        );
        let mut worst = (0usize, 0.0f32);
        for &m in &ms {
            for (what, sub, whole) in [("f32", run_f32(m), &full), ("bf16", run_bf16(m), &fullb)] {
                let (cnt, mx) = differing(&sub, &whole[..m * n]);
                if cnt > 0 {
                    bad.push(format!(
                        "K {k} N {n} {what}: M {m} vs M {max_m}: {cnt} elements differ (max {mx:.2e})"
                    ));
                }
                worst = (worst.0.max(cnt), worst.1.max(mx));
            }
        }
        println!(
            "K {k} N {n}: M in {ms:?} vs M {max_m}: rows bitwise equal: {} (worst: {} elements, \
             max diff {:.2e}); rel err vs matmul_bt {rel:.2e}",
            worst.0 == 0,
            worst.0,
            worst.1
        );
    }
    assert!(
        bad.is_empty(),
        "rows depend on the batch:\n{}",
        bad.join("\n")
    );
}

/// The attention GEMMs' strided batches (one entry per image): entry i is bitwise the same
/// whatever the batch count, for the scores (op T, f32 out) and P V (op N, bf16 out) calls.
#[test]
fn strided_batch_entries_do_not_depend_on_the_batch_count() {
    let gpu = common::gpu("gemm strided batch invariance");
    let (tok, c) = (64usize, 128usize);
    let max_b = 16;
    let ld = 3 * c;
    let qkv = round_to::<bf16>(&rand_vec(max_b * tok * ld, 21, 1.0));
    let dq = gpu.upload(&to_h::<bf16>(&qkv)).unwrap();
    let probs = round_to::<bf16>(&rand_vec(max_b * tok * tok, 22, 0.1));
    let dp = gpu.upload(&to_h::<bf16>(&probs)).unwrap();
    let bf = DataType::CUDA_R_16BF;
    let op = |ptr: u64, dtype, ld: usize, stride: usize| Operand {
        ptr,
        dtype,
        ld,
        stride,
    };
    let scores = |b: usize| {
        let out = gpu.upload(&vec![f32::NAN; b * tok * tok]).unwrap();
        let q = gpu.ptr(&dq);
        let call = GemmCall::strided(
            Op::CUBLAS_OP_T,
            (tok, tok, c),
            [
                op(q + (c * 2) as u64, bf, ld, tok * ld),
                op(q, bf, ld, tok * ld),
                op(gpu.ptr(&out), DataType::CUDA_R_32F, tok, tok * tok),
            ],
            0.0,
            b,
        );
        gemm(&gpu, call).unwrap();
        gpu.download(&out).unwrap()
    };
    let pv = |b: usize| {
        let out = gpu.upload(&nan::<bf16>(b * tok * c)).unwrap();
        let call = GemmCall::strided(
            Op::CUBLAS_OP_N,
            (c, tok, tok),
            [
                op(gpu.ptr(&dq) + (2 * c * 2) as u64, bf, ld, tok * ld),
                op(gpu.ptr(&dp), bf, tok, tok * tok),
                op(gpu.ptr(&out), bf, c, tok * c),
            ],
            0.0,
            b,
        );
        gemm(&gpu, call).unwrap();
        to_f32(&gpu.download(&out).unwrap())
    };
    let (s_full, o_full) = (scores(max_b), pv(max_b));
    let mut bad = Vec::new();
    for b in [1, 2, 3, 7, 8] {
        let (ds, dov) = (
            differing(&scores(b), &s_full[..b * tok * tok]),
            differing(&pv(b), &o_full[..b * tok * c]),
        );
        println!(
            "batch count {b} vs {max_b}: scores differ in {} elements (max {:.2e}), P V in {} \
             (max {:.2e})",
            ds.0, ds.1, dov.0, dov.1
        );
        if ds.0 + dov.0 > 0 {
            bad.push(b);
        }
    }
    assert!(
        bad.is_empty(),
        "entries depend on the batch count at {bad:?}"
    );
}
