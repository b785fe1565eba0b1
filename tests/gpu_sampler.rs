//! The GPU sampler end to end (`GpuBackend` through `pipeline::sample`): golden greedy cases
//! (token agreement rate at clear margins, teacher-forced logits), GPU vs CPU logits on a
//! head_dim-64 model, buffer reuse. Runs on the GPU, or the host
//! emulator without one.
#![cfg(feature = "cuda")]

mod common;

use checkergen::cpu::CpuBackend;
use checkergen::cuda::engine::{GpuBackend, GpuModel};
use checkergen::model::Model;
use checkergen::model::config::{ModelConfig, preset};
use checkergen::model::file::load_i64;
use checkergen::model::init::random_tensors;
use checkergen::pipeline::{self, SampleOptions, Samples, Steps};
use checkergen::sampling::TokenPolicy;
use safetensors::SafeTensors;

/// GPU.md: greedy agreement with the f32 golden tokens at positions whose golden top-1/top-2
/// margin exceeds 0.05 must be above 98 % (`common::greedy_gate`).
const AGREEMENT_MARGIN: f32 = 0.05;
/// bf16 storage with f32 accumulation: relative logits error bound.
const LOGIT_REL_TOL: f64 = 2e-2;

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    common::golden_f32s(st, name)
}

fn sample_gpu(gm: &GpuModel, o: &SampleOptions) -> Samples {
    pipeline::sample(&mut GpuBackend::new(gm), o).unwrap()
}

/// Token pyramids (and recorded logits) only: the golden greedy test compares no pixels
/// (tests/gpu_decoder.rs checks the decoder on the golden images).
fn tokens_gpu(gm: &GpuModel, o: &SampleOptions) -> pipeline::TokenOutput {
    pipeline::run_steps(&mut GpuBackend::new(gm), o).unwrap()
}

fn sample_cpu(model: &Model, o: &SampleOptions) -> Samples {
    pipeline::sample(&mut CpuBackend::new(model), o).unwrap()
}

/// softmax in f64.
fn softmax64(l: &[f32]) -> Vec<f64> {
    let m = l.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) as f64;
    let w: Vec<f64> = l.iter().map(|&x| (x as f64 - m).exp()).collect();
    let z: f64 = w.iter().sum();
    w.iter().map(|x| x / z).collect()
}

/// The maps' statistics recorded on the GPU at T = 1, cell by cell: they must equal
/// token_stats of the GPU's own logits (the engine's plumbing: which cell, scale and row;
/// relative error <= 1e-5), and token_stats of reference logits within what the row's logits
/// error d = max |l_gpu - l_ref| allows: ln p moves by at most 2d, so
/// |p - p_ref| <= p_ref (e^(2d) - 1); the entropy moves by d * E_p|ln p + H| to first
/// order (held to twice that). Reports each as a fraction of its bound.
#[derive(Default)]
struct StatErrors {
    own: f64,
    prob: f64,
    entropy: f64,
    cells: usize,
}

impl StatErrors {
    fn add(&mut self, row: &[f32], reference: &[f32], tok: usize, got: (f32, f32)) {
        use checkergen::sampling::token_stats;
        let (p, h) = token_stats(row, 1.0, tok);
        let rel = |a: f32, b: f32| ((a - b) / b.abs().max(1e-30)).abs() as f64;
        self.own = self.own.max(rel(got.0, p)).max(rel(got.1, h));
        let (rp, rh) = token_stats(reference, 1.0, tok);
        let (rp, rh) = (rp as f64, rh as f64);
        let d = row
            .iter()
            .zip(reference)
            .map(|(a, c)| (a - c).abs() as f64)
            .fold(0.0, f64::max);
        let spread: f64 = softmax64(reference)
            .iter()
            .map(|&q| q * ((q + 1e-300).ln() + rh).abs())
            .sum();
        let bound_p = rp * ((2.0 * d).exp() - 1.0) + 1e-7;
        let bound_h = 2.0 * d * spread + 1e-6;
        self.prob = self.prob.max((got.0 as f64 - rp).abs() / bound_p);
        self.entropy = self.entropy.max((got.1 as f64 - rh).abs() / bound_h);
        self.cells += 1;
    }

