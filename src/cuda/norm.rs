//! Launchers for kernels/norm.cu: RMSNorm + AdaLN, SwiGLU gating, bias add. The param
//! structs are also used by the emulator ABI tests below and a launch-bound test.

use super::device::{DevBuf, Gpu, row_grid};
use super::ledger::Traffic;
use super::registry::k;
use anyhow::{Result, ensure};
use half::bf16;

kernel_params! {
    /// The parameters of kernels/norm.cu's `RmsNormParams`.
    struct RmsNormParams {
        x: u64,
        w: u64,
        modulation: u64,
        out: u64,
        tokens: i32,
        n: i32,
        c: i32,
        mod_offset: i32,
        mod_stride: i32,
        eps: f32,
    }
}

/// Where `rmsnorm_adaln` reads a layer's AdaLN pair: sequence row r's shift (C values) at
/// `r * row_stride + offset` of `buf`, its scale right after.
#[derive(Clone, Copy, Debug)]
pub struct AdaLn<'a> {
    pub buf: &'a DevBuf<f32>,
    pub offset: usize,
    pub row_stride: usize,
}

/// `out (T, C) = RMSNorm(x) * w`, then `* scale + shift` from `modulation` when given; token t
/// belongs to sequence row t / n.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_adaln(
    gpu: &Gpu,
    x: &DevBuf<f32>,
    w: &DevBuf<f32>,
    modulation: Option<AdaLn<'_>>,
    out: &mut DevBuf<bf16>,
    tokens: usize,
    n: usize,
    c: usize,
    eps: f32,
) -> Result<()> {
    ensure!(
        x.len() >= tokens * c && out.len() >= tokens * c && w.len() == c,
        "rmsnorm shapes"
    );
    let (mp, off, stride) = match modulation {
        Some(AdaLn {
            buf,
            offset,
            row_stride,
        }) => {
            let rows = tokens.div_ceil(n.max(1));
            ensure!(
                n > 0
                    && offset + 2 * c <= row_stride
                    && row_stride <= i32::MAX as usize
                    && (rows == 0 || buf.len() >= (rows - 1) * row_stride + offset + 2 * c),
                "adaln shapes: {rows} rows of stride {row_stride}, a {}-value (shift, scale) \
                 pair at {offset}, modulation buffer {}",
                2 * c,
                buf.len()
            );
            (gpu.ptr(buf), offset, row_stride)
        }
        None => (0, 0, 0),
    };
    let p = RmsNormParams {
        x: gpu.ptr(x),
        w: gpu.ptr(w),
        modulation: mp,
        out: gpu.ptr(out),
        tokens: tokens as i32,
        n: n.max(1) as i32,
        c: c as i32,
        mod_offset: off as i32,
        mod_stride: stride as i32,
        eps,
    };
    // x and w read, the scale and shift halves of each sequence row's modulation, out written.
    let mod_bytes = if mp != 0 {
        tokens.div_ceil(n) * 2 * c * 4
    } else {
        0
    };
    let traffic = Traffic::new(
        tokens * c * 4 + c * 4 + mod_bytes,
        tokens * c * 2,
        5 * tokens * c,
    );
    gpu.launch_256(k::RMSNORM_ADALN_BF16, (tokens as u32, 1, 1), &p, traffic)
}

kernel_params! {
    /// The parameters of kernels/norm.cu's `SiluMulParams`.
    struct SiluMulParams {
        g: u64,
        h: u64,
        tokens: i32,
        f: i32,
    }
}

/// `h (T, F) = silu(g[:, :F]) * g[:, F:]` with `g (T, 2F)`.
pub fn silu_mul(
    gpu: &Gpu,
    g: &DevBuf<bf16>,
    h: &mut DevBuf<bf16>,
    tokens: usize,
    f: usize,
) -> Result<()> {
    ensure!(
        g.len() >= tokens * 2 * f && h.len() >= tokens * f,
        "silu_mul shapes"
    );
    let p = SiluMulParams {
        g: gpu.ptr(g),
        h: gpu.ptr(h),
        tokens: tokens as i32,
        f: f as i32,
    };
    let traffic = Traffic::new(tokens * 2 * f * 2, tokens * f * 2, 5 * tokens * f);
    gpu.launch_256(k::SILU_MUL_BF16, row_grid(f, tokens)?, &p, traffic)
}

