#!/usr/bin/env python3
"""Write small PyTorch-format checkpoints of a tiny Progressive Checkerboard model, for the
tests of checkergen's .pth reader and converter (tests/convert.rs).

Pure standard library: no torch. The files have torch.save's layout (a zip of stored entries
with 64-byte aligned data: <archive>/data.pkl, <archive>/byteorder, <archive>/data/<key>,
version records) and its pickle (protocol 2; tensors as
torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks),
parameters as torch._utils._rebuild_parameter(tensor, requires_grad, hooks), storages as
persistent ids ('storage', torch.<Type>Storage, key, location, numel)). Stand-in objects are
registered under the names torch uses, so the pickler writes exactly those globals.

The tensor names, shapes and state-dict order are those of the reference's AR.state_dict()
(deigen/checkerboardgen cbgen/ar.py, cbgen/ae_encoder.py); `--check-golden CONFIG_JSON`
compares the generator against the key list of ../shared/golden/public/A_ratio2/config.json.

To keep the fixtures small (< 1 MB together) while listing every tensor of the real model,
large tensors the tests do not need to tell apart are windows (views at different offsets)
into a few shared storages, which torch.load reads the same way. The model also has:
a bfloat16 and a float16 tensor, a transposed (non-contiguous) lm_head.weight, two biases
sharing one storage at different offsets, a bool scalar buffer, EMA weights saved as
parameters, optimizer state, a GradScaler state and an argparse.Namespace of arguments.

After writing, every file is read back with zipfile + pickle (emulating torch.load's
persistent_load and _rebuild_tensor_v2 on the written bytes), and checksums of the tensors
the converter keeps go to tiny_reference.json.

pair_zip.pth and pair_legacy.pth hold the same small state dict (every float dtype, int64,
bool, a transposed view, two tensors sharing a storage, a storage view) in the two
torch.save formats: the zip one (torch >= 1.6) and the LEGACY one (torch < 1.6:
pickles of the magic number, the protocol version, sys_info, the object and the storage
key list, then each storage as a little-endian u64 element count and its raw elements).
Both are read back here and must give the same tensors.

Usage: python3 tools/make_pth_fixture.py [--out tests/fixtures/pth] [--check-golden PATH]
"""

import argparse
import collections
import io
import json
import math
import os
import pathlib
import pickle
import random
import struct
import sys
import types
import zlib

# ----------------------------------------------------------------------------------------
# The tiny model (same architecture as the released models, tiny sizes)
# ----------------------------------------------------------------------------------------

TINY = dict(
    img_size=16,
    scale_ratio=2,
    scale_min_size=1,
    num_classes=4,
    hidden=32,
    heads=2,
    layers=2,
    intermediate_size=64,  # the reference rounds the FFN width up to a multiple of 256
    num_mixing_layers=2,
    use_head_mlp=False,
    # autoencoder
    ch=32,
    ch_mult=[1, 2],
    num_res_blocks=1,
    z_channels=32,
    embed_dim=8,
    n_embed=16,
)


def ffn_dim(hidden, intermediate_size):
    """cbgen/gpt.py FeedForward with ar.py's ffn_dim_multiplier and multiple_of=256."""
    h = int(2 * (4 * hidden) / 3)
    if intermediate_size is not None:
        h = int(intermediate_size / int(2 * hidden * 4 / 3) * h)
    return h if h % 256 == 0 else h + 256 - h % 256


def scale_sizes(latent, ratio, min_size):
    sizes = [latent]
    while sizes[-1] > min_size:
        sizes.append(sizes[-1] / ratio)
    if sizes[-1] == 0:
        sizes = sizes[:-1]
    sizes.append(min_size)
    return sorted(set(int(round(s)) for s in sizes))  # Python round is half-to-even like np


