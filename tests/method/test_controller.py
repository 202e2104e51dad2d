"""BeamController with a plain torch optimizer: what a reset must do to weights, scores and Adam moments.

The expected values are computed here from copies the test itself takes (not from the controller's
snapshot), and the pruned set from a plain-Python re-implementation of docs/method.md section 4, step 1.
"""
import copy
import io
import math

import pytest
import torch

from beamlora_ds import BeamLoRAConfig, apply, optimizer_param_groups
from helpers import TwoLayerNet, make_run, optimizer_state_of, regression_batches, train_step


def adapter_copy(beam, opt):
    """Our own oracle copy of every adapter tensor and its Adam state."""
    out = {}
    for name, m in zip(beam.module_names, beam.modules):
        out[name] = {k: getattr(m, k).detach().clone() for k in ("lora_A", "lora_B", "lora_score")}
        for k in ("lora_A", "lora_B", "lora_score"):
            for entry in ("exp_avg", "exp_avg_sq", "step"):
                out[name][f"{k}.{entry}"] = optimizer_state_of(opt, m, f"{k}.{entry}").clone()
    return out


def naive_pruned_set(logits_by_module, tau, keep):
    """docs/method.md section 4, step 1, written as plainly as possible, in Python floats."""
    items = []
    for m, logits in enumerate(logits_by_module):
        z = [math.exp(v / tau) for v in logits.tolist()]
        items += [(len(z) * zi / sum(z), m, i) for i, zi in enumerate(z)]
    order = sorted(range(len(items)), key=lambda k: (-items[k][0], k))
    total, pruned, cut = 0.0, set(), False
    for k in order:
        total += items[k][0]
        cut = cut or total > keep * len(items)
        if cut:
            pruned.add(items[k][1:])
    for m, logits in enumerate(logits_by_module):  # our rule: a module keeps at least its top rank
        r = len(logits)
        if all((m, i) in pruned for i in range(r)):
            pruned.discard((m, max(range(r), key=lambda i: (logits[i].item(), -i))))
    return pruned


def run_until_first_reset(optimizer_state="inherit"):
    model, beam, opt = make_run(optimizer_state=optimizer_state)
    batches = regression_batches(8)
    for t, batch in enumerate(batches[:4], start=1):
        train_step(model, opt, batch)
        assert beam.step(opt) is None
    snap = adapter_copy(beam, opt)  # after step 4 = T/2: what the snapshot must hold
    for batch in batches[4:7]:
        train_step(model, opt, batch)
        beam.step(opt)
    train_step(model, opt, batches[7])
    before = adapter_copy(beam, opt)
    identities = [(id(p), p.shape) for p in model.parameters()]
    record = beam.step(opt)
    return model, beam, opt, snap, before, record, identities


@pytest.mark.parametrize("mode", ["inherit", "keep"])
def test_reset_rewrites_exactly_the_pruned_slots(mode):
    model, beam, opt, snap, before, record, identities = run_until_first_reset(mode)
    after = adapter_copy(beam, opt)
    assert record is not None and record["step"] == 8 and beam.history == [record]
    keep = 1 - 0.5 * (1 + math.cos(math.pi * 7 / 26)) / 2  # t_end = 2/3 of 40 = 26
    assert record["keep_fraction"] == pytest.approx(keep)
    logits = [before[n]["lora_score"] for n in beam.module_names]
    expected_pruned = {(beam.module_names[m], i) for m, i in naive_pruned_set(logits, 0.05, keep)}
    assert set(record["pruned"]) == expected_pruned and len(expected_pruned) > 0

    for name in beam.module_names:
        pairs = sorted((j, s) for n, j, s in record["sources"] if n == name)
        targets = {j for j, _ in pairs}
        assert targets.isdisjoint({s for _, s in pairs})
        b, a, sn = before[name], after[name], snap[name]
        for j, s in pairs:  # pruned slot j now holds the snapshot's source rank
            assert torch.equal(a["lora_A"][j], sn["lora_A"][s])
            assert torch.equal(a["lora_B"][:, j], sn["lora_B"][:, s])
            for moment in ("exp_avg", "exp_avg_sq"):
                expected_A = sn[f"lora_A.{moment}"][s] if mode == "inherit" else b[f"lora_A.{moment}"][j]
                expected_B = sn[f"lora_B.{moment}"][:, s] if mode == "inherit" else b[f"lora_B.{moment}"][:, j]
                assert torch.equal(a[f"lora_A.{moment}"][j], expected_A)
                assert torch.equal(a[f"lora_B.{moment}"][:, j], expected_B)
        untouched = [i for i in range(8) if i not in targets]  # sources included: they keep current values
        assert torch.equal(a["lora_A"][untouched], b["lora_A"][untouched])
        assert torch.equal(a["lora_B"][:, untouched], b["lora_B"][:, untouched])
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a[f"lora_A.{moment}"][untouched], b[f"lora_A.{moment}"][untouched])
            assert torch.equal(a[f"lora_B.{moment}"][:, untouched], b[f"lora_B.{moment}"][:, untouched])
        expected_score = b["lora_score"].clone()
        for j, s in pairs:
            expected_score[j] = expected_score[s] = (expected_score[j] + expected_score[s]) / 2
        assert torch.allclose(a["lora_score"], expected_score, atol=0, rtol=0)
        assert torch.count_nonzero(a["lora_score.exp_avg"]) == 0  # every module, touched or not
        assert torch.count_nonzero(a["lora_score.exp_avg_sq"]) == 0
        for k in ("lora_A", "lora_B", "lora_score"):
            assert torch.equal(a[k + ".step"], b[k + ".step"])  # Adam's step counter is kept
    assert [(id(p), p.shape) for p in model.parameters()] == identities


