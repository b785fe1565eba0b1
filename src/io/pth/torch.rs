//! The torch layer over the pickle VM: the globals a `torch.save` pickle names, of which this
//! reader interprets exactly those in [`ALLOWED_GLOBALS`], and the persistent ids that point
//! tensors at their storages. Any other class or function (`argparse.Namespace` holding the
//! training arguments, `pathlib.PosixPath`, numpy scalars, ...) becomes an opaque value, never
//! imported or called, so a checkpoint that carries such entries next to its weights loads
//! and a malicious one cannot run code.

use super::pickle::{DictData, Extension, Globals, Unpickler, Value, esc};
use super::tensor::{PthDtype, StateDict, TensorInfo};
use anyhow::{Result, anyhow, bail};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

/// What an allowlisted global is to this reader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Known {
    /// `collections.OrderedDict`, `dict`: a dict, from `(key, value)` pairs when called.
    Dict,
    /// `tuple(iterable)`, `torch.Size(iterable)`: a tuple of the items.
    Tuple,
    /// `list`, `set`, `frozenset` of an iterable: a list of the items.
    List,
    /// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks[,
    /// metadata])` (and the older `_rebuild_tensor`): a tensor view of a storage.
    RebuildTensor,
    /// `_rebuild_parameter[_with_state](tensor, requires_grad, hooks[, state])`: the tensor.
    RebuildParameter,
    /// `_rebuild_from_type_v2(func, new_type, args, state)`: `func(*args)`, subclass dropped.
    RebuildFromType,
    /// `torch.<Type>Storage`, the storage class in a persistent id: elements of this dtype.
    Storage(PthDtype),
}

/// The one allowlist: every `(module, name)` global this reader interprets.
pub(super) const ALLOWED_GLOBALS: &[(&str, &str, Known)] = &[
    ("collections", "OrderedDict", Known::Dict),
    ("builtins", "dict", Known::Dict),
    ("__builtin__", "dict", Known::Dict),
    ("builtins", "tuple", Known::Tuple),
    ("__builtin__", "tuple", Known::Tuple),
    ("torch", "Size", Known::Tuple),
    ("builtins", "list", Known::List),
    ("__builtin__", "list", Known::List),
    ("builtins", "set", Known::List),
    ("__builtin__", "set", Known::List),
    ("builtins", "frozenset", Known::List),
    ("__builtin__", "frozenset", Known::List),
    ("torch._utils", "_rebuild_tensor_v2", Known::RebuildTensor),
    ("torch._utils", "_rebuild_tensor", Known::RebuildTensor),
    (
        "torch._utils",
        "_rebuild_parameter",
        Known::RebuildParameter,
    ),
    (
        "torch._utils",
        "_rebuild_parameter_with_state",
        Known::RebuildParameter,
    ),
    (
        "torch._tensor",
        "_rebuild_from_type_v2",
        Known::RebuildFromType,
    ),
    ("torch", "DoubleStorage", Known::Storage(PthDtype::F64)),
    ("torch", "FloatStorage", Known::Storage(PthDtype::F32)),
    ("torch", "HalfStorage", Known::Storage(PthDtype::F16)),
    ("torch", "BFloat16Storage", Known::Storage(PthDtype::BF16)),
    ("torch", "LongStorage", Known::Storage(PthDtype::I64)),
    ("torch", "IntStorage", Known::Storage(PthDtype::I32)),
    ("torch", "ShortStorage", Known::Storage(PthDtype::I16)),
    ("torch", "CharStorage", Known::Storage(PthDtype::I8)),
    ("torch", "ByteStorage", Known::Storage(PthDtype::U8)),
    ("torch", "BoolStorage", Known::Storage(PthDtype::Bool)),
];

/// The allowlist entry of a global reference, if any.
fn known(v: &Value) -> Option<Known> {
    let Value::Global(g) = v else { return None };
    ALLOWED_GLOBALS
        .iter()
        .find(|(m, n, _)| *m == g.0 && *n == g.1)
        .map(|&(_, _, k)| k)
}

