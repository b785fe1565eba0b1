//! kernels/attention.cu (RoPE + KV append, attention v1 and v2) against its CPU reference
//! `cpu::ops::attention` on random inputs of real shapes: one table of cases, one harness
//! (llama.cpp test-backend-ops style), then a three-step flow through both kernels. The device
//! tests run on the GPU, or the host emulator without one; the shape checks that need no
//! device run everywhere.
#![cfg(feature = "cuda")]

mod common;

use checkergen::cpu::ops::{self, attention::BlockMask as HostMask};
use checkergen::cuda::Gpu;
use checkergen::cuda::attention::{self, AttentionImpl, AttnShape, BlockMask};
use common::half16::{nan, to_f32};
use common::{Report, Rng, i32s};
use half::bf16;

/// Rows of the RoPE table (N + 2 for the ratio-2 pyramid).
const TABLE_ROWS: usize = 343;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mask {
    None,
    /// Block-causal, query i in the block of key start + i.
    Causal,
    /// Block-causal, and query 0 sees nothing (its block id is -1): o = 0 there.
    CausalEmptyRow,
}

/// What a case runs.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// rope_kv_append; `mixing`: key-mixing layer (weights at offset H of a (2, H) table).
    Rope { mixing: bool },
    /// attention v1 and v2; q scale 1 gives flat softmaxes, 8 peaked ones.
    Attention { mask: Mask, qscale: f32 },
}

/// (D, H, n, start, rows) and the op.
#[derive(Clone, Copy, Debug)]
struct Case(usize, usize, usize, usize, usize, Op);

/// Relative error allowed on every output (bf16 storage, f32 accumulation).
const TOL: f64 = 1e-2;

const fn rope(mixing: bool) -> Op {
    Op::Rope { mixing }
}

const fn att(mask: Mask, qscale: f32) -> Op {
    Op::Attention { mask, qscale }
}

use Mask::{Causal, CausalEmptyRow, None as NoMask};

const CASES: &[Case] = &[
    Case(32, 4, 1, 0, 1, rope(false)),
    Case(64, 16, 4, 1, 3, rope(true)),
    Case(64, 16, 63, 86, 32, rope(true)),
    Case(32, 16, 64, 278, 3, rope(false)),
    Case(64, 4, 128, 278, 1, rope(true)),
    Case(32, 4, 128, 0, 32, rope(true)),
    Case(128, 8, 5, 10, 2, rope(true)),
    Case(32, 4, 1, 0, 1, att(NoMask, 1.0)),
    Case(64, 16, 1, 1, 3, att(NoMask, 4.0)),
    Case(64, 16, 4, 86, 32, att(NoMask, 2.0)),
    Case(32, 16, 63, 278, 3, att(NoMask, 4.0)),
    Case(64, 4, 64, 278, 32, att(NoMask, 1.0)),
    Case(64, 16, 128, 86, 3, att(NoMask, 8.0)),
    Case(32, 4, 128, 0, 32, att(Causal, 2.0)),
    Case(64, 16, 63, 1, 3, att(Causal, 4.0)),
    Case(64, 16, 64, 278, 1, att(Causal, 2.0)),
    Case(32, 16, 4, 86, 3, att(CausalEmptyRow, 2.0)),
    Case(64, 4, 17, 5, 2, att(CausalEmptyRow, 2.0)),
    Case(128, 8, 17, 30, 2, att(NoMask, 2.0)),
    Case(64, 16, 64, 4032, 2, att(NoMask, 4.0)), // 4096 keys
    Case(32, 4, 512, 0, 1, att(Causal, 2.0)),
];

fn bf16_vec(rng: &mut Rng, n: usize, scale: f32) -> Vec<bf16> {
    (0..n).map(|_| bf16::from_f32(rng.uniform(scale))).collect()
}

/// RoPE table of `rows` positions: a unit complex number per (position, dim).
fn rope_table(rng: &mut Rng, rows: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
    let a = rng.vec(rows * d, std::f32::consts::PI);
    (
        a.iter().map(|x| x.cos()).collect(),
        a.iter().map(|x| x.sin()).collect(),
    )
}

/// Block ids of the training-time / prefill mask: the class token is block 0, then blocks of
/// cycling sizes 1, 4, 7, 16 with increasing ids.
fn block_ids(l: usize) -> Vec<i32> {
    let sizes = [1usize, 4, 7, 16];
    let mut ids = vec![0i32];
    let mut b = 1;
    while ids.len() < l {
        for _ in 0..sizes[(b as usize - 1) % sizes.len()] {
            ids.push(b);
        }
        b += 1;
    }
    ids.truncate(l);
    ids
}

fn shape(d: usize, h: usize, n: usize, start: usize, rows: usize, slack: usize) -> AttnShape {
    AttnShape {
        rows,
        heads: h,
        head_dim: d,
        n,
        start,
        capacity: start + n + slack,
    }
}

