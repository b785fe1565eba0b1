//! The reference's YAML configs as a small value tree, parsed by the maintained `yaml-rust2`
//! crate (YAML 1.2 syntax) and resolved the way the reference reads them: PyYAML's
//! `safe_load`, whose YAML 1.1 scalar rules differ from YAML 1.2 (`yes`/`on` are booleans,
//! `1_000` is an integer). One leniency: PyYAML reads `1e-6` (no dot) as a string; here it is
//! the float 1e-6.
//!
//! Anchors, aliases, tags and multiple documents are refused with an error naming the line:
//! the reference's configs never use them, and a config that does should fail loudly rather
//! than be read differently from PyYAML.

use crate::limits::MAX_YAML_DEPTH;
use anyhow::{Result, bail};
use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A parsed YAML value. Mappings keep their keys in file order.
#[derive(Clone, Debug, PartialEq)]
pub enum Yaml {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Yaml>),
    Map(Vec<(String, Yaml)>),
}

impl Yaml {
    /// Value under `key` of a mapping (the last one, as in PyYAML, if a key repeats).
    pub fn get(&self, key: &str) -> Option<&Yaml> {
        match self {
            Yaml::Map(entries) => entries.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Follow a dotted path of mapping keys (`"model.llama_config.hidden_size"`).
    #[cfg(test)]
    pub fn path(&self, dotted: &str) -> Option<&Yaml> {
        dotted.split('.').try_fold(self, |node, key| node.get(key))
    }

    /// Floats and integers as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Yaml::Int(v) => Some(*v as f64),
            Yaml::Float(v) => Some(*v),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Yaml::Bool(v) => Some(*v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Yaml::Str(v) => Some(v),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Yaml::Null)
    }

    /// Short description for error messages: `integer 3`, `string "abc"`, `a mapping`, ...
    pub fn describe(&self) -> String {
        match self {
            Yaml::Null => "null".to_string(),
            Yaml::Bool(v) => format!("boolean {v}"),
            Yaml::Int(v) => format!("integer {v}"),
            Yaml::Float(v) => format!("float {v}"),
            Yaml::Str(v) => format!("string {v:?}"),
            Yaml::Seq(_) => "a sequence".to_string(),
            Yaml::Map(_) => "a mapping".to_string(),
        }
    }
}

/// Parse one YAML document. An empty document is `Null`. Errors are one line:
/// `YAML line <n>: <what>`.
pub fn parse(text: &str) -> Result<Yaml> {
    // A UTF-8 byte-order mark (editors on Windows write one) is not content.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut events = Events(Parser::new_from_str(text));
    let (first, _) = events.next()?;
    debug_assert!(matches!(first, Event::StreamStart));
    let value = match events.next()? {
        (Event::StreamEnd, _) => return Ok(Yaml::Null),
        (Event::DocumentStart, _) => {
            let (event, mark) = events.next()?;
            events.node(event, mark, 0)?
        }
        (other, mark) => bail!("YAML line {}: unexpected {other:?}", mark.line()),
    };
    match events.next()? {
        (Event::DocumentEnd, _) => {}
        (other, mark) => bail!("YAML line {}: unexpected {other:?}", mark.line()),
    }
    match events.next()? {
        (Event::StreamEnd, _) => Ok(value),
        (_, mark) => bail!(
            "YAML line {}: multiple documents are not supported",
            mark.line()
        ),
    }
}

/// yaml-rust2's event stream, with its scanner errors as one-line errors.
struct Events<'a>(Parser<std::str::Chars<'a>>);

impl Events<'_> {
    fn next(&mut self) -> Result<(Event, Marker)> {
        self.0.next_token().map_err(|e| {
            anyhow::anyhow!(
                "YAML line {}: {} (column {})",
                e.marker().line(),
                e.info(),
                e.marker().col() + 1
            )
        })
    }

    /// The node that starts with `event`, `depth` collections deep (at most
    /// [`MAX_YAML_DEPTH`], so neither this recursion nor dropping the tree can overflow the
    /// stack).
    fn node(&mut self, event: Event, mark: Marker, depth: usize) -> Result<Yaml> {
        let line = mark.line();
        if depth > MAX_YAML_DEPTH {
            bail!("YAML line {line}: nested more than {MAX_YAML_DEPTH} levels deep");
        }
        let plain = |anchor: usize, tagged: bool| -> Result<()> {
            if anchor != 0 {
                bail!("YAML line {line}: anchors and aliases are not supported");
            }
            if tagged {
                bail!("YAML line {line}: tags are not supported");
            }
            Ok(())
        };
        match event {
            Event::Scalar(value, style, anchor, tag) => {
                plain(anchor, tag.is_some())?;
                Ok(match style {
                    TScalarStyle::Plain => resolve_plain(&value),
                    _ => Yaml::Str(value),
                })
            }
            Event::Alias(_) => bail!("YAML line {line}: anchors and aliases are not supported"),
            Event::SequenceStart(anchor, tag) => {
                plain(anchor, tag.is_some())?;
                let mut items = Vec::new();
                loop {
                    match self.next()? {
                        (Event::SequenceEnd, _) => return Ok(Yaml::Seq(items)),
                        (event, mark) => items.push(self.node(event, mark, depth + 1)?),
                    }
                }
            }
            Event::MappingStart(anchor, tag) => {
                plain(anchor, tag.is_some())?;
                let mut entries = Vec::new();
                loop {
                    let key = match self.next()? {
                        (Event::MappingEnd, _) => return Ok(Yaml::Map(entries)),
                        (Event::Scalar(key, _, 0, None), _) => key,
                        (event, mark) => {
                            // Say what is wrong with an anchored or tagged key; else it is
                            // a collection used as a key.
                            self.node(event, mark, depth + 1)?;
                            bail!(
                                "YAML line {}: only scalar mapping keys are supported",
                                mark.line()
                            )
                        }
                    };
                    let (event, mark) = self.next()?;
                    entries.push((key, self.node(event, mark, depth + 1)?));
                }
            }
            other => bail!("YAML line {line}: unexpected {other:?}"),
        }
    }
}

