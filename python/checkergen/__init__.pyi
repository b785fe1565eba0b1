"""Type stubs of the checkergen package (the compiled module checkergen._checkergen)."""

import os
from typing import Literal, Optional, Sequence, Tuple, TypedDict, Union, overload

import numpy as np
import numpy.typing as npt

__version__: str

class CheckergenError(RuntimeError):
    """A model could not be loaded, a device is unavailable, or sampling failed."""

class Timings(TypedDict):
    """Where a sample call spent its time, in milliseconds summed over its batches (device
    time on a GPU, wall time on the CPU; meaningless on the emulator)."""

    step_ms: list[float]  # one per serial step; empty if a CUDA graph had no timestamps
    prefill_ms: float
    decode_ms: float
    batches: int
    replayed_batches: int

class Score(TypedDict):
    """One line of `checkergen score --json`: losses in nats (bits) per token."""

    steps_per_scale: int
    serial_steps: int
    images: int
    loss_total: float
    bits_per_token: float
    loss_by_scale: dict[str, float]  # keyed by the scale's side
    top1_by_scale: dict[str, float]

class Model:
    """A Progressive Checkerboard model loaded on a device.

    path: a model file from `checkergen convert` / `checkergen init`; None samples the
        `tiny` preset with random weights.
    device: "auto", "cpu", "cuda", "cuda:N" or "emu".
    precision: None or "f32" (the CPU reference), "bf16" (the transformer's large linears
        in bf16; a GPU always uses bf16 and refuses "f32").
    """

    def __init__(
        self,
        path: Optional[Union[str, os.PathLike[str]]] = None,
        device: str = "auto",
        precision: Optional[Literal["f32", "bf16"]] = None,
    ) -> None: ...
    @overload
    def sample(
        self,
        labels: Sequence[int],
        cfg: float = 1.5,
        steps_per_scale: int = 4,
        seed: int = 0,
        batch_size: Optional[int] = None,
        *,
        steps: Optional[Sequence[int]] = None,
        cfg_start_step: int = 5,
        cfg_end_step: Optional[int] = None,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        return_timings: Literal[False] = False,
    ) -> npt.NDArray[np.uint8]:
        """Sample one image per label: uint8 array (N, H, W, 3), RGB, channels last."""
        ...
    @overload
    def sample(
        self,
        labels: Sequence[int],
        cfg: float = 1.5,
        steps_per_scale: int = 4,
        seed: int = 0,
        batch_size: Optional[int] = None,
        *,
        steps: Optional[Sequence[int]] = None,
        cfg_start_step: int = 5,
        cfg_end_step: Optional[int] = None,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        return_timings: Literal[True],
    ) -> Tuple[npt.NDArray[np.uint8], Timings]:
        """Sample one image per label, and where the call spent its time."""
        ...
    def score(
        self,
        images: npt.NDArray[np.uint8],
        labels: Sequence[int],
        steps_per_scale: Sequence[int] = (2, 4, 8),
    ) -> list[Score]:
        """Score real images (N, S, S, 3) uint8: one dict per steps value, the keys of
        `checkergen score --json`."""
        ...
    @property
    def num_classes(self) -> int: ...
    @property
    def image_size(self) -> int: ...
    @property
    def scale_sizes(self) -> list[int]: ...
    @property
    def device(self) -> str: ...
    @property
    def precision(self) -> str: ...
