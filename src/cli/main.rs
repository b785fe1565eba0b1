//! `checkergen` command line: parse, call the library, print. No model logic lives here.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod args;
mod bench;
mod eval;
mod generate;
mod model;
mod progress;
mod sample;
mod score;
mod steps;

/// `--version`: the crate's version and the GPU kernel images build.rs embedded (cubins from
/// nvcc, or sources for NVRTC at run time).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "; GPU kernels: ",
    env!("CHECKERGEN_KERNELS")
);

#[derive(Parser)]
#[command(
    name = "checkergen",
    version = VERSION,
    about = "Progressive Checkerboard image sampling engine"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// The subcommands, grouped by use; each group's file lists its own (`#[command(flatten)]`).
// Comments, not doc comments, on the subcommand enums: clap would take those as help text.
#[derive(Subcommand)]
enum Cmd {
    Sample(sample::SampleArgs),
    #[command(flatten)]
    Sets(generate::Cmd),
    #[command(flatten)]
    Timing(bench::Cmd),
    Steps(steps::StepsArgs),
    #[command(flatten)]
    RealImages(score::Cmd),
    Eval(eval::EvalArgs),
    #[command(flatten)]
    Models(model::Cmd),
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
        Cmd::Sample(args) => sample::sample(args),
        Cmd::Sets(cmd) => cmd.run(),
        Cmd::Timing(cmd) => cmd.run(),
        Cmd::Steps(args) => steps::steps(args),
        Cmd::RealImages(cmd) => cmd.run(),
        Cmd::Eval(args) => eval::eval(args),
        Cmd::Models(cmd) => cmd.run(),
    }
}
