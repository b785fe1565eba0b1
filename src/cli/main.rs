//! `checkergen` command line: parse, call the library, print. No model logic lives here.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

mod args;
mod bench;
mod eval;
mod generate;
mod model;
mod sample;
mod score;
mod steps;

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
    Schedule(model::ScheduleArgs),
    /// Sample images (tokens, PNGs, run.json) from a model file or, without --model, from
    /// the tiny preset with random weights.
    Sample(sample::SampleArgs),
    /// Write a model file with random weights of a preset (no download needed).
    Init(model::InitArgs),
    /// Convert the authors' released checkpoint (.pth + YAML configs) to a model file.
    Convert(model::ConvertArgs),
    /// Benchmark the whole sampler (token loop + decode) over batch sizes: images/s, ms per
    /// serial step and scale, transformer/decoder split, peak memory, TFLOP/s, % of floor.
    Bench(bench::BenchArgs),
    /// Sweep scale ratios x steps per scale (or total-step targets): serial steps, tokens,
    /// FLOPs, latency at batch 1 and images/s at --batch; table, JSON, PNG chart.
    Steps(steps::StepsArgs),
    /// Evaluation sample files of any size (the ADM evaluator's .npz, or a PNG folder),
    /// class-balanced, deterministic by image index; --shard k/N for many machines.
    Generate(generate::GenerateArgs),
    /// Reassemble the shard files of one `generate` run into one file, in index order.
    Merge(generate::MergeArgs),
    /// Benchmark the GPU VQ decoder: images/s, ms per batch, TFLOP/s, % of peak, memory.
    BenchDecode(bench::BenchDecodeArgs),
    /// Encode real images (PNG, JPEG, or .npz arrays) into their code pyramids (a tokens file).
    Encode(score::EncodeArgs),
    /// Decode the last scale of a tokens file to PNGs (reconstructions).
    Decode(score::DecodeArgs),
    /// Teacher-forced likelihood of real images (loss per scale, bits per token, top-1) at one
    /// or more step counts, with the block-causal mask (SPEC.md section 9).
    Score(score::ScoreArgs),
    /// The ADM evaluator's five numbers (Inception Score, FID, sFID, precision, recall)
    /// without TensorFlow, from images or activation files; or one input's activation file.
    Eval(eval::EvalArgs),
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

fn main() {
    // A closed pipe (`checkergen bench | head`) ends the process as it does any Unix tool,
    // rather than making every print panic.
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_DFL before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse_from(underscore_aliases(std::env::args_os())) {
        Ok(c) => c,
        // clap's whole message: the error line, its tip ("a similar argument exists") and
        // the usage of the subcommand; exit code 2 for a usage error, 0 for --help.
        Err(e) => e.exit(),
    };
    if let Err(e) = run(cli) {
        // `{:#}` joins the context chain on one line.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The authors' scripts spell options with underscores (`--steps_per_scale`): each such
/// option that is one of ours with hyphens is taken as ours. Values, and anything after a
/// bare `--`, are left alone.
fn underscore_aliases(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let mut longs = std::collections::HashSet::new();
    for sub in cmd.get_subcommands() {
        for arg in sub.get_arguments() {
            longs.extend(arg.get_long().map(str::to_string));
        }
    }
    let mut rest = false;
    args.map(|a| {
        let Some(s) = a.to_str() else { return a };
        if rest || s == "--" {
            rest = true;
            return a;
        }
        let Some(body) = s.strip_prefix("--") else {
            return a;
        };
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        let hyphen = name.replace('_', "-");
        if name.contains('_') && longs.contains(&hyphen) {
            match value {
                Some(v) => format!("--{hyphen}={v}").into(),
                None => format!("--{hyphen}").into(),
            }
        } else {
            a
        }
    })
    .collect()
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
        } => model::order(size, json, png, overwrite),
        Cmd::Schedule(args) => model::schedule(args),
        Cmd::Sample(args) => sample::sample(args),
        Cmd::Init(args) => model::init(args),
        Cmd::Inspect { model, verify } => model::inspect(&model, verify),
        Cmd::Bench(args) => bench::bench(args),
        Cmd::Generate(args) => generate::generate(args),
        Cmd::Merge(args) => generate::merge(args),
        Cmd::Steps(args) => steps::steps(args),
        Cmd::BenchDecode(args) => bench::bench_decode(args),
        Cmd::Encode(args) => score::encode(args),
        Cmd::Decode(args) => score::decode(args),
        Cmd::Score(args) => score::score(args),
        Cmd::Eval(args) => eval::eval(args),
        Cmd::Convert(args) => model::convert(args),
    }
}