/// An opaque value standing for an instance or call result of `global`.
fn opaque(global: &Value, fallback: &str) -> Value {
    match global {
        Value::Global(g) => Value::Object(Rc::from(format!("{}.{}", g.0, g.1))),
        _ => Value::Object(Rc::from(fallback)),
    }
}

/// A storage a persistent id names: its elements are the archive entry `data/<key>` (zip
/// format) or the storage `key` after the pickles (legacy format).
#[derive(Debug)]
pub(super) struct Storage {
    /// Storage class name without the module (`FloatStorage`).
    pub(super) class: String,
    /// `None` for a storage class outside the allowlist (reported when its tensor is used).
    pub(super) dtype: Option<PthDtype>,
    pub(super) key: String,
    /// Element count of the whole (root) storage.
    pub(super) numel: usize,
    /// Legacy storage views (`view_metadata`): the view's first element in the root storage
    /// (0 for a whole storage), added to the offset of every tensor on the view.
    pub(super) view_offset: usize,
}

impl Extension for Storage {
    fn kind(&self) -> String {
        "a storage".into()
    }
}

/// A tensor: a strided view of a storage.
#[derive(Debug)]
pub(super) struct TensorRef {
    pub(super) storage: Rc<Storage>,
    pub(super) offset: usize,
    pub(super) shape: Vec<usize>,
    pub(super) stride: Vec<usize>,
}

impl Extension for TensorRef {
    fn kind(&self) -> String {
        "a tensor".into()
    }
}

/// The persistent-id form a file uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Format {
    /// `('storage', class, key, location, numel)` (torch >= 1.6, zip).
    Zip,
    /// `('storage', class, root_key, location, root_numel, view_metadata)` with
    /// `view_metadata` None or `(view_key, offset, size)` (torch < 1.6).
    Legacy,
}

/// The torch interpretation of globals and persistent ids. It records every storage the
/// persistent ids name (by key), which the legacy format needs to locate their bytes.
pub(super) struct Torch {
    format: Format,
    storages: RefCell<BTreeMap<String, Rc<Storage>>>,
}

impl Torch {
    pub(super) fn new(format: Format) -> Self {
        Torch {
            format,
            storages: RefCell::default(),
        }
    }

    /// Unpickle one pickle at the start of `data`: the value and the pickle's length.
    pub(super) fn unpickle(&self, data: &[u8]) -> Result<(Value, usize)> {
        let mut vm = Unpickler::new(data, self);
        let v = vm.run()?;
        Ok((v, vm.position()))
    }

    /// The storages the persistent ids named, by (root) key.
    pub(super) fn into_storages(self) -> BTreeMap<String, Rc<Storage>> {
        self.storages.into_inner()
    }

    /// The one storage object per root key (a view is its own object over the root's
    /// bytes); a key named again with another class or size is an error.
    fn register(&self, s: Storage) -> Result<Rc<Storage>> {
        let mut map = self.storages.borrow_mut();
        let root = map.entry(s.key.clone()).or_insert_with(|| {
            Rc::new(Storage {
                class: s.class.clone(),
                dtype: s.dtype,
                key: s.key.clone(),
                numel: s.numel,
                view_offset: 0,
            })
        });
        if root.class != s.class || root.numel != s.numel {
            bail!(
                "storage {} is named as torch.{} of {} elements and as torch.{} of {}",
                esc(&s.key),
                esc(&root.class),
                root.numel,
                esc(&s.class),
                s.numel
            );
        }
        Ok(if s.view_offset == 0 {
            root.clone()
        } else {
            Rc::new(s)
        })
    }
}

/// Unpickle a `torch.save` pickle (`data.pkl` of the zip format).
pub(super) fn unpickle(data: &[u8]) -> Result<Value> {
    Ok(Torch::new(Format::Zip).unpickle(data)?.0)
}