def test_modes_differ_only_in_moments():
    _, beam_i, opt_i, _, _, rec_inherit, _ = run_until_first_reset("inherit")
    _, beam_k, opt_k, _, _, rec_keep, _ = run_until_first_reset("keep")
    assert rec_inherit["pruned"] == rec_keep["pruned"] and rec_inherit["sources"] == rec_keep["sources"]
    inherit, keep = adapter_copy(beam_i, opt_i), adapter_copy(beam_k, opt_k)
    for name in beam_i.module_names:
        for key in ("lora_A", "lora_B", "lora_score"):
            assert torch.equal(inherit[name][key], keep[name][key])
    assert any(not torch.equal(inherit[n]["lora_A.exp_avg"], keep[n]["lora_A.exp_avg"]) for n in beam_i.module_names)


def test_training_continues_and_loss_falls_across_resets():
    model, beam, opt = make_run(total_steps=120, interval=20, p0=0.8)
    losses = []
    for b in regression_batches(120, seed=1):
        losses.append(train_step(model, opt, b))
        beam.step(opt)
    resets = [r["step"] for r in beam.history]
    assert resets == [20, 40, 60, 80, 100]
    assert sum(len(r["pruned"]) for r in beam.history) > 0
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert all(math.isfinite(v) for v in losses)


def test_resume_mid_interval_equals_the_uninterrupted_run():
    batches = regression_batches(24, seed=2)
    model, beam, opt = make_run(total_steps=24)
    for b in batches:
        train_step(model, opt, b)
        beam.step(opt)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model, beam, opt = make_run(total_steps=24)
    for b in batches[:6]:  # after the snapshot (step 4), before the reset (step 8)
        train_step(model, opt, b)
        beam.step(opt)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "beam": beam.state_dict()}, buffer)
    del model, beam, opt
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model, beam, opt = make_run(seed=5, total_steps=24)  # different init: everything must come from the checkpoint
    with pytest.raises(ValueError, match="seed"):
        beam.load_state_dict(saved["beam"])
    model, beam, opt = make_run(total_steps=24)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    beam.load_state_dict(saved["beam"])
    assert beam.global_step == 6
    for b in batches[6:]:
        train_step(model, opt, b)
        beam.step(opt)
    assert [r["step"] for r in beam.history] == [8, 16]
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k


class ProcessOf:
    """The backends' platform, as process `rank` of `world_size` sees it."""

    def __init__(self, platform, rank, world_size):
        self.platform, self.place = platform, {"rank": rank, "world_size": world_size}

    def __getattr__(self, name):
        return getattr(self.platform, name)

    def process_place(self):
        return dict(self.place)


def test_a_state_another_process_saved_is_refused_naming_the_fix():
    """One copy of process 0's state loaded by every process (accelerate's register_for_checkpointing) would give
    process 1 another process's snapshot shard: a silently different model after the next reset. Refused; the
    process's own state, and a state saved before processes were recorded, load."""
    _, saver, opt = make_run(total_steps=24)
    saver._platform = ProcessOf(saver._platform, 0, 2)
    for b in regression_batches(5):
        saver.step(opt)
    state = saver.state_dict()
    assert state["process"] == {"rank": 0, "world_size": 2}
    _, other, _ = make_run(total_steps=24)
    other._platform = ProcessOf(other._platform, 1, 2)
    problem = other.resume_problem(state)
    assert "saved by process 0 of 2, and this is process 1 of 2" in problem
    assert "beamlora_ds.save_checkpoint / load_checkpoint" in problem and "register_for_checkpointing" in problem
    with pytest.raises(ValueError, match="saved by process 0 of 2"):
        other.load_state_dict(state)
    other._platform = ProcessOf(other._platform.platform, 0, 2)
    other.load_state_dict(state)
    assert other.global_step == 5
    unrecorded = {k: v for k, v in state.items() if k != "process"}
    _, older, _ = make_run(total_steps=24)
    assert older.resume_problem(unrecorded) is None


def test_resume_without_controller_state_fails_clearly():
    model, beam, opt = make_run(total_steps=24)
    batches = regression_batches(8)
    fresh_model, fresh_beam, fresh_opt = make_run(total_steps=24)
    for b in batches[:7]:
        train_step(model, opt, b)
        beam.step(opt)
    fresh_beam.global_step = 7  # a user who restored the step count but not the snapshot
    train_step(fresh_model, fresh_opt, batches[7])
    with pytest.raises(RuntimeError, match="no snapshot"):
        fresh_beam.step(fresh_opt)


