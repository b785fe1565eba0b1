//! A small YAML reader for the reference's configuration files.
//!
//! The reference's model config (`configs/config_256_*.yaml`, copied next to each released
//! checkpoint as `config.yaml`) and its autoencoder config (`autoencoder_config.yaml`) use a
//! small part of YAML: nested block mappings, block sequences (also PyYAML's "indentless"
//! style), flow sequences and mappings (`[1, 1, 2]`, `{}`), plain and quoted scalars and
//! comments. This module reads exactly that subset and refuses the rest (anchors, aliases,
//! tags, block scalars, multiple documents) with an error naming the line, so a config that
//! uses them fails loudly instead of being misread.
//!
//! Scalars resolve the way PyYAML's `safe_load` (YAML 1.1) does for the forms these files use:
//! `true/false/yes/no/on/off` are booleans, `~`/`null`/empty are null, decimal and `0x`
//! integers are integers, and numbers with a fraction or exponent are floats. One deliberate
//! leniency: PyYAML reads `1e-6` (no dot) as a string; here it is the float 1e-6.

use anyhow::{Result, bail};

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
    pub fn path(&self, dotted: &str) -> Option<&Yaml> {
        dotted.split('.').try_fold(self, |node, key| node.get(key))
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Yaml::Int(v) => Some(*v),
            _ => None,
        }
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

    /// Short description for error messages: `integer 3`, `string "abc"`, `mapping`, ...
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

/// Parse one YAML document. An empty document is `Null`.
pub fn parse(text: &str) -> Result<Yaml> {
    let lines = logical_lines(text)?;
    let mut p = BlockParser { lines, pos: 0 };
    if p.lines.is_empty() {
        return Ok(Yaml::Null);
    }
    let indent = p.lines[0].indent;
    let value = p.block(indent)?;
    if let Some(line) = p.lines.get(p.pos) {
        bail!(
            "YAML line {}: unexpected indentation (the document's top level is at column {})",
            line.number,
            indent + 1
        );
    }
    Ok(value)
}

/// A non-blank line with its comment removed.
#[derive(Debug)]
struct Line {
    number: usize,
    indent: usize,
    text: String,
}

/// Split into lines, drop comments, blank lines and document markers.
fn logical_lines(text: &str) -> Result<Vec<Line>> {
    let mut out = Vec::new();
    let mut seen_start = false;
    for (i, raw) in text.lines().enumerate() {
        let number = i + 1;
        let body = strip_comment(raw);
        let trimmed_end = body.trim_end();
        if trimmed_end.trim().is_empty() {
            continue;
        }
        let indent = trimmed_end.len() - trimmed_end.trim_start().len();
        if trimmed_end[..indent].contains('\t') {
            bail!("YAML line {number}: tabs are not allowed in indentation");
        }
        let content = trimmed_end.trim_start();
        if indent == 0 && (content == "---" || content.starts_with("--- ")) {
            if seen_start || !out.is_empty() {
                bail!("YAML line {number}: multiple documents are not supported");
            }
            seen_start = true;
            if content.len() > 3 {
                bail!("YAML line {number}: content after '---' is not supported");
            }
            continue;
        }
        if indent == 0 && content == "..." {
            break;
        }
        if content.starts_with('%') && indent == 0 {
            bail!("YAML line {number}: directives are not supported");
        }
        out.push(Line {
            number,
            indent,
            text: content.to_string(),
        });
    }
    Ok(out)
}

/// Remove a `#` comment: `#` at the start or after whitespace, outside quotes.
fn strip_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    let mut in_single = false;
    let mut in_double = false;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'\'' if !in_double => in_single = !in_single,
            b'"' if !in_single => in_double = !in_double,
            b'\\' if in_double => i += 1,
            b'#' if !in_single && !in_double && (i == 0 || bytes[i - 1].is_ascii_whitespace()) => {
                return &line[..i];
            }
            _ => {}
        }
        i += 1;
    }
    line
}

struct BlockParser {
    lines: Vec<Line>,
    pos: usize,
}

impl BlockParser {
    /// Parse the block node whose lines start at column `indent`.
    fn block(&mut self, indent: usize) -> Result<Yaml> {
        let line = &self.lines[self.pos];
        if line.indent != indent {
            bail!("YAML line {}: unexpected indentation", line.number);
        }
        if is_seq_item(&line.text) {
            self.sequence(indent)
        } else if split_key(&line.text, line.number)?.is_some() {
            self.mapping(indent)
        } else {
            // A lone scalar or flow collection as a whole block.
            let number = line.number;
            let text = self.flow_text(indent)?;
            parse_inline(&text, number)
        }
    }

