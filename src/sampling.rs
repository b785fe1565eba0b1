//! Token choice from one row of logits: classifier-free guidance combine, temperature,
//! top-k, top-p, argmax at temperature 0, and the inverse-CDF draw from a given uniform.

/// How tokens are chosen from (guided) logits.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenPolicy {
    /// 0 = argmax (first index on exact ties); > 0 = sample softmax(logits / T).
    pub temperature: f32,
    /// Keep only the k largest logits (ties broken by lower token id). None = all.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches p. None = all.
    pub top_p: Option<f32>,
}

/// `cond + cfg * (cond - uncond)`, in place on `cond`.
pub fn cfg_combine(cond: &mut [f32], uncond: &[f32], cfg: f32) {
    for (c, u) in cond.iter_mut().zip(uncond) {
        *c += cfg * (*c - *u);
    }
}

/// Index of the largest value, first on ties (as torch.argmax).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Choose a token from `logits` with uniform draw `u` in [0, 1).
///
/// With temperature > 0: p_i ∝ exp((l_i - max) / T) over the kept set (top-k first, then
/// top-p on the renormalized probabilities); the draw walks the kept tokens in ascending id
/// order and returns the first whose cumulative mass exceeds u * total.
pub fn choose_token(logits: &[f32], policy: &TokenPolicy, u: f64) -> usize {
    if policy.temperature <= 0.0 {
        return argmax(logits);
    }
    let v = logits.len();
    let inv_t = 1.0 / policy.temperature as f64;
    let max = logits[argmax(logits)] as f64;
    let mut p: Vec<f64> = logits
        .iter()
        .map(|&l| ((l as f64 - max) * inv_t).exp())
        .collect();
    let k = policy.top_k.unwrap_or(v).clamp(1, v);
    let filter = k < v || policy.top_p.is_some_and(|tp| tp < 1.0);
    if filter {
        // Order by descending probability, lower id first on ties.
        let mut idx: Vec<usize> = (0..v).collect();
        idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
        let mut keep = k;
        if let Some(tp) = policy.top_p {
            let total: f64 = idx[..k].iter().map(|&i| p[i]).sum();
            let target = tp as f64 * total;
            let mut acc = 0.0;
            for (j, &i) in idx[..k].iter().enumerate() {
                acc += p[i];
                if acc >= target {
                    keep = j + 1;
                    break;
                }
            }
        }
        for &i in &idx[keep..] {
            p[i] = 0.0;
        }
    }
    let total: f64 = p.iter().sum();
    let target = u * total;
    let mut acc = 0.0;
    let mut last = 0;
    for (i, &pi) in p.iter().enumerate() {
        if pi > 0.0 {
            acc += pi;
            last = i;
            if acc > target {
                return i;
            }
        }
    }
    last
}

/// One sampling step's shape and knobs, everything but the buffers: what
/// `cpu::ops::guided_sample` and `cuda::sampling::guided_sample` both take.
#[derive(Clone, Copy, Debug)]
pub struct StepKnobs<'a> {
    /// Images B.
    pub batch: usize,
    /// Vocabulary size V.
    pub vocab: usize,
    /// Cells of this scale's grid (grid and forced are (B, cells)).
    pub cells: usize,
    /// `Some(cfg)`: `cond + cfg * (cond - uncond)` with the unconditional rows B..2B.
    pub guidance: Option<f32>,
    pub policy: &'a TokenPolicy,
    /// The draw of (b, j) is `token_uniform(seed, image0 + b, step, global_pos[j])`.
    pub seed: u64,
    pub step: u32,
    /// Run-wide index of the batch's first image: a run split into batches draws what one
    /// batch of all its images would (the RNG counter names the image, not its batch slot).
    pub image0: u32,
}

