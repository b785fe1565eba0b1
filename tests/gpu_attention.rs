//! kernels/attention.cu (RoPE + KV append, attention v1 and v2) against f32 CPU references on
//! random inputs of real shapes (skips without a GPU).
#![cfg(feature = "cuda")]

mod common;

use checkergen::cuda::Gpu;
use checkergen::cuda::attention::{self, AttentionImpl, AttnShape, BlockMask};
use half::bf16;
use rayon::prelude::*;

/// Deterministic test randomness (splitmix64).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-scale, scale).
    fn uniform(&mut self, scale: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        scale * (2.0 * u - 1.0)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// bf16 values uniform in [-scale, scale).
    fn bf16_vec(&mut self, n: usize, scale: f32) -> Vec<bf16> {
        (0..n)
            .map(|_| bf16::from_f32(self.uniform(scale)))
            .collect()
    }
}

fn to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

fn nan_bf16(n: usize) -> Vec<bf16> {
    vec![bf16::from_f32(f32::NAN); n]
}

/// RoPE table of `rows` positions: a unit complex number per (position, dim).
fn rope_table(rng: &mut Rng, rows: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
    let mut re = vec![0.0f32; rows * d];
    let mut im = vec![0.0f32; rows * d];
    for i in 0..rows * d {
        let a = rng.uniform(std::f32::consts::PI);
        re[i] = a.cos();
        im[i] = a.sin();
    }
    (re, im)
}

/// `rope(u, R)` of SPEC.md section 5 (same formula as src/cpu/transformer.rs).
fn rope(u: &[f32], re: &[f32], im: &[f32]) -> Vec<f32> {
    let half = u.len() / 2;
    (0..u.len())
        .map(|i| {
            if i < half {
                u[i] * re[i] - u[i + half] * im[i]
            } else {
                u[i] * re[i] + u[i - half] * im[i]
            }
        })
        .collect()
}

/// CPU rope_kv_append in f32: returns q' (rows, H, n, D) and writes k', v into the f32 caches.
#[allow(clippy::too_many_arguments)]
fn cpu_rope_kv(
    qkv: &[f32],
    re: &[f32],
    im: &[f32],
    cur: &[i32],
    prev: &[i32],
    mix: Option<&[f32]>,
    kc: &mut [f32],
    vc: &mut [f32],
    s: AttnShape,
) -> Vec<f32> {
    let (h, d, c, n) = (s.heads, s.head_dim, s.c(), s.n);
    let mut q = vec![0.0f32; s.q_len()];
    for r in 0..s.rows {
        for j in 0..n {
            let base = (r * n + j) * 3 * c;
            let (cr, pr) = (cur[j] as usize * d, prev[j] as usize * d);
            for hh in 0..h {
                let qs = &qkv[base + hh * d..base + (hh + 1) * d];
                let ks = &qkv[base + c + hh * d..base + c + (hh + 1) * d];
                let vs = &qkv[base + 2 * c + hh * d..base + 2 * c + (hh + 1) * d];
                let qo = ((r * h + hh) * n + j) * d;
                q[qo..qo + d].copy_from_slice(&rope(qs, &re[cr..cr + d], &im[cr..cr + d]));
                let (kre, kim): (Vec<f32>, Vec<f32>) = match mix {
                    Some(m) => {
                        let a = m[hh];
                        (0..d)
                            .map(|i| {
                                (
                                    a * re[cr + i] + (1.0 - a) * re[pr + i],
                                    a * im[cr + i] + (1.0 - a) * im[pr + i],
                                )
                            })
                            .unzip()
                    }
                    None => (re[cr..cr + d].to_vec(), im[cr..cr + d].to_vec()),
                };
                let ko = ((r * h + hh) * s.capacity + s.start + j) * d;
                kc[ko..ko + d].copy_from_slice(&rope(ks, &kre, &kim));
                vc[ko..ko + d].copy_from_slice(vs);
            }
        }
    }
    q
}

