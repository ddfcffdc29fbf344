"""One rank of the DDP / FSDP equivalence test (tests/nn/test_distributed.py), launched by torchrun with
the gloo backend on CPU: every rank takes its slice of one global batch, runs a train step of a patched
model under DistributedDataParallel or FSDP (``fully_shard``), and rank 0 saves the full gradients.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/nn/distributed_worker.py \
        --wrapper ddp --out grads.pt
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.nn.distributed_models import GLOBAL_BATCH, MODELS, build, loss_fn  # noqa: E402


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:  # torch 2.4 / 2.5
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def _full_grad(grad: torch.Tensor) -> torch.Tensor:
    """A DTensor gradient (FSDP shards) gathered to the full tensor; a plain tensor as it is."""
    full = getattr(grad, "full_tensor", None)
    return (full() if full is not None else grad).detach().clone()


def _count_fused_calls():
    """Counts the drop-ins' calls to the fused ops (so the test knows the fused path ran under the wrapper)."""
    import importlib

    calls = {"flash_attention": 0, "window_attention": 0, "patch_embed": 0}
    for module_name in ("vitkernels.nn.timm_layers", "vitkernels.nn.torchvision_layers",
                        "vitkernels.nn.multihead_attention", "vitkernels.models.video_vit"):
        module = importlib.import_module(module_name)
        for op in calls:
            real = getattr(module, op, None)
            if real is not None:
                def spy(*args, _real=real, _op=op, **kwargs):
                    calls[_op] += 1
                    return _real(*args, **kwargs)
                setattr(module, op, spy)
    return calls


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--wrapper", choices=("ddp", "fsdp"), required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results, calls = {}, _count_fused_calls()
    for name in MODELS:
        before = dict(calls)
        model, x, y = build(name)
        per_rank = GLOBAL_BATCH // world
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        if args.wrapper == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
            params = dict(wrapped.module.named_parameters())
        else:
            fully_shard = _fully_shard()
            for block in MODELS[name]["blocks"](model):
                fully_shard(block)
            wrapped = fully_shard(model)
            params = dict(model.named_parameters())
        loss_fn(wrapped(x), y).backward()  # the wrappers average the gradients over the ranks
        grads = {n: _full_grad(p.grad) for n, p in params.items()}
        if rank == 0:
            results[name] = dict(grads=grads, fused_calls={k: calls[k] - before[k] for k in calls})
    if rank == 0:
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
