"""Embedding bytes -> checked tensors, never unpickling anything.

Pure: no I/O. A tensor arrives as the bytes of `torch.save` (read with
`torch.load(weights_only=True)`, which refuses every pickled global but
tensors and plain containers) or of a `.npy` file (read with
`allow_pickle=False`). Anything else is refused before a loader sees it.
Shapes and dtypes are checked against the model here, so a wrong shape is
the client's error and never reaches the GPU.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from shared.errors import MediaError

_ZIP = b"PK\x03\x04"  # torch.save's format since 1.6
_NPY = b"\x93NUMPY"


@dataclass
class ImageEmbeds:
    embeds: Any  # torch.Tensor (tokens, hidden)
    grid_thw: Any | None  # torch.Tensor (1, 3) int64, for models that place images on a grid

    @property
    def tokens(self) -> int:
        return int(self.embeds.shape[0])


def load_tensor(data: bytes, *, name: str, param: str | None) -> Any:
    import numpy as np
    import torch

    def refused(why: str) -> MediaError:
        return MediaError(f"'{name}' is not a usable tensor: {why}.", param=param, code="invalid_embeds")

    if data.startswith(_NPY):
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:
            raise refused(f"unreadable .npy ({type(exc).__name__})") from None
        if array.dtype.kind not in "fiub":
            raise refused(f"dtype {array.dtype} is not numeric")
        return torch.from_numpy(np.ascontiguousarray(array))
    if data.startswith(_ZIP):
        try:
            tensor = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as exc:
            # weights_only refuses a pickle that would run code; say so without its text.
            raise refused(f"torch.load refused it ({type(exc).__name__})") from None
        if not isinstance(tensor, torch.Tensor):
            raise refused(f"it holds a {type(tensor).__name__}, not a tensor")
        if tensor.layout != torch.strided or tensor.is_quantized:
            raise refused("only dense tensors are accepted")
        return tensor
    raise refused("send the bytes of torch.save or of a .npy file, base64-encoded")


def decode_image_embeds(
    tensors: dict[str, bytes],
    *,
    hidden_size: int,
    merge_size: int | None,
    max_tokens: int,
    param: str | None = None,
) -> ImageEmbeds:
    """One image's embeddings, `(tokens, hidden)` or `(1, tokens, hidden)`.

    `merge_size` set means the model places images on a grid (Qwen2-VL):
    then `image_grid_thw` is required and must account for every token.
    """
    import torch

    unknown = set(tensors) - {"image_embeds", "image_grid_thw"}
    if unknown:
        raise MediaError(
            f"Unknown embedding tensors {sorted(unknown)}; this model takes image_embeds"
            + (" and image_grid_thw." if merge_size else "."),
            param=param,
            code="invalid_embeds",
        )
    embeds = load_tensor(tensors["image_embeds"], name="image_embeds", param=param)
    if embeds.dim() == 3 and embeds.shape[0] == 1:
        embeds = embeds[0]
    if embeds.dim() != 2:
        raise MediaError(
            f"image_embeds has shape {tuple(embeds.shape)}; "
            f"expected (tokens, {hidden_size}) or (1, tokens, {hidden_size}).",
            param=param,
            code="invalid_embeds_shape",
        )
    tokens, width = int(embeds.shape[0]), int(embeds.shape[1])
    if width != hidden_size:
        raise MediaError(
            f"image_embeds has hidden size {width}; this model's is {hidden_size}.",
            param=param,
            code="invalid_embeds_shape",
        )
    if tokens < 1 or tokens > max_tokens:
        raise MediaError(
            f"image_embeds has {tokens} tokens; between 1 and {max_tokens} are accepted.",
            param=param,
            code="invalid_embeds_shape",
        )
    if not embeds.is_floating_point():
        raise MediaError(
            f"image_embeds has dtype {embeds.dtype}; send floating point.", param=param, code="invalid_embeds"
        )
    if not torch.isfinite(embeds).all():
        raise MediaError("image_embeds holds NaN or infinite values.", param=param, code="invalid_embeds")

    grid = None
    if merge_size:
        if "image_grid_thw" not in tensors:
            raise MediaError(
                "This model needs image_grid_thw beside image_embeds (its positions depend on the grid).",
                param=param,
                code="invalid_embeds",
            )
        grid = load_tensor(tensors["image_grid_thw"], name="image_grid_thw", param=param)
        if grid.is_floating_point() or grid.numel() != 3:
            raise MediaError(
                f"image_grid_thw must be 3 integers (t, h, w); got shape {tuple(grid.shape)} of {grid.dtype}.",
                param=param,
                code="invalid_embeds_shape",
            )
        grid = grid.reshape(1, 3).to(torch.int64)
        t, h, w = (int(v) for v in grid[0])
        if min(t, h, w) < 1 or h % merge_size or w % merge_size:
            raise MediaError(
                f"image_grid_thw ({t}, {h}, {w}) is not a grid of this model (h and w multiples of {merge_size}).",
                param=param,
                code="invalid_embeds_shape",
            )
        if t * h * w // merge_size**2 != tokens:
            raise MediaError(
                f"image_grid_thw ({t}, {h}, {w}) stands for {t * h * w // merge_size**2} tokens, "
                f"but image_embeds has {tokens}.",
                param=param,
                code="invalid_embeds_shape",
            )
    elif "image_grid_thw" in tensors:
        raise MediaError("This model takes no image_grid_thw.", param=param, code="invalid_embeds")
    return ImageEmbeds(embeds=embeds.contiguous(), grid_thw=grid)
