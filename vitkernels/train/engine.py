"""The training loop of ``python -m vitkernels.train``: one process or ``torchrun`` (torch.distributed,
DistributedSampler, DistributedDataParallel), AdamW with per-step warmup + cosine, autocast, checkpoints that
resume bit for bit, fine-tuning from a checkpoint at another image size, and a summary at the end.

Reproducibility contract: the data order is a function of (seed, epoch) (DistributedSampler), augmentation of
(seed, epoch, sample), and everything else random (dropout, drop path) comes from torch's RNG, whose state
(every rank's) is saved in the checkpoint; so ``--resume`` continues the interrupted run exactly: a resumed run
ends with the same weights as an uninterrupted one (bitwise, on the same device and thread count).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler, Subset

from vitkernels.train import build as build_mod
from vitkernels.train import data as data_mod
from vitkernels.train._deps import require
from vitkernels.train.build import UsageError

CHECKPOINT_FORMAT = "vitkernels.train/1"
# parameters that never get weight decay (besides every tensor of ndim <= 1: biases, norms, scalars)
NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "relative_position_bias_table", "pos_embedding",
                  "class_token")
# settings that change what a resumed run computes; resuming with others is allowed, with a warning
RESUME_SENSITIVE = ("model", "source", "no_patch", "img_size", "num_frames", "num_classes", "model_kwargs",
                    "video", "data", "train_limit", "augment", "epochs", "batch_size", "lr", "min_lr",
                    "weight_decay", "warmup_epochs", "warmup_steps", "grad_clip", "label_smoothing", "amp",
                    "seed", "world_size", "grad_checkpointing")


# ----------------------------------------------------------------------------------------- processes

@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


_OWN_GROUP: List[bool] = []     # non-empty while this module's init_process_group is in force


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False); "
                         "use --device cpu")
    if requested not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected auto, cpu or cuda; got {requested!r}")
    return torch.device(requested)


def resolve_amp(amp: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """--amp -> the autocast dtype (None: full precision). Default: bf16 on CUDA, none on CPU."""
    if amp is None:
        amp = "bf16" if device.type == "cuda" else "none"
    if amp == "none":
        return None
    if amp == "fp16":
        if device.type != "cuda":
            raise UsageError("--amp fp16: CPU autocast runs bf16 only (fp16 mixed precision needs a CUDA device "
                             "and a GradScaler); use --amp bf16 or --amp none on CPU")
        return torch.float16
    if amp == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UsageError("--amp bf16: this GPU has no bf16; use --amp fp16 (with a GradScaler) or --amp none")
        return torch.bfloat16
    raise UsageError(f"--amp: expected none, bf16 or fp16; got {amp!r}")


def init_runtime(device_arg: str) -> Runtime:
    """One process, or torchrun's: RANK / WORLD_SIZE / LOCAL_RANK in the environment -> init_process_group
    (nccl on CUDA, gloo on CPU), one GPU per local rank."""
    device = resolve_device(device_arg)
    if not under_torchrun():
        return Runtime(device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local} but torch sees {torch.cuda.device_count()} CUDA device(s): "
                             "start at most one process per GPU (torchrun --nproc_per_node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                **({"device_id": device} if device.type == "cuda" else {}))
        _OWN_GROUP.append(True)
    return Runtime(device, rank, world, local, distributed=True)


# ----------------------------------------------------------------------------------------- reporting

def peak_memory_mib(device: torch.device) -> Optional[float]:
    """CUDA: torch.cuda.max_memory_allocated; CPU: the process's max resident set size (getrusage)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource
    except ImportError:          # not on this platform
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10   # bytes on macOS, KiB on Linux


def memory_kind(device: torch.device) -> str:
    return "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process max RSS"


def _fmt_mem(mib: Optional[float]) -> str:
    return "n/a" if mib is None else f"{mib:,.0f} MiB"


class Printer:
    """Prints on rank 0 only, around a live progress bar."""

    def __init__(self, runtime: Runtime):
        self.enabled = runtime.main
        self.bar = None

    def __call__(self, *parts: Any) -> None:
        if not self.enabled:
            return
        text = " ".join(str(p) for p in parts)
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)


# ----------------------------------------------------------------------------------------- optimisation

