//! A line-by-line CPU model of kernels/sampling.cu's selection algorithm (bitwise threshold
//! searches over order-preserving keys, tie ranks from a per-thread scan, chunked inverse-CDF
//! walk) checked against `choose_token`, so the algorithm itself is tested on machines with
//! no GPU. The kernel itself is checked against `cpu::ops::guided_sample` in gpu_sampling.rs.

mod common;

use checkergen::rng::token_uniform;
use checkergen::sampling::{TokenPolicy, argmax, choose_token};
use common::{kept_set, pol, rand_vec, tied_vec};

/// kernels/sampling.cu order_key.
fn order_key(x: f32) -> u32 {
    let x = if x == 0.0 { 0.0 } else { x };
    let b = x.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// kernels/sampling.cu key_to_float.
fn key_to_float(k: u32) -> f32 {
    f32::from_bits(if k & 0x8000_0000 != 0 {
        k & 0x7fff_ffff
    } else {
        !k
    })
}

/// The kept set as the kernel defines it: (filter, tau, rcap); kept = !filter, or key > tau,
/// or key == tau with tie rank (ascending id) < rcap.
fn model_threshold(l: &[f32], p: &TokenPolicy, w: &[f64]) -> (bool, u32, usize) {
    let v = l.len();
    let mx = l[argmax(l)];
    let inv_t = 1.0 / p.temperature as f64;
    let weight = |x: f32| ((x as f64 - mx as f64) * inv_t).exp();
    let keys: Vec<u32> = l.iter().map(|&x| order_key(x)).collect();
    let k = p.top_k.unwrap_or(v).clamp(1, v);
    let top_p = match p.top_p {
        Some(tp) if tp < 1.0 => tp,
        _ => 1.0,
    };
    let (topk, topp) = (k < v, top_p < 1.0);
    let (mut tau, mut rcap) = (0u32, i32::MAX as usize);
    if topk {
        let mut t = 0u32;
        for bit in (0..32).rev() {
            let cand = t | (1 << bit);
            if keys.iter().filter(|&&kk| kk >= cand).count() >= k {
                t = cand;
            }
        }
        tau = t;
        rcap = k - keys.iter().filter(|&&kk| kk > t).count();
    }
    if topp {
        let mut mk: f64 = (0..v)
            .filter(|&i| !topk || keys[i] > tau)
            .map(|i| w[i])
            .sum();
        if topk {
            mk += rcap as f64 * weight(key_to_float(tau));
        }
        let target = top_p as f64 * mk;
        let mut t = 0u32;
        for bit in (0..32).rev() {
            let cand = t | (1 << bit);
            if topk && cand <= tau {
                t = cand;
                continue;
            }
            let m: f64 = (0..v).filter(|&i| keys[i] >= cand).map(|i| w[i]).sum();
            if m >= target && m > 0.0 {
                t = cand;
            }
        }
        let mgt: f64 = (0..v).filter(|&i| keys[i] > t).map(|i| w[i]).sum();
        let eq = keys.iter().filter(|&&kk| kk == t).count();
        let avail = if topk && t == tau { rcap } else { eq };
        let wt = weight(key_to_float(t));
        let need = target - mgt;
        let mut m = 1.0f64;
        if need > 0.0 && wt > 0.0 {
            m = (need / wt).ceil();
        }
        m = m.min(avail as f64);
        tau = t;
        rcap = (m as usize).max(1);
    }
    (topk || topp, tau, rcap)
}

/// The kernel's kept set (weight > 0), ties ranked in ascending id order.
fn model_kept_set(l: &[f32], w: &[f64], th: (bool, u32, usize)) -> Vec<bool> {
    let (filter, tau, rcap) = th;
    let mut rank = 0usize;
    l.iter()
        .zip(w)
        .map(|(&x, &wi)| {
            let kk = order_key(x);
            let keep = !filter
                || kk > tau
                || (kk == tau && {
                    rank += 1;
                    rank <= rcap
                });
            keep && wi > 0.0
        })
        .collect()
}

/// The kernel's chunked inverse-CDF walk with `bd` threads.
fn model_draw(l: &[f32], w: &[f64], th: (bool, u32, usize), u: f64, bd: usize) -> usize {
    let (filter, tau, rcap) = th;
    let v = l.len();
    let chunk = v.div_ceil(bd);
    let range = |t: usize| (v.min(t * chunk), v.min(t * chunk + chunk));
    let kept = |i: usize, rank: &mut usize| -> bool {
        if !filter {
            return true;
        }
        let kk = order_key(l[i]);
        if kk > tau {
            return true;
        }
        if kk == tau {
            let r = *rank;
            *rank += 1;
            return r < rcap;
        }
        false
    };
    let mut rank0 = vec![0usize; bd];
    let mut acc0 = vec![0f64; bd];
    let (mut ties, mut total) = (0usize, 0f64);
    for (t, r0) in rank0.iter_mut().enumerate() {
        let (lo, hi) = range(t);
        *r0 = ties;
        ties += (lo..hi)
            .filter(|&i| filter && order_key(l[i]) == tau)
            .count();
    }
    for t in 0..bd {
        let (lo, hi) = range(t);
        let mut rank = rank0[t];
        let s: f64 = (lo..hi).filter(|&i| kept(i, &mut rank)).map(|i| w[i]).sum();
        acc0[t] = total;
        total += s;
    }
    let target = u * total;
    let (mut found, mut last) = (usize::MAX, None);
    for t in 0..bd {
        let (lo, hi) = range(t);
        let (mut acc, mut rank) = (acc0[t], rank0[t]);
        for (i, &wi) in w.iter().enumerate().take(hi).skip(lo) {
            if !kept(i, &mut rank) || wi <= 0.0 {
                continue;
            }
            acc += wi;
            last = Some(last.map_or(i, |x: usize| x.max(i)));
            if acc > target {
                found = found.min(i);
                break;
            }
        }
    }
    if found != usize::MAX {
        found
    } else {
        last.unwrap_or_else(|| argmax(l))
    }
}

#[test]
fn kernel_model_matches_choose_token() {
    let policies = [
        pol(1.0, None, None),
        pol(0.6, None, None),
        pol(1.0, Some(1), None),
        pol(1.0, Some(3), None),
        pol(1.0, Some(40), None),
        pol(0.8, Some(500), None),
        pol(1.0, None, Some(0.0)),
        pol(1.0, None, Some(-0.5)),
        pol(1.0, None, Some(1e-6)),
        pol(1.0, None, Some(0.3)),
        pol(1.3, None, Some(0.9)),
        pol(1.0, None, Some(0.999)),
        pol(1.0, Some(40), Some(0.5)),
        pol(0.7, Some(7), Some(0.95)),
        pol(2.0, Some(200), Some(0.2)),
        pol(1.0, Some(45), Some(0.99)),
    ];
    let (mut draws, mut mismatch, mut excluded) = (0usize, 0usize, 0usize);
    let (mut sets, mut set_mismatch) = (0usize, 0usize);
    for &v in &[1usize, 2, 7, 64, 1000, 4099] {
        let mut rows = vec![
            rand_vec(v, 71, 4.0),
            tied_vec(v, 72, 3.0, 0.25),
            tied_vec(v, 73, 20.0, 1.0),
            vec![0.5; v],
        ];
        let mut ninf = rand_vec(v, 74, 2.0);
        for x in ninf.iter_mut().skip(1).step_by(2) {
            *x = f32::NEG_INFINITY;
        }
        rows.push(ninf);
        let mut zeros = tied_vec(v, 75, 1.0, 1.0); // -1, -0, 0, 1 values
        for x in zeros.iter_mut().step_by(5) {
            *x = -0.0;
        }
        rows.push(zeros);
        for (ri, l) in rows.iter().enumerate() {
            for p in &policies {
                let mx = l[argmax(l)];
                let inv_t = 1.0 / p.temperature as f64;
                let w: Vec<f64> = l
                    .iter()
                    .map(|&x| ((x as f64 - mx as f64) * inv_t).exp())
                    .collect();
                let th = model_threshold(l, p, &w);
                let kept = kept_set(l, p);
                let model_kept = model_kept_set(l, &w, th);
                sets += 1;
                if model_kept != kept {
                    set_mismatch += 1;
                    println!("V {v} row {ri} {p:?}: kept sets differ");
                }
                for d in 0..60u32 {
                    let u = token_uniform(5, ri as u32, v as u32, d);
                    let want = choose_token(l, p, u);
                    for bd in [512usize, 32] {
                        let got = model_draw(l, &w, th, u, bd);
                        draws += 1;
                        mismatch += (got != want) as usize;
                        excluded += !kept[got] as usize;
                        if got != want && mismatch <= 5 {
                            println!("V {v} row {ri} {p:?} u {u}: model {got} cpu {want}");
                        }
                    }
                }
            }
        }
    }
    println!(
        "kernel model: kept set differs from the CPU's on {set_mismatch} of {sets} (row, policy); \
         {draws} draws, {mismatch} differ from choose_token, {excluded} excluded"
    );
    assert_eq!(set_mismatch, 0);
    assert_eq!(excluded, 0);
    assert!(mismatch as f64 <= 0.001 * draws as f64);
}

#[test]
fn order_keys_preserve_order() {
    let xs = [
        f32::NEG_INFINITY,
        -1e30,
        -2.5,
        -1e-30,
        -0.0,
        0.0,
        1e-40,
        1e-30,
        2.5,
        1e30,
        f32::INFINITY,
    ];
    for w in xs.windows(2) {
        let (a, b) = (order_key(w[0]), order_key(w[1]));
        if w[0] == w[1] {
            assert_eq!(a, b, "{} {}", w[0], w[1]);
        } else {
            assert!(a < b, "{} {}", w[0], w[1]);
        }
    }
    for &x in &xs {
        let back = key_to_float(order_key(x));
        assert!(back == x, "{x} -> {back}");
    }
}
