"""What the export, adapter-format and merge tests share: a BeamLoRA tiny Llama that looks trained, and stock
peft as the oracle."""
import torch

from beamlora_ds import BeamLoRAConfig, apply
from helpers import tiny_llama

PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
FILES = {"adapter_model.safetensors", "adapter_config.json", "beamlora_state.safetensors", "beamlora_state.json"}


def trained_like(model, r=4, alpha=8.0, tau=0.05, seed=1):
    """BeamLoRA on `model` with random nonzero B and scores (score = 0 would make folding a no-op)."""
    beam = apply(model, BeamLoRAConfig(r=r, alpha=alpha, tau=tau, dropout=0.0, total_steps=100, interval=10))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in beam.modules:
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
            m.lora_score.copy_(torch.randn(m.lora_score.shape, generator=g) * 0.05)
    return model.eval()


def fixed_ids():
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def load_in_peft(adapter_dir):
    import peft

    return peft.PeftModel.from_pretrained(tiny_llama(seed=0), adapter_dir).eval()
