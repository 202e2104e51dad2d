"""BeamLoRACallback in a real transformers.Trainer (tiny built-in Llama, gradient accumulation 2, lora dropout):
resets at the right optimizer steps, and a run stopped at step 6 and resumed from the Trainer checkpoint ends
with exactly the adapter of the run that never stopped. Here in this process, without DeepSpeed; the ZeRO-3 form
(the same three runs, each a 2-process launch) is in tests/distributed/test_hf_zero.py."""
import os

import pytest
import torch

from trainer_runs import check_resume_is_exact

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_trainer_resets_and_resumes_exactly(tmp_path):
    check_resume_is_exact(tmp_path)


def test_trainer_never_decays_the_score(tmp_path):
    """weight_decay=0.1 in TrainingArguments: the Trainer's own optimizer decays A and B, never a lora_score."""
    import hf_worker

    decay = hf_worker.train(str(tmp_path / "run"), weight_decay=0.1)["decay"]
    scores = {n: d for n, d in decay.items() if n.endswith("lora_score")}
    assert scores and set(scores.values()) == {0.0}, scores
    assert {d for n, d in decay.items() if n.endswith(("lora_A", "lora_B"))} == {0.1}


def test_trainer_without_weight_decay_builds_one_parameter_group(tmp_path):
    """weight_decay=0: decayed and undecayed groups would be the same, so there is one (under ZeRO each group costs
    its own flat buffer and collectives per step)."""
    import hf_worker

    result = hf_worker.train(str(tmp_path / "run"), weight_decay=0.0)
    assert result["param_groups"] == 1
    assert set(result["decay"].values()) == {0.0} and any(n.endswith("lora_score") for n in result["decay"])


def test_beamlora_export_reads_trainer_checkpoints(tmp_path):
    """beamlora-export on a Trainer output_dir (its highest checkpoint-N) and on one checkpoint-N: stock peft loads
    the result onto a fresh base and reproduces the logits of the BeamLoRA model holding the run's final weights."""
    import hf_worker
    from peft import PeftModel

    import beamlora_ds
    from beamlora_ds.export import cli as export_cli
    from beamlora_ds.loading import builtin, models

    run = str(tmp_path / "run")
    result = hf_worker.train(run, weight_decay=0.0)
    assert sorted(os.listdir(run)) == ["checkpoint-12", "checkpoint-6"]
    assert export_cli.main([run, str(tmp_path / "latest")]) == 0
    assert export_cli.main([run, str(tmp_path / "six"), "--tag", "checkpoint-6"]) == 0
    assert export_cli.main([os.path.join(run, "checkpoint-6"), str(tmp_path / "six_direct")]) == 0
    assert export_cli.main([run, str(tmp_path / "nope"), "--tag", "checkpoint-7"]) == 2

    model = models.load_model(builtin.BUILTIN_TINY, torch.float32, {})
    beam = beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(r=4, alpha=8.0, dropout=0.05, interval=4,
                                                               total_steps=12, p0=0.7))
    with torch.no_grad():
        for name, value in result["weights"].items():  # <module>.<key>; lora_score is the module's table row
            module_name, _, key = name.rpartition(".")
            getattr(model.get_submodule(module_name), key).copy_(value)
    model.eval()
    ids = torch.randint(3, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(models.load_model(builtin.BUILTIN_TINY, torch.float32, {}),
                                           str(tmp_path / "latest")).eval()
    assert torch.allclose(peft_model(input_ids=ids).logits, expected, atol=1e-5)
    assert beam.global_step == 0  # the controller was only needed to build the model

    from safetensors.torch import load_file
    six, direct = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("six", "six_direct"))
    latest = load_file(str(tmp_path / "latest" / "adapter_model.safetensors"))
    assert six.keys() == latest.keys() and all(torch.equal(six[k], direct[k]) for k in six)
    assert any(not torch.equal(six[k], latest[k]) for k in six)  # step 6 is not step 12


def test_an_own_optimizer_that_decays_the_score_is_refused_before_the_first_step(tmp_path):
    import hf_worker

    with pytest.raises(ValueError, match="never decays the score.*optimizer_param_groups"):
        hf_worker.train(str(tmp_path / "run"), own_optimizer_decay=0.01)
    assert not os.path.exists(tmp_path / "run" / "checkpoint-6")


def test_processes_the_trainer_does_not_see_are_refused_with_the_fix(monkeypatch):
    """`deepspeed --num_gpus 2` on a machine without CUDA and without use_cpu=True: accelerate sees one process,
    so each would train alone (DeepSpeed's batch-size assertion was what users saw)."""
    from transformers import TrainingArguments

    from beamlora_ds.integrations.hf_trainer import check_processes_joined

    class Stub:  # only args is read
        args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])

    monkeypatch.setenv("WORLD_SIZE", "2")  # what the launcher sets in each process
    with pytest.raises(RuntimeError, match="started 2 processes.*use_cpu=True"):
        check_processes_joined(Stub())
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_processes_joined(Stub())


