"""Launch configs of the Triton kernels: a few candidates picked by heuristics, tuned once per shape
bucket and GPU, and remembered across processes.

Triton's ``@autotune`` compiles and times every config of its list for every new key: 36 configs per
attention kernel, each a compile of seconds to a minute, would spend a GPU session tuning. Here each
kernel has a ``TunedKernel`` spec instead: its full search space, a heuristic that picks at most
``MAX_CANDIDATES`` configs from the tune key (bucketed sizes, head dim, dtype, every flag that changes
the compiled code) and the GPU, and a shared-memory estimate that prunes what cannot fit the device.

``launch`` asks ``select`` for the config of its key. The answer comes from, in order:

1. a config forced with ``forced_configs`` (tests run every candidate this way);
2. the interpreter's one small config (``TRITON_INTERPRET=1``: correctness only, nothing to time);
3. this process's memory of earlier answers;
4. the table of configs tuned on real GPUs and kept in the repo (``tuned_configs.json``, per GPU name);
5. the on-disk results cache (``$VITKERNELS_CACHE_DIR``, default ``~/.cache/vitkernels``), per GPU,
   Triton version, kernel and key;
6. tuning: every candidate timed with ``triton.testing.do_bench``; the fastest is remembered (3, 5).

``VITKERNELS_AUTOTUNE`` picks the mode: ``heuristic`` (default: tune among the heuristic's candidates),
``full`` (tune over the whole space; the repo table and heuristic-mode results are not used), ``off``
(the heuristic's first candidate, nothing timed: the fastest cold start). While a CUDA graph is being
captured nothing can be timed, so an unknown key takes the first candidate without remembering it.

This module imports neither triton nor any op: specs are plain data, so their heuristics are testable
anywhere, and only tuning itself imports ``triton.testing``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import re
import tempfile
import threading
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from vitkernels import _environ

log = logging.getLogger("vitkernels.tuning")

MODES = ("heuristic", "full", "off")
MODE_ENV = "VITKERNELS_AUTOTUNE"
CACHE_ENV = "VITKERNELS_CACHE_DIR"
MAX_CANDIDATES = 4
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned_configs.json")
TABLE_FORMAT = 1
# do_bench's budgets, in ms: enough for a stable median of a kernel that runs microseconds to a few ms
TUNE_WARMUP_MS = 10
TUNE_REP_MS = 40
# a config may use this share of the device's shared memory per block: the estimates are fits to ptxas,
# not exact, and Triton adds scratch space for layout conversions
SHARED_MEMORY_SHARE = 0.88


def autotune_mode() -> str:
    raw = _environ.raw(MODE_ENV)
    mode = _MODE_OF.get(raw)
    if mode is None:
        mode = (_environ.getenv(MODE_ENV) or "heuristic").strip().lower() or "heuristic"
        if mode not in MODES:
            raise ValueError(f"{MODE_ENV}={mode!r} is not a tuning mode; valid: {', '.join(MODES)}")
        _MODE_OF[raw] = mode
    return mode


_MODE_OF: Dict[Any, str] = {}  # raw value of the variable -> its checked mode


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids: ``triton.cdiv`` is a constexpr_function in triton >= 3.4, about 4 us per
    host call."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1): ``triton.next_power_of_2`` is a constexpr_function
    too, as costly as ``triton.cdiv`` on the host."""
    return 1 << max(0, int(n) - 1).bit_length()


def interpreting() -> bool:
    return _environ.getenv("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class Config:
    """One launch config: the block-size constexprs, warps per program and software-pipelining depth."""

    blocks: Tuple[Tuple[str, int], ...]
    num_warps: int
    num_stages: int

    @classmethod
    def of(cls, num_warps: int, num_stages: int, **blocks: int) -> "Config":
        return cls(tuple(sorted(blocks.items())), int(num_warps), int(num_stages))

    @property
    def meta(self) -> Dict[str, int]:
        return dict(self.blocks)

    def launch_kwargs(self) -> Dict[str, int]:
        return {**self.meta, "num_warps": self.num_warps, "num_stages": self.num_stages}

    def replace(self, **changes: int) -> "Config":
        warps = changes.pop("num_warps", self.num_warps)
        stages = changes.pop("num_stages", self.num_stages)
        return Config.of(warps, stages, **{**self.meta, **changes})

    def to_json(self) -> Dict[str, int]:
        return self.launch_kwargs()

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "Config":
        blocks = {k: int(v) for k, v in data.items() if k.startswith("BLOCK")}
        return cls.of(int(data["num_warps"]), int(data["num_stages"]), **blocks)

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.blocks) + f" warps={self.num_warps} stages={self.num_stages}"


