"""beamlora_ds.loading (models.py, builtin.py): the built-in tiny model and its character tokenizer, and the
weightless skeleton train.py checks target_modules on before the expensive load. (That the skeleton's checks agree
with apply() on the loaded model is in test_inject.py.)"""
import pytest
import torch

from beamlora_ds.loading import builtin, models


def test_builtin_names_resolve_and_a_user_path_passes_through():
    assert builtin.resolve_builtin("builtin-tiny") == builtin.BUILTIN_TINY
    assert builtin.resolve_builtin("/data/my-model") == "/data/my-model"
    assert models.model_path("/data/my-model") == "/data/my-model"


def test_char_tokenizer_round_trips_and_fits_the_tiny_model():
    tok = builtin.char_tokenizer()
    ids = tok("12+7=?")["input_ids"]
    assert len(ids) == 6 and tok.decode(ids) == "12+7=?"  # one token per character
    assert tok.pad_token_id == 0 and tok.decode([tok.eos_token_id], skip_special_tokens=True) == ""
    assert builtin.tiny_llama_config().vocab_size == len(tok)
    assert models.load_tokenizer(builtin.BUILTIN_TINY).get_vocab() == tok.get_vocab()


def test_meta_skeleton_builds_without_weights_with_the_loaded_models_names_and_shapes():
    skeleton = models.meta_skeleton(builtin.BUILTIN_TINY)
    assert all(p.is_meta for p in skeleton.parameters())
    real = models.load_model(builtin.BUILTIN_TINY, torch.float32, {})
    assert {n: p.shape for n, p in skeleton.named_parameters()} == {n: p.shape for n, p in real.named_parameters()}
    assert not any(p.is_meta for p in real.parameters())


def test_builtin_tiny_is_the_same_model_on_every_load():
    """Every process builds it from the same seed: ZeRO ranks must start from identical weights."""
    torch.manual_seed(99)
    first = models.load_model(builtin.BUILTIN_TINY, torch.float32, {}).state_dict()
    second = models.load_model(builtin.BUILTIN_TINY, torch.bfloat16, {}).state_dict()
    assert all(torch.equal(first[k].to(torch.bfloat16), second[k]) for k in first)
    assert {v.dtype for v in second.values()} == {torch.bfloat16}


def test_meta_skeleton_of_a_missing_path_raises_oserror(tmp_path):
    """train.py turns this OSError into its "cannot read the model's config" refusal."""
    with pytest.raises(OSError):
        models.meta_skeleton(str(tmp_path / "no-such-model"))


def test_load_builtin_model_gives_the_base_train_py_trains_and_refuses_other_names():
    import beamlora_ds

    model, tokenizer = beamlora_ds.load_builtin_model("builtin-tiny")
    trained = models.load_model(builtin.BUILTIN_TINY, torch.float32, {})
    assert {n: p for n, p in model.state_dict().items()}.keys() == trained.state_dict().keys()
    assert all(torch.equal(p, trained.state_dict()[n]) for n, p in model.state_dict().items())
    assert tokenizer.get_vocab() == builtin.char_tokenizer().get_vocab()
    with pytest.raises(ValueError, match="'gpt2' is no built-in model; the built-in ones are"):
        beamlora_ds.load_builtin_model("gpt2")
