//! The description of one cuBLASLt call ([`GemmCall`]: every `cublasLtMatmul` argument), its
//! check by cuBLASLt's rules and host interpretation ([`host_gemm`], the emulator's GEMM), and
//! the cuBLASLt state a GPU holds (`Lt`: handle, algorithms pinned per [`AlgoKey`]). Below
//! `device` (which owns an `Lt`) and `gemm` (which runs calls on a `Gpu`); `cuda::gemm`
//! re-exports the public items.

use super::ledger::Traffic;
use anyhow::{Context, Result, bail};
pub use cudarc::cublas::sys::cublasOperation_t as Op;
use cudarc::cublaslt::sys as lt;
use half::{bf16, f16};
pub use lt::{cublasComputeType_t as ComputeType, cudaDataType as DataType};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

/// One matrix of a cuBLASLt call: its address and the attributes of its layout descriptor
/// (`cublasLtMatrixLayoutCreate(type, rows, cols, ld)` plus `BATCH_COUNT` and
/// `STRIDED_BATCH_OFFSET`; order is the default, column-major). `rows`/`cols` are those of the
/// matrix as stored, before `op`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Matrix {
    pub ptr: u64,
    pub dtype: DataType,
    pub rows: u64,
    pub cols: u64,
    pub ld: i64,
    pub batch_count: i32,
    /// Elements between consecutive batch entries.
    pub batch_stride: i64,
}

/// A cuBLASLt algorithm (`cublasLtMatmulAlgo_t`, opaque to us).
pub type Algo = lt::cublasLtMatmulAlgo_t;

/// Every argument of one `cublasLtMatmul`: `D_i = alpha op(A_i) op(B_i) + beta C_i` for each
/// batch entry i, with `op(A)` (m x k), `op(B)` (k x n), C and D (m x n); m, n and k are
/// implied by the layouts, as in cuBLASLt.
#[derive(Clone, Copy, Debug)]
pub struct GemmCall {
    /// `CUBLASLT_MATMUL_DESC_COMPUTE_TYPE` and `_SCALE_TYPE` (alpha/beta are of the scale type).
    pub compute: ComputeType,
    pub scale: DataType,
    /// `CUBLASLT_MATMUL_DESC_TRANSA` / `_TRANSB`.
    pub trans_a: Op,
    pub trans_b: Op,
    pub alpha: f32,
    pub beta: f32,
    pub a: Matrix,
    pub b: Matrix,
    pub c: Matrix,
    pub d: Matrix,
    /// The algorithm; `None` until [`gemm`](super::gemm::gemm) pins it on a GPU (the emulator ignores it).
    pub algo: Option<Algo>,
}

/// An operand for [`GemmCall::strided`]: address, element type, leading dimension, and
/// stride between batch entries (elements).
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    pub ptr: u64,
    pub dtype: DataType,
    pub ld: usize,
    pub stride: usize,
}

/// A cuBLAS status the emulator reports for a call cuBLASLt would refuse.
fn refuse(status: &str, call: &GemmCall, why: std::fmt::Arguments) -> anyhow::Error {
    anyhow::anyhow!("cuBLASLt matmul: {status}: {why} (call {call:?})")
}

/// Bytes per element of the data types the engine's GEMMs use.
fn dtype_bytes(d: DataType) -> Option<usize> {
    match d {
        DataType::CUDA_R_32F => Some(4),
        DataType::CUDA_R_16BF | DataType::CUDA_R_16F => Some(2),
        _ => None,
    }
}

/// The rows and columns of `op(M)` for a stored (rows x cols) matrix.
fn op_dims(op: Op, m: &Matrix) -> (u64, u64) {
    match op {
        Op::CUBLAS_OP_N => (m.rows, m.cols),
        _ => (m.cols, m.rows),
    }
}