    fn sequence(&mut self, indent: usize) -> Result<Yaml> {
        let mut items = Vec::new();
        while let Some(line) = self.lines.get(self.pos) {
            if line.indent != indent || !is_seq_item(&line.text) {
                if line.indent > indent {
                    bail!("YAML line {}: unexpected indentation", line.number);
                }
                break;
            }
            let number = line.number;
            let rest = line.text[1..].trim_start().to_string();
            if rest.is_empty() {
                // "-" alone: the item is the nested block below (or null).
                self.pos += 1;
                match self.lines.get(self.pos) {
                    Some(next) if next.indent > indent => {
                        let child = next.indent;
                        items.push(self.block(child)?);
                    }
                    _ => items.push(Yaml::Null),
                }
                continue;
            }
            // Column of the item's content: "- " plus any extra spaces.
            let content_col = indent + (line.text.len() - rest.len());
            if is_seq_item(&rest) || split_key(&rest, number)?.is_some() {
                // Compact nested node ("- key: v" or "- - x"): re-read this line as if its
                // content started on its own line at `content_col`.
                self.lines[self.pos] = Line {
                    number,
                    indent: content_col,
                    text: rest,
                };
                items.push(self.block(content_col)?);
            } else {
                self.lines[self.pos] = Line {
                    number,
                    indent: content_col,
                    text: rest,
                };
                let text = self.flow_text(content_col)?;
                items.push(parse_inline(&text, number)?);
            }
        }
        Ok(Yaml::Seq(items))
    }

    fn mapping(&mut self, indent: usize) -> Result<Yaml> {
        let mut entries: Vec<(String, Yaml)> = Vec::new();
        while let Some(line) = self.lines.get(self.pos) {
            if line.indent < indent {
                break;
            }
            if line.indent > indent {
                bail!("YAML line {}: unexpected indentation", line.number);
            }
            if is_seq_item(&line.text) {
                // A sequence at the mapping's own column ends the mapping; the caller decides.
                break;
            }
            let number = line.number;
            let Some((key, rest)) = split_key(&line.text, number)? else {
                bail!(
                    "YAML line {number}: expected 'key: value', found {:?}",
                    line.text
                );
            };
            let rest = rest.to_string();
            if rest.is_empty() {
                self.pos += 1;
                let value = match self.lines.get(self.pos) {
                    Some(next) if next.indent > indent => {
                        let child = next.indent;
                        self.block(child)?
                    }
                    // PyYAML's default dump style: a sequence at the key's own column.
                    Some(next) if next.indent == indent && is_seq_item(&next.text) => {
                        self.sequence(indent)?
                    }
                    _ => Yaml::Null,
                };
                entries.push((key, value));
            } else {
                // Value on the key's line; a flow collection may continue on later lines.
                let value_col = indent + (self.lines[self.pos].text.len() - rest.len());
                self.lines[self.pos] = Line {
                    number,
                    indent: value_col,
                    text: rest,
                };
                let text = self.flow_text(indent + 1)?;
                entries.push((key, parse_inline(&text, number)?));
            }
        }
        Ok(Yaml::Map(entries))
    }

    /// Take the current line's text and, while it has unclosed `[`/`{` (or is a plain
    /// scalar continued on more-indented lines), join the following lines. Advances `pos`.
    fn flow_text(&mut self, min_indent: usize) -> Result<String> {
        let line = &self.lines[self.pos];
        let number = line.number;
        let mut text = line.text.clone();
        self.pos += 1;
        loop {
            let depth = bracket_depth(&text, number)?;
            let Some(next) = self.lines.get(self.pos) else {
                if depth > 0 {
                    bail!("YAML line {number}: unclosed '[' or '{{'");
                }
                break;
            };
            if depth == 0 {
                // A plain scalar may continue on more-indented lines; anything else ends here.
                if next.indent < min_indent || starts_flow(&text) || is_quoted(&text) {
                    break;
                }
                if is_seq_item(&next.text) || split_key(&next.text, next.number)?.is_some() {
                    bail!("YAML line {}: unexpected indentation", next.number);
                }
            }
            text.push(' ');
            text.push_str(&next.text);
            self.pos += 1;
        }
        Ok(text)
    }
}

