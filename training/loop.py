"""The loop every tiny-shapes training script shares: resume, learning-rate schedule, optimiser step,
running loss, periodic log and state save.

A script describes one step (``step_fn``: the loss to minimise, the value to log, an optional note)
and names everything whose state must survive an interruption; :func:`train_steps` does the rest. A run
stopped at any point and started again continues exactly where its last save left it, with the same
batches (the random generators are part of the saved state).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)


class HasStateDict(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


Stateful = HasStateDict | torch.Generator | np.random.Generator


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class Schedule:
    steps: int
    peak_lr: float
    warmup: int
    log_every: int
    save_every: int
    # Weight of the newest step in the logged running average.
    smoothing: float = 0.05
    # Gradient-norm clip over the optimiser's parameters; None: no clipping.
    clip_norm: float | None = 1.0


@dataclass(frozen=True)
class Outcome:
    running_loss: float
    seconds: float


def _save_state(item: Stateful) -> Any:
    if isinstance(item, torch.Generator):
        return item.get_state()
    if isinstance(item, np.random.Generator):
        return item.bit_generator.state
    return item.state_dict()


def _load_state(item: Stateful, state: Any) -> None:
    if isinstance(item, torch.Generator):
        item.set_state(state)
    elif isinstance(item, np.random.Generator):
        item.bit_generator.state = state
    else:
        item.load_state_dict(state)


def save_atomically(obj: Any, path: Path) -> None:
    """torch.save through a temporary file and a rename: an interrupted save leaves the old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def _parameters(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def train_steps(
    name: str,
    state_path: Path,
    schedule: Schedule,
    optimizer: torch.optim.Optimizer,
    state: Mapping[str, Stateful],
    step_fn: Callable[[int], tuple[Tensor, float, str]],
    after_step: Callable[[int], None] | None = None,
) -> Outcome:
    """Train from the state in ``state_path`` (if any) to ``schedule.steps``.

    ``state`` names the modules, generators and other objects saved with the optimiser every
    ``save_every`` steps and at the end (keys are the state file's keys). ``step_fn(step)`` returns
    (loss, logged value, note); the loop sets the learning rate, back-propagates, clips, steps the
    optimiser and then calls ``after_step(step)`` (e.g. an EMA update).
    """
    saved = {**state, "optimizer": optimizer}
    start = 0
    if state_path.exists():
        loaded = torch.load(state_path)
        for key, item in saved.items():
            _load_state(item, loaded[key])
        start = loaded["step"]
        logger.info("resumed %s training at step %d", name, start)
    began = time.time()
    running: float | None = None
    for step in range(start, schedule.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, schedule.steps, schedule.peak_lr, schedule.warmup)
        loss, value, note = step_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if schedule.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(_parameters(optimizer), schedule.clip_norm)
        optimizer.step()
        if after_step is not None:
            after_step(step)
        running = value if running is None else (1 - schedule.smoothing) * running + schedule.smoothing * value
        done = step + 1
        if done % schedule.log_every == 0 or done == schedule.steps:
            logger.info("%s step %d/%d %.4f (avg %.4f)%s %.1fs", name, done, schedule.steps, value, running,
                        f" {note}" if note else "", time.time() - began)
        if done % schedule.save_every == 0 or done == schedule.steps:
            save_atomically({**{key: _save_state(item) for key, item in saved.items()}, "step": done}, state_path)
    return Outcome(running_loss=float("nan") if running is None else running, seconds=time.time() - began)
