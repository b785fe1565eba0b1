//! kernels/norm.cu against its CPU reference `cpu::ops::norm`: one table of cases, one harness
//! (llama.cpp test-backend-ops style). Runs on the GPU, or the host emulator
//! without one (tests/common::gpu; CHECKERGEN_DEVICE=cuda|emu forces one).
#![cfg(feature = "cuda")]

mod common;

use checkergen::cpu::ops;
use checkergen::cuda::norm;
use common::half16::{nan, round_to, to_f32, to_h};
use common::rand_vec;
use half::bf16;

/// Where the AdaLN (shift, scale) pair is read from: none, or at offset `k * C` of the row.
#[derive(Clone, Copy, Debug)]
enum Modulation {
    None,
    At(usize),
}

#[derive(Clone, Copy, Debug)]
enum Case {
    /// rows sequences of n tokens of width c.
    RmsNormAdaLn {
        rows: usize,
        n: usize,
        c: usize,
        modulation: Modulation,
        tol: f64,
    },
    /// T tokens, F hidden (input (T, 2F) bf16).
    SiluMul { t: usize, f: usize, tol: f64 },
    /// (rows, n) f32 += (n).
    AddBias { rows: usize, n: usize, tol: f64 },
}

use Case::*;
use Modulation::{At, None as NoMod};

/// The RMSNorm shapes (rows, n, C), each run with every modulation variant.
const RMS_SHAPES: &[(usize, usize, usize)] = &[(1, 1, 128), (3, 5, 1024), (4, 64, 512), (2, 7, 96)];
const MODULATIONS: [Modulation; 3] = [At(0), At(2), NoMod];

/// The table: every RMSNorm shape x modulation, then SwiGLU and the bias add.
fn cases() -> Vec<Case> {
    let mut cases: Vec<Case> = RMS_SHAPES
        .iter()
        .flat_map(|&(rows, n, c)| {
            MODULATIONS.map(|modulation| RmsNormAdaLn {
                rows,
                n,
                c,
                modulation,
                tol: 1e-2,
            })
        })
        .collect();
    cases.push(SiluMul {
        t: 37,
        f: 3072,
        tol: 1e-2,
    });
    cases.push(AddBias {
        rows: 5,
        n: 4096,
        tol: 1e-6,
    });
    cases
}

#[test]
fn norm_kernels_match_cpu_ops() {
    common::run_table(
        "norm.cu vs cpu::ops::norm",
        &cases(),
        |gpu, report, label, seed, case| {
            match *case {
                RmsNormAdaLn {
                    rows,
                    n,
                    c,
                    modulation,
                    tol,
                } => {
                    let t = rows * n;
                    let x = rand_vec(t * c, seed + 1, 2.0);
                    let w = rand_vec(c, seed + 2, 1.0);
                    let m = rand_vec(rows * 4 * c, seed + 3, 1.0);
                    let (dx, dw, dm) = (
                        gpu.upload(&x).unwrap(),
                        gpu.upload(&w).unwrap(),
                        gpu.upload(&m).unwrap(),
                    );
                    let off = match modulation {
                        At(k) => Some(k * c),
                        NoMod => None,
                    };
                    // Poison the output so unwritten elements show.
                    let mut out = gpu.upload(&nan::<bf16>(t * c)).unwrap();
                    let dmod = off.map(|o| (&dm, o));
                    norm::rmsnorm_adaln(gpu, &dx, &dw, dmod, &mut out, t, n, c, 1e-6).unwrap();
                    let got = to_f32(&gpu.download(&out).unwrap());
                    let want = ops::rmsnorm_adaln(&x, &w, off.map(|o| (&m[..], o)), n, c, 1e-6);
                    report.rel(label, &got, &want, tol);
                }
                SiluMul { t, f, tol } => {
                    // bf16 input: the reference sees the rounded values.
                    let g = round_to::<bf16>(&rand_vec(t * 2 * f, seed + 4, 4.0));
                    let dg = gpu.upload(&to_h::<bf16>(&g)).unwrap();
                    let mut dh = gpu.upload(&nan::<bf16>(t * f)).unwrap();
                    norm::silu_mul(gpu, &dg, &mut dh, t, f).unwrap();
                    let got = to_f32(&gpu.download(&dh).unwrap());
                    report.rel(label, &got, &ops::silu_mul(&g, f), tol);
                }
                AddBias { rows, n, tol } => {
                    let y = rand_vec(rows * n, seed + 5, 3.0);
                    let b = rand_vec(n, seed + 6, 1.0);
                    let mut dy = gpu.upload(&y).unwrap();
                    let db = gpu.upload(&b).unwrap();
                    norm::add_bias_f32(gpu, &mut dy, &db, rows, n).unwrap();
                    let got = gpu.download(&dy).unwrap();
                    let mut want = y.clone();
                    ops::add_bias(&mut want, &b);
                    report.rel(label, &got, &want, tol);
                }
            }
        },
    );
}