def ar_state_dict_spec(cfg):
    """[(name, shape, dtype, is_parameter)] in the order of the reference's AR.state_dict()."""
    C, H, L = cfg["hidden"], cfg["heads"], cfg["layers"]
    F = cfg.get("ffn") or ffn_dim(C, cfg["intermediate_size"])
    e, V = cfg["embed_dim"], cfg["n_embed"]
    ch, mult, nrb, z = cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"], cfg["z_channels"]
    latent = cfg["img_size"] // 2 ** (len(mult) - 1)
    N = sum(s * s for s in scale_sizes(latent, cfg["scale_ratio"], cfg["scale_min_size"]))
    out = []

    def P(name, shape):
        out.append((name, list(shape), "float32", True))

    def B(name, shape, dtype="float32"):
        out.append((name, list(shape), dtype, False))

    def conv(name, cout, cin, k):
        P(name + ".weight", [cout, cin, k, k])
        P(name + ".bias", [cout])

    def norm(name, c):
        P(name + ".weight", [c])
        P(name + ".bias", [c])

    def res(p, cin, cout):
        norm(p + ".norm1", cin)
        conv(p + ".conv1", cout, cin, 3)
        norm(p + ".norm2", cout)
        conv(p + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(p + ".nin_shortcut", cout, cin, 1)

    def attn(p, c):
        norm(p + ".norm", c)
        for q in ("q", "k", "v", "proj_out"):
            conv(p + "." + q, c, c, 1)

    def mlp(p, out_dim, last_bias):
        h = max(64, e)
        P(p + ".net.0.weight", [h, e])
        P(p + ".net.0.bias", [h])
        P(p + ".net.2.weight", [h, h])
        P(p + ".net.2.bias", [h])
        P(p + ".net.4.weight", [out_dim, h])
        if last_bias:
            P(p + ".net.4.bias", [out_dim])

    # AR's own parameters come first, then its submodules in registration order.
    P("empty_token_emb", [C])
    P("empty_token_pos", [C])
    # autoenc (VQModel): its buffer, then encoder, decoder, quantize, quant_conv, post_quant_conv.
    B("autoenc.cluster_usage_train", [V])
    levels = len(mult)
    conv("autoenc.encoder.conv_in", ch, 3, 3)
    in_mult = [1] + list(mult)
    block_in = ch
    for i in range(levels):
        block_in = ch * in_mult[i]
        block_out = ch * mult[i]
        for j in range(nrb):
            res(f"autoenc.encoder.conv_blocks.{i}.res.{j}", block_in, block_out)
            block_in = block_out
        if i == levels - 1:
            for j in range(nrb):
                attn(f"autoenc.encoder.conv_blocks.{i}.attn.{j}", block_in)
        if i != levels - 1:
            conv(f"autoenc.encoder.conv_blocks.{i}.downsample.conv", block_in, block_in, 3)
    res("autoenc.encoder.mid.0", block_in, block_in)
    attn("autoenc.encoder.mid.1", block_in)
    res("autoenc.encoder.mid.2", block_in, block_in)
    norm("autoenc.encoder.norm_out", block_in)
    conv("autoenc.encoder.conv_out", z, block_in, 3)
    block_in = ch * mult[-1]
    conv("autoenc.decoder.conv_in", block_in, z, 3)
    res("autoenc.decoder.mid.0", block_in, block_in)
    attn("autoenc.decoder.mid.1", block_in)
    res("autoenc.decoder.mid.2", block_in, block_in)
    for i, level in enumerate(reversed(range(levels))):
        block_out = ch * mult[level]
        for j in range(nrb + 1):
            res(f"autoenc.decoder.conv_blocks.{i}.res.{j}", block_in, block_out)
            block_in = block_out
        if level == levels - 1:
            for j in range(nrb + 1):
                attn(f"autoenc.decoder.conv_blocks.{i}.attn.{j}", block_in)
        if level != 0:
            conv(f"autoenc.decoder.conv_blocks.{i}.upsample.conv", block_in, block_in, 3)
    norm("autoenc.decoder.norm_out", block_in)
    conv("autoenc.decoder.conv_out", 3, block_in, 3)
    B("autoenc.quantize.initialized", [], "bool")
    P("autoenc.quantize.embedding.parametrizations.weight.original", [V, e])
    conv("autoenc.quant_conv", e, z, 1)
    conv("autoenc.post_quant_conv", z, e, 1)
    # llama: layers, final norm, rotary embedding (its parameter before its submodule).
    for l in range(L):
        p = f"llama.layers.{l}."
        P(p + "attention.wqkv.weight", [3 * C, C])
        P(p + "attention.wo.weight", [C, C])
        P(p + "feed_forward.w1.weight", [F, C])
        P(p + "feed_forward.w3.weight", [F, C])
        P(p + "feed_forward.w2.weight", [C, F])
        P(p + "attention_norm.weight", [C])
        P(p + "ffn_norm.weight", [C])
        for m in ("input_modulation", "post_attention_modulation"):
            P(p + m + ".adaLN_modulation.1.weight", [2 * C, C])
            P(p + m + ".adaLN_modulation.1.bias", [2 * C])
    P("llama.norm.weight", [C])
    P("llama.rotary_emb.mixing_coeffs", [cfg["num_mixing_layers"], H])
    P("llama.rotary_emb.position_embeddings.parametrizations.weight.original", [N + 2, 2 * (C // H)])
    P("class_embeddings.weight", [cfg["num_classes"] + 1, C])
    P("embed_positions.weight", [N, C])
    mlp("embed_codevecs_mlp", C, True)
    P("src_latents_proj.weight", [C, C])
    P("src_latents_proj.bias", [C])
    P("combine_inputs.weight", [C, 4 * C])
    P("combine_inputs.bias", [C])
    if cfg["use_head_mlp"]:
        mlp("head_mlp", C, False)
    P("lm_head.weight", [V, C])
    P("lm_head.bias", [V])
    return out


def check_golden(path):
    """Compare the generator with the golden model's 397 keys (names, shapes, dtypes, order)."""
    g = json.load(open(path))
    args = g["ar_constructor_args"]
    llama = args["llama_config"]
    golden_cfg = dict(
        img_size=args["img_size"], scale_ratio=args["scale_ratio"],
        scale_min_size=args["scale_min_size"], num_classes=args["num_classes"],
        hidden=llama["hidden_size"], heads=llama["num_attention_heads"],
        layers=llama["num_hidden_layers"], intermediate_size=llama["intermediate_size"],
        num_mixing_layers=args["num_mixing_layers"], use_head_mlp=args["use_head_mlp"],
        ch=32, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, z_channels=64,
        embed_dim=g["code_dim"], n_embed=g["codebook_size"],
    )
    mine = [(n, s, d) for n, s, d, _ in ar_state_dict_spec(golden_cfg)]
    theirs = [(x["name"], x["shape"], x["dtype"]) for x in g["state_dict"]]
    if mine != theirs:
        for a, b in zip(mine, theirs):
            if a != b:
                print("first difference:", a, "vs golden", b)
                break
        print(f"{len(mine)} keys generated, {len(theirs)} in golden")
        sys.exit(1)
    print(f"generator matches {path}: {len(theirs)} keys, same names, shapes, dtypes and order")


# ----------------------------------------------------------------------------------------
# Stand-ins for the torch objects the pickle refers to
# ----------------------------------------------------------------------------------------

torch_mod = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")
torch_mod._utils = torch_utils
sys.modules["torch"] = torch_mod
sys.modules["torch._utils"] = torch_utils


def _stand_in(module, name):
    def f(*args):
        raise RuntimeError("stand-in for " + module + "." + name)

    f.__module__, f.__name__, f.__qualname__ = module, name, name
    return f


torch_utils._rebuild_tensor_v2 = _stand_in("torch._utils", "_rebuild_tensor_v2")
torch_utils._rebuild_parameter = _stand_in("torch._utils", "_rebuild_parameter")

# storage class -> (struct format, element size) for writing
STORAGE_TYPES = {
    "float32": "FloatStorage",
    "bfloat16": "BFloat16Storage",
    "float16": "HalfStorage",
    "int64": "LongStorage",
    "bool": "BoolStorage",
    "float64": "DoubleStorage",
}
for _cls in STORAGE_TYPES.values():
    setattr(torch_mod, _cls, type(_cls, (), {"__module__": "torch", "__qualname__": _cls}))


def encode(dtype, values):
    if dtype == "float32":
        return struct.pack(f"<{len(values)}f", *values)
    if dtype == "float16":
        return struct.pack(f"<{len(values)}e", *values)
    if dtype == "bfloat16":
        out = bytearray()
        for v in values:
            bits = struct.unpack("<I", struct.pack("<f", v))[0]
            assert bits & 0xFFFF == 0, f"{v} is not exactly representable in bfloat16"
            out += struct.pack("<H", bits >> 16)
        return bytes(out)
    if dtype == "int64":
        return struct.pack(f"<{len(values)}q", *values)
    if dtype == "bool":
        return bytes(1 if v else 0 for v in values)
    if dtype == "float64":
        return struct.pack(f"<{len(values)}d", *values)
    raise ValueError(dtype)


class Storage:
    """One storage: its key in the archive, dtype, elements and where it 'lives'."""

    def __init__(self, archive, dtype, values, location="cpu"):
        self.key = None  # assigned when pickled: torch numbers storages in pickling order
        self.archive = archive
        self.dtype = dtype
        self.numel = len(values)
        self.location = location
        self.data = encode(dtype, values)
        archive.storages.append(self)


class Tensor:
    def __init__(self, storage, offset, shape, stride=None):
        if stride is None:
            stride, acc = [], 1
            for n in reversed(shape):
                stride.insert(0, acc)
                acc *= n
        self.storage, self.offset, self.shape, self.stride = storage, offset, list(shape), list(stride)

    def __reduce_ex__(self, proto):
        return (torch_utils._rebuild_tensor_v2,
                (self.storage, self.offset, tuple(self.shape), tuple(self.stride), False,
                 collections.OrderedDict()))


class Parameter:
    def __init__(self, tensor):
        self.tensor = tensor

    def __reduce_ex__(self, proto):
        return (torch_utils._rebuild_parameter, (self.tensor, True, collections.OrderedDict()))


class Archive:
    """What one torch.save call writes."""

    def __init__(self, name):
        self.name = name
        self.storages = []
        self.pickled = 0


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            if obj.key is None:
                obj.key = str(obj.archive.pickled)
                obj.archive.pickled += 1
            return ("storage", getattr(torch_mod, STORAGE_TYPES[obj.dtype]), obj.key, obj.location,
                    obj.numel)
        return None


# ----------------------------------------------------------------------------------------
# Zip writer (stored entries, 64-byte aligned data, optional ZIP64 records like torch's)
# ----------------------------------------------------------------------------------------

def write_zip(path, records, zip64=False):
    out = bytearray()
    central = bytearray()
    for name, data in records:
        nb = name.encode()
        offset = len(out)
        # Pad the local header's extra field so the data starts on a 64-byte boundary.
        pad = (64 - (offset + 30 + len(nb) + 4) % 64) % 64
        extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # 'FB' padding, as torch writes
        crc = zlib.crc32(data)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0x21, crc, len(data), len(data),
                           len(nb), len(extra)) + nb + extra
        assert len(out) % 64 == 0
        out += data
        if zip64:
            cextra = struct.pack("<HHQQQ", 0x0001, 24, len(data), len(data), offset)
            size32 = off32 = 0xFFFFFFFF
        else:
            cextra, size32, off32 = b"", len(data), offset
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45 if zip64 else 20, 0, 0, 0,
                               0x21, crc, size32, size32, len(nb), len(cextra), 0, 0, 0, 0,
                               off32) + nb + cextra
    cd_offset = len(out)
    out += central
    n = len(records)
    if zip64:
        z64 = len(out)
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, len(central), cd_offset)
        out += struct.pack("<IIQI", 0x07064B50, 0, z64, 1)
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    else:
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(central), cd_offset, 0)
    with open(path, "wb") as f:
        f.write(out)


