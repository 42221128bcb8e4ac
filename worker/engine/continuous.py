"""Continuous batching for the Qwen2-VL family (Qwen2-VL, Qwen2.5-VL).

One scheduler thread owns the device. Each turn of its loop it

1. admits waiting requests while a KV slot is free (admission control:
   requests that do not fit wait; one that could never fit fails clearly),
2. runs the vision encoder once for all newly admitted images and videos,
3. prefills each admitted prompt through the model's own language model
   (so M-RoPE positions and the first token are exactly transformers'),
   copying its keys and values into the request's slot of a preallocated
   cache,
4. runs one decode step for every active sequence together, and
5. retires finished sequences at once, freeing their slots.

Generated text tokens use the same position on all three M-RoPE axes, so in
decode M-RoPE collapses to ordinary RoPE at a per-sequence offset (the
prompt's largest position + 1 + steps). The decode step is our own loop over
the model's layers, reusing its weights: grouped-query attention reads the
slot cache directly (query heads folded per KV head, so repeated K/V are
never materialised) over a length bucket, and on CUDA each (batch, length)
bucket is captured once as a CUDA graph and replayed.

Active sequences always occupy slots 0..n-1 (a finished sequence's hole is
filled by moving the last one into it), so a batch of n is a prefix view of
the cache and needs no gather.
"""

from __future__ import annotations

import logging
import math
import queue
import secrets
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from shared.errors import InvalidRequestError
from worker.engine.loader import LoadedModel
from worker.engine.request import Generation, PreparedRequest
from worker.engine.sampling import Sampler
from worker.media_cache import ItemCache

log = logging.getLogger(__name__)

QWEN_VL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl"})
BATCH_BUCKETS = (
    *(1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512),
    *(640, 768, 896, 1024, 1280, 1536, 1792, 2048),
)
_STOP = object()


def supports_continuous(model: LoadedModel) -> bool:
    return getattr(model.model.config, "model_type", None) in QWEN_VL_TYPES


@dataclass(eq=False)
class _Sequence:
    request: PreparedRequest
    future: Future[Generation]
    slot: int
    length: int  # tokens in the cache
    position: int  # rope position of the next token fed
    admitted_at: float
    wave: str
    tokens: list[int] = field(default_factory=list)
    generator: Any = None
    max_batch: int = 1
    finish: str | None = None


