//! TEMPORARY: the in-test references of tests/gpu_*.rs (copied verbatim) against cpu::ops on
//! random inputs of the tests' shapes, before the in-test copies are deleted.

mod common;

use checkergen::cpu::ops::{self, AttnShape, attention::BlockMask, sampling::StepKnobs};
use checkergen::model::decoder::{Conv, GroupNorm};
use checkergen::model::weights::{CodeHidden, InputTables, Linear};
use checkergen::rng::token_uniform;
use checkergen::sampling::{TokenPolicy, cfg_combine, choose_token};
use common::{Rng, nchw_to_nhwc, nhwc_to_nchw, rand_vec};
use half::bf16;
use rayon::prelude::*;

fn diff(op: &str, case: &str, a: &[f32], b: &[f32], worst: &mut f64) {
    let (rel, abs) = common::rel_err(a, b);
    println!("PROOF {op} {case}: max abs diff {abs:.3e} rel {rel:.3e}");
    *worst = worst.max(abs);
}

fn bfr(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

// ---- gpu_attention.rs
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
                    continue;
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
fn proof_attention() {
    let mut worst_rope = 0.0f64;
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
        let mut rng = Rng::new((d * 7 + h * 131 + n * 1009 + start * 7919 + rows) as u64);
        let qkv = bfr(&rng.vec(s.tokens() * 3 * s.c(), 2.0));
        let ang = rng.vec(343 * d, std::f32::consts::PI);
        let re: Vec<f32> = ang.iter().map(|a| a.cos()).collect();
        let im: Vec<f32> = ang.iter().map(|a| a.sin()).collect();
        let cur: Vec<usize> = (0..n).map(|_| rng.below(343)).collect();
        let prev: Vec<usize> = (0..n).map(|_| rng.below(343)).collect();
        let mix: Vec<f32> = (0..h).map(|_| 0.5 + 0.5 * rng.uniform(1.0)).collect();
        let mix_ref = mixing.then_some(&mix[..]);
        let (ci, pi): (Vec<i32>, Vec<i32>) = (
            cur.iter().map(|&x| x as i32).collect(),
            prev.iter().map(|&x| x as i32).collect(),
        );
        let (mut k1, mut v1) = (vec![0.0; s.cache_len()], vec![0.0; s.cache_len()]);
        let q1 = cpu_rope_kv(&qkv, &re, &im, &ci, &pi, mix_ref, &mut k1, &mut v1, s);
        let (mut k2, mut v2, mut q2) = (
            vec![0.0; s.cache_len()],
            vec![0.0; s.cache_len()],
            vec![0.0; s.q_len()],
        );
        ops::rope_kv_append(
            &qkv, &re, &im, &cur, &prev, mix_ref, &mut q2, &mut k2, &mut v2, s,
        );
        let case = format!("D{d} H{h} n{n} start{start} rows{rows} mix{mixing}");
        diff("rope_kv_append q'", &case, &q2, &q1, &mut worst_rope);
        diff("rope_kv_append k'", &case, &k2, &k1, &mut worst_rope);
        diff("rope_kv_append v", &case, &v2, &v1, &mut worst_rope);
    }
    println!("PROOF-WORST rope_kv_append {worst_rope:.3e}");
    let mut worst = 0.0f64;
    #[derive(Clone, Copy, PartialEq)]
    enum M {
        N,
        C,
        E,
    }
    for &(d, h, n, start, rows, mask, qs) in &[
        (32usize, 4usize, 1usize, 0usize, 1usize, M::N, 1.0f32),
        (64, 16, 1, 1, 3, M::N, 4.0),
        (64, 16, 4, 86, 32, M::N, 2.0),
        (32, 16, 63, 278, 3, M::N, 4.0),
        (64, 4, 64, 278, 32, M::N, 1.0),
        (64, 16, 128, 86, 3, M::N, 8.0),
        (32, 4, 128, 0, 32, M::C, 2.0),
        (64, 16, 63, 1, 3, M::C, 4.0),
        (64, 16, 64, 278, 1, M::C, 2.0),
        (32, 16, 4, 86, 3, M::E, 2.0),
        (64, 4, 17, 5, 2, M::E, 2.0),
        (128, 8, 17, 30, 2, M::N, 2.0),
        (64, 16, 64, 4032, 2, M::N, 4.0),
        (32, 4, 512, 0, 1, M::C, 2.0),
    ] {
        let s = shape(d, h, n, start, rows, 5);
        let mut rng = Rng::new((d * 3 + h * 17 + n * 257 + start * 65537 + rows * 31) as u64);
        let q = bfr(&rng.vec(s.q_len(), qs));
        let kc = bfr(&rng.vec(s.cache_len(), 1.0));
        let vc = bfr(&rng.vec(s.cache_len(), 1.0));
        let kb = block_ids(s.keys());
        let mut qb: Vec<i32> = kb[start..].to_vec();
        if mask == M::E {
            qb[0] = -1;
        }
        let old = cpu_attention(
            &q,
            &kc,
            &vc,
            (mask != M::N).then_some((&kb[..], &qb[..])),
            s,
        );
        let new = ops::attention(
            &q,
            &kc,
            &vc,
            (mask != M::N).then_some(BlockMask {
                key_block: &kb,
                query_block: &qb,
            }),
            s,
        );
        diff(
            "attention",
            &format!("D{d} H{h} n{n} start{start} rows{rows} q{qs}"),
            &new,
            &old,
            &mut worst,
        );
    }
    println!("PROOF-WORST attention {worst:.3e}");
}

