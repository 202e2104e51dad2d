"""The base fingerprint a checkpoint records (base_identity.py): the same for the same weights however they were
loaded, another for other weights in what it samples, and the refusal naming both bases. (Read through ZeRO-3
shards and refused on a real resume: tests/distributed/test_export_zero.py.)"""
import logging

import torch

import beamlora_ds
from beamlora_ds.backends.deepspeed.zero_params import values_held_at
from beamlora_ds.checkpointing.base_identity import base_identity, identity_problem
from helpers import tiny_llama

CONFIG = beamlora_ds.BeamLoRAConfig(r=2, alpha=4.0, total_steps=8, interval=4)


def fingerprint(model, name=None):
    if name:
        model.config.name_or_path = name
    beamlora_ds.apply(model, CONFIG)
    return base_identity(model)


def test_the_same_weights_give_the_same_fingerprint_in_bf16_and_fp32():
    a, b = fingerprint(tiny_llama(seed=0), "here/llama"), fingerprint(tiny_llama(seed=0).to(torch.bfloat16))
    assert a["fingerprint"] == b["fingerprint"] and len(a["fingerprint"]) == 16
    assert (a["name"], b["name"]) == ("here/llama", None)


def test_what_is_sampled_tells_bases_apart_and_what_is_not_does_not():
    reference = fingerprint(tiny_llama(seed=0))["fingerprint"]
    assert fingerprint(tiny_llama(seed=1))["fingerprint"] != reference  # other random weights
    norm = tiny_llama(seed=0)
    with torch.no_grad():
        norm.model.norm.weight.mul_(1.05)  # a fine-tune moves the norms
    assert fingerprint(norm)["fingerprint"] != reference
    embedding = tiny_llama(seed=0)
    with torch.no_grad():
        embedding.model.embed_tokens.weight[0, 0] += 0.5  # position 0 is sampled
    assert fingerprint(embedding)["fingerprint"] != reference
    assert fingerprint(tiny_llama(seed=0, layers=3))["fingerprint"] != reference  # another architecture
    projection = tiny_llama(seed=0)
    with torch.no_grad():
        projection.model.layers[0].self_attn.q_proj.weight += 0.5  # documented: projections are not sampled
    assert fingerprint(projection)["fingerprint"] == reference


def test_another_base_is_refused_naming_both_and_a_new_name_for_the_same_weights_is_not(caplog):
    saved = {"name": "meta-llama/Llama-2-7b-hf", "fingerprint": "aaaa", "included": False}
    problem = identity_problem(saved, {"name": "meta-llama/Llama-2-7b-chat-hf", "fingerprint": "bbbb"}, "global_step9")
    assert "'global_step9'" in problem and "'meta-llama/Llama-2-7b-hf' (fingerprint aaaa)" in problem
    assert "'meta-llama/Llama-2-7b-chat-hf' (fingerprint bbbb)" in problem
    assert "--model_name_or_path meta-llama/Llama-2-7b-hf" in problem
    with caplog.at_level(logging.INFO):
        assert identity_problem(saved, {"name": "/models/llama-2-7b", "fingerprint": "aaaa"}, "global_step9") is None
    assert "/models/llama-2-7b" in caplog.text and "the same weights" in caplog.text
    assert identity_problem(None, {"name": "x", "fingerprint": "bbbb"}, "t") is None  # recorded nothing: accepted


def test_values_held_at_reads_flat_positions_of_a_whole_tensor():
    t = torch.arange(12.0).reshape(3, 4)
    assert values_held_at(t, [0, 5, 11, 12]) == {0: 0.0, 5: 5.0, 11: 11.0}
