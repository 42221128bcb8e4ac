"""Embedding tensors: torch.save and .npy, checked shapes, and no pickle ever executed."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
import torch

from shared.errors import MediaError
from worker.media.embeds import decode_image_embeds, load_tensor


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def decode(embeds, grid=None, **kwargs):
    tensors = {"image_embeds": embeds}
    if grid is not None:
        tensors["image_grid_thw"] = grid
    options = {"hidden_size": 64, "merge_size": 2, "max_tokens": 4096, "param": "p"}
    options.update(kwargs)
    return decode_image_embeds(tensors, **options)


def test_torch_and_npy_tensors_with_their_grid():
    e = torch.randn(6, 64)
    out = decode(saved(e), saved(torch.tensor([[1, 4, 6]])))
    assert torch.equal(out.embeds, e) and out.grid_thw.tolist() == [[1, 4, 6]] and out.tokens == 6
    out = decode(npy(e.numpy()[None]), npy(np.array([1, 4, 6])))
    assert torch.equal(out.embeds, e) and out.grid_thw.dtype == torch.int64


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/vlmq-pickle-ran"


@pytest.mark.parametrize(
    "payload",
    [
        lambda: saved(Exploit()),  # torch.save of an object that runs code when unpickled
        lambda: saved({"t": torch.zeros(2), "x": Exploit()}),
        lambda: pickle.dumps(Exploit()),  # a bare pickle
        lambda: npy(np.array([Exploit()], dtype=object)),  # an object array
    ],
)
def test_pickle_payloads_never_execute(payload):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    data = payload()
    with pytest.raises(MediaError) as err:
        load_tensor(data, name="image_embeds", param="p")
    assert err.value.code == "invalid_embeds"
    assert not os.path.exists(MARKER)


@pytest.mark.parametrize(
    "embeds, grid, words",
    [
        (torch.randn(6, 32), [1, 4, 6], "hidden size 32"),
        (torch.randn(2, 6, 64), [1, 4, 6], "shape"),
        (torch.randn(6), [1, 4, 6], "shape"),
        (torch.randn(6, 64), [1, 4, 4], "stands for 4 tokens"),
        (torch.randn(6, 64), [1, 3, 8], "multiples of 2"),
        (torch.randn(6, 64), [0, 4, 6], "not a grid"),
        (torch.ones(6, 64, dtype=torch.int32), [1, 4, 6], "floating point"),
        (torch.full((6, 64), float("nan")), [1, 4, 6], "NaN"),
        (torch.randn(6, 64), torch.tensor([1.0, 4.0, 6.0]), "3 integers"),
        (torch.randn(6, 64), None, "needs image_grid_thw"),
    ],
)
def test_wrong_shapes_and_dtypes_are_client_errors(embeds, grid, words):
    grid_bytes = None if grid is None else saved(grid if isinstance(grid, torch.Tensor) else torch.tensor(grid))
    with pytest.raises(MediaError) as err:
        decode(saved(embeds), grid_bytes)
    assert words in err.value.message
    assert err.value.param == "p"


def test_too_many_tokens_and_unknown_tensors():
    with pytest.raises(MediaError):
        decode(saved(torch.randn(16, 64)), saved(torch.tensor([1, 8, 8])), max_tokens=8)
    with pytest.raises(MediaError) as err:
        decode_image_embeds(
            {"image_embeds": saved(torch.randn(6, 64)), "image_sizes": saved(torch.tensor([1]))},
            hidden_size=64,
            merge_size=2,
            max_tokens=100,
        )
    assert "image_sizes" in err.value.message


def test_non_tensor_contents_are_refused():
    for data in (saved({"a": torch.zeros(2)}), saved([1, 2]), b"PK\x03\x04garbage", b"plain text"):
        with pytest.raises(MediaError) as err:
            load_tensor(data, name="image_embeds", param=None)
        assert err.value.code == "invalid_embeds"
