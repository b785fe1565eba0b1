//! The .pth reader on arbitrary bytes, in both torch.save formats: zip index, CRC-32s, the
//! legacy format's header pickles and storage scan, pickle VM, torch allowlist, and every
//! tensor view of every state dict it finds (the top level too, as a bare state dict). Any
//! panic, abort or timeout is a bug; errors are the expected outcome. Seeds:
//! tests/fixtures/pth/*.pth (pair_legacy.pth is a legacy file).
#![no_main]

use checkergen::io::pth::PthCheckpoint;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The reader takes a path (it reads entries by range from the file); one scratch file
    // per fuzzing process.
    let path = std::env::temp_dir().join(format!("pth-fuzz-{}.pth", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let Ok(ckpt) = PthCheckpoint::open(&path) else {
        return;
    };
    let dicts = ["model", "model_ema", "state_dict"]
        .into_iter()
        .filter_map(|key| ckpt.state_dict(key).ok())
        .chain(ckpt.root_state_dict().ok());
    for sd in dicts {
        for (name, info) in &sd {
            let _ = ckpt.read_tensor(name, info);
        }
    }
});
