//! The C side of the kernel parameter mirrors, read from kernels/*.cu by build.rs (and by
//! tests/kernel_mirrors.rs, which includes this file): every `struct NameParams { ... };`
//! with each field's offset and type by C's layout rules (x86-64 / CUDA: a field sits at the
//! next multiple of its alignment, the struct's size is a multiple of its largest alignment),
//! and the integer `#define`s. [`layout_module`] writes them as Rust for `kernel_params!`,
//! which asserts at compile time, field by field and by name, that a Rust mirror has the
//! same offsets and types; [`emu_asserts`] writes the same offsets as C++ `static_assert`s
//! for the host emulator's compiler, so the rules here are checked against a real compiler.

/// One field of a C parameter struct.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CField {
    pub name: String,
    /// The Rust type its mirror must have: `u64` (pointers and `u64`), `i32`, `u32`, `f32`.
    pub rust: &'static str,
    pub offset: usize,
}

/// One `struct NameParams` of a kernel file, laid out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CStruct {
    pub name: String,
    pub fields: Vec<CField>,
    pub size: usize,
    /// The size the file's `static_assert(sizeof(Name) == N, ...)` states, if it has one.
    pub stated_size: Option<usize>,
}

/// A kernel file's stem, parameter structs (laid out) and integer defines.
pub type FileLayout = (String, Vec<CStruct>, Vec<(String, u64)>);

/// `source` without `//` and `/* */` comments.
fn strip_comments(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while !rest.is_empty() {
        let line = rest.find("//");
        let block = rest.find("/*");
        match (line, block) {
            (Some(l), b) if b.is_none_or(|b| l < b) => {
                out.push_str(&rest[..l]);
                rest = rest[l..].find('\n').map_or("", |e| &rest[l + e..]);
            }
            (_, Some(b)) => {
                out.push_str(&rest[..b]);
                rest = rest[b..].find("*/").map_or("", |e| &rest[b + e + 2..]);
                out.push(' ');
            }
            _ => {
                out.push_str(rest);
                rest = "";
            }
        }
    }
    out
}

/// (size, alignment, Rust mirror type) of a non-pointer C type, or None if unsupported.
fn scalar(ty: &str) -> Option<(usize, &'static str)> {
    Some(match ty {
        "int" | "int32_t" => (4, "i32"),
        "unsigned" | "unsigned int" | "uint32_t" => (4, "u32"),
        "float" => (4, "f32"),
        "u64" | "uint64_t" | "unsigned long long" => (8, "u64"),
        _ => return None,
    })
}

/// Every `struct *Params { ... };` of kernel file `file` (text `source`), laid out. Errors
/// name the file, the struct and the declaration.
pub fn param_structs(file: &str, source: &str) -> Result<Vec<CStruct>, String> {
    let text = strip_comments(source);
    let mut structs = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("struct ") {
        let after = &rest[at + "struct ".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let tail = after[name.len()..].trim_start();
        // Only definitions of parameter structs (`struct NameParams {`), at a word start.
        let word_start = at == 0 || !rest.as_bytes()[at - 1].is_ascii_alphanumeric();
        if !(word_start && name.ends_with("Params") && tail.starts_with('{')) {
            rest = &after[name.len()..];
            continue;
        }
        let open = tail;
        let close = open
            .find('}')
            .ok_or_else(|| format!("kernels/{file}.cu: struct {name} has no closing brace"))?;
        let body = &open[1..close];
        let mut fields = Vec::new();
        let (mut offset, mut align) = (0usize, 1usize);
        for decl in body.split(';').map(str::trim).filter(|d| !d.is_empty()) {
            if decl.contains('[') || decl.contains('(') || decl.contains(':') {
                return Err(format!(
                    "kernels/{file}.cu: struct {name}: `{decl}`: arrays, function pointers and \
                     bit-fields are not mirrored (use scalars and pointers)"
                ));
            }
            // `BASE [*]name, [*]name, ...`: the base type is the first part's words before
            // its name; each part is a pointer when it has a `*`.
            let ident_start = |part: &str| {
                part.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .map_or(0, |i| i + 1)
            };
            let first = decl.split(',').next().unwrap_or("");
            let base: Vec<&str> = first[..ident_start(first)]
                .split(|c: char| c.is_whitespace() || c == '*')
                .filter(|w| !w.is_empty() && *w != "const" && *w != "volatile")
                .collect();
            let base = base.join(" ");
            for (i, part) in decl.split(',').map(str::trim).enumerate() {
                let at = ident_start(part);
                let field = part[at..].to_string();
                let prefix = &part[..at];
                let ptr = prefix.contains('*');
                if i > 0 && !prefix.chars().all(|c| c == '*' || c.is_whitespace()) {
                    return Err(format!(
                        "kernels/{file}.cu: struct {name}: `{decl}`: one base type per declaration"
                    ));
                }
                if field.is_empty() || !field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    return Err(format!(
                        "kernels/{file}.cu: struct {name}: cannot read the field names of `{decl}`"
                    ));
                }
                let (size, rust) = if ptr {
                    (8, "u64")
                } else {
                    scalar(&base).ok_or_else(|| {
                        format!(
                            "kernels/{file}.cu: struct {name}: field `{field}` has type `{base}`, \
                             which the Rust mirrors do not know (int, unsigned, uint32_t, float, \
                             u64 or a pointer)"
                        )
                    })?
                };
                offset = offset.next_multiple_of(size);
                align = align.max(size);
                fields.push(CField {
                    name: field,
                    rust,
                    offset,
                });
                offset += size;
            }
        }
        let size = offset.next_multiple_of(align);
        let stated_size = stated_size(&text, &name);
        structs.push(CStruct {
            name,
            fields,
            size,
            stated_size,
        });
        rest = &open[close..];
    }
    Ok(structs)
}

