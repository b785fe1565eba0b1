//! Where a weight builder gets each named tensor: a model file's tensor map (validating names
//! and shapes), or a recorder that only lists them. One builder per network then serves both
//! loading and the expected-tensor lists, so every state-dict name is written once.

use super::file::TensorMap;
use anyhow::{Result, bail};

pub(crate) trait Source {
    /// The tensor `name` as f32, which must have exactly `shape`.
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
}

/// Reads from a tensor map; errors name the tensor and both shapes, after `context`.
pub(crate) struct MapSource<'a> {
    map: &'a TensorMap,
    context: &'static str,
}

impl<'a> MapSource<'a> {
    pub(crate) fn new(map: &'a TensorMap, context: &'static str) -> Self {
        MapSource { map, context }
    }
}

impl Source for MapSource<'_> {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let ctx = self.context;
        match self.map.get(name) {
            None => bail!("{ctx}missing tensor `{name}` (expected shape {shape:?})"),
            Some(t) if t.shape != shape => bail!(
                "{ctx}tensor `{name}` has shape {:?}, expected {shape:?} for this configuration",
                t.shape
            ),
            Some(t) => Ok(t.data.clone()),
        }
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