    fn check(&self) {
        assert!(self.cells > 0, "no cells compared");
        assert!(
            self.own <= 1e-5,
            "stats vs the GPU's own logits: rel {}",
            self.own
        );
        assert!(self.prob <= 1.0, "prob beyond its bound: {}", self.prob);
        assert!(
            self.entropy <= 1.0,
            "entropy beyond its bound: {}",
            self.entropy
        );
    }
}

impl std::fmt::Display for StatErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "{} cells; vs token_stats(GPU logits) worst rel {:.2e}; vs the reference, worst \
             fraction of the bound from the logits error: prob {:.2}, entropy {:.2}",
            self.cells, self.own, self.prob, self.entropy
        )
    }
}

fn greedy(labels: Vec<usize>, cfg: f32, start: usize, steps: usize) -> SampleOptions {
    let mut o = SampleOptions::new(labels);
    o.cfg = cfg;
    o.cfg_start_step = start;
    o.steps = Steps::Uniform(steps);
    o.policy = TokenPolicy {
        temperature: 0.0,
        top_k: None,
        top_p: None,
    };
    o
}

#[test]
fn golden_greedy_cases_on_gpu() {
    let gpu = common::gpu("gpu golden greedy");
    let g = common::golden_dir_required();
    let all_cases = [
        ("greedy_i", 4usize),
        ("greedy_ii", 4),
        ("greedy_iii_steps2", 2),
        ("greedy_iii_steps8", 8),
    ];
    // On the host emulator one case per configuration (the 2-steps-per-scale one, free
    // running and teacher-forced, with the GPU decoder): the four take many minutes there.
    let cases: &[(&str, usize)] = if gpu.is_emu() {
        &all_cases[2..3]
    } else {
        &all_cases
    };
    let gm_name = gpu.name.clone();
    let mut gpu_slot = Some(gpu);
    let (mut agree, mut total) = (0usize, 0usize);
    let (mut tf_agree, mut tf_total) = (0usize, 0usize);
    let mut worst_rel = 0.0f64;
    for (cfg_name, _) in common::GOLDEN_CONFIGS {
        let dir = g.join("public").join(cfg_name);
        let cfg = common::golden_model_config(&dir);
        let model = Model::from_tensors(cfg, &common::golden_tensors(&g, cfg_name)).unwrap();
        let gpu = gpu_slot
            .take()
            .unwrap_or_else(|| common::gpu("gpu golden greedy"));
        let gm = GpuModel::new(gpu, &model).unwrap();
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        for &(case, k) in cases {
            let bytes = std::fs::read(dir.join(format!("{case}.safetensors"))).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let cm = &meta["cases"][case]["case"];
            let labels: Vec<usize> = load_i64(&st, "labels")
                .unwrap()
                .1
                .iter()
                .map(|&l| l as usize)
                .collect();
            let opts = greedy(
                labels,
                cm["cfg"].as_f64().unwrap() as f32,
                cm["cfg_start_step"].as_u64().unwrap() as usize,
                k,
            );
            // Free-running greedy on the GPU.
            let out = tokens_gpu(&gm, &opts);
            let (mut a, mut n) = (0, 0);
            for (si, &s) in model.scale_sizes.iter().enumerate() {
                let gold = load_i64(&st, &format!("tokens_s{s}")).unwrap().1;
                let margins = f32s(&st, &format!("margin_s{s}"));
                for (i, &t) in out.tokens[si].iter().enumerate() {
                    if margins[i] > AGREEMENT_MARGIN {
                        n += 1;
                        a += (t as i64 == gold[i]) as usize;
                    }
                }
            }
            // Teacher-forced logits against the golden per-step logits.
            let mut forced = opts.clone();
            forced.forced_tokens = Some(common::token_pyramid(&st, &model.scale_sizes, "tokens_s"));
            forced.record_logits = true;
            // At T = 1 (forced tokens ignore the policy) the maps' statistics are recorded too.
            forced.policy.temperature = 1.0;
            forced.record_stats = true;
            let tf = tokens_gpu(&gm, &forced);
            let mut case_worst = 0.0f64;
            // Teacher-forced argmax against the golden token at margins above the gate: the
            // same prefix as the golden run, so bf16 storage moves only near-ties here, while
            // free-running greedy (above) also counts the cascade after any near-tie flip.
            let b = opts.labels.len();
            let v = model.config.codebook_size();
            let (tfa, tfn) = common::teacher_forced_agreement(
                &st,
                &model.scale_sizes,
                &tf,
                b,
                v,
                AGREEMENT_MARGIN,
            );
            for (t, l) in tf.step_logits.iter().enumerate() {
                let (rel, _) = common::rel_err(l, &f32s(&st, &format!("step{t:03}_logits")));
                assert!(
                    l.iter().all(|v| v.is_finite()),
                    "{cfg_name} {case} step {t}: NaN logits"
                );
                case_worst = case_worst.max(rel);
            }
            // The statistics against token_stats of the golden logits, within the bound the
            // logits error implies ([`stat_errors`]).
            let gst = tf.stats.as_ref().expect("stats recorded");
            let mut se = StatErrors::default();
            for (step, l) in tf.schedule.steps.iter().zip(&tf.step_logits) {
                let golden = f32s(&st, &format!("step{:03}_logits", step.t));
                let s = model.scale_sizes[step.scale];
                let n = step.positions.len();
                for bi in 0..b {
                    for (j, &p) in step.positions.iter().enumerate() {
                        let r = (bi * n + j) * v..(bi * n + j + 1) * v;
                        let cell = bi * s * s + p;
                        let tok = tf.tokens[step.scale][cell] as usize;
                        let got = (gst.prob[step.scale][cell], gst.entropy[step.scale][cell]);
                        se.add(&l[r.clone()], &golden[r], tok, got);
                    }
                }
            }
            println!("{cfg_name} {case:<18}: stats at T=1 vs the golden logits: {se}");
            se.check();
            println!(
                "{cfg_name} {case:<18}: greedy agreement {a}/{n} ({:.2} %) free-running, {tfa}/{tfn} \
                 ({:.2} %) teacher-forced, at margin > {AGREEMENT_MARGIN}; teacher-forced logits worst \
                 rel {case_worst:.2e}",
                100.0 * a as f64 / n.max(1) as f64,
                100.0 * tfa as f64 / tfn.max(1) as f64
            );
            tf_agree += tfa;
            tf_total += tfn;
            assert!(
                case_worst < LOGIT_REL_TOL,
                "{cfg_name} {case}: logits rel {case_worst}"
            );
            worst_rel = worst_rel.max(case_worst);
            agree += a;
            total += n;
        }
    }
    common::greedy_gate(
        &format!("GPU ({gm_name})"),
        (tf_agree, tf_total),
        (agree, total),
        &format!("worst logits rel {worst_rel:.2e}"),
    );
}