#[test]
fn attention_kernels_match_cpu_ops() {
    common::run_table(
        "attention.cu vs cpu::ops::attention",
        CASES,
        |gpu, report, _, _, &Case(d, h, n, start, rows, op)| match op {
            Op::Rope { mixing } => rope_case(gpu, report, shape(d, h, n, start, rows, 3), mixing),
            Op::Attention { mask, qscale } => {
                attention_case(gpu, report, shape(d, h, n, start, rows, 5), mask, qscale)
            }
        },
    );
}

fn rope_case(gpu: &Gpu, report: &mut Report, s: AttnShape, mixing: bool) {
    let (d, h, n, start, rows) = (s.head_dim, s.heads, s.n, s.start, s.rows);
    let sentinel = bf16::from_f32(7.0);
    let mut rng = Rng::new((d * 7 + h * 131 + n * 1009 + start * 7919 + rows) as u64);
    let qkv = bf16_vec(&mut rng, s.tokens() * 3 * s.c(), 2.0);
    let (re, im) = rope_table(&mut rng, TABLE_ROWS, d);
    let cur: Vec<usize> = (0..n).map(|_| rng.below(TABLE_ROWS)).collect();
    let prev: Vec<usize> = (0..n).map(|_| rng.below(TABLE_ROWS)).collect();
    // (2, H): layer 1's weights are used, at offset H.
    let mix: Vec<f32> = (0..2 * h).map(|_| 0.5 + 0.5 * rng.uniform(1.0)).collect();

    let dqkv = gpu.upload(&qkv).unwrap();
    let (dre, dim) = (gpu.upload(&re).unwrap(), gpu.upload(&im).unwrap());
    let (dcur, dprev) = (
        gpu.upload(&i32s(&cur)).unwrap(),
        gpu.upload(&i32s(&prev)).unwrap(),
    );
    let dmix = gpu.upload(&mix).unwrap();
    let mut dq = gpu.upload(&nan::<bf16>(s.q_len())).unwrap();
    // Caches hold a sentinel: positions outside start..start+n must keep it.
    let mut dk = gpu.upload(&vec![sentinel; s.cache_len()]).unwrap();
    let mut dv = gpu.upload(&vec![sentinel; s.cache_len()]).unwrap();
    let mixing_arg = mixing.then_some((&dmix, h));
    attention::rope_kv_append(
        gpu, &dqkv, &dre, &dim, &dcur, &dprev, mixing_arg, &mut dq, &mut dk, &mut dv, s,
    )
    .unwrap();
    let gq = to_f32(&gpu.download(&dq).unwrap());
    let gk = gpu.download(&dk).unwrap();
    let gv = gpu.download(&dv).unwrap();

    let mut wq = vec![0.0f32; s.q_len()];
    let mut kc = vec![0.0f32; s.cache_len()];
    let mut vc = vec![0.0f32; s.cache_len()];
    let mix_ref = mixing.then_some(&mix[h..2 * h]);
    ops::rope_kv_append(
        &to_f32(&qkv),
        &re,
        &im,
        &cur,
        &prev,
        mix_ref,
        &mut wq,
        &mut kc,
        &mut vc,
        s,
    );

    let label = format!("rope D {d} H {h} n {n} start {start} rows {rows} mix {mixing}");
    report.rel(&format!("{label} q'"), &gq, &wq, TOL);
    // Split the caches into the appended region (compared) and the rest (must be intact).
    let (mut gk_new, mut wk_new, mut untouched) = (Vec::new(), Vec::new(), 0usize);
    for rh in 0..rows * h {
        for pos in 0..s.capacity {
            for e in 0..d {
                let idx = (rh * s.capacity + pos) * d + e;
                if (start..start + n).contains(&pos) {
                    gk_new.push(gk[idx].to_f32());
                    wk_new.push(kc[idx]);
                    assert_eq!(
                        gv[idx].to_bits(),
                        bf16::from_f32(vc[idx]).to_bits(),
                        "{label}: v at (row-head {rh}, pos {pos}, dim {e}) not copied exactly"
                    );
                } else {
                    assert_eq!(gk[idx], sentinel, "{label}: k written outside the block");
                    assert_eq!(gv[idx], sentinel, "{label}: v written outside the block");
                    untouched += 1;
                }
            }
        }
    }
    assert_eq!(untouched, rows * h * (s.capacity - n) * d);
    report.rel(&format!("{label} k'"), &gk_new, &wk_new, TOL);
}

