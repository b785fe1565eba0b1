//! The pickle virtual machine: the opcodes of protocols 0-5, building Python's built-in
//! values (dicts, lists, tuples, scalars, strings, bytes) on a stack with a memo.
//!
//! The VM never executes anything. What a pickle names with `GLOBAL` / `STACK_GLOBAL` stays
//! a [`Value::Global`] reference, and the opcodes that would call or instantiate it (`REDUCE`,
//! `NEWOBJ`, `NEWOBJ_EX`, `OBJ`, `INST`) and persistent ids (`BINPERSID`) are handed to a
//! [`Globals`] implementation: the torch layer (`torch.rs`), which interprets an allowlist
//! and turns everything else into an opaque value. What that layer builds (storages,
//! tensors) comes back as [`Value::Ext`], an [`Extension`] the VM stores and never looks
//! into, so this module names nothing of the layer above it.

use anyhow::{Context, Result, anyhow, bail};
use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

/// A value made by the [`Globals`] layer (a storage, a tensor): opaque to the VM, which
/// keeps it on the stack and in containers; the layer above gets it back by downcasting.
pub(super) trait Extension: Any + fmt::Debug {
    /// What it is, for error messages (`a tensor`).
    fn kind(&self) -> String;
}

/// The error of a pickle that ends before its `STOP` (or inside an opcode's argument): the
/// legacy reader reads a longer prefix of the file when it sees this one.
#[derive(Debug)]
pub(super) struct Truncated(String);

impl fmt::Display for Truncated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Truncated {}

/// Text from a file (a tensor name, a storage key, a class) as it goes into a one-line error
/// message: control characters (a newline in a hostile key) escaped.
pub(super) fn esc(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        s.escape_debug().to_string().into()
    } else {
        s.into()
    }
}

/// Declares [`OpCode`], its variants named as `pickletools` names the opcodes, and the
/// byte -> opcode lookup. A variant without a byte has the one after its predecessor's:
/// protocols 2 to 5 number their opcodes 0x80, 0x81, ... in the order they list them.
macro_rules! opcodes {
    ($($op:ident $(= $byte:literal)?,)*) => {
        /// The pickle opcodes of protocols 0-5 (Python's `pickletools` names).
        #[allow(non_camel_case_types, clippy::upper_case_acronyms)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u8)]
        pub(super) enum OpCode {
            $($op $(= $byte)?,)*
        }

        impl OpCode {
            /// Every opcode, in declaration order.
            const ALL: &[OpCode] = &[$(OpCode::$op,)*];

            /// The name `pickletools` gives the opcode (`BINUNICODE`, `EXT1`, ...).
            pub(super) fn name(self) -> &'static str {
                match self {
                    $(OpCode::$op => stringify!($op),)*
                }
            }
        }
    };
}

opcodes! {
    // Protocol 0 and 1.
    MARK = b'(',
    STOP = b'.',
    POP = b'0',
    POP_MARK = b'1',
    DUP = b'2',
    FLOAT = b'F',
    INT = b'I',
    BININT = b'J',
    BININT1 = b'K',
    LONG = b'L',
    BININT2 = b'M',
    NONE = b'N',
    PERSID = b'P',
    BINPERSID = b'Q',
    REDUCE = b'R',
    STRING = b'S',
    BINSTRING = b'T',
    SHORT_BINSTRING = b'U',
    UNICODE = b'V',
    BINUNICODE = b'X',
    APPEND = b'a',
    BUILD = b'b',
    GLOBAL = b'c',
    DICT = b'd',
    EMPTY_DICT = b'}',
    APPENDS = b'e',
    GET = b'g',
    BINGET = b'h',
    INST = b'i',
    LONG_BINGET = b'j',
    LIST = b'l',
    EMPTY_LIST = b']',
    OBJ = b'o',
    PUT = b'p',
    BINPUT = b'q',
    LONG_BINPUT = b'r',
    SETITEM = b's',
    TUPLE = b't',
    EMPTY_TUPLE = b')',
    SETITEMS = b'u',
    BINFLOAT = b'G',
    // Protocol 2.
    PROTO = 0x80,
    NEWOBJ,
    EXT1,
    EXT2,
    EXT4,
    TUPLE1,
    TUPLE2,
    TUPLE3,
    NEWTRUE,
    NEWFALSE,
    LONG1,
    LONG4,
    // Protocol 3.
    BINBYTES = b'B',
    SHORT_BINBYTES = b'C',
    // Protocol 4.
    SHORT_BINUNICODE = 0x8c,
    BINUNICODE8,
    BINBYTES8,
    EMPTY_SET,
    ADDITEMS,
    FROZENSET,
    NEWOBJ_EX,
    STACK_GLOBAL,
    MEMOIZE,
    FRAME,
    // Protocol 5.
    BYTEARRAY8,
    NEXT_BUFFER,
    READONLY_BUFFER,
}

