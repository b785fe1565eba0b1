//! The evaluator's inputs: what a path is ([`input_kind`]: images, or an activation file),
//! and an image source that streams uint8 NHWC batches ([`ImageSource`]) from
//! - an ADM-layout `.npz` (`arr_0` uint8 [N, H, W, 3], H = W; the reference batches
//!   `VIRTUAL_imagenet256_labeled.npz` etc.),
//! - `generate`'s `.npz` (the same `arr_0`, plus `arr_1` labels and `checkergen.json`),
//! - a folder of PNGs (`generate --format png-dir` writes `OUT/<H>/sample_%05d.png`): every
//!   `*.png` in the folder itself, in sorted name order, all of one square size (checked from
//!   their headers before the first batch).
//!
//! Only one batch of pixels is in memory at a time: a 50,000-image file is read by byte
//! range. Every refusal is one line naming the file.

use crate::io::npz::{NpyArray, NpyDtype, NpzReader};
use crate::io::photo::MAX_PHOTO_SIDE;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// What an evaluation input holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    /// Images: an `.npz` with `arr_0`, or a folder of PNGs ([`ImageSource`]).
    Images,
    /// An activation file: an `.npz` with `pool_3` and `spatial`
    /// ([`super::activations::read_activations`]).
    Activations,
}

/// Tell what `path` is, from the archive's entry names (nothing large is read): a directory
/// is a PNG folder; an `.npz` with `pool_3` and `spatial` is an activation file (even when it
/// also has `arr_0`); one with `arr_0` holds images.
pub fn input_kind(path: &Path) -> Result<InputKind> {
    let shown = path.display();
    let m = std::fs::metadata(path).map_err(|e| anyhow::anyhow!("{shown}: cannot read ({e})"))?;
    if m.is_dir() {
        return Ok(InputKind::Images);
    }
    let r = NpzReader::open(path)?;
    if super::activations::is_activation_file(&r)? {
        return Ok(InputKind::Activations);
    }
    if r.contains("arr_0") {
        return Ok(InputKind::Images);
    }
    bail!(
        "{shown}: neither images (arr_0) nor activations (pool_3 and spatial); expected an \
         ADM or generate .npz, an activation file, or a folder of PNGs"
    )
}

/// Where an [`ImageSource`] reads from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// An `.npz` with `arr_0` (the ADM layout).
    AdmNpz,
    /// `generate`'s `.npz` (`arr_0` with `checkergen.json` beside it).
    GenerateNpz,
    /// A folder of PNGs.
    PngFolder,
}

/// A batch of images: `count` x side x side x 3 uint8, channels last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageBatch {
    /// Index of the first image in the source.
    pub first: usize,
    /// Images in the batch.
    pub count: usize,
    /// Side of every image.
    pub side: usize,
    /// The pixels, [count, side, side, 3].
    pub pixels: Vec<u8>,
}

enum Src {
    Npz {
        reader: Box<NpzReader>,
        arr: Box<NpyArray>,
    },
    Png {
        files: Vec<PathBuf>,
    },
}

/// A stream of uint8 NHWC batches from an `.npz` or a PNG folder (see the module docs).
pub struct ImageSource {
    path: PathBuf,
    format: ImageFormat,
    src: Src,
    count: usize,
    side: usize,
    next: usize,
}

impl ImageSource {
    /// Open `path` and check what every batch will need: the array's dtype and shape, or
    /// every PNG's header (all the same square size).
    pub fn open(path: &Path) -> Result<ImageSource> {
        let shown = path.display();
        let m =
            std::fs::metadata(path).map_err(|e| anyhow::anyhow!("{shown}: cannot read ({e})"))?;
        if m.is_dir() {
            return Self::open_png_folder(path);
        }
        let reader = NpzReader::open(path)?;
        if !reader.contains("arr_0") {
            bail!("{shown}: no arr_0 array: not an image .npz");
        }
        let arr = reader.array("arr_0")?;
        let bad = |why: String| {
            anyhow::anyhow!("{shown}: arr_0 is not uint8 [N, H, W, 3] square images ({why})")
        };
        if arr.dtype != Some(NpyDtype::U8) {
            return Err(bad(format!("dtype {:?}", arr.header.descr)));
        }
        if arr.header.fortran_order {
            return Err(bad("Fortran order".into()));
        }
        let (count, side) = match *arr.shape() {
            [n, h, w, 3] if h == w && (1..=MAX_PHOTO_SIDE).contains(&h) => (n, h),
            [_, h, w, 3] if h != w => return Err(bad(format!("{h} x {w} is not square"))),
            [_, h, _, 3] => return Err(bad(format!("side {h}; sides 1..={MAX_PHOTO_SIDE}"))),
            [_, _, _, c] => return Err(bad(format!("{c} channels"))),
            ref s => return Err(bad(format!("shape {s:?}"))),
        };
        if count == 0 {
            bail!("{shown}: arr_0 holds no images");
        }
        let format = if reader.has_entry("checkergen.json") {
            ImageFormat::GenerateNpz
        } else {
            ImageFormat::AdmNpz
        };
        Ok(ImageSource {
            path: path.to_path_buf(),
            format,
            src: Src::Npz {
                reader: Box::new(reader),
                arr: Box::new(arr),
            },
            count,
            side,
            next: 0,
        })
    }