/// A head_dim-64 model (as the released L models) with random weights: GPU teacher-forced
/// logits against the CPU's, odd batch, guidance, a ratio-3 pyramid (remainder blocks).
#[test]
fn gpu_logits_match_cpu_head_dim_64() {
    let gpu = common::gpu("gpu vs cpu logits (D=64)");
    let cfg = ModelConfig {
        hidden_size: 256,
        num_heads: 4,
        num_layers: 3,
        ffn_dim: 768,
        scale_ratio: 3.0,
        ..preset("tiny").unwrap()
    };
    let model = Model::from_tensors(cfg.clone(), &random_tensors(&cfg, 11).unwrap()).unwrap();
    let gm = GpuModel::new(gpu, &model).unwrap();
    for (labels, cfg_scale, steps) in [
        (vec![3usize], 0.0f32, 4usize),
        (vec![1, 4, 9], 1.5, 4),
        (vec![0, 2, 5, 7, 8], 2.0, 2),
    ] {
        let mut o = greedy(labels.clone(), cfg_scale, 2, steps);
        let cpu = sample_cpu(&model, &o);
        o.forced_tokens = Some(cpu.tokens.tokens.clone());
        o.record_logits = true;
        let cpu_l = checkergen::cpu::sample_tokens(&model.config, &model.weights, &o).unwrap();
        let gpu_l = tokens_gpu(&gm, &o);
        let mut worst = 0.0f64;
        for (a, b) in gpu_l.step_logits.iter().zip(&cpu_l.step_logits) {
            let (rel, _) = common::rel_err(a, b);
            worst = worst.max(rel);
        }
        println!(
            "D=64 labels {labels:?} cfg {cfg_scale} steps {steps}: GPU vs CPU logits worst rel {worst:.2e}"
        );
        assert!(worst < LOGIT_REL_TOL, "rel {worst}");
        // Forced tokens come back unchanged.
        assert_eq!(gpu_l.tokens, cpu.tokens.tokens);

        // The maps' statistics at T = 1 on the same forced tokens ([`StatErrors`]); the CPU's
        // are token_stats of its own logits.
        o.policy.temperature = 1.0;
        o.record_stats = true;
        let gpu_s = tokens_gpu(&gm, &o);
        let cpu_s = checkergen::cpu::sample_tokens(&model.config, &model.weights, &o).unwrap();
        let (gst, cst) = (gpu_s.stats.as_ref().unwrap(), cpu_s.stats.as_ref().unwrap());
        let v = model.config.codebook_size();
        let b = labels.len();
        let mut se = StatErrors::default();
        let steps = gpu_s.schedule.steps.iter();
        for ((step, l), lc) in steps.zip(&gpu_s.step_logits).zip(&cpu_s.step_logits) {
            let cells = gpu_s.schedule.scales[step.scale].tokens;
            let n = step.positions.len();
            for bi in 0..b {
                for (j, &pos) in step.positions.iter().enumerate() {
                    let cell = bi * cells + pos;
                    let r = (bi * n + j) * v..(bi * n + j + 1) * v;
                    let tok = gpu_s.tokens[step.scale][cell] as usize;
                    let got = (gst.prob[step.scale][cell], gst.entropy[step.scale][cell]);
                    se.add(&l[r.clone()], &lc[r], tok, got);
                    let want = (cst.prob[step.scale][cell], cst.entropy[step.scale][cell]);
                    assert_eq!(
                        want,
                        checkergen::sampling::token_stats(&lc[(bi * n + j) * v..][..v], 1.0, tok)
                    );
                }
            }
        }
        println!("  stats at T=1 vs the CPU's logits: {se}");
        se.check();
    }
}

