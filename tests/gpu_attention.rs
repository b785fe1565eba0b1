//! kernels/attention.cu (one layer's attention step: RoPE of the new tokens, their KV-cache
//! append and attention, fused in one launch; direct and tc) against the `cpu::ops`
//! composition `rope_kv_append` -> `attention` on random inputs of real shapes: one table of
//! cases, one harness (llama.cpp test-backend-ops style), then a three-step flow that checks
//! appends accumulate in the cache. The device tests run on the GPU, or the host emulator
//! without one; the shape checks that need no device run everywhere.
#![cfg(feature = "cuda")]

mod common;

use checkergen::cpu::ops::{self, attention::BlockMask as HostMask};
use checkergen::cuda::attention::{self, AttentionImpl, AttnShape, BlockMask, Rope};
use checkergen::cuda::{DevBuf, Gpu};
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

/// (D, H, n, start, rows, mask, key mixing, q scale): q scale 1 gives flat softmaxes, 8
/// peaked ones. Every case runs both kernels (direct and tc).
#[derive(Clone, Copy, Debug)]
struct Case(usize, usize, usize, usize, usize, Mask, bool, f32);

/// Relative error allowed on the attention output and on the appended k' (bf16 storage of q',
/// k' and o, f32 accumulation; the reference keeps q' and k' in f32).
const TOL: f64 = 1e-2;

use Mask::{Causal, CausalEmptyRow, None as NoMask};

const CASES: &[Case] = &[
    // decode-like: a few new tokens over a cache
    Case(32, 4, 1, 0, 1, NoMask, false, 1.0),
    Case(64, 16, 1, 1, 3, NoMask, true, 4.0),
    Case(64, 16, 4, 86, 32, NoMask, true, 2.0),
    Case(128, 8, 5, 10, 2, NoMask, true, 2.0),
    Case(32, 16, 63, 278, 3, NoMask, false, 4.0),
    Case(64, 4, 64, 278, 2, NoMask, true, 1.0),
    Case(64, 16, 128, 86, 3, NoMask, false, 8.0),
    Case(128, 8, 17, 30, 2, NoMask, false, 2.0),
    Case(32, 4, 65, 20, 2, NoMask, true, 3.0),
    Case(64, 16, 64, 4032, 2, NoMask, true, 4.0), // 4096 keys
    // prefill / teacher forcing: block-causal mask, start 0 and > 0
    Case(32, 4, 128, 0, 4, Causal, true, 2.0),
    Case(64, 16, 63, 1, 3, Causal, true, 4.0),
    Case(64, 16, 64, 278, 1, Causal, false, 2.0),
    Case(128, 4, 33, 0, 2, Causal, true, 3.0),
    Case(32, 16, 4, 86, 3, CausalEmptyRow, true, 2.0),
    Case(64, 4, 17, 5, 2, CausalEmptyRow, false, 2.0),
    Case(128, 2, 40, 100, 1, CausalEmptyRow, true, 3.0),
    Case(32, 4, 512, 0, 1, Causal, true, 2.0),
    Case(64, 2, 200, 0, 2, Causal, false, 2.0),
];

/// The inputs of one attention step, on the host.
struct Inputs {
    qkv: Vec<bf16>, // (T, 3C)
    re: Vec<f32>,   // (TABLE_ROWS, D)
    im: Vec<f32>,
    cur: Vec<usize>,  // (n)
    prev: Vec<usize>, // (n)
    mix: Vec<f32>,    // (2, H): layer 1's weights are used, at offset H
}

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

