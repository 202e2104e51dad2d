"""BeamLoRA in a plain PyTorch loop: the built-in default, one process, no downloads.

A small Llama built from a config is first trained in full on addition (a stand-in for a pretrained
base), then frozen, and learns subtraction through BeamLoRA adapters on all seven projections. Prints loss, every reset, and the adapter's final rank use.

    python examples/train_plain.py [--steps 200] [--interval 40] [--rank 8]
"""
import argparse
import random
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import beamlora_ds

VOCAB = list("0123456789+-=;") + ["<pad>"]
PAD = len(VOCAB) - 1


def arithmetic_batch(rng: random.Random, batch: int, op: str = "+", length: int = 16):
    """'a+b=c;' (or 'a-b=c;') strings, loss on the answer only (labels -100 on the prompt and padding)."""
    ids, labels = [], []
    for _ in range(batch):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        prompt, answer = f"{a}{op}{b}=", f"{a + b if op == '+' else a - b};"
        tokens = [VOCAB.index(c) for c in prompt + answer]
        target = [-100] * len(prompt) + tokens[len(prompt):]
        pad = length - len(tokens)
        ids.append(tokens + [PAD] * pad)
        labels.append(target + [-100] * pad)
    return torch.tensor(ids), torch.tensor(labels)


def pretrained_base(steps: int, rng: random.Random) -> LlamaForCausalLM:
    """Stand-in for a downloaded base model: a small Llama briefly trained, in full, on addition."""
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=32, pad_token_id=PAD))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        ids, labels = arithmetic_batch(rng, batch=32, op="+")
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--interval", type=int, default=40)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain_steps", type=int, default=300, help="full training of the base on addition")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    model = pretrained_base(args.pretrain_steps, rng=random.Random(args.seed + 1))
    config = beamlora_ds.BeamLoRAConfig(r=args.rank, alpha=2.0 * args.rank, dropout=0.0, interval=args.interval,
                                        total_steps=args.steps, p0=0.9, seed=args.seed)
    beam = beamlora_ds.apply(model, config)  # wraps q/k/v/o/gate/up/down, freezes the rest
    optimizer = torch.optim.AdamW(beamlora_ds.optimizer_param_groups(model, weight_decay=0.0), lr=args.lr)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"BeamLoRA: {len(beam.modules)} modules, r={args.rank}, {trainable:,} trainable parameters; "
          f"next events {beam.next_events()}")

    rng, start = random.Random(args.seed), time.time()
    model.train()
    for step in range(1, args.steps + 1):
        ids, labels = arithmetic_batch(rng, batch=32, op="-")  # the new skill: subtraction
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        record = beam.step(optimizer)  # once after every optimizer step
        if record is not None and not record.get("skipped"):
            print(f"  reset at step {record['step']}: keep-fraction {record['keep_fraction']:.3f}, "
                  f"{len(record['pruned'])} ranks pruned and refilled")
        if step % 10 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  ({(time.time() - start) / step:.3f} s/step)")

    weights = torch.stack([m.rank_weights() for m in beam.modules])
    print(f"done: {len(beam.history)} resets; rank weights per module range "
          f"{weights.min():.3f}..{weights.max():.3f} (all 1.0 would be plain LoRA)")


if __name__ == "__main__":
    main()
