"""launch/estimate_memory.py against hand-computed values, and the launch/ recipes (syntax, flags, hostfile).

The estimator is pure Python (no torch); the recipes are checked with `bash -n` and against launch/train.py's own
parser.
"""
import ast
import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, "launch")
GIB = 1 << 30


def _load():
    spec = importlib.util.spec_from_file_location("estimate_memory", os.path.join(LAUNCH, "estimate_memory.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["estimate_memory"] = mod  # dataclasses looks the module up while building the class
    spec.loader.exec_module(mod)
    return mod


em = _load()
M7, M13, M70 = em.BUILTIN_MODELS["7b"], em.BUILTIN_MODELS["13b"], em.BUILTIN_MODELS["70b"]
ALL = em.PROJECTIONS


def estimate(model, **settings):
    """em.estimate with its settings given by name, each to the dataclass that has it."""
    cluster = {f.name for f in dataclasses.fields(em.Cluster)}
    return em.estimate(model, em.Cluster(**{k: v for k, v in settings.items() if k in cluster}),
                       em.Training(**{k: v for k, v in settings.items() if k not in cluster}))


def _component(res, prefix):
    found = [c for c in res["components"] if c["name"].startswith(prefix)]
    assert len(found) == 1, [c["name"] for c in res["components"]]
    return found[0]


# ---------------------------------------------------------------- parameter counts

def test_adapter_count_llama2_7b_r64_all_projections():
    # per layer: 4 x 64 x (4096 + 4096) + 3 x 64 x (4096 + 11008) = 2,097,152 + 2,899,968; x 32 layers
    counts = em.adapter_param_counts(M7, 64, ALL)
    assert counts["lora"] == 159_907_840
    assert counts["score"] == 32 * 7 * 64
    assert counts["modules"] == 224
    assert counts["largest_tensor"] == 64 * 11008  # A of down_proj / B of gate, up (the README's 704,513 - 1)


def test_adapter_count_gqa_70b_and_13b():
    # 70B: k/v project 8192 -> 8 kv heads x 128 = 1024
    per_layer = 2 * 64 * (8192 + 8192) + 2 * 64 * (8192 + 1024) + 3 * 64 * (8192 + 28672)
    assert em.adapter_param_counts(M70, 64, ALL)["lora"] == 80 * per_layer == 828_375_040
    assert em.adapter_param_counts(M13, 64, ALL)["lora"] == 40 * (4 * 64 * 10240 + 3 * 64 * (5120 + 13824))
    assert em.adapter_param_counts(M7, 8, ["q_proj", "v_proj"])["lora"] == 32 * 2 * 8 * 8192


def test_base_counts_match_published_sizes():
    assert em.base_param_counts(M7)["total"] == 6_738_415_616
    assert em.base_param_counts(M13)["total"] == 13_015_864_320
    assert em.base_param_counts(M70)["total"] == 68_976_648_192


def test_bad_targets_and_rank_are_refused():
    with pytest.raises(ValueError, match="unknown target"):
        em.adapter_param_counts(M7, 64, ["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="exceeds"):
        em.adapter_param_counts(M70, 2048, ["k_proj"])


def test_config_json_gives_the_builtin_shape(tmp_path):
    cfg = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
           "num_key_value_heads": 8, "vocab_size": 32000, "model_type": "llama"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    shape = em.shape_from_config(str(path))
    assert em.base_param_counts(shape) == em.base_param_counts(M70)
    assert em.adapter_param_counts(shape, 64, ALL) == em.adapter_param_counts(M70, 64, ALL)


# ---------------------------------------------------------------- NF4

def test_nf4_bytes_of_one_tensor():
    n = 4096 * 4096  # 262,144 blocks of 64
    assert em.nf4_bytes(n, double_quant=False) == {"packed": n // 2, "constants": 262_144 * 4}
    # uint8 absmax per block + fp32 absmax per 256 blocks + 256-entry fp32 code + fp32 offset
    assert em.nf4_bytes(n, double_quant=True) == {"packed": n // 2, "constants": 262_144 + 1024 * 4 + 1024 + 4}


def test_nf4_base_is_about_a_quarter_of_bf16():
    bf16 = 2 * em.base_param_counts(M7)["total"]
    q = em.nf4_model_bytes(M7)
    nf4 = q["packed"] + q["constants"] + q["bf16_rest"]
    assert 0.25 < nf4 / bf16 < 0.30          # embeddings and lm_head stay bf16
    linear = em.base_param_counts(M7)["linear"]
    assert (q["packed"] + q["constants"]) / linear == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), rel=1e-3)
    no_dq = em.nf4_model_bytes(M7, double_quant=False)
    assert (no_dq["packed"] + no_dq["constants"]) / linear == pytest.approx(0.5625)


# ---------------------------------------------------------------- components

def test_zero3_base_scales_as_one_over_gpus():
    b8 = _component(estimate(M70, gpus=8, stage=3), "base weights")["gpu_bytes"]
    b32 = _component(estimate(M70, gpus=32, stage=3), "base weights")["gpu_bytes"]
    assert b8 == 2 * em.base_param_counts(M70)["total"] // 8
    assert b8 == 4 * b32
    # ZeRO-2 keeps the whole base on every GPU
    assert _component(estimate(M7, gpus=8, stage=2), "base weights")["gpu_bytes"] == 2 * 6_738_415_616


def test_optimizer_snapshot_and_offload():
    T = em.adapter_param_counts(M7, 64, ALL)["total"]
    res = estimate(M7, gpus=8, stage=3)
    assert _component(res, "fp32 master")["gpu_bytes"] == 12 * T // 8
    assert _component(res, "adapter working copy")["gpu_bytes"] == 2 * T      # resident, not partitioned
    snap = _component(res, "BeamLoRA snapshot")
    assert snap["gpu_bytes"] == 0 and snap["host_bytes"] == 12 * 159_907_840 // 8
    off = estimate(M7, gpus=8, stage=3, offload=True)
    assert _component(off, "fp32 master")["gpu_bytes"] == 0
    assert _component(off, "fp32 master")["host_bytes"] == 12 * T // 8
    assert _component(off, "base weights")["gpu_bytes"] == 0
    assert off["gpu_total_bytes"] < res["gpu_total_bytes"]
    assert off["host_per_node_bytes"] == 8 * off["host_per_process_bytes"]
    with pytest.raises(ValueError, match="stage 3"):
        estimate(M7, gpus=8, stage=2, offload=True)


def test_korthikanti_reference_formula():
    # sbh(34 + 5as/h) with s=512, b=4, h=4096, a=32
    assert em.korthikanti_bytes_per_layer(M7, 512, 4) == 512 * 4 * 4096 * 34 + 5 * 32 * 512 * 512 * 4


def test_llama_layer_activation_count_by_hand():
    h, i, r = 4096, 11008, 64
    per_token = (8 * h            # two RMSNorms, fp32 input
                 + 2 * h          # q/k/v input
                 + 6 * h          # q, k, v
                 + 2 * h + 4 * 32  # sdpa output + logsumexp
                 + 2 * h          # o_proj input
                 + 2 * h          # gate/up input
                 + 6 * i          # SwiGLU operands
                 + 2 * i          # down_proj input
                 + 3 * (6 * h + i)  # dropout output + mask of the 7 modules (d_in: 6 x h, 1 x i)
                 + 7 * 4 * r)     # rank path
    assert per_token == 286_848
    assert em.activation_bytes_per_layer(M7, 512, 4, r, ALL) == per_token * 512 * 4
    no_dropout = em.activation_bytes_per_layer(M7, 512, 4, r, ALL, lora_dropout=0.0)
    assert no_dropout == (per_token - 3 * (6 * h + i)) * 512 * 4
    eager = em.activation_bytes_per_layer(M7, 512, 4, r, ALL, attention="eager")
    assert eager - per_token * 2048 == (6 * 32 * 512 - 2 * h - 4 * 32) * 2048


def test_checkpointing_reduces_activations():
    on = em.activation_bytes(M7, 512, 4, 64, ALL, gradient_checkpointing=True)
    off = em.activation_bytes(M7, 512, 4, 64, ALL, gradient_checkpointing=False)
    assert off["layers"] == 32 * off["one_layer"]
    assert on["layers"] == 2 * 512 * 4 * 4096 * 32 + on["one_layer"]
    assert on["layers"] < off["layers"] / 10
    assert on["logits"] == 10 * 512 * 4 * 32000
    a = estimate(M7, gpus=1, stage=2, gradient_checkpointing=True)["gpu_total_bytes"]
    b = estimate(M7, gpus=1, stage=2, gradient_checkpointing=False)["gpu_total_bytes"]
    assert a < b


def test_what_fits():
    assert not estimate(M70, gpus=1, stage=2, quantization="none")["fits"]   # 138 GB of bf16 weights alone
    assert estimate(M70, gpus=1, stage=2, quantization="nf4")["fits"]
    assert estimate(M7, gpus=1, stage=2, quantization="nf4")["gpu_total_bytes"] < 16 * GIB
    assert not estimate(M70, gpus=8, stage=2)["fits"]
    assert estimate(M70, gpus=8, stage=3)["fits"]


def test_table_and_cli(tmp_path, capsys):
    results = em.recipe_results()
    table = em.markdown_table(results)
    assert table.count("\n| ") == len(em.RECIPES) + 1            # header separator + one row per recipe
    assert "does not fit 80 GB" in table                           # 70B under ZeRO-2
    assert not results["single_gpu_qlora"]["70b"]["inputs"]["offload"]
    out = tmp_path / "est.json"
    assert em.main(["--model", "70b", "--gpus", "32", "--stage", "3", "--gradient_checkpointing",
                    "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["params"]["adapter"]["lora"] == 828_375_040 and data["fits"]
    assert "total per GPU" in capsys.readouterr().out
    assert em.main(["--model", "7b", "--targets", "q_proj,nope"]) == 2


# ---------------------------------------------------------------- launch/ recipes

SCRIPTS = sorted(f for f in os.listdir(LAUNCH) if f.endswith((".sh", ".sbatch")))


def test_recipe_files_exist():
    assert {"single_gpu_qlora.sh", "single_node.sh", "multi_node_70b.sh", "slurm_70b.sbatch"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_recipe_bash_syntax(name):
    path = os.path.join(LAUNCH, name)
    proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    text = open(path).read()
    assert "set -euo pipefail" in text


def _train_options():
    """Every flag launch/train.py's parser knows, as its --help lists them."""
    from beamlora_ds.train.options import make_parser

    return set(re.findall(r"(?<![\w-])--\w+", make_parser().format_help()))


# Options the recipes pass that train.py gains in an open issue (4-bit bases).
PENDING_TRAIN_OPTIONS = set()


@pytest.mark.parametrize("name", SCRIPTS)
def test_recipe_train_options_exist(name):
    text = open(os.path.join(LAUNCH, name)).read()
    blocks = re.findall(r"TRAIN_ARGS\+?=\((.*?)\)", text, flags=re.S)
    used = {opt for block in blocks for opt in re.findall(r"(?<![\w-])--\w+", block)}
    assert "--output_dir" in used and "--ds_config" in used
    unknown = used - _train_options() - PENDING_TRAIN_OPTIONS
    assert not unknown, f"{name} passes options launch/train.py does not have: {sorted(unknown)}"


def _deepspeed_runner_flags():
    spec = importlib.util.find_spec("deepspeed")  # locates the package without importing it (no torch import)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("deepspeed not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "launcher", "runner.py")
    return set(re.findall(r'"(--\w+)"', open(path).read()))


@pytest.mark.parametrize("name", SCRIPTS)
def test_recipe_launcher_flags_exist(name):
    text = open(os.path.join(LAUNCH, name)).read()
    lines = [ln for ln in text.splitlines() if re.match(r"\s*(exec\s+)?deepspeed\s", ln)]
    assert lines, f"{name} has no deepspeed command line"
    flags = {f for ln in lines for f in re.findall(r"(?<![\w-])--\w+", ln.split("launch/train.py")[0])}
    unknown = flags - _deepspeed_runner_flags()
    assert not unknown, f"{name} passes flags DeepSpeed's launcher does not have: {sorted(unknown)}"


def test_hostfile_example_parses_like_deepspeed():
    # deepspeed/launcher/runner.py _parse_hostfile: comments and blank lines skipped, else r'^(\S+)\s+slots=(\d+)'
    hosts = {}
    for line in open(os.path.join(LAUNCH, "hostfile.example")):
        line = line.strip()
        if line.startswith("#") or not line:
            continue
        m = re.search(r"^(\S+)\s+slots=(\d+)", line)
        assert m, line
        assert m.group(1) not in hosts
        hosts[m.group(1)] = int(m.group(2))
    # multi_node_70b.sh uses it with --num_nodes 4 --num_gpus 8
    assert len(hosts) == 4 and set(hosts.values()) == {8}


# ---------------------------------------------------------------- tensor parallelism (--tp)

V70, H70 = 32000, 8192
LINEAR70 = 80 * (2 * H70 * H70 + 2 * H70 * 1024 + 3 * H70 * 28672)   # q, o; k, v (8 kv heads x 128); gate, up, down


def test_tp_base_weights_split_layers_divided_replicated_unchanged():
    whole, tp8 = em.base_param_counts(M70), em.base_param_counts(M70, tp=8)
    assert whole["linear"] == LINEAR70 == 68_451_041_280
    assert tp8["linear"] == LINEAR70 // 8                        # every projection is split 8 ways
    norms = 80 * 2 * H70 + H70                                     # replicated
    assert whole["other"] == 2 * V70 * H70 + norms
    assert tp8["other"] == V70 * H70 + V70 // 8 * H70 + norms      # untied: embedding whole, lm_head split
    tied = dataclasses.replace(M7, tie_word_embeddings=True)       # tied: vocabulary-parallel
    assert em.base_param_counts(tied, tp=8)["other"] == 32000 // 8 * 4096 + 32 * 2 * 4096 + 4096
    # per GPU: TP=8 x ZeRO-1 keeps its slice whole; TP=8 x ZeRO-3 partitions it over gpus / tp = 4
    gpu = _component(estimate(M70, gpus=32, tp=8, stage=1), "base weights")["gpu_bytes"]
    assert gpu == 2 * (LINEAR70 // 8 + V70 * H70 + V70 // 8 * H70 + norms)
    assert _component(estimate(M70, gpus=32, tp=8, stage=3), "base weights")["gpu_bytes"] == gpu // 4
    assert _component(estimate(M70, gpus=8, tp=8, stage=1), "base weights")["gpu_bytes"] == gpu


def test_tp_adapter_divides_only_the_split_factor():
    r = 64
    per_layer = (r * H70 + H70 // 8 * r                  # q: A replicated, B split
                 + 2 * (r * H70 + 1024 // 8 * r)         # k, v
                 + r * H70 // 8 + H70 * r                # o (row-parallel): A split, B replicated
                 + 2 * (r * H70 + 28672 // 8 * r)        # gate, up
                 + r * 28672 // 8 + H70 * r)             # down (row-parallel)
    assert per_layer == 4_505_600
    counts = em.adapter_param_counts(M70, r, ALL, tp=8)
    assert counts["lora"] == 80 * per_layer
    assert counts["score"] == 80 * 7 * r                  # replicated
    assert em.adapter_param_counts(M70, r, ["q_proj"], tp=8)["lora"] == 80 * (r * H70 + r * H70 // 8)
    assert em.adapter_param_counts(M70, r, ALL, tp=1) == em.adapter_param_counts(M70, r, ALL)


def test_tp_activations_split_heads_and_intermediate_only():
    h, r, tokens = H70, 64, 512 * 4

    def per_token(q, a, i):  # lora_dropout 0: norms, q/k/v and gate/up inputs replicated; q, a, i split
        return 8 * h + 2 * h + 6 * q + 2 * q + 4 * a + 2 * q + 2 * h + 6 * i + 2 * i + 7 * 4 * r
    assert em.activation_bytes_per_layer(M70, 512, 4, r, ALL, 0.0) == per_token(H70, 64, 28672) * tokens
    assert em.activation_bytes_per_layer(M70, 512, 4, r, ALL, 0.0, tp=8) == per_token(1024, 8, 3584) * tokens
    one = em.activation_bytes(M70, 512, 4, r, ALL, True, 0.0, tp=1)
    eight = em.activation_bytes(M70, 512, 4, r, ALL, True, 0.0, tp=8)
    assert eight["layers"] - eight["one_layer"] == one["layers"] - one["one_layer"] == 2 * tokens * h * 80
    assert eight["logits"] == one["logits"] and eight["final_norm"] == one["final_norm"]


def test_tp_zero_partitions_over_data_parallel_size():
    T = em.adapter_param_counts(M70, 64, ALL, tp=8)["total"]
    lora = em.adapter_param_counts(M70, 64, ALL, tp=8)["lora"]
    res = estimate(M70, gpus=32, tp=8, stage=1, micro_batch=1)
    assert res["inputs"]["data_parallel"] == 4 and res["inputs"]["lora_dropout"] == 0.0
    assert _component(res, "adapter working copy")["gpu_bytes"] == 2 * T
    assert _component(res, "fp32 master")["gpu_bytes"] == 12 * T // 4
    assert _component(res, "adapter gradients")["gpu_bytes"] == 2 * T + 4 * T // 4   # ZeRO-1: bf16 grads whole
    assert _component(res, "BeamLoRA snapshot")["host_bytes"] == 12 * lora // 4
    assert _component(res, "ZeRO reduce bucket")["gpu_bytes"] == 2 * H70 * H70
    assert res["host_per_node_bytes"] == 8 * res["host_per_process_bytes"]
    assert res["params"]["adapter"]["lora"] == 828_375_040 and res["params_per_gpu"]["adapter"]["total"] == T
    assert res["fits"] and res["gpu_total_bytes"] > estimate(M70, gpus=32, stage=3, micro_batch=1)["gpu_total_bytes"]


def test_tp_refusals():
    for kwargs, message in [(dict(gpus=30, tp=8), "must divide"), (dict(gpus=32, tp=16), "key-value heads"),
                            (dict(gpus=32, tp=8, quantization="nf4"), "4-bit"),
                            (dict(gpus=32, tp=8, lora_dropout=0.05), "lora_dropout 0"),
                            (dict(gpus=8, tp=0), ">= 1")]:
        with pytest.raises(ValueError, match=message):
            estimate(M70, **kwargs)
    with pytest.raises(ValueError, match="key-value heads"):
        estimate(M7, gpus=64, tp=64)                            # 32 key-value heads


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "12", "--tp", "8"], "must divide"),
    (["--gpus", "32", "--tp", "16"], "key-value heads"),
    (["--gpus", "8", "--tp", "8", "--quantization", "nf4"], "4-bit"),
    (["--gpus", "8", "--tp", "8", "--lora_dropout", "0.1"], "lora_dropout 0"),
])
def test_tp_cli_refusals_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        em.main(["--model", "70b"] + argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: --tp" in err and message in err


def test_tp_cli_report_and_table(tmp_path, capsys):
    out = tmp_path / "tp.json"
    assert em.main(["--model", "70b", "--gpus", "32", "--tp", "8", "--stage", "1", "--gradient_checkpointing",
                    "--micro_batch", "1", "--json", str(out)]) == 0
    assert "TP=8 x 4 data-parallel, ZeRO-1" in capsys.readouterr().out
    assert json.loads(out.read_text())["inputs"]["tp"] == 8
    table = em.markdown_table()
    rows = [ln for ln in table.splitlines() if "tp8_zero1.json" in ln]
    assert len(rows) == 2 and "does not fit" not in "".join(rows)
    config = json.load(open(os.path.join(ROOT, "ds_configs", "tp8_zero1.json")))
    assert config["tensor_parallel"] == {"autotp_size": 8} and config["zero_optimization"]["stage"] == 1


@pytest.mark.parametrize("name", ["estimate_memory.py", "memory_model.py"])
def test_estimator_keeps_the_house_size_limits(name):
    # the limits of tests/test_structure.py (400 lines a file, 60 a function), which covers beamlora_ds only
    path = os.path.join(LAUNCH, name)
    text = open(path).read()
    assert len(text.splitlines()) <= 400
    long = [n.name for n in ast.walk(ast.parse(text)) if isinstance(n, ast.FunctionDef)
            and n.end_lineno - n.lineno + 1 > 60]
    assert not long


def test_recipes_name_shipped_configs():
    for name in SCRIPTS:
        for cited in re.findall(r"ds_configs/\w+\.json", open(os.path.join(LAUNCH, name)).read()):
            assert os.path.isfile(os.path.join(ROOT, cited)), f"{name} names {cited}"