/// Fill a cache (rows, H, cap, D) with random bf16 keys at positions < keys and NaN beyond,
/// so a kernel that reads past the valid keys shows it.
fn random_cache(rng: &mut Rng, s: AttnShape, scale: f32) -> Vec<bf16> {
    let mut c = nan::<bf16>(s.cache_len());
    for rh in 0..s.rows * s.heads {
        for pos in 0..s.keys() {
            for e in 0..s.head_dim {
                c[(rh * s.capacity + pos) * s.head_dim + e] = bf16::from_f32(rng.uniform(scale));
            }
        }
    }
    c
}

fn attention_case(gpu: &Gpu, report: &mut Report, s: AttnShape, mask: Mask, qscale: f32) {
    let (d, h, n, start, rows) = (s.head_dim, s.heads, s.n, s.start, s.rows);
    let mut rng = Rng::new((d * 3 + h * 17 + n * 257 + start * 65537 + rows * 31) as u64);
    let q = bf16_vec(&mut rng, s.q_len(), qscale);
    let kc = random_cache(&mut rng, s, 1.0);
    let vc = random_cache(&mut rng, s, 1.0);
    let kb = block_ids(s.keys());
    let mut qb: Vec<i32> = kb[start..].to_vec();
    if mask == Mask::CausalEmptyRow {
        qb[0] = -1;
    }
    // The reference reads only keys 0..start+n (the NaN beyond them never).
    let want = ops::attention(
        &to_f32(&q),
        &to_f32(&kc),
        &to_f32(&vc),
        (mask != Mask::None).then_some(HostMask {
            key_block: &kb,
            query_block: &qb,
        }),
        s,
    );
    let (dq, dk, dv) = (
        gpu.upload(&q).unwrap(),
        gpu.upload(&kc).unwrap(),
        gpu.upload(&vc).unwrap(),
    );
    let (dkb, dqb) = (gpu.upload(&kb).unwrap(), gpu.upload(&qb).unwrap());
    for imp in [AttentionImpl::Direct, AttentionImpl::TensorCore] {
        let mut out = gpu.upload(&nan::<bf16>(s.tokens() * s.c())).unwrap();
        let m = (mask != Mask::None).then_some(BlockMask {
            key_block: &dkb,
            query_block: &dqb,
        });
        attention::attention(gpu, imp, &dq, &dk, &dv, m, &mut out, s).unwrap();
        let got = to_f32(&gpu.download(&out).unwrap());
        let label = format!(
            "attention {imp:?} D {d} H {h} n {n} start {start} rows {rows} mask {mask:?} qscale {qscale}"
        );
        report.rel(&label, &got, &want, TOL);
        if mask == Mask::CausalEmptyRow {
            for r in 0..rows {
                let row = &got[r * n * s.c()..(r * n + 1) * s.c()];
                assert!(row.iter().all(|&v| v == 0.0), "{label}: empty row not 0");
            }
        }
    }
}

/// A table row out of range writes NaN instead of reading out of bounds.
#[test]
fn rope_out_of_range_row_writes_nan() {
    let gpu = common::gpu("rope_kv_append out of range");
    let s = shape(32, 2, 2, 0, 1, 0);
    let qkv = gpu
        .upload(&vec![bf16::from_f32(1.0); s.tokens() * 3 * s.c()])
        .unwrap();
    let t = gpu.upload(&vec![1.0f32; 4 * 32]).unwrap();
    let cur = gpu.upload(&[0i32, 4]).unwrap();
    let mut dq = gpu.upload(&vec![bf16::ZERO; s.q_len()]).unwrap();
    let mut dk = gpu.zeros::<bf16>(s.cache_len()).unwrap();
    let mut dv = gpu.zeros::<bf16>(s.cache_len()).unwrap();
    attention::rope_kv_append(
        &gpu, &qkv, &t, &t, &cur, &cur, None, &mut dq, &mut dk, &mut dv, s,
    )
    .unwrap();
    let gq = gpu.download(&dq).unwrap();
    // q' (1, 2, 2, 32): token 0 finite, token 1 NaN, for both heads.
    for hh in 0..2 {
        assert!(gq[hh * 64..hh * 64 + 32].iter().all(|v| v.is_finite()));
        assert!(gq[hh * 64 + 32..hh * 64 + 64].iter().all(|v| v.is_nan()));
    }
}

