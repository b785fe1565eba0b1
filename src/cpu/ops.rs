//! Dense f32 building blocks shared by the transformer and the VQ decoder.
//! Matrix products go through `matrixmultiply` (packed, SIMD, multi-threaded), never naive loops.

/// C (m x n) = A (m x k) @ B^T where B is stored (n x k) row-major, i.e. a PyTorch Linear
/// weight `[out, in]`. `beta` = 0 overwrites C, 1 accumulates into it.
pub fn matmul_bt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, beta: f32) {
    assert!(a.len() >= m * k && b.len() >= n * k && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: bounds checked above; strides describe row-major A, transposed B, row-major C.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            1,
            k as isize,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// C (m x n) = A (m x k) @ B (k x n), all row-major.
pub fn matmul(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, beta: f32) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: bounds checked above; all operands row-major.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// y (rows x out) = x (rows x in) @ w^T + bias, with `w` a Linear weight `[out, in]`.
pub fn linear(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    rows: usize,
    din: usize,
    dout: usize,
) -> Vec<f32> {
    let mut y = vec![0.0f32; rows * dout];
    if let Some(b) = bias {
        assert_eq!(b.len(), dout);
        for r in y.chunks_exact_mut(dout) {
            r.copy_from_slice(b);
        }
        matmul_bt(x, w, &mut y, rows, din, dout, 1.0);
    } else {
        matmul_bt(x, w, &mut y, rows, din, dout, 0.0);
    }
    y
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Softmax in place over one row, max-subtracted, f32.
pub fn softmax_inplace(row: &mut [f32]) {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0.0f32;
    for v in row.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    let inv = 1.0 / s;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_bt_matches_naive() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut c = vec![0.0; m * n];
        matmul_bt(&a, &b, &mut c, m, k, n, 0.0);
        for i in 0..m {
            for j in 0..n {
                let r: f32 = (0..k).map(|p| a[i * k + p] * b[j * k + p]).sum();
                assert!((c[i * n + j] - r).abs() < 1e-5);
            }
        }
        let mut c2 = vec![0.0; m * n];
        // B^T stored (k x n)
        let bt: Vec<f32> = (0..k * n).map(|idx| b[(idx % n) * k + idx / n]).collect();
        matmul(&a, &bt, &mut c2, m, k, n, 0.0);
        for (x, y) in c.iter().zip(&c2) {
            assert!((x - y).abs() < 1e-5);
        }
    }
}
