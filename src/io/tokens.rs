//! The tokens file of `sample --save-tokens`: per scale k, `scale_k` int32 (B, s, s) token ids
//! (raster order, ascending scale size) and, when the run recorded statistics, `prob_k` and
//! `entropy_k` f32 (B, s, s) (the chosen token's probability and the position's entropy in
//! nats, `sampling::token_stats`) and `step_k` int32 (B, s, s) (the global step of each cell).

use crate::model::file::write_safetensors;
use crate::pipeline::TokenOutput;
use anyhow::Result;
use safetensors::Dtype;
use std::path::Path;

/// Write the tokens (and statistics, when recorded) of `batch` images.
pub fn write_tokens(path: &Path, out: &TokenOutput, batch: usize) -> Result<()> {
    let i32s = |v: &mut dyn Iterator<Item = i32>| v.flat_map(i32::to_le_bytes).collect::<Vec<u8>>();
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut entries = Vec::new();
    for (k, (sc, toks)) in out.schedule.scales.iter().zip(&out.tokens).enumerate() {
        let shape = vec![batch, sc.size, sc.size];
        entries.push((
            format!("scale_{k}"),
            Dtype::I32,
            shape.clone(),
            i32s(&mut toks.iter().map(|&t| t as i32)),
        ));
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
