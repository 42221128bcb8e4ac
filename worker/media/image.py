"""Image bytes -> an RGB PIL image, safely.

Pure: no I/O. The pixel cap is checked from the header before any pixel is
decoded, so a small file that expands to gigabytes (a decompression bomb)
is refused cheaply.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

from shared.errors import MediaError

WHITE = (255, 255, 255)
# Raster formats decoded in-process. Not every format Pillow knows: EPS, for
# one, is rendered by running Ghostscript on the bytes.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# Vision processors resize to a fixed patch grid; past this ratio one side
# rounds to nothing (Qwen2-VL's own processor refuses it with a ValueError).
MAX_ASPECT_RATIO = 200


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    background: tuple[int, int, int] = WHITE,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
    param: str | None = None,
) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise MediaError(
                    f"Image is {width}x{height} pixels, over the limit of {max_pixels} pixels.",
                    param=param,
                    code="image_too_large",
                )
            if max(width, height) > max_aspect_ratio * max(1, min(width, height)):
                raise MediaError(
                    f"Image is {width}x{height} pixels: its aspect ratio is over {max_aspect_ratio:g}:1.",
                    param=param,
                    code="image_aspect_ratio",
                )
            image.load()
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MediaError("Image is too large to decode.", param=param, code="image_too_large") from None
    except Exception as exc:
        # The decoder's own message can carry internal details; name only its kind.
        raise MediaError(
            f"Could not decode the image ({type(exc).__name__}); send a valid PNG, JPEG, WebP or GIF.",
            param=param,
            code="image_decode_failed",
        ) from None
    return to_rgb(image, background)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")
