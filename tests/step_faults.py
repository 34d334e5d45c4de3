"""Faults injected into a training step, shared by the step's tests and the engine's: a NaN
loss, an overflowing gradient, the GradScalers of fp16 training on the CPU."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from modules.losses import GeneratorLoss


@contextlib.contextmanager
def nan_time_loss(from_call: int = 1) -> Iterator[None]:
    """Inside the block, the generator's time loss `l_t` is NaN from the `from_call`-th
    `GeneratorLoss` forward on (counted from 1, every instance together); the real forward is
    back on the way out."""
    real_forward = GeneratorLoss.forward
    calls = 0

    def forward(self, *args, **kwargs):
        nonlocal calls
        losses = real_forward(self, *args, **kwargs)
        calls += 1
        if calls >= from_call:
            losses = {**losses, "l_t": losses["l_t"] * float("nan")}
        return losses

    GeneratorLoss.forward = forward
    try:
        yield
    finally:
        GeneratorLoss.forward = real_forward


@contextlib.contextmanager
def overflowing_gradient(module: torch.nn.Module) -> Iterator[None]:
    """Inside the block, the gradient of `module`'s first parameter is infinite: a finite loss
    whose scaled gradient overflows, as under fp16."""
    hook = next(module.parameters()).register_hook(lambda grad: grad * float("inf"))
    try:
        yield
    finally:
        hook.remove()


def fp16_scalers(parts, init_scale: float = 2.0 ** 16) -> None:
    """Give `parts` the GradScalers of fp16 training (the arithmetic stays float32 on the CPU):
    what the step does with them is what it does on a GPU."""
    parts.scaler_g = torch.amp.GradScaler("cpu", init_scale=init_scale)
    parts.scaler_d = torch.amp.GradScaler("cpu", init_scale=init_scale)
