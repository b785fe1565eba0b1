//! `checkergen steps`: the sweep's JSON fields (docs/cli.md), the schedules it picks (uniform,
//! explicit lists, total-step targets), the chart's size, on the CPU and the emulated device;
//! a model file fixes the ratio.

mod common;

use common::json_lines as sweep;

fn png_size(p: &std::path::Path) -> (u32, u32) {
    let b = std::fs::read(p).unwrap();
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n");
    let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    (be(16), be(20))
}

#[test]
fn sweep_on_the_cpu() {
    let png = std::env::temp_dir().join(format!("cg-steps-{}.png", std::process::id()));
    let rows = sweep(&[
        "steps",
        "--preset",
        "tiny",
        "--ratios",
        "2,4",
        "--steps-per-scale",
        "1",
        "--total-steps",
        "9",
        "--steps",
        "1,2,3,4,5",
        "--batch",
        "2",
        "--warmup",
        "0",
        "--iters",
        "1",
        "--device",
        "cpu",
        "--json",
        "--png",
        png.to_str().unwrap(),
    ]);
    // Ratio 2 (scales 1, 2, 4, 8, 16): uniform 1, the explicit 5-scale list, total 9.
    // Ratio 4 (scales 1, 4, 16): uniform 1 and total 9 (the 5-value list does not fit).
    let got: Vec<(f64, Vec<u64>)> = rows
        .iter()
        .map(|r| {
            let l = r["steps_per_scale"].as_array().unwrap();
            (
                r["ratio"].as_f64().unwrap(),
                l.iter().map(|x| x.as_u64().unwrap()).collect(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (2.0, vec![1, 1, 1, 1, 1]),
            (2.0, vec![1, 2, 3, 4, 5]),
            (2.0, vec![1, 2, 2, 2, 2]),
            (4.0, vec![1, 1, 1]),
            (4.0, vec![1, 4, 4]),
        ]
    );
    for r in &rows {
        // Serial steps are what the schedule realizes (blocks of s*s / k tokens: asking
        // [1, 2, 3, 4, 5] of scales 1..16 gives 1 + 2 + 4 + 4 + 6 = 17).
        let by_scale = r["steps_by_scale"].as_array().unwrap();
        let total: u64 = by_scale.iter().map(|x| x.as_u64().unwrap()).sum();
        assert_eq!(r["serial_steps"].as_u64().unwrap(), total, "{r}");
        let sizes = r["scale_sizes"].as_array().unwrap();
        let tokens: u64 = sizes.iter().map(|s| s.as_u64().unwrap().pow(2)).sum();
        assert_eq!(r["tokens"].as_u64().unwrap(), tokens);
        for k in ["flops_per_image", "latency_s", "images_per_s"] {
            assert!(r[k].as_f64().unwrap() > 0.0, "{k}: {r}");
        }
        assert_eq!(r["batch"], 2);
        assert!(r["device"].as_str().unwrap().starts_with("cpu"));
    }
    assert_eq!(
        rows[1]["steps_by_scale"],
        serde_json::json!([1, 2, 4, 4, 6])
    );
    // The total-step targets are met exactly.
    assert_eq!(rows[2]["serial_steps"], 9);
    assert_eq!(rows[4]["serial_steps"], 9);
    assert_eq!(png_size(&png), (1200, 480));
    std::fs::remove_file(&png).ok();
}

#[cfg(feature = "cuda")]
#[test]
fn sweep_on_the_emulated_device() {
    let rows = sweep(&[
        "steps",
        "--preset",
        "tiny",
        "--steps-per-scale",
        "1",
        "--batch",
        "1",
        "--warmup",
        "0",
        "--iters",
        "1",
        "--device",
        "emu",
        "--json",
    ]);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["serial_steps"], 5);
    assert_eq!(rows[0]["times_meaningful"], false);
    assert!(rows[0]["device"].as_str().unwrap().starts_with("emu"));
}

#[test]
fn a_model_file_fixes_the_ratio_and_bad_values_fail_in_one_line() {
    // Each case: the arguments (split at spaces), the error's words.
    for (args, want) in [
        ("steps --model m.safetensors --ratios 2", "--ratios"),
        ("steps --preset tiny --steps-per-scale 0", "at least 1"),
        ("steps --preset tiny --batch 0", "at least 1"),
        // Counts that would run for ever are refused before anything runs (issue 22 item 5).
        (
            "steps --preset tiny --iters 18446744073709551615",
            "must be 1 to 10000",
        ),
        ("steps --preset tiny --warmup 10001", "at most 10000"),
        ("bench --preset tiny --iters 10001", "must be 1 to 10000"),
        ("steps --preset tiny --steps 1,x", "--steps"),
        ("steps --preset tiny --ratios 1", "ratio"),
        // Targets that no schedule meets: an error, not an empty table with rc 0 (issue 22
        // item 3); 4 serial steps cannot cover 5 scales.
        (
            "steps --preset tiny --total-steps 4",
            "nothing to measure: ratio 2: no per-scale steps give 4 serial steps",
        ),
    ] {
        common::refused(&words(args), want);
    }
}

/// The arguments of a command line without quoted spaces.
fn words(line: &str) -> Vec<&str> {
    line.split(' ').collect()
}

/// Every configuration is warmed up (at least once, `--warmup 0` included) before any is
/// timed, and the timed runs go round-robin: repeat r of every configuration before repeat
/// r + 1 of any (issue 23 item 8: one-time costs no longer land on the first configuration).
/// `run_order` numbers each configuration's sampler runs in the sweep.
#[test]
fn warm_up_first_then_timed_runs_round_robin() {
    let rows = sweep(&words(
        "steps --preset tiny --steps-per-scale 1,2,4 --batch 2 --warmup 0 --iters 3 \
         --device cpu --json",
    ));
    assert_eq!(rows.len(), 3);
    let order: Vec<Vec<u64>> = rows
        .iter()
        .map(|r| {
            assert_eq!(r["warmup"], 1, "{r}");
            let o = r["run_order"].as_array().unwrap();
            o.iter().map(|x| x.as_u64().unwrap()).collect()
        })
        .collect();
    // Per configuration: 1 warm-up each at batch 1 and 2, then 3 x (batch 1, batch 2).
    for o in &order {
        assert_eq!(o.len(), 2 + 2 * 3, "{order:?}");
    }
    let mut all: Vec<u64> = order.iter().flatten().copied().collect();
    all.sort();
    assert_eq!(all, (0..all.len() as u64).collect::<Vec<_>>(), "{order:?}");
    let last_warm = order.iter().map(|o| o[1]).max().unwrap();
    let first_timed = order.iter().map(|o| o[2]).min().unwrap();
    assert!(last_warm < first_timed, "{order:?}");
    for r in 0..2 {
        let end_r = order.iter().map(|o| o[3 + 2 * r]).max().unwrap();
        let start_next = order.iter().map(|o| o[2 + 2 * (r + 1)]).min().unwrap();
        assert!(end_r < start_next, "repeat {r}: {order:?}");
    }
}

/// `steps` opens its table with the line `bench` opens its own with (model, device, guidance,
/// repeats); stderr, not a terminal here, holds no progress bar.
#[test]
fn steps_and_bench_say_the_model_and_device() {
    let (ok, out, err) = common::cli(&words(
        "steps --preset tiny --steps-per-scale 1 --batch 1 --iters 1 --device cpu",
    ));
    assert!(ok, "{err}");
    let first = out.lines().next().unwrap_or_default();
    for want in [
        "steps: preset tiny at ratio 2 (random weights",
        " on cpu",
        "cfg ",
        "1 configuration: latency at batch 1, images/s at batch 1; all warmed up first, then \
         timed round-robin",
        "1 warm-up + median of 1 runs",
    ] {
        assert!(first.contains(want), "{want:?} not in {first:?}");
    }
    assert!(!err.contains("runs,") && !err.contains('\r'), "{err}");
    let (ok, out, err) = common::cli(&words(
        "bench --preset tiny --batch 1 --iters 1 --device cpu",
    ));
    assert!(ok, "{err}");
    let first = out.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("bench: preset tiny (random weights) on cpu")
            && first.contains("1 warm-up + median of 1 runs"),
        "{first:?}"
    );
    assert!(!err.contains("runs,") && !err.contains('\r'), "{err}");
}
