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
    for (args, want) in [
        (
            vec!["steps", "--model", "m.safetensors", "--ratios", "2"],
            "--ratios",
        ),
        (
            vec!["steps", "--preset", "tiny", "--steps-per-scale", "0"],
            "at least 1",
        ),
        (
            vec!["steps", "--preset", "tiny", "--batch", "0"],
            "at least 1",
        ),
        // Counts that would run for ever are refused before anything runs (issue 22 item 5).
        (
            vec![
                "steps",
                "--preset",
                "tiny",
                "--iters",
                "18446744073709551615",
            ],
            "must be 1 to 10000",
        ),
        (
            vec!["steps", "--preset", "tiny", "--warmup", "10001"],
            "at most 10000",
        ),
        (
            vec!["bench", "--preset", "tiny", "--iters", "10001"],
            "must be 1 to 10000",
        ),
        (
            vec!["steps", "--preset", "tiny", "--steps", "1,x"],
            "--steps",
        ),
        (vec!["steps", "--preset", "tiny", "--ratios", "1"], "ratio"),
        // Targets that no schedule meets: an error, not an empty table with rc 0 (issue 22
        // item 3); 4 serial steps cannot cover 5 scales.
        (
            vec!["steps", "--preset", "tiny", "--total-steps", "4"],
            "nothing to measure: ratio 2: no per-scale steps give 4 serial steps",
        ),
    ] {
        common::refused(&args, want);
    }
}
