"""Where a training step's time and memory go, per phase kind (`scripts/bench_throughput.py`).

For each distinct (phase kind, form) of a config's recipe, the phase's real models are built
as the loop builds them (`build_phase_models`; the student starts from the base and the
teacher is the base, which changes no shape), then `train_step` runs `steps` times after
`warmup` and every second is attributed to one bucket:

  data     next batch, VAE encode and text encoders (`batch_to_latents`)
  teacher  the frozen teacher's walk (and, for x0_convert, its prediction)
  student  student UNet forward / backward
  disc     discriminator forward / backward
  optim    optimizer steps (both)
  other    the rest of the step: losses, moves, clipping, the finite check

Then each model pass runs alone on the same inputs (teacher walk; student forward+backward;
the discriminator's passes; the optimizer steps), and `overhead` = step time (without data)
/ the sum of those alone. FLOPs come from `torch.utils.flop_counter` over one step; MFU is
achieved FLOP/s over the peak given. Peak memory is the process RSS on CPU (sampled) or
`torch.cuda.max_memory_allocated` on a GPU.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from distill.phases import BASE, PhasePlan
from train.build import PhaseModels
from train.steps import StepContext, Updater, draw_point, train_step

BUCKETS = ("data", "teacher", "student_fwd", "student_bwd", "disc_fwd", "disc_bwd", "optim", "other")


@dataclass
class PhaseBench:
    """Seconds per step by bucket, the passes alone, FLOPs and peak memory of one phase kind."""

    phase: str
    batch_size: int
    seconds: dict[str, float] = field(default_factory=dict)  # bucket → mean seconds per step
    alone: dict[str, float] = field(default_factory=dict)  # model pass → median seconds, run alone
    ratios: list[float] = field(default_factory=list)  # per timed step: step without data / its passes alone
    flops: float = 0.0  # per step (forward + backward, teacher included; data excluded)
    peak_bytes: int = 0

    @property
    def step_s(self) -> float:
        return sum(self.seconds.values())

    @property
    def train_s(self) -> float:
        """A step without its data: what the passes alone are compared with."""
        return self.step_s - self.seconds.get("data", 0.0)

    @property
    def overhead(self) -> float:
        """Median over the timed steps of (step without data) / (its passes alone, run right
        after it on the same inputs): pairing each step with its own passes and the median keep
        other jobs on a shared machine from skewing the ratio."""
        ratios = sorted(self.ratios)
        return ratios[len(ratios) // 2] if ratios else float("nan")

    def mfu(self, peak_flops: float) -> float:
        return self.flops / max(self.train_s, 1e-12) / peak_flops if peak_flops else float("nan")


class SplitTimer:
    """Exclusive time per bucket: the innermost open bucket gets the seconds."""

    def __init__(self, sync=lambda: None):
        self.sync = sync
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[str] = []
        self.mark = time.perf_counter()
        self.paused = False

    def _switch(self):
        self.sync()
        now = time.perf_counter()
        if self.stack:
            self.totals[self.stack[-1]] += now - self.mark
        self.mark = now

    def push(self, bucket: str) -> None:
        if self.paused:
            return
        self._switch()
        self.stack.append(bucket)

    def pop(self) -> None:
        if self.paused:
            return
        self._switch()
        self.stack.pop()

    def replace_top(self, bucket: str) -> None:
        if self.paused or not self.stack:
            return
        self._switch()
        self.stack[-1] = bucket

    @contextmanager
    def bucket(self, name: str):
        self.push(name)
        try:
            yield
        finally:
            self.pop()


def instrument(models: PhaseModels, timer: SplitTimer, accelerator) -> list:
    """Hooks that attribute time to buckets; returns the handles (`remove` them after).

    Forward passes are timed by module hooks. Backward runs inside `accelerator.backward`, in
    the order of the graph: tensor hooks switch the bucket when the gradient reaches the
    discriminator's logits (D backward starts), its input (D backward ends) and the student
    UNet's output (student backward starts)."""
    handles = []

    def on_grad(bucket: str):
        def hook(_grad):
            timer.replace_top(bucket)
        return hook

    def module_hooks(module, fwd: str, bwd: str):
        def pre(_m, args):
            # The teacher may be the student's own UNet (adapter off): its calls stay "teacher".
            timer.push("teacher" if "teacher" in timer.stack else fwd)
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.requires_grad and bwd == "disc_bwd":
                x.register_hook(on_grad("other"))

        def post(_m, _args, out):
            timer.pop()
            out = getattr(out, "sample", out)
            if isinstance(out, torch.Tensor) and out.requires_grad and "teacher" not in timer.stack:
                out.register_hook(on_grad(bwd))

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    module_hooks(getattr(models.student.unet, "module", models.student.unet), "student_fwd", "student_bwd")
    if models.discriminator is not None:
        raw = getattr(models.discriminator, "module", models.discriminator)
        module_hooks(raw, "disc_fwd", "disc_bwd")
        module_hooks(raw.backbone, "disc_fwd", "disc_bwd")
    patches = [(models.teacher, "walk", "teacher"), (models.teacher, "predict", "teacher"),
               (accelerator, "backward", "other")]
    patches += [(opt, "step", "optim") for opt in (models.optimizer_g, models.optimizer_d) if opt is not None]
    for obj, name, bucket in patches:
        original = getattr(obj, name)

        def timed(*args, _original=original, _bucket=bucket, **kwargs):
            with timer.bucket(_bucket):
                return _original(*args, **kwargs)

        setattr(obj, name, timed)
        handles.append((obj, name))
    return handles


