"""BeamLoRA on real bitsandbytes NF4 bases (CPU): the layer against a dequantized reference, a loaded 4-bit
Llama that trains through resets, and the refusals of check_4bit_request (before anything loads)."""
import os
import sys

import pytest
import torch
from torch import nn

from beamlora_ds import BeamLoRAConfig, BeamLoRALinear, apply, optimizer_param_groups
from beamlora_ds import testing
from beamlora_ds.loading import four_bit_load, four_bit_request
from beamlora_ds.loading.cpu_repacking import disable_cpu_repacking
from beamlora_ds.method.layer import is_4bit_linear
from helpers import tiny_llama

import bitsandbytes  # noqa: F401  (required: missing is an error, not a skip)
import bitsandbytes.functional as bnbf  # noqa: E402
from bitsandbytes.nn import Linear4bit  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def nf4_linear(in_f, out_f, compute_dtype, double_quant=True, storage=None, seed=0):
    """A Linear4bit quantized on the CPU from a seeded nn.Linear (returned too, for the unquantized weight)."""
    torch.manual_seed(seed)
    dense = nn.Linear(in_f, out_f)
    layer = Linear4bit(in_f, out_f, compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4",
                       quant_storage=storage or compute_dtype or torch.uint8)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu"), dense  # .to(device) quantizes


@pytest.mark.parametrize("compute, storage, expected", [
    (torch.float32, torch.bfloat16, torch.float32),  # bf16 storage (ZeRO-3) must not make an fp32 model's adapter bf16
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32, torch.bfloat16),
    (None, torch.uint8, torch.float32),
])
def test_adapter_dtype_is_the_compute_dtype_not_the_storage(compute, storage, expected):
    layer, _ = nf4_linear(64, 64, compute, storage=storage)
    assert is_4bit_linear(layer) and not is_4bit_linear(nn.Linear(4, 4))
    wrapped = BeamLoRALinear(layer, r=4, alpha=8)
    assert {p.dtype for p in (wrapped.lora_A, wrapped.lora_B, wrapped.lora_score)} == {expected}
    out = wrapped(torch.randn(2, 64, dtype=compute or torch.float32))
    assert out.dtype == (compute or torch.float32) and torch.isfinite(out).all()


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_4bit_forward_backward_equal_the_dequantized_reference(compute, double_quant):
    """Same A, B, score (non-zero) and input over the NF4 layer and over nn.Linear holding the dequantized weight.

    On the CPU bitsandbytes dequantizes to the compute dtype and runs the same torch GEMM, forward and backward, so
    we measured bit-identical results; the tolerance is torch's default for the dtype (fp32: 1.3e-6 relative,
    bf16: 1.6e-2). A wrong dequantization (absmax, double-quant constants, layout) moves weights by up to 15% of
    absmax: the unquantized weight itself is shown to miss by far more than the tolerance."""
    layer, dense = nf4_linear(128, 80, compute, double_quant)
    weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    reference = nn.Linear(128, 80, dtype=compute)
    with torch.no_grad():
        reference.weight.copy_(weight.to(compute))
        reference.bias.copy_(dense.bias.to(compute))
    ours, ref = BeamLoRALinear(layer, r=8, alpha=16), BeamLoRALinear(reference, r=8, alpha=16)
    torch.manual_seed(1)
    with torch.no_grad():
        ours.lora_B.normal_()
        ours.lora_score.normal_(std=0.05)
        for name in ("lora_A", "lora_B", "lora_score"):
            getattr(ref, name).copy_(getattr(ours, name))
    x = torch.randn(3, 5, 128, dtype=compute)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_ref = ours(x_ours), ref(x_ref)
    grad_out = torch.randn_like(y_ref)
    (y_ours * grad_out).sum().backward()
    (y_ref * grad_out).sum().backward()
    torch.testing.assert_close(y_ours, y_ref)
    torch.testing.assert_close(x_ours.grad, x_ref.grad)
    for name in ("lora_A", "lora_B", "lora_score"):
        torch.testing.assert_close(getattr(ours, name).grad, getattr(ref, name).grad, msg=name)
    assert layer.weight.grad is None and layer.weight.dtype == compute  # frozen, still packed
    with torch.no_grad():  # sensitivity: the unquantized base gives a clearly different output
        unquantized = nn.functional.linear(x.float(), dense.weight, dense.bias)
        base_only = nn.functional.linear(x.float(), weight.float(), dense.bias)
    assert (unquantized - base_only).abs().max() > 0.05


