//! The VQ encoder on the GPU (cuda::decoder::GpuEncoder, SPEC.md section 9) against the f32
//! CPU encoder: first the encoder's new kernel (conv3x3_down_{direct,tc}, the Downsample) in a
//! table of cases against `cpu::ops::conv2d_down`, then whole pyramid encodings of the golden
//! photos: z within the 16-bit tolerance of GPU.md and every code equal to the reference's
//! (golden/public/score). Runs on the GPU, or the host emulator without one.
#![cfg(feature = "cuda")]

mod common;

use checkergen::cpu::ops;
use checkergen::cuda::Gpu;
use checkergen::cuda::decoder::{
    self as gd, ConvKernel, ConvWeights, GpuEncoder, Resample, Residual, Storage,
};

const DOWN: Resample = Resample::Down;
use checkergen::model::Model;
use checkergen::model::autoenc::Conv;
use checkergen::model::file::load_i64;
use common::half16::{nan, round_to, to_f32, to_h};
use common::{Report, per_image_nhwc, rand_vec};
use half::{bf16, f16};
use safetensors::SafeTensors;

/// (batch, input side, Cin, Cout): the encoder's Downsample shapes (Cin = Cout = 32, 64 at
/// the golden widths, 128 and 256 released), plus ragged ones: an odd batch, sides that leave
/// a partial 128-row tile, Cin not a multiple of 32 (the direct fallback), Cout != Cin.
const DOWN_CASES: &[(usize, usize, usize, usize)] = &[
    (1, 2, 32, 32),
    (3, 16, 32, 32),
    (2, 10, 64, 64),
    (1, 32, 32, 32),
    (1, 12, 128, 128),
    (2, 6, 3, 5),
    (1, 8, 48, 40),
    (3, 14, 32, 96),
];

/// The reference gets the same 16-bit inputs and weights and its output is rounded to the
/// same 16-bit type, so only rounding flips where the f32 sums (GPU.md: ~1e-6) differ in their
/// last bits remain (as tests/gpu_decoder.rs's 16-bit conv outputs): up to 1.5e-5 measured
/// with fp16, 1.2e-4 with bf16 (8 times the spacing).
fn down_tol<T: Storage>() -> f64 {
    if T::TAG == "bf16" { 5e-4 } else { 1e-4 }
}

#[test]
fn conv3x3_down_matches_cpu_ops() {
    run_down::<f16>();
    run_down::<bf16>();
}

fn run_down<T: Storage>() {
    common::run_table(
        &format!("conv3x3_down ({}) vs cpu::ops::conv2d_down", T::TAG),
        DOWN_CASES,
        |gpu, report, label, seed, &(batch, side, cin, cout)| {
            down_case::<T>(gpu, report, label, seed, batch, side, cin, cout)
        },
    );
}

#[allow(clippy::too_many_arguments)]
fn down_case<T: Storage>(
    gpu: &Gpu,
    report: &mut Report,
    label: &str,
    seed: u64,
    batch: usize,
    side: usize,
    cin: usize,
    cout: usize,
) {
    let ho = side / 2;
    // What the GPU sees: 16-bit inputs and weights (the CPU reference gets the same values).
    let x = round_to::<T>(&rand_vec(batch * side * side * cin, seed + 1, 2.0)); // (B, H, W, Cin)
    let w = round_to::<T>(&rand_vec(cout * cin * 9, seed + 2, 0.3));
    let bias = rand_vec(cout, seed + 3, 0.5);
    let conv = Conv {
        cin,
        cout,
        k: 3,
        weight: w.clone(),
        bias: bias.clone(),
    };
    let want = round_to::<T>(&per_image_nhwc(&x, batch, side * side, cin, cout, |img| {
        ops::conv2d_down(&conv, img, side, side)
    }));
    assert_eq!(want.len(), batch * ho * ho * cout);
    let dw = ConvWeights::<T>::new(gpu, cin, cout, 3, &w, &bias).unwrap();
    let dx = gpu.upload(&to_h::<T>(&x)).unwrap();
    for kernel in [ConvKernel::Direct, ConvKernel::TensorCore] {
        let mut dy = gpu.upload(&nan::<T>(want.len() + 7)).unwrap();
        let none = Residual::None;
        gd::conv3x3(
            gpu, kernel, &dw, &dx, &mut dy, none, batch, ho, ho, DOWN, None,
        )
        .unwrap();
        let got = to_f32(&gpu.download(&dy).unwrap());
        assert!(
            got[want.len()..].iter().all(|v| v.is_nan()),
            "{label}: written past the output"
        );
        report.rel(
            &format!("{label} {kernel:?}"),
            &got[..want.len()],
            &want,
            down_tol::<T>(),
        );
    }
    // The shape checks: an input too short is an error, not a launch.
    let short = gpu
        .upload(&nan::<T>(batch * side * side * cin - 1))
        .unwrap();
    let mut dy = gpu.upload(&nan::<T>(want.len())).unwrap();
    assert!(
        gd::conv3x3(
            gpu,
            ConvKernel::Direct,
            &dw,
            &short,
            &mut dy,
            Residual::None,
            batch,
            ho,
            ho,
            DOWN,
            None
        )
        .is_err()
    );
}

