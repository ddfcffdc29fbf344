"""The command line of ``python -m vitkernels.train`` (``main(argv)``: exit status; ``run(argv)``: the result)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

PROG = "python -m vitkernels.train"

DESCRIPTION = """\
Train an image or video classifier with vitkernels' fused ViT kernels.

The model is a name from vitkernels.models (already fused), timm or torchvision (built without
pretrained weights, then patched with vitkernels.patch_timm / vitkernels.patch_torchvision unless
--no-patch). The data is an ImageFolder (--data DIR) or, by default, scikit-learn's bundled handwritten
digits (1797 8x8 images, nothing downloaded) upsampled to --img-size, or, for video models, those digits
moving across --num-frames frames. One process, or several under torchrun (DistributedDataParallel).
"""

EPILOG = """\
examples:
  %(prog)s --model vit_tiny_patch16_224 --img-size 32 --model-kwargs patch_size=4 depth=6 --epochs 8
  %(prog)s --model resnet18 --source torchvision --data ~/imagenette --img-size 160 --output runs/r18
  %(prog)s --model swin3d_t --img-size 32 --num-frames 8 --batch-size 8      # moving-digits clips
  %(prog)s --resume runs/r18/last.pt                                         # continue, bit for bit
  %(prog)s --model vit_tiny_patch16_224 --img-size 48 --finetune runs/vit/best.pt
  torchrun --nproc_per_node 2 -m vitkernels.train --model vit_small_patch16_224 --data DIR
  make train-demo

model names: vitkernels.models.list_models(), timm.list_models(), torchvision.models.list_models().
output (rank 0): a progress bar (loss, img/s or clips/s, peak memory), one line per epoch, and a final
line with the final and best top-1 validation accuracy, the total time, the throughput and the peak
memory (CUDA: max allocated; CPU: the process's max RSS); with --output also last.pt (every epoch and
where --max-steps stops), best.pt (best validation accuracy) and summary.json.
exit status: 0 done; 2 a bad argument or a request that cannot be met (the message says why);
1 training failed (e.g. a non-finite loss); 130 interrupted.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: X)`` where a default is a value and the help does not already describe it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" not in text and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings and not isinstance(action, argparse._HelpAction)):
            text += " (default: %(default)s)"
        return text


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _non_negative(kind):
    def parse(text: str):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=_Formatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, metavar="NAME",
                   help="model name: vitkernels.models, timm or torchvision (see --source); required unless "
                        "--resume gives it")
    m.add_argument("--source", default="auto", choices=["auto", "vitkernels", "timm", "torchvision"],
                   help="which library builds --model; auto tries vitkernels.models, then timm, then torchvision")
    m.add_argument("--no-patch", action="store_true",
                   help="keep the library's own modules (vitkernels.models: unpatched back to timm's / "
                        "torchvision's); default: timm models through vitkernels.patch_timm, torchvision ones "
                        "through vitkernels.patch_torchvision")
    m.add_argument("--img-size", type=_positive(int), default=None, metavar="PX",
                   help="input height = width, passed to the model (timm/vitkernels img_size, torchvision ViT "
                        "image_size; torchvision MViT takes 224 only) and used by the data; default: the model's own")
    m.add_argument("--num-frames", type=_positive(int), default=None, metavar="T",
                   help="video models: frames per clip, passed to the model (num_frames; torchvision MViT "
                        "takes 16 only) and used by the data; default: the model's own, else 8")
    m.add_argument("--num-classes", type=_positive(int), default=None, metavar="N",
                   help="classifier outputs; default: the dataset's class count")
    m.add_argument("--video", action=argparse.BooleanOptionalAction, default=None,
                   help="train on clips (B, C, T, H, W) / on images; default: auto, clips when the model takes "
                        "5-D input (vitkernels swin3d_* / video_vit_*, torchvision.models.video, a 3-D stem)")
    m.add_argument("--model-kwargs", nargs="+", default=None, metavar="KEY=VALUE",
                   help="more keyword arguments for the model builder, values parsed as JSON "
                        "(e.g. patch_size=4 depth=6 drop_path_rate=0.1)")
    m.add_argument("--grad-checkpointing", action="store_true",
                   help="model.set_grad_checkpointing(True): recompute activations in backward to save memory")
    m.add_argument("--finetune", default=None, metavar="PATH",
                   help="start from the weights of a checkpoint (ours, or a raw/timm state_dict file), position "
                        "embeddings resampled to --img-size; a classifier head of another shape is left out")

    d = p.add_argument_group("data")
    d.add_argument("--data", default=None, metavar="DIR",
                   help="an ImageFolder with train/ and val/ (without val/: a seeded 80/20 split); default: "
                        "scikit-learn's digits (clips of moving digits for video models), seeded 80/20 split")
    d.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="train-time augmentation of images: ImageFolder random resized crop + horizontal flip, "
                        "digits random shifts of up to 1/8 of the size; default: on for --data, off for the "
                        "digits (centred and tiny: in a short run shifting them costs more accuracy than it "
                        "gives); clips are not augmented")
    d.add_argument("--train-limit", type=_positive(int), default=None, metavar="N",
                   help="train on N training samples only: a fixed seeded pick, the classes in turn (smoke runs, tests)")
    d.add_argument("--val-limit", type=_positive(int), default=None, metavar="N",
                   help="validate on N validation samples only (picked as --train-limit's)")
    d.add_argument("--workers", type=_non_negative(int), default=None, metavar="N",
                   help="DataLoader worker processes per rank; default: 0 on CPU, up to 8 on CUDA")

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=_non_negative(int), default=10, metavar="N", help="passes over the training set")
    o.add_argument("--batch-size", type=_positive(int), default=64, metavar="B",
                   help="per process; the global batch is B x the number of processes")
    o.add_argument("--lr", type=_non_negative(float), default=1e-3, metavar="LR", help="peak AdamW learning rate")
    o.add_argument("--min-lr", type=_non_negative(float), default=1e-6, metavar="LR",
                   help="learning rate at the end of the cosine")
    o.add_argument("--weight-decay", type=_non_negative(float), default=0.05, metavar="WD",
                   help="AdamW weight decay; never on biases, norms, position embeddings, tokens, bias tables")
    o.add_argument("--warmup-epochs", type=_non_negative(float), default=1.0, metavar="E",
                   help="linear warmup length in epochs (per-step schedule)")
    o.add_argument("--warmup-steps", type=_non_negative(int), default=None, metavar="N",
                   help="linear warmup length in optimizer steps (overrides --warmup-epochs)")
    o.add_argument("--grad-clip", type=_non_negative(float), default=1.0, metavar="NORM",
                   help="clip the global gradient norm; 0: off")
    o.add_argument("--label-smoothing", type=_non_negative(float), default=0.1, metavar="EPS",
                   help="cross-entropy label smoothing")
    o.add_argument("--amp", choices=["none", "bf16", "fp16"], default=None,
                   help="autocast dtype; default: bf16 on CUDA, none on CPU (CPU: bf16 only; fp16 uses a "
                        "GradScaler)")
    o.add_argument("--max-steps", type=_non_negative(int), default=None, metavar="N",
                   help="stop after N optimizer steps in all (the schedule stays the one of --epochs); saves "
                        "last.pt there, and --resume continues from it")

    r = p.add_argument_group("run")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA when torch sees a GPU; under torchrun, GPU LOCAL_RANK")
    r.add_argument("--seed", type=int, default=0, metavar="S",
                   help="weights, data order and augmentation (the val split is fixed whatever the seed)")
    r.add_argument("--threads", type=_positive(int), default=None, metavar="N",
                   help="torch.set_num_threads; default: torch's")
    r.add_argument("--output", default=None, metavar="DIR",
                   help="write last.pt, best.pt and summary.json here (rank 0); with --resume, default: the "
                        "checkpoint's folder")
    r.add_argument("--resume", default=None, metavar="PATH",
                   help="continue a run from its last.pt: weights, optimizer, schedule, epoch and step, RNG states; "
                        "every argument not given defaults to the interrupted run's (but --max-steps, --output, "
                        "--progress)")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm progress bar on rank 0 (updated every --log-interval steps; every 30 s when "
                        "stderr is not a terminal)")
    r.add_argument("--log-interval", type=_positive(int), default=10, metavar="STEPS",
                   help="steps between loss read-backs (the only host-device sync of the loop)")
    return p


