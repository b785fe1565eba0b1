//! TensorFlow 1.x bilinear resize (`tf.image.resize_bilinear`, `align_corners=False`, no
//! half-pixel centers), as torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`
//! ("slow", bit-exact on the CPU) computes it for the Inception input.
//!
//! Output pixel `i` samples the input at `src = i * scale` with `scale = in / out` rounded to
//! f32 (torch-fidelity multiplies by an f32 scalar tensor); `lo = floor(src)`, `hi = min(lo +
//! 1, in - 1)`, `d = src - lo`; a row is interpolated first along x, then the two rows along
//! y: `a + (b - a) * d` each time. There is no half-pixel offset, so the last input rows and
//! columns get less weight than the first when downsampling: that is the ADM graph.

/// Per output coordinate: the two source indices and the weight of the second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tap {
    pub lo: usize,
    pub hi: usize,
    pub d: f32,
}

/// The taps of resizing `input` samples to `output` samples (TF1, align_corners false).
pub fn taps(input: usize, output: usize) -> Vec<Tap> {
    assert!(input > 0 && output > 0, "resize taps: empty axis");
    let scale = (input as f64 / output as f64) as f32 as f64;
    (0..output)
        .map(|i| {
            // Python's f32 tensor product, evaluated in f64 (the float64 reference's dtype;
            // exact for the f32 operands).
            let src = i as f64 * scale;
            let lo = (src.floor() as usize).min(input - 1);
            let hi = (lo + 1).min(input - 1);
            Tap {
                lo,
                hi,
                d: (src - lo as f64) as f32,
            }
        })
        .collect()
}

/// Resize one square RGB image `img` (`size` x `size` x 3, uint8, channels last) to `out` x
/// `out` x 3 f32 and map it to the network's input range, `(x - 128) / 128`; the result is
/// written to `dst` (`out * out * 3`, channels last).
pub fn resize_normalize(img: &[u8], size: usize, out: usize, dst: &mut [f32]) {
    assert_eq!(img.len(), size * size * 3, "resize: image length");
    assert_eq!(dst.len(), out * out * 3, "resize: output length");
    let t = taps(size, out);
    let px = |y: usize, x: usize, c: usize| img[(y * size + x) * 3 + c] as f32;
    // Rows lo/hi along x first, as torch-fidelity does (in_0, in_1), then along y.
    for (oy, ty) in t.iter().enumerate() {
        for (ox, tx) in t.iter().enumerate() {
            for c in 0..3 {
                let i00 = px(ty.lo, tx.lo, c);
                let i01 = px(ty.lo, tx.hi, c);
                let i10 = px(ty.hi, tx.lo, c);
                let i11 = px(ty.hi, tx.hi, c);
                let i0 = i00 + (i01 - i00) * tx.d;
                let i1 = i10 + (i11 - i10) * tx.d;
                let v = i0 + (i1 - i0) * ty.d;
                dst[(oy * out + ox) * 3 + c] = (v - 128.0) / 128.0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_by_hand() {
        // 4 -> 3: scale 4/3; src 0, 1.333.., 2.666..
        let t = taps(4, 3);
        assert_eq!((t[0].lo, t[0].hi), (0, 1));
        assert_eq!(t[0].d, 0.0);
        assert_eq!((t[1].lo, t[1].hi), (1, 2));
        assert!((t[1].d - 1.0 / 3.0).abs() < 1e-6);
        assert_eq!((t[2].lo, t[2].hi), (2, 3));
        assert!((t[2].d - 2.0 / 3.0).abs() < 1e-6);
        // 2 -> 4 (upsampling): src 0, 0.5, 1, 1.5; the last clamps hi to the edge.
        let t = taps(2, 4);
        let got: Vec<(usize, usize, f32)> = t.iter().map(|t| (t.lo, t.hi, t.d)).collect();
        assert_eq!(
            got,
            vec![(0, 1, 0.0), (0, 1, 0.5), (1, 1, 0.0), (1, 1, 0.5)]
        );
        // Same size: the identity.
        assert!(
            taps(299, 299)
                .iter()
                .enumerate()
                .all(|(i, t)| t.lo == i && t.d == 0.0)
        );
    }

    #[test]
    fn resize_by_hand() {
        // A 2 x 2 image upsampled to 4 x 4; channel c of pixel (y, x) = 10 (2y + x) + c.
        let img: Vec<u8> = (0..2)
            .flat_map(|y| {
                (0..2).flat_map(move |x| (0..3).map(move |c| (10 * (2 * y + x) + c) as u8))
            })
            .collect();
        let mut out = vec![0.0; 4 * 4 * 3];
        resize_normalize(&img, 2, 4, &mut out);
        // Along each axis the source coordinates are 0, 0.5, 1, 1 (clamped): value per axis
        // weight 0, 5, 10, 10 (x) and 0, 10, 20, 20 (y).
        let ax = [0.0, 5.0, 10.0, 10.0];
        let ay = [0.0, 10.0, 20.0, 20.0];
        let mut worst = 0.0f32;
        for y in 0..4 {
            for x in 0..4 {
                for c in 0..3 {
                    let want = (ay[y] + ax[x] + c as f32 - 128.0) / 128.0;
                    worst = worst.max((out[(y * 4 + x) * 3 + c] - want).abs());
                }
            }
        }
        println!("resize 2 -> 4 by hand: worst abs error {worst:e}");
        assert!(worst < 1e-6);
    }
}
