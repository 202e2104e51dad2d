"""export_megatron_checkpoint's reading, in this process (the whole export against the live one runs in the Megatron
launches: tests/megatron/test_megatron_parallel.py): the fp32 main values rebuilt from the data-parallel replicas'
flat shards, and a module's score row found in its chunk's table."""
import torch

from beamlora_ds.export.megatron_checkpoint import fp32_parameters, module_values


def replica(owned, shard, working):
    return {"params": {"w": working}, "owned": {"w": owned} if owned[1] else {}, "optimizer": {"w": {"param": shard}}}


def test_the_main_values_come_from_every_replicas_shard_and_a_shard_may_cut_a_row():
    main = torch.arange(12, dtype=torch.float32).view(3, 4) / 7
    working = main.to(torch.bfloat16)  # what the bf16 working copy holds: not what is exported
    replicas = [replica((0, 5), main.reshape(-1)[:5].clone(), working),
                replica((5, 7), main.reshape(-1)[5:].clone(), working), replica((0, 0), torch.zeros(0), working)]
    assert torch.equal(fp32_parameters(replicas)["w"], main)
    assert torch.equal(fp32_parameters(replicas[:1])["w"], working.float())  # a shard missing: the working copy


def test_a_modules_score_is_its_row_of_its_own_chunks_table():
    values = {"0.decoder.layers.0.mlp.linear_fc1.lora_A": torch.ones(2, 3), "0.decoder.layers.0.mlp.linear_fc1.lora_B":
              torch.ones(3, 2), "0.beamlora_scores.lora_score": torch.tensor([[1.0, 2.0]]),
              "1.decoder.layers.0.mlp.linear_fc1.lora_A": torch.zeros(2, 3), "1.decoder.layers.0.mlp.linear_fc2.lora_A":
              torch.zeros(2, 3), "1.decoder.layers.0.mlp.linear_fc1.lora_B": torch.zeros(3, 2),
              "1.decoder.layers.0.mlp.linear_fc2.lora_B": torch.zeros(3, 2),
              "1.beamlora_scores.lora_score": torch.tensor([[3.0, 4.0], [5.0, 6.0]])}
    assert module_values(values, "1.decoder.layers.0.mlp.linear_fc2")[2].tolist() == [5.0, 6.0]
    assert module_values(values, "0.decoder.layers.0.mlp.linear_fc1")[2].tolist() == [1.0, 2.0]
