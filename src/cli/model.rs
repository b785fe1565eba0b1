//! The model-level subcommands that run no sampler: init, inspect, convert, order,
//! schedule.

use crate::progress::{Off, Progress};
use anyhow::{Context, Result, bail};
use checkergen::model::Model;
use checkergen::model::config::{self, ModelConfig};
use checkergen::model::file::{Dtype, TensorMap, write_model};
use checkergen::model::init::random_tensors_where;
use checkergen::order::{self, Schedule};
use checkergen::pipeline;
use clap::Args;
use std::path::{Path, PathBuf};

/// Parse a scale ratio: `2`, `1.5`, `2^(1/4)`, `2^0.5`, `sqrt(2)`.
pub fn parse_ratio(s: &str) -> Result<f64, String> {
    let t = s.trim().replace(' ', "");
    let num = |x: &str| -> Result<f64, String> {
        if let Some((a, b)) = x.split_once('/') {
            Ok(num_plain(a)? / num_plain(b)?)
        } else {
            num_plain(x)
        }
    };
    fn num_plain(x: &str) -> Result<f64, String> {
        x.parse::<f64>()
            .map_err(|_| format!("'{x}' is not a number"))
    }
    let v = if let Some(inner) = t.strip_prefix("sqrt(").and_then(|r| r.strip_suffix(')')) {
        num(inner)?.sqrt()
    } else if let Some((base, exp)) = t.split_once('^') {
        let exp = exp.trim_start_matches('(').trim_end_matches(')');
        num_plain(base)?.powf(num(exp)?)
    } else {
        num(&t)?
    };
    if !v.is_finite() || v <= 1.0 {
        return Err(format!("scale ratio must be greater than 1, got {v}"));
    }
    Ok(v)
}

pub fn init(a: InitArgs) -> Result<()> {
    let InitArgs { preset, seed, out } = a;
    let (dtype, output, overwrite) = (out.dtype, out.out.as_path(), out.overwrite);
    let preset = preset.as_str();
    let cfg = config::preset(preset)?;
    checkergen::paths::claim_output_file(output, overwrite, &[])?;
    // Tensor by tensor (each is keyed by the seed and its name, so the values are those of
    // one draw of the whole map), with progress: L-2x is hundreds of millions of values.
    let names = checkergen::model::expected_tensors(&cfg)?;
    let progress = Progress::new(format!("init {preset}"), "tensors", Off::Silent, false);
    progress.update(0, names.len() as u64 + 1);
    let mut map = TensorMap::new();
    for (name, _) in &names {
        progress.message(name.clone());
        map.extend(random_tensors_where(&cfg, seed, |n| n == name.as_str())?);
        progress.inc(1);
    }
    progress.message(format!("writing {}", output.display()));
    write_model(
        output,
        &cfg,
        &map,
        dtype,
        &[(
            "source",
            format!("checkergen init --preset {preset} --seed {seed}"),
        )],
    )?;
    progress.inc(1);
    let params: usize = map.values().map(|t| t.numel()).sum();
    println!(
        "wrote {} (preset {preset}, seed {seed}, {} tensors, {:.1} M parameters)",
        output.display(),
        map.len(),
        params as f64 / 1e6
    );
    Ok(())
}

fn describe(cfg: &ModelConfig) -> String {
    let d = &cfg.decoder;
    format!(
        "transformer: C={} layers={} heads={} (head_dim {}) ffn={} rms_eps={:e} mixing_layers={} \
         head_mlp={}\nclasses: {}  codebook: {} x {}  img_size: {}  scale_ratio: {}  \
         scale_min_size: {}\ndecoder: ch={} ch_mult={:?} res_blocks={} z_channels={} (stride {})",
        cfg.hidden_size,
        cfg.num_layers,
        cfg.num_heads,
        cfg.head_dim(),
        cfg.ffn_dim,
        cfg.rms_norm_eps,
        cfg.num_mixing_layers,
        cfg.use_head_mlp,
        cfg.num_classes,
        d.n_embed,
        d.embed_dim,
        cfg.img_size,
        cfg.scale_ratio,
        cfg.scale_min_size,
        d.ch,
        d.ch_mult,
        d.num_res_blocks,
        d.z_channels,
        d.stride()
    )
}

