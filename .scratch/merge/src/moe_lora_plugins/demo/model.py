"""The demo's model: a tiny Qwen3-MoE (a dense first layer, then MoE layers) with random weights and a
word-level tokenizer, made on the spot.

Nothing is downloaded. The checkpoint is what both sides load: vLLM serves it, Megatron-Bridge
reads it into the trainer's parallel layout. Sizes are chosen for a 2-core CPU: head_dim 32 (the
vLLM CPU attention backend needs >= 32), float32.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

BOS, EOS, UNK = 1, 2, 0


@dataclass(frozen=True)
class TinyMoeSpec:
    """Sizes of the demo model; ``num_layers`` must split evenly over the pipeline stages.

    ``dense_layers`` (HF ``mlp_only_layers``) have a dense SwiGLU MLP of ``intermediate_size`` instead of
    experts, like the first layers of many MoE checkpoints, so the demo puts LoRA on a dense MLP too.
    """

    vocab_size: int = 64
    hidden_size: int = 64
    intermediate_size: int = 128
    dense_layers: tuple[int, ...] = (0,)
    num_layers: int = 4
    num_heads: int = 2
    num_kv_heads: int = 1
    head_dim: int = 32
    num_experts: int = 4
    experts_per_token: int = 2
    moe_intermediate_size: int = 32
    max_positions: int = 128

    def token_name(self, token_id: int) -> str:
        return {UNK: "<unk>", BOS: "<s>", EOS: "</s>"}.get(token_id, f"t{token_id}")


def hf_config(spec: TinyMoeSpec):  # -> transformers.Qwen3MoeConfig
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        mlp_only_layers=list(spec.dense_layers),
        moe_intermediate_size=spec.moe_intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.experts_per_token,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=EOS,
        initializer_range=0.1,
        torch_dtype="float32",
        architectures=["Qwen3MoeForCausalLM"],
    )


def _write_tokenizer(spec: TinyMoeSpec, path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {spec.token_name(i): i for i in range(spec.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(path))


def make_tiny_moe(path: str | Path, spec: TinyMoeSpec | None = None, seed: int = 0) -> Path:
    """Write a randomly initialised Qwen3-MoE checkpoint (safetensors, float32) and its tokenizer to ``path``."""
    import torch
    from transformers import Qwen3MoeForCausalLM

    spec = spec or TinyMoeSpec()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(hf_config(spec)).to(torch.float32)
    model.save_pretrained(str(out))
    _write_tokenizer(spec, out)
    (out / "moelora_demo_spec.json").write_text(json.dumps(asdict(spec), indent=1) + "\n")
    return out
