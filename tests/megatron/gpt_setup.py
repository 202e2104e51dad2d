"""A tiny megatron-core GPT for the Megatron backend's test processes: the same weights in every tensor-parallel
layout (each parameter seeded by its name, then cut to this process's slice), fixed data, one training step.

Test processes only: import tests/megatron/cpu_shims.py before this module."""
import zlib

import torch

import cpu_shims
from beamlora_ds.backends.megatron.hf_llama import fuse_fc1_rows, split_fc1_rows

VOCAB, SEQ, HIDDEN, HEADS, GROUPS, FFN, LAYERS = 128, 16, 64, 4, 2, 128, 2
# every projection of layer 0, only fc1 of the others: the adapters' sizes are uneven, so the DistributedOptimizer's
# shard boundary cuts through a parameter (with every projection of both layers it falls between the layers), and
# pipeline stages hold different numbers of modules
TARGETS = r"decoder\.layers\.0\..*linear_\w+|decoder\.layers\.\d+\.mlp\.linear_fc1"


def initialize(tp: int, pp: int = 1, vp=None):
    """Megatron's process groups for tensor parallelism `tp`, pipeline parallelism `pp` (`vp`: virtual pipeline
    chunks per process), data parallelism the rest of the world."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vp)
    cpu_shims.init_rng()


def build_gpt(tp: int, sequence_parallel: bool = False, dtype=torch.float32, pp: int = 1, vp=None, layers=LAYERS):
    """The GPT of this process: its pipeline stage's layers (with `vp`, the list of its model chunks)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    import torch.nn.functional as F

    config = TransformerConfig(
        num_layers=layers, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS,
        ffn_hidden_size=FFN, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel, pipeline_dtype=dtype,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp, batch_p2p_sync=False)
    chunks = []
    for stage in range(vp) if vp else [None]:
        first = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        last = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        spec = cpu_shims.local_spec_allowing_sequence_parallel(get_num_layers_to_build(config, vp_stage=stage))
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                         share_embeddings_and_output_weights=False, pre_process=first, post_process=last,
                         vp_stage=stage)
        seed_weights(model, tp)
        chunks.append(model)
    return chunks if vp else chunks[0]


@torch.no_grad()
def seed_weights(model, tp: int) -> None:
    """The same full weights in every layout: each parameter drawn from a generator seeded by its name, then this
    process's slice of a tensor-parallel one."""
    from megatron.core import parallel_state

    from beamlora_ds.backends.megatron.layers import whole_model_name

    rank = parallel_state.get_tensor_model_parallel_rank()
    for local_name, p in model.named_parameters():
        name = whole_model_name(model, local_name)  # a pipeline stage's layers hold the whole model's weights
        shape = list(p.shape)
        split = getattr(p, "tensor_model_parallel", False)
        if split:
            shape[p.partition_dim] *= tp
        full = torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))) * 0.05
        if name.endswith("layernorm.weight"):
            full += 1.0
        if split:
            full = tensor_parallel_slice(name, full, tp, rank, p.partition_dim)
        p.copy_(full.to(p.dtype))


def tensor_parallel_slice(name: str, full: torch.Tensor, tp: int, rank: int, dim: int) -> torch.Tensor:
    """This process's slice of a whole tensor as Megatron lays it out: a gated fc1 (column-parallel, split on its
    rows) is [gate | up] whole and [gate_k | up_k] on process k (the converter's own map); everything else is a
    plain chunk (qkv: whole query groups)."""
    if "linear_fc1" in name:
        return fuse_fc1_rows(*full.chunk(2), tp)[rank]
    return full.chunk(tp, dim=dim)[rank]


def whole_from_slices(name: str, slices, dim: int) -> torch.Tensor:
    """The inverse of tensor_parallel_slice over every process's slice."""
    if "linear_fc1" in name:
        return torch.cat(split_fc1_rows(slices))
    return torch.cat(list(slices), dim=dim)


def batches(steps: int, micro_batches: int, micro_batch_size: int, seed: int = 1234):
    """Per step, `micro_batches` micro-batches of `micro_batch_size` sequences (the whole global batch)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        step = []
        for _ in range(micro_batches):
            tokens = torch.randint(0, VOCAB, (micro_batch_size, SEQ + 1), generator=generator)
            step.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()})
        out.append(step)
    return out


def causal_mask():
    """Megatron's convention, True = masked out (its default mask is built on "cuda")."""
    return torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    positions = torch.arange(SEQ).unsqueeze(0).expand_as(batch["tokens"])
    output = model(input_ids=batch["tokens"], position_ids=positions, attention_mask=causal_mask(),
                   labels=batch["labels"])

    def loss_func(per_token):
        loss = per_token.float().mean()
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func
