//! CUDA graphs: a batch shape's token loop recorded once and replayed gives exactly the
//! tokens and pixels of eager launches, with new labels, seeds and image offsets on every
//! replay. On the host emulator a recording is the list of launches, GEMMs and memsets, so
//! the capture and replay code paths run in CI; on a GPU they are CUDA stream capture and
//! graph launches. During a capture, transfers, synchronization and allocation are refused.

mod common;

#[cfg(feature = "cuda")]
mod graph {
    use super::common;
    use checkergen::cuda::engine::{GpuBackend, GpuModel};
    use checkergen::cuda::norm::add_bias_f32;
    use checkergen::model::Model;
    use checkergen::model::config::{ModelConfig, preset};
    use checkergen::model::init::random_tensors;
    use checkergen::pipeline::{self, SampleOptions};

    /// The tiny preset at 64 px (scales 1, 2, 4).
    fn tiny64() -> Model {
        let cfg = ModelConfig {
            img_size: 64,
            ..preset("tiny").unwrap()
        };
        Model::from_tensors(cfg.clone(), &random_tensors(&cfg, 5).unwrap()).unwrap()
    }

    /// Batch `k` of a run: three images of new classes, its own seed and image offset.
    fn batch(k: usize, graph: bool) -> SampleOptions {
        let mut o = SampleOptions::new((0..3).map(|i| (k * 3 + i) % 10).collect());
        o.seed = 40 + (k % 3) as u64;
        o.image_offset = 3 * (k % 3);
        o.graph = graph;
        o
    }

    #[test]
    fn replayed_loops_equal_eager_launches() {
        let gpu = common::gpu("gpu graphs");
        let gm = GpuModel::new(gpu, &tiny64()).unwrap();
        let runs = 4; // eager warm-up, capture (then replay), replay, replay (batch 0 again)
        let eager: Vec<_> = (0..runs)
            .map(|k| pipeline::sample(&mut GpuBackend::new(&gm), &batch(k, false)).unwrap())
            .collect();
        let mut be = GpuBackend::new(&gm);
        for (k, want) in eager.iter().enumerate() {
            let got = pipeline::sample(&mut be, &batch(k, true)).unwrap();
            assert!(!want.tokens.replayed, "--no-graph replayed a graph");
            assert_eq!(
                got.tokens.replayed,
                k >= 1,
                "batch {k}: run {} as a graph",
                if k >= 1 { "not" } else { "" }
            );
            assert_eq!(got.tokens.tokens, want.tokens.tokens, "batch {k}: tokens");
            assert_eq!(got.pixels, want.pixels, "batch {k}: pixels");
            // Every run is timed step by step by timestamps on the stream (recorded into the
            // graph when captured), and ends with the decode inside the loop (the graph).
            let steps = got.tokens.schedule.total_steps();
            for (what, s) in [("graph", &got), ("eager", want)] {
                assert_eq!(
                    s.tokens.step_ms.len(),
                    steps,
                    "batch {k}: {what} step times"
                );
                assert!(
                    s.tokens
                        .step_ms
                        .iter()
                        .all(|ms| ms.is_finite() && *ms >= 0.0)
                );
                assert!(
                    s.tokens.decode_in_loop_ms.is_some(),
                    "batch {k}: {what} decode outside the loop"
                );
            }
            println!(
                "batch {k}: graph {} run equals eager launches ({} tokens, {} pixels)",
                if got.tokens.replayed {
                    "replayed"
                } else {
                    "warm-up"
                },
                got.tokens.tokens.iter().map(Vec::len).sum::<usize>(),
                got.pixels.len()
            );
        }
        // The batches differ (labels, seed, offset): a replay that kept the captured batch's
        // inputs would have failed above; check the premise.
        assert_ne!(eager[1].tokens.tokens, eager[2].tokens.tokens);
        // Per-step outputs (statistics) turn graphs off: eager, with step times.
        let mut o = batch(2, true);
        o.record_stats = true;
        let s = pipeline::sample(&mut be, &o).unwrap();
        assert!(!s.tokens.replayed && !s.tokens.step_ms.is_empty());
        // A tokens-only loop plans no decode: the decode runs afterwards, outside the loop.
        let t = pipeline::run_steps(&mut be, &batch(2, true)).unwrap();
        assert!(t.decode_in_loop_ms.is_none());
        assert_eq!(t.tokens, eager[2].tokens.tokens);
        assert_eq!(s.tokens.tokens, eager[2].tokens.tokens);
    }