def remove(handles: list) -> None:
    for h in handles:
        if isinstance(h, tuple):
            delattr(*h)  # the instance attribute goes, the class method shows through again
        else:
            h.remove()


class PeakMemory:
    """Peak memory over a block: CUDA max_memory_allocated, or on CPU the process's RSS
    high-water mark (Linux VmHWM, reset through /proc/self/clear_refs: no sampling thread to
    compete with the step for the GIL)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = rss_high_water_mark()


def rss_high_water_mark() -> int:
    """VmHWM of this process in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (peak RSS needs Linux)")


def solo_plan(plan: PhasePlan, base_prediction_type: str) -> PhasePlan:
    """The phase as if it were the run's first: student from the base, the base as teacher
    (shapes and passes unchanged; no earlier stage has to exist)."""
    teacher = replace(plan.teacher, stage=BASE, prediction_type=base_prediction_type)
    return replace(plan, index=0, stage=0, first_in_stage=True, teacher=teacher)


def representatives(plans: list[PhasePlan]) -> list[PhasePlan]:
    """The first phase of each (kind, form) in recipe order."""
    seen, out = set(), []
    for plan in plans:
        if (plan.kind, plan.form) not in seen:
            seen.add((plan.kind, plan.form))
            out.append(plan)
    return out


def _sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def bench_phase(plan: PhasePlan, models: PhaseModels, next_batch, accelerator, d_cfg, *,
                steps: int, warmup: int, max_grad_norm: float, seed: int = 0) -> PhaseBench:
    """Time `steps` steps of one phase (after `warmup`), its passes alone, FLOPs and peak memory.
    `next_batch()` returns (x0, cond) and is timed as data."""
    from torch.utils.flop_counter import FlopCounterMode

    device = accelerator.device
    timer = SplitTimer(_sync(device))
    update = Updater(accelerator, max_grad_norm)
    result = PhaseBench(f"{plan.kind} ({plan.form})", 0)

    def one_step(i: int):
        gen = torch.Generator().manual_seed(seed + i)
        with timer.bucket("data"):
            x0, cond = next_batch()
        point = draw_point(plan, models.schedule, x0, gen)
        ctx = StepContext(accelerator, update, d_cfg, i, gen, poison=False)
        with timer.bucket("other"):
            train_step(plan, models, point, cond, ctx)
        return x0, cond, point

    handles = instrument(models, timer, accelerator)
    try:
        with PeakMemory(device) as peak:
            for i in range(warmup):
                if i == 0:  # FLOPs are counted on the first warm-up step (untimed)
                    with FlopCounterMode(display=False) as counter:
                        one_step(i)
                    result.flops = counter.get_total_flops()
                else:
                    one_step(i)
            timer.totals.clear()
            alone: dict[str, list[float]] = defaultdict(list)
            for i in range(steps):
                before = dict(timer.totals)
                x0, cond, point = one_step(warmup + i)
                train_s = sum(v - before.get(k, 0.0) for k, v in timer.totals.items() if k != "data")
                timer.paused = True
                passes = passes_alone(plan, models, point, cond, d_cfg, steps=1, sync=_sync(device))
                timer.paused = False
                for name, seconds in passes.items():
                    alone[name].append(seconds)
                result.ratios.append(train_s / sum(passes.values()))
        result.peak_bytes = peak.peak
    finally:
        remove(handles)
    result.batch_size = x0.shape[0]
    result.seconds = {b: timer.totals.get(b, 0.0) / steps for b in BUCKETS}
    result.alone = {k: sorted(v)[len(v) // 2] for k, v in alone.items()}
    if not warmup:
        with FlopCounterMode(display=False) as counter:
            ctx = StepContext(accelerator, update, d_cfg, 0, torch.Generator().manual_seed(seed), poison=False)
            train_step(plan, models, point, cond, ctx)
        result.flops = counter.get_total_flops()
    return result


def passes_alone(plan: PhasePlan, models: PhaseModels, point, cond, d_cfg, *, steps: int,
                 sync) -> dict[str, float]:
    """Mean seconds of each model pass of the step, run alone on the step's inputs."""
    from accelerate.utils import extract_model_from_parallel

    student, teacher = models.student, models.teacher
    timings: dict[str, list[float]] = defaultdict(list)  # per pass name: seconds per repetition
    current: dict[str, float] = defaultdict(float)  # this repetition's seconds per pass name

    def timed(name, fn):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        current[name] += time.perf_counter() - start
        return out

    params = models.params_g + (models.params_d or [])

    def once():
        if plan.kind == "x0_convert":
            timed("teacher", lambda: teacher.predict(point.x_t, point.t, cond))
        else:
            timed("teacher", lambda: teacher.walk(point.x_t, point.t, point.t_next, cond, plan.teacher.steps))
        moved = timed("student_fwd", lambda: student.step(models.schedule, point.x_t, point.t,
                                                          point.t_next, cond))
        if plan.adversarial:
            d = extract_model_from_parallel(models.discriminator)
            fake = moved.x_hat
            context = None
            if plan.conditional:
                with torch.set_grad_enabled(d_cfg.backbone_trainable):
                    context = timed("disc_fwd", lambda: d.encode(point.x_t, point.t, cond))
            both = torch.cat([fake.detach(), fake.detach()])
            twice = None if context is None else type(context)(
                [torch.cat([a, a]) for a in context.down], torch.cat([context.mid, context.mid]))
            logits = timed("disc_fwd", lambda: d(both, torch.cat([point.t_next, point.t_next]),
                                                 cond.cat(cond), twice))
            timed("disc_bwd", lambda: logits.float().mean().backward(retain_graph=context is not None))
            if context is not None and d_cfg.backbone_trainable:
                # the step encodes x_t again after the D update, without gradient, for the G step
                with torch.no_grad():
                    context = timed("disc_fwd", lambda: d.encode(point.x_t, point.t, cond))
            d.requires_grad_(False)
            g_logits = timed("disc_fwd", lambda: d(fake, point.t_next, cond, context))
            timed("student_bwd", lambda: g_logits.float().mean().backward())
            d.requires_grad_(True)
        else:
            timed("student_bwd", lambda: moved.x_hat.float().pow(2).mean().backward())
        timed("optim", lambda: _step_all(models))
        for p in params:
            p.grad = None

    for _ in range(steps):
        current.clear()
        once()
        for name, seconds in current.items():
            timings[name].append(seconds)

    return {k: sorted(v)[len(v) // 2] for k, v in timings.items()}


def _step_all(models: PhaseModels) -> None:
    """Both optimizer steps, as a step does (gradients as the passes left them)."""
    models.optimizer_g.step()
    if models.optimizer_d is not None:
        models.optimizer_d.step()


def format_table(rows: list[PhaseBench], peak_flops: float, device: str) -> str:
    """A markdown table: samples/s, the split in percent, overhead, FLOPs, MFU, peak memory."""
    head = ("| phase | s/step | samples/s | data | teacher | student fwd | student bwd | D fwd | D bwd "
            "| optim | other | overhead | GFLOP/step | GFLOP/s | MFU | peak GiB |")
    lines = [f"device: {device}", "", head, "|" + "---|" * 16]
    for r in rows:
        pct = [f"{100 * r.seconds[b] / max(r.step_s, 1e-12):.0f}%" for b in BUCKETS]
        achieved = r.flops / max(r.train_s, 1e-12)
        mfu = f"{100 * r.mfu(peak_flops):.1f}%" if peak_flops else "—"
        lines.append(f"| {r.phase} | {r.step_s:.3f} | {r.batch_size / r.step_s:.2f} | " + " | ".join(pct)
                     + f" | {r.overhead:.2f} | {r.flops / 1e9:.1f} | {achieved / 1e9:.1f} | {mfu} "
                     f"| {r.peak_bytes / 2**30:.2f} |")
    return "\n".join(lines)


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os
    import platform

    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU {model or platform.processor()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