fn starts_flow(text: &str) -> bool {
    text.starts_with('[') || text.starts_with('{')
}

fn is_quoted(text: &str) -> bool {
    text.starts_with('"') || text.starts_with('\'')
}

fn is_seq_item(text: &str) -> bool {
    text == "-" || text.starts_with("- ")
}

/// Net count of open brackets outside quotes.
fn bracket_depth(text: &str, number: usize) -> Result<i64> {
    let mut depth = 0i64;
    let mut in_single = false;
    let mut in_double = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' if !in_double => in_single = !in_single,
            '"' if !in_single => in_double = !in_double,
            '\\' if in_double => {
                chars.next();
            }
            '[' | '{' if !in_single && !in_double => depth += 1,
            ']' | '}' if !in_single && !in_double => depth -= 1,
            _ => {}
        }
    }
    if depth < 0 {
        bail!("YAML line {number}: unbalanced ']' or '}}'");
    }
    Ok(depth)
}

/// Split `key: rest` at the first `: ` (or trailing `:`) outside quotes and brackets.
/// Returns `None` when the line is not a mapping entry.
fn split_key(text: &str, number: usize) -> Result<Option<(String, &str)>> {
    if starts_flow(text) {
        return Ok(None);
    }
    let bytes = text.as_bytes();
    let (key, after) = if bytes[0] == b'"' || bytes[0] == b'\'' {
        let end = quoted_end(text, number)?;
        let rest = text[end..].trim_start();
        if !(rest == ":" || rest.starts_with(": ")) {
            return Ok(None);
        }
        (parse_quoted(&text[..end], number)?, &rest[1..])
    } else {
        let mut found = None;
        for (i, &c) in bytes.iter().enumerate() {
            if c == b':' && (i + 1 == bytes.len() || bytes[i + 1] == b' ') {
                found = Some(i);
                break;
            }
        }
        let Some(i) = found else { return Ok(None) };
        let key = text[..i].trim_end();
        if key.starts_with('?') {
            bail!("YAML line {number}: complex keys ('?') are not supported");
        }
        (key.to_string(), &text[i + 1..])
    };
    Ok(Some((key, after.trim())))
}

/// Byte index just past the closing quote of the quoted scalar at the start of `text`.
fn quoted_end(text: &str, number: usize) -> Result<usize> {
    let bytes = text.as_bytes();
    let q = bytes[0];
    let mut i = 1;
    while i < bytes.len() {
        if q == b'"' && bytes[i] == b'\\' {
            i += 2;
            continue;
        }
        if bytes[i] == q {
            if q == b'\'' && i + 1 < bytes.len() && bytes[i + 1] == b'\'' {
                i += 2;
                continue;
            }
            return Ok(i + 1);
        }
        i += 1;
    }
    bail!("YAML line {number}: unterminated quoted string")
}

fn parse_quoted(text: &str, number: usize) -> Result<String> {
    let q = text.as_bytes()[0];
    let inner = &text[1..text.len() - 1];
    if q == b'\'' {
        return Ok(inner.replace("''", "'"));
    }
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let Some(e) = chars.next() else {
            bail!("YAML line {number}: dangling backslash in a double-quoted string");
        };
        match e {
            'n' => out.push('\n'),
            't' => out.push('\t'),
            'r' => out.push('\r'),
            '0' => out.push('\0'),
            '"' => out.push('"'),
            '\\' => out.push('\\'),
            '/' => out.push('/'),
            ' ' => out.push(' '),
            'x' | 'u' | 'U' => {
                let n = match e {
                    'x' => 2,
                    'u' => 4,
                    _ => 8,
                };
                let hex: String = chars.by_ref().take(n).collect();
                let code = u32::from_str_radix(&hex, 16)
                    .ok()
                    .and_then(char::from_u32)
                    .ok_or_else(|| anyhow::anyhow!("YAML line {number}: bad escape \\{e}{hex}"))?;
                out.push(code);
            }
            other => bail!("YAML line {number}: unsupported escape \\{other}"),
        }
    }
    Ok(out)
}

