//! kernels/embed.cu against its CPU reference `cpu::ops::embed`: one table of cases, one
//! harness. Runs on the GPU, or the host emulator without one.
#![cfg(feature = "cuda")]

mod common;

use checkergen::cpu::ops;
use checkergen::cuda::Gpu;
use checkergen::cuda::embed::{self, CodevecMlp, StepIndex};
use checkergen::model::weights::{CodeHidden, InputTables, Linear, normalize_rows};
use common::half16::{nan, to_f32};
use common::{i32s, rand_tokens, rand_vec};
use half::bf16;

#[derive(Clone, Copy, Debug)]
enum Case {
    /// z0 of the next scale from a (batch, si, si) grid upsampled to so x so: (batch, si, so).
    UpsampleCodes(usize, usize, usize),
    /// The code MLP's hidden layers on `rows` code vectors.
    CodevecHidden { rows: usize },
    /// One step's inputs: scale 8x8 at offset 21, batch 3, guided (6 rows), 16 cells after a
    /// previous block (`first`: a scale's first step, no previous block).
    GatherInputs { first: bool },
}

use Case::*;

impl Case {
    /// Relative error allowed: f32 outputs 1e-5 (upsample) and 1e-6 (a sum of table rows);
    /// the bf16 MLP output 1e-2.
    fn tol(&self) -> f64 {
        match self {
            UpsampleCodes(..) => 1e-5,
            CodevecHidden { .. } => 1e-2,
            GatherInputs { .. } => 1e-6,
        }
    }
}

const CASES: &[Case] = &[
    UpsampleCodes(1, 1, 2),
    UpsampleCodes(3, 2, 5),
    UpsampleCodes(2, 5, 16),
    UpsampleCodes(4, 8, 16),
    UpsampleCodes(1, 13, 16),
    UpsampleCodes(5, 1, 4),
    CodevecHidden { rows: 1000 },
    GatherInputs { first: false },
    GatherInputs { first: true },
];

#[test]
fn embed_kernels_match_cpu_ops() {
    common::run_table(
        "embed.cu vs cpu::ops::embed",
        CASES,
        |gpu, report, label, seed, case| {
            let (got, want) = match *case {
                UpsampleCodes(batch, si, so) => upsample_case(gpu, batch, si, so, seed),
                CodevecHidden { rows } => codevec_case(gpu, rows, seed),
                GatherInputs { first } => gather_case(gpu, first, seed),
            };
            report.rel(label, &got, &want, case.tol());
        },
    );
}

fn upsample_case(gpu: &Gpu, batch: usize, si: usize, so: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let (v, e) = (4096usize, 8usize);
    let mut cb = rand_vec(v * e, seed + 1, 1.0);
    normalize_rows(&mut cb, e);
    let toks = rand_tokens(batch * si * si, seed + 2, v);
    let want = ops::upsample_codes(&cb, e, &toks, batch, si, so);
    let dcb = gpu.upload(&cb).unwrap();
    let dg = gpu
        .upload(&toks.iter().map(|&t| t as i32).collect::<Vec<_>>())
        .unwrap();
    let mut z0 = gpu.upload(&vec![f32::NAN; batch * so * so * e]).unwrap();
    let codebook = embed::Codebook { vectors: &dcb, e };
    embed::upsample_codes(gpu, &dg, codebook, &mut z0, batch, si, so).unwrap();
    (gpu.download(&z0).unwrap(), want)
}

fn codevec_case(gpu: &Gpu, rows: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let e = 8usize;
    let lin = |din: usize, dout: usize, s: u64, ws: f32| {
        Linear::new(
            rand_vec(dout * din, s, ws),
            Some(rand_vec(dout, s + 1, 0.1)),
            din,
            dout,
        )
    };
    let mlp = CodeHidden {
        l0: lin(e, 64, seed + 3, 1.0),
        l2: lin(64, 64, seed + 5, 0.2),
    };
    let z = rand_vec(rows * e, seed + 7, 1.0);
    let up = |x: &[f32]| gpu.upload(x).unwrap();
    let dmlp = CodevecMlp {
        w0: up(&mlp.l0.w),
        b0: up(mlp.l0.b.as_ref().unwrap()),
        w2: up(&mlp.l2.w),
        b2: up(mlp.l2.b.as_ref().unwrap()),
        e,
    };
    let dz = up(&z);
    let mut h = gpu.upload(&nan::<bf16>(rows * 64)).unwrap();
    embed::codevec_hidden(gpu, &dmlp, &dz, &mut h, rows).unwrap();
    let got = to_f32(&gpu.download(&h).unwrap());
    (got, ops::codevec_hidden(&mlp, &z, rows))
}

fn gather_case(gpu: &Gpu, first: bool, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let (c, ntok, v) = (256usize, 341usize, 512usize);
    let tables = InputTables {
        pa: rand_vec(ntok * c, seed + 8, 1.0),
        pc: rand_vec(ntok * c, seed + 9, 1.0),
        dc: rand_vec(v * c, seed + 10, 1.0),
        empty: rand_vec(c, seed + 11, 1.0),
        bias: rand_vec(c, seed + 12, 0.1),
    };
    let up = |x: &[f32]| gpu.upload(x).unwrap();
    let dt = embed::InputTables::upload(gpu, &tables, c).unwrap();
    let (batch, rows, s, off) = (3usize, 6usize, 8usize, 21usize);
    let cells = s * s;
    let src = rand_vec(batch * cells * c, seed + 13, 1.0);
    let grid: Vec<u32> = (0..batch * cells).map(|i| (i * 7 % v) as u32).collect();
    let seq = checkergen::order::sequence(s).unwrap();
    let (cur, prev) = (&seq[16..32], &seq[0..16]);
    let n = cur.len();
    let cur_global: Vec<usize> = cur.iter().map(|&p| off + p).collect();
    let prev_global: Vec<usize> = prev.iter().map(|&p| off + p).collect();
    let want = ops::gather_inputs(
        &tables,
        &src,
        &grid,
        &cur_global,
        cur,
        (!first).then_some((&prev_global[..], prev)),
        rows,
        batch,
        cells,
    );
    let idx = StepIndex {
        cur_global: gpu.upload(&i32s(&cur_global)).unwrap(),
        local: gpu.upload(&i32s(cur)).unwrap(),
        prev_rope: gpu.upload(&vec![0i32; n]).unwrap(),
        prev_global: (!first).then(|| gpu.upload(&i32s(&prev_global)).unwrap()),
        prev_local: (!first).then(|| gpu.upload(&i32s(prev)).unwrap()),
        n,
    };
    let dsrc = up(&src);
    let dgrid = gpu
        .upload(&grid.iter().map(|&t| t as i32).collect::<Vec<_>>())
        .unwrap();
    let mut x = gpu.upload(&vec![f32::NAN; rows * n * c]).unwrap();
    let at = embed::SeqRows::step(n);
    embed::gather_inputs(
        gpu, &dt, &dsrc, &dgrid, &idx, &mut x, rows, batch, n, cells, at,
    )
    .unwrap();
    (gpu.download(&x).unwrap(), want)
}
