"""What a run reports: RUN/metrics.jsonl and notes (`Logger`), an epoch's losses, speed and data
wait (`EpochMeter`, which stops a run whose loss is not finite), the cache's digest coverage."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from data_shards.files import write_text_atomic

from . import distributed as D
from .errors import TrainingError
from .teachers import CachedTeacher

if TYPE_CHECKING:
    from .train import Run

METRICS_FILE = "metrics.jsonl"


class Logger:
    """JSON lines to RUN/metrics.jsonl and notes to stderr, from rank 0 only. Lines are held until
    `open()` (the run passed its checks and starts), so a refused run writes nothing into RUN."""

    def __init__(self, out: Path, enabled: bool):
        self.path, self.enabled = out / METRICS_FILE, enabled
        self._held: list[dict] | None = []

    def open(self) -> None:
        """Create RUN and write the lines held so far; from now on lines go straight to the file."""
        held, self._held = self._held or [], None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        for record in held:
            self.metrics(record)

    def metrics(self, record: dict) -> None:
        if self._held is not None:
            self._held.append(record)
        elif self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")

    def note(self, message: str) -> None:
        if self.enabled:
            print(f"train-student: {message}", file=sys.stderr, flush=True)
            self.metrics({"event": "note", "message": message})

    def truncate_from_epoch(self, epoch: int) -> None:
        """On resume, drop the lines of the epochs that are about to be run again."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line and json.loads(line).get("epoch", -1) < epoch]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))


class EpochMeter:
    """An epoch's loss sums (total, base, distill) on the device between log points (no host sync
    per step), its first non-finite step, its time and the seconds it waited for data."""
    NONE = 2**62                           # first_bad when every step was finite

    def __init__(self, device: torch.device):
        self.epoch_sums = torch.zeros(3, device=device)
        self.sums = torch.zeros(3, device=device)            # of the log window (as steps, start)
        self.first_bad = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.wait_s, self.epoch_start = 0.0, time.perf_counter()
        self.steps, self.start = 0, time.perf_counter()

    def timed(self, batches):
        """The batches, adding the time spent waiting for each to wait_s."""
        while True:
            started = time.perf_counter()
            batch = next(batches, None)
            self.wait_s += time.perf_counter() - started
            if batch is None:
                return
            yield batch

    def add(self, loss, step: int) -> None:
        self.sums += torch.stack([loss.total.detach(), loss.base.detach(), loss.distill.detach()])
        self.first_bad = torch.where(torch.isfinite(loss.total.detach()), self.first_bad,
                                     self.first_bad.clamp(max=step))
        self.steps += 1

    def close_window(self, run: Run, epoch: int, step: int) -> tuple[list[float], float]:
        """-> (mean loss parts over all ranks' window, steps/s); stops on a non-finite loss."""
        bad = (self.first_bad < self.NONE).float().view(1)
        stats = D.all_reduce_sum(torch.cat([self.sums, bad]), run.ctx)
        if stats[3].item() > 0:
            _stop_non_finite(epoch, step, int(self.first_bad.item()), run.checkpoint, run.log)
        self.epoch_sums += self.sums
        rate = self.steps / max(time.perf_counter() - self.start, 1e-9)
        mean = (stats[:3] / (self.steps * run.ctx.world_size)).tolist()
        self.sums.zero_()
        self.steps, self.start = 0, time.perf_counter()
        return mean, rate

    def epoch_metrics(self, run: Run, plan, epoch: int, lr: float) -> dict:
        ctx, device, done = run.ctx, run.ctx.device, plan.steps  # train_batches gives all or raises
        epoch_time, wait = time.perf_counter() - self.epoch_start, self.wait_s
        steps = D.all_gather_rows(torch.tensor([done], dtype=torch.int64), ctx)[:, 0].tolist()
        totals = (D.all_reduce_sum(self.epoch_sums.clone(), ctx) / (done * ctx.world_size)).tolist()
        memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        return {"event": "epoch", "epoch": epoch, "steps": done, "steps_per_rank": steps,
                "samples_per_rank": plan.samples_per_rank, "aug_seeds": plan.aug_seeds,
                "lr": lr, "loss": totals[0], "loss_base": totals[1], "loss_distill": totals[2],
                "epoch_time_s": epoch_time,
                "samples_per_s": done * run.global_batch / max(epoch_time, 1e-9),
                # data-bound when data_wait_s is a large share of epoch_time_s
                "data_wait_s": wait, "compute_s": max(epoch_time - wait, 0.0),
                "peak_gpu_memory_bytes": memory}


def _stop_non_finite(epoch: int, step: int, first_bad: int, checkpoint: Path, log: Logger) -> None:
    where = (f"epoch {epoch}, step {first_bad + 1}" if first_bad < EpochMeter.NONE
             else f"epoch {epoch}, at or before step {step + 1} (another rank)")
    kept = (f"the last good checkpoint {checkpoint} is kept (resume with --resume)"
            if checkpoint.exists() else "no checkpoint was written yet")
    message = (f"loss became NaN/inf at {where}; training stopped without saving - {kept}. "
               "Lower --lr, set --clip-grad 1.0, or use --amp bf16 instead of fp16")
    log.metrics({"event": "error", "epoch": epoch, "message": message})
    raise TrainingError(message)


def digest_coverage(teacher: CachedTeacher, ctx: D.DistContext) -> dict:
    """The cached teacher's digest checks since the last call (an epoch), over all ranks: digests
    compared, (shard, seed) units read, and those checked by any rank (the run, not each rank,
    checks a unit: another rank may read its later pieces, in that step at the earliest)."""
    seen, checked, verified = teacher.take_coverage()
    flags = torch.zeros(2, teacher.cache.num_shards, teacher.cache.num_seeds, dtype=torch.float64)
    for row, units in enumerate((seen, checked)):
        for shard, seed in units:
            flags[row, shard, seed] = 1
    counts = torch.cat([flags.flatten(), torch.tensor([float(verified)], dtype=torch.float64)])
    total = D.all_reduce_sum(counts.to(ctx.device), ctx).cpu()
    read, checked_any = total[:-1].view(2, -1) > 0
    return {"verified": int(total[-1]), "units_read": int(read.sum()),
            "units_checked": int((read & checked_any).sum())}
