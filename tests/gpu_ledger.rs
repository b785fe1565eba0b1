//! The traffic ledger's declarations against what the kernels really touch (issue 21).
//!
//! A small model samples through the CUDA engine on the host emulator with the audit on
//! (`Gpu::set_audit`): the first launch of every kernel (and the first GEMM and memset) is
//! run once to see which bytes of its buffers changed (outputs start poisoned: a lower bound
//! of the bytes written), then once per probed element (or chunk) of each floating-point
//! buffer it was given, perturbed, to see which ones change an output (a lower bound of the
//! bytes read). A launcher fails when it declares fewer bytes than were seen touched, or more
//! than twice as many (for reads: twice the float bytes seen read plus the integer buffers
//! it was given, which are not perturbed).

#![cfg(feature = "cuda")]

use checkergen::cuda::Gpu;
use checkergen::cuda::decoder::GpuDecoder;
use checkergen::cuda::engine::{GpuBackend, GpuModel};
use checkergen::cuda::ledger::AuditRecord;
use checkergen::model::Model;
use checkergen::model::config::{DecoderConfig, preset};
use checkergen::model::decoder::DecoderWeights;
use checkergen::model::init::random_decoder_tensors;
use checkergen::model::init::random_tensors;
use checkergen::pipeline::{self, SampleOptions, Steps};

/// Bytes of slack for the upper checks (a few scalars, a partly read chunk).
const SLACK: u64 = 64;

