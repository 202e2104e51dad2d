"""Small models and loops the tests share (no downloads: everything is built from configs)."""
from __future__ import annotations

import torch
from torch import nn


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


NATIVE_CRASH = "terminate called without an active exception"


def run_launch(cmd, timeout, cwd=None, env=None):
    """subprocess.run for multi-process launches, retried once on a native start-up/exit abort.

    On this CPU, gloo + DeepSpeed's shared-memory comm op have been seen (once in a few hundred launches) to abort
    with "terminate called without an active exception" and no Python error. Such a launch is retried once with
    a new master port; any Python exception, failed assertion or timeout fails at once.
    """
    import re
    import socket
    import subprocess
    import sys

    proc = _run_and_clean(cmd, timeout, cwd, env)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 and NATIVE_CRASH in output and "Traceback" not in output:
        print(f"retrying a launch that aborted natively: {' '.join(map(str, cmd))[:200]}", file=sys.stderr)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        cmd = [port if i > 0 and str(cmd[i - 1]) == "--master_port" else c for i, c in enumerate(cmd)]
        cmd = [re.sub(r"^--master_port=\d+$", f"--master_port={port}", str(c)) for c in cmd]
        proc = _run_and_clean(cmd, timeout, cwd, env)
    return proc


SHM_BUFFERS = "/dev/shm/deepspeed_allreduce_buffer_*"


def remove_shm_buffers(port=None, since: float = 0.0) -> int:
    """DeepSpeed's CPU shared-memory comm op leaves a 64 MB file in /dev/shm per process and launch and never
    removes it: hundreds of launches fill the machine's RAM. Remove those of one master port (or newer than
    `since`)."""
    import glob
    import os

    removed = 0
    for path in glob.glob(SHM_BUFFERS):
        if (port is not None and f"_{port}_" in os.path.basename(path)) or \
                (port is None and os.path.getmtime(path) >= since):
            try:
                os.unlink(path)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def _run_and_clean(cmd, timeout, cwd, env=None):
    import subprocess

    port = next((str(cmd[i + 1]) for i, c in enumerate(cmd[:-1]) if str(c) == "--master_port"), None)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    finally:
        if port is not None:
            remove_shm_buffers(port)
