"""Peak and resting memory of a few training steps, each setup in a fresh process.

A parent calls ``run_worker(spec, ...)``; it starts ``python -m benchmarks._memory SPEC`` (SPEC:
the JSON of ``spec``), which builds the model and the optimiser named there
(``benchmarks.bench_optimizer.memory_setup``), runs ``spec["steps"]`` training steps
(``zero_grad(set_to_none=True)``, forward, cross-entropy, backward, ``step()``) on random tokens
and prints one JSON result line. A fresh process per setup, so that no optimiser inherits
another's allocator caches, and so that a setup that runs away can be stopped.

What is measured, on CPU (Linux):

* ``imported``: resident set size (``VmRSS`` of ``/proc/self/status``) once Python, torch and
  the benchmark modules are imported;
* ``built``: RSS once the model and the optimiser exist (no gradients, no optimiser state yet);
* ``peak``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (kibibytes on Linux) after the last
  step, the process's high-water mark having been reset (``5`` written to
  ``/proc/self/clear_refs``) just before the first step: the most memory the steps needed,
  forward and backward included (construction peaks, e.g. symmetry detection, are not in it);
* ``resting``: RSS after the last step returned, gradients still allocated, optimiser state
  alive, after glibc's ``malloc_trim(0)`` has handed freed heap back to the system — what the
  model, its gradients and the optimiser state hold between steps, not what the allocator
  keeps cached. ``peak - resting`` is then the step's transient memory.

On CUDA ``peak`` is ``torch.cuda.max_memory_allocated`` (reset before the first step) and
``resting`` is ``torch.cuda.memory_allocated`` after the last step; ``built`` and ``imported``
stay host RSS.

The parent polls the worker's ``VmRSS`` and ``VmHWM`` every 50 ms and kills it when its RSS
passes ``memory_cap_mib`` or it runs longer than ``time_cap_s``; the result then says so, with
the high-water mark reached and the phase it was in (``stopped``), instead of raising.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["run_worker"]

ROOT = Path(__file__).resolve().parents[1]  # the folder holding the ``benchmarks`` package
RESULT = "result "
PHASE = "phase "


def _status_mib(pid: int | str = "self") -> dict[str, float]:
    """VmRSS and VmHWM of a process in MiB ({} if it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def _reset_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _emit(kind: str, payload) -> None:
    print(kind + json.dumps(payload), flush=True)


def worker(spec: dict) -> dict:
    """The child's side: build, step, measure (module docstring). Prints progress lines
    (``phase {...}``) and returns the result, which ``main`` prints as ``result {...}``."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from benchmarks import bench_optimizer

    device = torch.device(spec.get("device", "cpu"))
    cuda = device.type == "cuda"
    result = {"imported_mib": _status_mib().get("VmRSS", 0.0)}
    _emit(PHASE, {"phase": "building", **result})
    model, optimiser, batches, loss_fn = bench_optimizer.memory_setup(spec, device)
    result["built_mib"] = _status_mib().get("VmRSS", 0.0)
    _emit(PHASE, {"phase": "built", "built_mib": result["built_mib"]})
    result["peak_reset"] = _reset_peak()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(spec["steps"]):
        _emit(PHASE, {"phase": f"step {step + 1}"})
        x, y = batches[step % len(batches)]
        optimiser.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimiser.step()
    if cuda:
        torch.cuda.synchronize(device)
        result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["resting_mib"] = torch.cuda.memory_allocated(device) / 2**20
    else:
        result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        _malloc_trim()
        result["resting_mib"] = _status_mib().get("VmRSS", 0.0)
    result["memory"] = "cuda allocated" if cuda else "host RSS"
    return result


def run_worker(spec: dict, time_cap_s: float, memory_cap_mib: float) -> dict:
    """Run ``worker(spec)`` in a fresh Python process, watched (module docstring).

    Returns the worker's result plus ``status``: ``"ok"``, ``"time cap"``, ``"memory cap"`` or
    ``"failed"``; when stopped, ``stopped_at_mib`` (the process's RSS high-water mark, since the
    reset before the first step if it got there) and ``phase`` (the last phase it reported);
    when failed, ``error`` (the last line of its stderr)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    lines: list[str] = []
    errors: list[str] = []
    began, high, status = time.monotonic(), 0.0, None
    with subprocess.Popen(
        [sys.executable, "-m", "benchmarks._memory", json.dumps(spec)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        readers = [
            threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True),
            threading.Thread(target=lambda: errors.extend(process.stderr), daemon=True),
        ]
        for reader in readers:
            reader.start()
        try:
            while process.poll() is None:
                memory = _status_mib(process.pid)
                if memory:  # the high-water mark since the reset before step 1, if it got there
                    high = max(memory.get("VmHWM", 0.0), memory.get("VmRSS", 0.0))
                if memory.get("VmRSS", 0.0) > memory_cap_mib:
                    status = "memory cap"
                elif time.monotonic() - began > time_cap_s:
                    status = "time cap"
                if status:
                    process.kill()
                    break
                time.sleep(0.05)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
            for reader in readers:
                reader.join(timeout=5)
    seconds = time.monotonic() - began
    phases = [json.loads(s[len(PHASE) :]) for s in lines if s.startswith(PHASE)]
    results = [json.loads(s[len(RESULT) :]) for s in lines if s.startswith(RESULT)]
    out: dict = {"seconds": seconds}
    for phase in phases:
        out.update(phase)
    if results and status is None:
        return {**out, **results[-1], "status": "ok"}
    if status is None:
        status = "failed"
        tail = [e.strip() for e in errors if e.strip()]
        out["error"] = tail[-1] if tail else f"exit status {process.returncode}"
    return {**out, "status": status, "stopped_at_mib": high}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    print(RESULT + json.dumps(worker(json.loads(args[0]))), flush=True)


if __name__ == "__main__":
    main()