def product_space(num_warps: Sequence[int], num_stages: Sequence[int], **blocks: Sequence[int]) -> Tuple[Config, ...]:
    """Every combination of the given block sizes, warps and stages."""
    names = list(blocks)
    return tuple(Config.of(w, s, **dict(zip(names, sizes)))
                 for sizes in itertools.product(*blocks.values()) for w in num_warps for s in num_stages)


def bucket(n: int, lo: int = 16, hi: int = 16384) -> int:
    """The power of two at or above ``n``, clamped to [lo, hi]: sizes in one bucket share a config."""
    return min(hi, max(lo, 1 << max(0, int(n) - 1).bit_length()))


DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
ELEMENT_SIZE = {"fp16": 2, "bf16": 2, "fp32": 4}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def key_string(key: Dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in key.items())


def fit_blocks(config: Config, limits: Dict[str, int]) -> Config:
    """Blocks no larger than the (bucketed) extent they tile: a tile past the data only wastes work. Small
    tiles get at most 4 warps."""
    meta = config.meta
    shrunk = {name: min(size, limits[name]) if name in limits else size for name, size in meta.items()}
    if shrunk == meta:
        return config
    warps = config.num_warps
    if math.prod(v for k, v in shrunk.items() if k in ("BLOCK_M", "BLOCK_N")) <= 64 * 64:
        warps = min(warps, 4)
    return Config.of(warps, config.num_stages, **shrunk)


def before_ampere(configs: List[Config], gpu: "GPU") -> List[Config]:
    """Before Ampere (sm_80) there is no cp.async to pipeline with: two stages at most."""
    if gpu.capability != (0, 0) and gpu.capability < (8, 0):
        return [c.replace(num_stages=min(c.num_stages, 2)) for c in configs]
    return configs


def dedupe(configs: Iterable[Config]) -> List[Config]:
    return list(dict.fromkeys(configs))


# ---------------------------------------------------------------------------------------------------- GPUs


@dataclasses.dataclass(frozen=True)
class GPU:
    """What the heuristics and the tables key on."""

    name: str
    slug: str
    capability: Tuple[int, int]
    sm_count: int
    max_shared: int  # bytes of shared memory a block may use (opt-in limit)


INTERPRETER = GPU("triton interpreter", "interpreter", (0, 0), 1, 1 << 30)
# opt-in shared memory per block when torch does not report it
_SHARED_BY_CAPABILITY = {(7, 0): 96 * 1024, (7, 5): 64 * 1024, (8, 0): 163 * 1024, (8, 6): 99 * 1024,
                         (8, 7): 163 * 1024, (8, 9): 99 * 1024, (9, 0): 227 * 1024}


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


@functools.lru_cache(maxsize=None)
def _cuda_gpu(index: int) -> GPU:
    props = torch.cuda.get_device_properties(index)
    cap = (props.major, props.minor)
    shared = int(getattr(props, "shared_memory_per_block_optin", 0) or _SHARED_BY_CAPABILITY.get(cap, 99 * 1024))
    return GPU(props.name, slugify(props.name), cap, props.multi_processor_count, shared)