def torch_save(obj, path, archive, zip64=False, omit_storages=()):
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(obj)
    pre = archive.name + "/"
    records = [(pre + "data.pkl", buf.getvalue()), (pre + ".format_version", b"1"),
               (pre + ".storage_alignment", b"64"), (pre + "byteorder", b"little")]
    written = sorted((s for s in archive.storages if s.key is not None), key=lambda s: int(s.key))
    for s in written:
        if s not in omit_storages:
            records.append((pre + "data/" + s.key, s.data))
    records += [(pre + "version", b"3\n"), (pre + ".data/serialization_id", b"0123456789012345678901234567890123456789")]
    write_zip(path, records, zip64=zip64)


# ----------------------------------------------------------------------------------------
# Legacy writer (torch < 1.6: pickles, then the raw storages)
# ----------------------------------------------------------------------------------------

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class StorageView:
    """A legacy storage view: `size` elements at element `offset` of `root`."""

    def __init__(self, root, key, offset, size):
        self.root, self.key, self.offset, self.size = root, key, offset, size


class LegacyPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, StorageView):
            root = obj.root
            self.persistent_id(root)
            return ("storage", getattr(torch_mod, STORAGE_TYPES[root.dtype]), root.key,
                    root.location, root.numel, (obj.key, obj.offset, obj.size))
        if isinstance(obj, Storage):
            if obj.key is None:
                # torch uses str(id) of the storage: large numbers, listed in string order
                obj.key = str(94000000000000 + 7919 * obj.archive.pickled)
                obj.archive.pickled += 1
            return ("storage", getattr(torch_mod, STORAGE_TYPES[obj.dtype]), obj.key,
                    obj.location, obj.numel, None)
        return None