impl Globals for Torch {
    fn call(&self, func: &Value, args: &Value) -> Result<Value> {
        let argv = args.items().unwrap_or_default();
        let first_items = || argv.first().and_then(Value::items).unwrap_or_default();
        Ok(match known(func) {
            Some(Known::Dict) => {
                let mut d = DictData::default();
                for pair in first_items() {
                    if let Some([k, v]) = pair.items().as_deref() {
                        d.set(k.clone(), v.clone());
                    }
                }
                Value::Dict(Rc::new(RefCell::new(d)))
            }
            Some(Known::Tuple) => Value::Tuple(Rc::new(first_items())),
            Some(Known::List) => Value::List(Rc::new(RefCell::new(first_items()))),
            Some(Known::RebuildTensor) => rebuild_tensor(&argv)?,
            Some(Known::RebuildParameter) => match argv.first() {
                Some(t) if t.ext::<TensorRef>().is_some() => t.clone(),
                _ => bail!(
                    "torch._utils.{} expects a tensor as its first argument",
                    global_name(func)
                ),
            },
            Some(Known::RebuildFromType) => {
                // `_rebuild_from_type_v2(func, type, args, state)` calls `func(*args)`; a
                // hostile pickle can nest these, so unwrap them in a loop, not by recursion.
                let mut argv = argv;
                loop {
                    let (f, inner) = match argv.as_slice() {
                        [f, _ty, inner, ..] => (f.clone(), inner.clone()),
                        _ => bail!("torch._tensor._rebuild_from_type_v2 expects 4 arguments"),
                    };
                    if matches!(known(&f), Some(Known::RebuildFromType)) {
                        argv = inner.items().unwrap_or_default();
                    } else {
                        break self.call(&f, &inner)?;
                    }
                }
            }
            Some(Known::Storage(_)) | None => opaque(func, "<call result>"),
        })
    }

    fn instantiate(&self, cls: &Value) -> Value {
        match known(cls) {
            Some(Known::Dict) => Value::Dict(Default::default()),
            _ => opaque(cls, "<object>"),
        }
    }

    /// `('storage', torch.<Type>Storage, key, location, numel)` (zip) or
    /// `('storage', torch.<Type>Storage, root_key, location, root_numel, view_metadata)`
    /// (legacy) -> a storage reference.
    fn persistent_load(&self, pid: &Value) -> Result<Value> {
        let items = pid
            .items()
            .ok_or_else(|| anyhow!("persistent id is {}, not a tuple", pid.kind()))?;
        let (tag, cls, key, numel, view) = match (self.format, items.as_slice()) {
            (Format::Zip, [tag, cls, key, _location, numel]) => (tag, cls, key, numel, None),
            (Format::Legacy, [tag, cls, key, _location, numel, view]) => {
                (tag, cls, key, numel, Some(view))
            }
            (Format::Zip, _) => bail!(
                "unsupported persistent id (expected ('storage', class, key, location, numel))"
            ),
            (Format::Legacy, _) => bail!(
                "unsupported persistent id (expected ('storage', class, key, location, numel, \
                 view_metadata))"
            ),
        };
        let Value::Global(g) = cls else {
            bail!("persistent id: the storage class is {}", cls.kind());
        };
        if tag.as_str() != Some("storage") {
            bail!("persistent id of kind {}, not 'storage'", tag.kind());
        }
        let key = storage_key(key)?;
        let numel = match numel {
            Value::Int(n) if *n >= 0 => *n as usize,
            other => bail!("storage element count is {}", other.kind()),
        };
        let dtype = match known(cls) {
            Some(Known::Storage(dtype)) => Some(dtype),
            _ => None,
        };
        // Legacy storage views: (view_key, offset, size) inside the root storage.
        let view_offset = match view {
            None | Some(Value::None) => 0,
            Some(v) => match v.items().as_deref() {
                Some([_view_key, Value::Int(off), Value::Int(size)]) if *off >= 0 && *size >= 0 => {
                    let (off, size) = (*off as usize, *size as usize);
                    if off.checked_add(size).is_none_or(|end| end > numel) {
                        bail!(
                            "storage view at offset {off} of {size} elements does not fit in \
                             storage {} of {numel}",
                            esc(&key)
                        );
                    }
                    off
                }
                _ => bail!(
                    "storage view metadata is {}, not (view_key, offset, size)",
                    v.kind()
                ),
            },
        };
        let storage = self.register(Storage {
            class: g.1.clone(),
            dtype,
            key,
            numel,
            view_offset,
        })?;
        Ok(Value::Ext(storage))
    }
}

