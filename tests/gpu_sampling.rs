//! kernels/sampling.cu (guided_sample) against its CPU reference `cpu::ops::guided_sample`:
//! one table of launches compared token for token (guidance combine bit for bit, argmax ties,
//! teacher forcing, realistic draws), then the statistical checks (draws follow
//! softmax(l / T) by chi-square; top-k/top-p never emit an excluded token; renormalization).
//! Runs on the GPU, or the host emulator without one.
#![cfg(feature = "cuda")]

mod common;

use checkergen::cpu::ops::guided_sample as cpu_guided_sample;
use checkergen::cuda::Gpu;
use checkergen::cuda::sampling::guided_sample;
use checkergen::sampling::{StepKnobs, TokenPolicy, argmax};
use common::{kept_set, pol, rand_tokens, rand_vec, tied_vec};

const POISON_GRID: i32 = -7;
const POISON_TOK: i32 = -9;

/// One launch, host side (device index types).
struct Launch<'a> {
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
    /// Also record the choice statistics (prob, entropy) into NaN-poisoned grids.
    stats: bool,
    /// (V): the head's bias, added by the kernel to every row it reads (the CPU reference
    /// gets the logits with the bias already added).
    bias: Option<&'a [f32]>,
}

impl<'a> Launch<'a> {
    /// An unguided launch over `n` positions per row of a scale of `n` cells: no forcing,
    /// statistics or bias, seed 0, step 0.
    fn unguided(
        batch: usize,
        n: usize,
        vocab: usize,
        policy: &'a TokenPolicy,
        logits: &'a [f32],
        local_pos: &'a [i32],
        global_pos: &'a [i32],
    ) -> Launch<'a> {
        Launch {
            batch,
            n,
            vocab,
            cells: n,
            cfg: None,
            policy,
            seed: 0,
            step: 0,
            logits,
            local_pos,
            global_pos,
            forced: None,
            stats: false,
            bias: None,
        }
    }

    /// The step's knobs, as both guided_sample implementations take them.
    fn knobs(&self) -> StepKnobs<'_> {
        StepKnobs {
            batch: self.batch,
            vocab: self.vocab,
            cells: self.cells,
            guidance: self.cfg,
            policy: self.policy,
            seed: self.seed,
            step: self.step,
            // A run-wide index of the batch's first image, non-zero wherever the step is
            // (the RNG's image counter must be offset the same way on both sides).
            image0: self.step.wrapping_mul(1000),
        }
    }
}

struct Out {
    logits: Vec<f32>,
    grid: Vec<i32>,
    tokens: Vec<i32>,
    /// (prob, entropy) (B, cells) when the launch recorded them.
    stats: Option<(Vec<f32>, Vec<f32>)>,
}

/// The CPU reference's results.
struct Want {
    /// Guided conditional logits (B*n, V).
    logits: Vec<f32>,
    /// Tokens (B, n).
    tokens: Vec<i32>,
    /// (prob, entropy) (B, cells), NaN where no token was placed.
    stats: (Vec<f32>, Vec<f32>),
}

/// Run guided_sample on poisoned outputs and download everything.
fn run(gpu: &Gpu, c: &Launch) -> Out {
    let mut dl = gpu.upload(c.logits).unwrap();
    let dlp = gpu.upload(c.local_pos).unwrap();
    let dgp = gpu.upload(c.global_pos).unwrap();
    let df = c.forced.map(|f| gpu.upload(f).unwrap());
    let mut dg = gpu.upload(&vec![POISON_GRID; c.batch * c.cells]).unwrap();
    let mut dt = gpu.upload(&vec![POISON_TOK; c.batch * c.n]).unwrap();
    let s = c.knobs();
    let nan = vec![f32::NAN; c.batch * c.cells];
    let mut ds = c
        .stats
        .then(|| (gpu.upload(&nan).unwrap(), gpu.upload(&nan).unwrap()));
    let st = ds.as_mut().map(|(p, e)| (p, e));
    let db = c.bias.map(|b| gpu.upload(b).unwrap());
    // Odd seeds pass {seed, image0} through device memory (the CUDA-graph path): the same
    // draws either way.
    let run = (c.seed % 2 == 1).then(|| gpu.upload(&[c.seed, s.image0 as u64]).unwrap());
    guided_sample(
        gpu,
        &s,
        c.n,
        &mut dl,
        &dlp,
        &dgp,
        df.as_ref(),
        &mut dg,
        &mut dt,
        st,
        db.as_ref(),
        run.as_ref(),
    )
    .unwrap();
    Out {
        logits: gpu.download(&dl).unwrap(),
        grid: gpu.download(&dg).unwrap(),
        tokens: gpu.download(&dt).unwrap(),
        stats: ds.map(|(p, e)| (gpu.download(&p).unwrap(), gpu.download(&e).unwrap())),
    }
}