/// byte -> opcode, built at compile time (two opcodes on one byte fail the build).
const BY_BYTE: [Option<OpCode>; 256] = {
    let mut t = [None; 256];
    let mut i = 0;
    while i < OpCode::ALL.len() {
        let op = OpCode::ALL[i];
        assert!(t[op as usize].is_none(), "two opcodes share a byte");
        t[op as usize] = Some(op);
        i += 1;
    }
    t
};

impl OpCode {
    pub(super) fn from_byte(b: u8) -> Option<OpCode> {
        BY_BYTE[b as usize]
    }
}

/// What the VM hands to the layer above: everything that would run code in Python.
pub(super) trait Globals {
    /// `REDUCE`: `func(*args)`.
    fn call(&self, func: &Value, args: &Value) -> Result<Value>;
    /// `NEWOBJ`, `NEWOBJ_EX`, `OBJ`, `INST`: `cls.__new__(cls, ...)` (arguments ignored).
    fn instantiate(&self, cls: &Value) -> Value;
    /// `BINPERSID`: the object a persistent id stands for.
    fn persistent_load(&self, pid: &Value) -> Result<Value>;
}

#[derive(Debug, Default)]
pub(super) struct DictData {
    pub(super) entries: Vec<(Value, Value)>,
    /// Index of string and integer keys (the ones state dicts and optimizer states use).
    index: HashMap<HashKey, usize>,
}

#[derive(Debug, PartialEq, Eq, Hash)]
enum HashKey {
    Str(Rc<str>),
    Int(i64),
}

impl DictData {
    pub(super) fn set(&mut self, k: Value, v: Value) {
        let hk = match &k {
            Value::Str(s) => Some(HashKey::Str(s.clone())),
            Value::Int(i) => Some(HashKey::Int(*i)),
            _ => None,
        };
        match hk {
            Some(hk) => match self.index.get(&hk) {
                Some(&i) => self.entries[i].1 = v,
                None => {
                    self.index.insert(hk, self.entries.len());
                    self.entries.push((k, v));
                }
            },
            None => self.entries.push((k, v)),
        }
    }

    pub(super) fn get_str(&self, key: &str) -> Option<Value> {
        self.index
            .get(&HashKey::Str(Rc::from(key)))
            .map(|&i| self.entries[i].1.clone())
    }
}

/// The unpickled object model: Python's built-in values, references to globals, opaque
/// objects, and the values of the layer above ([`Value::Ext`]).
#[derive(Clone, Debug)]
pub(super) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too large for i64: its value when it fits in i128 (the legacy format's
    /// magic number does), else `None`.
    BigInt(Option<i128>),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<DictData>>),
    /// A class or function reference (`GLOBAL module name`), never resolved by the VM.
    Global(Rc<(String, String)>),
    /// An instance of a class this reader does not model, by class name.
    Object(Rc<str>),
    /// A value of the [`Globals`] layer (never made by the VM itself).
    Ext(Rc<dyn Extension>),
}

