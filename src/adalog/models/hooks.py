"""Forward hooks that record what layers see, and forward passes that end once they have.

Calibration, GPTQ, bias correction and reconstruction all run the model only to observe some
of its layers; a hook raising :class:`StopForward` skips the rest of the network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

__all__ = ["StopForward", "forward_batches", "forward_hooks", "run_forward"]

#: ``hook(name, module, inputs, output)``
LayerHook = Callable[[str, nn.Module, tuple, Any], None]


class StopForward(Exception):
    """Raised by a hook when the rest of the forward pass is not needed."""


@contextmanager
def forward_hooks(layers: Mapping[str, nn.Module], hook: LayerHook) -> Iterator[None]:
    """Call ``hook(name, module, inputs, output)`` after each of ``layers`` runs."""
    handles = [
        module.register_forward_hook(lambda mod, i, o, n=name: hook(n, mod, i, o))
        for name, module in layers.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_forward(model: nn.Module, batch: Tensor) -> None:
    """``model(batch)``, ending quietly where a hook raised :class:`StopForward`."""
    try:
        model(batch)
    except StopForward:
        pass


def forward_batches(
    model: nn.Module,
    images: Tensor,
    batch_size: int,
    desc: str | None = None,
    progress: bool = False,
) -> None:
    """Run ``images`` through ``model`` in batches without gradients (for the hooks' sake)."""
    starts = range(0, images.shape[0], batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc=desc, disable=not progress):
            run_forward(model, images[start : start + batch_size])
