from __future__ import annotations

import io

import pytest
from PIL import Image

from shared.errors import MediaError
from tests.conftest import png_bytes
from worker.media.image import decode_image


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def test_rgb_passes_through():
    image = decode_image(png_bytes((1, 2, 3), (5, 7)), max_pixels=10_000)
    assert image.mode == "RGB" and image.size == (5, 7) and image.getpixel((0, 0)) == (1, 2, 3)


def test_transparent_pixels_land_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    image = decode_image(encode(rgba), max_pixels=10_000)
    assert image.mode == "RGB"
    assert image.getpixel((1, 1)) == (255, 255, 255)
    assert image.getpixel((0, 0)) == (0, 0, 255)


def test_palette_with_transparency_and_greyscale():
    palette = Image.new("P", (3, 3), 0)
    palette.info["transparency"] = 0
    assert decode_image(encode(palette), max_pixels=100).getpixel((0, 0)) == (255, 255, 255)
    grey = decode_image(encode(Image.new("L", (2, 2), 128)), max_pixels=100)
    assert grey.getpixel((0, 0)) == (128, 128, 128)


def test_one_pixel_image_decodes():
    assert decode_image(png_bytes((9, 9, 9), (1, 1)), max_pixels=100).size == (1, 1)


def test_pixel_cap_is_checked_from_the_header():
    with pytest.raises(MediaError) as err:
        decode_image(png_bytes((0, 0, 0), (200, 200)), max_pixels=1000, param="messages[0].content[0]")
    assert err.value.code == "image_too_large"
    assert err.value.param == "messages[0].content[0]"


def test_truncated_and_garbage_bytes_are_client_errors_without_internals():
    for data in (png_bytes()[:40], b"\x00" * 100, b""):
        with pytest.raises(MediaError) as err:
            decode_image(data, max_pixels=10_000)
        assert err.value.code == "image_decode_failed"
        assert "/" not in err.value.message and "0x" not in err.value.message


def test_background_colour_is_configurable():
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert decode_image(encode(rgba), max_pixels=100, background=(0, 0, 0)).getpixel((0, 0)) == (0, 0, 0)
    assert decode_image(encode(rgba), max_pixels=100, background=(1, 2, 3)).getpixel((1, 1)) == (1, 2, 3)


def test_extreme_aspect_ratio_is_a_client_error():
    with pytest.raises(MediaError) as err:
        decode_image(png_bytes((0, 0, 0), (400, 1)), max_pixels=10_000)
    assert err.value.code == "image_aspect_ratio"


def test_decompression_bomb_is_refused_before_decoding():
    # A 20000x20000 PNG of one colour is a few kilobytes and would be 1.2 GB of pixels.
    bomb = encode(Image.new("L", (20000, 20000), 0))
    assert len(bomb) < 1_000_000
    with pytest.raises(MediaError) as err:
        decode_image(bomb, max_pixels=40_000_000)
    assert err.value.code == "image_too_large"


def test_formats_that_run_external_programs_are_refused():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(MediaError) as err:
        decode_image(eps, max_pixels=10_000)
    assert err.value.code == "image_decode_failed"
