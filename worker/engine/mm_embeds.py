"""Precomputed image embeddings into `generate`, in place of the vision encoder.

transformers (5.x) takes encoder outputs computed elsewhere through
`generate(..., mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=...)})`:
Qwen2-VL's forward then scatters them into the image-token positions of
the text embeddings exactly as it does with its own vision tower's output,
and builds M-RoPE positions from `input_ids`, `image_grid_thw` and
`mm_token_type_ids` as usual, left padding included. So a prepared request
carries `image_embeds` (tokens, hidden) beside `image_grid_thw`, and after
collating (embeddings concatenated in request order, like pixel_values)
this turns them into that keyword.
"""

from __future__ import annotations

from typing import Any


def with_image_embeds(batch: dict[str, Any]) -> dict[str, Any]:
    """A collated batch with `image_embeds` -> generate kwargs with `mm_encoder_outputs`."""
    embeds = batch.pop("image_embeds", None)
    if embeds is None:
        return batch
    if batch.get("pixel_values") is not None:
        # transformers refuses both for one modality: batch such requests apart.
        raise ValueError("a batch gives images either as pixel_values or as image_embeds, not both")
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    # A tuple of per-image tensors is what get_image_features returns (forward concatenates it);
    # one tensor of all of them, in order, is the same thing.
    output = BaseModelOutputWithPooling(pooler_output=(embeds,))  # type: ignore[arg-type]
    batch["mm_encoder_outputs"] = {"image": output}
    return batch
