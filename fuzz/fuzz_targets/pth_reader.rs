//! The .pth reader on arbitrary bytes: zip index, CRC-32s, pickle VM, torch allowlist, and
//! every tensor view of every state dict it finds. Any panic, abort or timeout is a bug;
//! errors are the expected outcome.
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
    for key in ["model", "model_ema", "state_dict"] {
        if let Ok(sd) = ckpt.state_dict(key) {
            for (name, info) in &sd {
                let _ = ckpt.read_tensor(name, info);
            }
        }
    }
});