/// Resolve a plain (unquoted) scalar the way YAML 1.1 / PyYAML does for common forms.
fn resolve_plain(s: &str) -> Yaml {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Yaml::Null,
        "true" | "True" | "TRUE" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" => {
            return Yaml::Bool(true);
        }
        "false" | "False" | "FALSE" | "no" | "No" | "NO" | "off" | "Off" | "OFF" => {
            return Yaml::Bool(false);
        }
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Yaml::Float(f64::INFINITY);
        }
        "-.inf" | "-.Inf" | "-.INF" => return Yaml::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Yaml::Float(f64::NAN),
        _ => {}
    }
    let cleaned: String = s.chars().filter(|&c| c != '_').collect();
    let (sign, digits) = match cleaned.strip_prefix('-') {
        Some(rest) => (-1i64, rest),
        None => (1, cleaned.strip_prefix('+').unwrap_or(&cleaned)),
    };
    if let Some(hex) = digits.strip_prefix("0x")
        && !hex.is_empty()
        && hex.chars().all(|c| c.is_ascii_hexdigit())
        && let Ok(v) = i64::from_str_radix(hex, 16)
    {
        return Yaml::Int(sign * v);
    }
    if !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit())
        && let Ok(v) = cleaned.parse::<i64>()
    {
        return Yaml::Int(v);
    }
    // Floats: digits with a '.' and/or an exponent, nothing else.
    let float_chars = digits
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'));
    if float_chars
        && digits.chars().any(|c| c.is_ascii_digit())
        && (digits.contains('.') || digits.contains(['e', 'E']))
        && digits
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit() || c == '.')
        && let Ok(v) = cleaned.parse::<f64>()
    {
        return Yaml::Float(v);
    }
    Yaml::Str(s.to_string())
}
#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: Vec<(&str, Yaml)>) -> Yaml {
        Yaml::Map(
            entries
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        )
    }

    #[test]
    fn reference_model_config_shape() {
        let text = "model:\n    img_size: 256\n    scale_ratio: 2\n    class_cond: true\n    \
                    random_replace_sampled: false  # \"quoted\" words in a comment\n    #single_scale: false\n\n    \
                    autoenc:\n        config_path: pretrained_models/autoenc/autoencoder_config.yaml\n        \
                    params:\n            requant_pyramid_levels: -1  # trailing comment\n\n    llama_config:\n        \
                    hidden_size: 1024\n        rms_norm_eps: 1.0e-6\n\nargs:\n    lr: 5.e-5\n    \
                    lr_step_epochs: [200]\n    eps: 1e-6\n";
        let y = parse(text).unwrap();
        assert_eq!(y.path("model.img_size"), Some(&Yaml::Int(256)));
        assert_eq!(y.path("model.class_cond"), Some(&Yaml::Bool(true)));
        assert_eq!(
            y.path("model.random_replace_sampled"),
            Some(&Yaml::Bool(false))
        );
        assert_eq!(y.path("model.single_scale"), None);
        assert_eq!(
            y.path("model.autoenc.params.requant_pyramid_levels"),
            Some(&Yaml::Int(-1))
        );
        assert_eq!(
            y.path("model.autoenc.config_path").and_then(Yaml::as_str),
            Some("pretrained_models/autoenc/autoencoder_config.yaml")
        );
        assert_eq!(
            y.path("model.llama_config.hidden_size"),
            Some(&Yaml::Int(1024))
        );
        assert_eq!(
            y.path("model.llama_config.rms_norm_eps"),
            Some(&Yaml::Float(1e-6))
        );
        assert_eq!(y.path("args.lr"), Some(&Yaml::Float(5e-5)));
        assert_eq!(y.path("args.eps"), Some(&Yaml::Float(1e-6)));
        assert_eq!(
            y.path("args.lr_step_epochs"),
            Some(&Yaml::Seq(vec![Yaml::Int(200)]))
        );
    }

    #[test]
    fn flow_collections_quotes_and_empty_map() {
        let text = "model:\n  init:\n    ignore_keys: [\"quantize.\", 'it''s']\n  params:\n    \
                    monitor: \"val/qloss\"\n    ddconfig: {}\n    other: {ch: 32, ch_mult: [1, 2], x: }\n";
        let y = parse(text).unwrap();
        assert_eq!(
            y.path("model.init.ignore_keys"),
            Some(&Yaml::Seq(vec![
                Yaml::Str("quantize.".into()),
                Yaml::Str("it's".into())
            ]))
        );
        assert_eq!(
            y.path("model.params.monitor"),
            Some(&Yaml::Str("val/qloss".into()))
        );
        assert_eq!(y.path("model.params.ddconfig"), Some(&Yaml::Map(vec![])));
        assert_eq!(
            y.path("model.params.other"),
            Some(&map(vec![
                ("ch", Yaml::Int(32)),
                ("ch_mult", Yaml::Seq(vec![Yaml::Int(1), Yaml::Int(2)])),
                ("x", Yaml::Null)
            ]))
        );
    }

    #[test]
    fn block_sequences_both_styles_and_multiline_flow() {
        let text = "a:\n- 1\n- two\nb:\n  - x: 1\n    y: 2\n  - [3, 4]\nc: [1, 1,\n    2, 4]\nd:\n";
        let y = parse(text).unwrap();
        assert_eq!(
            y.get("a"),
            Some(&Yaml::Seq(vec![Yaml::Int(1), Yaml::Str("two".into())]))
        );
        assert_eq!(
            y.get("b"),
            Some(&Yaml::Seq(vec![
                map(vec![("x", Yaml::Int(1)), ("y", Yaml::Int(2))]),
                Yaml::Seq(vec![Yaml::Int(3), Yaml::Int(4)])
            ]))
        );
        assert_eq!(
            y.get("c"),
            Some(&Yaml::Seq(vec![
                Yaml::Int(1),
                Yaml::Int(1),
                Yaml::Int(2),
                Yaml::Int(4)
            ]))
        );
        assert_eq!(y.get("d"), Some(&Yaml::Null));
    }

    #[test]
    fn scalars_resolve_like_pyyaml() {
        for (s, v) in [
            ("1.1892", Yaml::Float(1.1892)),
            ("-3", Yaml::Int(-3)),
            ("+7", Yaml::Int(7)),
            ("1_000", Yaml::Int(1000)),
            ("0x10", Yaml::Int(16)),
            ("~", Yaml::Null),
            ("yes", Yaml::Bool(true)),
            ("Off", Yaml::Bool(false)),
            ("1.e-4", Yaml::Float(1e-4)),
            (".5", Yaml::Float(0.5)),
            ("abc#def", Yaml::Str("abc#def".into())),
            ("1.2.3", Yaml::Str("1.2.3".into())),
            ("e5", Yaml::Str("e5".into())),
        ] {
            assert_eq!(
                parse(&format!("k: {s}\n")).unwrap().get("k"),
                Some(&v),
                "{s}"
            );
        }
        assert_eq!(
            parse("k: a # comment\n").unwrap().get("k"),
            Some(&Yaml::Str("a".into()))
        );
        assert_eq!(
            parse("k: 'a # not comment'\n").unwrap().get("k"),
            Some(&Yaml::Str("a # not comment".into()))
        );
        assert_eq!(parse("---\nk: 1\n").unwrap().get("k"), Some(&Yaml::Int(1)));
        assert_eq!(parse("# only a comment\n").unwrap(), Yaml::Null);
        assert_eq!(
            parse("k: url://x:y\n").unwrap().get("k"),
            Some(&Yaml::Str("url://x:y".into()))
        );
    }

    #[test]
    fn unsupported_features_fail_with_line_numbers() {
        let cases = [
            ("a: 1\nb: &x 2\n", "line 2: anchors"),
            ("a: &x 1\nb: *x\n", "line 1: anchors"),
            (
                "a: *x\n",
                "line 1: while parsing node, found unknown anchor",
            ),
            ("a: !!python/tuple [1]\n", "line 1: tags"),
            (
                "a:\n  b: 1\n c: 2\n",
                "line 3: while parsing a block mapping",
            ),
            ("a: [1, 2\n", "line 2: while parsing a flow sequence"),
            ("a:\n\tb: 1\n", "line 2: tabs"),
            ("a: 1\n---\nb: 2\n", "line 2: multiple documents"),
            ("? [a, b]\n: 1\n", "line 1: only scalar mapping keys"),
        ];
        for (text, fragment) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(fragment), "{text:?}: {err}");
        }
    }

    /// Valid YAML the hand-written reader refused now reads as PyYAML reads it.
    #[test]
    fn block_scalars_read_as_strings() {
        assert_eq!(
            parse("a: |\n  text\n  more\nb: >\n  folded\n  line\n").unwrap(),
            map(vec![
                ("a", Yaml::Str("text\nmore\n".into())),
                ("b", Yaml::Str("folded line\n".into()))
            ])
        );
    }
}
