//! kernels/sampling.cu (guided_sample) against the CPU reference src/sampling.rs: guidance
//! combine, argmax ties, softmax draws (chi-square and token-for-token agreement for the same
//! uniforms), top-k/top-p exclusion, teacher forcing and the grid scatter. The GPU tests skip
//! loudly without a GPU.
//!
//! `kernel_model_*` run everywhere: a line-by-line CPU model of the kernel's selection
//! algorithm (bitwise threshold searches over order-preserving keys, tie ranks from a
//! per-thread scan, chunked inverse-CDF walk) checked against `choose_token`, so the
//! algorithm itself is tested even on machines with no GPU.
#![cfg(feature = "cuda")]

mod common;

use checkergen::cuda::Gpu;
use checkergen::cuda::sampling::{SampleStep, guided_sample};
use checkergen::rng::token_uniform;
use checkergen::sampling::{TokenPolicy, argmax, cfg_combine, choose_token};

const POISON_GRID: i32 = -7;
const POISON_TOK: i32 = -9;

fn pol(t: f32, k: Option<usize>, p: Option<f32>) -> TokenPolicy {
    TokenPolicy {
        temperature: t,
        top_k: k,
        top_p: p,
    }
}

/// Uniform in [-scale, scale), deterministic.
fn rand_vec(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| scale * (token_uniform(seed as u64, 7, 0, i as u32) as f32 * 2.0 - 1.0))
        .collect()
}

/// Random logits rounded to multiples of `q`: many exact ties.
fn tied_vec(n: usize, seed: u32, scale: f32, q: f32) -> Vec<f32> {
    rand_vec(n, seed, scale)
        .into_iter()
        .map(|x| (x / q).round() * q)
        .collect()
}

/// One launch, host side.
struct Case<'a> {
    batch: usize,
    n: usize,
    vocab: usize,
    cells: usize,
    cfg: Option<f32>,
    policy: &'a TokenPolicy,
    seed: u64,
    step: u32,
    /// (rows * n, V), rows = 2B with cfg, else B.
    logits: &'a [f32],
    local_pos: &'a [i32],
    global_pos: &'a [i32],
    /// (B, cells)
    forced: Option<&'a [i32]>,
}

struct Out {
    logits: Vec<f32>,
    grid: Vec<i32>,
    tokens: Vec<i32>,
}

/// Run guided_sample on poisoned outputs and download everything.
fn run(gpu: &Gpu, c: &Case) -> Out {
    let mut dl = gpu.upload(c.logits).unwrap();
    let dlp = gpu.upload(c.local_pos).unwrap();
    let dgp = gpu.upload(c.global_pos).unwrap();
    let df = c.forced.map(|f| gpu.upload(f).unwrap());
    let mut dg = gpu.upload(&vec![POISON_GRID; c.batch * c.cells]).unwrap();
    let mut dt = gpu.upload(&vec![POISON_TOK; c.batch * c.n]).unwrap();
    let s = SampleStep {
        batch: c.batch,
        n: c.n,
        vocab: c.vocab,
        cells: c.cells,
        cfg: c.cfg,
        policy: c.policy,
        seed: c.seed,
        step: c.step,
    };
    guided_sample(gpu, &s, &mut dl, &dlp, &dgp, df.as_ref(), &mut dg, &mut dt).unwrap();
    Out {
        logits: gpu.download(&dl).unwrap(),
        grid: gpu.download(&dg).unwrap(),
        tokens: gpu.download(&dt).unwrap(),
    }
}

/// The CPU sampler's loop for one step: (guided conditional logits (B*n, V), tokens (B, n)).
fn cpu_step(c: &Case) -> (Vec<f32>, Vec<i32>) {
    let (b, n, v) = (c.batch, c.n, c.vocab);
    let bnv = b * n * v;
    let mut cond = c.logits[..bnv].to_vec();
    if let Some(cfg) = c.cfg {
        cfg_combine(&mut cond, &c.logits[bnv..2 * bnv], cfg);
    }
    let mut toks = vec![0i32; b * n];
    for bi in 0..b {
        for j in 0..n {
            toks[bi * n + j] = match c.forced {
                Some(f) => f[bi * c.cells + c.local_pos[j] as usize],
                None => {
                    let u = token_uniform(c.seed, bi as u32, c.step, c.global_pos[j] as u32);
                    let r = bi * n + j;
                    choose_token(&cond[r * v..(r + 1) * v], c.policy, u) as i32
                }
            };
        }
    }
    (cond, toks)
}

