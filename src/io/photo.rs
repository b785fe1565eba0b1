//! Real images in: PNG and JPEG decoding to 8-bit RGB, and ADM's `center_crop_arr` (what the reference
//! applies to ImageNet images before encoding; SPEC.md section 9).
//!
//! `center_crop_arr(img, size)`: while the short side >= 2 * size, halve with a box filter
//! (PIL's BOX resize to half the size, rounded down); then resize so the short side is `size` with bicubic
//! (PIL's BICUBIC, a = -0.5, support widened by the downscale factor, i.e. antialiased);
//! then crop the center `size x size`. PIL computes the bicubic passes in fixed point
//! (22-bit coefficients, rounding to 8 bits after the horizontal pass); here they run in f64
//! with the same rounding points, so a pixel can differ from PIL's by one level (1/255) on
//! images that need a resize. 256x256 inputs are used as they are.

use anyhow::{Context, Result, bail};
use std::path::Path;

/// An 8-bit RGB image, row-major `(H, W, 3)`.
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Largest width or height accepted for an input photo.
pub const MAX_PHOTO_SIDE: usize = 16384;

/// Largest ratio of an input photo's long side to its short side: `center_crop_arr` scales
/// the short side to the model's size, so the work grows with the square of this ratio (a
/// 1 x 16384 PNG would become 256 x 4 194 304 pixels).
pub const MAX_PHOTO_ASPECT: usize = 32;

/// Check an image input before any work: a type [`read_image`] reads (by extension), or an
/// `.npz`, and a regular file ([`crate::paths::check_input`]).
pub fn check_image_input(path: &Path) -> Result<()> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if !matches!(ext.as_str(), "png" | "jpg" | "jpeg" | "npz") {
        bail!(
            "{}: unsupported image type '.{ext}' (PNG or JPEG expected)",
            path.display()
        );
    }
    crate::paths::check_input(path).map(|_| ())
}

/// Read an image file by extension: `.png`, or `.jpg` / `.jpeg` (any case); sides within
/// [`MAX_PHOTO_SIDE`] and an aspect ratio within [`MAX_PHOTO_ASPECT`].
pub fn read_image(path: &Path) -> Result<Rgb> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let img = match ext.as_str() {
        "png" => read_png(path)?,
        "jpg" | "jpeg" => read_jpeg(path)?,
        _ => bail!(
            "{}: unsupported image type '.{ext}' (PNG or JPEG expected)",
            path.display()
        ),
    };
    let (long, short) = (img.width.max(img.height), img.width.min(img.height).max(1));
    if long > short * MAX_PHOTO_ASPECT {
        bail!(
            "{}: image is {}x{}; the long side may be at most {MAX_PHOTO_ASPECT} times the \
             short one",
            path.display(),
            img.width,
            img.height
        );
    }
    Ok(img)
}

/// Read a baseline or progressive JPEG (gray, YCbCr, CMYK) as 8-bit RGB (zune-jpeg).
pub fn read_jpeg(path: &Path) -> Result<Rgb> {
    use zune_jpeg::zune_core::{
        bytestream::ZCursor, colorspace::ColorSpace, options::DecoderOptions,
    };
    let shown = path.display();
    let meta = crate::paths::check_input(path)?;
    if meta.len() > 1 << 30 {
        bail!("{shown}: {} bytes is too large for an image", meta.len());
    }
    let bytes = std::fs::read(path).with_context(|| format!("{shown}: cannot read"))?;
    if !jpeg_reaches_eoi(&bytes) {
        bail!(
            "{shown}: truncated JPEG (the data ends before its end-of-image marker; PIL \
             refuses it as 'image file is truncated')"
        );
    }
    let opts = DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_max_width(MAX_PHOTO_SIDE)
        .set_max_height(MAX_PHOTO_SIDE);
    let mut dec = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(&bytes), opts);
    let data = dec
        .decode()
        .map_err(|e| anyhow::anyhow!("{shown}: not a readable JPEG image ({e:?})"))?;
    let (w, h) = dec.dimensions().context("JPEG without dimensions")?;
    if data.len() != w * h * 3 {
        bail!(
            "{shown}: JPEG decoded to {} bytes for {w}x{h} RGB",
            data.len()
        );
    }
    Ok(Rgb {
        width: w,
        height: h,
        data,
    })
}