def _tokens(step, batch=4, length=16, vocab=64):
    """A learnable stream: token t+1 = token t + 1 (mod vocab), random starts."""
    g = torch.Generator().manual_seed(100 + step)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    return (start + torch.arange(length)) % vocab


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    # hidden 64: every projection has in_features >= 64 (bitsandbytes' blocksize)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama(seed=0, hidden=64).save_pretrained(folder)
    return str(folder)


def test_loaded_4bit_llama_trains_through_resets_without_touching_the_base(saved_tiny):
    model = four_bit_load.load_4bit_model(saved_tiny, None, compute_dtype=torch.float32)
    four_bit = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(four_bit) == 2 * 7 and model.training
    assert all(m.support_avx512bf16_for_cpu is False for m in four_bit)  # the repacking trap is off
    assert not any(p.requires_grad for p in model.parameters())
    packed_before = [m.weight.data.view(torch.uint8).clone() for m in four_bit]  # bits (as fp32 some are NaN)

    beam = apply(model, BeamLoRAConfig(r=8, alpha=16, dropout=0.0, interval=4, total_steps=12, p0=0.8, seed=0))
    assert all(isinstance(m.base_layer, Linear4bit) and m.lora_A.dtype == torch.float32 for m in beam.modules)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model), lr=5e-3)
    losses, records = [], []
    for step in range(1, 13):
        ids = _tokens(step)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        record = beam.step(optimizer)
        if record is not None:
            records.append(record)
        losses.append(loss.item())
        if step == 6:  # the trap's trigger: an eval-mode forward without grad (e.g. an evaluation mid-training)
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
            model.train()

    assert [r["step"] for r in records] == [4, 8]
    assert len(records[0]["pruned"]) > 0 and len(records[0]["sources"]) == len(records[0]["pruned"])
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses  # training goes on after the resets
    for m, before in zip(four_bit, packed_before):
        assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        assert torch.equal(m.weight.data.view(torch.uint8), before)  # frozen and never repacked in place


def test_state_dict_of_a_4bit_model_loads_back_strictly_and_refuses_another_base(saved_tiny):
    """What DeepSpeed's load_checkpoint does on resume: a strict load_state_dict of the saved module state."""
    saved = four_bit_load.load_4bit_model(saved_tiny, None, compute_dtype=torch.float32)
    apply(saved, BeamLoRAConfig(r=4, alpha=8, total_steps=10, interval=4))
    state = saved.state_dict()
    assert any(k.endswith("base_layer.weight.absmax") for k in state)  # the keys no module accepts by default
    fresh = four_bit_load.load_4bit_model(saved_tiny, None, compute_dtype=torch.float32)
    apply(fresh, BeamLoRAConfig(r=4, alpha=8, total_steps=10, interval=4))
    fresh.load_state_dict(state)  # strict
    other = four_bit_load.load_4bit_model(saved_tiny, None, compute_dtype=torch.float32, double_quant=False)
    apply(other, BeamLoRAConfig(r=4, alpha=8, total_steps=10, interval=4))
    with pytest.raises(RuntimeError, match="different 4-bit base"):
        other.load_state_dict(state)


