"""How this machine runs a model: device, threads, precision and memory format.

Precision and memory format are decided by measurement, not assumed. bf16 autocast is 2-5x
faster than fp32 on a CPU with native bf16 (AMX, AVX512-BF16) and 10-350x *slower* on one
without (most laptops, AMD Zen 2/3, many cloud VMs: oneDNN emulates bf16 there). So `auto`:

- CUDA: bf16 where the card supports it, channels_last.
- CPU: bf16 is a candidate only where the CPU has native bf16 *and* PyTorch and oneDNN may use
  it (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA can forbid it); then a few small training steps of
  the recipe's own model are timed in each candidate precision and memory format, and the
  fastest wins. Without native bf16 it is never timed (one step could take minutes).

The decision is made once per run, printed, written into the run's config.yaml (so --resume
reuses it) and into metrics.json and MLflow.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import torch

from cifarlab.core.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")
SWITCH_MARGIN = 1.1  # how much faster than the safer choice (fp32, contiguous) another must be
MEASURE_ROUNDS = 3  # timed steps per candidate (after one untimed), interleaved: see `measure`
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
# oneDNN ISA caps below which bf16 has no native kernels (ONEDNN_MAX_CPU_ISA)
_NO_BF16_ISAS = {
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "--device cuda asked for, but no CUDA GPU is visible; use --device cpu or auto"
        )
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use auto, fp32 or bf16")
    return precision


def check_memory_format(memory_format: str) -> str:
    if memory_format not in MEMORY_FORMATS:
        raise UserError(
            f"unknown memory_format {memory_format!r}; use auto, channels_last or contiguous"
        )
    return memory_format


def use_compile(setting, device: torch.device) -> bool:
    """torch.compile for the training forward: `auto` = on CUDA only (on a CPU, oneDNN's eager
    kernels were faster than the compiled graph: 0.72x, after a 33 s compile)."""
    if setting not in ("auto", True, False):
        raise UserError(f"unknown compile setting {setting!r}; use auto, true or false")
    return setting is True or (setting == "auto" and device.type == "cuda")


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.preserve_format


# --- threads ------------------------------------------------------------------------------------


def physical_cores() -> int:
    """Physical cores (not hyper-threads) from /proc/cpuinfo; else the logical count."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return os.cpu_count() or 1
    cores, phys = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "physical id":
            phys = value
        elif key == "core id":
            cores.add((phys, value))
    return len(cores) or os.cpu_count() or 1


