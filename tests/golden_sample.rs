//! CPU f32 sampler vs the reference's own outputs (../shared/golden): per-step logits under
//! teacher forcing, free-running greedy tokens, and the teacher-forced training forward.

mod common;

use checkergen::cpu::sample_tokens;
use checkergen::model::file::load_i64;
use checkergen::pipeline::{SampleOptions, Steps};
use safetensors::SafeTensors;

/// Relative tolerance on logits, ||ours - ref|| / ||ref|| per step (f32 CPU path).
const LOGIT_REL_TOL: f64 = 1e-4;
/// Greedy tokens must agree wherever the golden top-1/top-2 margin exceeds this.
const MARGIN_TOL: f32 = 1e-3;

struct Case {
    name: &'static str,
    steps: usize,
}

const CASES: [Case; 4] = [
    Case {
        name: "greedy_i",
        steps: 4,
    },
    Case {
        name: "greedy_ii",
        steps: 4,
    },
    Case {
        name: "greedy_iii_steps2",
        steps: 2,
    },
    Case {
        name: "greedy_iii_steps8",
        steps: 8,
    },
];

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let v = st.tensor(name).unwrap();
    v.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn ints(st: &SafeTensors, name: &str) -> Vec<i64> {
    load_i64(st, name).unwrap().1
}

#[test]
fn greedy_cases_match_reference() {
    let Some(g) = common::golden_dir() else {
        return;
    };
    let mut worst_overall = 0.0f64;
    for (cfg_name, ratio) in common::GOLDEN_CONFIGS {
        let (dir, cfg, sizes, w, meta) = common::golden_case(&g, cfg_name, ratio);
        for case in &CASES {
            let bytes = std::fs::read(dir.join(format!("{}.safetensors", case.name))).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let golden_tokens = common::token_pyramid(&st, &sizes, "tokens_s");
            let opts = common::golden_greedy_options(&st, &meta, case.name, case.steps);

            // 1. Teacher-forced by the golden tokens: every step sees the reference's context.
            let mut forced = opts.clone();
            forced.forced_tokens = Some(golden_tokens.clone());
            forced.record_logits = true;
            let out = sample_tokens(&cfg, &w, &forced).unwrap();
            assert_eq!(
                out.step_logits.len(),
                ints(&st, "num_serial_steps")[0] as usize
            );
            let mut worst = 0.0f64;
            let mut worst_abs = 0.0f64;
            for (t, ours) in out.step_logits.iter().enumerate() {
                let reference = f32s(&st, &format!("step{t:03}_logits"));
                let (rel, abs) = common::rel_err(ours, &reference);
                assert!(
                    rel <= LOGIT_REL_TOL,
                    "{cfg_name} {} step {t}: logits rel err {rel:.3e} > {LOGIT_REL_TOL:e}",
                    case.name
                );
                worst = worst.max(rel);
                worst_abs = worst_abs.max(abs);
            }
            worst_overall = worst_overall.max(worst);

            // 2. Free-running greedy: tokens equal wherever the margin is clear.
            let free = sample_tokens(&cfg, &w, &opts).unwrap();
            let mut below = 0;
            let mut compared = 0;
            for (k, s) in sizes.iter().enumerate() {
                let margins = f32s(&st, &format!("margin_s{s}"));
                for (i, (&ours, &theirs)) in
                    free.tokens[k].iter().zip(&golden_tokens[k]).enumerate()
                {
                    if margins[i] <= MARGIN_TOL {
                        below += 1;
                        continue;
                    }
                    compared += 1;
                    assert_eq!(
                        ours, theirs,
                        "{cfg_name} {} scale {s} cell {i}: token {ours} != reference {theirs} \
                         (margin {})",
                        case.name, margins[i]
                    );
                }
            }
            println!(
                "{cfg_name} {:<18} steps {:>2}: logits worst rel {worst:.2e} (max abs {worst_abs:.2e}); \
                 greedy tokens equal at {compared} positions, {below} below margin {MARGIN_TOL:e}",
                case.name,
                out.step_logits.len()
            );
        }
    }
    println!("worst per-step logits relative error over all cases: {worst_overall:.3e}");
}

