//! CPU reference of kernels/sampling.cu: guidance combine, token choice and scatter.

use crate::rng::token_uniform;
pub use crate::sampling::StepKnobs;
use crate::sampling::{cfg_combine, choose_token, token_stats};

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
                    let image = k.image0.wrapping_add(bi as u32);
                    let u = token_uniform(k.seed, image, k.step, global_pos[j] as u32);
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
