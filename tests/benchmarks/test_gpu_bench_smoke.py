"""benchmarks/gpu.py: its --quick form runs on this CPU through the same code path as on the GPU, and both wrapped
models start exactly at the base model's output (B = 0), for a bf16 and a 4-bit base."""
import importlib.util
import json
import os
import sys

import pytest
import torch

from beamlora_ds import testing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(ROOT, "benchmarks", "gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        return True
    except Exception:
        return False


@pytest.mark.slow  # a benchmark process: about 10 s on 2 quiet cores
def test_quick_run_writes_its_measurements(tmp_path):
    out = tmp_path / "gpu.json"
    proc = testing.run([sys.executable, "benchmarks/gpu.py", "--quick", "--json", str(out)], timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    if not torch.cuda.is_available():
        assert "no CUDA: quick CPU smoke run, numbers are not GPU numbers" in proc.stdout
    bases = ["bf16", "nf4"] if has_bitsandbytes() else ["bf16"]
    assert [(r["base"], r["method"]) for r in result["runs"]] == [(b, m) for b in bases for m in ("lora", "beamlora")]
    h, i, layers, r = 128, 344, 2, 8  # the --quick shapes: 4 heads, 4 KV heads
    per_layer_din_dout = 4 * (h + h) + 2 * (h + i) + (i + h)
    adapter = layers * r * per_layer_din_dout
    assert result["flops"]["base_linear_params"] == layers * (4 * h * h + 3 * h * i)
    assert result["flops"]["adapter_params"] == adapter
    for run in result["runs"]:
        assert run["init_max_abs_diff"] == 0.0
        assert run["trainable_dtypes"] == ["torch.float32"]
        # peft trains A and B; BeamLoRA also one score per rank
        assert run["trainable_params"] == adapter + (7 * layers * r if run["method"] == "beamlora" else 0)
        assert run["linear4bit_layers"] == (7 * layers if run["base"] == "nf4" else 0)
        assert run["tokens_per_s"] > 0 and run["losses_finite"]
        assert run["model_tflops_per_s"] == pytest.approx(result["flops"]["flops_per_token"] * run["tokens_per_s"]
                                                          / 1e12)
        if run["method"] == "beamlora":  # the snapshot and the resets happened inside the timed steps
            assert run["snapshot_step_s"] and run["reset_step_s"] and run["pruned_per_reset"][0] > 0
    assert set(result["ratios"]) == set(bases)
    assert set(result["skipped"]) == (set() if has_bitsandbytes() else {"nf4"})


@pytest.mark.parametrize("base", ["bf16", pytest.param("nf4", marks=pytest.mark.skipif(
    not has_bitsandbytes(), reason="needs bitsandbytes"))])
def test_wrapped_models_start_at_the_base_output(base):
    """The oracle is the unwrapped base model; making B non-zero must then change the output (the check can fail)."""
    gpu = load_gpu_bench()
    args = gpu.parse(["--quick", "--json", os.devnull])
    cpu = torch.device("cpu")
    x = torch.randn(2, 16, args.hidden, generator=torch.Generator().manual_seed(3), dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = gpu.build_base(args, base, cpu)(inputs_embeds=x).last_hidden_state
    for method in ("lora", "beamlora"):
        model, _ = gpu.wrap(gpu.build_base(args, base, cpu), method, args, total_steps=16)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model(inputs_embeds=x).last_hidden_state, reference), method
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # a new context: autocast caches casts
            assert not torch.equal(model(inputs_embeds=x).last_hidden_state, reference), method