impl GemmCall {
    /// The compulsory traffic of this call: each stored matrix's elements once per batch entry
    /// (once in all when its batch stride is 0: a weight shared by the batch; a leading
    /// dimension above the rows leaves gaps that are not read), C read only when beta != 0,
    /// D written; 2 m n k FLOPs per batch entry.
    pub fn traffic(&self) -> Result<Traffic> {
        let batch = self.d.batch_count.max(1) as u64;
        let bytes = |x: &Matrix| -> Result<u64> {
            let per = dtype_bytes(x.dtype)
                .with_context(|| format!("GEMM dtype {:?} is not one the engine uses", x.dtype))?;
            let copies = if x.batch_stride == 0 { 1 } else { batch };
            Ok(x.rows * x.cols * copies * per as u64)
        };
        let (m, k) = op_dims(self.trans_a, &self.a);
        let n = op_dims(self.trans_b, &self.b).1;
        let c_read = if self.beta != 0.0 { bytes(&self.c)? } else { 0 };
        let read = bytes(&self.a)? + bytes(&self.b)? + c_read;
        Ok(Traffic::new(
            read as usize,
            bytes(&self.d)? as usize,
            (2 * m * n * k * batch) as usize,
        ))
    }

    /// The call of a strided-batched column-major GEMM with alpha 1, f32 compute and scale,
    /// B not transposed, C and D the same matrix: `C_i (m x n) = op_a(A_i) B_i + beta C_i`
    /// for i in 0..batch, where A is stored (m x k) (`CUBLAS_OP_N`) or (k x m)
    /// (`CUBLAS_OP_T`).
    pub fn strided(
        trans_a: Op,
        (m, n, k): (usize, usize, usize),
        [a, b, c]: [Operand; 3],
        beta: f32,
        batch: usize,
    ) -> GemmCall {
        let (ar, ac) = match trans_a {
            Op::CUBLAS_OP_N => (m, k),
            _ => (k, m),
        };
        let layout = |o: Operand, rows: usize, cols: usize| Matrix {
            ptr: o.ptr,
            dtype: o.dtype,
            rows: rows as u64,
            cols: cols as u64,
            ld: o.ld as i64,
            batch_count: batch as i32,
            batch_stride: o.stride as i64,
        };
        let cm = layout(c, m, n);
        GemmCall {
            compute: ComputeType::CUBLAS_COMPUTE_32F,
            scale: DataType::CUDA_R_32F,
            trans_a,
            trans_b: Op::CUBLAS_OP_N,
            alpha: 1.0,
            beta,
            a: layout(a, ar, ac),
            b: layout(b, k, n),
            c: cm,
            d: cm,
            algo: None,
        }
    }

    /// (m, n, k) after checking the call as cuBLASLt does: what it would refuse is an error
    /// naming the status it would return. Combinations cuBLASLt accepts but the emulator does
    /// not model (other compute types, conjugate ops) are refused too, as not modelled.
    pub fn check(&self) -> Result<(usize, usize, usize)> {
        let no = |why: std::fmt::Arguments| refuse("CUBLAS_STATUS_NOT_SUPPORTED", self, why);
        let bad = |why: std::fmt::Arguments| refuse("CUBLAS_STATUS_INVALID_VALUE", self, why);
        if self.compute != ComputeType::CUBLAS_COMPUTE_32F || self.scale != DataType::CUDA_R_32F {
            return Err(no(format_args!(
                "compute {:?} with scale {:?} (only CUBLAS_COMPUTE_32F with CUDA_R_32F scale \
                 is modelled)",
                self.compute, self.scale
            )));
        }
        for (name, op) in [("A", self.trans_a), ("B", self.trans_b)] {
            if !matches!(op, Op::CUBLAS_OP_N | Op::CUBLAS_OP_T) {
                return Err(no(format_args!("op {name} {op:?} (N or T is modelled)")));
            }
        }
        let mats = [
            ("A", &self.a),
            ("B", &self.b),
            ("C", &self.c),
            ("D", &self.d),
        ];
        for (name, x) in mats {
            if dtype_bytes(x.dtype).is_none() {
                return Err(no(format_args!("{name} type {:?}", x.dtype)));
            }
            // cublasLtMatrixLayoutCreate: ld >= max(1, rows) for column-major order.
            if x.ld < (x.rows.max(1) as i64) {
                return Err(bad(format_args!(
                    "ld{name} {} below the {} rows of {name} as stored",
                    x.ld, x.rows
                )));
            }
            if x.batch_count < 1 || x.batch_stride < 0 {
                return Err(bad(format_args!(
                    "{name} batch count {} stride {}",
                    x.batch_count, x.batch_stride
                )));
            }
            if x.batch_count != self.d.batch_count {
                return Err(bad(format_args!(
                    "{name} batch count {} differs from D's {}",
                    x.batch_count, self.d.batch_count
                )));
            }
            if x.ptr % dtype_bytes(x.dtype).unwrap() as u64 != 0 {
                return Err(bad(format_args!(
                    "{name} at {:#x} not aligned to its element",
                    x.ptr
                )));
            }
        }
        // A and B share one type; C and D share one; the pairs cuBLASLt lists for
        // CUBLAS_COMPUTE_32F with a 32F scale.
        use DataType::{CUDA_R_16BF as BF, CUDA_R_16F as H, CUDA_R_32F as F};
        let types = (self.a.dtype, self.b.dtype, self.c.dtype, self.d.dtype);
        let supported = matches!(
            types,
            (BF, BF, BF, BF) | (BF, BF, F, F) | (H, H, H, H) | (H, H, F, F) | (F, F, F, F)
        );
        if !supported {
            return Err(no(format_args!(
                "types A {:?} B {:?} C {:?} D {:?} with CUBLAS_COMPUTE_32F",
                types.0, types.1, types.2, types.3
            )));
        }
        let (m, k) = op_dims(self.trans_a, &self.a);
        let (kb, n) = op_dims(self.trans_b, &self.b);
        if kb != k || (self.d.rows, self.d.cols) != (m, n) {
            return Err(bad(format_args!(
                "op(A) is {m} x {k}, op(B) {kb} x {n}, D {} x {}",
                self.d.rows, self.d.cols
            )));
        }
        if (self.c.rows, self.c.cols) != (m, n) {
            return Err(bad(format_args!(
                "C is {} x {}, D {m} x {n}",
                self.c.rows, self.c.cols
            )));
        }
        // In place (C and D at one address) needs one layout for both.
        if self.c.ptr == self.d.ptr && self.c != self.d {
            return Err(bad(format_args!("C == D in place with different layouts")));
        }
        Ok((m as usize, n as usize, k as usize))
    }

