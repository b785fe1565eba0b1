//! kernels/embed.cu and the cuBLAS GEMM wrapper against CPU references (skip without a GPU).
#![cfg(feature = "cuda")]

mod common;

use checkergen::cuda::embed::{self, CodevecMlp, InputTables, StepIndex};
use checkergen::cuda::gemm::linear;
use checkergen::rng::token_uniform;
use half::bf16;

fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| scale * (token_uniform(seed, 0, 0, i as u32) as f32 * 2.0 - 1.0))
        .collect()
}

fn bf(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

#[test]
fn upsample_codes_matches_cpu() {
    let Some(gpu) = common::gpu_or_skip("upsample_codes") else {
        return;
    };
    let (v, e) = (4096usize, 8usize);
    let mut cb = rand_vec(v * e, 1, 1.0);
    checkergen::model::weights::normalize_rows(&mut cb, e);
    let dcb = gpu.upload(&cb).unwrap();
    for &(batch, si, so) in &[
        (1usize, 1usize, 2usize),
        (3, 2, 5),
        (2, 5, 16),
        (4, 8, 16),
        (1, 13, 16),
        (5, 1, 4),
    ] {
        let toks: Vec<u32> = (0..batch * si * si)
            .map(|i| (token_uniform(2, 0, 0, i as u32) * v as f64) as u32)
            .collect();
        let want = checkergen::sampler::next_scale_latents(&cb, e, &toks, batch, si, so);
        let dg = gpu
            .upload(&toks.iter().map(|&t| t as i32).collect::<Vec<_>>())
            .unwrap();
        let mut z0 = gpu.upload(&vec![f32::NAN; batch * so * so * e]).unwrap();
        embed::upsample_codes(&gpu, &dg, &dcb, &mut z0, batch, si, so, e).unwrap();
        let got = gpu.download(&z0).unwrap();
        let (rel, abs) = common::rel_err(&got, &want);
        println!("upsample B {batch} {si}->{so}: rel {rel:.2e} max abs {abs:.2e}");
        assert!(rel < 1e-5, "rel {rel}");
    }
}

#[test]
fn codevec_hidden_matches_cpu() {
    let Some(gpu) = common::gpu_or_skip("codevec_hidden") else {
        return;
    };
    let (rows, e) = (1000usize, 8usize);
    let (w0, b0) = (rand_vec(64 * e, 3, 1.0), rand_vec(64, 4, 0.1));
    let (w2, b2) = (rand_vec(64 * 64, 5, 0.2), rand_vec(64, 6, 0.1));
    let z = rand_vec(rows * e, 7, 1.0);
    let mlp = CodevecMlp {
        w0: gpu.upload(&w0).unwrap(),
        b0: gpu.upload(&b0).unwrap(),
        w2: gpu.upload(&w2).unwrap(),
        b2: gpu.upload(&b2).unwrap(),
        e,
    };
    let dz = gpu.upload(&z).unwrap();
    let mut h = gpu
        .upload(&vec![bf16::from_f32(f32::NAN); rows * 64])
        .unwrap();
    embed::codevec_hidden(&gpu, &mlp, &dz, &mut h, rows).unwrap();
    let got: Vec<f32> = gpu
        .download(&h)
        .unwrap()
        .iter()
        .map(|x| x.to_f32())
        .collect();
    let silu = checkergen::cpu::ops::silu;
    let h1 = checkergen::cpu::ops::linear(&z, &w0, Some(&b0), rows, e, 64);
    let h1: Vec<f32> = h1.into_iter().map(silu).collect();
    let want: Vec<f32> = checkergen::cpu::ops::linear(&h1, &w2, Some(&b2), rows, 64, 64)
        .into_iter()
        .map(silu)
        .collect();
    let (rel, _) = common::rel_err(&got, &want);
    println!("codevec_hidden rows {rows}: rel {rel:.2e}");
    assert!(rel < 1e-2);
}

#[test]
fn gather_inputs_matches_cpu() {
    let Some(gpu) = common::gpu_or_skip("gather_inputs") else {
        return;
    };
    let (c, ntok, v) = (256usize, 341usize, 512usize);
    let (pa, pc, dc) = (
        rand_vec(ntok * c, 8, 1.0),
        rand_vec(ntok * c, 9, 1.0),
        rand_vec(v * c, 10, 1.0),
    );
    let (empty, bias) = (rand_vec(c, 11, 1.0), rand_vec(c, 12, 0.1));
    let t = InputTables {
        pa: gpu.upload(&pa).unwrap(),
        pc: gpu.upload(&pc).unwrap(),
        dc: gpu.upload(&dc).unwrap(),
        empty: gpu.upload(&empty).unwrap(),
        bias: gpu.upload(&bias).unwrap(),
        c,
    };
    // Scale 8x8 (offset 21), batch 3, guided (6 rows), a step of 16 cells after a previous block.
    let (batch, rows, s, off) = (3usize, 6usize, 8usize, 21usize);
    let cells = s * s;
    let src = rand_vec(batch * cells * c, 13, 1.0);
    let grid: Vec<i32> = (0..batch * cells).map(|i| (i * 7 % v) as i32).collect();
    let seq = checkergen::order::sequence(s).unwrap();
    let (cur, prev) = (&seq[16..32], &seq[0..16]);
    for first in [false, true] {
        let n = cur.len();
        let idx = StepIndex {
            cur_global: gpu
                .upload(&cur.iter().map(|&p| (off + p) as i32).collect::<Vec<_>>())
                .unwrap(),
            local: gpu
                .upload(&cur.iter().map(|&p| p as i32).collect::<Vec<_>>())
                .unwrap(),
            prev_rope: gpu.upload(&vec![0i32; n]).unwrap(),
            prev_global: (!first).then(|| {
                gpu.upload(&prev.iter().map(|&p| (off + p) as i32).collect::<Vec<_>>())
                    .unwrap()
            }),
            prev_local: (!first).then(|| {
                gpu.upload(&prev.iter().map(|&p| p as i32).collect::<Vec<_>>())
                    .unwrap()
            }),
            n,
        };
        let dsrc = gpu.upload(&src).unwrap();
        let dgrid = gpu.upload(&grid).unwrap();
        let mut x = gpu.upload(&vec![f32::NAN; rows * n * c]).unwrap();
        embed::gather_inputs(&gpu, &t, &dsrc, &dgrid, &idx, &mut x, rows, batch, n, cells).unwrap();
        let got = gpu.download(&x).unwrap();
        let mut want = vec![0.0f32; rows * n * c];
        for r in 0..rows {
            let b = r % batch;
            for j in 0..n {
                let g = off + cur[j];
                for i in 0..c {
                    let mut val = pa[g * c + i] + src[(b * cells + cur[j]) * c + i] + bias[i];
                    if first {
                        val += empty[i];
                    } else {
                        let tok = grid[b * cells + prev[j]] as usize;
                        val += pc[(off + prev[j]) * c + i] + dc[tok * c + i];
                    }
                    want[(r * n + j) * c + i] = val;
                }
            }
        }
        let (rel, _) = common::rel_err(&got, &want);
        println!("gather_inputs first={first}: rel {rel:.2e}");
        assert!(rel < 1e-6);
    }
}

#[test]
fn gemm_bf16_matches_cpu() {
    let Some(gpu) = common::gpu_or_skip("gemm") else {
        return;
    };
    for &(m, k, n) in &[
        (1usize, 1024usize, 3072usize),
        (37, 1024, 1024),
        (128, 3072, 1024),
        (5, 64, 1024),
    ] {
        let x = rand_vec(m * k, 14, 1.0);
        let w = rand_vec(n * k, 15, 1.0 / (k as f32).sqrt());
        let y0 = rand_vec(m * n, 16, 1.0);
        let (xb, wb) = (bf(&x), bf(&w));
        let xr: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
        let wr: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
        let mut want = y0.clone();
        checkergen::cpu::ops::matmul_bt(&xr, &wr, &mut want, m, k, n, 1.0);
        let dx = gpu.upload(&xb).unwrap();
        let dw = gpu.upload(&wb).unwrap();
        let mut dy = gpu.upload(&y0).unwrap();
        linear(&gpu, &dx, 0, &dw, &mut dy, 0, m, k, n, 1.0).unwrap();
        let (rel, _) = common::rel_err(&gpu.download(&dy).unwrap(), &want);
        println!("gemm f32-out beta=1 {m}x{k}x{n}: rel {rel:.2e}");
        assert!(rel < 1e-4);
        let mut dyb = gpu.upload(&vec![bf16::from_f32(f32::NAN); m * n]).unwrap();
        linear(&gpu, &dx, 0, &dw, &mut dyb, 0, m, k, n, 0.0).unwrap();
        let got: Vec<f32> = gpu
            .download(&dyb)
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let mut want0 = vec![0.0; m * n];
        checkergen::cpu::ops::matmul_bt(&xr, &wr, &mut want0, m, k, n, 0.0);
        let (rel, _) = common::rel_err(&got, &want0);
        println!("gemm bf16-out {m}x{k}x{n}: rel {rel:.2e}");
        assert!(rel < 1e-2);
    }
}
