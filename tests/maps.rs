//! Per-cell sampling statistics (step, chosen-token probability, entropy) against the
//! reference's own maps and against the values implied by its per-step logits, and the
//! pictures of `sample --maps` / `--pyramid` at their documented sizes.

mod common;

use checkergen::cpu::sample_tokens;
use checkergen::io::image::GRID_PAD;
use checkergen::io::maps::{maps_size, panel_size};
use checkergen::model::file::load_i64;
use checkergen::order::scale_sizes;
use checkergen::pipeline::{SampleOptions, Steps};
use checkergen::sampling::{TokenPolicy, token_stats};
use safetensors::SafeTensors;
use std::process::Command;

/// Probability and entropy are functions of the logits, which match the reference to ~1e-6
/// relative (norm) and ~5e-5 absolute at worst: the maps are held to 1e-5 relative error
/// (||ours - ref|| / ||ref|| over each case's map, as the logits), and the worst single cell
/// is printed.
const STAT_TOL: f64 = 1e-5;

const CASES: [(&str, usize); 4] = [
    ("greedy_i", 4),
    ("greedy_ii", 4),
    ("greedy_iii_steps2", 2),
    ("greedy_iii_steps8", 8),
];

fn ints(st: &SafeTensors, name: &str) -> Vec<i64> {
    load_i64(st, name).unwrap().1
}

fn options(st: &SafeTensors, meta: &serde_json::Value, case: &str, steps: usize) -> SampleOptions {
    let cm = &meta["cases"][case]["case"];
    let labels = ints(st, "labels").iter().map(|&l| l as usize).collect();
    let mut o = SampleOptions::new(labels);
    o.cfg = cm["cfg"].as_f64().unwrap() as f32;
    o.cfg_start_step = cm["cfg_start_step"].as_u64().unwrap() as usize;
    o.steps = Steps::Uniform(steps);
    o.record_stats = true;
    o
}

/// Greedy runs: our step maps equal the reference's selection_ts maps, and its value_prob
/// and entropy maps (one-hot distributions at T = 0) equal ours.
#[test]
fn greedy_maps_match_reference() {
    let g = common::golden_dir_required();
    let mut worst = 0.0f64;
    for (cfg_name, ratio) in common::GOLDEN_CONFIGS {
        let (dir, cfg, sizes, w, meta) = common::golden_case(&g, cfg_name, ratio);
        for (case, steps) in CASES {
            let bytes = std::fs::read(dir.join(format!("{case}.safetensors"))).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let mut o = options(&st, &meta, case, steps);
            o.policy = TokenPolicy {
                temperature: 0.0,
                top_k: None,
                top_p: None,
            };
            let out = sample_tokens(&cfg, &w, &o).unwrap();
            let stats = out.stats.as_ref().unwrap();
            let b = o.labels.len();
            for (k, &s) in sizes.iter().enumerate() {
                let ts = ints(&st, &format!("selection_ts_s{s}"));
                for bi in 0..b {
                    let ours: Vec<i64> = stats.step[k].iter().map(|&t| t as i64).collect();
                    assert_eq!(
                        ours,
                        ts[bi * s * s..(bi + 1) * s * s],
                        "{cfg_name} {case} s={s}"
                    );
                }
                let vp = common::golden_f32s(&st, &format!("value_prob_s{s}"));
                let ent = common::golden_f32s(&st, &format!("entropy_s{s}"));
                for i in 0..b * s * s {
                    worst = worst.max((stats.prob[k][i] - vp[i]).abs() as f64);
                    worst = worst.max((stats.entropy[k][i] - ent[i]).abs() as f64);
                }
            }
        }
    }
    println!("greedy value_prob / entropy maps vs reference: worst abs diff {worst:.2e}");
    assert!(worst <= STAT_TOL, "{worst}");
}