    /// The key its algorithm is pinned by: the call without its addresses, n (D's columns)
    /// and batch count, which are what change with the batch size; plus the alignment every
    /// address and leading dimension keeps (capped at 16 bytes, so that offsets that are
    /// multiples of 16 bytes share one algorithm).
    pub fn algo_key(&self) -> AlgoKey {
        let mats = [&self.a, &self.b, &self.c, &self.d];
        let mut align = 16u64;
        for x in mats {
            let size = dtype_bytes(x.dtype).unwrap_or(1) as u64;
            for v in [x.ptr, x.ld as u64 * size, x.batch_stride as u64 * size] {
                if v != 0 {
                    align = align.min(1 << v.trailing_zeros().min(4));
                }
            }
        }
        let layout = |x: &Matrix, fixed_cols: bool| {
            (
                x.dtype as u32,
                x.rows,
                if fixed_cols { x.cols } else { 0 },
                x.ld,
            )
        };
        // Which of A's and B's dimensions is n depends on the ops.
        let (a_fixed, b_fixed) = (true, self.trans_b == Op::CUBLAS_OP_T);
        AlgoKey {
            ops: (self.trans_a as u32, self.trans_b as u32),
            compute: self.compute as u32,
            scale: self.scale as u32,
            layouts: [
                layout(&self.a, a_fixed),
                if b_fixed {
                    (self.b.dtype as u32, 0, self.b.cols, self.b.ld)
                } else {
                    layout(&self.b, false)
                },
                layout(&self.c, false),
                layout(&self.d, false),
            ],
            align: align as u32,
        }
    }
}

/// What a pinned algorithm is chosen for (see [`GemmCall::algo_key`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AlgoKey {
    ops: (u32, u32),
    compute: u32,
    scale: u32,
    /// Per matrix: type, rows, cols (0 where it is n), ld.
    layouts: [(u32, u64, u64, i64); 4],
    align: u32,
}

/// The extent in elements of a column-major (rows x cols) matrix with leading dimension ld.
fn extent(x: &Matrix) -> usize {
    if x.rows == 0 || x.cols == 0 {
        0
    } else {
        ((x.cols - 1) as usize) * x.ld as usize + x.rows as usize
    }
}