/// Three steps of the real flow (class token, then blocks of 4 and 16 with key mixing) through
/// rope_kv_append and both attention kernels, against the cpu::ops chain: checks that the
/// layouts of the two kernels agree and that appends accumulate in the cache.
#[test]
fn rope_then_attention_steps_match_cpu_ops() {
    let gpu = common::gpu("rope_then_attention");
    let mut report = Report::new("rope_kv_append + attention, 3 steps");
    let (d, h, rows, cap) = (64usize, 16usize, 3usize, 32usize);
    let mut rng = Rng::new(42);
    let (re, im) = rope_table(&mut rng, TABLE_ROWS, d);
    let mix: Vec<f32> = (0..h).map(|_| 0.5 + 0.5 * rng.uniform(1.0)).collect();
    let (dre, dim, dmix) = (
        gpu.upload(&re).unwrap(),
        gpu.upload(&im).unwrap(),
        gpu.upload(&mix).unwrap(),
    );
    let full = shape(d, h, 1, 0, rows, cap - 1);
    let mut dk = gpu.upload(&nan::<bf16>(full.cache_len())).unwrap();
    let mut dv = gpu.upload(&nan::<bf16>(full.cache_len())).unwrap();
    let mut kc = vec![0.0f32; full.cache_len()];
    let mut vc = vec![0.0f32; full.cache_len()];
    let mut start = 0;
    for (step, &n) in [1usize, 4, 16].iter().enumerate() {
        let s = AttnShape {
            rows,
            heads: h,
            head_dim: d,
            n,
            start,
            capacity: cap,
        };
        let qkv = bf16_vec(&mut rng, s.tokens() * 3 * s.c(), 2.0);
        let (cur, prev): (Vec<usize>, Vec<usize>) = if step == 0 {
            (vec![341], vec![341]) // class token: row N for both
        } else {
            (0..n).map(|_| (rng.below(341), rng.below(342))).unzip()
        };
        let mixing = step > 0;
        let dqkv = gpu.upload(&qkv).unwrap();
        let (dcur, dprev) = (
            gpu.upload(&i32s(&cur)).unwrap(),
            gpu.upload(&i32s(&prev)).unwrap(),
        );
        let mut dq = gpu.upload(&nan::<bf16>(s.q_len())).unwrap();
        attention::rope_kv_append(
            &gpu,
            &dqkv,
            &dre,
            &dim,
            &dcur,
            &dprev,
            mixing.then_some((&dmix, 0)),
            &mut dq,
            &mut dk,
            &mut dv,
            s,
        )
        .unwrap();
        let mut q = vec![0.0f32; s.q_len()];
        ops::rope_kv_append(
            &to_f32(&qkv),
            &re,
            &im,
            &cur,
            &prev,
            mixing.then_some(&mix[..]),
            &mut q,
            &mut kc,
            &mut vc,
            s,
        );
        let want = ops::attention(&q, &kc, &vc, None, s);
        for imp in [AttentionImpl::Direct, AttentionImpl::TensorCore] {
            let mut out = gpu.upload(&nan::<bf16>(s.tokens() * s.c())).unwrap();
            attention::attention(&gpu, imp, &dq, &dk, &dv, None, &mut out, s).unwrap();
            let got = to_f32(&gpu.download(&out).unwrap());
            let label = format!("step {step} (start {start}, n {n}) {imp:?}");
            report.rel(&label, &got, &want, TOL);
        }
        start += n;
    }
    report.finish();
}

#[test]
fn launchers_reject_bad_shapes() {
    let gpu = common::gpu("attention shape checks");
    let s = shape(64, 2, 4, 0, 1, 0);
    let buf = |n: usize| -> checkergen::cuda::DevBuf<bf16> { gpu.zeros::<bf16>(n).unwrap() };
    let q = buf(s.q_len());
    let (k, v) = (buf(s.cache_len()), buf(s.cache_len()));
    let mut out = buf(s.tokens() * s.c());
    let run = |gpu: &Gpu, s: AttnShape, out: &mut checkergen::cuda::DevBuf<bf16>| {
        attention::attention(gpu, AttentionImpl::default(), &q, &k, &v, None, out, s)
    };
    assert!(run(&gpu, s, &mut out).is_ok());
    // Cache overflow, unsupported head dim, too small an output.
    let over = AttnShape { start: 1, ..s };
    assert!(run(&gpu, over, &mut out).is_err());
    let d48 = AttnShape { head_dim: 48, ..s };
    assert!(run(&gpu, d48, &mut out).is_err());
    let mut small = buf(s.tokens() * s.c() - 1);
    assert!(run(&gpu, s, &mut small).is_err());
    gpu.sync().unwrap();
}

/// Without a GPU: the shape rules every attention launcher checks first (`AttnShape::check`).
#[test]
fn attn_shape_check_rejects_bad_shapes() {
    let s = shape(64, 2, 4, 0, 1, 0);
    assert!(s.check().is_ok());
    let bad = [
        ("cache overflow", AttnShape { start: 1, ..s }),
        ("odd head dim", AttnShape { head_dim: 63, ..s }),
        ("no rows", AttnShape { rows: 0, ..s }),
        ("no heads", AttnShape { heads: 0, ..s }),
        ("no tokens", AttnShape { n: 0, ..s }),
        (
            "rows beyond a grid dimension",
            AttnShape { rows: 65536, ..s },
        ),
    ];
    for (what, b) in bad {
        assert!(b.check().is_err(), "{what}: {b:?} accepted");
    }
}
