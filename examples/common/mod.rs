//! What the API examples share: their command line, `--model FILE`, `--device NAME`, the
//! example's own options with a value each, and plain arguments.

use checkergen::{Device, Model};
use std::error::Error;
use std::str::FromStr;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// The parsed command line.
pub struct Args {
    model: Option<String>,
    device: Device,
    /// (option, value) of the example's own options, in order.
    options: Vec<(String, String)>,
    rest: Vec<String>,
}

impl Args {
    /// Reads the command line, where the example's own options are `options` (each takes a
    /// value); any other argument is a plain one.
    pub fn parse(options: &[&str]) -> Result<Args> {
        let mut a = Args {
            model: None,
            device: Device::Auto,
            options: Vec::new(),
            rest: Vec::new(),
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let is_option = arg == "--model" || arg == "--device" || options.contains(&&*arg);
            if !is_option {
                a.rest.push(arg);
                continue;
            }
            let value = args.next().ok_or(format!("{arg} needs a value"))?;
            match arg.as_str() {
                "--model" => a.model = Some(value),
                "--device" => a.device = value.parse()?,
                _ => a.options.push((arg, value)),
            }
        }
        Ok(a)
    }

    /// The model of `--model FILE` (without it, the tiny preset with random weights) on
    /// `--device auto|cpu|cuda|cuda:N|emu` (default auto).
    pub fn model(&self) -> Result<Model> {
        Ok(match &self.model {
            Some(p) => Model::load(p, self.device)?,
            None => Model::tiny(self.device)?,
        })
    }

    /// The value of the last `option` given, or `default`.
    pub fn value<T: FromStr>(&self, option: &str, default: T) -> Result<T>
    where
        T::Err: Error + 'static,
    {
        match self.options.iter().rev().find(|(o, _)| o == option) {
            Some((_, v)) => Ok(v.parse()?),
            None => Ok(default),
        }
    }

    /// The plain arguments, parsed, or `default` when there are none.
    pub fn rest_or<T: FromStr>(&self, default: Vec<T>) -> Result<Vec<T>>
    where
        T::Err: Error + 'static,
    {
        if self.rest.is_empty() {
            return Ok(default);
        }
        Ok(self
            .rest
            .iter()
            .map(|a| a.parse())
            .collect::<std::result::Result<_, _>>()?)
    }
}