// ---- gpu_decoder.rs
fn conv3x3_ref_pixel(
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    cin: usize,
    (height, width): (usize, usize),
    up: bool,
    (b, oy, ox): (usize, usize, usize),
) -> Vec<f64> {
    let (hin, win) = if up {
        (height / 2, width / 2)
    } else {
        (height, width)
    };
    let mut out: Vec<f64> = bias.iter().map(|&v| v as f64).collect();
    for ky in 0..3 {
        for kx in 0..3 {
            let (yy, xx) = (oy as isize + ky as isize - 1, ox as isize + kx as isize - 1);
            if yy < 0 || xx < 0 || yy >= height as isize || xx >= width as isize {
                continue;
            }
            let (iy, ix) = if up {
                (yy as usize / 2, xx as usize / 2)
            } else {
                (yy as usize, xx as usize)
            };
            let xp = &x[((b * hin + iy) * win + ix) * cin..][..cin];
            for (co, o) in out.iter_mut().enumerate() {
                let mut acc = 0.0f64;
                for (ci, &xv) in xp.iter().enumerate() {
                    acc += xv as f64 * w[(co * cin + ci) * 9 + ky * 3 + kx] as f64;
                }
                *o += acc;
            }
        }
    }
    out
}
fn sample_pixels(batch: usize, h: usize, w: usize) -> Vec<(usize, usize, usize)> {
    let mut px = Vec::new();
    let pick = |n: usize| -> Vec<usize> {
        let mut v = vec![0, 1, n / 2, n.saturating_sub(2), n - 1];
        v.sort();
        v.dedup();
        v.retain(|&i| i < n);
        v
    };
    for b in 0..batch {
        for &y in &pick(h) {
            for &x in &pick(w) {
                px.push((b, y, x));
            }
        }
        let r = rand_vec(64, 1000 + b as u64, 1.0);
        for pair in r.chunks(2) {
            let y = ((pair[0] * 0.5 + 0.5) * h as f32) as usize;
            let x = ((pair[1] * 0.5 + 0.5) * w as f32) as usize;
            px.push((b, y.min(h - 1), x.min(w - 1)));
        }
    }
    px
}
/// ops reference of the GPU conv3x3 on NHWC x.
fn ops_conv3x3(conv: &Conv, x: &[f32], batch: usize, h: usize, w: usize, up: bool) -> Vec<f32> {
    let (hin, win) = if up { (h / 2, w / 2) } else { (h, w) };
    common::per_image_nhwc(x, batch, hin * win, conv.cin, conv.cout, |img| {
        if up {
            ops::conv2d(conv, &ops::upsample_nearest2(img, conv.cin, hin, win), h, w)
        } else {
            ops::conv2d(conv, img, h, w)
        }
    })
}