/// qkv with q at scale `qscale` and k, v at scale 1, and random table rows and weights.
fn inputs(rng: &mut Rng, s: AttnShape, qscale: f32) -> Inputs {
    let c = s.c();
    let mut qkv = Vec::with_capacity(s.tokens() * 3 * c);
    for _ in 0..s.tokens() {
        qkv.extend(bf16_vec(rng, c, qscale));
        qkv.extend(bf16_vec(rng, 2 * c, 1.0));
    }
    let (re, im) = rope_table(rng, TABLE_ROWS, s.head_dim);
    let cur = (0..s.n).map(|_| rng.below(TABLE_ROWS)).collect();
    let prev = (0..s.n).map(|_| rng.below(TABLE_ROWS)).collect();
    let mix = (0..2 * s.heads)
        .map(|_| 0.5 + 0.5 * rng.uniform(1.0))
        .collect();
    Inputs {
        qkv,
        re,
        im,
        cur,
        prev,
        mix,
    }
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

/// A cache (rows, H, cap, D) with random bf16 keys at positions < start and NaN from start on:
/// the new positions must be written (never read back), those beyond start+n never touched.
fn random_cache(rng: &mut Rng, s: AttnShape) -> Vec<bf16> {
    let mut c = nan::<bf16>(s.cache_len());
    for rh in 0..s.rows * s.heads {
        for pos in 0..s.start {
            for e in 0..s.head_dim {
                c[(rh * s.capacity + pos) * s.head_dim + e] = bf16::from_f32(rng.uniform(1.0));
            }
        }
    }
    c
}

/// The device buffers of one step's inputs.
struct DevInputs {
    qkv: DevBuf<bf16>,
    re: DevBuf<f32>,
    im: DevBuf<f32>,
    cur: DevBuf<i32>,
    prev: DevBuf<i32>,
    mix: DevBuf<f32>,
}

impl DevInputs {
    fn new(gpu: &Gpu, x: &Inputs) -> DevInputs {
        DevInputs {
            qkv: gpu.upload(&x.qkv).unwrap(),
            re: gpu.upload(&x.re).unwrap(),
            im: gpu.upload(&x.im).unwrap(),
            cur: gpu.upload(&i32s(&x.cur)).unwrap(),
            prev: gpu.upload(&i32s(&x.prev)).unwrap(),
            mix: gpu.upload(&x.mix).unwrap(),
        }
    }

    /// The RoPE arguments; `mix_at`: offset of the layer's H weights when mixing.
    fn rope(&self, mix_at: Option<usize>) -> Rope<'_> {
        Rope {
            re: &self.re,
            im: &self.im,
            cur: &self.cur,
            prev: &self.prev,
            mix: mix_at.map(|off| (&self.mix, off)),
        }
    }
}

/// The cpu::ops composition: rope_kv_append into the f32 caches (in place), then attention.
fn reference(
    x: &Inputs,
    mix: Option<&[f32]>,
    kc: &mut [f32],
    vc: &mut [f32],
    mask: Option<HostMask>,
    s: AttnShape,
) -> Vec<f32> {
    let mut q = vec![0.0f32; s.q_len()];
    ops::rope_kv_append(
        &to_f32(&x.qkv),
        &x.re,
        &x.im,
        &x.cur,
        &x.prev,
        mix,
        &mut q,
        kc,
        vc,
        s,
    );
    ops::attention(&q, kc, vc, mask, s)
}

/// Where a cache element sits relative to the step: before start, appended, beyond start+n.
fn region(s: AttnShape, idx: usize) -> std::cmp::Ordering {
    let pos = (idx / s.head_dim) % s.capacity;
    if pos < s.start {
        std::cmp::Ordering::Less
    } else if pos < s.keys() {
        std::cmp::Ordering::Equal
    } else {
        std::cmp::Ordering::Greater
    }
}

/// The device caches after a step against the reference's and the caches before it: k'
/// within `TOL` (and bit-identical to the rounded reference on the emulator, which compiles
/// the kernels without FMA contraction, like the CPU), v copied exactly, every other position
/// unchanged. Returns the relative error of k'.
#[allow(clippy::too_many_arguments)]
fn check_cache(
    report: &mut Report,
    label: &str,
    s: AttnShape,
    exact: bool,
    gk: &[bf16],
    gv: &[bf16],
    (k0, v0): (&[bf16], &[bf16]),
    (wk, wv): (&[f32], &[f32]),
) -> f64 {
    let (mut got, mut want, mut off_bits) = (Vec::new(), Vec::new(), 0usize);
    for idx in 0..s.cache_len() {
        if region(s, idx) == std::cmp::Ordering::Equal {
            got.push(gk[idx].to_f32());
            want.push(wk[idx]);
            if exact && gk[idx].to_bits() != bf16::from_f32(wk[idx]).to_bits() {
                off_bits += 1;
            }
            assert_eq!(
                gv[idx].to_bits(),
                bf16::from_f32(wv[idx]).to_bits(),
                "{label}: v at cache element {idx} not copied exactly"
            );
        } else {
            assert_eq!(
                (gk[idx].to_bits(), gv[idx].to_bits()),
                (k0[idx].to_bits(), v0[idx].to_bits()),
                "{label}: cache element {idx} outside the new positions changed"
            );
        }
    }
    report.check(
        &format!("{label} k' bits"),
        "k' elements != bf16(reference)",
        off_bits as f64,
        0.5,
    );
    report.rel(&format!("{label} appended k'"), &got, &want, TOL)
}

#[test]
fn fused_attention_matches_cpu_ops_composition() {
    // Worst relative error over the table: (direct o, tc o, appended k').
    let mut worst = [0.0f64; 3];
    common::run_table(
        "attention.cu (RoPE + append + attention) vs cpu::ops rope_kv_append -> attention",
        CASES,
        |gpu, report, _, _, &case| attention_case(gpu, report, case, &mut worst),
    );
    println!(
        "worst rel err over {} cases: o direct {:.2e}, o tc {:.2e}, appended k' {:.2e} (tol {TOL:.0e})",
        CASES.len(),
        worst[0],
        worst[1],
        worst[2]
    );
}