kernel_params! {
    /// The parameters of kernels/norm.cu's `AddBiasParams`.
    struct AddBiasParams {
        y: u64,
        b: u64,
        rows: i32,
        n: i32,
    }
}

/// `y (rows, n) += b (n)`.
pub fn add_bias_f32(
    gpu: &Gpu,
    y: &mut DevBuf<f32>,
    b: &DevBuf<f32>,
    rows: usize,
    n: usize,
) -> Result<()> {
    ensure!(y.len() >= rows * n && b.len() == n, "add_bias shapes");
    let p = AddBiasParams {
        y: gpu.ptr(y),
        b: gpu.ptr(b),
        rows: rows as i32,
        n: n as i32,
    };
    let traffic = Traffic::new(rows * n * 4 + n * 4, rows * n * 4, rows * n);
    gpu.launch_256(k::ADD_BIAS_F32, row_grid(n, rows)?, &p, traffic)
}

/// The host-emulator ABI ([`EmuFn`]) on host memory, with parameter structs built as the
/// launchers build them (this file's param structs).
#[cfg(test)]
mod emu_abi_tests {
    use super::super::registry::{Kernel, k};
    use super::{AddBiasParams, RmsNormParams};
    use half::bf16;

    /// Whether build.rs built the emulator (it needs a C++ compiler). A test that cannot
    /// run must not pass: without the emulator these tests fail with the reason.
    fn emu_built() -> bool {
        assert!(
            k::ADD_BIAS_F32.emu.is_some(),
            "built without a C++ compiler: no host emulator (install g++ and rebuild)"
        );
        true
    }

