"""Parallelism plans applied in a LightningModule's ``configure_model``.

Order matters and follows torchtitan: activation checkpointing, then ``torch.compile``, then
``fully_shard`` of every unit bottom-up and finally of the root. Each stage module only says
*which* submodules are units; how they are wrapped lives here.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def enable_activation_checkpointing(modules: Iterable[nn.Module]) -> int:
    """Recompute each module's activations in backward instead of storing them.

    The forward method is wrapped in place rather than the module being replaced by a wrapper, so
    parameter names (and therefore checkpoints and the frozen-base checksum) do not change. Unlike
    transformers' built-in switch it also applies to modules in eval mode, which the frozen base is.
    Returns the number of modules wrapped.
    """
    count = 0
    for module in modules:
        if getattr(module, "_lit_star_checkpointed", False):
            continue
        original_forward = module.forward

        @functools.wraps(original_forward)
        def forward(*args, _original=original_forward, **kwargs):
            if not torch.is_grad_enabled():
                return _original(*args, **kwargs)
            return checkpoint(_original, *args, use_reentrant=False, **kwargs)

        module.forward = forward
        module._lit_star_checkpointed = True
        count += 1
    return count


def require_compile_toolchain(option: str) -> None:
    """Fail now, naming ``option``, if TorchInductor cannot find the C++ compiler it builds kernels with.

    Without the check a missing compiler surfaces at the first training step, after the weights have
    loaded, as an error from deep inside inductor.
    """
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # a torch without this helper: torch.compile reports it itself
        return
    try:
        get_cpp_compiler()
    except Exception as error:  # inductor raises its own InvalidCxxCompiler
        raise RuntimeError(
            f"{option} needs a C++ compiler for torch.compile (TorchInductor), and none was found: {error}. "
            f"Install one (e.g. apt-get install g++) or set {option} to false."
        ) from error


def compile_modules(modules: Iterable[nn.Module]) -> int:
    """``torch.compile`` each module in place, the regional compilation torchtitan applies per block.

    Compiling in place (``nn.Module.compile``) keeps parameter names, so checkpoints and the frozen-base
    checksum do not see it. Identical blocks reuse one compiled graph. Shapes are symbolic from the
    first call: a text-to-image batch is as long as its longest caption, and static graphs would be
    recompiled for every new length. Inductor builds its CPU kernels for the thread count of the moment:
    a later ``torch.set_num_threads`` (a curriculum step's ``grow``) compiles every graph again (80 s for
    the Shapes VQ, as long as the first time). Returns the number of modules compiled.
    """
    count = 0
    seen: set[int] = set()
    for module in modules:
        if id(module) in seen:
            continue
        seen.add(id(module))
        module.compile(dynamic=True)
        count += 1
    return count


def fully_shard_units(
    root: nn.Module,
    units: Iterable[nn.Module],
    mesh,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
) -> int:
    """FSDP2-shard each unit, then the root, over ``mesh`` (a 1-D data-parallel DeviceMesh).

    Units are the submodules that are called on their own (decoder layers, the vision tower, the
    inner models, the head): each becomes one all-gather in forward and one reduce-scatter in
    backward. Returns the number of units sharded (root excluded).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    seen: set[int] = set()
    for unit in units:
        if id(unit) in seen or unit is root:
            continue
        seen.add(id(unit))
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    return len(seen)
