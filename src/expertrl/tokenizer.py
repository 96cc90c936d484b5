"""A character-level tokenizer built offline, for tiny in-process models (no Hugging Face Hub needed).

Contract: one token per character, ids ``<|pad|>`` 0, ``<|bos|>`` 1, ``<|eos|>`` 2, then the printable ASCII
characters (``string.printable`` without the vertical tab and form feed, so space, ``\\t`` and ``\\n`` are in),
then 256 byte tokens ``<0x00>`` ... ``<0xFF>``: any other character (``€``, ``×``, an emoji) is encoded as its UTF-8
bytes (byte fallback), so ``decode(encode(s)) == s`` exactly for any text, spaces included, and a model can write
every character a task's answer needs. No BOS/EOS is added automatically; prompts are left-padded.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
CHARS = tuple(c for c in string.printable if c not in "\x0b\x0c")
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
CHAR_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARS) + len(BYTE_TOKENS)  # 3 + 98 + 256 = 357


def build_char_tokenizer(vocab_size: int = CHAR_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """The character-level tokenizer described in the module docstring.

    ``vocab_size`` > 357 pads the vocabulary with ``<|unused_i|>`` tokens, as real vocabularies reserve ids (Qwen's
    151,936 rows hold ~270 unused ones): text never encodes to them, but a model can generate them and they decode
    (as their name), so an in-process model gets a real vocabulary's width (``qwen3moe-30b-shape``) without a real
    tokenizer.

    A BPE model without merges (so: one token per character) with byte fallback, a pre-tokenizer that isolates every
    character, and a decoder that turns byte tokens back into characters (``ByteFallback``; an invalid byte sequence
    a model wrote becomes ``�``) and then concatenates tokens as they are (``Fuse``: no space is inserted or
    stripped, so whitespace survives the round trip).
    """
    if vocab_size < CHAR_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is below the character tokenizer's {CHAR_VOCAB_SIZE}")
    unused = tuple(f"<|unused_{i}|>" for i in range(vocab_size - CHAR_VOCAB_SIZE))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARS + BYTE_TOKENS + unused)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    # The empty pattern matches between every pair of characters, so "isolated" yields one piece per character.
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,  # the clean-up would turn "a ." into "a."
    )