def torch_save_legacy(obj, path, archive):
    """torch.save(obj, path, _use_new_zipfile_serialization=False)."""
    out = io.BytesIO()
    for header in (LEGACY_MAGIC, LEGACY_PROTOCOL,
                   dict(protocol_version=LEGACY_PROTOCOL, little_endian=True,
                        type_sizes=dict(short=2, int=4, long=4))):
        pickle.dump(header, out, protocol=2)
    LegacyPickler(out, protocol=2).dump(obj)
    written = {s.key: s for s in archive.storages if s.key is not None}
    keys = sorted(written)
    pickle.dump(keys, out, protocol=2)
    for key in keys:
        s = written[key]
        out.write(struct.pack("<Q", s.numel) + s.data)
    with open(path, "wb") as f:
        f.write(out.getvalue())


def load_legacy(path):
    """torch.load of a legacy file, emulated (the counterpart of `load`)."""
    f = io.BytesIO(open(path, "rb").read())
    assert pickle.load(f) == LEGACY_MAGIC and pickle.load(f) == LEGACY_PROTOCOL
    assert pickle.load(f)["little_endian"] is True
    storage_dtype = {v: k for k, v in STORAGE_TYPES.items()}
    roots = {}  # root key -> [dtype, values or None]

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return lambda st, off, *rest: rebuild_tensor(st[0], st[1] + off, *rest)
            if (module, name) == ("torch._utils", "_rebuild_parameter"):
                return lambda data, requires_grad, hooks: data
            if module == "torch" and name.endswith("Storage"):
                return storage_dtype[name]
            return super().find_class(module, name)

        def persistent_load(self, pid):
            tag, dtype, key, location, numel, view = pid
            assert tag == "storage"
            roots.setdefault(key, [dtype, numel])
            return (roots[key], view[1] if view else 0)

    def rebuild_tensor(root, offset, size, stride, requires_grad, hooks, metadata=None):
        return ("lazy", root, offset, list(size), list(stride))

    obj = Unpickler(f).load()
    keys = pickle.load(f)
    for key in keys:
        (count,) = struct.unpack("<Q", f.read(8))
        dtype, numel = roots[key]
        assert count == numel
        size = len(encode(dtype, [0] * count))
        roots[key][1] = decode(dtype, f.read(size))
    assert f.read() == b"", "trailing bytes"

    def materialize(t):
        _, (dtype, values), offset, size, stride = t
        return Loaded(dtype, size, strided(values, offset, size, stride))

    return collections.OrderedDict(
        (k, materialize(v) if isinstance(v, tuple) and v and v[0] == "lazy" else v)
        for k, v in obj.items())


