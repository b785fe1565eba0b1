"""checkergen: sample Progressive Checkerboard multiscale autoregressive image models.

    >>> import checkergen
    >>> model = checkergen.Model()            # tiny preset, random weights; Model(path) for a file
    >>> images = model.sample([0, 1], steps_per_scale=1, seed=0)
    >>> images.shape, images.dtype
    ((2, 256, 256, 3), dtype('uint8'))

The engine is Rust (CPU f32 reference or CUDA); see help(checkergen.Model).
"""

from ._checkergen import CheckergenError, Model, __version__

__all__ = ["CheckergenError", "Model", "__version__"]