#[test]
fn proof_decoder_convs() {
    let cases = [
        (1usize, 16usize, 256usize, 512usize, false),
        (3, 16, 512, 512, false),
        (1, 32, 512, 512, true),
        (1, 32, 512, 256, false),
        (3, 32, 256, 256, false),
        (1, 64, 256, 256, true),
        (1, 64, 256, 256, false),
        (1, 128, 256, 256, true),
        (1, 128, 256, 128, false),
        (1, 128, 128, 128, false),
        (1, 256, 128, 128, true),
        (1, 256, 128, 128, false),
        (1, 256, 128, 3, false),
        (3, 5, 64, 128, false),
        (1, 10, 128, 128, true),
        (3, 80, 32, 3, false),
        (1, 1, 256, 512, false),
        (2, 3, 8, 5, false),
    ];
    let mut worst = 0.0f64;
    let mut worst_rel = 0.0f64;
    for (i, &(batch, side, cin, cout, up)) in cases.iter().enumerate() {
        let (h, w) = (side, side);
        let (hin, win) = if up { (h / 2, w / 2) } else { (h, w) };
        let seed = 10 * i as u64;
        let x = bfr(&rand_vec(batch * hin * win * cin, seed, 1.0));
        let wt = bfr(&rand_vec(
            cout * cin * 9,
            seed + 1,
            1.0 / (9.0 * cin as f32).sqrt(),
        ));
        let bias = rand_vec(cout, seed + 2, 0.5);
        let conv = Conv {
            cin,
            cout,
            k: 3,
            weight: wt.clone(),
            bias: bias.clone(),
        };
        let full = ops_conv3x3(&conv, &x, batch, h, w, up);
        let (mut want, mut got) = (Vec::new(), Vec::new());
        for &(b, oy, ox) in &sample_pixels(batch, h, w) {
            let r = conv3x3_ref_pixel(&x, &wt, &bias, cin, (h, w), up, (b, oy, ox));
            want.extend(r.iter().map(|&v| v as f32));
            let o = ((b * h + oy) * w + ox) * cout;
            got.extend_from_slice(&full[o..o + cout]);
        }
        diff(
            "conv3x3",
            &format!("B{batch} {side} {cin}->{cout} up{up}"),
            &got,
            &want,
            &mut worst,
        );
        worst_rel = worst_rel.max(common::rel_err(&got, &want).0);
    }
    println!("PROOF-WORST conv3x3 abs {worst:.3e} rel {worst_rel:.3e}");
    let mut worst = 0.0f64;
    for &(rows, cin, cout, acc) in &[
        (3 * 256usize, 8usize, 256usize, false),
        (1024, 512, 256, false),
        (3 * 25, 256, 128, true),
    ] {
        let x = bfr(&rand_vec(rows * cin, 1, 1.0));
        let wt = bfr(&rand_vec(cout * cin, 2, 1.0 / (cin as f32).sqrt()));
        let b = rand_vec(cout, 3, 0.5);
        let y0 = rand_vec(rows * cout, 4, 1.0);
        let mut want = vec![0.0f32; rows * cout];
        for r in 0..rows {
            for o in 0..cout {
                let mut s = b[o] as f64 + if acc { y0[r * cout + o] as f64 } else { 0.0 };
                for c in 0..cin {
                    s += x[r * cin + c] as f64 * wt[o * cin + c] as f64;
                }
                want[r * cout + o] = s as f32;
            }
        }
        let conv = Conv {
            cin,
            cout,
            k: 1,
            weight: wt,
            bias: b,
        };
        let mut got = common::per_image_nhwc(&x, 1, rows, cin, cout, |img| {
            ops::conv2d(&conv, img, 1, rows)
        });
        if acc {
            got.iter_mut().zip(&y0).for_each(|(g, y)| *g += y);
        }
        diff(
            "conv1x1",
            &format!("rows{rows} {cin}->{cout} acc{acc}"),
            &got,
            &want,
            &mut worst,
        );
    }
    println!("PROOF-WORST conv1x1 {worst:.3e}");
}