def gpu_of(device: torch.device) -> GPU:
    if device.type == "cuda":
        return _cuda_gpu(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER


def shared_budget(gpu: GPU) -> int:
    return int(gpu.max_shared * SHARED_MEMORY_SHARE)


def on_device(tensor: torch.Tensor):
    """Context that makes the tensor's GPU current, so Triton launches there (and on its current stream)
    even when another GPU is current: tensors on cuda:1 work while cuda:0 is current."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class TunedKernel:
    """How one kernel is tuned.

    ``space``: every config ``full`` mode may try. ``heuristic(key, gpu)``: candidates, best guess first
    (at most ``MAX_CANDIDATES`` are used). ``shared_memory(config, key)``: bytes of shared memory a config
    needs (estimate). ``limits(key)``: extent of each block dim (blocks are shrunk to it). ``interpreter``:
    the config used under TRITON_INTERPRET=1. ``version``: bump it when a change to the kernel makes
    remembered configs invalid (cached and table entries of other versions are ignored)."""

    name: str
    space: Tuple[Config, ...]
    heuristic: Callable[[Dict[str, Any], GPU], List[Config]]
    shared_memory: Callable[[Config, Dict[str, Any]], int]
    limits: Callable[[Dict[str, Any]], Dict[str, int]]
    interpreter: Config
    version: int = 1

    def fits(self, config: Config, key: Dict[str, Any], gpu: GPU) -> bool:
        return self.shared_memory(config, key) <= shared_budget(gpu)

    def allowed(self, config: Config, key: Dict[str, Any], gpu: GPU) -> bool:
        """Whether a remembered config (table, cache) is one this spec could choose for ``key`` here: in the
        space (shrunk to the data) and within the GPU's shared memory."""
        limits = self.limits(key)
        return config in {fit_blocks(c, limits) for c in self.space} and self.fits(config, key, gpu)

    def candidates(self, key: Dict[str, Any], gpu: GPU, mode: str = "heuristic") -> List[Config]:
        """What tuning times for ``key`` on ``gpu``: the heuristic's picks (or the whole space in ``full``
        mode), shrunk to the data and pruned to the device's shared memory. Never empty: when nothing
        fits, the config with the smallest footprint."""
        limits = self.limits(key)
        pool = self.space if mode == "full" else self.heuristic(key, gpu)[:MAX_CANDIDATES]
        pool = dedupe(fit_blocks(c, limits) for c in pool)
        kept = [c for c in pool if self.fits(c, key, gpu)]
        if kept:
            return kept
        smallest = dedupe(fit_blocks(c, limits) for c in self.space)
        return [min(smallest, key=lambda c: (self.shared_memory(c, key), c.num_warps))]


# ---------------------------------------------------------------------------------------------------- memory


_LOCK = threading.Lock()
_MEMORY: Dict[Tuple[str, str, str, str], Config] = {}
_FAST: Dict[Tuple[Any, ...], Config] = {}  # (kernel, device, key items, mode) -> _MEMORY's answer
_FORCED: Dict[str, Config] = {}
_DISK: Dict[str, Any] = {"loaded": None, "entries": {}}


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # pragma: no cover - triton missing: nothing to tune anyway
        return "none"


def cache_dir() -> str:
    path = os.environ.get(CACHE_ENV)
    if path:
        return path
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vitkernels")


def cache_path() -> str:
    return os.path.join(cache_dir(), "autotune.json")


def _cache_key(gpu: GPU, spec: "TunedKernel", key: str) -> str:
    return f"{gpu.slug}|triton-{triton_version()}|{spec.name}|v{spec.version}|{key}"


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _disk_entries() -> Dict[str, Any]:
    path = cache_path()
    if _DISK["loaded"] != path:
        _DISK["entries"] = _read_json(path).get("entries", {})
        _DISK["loaded"] = path
    return _DISK["entries"]


def _write_disk(new: Dict[str, Any]) -> None:
    """Merge entries into the cache file (read-merge-rename under a lock file: several processes, e.g.
    pytest-xdist workers, may tune at once). A cache that cannot be written only costs re-tuning."""
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".lock", "w") as lock:
            try:
                import fcntl

                fcntl.flock(lock, fcntl.LOCK_EX)
            except ImportError:  # pragma: no cover - not POSIX
                pass
            entries = _read_json(path).get("entries", {})
            entries.update(new)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"format": TABLE_FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        _DISK["entries"], _DISK["loaded"] = entries, path
    except OSError as exc:
        log.warning("vitkernels: could not write the autotune cache %s (%s)", path, exc)


@functools.lru_cache(maxsize=4)
def _table(path: str) -> Dict[str, Any]:
    return _read_json(path).get("gpus", {})


def load_table(path: str = TABLE_PATH) -> Dict[str, Any]:
    """The repo's table of tuned configs: {gpu slug: {"name", "triton", "torch", "date", "kernels":
    {kernel: {key string: config + "ms"}}}}."""
    return _table(path)


def clear_memory() -> None:
    """Forget this process's answers and the loaded cache file (tests; a changed VITKERNELS_CACHE_DIR)."""
    with _LOCK:
        _MEMORY.clear()
        _FAST.clear()
        _DISK["loaded"], _DISK["entries"] = None, {}
    _table.cache_clear()