def test_non_finite_scores_skip_the_reset_and_training_goes_on():
    model, beam, opt = make_run()
    batches = regression_batches(9)
    for b in batches[:7]:
        train_step(model, opt, b)
        beam.step(opt)
    train_step(model, opt, batches[7])
    with torch.no_grad():
        beam.modules[0].lora_score[0] = float("nan")
    before_A = beam.modules[1].lora_A.detach().clone()
    record = beam.step(opt)
    assert record["skipped"] and record["pruned"] == []
    assert torch.equal(beam.modules[1].lora_A, before_A)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), torch.tensor(float("-inf"))])
def test_non_finite_loss_skips_only_the_next_reset(bad):
    """A NaN/Inf loss between two resets cancels the next one (even with finite scores), says why, and the
    reset after it runs as in a run that never saw the bad loss; the flag survives a state_dict round trip."""
    batches = regression_batches(16)
    model, beam, opt = make_run()
    clean_model, clean_beam, clean_opt = make_run()
    for t, b in enumerate(batches, start=1):
        loss = train_step(model, opt, b)
        train_step(clean_model, clean_opt, b)
        if t == 6:
            state = beam.state_dict()
        record = beam.step(opt, loss=bad if t == 5 else loss)
        clean_record = clean_beam.step(clean_opt, loss=loss)
        if t == 6:
            assert beam.state_dict()["nonfinite_loss_step"] == 5 and state["nonfinite_loss_step"] == 5
        if t == 8:
            assert record["skipped"] == "non-finite loss at step 5" and record["pruned"] == []
            assert clean_record["pruned"]  # the same step without the bad loss does prune
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), clean_model.parameters())) is False
            model.load_state_dict(clean_model.state_dict())  # re-align weights to compare the next reset
            opt.load_state_dict(copy.deepcopy(clean_opt.state_dict()))
    assert [r["step"] for r in beam.history] == [8, 16]
    assert not beam.history[1].get("skipped") and beam.history[1]["pruned"] == clean_beam.history[1]["pruned"]


def test_next_events_and_state_dict_roundtrip():
    _, beam, opt = make_run(total_steps=40)
    assert beam.next_events() == {"snapshot": 4, "reset": 8}
    beam.global_step = 17
    assert beam.next_events() == {"snapshot": 20, "reset": 24}
    state = copy.deepcopy(beam.state_dict())
    _, other, _ = make_run(total_steps=40)
    other.load_state_dict(state)
    assert other.global_step == 17


# ------------------------------------------------------------------------------- misuse told with the numbers
def test_a_decayed_score_is_warned_about_at_the_first_step(caplog):
    """torch's AdamW decays by default (0.01): the paper never decays the score; optimizer_param_groups does not."""
    batches = regression_batches(2)
    for groups, expected in ((lambda m: [p for p in m.parameters() if p.requires_grad], 1),
                             (lambda m: optimizer_param_groups(m, weight_decay=0.1), 0)):
        torch.manual_seed(0)
        model = TwoLayerNet()
        beam = apply(model, BeamLoRAConfig(r=4, alpha=8.0, total_steps=40, interval=8))
        opt = torch.optim.AdamW(groups(model), lr=1e-3)
        caplog.clear()
        with caplog.at_level("WARNING", logger="beamlora_ds.method.controller"):
            for batch in batches:
                train_step(model, opt, batch)
                beam.step(opt)
        said = [r.getMessage() for r in caplog.records if "weight decay" in r.getMessage()]
        assert len(said) == expected, said
        assert beam.decayed_scores(opt) == (beam.module_names if expected else [])


def test_forgotten_and_extra_steps_are_told_at_save_adapter(tmp_path, caplog):
    from beamlora_ds import save_adapter

    model, beam, opt = make_run()
    batches = regression_batches(5)
    for batch in batches[:3]:
        train_step(model, opt, batch)  # no beam.step: forgotten
    assert beam.step_count_problem(opt).startswith("BeamLoRA counted 0 optimizer steps, the optimizer counted 3")
    with caplog.at_level("WARNING", logger="beamlora_ds.method.controller"):
        save_adapter(model, str(tmp_path / "a"))
    assert "counted 0 optimizer steps, the optimizer counted 3" in caplog.text
    for _ in range(4):
        beam.step(opt)  # four calls for no new optimizer step: extra
    assert "counted 4 optimizer steps, the optimizer counted 3" in beam.step_count_problem()
    assert "more often" in beam.step_count_problem()
    train_step(model, opt, batches[3])
    assert beam.step_count_problem() is None  # 4 and 4 again


def test_stepping_past_total_steps_is_warned_about_once(caplog):
    model, beam, opt = make_run(total_steps=16, interval=8)
    with caplog.at_level("WARNING", logger="beamlora_ds.method.controller"):
        for batch in regression_batches(19):
            train_step(model, opt, batch)
            beam.step(opt)
    said = [r.getMessage() for r in caplog.records if "past total_steps" in r.getMessage()]
    assert said == ["BeamLoRA: step 17 is past total_steps=16, where the schedule ended (no more resets). Set "
                    "total_steps to the run's number of optimizer steps."]