/// Element `i` of a matrix at `base` (bytes), as f32.
///
/// # Safety
/// `base + i * size` must be a readable element of `dtype`.
unsafe fn load(dtype: DataType, base: usize, i: usize) -> f32 {
    // SAFETY: per the contract.
    unsafe {
        match dtype {
            DataType::CUDA_R_32F => *(base as *const f32).add(i),
            DataType::CUDA_R_16BF => (*(base as *const bf16).add(i)).to_f32(),
            _ => (*(base as *const f16).add(i)).to_f32(),
        }
    }
}

/// `cublasLtMatmul` on host memory, by cuBLASLt's definition of the call's fields: checks it
/// as cuBLASLt does ([`GemmCall::check`]) and every operand's byte range with `check` before
/// reading (C only when `beta != 0`: cuBLAS does not read C then, so NaN/poison there does not
/// propagate). Products and sums in f32 (`math::matmul_bt` on f32 copies of the operands),
/// then `alpha * sum + beta * C`, rounded to D's type (round to nearest even). The algorithm
/// is ignored.
pub fn host_gemm(call: &GemmCall, check: impl Fn(&str, usize, usize) -> Result<()>) -> Result<()> {
    let (m, n, k) = call.check()?;
    let batch = call.d.batch_count as usize;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let bytes = |x: &Matrix| dtype_bytes(x.dtype).unwrap();
    let base = |x: &Matrix, i: usize| x.ptr as usize + i * x.batch_stride as usize * bytes(x);
    for i in 0..batch {
        let what =
            |op: &str| format!("cuBLAS GEMM (m {m} n {n} k {k}, batch {i}/{batch}) operand {op}");
        let mut read = vec![("D", &call.d)];
        if k > 0 {
            read.extend([("A", &call.a), ("B", &call.b)]);
        }
        if call.beta != 0.0 {
            read.push(("C", &call.c));
        }
        for (name, x) in read {
            check(&what(name), base(x, i), extent(x) * bytes(x))?;
        }
    }
    // Element (r, c) of op(X) for a stored column-major X: op N reads (r, c), op T (c, r).
    let at = |op: Op, x: &Matrix, r: usize, c: usize| match op {
        Op::CUBLAS_OP_N => r + c * x.ld as usize,
        _ => c + r * x.ld as usize,
    };
    let mut af = vec![0.0f32; m * k];
    let mut bt = vec![0.0f32; n * k];
    let mut cf = vec![0.0f32; m * n];
    for i in 0..batch {
        let (abase, bbase) = (base(&call.a, i), base(&call.b, i));
        let (cbase, dbase) = (base(&call.c, i), base(&call.d, i));
        // op(A) as a dense row-major (m x k) f32 matrix, op(B) transposed: row-major (n x k).
        for r in 0..m {
            for p in 0..k {
                // SAFETY: inside A's extent, checked above.
                af[r * k + p] =
                    unsafe { load(call.a.dtype, abase, at(call.trans_a, &call.a, r, p)) };
            }
        }
        for j in 0..n {
            for p in 0..k {
                // SAFETY: inside B's extent, checked above.
                bt[j * k + p] =
                    unsafe { load(call.b.dtype, bbase, at(call.trans_b, &call.b, p, j)) };
            }
        }
        // As `A B^T` (the NT kernel): every element's sum runs in one order whatever m and n,
        // so a batch's rows come out the same at any batch size (tests/batching.rs).
        crate::math::matmul_bt(&af, &bt, &mut cf, m, k, n, 0.0);
        for r in 0..m {
            for j in 0..n {
                let mut v = call.alpha * cf[r * n + j];
                if call.beta != 0.0 {
                    // SAFETY: inside C's extent, checked above.
                    v += call.beta
                        * unsafe { load(call.c.dtype, cbase, r + j * call.c.ld as usize) };
                }
                let idx = r + j * call.d.ld as usize;
                // SAFETY: inside D's extent, checked above; D is writable emulated memory.
                unsafe {
                    match call.d.dtype {
                        DataType::CUDA_R_32F => *(dbase as *mut f32).add(idx) = v,
                        DataType::CUDA_R_16BF => *(dbase as *mut bf16).add(idx) = bf16::from_f32(v),
                        _ => *(dbase as *mut f16).add(idx) = f16::from_f32(v),
                    }
                }
            }
        }
    }
    Ok(())
}