def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: no weight decay on tensors of ndim <= 1 (biases, norms), position embeddings, class /
    distillation tokens, relative-position tables and whatever the model's ``no_weight_decay()`` names."""
    skip = set()
    no_wd = getattr(model, "no_weight_decay", None)
    if callable(no_wd):
        with contextlib.suppress(Exception):
            skip = set(no_wd())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in skip or any(key in name for key in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    """LR factor per optimizer step: linear warmup to 1 over ``warmup_steps`` steps, then cosine to
    ``min_ratio`` at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


# ----------------------------------------------------------------------------------------- RNG state

def rng_state(device: torch.device) -> Dict[str, Any]:
    """torch (CPU and this process's CUDA device), numpy and Python RNG states, as tensors and plain values
    (so the checkpoint loads with ``torch.load(weights_only=True)``)."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": _plain(random.getstate())}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    with contextlib.suppress(ImportError):
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(_tuples(state["python"]))
    if "numpy" in state:
        with contextlib.suppress(ImportError):
            import numpy as np

            kind, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2 ** 32)


# ----------------------------------------------------------------------------------------- checkpoints

def _atomic_save(obj: Dict[str, Any], path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint file {path!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:    # a pickle that needs arbitrary code, or not a torch file at all
        raise UsageError(f"{path!r} does not load with torch.load(weights_only=True): {exc}") from exc


def state_dict_of(obj: Any, path: str) -> Dict[str, torch.Tensor]:
    """The model weights in a loaded file: our checkpoint's ``model``, a ``state_dict`` / ``model`` entry, or
    a raw state_dict; DDP's ``module.`` prefix removed."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"--finetune: {path!r} holds no state_dict (a dict of tensors, or a checkpoint with a "
                         "'model' or 'state_dict' entry)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def classifier_keys(model: nn.Module) -> List[str]:
    """state_dict keys of the classifier head(s): timm's ``get_classifier()``, else the last Linear."""
    heads: List[nn.Module] = []
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        with contextlib.suppress(Exception):
            got = getter()
            heads = [m for m in (got if isinstance(got, (tuple, list)) else (got,)) if isinstance(m, nn.Module)]
    heads = [m for m in heads if any(True for _ in m.parameters())]
    if not heads:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        heads = linears[-1:]
    ids = {id(m) for m in heads}
    keys = []
    for name, module in model.named_modules():
        if id(module) in ids:
            keys += [f"{name}.{k}" if name else k for k in module.state_dict()]
    return keys


def load_finetune(model: nn.Module, path: str, say) -> Dict[str, Any]:
    """Load the weights of ``path`` into ``model`` (built at the current image size): position embeddings
    resampled by ``vitkernels.models.load_state_dict``; a classifier head of another shape is dropped (and
    said so), the rest must load strictly."""
    from vitkernels import models

    checkpoint = load_checkpoint(path)
    state = dict(state_dict_of(checkpoint, path))
    clip_grid = checkpoint.get("clip_grid") if isinstance(checkpoint, dict) else None
    own = model.state_dict()
    heads = set(classifier_keys(model))
    dropped = [k for k in state if k in heads and k in own and state[k].shape != own[k].shape]
    dropped_shapes = {k: tuple(state.pop(k).shape) for k in dropped}
    resized = [f"{k} {tuple(state[k].shape)} -> {tuple(own[k].shape)}" for k in state
               if k in own and state[k].shape != own[k].shape]
    try:
        result = models.load_state_dict(model, state, strict=not dropped,
                                        **({"clip_grid": clip_grid} if clip_grid is not None else {}))
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--finetune: the weights of {path!r} do not fit this model: {exc}") from exc
    if dropped:
        missing = sorted(set(result.missing_keys) - set(dropped))
        if missing or result.unexpected_keys:
            raise UsageError(f"--finetune: the weights of {path!r} do not fit this model: missing {missing}, "
                             f"unexpected {sorted(result.unexpected_keys)}")
        say(f"finetune: classifier head not loaded (its shape differs: the checkpoint has "
            f"{', '.join(f'{k} {shape}' for k, shape in dropped_shapes.items())}, the model "
            f"{', '.join(f'{k} {tuple(own[k].shape)}' for k in dropped)}); it starts from its initialisation")
    if resized:
        say(f"finetune: resampled to the model: {'; '.join(resized)}")
    return {"path": path, "dropped": dropped, "resampled": [r.split(" ")[0] for r in resized]}


# ----------------------------------------------------------------------------------------- data

class _SkipFirst(Sampler):
    """The wrapped sampler's indices without the first ``skip`` (a resumed epoch's consumed batches)."""

    def __init__(self, sampler: Sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def _loader(dataset, batch_size: int, sampler, *, drop_last: bool, workers: int, seed: int, pin: bool):
    # a generator of our own: DataLoader iterators draw their worker seed from it, not from torch's global RNG
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=workers,
                      pin_memory=pin, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------- the run

@dataclass
class TrainResult:
    model: nn.Module                      # the trained model, unwrapped from DDP
    summary: Dict[str, Any]
    loss_log: List[Tuple[int, float]] = field(default_factory=list)   # (global step, mean loss since last log)


def evaluate(model: nn.Module, loader, runtime: Runtime, amp_dtype) -> Tuple[float, float, int]:
    """(top-1 accuracy in %, mean loss, samples) over every rank's shard, all-reduced."""
    was_training = model.training
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64, device=runtime.device)   # correct, loss sum, count
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(runtime.device, non_blocking=True), y.to(runtime.device, non_blocking=True)
            with _autocast(runtime.device, amp_dtype):
                logits = logits_of(model(x))
            stats[0] += (logits.argmax(-1) == y).sum()
            stats[1] += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
            stats[2] += y.numel()
    if runtime.distributed:
        dist.all_reduce(stats)
    model.train(was_training)
    correct, loss_sum, count = stats.tolist()
    return (100.0 * correct / count if count else float("nan"), loss_sum / count if count else float("nan"),
            int(count))


def logits_of(output) -> torch.Tensor:
    """The class logits of a model's output: the tensor itself, an output object's ``logits``, or the first
    of a tuple (torchvision's GoogLeNet / Inception auxiliary outputs in training)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"the model returned {type(output).__name__}, not class logits")


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_classes(args) -> Tuple[int, List[str]]:
    """The dataset's classes without loading it (the model is built before the data: its native image size
    and input kind decide how the data is made)."""
    if args.data is None:
        return 10, [str(d) for d in range(10)]
    datasets = require("torchvision.datasets", "--data (ImageFolder)")
    root = args.data
    if not os.path.isdir(root):
        raise UsageError(f"--data: {root!r} is not a directory")
    base = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
    try:
        classes, _ = datasets.folder.find_classes(base)
    except FileNotFoundError as exc:
        raise UsageError(f"--data: {exc}") from exc
    return len(classes), classes


def make_data(args, video: bool, img_size: int, num_frames: Optional[int]) -> data_mod.DataSplits:
    try:
        if video:
            if args.data is not None:
                raise UsageError("--data: an ImageFolder holds images; video models train on the moving-digits "
                                 "clips (leave out --data)")
            return data_mod.digits_clips(img_size, num_frames, args.train_limit, args.val_limit)
        if args.data is not None:
            return data_mod.image_folder(args.data, img_size, args.augment is not False, args.seed,
                                         args.train_limit, args.val_limit)
        return data_mod.digits_images(img_size, bool(args.augment), args.seed, args.train_limit, args.val_limit)
    except ValueError as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(str(exc)) from exc


def train(args) -> TrainResult:
    """Run the training that ``args`` (the CLI's namespace) describes."""
    started = time.perf_counter()
    runtime = init_runtime(args.device)
    amp_dtype = resolve_amp(args.amp, runtime.device)
    say = Printer(runtime)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resume and args.finetune:
        raise UsageError("--resume and --finetune: give one (--resume continues a run with its optimizer; "
                         "--finetune starts a new run from a checkpoint's weights)")
    output = args.output or (os.path.dirname(os.path.abspath(args.resume)) if args.resume else None)
    if output and runtime.main:
        os.makedirs(output, exist_ok=True)

    # -- model (before the data: its input kind and native size decide the data)
    n_classes, classes = count_classes(args)
    num_classes = args.num_classes or n_classes
    if num_classes < n_classes:
        raise UsageError(f"--num-classes {num_classes}: the dataset has {n_classes} classes")
    seed_everything(args.seed)
    built = build_mod.build_model(args.model, args.source, num_classes=num_classes, img_size=args.img_size,
                                  num_frames=args.num_frames, model_kwargs=build_mod.parse_model_kwargs(
                                      args.model_kwargs), patch=not args.no_patch)
    video = built.video if args.video is None else args.video
    img_size = args.img_size or build_mod.native_img_size(built.model)
    num_frames = (args.num_frames or build_mod.native_num_frames(built.model, args.model)) if video else None
    for note in built.notes:
        say(f"note: {note}")
    if args.grad_checkpointing:
        build_mod.enable_grad_checkpointing(built)
    model = built.model
    finetuned = load_finetune(model, args.finetune, say) if args.finetune else None
    model.to(runtime.device)

    # -- data
    splits = make_data(args, video, img_size, num_frames)
    if len(splits.train) == 0 or len(splits.val) == 0:
        raise UsageError(f"the dataset has {len(splits.train)} training and {len(splits.val)} validation samples")
    workers = args.workers if args.workers is not None else (
        0 if runtime.device.type == "cpu" else min(8, max(1, (os.cpu_count() or 2) // runtime.world_size)))
    sampler = DistributedSampler(splits.train, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True,
                                 seed=args.seed, drop_last=False)
    drop_last = len(sampler) >= args.batch_size
    steps_per_epoch = len(sampler) // args.batch_size if drop_last else 1
    val_set = Subset(splits.val, list(range(runtime.rank, len(splits.val), runtime.world_size)))
    val_loader = _loader(val_set, args.batch_size, None, drop_last=False, workers=workers, seed=args.seed,
                         pin=runtime.device.type == "cuda")

    # -- optimisation
    raw_model = model
    if runtime.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups(raw_model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    total_steps = args.epochs * steps_per_epoch
    warmup = args.warmup_steps if args.warmup_steps is not None else int(round(args.warmup_epochs * steps_per_epoch))
    warmup = max(0, min(warmup, total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, warmup, min(1.0, args.min_lr / args.lr) if args.lr > 0 else 0.0))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    run_args = _plain_args(args, runtime)
    start_epoch, skip, global_step, best_acc, best_epoch, history = 0, 0, 0, -1.0, None, []
    if args.resume:
        ckpt = getattr(args, "_checkpoint", None) or load_checkpoint(args.resume)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise UsageError(f"--resume: {args.resume!r} is not a vitkernels.train checkpoint (use --finetune to "
                             "start from a state_dict's weights)")
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, skip, global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
        best_acc, best_epoch, history = ckpt["best_acc"], ckpt.get("best_epoch"), list(ckpt["history"])
        rngs = ckpt["rng"]
        if len(rngs) != runtime.world_size:
            say(f"note: the checkpoint holds the RNG state of {len(rngs)} process(es), this run has "
                f"{runtime.world_size}: rank 0's state seeds every rank")
        changed = [f"{k} {ckpt['args'].get(k)!r} -> {run_args.get(k)!r}" for k in RESUME_SENSITIVE
                   if ckpt["args"].get(k) != run_args.get(k)]
        if changed:
            say(f"warning: resuming with other settings than the checkpoint's ({'; '.join(changed)}): the run "
                "continues, but not as the interrupted one would have")
        say(f"resumed {args.resume}: epoch {start_epoch + 1}, step {global_step} "
            f"({skip} of its {steps_per_epoch} steps done)")
        set_rng_state(rngs[runtime.rank] if len(rngs) == runtime.world_size else rngs[0], runtime.device)
    else:
        seed_everything(args.seed + runtime.rank)   # dropout etc. differ per rank; weights came from DDP's rank 0

    n_params = sum(p.numel() for p in raw_model.parameters())
    kind = "clips" if video else "img"
    say(f"model {built.name} ({built.source}{', vitkernels-patched' if built.patched else ', unpatched'}), "
        f"{n_params / 1e6:.2f}M parameters, {num_classes} classes, input "
        f"{'3x' + str(num_frames) + 'x' if video else '3x'}{img_size}x{img_size}")
    say(f"data {splits.description}: {len(splits.train)} train / {len(splits.val)} val")
    say(f"{runtime.world_size} process(es) on {runtime.device.type}, global batch "
        f"{args.batch_size * runtime.world_size}, {steps_per_epoch} steps/epoch x {args.epochs} epochs, "
        f"warmup {warmup} steps, amp {_amp_name(amp_dtype)}, threads {torch.get_num_threads()}, workers {workers}")

    # the token grid of a video ViT: what --finetune resamples its positions from (a state_dict lacks it)
    grid = getattr(getattr(raw_model, "patch_embed", None), "grid_size", None)
    clip_grid = [int(g) for g in grid] if isinstance(grid, (tuple, list)) and len(grid) == 3 else None

    def save(name: str, epoch: int, step_in_epoch: int, rng) -> None:
        if not output:
            return
        rngs = [rng]
        if runtime.distributed:
            rngs = [None] * runtime.world_size
            dist.all_gather_object(rngs, _cpu(rng))
        if not runtime.main:
            return
        _atomic_save({"format": CHECKPOINT_FORMAT, "model": raw_model.state_dict(),
                      "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                      "scaler": scaler.state_dict() if scaler is not None else None, "epoch": epoch,
                      "step_in_epoch": step_in_epoch, "global_step": global_step, "best_acc": best_acc,
                      "best_epoch": best_epoch, "history": history, "rng": rngs, "args": run_args,
                      "classes": list(splits.classes), "torch": str(torch.__version__),
                      "clip_grid": clip_grid}, os.path.join(output, name))

    # -- the loop
    progress = None
    if runtime.main and args.progress:
        progress = require("tqdm", "the progress bar (or pass --no-progress)")
    loss_log: List[Tuple[int, float]] = []
    train_time, samples_seen = 0.0, 0
    final_acc, final_loss, stopped_early = None, None, False
    max_steps = args.max_steps
    model.train()
    try:
        for epoch in range(start_epoch, args.epochs):
            if max_steps is not None and global_step >= max_steps:
                stopped_early = True
                break
            sampler.set_epoch(epoch)
            data_mod.set_epoch(splits.train, epoch)
            loader = _loader(splits.train, args.batch_size, _SkipFirst(sampler, skip * args.batch_size),
                             drop_last=drop_last, workers=workers, seed=args.seed * 100003 + epoch,
                             pin=runtime.device.type == "cuda")
            step_in_epoch = skip
            steps_left = steps_per_epoch - skip
            if max_steps is not None:
                steps_left = min(steps_left, max_steps - global_step)
            skip = 0
            bar = None
            if progress is not None:
                bar = progress.tqdm(total=steps_per_epoch, initial=step_in_epoch, unit="step", leave=False,
                                    desc=f"epoch {epoch + 1}/{args.epochs}", dynamic_ncols=True,
                                    mininterval=0.5 if sys.stderr.isatty() else 30.0)
                say.bar = bar
            _sync(runtime.device)
            t0 = time.perf_counter()
            epoch_samples, loss_sum, loss_n, log_t, log_samples = 0, torch.zeros((), device=runtime.device), 0, t0, 0
            epoch_loss_sum, epoch_loss_n = torch.zeros((), device=runtime.device, dtype=torch.float64), 0
            for x, y in itertools.islice(loader, steps_left):
                x, y = x.to(runtime.device, non_blocking=True), y.to(runtime.device, non_blocking=True)
                with _autocast(runtime.device, amp_dtype):
                    logits = logits_of(model(x))
                loss = criterion(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    if args.grad_clip:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    if args.grad_clip:
                        nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
                    optimizer.step()
                scheduler.step()
                global_step += 1
                step_in_epoch += 1
                batch = y.numel() * runtime.world_size
                epoch_samples += batch
                log_samples += batch
                loss_sum += loss.detach()
                epoch_loss_sum += loss.detach()
                loss_n += 1
                epoch_loss_n += 1
                if global_step % args.log_interval == 0 or step_in_epoch == steps_per_epoch:
                    mean_loss = float(loss_sum) / loss_n          # the one sync per log interval
                    if not math.isfinite(mean_loss):
                        raise FloatingPointError(f"the training loss is {mean_loss} at step {global_step}; lower "
                                                 "--lr, raise --warmup-epochs, set --grad-clip, or use --amp bf16")
                    now = time.perf_counter()
                    loss_log.append((global_step, mean_loss))
                    if bar is not None:
                        rate = log_samples / max(now - log_t, 1e-9)
                        bar.set_postfix_str(f"loss {mean_loss:.4f}, {rate:,.0f} {kind}/s, "
                                            f"lr {scheduler.get_last_lr()[0]:.2e}, mem "
                                            f"{_fmt_mem(peak_memory_mib(runtime.device))}", refresh=False)
                    loss_sum.zero_()
                    loss_n, log_t, log_samples = 0, now, 0
                if bar is not None:
                    bar.update(1)
            _sync(runtime.device)
            elapsed = time.perf_counter() - t0
            train_time += elapsed
            samples_seen += epoch_samples
            if bar is not None:
                bar.close()
                say.bar = None
            finished_epoch = step_in_epoch >= steps_per_epoch
            # the RNG state the next training step sees: an uninterrupted run validates at epoch ends only
            rng = None if finished_epoch else rng_state(runtime.device)
            final_acc, final_loss, _ = evaluate(raw_model, val_loader, runtime, amp_dtype)
            if rng is None:
                rng = rng_state(runtime.device)
            record = {"epoch": epoch + 1, "steps": global_step, "complete": finished_epoch,
                      "train_loss": float(epoch_loss_sum) / max(1, epoch_loss_n), "val_loss": final_loss,
                      "val_acc": final_acc, "lr": scheduler.get_last_lr()[0], "time_s": elapsed,
                      f"{kind}_per_s": epoch_samples / max(elapsed, 1e-9)}
            if runtime.distributed:     # every rank keeps the same history (rank 0's numbers)
                box = [record]
                dist.broadcast_object_list(box, src=0)
                record = box[0]
            history.append(record)
            improved = final_acc > best_acc
            if improved:
                best_acc, best_epoch = final_acc, epoch + 1
            say(f"epoch {epoch + 1}/{args.epochs}{'' if finished_epoch else f' (stopped at step {global_step})'}: "
                f"train loss {record['train_loss']:.4f}, val loss {final_loss:.4f}, val acc {final_acc:.2f}% "
                f"(best {best_acc:.2f}%), lr {record['lr']:.2e}, {elapsed:.1f} s, "
                f"{record[f'{kind}_per_s']:,.0f} {kind}/s, peak mem {_fmt_mem(peak_memory_mib(runtime.device))}")
            if finished_epoch:
                save("last.pt", epoch + 1, 0, rng)
            else:
                save("last.pt", epoch, step_in_epoch, rng)
            if improved:
                save("best.pt", epoch + 1 if finished_epoch else epoch, 0 if finished_epoch else step_in_epoch, rng)
            if not finished_epoch:
                stopped_early = True
                break
        if final_acc is None:   # nothing left to train (--max-steps 0, or a finished run resumed): evaluate
            final_acc, final_loss, _ = evaluate(raw_model, val_loader, runtime, amp_dtype)
            if best_acc < 0:
                best_acc, best_epoch = final_acc, None
            if global_step == 0 and not args.resume:
                save("last.pt", 0, 0, rng_state(runtime.device))
    finally:
        if progress is not None and say.bar is not None:
            say.bar.close()
            say.bar = None

    total_time = time.perf_counter() - started
    peak = peak_memory_mib(runtime.device)
    summary = {
        "model": built.name, "source": built.source, "patched": built.patched, "video": video,
        "img_size": img_size, "num_frames": num_frames, "num_classes": num_classes, "parameters": n_params,
        "data": splits.description, "train_samples": len(splits.train), "val_samples": len(splits.val),
        "device": str(runtime.device), "world_size": runtime.world_size, "amp": _amp_name(amp_dtype),
        "threads": torch.get_num_threads(), "epochs": args.epochs, "epochs_done": global_step // steps_per_epoch,
        "steps": global_step, "stopped_early": stopped_early, "final_val_acc": final_acc,
        "final_val_loss": final_loss, "best_val_acc": best_acc, "best_epoch": best_epoch,
        "total_time_s": total_time, "train_time_s": train_time,
        f"{'clips' if video else 'images'}_per_s": samples_seen / train_time if train_time else None,
        "peak_memory_mib": peak, "memory": memory_kind(runtime.device), "finetuned_from": finetuned,
        "resumed_from": args.resume, "torch": str(torch.__version__), "history": history,
    }
    rate = summary[f"{'clips' if video else 'images'}_per_s"]
    say(f"done: final val acc {final_acc:.2f}% (top-1), best {best_acc:.2f}%"
        f"{f' (epoch {best_epoch})' if best_epoch else ''}, {global_step} steps, total {total_time:.1f} s, "
        f"{'n/a' if rate is None else f'{rate:,.0f}'} {kind}/s, peak mem {_fmt_mem(peak)} "
        f"({memory_kind(runtime.device)})")
    if output and runtime.main:
        path = os.path.join(output, "summary.json")
        with open(path + ".tmp", "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(path + ".tmp", path)
        say(f"wrote {path} and checkpoints in {output}")
    return TrainResult(raw_model, summary, loss_log)


def _amp_name(dtype) -> str:
    return {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _cpu(rng: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in rng.items()}


def _plain_args(args, runtime: Runtime) -> Dict[str, Any]:
    """The namespace as plain values (a weights_only-loadable checkpoint), with the world size."""
    out = {}
    for k, v in vars(args).items():
        if k.startswith("_"):
            continue
        out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else (
            list(v) if isinstance(v, (list, tuple)) else str(v))
    out["world_size"] = runtime.world_size
    return out


def shutdown() -> None:
    """Leave the process group that ``init_runtime`` joined (one a caller made is left alone)."""
    if _OWN_GROUP and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP.clear()