class EncoderCache(ItemCache):
    """Vision-encoder outputs by media key, least recently used out first, under a byte budget."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes, size=lambda tensor: tensor.numel() * tensor.element_size())


class SlotCache:
    """Keys and values for `slots` sequences of up to `max_len` tokens, per layer."""

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype: Any, device: Any):
        import torch

        shape = (layers, slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = slots
        self.max_len = max_len

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
        return 2 * layers * kv_heads * head_dim * dtype_bytes

    def write_prompt(self, slot: int, past_key_values: Any, length: int, row: int = 0) -> None:
        for i, layer in enumerate(past_key_values.layers):
            self.k[i, slot, :, :length] = layer.keys[row, :, :length]
            self.v[i, slot, :, :length] = layer.values[row, :, :length]

    def write_prompts(self, past_key_values: Any, placed: list[tuple[int, int, int]]) -> None:
        """Copy a packed prefill's rows into their slots; one copy per layer when rows and slots line up."""
        rows = [r for r, _, _ in placed]
        slots = [s for _, s, _ in placed]
        contiguous = rows == list(range(rows[0], rows[0] + len(rows))) and slots == list(
            range(slots[0], slots[0] + len(slots))
        )
        if not contiguous:
            for row, slot, length in placed:
                self.write_prompt(slot, past_key_values, length, row)
            return
        longest = max(length for _, _, length in placed)
        # Right padding beyond a row's length lands past its end: never read (masked), then overwritten.
        r0, s0, n = rows[0], slots[0], len(rows)
        for i, layer in enumerate(past_key_values.layers):
            self.k[i, s0 : s0 + n, :, :longest] = layer.keys[r0 : r0 + n, :, :longest]
            self.v[i, s0 : s0 + n, :, :longest] = layer.values[r0 : r0 + n, :, :longest]

    def move(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


class ContinuousEngine:
    # Precomputed image embeddings stand in for the vision encoder's output (see _encode_media).
    accepts_image_embeds = True

    def __init__(
        self,
        model: LoadedModel,
        *,
        max_batch_size: int = 64,
        max_model_len: int = 0,
        gpu_memory_fraction: float = 0.9,
        cuda_graphs: bool = True,
        max_prefills_per_step: int = 64,
        prefill_tokens: int = 16384,
        encoder_cache_bytes: int = 1024**3,
    ) -> None:
        import torch

        if not supports_continuous(model):
            raise ValueError(f"continuous batching serves {sorted(QWEN_VL_TYPES)}, not this model")
        self.model = model
        root = model.model
        self.vl = root.model  # Qwen2VLModel: .visual, .language_model, get_rope_index
        self.lm = self.vl.language_model
        self.lm_head = root.lm_head
        cfg = self.lm.config
        self.image_token_id = root.config.image_token_id
        self.video_token_id = root.config.video_token_id
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layers = list(self.lm.layers)
        self.device = model.device
        self.dtype = model.dtype
        rotary = self.lm.rotary_emb
        self.inv_freq = rotary.inv_freq.to(device=self.device, dtype=torch.float32)
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))

        self.max_len = min(max_model_len or 4096, model.max_context)
        per_token = SlotCache.bytes_per_token(len(self.layers), self.kv_heads, self.head_dim, self._dtype_bytes())
        self.slots = self._size_slots(max_batch_size, per_token, gpu_memory_fraction)
        self.cache = SlotCache(
            len(self.layers), self.slots, self.kv_heads, self.max_len, self.head_dim, self.dtype, self.device
        )
        self.encoder_cache = EncoderCache(encoder_cache_bytes)
        self.max_prefills_per_step = max_prefills_per_step
        self.prefill_tokens = prefill_tokens
        from worker.engine import vision

        vision.install(self.vl.visual)
        self.sampler = Sampler(model)
        self.graphs = _DecodeGraphs(self, enabled=cuda_graphs and self.device.type == "cuda")

        self._inbox: queue.Queue[Any] = queue.Queue()
        self._waiting: deque[tuple[PreparedRequest, Future[Generation]]] = deque()
        self._active: list[_Sequence] = []
        self._thread = threading.Thread(target=self._loop, name="vlmq-engine", daemon=True)
        # Counters read by tests, metrics and benchmarks.
        self.decode_steps = 0
        self.prefills = 0
        self.vision_calls = 0
        self.vision_items = 0
        self.requests_served = 0
        self.vision_s = self.prefill_s = self.decode_s = 0.0

    # --- sizing -----------------------------------------------------------------

    def _dtype_bytes(self) -> int:
        import torch

        return torch.tensor([], dtype=self.dtype).element_size()

    def _size_slots(self, wanted: int, per_token: int, fraction: float) -> int:
        import torch

        per_slot = per_token * self.max_len
        if self.device.type != "cuda":
            return wanted
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        # What the budget leaves after weights, minus room for activations and graphs.
        budget = fraction * total - used - 2 * 1024**3
        fit = int(budget // per_slot)
        if fit < 1:
            raise RuntimeError(
                f"VLMQ_GPU_MEMORY_FRACTION={fraction} leaves no room for one {self.max_len}-token KV slot "
                f"({per_slot / 1024**2:.0f} MiB); raise it or lower VLMQ_MAX_MODEL_LEN"
            )
        slots = min(wanted, fit)
        log.info("KV cache: %d slots x %d tokens (%.1f GiB)", slots, self.max_len, slots * per_slot / 1024**3)
        return slots

    # --- the public face (same as BatchingEngine) -----------------------------------

    @property
    def generate_calls(self) -> int:
        return self.decode_steps

    def start(self) -> ContinuousEngine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._inbox.put(_STOP)
        self._thread.join(timeout=30)

    def submit(self, request: PreparedRequest) -> Future[Generation]:
        future: Future[Generation] = Future()
        needed = request.prompt_tokens + request.params.max_new_tokens
        if needed > self.max_len:
            future.set_exception(
                InvalidRequestError(
                    f"The prompt ({request.prompt_tokens} tokens) plus max_tokens ({request.params.max_new_tokens}) "
                    f"exceeds this worker's {self.max_len}-token limit per request (VLMQ_MAX_MODEL_LEN).",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            )
            return future
        self._inbox.put((request, future))
        return future

    def generate(self, request: PreparedRequest) -> Generation:
        return self.submit(request).result()

    # --- the scheduler ----------------------------------------------------------------

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                if not self._pull():
                    return
                try:
                    self._admit()
                    if self._active:
                        self._decode()
                except Exception as exc:  # a bug or a device error: fail what is in flight, keep serving
                    log.exception("engine step failed")
                    for seq in self._active:
                        if not seq.future.done():
                            seq.future.set_exception(exc)
                    self._active.clear()

    def _pull(self) -> bool:
        """Move submissions into the waiting line; block only when there is nothing to do."""
        block = not self._active and not self._waiting
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if item is _STOP:
                for _, future in self._waiting:
                    future.cancel()
                return False
            request, future = item
            if future.set_running_or_notify_cancel():
                self._waiting.append((request, future))
            block = False

    def _admit(self) -> None:
        admitted: list[tuple[PreparedRequest, Future[Generation]]] = []
        while self._waiting and len(self._active) + len(admitted) < self.slots:
            if len(admitted) >= self.max_prefills_per_step:
                break
            request, future = self._waiting.popleft()
            reason = request.should_stop()
            if reason:
                future.set_result(self._result(request, [], reason, time.perf_counter(), "", 0))
                continue
            admitted.append((request, future))
        if admitted:
            self._prefill(admitted)

    def _prefill(self, admitted: list[tuple[PreparedRequest, Future[Generation]]]) -> None:
        import torch

        wave = secrets.token_hex(6)
        started = time.perf_counter()
        features = self._encode_media([r for r, _ in admitted])
        self.vision_s += time.perf_counter() - started
        started = time.perf_counter()
        groups: list[list[tuple[PreparedRequest, Future[Generation], dict[str, Any]]]] = [[]]
        budget = 0
        for (request, future), feats in zip(admitted, features, strict=True):
            if groups[-1] and budget + request.prompt_tokens > self.prefill_tokens:
                groups.append([])
                budget = 0
            groups[-1].append((request, future, feats))
            budget += request.prompt_tokens
        logits_rows, new = [], []
        for group in groups:
            try:
                outputs = self._prefill_group(group)
            except Exception as exc:
                if len(group) > 1:  # find the one that breaks it; the rest go on
                    outputs = []
                    for item in group:
                        try:
                            outputs.extend(self._prefill_group([item]))
                        except Exception as single:
                            log.warning("prefill failed: %s", single)
                            item[1].set_exception(single)
                            outputs.append(None)
                else:
                    log.warning("prefill failed: %s", exc)
                    group[0][1].set_exception(exc)
                    continue
            placed: dict[int, tuple[Any, list[tuple[int, int, int]]]] = {}  # cache -> [(row, slot, length)]
            for (request, future, _), out in zip(group, outputs, strict=True):
                if out is None:
                    continue
                logits, length, position, cache, row = out
                seq = _Sequence(request, future, len(self._active), length, position, started, wave)
                placed.setdefault(id(cache), (cache, []))[1].append((row, seq.slot, length))
                seq.generator = self.sampler.generator_for(request.params)
                self._active.append(seq)
                logits_rows.append(logits)
                new.append(seq)
                self.prefills += 1
            for cache, rows in placed.values():
                self.cache.write_prompts(cache, rows)
        if new:
            tokens = self.sampler.sample(torch.cat(logits_rows), [s.request.params for s in new], new)
            self.prefill_s += time.perf_counter() - started
            self._advance(new, tokens)
            self._retire()

    def _encode_media(self, requests: list[PreparedRequest]) -> list[dict[str, Any]]:
        """Encoder outputs per request and modality: cached ones reused, the rest in one vision pass.

        Items whose key is in the encoder cache skip the vision tower; every other
        image (and, separately, every video) of every admitted request is encoded
        together. A request that brings `image_embeds` skips the encoder: they are
        its output.
        """
        import torch

        out: list[dict[str, Any]] = [{} for _ in requests]
        for i, request in enumerate(requests):
            if request.inputs.get("image_embeds") is not None:
                out[i]["image"] = request.inputs["image_embeds"].to(self.device)
        merge = self.vl.visual.spatial_merge_size**2
        for kind, pixels_key, grid_key in (
            ("image", "pixel_values", "image_grid_thw"),
            ("video", "pixel_values_videos", "video_grid_thw"),
        ):
            items: dict[int, list[Any]] = {}
            todo: list[tuple[int, int, str | None, Any, Any]] = []  # request, item, key, pixels, grid
            for i, request in enumerate(requests):
                pixels = request.inputs.get(pixels_key)
                if pixels is None:
                    continue
                grids = request.inputs[grid_key]
                keys = request.media_keys.get(kind) or []
                found: list[Any] = []
                start = 0
                for j, count in enumerate(grids.prod(-1).tolist()):
                    key = keys[j] if j < len(keys) else None
                    cached = self.encoder_cache.get(key) if key else None
                    found.append(cached)
                    if cached is not None and key:
                        request.encoder_hits.add(key)
                    else:
                        todo.append((i, j, key, pixels[start : start + count], grids[j : j + 1]))
                    start += count
                items[i] = found
            if todo:
                pixels = torch.cat([t[3] for t in todo]).to(self.device, self.vl.visual.dtype)
                grids = torch.cat([t[4] for t in todo]).to(self.device)
                merged = self.vl.visual(pixels, grid_thw=grids).pooler_output
                self.vision_calls += 1
                self.vision_items += len(todo)
                sizes = [int(t[4].prod()) // merge for t in todo]
                for (i, j, key, _, _), features in zip(todo, torch.split(merged, sizes), strict=True):
                    items[i][j] = features
                    if key:
                        self.encoder_cache.put(key, features)
            for i, found in items.items():
                out[i][kind] = torch.cat(found)
        return out

    def _embed(self, request: PreparedRequest, feats: dict[str, Any]) -> tuple[Any, Any]:
        """The prompt's input embeddings (media features in place) and its 3-D M-RoPE positions."""
        import torch

        host = request.inputs
        length = host["input_ids"].shape[1]
        if "image_grid_thw" in host or "video_grid_thw" in host:
            # On the host copies: get_rope_index walks the tokens in Python, and on the device
            # every step of that walk would be a synchronisation.
            rope_kwargs = {
                k: host[k].cpu() for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in host
            }
            mm_types = host.get("mm_token_type_ids")
            positions, _ = self.vl.get_rope_index(
                host["input_ids"].cpu(),
                mm_types.cpu() if mm_types is not None else None,
                attention_mask=host["attention_mask"].cpu() if "attention_mask" in host else None,
                **rope_kwargs,
            )
            positions = positions.to(self.device)
        else:
            positions = torch.arange(length, device=self.device).view(1, 1, -1).expand(3, 1, -1)
        input_ids = host["input_ids"].to(self.device)
        embeds = self.lm.embed_tokens(input_ids)
        for kind, token_id in (("image", self.image_token_id), ("video", self.video_token_id)):
            if kind in feats:
                mask = (input_ids == token_id).unsqueeze(-1).expand_as(embeds)
                embeds = embeds.masked_scatter(mask, feats[kind].to(embeds.dtype))
        return embeds[0], positions[:, 0]

    def _prefill_group(self, group: list[tuple[PreparedRequest, Any, dict[str, Any]]]) -> list[Any]:
        """Prefill several prompts in one forward of the model's language model (right-padded)."""
        import torch

        embedded = [self._embed(request, feats) for request, _, feats in group]
        lengths = [e.shape[0] for e, _ in embedded]
        longest = max(lengths)
        if len(group) == 1:
            embeds, positions = embedded[0][0][None], embedded[0][1][:, None]
            attention_mask = None
        else:
            hidden = embedded[0][0].shape[-1]
            embeds = torch.zeros((len(group), longest, hidden), dtype=embedded[0][0].dtype, device=self.device)
            positions = torch.zeros((3, len(group), longest), dtype=torch.long, device=self.device)
            attention_mask = torch.zeros((len(group), longest), dtype=torch.long, device=self.device)
            for row, ((e, p), n) in enumerate(zip(embedded, lengths, strict=True)):
                embeds[row, :n], positions[:, row, :n], attention_mask[row, :n] = e, p, 1
        out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, use_cache=True)
        last = torch.tensor([n - 1 for n in lengths], device=self.device)
        logits = self.lm_head(out.last_hidden_state[torch.arange(len(group), device=self.device), last]).float()
        return [
            (logits[row : row + 1], n, int(embedded[row][1].max()) + 1, out.past_key_values, row)
            for row, n in enumerate(lengths)
        ]

    def _decode(self) -> None:
        import torch

        active = self._active
        n = len(active)
        batch = next(b for b in BATCH_BUCKETS if b >= n) if n <= BATCH_BUCKETS[-1] else n
        batch = min(batch, self.slots)
        longest = max(s.length for s in active) + 1
        span = min(self.max_len, max(64, 1 << math.ceil(math.log2(longest))))
        g = self.graphs
        started = time.perf_counter()
        # One host-to-device copy for all three inputs; padding rows write into their own
        # (free) slots at position 0 and are ignored.
        state = [[s.tokens[-1] for s in active], [s.position for s in active], [s.length for s in active]]
        g.state[:, :n].copy_(torch.tensor(state))
        if batch > n:
            g.state[:, n:batch] = 0
        logits = g.run(batch, span)[:n].clone()  # the graph's output buffer is reused next step
        self.decode_steps += 1
        for seq in active:
            seq.length += 1
            seq.position += 1
            seq.max_batch = max(seq.max_batch, n)
        tokens = self.sampler.sample(logits, [s.request.params for s in active], active)
        self.decode_s += time.perf_counter() - started
        self._advance(active, tokens)
        self._retire()

    def _advance(self, seqs: list[_Sequence], tokens: list[int]) -> None:
        tokenizer = self.model.tokenizer
        for seq, token in zip(seqs, tokens, strict=True):
            params = seq.request.params
            seq.tokens.append(token)
            produced = len(seq.tokens)
            seq.request.progress = produced
            if not params.ignore_eos and token in self.model.eos_token_ids:
                seq.tokens.pop()
                seq.finish = "stop"
            elif token in params.stop_token_ids or _hits_stop_string(tokenizer, seq.tokens, params.stop):
                seq.finish = "stop"
            elif produced >= params.max_new_tokens:
                seq.finish = "length"
            elif reason := seq.request.should_stop():
                seq.finish = reason

    def _retire(self) -> None:
        finished = [s for s in self._active if s.finish]
        if not finished:
            return
        for seq in finished:
            self._active.remove(seq)
            self.requests_served += 1
            seq.future.set_result(
                self._result(seq.request, seq.tokens, seq.finish or "stop", seq.admitted_at, seq.wave, seq.max_batch)
            )
        # Keep the active sequences in slots 0..n-1: move each one above the line down into a hole.
        holes = sorted(set(range(len(self._active))) - {s.slot for s in self._active})
        movers = sorted((s for s in self._active if s.slot >= len(self._active)), key=lambda s: s.slot)
        for seq, hole in zip(movers, holes, strict=True):
            self.cache.move(seq.slot, hole, seq.length)
            seq.slot = hole
        self._active.sort(key=lambda s: s.slot)

    def _result(
        self, request: PreparedRequest, tokens: list[int], finish: str, started: float, wave: str, batch: int
    ) -> Generation:
        tokenizer = self.model.tokenizer
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if request.params.stop:
            hits = [i for i in (text.find(s) for s in request.params.stop) if i >= 0]
            if hits:
                text = text[: min(hits)]
        return Generation(
            token_ids=list(tokens),
            text=text,
            finish_reason=finish,
            prompt_tokens=request.prompt_tokens,
            batch_id=wave,
            batch_size=batch,
            inference_ms=(time.perf_counter() - started) * 1000,
        )

    # --- the decode step itself --------------------------------------------------------

    def decode_forward(self, batch: int, span: int) -> Any:
        """One token for rows 0..batch-1, reading and writing the slot cache (graph-capturable)."""
        import torch
        import torch.nn.functional as F

        g = self.graphs
        tokens, positions, lengths = g.tokens[:batch], g.positions[:batch], g.lengths[:batch]
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(self.dtype)[:, None, :]
        sin = (emb.sin() * self.rope_scaling).to(self.dtype)[:, None, :]
        rows = g.rows[:batch]
        visible = (g.span_index[:span][None, :] <= lengths[:, None])[:, None, None, :]
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill(~visible, float("-inf"))
        groups = self.num_heads // self.kv_heads

        x = self.lm.embed_tokens(tokens)[:, None, :]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(batch, self.num_heads, self.head_dim)
            k = attn.k_proj(h).view(batch, self.kv_heads, self.head_dim)
            v = attn.v_proj(h).view(batch, self.kv_heads, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc, vc = self.cache.k[i], self.cache.v[i]
            kc[rows, :, lengths] = k
            vc[rows, :, lengths] = v
            # Fold each KV head's query heads into the query-length axis: plain attention, no repeated K/V.
            q = q.view(batch, self.kv_heads, groups, self.head_dim)
            o = F.scaled_dot_product_attention(q, kc[:batch, :, :span], vc[:batch, :, :span], attn_mask=mask)
            x = x + attn.o_proj(o.reshape(batch, 1, self.num_heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = self.lm.norm(x)
        return self.lm_head(x[:, 0])


def _hits_stop_string(tokenizer: Any, tokens: list[int], stops: tuple[str, ...]) -> bool:
    return bool(stops) and any(s in tokenizer.decode(tokens, skip_special_tokens=True) for s in stops)


def _rotate_half(x: Any) -> Any:
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _DecodeGraphs:
    """Static input buffers for the decode step, and one CUDA graph per (batch, span) bucket."""

    def __init__(self, engine: ContinuousEngine, enabled: bool) -> None:
        import torch

        device = engine.device
        self.engine = engine
        self.enabled = enabled
        self.state = torch.zeros((3, engine.slots), dtype=torch.long, device=device)
        self.tokens, self.positions, self.lengths = self.state[0], self.state[1], self.state[2]
        self.rows = torch.arange(engine.slots, device=device)
        self.span_index = torch.arange(engine.max_len, device=device)
        self._graphs: dict[tuple[int, int], tuple[Any, Any]] = {}
        self._pool = torch.cuda.graph_pool_handle() if enabled else None

    def run(self, batch: int, span: int) -> Any:
        if not self.enabled:
            return self.engine.decode_forward(batch, span)
        key = (batch, span)
        if key not in self._graphs:
            self._graphs[key] = self._capture(batch, span)
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _capture(self, batch: int, span: int) -> tuple[Any, Any]:
        import torch

        # Warm-up runs repeat exactly the write the real step makes (same token at the same
        # position), so running them before capture changes nothing.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.engine.decode_forward(batch, span)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.engine.decode_forward(batch, span)
        log.info("captured decode graph batch=%d span=%d", batch, span)
        return graph, out