# arguments a resumed run does not take over from the checkpoint
NOT_RESUMED = ("resume", "output", "finetune", "max_steps", "progress")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The namespace; with --resume, arguments left out default to the checkpoint's (``args._checkpoint``
    then holds the loaded checkpoint)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:
        from vitkernels.train import engine
        from vitkernels.train.build import UsageError

        try:
            checkpoint = engine.load_checkpoint(args.resume)
        except UsageError as exc:
            parser.error(f"--resume: {exc}")
        saved = checkpoint.get("args") if isinstance(checkpoint, dict) else None
        if checkpoint.get("format") != engine.CHECKPOINT_FORMAT or not isinstance(saved, dict):
            parser.error(f"--resume: {args.resume!r} is not a vitkernels.train checkpoint (--finetune starts a new "
                         "run from a state_dict's weights)")
        known = {action.dest for action in parser._actions}
        parser.set_defaults(**{k: v for k, v in saved.items() if k in known and k not in NOT_RESUMED})
        args = parser.parse_args(argv)
        args._checkpoint = checkpoint
    if args.model is None:
        parser.error("--model NAME is required (or --resume a checkpoint that names it)")
    return args


def run(argv: Optional[List[str]] = None):
    """Parse ``argv`` and train; returns ``engine.TrainResult`` (errors propagate)."""
    from vitkernels.train import engine

    args = parse_args(argv)
    try:
        return engine.train(args)
    finally:
        engine.shutdown()


def main(argv: Optional[List[str]] = None) -> int:
    """The CLI: 0 done; 2 a bad argument or an impossible request; 1 failed; 130 interrupted."""
    from vitkernels.train.build import UsageError

    try:
        run(argv)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        if "vitkernels[train]" not in str(exc):
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (last.pt holds the last finished epoch)", file=sys.stderr)
        return 130
    return 0


__all__ = ["build_parser", "parse_args", "run", "main"]
