"""Turning one step's logits into one token per sequence.

Greedy rows take the argmax together. Sampling rows apply temperature, then
top-k, then top-p (transformers' order) and draw with the request's own
generator, seeded from its `seed`, so a seeded request gives the same text
whatever else shares its batch. While a sequence has fewer than `min_tokens`,
its end-of-sequence and stop tokens are masked out.
"""

from __future__ import annotations

import secrets
from typing import Any

from worker.engine.loader import LoadedModel
from worker.engine.request import SamplingParams


class Sampler:
    def __init__(self, model: LoadedModel) -> None:
        self.device = model.device
        self.eos = list(model.eos_token_ids)

    def generator_for(self, params: SamplingParams) -> Any:
        import torch

        if params.greedy:
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        return generator

    def sample(self, logits: Any, params: list[SamplingParams], seqs: list[Any]) -> list[int]:
        import torch

        # Rows still under min_tokens may not end: ban their EOS/stop tokens, one masked write per ban list.
        bans: dict[tuple[int, ...], list[int]] = {}
        for row, (p, seq) in enumerate(zip(params, seqs, strict=True)):
            if len(seq.tokens) < p.min_tokens:
                banned = tuple(([] if p.ignore_eos else self.eos) + list(p.stop_token_ids))
                if banned:
                    bans.setdefault(banned, []).append(row)
        for banned, rows in bans.items():
            r = torch.tensor(rows, device=logits.device)[:, None]
            c = torch.tensor(banned, device=logits.device)[None, :]
            logits[r, c] = float("-inf")
        out = logits.argmax(dim=-1).tolist()
        for row, (p, seq) in enumerate(zip(params, seqs, strict=True)):
            if not p.greedy:
                out[row] = self._draw(logits[row].float(), p, seq.generator)
        return [int(t) for t in out]

    @staticmethod
    def _draw(logits: Any, p: SamplingParams, generator: Any) -> int:
        import torch

        scores = logits / p.temperature
        if p.top_k:
            kth = torch.topk(scores, min(p.top_k, scores.shape[-1])).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            ordered, index = torch.sort(scores, descending=True)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative - ordered.softmax(-1) > p.top_p  # keep the token that crosses top_p
            scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, index, drop), float("-inf"))
        probs = scores.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=generator))
