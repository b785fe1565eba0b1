//! `checkergen` command line: parse, call the library, print. No model logic lives here.

use anyhow::{Context, Result, bail};
use checkergen::model::file::Dtype;
use checkergen::order::{self, Schedule};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

mod bench_cmd;
mod commands;
mod generate_cmd;
mod score_commands;
mod steps_cmd;

#[derive(Parser)]
#[command(
    name = "checkergen",
    version,
    about = "Progressive Checkerboard image sampling engine"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
    /// Print the scale pyramid and serial step schedule.
    Schedule(ScheduleArgs),
    /// Sample images (tokens, PNGs, run.json) from a model file or, without --model, from
    /// the tiny preset with random weights.
    Sample(commands::SampleArgs),
    /// Write a model file with random weights of a preset (no download needed).
    Init {
        /// tiny, S-2x, L-2x or L-4x.
        #[arg(long)]
        preset: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Storage dtype of float tensors.
        #[arg(long, value_enum, default_value_t = Dtype::F32)]
        dtype: Dtype,
        /// Output .safetensors file.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        /// Replace an existing output file.
        #[arg(long)]
        overwrite: bool,
    },
    /// Convert the authors' released checkpoint (.pth + YAML configs) to a model file.
    Convert {
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
        /// Storage dtype of float tensors.
        #[arg(long, value_enum, default_value_t = Dtype::F32)]
        dtype: Dtype,
        /// Output .safetensors file.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        /// Replace an existing output file.
        #[arg(long)]
        overwrite: bool,
    },
    /// Benchmark the whole sampler (token loop + decode) over batch sizes: images/s, ms per
    /// serial step and scale, transformer/decoder split, peak memory, TFLOP/s, % of floor.
    Bench(bench_cmd::BenchArgs),
    /// Sweep scale ratios x steps per scale (or total-step targets): serial steps, tokens,
    /// FLOPs, latency at batch 1 and images/s at --batch; table, JSON, PNG chart.
    Steps(steps_cmd::StepsArgs),
    /// Evaluation sample files of any size (the ADM evaluator's .npz, or a PNG folder),
    /// class-balanced, deterministic by image index; --shard k/N for many machines.
    Generate(generate_cmd::GenerateArgs),
    /// Reassemble the shard files of one `generate` run into one file, in index order.
    Merge(generate_cmd::MergeArgs),
    /// Benchmark the GPU VQ decoder: images/s, ms per batch, TFLOP/s, % of peak, memory.
    BenchDecode(commands::BenchDecodeArgs),
    /// Encode real images (PNG) into their code pyramids (a tokens file).
    Encode(score_commands::EncodeArgs),
    /// Decode the last scale of a tokens file to PNGs (reconstructions).
    Decode(score_commands::DecodeArgs),
    /// Teacher-forced likelihood of real images (loss per scale, bits per token, top-1) at one
    /// or more step counts, with the block-causal mask (SPEC.md section 9).
    Score(score_commands::ScoreArgs),
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
}

/// Parse a scale ratio: `2`, `1.5`, `2^(1/4)`, `2^0.5`, `sqrt(2)`.
fn parse_ratio(s: &str) -> Result<f64, String> {
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

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || matches!(
                    e.kind(),
                    ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                )
            {
                e.exit();
            }
            // One clear line: clap's first line, without the usage block.
            let text = e.render().to_string();
            eprintln!("{}", text.lines().next().unwrap_or("invalid arguments"));
            std::process::exit(2);
        }
    };
    if let Err(e) = run(cli) {
        // `{:#}` joins the context chain on one line.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    // No output of this process may be one of its inputs (paths::guard_inputs).
    checkergen::paths::guard_inputs();
    match cli.cmd {
        Cmd::Order {
            size,
            json,
            png,
            overwrite,
        } => cmd_order(size, json, png, overwrite),
        Cmd::Schedule(args) => cmd_schedule(args),
        Cmd::Sample(args) => commands::sample(args),
        Cmd::Init {
            preset,
            seed,
            dtype,
            output,
            overwrite,
        } => commands::init(&preset, seed, dtype, &output, overwrite),
        Cmd::Inspect { model, verify } => commands::inspect(&model, verify),
        Cmd::Bench(args) => bench_cmd::bench(args),
        Cmd::Generate(args) => generate_cmd::generate(args),
        Cmd::Merge(args) => generate_cmd::merge(args),
        Cmd::Steps(args) => steps_cmd::steps(args),
        Cmd::BenchDecode(args) => commands::bench_decode(args),
        Cmd::Encode(args) => score_commands::encode(args),
        Cmd::Decode(args) => score_commands::decode(args),
        Cmd::Score(args) => score_commands::score(args),
        Cmd::Convert {
            checkpoint,
            config,
            autoenc_config,
            autoenc_checkpoint,
            ema,
            no_encoder,
            dtype,
            output,
            overwrite,
        } => {
            let mut inputs = vec![
                checkpoint.as_path(),
                config.as_path(),
                autoenc_config.as_path(),
            ];
            inputs.extend(autoenc_checkpoint.as_deref());
            checkergen::paths::claim_output_file(&output, overwrite, &inputs)?;
            let summary =
                checkergen::io::convert::convert(&checkergen::io::convert::ConvertOptions {
                    checkpoint,
                    config_yaml: config,
                    autoenc_yaml: autoenc_config,
                    autoenc_checkpoint,
                    ema,
                    no_encoder,
                    dtype,
                    output,
                })?;
            println!("{summary}");
            Ok(())
        }
    }
}

fn cmd_order(size: usize, json: bool, png: Option<PathBuf>, overwrite: bool) -> Result<()> {
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

/// Arguments of `checkergen schedule`.
#[derive(clap::Args)]
struct ScheduleArgs {
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

fn cmd_schedule(a: ScheduleArgs) -> Result<()> {
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