    fn open_png_folder(dir: &Path) -> Result<ImageSource> {
        let shown = dir.display();
        let mut files = Vec::new();
        for e in std::fs::read_dir(dir).with_context(|| format!("{shown}: cannot list"))? {
            let e = e.with_context(|| format!("{shown}: cannot list"))?;
            let name = e.file_name();
            let is_png = Path::new(&name)
                .extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("png"));
            if is_png {
                files.push(e.path());
            }
        }
        files.sort();
        let Some(first) = files.first() else {
            bail!(
                "{shown}: no .png files in the folder (generate --format png-dir writes them \
                 into OUT/<size>/)"
            );
        };
        let (w, h) = png_size(first)?;
        if w != h {
            bail!("{}: image is {w}x{h}, not square", first.display());
        }
        for f in &files[1..] {
            let (fw, fh) = png_size(f)?;
            if (fw, fh) != (w, h) {
                bail!(
                    "{}: image is {fw}x{fh}, but {} is {w}x{h}: every image of a folder must \
                     have one size",
                    f.display(),
                    first.display()
                );
            }
        }
        Ok(ImageSource {
            path: dir.to_path_buf(),
            format: ImageFormat::PngFolder,
            count: files.len(),
            src: Src::Png { files },
            side: w,
            next: 0,
        })
    }

    /// The file or folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the images come from.
    pub fn format(&self) -> ImageFormat {
        self.format
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the source has no images (never: [`open`](Self::open) refuses that).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Side of every image.
    pub fn side(&self) -> usize {
        self.side
    }

    /// Images not yet returned.
    pub fn remaining(&self) -> usize {
        self.count - self.next
    }

    /// The next batch of at most `max` images (max >= 1), or None at the end.
    pub fn next_batch(&mut self, max: usize) -> Result<Option<ImageBatch>> {
        if self.next >= self.count {
            return Ok(None);
        }
        let take = max.max(1).min(self.count - self.next);
        let img = self.side * self.side * 3;
        let bytes = take
            .checked_mul(img)
            .with_context(|| format!("{}: batch too large", self.path.display()))?;
        let first = self.next;
        let pixels = match &self.src {
            Src::Npz { reader, arr } => {
                let p = reader.read_bytes(arr, (first * img) as u64, bytes as u64)?;
                if p.len() != bytes {
                    bail!("{}: arr_0 ends early", self.path.display());
                }
                p
            }
            Src::Png { files } => {
                let mut p = Vec::with_capacity(bytes);
                for f in &files[first..first + take] {
                    let rgb = crate::io::photo::read_png(f)?;
                    if (rgb.width, rgb.height) != (self.side, self.side) {
                        bail!(
                            "{}: image is {}x{}, but the folder's images are {s}x{s} (changed \
                             while being read?)",
                            f.display(),
                            rgb.width,
                            rgb.height,
                            s = self.side
                        );
                    }
                    p.extend_from_slice(&rgb.data);
                }
                p
            }
        };
        self.next += take;
        Ok(Some(ImageBatch {
            first,
            count: take,
            side: self.side,
            pixels,
        }))
    }
}

/// Width and height of a PNG from its header (nothing decoded); sides 1..=16384.
fn png_size(path: &Path) -> Result<(usize, usize)> {
    let shown = path.display();
    crate::paths::check_input(path)?;
    let file = std::fs::File::open(path).with_context(|| format!("{shown}: cannot open"))?;
    let reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .map_err(|e| anyhow::anyhow!("{shown}: not a readable PNG image ({e})"))?;
    let (w, h) = (reader.info().width as usize, reader.info().height as usize);
    if w == 0 || h == 0 || w > MAX_PHOTO_SIDE || h > MAX_PHOTO_SIDE {
        bail!("{shown}: image is {w}x{h}; sides must be 1..={MAX_PHOTO_SIDE}");
    }
    Ok((w, h))
}