/// The n (D's columns) of the representative call an algorithm is pinned for: a mid-size
/// batch of rows; fixed, so that which algorithm a key gets never depends on which batch
/// size ran first.
pub(super) const REPRESENTATIVE_N: u64 = 256;

/// cuBLASLt state of a GPU: the handle, the algorithm pinned per [`AlgoKey`], and the
/// algorithm each (key, n, batch count) was checked to run with.
pub(crate) struct Lt {
    handle: lt::cublasLtHandle_t,
    pinned: Mutex<HashMap<AlgoKey, Algo>>,
    checked: Mutex<HashMap<(AlgoKey, u64, i32), Algo>>,
    /// Keys already reported as not batch-invariant (each is reported once).
    warned: Mutex<HashSet<AlgoKey>>,
}

// SAFETY: the handle is used from whichever thread owns the Gpu; cuBLASLt handles may be used
// from any thread as long as calls on one stream are not concurrent, which the Gpu's single
// stream and &self methods (calls are serialized by the caller's ownership) ensure.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: created in Lt::new, destroyed once.
        unsafe { cudarc::cublaslt::result::destroy_handle(self.handle) }.ok();
    }
}

/// The matmul descriptor and the four layouts of one call, destroyed on drop.
struct Descs {
    desc: lt::cublasLtMatmulDesc_t,
    layouts: Vec<lt::cublasLtMatrixLayout_t>,
}

impl Drop for Descs {
    fn drop(&mut self) {
        // SAFETY: each was created once by Descs::new and is destroyed once here.
        unsafe {
            for l in &self.layouts {
                cudarc::cublaslt::result::destroy_matrix_layout(*l).ok();
            }
            cudarc::cublaslt::result::destroy_matmul_desc(self.desc).ok();
        }
    }
}

/// `cublasLt*SetAttribute` with a value of type `T` (the attribute's documented type).
macro_rules! set_attr {
    ($f:ident, $obj:expr, $attr:expr, $v:expr) => {{
        let v = $v;
        // SAFETY: `$obj` is a live descriptor and `v` the attribute's documented type.
        unsafe {
            cudarc::cublaslt::result::$f(
                $obj,
                $attr,
                &v as *const _ as *const std::ffi::c_void,
                std::mem::size_of_val(&v),
            )
        }
    }};
}

/// `lt::$f(handle, desc, A, B, C, D layouts, rest...)`: the leading arguments that
/// cublasLtMatmulAlgoCheck and cublasLtMatmulAlgoGetHeuristic share, from a [`Descs`].
macro_rules! lt_on_descs {
    ($f:ident, $handle:expr, $d:expr, $($rest:expr),+ $(,)?) => {{
        let d: &Descs = $d;
        let l = &d.layouts;
        lt::$f($handle, d.desc, l[0], l[1], l[2], l[3], $($rest),+)
    }};
}

impl Descs {
    /// The descriptors of `call`, field for field.
    fn new(call: &GemmCall) -> Result<Descs> {
        use lt::cublasLtMatmulDescAttributes_t as D;
        use lt::cublasLtMatrixLayoutAttribute_t as L;
        let desc = cudarc::cublaslt::result::create_matmul_desc(call.compute, call.scale)?;
        let mut d = Descs {
            desc,
            layouts: Vec::new(),
        };
        // TRANSA/TRANSB are int32_t cublasOperation_t.
        set_attr!(
            set_matmul_desc_attribute,
            desc,
            D::CUBLASLT_MATMUL_DESC_TRANSA,
            call.trans_a as i32
        )?;
        set_attr!(
            set_matmul_desc_attribute,
            desc,
            D::CUBLASLT_MATMUL_DESC_TRANSB,
            call.trans_b as i32
        )?;
        for x in [&call.a, &call.b, &call.c, &call.d] {
            let l = cudarc::cublaslt::result::create_matrix_layout(x.dtype, x.rows, x.cols, x.ld)?;
            d.layouts.push(l);
            set_attr!(
                set_matrix_layout_attribute,
                l,
                L::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                x.batch_count
            )?;
            set_attr!(
                set_matrix_layout_attribute,
                l,
                L::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                x.batch_stride
            )?;
        }
        Ok(d)
    }
}