fn group_norm_ref(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    batch: usize,
    hw: usize,
    silu: bool,
) -> Vec<f32> {
    let c = gamma.len();
    let cpg = c / 32;
    let mut out = vec![0.0f32; x.len()];
    for b in 0..batch {
        let img = &x[b * hw * c..][..hw * c];
        for g in 0..32 {
            let vals = || {
                img.chunks_exact(c)
                    .flat_map(move |px| px[g * cpg..(g + 1) * cpg].iter().map(|&v| v as f64))
            };
            let n = (hw * cpg) as f64;
            let mean = vals().sum::<f64>() / n;
            let var = vals().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
            let rstd = 1.0 / (var + 1e-6).sqrt();
            for p in 0..hw {
                for ch in g * cpg..(g + 1) * cpg {
                    let i = (b * hw + p) * c + ch;
                    let mut v = (x[i] as f64 - mean) * rstd * gamma[ch] as f64 + beta[ch] as f64;
                    if silu {
                        v /= 1.0 + (-v).exp();
                    }
                    out[i] = v as f32;
                }
            }
        }
    }
    out
}
fn ops_gn(gn: &GroupNorm, x: &[f32], batch: usize, hw: usize, silu: bool) -> Vec<f32> {
    let c = gn.gamma.len();
    common::per_image_nhwc(x, batch, hw, c, c, |img| ops::group_norm(gn, img, hw, silu))
}
fn attn_ref(x: &[f32], p: &[Vec<f32>], batch: usize, n: usize, c: usize) -> Vec<f32> {
    let hn = group_norm_ref(x, &p[0], &p[1], batch, n, false);
    let lin = |inp: &[f64], w: &[f32], b: &[f32]| -> Vec<f64> {
        let rows = inp.len() / c;
        let mut out = vec![0.0f64; rows * c];
        for r in 0..rows {
            for o in 0..c {
                let wr = &w[o * c..][..c];
                let mut s = b[o] as f64;
                for k in 0..c {
                    s += inp[r * c + k] * wr[k] as f64;
                }
                out[r * c + o] = s;
            }
        }
        out
    };
    let hn: Vec<f64> = hn.iter().map(|&v| v as f64).collect();
    let (q, k, v) = (
        lin(&hn, &p[2], &p[3]),
        lin(&hn, &p[4], &p[5]),
        lin(&hn, &p[6], &p[7]),
    );
    let scale = 1.0 / (c as f64).sqrt();
    let mut att = vec![0.0f64; batch * n * c];
    for b in 0..batch {
        for i in 0..n {
            let qi = &q[(b * n + i) * c..][..c];
            let mut s: Vec<f64> = (0..n)
                .map(|j| {
                    let kj = &k[(b * n + j) * c..][..c];
                    qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() * scale
                })
                .collect();
            let mx = s.iter().cloned().fold(f64::MIN, f64::max);
            s.iter_mut().for_each(|v| *v = (*v - mx).exp());
            let sum: f64 = s.iter().sum();
            let o = &mut att[(b * n + i) * c..][..c];
            for (j, &pj) in s.iter().enumerate() {
                let vj = &v[(b * n + j) * c..][..c];
                for (oc, &vc) in o.iter_mut().zip(vj) {
                    *oc += pj / sum * vc;
                }
            }
        }
    }
    let proj = lin(&att, &p[8], &p[9]);
    proj.iter()
        .zip(x)
        .map(|(&a, &b)| (a + b as f64) as f32)
        .collect()
}
fn ops_attn_block(x: &[f32], p: &[Vec<f32>], batch: usize, n: usize, c: usize) -> Vec<f32> {
    let gn = GroupNorm {
        gamma: p[0].clone(),
        beta: p[1].clone(),
    };
    let conv = |i: usize| Conv {
        cin: c,
        cout: c,
        k: 1,
        weight: p[i].clone(),
        bias: p[i + 1].clone(),
    };
    let (q, k, v, proj) = (conv(2), conv(4), conv(6), conv(8));
    common::per_image_nhwc(x, batch, n, c, c, |img| {
        let h = ops::group_norm(&gn, img, n, false);
        let att = ops::spatial_attention(
            &ops::conv2d(&q, &h, 1, n),
            &ops::conv2d(&k, &h, 1, n),
            &ops::conv2d(&v, &h, 1, n),
            c,
            n,
        );
        let mut o = ops::conv2d(&proj, &att, 1, n);
        o.iter_mut().zip(img).for_each(|(a, b)| *a += b);
        o
    })
}

