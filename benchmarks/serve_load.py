"""`peftkit serve` under load: 1, 8 and 32 concurrent clients over 1 and 8 adapters (issue 17, part 4).

    python benchmarks/serve_load.py [--requests 256] [--clients 1 8 32] [--adapters 1 8]

Eight SST-2 classifiers on the 4-bit MiniLM (each trained for a few steps from its own seed, so that every
adapter answers differently and a request routed to the wrong one shows), served by one ``peftkit serve``
process with its defaults (``--max-batch 32 --max-wait-ms 5``). Each client is a thread of this process sending
requests one after another (httpx, one SST-2 dev sentence each, the adapter chosen round-robin over the adapters of
the setting). Per setting: throughput (requests per second over the whole setting), client-side latency p50 / p99,
and what the server's ``/metrics`` saw (mean requests per batch). The peer is the same server answering one
request at a time (1 client): the ratio is each setting's throughput over that of 1 client on the same adapters,
measured in the same run. Every answer is checked against ``Server.predict`` on the same sentence alone: the
labels that differ (any fails the run) and the largest probability difference (a row padded in a batch rounds
differently: float32 rounding on most CPUs, bfloat16 steps on bitsandbytes' packed 4-bit path).
Results: ``benchmarks/results/serve_load/`` (every request's timing in results.json, a plot).
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

from common import REPO, SHARED_DATA, child_env, describe_machine, fail, machine_info, results_dir, write_results

TARGET = 3.0  # issue 17: 8 clients over 8 adapters against one request at a time


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=256, help="requests per setting")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 8])
    p.add_argument("--train-steps", type=int, default=8, help="training steps of each adapter")
    p.add_argument("--out", help="results folder (default benchmarks/results/serve_load)")
    args = p.parse_args(argv)
    if max(args.adapters) > 8 or min(args.adapters) < 1 or min(args.clients) < 1 or args.requests < 8:
        fail("--adapters: 1 to 8; --clients: at least 1; --requests: at least 8")
    return args


def train_adapters(registry: Path, runs: Path, count: int, steps: int) -> list[str]:
    from peftkit.config.recipe import load_recipe
    from peftkit.train.training import train

    names = []
    for i in range(count):
        name = f"sst2-{i}"
        overrides = [f"output.name={name}", f"output.registry={registry}", f"output.runs={runs}",
                     f"train.seed={i}", f"train.max_steps={steps}", "train.progress=false",
                     "train.eval_at_start=false", "data.max_train_samples=256",
                     "data.max_eval_samples=64"]
        train(load_recipe(REPO / "recipes" / "sst2-qlora.yaml", overrides), echo=lambda line: None)
        names.append(name)
    return names


def sentences(n: int) -> list[str]:
    with open(SHARED_DATA / "glue" / "SST-2" / "dev.tsv", newline="") as f:
        rows = [r["sentence"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return rows[:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(registry: Path, names: list[str], port: int, log: Path) -> subprocess.Popen:
    import httpx

    command = [sys.executable, "-m", "peftkit", "serve", "--registry", str(registry), "--port", str(port)]
    for name in names:
        command += ["--adapter", name]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=child_env(), cwd=REPO)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            fail(f"peftkit serve ended (exit {process.returncode}); see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.5)
    process.terminate()
    fail(f"peftkit serve did not answer /health in 600 s; see {log}")
    raise AssertionError  # unreachable


def run_setting(url: str, clients: int, adapters: list[str], texts: list[str], requests: int
                ) -> dict[str, Any]:
    """``requests`` requests from ``clients`` threads; request k: text k, adapter k mod len(adapters)."""
    import httpx

    jobs = [(k, adapters[k % len(adapters)], texts[k % len(texts)]) for k in range(requests)]
    answers: dict[int, Any] = {}
    latencies: dict[int, float] = {}
    lock = threading.Lock()
    cursor = iter(jobs)
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while True:
                with lock:
                    job = next(cursor, None)
                if job is None:
                    return
                k, adapter, text = job
                start = time.perf_counter()
                reply = http.post(f"{url}/v1/classify", json={"model": adapter, "input": [text]})
                latencies[k] = time.perf_counter() - start
                if reply.status_code != 200:
                    errors.append(f"request {k}: HTTP {reply.status_code} {reply.text[:200]}")
                    return
                answers[k] = reply.json()["data"][0]

    before = httpx.get(f"{url}/metrics").json()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = httpx.get(f"{url}/metrics").json()
    if errors:
        fail(f"{clients} clients over {len(adapters)} adapters: {errors[0]}")
    ordered = sorted(latencies.values())
    batches = _batches(after) - _batches(before)
    return {"clients": clients, "adapters": len(adapters), "requests": requests, "wall_seconds": wall,
            "throughput": requests / wall, "p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "requests_per_batch": requests / batches if batches else None, "answers": answers,
            "latencies_ms": [1000 * latencies[k] for k in sorted(latencies)],
            "jobs": [(k, a) for k, a, _ in jobs]}


def _batches(metrics: dict[str, Any]) -> int:
    return int(metrics.get("batches", {}).get("predict", {}).get("count", 0))


def check_answers(result: dict[str, Any], reference: dict[tuple[str, int], dict[str, Any]], n_texts: int
                  ) -> dict[str, Any]:
    """Each answer against ``Server.predict`` on the same sentence alone: labels that differ, the largest
    probability difference, and answers past 1e-4 (a row padded in a batch rounds differently; on bitsandbytes'
    packed bfloat16 CPU path, by bfloat16 steps)."""
    flips, worst, past = 0, 0.0, 0
    for k, adapter in result["jobs"]:
        got, want = result["answers"][k], reference[(adapter, k % n_texts)]
        gap = max(abs(got["probs"][c] - want["probs"][c]) for c in want["probs"])
        flips += got["label"] != want["label"]
        past += gap > 1e-4
        worst = max(worst, gap)
    return {"label_flips": flips, "max_prob_diff": worst, "past_1e-4": past}


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    from peftkit.serve.serving import load_server

    info = machine_info()
    print(describe_machine(info), flush=True)
    work = Path(tempfile.mkdtemp(prefix="peftkit-serve-load-"))
    names = train_adapters(work / "adapters", work / "runs", max(args.adapters), args.train_steps)
    texts = sentences(64)
    server = load_server(str(work / "adapters"), names)  # the reference: each sentence alone, per adapter
    reference = {(name, i): server.predict([text], [name], batch_size=1)[0]
                 for name in names for i, text in enumerate(texts)}
    del server
    port = free_port()
    process = start_server(work / "adapters", names, port, work / "serve.log")
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        run_setting(url, 4, names, texts, 32)  # warm-up: first calls pay one-off costs (kernels, allocator)
        for n_adapters in args.adapters:
            for clients in args.clients:
                result = run_setting(url, clients, names[:n_adapters], texts, args.requests)
                result.update(check_answers(result, reference, len(texts)))
                rows.append(result)
                print(f"{clients:>2} clients, {n_adapters} adapters: {result['throughput']:.1f} req/s, "
                      f"p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, "
                      f"{result['requests_per_batch'] or 0:.1f} requests per batch, label flips {result['label_flips']}, "
                      f"max prob diff {result['max_prob_diff']:.1e}",
                      flush=True)
    finally:
        process.terminate()
        process.wait(timeout=120)
    for row in rows:
        one = next(r for r in rows if r["adapters"] == row["adapters"] and r["clients"] == 1)
        row["speedup"] = row["throughput"] / one["throughput"]
    table = ["| clients | adapters | requests/s | x one at a time | p50 ms | p99 ms | requests per batch | "
             "labels unlike alone | largest prob. difference |", "|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['clients']} | {r['adapters']} | {r['throughput']:.1f} | {r['speedup']:.2f} | {r['p50_ms']:.0f} | "
              f"{r['p99_ms']:.0f} | {r['requests_per_batch'] or 0:.1f} | {r['label_flips']} | {r['max_prob_diff']:.1e} |"
              for r in rows]
    key = next((r for r in rows if r["clients"] == 8 and r["adapters"] == 8), None)
    from peftkit.core.cpu_paths import path_for

    path = path_for(4, "cpu", True)
    verdict = (f"4-bit CPU path: {path}. " if path else "") + (f"8 clients over 8 adapters: {key['speedup']:.2f}x one request at a time (target {TARGET}x)"
               if key else "8 clients over 8 adapters was not run")
    text = (f"# peftkit serve under load\n\n{describe_machine(info)}\n\n{args.requests} requests per setting, one "
            f"SST-2 dev sentence each, 4-bit MiniLM classifiers, server defaults (--max-batch 32, --max-wait-ms 5)."
            f"\n\n" + "\n".join(table) + f"\n\n{verdict}.\n")
    print(text)
    folder = results_dir("serve_load", args.out)
    write_results(folder, {"machine": info, "settings": vars(args), "rows": [
        {k: v for k, v in r.items() if k not in ("answers", "jobs")} for r in rows]}, text)
    _plot(rows, folder / "serve_load.png")
    if any(r["label_flips"] for r in rows):
        fail("some labels differ from Server.predict on the same sentence alone: see the table")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for n in sorted({r["adapters"] for r in rows}):
        mine = [r for r in rows if r["adapters"] == n]
        left.plot([r["clients"] for r in mine], [r["throughput"] for r in mine], marker="o", label=f"{n} adapters")
        right.plot([r["clients"] for r in mine], [r["p99_ms"] for r in mine], marker="o", label=f"{n} adapters p99")
        right.plot([r["clients"] for r in mine], [r["p50_ms"] for r in mine], marker="x", linestyle="--",
                   label=f"{n} adapters p50")
    for ax, label in ((left, "requests per second"), (right, "latency, ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("peftkit serve: classification requests, 4-bit MiniLM")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
