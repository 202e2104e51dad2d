"""BeamLoRA on DeepSpeed's pipeline parallelism: a small Llama as a PipelineModule of LayerSpecs, trained by the
PipelineEngine (docs/pipeline.md shows this script in full).

    deepspeed --num_gpus 2 examples/train_pipeline.py --stages 2 --out out/pipe [--steps 12] [--resume]

The model is the built-in tiny Llama (2 layers, built from a config: no download) cut into layers: the embedding,
each decoder layer, the final norm with the head. The data is a stand-in (counting from a random start, so the
loss has something to learn). BeamLoRA's resets are one top-p over every stage's modules.
"""
import argparse
import copy
import os

import deepspeed
import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn

import beamlora_ds
from beamlora_ds.loading.builtin import tiny_llama

SEQ, VOCAB = 16, 64


class Embedding(nn.Module):
    def __init__(self, hf):
        super().__init__()
        self.embed_tokens = copy.deepcopy(hf.model.embed_tokens)

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)


class DecoderLayer(nn.Module):
    """The HF model's decoder layer `index`, with its rotary embedding (a pipeline passes hidden states only)."""

    def __init__(self, hf, index):
        super().__init__()
        self.layer = copy.deepcopy(hf.model.layers[index])
        self.rotary = copy.deepcopy(hf.model.rotary_emb)

    def forward(self, hidden):
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        return self.layer(hidden, position_ids=positions, position_embeddings=self.rotary(hidden, positions))


class Head(nn.Module):
    def __init__(self, hf):
        super().__init__()
        self.norm, self.lm_head = copy.deepcopy(hf.model.norm), copy.deepcopy(hf.lm_head)

    def forward(self, hidden):
        return self.lm_head(self.norm(hidden))


def next_token_loss(logits, labels):
    """The HF causal-LM loss: position t predicts token t + 1."""
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))


def pipeline_llama(hf, stages: int) -> PipelineModule:
    """Layer 0 the embedding, layers 1..L the decoder layers, layer L+1 the head (at scale, build each layer from
    its own weights inside its LayerSpec instead of copying from a whole model on every process)."""
    layers = [LayerSpec(Embedding, hf)] + [LayerSpec(DecoderLayer, hf, i) for i in range(hf.config.num_hidden_layers)]
    return PipelineModule(layers + [LayerSpec(Head, hf)], num_stages=stages, loss_fn=next_token_loss,
                          partition_method="uniform")


def hf_name(name: str) -> str:
    """A pipeline module name -> the HF model's: `3.layer.self_attn.q_proj` -> `model.layers.2.self_attn.q_proj`."""
    index, _, rest = name.partition(".layer.")
    return f"model.layers.{int(index) - 1}.{rest}"


def batches(seed: int, start_step: int, micro_batch: int, micro_batches: int):
    """(input_ids, labels) micro-batches, a function of the step, so a resumed run sees the same data."""
    step = start_step
    while True:
        for i in range(micro_batches):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + i)
            ids = (torch.randint(0, VOCAB, (micro_batch, 1), generator=generator) + torch.arange(SEQ)) % VOCAB
            yield ids, ids
        step += 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/pipe")
    p.add_argument("--stages", type=int, default=2, help="pipeline stages (the processes: stages x data parallel)")
    p.add_argument("--zero_stage", type=int, default=1, choices=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--interval", type=int, default=4)
    p.add_argument("--save_every", type=int, default=6)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
    args = p.parse_args()
    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                 "optimizer": {"type": "Adam", "params": {"lr": 3e-3, "weight_decay": 0.0, "torch_adam": True}},
                 "zero_optimization": {"stage": args.zero_stage}}
    beamlora_ds.check_deepspeed_setup(ds_config, pipeline_stages=args.stages)  # ZeRO-2/3 refused before loading

    deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")
    model = pipeline_llama(tiny_llama(torch.float32), args.stages)  # the same base weights on every process

    # 1. apply() on this process's stage, before deepspeed.initialize: A is seeded by layer name
    beam = beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(
        r=4, alpha=8, dropout=0.0, total_steps=args.steps, interval=args.interval, p0=0.8, seed=args.seed,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])

    # 2. resume: DeepSpeed's state of every stage plus BeamLoRA's
    checkpoints, start = os.path.join(args.out, "checkpoints"), 0
    if args.resume:
        _, client_state = beamlora_ds.load_checkpoint(engine, beam, checkpoints)
        start = client_state["step"]

    # 3. the loop: beam.step(engine, loss) after every train_batch, on every process of every stage
    data = batches(args.seed, start, ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"])
    for step in range(start, args.steps):
        loss = engine.train_batch(data)  # the mean loss, the same on every stage
        record = beam.step(engine, loss.item())
        beamlora_ds.log_reset(os.path.join(args.out, "log.jsonl"), record)
        if engine.global_rank == 0:
            print(f"step {step + 1} loss {loss.item():.6f}" + (f", reset pruned {len(record['pruned'])} ranks"
                                                             if record else ""), flush=True)
        if (step + 1) % args.save_every == 0:
            beamlora_ds.save_checkpoint(engine, beam, checkpoints, client_state={"step": step + 1})

    # 4. one peft adapter for the HF model, every stage's layers in it; every process calls it, process 0 writes
    beamlora_ds.save_adapter(engine, os.path.join(args.out, "adapter"), base_model_name_or_path="builtin-tiny",
                             rename=hf_name, task_type="CAUSAL_LM", overwrite=True)
    evaluation = engine.eval_batch(batches(args.seed + 1, 0, ds_config["train_micro_batch_size_per_gpu"], 1))
    if engine.global_rank == 0:
        print(f"done: {beam.global_step} steps, {len(beam.history)} resets, eval loss {evaluation.item():.6f}, "
              f"adapter in {args.out}/adapter", flush=True)


if __name__ == "__main__":
    main()
