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

/// Where the AdaLN (shift, scale) pair is read from: none, at offset `k * C` of the row's 4C
/// values, or at offset `k * C` of layer `l`'s 4C values in rows of `layers` layers (the
/// engine's (rows, L*4C) buffer of every layer's modulations).
#[derive(Clone, Copy, Debug)]
enum Modulation {
    None,
    At(usize),
    Layer { l: usize, layers: usize, k: usize },
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
use Modulation::{At, Layer, None as NoMod};

/// The RMSNorm shapes (rows, n, C), each run with every modulation variant.
const RMS_SHAPES: &[(usize, usize, usize)] = &[(1, 1, 128), (3, 5, 1024), (4, 64, 512), (2, 7, 96)];
const MODULATIONS: [Modulation; 5] = [
    At(0),
    At(2),
    NoMod,
    Layer {
        l: 0,
        layers: 3,
        k: 2,
    },
    Layer {
        l: 2,
        layers: 3,
        k: 0,
    },
];

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
                    // The device buffer holds `layers` layers' 4C values per row; the reference
                    // gets layer l's (rows, 4C).
                    let (l, layers, at) = match modulation {
                        At(k) => (0, 1, Some(k * c)),
                        Layer { l, layers, k } => (l, layers, Some(k * c)),
                        NoMod => (0, 1, None),
                    };
                    let stride = layers * 4 * c;
                    let m = rand_vec(rows * stride, seed + 3, 1.0);
                    let m_layer: Vec<f32> = m
                        .chunks_exact(stride)
                        .flat_map(|r| r[l * 4 * c..(l + 1) * 4 * c].iter().copied())
                        .collect();
                    let (dx, dw, dm) = (
                        gpu.upload(&x).unwrap(),
                        gpu.upload(&w).unwrap(),
                        gpu.upload(&m).unwrap(),
                    );
                    // Poison the output so unwritten elements show.
                    let mut out = gpu.upload(&nan::<bf16>(t * c)).unwrap();
                    let dmod = at.map(|o| norm::AdaLn {
                        buf: &dm,
                        offset: l * 4 * c + o,
                        row_stride: stride,
                    });
                    norm::rmsnorm_adaln(gpu, &dx, &dw, dmod, &mut out, t, n, c, 1e-6).unwrap();
                    let got = to_f32(&gpu.download(&out).unwrap());
                    let want =
                        ops::rmsnorm_adaln(&x, &w, at.map(|o| (&m_layer[..], o)), n, c, 1e-6);
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
