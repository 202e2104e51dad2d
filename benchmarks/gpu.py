"""LoRA (peft) against BeamLoRA on a Llama-7B-shaped layer stack, bf16 and NF4 bases: tokens/s, MFU, peak memory.

    python benchmarks/gpu.py [--quick] [--json benchmarks/results/gpu.json]      (benchmarks/gpu.sh on the lent GPU)

One CUDA GPU, a plain torch training loop (no DeepSpeed). The model is a `LlamaModel` built from a LlamaConfig
with random weights (no download): 8 decoder layers shaped like Llama-7B (hidden 4096, intermediate 11008, 32
heads), no vocabulary to speak of, fed random bf16 embeddings, trained on a mean-squared error against a random
target. For each base - bf16 weights, or NF4 (bitsandbytes Linear4bit, double quantization, bf16 compute and
storage, the settings of `beamlora_ds.load_4bit_model`) - and each method - peft LoRA, BeamLoRA - both with r = 64,
alpha = 128, dropout 0.05 on all 7 projections: a fresh model (same seed), fp32 trainable adapters (peft's default;
BeamLoRA's are cast to fp32 the same way), torch.autocast(bf16), torch AdamW, micro-batch 8 x 1024 tokens.
BeamLoRA's controller runs after every optimizer step, with an interval that puts a snapshot (step 6) and a reset
(step 12) inside the timed steps; they are timed, and left out of the median.

Timing: every step is bracketed by CUDA events (after 5 warm-up steps); tokens/s = tokens per step / median step.
Memory: torch.cuda.max_memory_allocated from the built and wrapped model (weights and adapters counted, the
transient bf16 copy an NF4 build quantizes from not) to the end of its training: optimizer state, activations.
MFU = model FLOPs per second / 989 TFLOP/s (H200 SXM, dense bf16), model FLOPs per token (the same for both
methods, so MFU ratios are throughput ratios):
    4 * N_base            forward (2) and input gradients (2) through the frozen linear weights (no weight grads)
  + 6 * N_adapter         forward, input and weight gradients of A and B (r * (d_in + d_out) per module)
  + 12 * L * d * T        attention scores and values (PaLM's convention, causal masking not discounted)
NF4 dequantization is not counted as model FLOPs. An init check per configuration: with B = 0, both wrapped models
reproduce the base model's output exactly (recorded as `init_max_abs_diff`).

Without CUDA only --quick runs (tiny shapes, CPU): it exercises the code path; its numbers are not GPU numbers.
"""
import argparse
import gc
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
H200_BF16_PEAK = 989e12


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv_heads", type=int, default=32)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=128.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--micro_batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="timed steps after the warm-up")
    p.add_argument("--interval", type=int, default=12, help="BeamLoRA reset interval (snapshot at T/2)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--bases", default="bf16,nf4")
    p.add_argument("--methods", default="lora,beamlora")
    p.add_argument("--peak_flops", type=float, default=H200_BF16_PEAK, help="dense bf16 peak for MFU")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few steps: a smoke test (CPU or GPU)")
    p.add_argument("--json", default=None,
                   help="default: $OUT/gpu.json if OUT is set, else benchmarks/results/gpu.json")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads = 2, 128, 344, 4, 4
        args.rank, args.alpha, args.micro_batch, args.seq = 8, 16.0, 2, 32
        args.warmup, args.steps, args.interval = 2, 12, 4
    if args.json is None:
        args.json = os.path.join(os.environ["OUT"], "gpu.json") if os.environ.get("OUT") else \
            os.path.join(ROOT, "benchmarks", "results", "gpu.json")
    return args


# ------------------------------------------------------------------------------------------------- model
def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq, use_cache=False,
                       attn_implementation="sdpa")


def to_nf4(model, device):
    """Every nn.Linear of `model` as a bitsandbytes NF4 Linear4bit, with `beamlora_ds.load_4bit_model`'s settings for a bf16
    model (double quantization, bf16 compute and storage); quantized on `device`. Returns the number replaced."""
    import torch
    from bitsandbytes.nn import Linear4bit, Params4bit

    from beamlora_ds import check_4bit_request, prepare_4bit_model

    settings = check_4bit_request(None, compute_dtype=torch.bfloat16, model_dtype=torch.bfloat16)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                layer = Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                   compute_dtype=settings.compute_dtype, compress_statistics=settings.double_quant,
                                   quant_type="nf4", quant_storage=settings.quant_storage, device="meta")
                layer.weight = Params4bit(child.weight.data, requires_grad=False,
                                          compress_statistics=settings.double_quant, quant_type="nf4",
                                          quant_storage=settings.quant_storage, module=layer)
                if child.bias is not None:
                    layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, layer.to(device))  # .to(device) quantizes
                replaced += 1
    prepare_4bit_model(model)  # frozen base, CPU repacking trap off, train mode
    return replaced