/// Nested containers are dropped with an explicit work list, not by recursion: a pickle of a
/// list nested 10^6 deep (a few MB) would otherwise overflow the stack when it is freed. A
/// container still shared elsewhere (a memo entry, a cycle) keeps its items.
impl Drop for Value {
    fn drop(&mut self) {
        fn take_items(v: &mut Value, out: &mut Vec<Value>) {
            match v {
                Value::Tuple(t) => {
                    if let Some(items) = Rc::get_mut(t) {
                        out.append(items);
                    }
                }
                Value::List(l) => {
                    if let Some(items) = Rc::get_mut(l) {
                        out.append(items.get_mut());
                    }
                }
                Value::Dict(d) => {
                    if let Some(d) = Rc::get_mut(d) {
                        let d = d.get_mut();
                        d.index.clear();
                        for (k, v) in d.entries.drain(..) {
                            out.push(k);
                            out.push(v);
                        }
                    }
                }
                _ => {}
            }
        }
        let mut pending = Vec::new();
        take_items(self, &mut pending);
        while let Some(mut v) = pending.pop() {
            take_items(&mut v, &mut pending);
            // `v` drops here with no items left, so this drop does not recurse.
        }
    }
}

impl Value {
    /// The value under string key `key` of a dict (None for a missing key or a non-dict).
    pub(super) fn entry(&self, key: &str) -> Option<Value> {
        match self {
            Value::Dict(d) => d.borrow().get_str(key),
            _ => None,
        }
    }

    pub(super) fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub(super) fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => format!("the bool {b}"),
            Value::Int(i) => format!("the int {i}"),
            Value::BigInt(_) => "a large int".into(),
            Value::Float(f) => format!("the float {f}"),
            Value::Str(s) => format!("the string {s:?}"),
            Value::Bytes(b) => format!("{} bytes", b.len()),
            Value::Tuple(_) => "a tuple".into(),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
            Value::Global(g) => format!("the class {}.{}", esc(&g.0), esc(&g.1)),
            Value::Object(c) => format!("a {} object", esc(c)),
            Value::Ext(e) => e.kind(),
        }
    }

    /// The extension value of type `T` this is, if it is one.
    pub(super) fn ext<T: Extension>(&self) -> Option<Rc<T>> {
        match self {
            Value::Ext(e) => {
                let any: Rc<dyn Any> = e.clone();
                any.downcast::<T>().ok()
            }
            _ => None,
        }
    }

    pub(super) fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::Tuple(t) => Some(t.as_ref().clone()),
            Value::List(l) => Some(l.borrow().clone()),
            _ => None,
        }
    }
}

/// The VM: the pickle bytes, a position, the stack with its marks, and the memo.
pub(super) struct Unpickler<'a> {
    globals: &'a dyn Globals,
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
}