    /// Launches `kern` through its emulator entry point; Err(message) on failure.
    fn launch<P>(kern: Kernel, grid: [u32; 3], block: [u32; 3], p: &P) -> Result<(), String> {
        let emu = kern.emu.expect("built without a C++ compiler: no emulator");
        let mut err = [0 as std::ffi::c_char; 512];
        // SAFETY: `p` is the kernel's parameter struct and every pointer in it refers to a
        // live host buffer of the sizes the kernel uses.
        let rc = unsafe {
            emu(
                grid.as_ptr(),
                block.as_ptr(),
                0,
                (p as *const P).cast(),
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            // SAFETY: the emulator NUL-terminates the message within err_len.
            let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) };
            Err(msg.to_string_lossy().into_owned())
        }
    }

    fn add_bias(rows: usize, n: usize, grid: u32) -> Vec<f32> {
        let mut y: Vec<f32> = (0..rows * n).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..n).map(|j| 1000.0 * j as f32).collect();
        let p = AddBiasParams {
            y: y.as_mut_ptr() as u64,
            b: b.as_ptr() as u64,
            rows: rows as i32,
            n: n as i32,
        };
        launch(k::ADD_BIAS_F32, [grid, 1, 1], [256, 1, 1], &p).unwrap();
        y
    }

    #[test]
    fn add_bias_runs_on_the_emulator() {
        if !emu_built() {
            return;
        }
        let (rows, n) = (37, 75);
        // Grid-stride: one block and many blocks give the same result.
        for grid in [1, 3, 11] {
            let y = add_bias(rows, n, grid);
            for (i, v) in y.iter().enumerate() {
                assert_eq!(*v, i as f32 + 1000.0 * (i % n) as f32, "grid {grid} at {i}");
            }
        }
    }

    #[test]
    fn rmsnorm_runs_on_the_emulator() {
        if !emu_built() {
            return;
        }
        rmsnorm_check(5, 300);
    }

    /// Block reductions: __syncthreads, warp shuffles over 8 warps and `__shared__` scratch,
    /// one block per token.
    fn rmsnorm_check(tokens: usize, c: usize) {
        let x: Vec<f32> = (0..tokens * c)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let w: Vec<f32> = (0..c).map(|i| 0.5 + (i % 7) as f32 / 7.0).collect();
        let mut out = vec![bf16::from_f32(f32::NAN); tokens * c];
        let p = RmsNormParams {
            x: x.as_ptr() as u64,
            w: w.as_ptr() as u64,
            modulation: 0,
            out: out.as_mut_ptr() as u64,
            tokens: tokens as i32,
            n: 1,
            c: c as i32,
            mod_offset: 0,
            mod_stride: 0,
            eps: 1e-6,
        };
        launch(
            k::RMSNORM_ADALN_BF16,
            [tokens as u32, 1, 1],
            [256, 1, 1],
            &p,
        )
        .unwrap();
        for t in 0..tokens {
            let row = &x[t * c..(t + 1) * c];
            let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / c as f64;
            let inv = 1.0 / (ms + 1e-6).sqrt();
            for i in 0..c {
                let want = row[i] as f64 * inv * w[i] as f64;
                let got = out[t * c + i].to_f32() as f64;
                assert!(
                    (got - want).abs() <= 1e-2 * want.abs().max(1e-3),
                    "token {t} dim {i}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn emulator_reports_bad_launches() {
        if !emu_built() {
            return;
        }
        let mut y = vec![0f32; 4];
        let b = [0f32; 4];
        let p = AddBiasParams {
            y: y.as_mut_ptr() as u64,
            b: b.as_ptr() as u64,
            rows: 1,
            n: 4,
        };
        let big_block = launch(k::ADD_BIAS_F32, [1, 1, 1], [2048, 1, 1], &p);
        refused(big_block, &["add_bias_f32", "block"]);
        refused(
            launch(k::ADD_BIAS_F32, [0, 1, 1], [32, 1, 1], &p),
            &["grid"],
        );
        // attention_tc_* declare __launch_bounds__(128).
        let over = launch(k::ATTENTION_TC_D64_BF16, [1, 1, 1], [256, 1, 1], &p);
        refused(over, &["__launch_bounds__(128)"]);
    }

    #[test]
    fn emulator_launches_run_concurrently() {
        if !emu_built() {
            return;
        }
        // Each OS thread has its own shared memory and fibers: no lock, no interference.
        let handles: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..5 {
                        rmsnorm_check(3 + t + i, 100 + 50 * t);
                        let y = add_bias(9 + t, 33, 2);
                        for (i, v) in y.iter().enumerate() {
                            assert_eq!(*v, i as f32 + 1000.0 * (i % 33) as f32);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    /// A refused launch: its error must name every one of `words`.
    fn refused<E: std::fmt::Display>(r: Result<(), E>, words: &[&str]) {
        let e = match r {
            Ok(()) => panic!("accepted a launch that must be refused ({words:?})"),
            Err(e) => e.to_string(),
        };
        for w in words {
            assert!(e.contains(w), "{w:?} not in: {e}");
        }
    }

    #[test]
    fn launches_over_the_launch_bound_are_refused() {
        use super::super::device::{Gpu, check_launch};
        use super::super::ledger::Traffic;
        use super::AddBiasParams;
        // The check itself, as both backends run it.
        assert!(check_launch(k::ADD_BIAS_F32, (256, 1, 1), 0).is_ok());
        assert!(check_launch(k::ADD_BIAS_F32, (64, 2, 2), 0).is_ok());
        let bound_256 = "__launch_bounds__(256) (kernels/norm.cu)";
        let over = check_launch(k::ADD_BIAS_F32, (128, 2, 2), 0);
        refused(over, &["add_bias_f32", "512 threads", bound_256]);
        let over = check_launch(k::ATTENTION_TC_D64_BF16, (256, 1, 1), 0);
        refused(over, &["__launch_bounds__(128)"]);
        let smem = check_launch(k::ADD_BIAS_F32, (32, 1, 1), 1024);
        refused(smem, &["dynamic shared memory"]);
        // Through Gpu::launch: refused before the kernel runs (y keeps its values).
        let g = Gpu::emu().unwrap();
        let y = g.upload(&[1.0f32; 4]).unwrap();
        let b = g.upload(&[2.0f32; 4]).unwrap();
        let p = AddBiasParams {
            y: g.ptr(&y),
            b: g.ptr(&b),
            rows: 1,
            n: 4,
        };
        let bound = k::ADD_BIAS_F32.max_threads;
        let launch_with = |threads: u32| {
            let block = (threads, 1, 1);
            g.launch(k::ADD_BIAS_F32, (1, 1, 1), block, 0, &p, Traffic::default())
        };
        refused(
            launch_with(bound + 32),
            &["exceeds the kernel's __launch_bounds__"],
        );
        assert_eq!(g.download(&y).unwrap(), vec![1.0; 4]);
        launch_with(bound).unwrap();
        assert_eq!(g.download(&y).unwrap(), vec![3.0; 4]);
    }
}
