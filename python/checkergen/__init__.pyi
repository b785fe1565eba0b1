"""Type stubs of the checkergen package (the compiled module checkergen._checkergen)."""

import os
from typing import Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

__version__: str

class CheckergenError(RuntimeError):
    """A model could not be loaded, a device is unavailable, or sampling failed."""

class Model:
    """A Progressive Checkerboard model loaded on a device.

    path: a model file from `checkergen convert` / `checkergen init`; None samples the
        `tiny` preset with random weights.
    device: "auto", "cpu", "cuda", "cuda:N" or "emu".
    """

    def __init__(
        self, path: Optional[Union[str, os.PathLike[str]]] = None, device: str = "auto"
    ) -> None: ...
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
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
    ) -> npt.NDArray[np.uint8]:
        """Sample one image per label: uint8 array (N, H, W, 3), RGB, channels last."""
        ...
    @property
    def num_classes(self) -> int: ...
    @property
    def image_size(self) -> int: ...
    @property
    def scale_sizes(self) -> list[int]: ...
    @property
    def device(self) -> str: ...
