#!/usr/bin/env python3
"""Times the authors' PyTorch sampler (cbgen.ar.AR from a checkout of deigen/checkerboardgen)
on the CPU with random weights of the L-2x shapes, for scripts/bench-vs-reference.sh.

Nothing of the authors' code is in this repository: --ref names a checkout outside it, which
is imported as is. The model is built from the checkout's configs/config_256_L.yaml (scale
ratio 2, 20 layers of 1024) with the released autoencoder's shapes (VQ-16 defaults: ch 128,
ch_mult [1, 1, 2, 2, 4], 2 res blocks, z 256, e 8, 4096 codes) and torch's default random
initialisation under a fixed seed; no checkpoint is read.

Prints one JSON object per batch size:
  load_s          building the model (random init), once
  sample_s        median wall time of model.sample(...) (cfg, cfg_start_step, 4 steps per scale)
  sample_decode_s the part of sample_s spent in autoenc.decode (sample() decodes the image of
                  every scale of the pyramid for the conditional half)
  decode_s_per_image  median of autoenc.decode on a (B, 8, 16, 16) batch of normalized random
                  codes, divided by B (the decoder alone, 256 px)
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

AUTOENC_YAML = """\
model:
  target: cbgen.autoencoder.VQModel
  params:
    embed_dim: 8
    n_embed: 4096
    normalize: true
    resolution: 256
    requant_pyramid_levels: -1
    ddconfig: {}
"""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ref", required=True, help="checkout of deigen/checkerboardgen")
    p.add_argument("--batch", default="1,4")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--cfg-start-step", type=int, default=5)
    p.add_argument("--steps-per-scale", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    import torch
    import torch.nn.functional as F
    import yaml

    torch.set_num_threads(a.threads)
    sys.path.insert(0, os.path.abspath(a.ref))
    from cbgen import ar

    with open(os.path.join(a.ref, "configs", "config_256_L.yaml")) as f:
        cfg = yaml.safe_load(f)["model"]
    tmp = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    tmp.write(AUTOENC_YAML)
    tmp.close()
    cfg["autoenc"] = {
        "config_path": tmp.name,
        "checkpoint_path": None,
        "params": {"requant_pyramid_levels": -1},
    }

    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    model = ar.AR(**cfg)
    model.eval()
    if hasattr(model.autoenc.quantize, "initialized"):
        model.autoenc.quantize.initialized = torch.tensor(True, dtype=torch.bool)
    load_s = time.perf_counter() - t0
    os.unlink(tmp.name)
    model.num_blocks_per_scale = a.steps_per_scale

    # Time autoenc.decode inside sample() with a wrapper (the call is unchanged).
    decode_time = [0.0]
    inner_decode = model.autoenc.decode

    def timed_decode(*args, **kw):
        t = time.perf_counter()
        out = inner_decode(*args, **kw)
        decode_time[0] += time.perf_counter() - t
        return out

    model.autoenc.decode = timed_decode

    for b in [int(x) for x in a.batch.split(",")]:
        labels = torch.arange(b, dtype=torch.long) % 1000
        samples, decodes = [], []
        with torch.no_grad():
            for i in range(a.warmup + a.iters):
                decode_time[0] = 0.0
                t = time.perf_counter()
                model.sample(
                    batch_size=b,
                    labels=labels,
                    temperature=1.0,
                    cfg=a.cfg,
                    cfg_start_step=a.cfg_start_step,
                )
                if i >= a.warmup:
                    samples.append(time.perf_counter() - t)
                    decodes.append(decode_time[0])
            z = F.normalize(torch.randn(b, 8, 16, 16), dim=1)
            dec = []
            for i in range(a.warmup + a.iters):
                t = time.perf_counter()
                inner_decode(z)
                if i >= a.warmup:
                    dec.append((time.perf_counter() - t) / b)
        print(
            json.dumps(
                {
                    "batch": b,
                    "load_s": load_s,
                    "sample_s": statistics.median(samples),
                    "sample_decode_s": statistics.median(decodes),
                    "decode_s_per_image": statistics.median(dec),
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