/// The grid holds tokens[b, j] at local_pos[j] and poison everywhere else.
fn check_scatter(c: &Case, out: &Out) {
    let mut want = vec![POISON_GRID; c.batch * c.cells];
    for b in 0..c.batch {
        for j in 0..c.n {
            want[b * c.cells + c.local_pos[j] as usize] = out.tokens[b * c.n + j];
        }
    }
    assert_eq!(out.grid, want, "grid scatter");
    assert!(
        out.tokens.iter().all(|&t| t >= 0 && (t as usize) < c.vocab),
        "tokens out of range or unwritten"
    );
}

/// Distinct cells for n tokens in a grid of `cells` (a stride coprime to cells).
fn spread_positions(n: usize, cells: usize) -> Vec<i32> {
    assert!(n <= cells);
    let mut stride = 7 % cells.max(1);
    while stride == 0 || gcd(stride, cells) != 1 {
        stride += 1;
    }
    (0..n).map(|j| ((j * stride + 3) % cells) as i32).collect()
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The CPU's kept set (top-k then top-p, weight > 0), replicating choose_token's filter.
fn kept_set(l: &[f32], p: &TokenPolicy) -> Vec<bool> {
    let v = l.len();
    let max = l[argmax(l)] as f64;
    let inv_t = 1.0 / p.temperature as f64;
    let w: Vec<f64> = l
        .iter()
        .map(|&x| ((x as f64 - max) * inv_t).exp())
        .collect();
    let k = p.top_k.unwrap_or(v).clamp(1, v);
    let mut idx: Vec<usize> = (0..v).collect();
    idx.sort_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
    let mut keep = k;
    if let Some(tp) = p.top_p.filter(|&tp| tp < 1.0) {
        let total: f64 = idx[..k].iter().map(|&i| w[i]).sum();
        let mut acc = 0.0;
        for (j, &i) in idx[..k].iter().enumerate() {
            acc += w[i];
            if acc >= tp as f64 * total {
                keep = j + 1;
                break;
            }
        }
    }
    let mut kept = vec![false; v];
    for &i in &idx[..keep] {
        kept[i] = w[i] > 0.0;
    }
    kept
}

/// Chi-square of counts against probabilities, pooling bins whose expectation is below 5.
/// Returns (chi2, degrees of freedom).
fn chi_square(counts: &[usize], probs: &[f64]) -> (f64, usize) {
    let n: usize = counts.iter().sum();
    let (mut chi2, mut bins) = (0.0, 0usize);
    let (mut pool_c, mut pool_e) = (0.0f64, 0.0f64);
    for (&c, &p) in counts.iter().zip(probs) {
        let e = n as f64 * p;
        if e < 5.0 {
            pool_c += c as f64;
            pool_e += e;
        } else {
            chi2 += (c as f64 - e).powi(2) / e;
            bins += 1;
        }
    }
    if pool_e > 0.0 {
        chi2 += (pool_c - pool_e).powi(2) / pool_e.max(1e-9);
        bins += 1;
    }
    (chi2, bins.saturating_sub(1))
}

/// Upper critical value of chi-square with `dof` degrees of freedom at P = 0.001
/// (Wilson-Hilferty, z = 3.090).
fn chi2_critical(dof: usize) -> f64 {
    let k = dof.max(1) as f64;
    let a = 2.0 / (9.0 * k);
    k * (1.0 - a + 3.090 * a.sqrt()).powi(3)
}

/// softmax(l / T) renormalized over `kept`.
fn kept_probs(l: &[f32], t: f32, kept: &[bool]) -> Vec<f64> {
    let m = l[argmax(l)] as f64;
    let w: Vec<f64> = l
        .iter()
        .zip(kept)
        .map(|(&x, &k)| {
            if k {
                ((x as f64 - m) / t as f64).exp()
            } else {
                0.0
            }
        })
        .collect();
    let z: f64 = w.iter().sum();
    w.iter().map(|x| x / z).collect()
}

// ---------------------------------------------------------------------------------------
// (a) guidance combine

#[test]
fn gpu_cfg_combine_matches_cpu() {
    let Some(gpu) = common::gpu_or_skip("guided_sample cfg") else {
        return;
    };
    for &(b, n, v) in &[
        (1usize, 1usize, 7usize),
        (3, 5, 1000),
        (2, 17, 16384),
        (1, 3, 513),
    ] {
        let cells = n + 4;
        let lp = spread_positions(n, cells);
        let gp: Vec<i32> = lp.iter().map(|&p| p + 100).collect();
        let logits = rand_vec(2 * b * n * v, 11, 6.0);
        let greedy = pol(0.0, None, None);
        for cfg in [Some(1.5f32), Some(0.0), Some(3.25), None] {
            let c = Case {
                batch: b,
                n,
                vocab: v,
                cells,
                cfg,
                policy: &greedy,
                seed: 1,
                step: 0,
                logits: &logits,
                local_pos: &lp,
                global_pos: &gp,
                forced: None,
            };
            let out = run(&gpu, &c);
            let (cond, toks) = cpu_step(&c);
            let bnv = b * n * v;
            let differ = (0..bnv)
                .filter(|&i| out.logits[i].to_bits() != cond[i].to_bits())
                .count();
            let (_, max_abs) = common::rel_err(&out.logits[..bnv], &cond);
            println!(
                "cfg {cfg:?} B {b} n {n} V {v}: {differ} of {bnv} guided logits differ in bits \
                 (max abs {max_abs:.2e}); tokens equal: {}",
                out.tokens == toks
            );
            assert_eq!(
                differ, 0,
                "guided logits must equal cfg_combine bit for bit"
            );
            assert_eq!(
                &out.logits[bnv..],
                &logits[bnv..],
                "unconditional rows must not change"
            );
            assert_eq!(out.tokens, toks);
            check_scatter(&c, &out);
        }
    }
}

// ---------------------------------------------------------------------------------------
// (b) argmax with exact ties

#[test]
fn gpu_argmax_matches_cpu_with_ties() {
    let Some(gpu) = common::gpu_or_skip("guided_sample argmax") else {
        return;
    };
    let greedy = pol(0.0, None, None);
    for &v in &[1usize, 31, 512, 513, 1000, 16384] {
        let (b, n) = (3usize, 7usize);
        let rows = b * n;
        let mut logits = tied_vec(rows * v, 21, 2.0, 0.5); // ~9 distinct values: many ties
        // Special rows: all equal; max only at the last id; -0 and +0 tied maxima; all -inf;
        // ties at both ends.
        let row = |r: usize| r * v..(r + 1) * v;
        logits[row(1)].fill(0.25);
        logits[row(2)].fill(-1.0);
        logits[(2 + 1) * v - 1] = 3.0;
        logits[row(3)].fill(-5.0);
        logits[3 * v + v / 2] = -0.0;
        logits[4 * v - 1] = 0.0;
        logits[row(4)].fill(f32::NEG_INFINITY);
        logits[row(5)].fill(1.0);
        logits[5 * v] = 2.0;
        logits[6 * v - 1] = 2.0;
        let cells = n;
        let lp: Vec<i32> = (0..n as i32).rev().collect();
        let gp: Vec<i32> = (0..n as i32).collect();
        let c = Case {
            batch: b,
            n,
            vocab: v,
            cells,
            cfg: None,
            policy: &greedy,
            seed: 5,
            step: 2,
            logits: &logits,
            local_pos: &lp,
            global_pos: &gp,
            forced: None,
        };
        let out = run(&gpu, &c);
        let want: Vec<i32> = (0..rows).map(|r| argmax(&logits[row(r)]) as i32).collect();
        let agree = out.tokens.iter().zip(&want).filter(|(a, b)| a == b).count();
        println!("argmax V {v}: {agree} of {rows} rows agree (ties included)");
        assert_eq!(out.tokens, want);
        check_scatter(&c, &out);
    }
}

// ---------------------------------------------------------------------------------------
// (c) draws follow softmax(l / T) and equal the CPU's tokens for the same uniforms

#[test]
fn gpu_draws_follow_softmax_and_match_cpu() {
    let Some(gpu) = common::gpu_or_skip("guided_sample draws") else {
        return;
    };
    // Fixed logits, V = 64, every row the same; the position counter varies per draw.
    let v = 64usize;
    let base = rand_vec(v, 31, 3.0);
    let (b, n) = (3usize, 8192usize);
    let logits: Vec<f32> = (0..b * n).flat_map(|_| base.iter().copied()).collect();
    let lp: Vec<i32> = (0..n as i32).collect();
    let gp: Vec<i32> = (0..n as i32).map(|j| j * 3 + 1).collect();
    for t in [1.0f32, 0.7, 2.0] {
        let policy = pol(t, None, None);
        let mut counts = vec![0usize; v];
        let (mut total, mut mismatch) = (0usize, 0usize);
        for step in 0..9u32 {
            let c = Case {
                batch: b,
                n,
                vocab: v,
                cells: n,
                cfg: None,
                policy: &policy,
                seed: 1234,
                step,
                logits: &logits,
                local_pos: &lp,
                global_pos: &gp,
                forced: None,
            };
            let out = run(&gpu, &c);
            check_scatter(&c, &out);
            let (_, want) = cpu_step(&c);
            for (&g, &w) in out.tokens.iter().zip(&want) {
                counts[g as usize] += 1;
                total += 1;
                mismatch += (g != w) as usize;
            }
        }
        let probs = kept_probs(&base, t, &vec![true; v]);
        let (chi2, dof) = chi_square(&counts, &probs);
        let crit = chi2_critical(dof);
        let agree = 1.0 - mismatch as f64 / total as f64;
        println!(
            "T {t}: {total} draws, chi2 {chi2:.1} ({dof} dof, critical {crit:.1} at P=0.001); \
             GPU == CPU on {:.4}% ({mismatch} differ)",
            100.0 * agree
        );
        assert!(chi2 < crit, "T {t}: chi2 {chi2} >= {crit}");
        assert!(agree >= 0.999, "T {t}: agreement {agree}");
    }

    // Realistic rows: V = 16384, every row different.
    let v = 16384usize;
    let (b, n) = (2usize, 1024usize);
    let logits = rand_vec(b * n * v, 41, 8.0);
    let lp: Vec<i32> = (0..n as i32).collect();
    for (t, k, p) in [
        (1.0f32, None, None),
        (0.5, None, None),
        (1.0, Some(100), None),
        (1.0, None, Some(0.9)),
    ] {
        let policy = pol(t, k, p);
        let c = Case {
            batch: b,
            n,
            vocab: v,
            cells: n,
            cfg: None,
            policy: &policy,
            seed: 99,
            step: 17,
            logits: &logits,
            local_pos: &lp,
            global_pos: &lp,
            forced: None,
        };
        let out = run(&gpu, &c);
        check_scatter(&c, &out);
        let (_, want) = cpu_step(&c);
        let mismatch = out.tokens.iter().zip(&want).filter(|(a, b)| a != b).count();
        let agree = 1.0 - mismatch as f64 / want.len() as f64;
        println!(
            "V {v} T {t} top-k {k:?} top-p {p:?}: GPU == CPU on {:.3}% of {} rows",
            100.0 * agree,
            want.len()
        );
        assert!(agree >= 0.999, "agreement {agree}");
    }
}

// ---------------------------------------------------------------------------------------
// (d) top-k and top-p

#[test]
fn gpu_top_k_top_p_never_emit_excluded_tokens() {
    let Some(gpu) = common::gpu_or_skip("guided_sample top-k/top-p") else {
        return;
    };
    let v = 1000usize;
    // Four logit rows: smooth, heavily tied, tied and sharp, with -inf entries.
    let mut bases = [
        rand_vec(v, 51, 4.0),
        tied_vec(v, 52, 3.0, 0.125),
        tied_vec(v, 53, 10.0, 1.0),
        rand_vec(v, 54, 2.0),
    ];
    for i in (0..v).step_by(3) {
        bases[3][i] = f32::NEG_INFINITY;
    }
    let (b, n) = (2usize, 4096usize);
    let logits: Vec<f32> = (0..b * n)
        .flat_map(|r| bases[r % 4].iter().copied())
        .collect();
    let lp: Vec<i32> = (0..n as i32).collect();
    let gp: Vec<i32> = (0..n as i32).map(|j| j + 5000).collect();
    let policies = [
        pol(1.0, Some(1), None),
        pol(1.0, Some(3), None),
        pol(1.0, Some(50), None),
        pol(0.8, Some(999), None),
        pol(1.0, Some(v), None),
        pol(1.0, Some(0), None),
        pol(1.0, None, Some(0.0)),
        pol(1.0, None, Some(1e-6)),
        pol(1.0, None, Some(0.3)),
        pol(1.3, None, Some(0.9)),
        pol(1.0, None, Some(0.999)),
        pol(1.0, None, Some(1.0)),
        pol(1.0, Some(50), Some(0.5)),
        pol(0.7, Some(7), Some(0.95)),
        pol(2.0, Some(200), Some(0.2)),
        pol(1.0, Some(45), Some(0.99)),
    ];
    for policy in &policies {
        let c = Case {
            batch: b,
            n,
            vocab: v,
            cells: n,
            cfg: None,
            policy,
            seed: 77,
            step: 3,
            logits: &logits,
            local_pos: &lp,
            global_pos: &gp,
            forced: None,
        };
        let out = run(&gpu, &c);
        check_scatter(&c, &out);
        let (_, want) = cpu_step(&c);
        let kept: Vec<Vec<bool>> = bases.iter().map(|l| kept_set(l, policy)).collect();
        let excluded = (0..b * n)
            .filter(|&r| !kept[r % 4][out.tokens[r] as usize])
            .count();
        let mismatch = out.tokens.iter().zip(&want).filter(|(a, b)| a != b).count();
        let sizes: Vec<usize> = kept
            .iter()
            .map(|k| k.iter().filter(|&&x| x).count())
            .collect();
        println!(
            "{policy:?}: kept sizes {sizes:?}; {excluded} excluded tokens emitted; \
             GPU != CPU on {mismatch} of {} draws",
            b * n
        );
        assert_eq!(excluded, 0, "{policy:?}: excluded tokens emitted");
        assert!(
            mismatch as f64 <= 0.001 * (b * n) as f64,
            "{policy:?}: {mismatch} disagreements"
        );
    }

    // Renormalization: the 8-logit example of src/sampling.rs, chi-square over the kept set.
    let small = [0.3f32, -1.0, 2.0, 0.0, 1.2, -0.5, 0.7, 1.9];
    let (b, n) = (4usize, 16384usize);
    let logits: Vec<f32> = (0..b * n).flat_map(|_| small.iter().copied()).collect();
    let lp: Vec<i32> = (0..n as i32).collect();
    for policy in [
        pol(1.0, Some(3), None),
        pol(1.0, None, Some(0.6)),
        pol(0.9, Some(5), Some(0.8)),
    ] {
        let c = Case {
            batch: b,
            n,
            vocab: 8,
            cells: n,
            cfg: None,
            policy: &policy,
            seed: 8,
            step: 1,
            logits: &logits,
            local_pos: &lp,
            global_pos: &lp,
            forced: None,
        };
        let out = run(&gpu, &c);
        let kept = kept_set(&small, &policy);
        let mut counts = [0usize; 8];
        for &t in &out.tokens {
            counts[t as usize] += 1;
        }
        let emitted: Vec<bool> = counts.iter().map(|&c| c > 0).collect();
        let probs = kept_probs(&small, policy.temperature, &kept);
        let (chi2, dof) = chi_square(&counts, &probs);
        println!(
            "{policy:?}: kept {kept:?} counts {counts:?} chi2 {chi2:.2} ({dof} dof, critical {:.1})",
            chi2_critical(dof)
        );
        assert_eq!(emitted, kept, "{policy:?}");
        assert!(chi2 < chi2_critical(dof), "{policy:?}: chi2 {chi2}");
    }
}

// ---------------------------------------------------------------------------------------
// (e) teacher forcing

#[test]
fn gpu_forced_tokens_are_copied_and_scattered() {
    let Some(gpu) = common::gpu_or_skip("guided_sample forced") else {
        return;
    };
    let (b, n, v, cells) = (3usize, 20usize, 333usize, 50usize);
    let lp = spread_positions(n, cells);
    let gp: Vec<i32> = lp.iter().map(|&p| p + 1000).collect();
    let forced: Vec<i32> = (0..b * cells)
        .map(|i| (token_uniform(3, 0, 0, i as u32) * v as f64) as i32)
        .collect();
    let logits = rand_vec(2 * b * n * v, 61, 5.0);
    let sampling = pol(1.0, Some(10), Some(0.9));
    for cfg in [Some(2.0f32), None] {
        let c = Case {
            batch: b,
            n,
            vocab: v,
            cells,
            cfg,
            policy: &sampling,
            seed: 4,
            step: 9,
            logits: &logits,
            local_pos: &lp,
            global_pos: &gp,
            forced: Some(&forced),
        };
        let out = run(&gpu, &c);
        let (cond, want) = cpu_step(&c);
        println!(
            "forced cfg {cfg:?}: tokens {:?}... want {:?}...",
            &out.tokens[..6],
            &want[..6]
        );
        assert_eq!(out.tokens, want, "forced tokens copied");
        check_scatter(&c, &out);
        let bnv = b * n * v;
        assert!(
            out.logits[..bnv]
                .iter()
                .zip(&cond)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "guidance still applied (and recorded) under forcing"
        );
    }
}

// ---------------------------------------------------------------------------------------
// A CPU model of the kernel's algorithm, checked against choose_token without a GPU.

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