impl<'a> Unpickler<'a> {
    pub(super) fn new(data: &'a [u8], globals: &'a dyn Globals) -> Self {
        Unpickler {
            globals,
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                Truncated(format!(
                    "pickle truncated: {n} bytes wanted at offset {} of {}",
                    self.pos,
                    self.data.len()
                ))
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn len64(&mut self) -> Result<usize> {
        usize::try_from(self.u64()?).map_err(|_| anyhow!("pickle: length too large"))
    }

    /// The length argument of a counted string or bytes opcode: one byte for the `SHORT_`
    /// ones, eight for the `8` ones, four for the rest.
    fn length(&mut self, op: OpCode) -> Result<usize> {
        match op {
            OpCode::SHORT_BINUNICODE | OpCode::SHORT_BINSTRING | OpCode::SHORT_BINBYTES => {
                Ok(self.u8()? as usize)
            }
            OpCode::BINUNICODE8 | OpCode::BINBYTES8 | OpCode::BYTEARRAY8 => self.len64(),
            _ => Ok(self.u32()? as usize),
        }
    }

    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or_else(|| {
            Truncated(format!(
                "pickle truncated: unterminated line at offset {}",
                self.pos
            ))
        })?;
        self.pos += n + 1;
        std::str::from_utf8(&rest[..n]).map_err(|_| anyhow!("pickle: line is not UTF-8"))
    }

    fn pop(&mut self) -> Result<Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            bail!("pickle: stack underflow (at a MARK) at offset {}", self.pos);
        }
        self.stack
            .pop()
            .ok_or_else(|| anyhow!("pickle: stack underflow at offset {}", self.pos))
    }

    fn top(&self) -> Result<&Value> {
        self.stack
            .last()
            .ok_or_else(|| anyhow!("pickle: empty stack at offset {}", self.pos))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| anyhow!("pickle: MARK missing at offset {}", self.pos))?;
        if m > self.stack.len() {
            bail!("pickle: corrupt MARK at offset {}", self.pos);
        }
        Ok(self.stack.split_off(m))
    }

    fn memo_get(&self, idx: u64) -> Result<Value> {
        self.memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| anyhow!("pickle: memo entry {idx} missing at offset {}", self.pos))
    }

    fn memo_put(&mut self, idx: u64) -> Result<()> {
        let v = self.top()?.clone();
        self.memo.insert(idx, v);
        Ok(())
    }

    /// Bytes consumed so far (after [`Unpickler::run`]: the pickle's length, `STOP` included).
    pub(super) fn position(&self) -> usize {
        self.pos
    }

    /// Run to `STOP` and return the object on top of the stack.
    pub(super) fn run(&mut self) -> Result<Value> {
        loop {
            let op_pos = self.pos;
            let byte = self.u8()?;
            let op = OpCode::from_byte(byte).ok_or_else(|| {
                anyhow!("unknown pickle opcode 0x{byte:02x} at byte offset {op_pos}")
            })?;
            match op {
                OpCode::PROTO => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        bail!("pickle protocol {proto} is not supported (at most 5)");
                    }
                }
                OpCode::FRAME => {
                    self.u64()?; // FRAME: length of the next frame; frames are just a hint
                }
                OpCode::STOP => return self.pop(),
                // Containers.
                OpCode::EMPTY_DICT => self.stack.push(Value::Dict(Default::default())),
                OpCode::EMPTY_LIST | OpCode::EMPTY_SET => {
                    self.stack.push(Value::List(Default::default()))
                }
                OpCode::EMPTY_TUPLE => self.stack.push(Value::Tuple(Rc::new(Vec::new()))),
                OpCode::MARK => self.marks.push(self.stack.len()),
                OpCode::SETITEM => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.dict_set(vec![k, v])?;
                }
                OpCode::SETITEMS => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        bail!("pickle: SETITEMS with an odd item count at offset {op_pos}");
                    }
                    self.dict_set(items)?;
                }
                OpCode::APPEND => {
                    let v = self.pop()?;
                    self.list_extend(vec![v])?;
                }
                OpCode::APPENDS | OpCode::ADDITEMS => {
                    let items = self.pop_mark()?;
                    self.list_extend(items)?;
                }
                OpCode::TUPLE1 | OpCode::TUPLE2 | OpCode::TUPLE3 => {
                    let n = match op {
                        OpCode::TUPLE1 => 1,
                        OpCode::TUPLE2 => 2,
                        _ => 3,
                    };
                    if self.stack.len() < n
                        || self.marks.last().is_some_and(|&m| m > self.stack.len() - n)
                    {
                        bail!("pickle: stack underflow at offset {op_pos}");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                OpCode::TUPLE => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                OpCode::LIST | OpCode::FROZENSET => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                OpCode::DICT => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        bail!("pickle: DICT with an odd item count at offset {op_pos}");
                    }
                    let mut d = DictData::default();
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.set(k, v);
                    }
                    self.stack.push(Value::Dict(Rc::new(RefCell::new(d))));
                }
                // Scalars.
                OpCode::NONE => self.stack.push(Value::None),
                OpCode::NEWTRUE => self.stack.push(Value::Bool(true)),
                OpCode::NEWFALSE => self.stack.push(Value::Bool(false)),
                OpCode::BININT => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v as i64));
                }
                OpCode::BININT1 => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                OpCode::BININT2 => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64));
                }
                OpCode::LONG1 => {
                    let n = self.u8()? as usize;
                    let bytes = self.take(n)?;
                    self.stack.push(long_from_le(bytes));
                }
                OpCode::LONG4 => {
                    let n = self.u32()? as usize;
                    let bytes = self.take(n)?;
                    self.stack.push(long_from_le(bytes));
                }
                OpCode::BINFLOAT => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.stack.push(Value::Float(v));
                }
                OpCode::INT => {
                    let line = self.line()?;
                    let v = match line {
                        "01" => Value::Bool(true),
                        "00" => Value::Bool(false),
                        s => parse_int(s),
                    };
                    self.stack.push(v);
                }
                OpCode::LONG => {
                    let line = self.line()?;
                    self.stack.push(parse_int(line.trim_end_matches('L')));
                }
                OpCode::FLOAT => {
                    let line = self.line()?;
                    let v = line
                        .parse::<f64>()
                        .map_err(|_| anyhow!("pickle: bad FLOAT {line:?} at offset {op_pos}"))?;
                    self.stack.push(Value::Float(v));
                }
                // Strings and bytes.
                OpCode::BINUNICODE | OpCode::BINUNICODE8 | OpCode::SHORT_BINUNICODE => {
                    let n = self.length(op)?;
                    let s = self.utf8(n, op_pos)?;
                    self.stack.push(s);
                }
                OpCode::UNICODE => {
                    let line = self.line()?;
                    self.stack.push(Value::Str(Rc::from(line)));
                }
                OpCode::STRING => {
                    // Protocol 0 STRING: a quoted Python 2 str literal.
                    let line = self.line()?;
                    let inner = line
                        .strip_prefix(['\'', '"'])
                        .and_then(|s| s.strip_suffix(['\'', '"']))
                        .unwrap_or(line);
                    self.stack.push(Value::Str(Rc::from(inner)));
                }
                OpCode::BINSTRING
                | OpCode::BINBYTES
                | OpCode::SHORT_BINSTRING
                | OpCode::SHORT_BINBYTES
                | OpCode::BINBYTES8
                | OpCode::BYTEARRAY8 => {
                    let n = self.length(op)?;
                    let b = self.take(n)?;
                    self.stack.push(Value::Bytes(Rc::from(b)));
                }
                // Memo.
                OpCode::BINPUT => {
                    let i = self.u8()? as u64;
                    self.memo_put(i)?;
                }
                OpCode::LONG_BINPUT => {
                    let i = self.u32()? as u64;
                    self.memo_put(i)?;
                }
                OpCode::MEMOIZE => {
                    let i = self.memo.len() as u64;
                    self.memo_put(i)?;
                }
                OpCode::PUT => {
                    let line = self.line()?;
                    let i = line
                        .parse::<u64>()
                        .map_err(|_| anyhow!("pickle: bad PUT index at offset {op_pos}"))?;
                    self.memo_put(i)?;
                }
                OpCode::BINGET => {
                    let i = self.u8()? as u64;
                    let v = self.memo_get(i)?;
                    self.stack.push(v);
                }
                OpCode::LONG_BINGET => {
                    let i = self.u32()? as u64;
                    let v = self.memo_get(i)?;
                    self.stack.push(v);
                }
                OpCode::GET => {
                    let line = self.line()?;
                    let i = line
                        .parse::<u64>()
                        .map_err(|_| anyhow!("pickle: bad GET index at offset {op_pos}"))?;
                    let v = self.memo_get(i)?;
                    self.stack.push(v);
                }
                // Stack manipulation.
                OpCode::POP => {
                    self.pop()?;
                }
                OpCode::POP_MARK => {
                    self.pop_mark()?;
                }
                OpCode::DUP => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                // Classes, calls, objects.
                OpCode::GLOBAL => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.stack.push(Value::Global(Rc::new((module, name))));
                }
                OpCode::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(m), Some(n)) = (module.as_str(), name.as_str()) else {
                        bail!("pickle: STACK_GLOBAL needs two strings at offset {op_pos}");
                    };
                    self.stack
                        .push(Value::Global(Rc::new((m.to_string(), n.to_string()))));
                }
                OpCode::REDUCE => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self
                        .globals
                        .call(&func, &args)
                        .with_context(|| format!("pickle REDUCE at offset {op_pos}"))?;
                    self.stack.push(v);
                }
                OpCode::NEWOBJ | OpCode::NEWOBJ_EX => {
                    // cls, args (and kwargs with NEWOBJ_EX); the arguments are not used.
                    if op == OpCode::NEWOBJ_EX {
                        self.pop()?;
                    }
                    self.pop()?;
                    let cls = self.pop()?;
                    let v = self.globals.instantiate(&cls);
                    self.stack.push(v);
                }
                OpCode::OBJ => {
                    let items = self.pop_mark()?;
                    if items.is_empty() {
                        bail!("pickle: OBJ without a class at offset {op_pos}");
                    }
                    let v = self.globals.instantiate(&items[0]);
                    self.stack.push(v);
                }
                OpCode::INST => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.pop_mark()?;
                    let v = self
                        .globals
                        .instantiate(&Value::Global(Rc::new((module, name))));
                    self.stack.push(v);
                }
                OpCode::BUILD => {
                    // BUILD: set the state of the object below. Modeled objects (dicts such as
                    // an OrderedDict with `_metadata`) and opaque ones both ignore it.
                    self.pop()?;
                    self.top()?;
                }
                OpCode::BINPERSID => {
                    let pid = self.pop()?;
                    let v = self
                        .globals
                        .persistent_load(&pid)
                        .with_context(|| format!("pickle BINPERSID at offset {op_pos}"))?;
                    self.stack.push(v);
                }
                OpCode::PERSID => {
                    let line = self.line()?;
                    bail!(
                        "pickle: text persistent id {line:?} at offset {op_pos} is not a torch storage"
                    );
                }
                OpCode::EXT1
                | OpCode::EXT2
                | OpCode::EXT4
                | OpCode::NEXT_BUFFER
                | OpCode::READONLY_BUFFER => bail!(
                    "unsupported pickle opcode 0x{byte:02x} ({}) at byte offset {op_pos}",
                    op.name()
                ),
            }
        }
    }

    fn utf8(&mut self, n: usize, op_pos: usize) -> Result<Value> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b)
            .map_err(|_| anyhow!("pickle: string at offset {op_pos} is not UTF-8"))?;
        Ok(Value::Str(Rc::from(s)))
    }

    fn dict_set(&mut self, items: Vec<Value>) -> Result<()> {
        match self.top()? {
            Value::Dict(d) => {
                let mut d = d.borrow_mut();
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.set(k, v);
                }
                Ok(())
            }
            // Items set on an opaque object (a dict subclass we do not model): drop them.
            Value::Object(_) => Ok(()),
            other => bail!("pickle: SETITEM on {} at offset {}", other.kind(), self.pos),
        }
    }

    fn list_extend(&mut self, items: Vec<Value>) -> Result<()> {
        match self.top()? {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            Value::Object(_) => Ok(()),
            other => bail!("pickle: APPEND on {} at offset {}", other.kind(), self.pos),
        }
    }
}

