"""The shared training loop: learning-rate schedule, and resuming an interrupted run exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from training.loop import Outcome, Schedule, learning_rate, train_steps

SCHEDULE = Schedule(steps=8, peak_lr=0.1, warmup=2, log_every=4, save_every=3)


class Interrupted(Exception):
    pass


def test_learning_rate_warms_up_then_decays_to_a_tenth() -> None:
    assert learning_rate(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert learning_rate(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert learning_rate(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert learning_rate(100, 100, 1.0, 10) == pytest.approx(0.1)
    middle = [learning_rate(s, 100, 1.0, 10) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(middle, middle[1:]))


def _run(state_path: Path, stop_at: int | None = None) -> tuple[nn.Linear, Outcome]:
    """A small regression trained through :func:`train_steps`; raises Interrupted at step ``stop_at``."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    generator = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=SCHEDULE.peak_lr)
    target = torch.tensor([[1.0], [-2.0], [0.5]])

    def step_fn(step: int) -> tuple[torch.Tensor, float, str]:
        if step == stop_at:
            raise Interrupted
        x = torch.randn(4, 3, generator=generator) * float(rng.uniform(0.5, 1.5))
        loss = (model(x) - x @ target).square().mean()
        return loss, float(loss.detach()), ""

    outcome = train_steps("test", state_path, SCHEDULE, optimizer,
                          {"model": model, "generator": generator, "rng": rng}, step_fn)
    return model, outcome


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    straight, _ = _run(tmp_path / "straight.pt")
    with pytest.raises(Interrupted):
        _run(tmp_path / "resumed.pt", stop_at=4)
    assert torch.load(tmp_path / "resumed.pt")["step"] == 3  # the last save before the interruption
    resumed, outcome = _run(tmp_path / "resumed.pt")
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert np.isfinite(outcome.running_loss)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resumed.pt", "straight.pt"]  # no partial files


def test_a_finished_run_is_not_trained_again(tmp_path: Path) -> None:
    first, _ = _run(tmp_path / "state.pt")
    again, outcome = _run(tmp_path / "state.pt")
    for a, b in zip(first.parameters(), again.parameters()):
        assert torch.equal(a, b)
    assert np.isnan(outcome.running_loss)
