//! Scoring real images (SPEC.md section 9) on the CPU: the VQ encoder and pyramid codes vs the
//! reference's own (golden/public/score), the teacher-forced losses at 2, 4 and 8 steps per
//! scale, the masked single pass vs the incremental KV-cached pass, and the block-causal
//! property.

mod common;

use checkergen::cpu::sample_tokens;
use checkergen::cpu::score::{masked_logits, score_codes};
use checkergen::model::Model;
use checkergen::model::file::load_i64;
use checkergen::order::Schedule;
use checkergen::pipeline::{SampleOptions, Steps};
use checkergen::score::ScoreStats;
use safetensors::SafeTensors;
use std::path::Path;

const Z_REL_TOL: f64 = 1e-4;
const LOSS_REL_TOL: f64 = 1e-4;
const LOGIT_REL_TOL: f64 = 1e-5;

/// A golden model with the encoder: shared + config tensors + encoder_weights.
fn golden_model(g: &Path, cfg_name: &str) -> Model {
    common::golden_model_with_encoder(g, cfg_name)
}

/// Both scoring configurations' golden models (with the encoder) and the golden folder;
/// none when the folder is absent (`golden_dir` says so loudly; CI requires it).
fn score_models() -> Vec<(std::path::PathBuf, &'static str, Model)> {
    let Some(g) = common::golden_dir() else {
        return Vec::new();
    };
    ["A_ratio2", "C_ratio3"]
        .into_iter()
        .map(|c| (g.clone(), c, golden_model(&g, c)))
        .collect()
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
    for (g, cfg_name, model) in score_models() {
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
    for (_, cfg_name, model) in score_models() {
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

// ---------------------------------------------------------------------------------------------
// The commands: encode -> decode, score --json, and bad input in one line.

use checkergen::model::config::preset;
use checkergen::model::file::{Dtype, write_model};
use checkergen::model::init::random_tensors;
use std::path::PathBuf;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cg-score-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// The tiny preset as a model file, with or without the encoder.
fn tiny_file(name: &str, encoder: bool) -> PathBuf {
    let cfg = preset("tiny").unwrap();
    let mut map = random_tensors(&cfg, 1).unwrap();
    if !encoder {
        map.retain(|k, _| !checkergen::model::is_encoder_tensor(k));
    }
    let p = tmp(name);
    write_model(&p, &cfg, &map, Dtype::F32, &[]).unwrap();
    p
}

/// A smooth RGB test picture `w x h`.
fn picture(name: &str, w: usize, h: usize, seed: usize) -> PathBuf {
    let rgb: Vec<u8> = (0..w * h * 3)
        .map(|i| {
            let (p, c) = (i / 3, i % 3);
            let (x, y) = (p % w, p / w);
            ((x * (c + 1) + y * (seed + 2) + 40 * c) % 256) as u8
        })
        .collect();
    let p = tmp(name);
    checkergen::io::image::write_rgb_png(&p, w, h, &rgb).unwrap();
    p
}

use common::cli;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn encode_decode_and_score_commands() {
    let model = tiny_file("tiny_enc.safetensors", true);
    let a = picture("a.png", 256, 256, 0);
    let b = picture("b.png", 300, 270, 1); // through center_crop_arr
    let codes = tmp("codes.safetensors");
    let (ok, _, err) = cli(&[
        "encode",
        "--model",
        s(&model),
        s(&a),
        s(&b),
        "--out",
        s(&codes),
    ]);
    assert!(ok, "{err}");
    let m = Model::load(&model).unwrap();
    let (n, grids) =
        checkergen::io::tokens::read_token_grids(&codes, &m.scale_sizes, m.config.codebook_size())
            .unwrap();
    assert_eq!(n, 2);
    // The codes equal the library's pyramid of the same (cropped) image.
    let img =
        checkergen::io::photo::center_crop_arr(checkergen::io::photo::read_png(&b).unwrap(), 256);
    let pyr = m
        .encoder()
        .unwrap()
        .encode_pyramid(&img, 256, &m.scale_sizes, m.decoder.codebook());
    for (g, c) in grids.iter().zip(&pyr.codes) {
        assert_eq!(&g[c.len()..], c.as_slice());
    }
    let dir = tmp("recon");
    let (ok, _, err) = cli(&[
        "decode",
        "--model",
        s(&model),
        "--tokens",
        s(&codes),
        "--out",
        s(&dir),
    ]);
    assert!(ok, "{err}");
    assert!(dir.join("recon_0000.png").is_file() && dir.join("recon_0001.png").is_file());

    let (ok, out, err) = cli(&[
        "score",
        "--model",
        s(&model),
        s(&a),
        s(&b),
        "--labels",
        "1,5",
        "--steps-per-scale",
        "2,4",
        "--json",
        "--batch-size",
        "1",
    ]);
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    // The CLI (two batches of one) equals the library on the same codes (one batch of two).
    for (line, k) in lines.iter().zip([2usize, 4]) {
        assert_eq!(line["steps_per_scale"], k);
        assert_eq!(line["images"], 2);
        let schedule = Schedule::uniform(&m.scale_sizes, k).unwrap();
        assert_eq!(line["serial_steps"], schedule.total_steps());
        let mut st = ScoreStats::new(&schedule, k);
        score_codes(&m, &[1, 5], &grids, k, &mut st).unwrap();
        let got = line["loss_total"].as_f64().unwrap();
        assert!(
            rel(got, st.loss_total()) < 1e-6,
            "{got} vs {}",
            st.loss_total()
        );
        for sz in &m.scale_sizes {
            assert!(line["loss_by_scale"][sz.to_string()].is_f64());
            assert!(line["top1_by_scale"][sz.to_string()].is_f64());
        }
    }
    let (ok, out, err) = cli(&["score", "--model", s(&model), s(&a), "--labels", "3"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("bits/token") && out.contains("steps/scale 8"),
        "{out}"
    );
}

#[test]
fn bad_score_input_fails_in_one_line() {
    let model = tiny_file("tiny_enc2.safetensors", true);
    let bare = tiny_file("tiny_noenc.safetensors", false);
    let a = picture("c.png", 256, 256, 3);
    let junk = tmp("junk.png");
    std::fs::write(&junk, b"not a png at all").unwrap();
    let codes = tmp("codes_bad.safetensors");
    let other = tmp("other_tokens.safetensors");
    let dout = tmp("d");
    // A strip whose short side would be scaled 1 -> 256 (49 s and 3.5 GB before the bound).
    let strip = picture("strip.png", 16384, 1, 4);
    checkergen::io::tokens::write_token_grids(&other, &[1, 3], &[vec![0], vec![0; 9]], 1).unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "encode",
                "--model",
                s(&model),
                s(&strip),
                "--out",
                s(&codes),
            ],
            "at most 32 times the short one",
        ),
        (
            vec!["score", "--model", s(&model), s(&junk), "--labels", "1"],
            "not a readable PNG",
        ),
        (
            vec![
                "score",
                "--model",
                s(&model),
                "/nonexistent/x.png",
                "--labels",
                "1",
            ],
            "cannot read",
        ),
        (
            vec!["score", "--model", s(&model), s(&a), "--labels", "10"],
            "out of range",
        ),
        (
            vec!["score", "--model", s(&model), s(&a), "--labels", "1,2"],
            "1 images",
        ),
        (vec!["score", "--model", s(&model), s(&a)], "--labels"),
        (
            vec!["score", "--model", s(&bare), s(&a), "--labels", "1"],
            "no VQ encoder",
        ),
        (
            vec!["encode", "--model", s(&bare), s(&a), "--out", s(&codes)],
            "no VQ encoder",
        ),
        (
            vec![
                "decode",
                "--model",
                s(&model),
                "--tokens",
                s(&other),
                "--out",
                s(&dout),
            ],
            "scale_1 has shape",
        ),
    ];
    for (args, want) in cases {
        let (ok, _, err) = cli(&args);
        assert!(!ok, "{args:?} should fail");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // --device cuda on a machine without a GPU: one line (with one, tests/gpu_score.rs scores
    // on it).
    #[cfg(feature = "cuda")]
    if checkergen::cuda::Gpu::try_new().ok().flatten().is_none() {
        let args = [
            "score",
            "--model",
            s(&model),
            s(&a),
            "--labels",
            "1",
            "--device",
            "cuda",
        ];
        common::refused(&args, "no CUDA driver or GPU");
    }
    // Sampling a file without the encoder still works.
    let (ok, _, err) = cli(&[
        "sample",
        "--model",
        s(&bare),
        "--labels",
        "1",
        "--device",
        "cpu",
        "--out",
        s(&tmp("smp")),
    ]);
    assert!(ok, "{err}");
}

/// JPEG input (zune-jpeg): a progressive 493x312 photo-like file decodes to RGB and goes
/// through center_crop_arr into `encode`.
#[test]
fn jpeg_input_decodes_and_encodes() {
    let jpg = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/score/nodejs_full_white_stripe.jpg");
    let img = checkergen::io::photo::read_image(&jpg).unwrap();
    assert_eq!((img.width, img.height), (493, 312));
    let mean = img.data.iter().map(|&v| v as f64).sum::<f64>() / img.data.len() as f64;
    assert!(mean > 5.0 && mean < 250.0, "mean {mean}");
    let model = tiny_file("tiny_enc3.safetensors", true);
    let codes = tmp("codes_jpg.safetensors");
    let (ok, _, err) = cli(&["encode", "--model", s(&model), s(&jpg), "--out", s(&codes)]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&["encode", "--model", s(&model), "x.gif", "--out", s(&codes)]);
    assert!(!ok && err.contains("unsupported image type"), "{err}");
}

/// An `.npz` (np.savez layout: stored zip, arr_0.npy v1) of uint8 `[n, h, w, 3]` images.
fn npz(name: &str, shape: [usize; 4], data: &[u8]) -> PathBuf {
    let dict = format!(
        "{{'descr': '|u1', 'fortran_order': False, 'shape': ({}, {}, {}, {}), }}",
        shape[0], shape[1], shape[2], shape[3]
    );
    let mut header = dict.into_bytes();
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(b' ');
    }
    header.push(b'\n');
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    npy.extend((header.len() as u16).to_le_bytes());
    npy.extend(header);
    npy.extend_from_slice(data);
    let zip = checkergen::io::pth::stored_zip(
        &[checkergen::io::pth::StoredEntry {
            name: "arr_0.npy",
            data: &npy,
            claimed_size: None,
        }],
        false,
    );
    let p = tmp(name);
    std::fs::write(&p, zip).unwrap();
    p
}

/// Images from an .npz score exactly as the same images from PNG files; a wrong-size array
/// fails in one line.
#[test]
fn npz_input_equals_png_input() {
    let model = tiny_file("tiny_enc4.safetensors", true);
    let (a, b) = (
        picture("n0.png", 256, 256, 5),
        picture("n1.png", 256, 256, 6),
    );
    let mut data = Vec::new();
    for p in [&a, &b] {
        data.extend(checkergen::io::photo::read_png(p).unwrap().data);
    }
    let arr = npz("two.npz", [2, 256, 256, 3], &data);
    let args = |imgs: &[&str]| {
        let mut v = vec!["score", "--model", s(&model)];
        v.extend_from_slice(imgs);
        v.extend(["--labels", "2,3", "--steps-per-scale", "4", "--json"]);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |v: Vec<String>| {
        let v: Vec<&str> = v.iter().map(String::as_str).collect();
        let (ok, out, err) = cli(&v);
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()
    };
    let from_npz = run(args(&[s(&arr)]));
    let from_png = run(args(&[s(&a), s(&b)]));
    assert_eq!(from_npz, from_png);
    let small = npz("small.npz", [1, 64, 64, 3], &vec![0u8; 64 * 64 * 3]);
    let (ok, _, err) = cli(&["score", "--model", s(&model), s(&small), "--labels", "1"]);
    assert!(
        !ok && err.lines().count() == 1 && err.contains("expected uint8 [N, 256, 256, 3]"),
        "{err}"
    );
    // A header that claims 2^48 images (the element count wraps in usize) or more bytes than
    // the entry holds is refused in one line, never "0 images" or NaN scores (issue 22 item 3).
    for (name, n) in [("wrap.npz", 1usize << 48), ("short.npz", 3)] {
        let bad = npz(name, [n, 256, 256, 3], &data);
        let (ok, out, err) = cli(&["score", "--model", s(&model), s(&bad), "--labels", "1"]);
        assert!(
            !ok && err.lines().count() == 1 && err.contains("arr_0"),
            "{name}: {out}{err}"
        );
    }
}
