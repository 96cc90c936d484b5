"""A character-level tokenizer built offline, for tiny in-process models (no Hugging Face Hub needed).

Contract: one token per character, ids ``<|pad|>`` 0, ``<|bos|>`` 1, ``<|eos|>`` 2, then the printable ASCII
characters (``string.printable`` without the vertical tab and form feed, so space, ``\\t`` and ``\\n`` are in).
``decode(encode(s)) == s`` exactly, spaces included. No BOS/EOS is added automatically; prompts are left-padded.
A character outside the vocabulary (e.g. ``é``) makes encoding raise, since there is deliberately no unknown token.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
CHARS = tuple(c for c in string.printable if c not in "\x0b\x0c")
CHAR_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARS)  # 3 + 98 = 101


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer described in the module docstring.

    WordLevel over single characters, a pre-tokenizer that isolates every character and a ``Fuse`` decoder, which
    concatenates tokens as they are. (``decoders.WordPiece``/``Metaspace``-style decoders insert or strip spaces;
    ``Fuse`` does neither, so whitespace survives the round trip.)
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    # The empty pattern matches between every pair of characters, so "isolated" yields one piece per character.
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,  # the clean-up would turn "a ." into "a."
    )
