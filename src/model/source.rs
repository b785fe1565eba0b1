//! Where a weight builder gets each named tensor: a model file's tensor map (validating names
//! and shapes), or a recorder that only lists them. One builder per network then serves both
//! loading and the expected-tensor lists, so every state-dict name is written once.

use super::file::TensorMap;
use anyhow::{Result, bail};

pub(crate) trait Source {
    /// The tensor `name` as f32, which must have exactly `shape`.
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
}

/// Reads from a tensor map; errors name the tensor and both shapes, after `context`. A
/// borrowed map is copied from; an owned one ([`MapSource::owned`], what loading a file uses)
/// gives its large tensors away, so the weights end up in the buffers the file was decoded
/// into and loading holds one copy of them, not two.
pub(crate) struct MapSource<'a> {
    map: Map<'a>,
    context: &'static str,
}

enum Map<'a> {
    Shared(&'a TensorMap),
    Owned(&'a mut TensorMap),
}

/// Tensors up to this many elements are copied even from an owned map (the codebook is read
/// by both the transformer and the decoder); larger ones are each read once.
const MOVE_MIN: usize = 1 << 16;

impl<'a> MapSource<'a> {
    pub(crate) fn new(map: &'a TensorMap, context: &'static str) -> Self {
        MapSource {
            map: Map::Shared(map),
            context,
        }
    }

    pub(crate) fn owned(map: &'a mut TensorMap, context: &'static str) -> Self {
        MapSource {
            map: Map::Owned(map),
            context,
        }
    }

    /// The same map under another error context.
    pub(crate) fn with_context(&mut self, context: &'static str) -> MapSource<'_> {
        let map = match &mut self.map {
            Map::Shared(m) => Map::Shared(m),
            Map::Owned(m) => Map::Owned(m),
        };
        MapSource { map, context }
    }
}

impl Source for MapSource<'_> {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let ctx = self.context;
        let map: &TensorMap = match &self.map {
            Map::Shared(m) => m,
            Map::Owned(m) => m,
        };
        check_shape(ctx, name, shape, map.get(name).map(|t| t.shape.as_slice()))?;
        let t = &map[name];
        if t.data.len() < MOVE_MIN {
            return Ok(t.data.clone());
        }
        Ok(match &mut self.map {
            Map::Shared(m) => m[name].data.clone(),
            Map::Owned(m) => m.remove(name).expect("present above").data,
        })
    }
}

/// The one error of a tensor that is missing (`found` None) or has another shape.
fn check_shape(ctx: &str, name: &str, shape: &[usize], found: Option<&[usize]>) -> Result<()> {
    match found {
        None => bail!("{ctx}missing tensor `{name}` (expected shape {shape:?})"),
        Some(f) if f != shape => {
            bail!("{ctx}tensor `{name}` has shape {f:?}, expected {shape:?} for this configuration")
        }
        Some(_) => Ok(()),
    }
}

/// Checks each name and shape against a file's header (name -> shape) with the errors of
/// [`MapSource`], and returns empty data: the weight builders run through it (as through a
/// [`Recorder`]) to check a file without reading its tensors.
pub(crate) struct HeaderSource<'a> {
    pub(crate) shapes: &'a std::collections::BTreeMap<String, Vec<usize>>,
    pub(crate) context: &'static str,
}

impl Source for HeaderSource<'_> {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let found = self.shapes.get(name).map(Vec::as_slice);
        check_shape(self.context, name, shape, found)?;
        Ok(Vec::new())
    }
}

/// Records every (name, shape) asked for and returns empty data.
#[derive(Default)]
pub(crate) struct Recorder(pub(crate) Vec<(String, Vec<usize>)>);

impl Source for Recorder {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.0.push((name.to_string(), shape.to_vec()));
        Ok(Vec::new())
    }
}

/// The loaders of an autoencoder network whose `build(cfg, &mut dyn Source)` reads every
/// tensor (the decoder and the encoder): `from_tensors` (a state dict), `from_source` (a model
/// file's map) and `expected_tensors` (the list), with `$context` before every error.
macro_rules! autoenc_loaders {
    ($ty:ident, $context:literal, $parts:literal) => {
        impl $ty {
            /// Load from a state dict (extra tensors are ignored). A missing or misshaped tensor
            /// is an error naming it, with the expected and found shapes.
            pub fn from_tensors(
                cfg: &$crate::model::config::DecoderConfig,
                map: &$crate::model::file::TensorMap,
            ) -> anyhow::Result<$ty> {
                Self::build(cfg, &mut $crate::model::source::MapSource::new(map, $context))
            }

            /// [`Self::from_tensors`] through a map source (an owned map gives its tensors
            /// away).
            pub(crate) fn from_source(
                cfg: &$crate::model::config::DecoderConfig,
                src: &mut $crate::model::source::MapSource,
            ) -> anyhow::Result<$ty> {
                Self::build(cfg, &mut src.with_context($context))
            }

            #[doc = concat!(
                "Every tensor (name, shape) ", $parts, " need, in the reference's state-dict ",
                "order. Empty for a configuration that `from_tensors` rejects (the config is ",
                "checked before the first tensor is requested)."
            )]
            pub fn expected_tensors(
                cfg: &$crate::model::config::DecoderConfig,
            ) -> Vec<(String, Vec<usize>)> {
                let mut rec = $crate::model::source::Recorder::default();
                let _ = Self::build(cfg, &mut rec);
                rec.0
            }
        }
    };
}
pub(crate) use autoenc_loaders;
