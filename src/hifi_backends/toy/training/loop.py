"""The checkpointed training loop of every stage: checkpoints, the learning-rate schedule, a wall-clock budget."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from hifi.io.images import atomic_path


def _save_ckpt(path: Path, step: int, total: int, **states: Any) -> None:
    payload = {"step": step, "total": total, **{k: v.state_dict() for k, v in states.items()}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_ckpt(path: Path, **states: Any) -> tuple[int, int | None]:
    """The step to resume at and the step count the run had planned (None: an older checkpoint)."""
    if not path.exists():
        return 0, None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    for k, v in states.items():
        v.load_state_dict(payload[k])
    total = payload.get("total")
    return int(payload["step"]), None if total is None else int(total)


def _schedule(opt: torch.optim.Optimizer, base: float, step: int, total: int, warmup: int = 100) -> None:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        lr = base * (step + 1) / warmup
    else:
        lr = base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))
    for group in opt.param_groups:
        group["lr"] = lr


@attrs.define
class Plan:
    """A stage's step count, which a wall-clock budget may re-plan once, inside the warm-up.

    The learning-rate warm-up does not depend on the step count, so choosing the count after
    ``probe[1]`` steps (from the pace of steps ``probe[0]`` to ``probe[1]``) gives the same run
    as asking for that count from the start.
    """

    total: int
    seconds: float = 0.0  # 0: keep total
    probe: tuple[int, int] = (10, 90)
    every: int = 100  # the re-planned count is a multiple of this

    def replan(self, pace: float, elapsed: float) -> None:
        """Fit the count to the budget left after ``elapsed`` seconds at ``pace`` seconds a step."""
        more = (self.seconds - elapsed) / max(pace, 1e-9)
        fitted = (self.probe[1] + int(more)) // self.every * self.every
        self.total = max(self.probe[1] + self.every, min(self.total, fitted))


def _loop(name: str, work: Path, total: int | Plan, step_fn: Callable[[int], float | Tensor],
          states: dict[str, Any], every: int = 200) -> dict[str, Any]:
    """Run ``step_fn`` for each step, checkpointing every ``every`` steps (resumable).

    ``step_fn`` may return the loss as a tensor: it is read back (a device sync) only every 20
    steps, so that a GPU's queue is not drained after every step.
    """
    plan = total if isinstance(total, Plan) else Plan(total)
    if plan.seconds > 0 and plan.probe[1] >= every:
        raise ValueError(f"{name}: the budget's probe ends at step {plan.probe[1]}, after the first checkpoint")
    ckpt = work / f"{name}.ckpt"
    start, planned = _load_ckpt(ckpt, **states)
    if planned is not None:
        plan.total, plan.seconds = planned, 0.0  # a resumed run keeps the count it planned
    losses: list[float] = []
    pending: list[Tensor] = []
    began = time.time()
    probe_began = began

    def read_back(step: int) -> None:
        values = torch.stack(pending).tolist() if pending else []
        pending.clear()
        for v in values:
            if not math.isfinite(v):
                raise RuntimeError(f"{name}: loss became {v} at or before step {step}")
        losses.extend(values)

    with tqdm(total=plan.total, desc=name, initial=start) as bar:
        step = start
        while step < plan.total:
            loss = step_fn(step)
            # kept on its device until read back
            pending.append(loss.detach().float().reshape(()) if isinstance(loss, Tensor) else torch.tensor(float(loss)))
            if plan.seconds > 0 and start == 0 and step + 1 in plan.probe:
                read_back(step)
                if step + 1 == plan.probe[0]:
                    probe_began = time.time()
                else:
                    plan.replan((time.time() - probe_began) / (plan.probe[1] - plan.probe[0]), time.time() - began)
                    bar.total = plan.total
            if step % 20 == 0 or step + 1 == plan.total:
                read_back(step)
                if losses:
                    bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            if (step + 1) % every == 0 and step + 1 < plan.total:
                _save_ckpt(ckpt, step + 1, plan.total, **states)
            step += 1
            bar.update(1)
    read_back(step)
    return {"steps": plan.total, "resumed_at": start, "seconds": round(time.time() - began, 1),
            "final_loss": float(np.mean(losses[-100:])) if losses else None}
