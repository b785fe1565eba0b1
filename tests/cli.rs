//! Run the `checkergen` binary: JSON output matches the library; bad input fails cleanly.

use checkergen::order::{Schedule, rank_map, scale_sizes};
use std::process::{Command, Output};

mod common;
use common::argv;

fn run<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_checkergen"))
        .args(args)
        .output()
        .expect("cannot run checkergen")
}

fn stdout_json<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> serde_json::Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is not JSON")
}

/// A failing run: non-zero exit, a message on stderr, no panic.
pub fn assert_clean_failure<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(
    args: &[S],
    fragment: &str,
) {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(
        err.to_lowercase().contains(&fragment.to_lowercase()),
        "{args:?}: stderr {err:?} lacks {fragment:?}"
    );
    assert_eq!(
        common::error_lines(&err),
        1,
        "{args:?}: not one line: {err}"
    );
}

#[test]
fn order_json_matches_library() {
    for n in [1usize, 2, 5, 8, 13] {
        let v = stdout_json(&["order", "--size", &n.to_string(), "--json"]);
        assert_eq!(v["size"], n);
        let rank: Vec<Vec<usize>> = serde_json::from_value(v["rank"].clone()).unwrap();
        assert_eq!(rank, rank_map(n).unwrap());
    }
}

#[test]
fn order_table_and_png() {
    let out = run(&["order", "--size", "4"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<Vec<usize>> = text
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(rows, rank_map(4).unwrap());

    let dir = std::env::temp_dir().join(format!("cg-order-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("o.png");
    let out = run(&["order", "--size", "6", "--png", png.to_str().unwrap()]);
    assert!(out.status.success());
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let reader = dec.read_info().unwrap();
    assert!(reader.info().width >= 256 && reader.info().width == reader.info().height);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn schedule_json_matches_library() {
    for (r, k) in [
        ("2", 4usize),
        ("4", 8),
        ("3", 4),
        ("2^(1/4)", 4),
        ("sqrt(2)", 2),
    ] {
        let v = stdout_json(&[
            "schedule",
            "--scale-ratio",
            r,
            "--steps-per-scale",
            &k.to_string(),
            "--json",
        ]);
        let ratio = match r {
            "2^(1/4)" => 2f64.powf(0.25),
            "sqrt(2)" => 2f64.sqrt(),
            _ => r.parse().unwrap(),
        };
        let sizes = scale_sizes(16, ratio, 1).unwrap();
        let sched = Schedule::uniform(&sizes, k).unwrap();
        let got: Vec<usize> = serde_json::from_value(v["scale_sizes"].clone()).unwrap();
        assert_eq!(got, sizes);
        assert_eq!(v["total_steps"], sched.total_steps());
        for (j, s) in sched.scales.iter().enumerate() {
            let e = &v["scales"][j];
            assert_eq!(e["size"], s.size);
            assert_eq!(e["tokens"], s.tokens);
            assert_eq!(e["block"], s.block);
            assert_eq!(e["steps"], s.steps);
        }
    }
    let v = stdout_json(&["schedule", "--scale-ratio", "2", "--json"]);
    assert_eq!(v["total_steps"], 17);
}

#[test]
fn schedule_table_lists_totals() {
    let out = run(&["schedule", "--scale-ratio", "2", "--steps-per-scale", "8"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("total serial steps: 29"), "{text}");
}

#[test]
fn bad_arguments_fail_cleanly() {
    // (arguments, split at spaces; what the one-line error says)
    let cases = [
        ("order --size 0", "at least 1"),
        ("order --size abc", "invalid"),
        ("order --size -3", "error"),
        ("schedule --scale-ratio 1", "greater than 1"),
        ("schedule --scale-ratio 0.5", "greater than 1"),
        ("schedule --scale-ratio two", "not a number"),
        ("schedule --scale-ratio 40", "rounds to 0"),
        ("schedule --scale-ratio 2 --steps-per-scale 0", "at least 1"),
        ("schedule --scale-ratio 2 --img-size 0", "img-size"),
        ("schedule --scale-ratio 2 --scale-min-size 0", "at least 1"),
        (
            "order --size 4 --png /nonexistent-dir/x.png",
            "cannot create",
        ),
        ("frobnicate", "unrecognized"),
    ];
    for (args, want) in cases {
        assert_clean_failure(&args.split(' ').collect::<Vec<_>>(), want);
    }
}

/// `init` with one seed writes the same bytes every time (issue 22 item 9; the safetensors
/// metadata used to come out in a hash map's order).
#[test]
fn init_is_byte_reproducible() {
    let d = std::env::temp_dir().join(format!("cg-cli-init-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let files: Vec<Vec<u8>> = (0..3)
        .map(|i| {
            let p = d.join(format!("m{i}.safetensors"));
            let o = run(&[
                "init",
                "--preset",
                "tiny",
                "--seed",
                "3",
                "-o",
                p.to_str().unwrap(),
            ]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            std::fs::read(&p).unwrap()
        })
        .collect();
    assert!(
        files[0] == files[1] && files[1] == files[2],
        "init outputs differ"
    );
    std::fs::remove_dir_all(&d).ok();
}

/// A usage error is clap's whole message: the error line names what is wrong, a tip follows
/// where clap has one, then the usage; exit code 2.
#[test]
fn usage_errors_keep_clap_message() {
    let out = run(&["sample", "--num-samples", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--out"),
        "the missing option is not named: {err}"
    );
    assert!(err.contains("Usage:"), "{err}");
    let out = run(&["schedule", "--scale-ratio", "2", "--steps-per-scal", "2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("similar argument") && err.contains("--steps-per-scale"),
        "{err}"
    );
}

/// The authors' underscore spellings of our options are the same options; other
/// underscore names are still unknown.
#[test]
fn underscore_spellings_are_aliases() {
    let hyphen = stdout_json(&argv(
        "schedule --scale-ratio 2 --steps-per-scale 3 --json",
        &[],
    ));
    let under = stdout_json(&argv(
        "schedule --scale_ratio 2 --steps_per_scale=3 --json",
        &[],
    ));
    assert_eq!(hyphen, under);
    assert_eq!(
        hyphen["total_steps"],
        Schedule::uniform(&[1, 2, 4, 8, 16], 3)
            .unwrap()
            .total_steps()
    );
    let out = run(&argv(
        "schedule --scale_ratio 2 --no_such_option --json",
        &[],
    ));
    assert!(!out.status.success());
}

/// A path in the temporary folder for test file `name`, this process's own.
fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("cg-cli-{}-{name}", std::process::id()))
}

/// `init` draws tensor by tensor (for its progress): the values are those of the library's
/// one draw of the whole map, and stderr, not a terminal here, holds no progress.
#[test]
fn init_writes_the_library_draw_without_progress_noise() {
    use checkergen::model::file::load_safetensors;
    let p = tmp("init-draw.safetensors");
    let o = run(&[
        "init",
        "--preset",
        "tiny",
        "--seed",
        "5",
        "--overwrite",
        "--out",
        p.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(err, "", "init printed on stderr");
    let (got, _) = load_safetensors(&p).unwrap();
    let cfg = checkergen::model::config::preset("tiny").unwrap();
    let want = checkergen::model::init::random_tensors(&cfg, 5).unwrap();
    assert_eq!(got.len(), want.len());
    let mut worst = 0f32;
    for (name, t) in &want {
        let g = &got[name];
        assert_eq!(g.shape, t.shape, "{name}");
        for (a, b) in g.data.iter().zip(&t.data) {
            worst = worst.max((a - b).abs());
        }
    }
    println!(
        "init vs random_tensors: {} tensors, worst |diff| {worst:e}",
        want.len()
    );
    assert_eq!(worst, 0.0);
    std::fs::remove_file(&p).ok();
}

/// The tiny preset at 64 px with the released models' training-time steps_per_scale (8),
/// written to a file of test `name`.
fn tiny64_trained_8(name: &str) -> String {
    use checkergen::model::config::{ModelConfig, preset};
    let cfg = ModelConfig {
        img_size: 64,
        steps_per_scale: 8,
        ..preset("tiny").unwrap()
    };
    let m = tmp(&format!("{name}.safetensors"));
    let map = checkergen::model::init::random_tensors(&cfg, 8).unwrap();
    checkergen::model::file::write_model(&m, &cfg, &map, checkergen::model::file::Dtype::F32, &[])
        .unwrap();
    m.to_str().unwrap().to_string()
}

/// The run record of `cmd` on the CPU with the model of [`tiny64_trained_8`] into `out`
/// (a name in the temporary folder), then `extra` (split at spaces): it must succeed, and
/// `read` takes the record from the output.
fn record_of(
    cmd: &str,
    out: &str,
    extra: &str,
    read: impl Fn(&std::path::Path) -> Vec<u8>,
) -> serde_json::Value {
    let m = tiny64_trained_8(cmd);
    let out = tmp(out);
    let mut args = vec![cmd, "--model", &m, "--device", "cpu", "--overwrite"];
    args.extend(["--out", out.to_str().unwrap()]);
    args.extend(extra.split(' '));
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let record = serde_json::from_slice(&read(&out)).unwrap();
    std::fs::remove_file(&m).ok();
    std::fs::remove_dir_all(&out)
        .or_else(|_| std::fs::remove_file(&out))
        .ok();
    record
}

/// A run record (`what`) names the steps that ran: `schedule` holds the realized steps per
/// scale and their total; its configuration's steps_per_scale is the training-time value
/// it is (`trained_steps_per_scale`), never `steps_per_scale`.
fn assert_records(what: &str, record: &serde_json::Value, schedule: &str, ran: &[u64]) {
    let config = &record["config"];
    assert_eq!(config["trained_steps_per_scale"], 8, "{what}: {config}");
    assert!(config.get("steps_per_scale").is_none(), "{what}: {config}");
    let sched = if schedule.is_empty() {
        record
    } else {
        &record[schedule]
    };
    assert_eq!(sched["steps_per_scale"], serde_json::json!(ran), "{what}");
    assert_eq!(sched["total_steps"], ran.iter().sum::<u64>(), "{what}");
}

/// Issue 23 item 8: the model's `steps_per_scale: 8` is the training-time value; sampling
/// runs 4 by default (scales 1, 2, 4 realize 1, 4, 4). sample's run.json records what ran.
#[test]
fn run_json_records_the_steps_that_ran() {
    let read = |out: &std::path::Path| std::fs::read(out.join("run.json")).unwrap();
    let j = record_of("sample", "run-json-steps", "--labels 1", read);
    assert_records("run.json", &j, "schedule", &[1, 4, 4]);
}

/// The same for `generate`'s checkergen.json (the npz metadata), with --steps-per-scale 2.
#[test]
fn npz_metadata_records_the_steps_that_ran() {
    let read = |out: &std::path::Path| {
        checkergen::io::pth::read_zip_entry(out, "checkergen.json").unwrap()
    };
    let extra = "--num-samples 2 --steps-per-scale 2 --quiet";
    let meta = record_of("generate", "npz-steps.npz", extra, read);
    assert_records("checkergen.json", &meta, "", &[1, 2, 2]);
}

/// `convert` prints the checkpoint's steps_per_scale as the training-time value and the
/// steps `sample` runs; `inspect` says only the latter.
#[test]
fn convert_and_inspect_say_the_steps_sampling_runs() {
    let out = tmp("convert-steps.safetensors");
    let fx = |n: &str| common::fixture("pth").join(n).to_str().unwrap().to_string();
    let o = run(&[
        "convert",
        "--checkpoint",
        &fx("tiny.pth"),
        "--config",
        &fx("tiny_config.yaml"),
        "--autoenc-config",
        &fx("tiny_autoencoder.yaml"),
        "--overwrite",
        "--out",
        out.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for want in [
        "trained with 8 steps per scale (not a sampling setting)",
        "`sample` defaults to 4 steps per scale",
    ] {
        assert!(
            text.contains(want),
            "convert's summary lacks {want:?}:\n{text}"
        );
    }
    assert!(!text.contains("steps_per_scale"), "{text}");
    let o = run(&["inspect", out.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        text.contains("`sample` defaults to 4 steps per scale"),
        "{text}"
    );
    assert!(
        !text.contains("8 steps") && !text.contains("steps_per_scale"),
        "{text}"
    );
    std::fs::remove_file(&out).ok();
}

/// `--version` says which GPU kernel images the build embedded (build.rs no longer warns
/// on every build when nvcc is missing).
#[test]
fn version_names_the_kernel_images() {
    let o = run(&["--version"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    let kernels = text
        .trim()
        .strip_prefix(&format!(
            "checkergen {}; GPU kernels: ",
            env!("CARGO_PKG_VERSION")
        ))
        .unwrap_or_else(|| panic!("{text}"));
    let want = if cfg!(feature = "cuda") {
        ["cubins", "NVRTC"].as_slice()
    } else {
        ["CPU only"].as_slice()
    };
    assert!(want.iter().any(|w| kernels.contains(w)), "{text}");
}
