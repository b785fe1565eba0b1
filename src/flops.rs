//! FLOP counts of the model (PERF.md derives the same numbers): the transformer per image
//! for a schedule, and the VQ decoder per stage. 2 FLOPs per multiply-add; elementwise work
//! (norms, activations, softmax) is not counted: it is memory-bound and small in FLOPs.

use crate::model::config::{DecoderConfig, ModelConfig};
use crate::order::Schedule;

/// FLOPs of the transformer for one image: the class-token prefill and every serial step,
/// on `rows` sequence rows (2 with guidance: the engines run the unconditional rows on
/// every step), per token: the four projections of every layer (QKV, output, [w1; w3],
/// w2), attention (4 * keys * C: scores and P V over the keys so far), and the head.
pub fn transformer_flops(cfg: &ModelConfig, schedule: &Schedule, guided: bool) -> f64 {
    let (c, f, v) = (
        cfg.hidden_size as f64,
        cfg.ffn_dim as f64,
        cfg.codebook_size() as f64,
    );
    let per_layer = 2.0 * c * 3.0 * c + 2.0 * c * c + 2.0 * c * 2.0 * f + 2.0 * f * c;
    let layers = cfg.num_layers as f64;
    let mut keys = 1.0; // the class token
    let mut total = layers * (per_layer + 4.0 * keys * c);
    for st in &schedule.steps {
        let n = st.positions.len() as f64;
        keys += n;
        total += n * (layers * (per_layer + 4.0 * keys * c) + 2.0 * c * v);
    }
    total * if guided { 2.0 } else { 1.0 }
}

/// Bytes of transformer weights read per serial step (16-bit storage on the GPU): each step
/// streams every layer's projections and the head once, whatever the batch.
pub fn transformer_weight_bytes(cfg: &ModelConfig, bytes_per_weight: f64) -> f64 {
    let (c, f, v) = (
        cfg.hidden_size as f64,
        cfg.ffn_dim as f64,
        cfg.codebook_size() as f64,
    );
    let per_layer = 3.0 * c * c + c * c + 2.0 * c * f + f * c;
    (cfg.num_layers as f64 * per_layer + c * v) * bytes_per_weight
}

/// Multiply-add FLOPs (2 per MAC) of one decoder stage for one image; GroupNorm, softmax and
/// other elementwise work are not counted (they are memory-bound and small in FLOPs).
#[derive(Clone, Debug)]
pub struct StageFlops {
    pub name: String,
    /// Output spatial side and channels of the stage.
    pub side: usize,
    pub channels: usize,
    pub conv3x3: f64,
    pub conv1x1: f64,
    pub attention: f64,
}

impl StageFlops {
    pub fn total(&self) -> f64 {
        self.conv3x3 + self.conv1x1 + self.attention
    }
}

