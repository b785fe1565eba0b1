//! A minimal host tensor: a shape and f32 data, plus loading of safetensors files into a
//! name -> tensor map. Every dtype the engine accepts on disk (f32, bf16, f16, i64, i32, u8)
//! is widened to f32 here, so the CPU reference works in one precision.

use anyhow::{Context, Result, bail};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::Path;

/// Dense row-major f32 tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "tensor shape/data mismatch"
        );
        Tensor { shape, data }
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Tensor {
            shape,
            data: vec![0.0; n],
        }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// Named tensors, sorted by name (deterministic iteration for writing and reporting).
pub type TensorMap = BTreeMap<String, Tensor>;

/// Decode one safetensors view into f32 values.
pub fn view_to_f32(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    fn chunks<const N: usize>(b: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        b.chunks_exact(N).map(|c| c.try_into().unwrap())
    }
    Ok(match dtype {
        Dtype::F32 => chunks::<4>(bytes).map(f32::from_le_bytes).collect(),
        Dtype::F64 => chunks::<8>(bytes)
            .map(|c| f64::from_le_bytes(c) as f32)
            .collect(),
        Dtype::BF16 => chunks::<2>(bytes)
            .map(|c| half::bf16::from_le_bytes(c).to_f32())
            .collect(),
        Dtype::F16 => chunks::<2>(bytes)
            .map(|c| half::f16::from_le_bytes(c).to_f32())
            .collect(),
        Dtype::I64 => chunks::<8>(bytes)
            .map(|c| i64::from_le_bytes(c) as f32)
            .collect(),
        Dtype::I32 => chunks::<4>(bytes)
            .map(|c| i32::from_le_bytes(c) as f32)
            .collect(),
        Dtype::U8 => bytes.iter().map(|&b| b as f32).collect(),
        Dtype::BOOL => bytes.iter().map(|&b| (b != 0) as u8 as f32).collect(),
        other => bail!("tensor {name}: unsupported dtype {other:?}"),
    })
}

/// Read a whole safetensors file as f32 tensors, plus its metadata (if any).
pub fn load_safetensors(path: &Path) -> Result<(TensorMap, BTreeMap<String, String>)> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    parse_safetensors(&bytes).with_context(|| format!("{}", path.display()))
}

/// Parse safetensors bytes into f32 tensors and metadata.
pub fn parse_safetensors(bytes: &[u8]) -> Result<(TensorMap, BTreeMap<String, String>)> {
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow::anyhow!("not a valid safetensors file ({e})"))?;
    let metadata: BTreeMap<String, String> = meta
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("not a valid safetensors file ({e})"))?;
    let mut map = TensorMap::new();
    for (name, view) in st.tensors() {
        let data = view_to_f32(&name, view.dtype(), view.data())?;
        map.insert(name, Tensor::new(view.shape().to_vec(), data));
    }
    Ok((map, metadata))
}

/// Integer tensors (token ids, positions, rank maps) read exactly as i64.
pub fn load_i64(st: &SafeTensors, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
    let v = st
        .tensor(name)
        .map_err(|e| anyhow::anyhow!("tensor {name}: {e}"))?;
    let data: Vec<i64> = match v.dtype() {
        Dtype::I64 => v
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::I32 => v
            .data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
            .collect(),
        d => bail!("tensor {name}: expected an integer dtype, found {d:?}"),
    };
    Ok((v.shape().to_vec(), data))
}

/// Write raw tensors `(name, dtype, shape, little-endian bytes)` and metadata as safetensors.
pub fn write_safetensors(
    path: &Path,
    entries: &[(String, Dtype, Vec<usize>, Vec<u8>)],
    metadata: std::collections::HashMap<String, String>,
) -> Result<()> {
    let views = entries
        .iter()
        .map(|(name, dt, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| anyhow::anyhow!("tensor {name}: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, Some(metadata), path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}
