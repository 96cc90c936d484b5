"""Sparse upcycling: a dense decoder becomes a real transformers MoE model whose experts are copies of its FFN.

MoE-GRPO (METHODS.md §3.6) converts InternVL3.5-1B to 8 experts, top-2, without saying how; this is the recipe
we use (METHODS.md §8, ambiguity 12):

* the target is the native MoE family of the source (``families.UPCYCLE_SOURCES``): qwen3 -> qwen3_moe (every
  layer sparse), qwen2 -> qwen2_moe, llama and mistral -> mixtral. The result is a plain ``PreTrainedModel`` that
  ``save_pretrained`` writes and ``AutoModelForCausalLM.from_pretrained`` reads back, and that
  ``expertrl.moe.adapters``/``hooks`` route like any native MoE;
* a vision-language model is upcycled in its text decoder only: a dense Qwen3-VL becomes a Qwen3-VL-MoE
  (``AutoModelForImageTextToText``) whose ``model.language_model`` is sparse, with the vision tower (its own FFNs
  included), the merger and every top-level field copied; the checkpoint keeps the processor files;
* every non-FFN weight (embeddings, attention, norms, lm_head) is copied exactly, and the config is mapped field by
  field: every field both configs have is copied, the few the target lacks are checked to hold a value the target
  implies (e.g. Llama ``attention_bias=False``), and any other field raises;
* each of the E experts is a copy of the dense FFN, ``gate_up_proj[e] = cat(gate_proj, up_proj)`` (the fused
  layout, gate first, that ``*Experts.forward`` chunks) and ``down_proj[e] = down_proj``, plus optional seeded
  Gaussian noise ``noise_std * std(W) * N(0, 1)`` per dense matrix W, so experts can diverge;
* each layer gets a new router with weights N(0, ``router_init_std``), seeded.

Function preservation (the decision). With ``noise_std=0`` the experts are identical, so an MoE layer outputs
``sum_k w_k FFN(x) = (sum_k w_k) FFN(x)``. With renormalised top-K weights (``norm_topk_prob=True``, the default;
Mixtral always renormalises) ``sum_k w_k = 1`` and the upcycled model computes exactly the dense function at init,
whatever experts are chosen: deterministic top-K, sampled (``Multinomial``) or replayed routes alike (for a VLM, at
vision and text positions alike; ``Qwen3VLMoeTextTopKRouter`` always renormalises). MoE-GRPO's
Eq. 2 mixes experts with *un-renormalised* softmax weights; ``norm_topk_prob=False`` (qwen families only) gives
that, and then each FFN output is scaled by the top-K probability mass ``sum_k p_k <= 1`` at init (about K/E with a
near-uniform new router), so the upcycled model starts away from the dense one.

Qwen2-MoE's always-on shared expert (``sigmoid(shared_expert_gate(x)) * shared_expert(x)``) cannot be removed from
the architecture, so it is made inert: width 1 (``shared_expert_intermediate_size=1``, the smallest that avoids
zero-element tensors) with every weight zero. Its output is exactly 0, and so is every gradient it receives
(silu(0) * 0 = 0 and each weight's gradient carries a factor of another zero weight), so it stays zero under any
optimiser and weight decay: the upcycled qwen2_moe is a pure routed MoE like the other targets, with all of the
dense FFN in the routed experts (the alternative, the FFN in the shared expert and zero routed experts, would make
routing irrelevant to the output and give the routers no gradient, which defeats routing-as-policy RL).
"""

from __future__ import annotations

import copy
import inspect
import json
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedModel

from expertrl.families import MOE, UPCYCLE_SOURCES, UpcycleTarget
from expertrl.io import atomic_save_dir
from expertrl.moe import experts  # registers experts_implementation="expertrl_grouped_mm"

# Bookkeeping keys of ``PretrainedConfig.to_dict`` that describe the file, not the network.
_META_FIELDS = frozenset({"architectures", "model_type", "transformers_version", "_name_or_path"})