/// A storage key: a string, or an int written as one.
fn storage_key(v: &Value) -> Result<String> {
    match v {
        Value::Str(s) => Ok(s.to_string()),
        Value::Int(i) => Ok(i.to_string()),
        other => bail!("storage key is {}", other.kind()),
    }
}

fn global_name(v: &Value) -> &str {
    match v {
        Value::Global(g) => &g.1,
        _ => "?",
    }
}

fn usize_list(v: &Value, what: &str) -> Result<Vec<usize>> {
    let items = v
        .items()
        .ok_or_else(|| anyhow!("tensor {what} is {}, not a tuple", v.kind()))?;
    items
        .iter()
        .map(|x| match x {
            Value::Int(i) if *i >= 0 => Ok(*i as usize),
            other => bail!("tensor {what} has an element that is {}", other.kind()),
        })
        .collect()
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks[, meta])`.
fn rebuild_tensor(argv: &[Value]) -> Result<Value> {
    let [storage, offset, size, stride, ..] = argv else {
        bail!("torch._utils._rebuild_tensor_v2: expected (storage, offset, size, stride, ...)");
    };
    let Some(storage) = storage.ext::<Storage>() else {
        bail!(
            "torch._utils._rebuild_tensor_v2: the storage argument is {}",
            storage.kind()
        );
    };
    let offset = match offset {
        Value::Int(i) if *i >= 0 => *i as usize,
        other => bail!("tensor storage offset is {}", other.kind()),
    };
    let shape = usize_list(size, "size")?;
    let stride = usize_list(stride, "stride")?;
    if shape.len() != stride.len() {
        bail!("tensor size {shape:?} and stride {stride:?} differ in rank");
    }
    Ok(Value::Ext(Rc::new(TensorRef {
        storage,
        offset,
        shape,
        stride,
    })))
}

/// The tensors of a dict, by string key (other entries are skipped).
pub(super) fn collect_state_dict(v: &Value) -> Result<StateDict> {
    let Value::Dict(d) = v else {
        bail!("not a dict")
    };
    let mut out = StateDict::new();
    for (k, v) in &d.borrow().entries {
        let (Some(name), Some(t)) = (k.as_str(), v.ext::<TensorRef>()) else {
            continue;
        };
        let dtype = t.storage.dtype.ok_or_else(|| {
            anyhow!(
                "tensor '{}' has unsupported storage type torch.{}",
                esc(name),
                esc(&t.storage.class)
            )
        })?;
        out.insert(
            name.to_string(),
            TensorInfo {
                dtype,
                shape: t.shape.clone(),
                stride: t.stride.clone(),
                offset: t
                    .offset
                    .checked_add(t.storage.view_offset)
                    .ok_or_else(|| anyhow!("tensor '{}': storage offset overflows", esc(name)))?,
                storage_key: t.storage.key.clone(),
                storage_numel: t.storage.numel,
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn global(m: &str, n: &str) -> Value {
        Value::Global(Rc::new((m.to_string(), n.to_string())))
    }

    #[test]
    fn allowlist_entries_are_unique() {
        for (i, (m, n, _)) in ALLOWED_GLOBALS.iter().enumerate() {
            assert!(
                ALLOWED_GLOBALS[..i]
                    .iter()
                    .all(|(m2, n2, _)| (m2, n2) != (m, n)),
                "{m}.{n} listed twice"
            );
        }
        assert_eq!(
            known(&global("torch", "BFloat16Storage")),
            Some(Known::Storage(PthDtype::BF16))
        );
        assert_eq!(known(&global("os", "system")), None);
        assert_eq!(known(&global("numpy", "FloatStorage")), None);
    }

    #[test]
    fn protocol4_frames_memoize_and_stack_global() {
        // pickle.dumps({'k': collections.OrderedDict(), 'n': 2**40, 'big': 2**70}, protocol=4)
        let bytes: &[u8] = b"\x80\x04\x95G\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01k\x94\x8c\x0bcollections\x94\x8c\x0bOrderedDict\x94\x93\x94)R\x94\x8c\x01n\x94\x8a\x06\x00\x00\x00\x00\x00\x01\x8c\x03big\x94\x8a\t\x00\x00\x00\x00\x00\x00\x00\x00@u.";
        let v = unpickle(bytes).unwrap();
        assert!(matches!(v.entry("k"), Some(Value::Dict(_))));
        assert!(matches!(v.entry("n"), Some(Value::Int(n)) if n == 1 << 40));
        assert!(matches!(v.entry("big"), Some(Value::BigInt(Some(b))) if b == 1 << 70));
    }

    #[test]
    fn opaque_objects_do_not_fail() {
        // argparse.Namespace(lr=0.1, p=PosixPath('x')) pickled at protocol 2.
        let bytes: &[u8] = b"\x80\x02cargparse\nNamespace\nq\x00)\x81q\x01}q\x02(X\x02\x00\x00\x00lrq\x03G?\xb9\x99\x99\x99\x99\x99\x9aX\x01\x00\x00\x00pq\x04cpathlib\nPosixPath\nq\x05X\x01\x00\x00\x00xq\x06\x85q\x07Rq\x08ub.";
        let v = unpickle(bytes).unwrap();
        assert!(matches!(v, Value::Object(ref c) if &**c == "argparse.Namespace"));
        // A call outside the allowlist is never made: os.system('x') is an opaque value.
        let v = unpickle(b"cos\nsystem\n(X\x01\x00\x00\x00xtR.").unwrap();
        assert!(matches!(v, Value::Object(ref c) if &**c == "os.system"));
    }

    #[test]
    fn tensor_wrappers_unwrap_to_the_tensor() {
        // Parameter and tensor-subclass wrappers unwrap to the tensor.
        let storage = Value::Ext(Rc::new(Storage {
            class: "HalfStorage".into(),
            dtype: Some(PthDtype::F16),
            key: "3".into(),
            numel: 6,
            view_offset: 0,
        }));
        let torch = Torch::new(Format::Zip);
        let tuple = |v: Vec<Value>| Value::Tuple(Rc::new(v));
        let args = tuple(vec![
            storage,
            Value::Int(2),
            tuple(vec![Value::Int(2), Value::Int(2)]),
            tuple(vec![Value::Int(2), Value::Int(1)]),
            Value::Bool(false),
            Value::Dict(Default::default()),
        ]);
        let t = torch
            .call(&global("torch._utils", "_rebuild_tensor_v2"), &args)
            .unwrap();
        let inner = t.ext::<TensorRef>().expect("a tensor");
        assert_eq!((inner.offset, inner.shape.clone()), (2, vec![2, 2]));
        let state = Value::Dict(Default::default());
        let p = torch
            .call(
                &global("torch._utils", "_rebuild_parameter_with_state"),
                &tuple(vec![
                    t.clone(),
                    Value::Bool(true),
                    Value::Dict(Default::default()),
                    state.clone(),
                ]),
            )
            .unwrap();
        assert!(p.ext::<TensorRef>().is_some_and(|x| Rc::ptr_eq(&x, &inner)));
        let sub = torch
            .call(
                &global("torch._tensor", "_rebuild_from_type_v2"),
                &tuple(vec![
                    global("torch._utils", "_rebuild_tensor_v2"),
                    global("torch", "Tensor"),
                    args,
                    state,
                ]),
            )
            .unwrap();
        assert!(sub.ext::<TensorRef>().is_some_and(|x| x.offset == 2));
        assert!(matches!(
            torch
                .call(&global("torch", "device"), &tuple(vec![]))
                .unwrap(),
            Value::Object(_)
        ));
    }
}