    #[test]
    fn a_loop_stopped_during_its_capture_leaves_the_device_usable() {
        let gpu = common::gpu("gpu graph cancel");
        let gm = GpuModel::new(gpu, &tiny64()).unwrap();
        let want = pipeline::sample(&mut GpuBackend::new(&gm), &batch(1, false)).unwrap();
        let mut be = GpuBackend::new(&gm);
        pipeline::sample(&mut be, &batch(0, true)).unwrap(); // eager warm-up
        // The second batch is captured: stop it after 3 steps (an API cancellation).
        let e = pipeline::sample_observed(&mut be, &batch(1, true), &mut |done, _| {
            anyhow::ensure!(done < 3, "cancelled");
            Ok(())
        })
        .map(drop)
        .unwrap_err();
        assert!(e.to_string().contains("cancelled"), "{e}");
        assert!(!gm.gpu.capturing(), "the capture was left open");
        // The same batch again: captured now, replayed in finish, equal to eager launches.
        let got = pipeline::sample(&mut be, &batch(1, true)).unwrap();
        assert!(got.tokens.replayed);
        assert_eq!(got.tokens.tokens, want.tokens.tokens);
        assert_eq!(got.pixels, want.pixels);
    }

    /// A capture that fails inside the loop (here a synchronization after every step, which
    /// a capture refuses) is ended, and the backend runs the loop again with eager launches
    /// in the same call: the tokens and pixels of eager launches, timed step by step. The
    /// cache retries the key once without timestamps, then gives it up: its later loops stay
    /// eager even where a capture would succeed, while another plan's key still captures.
    #[test]
    fn a_failed_capture_falls_back_to_eager_launches_for_good() {
        let gm = GpuModel::new(common::gpu("gpu graph capture failure"), &tiny64()).unwrap();
        let eager: Vec<_> = (0..4)
            .map(|k| pipeline::sample(&mut GpuBackend::new(&gm), &batch(k, false)).unwrap())
            .collect();
        // Another plan (another temperature): its own key.
        let other = |graph| {
            let mut o = batch(1, graph);
            o.policy.temperature = 0.5;
            o
        };
        let other_eager = pipeline::sample(&mut GpuBackend::new(&gm), &other(false)).unwrap();
        let mut be = GpuBackend::new(&gm);
        be.sync_after_steps = true;
        // Batch 0: the eager warm-up; 1: the capture with timestamps fails, rerun eagerly;
        // 2: the capture without them fails, rerun eagerly, the key given up; 3: eager,
        // though a capture would now succeed.
        for (k, want) in eager.iter().enumerate() {
            be.sync_after_steps = k < 3;
            let got = pipeline::sample(&mut be, &batch(k, true)).unwrap();
            assert!(!gm.gpu.capturing(), "batch {k}: the capture was left open");
            assert!(!got.tokens.replayed, "batch {k}: replayed a graph");
            assert_eq!(got.tokens.tokens, want.tokens.tokens, "batch {k}: tokens");
            assert_eq!(got.pixels, want.pixels, "batch {k}: pixels");
            assert_eq!(
                got.tokens.step_ms.len(),
                got.tokens.schedule.total_steps(),
                "batch {k}: eager step times"
            );
            assert!(got.tokens.decode_in_loop_ms.is_some(), "batch {k}");
            println!("batch {k}: eager launches, equal to the eager reference");
        }
        // The other key warms up, is captured (no timestamps: one capture failed with them)
        // and replayed.
        for i in 0..3 {
            let got = pipeline::sample(&mut be, &other(true)).unwrap();
            assert_eq!(got.tokens.replayed, i >= 1, "other plan, run {i}");
            assert_eq!(
                got.tokens.tokens, other_eager.tokens.tokens,
                "other plan, run {i}"
            );
            assert_eq!(got.pixels, other_eager.pixels, "other plan, run {i}");
            if i >= 1 {
                assert!(
                    got.tokens.step_ms.is_empty(),
                    "an untimed graph has step times"
                );
            }
        }
        println!("another plan captures and replays on the same buffers");
    }

