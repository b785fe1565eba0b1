//! Files in and out: the PyTorch checkpoint reader, the converter, images.

pub mod convert;
pub mod image;
pub mod maps;
pub mod npz;
pub mod photo;
pub mod pth;
pub mod steps_chart;
pub mod tokens;