#[test]
fn proof_decoder_norm_softmax_attn_gather() {
    let mut worst = 0.0f64;
    for (i, &(batch, side, c, silu, off)) in [
        (1usize, 16usize, 512usize, true, 0.0f32),
        (3, 16, 512, false, 3.0),
        (1, 32, 512, true, 0.0),
        (1, 32, 256, true, -5.0),
        (1, 64, 256, true, 0.0),
        (1, 128, 256, true, 20.0),
        (1, 128, 128, true, 0.0),
        (1, 256, 128, true, 2.0),
        (3, 5, 128, true, 0.0),
        (3, 80, 32, true, 1.0),
        (1, 1, 512, true, 0.0),
        (2, 3, 64, false, 100.0),
    ]
    .iter()
    .enumerate()
    {
        let hw = side * side;
        let x: Vec<f32> = rand_vec(batch * hw * c, 50 + i as u64, 2.0)
            .iter()
            .map(|v| v + off)
            .collect();
        let gamma = rand_vec(c, 60 + i as u64, 1.0);
        let beta = rand_vec(c, 70 + i as u64, 1.0);
        let old = group_norm_ref(&x, &gamma, &beta, batch, hw, silu);
        let new = ops_gn(&GroupNorm { gamma, beta }, &x, batch, hw, silu);
        diff(
            "group_norm",
            &format!("B{batch} {side} C{c} silu{silu} off{off}"),
            &new,
            &old,
            &mut worst,
        );
    }
    println!("PROOF-WORST group_norm {worst:.3e}");
    let mut worst = 0.0f64;
    for &(rows, n) in &[(3 * 256usize, 256usize), (3 * 25, 25), (1, 1), (1024, 1024)] {
        let s = rand_vec(rows * n, 7, 40.0);
        let scale = 1.0 / (512f32).sqrt();
        let mut want = vec![0.0f32; rows * n];
        for r in 0..rows {
            let row = &s[r * n..][..n];
            let mx = row
                .iter()
                .fold(f64::MIN, |a, &v| a.max(v as f64 * scale as f64));
            let sum: f64 = row
                .iter()
                .map(|&v| (v as f64 * scale as f64 - mx).exp())
                .sum();
            for j in 0..n {
                want[r * n + j] = ((row[j] as f64 * scale as f64 - mx).exp() / sum) as f32;
            }
        }
        let mut got = s.clone();
        ops::softmax_rows(&mut got, n, scale);
        diff(
            "softmax_rows",
            &format!("rows{rows} n{n}"),
            &got,
            &want,
            &mut worst,
        );
    }
    println!("PROOF-WORST softmax_rows {worst:.3e}");
    let mut worst = 0.0f64;
    for &(batch, n, c) in &[
        (1usize, 256usize, 512usize),
        (3, 256, 512),
        (3, 25, 128),
        (1, 1, 512),
        (2, 64, 128),
    ] {
        let sc = 1.0 / (c as f32).sqrt();
        let p: Vec<Vec<f32>> = (0..10u64)
            .map(|i| match i {
                0 => rand_vec(c, i, 1.0).iter().map(|v| 1.0 + 0.5 * v).collect(),
                1 => rand_vec(c, i, 0.5),
                2 | 4 => bfr(&rand_vec(c * c, 100 + i, sc))
                    .iter()
                    .map(|x| x * 4.0)
                    .collect(),
                6 | 8 => bfr(&rand_vec(c * c, 100 + i, sc)),
                _ => rand_vec(c, 200 + i, 0.2),
            })
            .collect();
        let x = rand_vec(batch * n * c, 300, 1.0);
        let old = attn_ref(&x, &p, batch, n, c);
        let new = ops_attn_block(&x, &p, batch, n, c);
        diff(
            "attn_block",
            &format!("B{batch} N{n} C{c}"),
            &new,
            &old,
            &mut worst,
        );
        let dg: Vec<f32> = new.iter().zip(&x).map(|(a, b)| a - b).collect();
        let dw: Vec<f32> = old.iter().zip(&x).map(|(a, b)| a - b).collect();
        println!(
            "PROOF attn_block branch rel {:.3e}",
            common::rel_err(&dg, &dw).0
        );
    }
    println!("PROOF-WORST attn_block {worst:.3e}");
    // gather_codes: rows of the codebook, normalized, in (rows, e); ops gives (B, e, s, s).
    let (v, e, rows) = (16384usize, 8usize, 3 * 256usize);
    let cb = rand_vec(v * e, 5, 2.0);
    let tokens = common::rand_tokens(rows, 6, v);
    let mut worst = 0.0f64;
    for normalize in [true, false] {
        let mut want = Vec::new();
        for &t in &tokens {
            let row = &cb[t as usize * e..][..e];
            let nn = if normalize {
                row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12)
            } else {
                1.0
            };
            want.extend(row.iter().map(|x| x / nn));
        }
        let z = ops::gather_codes(&cb, e, &tokens, 256, normalize);
        let got = nchw_to_nhwc(&z, 3, e, 256);
        let _ = nhwc_to_nchw(&got, 3, 256, e);
        diff(
            "gather_codes",
            &format!("normalize{normalize}"),
            &got,
            &want,
            &mut worst,
        );
    }
    println!("PROOF-WORST gather_codes {worst:.3e}");
}