/// Whether JPEG `bytes` reach their end-of-image marker: the marker segments are walked by
/// their lengths and each scan's entropy-coded data to the next marker (stuffed `FF 00`,
/// restart markers and fill bytes inside). A file that ends first is truncated: libjpeg
/// would make up the missing scans, and PIL refuses such a file ("image file is
/// truncated"), so must we. Bytes after the marker are ignored, as PIL ignores them.
pub fn jpeg_reaches_eoi(bytes: &[u8]) -> bool {
    let len = bytes.len();
    let mut i = 2; // after SOI (the decoder checks it)
    loop {
        // Bytes between segments that are not a marker: libjpeg skips them with a warning.
        while i < len && bytes[i] != 0xFF {
            i += 1;
        }
        while i < len && bytes[i] == 0xFF {
            i += 1;
        }
        let Some(&m) = bytes.get(i) else {
            return false;
        };
        i += 1;
        match m {
            0xD9 => return true,
            0x01 | 0xD0..=0xD8 => continue, // standalone markers
            _ => {
                let Some(l) = bytes.get(i..i + 2) else {
                    return false;
                };
                i += usize::from(u16::from_be_bytes([l[0], l[1]]));
                if i > len {
                    return false;
                }
                if m == 0xDA {
                    // Entropy-coded data up to the next marker that is not stuffing or RST.
                    loop {
                        if i + 1 >= len {
                            return false;
                        }
                        if bytes[i] == 0xFF {
                            match bytes[i + 1] {
                                0x00 | 0xD0..=0xD7 => i += 2,
                                0xFF => i += 1,
                                _ => break,
                            }
                        } else {
                            i += 1;
                        }
                    }
                }
            }
        }
    }
}

/// Read `arr_0` of an `.npz` (np.savez, uncompressed): uint8 `[N, side, side, 3]` images,
/// as ADM's reference batches store them; returns each image's `(side, side, 3)` bytes.
pub fn read_npz(path: &Path, side: usize) -> Result<Vec<Vec<u8>>> {
    let shown = path.display();
    let npy = crate::io::pth::read_zip_entry(path, "arr_0.npy")?;
    let bad =
        |why: &str| anyhow::anyhow!("{shown}: arr_0 is not a uint8 [N, H, W, 3] array ({why})");
    let h = crate::io::npz::parse_npy_header(&npy).map_err(|e| bad(&format!("{e:#}")))?;
    if h.descr != "|u1" && h.descr != "<u1" {
        return Err(bad(&format!("dtype {:?}", h.descr)));
    }
    if h.fortran_order {
        return Err(bad("Fortran order"));
    }
    let shape = h.shape.clone();
    let want = h.elements().map_err(|e| bad(&format!("{e:#}")))?;
    let data = &npy[h.data_offset..];
    if data.len() != want {
        bail!(
            "{shown}: arr_0 declares shape {shape:?} ({want} bytes) but holds {} bytes",
            data.len()
        );
    }
    match shape[..] {
        [n, h, w, 3] if h == side && w == side && n > 0 => {
            Ok(data.chunks_exact(h * w * 3).map(<[u8]>::to_vec).collect())
        }
        _ => bail!(
            "{shown}: arr_0 has shape {shape:?}; expected uint8 [N, {side}, {side}, 3] (N >= 1) \
             matching this model's image size"
        ),
    }
}

/// Read a PNG file (8- or 16-bit; gray, gray+alpha, RGB, RGBA, palette) as 8-bit RGB; alpha
/// is dropped.
pub fn read_png(path: &Path) -> Result<Rgb> {
    let shown = path.display();
    crate::paths::check_input(path)?;
    let file = std::fs::File::open(path).with_context(|| format!("{shown}: cannot open"))?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(file));
    dec.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = dec
        .read_info()
        .map_err(|e| anyhow::anyhow!("{shown}: not a readable PNG image ({e})"))?;
    let (w, h) = (reader.info().width as usize, reader.info().height as usize);
    if w == 0 || h == 0 || w > MAX_PHOTO_SIDE || h > MAX_PHOTO_SIDE {
        bail!("{shown}: image is {w}x{h}; sides must be 1..={MAX_PHOTO_SIDE}");
    }
    let mut buf = vec![0u8; reader.output_buffer_size().context("image too large")?];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| anyhow::anyhow!("{shown}: not a readable PNG image ({e})"))?;
    let ch = info.color_type.samples();
    let px = &buf[..info.buffer_size()];
    let data = match ch {
        1 => px.iter().flat_map(|&g| [g, g, g]).collect(),
        2 => px
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        3 => px.to_vec(),
        4 => px
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        _ => bail!("{shown}: unsupported PNG colour type"),
    };
    Ok(Rgb {
        width: w,
        height: h,
        data,
    })
}

