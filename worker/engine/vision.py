"""A faster attention for Qwen2-VL-family vision towers.

transformers' SDPA path runs the vision attention one image at a time (a
Python loop over `cu_seqlens`): at 32 layers that is 32 x images small
kernel launches per batch. Images of one size (the common case: a batch
resized to one resolution) have equal-length chunks, so each run of equal
chunks here is one batched SDPA call. The arithmetic per image is the same;
only the launches are fewer.
"""

from __future__ import annotations

import sys
import types
from typing import Any


def batched_vision_attention(self: Any, hidden_states: Any, cu_seqlens: Any, *args: Any, **kwargs: Any) -> Any:
    import torch
    import torch.nn.functional as F

    position_embeddings = kwargs.get("position_embeddings")
    if position_embeddings is None:
        position_embeddings = next(a for a in args if isinstance(a, tuple))
    rotate = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision
    seq = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = rotate(q, k, cos, sin)
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (heads, seq, dim)
    out = torch.empty_like(q)
    lengths = getattr(self, "_vlmq_lengths", None)
    if lengths is None or len(lengths) != cu_seqlens.shape[0] - 1 or sum(lengths) != seq:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()  # a device sync: the fallback only
    start, i = 0, 0
    while i < len(lengths):
        n, j = lengths[i], i
        while j < len(lengths) and lengths[j] == n:
            j += 1
        count, end = j - i, start + (j - i) * n

        def chunks(t: Any, start: int = start, end: int = end, count: int = count, n: int = n) -> Any:
            return t[:, start:end].reshape(t.shape[0], count, n, t.shape[-1]).transpose(0, 1)

        o = F.scaled_dot_product_attention(chunks(q), chunks(k), chunks(v), scale=self.scaling)
        out[:, start:end] = o.transpose(0, 1).reshape(q.shape[0], end - start, q.shape[-1])
        start, i = end, j
    return self.proj(out.transpose(0, 1).reshape(seq, -1))


def linear_patch_embed(self: Any, hidden_states: Any) -> Any:
    """The patch embedding's Conv3d has stride == kernel: it is one matmul, and runs as one."""
    weight = self.proj.weight
    flat = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)
    return flat @ weight.reshape(weight.shape[0], -1).t()


def install(visual: Any) -> int:
    """Swap in the batched attention on every vision block that has the standard layout,
    and the matmul patch embedding where the Conv3d is bias-free with stride == kernel."""
    embed = getattr(visual, "patch_embed", None)
    conv = getattr(embed, "proj", None)
    if embed is not None and conv is not None and conv.bias is None and tuple(conv.stride) == tuple(conv.kernel_size):
        embed.forward = types.MethodType(linear_patch_embed, embed)
    patched = []
    for block in getattr(visual, "blocks", []):
        attn = getattr(block, "attn", None)
        if attn is not None and all(hasattr(attn, a) for a in ("qkv", "proj", "num_heads", "scaling")):
            attn.forward = types.MethodType(batched_vision_attention, attn)
            patched.append(attn)

    def chunk_lengths(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Chunk lengths from the grid, read once per forward on the host, so the blocks
        # need not each copy cu_seqlens back from the device.
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        lengths = None
        if grid is not None:
            lengths = [h * w for t, h, w in grid.tolist() for _ in range(t)]
        for attn in patched:
            attn._vlmq_lengths = lengths

    if patched:
        visual.register_forward_pre_hook(chunk_lengths, with_kwargs=True)
    return len(patched)
