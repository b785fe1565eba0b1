//! Teacher-forced scoring on the GPU (cuda::score, SPEC.md section 9) against the CPU
//! (cpu::score): the attention kernels' block-causal mode (RoPE + append + attention in one
//! launch) on real schedules' block ids in a table of cases against the `cpu::ops`
//! composition `rope_kv_append` -> `attention`, then the whole masked pass (logits) and the
//! losses per scale at k = 2, 4, 8 on the golden A_ratio2 and C_ratio3 models with the
//! reference's codes, then `score --device emu` against `--device cpu`. Runs on the GPU, or the
//! host emulator without one.
#![cfg(feature = "cuda")]

mod common;

use checkergen::cpu::ops::{self, attention::BlockMask as HostMask};
use checkergen::cpu::score::{masked_logits, score_codes};
use checkergen::cuda::Gpu;
use checkergen::cuda::attention::{self, AttentionImpl, AttnShape, BlockMask, Rope};
use checkergen::cuda::engine::GpuModel;
use checkergen::order::Schedule;
use checkergen::score::ScoreStats;
use common::half16::{nan, to_f32};
use common::{Report, Rng, i32s};
use half::bf16;
use safetensors::SafeTensors;

/// (D, H, rows, scale sides, steps per scale, q scale): the mask of the whole sequence
/// (class token = block 0, step t = block t+1) of a real schedule; lengths 1 + N = 342, 287,
/// 86, 15, 30 (none a multiple of the 64-key tile), several heads, odd rows.
#[derive(Debug)]
struct MaskCase(usize, usize, usize, &'static [usize], usize, f32);

const MASK_CASES: &[MaskCase] = &[
    MaskCase(32, 4, 1, &[1, 2, 4, 8, 16], 2, 4.0),
    MaskCase(64, 2, 3, &[1, 2, 5, 16], 4, 2.0),
    MaskCase(64, 4, 2, &[1, 2, 4, 8], 8, 8.0),
    MaskCase(128, 2, 1, &[1, 2, 3], 1, 2.0),
    MaskCase(32, 16, 2, &[1, 2, 5], 8, 4.0),
    MaskCase(64, 1, 1, &[1, 2, 4, 8, 16], 8, 1.0),
];

/// bf16 storage, f32 softmax and accumulation (GPU.md).
const ATT_TOL: f64 = 1e-2;

/// Block id of every position of a schedule's sequence: 0 for the class token, t + 1 for
/// step t's positions.
fn sequence_blocks(schedule: &Schedule) -> Vec<i32> {
    let mut ids = vec![0i32];
    for st in &schedule.steps {
        ids.extend(std::iter::repeat_n(st.t as i32 + 1, st.positions.len()));
    }
    ids
}

fn bf16_vec(rng: &mut Rng, n: usize, scale: f32) -> Vec<bf16> {
    (0..n).map(|_| bf16::from_f32(rng.uniform(scale))).collect()
}

#[test]
fn masked_attention_matches_cpu_ops() {
    common::run_table(
        "attention.cu block-causal mode vs cpu::ops rope_kv_append -> attention",
        MASK_CASES,
        |gpu, report, label, seed, &MaskCase(d, h, rows, sizes, k, qscale)| {
            let schedule = Schedule::uniform(sizes, k).unwrap();
            let block = sequence_blocks(&schedule);
            mask_case(gpu, report, label, seed, d, h, rows, &block, qscale)
        },
    );
}

/// One masked pass of the fused attention step (RoPE + append + attention) over the whole
/// sequence (start 0, n = 1 + N) against the cpu::ops composition rope_kv_append -> attention;
/// `mixing`: a key-mixing layer.
#[allow(clippy::too_many_arguments)]
fn mask_case(
    gpu: &Gpu,
    report: &mut Report,
    label: &str,
    seed: u64,
    d: usize,
    h: usize,
    rows: usize,
    block: &[i32],
    qscale: f32,
) {
    let n = block.len();
    let s = AttnShape {
        rows,
        heads: h,
        head_dim: d,
        n,
        start: 0,
        capacity: n + 3,
    };
    let mixing = (seed / 1000).is_multiple_of(2);
    let c = s.c();
    let mut rng = Rng::new(seed + 17);
    let mut qkv = Vec::with_capacity(s.tokens() * 3 * c);
    for _ in 0..s.tokens() {
        qkv.extend(bf16_vec(&mut rng, c, qscale));
        qkv.extend(bf16_vec(&mut rng, 2 * c, 1.0));
    }
    // RoPE table rows N + 2 = n + 1; random rows per position, as a schedule's are.
    let table = n + 1;
    let angles = rng.vec(table * d, std::f32::consts::PI);
    let re: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
    let im: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
    let cur: Vec<usize> = (0..n).map(|_| rng.below(table)).collect();
    let prev: Vec<usize> = (0..n).map(|_| rng.below(table)).collect();
    let mix: Vec<f32> = (0..h).map(|_| 0.5 + 0.5 * rng.uniform(1.0)).collect();
    let host = HostMask {
        key_block: block,
        query_block: block,
    };
    let (mut q, mut kc, mut vc) = (
        vec![0.0f32; s.q_len()],
        vec![0.0f32; s.cache_len()],
        vec![0.0f32; s.cache_len()],
    );
    ops::rope_kv_append(
        &to_f32(&qkv),
        &re,
        &im,
        &cur,
        &prev,
        mixing.then_some(&mix[..]),
        &mut q,
        &mut kc,
        &mut vc,
        s,
    );
    let want = ops::attention(&q, &kc, &vc, Some(host), s);
    let dqkv = gpu.upload(&qkv).unwrap();
    let (dre, dim, dmix) = (
        gpu.upload(&re).unwrap(),
        gpu.upload(&im).unwrap(),
        gpu.upload(&mix).unwrap(),
    );
    let (dcur, dprev) = (
        gpu.upload(&i32s(&cur)).unwrap(),
        gpu.upload(&i32s(&prev)).unwrap(),
    );
    let db = gpu.upload(block).unwrap();
    let mask = BlockMask {
        key_block: &db,
        query_block: &db,
    };
    for imp in [AttentionImpl::Direct, AttentionImpl::TensorCore] {
        // The cache is empty before the pass (NaN: it is written, never read).
        let mut dk = gpu.upload(&nan::<bf16>(s.cache_len())).unwrap();
        let mut dv = gpu.upload(&nan::<bf16>(s.cache_len())).unwrap();
        let mut out = gpu.upload(&nan::<bf16>(s.tokens() * s.c())).unwrap();
        let rope = Rope {
            re: &dre,
            im: &dim,
            cur: &dcur,
            prev: &dprev,
            mix: mixing.then_some((&dmix, 0)),
        };
        attention::attention(
            gpu,
            imp,
            &dqkv,
            rope,
            &mut dk,
            &mut dv,
            Some(mask),
            &mut out,
            s,
        )
        .unwrap();
        let got = to_f32(&gpu.download(&out).unwrap());
        report.rel(
            &format!("{label} L={n} mix {mixing} {imp:?}"),
            &got,
            &want,
            ATT_TOL,
        );
    }
}

/// GPU logits and losses vs the CPU's: bf16 weights and activations (GPU.md: 1e-3 to 1e-2).
const LOGIT_TOL: f64 = 1e-2;
const LOSS_TOL: f64 = 1e-2;

#[test]
fn gpu_losses_match_cpu() {
    let gpu = common::gpu("gpu score golden");
    let g = common::golden_dir_required();
    let mut report = Report::new("cuda::score vs cpu::score on the golden models");
    let mut gpu_holder = Some(gpu);
    for cfg_name in ["A_ratio2", "C_ratio3"] {
        let model = common::golden_model_with_encoder(&g, cfg_name);
        let bytes = std::fs::read(g.join(format!("public/score/{cfg_name}.safetensors"))).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let labels: Vec<usize> = checkergen::model::file::load_i64(&st, "labels")
            .unwrap()
            .1
            .iter()
            .map(|&l| l as usize)
            .collect();
        let tokens = common::token_pyramid(&st, &model.scale_sizes, "q_inds_s");
        let gm = GpuModel::new(gpu_holder.take().unwrap(), &model).unwrap();
        let v = model.config.codebook_size();
        for k in [2usize, 4, 8] {
            let case = format!("{cfg_name} k={k} B={}", labels.len());
            let schedule = Schedule::uniform(&model.scale_sizes, k).unwrap();
            let want =
                masked_logits(&model.config, &model.weights, &schedule, &labels, &tokens).unwrap();
            let got = gm.masked_logits(&schedule, &labels, &tokens).unwrap();
            report.rel(&format!("{case} logits"), &got, &want, LOGIT_TOL);
            let mut cpu = ScoreStats::new(&schedule, k);
            score_codes(&model, &labels, &tokens, k, &mut cpu).unwrap();
            let mut dev = ScoreStats::new(&schedule, k);
            dev.add(&schedule, &got, &tokens, v).unwrap();
            let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
            report.check(
                &case,
                &format!(
                    "loss_total {:.4} vs {:.4}",
                    dev.loss_total(),
                    cpu.loss_total()
                ),
                rel(dev.loss_total(), cpu.loss_total()),
                LOSS_TOL,
            );
            let one = |name: String| common::golden_f32s(&st, &name)[0] as f64;
            for (si, &s) in model.scale_sizes.iter().enumerate() {
                let (l_gpu, l_cpu) = (dev.loss_by_scale()[si], cpu.loss_by_scale()[si]);
                let what = format!(
                    "loss_s{s} {l_gpu:.4} vs {l_cpu:.4} (reference {:.4}); top-1 {:.3} vs {:.3}",
                    one(format!("loss_s{s}_k{k}")),
                    dev.top1_by_scale()[si],
                    cpu.top1_by_scale()[si]
                );
                report.check(&case, &what, rel(l_gpu, l_cpu), LOSS_TOL);
            }
            // The library entry point gives the same statistics as the logits it scores.
            let mut lib = ScoreStats::new(&schedule, k);
            let sizes = &model.scale_sizes;
            let allocated = gm.gpu.allocations();
            checkergen::cuda::score::score_codes(&gm, sizes, &labels, &tokens, k, &mut lib)
                .unwrap();
            // A second call of one shape runs on the first call's buffers (issue 21 item 5).
            assert_eq!(
                gm.gpu.allocations(),
                allocated,
                "{case}: a repeated scoring call allocated device buffers"
            );
            assert_eq!(lib, dev, "{case}: score_codes vs masked_logits + add");
        }
        // Bad input is a clear error, never a panic.
        let schedule = Schedule::uniform(&model.scale_sizes, 2).unwrap();
        let err = gm
            .masked_logits(&schedule, &[model.config.num_classes], &tokens)
            .unwrap_err()
            .to_string();
        assert!(err.contains("out of range"), "{err}");
        let err = gm
            .masked_logits(&schedule, &labels, &tokens[1..])
            .unwrap_err()
            .to_string();
        assert!(err.contains("every scale"), "{err}");
        let mut bad = tokens.clone();
        bad[0][0] = v as u32;
        assert!(gm.masked_logits(&schedule, &labels, &bad).is_err());
        gpu_holder = Some(gm.gpu);
    }
    report.finish();
}

/// `score --device emu` (or cuda) against `--device cpu` on one golden photo: the same images,
/// codes and losses within the bf16 tolerance.
#[test]
fn score_command_on_the_device_matches_cpu() {
    let gpu = common::gpu("score --device");
    let device = if gpu.is_emu() { "emu" } else { "cuda" };
    drop(gpu);
    let g = common::golden_dir_required();
    let dir = std::env::temp_dir().join(format!("cg-gpu-score-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = common::golden_model_with_encoder(&g, "A_ratio2");
    let model_path = dir.join("a_ratio2.safetensors");
    let map = common::golden_tensors_with_encoder(&g, "A_ratio2");
    checkergen::model::file::write_model(
        &model_path,
        &model.config,
        &map,
        checkergen::model::file::Dtype::F32,
        &[],
    )
    .unwrap();
    let bytes = std::fs::read(g.join("public/score/A_ratio2.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let side = model.config.img_size;
    let img = &st.tensor("images_u8").unwrap().data()[..side * side * 3];
    let png = dir.join("astronaut.png");
    checkergen::io::image::write_rgb_png(&png, side, side, img).unwrap();
    let (m, p) = (model_path.to_str().unwrap(), png.to_str().unwrap());
    let run = |dev: &str| {
        let args = [
            "score",
            "--model",
            m,
            p,
            "--labels",
            "1",
            "--steps-per-scale",
            "2,8",
            "--device",
            dev,
            "--json",
        ];
        common::json_lines(&args)
    };
    let (cpu, dev) = (run("cpu"), run(device));
    assert_eq!(cpu.len(), 2);
    assert_eq!(dev.len(), 2);
    for (c, d) in cpu.iter().zip(&dev) {
        let (lc, ld) = (
            c["loss_total"].as_f64().unwrap(),
            d["loss_total"].as_f64().unwrap(),
        );
        let rel = (lc - ld).abs() / lc;
        println!(
            "score k={}: loss_total cpu {lc:.5} {device} {ld:.5} (rel {rel:.2e})",
            c["steps_per_scale"]
        );
        assert!(rel < LOSS_TOL, "{c} vs {d}");
        assert_eq!(c["images"], d["images"]);
        assert_eq!(c["serial_steps"], d["serial_steps"]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
