"""Supervised fine-tuning on (prompt, answer) pairs, reusing the routing layer.

The MoE-GRPO paper's baselines are SFT configs: Det-FT (``routing=topk``), Stoch-FT-Multi (``multinomial``) and
Stoch-FT-Noise (``noisy_topk``), each with the Switch load-balancing loss on the experts actually used. The same
function is the warm-up stage of ``expertrl train``, so a model that starts from random weights can earn reward.
With a vision-language model (a processor in place of the tokenizer) the items' images or video go in front of the
prompt as the rollout renders them, and the answer tokens follow the prompt (``supervised_mm_batch``).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from expertrl.checkpoint import save_model
from expertrl.config import ConfigError, SFTConfig, SFTJobConfig
from expertrl.configio import save_yaml
from expertrl.decoding import is_processor, text_tokenizer
from expertrl.evaluate import evaluate
from expertrl.logging import MetricsLogger
from expertrl.losses.routing import routing_aux_loss
from expertrl.mm import VISION_KWARGS
from expertrl.moe.adapters import find_routers
from expertrl.moe.hooks import route
from expertrl.moe.policies import make_policy
from expertrl.policy import position_ids_from_mask
from expertrl.runtime import clip_grad, model_and_tokenizer, optimizer_and_schedule, seed_everything, task_from_config
from expertrl.tasks import sample_items
from expertrl.vlm import encode_mm_batch


def supervised_batch(tokenizer, items: list[dict], device) -> tuple[Tensor, Tensor, Tensor]:
    """Tokenise ``prompt + answer + EOS`` (left-padded); loss mask on the answer and EOS tokens.

    Returns:
        input_ids (B, S), attention_mask (B, S), loss_mask (B, S-1) aligned with ``logits[:, :-1]``.
    """
    rows, masks = [], []
    for it in items:
        p = tokenizer(it["prompt"], add_special_tokens=False)["input_ids"]
        a = tokenizer(it["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + a)
        masks.append([0] * len(p) + [1] * len(a))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.zeros((len(rows), width), dtype=torch.float)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, width - len(r) :] = torch.tensor(r)
        attn[i, width - len(r) :] = 1
        target[i, width - len(r) :] = torch.tensor(m, dtype=torch.float)
    return ids.to(device), attn.to(device), target[:, 1:].to(device)


def supervised_mm_batch(processor, items: list[dict], device) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """``supervised_batch`` for multimodal items: the rendered prompt (vision placeholders, then the text) followed by
    ``answer + EOS``, left-padded; loss mask on the answer and EOS tokens.

    Returns:
        input_ids (B, S), attention_mask (B, S), loss_mask (B, S-1) aligned with ``logits[:, :-1]``, and the vision
        kwargs of the forward (``mm_token_type_ids`` (B, S), answer tokens and pads are text; pixel values and
        grids as ``vlm.encode_mm_batch`` gives them, rows in the same order).
    """
    enc = encode_mm_batch(processor, items)  # (B, P) left-padded prompts
    tok = processor.tokenizer
    rows, types, masks = [], [], []
    for i, it in enumerate(items):
        real = enc["attention_mask"][i].bool()  # (P,)
        p = enc["input_ids"][i][real].tolist()
        a = tok(it["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(p + a)
        types.append(enc["mm_token_type_ids"][i][real].tolist() + [0] * len(a))
        masks.append([0] * len(p) + [1] * len(a))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    type_ids = torch.zeros((len(rows), width), dtype=enc["mm_token_type_ids"].dtype)
    target = torch.zeros((len(rows), width), dtype=torch.float)
    for i, (r, t, m) in enumerate(zip(rows, types, masks)):
        ids[i, width - len(r) :] = torch.tensor(r)
        attn[i, width - len(r) :] = 1
        type_ids[i, width - len(r) :] = torch.tensor(t, dtype=type_ids.dtype)
        target[i, width - len(r) :] = torch.tensor(m, dtype=torch.float)
    mm = {k: enc[k].to(device) for k in VISION_KWARGS[1:] if k in enc} | {"mm_token_type_ids": type_ids.to(device)}
    return ids.to(device), attn.to(device), target[:, 1:].to(device), mm


def supervised_train(
    model: nn.Module,
    tokenizer,
    items: list[dict],
    cfg: SFTConfig,
    *,
    seed: int,
    progress: bool = True,
    log=None,
) -> dict:
    """Train ``model`` in place for ``cfg.steps`` steps of cross-entropy on the answers; returns final metrics.

    ``tokenizer`` may be a VLM's processor: the items then carry ``images`` or ``video`` (``supervised_mm_batch``).
    """
    device = next(model.parameters()).device
    sites = find_routers(model, allow_dense=True)
    routed = bool(sites)
    dense = routed and all(s.top_k == s.num_experts for s in sites)  # LoRA-MoE dense mixture: soft Switch LB
    if not routed and (cfg.routing != "topk" or cfg.lb_coef > 0 or cfg.z_coef > 0):
        raise ConfigError(
            f"sft.routing: {type(model).__name__} has no router (a dense model or a plain LoRA), so routing "
            f"{cfg.routing!r}, sft.lb_coef and sft.z_coef mean nothing; set sft.routing=topk sft.lb_coef=0 sft.z_coef=0"
        )
    if not is_processor(tokenizer) and any("images" in it or "video" in it for it in items):
        raise ConfigError(
            "task.name: the items have images or a video but the model has a text tokenizer; a multimodal task needs "
            "a vision-language model (model.family=qwen3_vl_moe, or model.path to a Qwen3-VL-MoE checkpoint)"
        )
    policy = make_policy(cfg.routing, **cfg.routing_kwargs)
    generator = torch.Generator(device=device).manual_seed(seed)
    rng = random.Random(seed)
    optimizer, schedule = optimizer_and_schedule(model.parameters(), cfg.optim, cfg.steps)
    model.train()
    last: dict = {}
    bar = tqdm(range(cfg.steps), desc="sft", disable=not progress)
    for step in bar:
        t0 = time.perf_counter()
        batch = sample_items(items, cfg.batch_size, rng)
        if is_processor(tokenizer):  # M-RoPE: no position ids, the model computes its 3-D positions
            ids, attn, target, mm = supervised_mm_batch(tokenizer, batch, device)
            inputs = {"position_ids": None, "use_cache": False, **mm}
        else:
            ids, attn, target = supervised_batch(tokenizer, batch, device)
            inputs = {"position_ids": position_ids_from_mask(attn)}
        with route(model, policy, generator=generator, keep_probs=cfg.lb_coef > 0, keep_logits=cfg.z_coef > 0) as rec:
            logits = model(input_ids=ids, attention_mask=attn, **inputs).logits
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        ce = (ce * target.flatten()).sum() / target.sum()
        loss, metrics = ce, {"loss/ce": ce.detach()}
        if routed and (cfg.lb_coef > 0 or cfg.z_coef > 0):  # the router losses of RL, on every attended position
            B = ids.shape[0]
            aux, aux_metrics = routing_aux_loss(
                attn, probs=rec.probs(B) if cfg.lb_coef > 0 else None, experts=rec.trace(B).experts,
                lb_coef=cfg.lb_coef, logits=rec.logits(B) if cfg.z_coef > 0 else None, z_coef=cfg.z_coef,
                soft_dispatch=dense,
            )  # fmt: skip
            loss = loss + aux
            metrics |= aux_metrics
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_grad(model, cfg.optim.grad_clip)
        optimizer.step()
        schedule.step()
        last = metrics | {"optim/grad_norm": grad_norm.detach(), "optim/lr": schedule.get_last_lr()[0]}
        last["time/step"] = time.perf_counter() - t0
        if log is not None:
            log(last, step)
        bar.set_postfix(loss=f"{ce.item():.3f}")
    model.eval()
    return {k: float(v) for k, v in last.items()}


def run_sft(cfg: SFTJobConfig) -> dict:
    """`expertrl sft`: supervised fine-tuning, held-out accuracy before and after, final model saved."""
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "config.yaml")
    model, tokenizer = model_and_tokenizer(cfg.model, cfg.seed, allow_dense=True)
    task = task_from_config(cfg.task, tokenizer)
    tok = text_tokenizer(tokenizer)
    max_new = max(len(tok(it["answer"], add_special_tokens=False)["input_ids"]) for it in task.eval) + 2
    before = evaluate(model, tokenizer, task.eval, task.score, max_new_tokens=max_new)
    logger = MetricsLogger(out / "metrics.jsonl")
    supervised_train(
        model, tokenizer, task.train, cfg.sft, seed=cfg.seed, progress=cfg.progress, log=lambda m, s: logger.log(m, s)
    )
    after = evaluate(model, tokenizer, task.eval, task.score, max_new_tokens=max_new)
    save_model(model, tokenizer, out / "final")
    summary = {"accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"], "model": str(out / "final")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"sft: held-out accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}; model saved to {out / 'final'}")
    return summary