def pair_state_dict(a, legacy):
    """The state dict of pair_zip.pth / pair_legacy.pth (exact values in every dtype)."""
    sd = collections.OrderedDict()
    base = Storage(a, "float32", [i * 0.5 - 3 for i in range(12)])
    sd["f32"] = Tensor(base, 0, [2, 3])
    sd["f32_t"] = Tensor(base, 0, [3, 2], [1, 3])  # transposed view of the same storage
    sd["f32_tail"] = Tensor(base, 8, [4])  # a second tensor on it, at an offset
    sd["f16"] = Tensor(Storage(a, "float16", [1.5, -2.0, 0.099975586, 65504.0]), 0, [4])
    sd["bf16"] = Tensor(Storage(a, "bfloat16", [1.0, -0.5, 3.0, 1024.0]), 0, [2, 2])
    sd["f64"] = Tensor(Storage(a, "float64", [0.1, -1e30, 2.5]), 0, [3])
    sd["i64"] = Tensor(Storage(a, "int64", [0, -7, 2 ** 40, 3, 5]), 0, [5])
    sd["flag"] = Tensor(Storage(a, "bool", [True, False, True]), 0, [3])
    # Elements 2..6 of a storage: a storage view in the legacy file, an offset in the zip.
    pool = Storage(a, "float32", [10.0 + i for i in range(8)])
    sd["view"] = Tensor(StorageView(pool, "view-key", 2, 4) if legacy else pool,
                        0 if legacy else 2, [2, 2])
    for i in range(10):  # more storages, so string order differs from creation order
        sd[f"extra.{i}"] = Parameter(Tensor(Storage(a, "float32", [float(i)]), 0, [1]))
    return sd


def write_pair(out):
    """pair_zip.pth and pair_legacy.pth, read back and compared."""
    a = Archive("pair_zip")
    torch_save(pair_state_dict(a, False), os.path.join(out, "pair_zip.pth"), a)
    a = Archive("pair_legacy")
    torch_save_legacy(pair_state_dict(a, True), os.path.join(out, "pair_legacy.pth"), a)
    z = load(os.path.join(out, "pair_zip.pth"))
    l = load_legacy(os.path.join(out, "pair_legacy.pth"))
    assert list(z) == list(l)
    for k in z:
        assert (z[k].dtype, z[k].shape, z[k].values) == (l[k].dtype, l[k].shape, l[k].values), k
    assert l["view"].values == [12.0, 13.0, 14.0, 15.0]


# ----------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------

Q = 4096.0  # every float value is a multiple of 1/4096 (exact in float32, exact sums)


def init_values(tag, name, shape):
    """Deterministic values shaped like an initialization, multiples of 1/4096."""
    rng = random.Random(zlib.crc32(f"{tag}/{name}".encode()))
    n = math.prod(shape)
    if name.endswith("norm.weight") or ".norm" in name and name.endswith(".weight"):
        return [1 + rng.randint(-400, 400) / Q for _ in range(n)]
    if name.endswith(".bias"):
        return [rng.randint(-200, 200) / Q for _ in range(n)]
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    r = max(1, round(Q / math.sqrt(fan_in)))
    return [rng.randint(-r, r) / Q for _ in range(n)]


def pool_values(tag, n):
    rng = random.Random(zlib.crc32(tag.encode()))
    return [rng.randint(-512, 512) / Q for _ in range(n)]


class Pool:
    """Tensors that are windows into one shared storage, each at its own offset."""

    def __init__(self, archive, tag, specs, shift, location="cpu"):
        self.offsets = {}
        size = 0
        for k, (name, shape) in enumerate(specs):
            self.offsets[name] = k * shift
            size = max(size, k * shift + math.prod(shape))
        self.storage = Storage(archive, "float32", pool_values(tag, size), location)

    def tensor(self, name, shape):
        return Tensor(self.storage, self.offsets[name], shape)


def state_dict_with_metadata(items, modules):
    sd = collections.OrderedDict(items)
    # nn.Module.state_dict() attaches per-module versions; pickle writes them with BUILD.
    sd._metadata = collections.OrderedDict((m, {"version": 1}) for m in [""] + modules)
    return sd


def is_ae(name):
    return name.startswith("autoenc.")


def is_ffn(name):
    return ".feed_forward." in name


def build_model(archive, spec, tag, ae_tag, specials=True):
    """The 'model' state dict: plain tensors. With `specials`, most of the transformer has
    storages of its own and the special layouts; without, everything but the codebook and
    the bool buffer is a window into one of two shared storages."""
    ae_specs = [(n, s) for n, s, d, _ in spec if is_ae(n) and d == "float32"
                and not n.endswith("embedding.parametrizations.weight.original")]
    ffn_specs = [(n, s) for n, s, _, _ in spec if is_ffn(n) or (not specials and not is_ae(n))]
    ae_pool = Pool(archive, ae_tag + "/ae_pool", ae_specs, 5) if ae_specs else None
    ffn_pool = Pool(archive, tag + "/ffn_pool", ffn_specs, 17) if ffn_specs else None
    shared_bias = None
    items = []
    for name, shape, dtype, _ in spec:
        if dtype == "bool":
            t = Tensor(Storage(archive, "bool", [True]), 0, shape)
        elif is_ae(name) and name in ae_pool.offsets:
            t = ae_pool.tensor(name, shape)
        elif ffn_pool and name in ffn_pool.offsets:
            t = ffn_pool.tensor(name, shape)
        elif specials and name == "lm_head.weight":
            # Non-contiguous: the transpose of a row-major [C, V] storage.
            vals = init_values(tag, name, shape)
            V, C = shape
            transposed = [vals[v * C + c] for c in range(C) for v in range(V)]
            t = Tensor(Storage(archive, "float32", transposed), 0, shape, [1, V])
        elif specials and name in ("src_latents_proj.bias", "combine_inputs.bias"):
            # Two biases sharing one storage, at offsets 0 and C.
            if shared_bias is None:
                vals = init_values(tag, "src_latents_proj.bias", shape) + init_values(tag, "combine_inputs.bias", shape)
                shared_bias = Storage(archive, "float32", vals)
            t = Tensor(shared_bias, 0 if name.startswith("src") else shape[0], shape)
        elif specials and name == "empty_token_emb":
            rng = random.Random(zlib.crc32(f"{tag}/{name}".encode()))
            t = Tensor(Storage(archive, "bfloat16", [rng.randint(-127, 127) / 64 for _ in range(shape[0])]), 0, shape)
        elif specials and name == "empty_token_pos":
            rng = random.Random(zlib.crc32(f"{tag}/{name}".encode()))
            t = Tensor(Storage(archive, "float16", [rng.randint(-1023, 1023) / 1024 for _ in range(shape[0])]), 0, shape)
        else:
            t = Tensor(Storage(archive, "float32", init_values(tag, name, shape)), 0, shape)
        items.append((name, t))
    return items


