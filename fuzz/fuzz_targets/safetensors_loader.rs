//! The model-file loader on arbitrary bytes: safetensors header and offsets, dtype and
//! finiteness checks, configuration metadata and its validation, and the weight folding.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = checkergen::model::Model::from_bytes(data);
});
