"""Which decoder layers of a Qwen3-MoE-style model are MoE and which are dense, in HF and Megatron terms.

HF (transformers, vLLM) decides per layer: layer ``i`` is sparse iff ``i not in mlp_only_layers``,
``num_experts > 0`` and ``(i + 1) % decoder_sparse_step == 0``. Megatron-Core reads
``moe_layer_freq``: an int ``N`` (layer ``i`` is MoE iff ``i % N == 0``, note the different offset)
or a list of 0 (dense) / 1 (MoE) per layer. These functions translate between the two exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def hf_moe_layer_pattern(
    num_layers: int,
    num_experts: int | None,
    decoder_sparse_step: int | None = 1,
    mlp_only_layers: Iterable[int] | None = (),
) -> list[int]:
    """Per layer 1 (MoE) or 0 (dense MLP), by the HF Qwen3-MoE rule.

    ``decoder_sparse_step`` ``None`` counts as 1 (the HF default); it must be positive when the model
    has experts. Entries of ``mlp_only_layers`` outside ``0..num_layers-1`` select no layer (as in HF).
    """
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    if not num_experts:
        return [0] * num_layers
    step = 1 if decoder_sparse_step is None else int(decoder_sparse_step)
    if step < 1:
        raise ValueError(
            f"decoder_sparse_step must be >= 1 for a model with {num_experts} experts, got {decoder_sparse_step}; "
            "set it to 1 to make every layer (except mlp_only_layers) MoE"
        )
    dense = set(mlp_only_layers or ())
    return [int(i not in dense and (i + 1) % step == 0) for i in range(num_layers)]


def megatron_moe_layer_pattern(moe_layer_freq: int | Sequence[int], num_layers: int) -> list[int]:
    """Per layer 1 (MoE) or 0 (dense), as Megatron-Core reads ``moe_layer_freq`` (int or 0/1 list)."""
    if isinstance(moe_layer_freq, int):
        if moe_layer_freq < 1:
            raise ValueError(f"moe_layer_freq must be >= 1, got {moe_layer_freq}")
        return [int(i % moe_layer_freq == 0) for i in range(num_layers)]
    pattern = [int(v) for v in moe_layer_freq]
    if len(pattern) != num_layers or any(v not in (0, 1) for v in pattern):
        raise ValueError(
            f"moe_layer_freq {list(moe_layer_freq)} must list 0 (dense) or 1 (MoE) for each of the {num_layers} layers"
        )
    return pattern


def has_dense_layers(pattern: Sequence[int]) -> bool:
    """Whether any layer of a 0/1 pattern is dense."""
    return any(v == 0 for v in pattern)


def hf_sparse_fields(pattern: Sequence[int]) -> tuple[int, list[int]]:
    """``(decoder_sparse_step, mlp_only_layers)`` that give exactly ``pattern`` under the HF rule.

    Of all steps that reproduce the pattern, the one needing the fewest ``mlp_only_layers`` wins
    (ties: the smaller step), so a config written with a step comes back with that step.
    An all-dense pattern is step 1 with every layer listed.
    """
    pattern = [int(v) for v in pattern]
    if not any(pattern):
        return 1, list(range(len(pattern)))
    best: tuple[int, list[int]] | None = None
    for step in range(1, len(pattern) + 1):
        by_step = [int((i + 1) % step == 0) for i in range(len(pattern))]
        if any(want and not got for want, got in zip(pattern, by_step, strict=True)):
            continue  # mlp_only_layers can only turn MoE layers dense
        dense = [i for i, (want, got) in enumerate(zip(pattern, by_step, strict=True)) if got and not want]
        if best is None or len(dense) < len(best[1]):
            best = (step, dense)
    assert best is not None  # step 1 always reproduces a pattern
    return best
