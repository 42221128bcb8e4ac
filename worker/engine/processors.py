"""Processor loading that works without torchvision.

Qwen2-VL's processor declares a video-processor slot whose class needs
torchvision; on a CPU host without it, loading fails. The subclass below
drops that slot (images only) and the loader picks the PIL image backend.
"""

from __future__ import annotations

from transformers import Qwen2VLProcessor


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
