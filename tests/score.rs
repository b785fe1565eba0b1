//! Scoring real images (SPEC.md section 9) on the CPU: the VQ encoder and pyramid codes vs the
//! reference's own (golden/public/score), the teacher-forced losses at 2, 4 and 8 steps per
//! scale, the masked single pass vs the incremental KV-cached pass, and the block-causal
//! property.

mod common;

use checkergen::cpu::sample_tokens;
use checkergen::cpu::score::{ScoreStats, masked_logits, score_codes};
use checkergen::model::Model;
use checkergen::model::file::{load_i64, load_safetensors};
use checkergen::order::Schedule;
use checkergen::pipeline::{SampleOptions, Steps};
use safetensors::SafeTensors;
use std::path::Path;

const Z_REL_TOL: f64 = 1e-4;
const LOSS_REL_TOL: f64 = 1e-4;
const LOGIT_REL_TOL: f64 = 1e-5;

/// A golden model with the encoder: shared + config tensors + encoder_weights.
fn golden_model(g: &Path, cfg_name: &str) -> Model {
    let cfg = common::golden_model_config(&g.join("public").join(cfg_name));
    let mut map = common::golden_tensors(g, cfg_name);
    let (enc, _) = load_safetensors(&g.join("public/score/encoder_weights.safetensors")).unwrap();
    map.extend(enc);
    Model::from_tensors(cfg, &map).unwrap()
}

struct Golden {
    images: Vec<u8>,
    labels: Vec<usize>,
    bytes: Vec<u8>,
}

fn golden_case(g: &Path, cfg_name: &str) -> Golden {
    let bytes = std::fs::read(g.join(format!("public/score/{cfg_name}.safetensors"))).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let images = st.tensor("images_u8").unwrap().data().to_vec();
    let labels = load_i64(&st, "labels")
        .unwrap()
        .1
        .iter()
        .map(|&l| l as usize)
        .collect();
    Golden {
        images,
        labels,
        bytes,
    }
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// Per image, per scale: encoder z within 1e-4 relative, codes equal; returns the codes.
fn check_encoder(model: &Model, gc: &Golden, cfg_name: &str) -> Vec<Vec<u32>> {
    let st = SafeTensors::deserialize(&gc.bytes).unwrap();
    let enc = model.encoder().unwrap();
    let b = gc.labels.len();
    let side = model.config.img_size;
    let e = model.config.code_dim();
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); model.scale_sizes.len()];
    let mut zs: Vec<Vec<f32>> = vec![Vec::new(); model.scale_sizes.len()];
    for img in gc.images.chunks_exact(side * side * 3).take(b) {
        let p = enc.encode_pyramid(img, side, &model.scale_sizes, model.decoder.codebook());
        for si in 0..model.scale_sizes.len() {
            tokens[si].extend(&p.codes[si]);
            zs[si].extend(&p.z[si]);
        }
    }
    let mut worst = 0.0f64;
    for (si, &s) in model.scale_sizes.iter().enumerate() {
        let want_z = common::golden_f32s(&st, &format!("z_s{s}"));
        assert_eq!(want_z.len(), b * e * s * s);
        let (err, _) = common::rel_err(&zs[si], &want_z);
        eprintln!("{cfg_name}: z_s{s} rel err {err:.3e}");
        worst = worst.max(err);
        assert!(err < Z_REL_TOL, "{cfg_name} z_s{s}: rel err {err:.3e}");
        let want: Vec<u32> = load_i64(&st, &format!("q_inds_s{s}"))
            .unwrap()
            .1
            .iter()
            .map(|&t| t as u32)
            .collect();
        let diff = tokens[si].iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "{cfg_name} q_inds_s{s}: {diff} codes differ");
    }
    eprintln!("{cfg_name}: encoder z worst rel err {worst:.3e}; every code equal");
    tokens
}

#[test]
fn encoder_codes_and_losses_match_reference() {
    let Some(g) = common::golden_dir() else {
        return;
    };
    for cfg_name in ["A_ratio2", "C_ratio3"] {
        let model = golden_model(&g, cfg_name);
        let gc = golden_case(&g, cfg_name);
        let st = SafeTensors::deserialize(&gc.bytes).unwrap();
        let tokens = check_encoder(&model, &gc, cfg_name);
        let mut worst = 0.0f64;
        for k in [2usize, 4, 8] {
            let schedule = Schedule::uniform(&model.scale_sizes, k).unwrap();
            let mut stats = ScoreStats::new(&schedule, k);
            score_codes(&model, &gc.labels, &tokens, k, &mut stats).unwrap();
            let one = |name: String| common::golden_f32s(&st, &name)[0] as f64;
            let total = one(format!("loss_total_k{k}"));
            let err = rel(stats.loss_total(), total);
            worst = worst.max(err);
            assert!(
                err < LOSS_REL_TOL,
                "{cfg_name} k={k} loss_total: {} vs {total}",
                stats.loss_total()
            );
            for (si, &s) in model.scale_sizes.iter().enumerate() {
                let want = one(format!("loss_s{s}_k{k}"));
                let got = stats.loss_by_scale()[si];
                let err = rel(got, want);
                worst = worst.max(err);
                assert!(
                    err < LOSS_REL_TOL,
                    "{cfg_name} k={k} loss_s{s}: {got} vs {want}"
                );
                let want = one(format!("top1_s{s}_k{k}"));
                let got = stats.top1_by_scale()[si];
                assert!(
                    (got - want).abs() < 1e-6,
                    "{cfg_name} k={k} top1_s{s}: {got} vs {want}"
                );
            }
        }
        eprintln!("{cfg_name}: losses worst rel err {worst:.3e} (k = 2, 4, 8)");
    }
}

