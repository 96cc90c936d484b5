"""Prompts as the model sees them: a task item's question rendered with the tokenizer's chat template.

An instruct or reasoning model is trained on conversations, so a prompt must reach it as one: the system prompt
(``task.system_prompt``, e.g. the answer format to use) and the question as a user turn, rendered with the tokenizer's
own Jinja chat template and opened for the assistant's reply (``add_generation_prompt=True``), exactly as
``apply_chat_template`` renders it for inference. ``render_items`` does this once per task item when the task is
built (``runtime.task_from_config``), so rollouts, evaluation and the supervised warm-up all see the same text: the
rendered prompt replaces ``item["prompt"]`` and the question is kept as ``item["question"]``.

``task.chat_template`` decides whether the template is used:

    None (default)  on when the tokenizer has a chat template, off when it has none. The in-process character
                    tokenizer (``expertrl.tokenizer``) has none, so tiny in-process runs keep their plain prompts
                    (``"12+7="``) unless you point ``model.path`` at a checkpoint whose tokenizer has a template.
    True            use it; a tokenizer without one is an error at start-up.
    False           plain text: the question as it is, after ``system_prompt + "\\n"`` when a system prompt is set.

Multimodal (``mm:``) tasks are rendered by the processor itself (``expertrl.vlm``) and pass through unchanged.

Lengths (``fit_prompts``): a prompt plus the tokens generated after it must fit the model's context
(``max_position_embeddings``). A prompt that does not is refused, naming its row (``file:line`` for a data file) and
both numbers, unless ``task.max_prompt_tokens`` asks for longer prompts to be cut to that many tokens (their *end*
is kept, where the question and the assistant turn are, as TRL's left truncation does); cut prompts are counted.
"""

from __future__ import annotations

from typing import NamedTuple


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` carries a chat template (``tokenizer.chat_template`` set)."""
    return bool(getattr(tokenizer, "chat_template", None))


def use_chat_template(tokenizer, chat_template: bool | None) -> bool:
    """Resolve ``task.chat_template`` against the tokenizer (module docstring); True without a template raises."""
    if chat_template is None:
        return has_chat_template(tokenizer)
    if chat_template and not has_chat_template(tokenizer):
        raise ValueError(
            "task.chat_template: the tokenizer has no chat template (the in-process character tokenizer never has "
            "one); set task.chat_template=false for plain-text prompts, or use a model.path whose tokenizer has one "
            "(tokenizer_config.json 'chat_template' or chat_template.jinja)"
        )
    return chat_template


def render_prompt(
    tokenizer,
    question: str,
    *,
    chat_template: bool,
    system_prompt: str | None = None,
    template_kwargs: dict | None = None,
) -> str:
    """The text a model is prompted with for ``question``.

    Args:
        chat_template: render with the tokenizer's chat template (resolve ``task.chat_template`` with
            ``use_chat_template`` first); False gives plain text.
        system_prompt: a system turn before the question (plain text: its own line before the question).
        template_kwargs: extra variables of the template (``task.chat_template_kwargs``, e.g. Qwen3's
            ``enable_thinking``).
    """
    if not chat_template:
        return question if system_prompt is None else f"{system_prompt}\n{question}"
    messages = [{"role": "user", "content": question}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
    )


def render_items(
    items: list[dict],
    tokenizer,
    *,
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    template_kwargs: dict | None = None,
) -> list[dict]:
    """New items whose ``prompt`` is the rendered prompt and whose ``question`` is the original prompt text (items
    are not modified). Nothing changes when neither a template nor a system prompt applies."""
    use = use_chat_template(tokenizer, chat_template)
    if not use and system_prompt is None:
        return items
    options = dict(chat_template=use, system_prompt=system_prompt, template_kwargs=template_kwargs)
    out = []
    for it in items:
        question = it.get("question", it["prompt"])
        out.append({**it, "question": question, "prompt": render_prompt(tokenizer, question, **options)})
    return out


CHARS_PER_TOKEN = 64
"""Longer than this many characters per token of context, a prompt's tail alone is counted (``fit_prompts``)."""


class Fitted(NamedTuple):
    """``fit_prompts``' result: the items (cut prompts replaced), how many were cut, and the longest prompt."""

    items: list[dict]
    truncated: int
    longest: int


def _where(item: dict) -> str:
    return item.get("where") or f"item {item.get('id', '?')!r}"


def fit_prompts(
    items: list[dict],
    tokenizer,
    *,
    max_positions: int | None,
    new_tokens: int,
    new_tokens_field: str = "rollout.max_new_tokens",
    max_prompt_tokens: int | None = None,
    answers: bool = False,
) -> Fitted:
    """Cut prompts longer than ``max_prompt_tokens`` (keeping their end), then check that every prompt plus
    ``new_tokens`` (plus the item's answer, with ``answers``: supervised training) fits ``max_positions``.

    Raises:
        ValueError: a prompt that does not fit, naming its row, its length, ``new_tokens_field`` and the context.
    """
    if not items:
        return Fitted(items, 0, 0)
    encode = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    # A 10 MB row would take minutes and GBs to tokenize: count only the tail of a text longer than CHARS_PER_TOKEN
    # characters per position; past that the tail alone does not fit (and cutting keeps the end anyway).
    cap = CHARS_PER_TOKEN * (max_positions or max_prompt_tokens or 1 << 16)
    ids = encode([it["prompt"][-cap:] for it in items])
    for i, it in enumerate(items):  # a long text whose tail fits after all (tokens of > CHARS_PER_TOKEN chars)
        if len(it["prompt"]) > cap and len(ids[i]) <= (max_positions or 0):
            ids[i] = encode([it["prompt"]])[0]
    out, truncated = list(items), 0
    if max_prompt_tokens is not None:
        for i, row in enumerate(ids):
            if len(row) > max_prompt_tokens:
                keep = row[-max_prompt_tokens:]  # of the tail: enough, the end is what is kept
                text = tokenizer.decode(keep)
                while len(encode([text])[0]) > max_prompt_tokens and keep:  # re-encoding may merge differently
                    keep = keep[1:]
                    text = tokenizer.decode(keep)
                out[i] = {**out[i], "prompt": text}
                ids[i] = encode([text])[0]
                truncated += 1
    extra = encode([it["answer"][-cap:] for it in out]) if answers else [[] for _ in out]
    lengths = [len(p) + len(a) for p, a in zip(ids, extra, strict=True)]
    worst = max(range(len(out)), key=lengths.__getitem__)
    if max_positions is not None and lengths[worst] + new_tokens > max_positions:
        n_prompt, n_answer = len(ids[worst]), len(extra[worst])
        what = f"prompt + answer ({n_prompt} + {n_answer} tokens)" if answers else f"prompt ({n_prompt} tokens)"
        room = max_positions - new_tokens - n_answer  # the longest prompt that would fit
        fixes = [f"lower {new_tokens_field}"] if new_tokens else []
        if room > 0:
            fixes.append(f"set task.max_prompt_tokens <= {room} to cut longer prompts (their end is kept)")
        fixes.append("shorten or drop that row")
        field = new_tokens_field if new_tokens else "task.max_prompt_tokens"
        plus = f" + {new_tokens_field} {new_tokens}" if new_tokens else ""
        raise ValueError(
            f"{field}: {_where(out[worst])}: the {what}{plus} = {lengths[worst] + new_tokens} tokens exceeds the "
            f"model's context of {max_positions} (max_position_embeddings); {', or '.join(fixes)}"
        )
    return Fitted(out, truncated, max(len(p) for p in ids))