/// The CPU reference of the launch (`cpu::ops::guided_sample`, statistics always on).
fn cpu_step(c: &Launch) -> Want {
    let k = c.knobs();
    let usizes = |v: &[i32]| v.iter().map(|&x| x as usize).collect::<Vec<_>>();
    let forced: Option<Vec<u32>> = c.forced.map(|f| f.iter().map(|&t| t as u32).collect());
    let mut logits = c.logits.to_vec();
    if let Some(b) = c.bias {
        for row in logits.chunks_exact_mut(c.vocab) {
            for (l, &bi) in row.iter_mut().zip(b) {
                *l += bi;
            }
        }
    }
    let mut grid = vec![0u32; c.batch * c.cells];
    let (mut prob, mut entropy) = (vec![f32::NAN; grid.len()], vec![f32::NAN; grid.len()]);
    let toks = cpu_guided_sample(
        &k,
        &mut logits,
        &usizes(c.local_pos),
        &usizes(c.global_pos),
        forced.as_deref(),
        &mut grid,
        Some((&mut prob, &mut entropy)),
    );
    logits.truncate(c.batch * c.n * c.vocab);
    Want {
        logits,
        tokens: toks.iter().map(|&t| t as i32).collect(),
        stats: (prob, entropy),
    }
}

/// The grid holds tokens[b, j] at local_pos[j] and poison everywhere else.
fn check_scatter(c: &Launch, out: &Out) {
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

/// Run on the GPU and check the grid scatter; with the CPU reference's results.
fn run_checked(gpu: &Gpu, c: &Launch) -> (Out, Want) {
    let out = run(gpu, c);
    check_scatter(c, &out);
    (out, cpu_step(c))
}

/// The statistics (the maps' prob and entropy) against `token_stats` on the CPU, at every
/// cell whose token agrees (a different draw has different statistics): relative error
/// <= 1e-6 (both sum in f64; only the order differs), NaN exactly where the CPU has NaN
/// (all -inf rows at T > 0, unwritten cells).
fn check_stats(report: &mut common::Report, label: &str, c: &Launch, out: &Out, w: &Want) {
    let (gp, ge) = out.stats.as_ref().expect("launch recorded statistics");
    let (cp, ce) = &w.stats;
    let (mut worst_p, mut worst_e) = (0.0f64, 0.0f64);
    for b in 0..c.batch {
        for j in 0..c.n {
            if out.tokens[b * c.n + j] != w.tokens[b * c.n + j] {
                continue;
            }
            let cell = b * c.cells + c.local_pos[j] as usize;
            for (g, want, worst) in [
                (gp[cell], cp[cell], &mut worst_p),
                (ge[cell], ce[cell], &mut worst_e),
            ] {
                let err = if g.is_nan() || want.is_nan() {
                    if g.is_nan() == want.is_nan() {
                        0.0
                    } else {
                        f64::INFINITY
                    }
                } else {
                    (g as f64 - want as f64).abs() / (want as f64).abs().max(1e-30)
                };
                *worst = worst.max(err);
            }
        }
    }
    report.check(label, "prob rel err vs token_stats", worst_p, 1e-6);
    report.check(label, "entropy rel err vs token_stats", worst_e, 1e-6);
    let placed: std::collections::HashSet<usize> = (0..c.batch)
        .flat_map(|b| c.local_pos.iter().map(move |&p| b * c.cells + p as usize))
        .collect();
    let stray = (0..gp.len())
        .filter(|i| !(placed.contains(i) || (gp[*i].is_nan() && ge[*i].is_nan())))
        .count();
    report.check(
        label,
        "stat cells written outside the step",
        stray as f64,
        0.5,
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

// ---------------------------------------------------------------------------------------
// The table: launches compared with cpu::ops::guided_sample.

/// How a case's logits are made.
#[derive(Clone, Copy, Debug)]
enum Logits {
    /// Uniform in [-scale, scale), (2B * n, V) (the unconditional half used with cfg).
    Random { seed: u64, scale: f32 },
    /// Multiples of 0.5 (about 9 distinct values), plus special rows: all equal; max only at
    /// the last id; -0 and +0 tied maxima; all -inf; ties at both ends.
    Ties,
}

/// What must agree with the CPU.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Tokens equal; guided logits equal bit for bit; unconditional rows untouched.
    Exact,
    /// Tokens equal on at least this fraction of draws (f32 rounding may move a boundary).
    Agree(f64),
}

#[derive(Clone, Copy, Debug)]
struct Case {
    b: usize,
    n: usize,
    v: usize,
    /// Grid cells beyond n (positions spread over n + extra cells).
    extra_cells: usize,
    cfg: Option<f32>,
    policy: (f32, Option<usize>, Option<f32>),
    logits: Logits,
    forced: bool,
    /// The kernel adds a (V) bias (the CPU gets biased logits).
    bias: bool,
    seed: u64,
    step: u32,
    expect: Expect,
}

const GREEDY: (f32, Option<usize>, Option<f32>) = (0.0, None, None);

/// (a) guidance combine: every shape (B, n, V) with every guidance strength, greedy.
const CFG_SHAPES: &[(usize, usize, usize)] =
    &[(1, 1, 7), (3, 5, 1000), (2, 17, 16384), (1, 3, 513)];
const CFGS: [Option<f32>; 4] = [Some(1.5), Some(0.0), Some(3.25), None];
/// (b) argmax with exact ties: vocabulary sizes.
const TIE_VOCABS: [usize; 6] = [1, 31, 512, 513, 1000, 16384];
/// Draws equal the CPU's for the same uniforms: realistic rows, V = 16384, every row different.
const DRAW_POLICIES: [(f32, Option<usize>, Option<f32>); 4] = [
    (1.0, None, None),
    (0.5, None, None),
    (1.0, Some(100), None),
    (1.0, None, Some(0.9)),
];

/// The table.
fn cases() -> Vec<Case> {
    let base = Case {
        b: 1,
        n: 1,
        v: 1,
        extra_cells: 0,
        cfg: None,
        policy: GREEDY,
        logits: Logits::Random {
            seed: 11,
            scale: 6.0,
        },
        forced: false,
        bias: false,
        seed: 1,
        step: 0,
        expect: Expect::Exact,
    };
    let mut cases = Vec::new();
    for &(b, n, v) in CFG_SHAPES {
        for cfg in CFGS {
            let extra_cells = 4;
            // The head's bias folded into the kernel, with and without guidance.
            let bias = cfg != Some(0.0);
            cases.push(Case {
                b,
                n,
                v,
                extra_cells,
                cfg,
                bias,
                ..base
            });
        }
    }
    for v in TIE_VOCABS {
        let logits = Logits::Ties;
        cases.push(Case {
            b: 3,
            n: 7,
            v,
            logits,
            seed: 5,
            step: 2,
            ..base
        });
    }
    // (e) teacher forcing: forced tokens copied and scattered, guidance still applied.
    for cfg in [Some(2.0), None] {
        let logits = Logits::Random {
            seed: 61,
            scale: 5.0,
        };
        let policy = (1.0, Some(10), Some(0.9));
        let (b, n, v, forced, bias) = (3, 20, 333, true, true);
        cases.push(Case {
            b,
            n,
            v,
            extra_cells: 30,
            cfg,
            policy,
            logits,
            forced,
            bias,
            seed: 4,
            step: 9,
            ..base
        });
    }
    for (i, policy) in DRAW_POLICIES.into_iter().enumerate() {
        let logits = Logits::Random {
            seed: 41,
            scale: 8.0,
        };
        let expect = Expect::Agree(0.999);
        let (b, n, v) = (2, 1024, 16384);
        cases.push(Case {
            b,
            n,
            v,
            policy,
            bias: i % 2 == 0,
            logits,
            seed: 99,
            step: 17,
            expect,
            ..base
        });
    }
    cases
}

fn make_logits(c: &Case) -> Vec<f32> {
    let v = c.v;
    match c.logits {
        // Always 2B rows: without guidance the kernel must not read (or touch) the second half.
        Logits::Random { seed, scale } => rand_vec(2 * c.b * c.n * v, seed, scale),
        Logits::Ties => {
            let mut logits = tied_vec(c.b * c.n * v, 21, 2.0, 0.5);
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
            logits
        }
    }
}

#[test]
fn guided_sample_matches_cpu_ops() {
    let name = "sampling.cu vs cpu::ops::guided_sample";
    common::run_table(name, &cases(), |gpu, report, label, _, c| {
        let cells = c.n + c.extra_cells;
        let (lp, gp): (Vec<i32>, Vec<i32>) = match c.logits {
            // Reversed cells, positions as the RNG counter.
            Logits::Ties => ((0..c.n as i32).rev().collect(), (0..c.n as i32).collect()),
            _ if cells == c.n => ((0..c.n as i32).collect(), (0..c.n as i32).collect()),
            _ => {
                let lp = spread_positions(c.n, cells);
                let gp = lp.iter().map(|&p| p + 100).collect();
                (lp, gp)
            }
        };
        let logits = make_logits(c);
        let bias = rand_vec(c.v, 77, 2.0);
        let forced: Vec<i32> = rand_tokens(c.b * cells, 3, c.v)
            .iter()
            .map(|&t| t as i32)
            .collect();
        let policy = pol(c.policy.0, c.policy.1, c.policy.2);
        let launch = Launch {
            batch: c.b,
            n: c.n,
            vocab: c.v,
            cells,
            cfg: c.cfg,
            policy: &policy,
            seed: c.seed,
            step: c.step,
            logits: &logits,
            local_pos: &lp,
            global_pos: &gp,
            forced: c.forced.then_some(&forced[..]),
            stats: true,
            bias: c.bias.then_some(&bias[..]),
        };
        let (out, w) = run_checked(gpu, &launch);
        let (cond, want) = (&w.logits, &w.tokens);
        check_stats(report, label, &launch, &out, &w);
        let mismatch = out.tokens.iter().zip(want).filter(|(a, b)| a != b).count();
        let frac = mismatch as f64 / want.len() as f64;
        match c.expect {
            Expect::Exact => {
                let bnv = c.b * c.n * c.v;
                let differ = (0..bnv)
                    .filter(|&i| out.logits[i].to_bits() != cond[i].to_bits())
                    .count();
                report.check(label, "guided logits differing in bits", differ as f64, 0.5);
                report.check(label, "tokens differing", mismatch as f64, 0.5);
                assert_eq!(
                    &out.logits[bnv..],
                    &logits[bnv..],
                    "{label}: unconditional rows must not change"
                );
                if let Logits::Ties = c.logits {
                    // With ties the CPU's argmax is the rule itself.
                    let rows = c.b * c.n;
                    let argmaxes: Vec<i32> = (0..rows)
                        .map(|r| argmax(&logits[r * c.v..(r + 1) * c.v]) as i32)
                        .collect();
                    assert_eq!(out.tokens, argmaxes, "{label}: argmax with ties");
                }
                if c.forced {
                    let f: Vec<i32> = (0..c.b)
                        .flat_map(|b| lp.iter().map(move |&p| (b, p)))
                        .map(|(b, p)| forced[b * cells + p as usize])
                        .collect();
                    assert_eq!(out.tokens, f, "{label}: forced tokens copied");
                }
            }
            Expect::Agree(min) => {
                report.check(
                    label,
                    "fraction of tokens differing",
                    frac,
                    1.0 - min + 1e-12,
                );
            }
        }
    });
}

/// Positions per row: fewer on the host emulator, where the full counts take minutes.
fn positions(gpu: &Gpu, on_emu: usize, on_gpu: usize) -> usize {
    if common::on_emu(gpu) { on_emu } else { on_gpu }
}

/// `rows` copies of one logits row.
fn tile(row: &[f32], rows: usize) -> Vec<f32> {
    (0..rows).flat_map(|_| row.iter().copied()).collect()
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
// (c) draws follow softmax(l / T) and equal the CPU's tokens for the same uniforms

#[test]
fn gpu_draws_follow_softmax_and_match_cpu() {
    let gpu = common::gpu("guided_sample draws");
    // Fixed logits, V = 64, every row the same; the position counter varies per draw.
    let v = 64usize;
    let base = rand_vec(v, 31, 3.0);
    // On the host emulator 1024 positions per row instead of 8192 (27 648 draws per
    // temperature instead of 221 184: the chi-square keeps 63 dof with > 400 draws per bin);
    // the full count would take minutes there.
    let (b, n) = (3usize, positions(&gpu, 1024, 8192));
    let logits = tile(&base, b * n);
    let lp: Vec<i32> = (0..n as i32).collect();
    let gp: Vec<i32> = (0..n as i32).map(|j| j * 3 + 1).collect();
    for t in [1.0f32, 0.7, 2.0] {
        let policy = pol(t, None, None);
        let mut counts = vec![0usize; v];
        let (mut total, mut mismatch) = (0usize, 0usize);
        for step in 0..9u32 {
            let c = Launch {
                seed: 1234,
                step,
                ..Launch::unguided(b, n, v, &policy, &logits, &lp, &gp)
            };
            let (out, w) = run_checked(&gpu, &c);
            let want = w.tokens;
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
}

// ---------------------------------------------------------------------------------------
// (d) top-k and top-p

#[test]
fn gpu_top_k_top_p_never_emit_excluded_tokens() {
    let gpu = common::gpu("guided_sample top-k/top-p");
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
    // On the host emulator 8 positions per row instead of 4096 (16 rows per policy, 4 of
    // each logit row kind): the top-k/top-p selection over V = 1000 runs block-wide
    // collectives per kept token, which the emulator's fibers make slow (256 positions still
    // took over 10 minutes there).
    let (b, n) = (2usize, positions(&gpu, 8, 4096));
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
        let c = Launch {
            seed: 77,
            step: 3,
            ..Launch::unguided(b, n, v, policy, &logits, &lp, &gp)
        };
        let (out, w) = run_checked(&gpu, &c);
        let want = w.tokens;
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
    // On the host emulator 1024 positions per row instead of 16384 (4096 draws per policy,
    // still over 100 expected per kept bin): the full count took about 7 minutes there.
    let (b, n) = (4usize, positions(&gpu, 1024, 16384));
    let logits = tile(&small, b * n);
    let lp: Vec<i32> = (0..n as i32).collect();
    for policy in [
        pol(1.0, Some(3), None),
        pol(1.0, None, Some(0.6)),
        pol(0.9, Some(5), Some(0.8)),
    ] {
        let c = Launch {
            seed: 8,
            step: 1,
            ..Launch::unguided(b, n, 8, &policy, &logits, &lp, &lp)
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
