"""Processor loading that works without torchvision, video included.

Qwen2-VL's stock video processor is built on torchvision; on a host without
it the processor cannot even load. `FramesQwen2VLProcessor` replaces that
slot with `QwenVideoFrames`: frames already decoded by PyAV go through the
PIL image processor's own resize, rescale and normalize (so a video frame
is preprocessed exactly like an image), then are cut into patches in the
layout of `Qwen2VLVideoProcessor.patchify`: frames in pairs
(`temporal_patch_size`), 14-pixel patches, 2x2 merge blocks, producing
`pixel_values_videos` (patches, 3*2*14*14) and `video_grid_thw`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from transformers import BatchFeature, Qwen2VLProcessor

VIDEO_CONFIG = "video_preprocessor_config.json"
# Qwen2VLVideoProcessor's defaults, used when a checkpoint has no video config.
DEFAULT_VIDEO_SIZE = {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}


class QwenVideoFrames:
    """Qwen2-VL video preprocessing on decoded frames (numpy, channels last, uint8)."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(
        self,
        image_processor: Any,
        *,
        size: dict[str, int] | None = None,
        temporal_patch_size: int | None = None,
    ) -> None:
        from transformers.image_utils import SizeDict

        self.image_processor = image_processor
        self.patch_size = int(image_processor.patch_size)
        self.merge_size = int(image_processor.merge_size)
        self.temporal_patch_size = int(temporal_patch_size or image_processor.temporal_patch_size)
        size = size or DEFAULT_VIDEO_SIZE
        self.size = SizeDict(shortest_edge=size["shortest_edge"], longest_edge=size["longest_edge"])

    @classmethod
    def for_checkpoint(cls, path: Path, image_processor: Any) -> QwenVideoFrames:
        config_file = Path(path) / VIDEO_CONFIG
        if not config_file.is_file():
            return cls(image_processor)
        config = json.loads(config_file.read_text())
        size = dict(config.get("size") or DEFAULT_VIDEO_SIZE)
        if config.get("min_pixels"):
            size["shortest_edge"] = config["min_pixels"]
        if config.get("max_pixels"):
            size["longest_edge"] = config["max_pixels"]
        return cls(image_processor, size=size, temporal_patch_size=config.get("temporal_patch_size"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "video_processor_type": "Qwen2VLVideoProcessor",
            "size": {"shortest_edge": self.size.shortest_edge, "longest_edge": self.size.longest_edge},
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "image_mean": list(self.image_processor.image_mean),
            "image_std": list(self.image_processor.image_std),
            "do_sample_frames": False,
            "cap_pixels_per_frame": False,
        }

    def frame_pixels(self, frame: np.ndarray) -> np.ndarray:
        """One (H, W, 3) uint8 frame -> resized, rescaled, normalized (3, H', W') float32."""
        ip = self.image_processor
        image = np.ascontiguousarray(frame.transpose(2, 0, 1))
        image = ip.resize(image, size=self.size, resample=ip.resample, factor=self.patch_size * self.merge_size)
        image = ip.rescale(image, ip.rescale_factor)
        image = ip.normalize(image, ip.image_mean, ip.image_std)
        return np.asarray(image, dtype=np.float32)

    def patchify(self, video: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """(T, C, H, W) -> (grid_t*grid_h*grid_w, C*tp*p*p), as Qwen2VLVideoProcessor.patchify lays it out."""
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -video.shape[0] % tp:
            # An odd frame count: repeat the last frame, as the stock processor does.
            video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
        frames, channels, height, width = video.shape
        grid_t, grid_h, grid_w = frames // tp, height // p, width // p
        patches = video.reshape(grid_t, tp, channels, grid_h // m, m, p, grid_w // m, m, p)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return patches.reshape(grid_t * grid_h * grid_w, channels * tp * p * p), (grid_t, grid_h, grid_w)

    def __call__(self, videos: Any, return_tensors: str | None = "pt", **_: Any) -> BatchFeature:
        all_patches, grids = [], []
        for video in videos:
            frames = np.stack([self.frame_pixels(frame) for frame in np.asarray(video)])
            patches, grid = self.patchify(frames)
            all_patches.append(patches)
            grids.append(grid)
        data = {
            "pixel_values_videos": np.concatenate(all_patches, axis=0),
            "video_grid_thw": np.array(grids, dtype=np.int64),
        }
        return BatchFeature(data=data, tensor_type=return_tensors)


class FramesQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor with `QwenVideoFrames` in the video slot (no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        frames = kwargs.pop("video_processor", None)
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
        self.video_processor = frames if isinstance(frames, QwenVideoFrames) else QwenVideoFrames(image_processor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        processor.video_processor = QwenVideoFrames.for_checkpoint(
            Path(pretrained_model_name_or_path), processor.image_processor
        )
        return processor

    def save_pretrained(self, save_directory, **kwargs):
        saved = super().save_pretrained(save_directory, **kwargs)
        # The stock video processor's config: a host with torchvision loads the same sizes.
        (Path(save_directory) / VIDEO_CONFIG).write_text(json.dumps(self.video_processor.to_dict(), indent=2))
        return saved