def set_threads(setting) -> int:
    """Set PyTorch's intra-op threads: an int, or `auto` = $OMP_NUM_THREADS if set, else all
    physical cores. Returns the count."""
    if setting == "auto":
        env = os.environ.get("OMP_NUM_THREADS", "")
        n = int(env) if env.isdigit() and int(env) > 0 else physical_cores()
    elif isinstance(setting, int) and not isinstance(setting, bool) and setting >= 1:
        n = setting
    else:
        raise UserError(f"threads must be auto or a whole number of at least 1, got {setting!r}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


# --- native bf16 --------------------------------------------------------------------------------


@cache
def cpu_fields() -> dict[str, str]:
    """The first processor's /proc/cpuinfo fields ("model name", "cpu family", "model",
    "flags" or aarch64's "Features"); empty where there is no /proc/cpuinfo."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _cpu_flags() -> frozenset[str]:
    fields = cpu_fields()
    return frozenset(fields.get("flags", fields.get("Features", "")).split())


def cpu_name() -> str:
    return cpu_fields().get("model name") or platform.processor() or platform.machine()


def native_bf16(flags: frozenset[str] | None = None, env: dict | None = None) -> tuple[bool, str]:
    """(whether this CPU computes bf16 natively and PyTorch/oneDNN may use it, why)."""
    flags = _cpu_flags() if flags is None else flags
    env = os.environ if env is None else env
    have = sorted(flags & {"amx_bf16", "avx512_bf16", "bf16"})  # x86 flags; aarch64 "bf16"
    if not have:
        return False, "no native bf16 (no AMX/AVX512-BF16)"
    isa = env.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa in _NO_BF16_ISAS:
        return False, f"ONEDNN_MAX_CPU_ISA={isa} forbids native bf16"
    cap = env.get("ATEN_CPU_CAPABILITY", "").lower()
    if cap in ("default", "avx2"):
        return False, f"ATEN_CPU_CAPABILITY={cap} forbids native bf16"
    return True, "native bf16: " + ", ".join(have)


# --- the measured decision ----------------------------------------------------------------------


@dataclass
class Choice:
    """What a run trains (or predicts) in, and the measured rates that chose it."""

    device: str
    precision: str  # fp32 | bf16
    memory_format: str  # contiguous | channels_last
    threads: int
    rates: dict[str, float] = field(default_factory=dict)  # "bf16/channels_last": images/s
    note: str = ""  # why (no native bf16, pinned, ...)

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def channels_last(self) -> bool:
        return self.memory_format == "channels_last"

    def line(self) -> str:
        """One line for the run's start: device, precision, format, threads, measured rates."""
        rates = ", ".join(f"{k} {v:.0f}" for k, v in self.rates.items())
        rates = f" (measured img/s: {rates})" if rates else ""
        note = f"; {self.note}" if self.note else ""
        return (
            f"device: {self.device} {self.precision} {self.memory_format}, "
            f"{self.threads} threads{rates}{note}"
        )

    def as_dict(self) -> dict:
        return {
            "device": self.device,
            "precision": self.precision,
            "memory_format": self.memory_format,
            "threads": self.threads,
            "measured_images_per_s": dict(self.rates),
            "note": self.note,
        }


StepFn = Callable[..., object]  # training.step.train_step: (net, opt, x, y, bf16)


class StepProbe:
    """One candidate's timed step: a copy of `model` in the candidate's memory format on random
    data, and `train_step` (forward, backward, SGD update), or without it a forward pass. One
    untimed call at creation (first-call allocations and kernel choices); `rate()` times one
    more. Neither moves the run's random stream."""

    def __init__(
        self,
        model: torch.nn.Module,
        input_size: int,
        bf16: bool,
        channels_last: bool,
        batch: int,
        train_step: StepFn | None = None,
    ):
        train = train_step is not None
        self.device = next(model.parameters()).device
        self.net = copy.deepcopy(model).train(train)
        self.net.to(memory_format=memory_format(channels_last))
        params = [p for p in self.net.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=0.0) if train and params else None
        self.bf16, self.train_step, self.batch = bf16, train_step, batch
        rng = torch.get_rng_state()
        self.x = torch.randn(batch, 3, input_size, input_size, device=self.device).contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )
        self.y = torch.randint(0, 2, (batch,), device=self.device)
        self.once()
        torch.set_rng_state(rng)

    def once(self) -> None:
        if self.opt is not None:
            self.train_step(self.net, self.opt, self.x, self.y, self.bf16)
        else:
            kind = self.device.type
            with torch.no_grad(), torch.autocast(kind, dtype=torch.bfloat16, enabled=self.bf16):
                self.net(self.x)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def rate(self) -> float:
        """Images/s of one more call."""
        rng = torch.get_rng_state()
        start = time.perf_counter()
        self.once()
        elapsed = time.perf_counter() - start
        torch.set_rng_state(rng)
        return self.batch / elapsed


Timer = Callable[[bool, bool], float]  # (bf16, channels_last) -> images/s