/// `inspect`: by default the header alone (the file is mapped, only its header's pages are
/// read: names, dtypes, shapes and offsets checked against the configuration); `verify`
/// loads the model as `sample` does, every value checked.
pub fn inspect(path: &Path, verify: bool) -> Result<()> {
    let header = checkergen::model::ModelHeader::read(path)?;
    if verify {
        Model::load(path)?;
    }
    let cfg = &header.config;
    println!("{}", path.display());
    println!("{}", describe(cfg));
    let (t, d) = header.parameter_counts();
    println!(
        "parameters: transformer {:.2} M, decoder+codebook {:.2} M, total {:.2} M",
        t as f64 / 1e6,
        d as f64 / 1e6,
        (t + d) as f64 / 1e6
    );
    if header.has_encoder {
        let e: usize = checkergen::model::encoder::EncoderWeights::expected_tensors(&cfg.decoder)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        println!(
            "encoder: {:.2} M parameters (encode and score available)",
            e as f64 / 1e6
        );
    } else {
        println!("encoder: none (sampling only; encode and score need it)");
    }
    // Storage: tensors per dtype, as the header says.
    let mut dtypes: std::collections::BTreeMap<String, usize> = Default::default();
    for t in &header.tensors {
        *dtypes.entry(format!("{:?}", t.dtype)).or_default() += 1;
    }
    let dtypes: Vec<String> = dtypes.iter().map(|(d, n)| format!("{n} {d}")).collect();
    println!(
        "file: {:.1} MB, {} tensors ({}); {}",
        header.file_bytes as f64 / 1e6,
        header.tensors.len(),
        dtypes.join(", "),
        if verify {
            "every value loaded and checked (--verify)"
        } else {
            "header checked, values not read (--verify loads and checks them)"
        }
    );
    println!("{}", sampling_summary(&header.scale_sizes)?);
    Ok(())
}

/// The schedule `sample` runs by default, as `inspect` and `convert` say it (the config's
/// steps_per_scale is the reference's training-time num_blocks_per_scale, not a sampling
/// setting).
fn sampling_summary(scale_sizes: &[usize]) -> Result<String> {
    let k = pipeline::DEFAULT_STEPS_PER_SCALE;
    let sched = Schedule::uniform(scale_sizes, k)?;
    Ok(format!(
        "scales {:?} ({} tokens); `sample` defaults to {k} steps per scale: {} serial steps \
         (cfg {}, from step {})",
        scale_sizes,
        sched.total_tokens(),
        sched.total_steps(),
        pipeline::DEFAULT_CFG,
        pipeline::DEFAULT_CFG_START_STEP
    ))
}

pub fn order(size: usize, json: bool, png: Option<PathBuf>, overwrite: bool) -> Result<()> {
    let rank = order::rank_map(size)?;
    if let Some(path) = &png {
        checkergen::paths::claim_output_file(path, overwrite, &[])?;
    }
    if let Some(path) = png {
        let (side, rgb) = checkergen::io::image::render_rank_map(&rank);
        checkergen::io::image::write_rgb_png(&path, side, side, &rgb)?;
        eprintln!("wrote {} ({side}x{side} px)", path.display());
    }
    if json {
        println!("{}", serde_json::json!({ "size": size, "rank": rank }));
    } else {
        let w = (size * size - 1).to_string().len();
        for row in &rank {
            let cells: Vec<String> = row.iter().map(|r| format!("{r:>w$}")).collect();
            println!("{}", cells.join(" "));
        }
    }
    Ok(())
}

