"""Shared by the benchmark scripts: the machine they ran on, measured child processes, result files.

Every script writes ``benchmarks/results/<script>/results.json`` (machine, settings, raw rows, summary),
``results.md`` (the table it also prints) and PNG plots beside them (``plots.py``). A child process reports
its own measurements on one line ``BENCH_RESULT {json}``, with its peak resident memory: ``VmHWM`` from
``/proc/self/status``, the high-water mark of its own address space. ``ru_maxrss`` cannot give that: Linux
carries it across fork and exec, so a child started by a parent holding 500 MB reports at least 500 MB
(measured in tests/test_benchmarks.py). ``os.wait4``'s ``ru_maxrss`` is kept as the fallback for children
that print no result (and where there is no /proc).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SHARED_DATA = REPO.parent / "shared" / "data"
RESULTS = BENCH_DIR / "results"
RESULT_MARK = "BENCH_RESULT "

# The benchmarks measure the peftkit of the checkout they sit in, whatever an editable install points at.
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))


def _proc_status_bytes(field: str) -> Optional[int]:
    """A memory figure of this process from /proc/self/status (``VmHWM``, ``VmRSS``), or None without /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def own_peak_rss_bytes() -> Optional[int]:
    """This process's peak resident memory since its last exec (VmHWM)."""
    return _proc_status_bytes("VmHWM")


def current_rss_bytes() -> Optional[int]:
    """This process's resident memory now (VmRSS)."""
    return _proc_status_bytes("VmRSS")


def emit_result(result: dict[str, Any]) -> None:
    """What a child prints last: its measurements and its own peak memory, on one line the parent looks for."""
    print(RESULT_MARK + json.dumps({**result, "peak_rss_bytes": own_peak_rss_bytes()}), flush=True)


def _memory_total_gib() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def git_commit_short() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    """The machine and software a result came from; the load average says how busy the shared cores were."""
    import torch

    from peftkit.core.cpu_paths import cpu_flags, cpu_model, plain_peft_path

    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        # bitsandbytes picks its 4-bit CPU kernel from these (peftkit/core/cpu_paths.py): figures differ between CPUs
        "cpu_flags": cpu_flags(),
        "cpu_4bit_inference_path": plain_peft_path(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_total_gib(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        **{name: _version(name) for name in ("transformers", "peft", "bitsandbytes", "accelerate")},
        "git_commit": git_commit_short(),
        # glibc malloc settings change peak RSS a lot on CPU (see the README's Benchmarks section); runs inherit them
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"},
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                       "cuda": torch.version.cuda}
    return info


def describe_machine(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']['name']}" if info.get("gpu") else ", no GPU"
    load = "/".join(str(x) for x in info["load_average"])
    malloc = info.get("malloc_env") or {}
    allocator = "; malloc: " + " ".join(f"{k}={v}" for k, v in sorted(malloc.items())) if malloc else ""
    flags = ", ".join(f for f in info.get("cpu_flags", []) if f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))
    return (f"{info['cpu']} ({flags or 'no AVX512'}), {info['cores']} cores{gpu}, load average {load} at the start; "
            f"torch {info['torch']}, "
            f"transformers {info['transformers']}, peft {info['peft']}, bitsandbytes {info['bitsandbytes']} "
            f"({info['date']}){allocator}")


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def run_measured(command: Sequence[str], log_path: Path, env: Optional[dict[str, str]] = None,
                 timeout: Optional[float] = None) -> dict[str, Any]:
    """Run ``command`` in its own process, output to ``log_path``; its result line, wall time and peak RSS.

    Returns ``{"ok", "returncode", "wall_seconds", "peak_rss_bytes", "ru_maxrss_bytes", "result", "log"}``;
    ``result`` is the child's ``BENCH_RESULT`` dict (None when it printed none), ``ok`` is True only with a
    result and exit 0; ``peak_rss_bytes`` is the child's own VmHWM when it reported one, else ``ru_maxrss``.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log_path.open("w") as log:
        log.write("$ " + " ".join(str(c) for c in command) + "\n")
        log.flush()
        proc = subprocess.Popen([str(c) for c in command], stdout=log, stderr=subprocess.STDOUT,
                                env=env or child_env(), cwd=REPO)
        deadline = None if timeout is None else started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; tell Popen so it does not wait again
    seconds = time.perf_counter() - started
    result = None
    text = log_path.read_text(errors="replace")
    for line in reversed(text.splitlines()):
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
            break
    ru_maxrss = usage.ru_maxrss * 1024  # Linux reports KiB
    return {
        "ok": proc.returncode == 0 and result is not None,
        "returncode": proc.returncode,
        "wall_seconds": round(seconds, 2),
        "peak_rss_bytes": (result or {}).get("peak_rss_bytes") or ru_maxrss,
        "ru_maxrss_bytes": ru_maxrss,
        "result": result,
        "log": str(log_path),
    }


def last_lines(path: str, n: int = 5) -> str:
    lines = Path(path).read_text(errors="replace").strip().splitlines()
    return "\n".join(lines[-n:])


def mean_spread(values: Iterable[Optional[float]]) -> dict[str, Optional[float]]:
    """Mean, sample standard deviation (0 for one value), min, max and count of the values that exist."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(xs), "max": max(xs), "n": len(xs)}


Column = tuple[str, Callable[[dict[str, Any]], Any]]


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A Markdown table: one row per dict, each column a header and a function giving the cell."""
    def cell(value: Any) -> str:
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(cell(get(row)) for _, get in columns) + " |")
    return "\n".join(lines)


def fmt(value: Optional[float], digits: int = 1, scale: float = 1.0, suffix: str = "") -> Optional[str]:
    return None if value is None else f"{value * scale:,.{digits}f}{suffix}"


def mib(n_bytes: Optional[float]) -> Optional[str]:
    return fmt(None if n_bytes is None else n_bytes / 2**20, 1)


def results_dir(script: str, out: Optional[str]) -> Path:
    folder = Path(out) if out else RESULTS / script
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_whole(path: Path, text: str) -> Path:
    """``text`` into ``path`` through a temporary file and ``os.replace``: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_results(folder: Path, payload: dict[str, Any], markdown: str) -> None:
    """``results.json`` and ``results.md`` in ``folder``, each written whole."""
    write_whole(folder / "results.json", json.dumps(payload, indent=2, default=str) + "\n")
    write_whole(folder / "results.md", markdown.rstrip() + "\n")


def fail(message: str) -> None:
    """Bad input: one line, non-zero exit, no traceback."""
    print(f"Error: {message}", file=sys.stderr)
    raise SystemExit(2)