/// FLOPs per decoder stage for one image from an s x s latent.
pub fn decoder_flops(cfg: &DecoderConfig, s: usize) -> Vec<StageFlops> {
    let f = |v: usize| v as f64;
    let c3 = |h: usize, ci: usize, co: usize| 2.0 * f(h * h) * 9.0 * f(ci) * f(co);
    let c1 = |h: usize, ci: usize, co: usize| 2.0 * f(h * h) * f(ci) * f(co);
    // (3x3, 1x1) of a ResBlock
    let res = |h: usize, ci: usize, co: usize| {
        let nin = if ci != co { c1(h, ci, co) } else { 0.0 };
        (c3(h, ci, co) + c3(h, co, co), nin)
    };
    // (1x1, attention matmuls) of an AttnBlock: q, k, v, proj_out; q k^T and P V.
    let attn = |h: usize, c: usize| (4.0 * c1(h, c, c), 2.0 * 2.0 * f(h * h) * f(h * h) * f(c));
    let nl = cfg.ch_mult.len();
    let mut c = cfg.ch * cfg.ch_mult[nl - 1];
    let mut h = s;
    let mut out = vec![StageFlops {
        name: "post_quant_conv + conv_in".into(),
        side: h,
        channels: c,
        conv3x3: c3(h, cfg.z_channels, c),
        conv1x1: c1(h, cfg.embed_dim, cfg.z_channels),
        attention: 0.0,
    }];
    let (r3, r1) = res(h, c, c);
    let (a1, aa) = attn(h, c);
    out.push(StageFlops {
        name: "mid (Res, Attn, Res)".into(),
        side: h,
        channels: c,
        conv3x3: 2.0 * r3,
        conv1x1: 2.0 * r1 + a1,
        attention: aa,
    });
    for i in 0..nl {
        let co = cfg.ch * cfg.ch_mult[nl - 1 - i];
        let mut st = StageFlops {
            name: format!("conv_blocks.{i}"),
            side: h,
            channels: co,
            conv3x3: 0.0,
            conv1x1: 0.0,
            attention: 0.0,
        };
        for _ in 0..=cfg.num_res_blocks {
            let (r3, r1) = res(h, c, co);
            st.conv3x3 += r3;
            st.conv1x1 += r1;
            c = co;
            if i == 0 {
                let (a1, aa) = attn(h, c);
                st.conv1x1 += a1;
                st.attention += aa;
            }
        }
        if i + 1 < nl {
            h *= 2;
            st.conv3x3 += c3(h, c, c);
            st.name = format!("conv_blocks.{i} + upsample");
            st.side = h;
        }
        out.push(st);
    }
    out.push(StageFlops {
        name: "norm_out + conv_out".into(),
        side: h,
        channels: 3,
        conv3x3: c3(h, c, 3),
        conv1x1: 0.0,
        attention: 0.0,
    });
    out
}

/// Dense 16-bit tensor peak (FLOP/s) and memory bandwidth (bytes/s) of known devices.
pub fn roofline(device_name: &str) -> Option<(f64, f64)> {
    if device_name.contains("H200") {
        Some((989.4e12, 4.8e12))
    } else if device_name.contains("H100") {
        Some((989.4e12, 3.35e12))
    } else if device_name.contains("A100") {
        Some((312.0e12, 2.0e12))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_decoder_flops() {
        let cfg = crate::model::config::released_decoder_16k();
        let st = decoder_flops(&cfg, 16);
        let total: f64 = st.iter().map(|s| s.total()).sum();
        for s in &st {
            println!(
                "{:28} {:4}x{:<4} C {:4}: {:8.3} GFLOP (3x3 {:.3}, 1x1 {:.3}, attn {:.3})",
                s.name,
                s.side,
                s.side,
                s.channels,
                s.total() / 1e9,
                s.conv3x3 / 1e9,
                s.conv1x1 / 1e9,
                s.attention / 1e9
            );
        }
        println!("total {:.4} TFLOP per 256x256 image", total / 1e12);
        // Independently summed in PERF.md: 252.716253184 GFLOP.
        assert!((total - 252_716_253_184.0).abs() < 1.0, "{total}");
        assert_eq!(st.last().unwrap().side, 256);
    }

    /// PERF.md's table: L-2x with guidance, 17 serial steps: 553.6 M FLOP per token-row
    /// (20 layers + head) x 342 x 2 = 0.379 TFLOP per image, plus attention: 4 * keys * C per
    /// token and layer with the block-causal prefix as keys, 0.011 TFLOP (2.8 %).
    #[test]
    fn l2x_transformer_flops_match_perf_md() {
        let cfg = crate::model::config::preset("L-2x").unwrap();
        let sizes = crate::order::scale_sizes(cfg.latent_size(), cfg.scale_ratio, 1).unwrap();
        let sched = Schedule::uniform(&sizes, 4).unwrap();
        let f = transformer_flops(&cfg, &sched, true);
        assert!((f / 0.3897e12 - 1.0).abs() < 0.002, "{f:e}");
        assert_eq!(transformer_flops(&cfg, &sched, false) * 2.0, f);
        // Per serial step the 20 layers' projections and the head: 276.8 M weights, 553.6 MB
        // in bf16 (the other 91 M of the 368 M parameters, AdaLN modulation and tables, are
        // read once per batch).
        let b = transformer_weight_bytes(&cfg, 2.0);
        assert!((b / 0.5536e9 - 1.0).abs() < 0.001, "{b:e}");
    }
}