/// Print the scale pyramid and serial step schedule.
#[derive(clap::Args)]
pub struct ScheduleArgs {
    /// Scale ratio r > 1: a number, or a power such as 2^(1/4), or sqrt(2).
    #[arg(long, value_name = "R", value_parser = parse_ratio)]
    scale_ratio: f64,
    /// Image side in pixels.
    #[arg(long, default_value_t = 256)]
    img_size: usize,
    /// Smallest scale side.
    #[arg(long, default_value_t = 1)]
    scale_min_size: usize,
    /// Serial steps per scale (the reference's num_blocks_per_scale).
    #[arg(long, default_value_t = checkergen::pipeline::DEFAULT_STEPS_PER_SCALE)]
    steps_per_scale: usize,
    /// VQ stride (pixels per latent cell).
    #[arg(long, default_value_t = 16)]
    vq_stride: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn schedule(a: ScheduleArgs) -> Result<()> {
    let ScheduleArgs {
        scale_ratio: ratio,
        img_size,
        scale_min_size: min_size,
        steps_per_scale: steps,
        vq_stride,
        json,
    } = a;
    if steps == 0 {
        bail!("--steps-per-scale must be at least 1");
    }
    if vq_stride == 0 || img_size == 0 || !img_size.is_multiple_of(vq_stride) {
        bail!("--img-size {img_size} must be a positive multiple of --vq-stride {vq_stride}");
    }
    let sizes = order::scale_sizes(img_size / vq_stride, ratio, min_size)
        .context("cannot build the scale pyramid")?;
    let sched = Schedule::uniform(&sizes, steps)?;
    if json {
        let scales: Vec<_> = sched
            .scales
            .iter()
            .map(|s| {
                serde_json::json!({"size": s.size, "tokens": s.tokens, "block": s.block,
                                   "steps": s.steps, "first_step": s.first_step})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"scale_sizes": sizes, "scales": scales,
                               "total_steps": sched.total_steps(),
                               "total_tokens": sched.total_tokens()})
        );
        return Ok(());
    }
    println!(
        "scale ratio {ratio} (img {img_size}, latent {}, min {min_size}, {steps} steps per scale)",
        img_size / vq_stride
    );
    println!(
        "{:>5} {:>5} {:>7} {:>6} {:>6} {:>6} {:>6}",
        "scale", "size", "tokens", "block", "steps", "first", "last"
    );
    for (i, s) in sched.scales.iter().enumerate() {
        println!(
            "{:>5} {:>5} {:>7} {:>6} {:>6} {:>6} {:>6}",
            i,
            s.size,
            s.tokens,
            s.block,
            s.steps,
            s.first_step,
            s.first_step + s.steps - 1
        );
    }
    println!(
        "total serial steps: {} ({} tokens in {} scales)",
        sched.total_steps(),
        sched.total_tokens(),
        sched.scales.len()
    );
    Ok(())
}

/// The model file `init` and `convert` write.
#[derive(Args)]
pub struct ModelOut {
    /// Storage dtype of float tensors.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    /// Output .safetensors file.
    #[arg(short = 'o', long = "out", visible_alias = "output")]
    out: PathBuf,
    /// Replace an existing output file.
    #[arg(long)]
    overwrite: bool,
}

/// Write a model file with random weights of a preset (no download needed).
#[derive(Args)]
pub struct InitArgs {
    /// tiny, S-2x, L-2x or L-4x.
    #[arg(long)]
    preset: String,
    /// Seed of the random weights (the same seed writes the same bytes).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    out: ModelOut,
}