def build_ema(archive, spec, model_items, tag):
    """'model_ema': EMA parameters (as Parameters, on 'cuda:0'); the frozen autoencoder's
    parameters and all buffers share the model's storages."""
    model = dict(model_items)
    ema_specs = [(n, s) for n, s, _, p in spec if p and not is_ae(n)]
    pool = Pool(archive, tag + "/ema_pool", ema_specs, 3, location="cuda:0")
    items = []
    for name, shape, _, is_param in spec:
        if not is_param:
            items.append((name, model[name]))
        elif is_ae(name):
            items.append((name, Parameter(model[name])))
        else:
            items.append((name, Parameter(pool.tensor(name, shape))))
    return items


def optimizer_state(archive, tag):
    rng = random.Random(zlib.crc32(f"{tag}/optimizer".encode()))
    state = {}
    for i in range(2):
        state[i] = {
            "step": Tensor(Storage(archive, "float32", [204.0]), 0, []),
            "exp_avg": Tensor(Storage(archive, "float32", [rng.randint(-9, 9) / Q for _ in range(32)]), 0, [32]),
            "exp_avg_sq": Tensor(Storage(archive, "float32", [rng.randint(0, 9) / Q for _ in range(32)]), 0, [32]),
        }
    common = dict(lr=5e-05, betas=(0.9, 0.95), eps=1e-08, amsgrad=False, foreach=None, maximize=False,
                  capturable=False, differentiable=False, fused=None)
    return {"state": state,
            "param_groups": [dict(common, weight_decay=0.01, params=[0, 1]),
                             dict(common, weight_decay=0.0, params=list(range(2, 40)))]}


def train_args():
    return argparse.Namespace(
        config="configs/tiny.yaml", batch_size=64, epochs=205, lr=5e-05, blr=None, ema=True,
        ema_rate=0.9999, lr_step_epochs=[200], lr_schedule="step", weight_decay=0.01,
        output_dir="output/251126-1200-0123abcd", log_dir=pathlib.PurePosixPath("output/logs"),
        device="cuda", seed=0, resume="", num_workers=8, pin_mem=True, distributed=False,
        world_size=1, dist_url="env://", cfg=2.0, cfg_start_step=5, crop=(256, 256),
        tags={3, 7}, run_id=2 ** 70, extra={"nested": [1, 2.5, None, True]},
    )


SCALER = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
          "_growth_tracker": 0}
MODULES = ["autoenc", "autoenc.encoder", "autoenc.decoder", "autoenc.quantize", "llama",
           "class_embeddings", "embed_positions", "lm_head"]


# ----------------------------------------------------------------------------------------
# Reading back (emulating torch.load on the written bytes)
# ----------------------------------------------------------------------------------------

def decode(dtype, data):
    if dtype == "float32":
        return list(struct.unpack(f"<{len(data) // 4}f", data))
    if dtype == "float16":
        return list(struct.unpack(f"<{len(data) // 2}e", data))
    if dtype == "bfloat16":
        return [struct.unpack("<f", struct.pack("<I", b << 16))[0]
                for (b,) in struct.iter_unpack("<H", data)]
    if dtype == "int64":
        return list(struct.unpack(f"<{len(data) // 8}q", data))
    if dtype == "bool":
        return [float(b != 0) for b in data]
    if dtype == "float64":
        return list(struct.unpack(f"<{len(data) // 8}d", data))
    raise ValueError(dtype)


def strided(values, offset, size, stride):
    """The elements of the view (offset, size, stride) of a storage's values, row-major."""
    out, idx = [], [0] * len(size)
    for _ in range(math.prod(size)):
        out.append(values[offset + sum(i * s for i, s in zip(idx, stride))])
        for d in reversed(range(len(size))):
            idx[d] += 1
            if idx[d] < size[d]:
                break
            idx[d] = 0
    return out


class Loaded:
    def __init__(self, dtype, shape, values):
        self.dtype, self.shape, self.values = dtype, shape, values


