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