/// Convert the authors' released checkpoint (.pth + YAML configs) to a model file.
#[derive(Args)]
pub struct ConvertArgs {
    /// The AR checkpoint (e.g. checkerboard-L-2x/checkpoint-last.pth).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The model's YAML config (e.g. checkerboard-L-2x/config.yaml).
    #[arg(long)]
    config: PathBuf,
    /// The autoencoder's YAML config (autoenc/autoencoder_config.yaml).
    #[arg(long)]
    autoenc_config: PathBuf,
    /// The VQ autoencoder checkpoint, for AR checkpoints without `autoenc.*` weights.
    #[arg(long)]
    autoenc_checkpoint: Option<PathBuf>,
    /// Use the EMA weights (`model_ema`) instead of `model`.
    #[arg(long)]
    ema: bool,
    /// Leave out the VQ encoder (smaller file; `encode` and `score` then refuse it).
    #[arg(long)]
    no_encoder: bool,
    #[command(flatten)]
    out: ModelOut,
}

/// `convert`: the authors' checkpoint and configs to a model file (written to a temporary
/// name and renamed; no input is ever the output).
pub fn convert(a: ConvertArgs) -> Result<()> {
    let mut inputs = vec![
        a.checkpoint.as_path(),
        a.config.as_path(),
        a.autoenc_config.as_path(),
    ];
    inputs.extend(a.autoenc_checkpoint.as_deref());
    checkergen::paths::claim_output_file(&a.out.out, a.out.overwrite, &inputs)?;
    let summary = checkergen::io::convert::convert(&checkergen::io::convert::ConvertOptions {
        checkpoint: a.checkpoint,
        config_yaml: a.config,
        autoenc_yaml: a.autoenc_config,
        autoenc_checkpoint: a.autoenc_checkpoint,
        ema: a.ema,
        no_encoder: a.no_encoder,
        dtype: a.out.dtype,
        output: a.out.out,
    })?;
    println!("{summary}");
    println!("{}", sampling_summary(&summary.scale_sizes)?);
    Ok(())
}

// The model-level subcommands (no sampler runs).
#[derive(clap::Subcommand)]
pub enum Cmd {
    Init(InitArgs),
    Convert(ConvertArgs),
    /// Print a model file's configuration, parameter counts and schedule, from its header
    /// (names, dtypes, shapes and offsets checked against the configuration; no tensor data
    /// read).
    Inspect {
        /// A model file from `checkergen convert` or `checkergen init`.
        model: PathBuf,
        /// Also load every tensor and check its values (finite, at most 65504 in magnitude),
        /// as `sample` does.
        #[arg(long)]
        verify: bool,
    },
    /// Print the progressive checkerboard rank map of an N x N grid.
    Order {
        /// Grid side N (>= 1).
        #[arg(long, value_name = "N")]
        size: usize,
        /// Print {"size": N, "rank": [[...], ...]} (rank[y][x]) instead of a table.
        #[arg(long)]
        json: bool,
        /// Also write a picture of the map (colour = rank, lines = quadtree levels).
        #[arg(long, value_name = "FILE")]
        png: Option<PathBuf>,
        /// Replace an existing --png file.
        #[arg(long)]
        overwrite: bool,
    },
    Schedule(ScheduleArgs),
}

impl Cmd {
    pub fn run(self) -> Result<()> {
        match self {
            Cmd::Init(a) => init(a),
            Cmd::Convert(a) => convert(a),
            Cmd::Inspect { model, verify } => inspect(&model, verify),
            Cmd::Order {
                size,
                json,
                png,
                overwrite,
            } => order(size, json, png, overwrite),
            Cmd::Schedule(a) => schedule(a),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_ratio;

    #[test]
    fn ratio_forms() {
        assert_eq!(parse_ratio("2").unwrap(), 2.0);
        assert_eq!(parse_ratio("2^(1/4)").unwrap(), 2f64.powf(0.25));
        assert_eq!(parse_ratio("sqrt(2)").unwrap(), 2f64.sqrt());
        assert_eq!(parse_ratio("2^0.5").unwrap(), 2f64.powf(0.5));
        assert!(parse_ratio("1").is_err());
        assert!(parse_ratio("abc").is_err());
        assert!(parse_ratio("0.5").is_err());
    }
}
