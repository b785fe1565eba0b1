"""The Python module against the CLI: the same request and seed give the same pixels.

Run by .ci/run after `pip install .`; CHECKERGEN_CLI names the `checkergen` binary (default
target/release/checkergen).
"""

import json
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


def test_guidance_interval_equals_cli(model, tmp_path):
    # Guidance from step 1 to step 6 of the 17-step schedule: the CLI's --cfg-end-step.
    images = model.sample([2, 9], seed=4, cfg_start_step=1, cfg_end_step=6)
    want = cli_pixels(tmp_path, [2, 9], 4, "--cfg-start-step", "1", "--cfg-end-step", "6")
    np.testing.assert_array_equal(images, want)
    # Stopping guidance early changes the images: the comparison above can fail.
    assert not np.array_equal(model.sample([2, 9], seed=4, cfg_start_step=1), images)


def test_bf16_precision_equals_cli(tmp_path):
    bf16 = checkergen.Model(device="cpu", precision="bf16")
    assert bf16.precision == "bf16"
    images = bf16.sample([0, 1], steps_per_scale=2, seed=4)
    want = cli_pixels(tmp_path, [0, 1], 4, "--steps-per-scale", "2", "--precision", "bf16")
    np.testing.assert_array_equal(images, want)
    # f32 gives other pixels: the comparison above can fail.
    f32 = checkergen.Model(device="cpu", precision="f32")
    assert f32.precision == "f32"
    assert not np.array_equal(f32.sample([0, 1], steps_per_scale=2, seed=4), images)
    with pytest.raises(ValueError, match="precision must be"):
        checkergen.Model(device="cpu", precision="f16")


def test_timings_have_one_entry_per_serial_step(model):
    images, t = model.sample([0, 1, 2], steps_per_scale=2, batch_size=2, return_timings=True)
    assert images.shape == (3, 256, 256, 3)
    serial = 1 + 2 * (len(model.scale_sizes) - 1)  # the 1x1 scale takes one step
    print(f"timings: {len(t['step_ms'])} steps, {sum(t['step_ms']):.1f} ms, "
          f"decode {t['decode_ms']:.1f} ms, {t['batches']} batches")
    assert len(t["step_ms"]) == serial
    assert (t["batches"], t["replayed_batches"]) == (2, 0)
    assert all(ms > 0 for ms in t["step_ms"]) and t["decode_ms"] > 0 and t["prefill_ms"] >= 0
    # The images are those of a call without timings.
    plain = model.sample([0, 1, 2], steps_per_scale=2, batch_size=2)
    np.testing.assert_array_equal(images, plain)


def real_images():
    """Three 256 x 256 RGB test images: ramps and a checker, different per image."""
    y, x = np.mgrid[0:256, 0:256]
    out = []
    for n in range(3):
        checker = ((x // (16 << n)) + (y // 32)) % 2 * 60
        out.append(np.stack([(x + 40 * n) % 256, (y * (n + 1)) % 256,
                             checker + (x ^ y) % 64 + 50 * n], axis=-1))
    return np.stack(out).astype(np.uint8)


def test_score_equals_cli(tmp_path):
    """Model.score on a model file vs `checkergen score --json` on PNGs of the same pixels:
    every value within 1e-12 relative (the same library call; identical on the CPU)."""
    mf = tmp_path / "tiny.safetensors"
    subprocess.run([CLI, "init", "--preset", "tiny", "--out", str(mf)], check=True,
                   capture_output=True)
    images = real_images()
    pngs = []
    for i, img in enumerate(images):
        pngs.append(str(tmp_path / f"real_{i}.png"))
        Image.fromarray(img).save(pngs[-1])
    labels = [3, 0, 7]
    r = subprocess.run([CLI, "score", "--model", str(mf), "--labels", "3,0,7", *pngs,
                        "--steps-per-scale", "2,4", "--device", "cpu", "--json"],
                       check=True, capture_output=True, text=True)
    want = [json.loads(line) for line in r.stdout.splitlines()]
    got = checkergen.Model(mf, device="cpu").score(images, labels, steps_per_scale=[2, 4])
    assert len(got) == len(want) == 2
    worst = 0.0
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in ("steps_per_scale", "serial_steps", "images"):
            assert g[k] == w[k], k
        pairs = [(g["loss_total"], w["loss_total"]), (g["bits_per_token"], w["bits_per_token"])]
        for key in ("loss_by_scale", "top1_by_scale"):
            assert g[key].keys() == w[key].keys()
            pairs += [(g[key][s], w[key][s]) for s in w[key]]
        for a, b in pairs:
            worst = max(worst, abs(a - b) / max(abs(b), 1e-300))
    print(f"Python score vs CLI: worst rel {worst:.2e} (tolerance 1e-12)")
    assert worst <= 1e-12
    # Other labels give other losses: the comparison above can fail.
    other = checkergen.Model(mf, device="cpu").score(images, [1, 1, 1], steps_per_scale=[2])
    assert other[0]["loss_total"] != got[0]["loss_total"]


@pytest.mark.parametrize("images, labels, steps, match", [
    (np.zeros((2, 256, 256, 3), np.uint8), [0], [2], "2 images but 1 labels"),
    (np.zeros((1, 128, 128, 3), np.uint8), [0], [2], r"shape \(N, 256, 256, 3\)"),
    (np.zeros((1, 256, 256, 3), np.uint8), [10], [2], "class id 10 is out of range"),
    (np.zeros((1, 256, 256, 3), np.uint8), [0], [], "at least one steps-per-scale"),
    (np.zeros((1, 256, 256, 3), np.uint8), [0], [0], "at least 1"),
    (np.zeros((1, 256, 256, 6), np.uint8)[..., ::2], [0], [2], "C-contiguous"),
])
def test_bad_score_input_raises_value_error(model, images, labels, steps, match):
    with pytest.raises(ValueError, match=match):
        model.score(images, labels, steps_per_scale=steps)


def test_properties_and_help(model):
    assert model.num_classes == 10
    assert model.image_size == 256
    assert model.scale_sizes == [1, 2, 4, 8, 16]
    assert model.device.startswith("cpu")
    assert "checkergen.Model" in repr(model)
    assert "steps_per_scale" in checkergen.Model.sample.__doc__
    assert "return_timings" in checkergen.Model.sample.__doc__
    assert "score --json" in checkergen.Model.score.__doc__
    assert model.precision == "f32"
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