fn attention_case(gpu: &Gpu, report: &mut Report, case: Case, worst: &mut [f64; 3]) {
    let Case(d, h, n, start, rows, mask, mixing, qscale) = case;
    let s = shape(d, h, n, start, rows, 5);
    let mut rng = Rng::new((d * 3 + h * 17 + n * 257 + start * 65537 + rows * 31) as u64);
    let x = inputs(&mut rng, s, qscale);
    let kc0 = random_cache(&mut rng, s);
    let vc0 = random_cache(&mut rng, s);
    let kb = block_ids(s.keys());
    let mut qb: Vec<i32> = kb[start..].to_vec();
    if mask == Mask::CausalEmptyRow {
        qb[0] = -1;
    }
    let host_mask = (mask != Mask::None).then_some(HostMask {
        key_block: &kb,
        query_block: &qb,
    });
    let (mut wk, mut wv) = (to_f32(&kc0), to_f32(&vc0));
    let mix_ref = mixing.then_some(&x.mix[h..2 * h]);
    // The reference reads only keys 0..start+n (the NaN beyond them never).
    let want = reference(&x, mix_ref, &mut wk, &mut wv, host_mask, s);

    let dx = DevInputs::new(gpu, &x);
    let (dkb, dqb) = (gpu.upload(&kb).unwrap(), gpu.upload(&qb).unwrap());
    let exact = common::on_emu(gpu);
    let mut caches = Vec::new();
    for imp in [AttentionImpl::Direct, AttentionImpl::TensorCore] {
        let mut dk = gpu.upload(&kc0).unwrap();
        let mut dv = gpu.upload(&vc0).unwrap();
        let mut out = gpu.upload(&nan::<bf16>(s.tokens() * s.c())).unwrap();
        let m = (mask != Mask::None).then_some(BlockMask {
            key_block: &dkb,
            query_block: &dqb,
        });
        let rope = dx.rope(mixing.then_some(h));
        attention::attention(gpu, imp, &dx.qkv, rope, &mut dk, &mut dv, m, &mut out, s).unwrap();
        let got = to_f32(&gpu.download(&out).unwrap());
        let label = format!(
            "{imp:?} D {d} H {h} n {n} start {start} rows {rows} mask {mask:?} mix {mixing} qscale {qscale}"
        );
        let e = report.rel(&format!("{label} o"), &got, &want, TOL);
        let w = &mut worst[(imp == AttentionImpl::TensorCore) as usize];
        *w = w.max(e);
        if mask == Mask::CausalEmptyRow {
            for r in 0..rows {
                let row = &got[r * n * s.c()..(r * n + 1) * s.c()];
                assert!(row.iter().all(|&v| v == 0.0), "{label}: empty row not 0");
            }
        }
        let (gk, gv) = (gpu.download(&dk).unwrap(), gpu.download(&dv).unwrap());
        let ek = check_cache(report, &label, s, exact, &gk, &gv, (&kc0, &vc0), (&wk, &wv));
        worst[2] = worst[2].max(ek);
        caches.push((gk, gv));
    }
    // Both kernels append the same bits (the same rotation expressions).
    let same = caches[0]
        .0
        .iter()
        .zip(&caches[1].0)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(
        same || !exact,
        "{case:?}: direct and tc append different k'"
    );
}

/// A table row out of range makes that token's k', v (in the cache) and its output NaN
/// instead of reading out of bounds; the other token's k', v stay finite.
#[test]
fn rope_out_of_range_row_writes_nan() {
    let gpu = common::gpu("attention: rope row out of range");
    let s = shape(32, 2, 2, 0, 1, 0);
    let qkv = gpu
        .upload(&vec![bf16::from_f32(1.0); s.tokens() * 3 * s.c()])
        .unwrap();
    let t = gpu.upload(&vec![1.0f32; 4 * 32]).unwrap(); // 4 table rows
    let cur = gpu.upload(&[0i32, 4]).unwrap();
    for imp in [AttentionImpl::Direct, AttentionImpl::TensorCore] {
        let mut dk = gpu.zeros::<bf16>(s.cache_len()).unwrap();
        let mut dv = gpu.zeros::<bf16>(s.cache_len()).unwrap();
        let mut out = gpu.zeros::<bf16>(s.tokens() * s.c()).unwrap();
        let rope = Rope {
            re: &t,
            im: &t,
            cur: &cur,
            prev: &cur,
            mix: None,
        };
        attention::attention(&gpu, imp, &qkv, rope, &mut dk, &mut dv, None, &mut out, s).unwrap();
        let (gk, gv) = (gpu.download(&dk).unwrap(), gpu.download(&dv).unwrap());
        // caches (1, 2, 2, 32): position 0 finite, position 1 NaN, for both heads.
        for c in [&gk, &gv] {
            for hh in 0..2 {
                assert!(c[hh * 64..hh * 64 + 32].iter().all(|v| v.is_finite()));
                assert!(c[hh * 64 + 32..hh * 64 + 64].iter().all(|v| v.is_nan()));
            }
        }
        // out (2 tokens, C): token 1's q' is NaN.
        let o = gpu.download(&out).unwrap();
        assert!(o[s.c()..].iter().all(|v| v.is_nan()), "{imp:?}");
    }
}

