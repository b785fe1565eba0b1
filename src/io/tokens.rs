//! The tokens file of `sample --save-tokens`: per scale k, `scale_k` int32 (B, s, s) token ids
//! (raster order, ascending scale size) and, when the run recorded statistics, `prob_k` and
//! `entropy_k` f32 (B, s, s) (the chosen token's probability and the position's entropy in
//! nats, `sampling::token_stats`) and `step_k` int32 (B, s, s) (the global step of each cell).

use crate::model::file::{load_i64, write_safetensors};
use crate::pipeline::TokenOutput;
use anyhow::{Result, bail};
use safetensors::Dtype;
use std::path::Path;

/// Write the tokens (and statistics, when recorded) of `batch` images.
pub fn write_tokens(path: &Path, out: &TokenOutput, batch: usize) -> Result<()> {
    let i32s = |v: &mut dyn Iterator<Item = i32>| v.flat_map(i32::to_le_bytes).collect::<Vec<u8>>();
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut entries = Vec::new();
    for (k, (sc, toks)) in out.schedule.scales.iter().zip(&out.tokens).enumerate() {
        let shape = vec![batch, sc.size, sc.size];
        entries.push(scale_entry(k, sc.size, toks, batch));
        if let Some(st) = &out.stats {
            entries.push((
                format!("prob_{k}"),
                Dtype::F32,
                shape.clone(),
                f32s(&st.prob[k]),
            ));
            entries.push((
                format!("entropy_{k}"),
                Dtype::F32,
                shape.clone(),
                f32s(&st.entropy[k]),
            ));
            let steps = (0..batch).flat_map(|_| st.step[k].iter().map(|&t| t as i32));
            entries.push((format!("step_{k}"), Dtype::I32, shape, i32s(&mut { steps })));
        }
    }
    write_safetensors(path, &entries, Default::default())
}

type Entry = (String, Dtype, Vec<usize>, Vec<u8>);

/// `scale_k`: int32 (B, s, s).
fn scale_entry(k: usize, s: usize, toks: &[u32], batch: usize) -> Entry {
    let bytes = toks
        .iter()
        .flat_map(|&t| (t as i32).to_le_bytes())
        .collect();
    (format!("scale_{k}"), Dtype::I32, vec![batch, s, s], bytes)
}

/// Write per-scale token grids `tokens[k] (B, s_k, s_k)` (the layout of `sample
/// --save-tokens`, without statistics; what `encode` writes).
pub fn write_token_grids(
    path: &Path,
    sizes: &[usize],
    tokens: &[Vec<u32>],
    batch: usize,
) -> Result<()> {
    let entries: Vec<Entry> = sizes
        .iter()
        .zip(tokens)
        .enumerate()
        .map(|(k, (&s, t))| scale_entry(k, s, t, batch))
        .collect();
    write_safetensors(path, &entries, Default::default())
}

/// Read a tokens file's grids `scale_0, scale_1, ...` for a model with scale sides `sizes`:
/// returns (B, per scale (B, s, s) ids); every id must be below `vocab`.
pub fn read_token_grids(
    path: &Path,
    sizes: &[usize],
    vocab: usize,
) -> Result<(usize, Vec<Vec<u32>>)> {
    let shown = path.display();
    crate::paths::check_input(path)?;
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("{shown}: cannot read ({e})"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{shown}: not a safetensors file ({e})"))?;
    let mut batch = None;
    let mut out = Vec::with_capacity(sizes.len());
    for (k, &s) in sizes.iter().enumerate() {
        let (shape, ids) = load_i64(&st, &format!("scale_{k}")).map_err(|e| {
            anyhow::anyhow!(
                "{shown}: {e} (a tokens file for this model holds scale_0..scale_{})",
                sizes.len() - 1
            )
        })?;
        let b = shape.first().copied().unwrap_or(0);
        if shape != [b, s, s] || b == 0 || batch.is_some_and(|x| x != b) {
            bail!(
                "{shown}: scale_{k} has shape {shape:?}; this model needs [B, {s}, {s}] with the same B >= 1 on every scale"
            );
        }
        batch = Some(b);
        if let Some(&bad) = ids.iter().find(|&&t| t < 0 || t as usize >= vocab) {
            bail!("{shown}: scale_{k} holds token id {bad}; the codebook has {vocab} entries");
        }
        out.push(ids.iter().map(|&t| t as u32).collect());
    }
    // A file with more scales than the model was made for another pyramid: decoding a
    // subset of it would be silently wrong.
    let extra = format!("scale_{}", sizes.len());
    if st.names().iter().any(|n| **n == extra) {
        let more = (sizes.len()..)
            .take_while(|k| st.names().iter().any(|n| **n == format!("scale_{k}")))
            .count();
        bail!(
            "{shown}: holds {} scales; this model has {} ({sizes:?}): the tokens come from \
             another model",
            sizes.len() + more,
            sizes.len()
        );
    }
    Ok((batch.unwrap_or(0), out))
}