def build_base(args, base: str, device):
    """The layer stack, bf16 or NF4, on `device`, seeded: every configuration starts from the same weights."""
    import torch
    from transformers import LlamaModel

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaModel(llama_config(args)).to(torch.bfloat16)
    if base == "nf4":
        to_nf4(model, device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.train()


def wrap(model, method: str, args, total_steps: int):
    """(model, controller or None) with adapters on the 7 projections; trainable adapters in fp32 for both methods."""
    controller = None
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                                 target_modules=PROJECTIONS, bias="none"))
    elif method == "beamlora":
        import beamlora_ds

        controller = beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(
            r=args.rank, alpha=args.alpha, dropout=args.dropout, interval=args.interval, total_steps=total_steps))
    else:
        raise ValueError(f"unknown method {method!r}: use lora or beamlora")
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model, controller


def flop_counts(args) -> dict:
    """Parameters counted from the shapes (not from the possibly packed tensors) and model FLOPs per token."""
    kv = args.kv_heads * (args.hidden // args.heads)
    sizes = [(args.hidden, args.hidden), (args.hidden, kv), (args.hidden, kv), (args.hidden, args.hidden),
             (args.hidden, args.intermediate), (args.hidden, args.intermediate), (args.intermediate, args.hidden)]
    base = args.layers * sum(i * o for i, o in sizes)
    adapter = args.layers * args.rank * sum(i + o for i, o in sizes)
    attention = 12 * args.layers * args.hidden * args.seq
    return {"base_linear_params": base, "adapter_params": adapter,
            "flops_per_token": 4 * base + 6 * adapter + attention,
            "formula": "4*N_base + 6*N_adapter + 12*L*d*T"}


# ---------------------------------------------------------------------------------------------- measure
def measure(args, base: str, method: str, device, flops: dict) -> dict:
    import torch
    from beamlora_ds.method import algorithm

    cuda = device.type == "cuda"
    total = args.warmup + args.steps
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    tick = time.perf_counter()
    model = build_base(args, base, device)
    g = torch.Generator(device=device).manual_seed(1)
    batches = [(torch.randn(args.micro_batch, args.seq, args.hidden, generator=g, device=device, dtype=torch.bfloat16),
                torch.randn(args.micro_batch, args.seq, args.hidden, generator=g, device=device, dtype=torch.bfloat16))
               for _ in range(2)]
    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16)

    with torch.no_grad(), autocast():
        reference = model(inputs_embeds=batches[0][0]).last_hidden_state.float()
    model, controller = wrap(model, method, args, total)
    with torch.no_grad(), autocast():
        wrapped = model(inputs_embeds=batches[0][0]).last_hidden_state.float()
    init_diff = (wrapped - reference).abs().max().item()
    del reference, wrapped
    trainable = [p for p in model.parameters() if p.requires_grad]
    if controller is not None:
        import beamlora_ds

        groups = beamlora_ds.optimizer_param_groups(model)
    else:
        groups = [{"params": trainable}]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # the bf16 copy an NF4 build quantizes from is not training memory
    build_s = time.perf_counter() - tick
    after_build = torch.cuda.memory_allocated() if cuda else 0
    optimizer = torch.optim.AdamW(groups, lr=args.lr, fused=cuda)
    times, kinds, losses = [], [], []
    for step in range(1, total + 1):
        x, target = batches[step % 2]
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        with autocast():
            out = model(inputs_embeds=x).last_hidden_state
        loss = torch.nn.functional.mse_loss(out.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = controller.step(optimizer) if controller is not None else None
        if cuda:
            end.record()
            times.append((start, end))
        else:
            times.append(time.perf_counter() - t0)
        losses.append(loss.detach())
        kinds.append("reset" if record is not None else "snapshot" if controller is not None and
                     algorithm.is_snapshot_step(step, args.interval, total) else "step")
    if cuda:
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) / 1e3 for s, e in times]
    timed = list(zip(times, kinds))[args.warmup:]
    ordinary = [t for t, k in timed if k == "step"]
    step_s = statistics.median(ordinary)
    tokens = args.micro_batch * args.seq
    tokens_per_s = tokens / step_s
    achieved = flops["flops_per_token"] * tokens_per_s
    losses = [float(v) for v in losses]
    result = {"base": base, "method": method, "build_s": build_s, "init_max_abs_diff": init_diff,
              "trainable_params": sum(p.numel() for p in trainable),
              "trainable_dtypes": sorted({str(p.dtype) for p in trainable}),
              "linear4bit_layers": sum(type(m).__name__ == "Linear4bit" for m in model.modules()),
              "step_s_median": step_s, "step_s_mean_all_timed": statistics.mean(t for t, _ in timed),
              "tokens_per_step": tokens, "tokens_per_s": tokens_per_s, "model_tflops_per_s": achieved / 1e12,
              "mfu": achieved / args.peak_flops if cuda else None,
              "memory_after_build_gib": after_build / 2**30,
              "max_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "snapshot_step_s": [t for t, k in timed if k == "snapshot"],
              "reset_step_s": [t for t, k in timed if k == "reset"],
              "pruned_per_reset": [len(r["pruned"]) for r in controller.history] if controller else [],
              "loss_first": losses[0], "loss_last": losses[-1],
              "losses_finite": all(v == v and abs(v) != float("inf") for v in losses)}
    del model, optimizer, controller, batches, out, loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv=None):
    args = parse(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        sys.exit("error: benchmarks/gpu.py needs a CUDA GPU for its full form; run --quick for a CPU smoke test.")
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        name = torch.cuda.get_device_name(0)
        print(f"{name}: {args.layers} Llama layers (hidden {args.hidden}, intermediate {args.intermediate}, "
              f"{args.heads} heads), r={args.rank} on 7 projections, batch {args.micro_batch} x {args.seq}, "
              f"{args.warmup} warm-up + {args.steps} timed steps", flush=True)
    else:
        name = "cpu"
        torch.set_num_threads(1)  # tiny shapes: threads only spin against each other on a shared CPU
        print("no CUDA: quick CPU smoke run, numbers are not GPU numbers", flush=True)
    bases = [b for b in args.bases.split(",") if b]
    skipped = {}
    if "nf4" in bases:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:  # missing, or its native library fails to load
            skipped["nf4"] = f"bitsandbytes cannot be imported ({type(e).__name__}: {e})"
            bases.remove("nf4")
            print(f"note: NF4 skipped: {skipped['nf4']}", flush=True)
    flops = flop_counts(args)
    result = {"benchmark": "gpu", "device": name, "cuda": cuda, "torch": torch.__version__,
              "settings": vars(args), "flops": flops, "peak_flops": args.peak_flops, "runs": [], "skipped": skipped,
              "ratios": {}}
    try:
        import peft
        import transformers

        result["peft"], result["transformers"] = peft.__version__, transformers.__version__
    except ImportError:
        pass
    tick = time.perf_counter()
    for base in bases:
        for method in [m for m in args.methods.split(",") if m]:
            r = measure(args, base, method, device, flops)
            result["runs"].append(r)
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            mem = f"{r['max_memory_allocated_gib']:.2f} GiB" if r["max_memory_allocated_gib"] is not None else "n/a"
            print(f"  {base:>4} {method:<8} step {r['step_s_median'] * 1e3:8.1f} ms  {r['tokens_per_s']:10.0f} tok/s  "
                  f"MFU {mfu:>6}  peak {mem}  init diff {r['init_max_abs_diff']:.1e}  "
                  f"(built in {r['build_s']:.1f} s)", flush=True)
        runs = {r["method"]: r for r in result["runs"] if r["base"] == base}
        if "lora" in runs and "beamlora" in runs:
            lo, be = runs["lora"], runs["beamlora"]
            result["ratios"][base] = {
                "tokens_per_s_lora_over_beamlora": lo["tokens_per_s"] / be["tokens_per_s"],
                "max_memory_lora_over_beamlora": (lo["max_memory_allocated_gib"] / be["max_memory_allocated_gib"]
                                                  if cuda else None)}
    result["seconds"] = time.perf_counter() - tick
    print("\n| base | method | tokens/s | MFU | peak memory (GiB) | step (ms) | snapshot / reset step (ms) |")
    print("|---|---|---|---|---|---|---|")
    for r in result["runs"]:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        mem = f"{r['max_memory_allocated_gib']:.2f}" if r["max_memory_allocated_gib"] is not None else "n/a"
        events = " / ".join(",".join(f"{t * 1e3:.0f}" for t in r[k]) or "-"
                            for k in ("snapshot_step_s", "reset_step_s"))
        print(f"| {r['base']} | {r['method']} | {r['tokens_per_s']:.0f} | {mfu} | {mem} | "
              f"{r['step_s_median'] * 1e3:.1f} | {events if r['method'] == 'beamlora' else ''} |")
    for base, ratio in result["ratios"].items():
        mem = f"{ratio['max_memory_lora_over_beamlora']:.3f}" if ratio["max_memory_lora_over_beamlora"] else "n/a"
        print(f"{base}: LoRA/BeamLoRA tokens/s {ratio['tokens_per_s_lora_over_beamlora']:.3f}, peak memory {mem}")
    print(f"model FLOPs per token {flops['flops_per_token'] / 1e9:.4g} G ({flops['formula']}); "
          f"MFU against {args.peak_flops / 1e12:.0f} TFLOP/s")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json} ({result['seconds']:.0f} s)")
    if not all(r["losses_finite"] for r in result["runs"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