/// Parse a value written on one logical line: a flow collection or a scalar.
fn parse_inline(text: &str, number: usize) -> Result<Yaml> {
    let mut p = FlowParser {
        s: text.as_bytes(),
        text,
        pos: 0,
        number,
    };
    p.skip_ws();
    let v = p.value(false)?;
    p.skip_ws();
    if p.pos != p.s.len() {
        bail!(
            "YAML line {number}: unexpected text {:?} after a value",
            &text[p.pos..]
        );
    }
    Ok(v)
}

struct FlowParser<'a> {
    s: &'a [u8],
    text: &'a str,
    pos: usize,
    number: usize,
}

impl FlowParser<'_> {
    fn skip_ws(&mut self) {
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn value(&mut self, in_flow: bool) -> Result<Yaml> {
        let number = self.number;
        match self.peek() {
            Some(b'[') => self.seq(),
            Some(b'{') => self.map(),
            Some(b'"') | Some(b'\'') => {
                let end = self.pos + quoted_end(&self.text[self.pos..], number)?;
                let v = parse_quoted(&self.text[self.pos..end], number)?;
                self.pos = end;
                Ok(Yaml::Str(v))
            }
            Some(b'&') | Some(b'*') => {
                bail!("YAML line {number}: anchors and aliases are not supported")
            }
            Some(b'!') => bail!("YAML line {number}: tags are not supported"),
            Some(b'|') | Some(b'>') if !in_flow => {
                bail!("YAML line {number}: block scalars ('|', '>') are not supported")
            }
            _ => {
                let start = self.pos;
                while let Some(c) = self.peek() {
                    if in_flow && matches!(c, b',' | b']' | b'}') {
                        break;
                    }
                    if in_flow && c == b':' && matches!(self.s.get(self.pos + 1), Some(b' ') | None)
                    {
                        break;
                    }
                    self.pos += 1;
                }
                Ok(resolve_plain(self.text[start..self.pos].trim()))
            }
        }
    }

    fn seq(&mut self) -> Result<Yaml> {
        self.pos += 1; // '['
        let mut items = Vec::new();
        loop {
            self.skip_ws();
            match self.peek() {
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Yaml::Seq(items));
                }
                None => bail!("YAML line {}: unclosed '['", self.number),
                _ => {}
            }
            items.push(self.value(true)?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {}
                _ => bail!(
                    "YAML line {}: expected ',' or ']' in a flow sequence",
                    self.number
                ),
            }
        }
    }

    fn map(&mut self) -> Result<Yaml> {
        self.pos += 1; // '{'
        let mut entries = Vec::new();
        loop {
            self.skip_ws();
            match self.peek() {
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Yaml::Map(entries));
                }
                None => bail!("YAML line {}: unclosed '{{'", self.number),
                _ => {}
            }
            let key = match self.value(true)? {
                Yaml::Str(s) => s,
                Yaml::Null => String::new(),
                Yaml::Int(v) => v.to_string(),
                Yaml::Bool(v) => v.to_string(),
                Yaml::Float(v) => v.to_string(),
                _ => bail!(
                    "YAML line {}: flow mapping keys must be scalars",
                    self.number
                ),
            };
            self.skip_ws();
            let value = if self.peek() == Some(b':') {
                self.pos += 1;
                self.skip_ws();
                if matches!(self.peek(), Some(b',') | Some(b'}')) {
                    Yaml::Null
                } else {
                    self.value(true)?
                }
            } else {
                Yaml::Null
            };
            entries.push((key, value));
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {}
                _ => bail!(
                    "YAML line {}: expected ',' or '}}' in a flow mapping",
                    self.number
                ),
            }
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
    {
        // Rust's parser rejects "5.e-5"; insert the zero YAML allows to be omitted.
        let normalized = cleaned.replace(".e", ".0e").replace(".E", ".0E");
        if let Ok(v) = normalized.parse::<f64>() {
            return Yaml::Float(v);
        }
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
            ("a: *x\n", "line 1: anchors"),
            ("a: !!python/tuple [1]\n", "line 1: tags"),
            ("a: |\n  text\n", "line 1: block scalars"),
            ("a:\n  b: 1\n c: 2\n", "line 3: unexpected indentation"),
            ("a: [1, 2\n", "unclosed"),
            ("a:\n\tb: 1\n", "line 2: tabs"),
            ("a: 1\n---\nb: 2\n", "multiple documents"),
        ];
        for (text, fragment) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(fragment), "{text:?}: {err}");
        }
    }
}