def load(path):
    import zipfile
    zf = zipfile.ZipFile(path)
    assert zf.testzip() is None
    pkl = [n for n in zf.namelist() if n.endswith("/data.pkl")][0]
    prefix = pkl[: -len("data.pkl")]
    storage_dtype = {v: k for k, v in STORAGE_TYPES.items()}

    class StorageType:
        def __init__(self, name):
            self.dtype = storage_dtype[name]

    def rebuild_tensor(storage, offset, size, stride, requires_grad, hooks, metadata=None):
        dtype, values = storage
        return Loaded(dtype, list(size), strided(values, offset, size, stride))

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return rebuild_tensor
            if (module, name) == ("torch._utils", "_rebuild_parameter"):
                return lambda data, requires_grad, hooks: data
            if module == "torch" and name.endswith("Storage"):
                return StorageType(name)
            return super().find_class(module, name)

        def persistent_load(self, pid):
            tag, cls, key, location, numel = pid
            assert tag == "storage"
            data = zf.read(prefix + "data/" + key)
            values = decode(cls.dtype, data)
            assert len(values) == numel
            return (cls.dtype, values)

    return Unpickler(io.BytesIO(zf.read(pkl))).load()


def digest(t):
    """[dtype, shape, sum, weighted sum, first values] of a loaded tensor."""
    vals = t.values
    return [t.dtype, t.shape, sum(vals), sum(v * (i % 13 + 1) for i, v in enumerate(vals)), vals[:2]]


def sampling_tensors(sd, autoenc_prefix=""):
    """The tensors the converter keeps, with checksums, keyed by their name in the model."""
    out = {}
    for name, t in sd.items():
        full = autoenc_prefix + name if autoenc_prefix and not name.startswith("autoenc.") else name
        if not isinstance(t, Loaded):
            continue
        if autoenc_prefix and not any(full.startswith(p) for p in ("autoenc.decoder.", "autoenc.post_quant_conv.", "autoenc.quantize.")):
            continue
        if (full.startswith("autoenc.encoder.") or full.startswith("autoenc.quant_conv.")
                or full in ("autoenc.cluster_usage_train", "autoenc.quantize.initialized")):
            continue
        out[full] = digest(t)
    return out


# ----------------------------------------------------------------------------------------
# YAML configs (same structure as the reference's configs/config_256_L.yaml and
# train_ae_codebook/autoencoder_config.yaml)
# ----------------------------------------------------------------------------------------

MODEL_YAML = """\
# Tiny Progressive Checkerboard model for checkergen's converter tests.
# Same structure as the reference's configs/config_256_L.yaml.
model:
    img_size: {img_size}
    scale_ratio: {scale_ratio}
    scale_min_size: {scale_min_size}
    class_cond: true
    num_classes: {num_classes}
    random_block_size: true
    random_replace: 0.1
    random_replace_sampled: false  # a trailing comment, as in the reference configs
    use_head_mlp: false
    num_mixing_layers: {num_mixing_layers}
    #single_scale: false

    autoenc:
        config_path: tiny_autoencoder.yaml
        checkpoint_path: tiny_vq.pth
        params:
            requant_pyramid_levels: -1  # overrides the autoencoder config

    llama_config:
        hidden_size: {hidden}
        intermediate_size: {intermediate_size}  # rounded up to 256 by the reference
        num_attention_heads: {heads}
        num_hidden_layers: {layers}

args:
    batch_size: 64
    lr: 5.e-5
    lr_step_factor: 0.2
    optimizer: adamw
    lr_step_epochs: [200]
    cfg: 2.0
    cfg_start_step: 5
"""

AE_YAML = """\
# Tiny VQ autoencoder for checkergen's converter tests.
# Same structure as the reference's train_ae_codebook/autoencoder_config.yaml.
model:
  base_learning_rate: 0.0001
  target: cbgen.autoencoder.VQModel
  init:
    ignore_keys: ["quantize."]
    freeze_encoder: true
  params:
    monitor: "val/qloss"
    embed_dim: {embed_dim}
    n_embed: {n_embed}
    normalize: true
    requant_pyramid_levels: 1  # not used for sampling
    resolution: {img_size}
    ddconfig:
      ch: {ch}
      ch_mult: [{ch_mult}]
      num_res_blocks: {num_res_blocks}
      z_channels: {z_channels}

data:
  target: main_train_ae.DataModuleFromConfig
  params:
    batch_size: 32
"""