#[test]
fn declared_traffic_matches_what_the_kernels_touch() {
    let cfg = checkergen::model::config::ModelConfig {
        img_size: 8,
        num_classes: 4,
        num_layers: 2,
        // Two levels and a 64-entry codebook: the tiny preset's decoder, smaller.
        decoder: DecoderConfig {
            ch_mult: vec![1, 2],
            n_embed: 64,
            ..preset("tiny").unwrap().decoder
        },
        ..preset("tiny").unwrap()
    };
    let model = Model::from_tensors(cfg.clone(), &random_tensors(&cfg, 3).unwrap()).unwrap();
    let gm = GpuModel::new(Gpu::emu().unwrap(), &model).unwrap();
    let mut o = SampleOptions::new(vec![1, 2]);
    o.cfg = 1.5;
    o.cfg_start_step = 0;
    o.graph = false;
    o.steps = Steps::Uniform(2);
    gm.gpu.set_audit(true);
    pipeline::sample(&mut GpuBackend::new(&gm), &o).unwrap();
    let log = gm.gpu.set_audit(false);
    assert!(log.len() >= 15, "only {} kernels audited", log.len());
    let bad = audit_failures(&log);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The decoder's fused kernels where their fusions are on: a 16 x 16 latent (256 pixels, a
/// multiple of the 128-row tile) puts the GroupNorm statistics in the convs' epilogues and
/// the GroupNorm + SiLU in their loaders (the sampling test above decodes 4 x 4 and 8 x 8
/// latents, where the statistics take their own pass).
#[test]
fn fused_decoder_traffic_matches_what_the_kernels_touch() {
    let cfg = DecoderConfig {
        ch: 32,
        ch_mult: vec![1],
        num_res_blocks: 1,
        z_channels: 32,
        embed_dim: 8,
        n_embed: 64,
        normalize: true,
    };
    let host = DecoderWeights::from_tensors(&cfg, &random_decoder_tensors(&cfg, 5)).unwrap();
    let gpu = Gpu::emu().unwrap();
    let dec = GpuDecoder::new(&gpu, &host).unwrap();
    let tokens: Vec<u32> = (0..256).map(|i| (i * 37 % 64) as u32).collect();
    gpu.set_audit(true);
    dec.decode_tokens::<u8>(&gpu, &tokens, 1, 16).unwrap();
    // The cuBLAS calls are audited by the test above, where every operand is probed element
    // by element; here q|k|v interleave within the probed chunks of the attention's operands
    // (a chunk holding one q or k element counts whole), which overstates what a GEMM read.
    let log: Vec<AuditRecord> = gpu
        .set_audit(false)
        .into_iter()
        .filter(|r| r.name != "gemm")
        .collect();
    for name in [
        "conv3x3_tc_f16",
        "conv3x3_tc_gn_f16",
        "conv3x3_narrow_f16",
        "bias_cast_f16",
    ] {
        assert!(log.iter().any(|r| r.name == name), "{name} not audited");
    }
    let bad = audit_failures(&log);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The launches whose declared traffic disagrees with the audit (see the module comment).
fn audit_failures(log: &[AuditRecord]) -> Vec<String> {
    let mut bad = Vec::new();
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "launch", "decl read", "seen read", "unprobed", "decl wr", "seen wr"
    );
    for r in log {
        println!(
            "{:<28} {:>10} {:>10} {:>10} {:>10} {:>10}",
            r.name, r.declared.read, r.read, r.unprobed, r.declared.write, r.written
        );
        let d = r.declared;
        if d.write < r.written {
            bad.push(format!(
                "{}: declares {} bytes written, {} seen",
                r.name, d.write, r.written
            ));
        }
        if d.write > 2 * r.written + SLACK {
            bad.push(format!(
                "{}: declares {} bytes written, more than twice the {} seen",
                r.name, d.write, r.written
            ));
        }
        // Buffers above 1024 elements are probed in chunks: a chunk at the edge of the range
        // read counts whole, so the bytes seen read may exceed the truth by a few chunks.
        if d.read + 4 * SLACK < r.read {
            bad.push(format!(
                "{}: declares {} bytes read, {} seen",
                r.name, d.read, r.read
            ));
        }
        // A code gather declares every gathered code vector read (what the shapes say); the
        // random tokens here repeat codes, so fewer distinct vectors are read.
        let data_dependent = r.name.starts_with("gather_codes");
        if d.read > 2 * r.read + r.unprobed + SLACK && !data_dependent {
            bad.push(format!(
                "{}: declares {} bytes read, more than twice the {} seen (+ {} unprobed)",
                r.name, d.read, r.read, r.unprobed
            ));
        }
        assert!(
            d.flops > 0 || r.name == "memset",
            "{}: no FLOPs declared",
            r.name
        );
    }
    bad
}

#[test]
fn dry_run_records_launches_and_runs_nothing() {
    let cfg = preset("tiny").unwrap();
    let model = Model::from_tensors(cfg.clone(), &random_tensors(&cfg, 1).unwrap()).unwrap();
    let gm = GpuModel::new(Gpu::emu_dry().unwrap(), &model).unwrap();
    assert!(gm.gpu.is_dry());
    let mut o = SampleOptions::new(vec![0, 1, 2]);
    o.graph = false;
    let out = pipeline::sample(&mut GpuBackend::new(&gm), &o).unwrap();
    assert!(out.pixels.iter().all(|&p| p == 0), "nothing ran");
    let led = gm.gpu.ledger();
    let dec = led.total(Some(checkergen::cuda::ledger::DECODER));
    let tr = led.total(Some(checkergen::cuda::ledger::TRANSFORMER));
    assert!(led.launches(Some("decoder")) > 10 && dec.bytes() > 0 && dec.flops > 0);
    assert!(tr.bytes() > 0 && tr.flops > 0);
    // A real run records nothing unless asked (no record per launch kept for ever), and
    // asked, the same launches as the dry run.
    let real = GpuModel::new(Gpu::emu().unwrap(), &model).unwrap();
    pipeline::sample(&mut GpuBackend::new(&real), &o).unwrap();
    assert_eq!(
        real.gpu.ledger().launches(None),
        0,
        "recorded without being asked"
    );
    real.gpu.record_ledger(true);
    pipeline::sample(&mut GpuBackend::new(&real), &o).unwrap();
    let rl = real.gpu.ledger();
    assert_eq!(rl.launches(None), led.launches(None));
    assert_eq!(rl.total(None), led.total(None));
}