impl Lt {
    pub(crate) fn new() -> Result<Lt> {
        Ok(Lt {
            handle: cudarc::cublaslt::result::create_handle().context("cublasLtCreate")?,
            pinned: Mutex::default(),
            checked: Mutex::default(),
            warned: Mutex::default(),
        })
    }

    /// Whether `algo` runs `call` (cublasLtMatmulAlgoCheck) within `ws` workspace bytes.
    fn fits(&self, call: &GemmCall, algo: &Algo, ws: usize) -> Result<bool> {
        let d = Descs::new(call)?;
        let mut res = std::mem::MaybeUninit::<lt::cublasLtMatmulHeuristicResult_t>::zeroed();
        // SAFETY: live handle and descriptors; `res` is written by the call.
        let st = unsafe {
            lt_on_descs!(
                cublasLtMatmulAlgoCheck,
                self.handle,
                &d,
                algo,
                res.as_mut_ptr()
            )
        };
        // SAFETY: zero-initialised plain data, possibly filled in by the call.
        let res = unsafe { res.assume_init() };
        Ok(st == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS && res.workspaceSize <= ws)
    }

    /// An algorithm for `call` without split-K: the heuristic's candidates (at the call's
    /// alignment and workspace), first those it already proposes without split-K, then the
    /// others with split-K forced off, each confirmed by cublasLtMatmulAlgoCheck.
    fn choose(&self, call: &GemmCall, ws: usize) -> Result<Algo> {
        use lt::cublasLtMatmulAlgoConfigAttributes_t as C;
        use lt::cublasLtMatmulPreferenceAttributes_t as P;
        let d = Descs::new(call)?;
        let pref = cudarc::cublaslt::result::create_matmul_pref()?;
        struct Pref(lt::cublasLtMatmulPreference_t);
        impl Drop for Pref {
            fn drop(&mut self) {
                // SAFETY: created above, destroyed once.
                unsafe { cudarc::cublaslt::result::destroy_matmul_pref(self.0) }.ok();
            }
        }
        let pref = Pref(pref);
        set_attr!(
            set_matmul_pref_attribute,
            pref.0,
            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            ws as u64
        )?;
        // The heuristic assumes 256-byte aligned addresses unless told otherwise.
        let align = call.algo_key().align;
        for p in [
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
        ] {
            set_attr!(set_matmul_pref_attribute, pref.0, p, align)?;
        }
        const WANT: usize = 16;
        // SAFETY: plain data, written by the heuristic for the first `got` entries.
        let mut res: Vec<lt::cublasLtMatmulHeuristicResult_t> =
            vec![unsafe { std::mem::zeroed() }; WANT];
        let mut got = 0i32;
        // SAFETY: live handle and descriptors; `res` has room for WANT results.
        unsafe {
            lt_on_descs!(
                cublasLtMatmulAlgoGetHeuristic,
                self.handle,
                &d,
                pref.0,
                WANT as i32,
                res.as_mut_ptr(),
                &mut got,
            )
        }
        .result()
        .context("cublasLtMatmulAlgoGetHeuristic")?;
        let cands: Vec<Algo> = res[..got.max(0) as usize]
            .iter()
            .filter(|r| r.state == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect();
        let splitk = |a: &Algo| {
            let mut v = 0u32;
            let mut written = 0usize;
            // SAFETY: reads a uint32_t attribute of a valid algo.
            let st = unsafe {
                lt::cublasLtMatmulAlgoConfigGetAttribute(
                    a,
                    C::CUBLASLT_ALGO_CONFIG_SPLITK_NUM,
                    &mut v as *mut u32 as *mut std::ffi::c_void,
                    4,
                    &mut written,
                )
            };
            if st == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                v
            } else {
                u32::MAX
            }
        };
        let (native, split): (Vec<Algo>, Vec<Algo>) =
            cands.into_iter().partition(|a| splitk(a) <= 1);
        for mut a in native.into_iter().chain(split) {
            // SAFETY: `a` is a valid algo; the values are the attributes' uint32_t types.
            let forced = unsafe {
                let one = 1u32;
                let none = lt::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_NONE as u32;
                lt::cublasLtMatmulAlgoConfigSetAttribute(
                    &mut a,
                    C::CUBLASLT_ALGO_CONFIG_SPLITK_NUM,
                    &one as *const u32 as *const _,
                    4,
                )
                .result()
                .and_then(|()| {
                    lt::cublasLtMatmulAlgoConfigSetAttribute(
                        &mut a,
                        C::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME,
                        &none as *const u32 as *const _,
                        4,
                    )
                    .result()
                })
            };
            if forced.is_ok() && self.fits(call, &a, ws)? {
                return Ok(a);
            }
        }
        bail!(
            "cuBLASLt offers no algorithm without split-K for {:?} ({got} candidates)",
            call.algo_key()
        )
    }