    #[test]
    fn capture_records_and_refuses_transfers() {
        let gpu = common::gpu("gpu graph capture");
        let mut y = gpu.upload(&[1.0f32; 6]).unwrap();
        let b = gpu.upload(&[0.5f32, 1.0, 2.0]).unwrap();
        gpu.begin_capture().unwrap();
        assert!(gpu.begin_capture().is_err(), "nested capture");
        add_bias_f32(&gpu, &mut y, &b, 2, 3).unwrap();
        for e in [
            gpu.upload(&[0.0f32]).map(drop).unwrap_err(),
            gpu.download(&y).map(drop).unwrap_err(),
            gpu.sync().unwrap_err(),
            gpu.zeros::<f32>(4).map(drop).unwrap_err(),
        ] {
            assert!(
                e.to_string().contains("while a graph is being captured"),
                "{e}"
            );
        }
        let graph = gpu.end_capture().unwrap();
        assert!(!gpu.capturing());
        // Timestamps: recorded into the graph, set by its replay, not before.
        let marks = gpu.marks(2).unwrap();
        gpu.begin_capture().unwrap();
        gpu.mark(&marks, 0).unwrap();
        add_bias_f32(&gpu, &mut y, &b, 2, 3).unwrap();
        gpu.mark(&marks, 1).unwrap();
        assert!(gpu.mark(&marks, 2).is_err(), "a timestamp out of range");
        let timed = gpu.end_capture().unwrap();
        assert!(
            gpu.mark_ms(&marks, 0, 1).is_err(),
            "timestamps set by the capture"
        );
        gpu.replay(&timed).unwrap();
        let ms = gpu.mark_ms(&marks, 0, 1).unwrap();
        assert!(ms.is_finite() && ms >= 0.0, "{ms} ms");
        gpu.replay(&timed).unwrap();
        assert!(gpu.mark_ms(&marks, 0, 1).unwrap() >= 0.0);
        gpu.upload_into(&[1.0f32; 6], &mut y, 0).unwrap(); // undo the two replays
        // Recorded, not run.
        assert_eq!(gpu.download(&y).unwrap(), vec![1.0; 6]);
        gpu.replay(&graph).unwrap();
        gpu.replay(&graph).unwrap();
        assert_eq!(
            gpu.download(&y).unwrap(),
            vec![2.0, 3.0, 5.0, 2.0, 3.0, 5.0],
            "two replays add the bias twice"
        );
        if let Some(n) = graph.emu_ops() {
            assert_eq!(n, 1, "one recorded launch");
        }
        if let Some(n) = timed.emu_ops() {
            assert_eq!(n, 3, "two timestamps and a launch");
        }
    }

    /// `Gpu::new` keeps freed memory in the device's default pool (release threshold at its
    /// maximum), so a batch's buffers are not unmapped at every synchronization and mapped
    /// again by the next batch. Only a real GPU has the pool: skipped (ignored) elsewhere.
    #[test]
    #[ignore = "needs a real GPU (the driver's memory pool); the GPU bundle runs it"]
    fn pool_keeps_freed_memory() {
        let g = common::gpu("pool_keeps_freed_memory");
        match g.pool_release_threshold().unwrap() {
            Some(t) => assert_eq!(t, u64::MAX, "release threshold"),
            None => {
                panic!("the emulator has no memory pool: run on a GPU (CHECKERGEN_DEVICE=cuda)")
            }
        }
    }
}