/// Three steps of the real flow (class token, then blocks of 4 and 17 with key mixing) through
/// each kernel, its own cache accumulating the appends, against the cpu::ops chain.
#[test]
fn attention_steps_accumulate_in_the_cache() {
    let gpu = common::gpu("attention steps");
    let mut report = Report::new("attention (RoPE + append + attention), 3 steps");
    let (d, h, rows, cap) = (64usize, 16usize, 3usize, 32usize);
    let mut rng = Rng::new(42);
    let full = shape(d, h, 1, 0, rows, cap - 1);
    let mut kc = vec![0.0f32; full.cache_len()];
    let mut vc = vec![0.0f32; full.cache_len()];
    let mut dev: Vec<_> = [AttentionImpl::Direct, AttentionImpl::TensorCore]
        .into_iter()
        .map(|imp| {
            let k = gpu.upload(&nan::<bf16>(full.cache_len())).unwrap();
            let v = gpu.upload(&nan::<bf16>(full.cache_len())).unwrap();
            (imp, k, v)
        })
        .collect();
    let mut start = 0;
    for (step, &n) in [1usize, 4, 17].iter().enumerate() {
        let s = AttnShape {
            rows,
            heads: h,
            head_dim: d,
            n,
            start,
            capacity: cap,
        };
        let mut x = inputs(&mut rng, s, 2.0);
        if step == 0 {
            // class token: row N for both
            (x.cur, x.prev) = (vec![341], vec![341]);
        }
        let mixing = step > 0;
        let want = reference(&x, mixing.then_some(&x.mix[..h]), &mut kc, &mut vc, None, s);
        let dx = DevInputs::new(&gpu, &x);
        for (imp, dk, dv) in dev.iter_mut() {
            let mut out = gpu.upload(&nan::<bf16>(s.tokens() * s.c())).unwrap();
            let rope = dx.rope(mixing.then_some(0));
            attention::attention(&gpu, *imp, &dx.qkv, rope, dk, dv, None, &mut out, s).unwrap();
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
    let buf = |n: usize| -> DevBuf<bf16> { gpu.zeros::<bf16>(n).unwrap() };
    let qkv = buf(s.tokens() * 3 * s.c());
    let t = gpu.zeros::<f32>(4 * 64).unwrap();
    let idx = gpu.zeros::<i32>(4).unwrap();
    let rope = Rope {
        re: &t,
        im: &t,
        cur: &idx,
        prev: &idx,
        mix: None,
    };
    let (mut k, mut v) = (buf(s.cache_len()), buf(s.cache_len()));
    let mut out = buf(s.tokens() * s.c());
    let mut run = |s: AttnShape, rope: Rope<'_>, out: &mut DevBuf<bf16>| {
        attention::attention(
            &gpu,
            AttentionImpl::default(),
            &qkv,
            rope,
            &mut k,
            &mut v,
            None,
            out,
            s,
        )
    };
    assert!(run(s, rope, &mut out).is_ok());
    // Cache overflow, unsupported head dim, too small an output, a table that is not
    // (rows, D), too few positions, a mixing table too short.
    let over = AttnShape { start: 1, ..s };
    assert!(run(over, rope, &mut out).is_err());
    let d48 = AttnShape { head_dim: 48, ..s };
    assert!(run(d48, rope, &mut out).is_err());
    let mut small = buf(s.tokens() * s.c() - 1);
    assert!(run(s, rope, &mut small).is_err());
    let ragged = gpu.zeros::<f32>(4 * 64 + 1).unwrap();
    let three = gpu.zeros::<i32>(3).unwrap();
    let mix = gpu.zeros::<f32>(2).unwrap();
    let (mut ragged_re, mut three_cur, mut short_mix) = (rope, rope, rope);
    ragged_re.re = &ragged;
    three_cur.cur = &three;
    short_mix.mix = Some((&mix, 1));
    let bad_tables = [
        ("ragged table", ragged_re),
        ("three positions", three_cur),
        ("short mixing table", short_mix),
    ];
    for (what, bad) in bad_tables {
        assert!(run(s, bad, &mut out).is_err(), "{what} accepted");
    }
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
