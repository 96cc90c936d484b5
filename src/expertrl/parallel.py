"""Several processes, ``parallel=fsdp2``: sharding the policy with PyTorch FSDP2 and what that changes around it.

``train`` runs data-parallel over ``torchrun`` / ``accelerate launch`` processes. With ``parallel=ddp`` accelerate's
wrapper does everything; with ``parallel=fsdp2`` the loop calls these helpers instead:

    refuse_accelerate_fsdp(accelerator)   # at start-up: accelerate's own FSDP plugin is not what shards the model
    check_shardable(model, tokenizer)     # text MoE models only
    broadcast_weights(model)              # every rank starts from rank 0's weights, as DDP does
    shard_model(model)                    # fully_shard per decoder layer, then the root; generate decodes fixed-length
    gather_full_state(model, optimizer)   # collective: the full weights and optimizer state for a checkpoint
    load_full_optimizer_state(...)        # collective: a resumed run's optimizer state, each rank keeps its shard

Every forward of a sharded model all-gathers, so every rank must run the same forwards in the same order.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from expertrl.config import ConfigError
from expertrl.decoding import is_processor


def refuse_accelerate_fsdp(accelerator) -> None:
    """Raise if the launch configures accelerate's FSDP plugin (a no-op on CPU); expertrl shards with ``fully_shard``
    itself (``parallel=fsdp2``) under a plain multi-process launch."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError(
            "parallel: this launch configures accelerate's FSDP plugin, which expertrl does not use; launch with a "
            "plain multi-process config (accelerate launch --multi_gpu, or torchrun) and set --parallel fsdp2"
        )


def check_shardable(model: nn.Module, tokenizer) -> None:
    """Raise unless ``parallel=fsdp2`` can shard ``model``: text MoE models only (a VLM comes with a processor)."""
    if is_processor(tokenizer):
        raise ConfigError(
            f"parallel: fsdp2 shards text MoE models only, but {type(model).__name__} is a vision-language model; "
            "use parallel=ddp"
        )


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2 (``parallel=fsdp2``): ``fully_shard`` every decoder layer (the model's ``_no_split_modules`` classes),
    then the root (embeddings, final norm, LM head), over all processes. In place; returns the model.

    A router lives inside its decoder layer's unit, so whenever the (``route``-patched) router runs, its ``weight``
    is the gathered, unsharded parameter. Every forward all-gathers, so every rank must run the same forwards:
    ``generate`` is made to decode a fixed number of steps (``fixed_length_generate``)."""
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        raise ValueError(
            f"parallel=fsdp2: {type(model).__name__} names no decoder-layer class in _no_split_modules, so there is "
            "nothing to shard layer by layer; use parallel=ddp"
        )
    for unit in units:
        fully_shard(unit)
    fully_shard(model)
    fixed_length_generate(model)
    return model


def fixed_length_generate(model: nn.Module) -> None:
    """Make ``model.generate`` decode exactly ``max_new_tokens`` steps on every rank (instance patch).

    Hugging Face's ``generate`` stops when every row of *this rank's* batch has hit EOS; under FSDP2 that desyncs the
    ranks' all-gathers. Its ``synced_gpus`` (on by default for FSDP) keeps a finished rank running dummy forwards,
    but those pass through the routers and would enter ``route``'s routing trace. Instead EOS stopping is switched
    off, and each row's tokens after its first EOS are replaced by the pad token, as ``generate`` pads finished
    rows: the tokens up to EOS are unchanged, the batch is only right-padded to the full ``max_new_tokens`` (pads are
    masked everywhere downstream). Costs the decode steps a rank would have skipped."""
    inner = model.generate

    @functools.wraps(inner)
    def generate(*args, eos_token_id=None, pad_token_id=None, **kwargs):
        eos = model.generation_config.eos_token_id if eos_token_id is None else eos_token_id
        pad = model.generation_config.pad_token_id if pad_token_id is None else pad_token_id
        prompt = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        sequences = inner(*args, eos_token_id=None, pad_token_id=pad, synced_gpus=False, **kwargs)  # (B, P+C)
        if eos is None:
            return sequences
        completion = sequences[:, prompt.shape[1] :]  # (B, C)
        is_eos = torch.isin(completion, torch.tensor(eos, device=completion.device).reshape(-1))  # (B, C)
        after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # (B, C) strictly after the first EOS
        return torch.cat([sequences[:, : prompt.shape[1]], completion.masked_fill(after_eos, pad)], dim=1)

    model.generate = generate


def broadcast_weights(model: nn.Module) -> None:
    """Copy rank 0's weights (and buffers) to every rank, in place, before sharding (what DDP does when it wraps)."""
    for tensor in model.state_dict().values():
        torch.distributed.broadcast(tensor.data, src=0)


def is_sharded(model: nn.Module) -> bool:
    """True for a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gather_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """The full (unsharded) weights and optimizer state of an FSDP2-sharded model, on the CPU of rank 0.

    Collective: every rank must call it, in the same order. Rank 0 gets the full dicts, the other ranks empty ones.
    The optimizer state is keyed by parameter name (``torch.distributed.checkpoint``'s full optimizer state dict),
    not by index as ``optimizer.state_dict()`` is; ``load_full_optimizer_state`` reads it back, at any world size.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=options)
    return weights, optim


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state (``gather_full_state``'s, as saved in ``optimizer.pt``) into the optimizer of an
    FSDP2-sharded ``model``; every rank passes the whole state and keeps its own shard. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