// ---- gpu_norm.rs, gpu_embed.rs
#[test]
fn proof_norm_embed() {
    let mut worst = 0.0f64;
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
        for (with_mod, off) in [(true, 0usize), (true, 2 * c), (false, 0)] {
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
            let got = ops::rmsnorm_adaln(&x, &w, with_mod.then_some((&m[..], off)), n, c, 1e-6);
            diff(
                "rmsnorm_adaln",
                &format!("rows{rows} n{n} C{c} mod{with_mod}/{off}"),
                &got,
                &want,
                &mut worst,
            );
        }
    }
    println!("PROOF-WORST rmsnorm_adaln {worst:.3e}");
    let (t, f) = (37usize, 3072usize);
    let g = bfr(&rand_vec(t * 2 * f, 4, 4.0));
    let want: Vec<f32> = (0..t * f)
        .map(|i| {
            let (r, j) = (i / f, i % f);
            let a = g[r * 2 * f + j];
            let b = g[r * 2 * f + f + j];
            a / (1.0 + (-a).exp()) * b
        })
        .collect();
    let mut w0 = 0.0;
    diff(
        "silu_mul",
        "T37 F3072",
        &ops::silu_mul(&g, f),
        &want,
        &mut w0,
    );
    let (rows, n) = (5usize, 4096usize);
    let y = rand_vec(rows * n, 5, 3.0);
    let b = rand_vec(n, 6, 1.0);
    let want: Vec<f32> = (0..rows * n).map(|i| y[i] + b[i % n]).collect();
    let mut got = y.clone();
    ops::add_bias(&mut got, &b);
    diff("add_bias", "5x4096", &got, &want, &mut w0);

    let (rows, e) = (1000usize, 8usize);
    let (w0v, b0) = (rand_vec(64 * e, 3, 1.0), rand_vec(64, 4, 0.1));
    let (w2, b2) = (rand_vec(64 * 64, 5, 0.2), rand_vec(64, 6, 0.1));
    let z = rand_vec(rows * e, 7, 1.0);
    let silu = checkergen::math::silu;
    let h1: Vec<f32> = checkergen::math::linear(&z, &w0v, Some(&b0), rows, e, 64)
        .into_iter()
        .map(silu)
        .collect();
    let want: Vec<f32> = checkergen::math::linear(&h1, &w2, Some(&b2), rows, 64, 64)
        .into_iter()
        .map(silu)
        .collect();
    let mlp = CodeHidden {
        l0: Linear {
            w: w0v,
            b: Some(b0),
            din: e,
            dout: 64,
        },
        l2: Linear {
            w: w2,
            b: Some(b2),
            din: 64,
            dout: 64,
        },
    };
    let mut wc = 0.0;
    diff(
        "codevec_hidden",
        "rows1000",
        &ops::codevec_hidden(&mlp, &z, rows),
        &want,
        &mut wc,
    );

    let (c, ntok, v) = (256usize, 341usize, 512usize);
    let (pa, pc, dc) = (
        rand_vec(ntok * c, 8, 1.0),
        rand_vec(ntok * c, 9, 1.0),
        rand_vec(v * c, 10, 1.0),
    );
    let (empty, bias) = (rand_vec(c, 11, 1.0), rand_vec(c, 12, 0.1));
    let tables = InputTables {
        pa: pa.clone(),
        pc: pc.clone(),
        dc: dc.clone(),
        empty: empty.clone(),
        bias: bias.clone(),
    };
    let (batch, rows, s, off) = (3usize, 6usize, 8usize, 21usize);
    let cells = s * s;
    let src = rand_vec(batch * cells * c, 13, 1.0);
    let grid: Vec<u32> = (0..batch * cells).map(|i| (i * 7 % v) as u32).collect();
    let seq = checkergen::order::sequence(s).unwrap();
    let (cur, prev) = (&seq[16..32], &seq[0..16]);
    let mut wg = 0.0;
    for first in [false, true] {
        let n = cur.len();
        let mut want = vec![0.0f32; rows * n * c];
        for r in 0..rows {
            let b = r % batch;
            for j in 0..n {
                let gg = off + cur[j];
                for i in 0..c {
                    let mut val = pa[gg * c + i] + src[(b * cells + cur[j]) * c + i] + bias[i];
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
        let cg: Vec<usize> = cur.iter().map(|&p| off + p).collect();
        let pg: Vec<usize> = prev.iter().map(|&p| off + p).collect();
        let got = ops::gather_inputs(
            &tables,
            &src,
            &grid,
            &cg,
            cur,
            (!first).then_some((&pg[..], prev)),
            rows,
            batch,
            cells,
        );
        diff(
            "gather_inputs",
            &format!("first{first}"),
            &got,
            &want,
            &mut wg,
        );
    }
}

// ---- gpu_sampling.rs cpu_step
#[test]
fn proof_sampling_step() {
    let pol = common::pol;
    let mut differ = 0usize;
    let mut logit_bits = 0usize;
    let mut total = 0usize;
    for &(b, n, v, cfg, forced) in &[
        (1usize, 1usize, 7usize, Some(1.5f32), false),
        (3, 5, 1000, Some(0.0), false),
        (2, 17, 16384, Some(3.25), false),
        (1, 3, 513, None, false),
        (3, 20, 333, Some(2.0), true),
        (3, 20, 333, None, true),
        (2, 64, 1000, None, false),
    ] {
        for p in [
            pol(0.0, None, None),
            pol(1.0, None, None),
            pol(1.0, Some(10), Some(0.9)),
            pol(0.7, Some(7), Some(0.95)),
        ] {
            let cells = n + 4;
            let lp: Vec<usize> = (0..n).map(|j| (j * 7 + 3) % cells).collect();
            let gp: Vec<usize> = lp.iter().map(|&p| p + 100).collect();
            let logits = rand_vec(2 * b * n * v, 11, 6.0);
            let fv: Vec<u32> = common::rand_tokens(b * cells, 3, v);
            let f = forced.then_some(&fv[..]);
            // old cpu_step
            let bnv = b * n * v;
            let mut cond = logits[..bnv].to_vec();
            if let Some(cfg) = cfg {
                cfg_combine(&mut cond, &logits[bnv..2 * bnv], cfg);
            }
            let mut toks = vec![0u32; b * n];
            for bi in 0..b {
                for j in 0..n {
                    toks[bi * n + j] = match f {
                        Some(f) => f[bi * cells + lp[j]],
                        None => {
                            let u = token_uniform(9, bi as u32, 4, gp[j] as u32);
                            let r = bi * n + j;
                            choose_token(&cond[r * v..(r + 1) * v], &p, u) as u32
                        }
                    };
                }
            }
            let k = StepKnobs {
                batch: b,
                vocab: v,
                cells,
                guidance: cfg,
                policy: &p,
                seed: 9,
                step: 4,
            };
            let mut l2 = logits.clone();
            let mut grid = vec![u32::MAX; b * cells];
            let t2 = ops::guided_sample(&k, &mut l2, &lp, &gp, f, &mut grid);
            differ += toks.iter().zip(&t2).filter(|(a, b)| a != b).count();
            logit_bits += (0..bnv)
                .filter(|&i| l2[i].to_bits() != cond[i].to_bits())
                .count();
            total += toks.len();
            let _: &TokenPolicy = &p;
        }
    }
    println!(
        "PROOF guided_sample: {differ} of {total} tokens differ, {logit_bits} guided logits differ in bits"
    );
    assert_eq!(differ + logit_bits, 0);
}