# ----------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "pth"))
    ap.add_argument("--check-golden", metavar="CONFIG_JSON")
    opts = ap.parse_args()
    if opts.check_golden:
        check_golden(opts.check_golden)
    out = opts.out
    os.makedirs(out, exist_ok=True)
    spec = ar_state_dict_spec(TINY)
    noae_spec = [x for x in spec if not is_ae(x[0])]
    vq_spec = [(x[0][len("autoenc."):],) + tuple(x[1:]) for x in spec if is_ae(x[0])]

    # 1. tiny.pth: a training checkpoint as util/misc.py save_model writes it.
    a = Archive("tiny")
    model = build_model(a, spec, "tiny", "tiny")
    ema = build_ema(a, spec, model, "tiny")
    ckpt = {
        "model": state_dict_with_metadata(model, MODULES),
        "model_ema": state_dict_with_metadata(ema, MODULES),
        "optimizer": optimizer_state(a, "tiny"),
        "epoch": 204,
        "scaler": SCALER,
        "args": train_args(),
    }
    torch_save(ckpt, os.path.join(out, "tiny.pth"), a)

    # 2. tiny_noae.pth: a state dict without autoenc.* (trained without EMA: model_ema None).
    a = Archive("archive")
    noae = build_model(a, noae_spec, "noae", "noae", specials=False)
    torch_save({"model": state_dict_with_metadata(noae, MODULES[4:]), "model_ema": None,
                "optimizer": optimizer_state(a, "noae"), "epoch": 3, "scaler": SCALER,
                "args": train_args()}, os.path.join(out, "tiny_noae.pth"), a)

    # 3. tiny_vq.pth: the VQ autoencoder alone, as a Lightning checkpoint (keys without the
    # autoenc. prefix, a loss.* entry the converter must ignore), with ZIP64 records.
    a = Archive("tiny_vq")
    vq_items = build_model(a, [("autoenc." + n,) + tuple(r) for n, *r in vq_spec], "vq", "vq", specials=False)
    vq_items = [(n[len("autoenc."):], t) for n, t in vq_items]
    disc = Tensor(Storage(a, "float32", pool_values("vq/disc", 8 * 3 * 4 * 4)), 0, [8, 3, 4, 4])
    vq_items.insert(len(vq_items) - 5, ("loss.discriminator.main.0.weight", disc))
    torch_save({
        "epoch": 10, "global_step": 1000, "pytorch-lightning_version": "2.1.0",
        "state_dict": state_dict_with_metadata(vq_items, ["encoder", "decoder", "quantize"]),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"current": {"completed": 10}}}},
        "callbacks": {}, "optimizer_states": [optimizer_state(a, "vq")], "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"ddconfig": {"ch": TINY["ch"], "ch_mult": TINY["ch_mult"]},
                             "n_embed": TINY["n_embed"], "embed_dim": TINY["embed_dim"]},
    }, os.path.join(out, "tiny_vq.pth"), a, zip64=True)

    # 4. tiny_broken.pth: lm_head.weight missing; the optimizer's storages are absent from the
    # archive, so reading them fails (the converter must never touch them).
    a = Archive("tiny_broken")
    broken = [(n, t) for n, t in build_model(a, noae_spec, "broken", "broken", specials=False)
              if n != "lm_head.weight"]
    model_storages = set(a.storages)
    optim = optimizer_state(a, "broken")
    omit = set(a.storages) - model_storages
    torch_save({"model": state_dict_with_metadata(broken, MODULES[4:]), "optimizer": optim, "epoch": 1},
               os.path.join(out, "tiny_broken.pth"), a, omit_storages=omit)

    # 5. tiny_bad_opcode.pth: a pickle with the undefined opcode 0xff at byte offset 5.
    write_zip(os.path.join(out, "tiny_bad_opcode.pth"),
              [("bad/data.pkl", b"\x80\x02}q\x00\xff."), ("bad/byteorder", b"little"), ("bad/version", b"3\n")])

    # 6. pair_zip.pth / pair_legacy.pth: one state dict in both torch.save formats.
    write_pair(out)

    # YAML configs.
    with open(os.path.join(out, "tiny_config.yaml"), "w") as f:
        f.write(MODEL_YAML.format(**TINY))
    with open(os.path.join(out, "tiny_autoencoder.yaml"), "w") as f:
        f.write(AE_YAML.format(**dict(TINY, ch_mult=", ".join(map(str, TINY["ch_mult"])))))

    # Read everything back and write the reference checksums.
    tiny = load(os.path.join(out, "tiny.pth"))
    assert isinstance(tiny["args"], argparse.Namespace) and tiny["epoch"] == 204
    assert list(tiny["model"].keys()) == [n for n, *_ in spec]
    noae_ck = load(os.path.join(out, "tiny_noae.pth"))
    assert noae_ck["model_ema"] is None
    vq = load(os.path.join(out, "tiny_vq.pth"))
    sizes = scale_sizes(TINY["img_size"] // 2 ** (len(TINY["ch_mult"]) - 1), TINY["scale_ratio"], TINY["scale_min_size"])
    reference = {
        "about": "checksums of the tensors the converter keeps: [dtype in the checkpoint, shape, "
                 "sum, sum of v[i]*(i%13+1) over the row-major elements, first two values]; "
                 "written by tools/make_pth_fixture.py from the files as read back",
        "config": dict(TINY, ffn=ffn_dim(TINY["hidden"], TINY["intermediate_size"]), scale_sizes=sizes),
        "tiny.pth": {"model": sampling_tensors(tiny["model"]),
                     "model_ema": sampling_tensors(tiny["model_ema"])},
        "tiny_noae.pth": {"model": sampling_tensors(noae_ck["model"])},
        "tiny_vq.pth": {"state_dict": sampling_tensors(vq["state_dict"], autoenc_prefix="autoenc.")},
    }
    with open(os.path.join(out, "tiny_reference.json"), "w") as f:
        json.dump(reference, f, separators=(",", ":"), sort_keys=True)
        f.write("\n")
    total = 0
    for name in sorted(os.listdir(out)):
        size = os.path.getsize(os.path.join(out, name))
        total += size
        print(f"{size:9d}  {name}")
    print(f"{total:9d}  total")


if __name__ == "__main__":
    main()