@contextlib.contextmanager
def forced_configs(configs: Dict[str, Config]) -> Iterator[None]:
    """Launch the named kernels with these configs (tests run every candidate for correctness)."""
    previous = dict(_FORCED)
    _FORCED.update(configs)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(previous)


# ---------------------------------------------------------------------------------------------------- select


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _is_device_fault(exc: BaseException) -> bool:
    text = str(exc)
    return "CUDA error" in text or "illegal memory access" in text or "misaligned address" in text


def _tune(spec: TunedKernel, key: Dict[str, Any], pool: List[Config], run: Callable[[Config], None]):
    """Time every candidate; (best config, its ms, {config: ms or None when it could not run})."""
    from triton.testing import do_bench

    timings: Dict[str, Optional[float]] = {}
    best, best_ms, error = None, math.inf, None
    for config in pool:
        try:
            ms = float(do_bench(lambda: run(config), warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, return_mode="median"))
        except Exception as exc:  # out of shared memory / registers at compile time: the candidate drops out
            if _is_device_fault(exc):
                raise
            timings[str(config)], error = None, exc
            continue
        timings[str(config)] = ms
        if ms < best_ms:
            best, best_ms = config, ms
    if best is None:
        raise RuntimeError(f"{spec.name}: none of the {len(pool)} candidate configs could run for "
                           f"{key_string(key)}; last error: {error}") from error
    return best, best_ms, timings


def select(spec: TunedKernel, key: Dict[str, Any], device: torch.device, run: Callable[[Config], None]) -> Config:
    """The config for ``spec`` at ``key`` on ``device`` (see the module docstring for the order)."""
    forced = _FORCED.get(spec.name)
    if forced is not None:
        return forced
    if interpreting() or device.type != "cuda":
        return spec.interpreter
    mode = autotune_mode()
    fast = (spec.name, device, tuple(key.items()), mode)  # no string building on the hot path
    found = _FAST.get(fast)
    if found is not None:
        return found
    gpu = gpu_of(device)
    kstr = key_string(key)
    memo = (gpu.slug, spec.name, kstr, mode)
    found = _MEMORY.get(memo)
    if found is not None:
        _FAST[fast] = found
        return found
    found = spec.candidates(key, gpu)[0] if mode == "off" else _lookup(spec, key, kstr, gpu, mode)
    if found is None:
        pool = spec.candidates(key, gpu, mode)
        if _capturing():  # nothing can be timed (nor, maybe, compiled) inside a capture: not remembered
            warnings.warn(f"vitkernels: {spec.name} met a new tune key ({kstr}) while a CUDA graph is being "
                          "captured; launching its first candidate untimed (run the model once before capturing)",
                          RuntimeWarning, stacklevel=3)
            return pool[0]
        if len(pool) == 1:
            found = pool[0]  # nothing to compare
        else:
            found, ms, timings = _tune(spec, key, pool, run)
            log.info("vitkernels: tuned %s [%s] on %s: %s (%.4f ms; %d candidates)", spec.name, kstr, gpu.name,
                     found, ms, len(pool))
            _write_disk({_cache_key(gpu, spec, kstr): {"config": found.to_json(), "ms": ms, "mode": mode,
                                                       "candidates": timings}})
    with _LOCK:
        _MEMORY[memo] = found
        _FAST[fast] = found
    return found


def _lookup(spec: TunedKernel, key: Dict[str, Any], kstr: str, gpu: GPU, mode: str) -> Optional[Config]:
    """A remembered config from the repo table (heuristic mode) or the results cache, if it fits."""
    candidates = []
    if mode != "full":
        entry = load_table().get(gpu.slug, {}).get("kernels", {}).get(spec.name, {}).get(kstr)
        if entry is not None and entry.get("v", 1) == spec.version:
            candidates.append(entry)
    cached = _disk_entries().get(_cache_key(gpu, spec, kstr))
    if cached is not None and (mode != "full" or cached.get("mode") == "full"):
        candidates.append(cached["config"])
    for data in candidates:
        try:
            config = Config.from_json(data)
        except (KeyError, TypeError, ValueError):
            continue
        if spec.allowed(config, key, gpu):  # a stale or hand-edited entry is ignored, never launched
            return config
    return None