/// CPU attention in f32: o (T, C) from q (rows, H, n, D) and caches (rows, H, cap, D).
/// A query with no visible key gets 0 (the kernels' convention).
fn cpu_attention(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    mask: Option<(&[i32], &[i32])>,
    s: AttnShape,
) -> Vec<f32> {
    let (h, d, n, cap, l) = (s.heads, s.head_dim, s.n, s.capacity, s.keys());
    let scale = 1.0 / (d as f32).sqrt();
    let heads: Vec<Vec<f32>> = (0..s.rows * h)
        .into_par_iter()
        .map(|rh| {
            let k = &kc[rh * cap * d..];
            let v = &vc[rh * cap * d..];
            let mut out = vec![0.0f32; n * d];
            let mut sc = vec![0.0f32; l];
            for i in 0..n {
                let qi = &q[(rh * n + i) * d..(rh * n + i + 1) * d];
                let mut mx = f32::NEG_INFINITY;
                for j in 0..l {
                    let vis = mask.is_none_or(|(kb, qb)| kb[j] <= qb[i]);
                    sc[j] = if vis {
                        let dot: f32 = (0..d).map(|e| qi[e] * k[j * d + e]).sum();
                        dot * scale
                    } else {
                        f32::NEG_INFINITY
                    };
                    mx = mx.max(sc[j]);
                }
                if mx == f32::NEG_INFINITY {
                    continue; // nothing visible: o = 0
                }
                let mut sum = 0.0f32;
                let o = &mut out[i * d..(i + 1) * d];
                for j in 0..l {
                    if sc[j] == f32::NEG_INFINITY {
                        continue;
                    }
                    let p = (sc[j] - mx).exp();
                    sum += p;
                    for e in 0..d {
                        o[e] += p * v[j * d + e];
                    }
                }
                o.iter_mut().for_each(|x| *x /= sum);
            }
            out
        })
        .collect();
    let c = s.c();
    let mut o = vec![0.0f32; s.tokens() * c];
    for (rh, oh) in heads.iter().enumerate() {
        let (r, hh) = (rh / h, rh % h);
        for i in 0..n {
            let dst = (r * n + i) * c + hh * d;
            o[dst..dst + d].copy_from_slice(&oh[i * d..(i + 1) * d]);
        }
    }
    o
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

fn check(label: &str, got: &[f32], want: &[f32]) -> f64 {
    let nan = got.iter().filter(|v| !v.is_finite()).count();
    let (rel, abs) = common::rel_err(got, want);
    println!("{label}: rel {rel:.2e} max abs {abs:.2e} non-finite {nan}");
    assert_eq!(nan, 0, "{label}: {nan} non-finite outputs");
    assert!(rel < 1e-2, "{label}: rel err {rel:.3e}");
    rel
}

#[test]
fn rope_kv_append_matches_cpu() {
    let Some(gpu) = common::gpu_or_skip("rope_kv_append") else {
        return;
    };
    let table_rows = 343; // N + 2 for r = 2
    let sentinel = bf16::from_f32(7.0);
    let mut worst = 0.0f64;
    // (D, H, n, start, rows, mixing)
    for &(d, h, n, start, rows, mixing) in &[
        (32usize, 4usize, 1usize, 0usize, 1usize, false),
        (64, 16, 4, 1, 3, true),
        (64, 16, 63, 86, 32, true),
        (32, 16, 64, 278, 3, false),
        (64, 4, 128, 278, 1, true),
        (32, 4, 128, 0, 32, true),
        (128, 8, 5, 10, 2, true),
    ] {
        let s = shape(d, h, n, start, rows, 3);
        let mut rng = Rng((d * 7 + h * 131 + n * 1009 + start * 7919 + rows) as u64);
        let qkv = rng.bf16_vec(s.tokens() * 3 * s.c(), 2.0);
        let (re, im) = rope_table(&mut rng, table_rows, d);
        let cur: Vec<i32> = (0..n).map(|_| rng.below(table_rows) as i32).collect();
        let prev: Vec<i32> = (0..n).map(|_| rng.below(table_rows) as i32).collect();
        // (2, H): layer 1's weights are used, at offset H.
        let mix: Vec<f32> = (0..2 * h).map(|_| 0.5 + 0.5 * rng.uniform(1.0)).collect();

        let dqkv = gpu.upload(&qkv).unwrap();
        let (dre, dim) = (gpu.upload(&re).unwrap(), gpu.upload(&im).unwrap());
        let (dcur, dprev) = (gpu.upload(&cur).unwrap(), gpu.upload(&prev).unwrap());
        let dmix = gpu.upload(&mix).unwrap();
        let mut dq = gpu.upload(&nan_bf16(s.q_len())).unwrap();
        // Caches hold a sentinel: positions outside start..start+n must keep it.
        let mut dk = gpu.upload(&vec![sentinel; s.cache_len()]).unwrap();
        let mut dv = gpu.upload(&vec![sentinel; s.cache_len()]).unwrap();
        let mixing_arg = mixing.then_some((&dmix, h));
        attention::rope_kv_append(
            &gpu, &dqkv, &dre, &dim, &dcur, &dprev, mixing_arg, &mut dq, &mut dk, &mut dv, s,
        )
        .unwrap();
        let gq = to_f32(&gpu.download(&dq).unwrap());
        let gk = gpu.download(&dk).unwrap();
        let gv = gpu.download(&dv).unwrap();

        let mut kc = vec![0.0f32; s.cache_len()];
        let mut vc = vec![0.0f32; s.cache_len()];
        let qkv32 = to_f32(&qkv);
        let mix_ref = mixing.then_some(&mix[h..2 * h]);
        let wq = cpu_rope_kv(&qkv32, &re, &im, &cur, &prev, mix_ref, &mut kc, &mut vc, s);

        let label = format!("rope D {d} H {h} n {n} start {start} rows {rows} mix {mixing}");
        worst = worst.max(check(&format!("{label} q'"), &gq, &wq));
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
        worst = worst.max(check(&format!("{label} k'"), &gk_new, &wk_new));
    }
    println!("rope_kv_append worst rel err {worst:.2e}");

    // A table row out of range writes NaN instead of reading out of bounds.
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

/// Fill a cache (rows, H, cap, D) with random bf16 keys at positions < keys and NaN beyond,
/// so a kernel that reads past the valid keys shows it.
fn random_cache(rng: &mut Rng, s: AttnShape, scale: f32) -> Vec<bf16> {
    let mut c = nan_bf16(s.cache_len());
    for rh in 0..s.rows * s.heads {
        for pos in 0..s.keys() {
            for e in 0..s.head_dim {
                c[(rh * s.capacity + pos) * s.head_dim + e] = bf16::from_f32(rng.uniform(scale));
            }
        }
    }
    c
}

/// NaN in the cache stands for "never read"; the CPU reference reads only valid keys.
fn finite_or_zero(v: &[bf16]) -> Vec<f32> {
    v.iter()
        .map(|x| if x.is_nan() { 0.0 } else { x.to_f32() })
        .collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Mask {
    None,
    /// Block-causal, query i in the block of key start + i.
    Causal,
    /// Block-causal, and query 0 sees nothing (its block id is -1): o = 0 there.
    CausalEmptyRow,
}

#[test]
fn attention_matches_cpu() {
    let Some(gpu) = common::gpu_or_skip("attention") else {
        return;
    };
    let mut worst = [0.0f64; 2];
    // (D, H, n, start, rows, mask, q scale): q scale 1 gives flat softmaxes, 8 peaked ones.
    let cases: &[(usize, usize, usize, usize, usize, Mask, f32)] = &[
        (32, 4, 1, 0, 1, Mask::None, 1.0),
        (64, 16, 1, 1, 3, Mask::None, 4.0),
        (64, 16, 4, 86, 32, Mask::None, 2.0),
        (32, 16, 63, 278, 3, Mask::None, 4.0),
        (64, 4, 64, 278, 32, Mask::None, 1.0),
        (64, 16, 128, 86, 3, Mask::None, 8.0),
        (32, 4, 128, 0, 32, Mask::Causal, 2.0),
        (64, 16, 63, 1, 3, Mask::Causal, 4.0),
        (64, 16, 64, 278, 1, Mask::Causal, 2.0),
        (32, 16, 4, 86, 3, Mask::CausalEmptyRow, 2.0),
        (64, 4, 17, 5, 2, Mask::CausalEmptyRow, 2.0),
        (128, 8, 17, 30, 2, Mask::None, 2.0),
        (64, 16, 64, 4032, 2, Mask::None, 4.0), // 4096 keys
        (32, 4, 512, 0, 1, Mask::Causal, 2.0),
    ];
    for &(d, h, n, start, rows, mask, qscale) in cases {
        let s = shape(d, h, n, start, rows, 5);
        let mut rng = Rng((d * 3 + h * 17 + n * 257 + start * 65537 + rows * 31) as u64);
        let q = rng.bf16_vec(s.q_len(), qscale);
        let kc = random_cache(&mut rng, s, 1.0);
        let vc = random_cache(&mut rng, s, 1.0);
        let kb = block_ids(s.keys());
        let mut qb: Vec<i32> = kb[start..].to_vec();
        if mask == Mask::CausalEmptyRow {
            qb[0] = -1;
        }
        let want = cpu_attention(
            &to_f32(&q),
            &finite_or_zero(&kc),
            &finite_or_zero(&vc),
            (mask != Mask::None).then_some((&kb[..], &qb[..])),
            s,
        );
        let (dq, dk, dv) = (
            gpu.upload(&q).unwrap(),
            gpu.upload(&kc).unwrap(),
            gpu.upload(&vc).unwrap(),
        );
        let (dkb, dqb) = (gpu.upload(&kb).unwrap(), gpu.upload(&qb).unwrap());
        for (vi, imp) in [AttentionImpl::Direct, AttentionImpl::TensorCore]
            .into_iter()
            .enumerate()
        {
            let mut out = gpu.upload(&nan_bf16(s.tokens() * s.c())).unwrap();
            let m = (mask != Mask::None).then_some(BlockMask {
                key_block: &dkb,
                query_block: &dqb,
            });
            attention::attention(&gpu, imp, &dq, &dk, &dv, m, &mut out, s).unwrap();
            let got = to_f32(&gpu.download(&out).unwrap());
            let label = format!(
                "attention {imp:?} D {d} H {h} n {n} start {start} rows {rows} mask {} qscale {qscale}",
                match mask {
                    Mask::None => "none",
                    Mask::Causal => "block-causal",
                    Mask::CausalEmptyRow => "block-causal+empty row",
                }
            );
            worst[vi] = worst[vi].max(check(&label, &got, &want));
            if mask == Mask::CausalEmptyRow {
                for r in 0..rows {
                    let row = &got[r * n * s.c()..(r * n + 1) * s.c()];
                    assert!(row.iter().all(|&v| v == 0.0), "{label}: empty row not 0");
                }
            }
        }
    }
    println!(
        "attention worst rel err: v1 {:.2e}, v2 {:.2e}",
        worst[0], worst[1]
    );
}

/// Three steps of the real flow (class token, then blocks of 4 and 16 with key mixing) through
/// rope_kv_append and both attention kernels, against the f32 CPU chain: checks that the
/// layouts of the two kernels agree and that appends accumulate in the cache.
#[test]
fn rope_then_attention_steps_match_cpu() {
    let Some(gpu) = common::gpu_or_skip("rope_then_attention") else {
        return;
    };
    let (d, h, rows, cap) = (64usize, 16usize, 3usize, 32usize);
    let table_rows = 343;
    let mut rng = Rng(42);
    let (re, im) = rope_table(&mut rng, table_rows, d);
    let mix: Vec<f32> = (0..h).map(|_| 0.5 + 0.5 * rng.uniform(1.0)).collect();
    let (dre, dim, dmix) = (
        gpu.upload(&re).unwrap(),
        gpu.upload(&im).unwrap(),
        gpu.upload(&mix).unwrap(),
    );
    let full = shape(d, h, 1, 0, rows, cap - 1);
    let mut dk = gpu.upload(&nan_bf16(full.cache_len())).unwrap();
    let mut dv = gpu.upload(&nan_bf16(full.cache_len())).unwrap();
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
        let qkv = rng.bf16_vec(s.tokens() * 3 * s.c(), 2.0);
        let (cur, prev): (Vec<i32>, Vec<i32>) = if step == 0 {
            (vec![341], vec![341]) // class token: row N for both
        } else {
            (0..n)
                .map(|_| (rng.below(341) as i32, rng.below(342) as i32))
                .unzip()
        };
        let mixing = step > 0;
        let dqkv = gpu.upload(&qkv).unwrap();
        let (dcur, dprev) = (gpu.upload(&cur).unwrap(), gpu.upload(&prev).unwrap());
        let mut dq = gpu.upload(&nan_bf16(s.q_len())).unwrap();
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
        let q = cpu_rope_kv(
            &to_f32(&qkv),
            &re,
            &im,
            &cur,
            &prev,
            mixing.then_some(&mix[..]),
            &mut kc,
            &mut vc,
            s,
        );
        let want = cpu_attention(&q, &kc, &vc, None, s);
        for imp in [AttentionImpl::Direct, AttentionImpl::TensorCore] {
            let mut out = gpu.upload(&nan_bf16(s.tokens() * s.c())).unwrap();
            attention::attention(&gpu, imp, &dq, &dk, &dv, None, &mut out, s).unwrap();
            let got = to_f32(&gpu.download(&out).unwrap());
            check(
                &format!("step {step} (start {start}, n {n}) {imp:?}"),
                &got,
                &want,
            );
        }
        start += n;
    }
}

#[test]
fn launchers_reject_bad_shapes() {
    let Some(gpu) = common::gpu_or_skip("attention shape checks") else {
        return;
    };
    let s = shape(64, 2, 4, 0, 1, 0);
    let buf = |n: usize| -> cudarc::driver::CudaSlice<bf16> { gpu.zeros::<bf16>(n).unwrap() };
    let q = buf(s.q_len());
    let (k, v) = (buf(s.cache_len()), buf(s.cache_len()));
    let mut out = buf(s.tokens() * s.c());
    let run = |gpu: &Gpu, s: AttnShape, out: &mut cudarc::driver::CudaSlice<bf16>| {
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

/// Without a GPU: every kernel the launchers call by name is in kernels/attention.cu and, when
/// nvcc was found at build time, in both embedded cubins (symbol names appear in the ELF).
#[test]
fn attention_kernels_are_embedded() {
    let f = checkergen::cuda::KERNEL_FILES
        .iter()
        .find(|f| f.name == "attention")
        .expect("kernels/attention.cu is not embedded");
    let mut names = vec!["rope_kv_append_bf16".to_string()];
    for v in ["direct", "tc"] {
        for d in [32, 64, 128] {
            names.push(format!("attention_{v}_d{d}_bf16"));
        }
    }
    let contains =
        |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
    for name in &names {
        let decl = format!(" {name}(const ");
        assert!(
            f.source.contains(&decl),
            "{name} not declared in attention.cu"
        );
        for (kind, img) in [("sm_90a", f.sm90a), ("sm_80", f.sm80)] {
            if let Some(img) = img {
                assert!(contains(img, name), "{name} missing from the {kind} cubin");
            }
        }
        if let Some(ptx) = f.ptx {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{name} missing from the PTX"
            );
        }
    }
}
