//! `checkergen bench`: the JSON fields docs/cli.md documents, consistent with each other, on the
//! CPU and on the emulated device (whose times mean nothing: only the fields and the path are
//! checked); bad arguments fail in one line.

mod common;

/// One parsed JSON object per line of stdout.
use common::json_lines as bench_json;

fn check_rows(rows: &[serde_json::Value], batches: &[u64], device: &str) {
    assert_eq!(rows.len(), batches.len());
    for (r, &b) in rows.iter().zip(batches) {
        assert_eq!(r["batch"], b);
        assert!(r["device"].as_str().unwrap().starts_with(device), "{r}");
        let f = |k: &str| {
            r[k].as_f64()
                .unwrap_or_else(|| panic!("field {k} missing or not a number: {r}"))
        };
        let steps = r["serial_steps"].as_u64().unwrap() as usize;
        // The tiny preset: ratio 2, 4 steps per scale: 1 + 4 * 4 serial steps, 5 scales.
        assert_eq!(steps, 17);
        let per_step = r["ms_per_step"].as_array().unwrap();
        assert_eq!(per_step.len(), steps);
        let by_scale = r["ms_by_scale"].as_array().unwrap();
        assert_eq!(by_scale.len(), 5);
        let sum = |v: &Vec<serde_json::Value>| v.iter().map(|x| x.as_f64().unwrap()).sum::<f64>();
        assert!((sum(per_step) - sum(by_scale)).abs() <= 1e-6 * sum(per_step).max(1.0));
        assert!(per_step.iter().all(|x| x.as_f64().unwrap() > 0.0));
        let s = f("s_per_batch");
        assert!(s > 0.0);
        assert!((f("images_per_s") - b as f64 / s).abs() <= 1e-9 * f("images_per_s"));
        // Medians of parts need not add up exactly; each part is within the batch's time.
        assert!(f("transformer_s") > 0.0 && f("decode_s") > 0.0);
        assert!(
            f("transformer_s") <= 1.05 * s && f("decode_s") <= 1.05 * s,
            "{r}"
        );
        assert!(r["peak_mem_bytes"].as_u64().unwrap() > 0);
        assert!(f("flops_per_image") > 1e9 && f("tflops") > 0.0);
    }
}

#[test]
fn bench_json_on_the_cpu() {
    let rows = bench_json(&[
        "bench", "--preset", "tiny", "--batch", "1,2", "--iters", "1", "--warmup", "0", "--device",
        "cpu", "--json",
    ]);
    check_rows(&rows, &[1, 2], "cpu");
    assert_eq!(rows[0]["times_meaningful"], true);
}

#[cfg(feature = "cuda")]
#[test]
fn bench_json_on_the_emulated_device() {
    let rows = bench_json(&[
        "bench", "--preset", "tiny", "--batch", "1", "--iters", "1", "--warmup", "0", "--device",
        "emu", "--json",
    ]);
    check_rows(&rows, &[1], "emu");
    assert_eq!(rows[0]["times_meaningful"], false);
}

#[test]
fn bench_refuses_bad_arguments() {
    for (args, want) in [
        (
            vec!["bench", "--preset", "tiny", "--batch", "0"],
            "at least 1",
        ),
        (vec!["bench", "--preset", "tiny", "--iters", "0"], "--iters"),
        (vec!["bench", "--preset", "huge"], "huge"),
        (
            vec![
                "bench", "--preset", "tiny", "--batch", "5000", "--device", "cpu",
            ],
            "per batch",
        ),
    ] {
        common::refused(&args, want);
    }
    // Every batch is checked before the table starts: nothing on stdout, one line on stderr.
    #[cfg(feature = "cuda")]
    {
        let args = [
            "bench",
            "--device",
            "emu",
            "--dry-run",
            "--preset",
            "tiny",
            "--batch",
            "1,5000",
        ];
        let (ok, out, err) = common::cli(&args);
        assert!(!ok && out.is_empty(), "{out}{err}");
        assert!(
            common::error_lines(&err) == 1 && err.contains("batch 5000"),
            "{err}"
        );
    }
}
