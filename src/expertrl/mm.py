"""Multimodal batches as tensors: the vision kwargs a rollout carries, sliced by row and extended to a sequence.

``pixel_values`` (and ``pixel_values_videos``) are flat over images in row order, not per row, so a micro-batch must
slice them with ``index_mm_batch``; ``mm_token_type_ids`` (0 text, 1 image, 2 video) says which prompt positions are
placeholders. Pure tensor functions (the bottom layer); ``expertrl.vlm`` builds these batches from items.
"""

from __future__ import annotations

import torch
from torch import Tensor

VISION_KWARGS = ("mm_token_type_ids", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
"""The keys of a multimodal batch beyond ``input_ids``/``attention_mask`` (``expertrl.vlm.encode_mm_batch``)."""


def extend_mm_token_types(mm_token_type_ids: Tensor, width: int) -> Tensor:
    """(B, P) -> (B, width): completion tokens are text (0)."""
    B, P = mm_token_type_ids.shape
    assert width >= P, (width, P)
    return torch.cat([mm_token_type_ids, mm_token_type_ids.new_zeros(B, width - P)], dim=1)


def mm_forward_kwargs(batch: dict[str, Tensor], width: int) -> dict[str, Tensor]:
    """The vision kwargs of a forward over ``width`` >= P positions (prompt + completion) of ``batch``'s rows."""
    out = {k: batch[k] for k in VISION_KWARGS if k in batch}
    for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if grid in out and len(out[grid]) == 0:  # rows without images (or videos) after index_mm_batch
            del out[pix], out[grid]
    out["mm_token_type_ids"] = extend_mm_token_types(batch["mm_token_type_ids"], width)
    return out


def index_mm_batch(batch: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
    """The rows ``index`` (1-D long, in the given order) of an ``encode_mm_batch`` output, vision tensors included.

    ``pixel_values`` is flat over images in row order (``image_grid_thw.prod(-1)`` patches each); an image's row is
    found from the image runs in ``mm_token_type_ids`` (one run per image; a video has one run per temporal group).
    """
    out = {k: v[index] for k, v in batch.items() if k not in VISION_KWARGS[1:]}
    types = batch["mm_token_type_ids"]  # (B, S)
    starts = (types != 0) & (torch.nn.functional.pad(types, (1, 0))[:, :-1] != types)  # (B, S) first token of a run
    for kind, pix, grid in ((1, "pixel_values", "image_grid_thw"), (2, "pixel_values_videos", "video_grid_thw")):
        if grid not in batch:
            continue
        thw = batch[grid]  # (N, 3)
        runs = (starts & (types == kind)).sum(-1)  # (B,) runs per row
        per_item = thw[:, 0] if kind == 2 else torch.ones(len(thw), dtype=torch.long, device=thw.device)  # (N,)
        owner = torch.repeat_interleave(torch.arange(len(runs), device=runs.device), runs)  # (total runs,) row
        assert len(owner) == int(per_item.sum()), f"{grid} does not match the {kind}-runs of mm_token_type_ids"
        first_run = torch.cumsum(per_item, 0) - per_item  # (N,) index of each item's first run
        item_row = owner[first_run]  # (N,)
        patches = thw.prod(-1)  # (N,)
        offsets = torch.cumsum(patches, 0) - patches  # (N,)
        keep = [int(j) for b in index.tolist() for j in (item_row == b).nonzero().flatten().tolist()]
        out[grid] = thw[keep]
        out[pix] = (
            torch.cat([batch[pix][offsets[j] : offsets[j] + patches[j]] for j in keep]) if keep else batch[pix][:0]
        )
    return out
