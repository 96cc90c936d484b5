"""Rollout engines other than the embedded one (``rollout.generate_rollout``, transformers' ``generate``).

``engines.vllm.VllmEngine``: a vLLM engine in the training process, with expertrl's routing inside it
(``engines.router.EngineRouter``): the engine's top-K routes captured for R3, or K of E experts sampled per token
for MoE-GRPO, recorded so the trainer replays exactly what the engine did. Its ``generate_rollout`` returns the same
``types.Rollout`` as the hf engine.
"""

ENGINES = ("hf", "vllm")
"""``rollout.engine`` choices."""
