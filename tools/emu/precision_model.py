#!/usr/bin/env python3
"""Host model of the GPU VQ decoder's data flow (src/cuda/decoder.rs), to predict its error
against the golden decode-only images without a GPU.

It runs the decoder in NHWC with float64 accumulation and rounds to a 16-bit type exactly
where the GPU stores 16-bit values: conv weights (3x3 and 1x1), GroupNorm outputs, the casts
of the residual stream (post_quant output, nin_shortcut and upsample-conv inputs), gathered
codes, q/k/v, softmax probabilities and P V. The residual stream and conv outputs stay f32.
With --storage none it must reproduce the golden images to f32 precision (a check of the
model itself).

Usage: python3 tools/emu/precision_model.py [--storage f16|bf16|none] [--golden DIR]
Needs numpy. Measured (this commit): none 2e-6 to 5e-6; f16 1.8e-3 to 3.2e-3; bf16 1.4e-2 to
2.2e-2 relative L2 error over s = 1, 2, 4, 5, 8, 16.
"""
import argparse
import json
import os
import struct

import numpy as np

DT = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32, "U8": np.uint8,
      "F16": np.float16}


def load(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    head = json.loads(b[8:8 + n])
    data = b[8 + n:]
    out = {}
    for k, v in head.items():
        if k == "__metadata__" or v["dtype"] not in DT:
            continue
        s, e = v["data_offsets"]
        out[k] = np.frombuffer(data[s:e], dtype=DT[v["dtype"]]).reshape(v["shape"])
    return out


def make_rounder(storage):
    if storage == "none":
        return lambda x: np.asarray(x, np.float32)
    if storage == "f16":
        return lambda x: np.asarray(x, np.float32).astype(np.float16).astype(np.float32)

    def bf16(x):  # round to nearest even, as __float2bfloat16
        u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        return u.astype(np.uint32).view(np.float32)
    return bf16


class Model:
    def __init__(self, weights, rnd):
        self.w, self.r = weights, rnd

    def conv3(self, x, name, up=False):  # x (H, W, Cin), already 16-bit valued
        w, b = self.r(self.w[name + ".weight"]), self.w[name + ".bias"]
        if up:
            x = x.repeat(2, 0).repeat(2, 1)
        h, wd, ci = x.shape
        xp = np.zeros((h + 2, wd + 2, ci), np.float32)
        xp[1:-1, 1:-1] = x
        cols = np.stack([xp[ky:ky + h, kx:kx + wd] for ky in range(3) for kx in range(3)], 2)
        wm = w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)  # (Cout, 3, 3, Cin) as on the GPU
        y = cols.reshape(h * wd, -1).astype(np.float64) @ wm.T.astype(np.float64)
        return y.astype(np.float32).reshape(h, wd, -1) + b

    def conv1(self, x, name):
        w, b = self.r(self.w[name + ".weight"][:, :, 0, 0]), self.w[name + ".bias"]
        y = x.reshape(-1, x.shape[-1]).astype(np.float64) @ w.T.astype(np.float64)
        return y.astype(np.float32).reshape(*x.shape[:-1], -1) + b

    def gn(self, x, name, silu):
        h, wd, c = x.shape
        g = x.reshape(h * wd, 32, c // 32).astype(np.float64)
        m, v = g.mean((0, 2), keepdims=True), g.var((0, 2), keepdims=True)
        y = ((g - m) / np.sqrt(v + 1e-6)).reshape(h, wd, c) * self.w[name + ".weight"] \
            + self.w[name + ".bias"]
        if silu:
            y = y / (1 + np.exp(-y))
        return self.r(y.astype(np.float32))

    def res(self, x, name):
        h = self.conv3(self.gn(x, name + ".norm1", True), name + ".conv1")
        h = self.conv3(self.gn(h, name + ".norm2", True), name + ".conv2")
        if name + ".nin_shortcut.weight" in self.w:
            x = self.conv1(self.r(x), name + ".nin_shortcut")
        return x + h

    def attn(self, x, name):
        h, wd, c = x.shape
        hn = self.gn(x, name + ".norm", False)
        q, k, v = [self.r(self.conv1(hn, f"{name}.{t}").reshape(-1, c)) for t in "qkv"]
        s = (q.astype(np.float64) @ k.T.astype(np.float64)) / np.sqrt(c)
        p = np.exp(s - s.max(1, keepdims=True))
        p = self.r((p / p.sum(1, keepdims=True)).astype(np.float32))
        o = self.r((p.astype(np.float64) @ v.astype(np.float64)).astype(np.float32))
        return x + self.conv1(o.reshape(h, wd, c), name + ".proj_out")

    def decode(self, idx):  # idx (s, s) -> (3, H, W)
        cb = self.w["autoenc.quantize.embedding.parametrizations.weight.original"]
        cb = cb / np.maximum(np.linalg.norm(cb, axis=1, keepdims=True), 1e-12)
        s = idx.shape[-1]
        z = cb[idx.reshape(-1)]
        z = self.r(z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12))
        d = "autoenc.decoder"
        x = self.conv1(z.reshape(s, s, -1), "autoenc.post_quant_conv")
        x = self.conv3(self.r(x), d + ".conv_in")
        x = self.res(x, d + ".mid.0")
        x = self.attn(x, d + ".mid.1")
        x = self.res(x, d + ".mid.2")
        i = 0
        while f"{d}.conv_blocks.{i}.res.0.conv1.weight" in self.w:
            j = 0
            while f"{d}.conv_blocks.{i}.res.{j}.conv1.weight" in self.w:
                x = self.res(x, f"{d}.conv_blocks.{i}.res.{j}")
                if f"{d}.conv_blocks.{i}.attn.{j}.q.weight" in self.w:
                    x = self.attn(x, f"{d}.conv_blocks.{i}.attn.{j}")
                j += 1
            if f"{d}.conv_blocks.{i}.upsample.conv.weight" in self.w:
                x = self.conv3(self.r(x), f"{d}.conv_blocks.{i}.upsample.conv", True)
            i += 1
        x = self.conv3(self.gn(x, d + ".norm_out", True), d + ".conv_out")
        return x.transpose(2, 0, 1)


def u8(x):
    return (np.clip((x + 1) / 2, 0, 1) * 255).astype(np.uint8)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--storage", choices=["f16", "bf16", "none"], default="f16")
    ap.add_argument("--golden", default=os.path.join(here, "../../../shared/golden"))
    a = ap.parse_args()
    weights = load(os.path.join(a.golden, "public/weights_shared.safetensors"))
    weights = {k: v.astype(np.float32) if v.dtype == np.float32 else v for k, v in weights.items()}
    cases = load(os.path.join(a.golden, "public/decode_only.safetensors"))
    m = Model(weights, make_rounder(a.storage))
    for s in (1, 2, 4, 5, 8, 16):
        img = cases[f"image_s{s}"][0]
        got = m.decode(cases[f"indices_s{s}"][0])
        rel = np.linalg.norm(got - img) / np.linalg.norm(img)
        d = np.abs(u8(got).astype(int) - u8(img).astype(int))
        print(f"{a.storage} s={s:2}: rel {rel:.2e}, max abs {np.abs(got - img).max():.2e}, "
              f"8-bit equal {100 * (d == 0).mean():.1f}%, within 2 {100 * (d <= 2).mean():.2f}%, "
              f"max diff {d.max()}")


if __name__ == "__main__":
    main()
