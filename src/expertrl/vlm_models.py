"""Vision-language MoE models (Qwen3-VL-MoE): a tiny one built offline, local loading, multimodal batches.

``build_tiny_vlm`` makes a random-init ``Qwen3VLMoeForConditionalGeneration`` (2 text layers, E=4, K=2, hidden 32; a
2-block vision tower with 4-pixel patches, so a 32x32 image is 8x8 patches = 16 tokens after the 2x2 merge) and a
``Qwen3VLProcessor`` around an offline character tokenizer (``expertrl.tokenizer`` ids plus the four vision tokens).
``build_tiny_dense_vlm`` is its dense twin (a Qwen3-VL with one expert-wide FFN per layer, the same processor and
vision tower), the base that ``expertrl.moe.upcycle`` turns into a Qwen3-VL-MoE of ``build_tiny_vlm``'s shapes.
``save_vlm``/``load_vlm`` go through ``from_pretrained(local_files_only=True)``, the same path a real local
Qwen3-VL-MoE (or dense Qwen3-VL) checkpoint takes.

Without torchvision (this machine), transformers 5.23 cannot run ``Qwen3VLVideoProcessor`` (it calls torchvision
for RGB conversion, resizing and normalising) nor build a processor that holds one (the class check looks
``VideoProcessorMixin`` up on the top-level module, where it is a dummy). ``TorchVideoProcessor`` replaces those three
calls with plain torch and ``LocalQwen3VLProcessor`` checks the class directly; both are used with or without
torchvision, so preprocessing is the same everywhere (only resizing can differ from torchvision's, by interpolation
rounding; the tasks render frames at the model size, where no resize happens).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import (
    AutoTokenizer,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor, smart_resize
from transformers.video_processing_utils import VideoProcessorMixin

from expertrl.models import seeded_from_config
from expertrl.tokenizer import BOS_ID, EOS_ID, PAD_ID, build_char_tokenizer
from expertrl.vlm import VISION_TOKENS

# Qwen3-VL's own template renders each image as <|vision_start|><|image_pad|><|vision_end|> (the processor then
# repeats <|image_pad|> once per merged patch) and each video as <|vision_start|><|video_pad|><|vision_end|>. The
# tiny model has no roles: the prompt is the placeholders followed by the text.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content['type'] == 'video' -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif content['type'] == 'text' -%}{{ content['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endfor -%}"
)

TINY_VLM = dict(
    hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, moe_intermediate=32, experts=4, top_k=2,
    vision_depth=2, vision_hidden=32, vision_intermediate=64, vision_heads=2, patch_size=4, merge_size=2,
    temporal_patch_size=2, image_size=32,
)  # fmt: skip


class TorchVideoProcessor(Qwen3VLVideoProcessor):
    """``Qwen3VLVideoProcessor`` with its three torchvision calls (RGB, resize, normalise) written in plain torch."""

    def convert_to_rgb(self, video: Tensor) -> Tensor:  # (T, C, H, W), C in {1, 3}
        if video.shape[-3] == 1:
            return video.expand(*video.shape[:-3], 3, *video.shape[-2:])
        assert video.shape[-3] == 3, f"video frames must have 1 or 3 channels, got {video.shape[-3]}"
        return video

    def normalize(self, image: Tensor, mean, std, inplace: bool = False, **kwargs) -> Tensor:
        mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)  # (C, 1, 1)
        std = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
        return (image - mean) / std

    def resize(self, videos: Tensor, size, resample, factor: int, temporal_factor: int, cap_pixels_per_frame=None,
               **kwargs) -> Tensor:  # fmt: skip
        """(N, T, C, H, W) -> (N, T, C, h, w) with (h, w) from Qwen's ``smart_resize`` (multiples of ``factor``)."""
        n, t, c, height, width = videos.shape
        max_pixels = size.longest_edge
        if cap_pixels_per_frame:  # the same cap as Qwen3VLVideoProcessor.resize
            frame_cap = self.max_video_tokens * factor * factor
            max_pixels = max(min(frame_cap, size.longest_edge // t), int(size.shortest_edge * 1.05)) * t
        h, w = smart_resize(num_frames=t, height=height, width=width, temporal_factor=temporal_factor, factor=factor,
                            min_pixels=size.shortest_edge, max_pixels=max_pixels)  # fmt: skip
        if (h, w) == (height, width):
            return videos
        flat = videos.reshape(n * t, c, height, width).float()
        out = F.interpolate(flat, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        if videos.dtype == torch.uint8:
            out = out.round().clamp(0, 255).to(torch.uint8)
        return out.reshape(n, t, c, h, w)


class LocalQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` that accepts a video processor without torchvision (see the module docstring)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor":
            if not isinstance(argument, VideoProcessorMixin):
                raise TypeError(f"video_processor must be a VideoProcessorMixin, got {type(argument).__name__}")
            return VideoProcessorMixin
        return super().check_argument_for_proper_class(argument_name, argument)


def build_vlm_tokenizer():
    """The character tokenizer (pad 0, bos 1, eos 2, printable ASCII, byte fallback) plus the four vision tokens (ids
    357-360)."""
    tok = build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def tiny_vlm_config(*, moe: bool = True):
    """The config of the tiny VLM: ``Qwen3VLMoeConfig`` (``moe=True``) or the dense ``Qwen3VLConfig`` (``moe=False``).

    Both share every field but the FFN: the dense text decoder's FFN has the width of one expert
    (``intermediate_size = moe_intermediate``), so ``upcycle(dense, num_experts=4, top_k=2)`` gives the shapes of the
    MoE one. The vision tower, tokens and M-RoPE are identical.
    """
    p = TINY_VLM
    tok = build_vlm_tokenizer()
    start, end, image, video = tok.convert_tokens_to_ids(list(VISION_TOKENS))
    text = dict(
        vocab_size=len(tok), hidden_size=p["hidden"], intermediate_size=p["moe_intermediate"],
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
        head_dim=p["head_dim"], max_position_embeddings=512, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        # M-RoPE: the head_dim/2 = 4 rotary frequencies split over (t, h, w) as 2/1/1, interleaved like Qwen3-VL.
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1], mrope_interleaved=True),
    )  # fmt: skip
    if moe:
        experts = dict(num_experts=p["experts"], num_experts_per_tok=p["top_k"])
        text |= dict(moe_intermediate_size=p["moe_intermediate"], **experts)
    grid = p["image_size"] // p["patch_size"]  # learned position grid = patches per side of the native image size
    vision = dict(
        depth=p["vision_depth"], hidden_size=p["vision_hidden"], intermediate_size=p["vision_intermediate"],
        num_heads=p["vision_heads"], patch_size=p["patch_size"], spatial_merge_size=p["merge_size"],
        temporal_patch_size=p["temporal_patch_size"], out_hidden_size=p["hidden"], num_position_embeddings=grid**2,
        deepstack_visual_indexes=[0],
    )  # fmt: skip
    config_class = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    return config_class(
        text_config=text, vision_config=vision, image_token_id=image, video_token_id=video,
        vision_start_token_id=start, vision_end_token_id=end, tie_word_embeddings=False,
    )  # fmt: skip


def build_tiny_processor() -> LocalQwen3VLProcessor:
    """The tiny VLMs' processor: ``build_vlm_tokenizer`` plus image and video processors sized for 4-pixel patches."""
    p = TINY_VLM
    factor = p["patch_size"] * p["merge_size"]
    sizes = dict(patch_size=p["patch_size"], merge_size=p["merge_size"], temporal_patch_size=p["temporal_patch_size"])
    # min_pixels = one merged token; max_pixels = 64x64 (64 tokens) per image, larger user images are downscaled.
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": factor**2, "longest_edge": 64 * 64}, **sizes)
    video_processor = TorchVideoProcessor(
        size={"shortest_edge": factor**2, "longest_edge": 16 * 64 * 64}, do_sample_frames=False,
        cap_pixels_per_frame=False, **sizes,
    )  # fmt: skip
    return LocalQwen3VLProcessor(
        image_processor=image_processor, tokenizer=build_vlm_tokenizer(), video_processor=video_processor,
        chat_template=TINY_CHAT_TEMPLATE,
    )  # fmt: skip


def build_tiny_vlm(seed: int = 0, *, dtype: torch.dtype = torch.float32):
    """A tiny random-init Qwen3-VL-MoE and its processor; the same seed gives bit-identical weights.

    Returns:
        (model in eval mode, ``LocalQwen3VLProcessor``). Images of 32x32 pixels give 16 vision tokens; a video of
        F frames gives ceil(F/2) temporal groups of 16 tokens each.
    """
    config = tiny_vlm_config(moe=True)
    model = seeded_from_config(lambda: Qwen3VLMoeForConditionalGeneration._from_config(config, dtype=dtype), seed=seed)
    return model.eval(), build_tiny_processor()


def build_tiny_dense_vlm(seed: int = 0, *, dtype: torch.dtype = torch.float32):
    """A tiny random-init dense Qwen3-VL (the base of ``expertrl.moe.upcycle``) and the same processor as
    ``build_tiny_vlm``: the same tokenizer, text width, vision tower and token ids, an FFN of one expert's width.

    Returns:
        (``Qwen3VLForConditionalGeneration`` in eval mode, ``LocalQwen3VLProcessor``).
    """
    config = tiny_vlm_config(moe=False)
    model = seeded_from_config(lambda: Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype), seed=seed)
    return model.eval(), build_tiny_processor()


def save_vlm(model, processor, path: str | Path) -> None:
    """Write the model and the processor (tokenizer, image and video processor, chat template) to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)


VLM_CLASSES = {"qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration, "qwen3_vl": Qwen3VLForConditionalGeneration}
"""The vision-language ``model_type``s ``load_vlm`` reads: the MoE one and its dense base (``expertrl.moe.upcycle``)."""


def load_vlm(path: str | Path, *, dtype: torch.dtype = torch.float32, experts_implementation: str | None = None):
    """A Qwen3-VL-MoE (or dense Qwen3-VL) model and processor from a local directory (``save_vlm`` output, an
    ``expertrl upcycle`` output or a real checkpoint).

    The sub-processors are loaded one by one (the processor's own ``from_pretrained`` needs torchvision for the
    video processor): tokenizer via ``AutoTokenizer``, image processor as ``Qwen2VLImageProcessorPil`` and video
    processor as ``TorchVideoProcessor``, each from the directory's processor or preprocessor config files.
    ``experts_implementation`` picks the transformers experts kernel of an MoE model (None: its default,
    grouped_mm); a dense model has no experts and ignores it, as ``models.load_model`` does, so that one model config
    serves the dense base and its upcycled MoE.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(path)!r} has no config.json; pass a directory written by save_vlm/save_pretrained"
        )
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in VLM_CLASSES:
        raise ValueError(
            f"{str(path)!r} holds a {model_type!r} model; load_vlm reads the model_types {sorted(VLM_CLASSES)}"
        )
    moe = model_type == "qwen3_vl_moe"  # like models.load_model: the kernel applies to MoE models only
    kernel = {} if experts_implementation is None or not moe else {"experts_implementation": experts_implementation}
    model = VLM_CLASSES[model_type].from_pretrained(path, dtype=dtype, local_files_only=True, **kernel)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
    video_processor = TorchVideoProcessor.from_pretrained(path, local_files_only=True)
    template = path / "chat_template.jinja"
    chat_template = template.read_text() if template.is_file() else tok.chat_template
    processor = LocalQwen3VLProcessor(
        image_processor=image_processor, tokenizer=tok, video_processor=video_processor, chat_template=chat_template
    )
    return model.eval(), processor