def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(tmp_path):
    """greater_is_better=True on the loss makes the first evaluated checkpoint (step 6) the best, so the model at
    the end must hold step 6's adapter, not step 12's."""
    import hf_worker
    from safetensors.torch import load_file

    result = hf_worker.train(str(tmp_path / "run"), best_at_end=True)
    assert result["best"].endswith("checkpoint-6")
    saved = load_file(os.path.join(result["best"], "beamlora_state.safetensors"))
    assert saved.keys() == result["weights"].keys()
    for name, value in saved.items():
        assert torch.equal(result["weights"][name], value), name


def test_a_stopped_run_resumes_from_its_latest_checkpoint(tmp_path):
    """A run stopped at step 6 and resumed with resume_from_checkpoint=True (the Trainer's newest checkpoint in its
    own output_dir) ends as the one that never stopped (test_trainer_resets_and_resumes_exactly resumes another
    folder's checkpoint instead)."""
    import hf_worker

    full = hf_worker.train(str(tmp_path / "full"))
    stopped = hf_worker.train(str(tmp_path / "part"), stop_at=6)
    assert stopped["global_step"] == 6 and sorted(os.listdir(tmp_path / "part"))[:1] == ["checkpoint-6"]
    resumed = hf_worker.train(str(tmp_path / "part"), resume=True)
    assert resumed["global_step"] == 12 and resumed["history"] == full["history"]
    for name, value in full["weights"].items():
        assert torch.allclose(resumed["weights"][name], value, rtol=1e-6, atol=1e-7), name


def test_a_trainer_checkpoint_of_another_state_version_is_refused_before_loading(tmp_path):
    """A checkpoint-N whose BeamLoRA state has another version (1: written by an earlier development version, whose
    optimizer state held one score parameter per module) is refused by train(resume_from_checkpoint=True) with the
    way out, before the Trainer loads it (instead of torch's or DeepSpeed's size mismatch)."""
    import hf_worker

    hf_worker.train(str(tmp_path / "part"), stop_at=6)
    path = tmp_path / "part" / "checkpoint-6" / "beamlora_state_rank0.pt"
    state = torch.load(str(path), weights_only=False)
    state["beamlora"]["version"] = 1
    torch.save(state, str(path))
    with pytest.raises(ValueError, match="checkpoint-6.*version 1, this beamlora_ds reads version 2"):
        hf_worker.train(str(tmp_path / "part"), resume=True)


def test_a_trainer_checkpoint_of_another_base_is_refused_before_loading(tmp_path):
    """checkpoint-N records the base it trained (its fingerprint): resuming it on other weights is refused by
    train(resume_from_checkpoint=True), naming both, before the Trainer loads the adapter onto them."""
    import hf_worker

    hf_worker.train(str(tmp_path / "part"), stop_at=6)
    path = tmp_path / "part" / "checkpoint-6" / "beamlora_state_rank0.pt"
    state = torch.load(str(path), weights_only=False)
    assert len(state["base"]["fingerprint"]) == 16 and state["base"]["name"] == "builtin-tiny"
    state["base"] = {"name": "another-base", "fingerprint": "0123456789abcdef"}
    torch.save(state, str(path))
    with pytest.raises(ValueError, match="'checkpoint-6' was trained on the base 'another-base' .*but this run "
                                         "loaded 'builtin-tiny'"):
        hf_worker.train(str(tmp_path / "part"), resume=True)


def test_adapter_only_states_load_strictly_and_nothing_else_does():
    """The hook attach() registers: a state missing only frozen tensors (all of them, or all but a tied output
    embedding, which DeepSpeed keeps under its second name) loads strictly; a missing adapter tensor still fails."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import beamlora_ds
    from beamlora_ds.checkpointing.load import allow_adapter_only_state

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(r=2, alpha=4.0, total_steps=8, interval=4))
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(trainable)  # without the hook: refused
    model.register_load_state_dict_post_hook(allow_adapter_only_state)
    model.load_state_dict(trainable)
    model.load_state_dict({**trainable, "lm_head.weight": model.lm_head.weight.detach().clone()})
    first = next(iter(trainable))
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({k: v for k, v in trainable.items() if k != first})


def test_the_trainer_methods_beamlora_overrides_still_exist_with_their_signatures():
    """BeamLoRATrainerMixin overrides some private Trainer methods: a transformers release that renames or
    reshapes them must fail here, not silently save whole models again."""
    import inspect

    from transformers import Trainer

    from beamlora_ds.integrations.hf_trainer import BeamLoRATrainerMixin

    for name in ("get_decay_parameter_names", "create_optimizer", "save_model", "train", "_save_optimizer_and_scheduler",
                 "_load_from_checkpoint", "_load_best_model"):
        ours = list(inspect.signature(getattr(BeamLoRATrainerMixin, name)).parameters)
        theirs = list(inspect.signature(getattr(Trainer, name)).parameters)
        assert theirs[:len(ours) - ("args" in ours) - ("kwargs" in ours)] == \
            [p for p in ours if p not in ("args", "kwargs")], (name, ours, theirs)


def test_export_of_one_trainer_checkpoint_with_a_tag_is_refused_clearly(tmp_path, caplog):
    import hf_worker

    from beamlora_ds.export import cli as export_cli

    hf_worker.train(str(tmp_path / "run"))
    assert export_cli.main([str(tmp_path / "run" / "checkpoint-6"), str(tmp_path / "x"), "--tag", "global_step6"]) == 2
    assert "is one Trainer checkpoint" in caplog.text and "drop --tag global_step6" in caplog.text