def expert_weights(
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
    *,
    num_experts: int,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """E copies of one SwiGLU FFN in the fused layout of transformers 5 ``*Experts`` modules.

    Args:
        gate_proj, up_proj: (I, H) weights of the dense FFN.
        down_proj: (H, I).
        num_experts: E.
        noise_std: relative std of the Gaussian noise added to every copy: ``noise_std * std(W) * N(0, 1)`` for
            each dense matrix W (drawn in float32 from ``generator``, on the CPU, then cast).
        generator: CPU RNG of the noise (required when ``noise_std > 0``).

    Returns:
        gate_up_proj (E, 2I, H) with gate rows first (``Experts.forward`` does ``.chunk(2, dim=-1)`` as gate, up),
        and down_proj (E, H, I).
    """
    assert gate_proj.shape == up_proj.shape and down_proj.shape == gate_proj.shape[::-1], (
        gate_proj.shape,
        up_proj.shape,
        down_proj.shape,
    )
    assert noise_std == 0.0 or generator is not None, "noise_std > 0 needs a generator"

    def copies(w: Tensor) -> Tensor:
        out = w.detach().unsqueeze(0).repeat(num_experts, 1, 1)  # (E, *w.shape)
        if noise_std > 0:
            scale = noise_std * w.detach().float().std()
            noise = torch.randn(out.shape, generator=generator, dtype=torch.float32)  # (E, *w.shape)
            out = (out.float() + scale * noise.to(out.device)).to(w.dtype)
        return out

    gate_up = torch.cat([copies(gate_proj), copies(up_proj)], dim=1)  # (E, 2I, H)
    return gate_up, copies(down_proj)  # (E, 2I, H), (E, H, I)


def _check_args(num_experts: int, top_k: int, noise_std: float, router_init_std: float) -> None:
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be between 1 and num_experts={num_experts}, got top_k={top_k}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0 (relative std of expert noise), got {noise_std}")
    if router_init_std <= 0:
        raise ValueError(
            f"router_init_std must be > 0, got {router_init_std}: an all-zero router ties every expert "
            "and top-K then always picks the lowest indices"
        )


def target_for(model_type: str, config_dict: dict | None = None) -> UpcycleTarget:
    """The ``UpcycleTarget`` of a dense ``model_type``; raises on MoE and unsupported families."""
    cfg = config_dict or {}
    decoder_cfgs = (cfg, cfg.get("text_config") or {})  # a VLM's experts live in its text_config
    moe_keys = ("num_experts", "num_local_experts", "n_routed_experts")
    if model_type in MOE or any(k in c for c in decoder_cfgs for k in moe_keys):
        raise ValueError(
            f"model_type {model_type!r} is already a Mixture-of-Experts model; upcycling turns a dense model into "
            f"an MoE one. Supported dense model_types: {sorted(UPCYCLE_SOURCES)}"
        )
    if model_type not in UPCYCLE_SOURCES:
        raise ValueError(
            f"cannot upcycle model_type {model_type!r}; supported dense model_types: {sorted(UPCYCLE_SOURCES)} "
            f"(-> {sorted({t.model_type for t in UPCYCLE_SOURCES.values()})})"
        )
    return UPCYCLE_SOURCES[model_type]


def _sliding_fields(dense: dict) -> dict:
    """Qwen3 -> Qwen3-MoE: Qwen3 picks sliding layers by ``layer_types``; Qwen3-MoE slides every layer or none."""
    kinds = set(dense["layer_types"])
    if kinds == {"full_attention"}:
        return dict(use_sliding_window=False, sliding_window=None)
    if kinds == {"sliding_attention"}:
        return dict(use_sliding_window=True, sliding_window=dense["sliding_window"])
    raise ValueError(
        f"layer_types {dense['layer_types']} mixes full and sliding-window attention, which qwen3_moe cannot "
        "express (it applies sliding_window to every layer or to none)"
    )


def moe_config_fields(
    dense: dict,
    *,
    head_dim: int,
    num_experts: int,
    top_k: int,
    norm_topk_prob: bool,
) -> tuple[str, dict]:
    """The MoE ``model_type`` and its config fields, from a dense config's ``to_dict()``.

    Every field both config classes have is copied; a source field the target lacks must be listed in the
    target's ``implied`` (and hold that value) or handled here, otherwise this raises. A vision-language source is
    mapped per part: ``text_config`` as a decoder, ``vision_config`` and the top-level fields copied as they are.
    """
    target = target_for(dense["model_type"], dense)
    if target.renormalize_always and not norm_topk_prob:
        raise ValueError(
            f"norm_topk_prob=False is impossible for {target.model_type}: it always renormalises the top-K weights. "
            "Use a qwen3/qwen2 source for un-renormalised (MoE-GRPO Eq. 2) weights, or keep norm_topk_prob=True."
        )
    known = AutoConfig.for_model(target.model_type).to_dict()
    decoder = dict(head_dim=head_dim, num_experts=num_experts, top_k=top_k, norm_topk_prob=norm_topk_prob)
    if not target.vision_language:
        return target.model_type, _decoder_fields(dense, known, target, **decoder)
    fields = _copy_fields(dense, known, {}, skip={"text_config", "vision_config"})
    fields["vision_config"] = _copy_fields(dense["vision_config"], known["vision_config"], {})
    fields["text_config"] = _decoder_fields(dense["text_config"], known["text_config"], target, **decoder)
    return target.model_type, fields


def _decoder_fields(
    dense: dict,
    known: dict,
    target: UpcycleTarget,
    *,
    head_dim: int,
    num_experts: int,
    top_k: int,
    norm_topk_prob: bool,
) -> dict:
    """The MoE decoder's config fields from the dense decoder's (``known``: the target decoder config's fields)."""
    # intermediate_size is copied where the target has it (Qwen MoE: the width of dense mlp_only_layers, unused here).
    skip = {"head_dim"}
    fields: dict = {}
    if target.model_type == "qwen3_moe":
        fields |= _sliding_fields(dense)
        skip |= {"layer_types", "max_window_layers", "use_sliding_window", "sliding_window"}
    fields |= _copy_fields(dense, known, target.implied, skip=skip)
    fields |= {
        "head_dim": head_dim,  # every target reads getattr(config, "head_dim", hidden // heads); Qwen3 defaults differ
        target.width_field: dense["intermediate_size"],
        target.experts_field: num_experts,
        "num_experts_per_tok": top_k,
        **target.fixed,
    }
    if not target.renormalize_always:
        fields["norm_topk_prob"] = norm_topk_prob
    return fields


def _copy_fields(source: dict, known: dict, implied: dict, *, skip=()) -> dict:
    """The fields of ``source`` (a ``to_dict()``) that the target config has (``known``, the target's ``to_dict()``),
    deep-copied. A field the target lacks must be in ``implied`` and hold that value (None: any value); any other
    field raises. Errors name both (sub-)configs by their ``model_type``, e.g. qwen3_vl_text -> qwen3_vl_moe_text."""
    source_name, target_name = source["model_type"], known["model_type"]
    fields, unknown = {}, []
    for key, value in source.items():
        if key in _META_FIELDS or key in skip:
            continue
        if key in known:
            fields[key] = copy.deepcopy(value)
        elif key in implied:
            want = implied[key]
            if want is not None and value != want:
                raise ValueError(f"{source_name} config has {key}={value!r}; {target_name} can only express {want!r}")
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{target_name} config has no field(s) {sorted(unknown)} of the {source_name} config; "
            "upcycling would silently drop them. Map them in expertrl.families (UpcycleTarget.implied) first."
        )
    return fields


