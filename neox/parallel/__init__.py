"""Scale-out: one DeviceMesh (pp, dp_replicate, dp_shard, tp), DDP / FSDP2 / DTensor TP / pipeline stages.

Exports load on first use, so `neox.parallel.mesh` layout checks run without importing torch.distributed.
"""

_EXPORTS = {
    "apply": "neox.parallel.compose",
    "parallelize": "neox.parallel.compose",
    "StepRunner": "neox.parallel.runner",
    "LocalRunner": "neox.parallel.runner",
    "ParallelDims": "neox.parallel.mesh",
    "build_mesh": "neox.parallel.mesh",
    "init_distributed": "neox.parallel.mesh",
    "dp_rank_and_size": "neox.parallel.mesh",
    "is_logging_rank": "neox.parallel.mesh",
    "submesh": "neox.parallel.mesh",
    "set_gradient_sync": "neox.parallel.fsdp",
    "clip_grad_norm_": "neox.parallel.reduce",
    "grad_norm": "neox.parallel.reduce",
    "loss_context": "neox.parallel.reduce",
    "masked_mean_loss": "neox.parallel.reduce",
    "mean_over": "neox.parallel.reduce",
    "sum_over": "neox.parallel.reduce",
    "is_vocab_parallel": "neox.parallel.tensor",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'neox.parallel' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
