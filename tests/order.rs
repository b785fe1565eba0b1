//! Checkerboard order, scale pyramid and step schedule against the golden files and SPEC.md.

mod common;

use checkergen::model::file::load_i64;
use checkergen::order::{Schedule, rank_map, scale_sizes, sequence};
use safetensors::SafeTensors;

fn check_maps(path: &std::path::Path) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for n in 1..=20usize {
        let (shape, data) = load_i64(&st, &format!("order_{n}")).unwrap();
        assert_eq!(shape, vec![n, n]);
        let ours = rank_map(n).unwrap();
        let flat: Vec<i64> = ours.iter().flatten().map(|&r| r as i64).collect();
        assert_eq!(flat, data, "rank map n={n} differs from {}", path.display());
    }
    println!("rank maps n=1..20 equal {} exactly", path.display());
}

#[test]
fn rank_maps_equal_fixture_copy() {
    check_maps(&common::fixture("order_maps.safetensors"));
}

#[test]
fn rank_maps_equal_golden() {
    let Some(g) = common::golden_dir() else {
        return;
    };
    check_maps(&g.join("order_maps.safetensors"));
}

#[test]
fn per_config_sequences_equal_golden() {
    let Some(g) = common::golden_dir() else {
        return;
    };
    for cfg in ["A_ratio2", "B_ratio4", "C_ratio3"] {
        let bytes = std::fs::read(g.join("public").join(cfg).join("order.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let ratio = match cfg {
            "A_ratio2" => 2.0,
            "B_ratio4" => 4.0,
            _ => 3.0,
        };
        for s in scale_sizes(16, ratio, 1).unwrap() {
            let (_, seq) = load_i64(&st, &format!("sequence_s{s}")).unwrap();
            let ours: Vec<i64> = sequence(s).unwrap().iter().map(|&i| i as i64).collect();
            assert_eq!(ours, seq, "{cfg} sequence_s{s}");
        }
    }
}

/// After every prefix of the order, the four children of every quadtree node hold counts
/// that differ by at most one.
#[test]
fn quadtree_children_stay_balanced() {
    for k in 0..=6 {
        let n = 1usize << k;
        let seq = sequence(n).unwrap();
        let mut chosen = vec![false; n * n];
        for &cell in &seq {
            chosen[cell] = true;
            let mut node = 2;
            while node <= n {
                let half = node / 2;
                for y0 in (0..n).step_by(node) {
                    for x0 in (0..n).step_by(node) {
                        let count = |qy: usize, qx: usize| {
                            let mut c = 0;
                            for y in qy..qy + half {
                                for x in qx..qx + half {
                                    c += chosen[y * n + x] as usize;
                                }
                            }
                            c
                        };
                        let cs = [
                            count(y0, x0),
                            count(y0, x0 + half),
                            count(y0 + half, x0),
                            count(y0 + half, x0 + half),
                        ];
                        let (lo, hi) = (cs.iter().min().unwrap(), cs.iter().max().unwrap());
                        assert!(hi - lo <= 1, "n={n} node {node} at ({y0},{x0}): {cs:?}");
                    }
                }
                node *= 2;
            }
        }
    }
}

#[test]
fn rank_maps_are_permutations() {
    for n in 1..=40 {
        let mut all: Vec<usize> = rank_map(n).unwrap().into_iter().flatten().collect();
        all.sort_unstable();
        assert!(all.iter().enumerate().all(|(i, &r)| i == r), "n={n}");
    }
}

#[test]
fn scale_pyramids() {
    let cases: [(f64, &[usize]); 6] = [
        (2.0, &[1, 2, 4, 8, 16]),
        (4.0, &[1, 4, 16]),
        (3.0, &[1, 2, 5, 16]),
        (2f64.sqrt(), &[1, 2, 3, 4, 6, 8, 11, 16]),
        (2f64.powf(1.0 / 3.0), &[1, 2, 3, 4, 5, 6, 8, 10, 13, 16]),
        (2f64.powf(0.25), &[1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 13, 16]),
    ];
    for (r, want) in cases {
        assert_eq!(scale_sizes(16, r, 1).unwrap(), want, "ratio {r}");
    }
    assert_eq!(scale_sizes(16, 2.0, 2).unwrap(), vec![2, 4, 8, 16]);
    assert_eq!(scale_sizes(32, 2.0, 1).unwrap(), vec![1, 2, 4, 8, 16, 32]);
}

#[test]
fn token_totals() {
    let n = |r| {
        Schedule::uniform(&scale_sizes(16, r, 1).unwrap(), 4)
            .unwrap()
            .total_tokens()
    };
    assert_eq!(n(2.0), 341);
    assert_eq!(n(4.0), 273);
    assert_eq!(n(3.0), 286);
}

#[test]
fn step_totals_match_spec_and_golden_readme() {
    let t = |r: f64, k| {
        Schedule::uniform(&scale_sizes(16, r, 1).unwrap(), k)
            .unwrap()
            .total_steps()
    };
    // SPEC.md section 3.
    assert_eq!(t(2.0, 4), 17);
    assert_eq!(t(4.0, 8), 17);
    assert_eq!(t(2.0, 8), 29);
    // golden/README.md serial step table.
    assert_eq!(t(2.0, 2), 9);
    assert_eq!(t(4.0, 4), 9);
    assert_eq!(t(4.0, 2), 5);
    assert_eq!(t(3.0, 4), 14);
    assert_eq!(t(3.0, 2), 8);
    assert_eq!(t(3.0, 8), 22);
    // Block sizes per step for ratio 2, k = 4.
    let s = Schedule::uniform(&[1, 2, 4, 8, 16], 4).unwrap();
    let blocks: Vec<usize> = s.steps.iter().map(|st| st.positions.len()).collect();
    assert_eq!(
        blocks,
        vec![1, 1, 1, 1, 1, 4, 4, 4, 4, 16, 16, 16, 16, 64, 64, 64, 64]
    );
}

#[test]
fn steps_cover_every_cell_once_and_pair_previous_block() {
    let s = Schedule::uniform(&[1, 2, 5, 16], 4).unwrap();
    let n = s.total_tokens();
    let mut seen = vec![0; n];
    for (i, st) in s.steps.iter().enumerate() {
        assert_eq!(st.t, i);
        for g in s.global_positions(st) {
            seen[g] += 1;
        }
        match &st.prev {
            None => assert!(i == 0 || s.steps[i - 1].scale != st.scale),
            Some(q) => {
                let before = &s.steps[i - 1];
                assert_eq!(before.scale, st.scale);
                assert_eq!(&before.positions[..q.len()], &q[..]);
                assert_eq!(q.len(), st.positions.len());
            }
        }
    }
    assert!(seen.iter().all(|&c| c == 1));
}

/// The per-step positions of the golden greedy cases equal our schedule's.
#[test]
fn golden_step_positions() {
    let Some(g) = common::golden_dir() else {
        return;
    };
    let cases = [
        ("greedy_i", 4),
        ("greedy_iii_steps2", 2),
        ("greedy_iii_steps8", 8),
    ];
    for (cfg, ratio) in [("A_ratio2", 2.0), ("B_ratio4", 4.0), ("C_ratio3", 3.0)] {
        let sizes = scale_sizes(16, ratio, 1).unwrap();
        for (case, k) in cases {
            let path = g
                .join("public")
                .join(cfg)
                .join(format!("{case}.safetensors"));
            let bytes = std::fs::read(&path).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let sched = Schedule::uniform(&sizes, k).unwrap();
            let (_, total) = load_i64(&st, "num_serial_steps").unwrap();
            assert_eq!(total[0] as usize, sched.total_steps(), "{cfg} {case}");
            for step in &sched.steps {
                let (_, pos) = load_i64(&st, &format!("step{:03}_positions", step.t)).unwrap();
                let (_, past) =
                    load_i64(&st, &format!("step{:03}_past_positions", step.t)).unwrap();
                let ours: Vec<i64> = step.positions.iter().map(|&p| p as i64).collect();
                assert_eq!(ours, pos, "{cfg} {case} step {}", step.t);
                let ours_prev: Vec<i64> = match &step.prev {
                    None => vec![-2; step.positions.len()],
                    Some(q) => q.iter().map(|&p| p as i64).collect(),
                };
                assert_eq!(ours_prev, past, "{cfg} {case} step {} past", step.t);
            }
        }
    }
}