/// Teacher-forced by the golden tokens at T = 1 and 0.7: every recorded probability and
/// entropy equals `token_stats` of the reference's own logits for that step and position.
#[test]
fn stats_follow_reference_logits() {
    let g = common::golden_dir_required();
    let (mut worst_rel, mut worst_cell) = ((0.0f64, 0.0f64), (0.0f64, 0.0f64));
    for (cfg_name, ratio) in common::GOLDEN_CONFIGS {
        let (dir, cfg, sizes, w, meta) = common::golden_case(&g, cfg_name, ratio);
        let v = cfg.codebook_size();
        for (case, steps) in CASES.iter().take(2) {
            let bytes = std::fs::read(dir.join(format!("{case}.safetensors"))).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let golden = common::token_pyramid(&st, &sizes, "tokens_s");
            for temperature in [1.0f32, 0.7] {
                let mut o = options(&st, &meta, case, *steps);
                o.policy = TokenPolicy {
                    temperature,
                    top_k: None,
                    top_p: None,
                };
                o.forced_tokens = Some(golden.clone());
                let out = sample_tokens(&cfg, &w, &o).unwrap();
                let stats = out.stats.as_ref().unwrap();
                let b = o.labels.len();
                // Expected maps, per scale (B, s, s), from the reference's logits.
                let mut want_p: Vec<Vec<f32>> =
                    sizes.iter().map(|s| vec![0.0; b * s * s]).collect();
                let mut want_h = want_p.clone();
                for step in &out.schedule.steps {
                    let logits = common::golden_f32s(&st, &format!("step{:03}_logits", step.t));
                    let (k, s) = (step.scale, sizes[step.scale]);
                    let np = step.positions.len();
                    for bi in 0..b {
                        for (j, &p) in step.positions.iter().enumerate() {
                            let row = &logits[(bi * np + j) * v..(bi * np + j + 1) * v];
                            let cell = bi * s * s + p;
                            let tok = golden[k][cell] as usize;
                            (want_p[k][cell], want_h[k][cell]) = token_stats(row, temperature, tok);
                        }
                    }
                }
                let ours_p: Vec<f32> = stats.prob.concat();
                let ours_h: Vec<f32> = stats.entropy.concat();
                let (rp, ap) = common::rel_err(&ours_p, &want_p.concat());
                let (rh, ah) = common::rel_err(&ours_h, &want_h.concat());
                println!(
                    "{cfg_name} {case} T={temperature}: prob rel {rp:.2e} (max abs {ap:.2e}), \
                     entropy rel {rh:.2e} (max abs {ah:.2e})"
                );
                worst_rel = (worst_rel.0.max(rp), worst_rel.1.max(rh));
                worst_cell = (worst_cell.0.max(ap), worst_cell.1.max(ah));
            }
        }
    }
    println!(
        "stats vs token_stats(reference logits): worst rel prob {:.2e}, entropy {:.2e}; \
         worst cell abs prob {:.2e}, entropy {:.2e}",
        worst_rel.0, worst_rel.1, worst_cell.0, worst_cell.1
    );
    assert!(
        worst_rel.0 <= STAT_TOL && worst_rel.1 <= STAT_TOL,
        "{worst_rel:?}"
    );
}

fn png_size(path: &std::path::Path) -> (usize, usize) {
    let d = std::fs::read(path).unwrap();
    assert_eq!(&d[1..4], b"PNG", "{}", path.display());
    let be = |o: usize| u32::from_be_bytes(d[o..o + 4].try_into().unwrap()) as usize;
    (be(16), be(20))
}

/// The tiny preset's pictures have the documented sizes, and the tokens file holds the
/// statistics.
#[test]
fn maps_and_pyramid_pictures_have_documented_sizes() {
    let out = std::env::temp_dir().join(format!("checkergen-maps-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new(env!("CARGO_BIN_EXE_checkergen"))
        .args([
            "sample",
            "--num-samples",
            "3",
            "--maps",
            "--pyramid",
            "--save-tokens",
        ])
        .args(["--device", "cpu", "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let cfg = checkergen::model::config::preset("tiny").unwrap();
    let sizes = scale_sizes(cfg.latent_size(), cfg.scale_ratio, cfg.scale_min_size).unwrap();
    let stride = cfg.decoder.stride();
    let (pw, ph) = panel_size(&sizes, stride);
    for i in 0..3 {
        assert_eq!(
            png_size(&out.join(format!("sample_{i:04}_maps.png"))),
            maps_size(pw, ph)
        );
        assert_eq!(
            png_size(&out.join(format!("sample_{i:04}_pyramid.png"))),
            (pw, ph)
        );
    }
    // 3 images: floor(sqrt(3)) = 1 per row, 2 px padding around each.
    let side = cfg.img_size;
    assert_eq!(
        png_size(&out.join("grid.png")),
        (side + 2 * GRID_PAD, 3 * (side + GRID_PAD) + GRID_PAD)
    );
    let bytes = std::fs::read(out.join("tokens.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for (k, &s) in sizes.iter().enumerate() {
        for name in ["scale", "prob", "entropy", "step"] {
            let t = st.tensor(&format!("{name}_{k}")).unwrap();
            assert_eq!(t.shape(), [3, s, s], "{name}_{k}");
        }
        let p = common::golden_f32s(&st, &format!("prob_{k}"));
        assert!(
            p.iter().all(|&x| x > 0.0 && x <= 1.0),
            "prob_{k} outside (0, 1]"
        );
    }
    std::fs::remove_dir_all(&out).unwrap();
}
