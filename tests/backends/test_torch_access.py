"""TorchAccess, the plain-torch side of the platform seam (beamlora_ds/backends/torch_access.py): what the controller
reads and writes, checked against tensors the test computes itself. The controller's use of it is in
tests/method/test_controller.py."""
import pytest
import torch

from beamlora_ds.backends.torch_access import TorchAccess
from beamlora_ds.backends.wrappers import unwrap_optimizer
from beamlora_ds.method.algorithm import ModuleReset
from helpers import make_run, train_step
from helpers import regression_batches


def test_optimizer_without_adapter_params_is_refused():
    model, beam, _ = make_run()
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="not in the optimizer"):
        beam.step(other)


def test_wrapped_optimizers_are_unwrapped_and_anything_else_is_refused():
    _, _, opt = make_run()

    class Wrapper:  # what accelerate and the HF Trainer hand out
        def __init__(self, inner):
            self.optimizer = inner

    assert unwrap_optimizer(Wrapper(Wrapper(opt))) is opt
    with pytest.raises(TypeError, match="pass the torch optimizer you call step"):
        unwrap_optimizer(object())


def test_rank_stats_are_the_logits_and_per_rank_sums_of_squares():
    model, beam, opt = make_run()
    with torch.no_grad():
        for m in beam.modules:
            m.lora_B.normal_()
            m.lora_score.normal_()
    stats = TorchAccess(beam.modules, opt).rank_stats(with_norms=True)
    for k, m in enumerate(beam.modules):
        A, B = m.lora_A.detach(), m.lora_B.detach()
        assert torch.equal(stats.logits[k], m.lora_score.detach())
        for i in range(m.r):
            assert stats.a_row_sq[k, i] == pytest.approx(sum(float(v) ** 2 for v in A[i]), rel=1e-5)
            assert stats.b_col_sq[k, i] == pytest.approx(sum(float(v) ** 2 for v in B[:, i]), rel=1e-5)
    assert TorchAccess(beam.modules, opt).rank_stats(with_norms=False).a_row_sq is None


def test_snapshot_is_a_host_copy_and_a_reset_writes_only_its_targets():
    model, beam, opt = make_run()
    for batch in regression_batches(2):
        train_step(model, opt, batch)
    access = TorchAccess(beam.modules, opt)
    snap = access.snapshot()
    module = beam.modules[0]
    assert set(snap["modules"][0]["A_moments"]) == {"exp_avg", "exp_avg_sq"}  # Adam's scalar step is not a moment
    train_step(model, opt, regression_batches(3)[2])
    assert not torch.equal(snap["modules"][0]["A"], module.lora_A)  # a copy, not a view of the live tensor
    before_A, before_avg = module.lora_A.detach().clone(), opt.state[module.lora_A]["exp_avg"].clone()
    logits = torch.arange(module.r, dtype=torch.float32)
    access.apply_reset([ModuleReset(module_index=0, targets=[1, 5], sources=[0, 2])], {0: logits}, snap,
                       inherit_moments=True)
    changed = [1, 5]
    kept = [i for i in range(module.r) if i not in changed]
    assert torch.equal(module.lora_A[changed], snap["modules"][0]["A"][[0, 2]])
    assert torch.equal(module.lora_B[:, changed], snap["modules"][0]["B"][:, [0, 2]])
    assert torch.equal(opt.state[module.lora_A]["exp_avg"][changed], snap["modules"][0]["A_moments"]["exp_avg"][[0, 2]])
    assert torch.equal(module.lora_A[kept], before_A[kept])
    assert torch.equal(opt.state[module.lora_A]["exp_avg"][kept], before_avg[kept])
    assert torch.equal(module.lora_score.detach(), logits)
    access.zero_score_moments()
    assert all(torch.count_nonzero(v) == 0 for k, v in opt.state[module.score_parameter].items() if k != "step")
