"""The trainer kit: small, separately testable pieces every Megatron RL trainer of a MoE model needs.

- ``moe_runtime``: the five MoE runtime settings (token dispatcher, load-balancing type, grouped
  GEMM, router score function, expert bias) as validated config, applied to a Megatron-Bridge
  provider before ``finalize()``;
- ``glm_bridge``: a GLM-4.7-Flash (``Glm4MoeLiteForCausalLM``) bridge, registered only where the
  installed Megatron-Bridge has none;
- ``seeding``: ``seed + 100 * pp_rank``, so pipeline stages do not initialise alike;
- ``grad_scale``: the model config's ``grad_scale_func`` wired to the optimizer's loss scale;
- weight sync with generation paused and always resumed: ``engines.payloads.paused_generation``
  (synchronous clients) and ``integrations.vllm_worker.paused_generation`` (``AsyncLLM``).

Hosts reach them through their integration module (``integrations/``); SkyRL's GLM-MoE work
(#1210-#1215) is where each of them was found missing.
"""
