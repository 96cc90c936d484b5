"""Token decoding: the one definition of a rollout's token distribution, applied while ``generate`` samples.

``TokenDistribution`` is ``generate``'s last logits processor: it applies ``Sampling.token_scores`` (suppressed
tokens, temperature), exactly what ``rollout.policy_forward`` applies when it scores the tokens, and records the
log-prob of each token ``generate`` picks. ``decoding_kwargs`` pins every other ``generate`` option that would
reshape the distribution to its neutral value (``NEUTRAL_GENERATION``), so a checkpoint's ``generation_config.json``
cannot change what is sampled behind the trainer's back.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from expertrl.types import GREEDY, Sampling
from expertrl.vlm import vision_special_ids


def is_processor(tokenizer_or_processor) -> bool:
    """True for a multimodal processor (``transformers.ProcessorMixin``, e.g. ``vlm_models.build_tiny_vlm``'s), False
    for a tokenizer."""
    # Importing transformers.processing_utils costs ~4 s; a processor instance implies it is already imported.
    module = sys.modules.get("transformers.processing_utils")
    return module is not None and isinstance(tokenizer_or_processor, module.ProcessorMixin)


def text_tokenizer(tokenizer_or_processor):
    """The text tokenizer (pad/EOS ids, decoding): the processor's ``tokenizer``, or the tokenizer itself."""
    return tokenizer_or_processor.tokenizer if is_processor(tokenizer_or_processor) else tokenizer_or_processor


def suppressed_tokens(model: nn.Module, mm: dict | None) -> tuple[int, ...]:
    """Token ids a rollout of this prompt batch must never generate: a VLM's vision special tokens (a generated
    placeholder makes the replayed forward raise); none for text. They go into ``Sampling.suppress_tokens``, so
    the trainer scores the same suppressed distribution generation sampled from."""
    if mm is None:
        return ()
    return tuple(sorted(int(i) for i in vision_special_ids(model)))


class TokenDistribution:
    """``generate``'s last logits processor: it turns the model's logits into the rollout's token distribution
    (``Sampling.token_scores``: suppressed tokens, temperature), the one definition ``policy_forward`` applies too,
    and, with ``record``, keeps the log-prob of each token ``generate`` then picks from it.

    Only one (B, V) row of log-probs is held at a time: the token chosen at step t is read from ``input_ids`` at step
    t + 1 (and the last one from the returned sequences, ``sample_logp``).
    """

    def __init__(self, sampling: Sampling, *, record: bool = False) -> None:
        self.sampling = sampling
        self.record = record
        self._last: Tensor | None = None
        self._picked: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self._last is not None:
            self._picked.append(self._last.gather(1, input_ids[:, -1:]))  # (B, 1) the token picked last step
        scores = self.sampling.token_scores(scores)  # (B, V) float32
        if self.record:
            self._last = torch.log_softmax(scores, dim=-1)
        return scores

    def sample_logp(self, sequences: Tensor) -> Tensor:
        """(B, C) log-prob of each generated token under the distribution it was drawn from."""
        assert self.record, "TokenDistribution(record=True) keeps the sampled tokens' log-probs"
        if self._last is None:
            return torch.zeros(sequences.shape[0], 0, device=sequences.device)
        picked = self._picked + [self._last.gather(1, sequences[:, -1:])]
        return torch.cat(picked, dim=1)  # (B, C)


class _FilledLayer(DynamicLayer):
    """A ``DynamicLayer`` that writes into a buffer of ``capacity`` positions and hands attention views of the filled
    part. ``DynamicLayer`` concatenates the whole cache at every decode step (a copy of every key and value, per
    layer and step); here each step writes only its own position. Attention reads the same values in the same order:
    outputs are bit-identical (``tests/test_generation_speed.py``)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        B, H, _, _ = key_states.shape
        self._keys = key_states.new_empty(B, H, self.capacity, key_states.shape[-1])  # (B, H, capacity, D)
        self._values = value_states.new_empty(B, H, self.capacity, value_states.shape[-1])
        self.length = 0

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        assert self.length + n <= self.capacity, f"the cache holds {self.capacity} positions; {self.length + n} asked"
        self._keys[:, :, self.length : self.length + n] = key_states
        self._values[:, :, self.length : self.length + n] = value_states
        self.length += n
        self.keys = self._keys[:, :, : self.length]  # (B, H, length, D) a view
        self.values = self._values[:, :, : self.length]
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the rollout cache only grows (no assisted decoding or beam search)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the rollout cache only grows (no assisted decoding or beam search)")

    def batch_select_indices(self, indices: Tensor) -> None:
        """Rows ``indices`` of the cache (repeats allowed: a prompt computed once, copied to the rows that share it)."""
        self._keys, self._values = self._keys.index_select(0, indices), self._values.index_select(0, indices)
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]


def rollout_cache(model: nn.Module, capacity: int) -> DynamicCache | None:
    """A KV cache for one ``generate`` call of at most ``capacity`` positions (prompt + new tokens) that writes in
    place (``_FilledLayer``); None (``generate``'s own cache) for a model with sliding-window or other layer kinds."""
    cache = DynamicCache(config=model.config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [_FilledLayer(capacity) for _ in cache.layers]
    return cache


NEUTRAL_GENERATION = dict(
    temperature=1.0,  # TokenDistribution applies the temperature (HF's warper would run after it)
    top_k=None,
    top_p=None,
    min_p=None,
    typical_p=None,
    top_h=None,
    epsilon_cutoff=None,
    eta_cutoff=None,
    repetition_penalty=None,
    encoder_repetition_penalty=None,
    no_repeat_ngram_size=None,
    encoder_no_repeat_ngram_size=None,
    bad_words_ids=None,
    sequence_bias=None,
    min_length=None,
    min_new_tokens=None,
    forced_bos_token_id=None,
    forced_eos_token_id=None,
    suppress_tokens=None,
    begin_suppress_tokens=None,
    exponential_decay_length_penalty=None,
    guidance_scale=None,
    watermarking_config=None,
    renormalize_logits=False,
    remove_invalid_values=False,
    num_beams=1,
    num_return_sequences=1,
)
"""Every ``generate`` option that would change the token distribution, set to its neutral value: a checkpoint's
``generation_config.json`` (Qwen ships top_k, top_p, temperature and sometimes repetition_penalty) must not reshape
the distribution a rollout samples from behind the trainer's back."""


def decoding_kwargs(
    tokenizer, *, max_new_tokens: int, sampling: Sampling = GREEDY, processor: TokenDistribution | None = None
) -> dict:
    """``generate`` keyword arguments of every expertrl decode: greedy or sampled tokens from exactly
    ``sampling``'s token distribution (applied by ``processor``, a fresh ``TokenDistribution`` if None), nothing from
    the checkpoint's generation_config (``NEUTRAL_GENERATION``), the tokenizer's pad and EOS."""
    tokenizer = text_tokenizer(tokenizer)
    return dict(
        NEUTRAL_GENERATION,
        max_new_tokens=max_new_tokens,
        do_sample=sampling.do_sample,
        logits_processor=[processor if processor is not None else TokenDistribution(sampling)],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
