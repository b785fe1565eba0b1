//! f32 CPU reference backend: the oracle for every GPU kernel ([`ops`]: one function per
//! kernel family) and the engine's path on machines without a GPU.

pub mod backend;
pub mod decoder;
pub mod encoder;
pub mod ops;
pub mod score;
pub mod transformer;

pub use backend::{CpuBackend, sample_tokens};
