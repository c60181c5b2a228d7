"""Per-pipeline-stage seeds: ``seed + 100 * pp_rank``, as Megatron-LM's own initialisation does.

Hosts that seed every rank with the same number (SkyRL before #1213) initialise the layers of every
pipeline stage from the same random stream: stage 1's first layer equals stage 0's first layer, which
a world-size-1 model never has. Seeding per stage keeps stages distinct and reproducible.
"""

from __future__ import annotations

PP_SEED_STRIDE = 100


def pipeline_stage_seed(seed: int, pp_rank: int) -> int:
    """The seed a pipeline stage uses: ``seed + 100 * pp_rank``."""
    if pp_rank < 0:
        raise ValueError(f"pp_rank must be >= 0, got {pp_rank}")
    return int(seed) + PP_SEED_STRIDE * int(pp_rank)


def seed_this_rank(seed: int) -> int:
    """Seed torch (and Megatron's CUDA RNG tracker, on GPU) for this rank's pipeline stage; return the seed.

    Call after Megatron's model-parallel state is initialised and before the model is built.
    """
    import random

    import torch
    from megatron.core import parallel_state

    pp_rank = parallel_state.get_pipeline_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
    stage_seed = pipeline_stage_seed(seed, pp_rank)
    random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    try:
        import numpy as np

        np.random.seed(stage_seed % 2**32)
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(stage_seed)
    return stage_seed