/// Buffers are reused between batches of the same shape: a batch, another shape, then the
/// first again with the same seed give identical tokens and pixels; T > 0 draws agree with
/// the CPU's for the same seed except at float-rounding boundaries.
#[test]
fn gpu_batches_reuse_buffers_and_agree_with_cpu_draws() {
    let gpu = common::gpu("gpu batch reuse");
    // On the host emulator 64 px images (scales 1, 2, 4) instead of 256 px: decoding three
    // 256 px images takes minutes there.
    let cfg = ModelConfig {
        img_size: if common::on_emu(&gpu) { 64 } else { 256 },
        ..preset("tiny").unwrap()
    };
    let model = Model::from_tensors(cfg.clone(), &random_tensors(&cfg, 5).unwrap()).unwrap();
    let gm = GpuModel::new(gpu, &model).unwrap();
    let mut o = SampleOptions::new(vec![1, 2, 3]);
    o.cfg = 1.5;
    o.seed = 77;
    let a = sample_gpu(&gm, &o);
    let mut other = o.clone();
    other.labels = vec![4];
    other.steps = Steps::Uniform(2);
    sample_gpu(&gm, &other);
    let b = sample_gpu(&gm, &o);
    assert_eq!(a.tokens.tokens, b.tokens.tokens);
    assert_eq!(a.pixels, b.pixels);
    // Same seed on the CPU: the first scales' draws see near-identical logits.
    let cpu = sample_cpu(&model, &o);
    let first = &cpu.tokens.tokens[..3];
    let same = first
        .iter()
        .flatten()
        .zip(a.tokens.tokens[..3].iter().flatten())
        .filter(|(x, y)| x == y)
        .count();
    let total = first.iter().map(|g| g.len()).sum::<usize>();
    println!(
        "T=1 draws, scales 1..4: GPU equals CPU at {same}/{total} cells (bf16 logits move a few boundaries)"
    );
    // 8-bit pixels from the GPU decoder against the CPU decoder on the same tokens.
    let cpu_px = checkergen::cpu::ops::pixels(&model.decoder.decode_tokens(
        a.tokens.tokens.last().unwrap(),
        3,
        *model.scale_sizes.last().unwrap(),
    ));
    let close = cpu_px
        .iter()
        .zip(&a.pixels)
        .filter(|(x, y)| (**x as i32 - **y as i32).abs() <= 2)
        .count();
    println!(
        "GPU decoder pixels within 2 levels of the CPU decoder: {close}/{}",
        cpu_px.len()
    );
    assert!(close as f64 > 0.99 * cpu_px.len() as f64);
}
