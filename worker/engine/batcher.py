"""The engine thread: the only code that runs the model.

Task threads `submit` prepared requests and wait on futures. The engine
thread collects the requests that arrive within a short window (up to a
maximum batch), groups those whose sampling can be shared, and runs each
group as one left-padded `generate` call (dynamic micro-batching). A failing
batch is retried one request at a time, so one bad request cannot fail its
neighbours.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from typing import Any

from worker.engine.loader import LoadedModel
from worker.engine.mm_embeds import with_image_embeds
from worker.engine.request import Generation, PreparedRequest

log = logging.getLogger(__name__)

_STOP = object()


class BatchingEngine:
    # image_embeds go to generate as mm_encoder_outputs (worker/engine/mm_embeds.py).
    accepts_image_embeds = True

    def __init__(self, model: LoadedModel, *, max_batch_size: int = 32, batch_window_ms: float = 5.0) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.batch_window = batch_window_ms / 1000.0
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="vlmq-engine", daemon=True)
        # Counters read by tests, metrics and benchmarks.
        self.generate_calls = 0
        self.requests_served = 0

    def start(self) -> BatchingEngine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=30)

    def submit(self, request: PreparedRequest) -> Future[Generation]:
        future: Future[Generation] = Future()
        self._queue.put((request, future))
        return future

    def generate(self, request: PreparedRequest) -> Generation:
        return self.submit(request).result()

    # --- engine thread --------------------------------------------------------

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            deadline = time.monotonic() + self.batch_window
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=max(remaining, 0)) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self._queue.put(_STOP)
                    break
                batch.append(item)
            groups: dict[tuple[Any, ...], list[tuple[PreparedRequest, Future[Generation]]]] = defaultdict(list)
            for request, future in batch:
                if not future.set_running_or_notify_cancel():
                    continue
                reason = request.should_stop()
                if reason:
                    future.set_result(self._finish(request, [], "", 1, 0.0, stopped=reason))
                    continue
                # transformers takes images as pixels or as embeddings per call, never both.
                key = (*request.params.batch_key(), "image_embeds" in request.inputs)
                groups[key].append((request, future))
            for group in groups.values():
                self._run_group(group)

    def _run_group(self, group: list[tuple[PreparedRequest, Future[Generation]]]) -> None:
        try:
            results = self._generate([r for r, _ in group])
        except Exception as exc:
            if len(group) == 1:
                log.exception("generation failed")
                group[0][1].set_exception(exc)
                return
            log.warning("batch of %d failed (%s); running its requests one by one", len(group), exc)
            for item in group:
                self._run_group([item])
            return
        for (_, future), result in zip(group, results, strict=True):
            future.set_result(result)

    def _generate(self, requests: list[PreparedRequest]) -> list[Generation]:
        import torch

        started = time.perf_counter()
        batch = with_image_embeds(collate(requests, self.model.pad_token_id, self.model.device))
        params = requests[0].params
        max_new = max(r.params.max_new_tokens for r in requests)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "do_sample": not params.greedy,
            "pad_token_id": self.model.pad_token_id,
            "eos_token_id": None if params.ignore_eos else (self.model.eos_token_ids or None),
            "min_new_tokens": params.min_tokens or None,
        }
        if params.greedy:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
            if params.seed is not None:
                torch.manual_seed(params.seed)
        prompt_len = batch["input_ids"].shape[1]
        watch = _StepWatch(requests, prompt_len)
        with torch.inference_mode():
            output = self.model.model.generate(**batch, **kwargs, stopping_criteria=[watch])
        self.generate_calls += 1
        self.requests_served += len(requests)
        elapsed_ms = (time.perf_counter() - started) * 1000
        batch_id = secrets.token_hex(6)
        return [
            self._finish(
                request,
                output[row, prompt_len : prompt_len + watch.lengths[row]].tolist(),
                batch_id,
                len(requests),
                elapsed_ms,
                stopped=watch.stopped[row],
            )
            for row, request in enumerate(requests)
        ]

    def _finish(
        self,
        request: PreparedRequest,
        tokens: list[int],
        batch_id: str,
        batch_size: int,
        elapsed_ms: float,
        stopped: str | None = None,
    ) -> Generation:
        params = request.params
        tokens = tokens[: params.max_new_tokens]
        finish = stopped or "length"
        eos = () if params.ignore_eos else self.model.eos_token_ids
        for i, token in enumerate(tokens):
            if i >= params.min_tokens and token in eos:
                tokens, finish = tokens[:i], "stop"
                break
            if i >= params.min_tokens and token in params.stop_token_ids:
                tokens, finish = tokens[: i + 1], "stop"  # vLLM keeps the stop token in the count
                break
        tokenizer = self.model.tokenizer
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if request.params.stop:
            cut = truncate_at_stop(tokenizer, tokens, request.params.stop)
            if cut is not None:
                tokens, text = cut
                finish = "stop"
        return Generation(
            token_ids=tokens,
            text=text,
            finish_reason=finish,
            prompt_tokens=request.prompt_tokens,
            batch_id=batch_id,
            batch_size=batch_size,
            inference_ms=elapsed_ms,
        )


class _StepWatch:
    """A stopping criterion run after every decode step of a batched generate.

    It ends rows whose request reached its own max_tokens, was cancelled or
    passed its deadline (generate's own max_new_tokens is the batch's
    largest), and publishes each request's progress.
    """

    def __init__(self, requests: list[PreparedRequest], prompt_len: int) -> None:
        self.requests = requests
        self.prompt_len = prompt_len
        self.lengths = [r.params.max_new_tokens for r in requests]
        self.stopped: list[str | None] = [None] * len(requests)
        self._done = [False] * len(requests)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        generated = input_ids.shape[1] - self.prompt_len
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row, request in enumerate(self.requests):
            if self._done[row]:
                done[row] = True
                continue
            request.progress = generated
            reason = request.should_stop()
            params = request.params
            last = int(input_ids[row, -1])
            hit_stop_token = generated > params.min_tokens and last in params.stop_token_ids
            if reason or hit_stop_token or generated >= params.max_new_tokens:
                self._done[row] = True
                self.stopped[row] = reason
                self.lengths[row] = generated
                done[row] = True
        return done


def truncate_at_stop(tokenizer: Any, tokens: list[int], stops: tuple[str, ...]) -> tuple[list[int], str] | None:
    """Cut at the first stop string (excluded from the text, as OpenAI does).

    Returns the tokens up to and including the one that completed the stop
    string, and the text before it; None when no stop string occurs.
    """
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if not hits:
        return None
    cut = min(hits)
    for n in range(1, len(tokens) + 1):
        prefix = tokenizer.decode(tokens[:n], skip_special_tokens=True)
        if any(s in prefix for s in stops):
            return tokens[:n], text[:cut]
    return tokens, text[:cut]


# Inputs with one value per prompt token, left-padded; every other tensor (pixels,
# grids, audio features, embeddings) is stacked along dim 0 in request order.
PER_TOKEN_KEYS = frozenset({"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"})


def collate(requests: list[PreparedRequest], pad_token_id: int, device: Any) -> dict[str, Any]:
    """Left-pad the prompts into one batch and stack the media tensors in order."""
    import torch

    length = max(r.prompt_tokens for r in requests)
    size = len(requests)
    first = requests[0].inputs
    input_ids = torch.full((size, length), pad_token_id, dtype=first["input_ids"].dtype)
    attention_mask = torch.zeros((size, length), dtype=first["attention_mask"].dtype)
    padded: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    present = {k for r in requests for k in r.inputs}
    per_token = sorted((PER_TOKEN_KEYS - {"input_ids", "attention_mask"}) & present)
    for key in per_token:
        dtype = next(r.inputs[key].dtype for r in requests if key in r.inputs)
        padded[key] = torch.zeros((size, length), dtype=dtype)
    for row, request in enumerate(requests):
        n = request.prompt_tokens
        input_ids[row, length - n :] = request.inputs["input_ids"][0]
        attention_mask[row, length - n :] = request.inputs["attention_mask"][0]
        for key in per_token:
            if key in request.inputs:
                padded[key][row, length - n :] = request.inputs[key][0]
    stacked_keys = {k for r in requests for k in r.inputs} - set(padded)
    for key in stacked_keys:
        parts = [r.inputs[key] for r in requests if r.inputs.get(key) is not None]
        if parts:
            padded[key] = torch.cat(parts, dim=0)
    return {k: v.to(device) for k, v in padded.items()}
