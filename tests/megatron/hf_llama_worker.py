"""Megatron GPT vs Hugging Face logits, through beamlora_ds.backends.megatron.hf_llama (CPU, gloo).

For each --sp setting in turn (the same processes: the model-parallel state is destroyed and set up again), for
each test architecture: build the HF model (the same seeded weights on every process, every tensor perturbed so
that no norm weight is 1 and no bias 0), `build_gpt` + `load_hf_into_gpt` for this tensor-parallel rank, run a
fixed batch through both, gather the vocabulary slices of Megatron's logits and compare. Rank 0 writes the JSON.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_shims  # noqa: E402,F401  (first: before megatron builds anything)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

BATCH, SEQ = 2, 10  # SEQ divisible by the tensor-parallel size (sequence parallelism splits it)


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--sp", default="off", help="comma-separated: off, on (each run one after another)")
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)  # passed by the launcher; RANK etc. say the same
    return p.parse_args()


def architectures():
    """{name: HF model}: the built-in tiny Llama (GQA, untied); a tied-embedding MHA Llama with head_dim != hidden /
    heads and another rope_theta; a Qwen2 with q/k/v biases."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from beamlora_ds.loading.builtin import tiny_llama

    tied = LlamaConfig(vocab_size=80, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=64,
                       tie_word_embeddings=True, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    qwen2 = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        tie_word_embeddings=False)
    models = {"tiny_llama": tiny_llama(torch.float32)}
    torch.manual_seed(7)
    models["tied_mha_llama"] = LlamaForCausalLM(tied)
    models["qwen2_qkv_bias"] = Qwen2ForCausalLM(qwen2)
    torch.manual_seed(11)
    with torch.no_grad():
        for model in models.values():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return {name: model.eval() for name, model in models.items()}


def megatron_logits(model, ids):
    """Megatron's logits of `ids`, the tensor-parallel vocabulary slices gathered: [b, s, vocab]."""
    from megatron.core import parallel_state

    seq = ids.shape[1]
    positions = torch.arange(seq).unsqueeze(0).expand_as(ids)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]  # True: masked out
    with torch.no_grad():
        local = model(ids, positions, mask)
    group = parallel_state.get_tensor_model_parallel_group()
    slices = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(slices, local.contiguous(), group=group)
    return torch.cat(slices, dim=-1)


def compare(name, hf_model, tp, sp):
    from megatron.core import parallel_state

    from beamlora_ds.backends.megatron.hf_llama import build_gpt, load_hf_into_gpt

    config = hf_model.config
    gpt = build_gpt(config, tensor_parallel=tp, sequence_parallel=sp).eval()
    rank = parallel_state.get_tensor_model_parallel_rank()
    filled = load_hf_into_gpt(gpt, hf_model, config, tp_size=tp, tp_rank=rank)
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf_model(ids).logits
    got = megatron_logits(gpt, ids)
    norms_marked = all(getattr(p, "sequence_parallel", None) == sp
                       for n, p in gpt.named_parameters() if n.endswith("layernorm.weight"))
    return {"model": name, "tp": tp, "sp": sp, "shape": list(got.shape),
            "max_abs_diff": (got - expected).abs().max().item(), "logit_scale": expected.abs().max().item(),
            "filled": len(filled), "norms_marked": norms_marked}


def refusals(hf_model, tp):
    """What strict loading says about a state with a tensor missing, and about another rank's layout."""
    from megatron.core import parallel_state

    from beamlora_ds.backends.megatron.hf_llama import build_gpt, load_hf_into_gpt

    config = hf_model.config
    gpt = build_gpt(config, tensor_parallel=tp)
    state = dict(hf_model.state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    said = {"names": sorted(gpt.state_dict())}
    for case, call in (("missing", lambda: load_hf_into_gpt(gpt, state, config, tp, 0)),
                       ("wrong_tp", lambda: load_hf_into_gpt(gpt, hf_model, config, tp * 2, 0))):
        try:
            call()
            said[case] = None
        except (KeyError, ValueError) as e:
            said[case] = f"{type(e).__name__}: {e}"
    said["rank"] = parallel_state.get_tensor_model_parallel_rank()
    return said


def check(tp, sp_settings):
    """Every architecture compared under each sequence-parallel setting ("off,on"), and the refusals: what
    main() writes, callable from another worker in processes already in a group."""
    from megatron.core import parallel_state

    models = architectures()
    results, refused = [], None
    for sp in [s == "on" for s in sp_settings.split(",")]:
        start = time.time()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        cpu_shims.init_rng()
        if refused is None:
            refused = refusals(models["tiny_llama"], tp)
        for name, model in models.items():
            results.append(compare(name, model, tp, sp))
        parallel_state.destroy_model_parallel()
        results[-1]["seconds_for_this_sp_setting"] = round(time.time() - start, 2)
    return {"world": dist.get_world_size(), "results": results, "refusals": refused}


def main():
    args = parse()
    dist.init_process_group("gloo")
    result = check(args.tp, args.sp)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