def traced(tensor) -> bool:
    """Whether ``tensor`` is a tracer's stand-in (a fake or functional tensor: torch.compile tracing a
    ``triton_op``), so a launch must be recorded with ``wrap_triton`` instead of run. A plain tensor answers
    after one type check (the eager hot path)."""
    if type(tensor) is torch.Tensor or not isinstance(tensor, torch.Tensor):
        return False
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(tensor)


def launcher(kernel, tensor):
    """``kernel`` to index with a grid and call: recorded into the graph (``wrap_triton``) when ``tensor``
    (one of the launch's tensors: they are all traced or none is) is traced, the kernel itself otherwise."""
    return torch.library.wrap_triton(kernel) if traced(tensor) else kernel


def _real(arg):
    """A real stand-in for a traced argument while a config is timed: a tensor of the same sizes, strides,
    dtype and device (random floats, zero integers), a symbolic int as its value; anything else as it is."""
    if isinstance(arg, torch.SymInt):
        return int(arg)
    if not traced(arg):
        return arg
    size, stride = [int(s) for s in arg.shape], [int(s) for s in arg.stride()]
    real = torch.empty_strided(size, stride, dtype=arg.dtype, device=arg.device)
    return real.normal_() if real.is_floating_point() else real.zero_()


def launch(spec: TunedKernel, kernel, grid: Callable[[Dict[str, int]], Tuple[int, ...]], args: Sequence[Any],
           constexprs: Dict[str, Any], key: Dict[str, Any], device: torch.device) -> Config:
    """Launch ``kernel[grid(config)](*args, **constexprs, **config)`` with the selected config.

    Traced (torch.compile through a ``triton_op``): the launch with the selected config is recorded with
    ``wrap_triton`` (Inductor launches it); a config that must be timed first is timed on real stand-ins
    of the traced tensors, outside the tracer, so the graph holds exactly one launch."""
    if traced(args[0]):  # the launch's tensors are all traced or none is
        from torch.utils._python_dispatch import _disable_current_modes

        stand_ins: List[Any] = []

        def time_on_stand_ins(config: Config) -> None:
            if not stand_ins:  # made once, for the first config timed
                stand_ins.extend(_real(a) for a in args)
            kernel[tuple(int(g) for g in grid(config.meta))](*stand_ins, **constexprs, **config.launch_kwargs())

        with _disable_current_modes():  # selecting (maybe timing) is real work: nothing of it is recorded
            config = select(spec, key, device, time_on_stand_ins)
        torch.library.wrap_triton(kernel)[grid(config.meta)](*args, **constexprs, **config.launch_kwargs())
        return config

    def run(config: Config) -> None:
        kernel[grid(config.meta)](*args, **constexprs, **config.launch_kwargs())

    config = select(spec, key, device, run)
    run(config)
    return config


def cached_entries(gpu_slug: Optional[str] = None) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """This Triton version's tuned results from the cache file, as a table: {gpu slug: {kernel: {key: config
    + "ms"}}} (one GPU when ``gpu_slug`` is given)."""
    version = f"triton-{triton_version()}"
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for cache_key, entry in _read_json(cache_path()).get("entries", {}).items():
        try:
            slug, ver, kernel, spec_version, key = cache_key.split("|", 4)
        except ValueError:
            continue  # an entry of another cache format
        if ver != version or (gpu_slug is not None and slug != gpu_slug):
            continue
        out.setdefault(slug, {}).setdefault(kernel, {})[key] = {**entry["config"], "ms": entry.get("ms"),
                                                               "v": int(spec_version.lstrip("v"))}
    return out


def merge_into_table(entries: Dict[str, Dict[str, Dict[str, Any]]], info: Dict[str, Dict[str, str]],
                     path: str = TABLE_PATH) -> int:
    """Write tuned configs (``cached_entries`` shape) into the repo table at ``path``; ``info[slug]`` holds
    the GPU name, torch/triton versions and date they were measured with. Returns how many were written."""
    table = _read_json(path) or {"format": TABLE_FORMAT, "gpus": {}}
    gpus = table.setdefault("gpus", {})
    count = 0
    for slug, kernels in entries.items():
        gpu = gpus.setdefault(slug, {})
        gpu.update(info.get(slug, {}))
        for kernel, keys in kernels.items():
            gpu.setdefault("kernels", {}).setdefault(kernel, {}).update(keys)
            count += len(keys)
    with open(path, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    _table.cache_clear()
    return count
