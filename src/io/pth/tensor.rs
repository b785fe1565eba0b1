//! What a checkpoint holds, below every reader of it: the element types of its storages
//! ([`PthDtype`]), a tensor as parsed ([`TensorInfo`]: no data read yet) and as materialized
//! ([`PthTensor`]), and the state dict ([`StateDict`]). Re-exported by `io::pth`.

use std::collections::BTreeMap;
use std::fmt;

/// Element type of a checkpoint tensor, from its storage class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PthDtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl PthDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            PthDtype::F64 | PthDtype::I64 => 8,
            PthDtype::F32 | PthDtype::I32 => 4,
            PthDtype::F16 | PthDtype::BF16 | PthDtype::I16 => 2,
            PthDtype::I8 | PthDtype::U8 | PthDtype::Bool => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(
            self,
            PthDtype::F64 | PthDtype::F32 | PthDtype::F16 | PthDtype::BF16
        )
    }

    /// The torch name (`float32`, `bfloat16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            PthDtype::F64 => "float64",
            PthDtype::F32 => "float32",
            PthDtype::F16 => "float16",
            PthDtype::BF16 => "bfloat16",
            PthDtype::I64 => "int64",
            PthDtype::I32 => "int32",
            PthDtype::I16 => "int16",
            PthDtype::I8 => "int8",
            PthDtype::U8 => "uint8",
            PthDtype::Bool => "bool",
        }
    }

    /// The matching safetensors dtype.
    pub fn safetensors(self) -> safetensors::Dtype {
        use safetensors::Dtype as D;
        match self {
            PthDtype::F64 => D::F64,
            PthDtype::F32 => D::F32,
            PthDtype::F16 => D::F16,
            PthDtype::BF16 => D::BF16,
            PthDtype::I64 => D::I64,
            PthDtype::I32 => D::I32,
            PthDtype::I16 => D::I16,
            PthDtype::I8 => D::I8,
            PthDtype::U8 => D::U8,
            PthDtype::Bool => D::BOOL,
        }
    }
}

impl fmt::Display for PthDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a tensor's elements live: parsed from the pickle, no data read yet.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub dtype: PthDtype,
    pub shape: Vec<usize>,
    /// Strides in elements (torch's `stride()`).
    pub stride: Vec<usize>,
    /// Offset in elements into the storage (torch's `storage_offset()`).
    pub offset: usize,
    /// Storage key: the archive entry is `<prefix>/data/<key>`.
    pub storage_key: String,
    /// Element count of the whole storage, as recorded in the persistent id.
    pub storage_numel: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Row-major dense layout (dimensions of size 1 may have any stride).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1usize;
        for (&n, &s) in self.shape.iter().zip(&self.stride).rev() {
            if n != 1 && s != expected {
                return false;
            }
            expected = expected.saturating_mul(n);
        }
        true
    }
}

/// A materialized tensor: dtype, shape and dense row-major little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct PthTensor {
    pub dtype: PthDtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl PthTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Elements widened (or, for int64/float64, narrowed) to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        fn arr<const N: usize>(c: &[u8]) -> [u8; N] {
            c.try_into().unwrap()
        }
        let n = self.dtype.size();
        let chunks = self.data.chunks_exact(n);
        match self.dtype {
            PthDtype::F64 => chunks.map(|c| f64::from_le_bytes(arr(c)) as f32).collect(),
            PthDtype::F32 => chunks.map(|c| f32::from_le_bytes(arr(c))).collect(),
            PthDtype::F16 => chunks
                .map(|c| half::f16::from_le_bytes(arr(c)).to_f32())
                .collect(),
            PthDtype::BF16 => chunks
                .map(|c| half::bf16::from_le_bytes(arr(c)).to_f32())
                .collect(),
            PthDtype::I64 => chunks.map(|c| i64::from_le_bytes(arr(c)) as f32).collect(),
            PthDtype::I32 => chunks.map(|c| i32::from_le_bytes(arr(c)) as f32).collect(),
            PthDtype::I16 => chunks.map(|c| i16::from_le_bytes(arr(c)) as f32).collect(),
            PthDtype::I8 => self.data.iter().map(|&b| b as i8 as f32).collect(),
            PthDtype::U8 => self.data.iter().map(|&b| b as f32).collect(),
            PthDtype::Bool => self.data.iter().map(|&b| (b != 0) as u8 as f32).collect(),
        }
    }
}

/// A state dict's tensors by name (parsed, not yet read).
pub type StateDict = BTreeMap<String, TensorInfo>;