def decide(
    precision: str,
    memory_format_setting: str,
    device: torch.device,
    threads: int,
    timer: Timer | None = None,
    model: torch.nn.Module | None = None,
    input_size: int = 32,
    batch: int = 64,
    train_step: StepFn | None = None,
    native: tuple[bool, str] | None = None,
) -> Choice:
    """Decide precision and memory format for `model` (or with `timer`, for tests): pinned
    values are kept; `auto` is measured among the candidates this device has, by `train_step`
    (training) or by forward passes (inference). Pinning bf16 on a CPU without native bf16 is
    kept, with a warning note carrying the measured slow-down."""
    precision, fmt = check_precision(precision), check_memory_format(memory_format_setting)
    if device.type == "cuda":  # no measuring: these are right on every card that has them
        bf16 = precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported())
        cl = fmt != "contiguous"
        return Choice(str(device), "bf16" if bf16 else "fp32", _fmt_name(cl), threads)
    native_ok, why = native if native is not None else native_bf16()
    if timer is None:
        if model is None:
            raise ValueError("decide needs a model or a timer")
        batch = max(2, batch)
        probes: dict[tuple[bool, bool], StepProbe] = {}

        def timer(bf16: bool, channels_last: bool) -> float:
            if (bf16, channels_last) not in probes:
                # emulated bf16 (pinned against the machine) is timed on a few images:
                # seconds, where a full probe batch could take minutes
                images = 4 if bf16 and not native_ok else batch
                probes[bf16, channels_last] = StepProbe(
                    model, input_size, bf16, channels_last, images, train_step
                )
            return probes[bf16, channels_last].rate()

    # in order of preference: a later candidate must be SWITCH_MARGIN faster to be chosen, so
    # that measurement noise does not flip the decision (and the metrics) between two runs
    precisions = {"auto": [False, True] if native_ok else [False], "bf16": [True], "fp32": [False]}
    formats = {"auto": [False, True], "channels_last": [True], "contiguous": [False]}[fmt]
    candidates = [(b, c) for b in precisions[precision] for c in formats]
    note = "" if native_ok or precision == "fp32" else why
    if precision == "bf16" and not native_ok:  # pinned against the machine: say what it costs
        fp32 = max(timer(False, c) for c in formats)
        slow = timer(True, formats[-1])
        return Choice(
            str(device),
            "bf16",
            _fmt_name(formats[-1]),
            threads,
            {"fp32": fp32, _key(True, formats[-1]): slow},
            f"warning: precision bf16 is pinned on a CPU with {why}: measured {fp32 / slow:.1f}x "
            "slower than fp32; use --precision auto",
        )
    if len(candidates) == 1:
        b, c = candidates[0]
        return Choice(str(device), _prec_name(b), _fmt_name(c), threads, note=note or "pinned")
    readings = measure(timer, candidates)
    best = pick(candidates, readings)
    rates = {k: statistics.median(r) for k, r in readings.items()}
    return Choice(str(device), _prec_name(best[0]), _fmt_name(best[1]), threads, rates, note)


def measure(timer: Timer, candidates: list[tuple[bool, bool]]) -> dict[str, list[float]]:
    """Each candidate's rate in MEASURE_ROUNDS rounds, the candidates timed in turn (forward,
    then backward order), so that a slow spell of a shared machine, or the first candidate's
    cold start, falls on neighbours alike and cancels in their ratio (`faster`)."""
    readings: dict[str, list[float]] = {_key(b, c): [] for b, c in candidates}
    for r in range(MEASURE_ROUNDS):
        for b, c in candidates if r % 2 == 0 else candidates[::-1]:
            readings[_key(b, c)].append(timer(b, c))
    return readings


def pick(
    candidates: list[tuple[bool, bool]], readings: dict[str, list[float]]
) -> tuple[bool, bool]:
    """The candidate to run: the first (the safest) unless a later one is SWITCH_MARGIN
    faster than the one chosen so far (`faster`)."""
    best = candidates[0]
    for bc in candidates[1:]:
        if faster(readings[_key(*bc)], readings[_key(*best)]) > SWITCH_MARGIN:
            best = bc
    return best


def faster(a: list[float], b: list[float]) -> float:
    """How much faster `a` is than `b`: the median of their per-round ratios."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def _key(bf16: bool, channels_last: bool) -> str:
    return f"{_prec_name(bf16)}/{_fmt_name(channels_last)}"


def _prec_name(bf16: bool) -> str:
    return "bf16" if bf16 else "fp32"


def _fmt_name(channels_last: bool) -> str:
    return "channels_last" if channels_last else "contiguous"


def probe_batch(input_size: int, batch_size: int) -> int:
    """Images per timed step: enough to be representative, few enough for seconds in all
    (a 224-pixel input costs ~50x a 32-pixel one)."""
    cap = 128 if input_size <= 64 else 8
    return max(2, min(int(batch_size), cap))
