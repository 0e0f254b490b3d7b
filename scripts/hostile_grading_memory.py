"""Peak memory of `redi grade` on hostile responses: the whole process tree, sampled every 10 ms.

    python scripts/hostile_grading_memory.py [--workers 0 1 2] [--limit-gb 2.5] [--rows zeros,powers] [--filler 0]

Rows (issue 22 §4): one ``\\boxed{\\operatorname{zeros}(8000,8000)}`` (3.5 GB when judged without a limit) and
20 rows of ``\\boxed{2^{N}}`` with huge N (4.2 GB held). Prints, per --workers setting, the peak resident memory
of the largest single process and of the whole tree (the CLI process, its fork server and judging processes),
the verdict counts, and exits 1 when any process passes --limit-gb. ``--filler 80`` adds ordinary distinct rows,
so that a run with --workers 2+ takes the worker-pool path (64 distinct judgements or more) instead of the
one judging process. A tree that passes twice the limit is
killed at once (so a regression cannot eat a shared machine) and reported as over the limit.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = {
    "zeros": [r"\boxed{\operatorname{zeros}(8000,8000)}"],
    "powers": [rf"\boxed{{2^{{{10 ** 9 + i}}}}}" for i in range(20)],
}


def write_rows(path: Path, kinds: list[str], filler: int = 0) -> int:
    lines = [json.dumps({"id": f"{kind}-{i}", "response": response, "answer": "3"})
             for kind in kinds for i, response in enumerate(ROWS[kind])]
    lines += [json.dumps({"id": f"filler-{i}", "response": rf"\boxed{{{i}}}", "answer": str(i % 7)})
              for i in range(filler)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def tree_rss(root) -> tuple[int, int]:
    """(largest single process, sum over the tree) resident bytes, now."""
    import psutil

    sizes = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            sizes.append(proc.memory_info().rss)
        except psutil.Error:  # exited between the listing and the read
            pass
    return max(sizes, default=0), sum(sizes)


def measure(responses: Path, workers: int, kill_above: int, timeout: float) -> dict:
    import psutil

    verdicts = responses.with_suffix(f".w{workers}.verdicts.jsonl")
    cmd = [sys.executable, "-m", "redi", "grade", str(responses), "--json", "--workers", str(workers),
           "-o", str(verdicts), "--timeout", "5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak_one = peak_tree = 0
    killed = False
    started = time.monotonic()
    while proc.poll() is None:
        one, tree = tree_rss(root)
        peak_one, peak_tree = max(peak_one, one), max(peak_tree, tree)
        if tree > kill_above or time.monotonic() - started > timeout:
            killed = True
            for child in [*root.children(recursive=True), root]:
                try:
                    child.kill()
                except psutil.Error:
                    pass
            break
        time.sleep(0.01)
    out, err = proc.communicate()
    summary = json.loads(out) if proc.returncode == 0 and out.strip() else {}
    return {"workers": workers, "rc": proc.returncode, "killed": killed, "peak_process": peak_one,
            "peak_tree": peak_tree, "seconds": time.monotonic() - started, "timeouts": summary.get("timeouts"),
            "samples": summary.get("samples"), "stderr": err.strip()[-300:]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--limit-gb", type=float, default=2.5)
    parser.add_argument("--rows", default="zeros,powers")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--filler", type=int, default=0)
    args = parser.parse_args(argv)
    limit = int(args.limit_gb * 2 ** 30)
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        responses = Path(tmp) / "hostile.jsonl"
        n = write_rows(responses, args.rows.split(","), args.filler)
        for workers in args.workers:
            row = measure(responses, workers, kill_above=2 * limit, timeout=args.timeout)
            over = row["killed"] or row["peak_process"] > limit
            failed |= over or row["rc"] != 0
            print(f"workers={workers} rows={n} rc={row['rc']} peak_process={row['peak_process'] / 2**30:.2f}GB "
                  f"peak_tree={row['peak_tree'] / 2**30:.2f}GB timeouts={row['timeouts']} "
                  f"{'OVER LIMIT' if over else 'ok'} {row['stderr'] if row['rc'] else ''}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