/// A protocol 0 `INT` / `LONG` decimal: `Int`, else `BigInt` (with its value up to i128).
fn parse_int(s: &str) -> Value {
    match s.parse::<i64>() {
        Ok(v) => Value::Int(v),
        Err(_) => Value::BigInt(s.parse::<i128>().ok()),
    }
}

/// Python `int.from_bytes(b, 'little', signed=True)`: `Int` when it fits in i64, else
/// `BigInt` (with its value when it fits in i128).
fn long_from_le(bytes: &[u8]) -> Value {
    let Some(&last) = bytes.last() else {
        return Value::Int(0);
    };
    let fill = if last & 0x80 != 0 { 0xFF } else { 0 };
    // Bytes past the 16th must be pure sign extension for the value to fit in i128.
    if bytes.len() > 16
        && (bytes[16..].iter().any(|&b| b != fill) || (bytes[15] ^ fill) & 0x80 != 0)
    {
        return Value::BigInt(None);
    }
    let n = bytes.len().min(16);
    let mut buf = [fill; 16];
    buf[..n].copy_from_slice(&bytes[..n]);
    let v = i128::from_le_bytes(buf);
    match i64::try_from(v) {
        Ok(i) => Value::Int(i),
        Err(_) => Value::BigInt(Some(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Globals that interpret nothing: the VM alone.
    struct NoGlobals;

    impl Globals for NoGlobals {
        fn call(&self, _: &Value, _: &Value) -> Result<Value> {
            Ok(Value::Object(Rc::from("<call result>")))
        }
        fn instantiate(&self, _: &Value) -> Value {
            Value::Object(Rc::from("<object>"))
        }
        fn persistent_load(&self, _: &Value) -> Result<Value> {
            bail!("no persistent ids here")
        }
    }

    fn unpickle(bytes: &[u8]) -> Result<Value> {
        Unpickler::new(bytes, &NoGlobals).run()
    }

    #[test]
    fn truncation_is_typed_and_position_is_reported() {
        let err = unpickle(b"\x80\x02X\x05\x00\x00\x00ab").unwrap_err();
        assert!(err.downcast_ref::<Truncated>().is_some(), "{err:#}");
        let err = unpickle(b"\x80\x02}q\x00\xff.").unwrap_err();
        assert!(err.downcast_ref::<Truncated>().is_none(), "{err:#}");
        // Two pickles back to back: the first stops after its STOP byte.
        let two = b"\x80\x02K\x07.\x80\x02K\x08.";
        let mut u = Unpickler::new(two, &NoGlobals);
        assert!(matches!(u.run().unwrap(), Value::Int(7)));
        assert_eq!(u.position(), 5);
        assert!(matches!(
            Unpickler::new(&two[5..], &NoGlobals).run().unwrap(),
            Value::Int(8)
        ));
    }

    #[test]
    fn opcodes_round_trip_through_their_bytes() {
        for b in 0..=255u8 {
            if let Some(op) = OpCode::from_byte(b) {
                assert_eq!(op as u8, b, "{}", op.name());
            }
        }
        assert_eq!(OpCode::from_byte(b'X'), Some(OpCode::BINUNICODE));
        // The bytes numbered by position, as pickletools lists them.
        assert_eq!(OpCode::from_byte(0x81), Some(OpCode::NEWOBJ));
        assert_eq!(OpCode::from_byte(0x8b), Some(OpCode::LONG4));
        assert_eq!(OpCode::from_byte(0x8c), Some(OpCode::SHORT_BINUNICODE));
        assert_eq!(OpCode::from_byte(0x93), Some(OpCode::STACK_GLOBAL));
        assert_eq!(OpCode::from_byte(0x98), Some(OpCode::READONLY_BUFFER));
        assert_eq!(OpCode::STACK_GLOBAL.name(), "STACK_GLOBAL");
        assert_eq!(OpCode::from_byte(0xff), None);
        assert_eq!(OpCode::from_byte(0x99), None);
    }

    #[test]
    fn protocol2_dict_of_scalars() {
        // pickle.dumps({'a': 1, 'b': [1.5, None, True], 'c': (300, -2, 70000)}, protocol=2)
        let bytes: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bq\x02]q\x03(G?\xf8\x00\x00\x00\x00\x00\x00N\x88eX\x01\x00\x00\x00cq\x04M,\x01J\xfe\xff\xff\xffJp\x11\x01\x00\x87q\x05u.";
        let v = unpickle(bytes).unwrap();
        assert!(matches!(v.entry("a"), Some(Value::Int(1))));
        let b = v.entry("b").unwrap().items().unwrap();
        assert!(
            matches!(b.as_slice(), [Value::Float(f), Value::None, Value::Bool(true)] if *f == 1.5)
        );
        let c = v.entry("c").unwrap().items().unwrap();
        assert!(matches!(
            c.as_slice(),
            [Value::Int(300), Value::Int(-2), Value::Int(70000)]
        ));
    }

    #[test]
    fn long1_sign_handling() {
        assert!(matches!(long_from_le(&[0xff]), Value::Int(-1)));
        assert!(matches!(long_from_le(&[0x00, 0x80]), Value::Int(-32768)));
        assert!(matches!(long_from_le(&[0xff, 0x00]), Value::Int(255)));
        let max = i64::MAX.to_le_bytes();
        assert!(matches!(long_from_le(&max), Value::Int(i64::MAX)));
        let mut nine = i64::MIN.to_le_bytes().to_vec();
        nine.push(0xff);
        assert!(matches!(long_from_le(&nine), Value::Int(i64::MIN)));
        let mut pos_overflow = u64::MAX.to_le_bytes().to_vec();
        pos_overflow.push(0);
        assert!(
            matches!(long_from_le(&pos_overflow), Value::BigInt(Some(v)) if v == u64::MAX as i128)
        );
        // The legacy torch.save magic number (LONG1, 10 bytes).
        let magic = 0x1950a86a20f9469cfc6c_i128;
        assert!(
            matches!(long_from_le(&magic.to_le_bytes()[..10]), Value::BigInt(Some(v)) if v == magic)
        );
        let mut huge = vec![0u8; 17];
        huge[16] = 1;
        assert!(matches!(long_from_le(&huge), Value::BigInt(None)));
        let mut neg = (-5i128).to_le_bytes().to_vec();
        neg.push(0xff);
        assert!(matches!(long_from_le(&neg), Value::Int(-5)));
        assert!(
            matches!(parse_int("119547037146038801333356"), Value::BigInt(Some(v)) if v == magic)
        );
    }

    #[test]
    fn unknown_opcode_is_named_with_its_offset() {
        let err = unpickle(b"\x80\x02}q\x00\xff.").unwrap_err().to_string();
        assert!(
            err.contains("unknown pickle opcode 0xff at byte offset 5"),
            "{err}"
        );
        let err = unpickle(b"\x80\x02\x82\x01.").unwrap_err().to_string();
        assert!(err.contains("0x82 (EXT1) at byte offset 2"), "{err}");
        let err = unpickle(b"\x80\x02}q\x00X\xff\x00\x00\x00ab")
            .unwrap_err()
            .to_string();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn globals_are_handed_over_never_resolved() {
        // pickle.dumps(os.system('x')) would be `cos\nsystem\n(X...tR.`: the VM passes the
        // reference to the Globals layer, which here returns an opaque value.
        let v = unpickle(b"cos\nsystem\n(X\x01\x00\x00\x00xtR.").unwrap();
        assert!(matches!(v, Value::Object(ref c) if &**c == "<call result>"));
        let v = unpickle(b"\x80\x02cos\nsystem\n.").unwrap();
        assert!(matches!(v, Value::Global(ref g) if g.0 == "os" && g.1 == "system"));
    }
}