/// N of `static_assert(sizeof(name) == N` in `text`.
fn stated_size(text: &str, name: &str) -> Option<usize> {
    let key = format!("sizeof({name}) ==");
    let at = text.find(&key)?;
    let digits: String = text[at + key.len()..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The integer `#define NAME VALUE` lines of `source` (decimal or hex, optional `u`), in order.
pub fn int_defines(source: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for line in strip_comments(source).lines() {
        let mut w = line.split_whitespace();
        if w.next() != Some("#define") {
            continue;
        }
        let (Some(name), Some(value), None) = (w.next(), w.next(), w.next()) else {
            continue;
        };
        let v = value.trim_end_matches(['u', 'U']);
        let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        };
        if let Some(p) = parsed {
            out.push((name.to_string(), p));
        }
    }
    out
}

/// The Rust text of module `c_layout` (one module per struct: `SIZE`, `FIELDS`, and per field
/// a constant (its offset) and a type alias (its Rust type), both named as the field) and
/// module `c_defines` (one module per kernel file, one `usize` constant per integer define).
pub fn layout_module(files: &[FileLayout]) -> String {
    let mut s = String::from(
        "/// The C layouts of kernels/*.cu's parameter structs (generated by build.rs from the\n\
         /// sources), which `kernel_params!` checks every Rust mirror against, field by field.\n\
         #[doc(hidden)]\n\
         #[allow(non_snake_case, non_upper_case_globals, non_camel_case_types, dead_code)]\n\
         pub mod c_layout {\n",
    );
    for (file, structs, _) in files {
        for st in structs {
            s.push_str(&format!(
                "    /// `{}` of kernels/{file}.cu.\n    pub mod {} {{\n        pub const SIZE: usize = {};\n        pub const FIELDS: usize = {};\n",
                st.name,
                st.name,
                st.size,
                st.fields.len()
            ));
            for f in &st.fields {
                s.push_str(&format!(
                    "        pub const {0}: usize = {1};\n        pub type {0} = {2};\n",
                    f.name, f.offset, f.rust
                ));
            }
            s.push_str("    }\n");
        }
    }
    s.push_str(
        "}\n/// The integer `#define`s of kernels/*.cu, one module per file (generated by build.rs),\n\
         /// for the constants the Rust side shares with a kernel.\n\
         #[doc(hidden)]\n#[allow(dead_code)]\npub mod c_defines {\n",
    );
    for (file, _, defines) in files {
        s.push_str(&format!(
            "    /// kernels/{file}.cu\n    pub mod {file} {{\n"
        ));
        for (name, value) in defines {
            s.push_str(&format!("        pub const {name}: usize = {value};\n"));
        }
        s.push_str("    }\n");
    }
    s.push_str("}\n");
    s
}

/// C++ `static_assert`s of every field's offset and every struct's size, for a translation
/// unit that includes the kernel file (the emulator's wrappers): the host compiler checks the
/// layout rules of [`param_structs`].
pub fn emu_asserts(structs: &[CStruct]) -> String {
    let mut s = String::new();
    for st in structs {
        s.push_str(&format!(
            "static_assert(sizeof({0}) == {1}, \"build.rs: {0} size\");\n",
            st.name, st.size
        ));
        for f in &st.fields {
            s.push_str(&format!(
                "static_assert(offsetof({0}, {1}) == {2}, \"build.rs: {0}.{1} offset\");\n",
                st.name, f.name, f.offset
            ));
        }
    }
    s
}
