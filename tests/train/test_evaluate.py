"""beamlora_ds.train.evaluate.exact_match against a hand count: a tiny model with the character tokenizer whose greedy
answers are scripted per question, so which answers are right is known before the call."""
import torch

from beamlora_ds.train.data import DEFAULT_TEMPLATE
from beamlora_ds.train.evaluate import exact_match
from beamlora_ds.loading.builtin import char_tokenizer

ROWS = [{"prompt": "1+1", "response": "2"}, {"prompt": "2+2", "response": "4"},
        {"prompt": "10-3", "response": "7"}, {"prompt": "5+5", "response": "10"},
        {"prompt": "9-9", "response": "0"}, {"prompt": "3+4", "response": "7"}]
# what the "model" answers (after the prompt): right, right, wrong, right only up to the newline, wrong, empty
SCRIPT = {"1+1": "2\n", "2+2": "4", "10-3": "8", "5+5": "10\nmore", "9-9": "00", "3+4": ""}
HAND_COUNT = 3  # questions 1, 2 and 4


class ScriptedModel(torch.nn.Module):
    """Decodes each left-padded prompt (the mask must mark it exactly) and appends its scripted answer and eos."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer, self.weight = tokenizer, torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def generate(self, input_ids, attention_mask, do_sample, max_new_tokens, pad_token_id, synced_gpus):
        assert not self.training and not do_sample and pad_token_id == self.tokenizer.pad_token_id
        self.calls.append(synced_gpus)
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            assert mask.tolist() == sorted(mask.tolist())  # left padding: pads first
            prompt = self.tokenizer.decode(ids[mask.bool()])
            question = prompt[len("Question: "):-len("\nAnswer: ")]
            assert DEFAULT_TEMPLATE.format(prompt=question) == prompt
            answer = self.tokenizer(SCRIPT[question])["input_ids"] + [self.tokenizer.eos_token_id]
            rows.append(answer[:max_new_tokens] + [pad_token_id] * (max_new_tokens - len(answer)))
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_exact_match_is_the_hand_count_and_the_training_mode_is_restored():
    tok = char_tokenizer()
    model = ScriptedModel(tok).train()
    assert exact_match(model, tok, ROWS, DEFAULT_TEMPLATE, batch_size=4) == HAND_COUNT / len(ROWS)
    assert model.training and model.calls == [False, False]  # two batches: 4 + 2 questions


def test_processes_score_their_own_share_and_the_totals_are_summed():
    tok = char_tokenizer()
    seen = []
    alone = exact_match(ScriptedModel(tok), tok, ROWS, DEFAULT_TEMPLATE, rank=0, world_size=2,
                        all_reduce=lambda totals: seen.append(totals.clone()) or totals)
    assert seen[0].tolist() == [2.0, 3.0] and alone == 2 / 3  # rows 1-3: two right
    model = ScriptedModel(tok)
    both = exact_match(model, tok, ROWS, DEFAULT_TEMPLATE, rank=1, world_size=2, synced_gpus=True,
                       all_reduce=lambda totals: totals + seen[0])  # rank 0's totals added, as a sum would
    assert both == HAND_COUNT / len(ROWS) and model.calls == [True]  # rows 4-6: one right