#[test]
fn teacher_forced_forward_matches_reference() {
    let Some(g) = common::golden_dir() else {
        return;
    };
    for (cfg_name, ratio) in common::GOLDEN_CONFIGS {
        let (dir, cfg, sizes, w, _) = common::golden_case(&g, cfg_name, ratio);
        let n_tokens: usize = sizes.iter().map(|s| s * s).sum();
        let bytes = std::fs::read(dir.join("teacher_forced.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let labels: Vec<usize> = ints(&st, "labels").iter().map(|&l| l as usize).collect();
        let q = common::token_pyramid(&st, &sizes, "q_inds_s");
        let mut opts = SampleOptions::new(labels);
        opts.cfg = 0.0;
        opts.steps = Steps::Uniform(4);
        opts.forced_tokens = Some(q);
        opts.record_logits = true;
        let out = sample_tokens(&cfg, &w, &opts).unwrap();
        // Reassemble (B, N, V) in sequence order from the per-step (B, n_t, V) logits.
        let v = cfg.codebook_size();
        let b = 2;
        let mut seq = vec![Vec::new(); b];
        for l in &out.step_logits {
            let n = l.len() / (b * v);
            for (bi, s) in seq.iter_mut().enumerate() {
                s.extend_from_slice(&l[bi * n * v..(bi + 1) * n * v]);
            }
        }
        let ours: Vec<f32> = seq.concat();
        let reference = f32s(&st, "logits");
        let (rel, abs) = common::rel_err(&ours, &reference);
        // Sequence positions agree with the schedule.
        let positions: Vec<i64> = out
            .schedule
            .steps
            .iter()
            .flat_map(|s| out.schedule.global_positions(s))
            .map(|p| p as i64)
            .collect();
        assert_eq!(positions, ints(&st, "seq_positions"));
        // Cross entropy of the targets, as the reference's loss.
        let targets = ints(&st, "seq_targets");
        let n = n_tokens;
        let mut ce = 0.0f64;
        for i in 0..b * n {
            let row = &ours[i * v..(i + 1) * v];
            let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            ce += lse - row[targets[i] as usize] as f64;
        }
        ce /= (b * n) as f64;
        let loss = f32s(&st, "loss")[0] as f64;
        println!(
            "{cfg_name}: teacher-forced logits rel err {rel:.2e} (max abs {abs:.2e}); \
             loss {ce:.6} vs reference {loss:.6}"
        );
        assert!(rel <= LOGIT_REL_TOL, "{cfg_name}: rel err {rel}");
        assert!(
            ((ce - loss) / loss).abs() < 1e-5,
            "{cfg_name}: loss {ce} vs {loss}"
        );
    }
}

/// 8x8 average pooling of (B, 3, H, W) images, as F.avg_pool2d(img, 8).
fn avgpool8(img: &[f32], b: usize, side: usize) -> Vec<f32> {
    let o = side / 8;
    let mut out = vec![0.0f32; b * 3 * o * o];
    for p in 0..b * 3 {
        for y in 0..o {
            for x in 0..o {
                let mut s = 0.0f32;
                for dy in 0..8 {
                    for dx in 0..8 {
                        s += img[p * side * side + (y * 8 + dy) * side + x * 8 + dx];
                    }
                }
                out[p * o * o + y * o + x] = s / 64.0;
            }
        }
    }
    out
}

/// Decoded images of every scale of every greedy case (from the reference's tokens) match
/// the images `sample()` returned: full images for s <= 5, avg-pool and 32x32 crop above.
#[test]
fn greedy_case_images_match_reference() {
    let Some(g) = common::golden_dir() else {
        return;
    };
    const IMAGE_ABS_TOL: f64 = 2e-3;
    let mut worst = 0.0f64;
    for (cfg_name, _) in common::GOLDEN_CONFIGS {
        let dir = g.join("public").join(cfg_name);
        let cfg = common::golden_model_config(&dir);
        let map = common::golden_tensors(&g, cfg_name);
        let model = checkergen::model::Model::from_tensors(cfg, &map).unwrap();
        for case in &CASES {
            let bytes = std::fs::read(dir.join(format!("{}.safetensors", case.name))).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let b = ints(&st, "labels").len();
            for &s in &model.scale_sizes {
                let toks: Vec<u32> = ints(&st, &format!("tokens_s{s}"))
                    .iter()
                    .map(|&t| t as u32)
                    .collect();
                let img = model.decoder.decode_tokens(&toks, b, s);
                let side = 16 * s;
                let pairs: Vec<(Vec<f32>, Vec<f32>)> = if s <= 5 {
                    vec![(img, f32s(&st, &format!("image_s{s}")))]
                } else {
                    let crop: Vec<f32> = (0..b * 3)
                        .flat_map(|p| {
                            let img = &img;
                            (0..32).flat_map(move |y| {
                                let r = p * side * side + y * side;
                                img[r..r + 32].to_vec()
                            })
                        })
                        .collect();
                    vec![
                        (
                            avgpool8(&img, b, side),
                            f32s(&st, &format!("image_s{s}_avgpool8")),
                        ),
                        (crop, f32s(&st, &format!("image_s{s}_crop32"))),
                    ]
                };
                for (ours, reference) in pairs {
                    let (_, abs) = common::rel_err(&ours, &reference);
                    assert!(
                        abs <= IMAGE_ABS_TOL,
                        "{cfg_name} {} s={s}: image max abs err {abs:.2e}",
                        case.name
                    );
                    worst = worst.max(abs);
                }
            }
        }
    }
    println!("decoded images of all greedy cases, all scales: worst max abs error {worst:.2e}");
}