def test_builtin_tiny_and_bf16_training_dtype_set_storage_and_adapter_dtype():
    config = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}
    model = four_bit_load.load_4bit_model("builtin-tiny", config, compute_dtype=torch.bfloat16, double_quant=False,
                                  gradient_checkpointing=True)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Linear4bit) and q_proj.weight.dtype == torch.bfloat16
    assert q_proj.weight.quant_state.nested is False and q_proj.compute_dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    beam = apply(model, BeamLoRAConfig(r=4, alpha=8, total_steps=10, interval=4))
    assert beam.modules[0].lora_A.dtype == torch.bfloat16
    ids = torch.randint(4, 60, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()  # through checkpointed blocks with frozen embeddings
    assert all(m.lora_A.grad is not None for m in beam.modules)


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("kwargs, message", [
    (dict(ds_config={"zero_optimization": {"stage": 3}}, device_map="auto"), "Remove device_map"),
    (dict(ds_config={"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}, compute_dtype=torch.float16),
     "compute_dtype=bf16"),
    (dict(ds_config={"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}}, compute_dtype=torch.bfloat16),
     "compute_dtype=fp16"),
    (dict(ds_config={"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}, quant_storage=torch.uint8),
     "Leave quant_storage unset"),
    (dict(ds_config={"zero_optimization": {"stage": 3}}, quant_storage=torch.bfloat16), "training dtype, fp32"),
    (dict(ds_config={"bf16": {"enabled": "auto"}}), "Resolve the config first"),
    (dict(ds_config={"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}), "Use ZeRO stage 2"),
    (dict(ds_config=None, compute_dtype=torch.int8), "use torch.bfloat16"),
    (dict(ds_config=None, double_quant="yes"), "use True or False"),
    (dict(ds_config={"zero_optimization": {"stage": 2}}, model_dtype=torch.bfloat16), "Leave model_dtype unset"),
    (dict(ds_config=None, model_dtype=torch.bfloat16, compute_dtype=torch.float16), "compute_dtype=bf16"),
])
def test_inconsistent_requests_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(four_bit_request.QuantizationError, match=message):
        four_bit_request.check_4bit_request(**kwargs)


def test_refusal_comes_before_any_loading():
    with pytest.raises(four_bit_request.QuantizationError, match="Remove device_map"):
        four_bit_request.check_4bit_request({"zero_optimization": {"stage": 3}}, device_map={"": 0})
    # a path that does not exist would fail in from_pretrained: the refusal must come first
    with pytest.raises(four_bit_request.QuantizationError, match="compute_dtype=bf16"):
        four_bit_load.load_4bit_model("/nonexistent/model", {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}},
                              compute_dtype=torch.float16)


def test_missing_bitsandbytes_is_refused_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(four_bit_request.QuantizationError, match="pip install 'bitsandbytes>="):
        four_bit_request.check_4bit_request(None)


def test_consistent_requests_resolve_storage_to_the_training_dtype():
    s = four_bit_request.check_4bit_request({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}})
    assert (s.compute_dtype, s.quant_storage, s.model_dtype, s.zero_stage) == (torch.bfloat16,) * 3 + (3,)
    s = four_bit_request.check_4bit_request({"zero_optimization": {"stage": 3}}, compute_dtype=torch.float32, double_quant=False)
    assert (s.quant_storage, s.double_quant) == (torch.float32, False)
    s = four_bit_request.check_4bit_request(None, model_dtype=torch.bfloat16)  # no DeepSpeed: the caller says
    assert (s.quant_storage, s.model_dtype, s.zero_stage) == (torch.bfloat16, torch.bfloat16, 0)
    s = four_bit_request.check_4bit_request({"zero_optimization": {"stage": 3}}, compute_dtype=torch.float32, double_quant=False)
    config = s.bnb_config()
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_quant_storage == torch.float32


@pytest.mark.skipif(not bnbf.has_avx512bf16(), reason="the repacking trap exists on AVX512-BF16 CPUs only")
def test_an_already_repacked_model_is_refused():
    layer, _ = nf4_linear(64, 64, torch.float32)
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))  # what from_pretrained's eval mode + an evaluation would do
    assert layer.weight.quant_state.packing_format_for_cpu
    with pytest.raises(four_bit_request.QuantizationError, match="already repacked"):
        disable_cpu_repacking(nn.Sequential(layer))


def test_train_py_refuses_before_loading(tmp_path):
    """--quantization nf4 with a ZeRO stage 0 bf16 config: exit 2 with the fix, nothing written."""
    config = tmp_path / "stage0.json"
    config.write_text('{"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", '
                      '"gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 0}}')
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["MASTER_PORT"] = str(testing.free_port())
    out = tmp_path / "out"
    proc = testing.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--model_name_or_path",
                        "builtin-tiny", "--quantization", "nf4", "--bf16", "--ds_config", str(config),
                        "--output_dir", str(out), "--max_steps", "4", "--interval", "2"],
                       timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error: ZeRO stage 0 with bf16" in proc.stderr and "qlora_single.json" in proc.stderr
    assert "Loaded" not in proc.stderr + proc.stdout and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_benchmark_refuses_cleanly_without_a_gpu():
    proc = testing.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_qlora.py"), "--quick"], timeout=120,
                       cwd=ROOT)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


def test_adapter_trained_on_a_4bit_base_loads_in_stock_peft_on_the_full_precision_base(saved_tiny, tmp_path):
    """The exported adapter is plain LoRA for the unquantized base: stock peft loads it onto the full-precision
    model, and on that model with the 4-bit layers' dequantized weights it reproduces the 4-bit BeamLoRA logits."""
    import peft
    from transformers import AutoModelForCausalLM

    import beamlora_ds
    from beamlora_ds.loading.cpu_repacking import dequantize_4bit_weight

    model = four_bit_load.load_4bit_model(saved_tiny, None, compute_dtype=torch.float32)
    beam = beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(r=4, alpha=8.0, dropout=0.0, interval=4,
                                                               total_steps=12))
    torch.manual_seed(3)
    with torch.no_grad():
        for m in beam.modules:
            m.lora_B.normal_(std=0.3)
            m.lora_score.normal_(std=0.05)
    beamlora_ds.save_adapter(model, str(tmp_path / "adapter"))
    ids = _tokens(0)
    model.train()  # keep bitsandbytes off its eval-mode CPU repacking path
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    full = AutoModelForCausalLM.from_pretrained(saved_tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, m in zip(beam.module_names, beam.modules):  # the base the 4-bit model really computed with
            full.get_submodule(name).weight.copy_(dequantize_4bit_weight(m.base_layer).float())
        without = full(input_ids=ids).logits
    loaded = peft.PeftModel.from_pretrained(full, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert (expected - without).abs().max() > 0.05  # the adapter really acts
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


# --------------------------------------------------------------- loading at scale (loading/staggered.py)
def anon_rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def test_a_dropped_weight_takes_memory_only_when_written():
    """What bounded loading relies on (docs/qlora.md): the placeholder of a dropped weight is backed by memory
    only as DeepSpeed's broadcast writes it, and it is given back when freed."""
    from beamlora_ds.loading import staggered

    shape, size = (4096, 4096), 4096 * 4096 * 2  # 32 MiB of bf16
    before = anon_rss()
    assert staggered.untouched_like(torch.empty(0, dtype=torch.bfloat16)).numel() == 0
    placeholder = staggered.untouched_like(torch.empty(shape, dtype=torch.bfloat16))
    assert placeholder.shape == shape and placeholder.dtype == torch.bfloat16 and placeholder.is_contiguous()
    untouched = anon_rss() - before
    placeholder.fill_(1.5)
    written = anon_rss() - before
    assert untouched < size / 8 and written > size * 0.9, (untouched, written)
    del placeholder
    assert anon_rss() - before < size / 8  # unmapped as soon as the tensor is freed


def test_one_process_loads_once_in_one_turn_and_shares_errors():
    from beamlora_ds.loading import staggered

    assert staggered.load_in_turns(lambda: "model") == "model"
    turn = staggered.turns_taken()[-1]
    assert (turn.turn, turn.turns) == (0, 1) and turn.finished >= turn.started

    def broken():
        raise OSError("no config.json")

    with pytest.raises(staggered.LoadError, match=r"failed on process\(es\) \[0\].*OSError") as info:
        staggered.load_in_turns(broken, what="my-model")
    assert isinstance(info.value.__cause__, OSError)
    layer = nn.Linear(3, 3)
    weight = layer.weight.detach().clone()
    assert staggered.drop_weights_rank0_will_send(layer) == 0 and torch.equal(layer.weight, weight)  # alone: kept


@pytest.mark.parametrize("variables, expected", [
    ({"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8"}, (3, 8)),         # torchrun
    ({"LOCAL_RANK": "1", "LOCAL_SIZE": "4"}, (1, 4)),               # deepspeed's launcher
    ({"LOCAL_RANK": "2", "SLURM_NTASKS_PER_NODE": "8(x4)"}, (2, 8)),
    ({"LOCAL_RANK": "0"}, (0, 1)),                                   # alone
])
def test_the_node_is_read_from_the_launchers_variables(monkeypatch, variables, expected):
    from beamlora_ds.loading import staggered

    for name in ("LOCAL_RANK",) + staggered.LOCAL_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert staggered.local_rank_and_size() == expected


def test_loading_in_turns_is_the_zero3_default_and_can_be_turned_off(monkeypatch):
    zero3 = four_bit_request.check_4bit_request({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}})
    monkeypatch.delenv(four_bit_load.LOAD_MODE_VARIABLE, raising=False)
    assert not four_bit_load.loads_in_turns(zero3)  # one process: nothing to take turns with
    monkeypatch.setenv(four_bit_load.LOAD_MODE_VARIABLE, "sometimes")
    with pytest.raises(four_bit_request.QuantizationError, match="BEAMLORA_DS_4BIT_LOAD='sometimes'.*together"):
        four_bit_load.loads_in_turns(zero3)
    monkeypatch.setenv(four_bit_load.LOAD_MODE_VARIABLE, "together")
    assert not four_bit_load.loads_in_turns(zero3, in_turns=None)


def test_the_bitsandbytes_internal_cpu_repacking_relies_on_is_still_there():
    """loading/cpu_repacking.py's one bitsandbytes internal (docs/platform.md): the inverse of the CPU repacking."""
    import inspect

    import bitsandbytes.functional as bnbf

    assert list(inspect.signature(bnbf._convert_weight_packed_for_cpu_inverse).parameters)[:2] == [
        "packed_weight", "quant_state"]
