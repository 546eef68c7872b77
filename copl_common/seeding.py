"""Seeded randomness for library code that leaves the caller's random state as it was.

Module initialization, dropout and `randn_like` draw from torch's global generators, which belong to
the caller: `torch.manual_seed` in a library would reset them for good. `seeded` forks them instead.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Inside, the CPU generator (and, for an accelerator `device`, that kind's generators) start from
    `seed`; on exit every one of them is back in the state it had before."""
    device = torch.device(device)
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
        return
    module = torch.get_device_module(device.type)
    with torch.random.fork_rng(devices=range(module.device_count()), device_type=device.type):
        torch.manual_seed(seed)  # CPU and every device of the kind, all forked above
        yield