def _decoder(model: PreTrainedModel, target: UpcycleTarget) -> nn.Module:
    """The module holding the decoder ``layers``: ``model.model``, or a VLM's ``model.model.language_model``."""
    return model.model.language_model if target.vision_language else model.model


def _split(model: nn.Module, layers: nn.ModuleList) -> dict[str, Tensor]:
    """Every parameter and buffer of ``model`` outside the decoder FFNs (``layers[i].mlp``), by state-dict name.

    Selected by module identity, not by the substring ``.mlp.``: a vision tower's blocks have ``mlp``s too, and they
    are copied like any other non-decoder weight.
    """
    ffns = {id(layer.mlp) for layer in layers}
    prefixes = tuple(f"{name}." for name, module in model.named_modules() if id(module) in ffns)
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}


def _attn_implementation(config) -> str | dict:
    """The attention kernel of ``config`` and of each sub-config (``from_config`` takes the dict form)."""
    if not config.sub_configs:
        return config._attn_implementation
    return {"": config._attn_implementation, **{k: getattr(config, k)._attn_implementation for k in config.sub_configs}}


def upcycle(
    dense_model: PreTrainedModel,
    *,
    num_experts: int = 8,
    top_k: int = 2,
    noise_std: float = 0.0,
    router_init_std: float = 0.02,
    norm_topk_prob: bool = True,
    seed: int = 0,
    experts_implementation: str = experts.NAME,
) -> PreTrainedModel:
    """A new MoE model of ``dense_model``'s family whose E experts per layer copy the dense FFN (module docstring).

    ``dense_model`` and the global RNG are left untouched. The result is on the dense model's device and dtype, in
    the same train/eval mode, with a copy of its ``generation_config``.

    Args:
        dense_model: a causal LM of a ``model_type`` in ``families.UPCYCLE_SOURCES``, or a vision-language
            model (``qwen3_vl``) whose text decoder is upcycled and whose vision tower is copied.
        num_experts: E experts per layer.
        top_k: K experts per token.
        noise_std: relative std of Gaussian noise on each expert copy (0 = identical experts).
        router_init_std: std of the new routers' N(0, std) weights.
        norm_topk_prob: renormalise top-K weights to sum 1 (exact dense function at init); False = MoE-GRPO Eq. 2
            softmax weights (qwen families only).
        seed: seeds routers and noise.
        experts_implementation: experts kernel: ``"expertrl_grouped_mm"`` (``moe.experts``), or transformers'
            ``"grouped_mm"``, ``"eager"`` or ``"batched_mm"``.
    """
    _check_args(num_experts, top_k, noise_std, router_init_std)
    dense_cfg = dense_model.config.to_dict()
    target = target_for(dense_cfg["model_type"], dense_cfg)  # an unsupported or MoE model fails before any reading
    dense_layers = _decoder(dense_model, target).layers
    head_dim = int(dense_layers[0].self_attn.head_dim)
    moe_type, fields = moe_config_fields(
        dense_cfg, head_dim=head_dim, num_experts=num_experts, top_k=top_k, norm_topk_prob=norm_topk_prob
    )
    config = AutoConfig.for_model(moe_type, experts_implementation=experts_implementation, **fields)
    param = next(dense_model.parameters())
    auto_class = AutoModelForImageTextToText if target.vision_language else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):  # from_config's random init must not move the caller's RNG
        moe = auto_class.from_config(
            config, dtype=param.dtype, attn_implementation=_attn_implementation(dense_model.config)
        )
    moe.to(param.device)
    moe_layers = _decoder(moe, target).layers

    src, dst = _split(dense_model, dense_layers), _split(moe, moe_layers)
    if src.keys() != dst.keys():
        raise ValueError(
            f"{moe_type} does not reproduce {dense_cfg['model_type']}'s non-FFN weights: only in the dense model "
            f"{sorted(src.keys() - dst.keys())}, only in the MoE model {sorted(dst.keys() - src.keys())}"
        )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in src.items():
            assert dst[key].shape == value.shape, (key, dst[key].shape, value.shape)
            dst[key].copy_(value)
        for dense_layer, moe_layer in zip(dense_layers, moe_layers, strict=True):
            ffn, block = dense_layer.mlp, moe_layer.mlp
            router = torch.randn(block.gate.weight.shape, generator=gen) * router_init_std  # (E, H)
            block.gate.weight.copy_(router)
            gate_up, down = expert_weights(
                ffn.gate_proj.weight,
                ffn.up_proj.weight,
                ffn.down_proj.weight,
                num_experts=num_experts,
                noise_std=noise_std,
                generator=gen,
            )
            block.experts.gate_up_proj.copy_(gate_up)  # (E, 2I, H)
            block.experts.down_proj.copy_(down)  # (E, H, I)
            if moe_type == "qwen2_moe":  # inert shared expert: output and gradients exactly zero
                for p in (*block.shared_expert.parameters(), *block.shared_expert_gate.parameters()):
                    p.zero_()
    moe.generation_config = copy.deepcopy(dense_model.generation_config)
    moe.train(dense_model.training)
    return moe


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, active per token) parameters: a token uses K of the E routed experts of each MoE layer (dense: all)."""
    total, inactive = 0, 0
    for name, p in model.named_parameters():
        total += p.numel()
        if ".mlp.experts." in name:  # fused (E, ...) expert tensors; shared experts are always active
            top_k = model.config.get_text_config().num_experts_per_tok  # a VLM keeps it in text_config
            inactive += p.numel() * (p.shape[0] - top_k) // p.shape[0]
    return total, total - inactive


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
)
"""A vision-language checkpoint's image/video processor files (``save_vlm`` writes ``processor_config.json``; Hub
checkpoints split it into the preprocessor files), copied next to ``TOKENIZER_FILES``."""


def upcycle_checkpoint(src_dir: str | Path, dst_dir: str | Path, *, overwrite: bool = False, **kwargs) -> Path:
    """Upcycle a local dense ``save_pretrained`` directory into ``dst_dir`` (written atomically).

    Loads with ``local_files_only=True`` and no remote code, in the checkpoint's dtype; copies the tokenizer and
    processor files present (``TOKENIZER_FILES``, ``PROCESSOR_FILES``) and writes ``upcycled_from.json`` (source,
    model types, E, K, noise, seed). A dense Qwen3-VL gives a Qwen3-VL-MoE that ``expertrl.vlm_models.load_vlm`` and
    ``AutoModelForImageTextToText`` read.

    Args:
        src_dir: the dense checkpoint directory.
        dst_dir: where the MoE checkpoint goes; must not exist unless ``overwrite``.
        overwrite: replace an existing ``dst_dir``.
        **kwargs: keyword arguments of ``upcycle`` (checked before anything is loaded).
    """
    return upcycle_checkpoint_models(src_dir, dst_dir, overwrite=overwrite, **kwargs)[0]


def upcycle_checkpoint_models(
    src_dir: str | Path, dst_dir: str | Path, *, overwrite: bool = False, **kwargs
) -> tuple[Path, PreTrainedModel, PreTrainedModel]:
    """``upcycle_checkpoint`` that also returns the dense and the upcycled model (``expertrl upcycle`` reports
    their sizes)."""
    try:
        bound = inspect.signature(upcycle).bind(None, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad upcycle option: {e}; options: {list(inspect.signature(upcycle).parameters)[1:]}") from e
    bound.apply_defaults()
    opts = {k: v for k, v in bound.arguments.items() if k != "dense_model"}
    _check_args(opts["num_experts"], opts["top_k"], opts["noise_std"], opts["router_init_std"])
    src, dst = Path(src_dir), Path(dst_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"src_dir {str(src)!r} does not exist (expected a local save_pretrained directory)")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"src_dir {str(src)!r} has no config.json; is it a save_pretrained directory?")
    if dst.resolve() == src.resolve():
        raise ValueError(f"dst_dir must differ from src_dir ({str(src)!r}); upcycling never overwrites its source")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"dst_dir {str(dst)!r} already exists; pass overwrite=True (--overwrite) to replace it")
    source_cfg = json.loads((src / "config.json").read_text())
    target = target_for(source_cfg.get("model_type", "<missing model_type>"), source_cfg)  # fail before any weights
    auto_class = AutoModelForImageTextToText if target.vision_language else AutoModelForCausalLM
    dense = auto_class.from_pretrained(src, dtype="auto", local_files_only=True, trust_remote_code=False)
    moe = upcycle(dense, **opts)
    record = {
        "source": str(src.resolve()),
        "source_model_type": dense.config.model_type,
        "model_type": moe.config.model_type,
        **{k: v for k, v in opts.items() if k != "experts_implementation"},
    }

    def write(tmp: Path) -> None:
        moe.save_pretrained(tmp, safe_serialization=True)
        for name in (*TOKENIZER_FILES, *PROCESSOR_FILES):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        (tmp / "upcycled_from.json").write_text(json.dumps(record, indent=2) + "\n")

    return atomic_save_dir(dst, write), dense, moe
