//! The torch layer over the pickle VM: the globals a `torch.save` pickle names, of which this
//! reader interprets exactly those in [`ALLOWED_GLOBALS`], and the persistent ids that point
//! tensors at their storages. Any other class or function (`argparse.Namespace` holding the
//! training arguments, `pathlib.PosixPath`, numpy scalars, ...) becomes an opaque value, never
//! imported or called, so a checkpoint that carries such entries next to its weights loads
//! and a malicious one cannot run code.

use super::pickle::{DictData, Globals, Unpickler, Value};
use super::{PthDtype, StateDict, TensorInfo};
use anyhow::{Result, anyhow, bail};
use std::cell::RefCell;
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

/// A storage a persistent id names: its elements are the archive entry `data/<key>`.
#[derive(Debug)]
pub(super) struct Storage {
    /// Storage class name without the module (`FloatStorage`).
    pub(super) class: String,
    /// `None` for a storage class outside the allowlist (reported when its tensor is used).
    pub(super) dtype: Option<PthDtype>,
    pub(super) key: String,
    pub(super) numel: usize,
}

/// A tensor: a strided view of a storage.
#[derive(Debug)]
pub(super) struct TensorRef {
    pub(super) storage: Rc<Storage>,
    pub(super) offset: usize,
    pub(super) shape: Vec<usize>,
    pub(super) stride: Vec<usize>,
}

/// The torch interpretation of globals and persistent ids.
pub(super) struct Torch;

/// Unpickle a `torch.save` pickle (`data.pkl`).
pub(super) fn unpickle(data: &[u8]) -> Result<Value> {
    Unpickler::new(data, &Torch).run()
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
                Some(t @ Value::Tensor(_)) => t.clone(),
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

    /// `('storage', torch.<Type>Storage, key, location, numel)` -> a storage reference.
    fn persistent_load(&self, pid: &Value) -> Result<Value> {
        let items = pid
            .items()
            .ok_or_else(|| anyhow!("persistent id is {}, not a tuple", pid.kind()))?;
        match items.as_slice() {
            [tag, cls @ Value::Global(g), key, _location, numel]
                if tag.as_str() == Some("storage") =>
            {
                let key = match key {
                    Value::Str(s) => s.to_string(),
                    Value::Int(i) => i.to_string(),
                    other => bail!("storage key is {}", other.kind()),
                };
                let numel = match numel {
                    Value::Int(n) if *n >= 0 => *n as usize,
                    other => bail!("storage element count is {}", other.kind()),
                };
                let dtype = match known(cls) {
                    Some(Known::Storage(dtype)) => Some(dtype),
                    _ => None,
                };
                Ok(Value::Storage(Rc::new(Storage {
                    class: g.1.clone(),
                    dtype,
                    key,
                    numel,
                })))
            }
            _ => bail!(
                "unsupported persistent id (expected ('storage', class, key, location, numel))"
            ),
        }
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
    let [Value::Storage(storage), offset, size, stride, ..] = argv else {
        bail!("torch._utils._rebuild_tensor_v2: expected (storage, offset, size, stride, ...)");
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
    Ok(Value::Tensor(Rc::new(TensorRef {
        storage: storage.clone(),
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
        let (Some(name), Value::Tensor(t)) = (k.as_str(), v) else {
            continue;
        };
        let dtype = t.storage.dtype.ok_or_else(|| {
            anyhow!(
                "tensor '{name}' has unsupported storage type torch.{}",
                t.storage.class
            )
        })?;
        out.insert(
            name.to_string(),
            TensorInfo {
                dtype,
                shape: t.shape.clone(),
                stride: t.stride.clone(),
                offset: t.offset,
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
        assert!(matches!(v.entry("big"), Some(Value::BigInt)));
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
        let storage = Value::Storage(Rc::new(Storage {
            class: "HalfStorage".into(),
            dtype: Some(PthDtype::F16),
            key: "3".into(),
            numel: 6,
        }));
        let tuple = |v: Vec<Value>| Value::Tuple(Rc::new(v));
        let args = tuple(vec![
            storage,
            Value::Int(2),
            tuple(vec![Value::Int(2), Value::Int(2)]),
            tuple(vec![Value::Int(2), Value::Int(1)]),
            Value::Bool(false),
            Value::Dict(Default::default()),
        ]);
        let t = Torch
            .call(&global("torch._utils", "_rebuild_tensor_v2"), &args)
            .unwrap();
        let Value::Tensor(inner) = &t else {
            panic!("not a tensor")
        };
        assert_eq!((inner.offset, inner.shape.clone()), (2, vec![2, 2]));
        let state = Value::Dict(Default::default());
        let p = Torch
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
        assert!(matches!(&p, Value::Tensor(x) if Rc::ptr_eq(x, inner)));
        let sub = Torch
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
        assert!(matches!(&sub, Value::Tensor(x) if x.offset == 2));
        assert!(matches!(
            Torch
                .call(&global("torch", "device"), &tuple(vec![]))
                .unwrap(),
            Value::Object(_)
        ));
    }
}
