//! CPU reference of kernels/sampling.cu: guidance combine, token choice and scatter.

use crate::rng::token_uniform;
use crate::sampling::{TokenPolicy, cfg_combine, choose_token, token_stats};

/// One step's shape and knobs (everything but the buffers); mirrors `cuda::sampling::SampleStep`.
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
    /// The draw of (b, j) is `token_uniform(seed, b, step, global_pos[j])`.
    pub seed: u64,
    pub step: u32,
}

/// Choose the tokens of one step.
///
/// * `logits (rows * n, V)`, rows = B or 2B (conditional rows first); with guidance the
///   guided logits overwrite the first B * n rows.
/// * `local_pos (n)`: cell of each token in the scale grid; `global_pos (n)`: its global
///   position id (the RNG counter).
/// * `forced (B, cells)`: when given, `forced[b, local_pos[j]]` is taken instead of a choice.
/// * `grid (B, cells)` gets the token at `local_pos[j]` (other cells untouched); returns the
///   tokens `(B, n)` in step order.
/// * `stats`: when given, `(prob, entropy)` grids `(B, cells)` get
///   [`token_stats`] of each chosen (or forced) token at `local_pos[j]`.
pub fn guided_sample(
    k: &StepKnobs,
    logits: &mut [f32],
    local_pos: &[usize],
    global_pos: &[usize],
    forced: Option<&[u32]>,
    grid: &mut [u32],
    mut stats: Option<(&mut [f32], &mut [f32])>,
) -> Vec<u32> {
    let (b, v, n) = (k.batch, k.vocab, local_pos.len());
    assert!(logits.len() >= b * n * v && global_pos.len() == n);
    assert_eq!(grid.len(), b * k.cells);
    if let Some(cfg) = k.guidance {
        assert!(
            logits.len() >= 2 * b * n * v,
            "guidance needs the unconditional rows"
        );
        let (cond, uncond) = logits.split_at_mut(b * n * v);
        cfg_combine(cond, &uncond[..b * n * v], cfg);
    }
    let mut tokens = Vec::with_capacity(b * n);
    for bi in 0..b {
        for j in 0..n {
            let cell = bi * k.cells + local_pos[j];
            let l = &logits[(bi * n + j) * v..(bi * n + j + 1) * v];
            let tok = match forced {
                Some(f) => f[cell],
                None => {
                    let u = token_uniform(k.seed, bi as u32, k.step, global_pos[j] as u32);
                    choose_token(l, k.policy, u) as u32
                }
            };
            grid[cell] = tok;
            if let Some((prob, entropy)) = stats.as_mut() {
                (prob[cell], entropy[cell]) = token_stats(l, k.policy.temperature, tok as usize);
            }
            tokens.push(tok);
        }
    }
    tokens
}