    /// The algorithm `call` runs with: the one pinned for its key (chosen once, for the
    /// representative n and batch count 1), checked once per (n, batch count) to accept this
    /// call. Should it not, the call gets its own algorithm (still without split-K) and a
    /// one-time warning that this key's rows may then depend on the batch size.
    pub(super) fn pin(&self, call: &GemmCall, ws: usize) -> Result<Algo> {
        let key = call.algo_key();
        let at = (key, call.d.cols, call.d.batch_count);
        // Each lock is taken and released in its own statement: a guard living through a
        // `match` would deadlock on the next lock() of the same mutex.
        let done = self.checked.lock().unwrap().get(&at).copied();
        if let Some(a) = done {
            return Ok(a);
        }
        let known = self.pinned.lock().unwrap().get(&key).copied();
        let pinned = match known {
            Some(a) => a,
            None => {
                let a = self
                    .choose(&representative(call), ws)
                    .with_context(|| format!("pinning a GEMM algorithm for {key:?}"))?;
                self.pinned.lock().unwrap().insert(key, a);
                a
            }
        };
        let algo = if self.fits(call, &pinned, ws)? {
            pinned
        } else {
            if self.warned.lock().unwrap().insert(key) {
                eprintln!(
                    "warning: the GEMM algorithm pinned for {key:?} does not accept n {} batch \
                     {}; that call uses its own, so its rows may depend on the batch size",
                    call.d.cols, call.d.batch_count
                );
            }
            self.choose(call, ws)?
        };
        self.checked.lock().unwrap().insert(at, algo);
        Ok(algo)
    }

    /// `cublasLtMatmul` with every field of `call` as it is.
    ///
    /// # Safety
    /// The call's addresses must be live device memory covering its layouts; `ws` (address,
    /// bytes) a device workspace used only on `stream`.
    pub(crate) unsafe fn matmul(
        &self,
        call: &GemmCall,
        ws: (u64, usize),
        stream: lt::cudaStream_t,
    ) -> Result<()> {
        let algo = call.algo.context("a GEMM call without an algorithm")?;
        let d = Descs::new(call)?;
        // SAFETY: per the contract; alpha/beta are f32, the call's scale type (checked by
        // cuBLASLt against the descriptor).
        unsafe {
            cudarc::cublaslt::result::matmul(
                self.handle,
                d.desc,
                &call.alpha as *const f32 as *const _,
                &call.beta as *const f32 as *const _,
                call.a.ptr as *const _,
                d.layouts[0],
                call.b.ptr as *const _,
                d.layouts[1],
                call.c.ptr as *const _,
                d.layouts[2],
                call.d.ptr as *mut _,
                d.layouts[3],
                &algo,
                ws.0 as *mut _,
                ws.1,
                stream,
            )
        }?;
        Ok(())
    }
}

/// `call` at the representative n and batch count 1: what its key's algorithm is chosen for.
pub(super) fn representative(call: &GemmCall) -> GemmCall {
    let n = if call.trans_b == Op::CUBLAS_OP_N {
        REPRESENTATIVE_N
    } else {
        REPRESENTATIVE_N.min(call.b.ld as u64)
    };
    let one = |x: Matrix| Matrix {
        batch_count: 1,
        ..x
    };
    let with_n = |x: Matrix| Matrix { cols: n, ..one(x) };
    let b = if call.trans_b == Op::CUBLAS_OP_N {
        with_n(call.b)
    } else {
        Matrix {
            rows: n,
            ..one(call.b)
        }
    };
    GemmCall {
        a: one(call.a),
        b,
        c: with_n(call.c),
        d: with_n(call.d),
        ..*call
    }
}