/// What the authors' sampler reports about one choice (cbgen/ar.py `sample`): with
/// `p = softmax(logits / T)` (one-hot at the argmax when T = 0; top-k/top-p do not enter),
/// the probability `p[token]` of the chosen token and the entropy `-sum p ln(p + 1e-8)` in
/// nats. Computed in f64, returned as f32.
pub fn token_stats(logits: &[f32], temperature: f32, token: usize) -> (f32, f32) {
    if temperature <= 0.0 {
        let p = if token == argmax(logits) { 1.0 } else { 0.0 };
        let ent = -(1.0f64 * (1.0f64 + 1e-8).ln());
        return (p, ent as f32);
    }
    let inv_t = 1.0 / temperature as f64;
    let max = logits[argmax(logits)] as f64;
    let w: Vec<f64> = logits
        .iter()
        .map(|&l| ((l as f64 - max) * inv_t).exp())
        .collect();
    let z: f64 = w.iter().sum();
    let ent: f64 = w
        .iter()
        .map(|&wi| {
            let p = wi / z;
            -p * (p + 1e-8).ln()
        })
        .sum();
    ((w[token] / z) as f32, ent as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::token_uniform;

    #[test]
    fn token_stats_of_known_distributions() {
        // Uniform over 4: p = 1/4, entropy ln 4 (minus the 1e-8 guard's tiny effect).
        let (p, h) = token_stats(&[0.5; 4], 1.0, 2);
        assert!((p - 0.25).abs() < 1e-7);
        assert!((h as f64 - 4.0f64.ln()).abs() < 1e-6, "{h}");
        // Temperature scales logits: [0, ln 3] at T = 1 gives p = (1/4, 3/4).
        let (p, _) = token_stats(&[0.0, 3.0f32.ln()], 1.0, 1);
        assert!((p - 0.75).abs() < 1e-6);
        let (p, _) = token_stats(&[0.0, 2.0 * 3.0f32.ln()], 2.0, 1);
        assert!((p - 0.75).abs() < 1e-6);
        // Greedy: one-hot at the argmax.
        assert_eq!(token_stats(&[1.0, 3.0, 2.0], 0.0, 1).0, 1.0);
        assert_eq!(token_stats(&[1.0, 3.0, 2.0], 0.0, 2).0, 0.0);
        assert!(token_stats(&[1.0, 3.0, 2.0], 0.0, 1).1.abs() < 1e-7);
    }

    fn policy(t: f32, k: Option<usize>, p: Option<f32>) -> TokenPolicy {
        TokenPolicy {
            temperature: t,
            top_k: k,
            top_p: p,
        }
    }

    #[test]
    fn argmax_takes_first_tie_and_temperature_zero_is_argmax() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(
            choose_token(&[1.0, 3.0, 3.0], &policy(0.0, None, None), 0.99),
            1
        );
    }

    #[test]
    fn cfg_formula() {
        let mut c = vec![1.0, 2.0];
        cfg_combine(&mut c, &[0.5, 3.0], 1.5);
        assert_eq!(c, vec![1.75, 0.5]);
    }

    /// Frequencies over many draws match softmax(logits / T): chi-square over 8 categories.
    #[test]
    fn draws_follow_softmax_chi_square() {
        let logits = [0.3f32, -1.0, 2.0, 0.0, 1.2, -0.5, 0.7, 1.9];
        for t in [1.0f32, 0.7, 2.0] {
            let pol = policy(t, None, None);
            let n = 200_000;
            let mut counts = [0usize; 8];
            for i in 0..n {
                counts[choose_token(&logits, &pol, token_uniform(42, 0, 1, i))] += 1;
            }
            let m = logits.iter().cloned().fold(f32::MIN, f32::max);
            let w: Vec<f64> = logits
                .iter()
                .map(|&l| (((l - m) / t) as f64).exp())
                .collect();
            let z: f64 = w.iter().sum();
            let chi2: f64 = (0..8)
                .map(|i| {
                    let e = n as f64 * w[i] / z;
                    (counts[i] as f64 - e).powi(2) / e
                })
                .sum();
            // 7 degrees of freedom: P(chi2 > 24.3) = 0.001.
            println!("T={t}: chi2 = {chi2:.2} (7 dof)");
            assert!(chi2 < 24.3, "T={t}: chi2 {chi2} counts {counts:?}");
        }
    }

    #[test]
    fn top_k_and_top_p_never_emit_excluded_tokens() {
        let logits = [0.3f32, -1.0, 2.0, 0.0, 1.2, -0.5, 0.7, 1.9];
        // top-k 3 keeps ids 2, 7, 4.
        let pol = policy(1.0, Some(3), None);
        let mut seen = [false; 8];
        for i in 0..20_000 {
            seen[choose_token(&logits, &pol, token_uniform(1, 0, 0, i))] = true;
        }
        assert_eq!(seen, [false, false, true, false, true, false, false, true]);
        // softmax probabilities: id2 .349, id7 .316, id4 .156, ... top-p 0.6 keeps {2, 7}.
        let pol = policy(1.0, None, Some(0.6));
        let mut seen = [false; 8];
        for i in 0..20_000 {
            seen[choose_token(&logits, &pol, token_uniform(2, 0, 0, i))] = true;
        }
        assert_eq!(seen, [false, false, true, false, false, false, false, true]);
        // top-p tiny keeps the single best token.
        let pol = policy(1.0, None, Some(1e-6));
        for i in 0..1000 {
            assert_eq!(choose_token(&logits, &pol, token_uniform(3, 0, 0, i)), 2);
        }
    }

    #[test]
    fn top_k_renormalizes_chi_square() {
        let logits = [0.3f32, -1.0, 2.0, 0.0, 1.2, -0.5, 0.7, 1.9];
        let pol = policy(1.0, Some(3), None);
        let n = 100_000;
        let mut counts = [0usize; 8];
        for i in 0..n {
            counts[choose_token(&logits, &pol, token_uniform(9, 1, 2, i))] += 1;
        }
        let kept = [2usize, 7, 4];
        let w: Vec<f64> = kept.iter().map(|&i| (logits[i] as f64).exp()).collect();
        let z: f64 = w.iter().sum();
        let chi2: f64 = kept
            .iter()
            .zip(&w)
            .map(|(&i, wi)| {
                let e = n as f64 * wi / z;
                (counts[i] as f64 - e).powi(2) / e
            })
            .sum();
        // 2 degrees of freedom: P(chi2 > 13.8) = 0.001.
        assert!(chi2 < 13.8, "chi2 {chi2} {counts:?}");
    }
}