/// The masked single pass gives the same logits as the incremental teacher-forced pipeline.
#[test]
fn masked_pass_equals_incremental_logits() {
    let Some(g) = common::golden_dir() else {
        return;
    };
    for cfg_name in ["A_ratio2", "C_ratio3"] {
        let model = golden_model(&g, cfg_name);
        let cfg = &model.config;
        let v = cfg.codebook_size();
        let labels = vec![1usize, 7];
        let tokens: Vec<Vec<u32>> = model
            .scale_sizes
            .iter()
            .enumerate()
            .map(|(i, s)| common::rand_tokens(labels.len() * s * s, 11 + i as u64, v))
            .collect();
        for k in [2usize, 4, 8] {
            let schedule = Schedule::uniform(&model.scale_sizes, k).unwrap();
            let masked = masked_logits(cfg, &model.weights, &schedule, &labels, &tokens).unwrap();
            let mut o = SampleOptions::new(labels.clone());
            o.cfg = 0.0;
            o.steps = Steps::Uniform(k);
            o.forced_tokens = Some(tokens.clone());
            o.record_logits = true;
            let inc = sample_tokens(cfg, &model.weights, &o).unwrap();
            let n = schedule.total_tokens();
            // Reassemble the incremental logits (per step (B, n_t, V)) in sequence order.
            let mut want = vec![0.0f32; labels.len() * n * v];
            let mut off = 0;
            for (step, l) in schedule.steps.iter().zip(&inc.step_logits) {
                let nt = step.positions.len();
                for b in 0..labels.len() {
                    want[(b * n + off) * v..][..nt * v].copy_from_slice(&l[b * nt * v..][..nt * v]);
                }
                off += nt;
            }
            let (err, _) = common::rel_err(&masked, &want);
            eprintln!("{cfg_name} k={k}: masked vs incremental logits rel err {err:.3e}");
            assert!(err < LOGIT_REL_TOL, "{cfg_name} k={k}: rel err {err:.3e}");
        }
    }
}

/// Changing one code in block j changes no logit of a block <= j (and some later one).
#[test]
fn block_causal_property() {
    let Some(g) = common::golden_dir() else {
        return;
    };
    let model = golden_model(&g, "C_ratio3");
    let cfg = &model.config;
    let v = cfg.codebook_size();
    let labels = vec![3usize];
    let base: Vec<Vec<u32>> = model
        .scale_sizes
        .iter()
        .enumerate()
        .map(|(i, s)| common::rand_tokens(s * s, 40 + i as u64, v))
        .collect();
    let k = 4;
    let schedule = Schedule::uniform(&model.scale_sizes, k).unwrap();
    let l0 = masked_logits(cfg, &model.weights, &schedule, &labels, &base).unwrap();
    // Sequence index -> step, for every position.
    let step_of: Vec<usize> = schedule
        .steps
        .iter()
        .flat_map(|st| std::iter::repeat_n(st.t, st.positions.len()))
        .collect();
    let mut rng = common::Rng::new(5);
    for trial in 0..6 {
        let j = rng.below(schedule.steps.len());
        let st = &schedule.steps[j];
        let p = st.positions[rng.below(st.positions.len())];
        let mut tokens = base.clone();
        let t = &mut tokens[st.scale][p];
        *t = (*t + 1 + rng.below(v - 1) as u32) % v as u32;
        let l1 = masked_logits(cfg, &model.weights, &schedule, &labels, &tokens).unwrap();
        let mut later_changed = false;
        for (i, &si) in step_of.iter().enumerate() {
            let (a, b) = (&l0[i * v..][..v], &l1[i * v..][..v]);
            if si <= j {
                assert_eq!(
                    a, b,
                    "trial {trial}: a code of step {j} changed a logit of step {si}"
                );
            } else if a != b {
                later_changed = true;
            }
        }
        assert!(
            later_changed || j + 1 == schedule.steps.len(),
            "trial {trial}: step {j} changed nothing later"
        );
    }
}
