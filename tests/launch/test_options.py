"""launch/train.py's defaults follow the model: the built-in run's for a built-in model (named or not), the paper's
for any other; explicit flags win; only the offline demo has a default output folder."""
import pytest

from beamlora_ds.train.checks import UsageError
from beamlora_ds.train.options import BUILTIN_DEFAULTS, PAPER_DEFAULTS, fill_defaults, parse_args


def filled(*argv):
    return fill_defaults(parse_args(["--ds_config", "ds_configs/zero2.json", *argv]))


@pytest.mark.parametrize("model", [[], ["--model_name_or_path", "builtin"], ["--model_name_or_path", "builtin-tiny"],
                                   ["--model_name_or_path", "builtin-smollm2"]])
def test_a_built_in_model_takes_the_built_in_runs_defaults(model):
    args = filled(*model)
    assert (args.lora_r, args.interval, args.max_steps, args.lora_dropout) == (8, 10, 30, 0.0)
    assert args.output_dir == "outputs/builtin" and args.builtin_model


def test_a_built_in_model_on_your_data_keeps_its_defaults_but_needs_an_output_folder():
    with pytest.raises(UsageError, match="--output_dir is required"):
        filled("--model_name_or_path", "builtin-tiny", "--dataset", "my.jsonl")
    args = filled("--model_name_or_path", "builtin-tiny", "--dataset", "my.jsonl", "--output_dir", "o")
    assert {k: getattr(args, k) for k in BUILTIN_DEFAULTS if k != "output_dir"} == {
        k: v for k, v in BUILTIN_DEFAULTS.items() if k != "output_dir"}


def test_any_other_model_takes_the_papers_defaults_and_explicit_flags_win():
    args = filled("--model_name_or_path", "meta-llama/Llama-2-7b-hf", "--output_dir", "o", "--interval", "7")
    assert (args.lora_r, args.lora_alpha, args.max_steps, args.interval) == (64, 128.0, -1, 7)
    assert not args.builtin_model and PAPER_DEFAULTS["interval"] == 3000
