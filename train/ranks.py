"""Decisions every rank must take alike: a check run once, a flag any rank may raise.

A check that reads shared files (the run directory's lock, the training shards) runs on the
main process only, and its `UserError` is raised on every rank (`main_process_check`): a rank
that went on would wait forever at the next barrier. A flag set on one rank (a stop request,
train/stop.py) is agreed on with a collective (`any_rank`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from train.errors import UserError

T = TypeVar("T")


def main_process_check(accelerator: Accelerator, check: Callable[[], T]) -> T | None:
    """`check()` on the main process; its UserError is raised on every rank. Returns its
    result on the main process, None on the others."""
    error, result = None, None
    if accelerator.is_main_process:
        try:
            result = check()
        except UserError as err:
            error = err
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error is not None:
        raise error
    return result


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` is true on any rank (a collective: every rank must call it)."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return bool(total.item() > 0)
