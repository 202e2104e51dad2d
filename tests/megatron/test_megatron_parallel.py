"""BeamLoRA on megatron-core in real multi-process runs (CPU, gloo) against the single-process run of the same tiny
GPT: tensor parallelism with and without sequence parallelism, data parallelism with the DistributedOptimizer and
with the plain optimizer, tensor x data parallelism, pipeline parallelism (plain, virtual, with tensor or data
parallelism: one reset over every stage's modules); stop and resume; the peft export. The same pruned sets (the
whole model's names) at every reset, losses within 1e-5, the consolidated adapter within 1e-4."""
import pytest
import torch

pytestmark = pytest.mark.slow

LOSS_TOLERANCE, ADAPTER_TOLERANCE = 1e-5, 1e-4


def adapter_difference(run, reference):
    return max((torch.tensor(run["adapter"][name][key]) - torch.tensor(values)).abs().max().item()
               for name, module in reference["adapter"].items() for key, values in module.items())


def assert_follows(run, reference, label):
    assert run["order"] == reference["order"], label  # every stage's modules, in the one-process order
    assert run["pruned"] == reference["pruned"], label
    assert max(abs(a - b) for a, b in zip(run["losses"], reference["losses"])) <= LOSS_TOLERANCE, label
    assert adapter_difference(run, reference) <= ADAPTER_TOLERANCE, label


def test_the_single_process_reference_resets_and_learns(launched):
    reference = launched(1)
    for importance in ("score", "norm"):
        run = reference[f"tp1/{importance}"]
        assert [step for step, _ in run["pruned"]] == [2, 4], importance  # every reset pruned something
        assert all(pruned for _, pruned in run["pruned"]), importance
        assert run["losses"][-1] < run["losses"][0], importance


@pytest.mark.parametrize("nproc, layout", [
    (2, "tp2sp/score"), (2, "tp2/norm"),      # tensor parallelism, with and without sequence parallelism
    (2, "tp1/score"), (2, "tp1/norm"),        # data parallelism: the DistributedOptimizer,
    (2, "tp1-plain/norm"),                    # and the plain optimizer
    (2, "tp2-plain/score"),
    (4, "tp2sp/score"),                       # tensor x data parallelism, the DistributedOptimizer
    (2, "tp1pp2/norm"),                       # pipeline parallelism: stages of 4 and 1 modules
    (2, "tp1pp2vp2L4/score"),                 # a virtual pipeline: 2 chunks per process, layers 0 and 2 on stage 0
    (4, "tp2pp2sp/score"),                    # tensor x pipeline parallelism, sequence parallel
    (4, "tp1pp2/score"),                      # pipeline x data parallelism, the DistributedOptimizer
])
def test_a_parallel_run_follows_the_single_process_run(launched, nproc, layout):
    shape, importance = layout.split("/")
    reference = launched(1)[f"tp1L4/{importance}" if "L4" in shape else f"tp1/{importance}"]
    assert_follows(launched(nproc)[layout], reference, f"{nproc} processes, {layout}")


def test_a_distributed_optimizer_shard_boundary_falls_inside_an_adapter_parameter(launched):
    """What makes the data-parallel runs test the shard cut (a row of A or a column of B split between processes)."""
    assert launched(2)["tp1/score"]["cut_parameters"] >= 1
    assert launched(4)["tp2sp/score"]["cut_parameters"] >= 1
    assert launched(4)["tp1pp2/score"]["cut_parameters"] >= 1
    assert launched(2)["tp1-plain/norm"]["cut_parameters"] == 0


def test_the_distributed_optimizer_shards_are_rebuilt_with_all_reduces(launched):
    """Data parallel runs all-reduce the importance and the refill across the shards; a tensor-parallel-only run with
    the plain optimizer needs none (every process holds its whole slice)."""
    assert launched(2)["tp1/score"]["all_reduce_bytes"] > 0
    assert launched(4)["tp2sp/score"]["all_reduce_bytes"] > 0
    assert launched(2)["tp2-plain/score"]["all_reduce_bytes"] == 0


@pytest.mark.parametrize("nproc, layout", [(1, "tp1"), (2, "tp1"), (4, "tp2pp2sp")])  # 2: DP=2, shards cut
def test_stop_and_resume_equals_the_uninterrupted_run(launched, nproc, layout):
    result = launched(nproc)
    resumed, uninterrupted = result[f"{layout}/resumed"], result[f"{layout}/score"]
    assert resumed["pruned"] == uninterrupted["pruned"]
    assert resumed["losses"] == uninterrupted["losses"]
    assert adapter_difference(resumed, uninterrupted) == 0.0


@pytest.mark.parametrize("nproc", [1, 2, 4])
def test_the_exported_adapter_loads_in_stock_peft_with_the_same_logits(launched, nproc):
    export = launched(nproc)["export"]  # nproc 2: tensor and sequence parallel; 4: and two pipeline stages
    assert export["resets"] >= 1 and export["pruned"] > 0
    assert export["max_abs_diff"] <= 1e-4, export
    assert export["adapter_effect"] > 100 * max(export["max_abs_diff"], 1e-6)  # the adapter changed the logits
    assert export["peft_modules"] == 7  # q, k, v, o, gate, up, down
    assert export["decayed_scores"] == []  # megatron_optimizer_overrides keeps weight decay off the scores,
    assert 0.01 in export["group_weight_decays"]  # not off A and B
    assert "adapter_model.safetensors" in export["files"]
    assert export["layers"] == [0, 1]  # every stage's layers, numbered as in the whole model
    assert export["offline_equals_live"]  # export_megatron_checkpoint on the run's checkpoint, no process group
