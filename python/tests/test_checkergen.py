"""The Python module against the CLI: the same request and seed give the same pixels.

Run by .ci/run after `pip install .`; CHECKERGEN_CLI names the `checkergen` binary (default
target/release/checkergen).
"""

import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import checkergen

ROOT = Path(__file__).resolve().parents[2]
CLI = os.environ.get("CHECKERGEN_CLI", str(ROOT / "target" / "release" / "checkergen"))


@pytest.fixture(scope="module")
def model():
    return checkergen.Model(device="cpu")


def cli_pixels(tmp_path, labels, seed, *extra):
    out = tmp_path / "cli"
    args = [CLI, "sample", "--labels", ",".join(map(str, labels)), "--seed", str(seed)]
    subprocess.run(args + ["--device", "cpu", "--out", str(out), *extra], check=True,
                   capture_output=True)
    return np.stack([np.asarray(Image.open(out / f"sample_{i:04}.png").convert("RGB"))
                     for i in range(len(labels))])


def test_sample_equals_cli_pngs(model, tmp_path):
    images = model.sample([0, 1, 2], seed=5, batch_size=2)
    assert images.dtype == np.uint8
    assert images.shape == (3, 256, 256, 3)
    want = cli_pixels(tmp_path, [0, 1, 2], 5, "--batch-size", "3")
    np.testing.assert_array_equal(images, want)
    # Another seed gives other images: the comparison above can fail.
    assert not np.array_equal(model.sample([0, 1, 2], seed=6), images)


def test_settings_reach_the_engine(model, tmp_path):
    kw = dict(cfg=0.0, steps_per_scale=2, seed=3, temperature=0.8, top_k=50, top_p=0.9)
    images = model.sample([4, 7], **kw)
    want = cli_pixels(tmp_path, [4, 7], 3, "--cfg", "0", "--steps-per-scale", "2",
                      "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9")
    np.testing.assert_array_equal(images, want)
    explicit = model.sample([4, 7], cfg=0.0, steps=[2] * len(model.scale_sizes), seed=3,
                            temperature=0.8, top_k=50, top_p=0.9)
    np.testing.assert_array_equal(explicit, images)


def test_properties_and_help(model):
    assert model.num_classes == 10
    assert model.image_size == 256
    assert model.scale_sizes == [1, 2, 4, 8, 16]
    assert model.device.startswith("cpu")
    assert "checkergen.Model" in repr(model)
    assert "steps_per_scale" in checkergen.Model.sample.__doc__
    assert checkergen.Model.__doc__.startswith("A Progressive Checkerboard model")


@pytest.mark.parametrize("kwargs, match", [
    (dict(labels=[10]), "class id 10 is out of range"),
    (dict(labels=[]), "no labels"),
    (dict(labels=[-1]), "must be >= 0"),
    (dict(labels=[0], steps_per_scale=0), "at least 1"),
    (dict(labels=[0], steps=[1, 2]), "per-scale step counts"),
    (dict(labels=[0], cfg=float("nan")), "cfg must be"),
    (dict(labels=[0], temperature=-1.0), "temperature"),
    (dict(labels=[0], top_p=1.5), "top-p"),
    (dict(labels=[0], batch_size=0), "batch size"),
])
def test_bad_requests_raise_value_error(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.sample(**kwargs)


def test_bad_path_and_device():
    with pytest.raises(checkergen.CheckergenError, match="cannot load model"):
        checkergen.Model("/nonexistent/model.safetensors", device="cpu")
    with pytest.raises(ValueError, match="device must be"):
        checkergen.Model(device="tpu")


def test_threads_share_one_model(model):
    serial = [model.sample([i, i + 1], steps_per_scale=1, seed=i) for i in range(4)]
    got = [None] * 4

    def work(i):
        got[i] = model.sample([i, i + 1], steps_per_scale=1, seed=i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(got, serial):
        np.testing.assert_array_equal(a, b)
