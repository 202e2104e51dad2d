"""Small models and loops the tests share (no downloads: everything is built from configs)."""
from __future__ import annotations

import os

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 32, vocab: int = 64):
    """A real transformers LlamaForCausalLM, small enough to train in a second on a CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


class TwoLayerNet(nn.Module):
    """A regression net whose linear layers carry Llama-like names, so default target_modules match."""

    def __init__(self, d_in: int = 12, d_hidden: int = 16, d_out: int = 8):
        super().__init__()
        self.q_proj = nn.Linear(d_in, d_hidden)
        self.act = nn.Tanh()
        self.down_proj = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.down_proj(self.act(self.q_proj(x)))


def regression_batches(steps: int, seed: int = 0, batch: int = 16, model_seed: int = 0):
    """A task LoRA can learn: fit a teacher that is the (seeded) TwoLayerNet plus rank-2 weight changes."""
    torch.manual_seed(model_seed)
    teacher = TwoLayerNet()
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for layer in (teacher.q_proj, teacher.down_proj):
            out_f, in_f = layer.weight.shape
            layer.weight += torch.randn(out_f, 2, generator=g) @ torch.randn(2, in_f, generator=g) / 2
        xs = [torch.randn(batch, teacher.q_proj.in_features, generator=g) for _ in range(steps)]
        return [(x, teacher(x)) for x in xs]


def optimizer_state_of(opt, module, key: str):
    """The optimizer state `key` (exp_avg, step, ...) of `module`'s tensor `key`'s owner: for lora_A / lora_B the
    parameter's own; for lora_score this module's row of the score table's state (or its own parameter's)."""
    name, _, entry = key.partition(".")
    if name != "lora_score":
        return opt.state[getattr(module, name)][entry]
    value = opt.state[module.score_parameter][entry]
    return value if module.score_row is None or value.dim() == 0 else value[module.score_row]


def flip_middle_byte(path) -> None:
    """A bit-rot stand-in: the byte in the middle of the file inverted."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def truncate_last_byte(path) -> None:
    """A cut-short copy: the file one byte shorter."""
    os.truncate(path, os.path.getsize(path) - 1)


def make_run(seed=0, **overrides):
    """TwoLayerNet with BeamLoRA (interval 8, 40 steps) and its AdamW: (model, controller, optimizer)."""
    from beamlora_ds import BeamLoRAConfig, apply, optimizer_param_groups

    torch.manual_seed(seed)
    model = TwoLayerNet()
    settings = dict(r=8, alpha=16.0, dropout=0.0, tau=0.05, interval=8, total_steps=40, p0=0.5, seed=seed)
    settings.update(overrides)
    beam = apply(model, BeamLoRAConfig(**settings))
    opt = torch.optim.AdamW(optimizer_param_groups(model, weight_decay=0.01), lr=2e-2)
    return model, beam, opt


def train_step(model, opt, batch):
    x, y = batch
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def base_tensors_in_checkpoint(folder, model, tp: int = 1, world: int = 2):
    """Every tensor in every file under checkpoint `folder` (dicts, lists and tuples walked) shaped like a weight of
    `model` (the base, not adapted): a whole 2-D weight, its tensor-parallel slice (out or in split over `tp`), or a ZeRO-3 flat
    fragment of it (1-D, numel / world). Returns [(file, key path, shape)]; empty for an adapter-only checkpoint."""
    import os

    shapes, fragments = set(), set()
    for p in model.parameters():
        if p.dim() < 2:
            continue
        out, inp = p.shape[0], p.numel() // p.shape[0]
        shapes.add((out, inp))
        for k in range(tp):
            shapes.update({(out // tp + (k < out % tp), inp), (out, inp // tp + (k < inp % tp))})
        fragments.add(-(-p.numel() // world))
    found = []

    def walk(obj, where, path):
        if isinstance(obj, torch.Tensor):
            if tuple(obj.shape) in shapes or (obj.dim() == 1 and obj.numel() in fragments):
                found.append((where, path, tuple(obj.shape)))
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(value, where, f"{path}/{key}")
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                walk(value, where, f"{path}/{i}")

    for root, _, names in os.walk(folder):
        for name in names:
            if name.endswith(".pt"):
                path = os.path.join(root, name)
                walk(torch.load(path, map_location="cpu", weights_only=False), os.path.relpath(path, folder), "")
    return found