/// Smallest gap between the nearest and the second-nearest codebook row (Euclidean distance)
/// over the cells of `z (B, e, n)`: how close the golden cells come to an argmin near-tie.
fn min_margin(z: &[f32], e: usize, n: usize, codebook: &[f32]) -> f64 {
    let mut worst = f64::INFINITY;
    for zi in z.chunks_exact(e * n) {
        for p in 0..n {
            let (mut d1, mut d2) = (f64::INFINITY, f64::INFINITY);
            for row in codebook.chunks_exact(e) {
                let d: f64 = (0..e)
                    .map(|c| (zi[c * n + p] as f64 - row[c] as f64).powi(2))
                    .sum::<f64>()
                    .sqrt();
                if d < d1 {
                    (d1, d2) = (d, d1);
                } else if d < d2 {
                    d2 = d;
                }
            }
            worst = worst.min(d2 - d1);
        }
    }
    worst
}

/// z tolerance (relative, per scale) of each storage type: GPU.md's 16-bit band (the
/// decoder's host model gives ~2e-3 for fp16 and ~1.5e-2 for bf16 on this autoencoder).
fn z_tol<T: Storage>() -> f64 {
    match T::TAG {
        "f32" => 1e-4,
        "f16" => 1e-2,
        _ => 4e-2,
    }
}

#[test]
fn golden_pyramid_codes_match_cpu() {
    let gpu = common::gpu("gpu encoder golden");
    let g = common::golden_dir_required();
    let mut report = Report::new("GpuEncoder vs cpu::encoder on the golden photos");
    for cfg_name in ["A_ratio2", "C_ratio3"] {
        let model = common::golden_model_with_encoder(&g, cfg_name);
        let bytes = std::fs::read(g.join(format!("public/score/{cfg_name}.safetensors"))).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let images = st.tensor("images_u8").unwrap().data().to_vec();
        let side = model.config.img_size;
        let b = images.len() / (side * side * 3);
        let scales = model.scale_sizes.clone();
        let enc = model.encoder().unwrap();
        let codebook = model.decoder.codebook();
        let e = model.config.code_dim();
        let mut cpu_z: Vec<Vec<f32>> = vec![Vec::new(); scales.len()];
        for img in images.chunks_exact(side * side * 3) {
            let p = enc.encode_pyramid(img, side, &scales, codebook);
            for (z, pz) in cpu_z.iter_mut().zip(p.z) {
                z.extend(pz);
            }
        }
        encode_case::<f32>(
            &gpu,
            &mut report,
            cfg_name,
            &model,
            &st,
            &images,
            b,
            &scales,
            &cpu_z,
        );
        if cfg_name == "A_ratio2" {
            // 16-bit storage: z within its band; codes are counted, not required to match.
            // (on the host emulator without the 256 px scale, to keep the test short)
            let n = if gpu.is_emu() {
                scales.len() - 1
            } else {
                scales.len()
            };
            let (sc, cz) = (&scales[..n], &cpu_z[..n]);
            encode_case::<f16>(&gpu, &mut report, cfg_name, &model, &st, &images, b, sc, cz);
            encode_case::<bf16>(&gpu, &mut report, cfg_name, &model, &st, &images, b, sc, cz);
        }
        for (si, &s) in scales.iter().enumerate() {
            let m = min_margin(&cpu_z[si], e, s * s, codebook);
            println!(
                "{cfg_name} s={s:2}: smallest nearest/second-nearest code distance gap {m:.2e}"
            );
        }
    }
    report.finish();
}

#[allow(clippy::too_many_arguments)]
fn encode_case<T: Storage>(
    gpu: &Gpu,
    report: &mut Report,
    cfg_name: &str,
    model: &Model,
    st: &SafeTensors,
    images: &[u8],
    b: usize,
    scales: &[usize],
    cpu_z: &[Vec<f32>],
) {
    let enc = GpuEncoder::<T>::new(gpu, model.encoder().unwrap()).unwrap();
    let side = model.config.img_size;
    let codebook = model.decoder.codebook();
    let pyr = enc
        .encode_pyramid(gpu, images, b, side, scales, codebook)
        .unwrap();
    for (si, &s) in scales.iter().enumerate() {
        let case = format!("{cfg_name} {} s={s:2} B={b}", T::TAG);
        report.rel(&case, &pyr.z[si], &cpu_z[si], z_tol::<T>());
        let want: Vec<u32> = load_i64(st, &format!("q_inds_s{s}"))
            .unwrap()
            .1
            .iter()
            .map(|&t| t as u32)
            .collect();
        let diff = pyr.codes[si]
            .iter()
            .zip(&want)
            .filter(|(a, b)| a != b)
            .count();
        if T::TAG == "f32" {
            report.check(
                &case,
                "codes differing from the reference's",
                diff as f64,
                0.5,
            );
        } else {
            println!(
                "  {case}: {diff} of {} codes differ (16-bit, not gated)",
                want.len()
            );
        }
    }
    // A later, smaller encode (1 image at the second scale) reuses the pyramid's buffers and
    // gives that image's z again.
    let (s1, stride, e) = (scales[1], enc.config().stride(), model.config.code_dim());
    let img0 = checkergen::score::to_planar(&images[..side * side * 3], side);
    let x = ops::upsample_bilinear(&img0, 1, 3, side, stride * s1);
    let z1 = enc.encode(gpu, &x, 1, stride * s1).unwrap();
    let case = format!("{cfg_name} {} s={s1} B=1 after the pyramid", T::TAG);
    report.rel(&case, &z1, &pyr.z[1][..e * s1 * s1], 1e-6);
    // Bad input is an error, not a panic.
    assert!(
        enc.encode_pyramid(gpu, &images[1..], b, side, scales, codebook)
            .is_err()
    );
    assert!(enc.encode(gpu, &[0.0; 3 * 24 * 24], 1, 24).is_err()); // not a multiple of 16
}
