//! f32 CPU reference backend: the oracle for every GPU kernel and the engine's path on
//! machines without a GPU.

pub mod decoder;
pub mod ops;
pub mod transformer;
