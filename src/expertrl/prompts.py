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
"""

from __future__ import annotations


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
