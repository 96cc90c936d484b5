"""Vision-language MoE batches (Qwen3-VL-MoE): placeholder ids and multimodal prompt encoding.

The models themselves (a tiny one built offline, local loading and saving) live in ``expertrl.vlm_models``, which
imports transformers' Qwen3-VL processing code (~3 s); this module is light, so the rollout imports it freely.

What a rollout needs beyond text (``rollout.encode_prompts``, ``generate_rollout`` and ``policy_forward`` do this):

* ``generate``: every key of ``encode_mm_batch``: ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` (0 text,
  1 image, 2 video; *required* whenever a grid is passed, M-RoPE raises without it), ``pixel_values`` +
  ``image_grid_thw`` and/or ``pixel_values_videos`` + ``video_grid_thw``. Left padding is fine: generate computes
  the 3-D M-RoPE positions with ``get_rope_index(..., attention_mask)``, which skips pads, and caches
  ``model.model.rope_deltas`` for the decode steps.
* ``generate(suppress_tokens=vision_special_ids(model))``: a random or young policy can emit ``<|image_pad|>`` or
  ``<|video_pad|>``; fed back in the replayed forward it is taken for a placeholder and the model raises (vision
  tokens != features). ``output_logits`` stays raw, so the replayed log-probs normalise over the full vocabulary
  in both the old and the new forward (the ratio is unaffected).
* the replayed forward over prompt + completion: the same vision kwargs, ``mm_token_type_ids`` right-padded with 0
  to width S (``extend_mm_token_types``), the full attention mask, ``use_cache=False`` and **no** ``position_ids``.
  The text path's ``position_ids_from_mask`` is wrong here: vision tokens share 3-D positions (t, h, w), so text after
  an image sits at ``max(position) + 1``, not at its index. With ``position_ids=None`` and no cache the model
  recomputes the positions from ``input_ids``/``mm_token_type_ids``/grids/mask, exactly what generate used (the stale
  ``rope_deltas`` cached by generate are ignored when there is no cache). ``mm_forward_kwargs`` builds these.
* vision kwargs are flat over images, not per row: ``pixel_values`` is (sum of patches, C*T*p*p) in row order. A
  micro-batch or ``index_batch`` must slice them with ``index_mm_batch``; concatenating rollouts concatenates them.
* the routing trace is unchanged: (L, B, S-1, K) over every position, vision placeholders included (the routers only
  live in the text decoder; the vision tower is dense). ``moe.guidance.modality_token_groups`` labels the positions
  (vision / text / pad) for per-modality diagnostics and for masks such as ``route(allowed=...)``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from torch import Tensor

from expertrl.mm import VISION_KWARGS, extend_mm_token_types, index_mm_batch, mm_forward_kwargs

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
VISION_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)


def vision_token_ids(processor_or_config) -> set[int]:
    """The placeholder ids the processor expands (``<|image_pad|>``, ``<|video_pad|>``) from a processor, a model or
    a model config. ``<|vision_start|>``/``<|vision_end|>`` and video timestamps are text tokens."""
    obj = getattr(processor_or_config, "config", processor_or_config)
    return {int(obj.image_token_id), int(obj.video_token_id)}


def vision_special_ids(processor_or_config) -> list[int]:
    """All four vision special ids, sorted: pass them as ``generate(suppress_tokens=...)`` so a completion never
    contains a placeholder (a generated ``<|video_pad|>`` makes the replayed forward raise: tokens != features)."""
    obj = getattr(processor_or_config, "config", processor_or_config)
    ids = (obj.image_token_id, obj.video_token_id, obj.vision_start_token_id, obj.vision_end_token_id)
    return sorted(int(i) for i in ids)


def _as_rgb(image, where: str) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    raise TypeError(f"{where} must be a PIL.Image, got {type(image).__name__}; load files with PIL.Image.open")


def _messages(item: dict, where: str) -> list[dict]:
    if "prompt" not in item or not isinstance(item["prompt"], str):
        raise ValueError(f"{where}: needs a string field 'prompt'")
    if "images" in item and "video" in item:
        raise ValueError(f"{where}: give either 'images' or 'video', not both")
    content = [{"type": "image"} for _ in item.get("images", ())]
    if "video" in item:
        content.append({"type": "video"})
    return [{"role": "user", "content": [*content, {"type": "text", "text": item["prompt"]}]}]


def encode_mm_batch(processor, items: list[dict], *, group_size: int = 1) -> dict[str, Tensor]:
    """Left-padded model inputs for multimodal prompts, each item repeated ``group_size`` times (groups contiguous).

    Args:
        processor: a Qwen3-VL processor (``build_tiny_vlm``/``load_vlm``); its chat template renders the prompt.
        items: dicts with ``prompt`` (str) and either ``images`` (list of PIL images, shown before the text) or
            ``video`` (list of PIL frames, at ``item.get("fps", 2.0)`` frames per second), or neither.
        group_size: G.

    Returns:
        ``input_ids``, ``attention_mask`` (B, S) with B = len(items) * G, ``mm_token_type_ids`` (B, S), and
        ``pixel_values`` + ``image_grid_thw`` if any item has images, ``pixel_values_videos`` + ``video_grid_thw``
        if any has a video. Pass them all to ``generate`` and to the forward (see the module docstring).
    """
    assert group_size >= 1, group_size
    texts, images, videos, metadata = [], [], [], []
    for i, item in enumerate(items):
        where = f"items[{i}]"
        text = processor.apply_chat_template([_messages(item, where)], add_generation_prompt=True, tokenize=False)[0]
        frames = [_as_rgb(im, f"{where}.images[{j}]") for j, im in enumerate(item.get("images", ()))]
        video = None
        if "video" in item:
            if not item["video"]:
                raise ValueError(f"{where}.video is empty; give at least one frame")
            video = np.stack([_as_rgb(fr, f"{where}.video[{j}]") for j, fr in enumerate(item["video"])])  # (T,H,W,3)
            n = len(video)
            from transformers.video_utils import VideoMetadata  # 0.6 s of transformers' video code: only with video

            md = VideoMetadata(total_num_frames=n, fps=float(item.get("fps", 2.0)), frames_indices=list(range(n)))
        for _ in range(group_size):
            texts.append(text)
            images.extend(frames)
            if video is not None:
                videos.append(video)
                metadata.append(md)
    kwargs = dict(return_tensors="pt", padding=True, padding_side="left")
    if videos:
        kwargs |= dict(videos=videos, video_metadata=metadata, do_sample_frames=False)
    enc = processor(text=texts, images=images or None, **kwargs)
    return {k: v for k, v in enc.items()}


__all__ = [
    "IMAGE_PAD", "VIDEO_PAD", "VISION_END", "VISION_KWARGS", "VISION_START", "VISION_TOKENS", "encode_mm_batch",
    "extend_mm_token_types", "index_mm_batch", "mm_forward_kwargs", "vision_special_ids", "vision_token_ids",
]  # fmt: skip