fn cubic(x: f64) -> f64 {
    let (a, x) = (-0.5, x.abs());
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// PIL's box filter: 1 on (-0.5, 0.5].
fn box_filter(x: f64) -> f64 {
    if x > -0.5 && x <= 0.5 { 1.0 } else { 0.0 }
}

/// A PIL resampling filter: the kernel and its support (in input pixels at scale 1).
#[derive(Clone, Copy)]
struct Filter(fn(f64) -> f64, f64);

const BICUBIC: Filter = Filter(cubic, 2.0);
const BOX: Filter = Filter(box_filter, 0.5);

/// PIL-style separable resample of one axis: for each output index, (first input, weights).
fn taps(insize: usize, outsize: usize, f: Filter) -> Vec<(usize, Vec<f64>)> {
    let scale = insize as f64 / outsize as f64;
    let fs = scale.max(1.0);
    let support = f.1 * fs;
    (0..outsize)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5).floor().max(0.0)) as usize;
            let hi = (((center + support + 0.5).floor()) as usize).min(insize);
            let mut w: Vec<f64> = (lo..hi)
                .map(|i| (f.0)((i as f64 - center + 0.5) / fs))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            (lo, w)
        })
        .collect()
}

fn clamp_u8(v: f64) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

/// Resize to `ow x oh` with filter `f` (horizontal pass, round to 8 bits, vertical pass).
fn resize(img: &Rgb, ow: usize, oh: usize, f: Filter) -> Rgb {
    let (iw, ih) = (img.width, img.height);
    let tx = taps(iw, ow, f);
    let mut mid = vec![0u8; ow * ih * 3];
    for y in 0..ih {
        for (x, (lo, w)) in tx.iter().enumerate() {
            for c in 0..3 {
                let v: f64 = w
                    .iter()
                    .enumerate()
                    .map(|(k, &wk)| wk * img.data[(y * iw + lo + k) * 3 + c] as f64)
                    .sum();
                mid[(y * ow + x) * 3 + c] = clamp_u8(v);
            }
        }
    }
    let ty = taps(ih, oh, f);
    let mut data = vec![0u8; ow * oh * 3];
    for (y, (lo, w)) in ty.iter().enumerate() {
        for x in 0..ow {
            for c in 0..3 {
                let v: f64 = w
                    .iter()
                    .enumerate()
                    .map(|(k, &wk)| wk * mid[((lo + k) * ow + x) * 3 + c] as f64)
                    .sum();
                data[(y * ow + x) * 3 + c] = clamp_u8(v);
            }
        }
    }
    Rgb {
        width: ow,
        height: oh,
        data,
    }
}

/// ADM's `center_crop_arr(img, size)` (see the module comment); returns `(size, size, 3)`.
pub fn center_crop_arr(img: Rgb, size: usize) -> Vec<u8> {
    if img.width == size && img.height == size {
        return img.data;
    }
    let mut img = img;
    while img.width.min(img.height) >= 2 * size {
        img = resize(&img, img.width / 2, img.height / 2, BOX);
    }
    let scale = size as f64 / img.width.min(img.height) as f64;
    let ow = ((img.width as f64 * scale).round() as usize).max(size);
    let oh = ((img.height as f64 * scale).round() as usize).max(size);
    let img = resize(&img, ow, oh, BICUBIC);
    let (x0, y0) = ((ow - size) / 2, (oh - size) / 2);
    let mut out = Vec::with_capacity(size * size * 3);
    for y in y0..y0 + size {
        out.extend_from_slice(&img.data[(y * ow + x0) * 3..(y * ow + x0 + size) * 3]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn center_crop_of_a_constant_image_is_constant() {
        let img = Rgb {
            width: 700,
            height: 530,
            data: vec![77; 700 * 530 * 3],
        };
        let out = center_crop_arr(img, 256);
        assert_eq!(out.len(), 256 * 256 * 3);
        assert!(out.iter().all(|&v| v == 77));
    }

    #[test]
    fn jpeg_truncation_is_found() {
        let jpg = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/score/nodejs_full_white_stripe.jpg"
        ))
        .unwrap();
        assert!(jpeg_reaches_eoi(&jpg));
        let mut trailing = jpg.clone();
        trailing.extend_from_slice(b"trailing bytes");
        assert!(jpeg_reaches_eoi(&trailing));
        for cut in [4, 100, jpg.len() / 2, jpg.len() - 2, jpg.len() - 1] {
            assert!(!jpeg_reaches_eoi(&jpg[..cut]), "cut at {cut}");
        }
    }

    #[test]
    fn bicubic_taps_sum_to_one() {
        for (lo, w) in taps(530, 256, BICUBIC)
            .into_iter()
            .chain(taps(531, 265, BOX))
        {
            assert!(lo < 530);
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        }
    }
}
