"""The random-network campaign: generate, compile and compare many networks; shrink each failure
into a regression file.

    OMP_NUM_THREADS=1 python -m tests.campaigns.random_nets --count 10000 --seed 1000
    OMP_NUM_THREADS=1 python -m tests.campaigns.random_nets --minutes 10 --seed 5000

Every network runs in a worker process, so that a crash (a signal in the generated C) or a hang
is recorded as a failure of that network and the campaign goes on. Failures are shrunk (see
shrink.py) and written to tests/campaigns/regressions/ (or --out), which the test suite replays.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for p in (str(HERE), str(REPO / "tests"), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

from netlang import dumps, loads, render  # noqa: E402

REGRESSIONS = HERE / "regressions"
HEADER = "# campaign-case: "


# ---- the worker ---------------------------------------------------------------------------

def worker_main() -> None:
    """Reads one JSON request per line ({"seed": s} or {"case": …}), answers one JSON line."""
    import warnings
    warnings.filterwarnings("ignore")
    from netcheck import CampaignFailure, run_case
    from netgen import generate
    for line in sys.stdin:
        request = json.loads(line)
        started = time.time()
        try:
            case = generate(request["seed"], request.get("budget", 14)) if "seed" in request else loads(request["case"])
        except Exception as e:
            reply = {"status": "generator-error", "detail": f"{type(e).__name__}: {e}"}
        else:
            reply = {"case": dumps(case)}
            try:
                run_case(case)
                reply["status"] = "ok"
            except CampaignFailure as e:
                reply.update(status="fail", kind=e.kind, detail=e.detail)
            except Exception as e:
                import traceback
                reply.update(status="fail", kind="harness-error", detail=traceback.format_exc(limit=6))
                del e
        reply["seconds"] = round(time.time() - started, 2)
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class Worker:
    """A worker process; restarted after a crash, a hang or `recycle` requests (modules stay loaded)."""

    def __init__(self, timeout: float, recycle: int = 150):
        self.timeout = timeout
        self.recycle = recycle
        self.proc = None
        self.served = 0

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(REPO / "tests"), str(REPO)]))
        self.proc = subprocess.Popen([sys.executable, "-u", str(Path(__file__)), "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        self.served = 0

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def ask(self, request: dict) -> dict:
        if self.proc is None or self.served >= self.recycle:
            self.stop()
            self.start()
        self.served += 1
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            self.stop()
            return {"status": "fail", "kind": "hang", "detail": f"no answer within {self.timeout:.0f} s"}
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.proc = None
            return {"status": "fail", "kind": "crash", "detail": f"the worker died with exit status {code}"}
        return json.loads(line)


# ---- regression files ---------------------------------------------------------------------

def regression_text(case, kind: str, detail: str, origin: str) -> str:
    first = detail.strip().splitlines()[0] if detail.strip() else ""
    return (f"# Found by the random-network campaign ({origin}), shrunk: [{kind}] {first[:300]}\n"
            f"# Replayed by tests/campaigns/test_random_networks.py; the line below is the case for the reference.\n"
            f"{HEADER}{dumps(case)}\n{render(case.program)}")


def read_regression(path: Path):
    for line in path.read_text().splitlines():
        if line.startswith(HEADER):
            case = loads(line[len(HEADER):])
            body = path.read_text().split(line + "\n", 1)[1]
            return case, body
    raise ValueError(f"{path}: no `{HEADER.strip()}` line")


# ---- the campaign -------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=100, help="networks to try (default 100)")
    ap.add_argument("--seed", type=int, default=0, help="first seed; network i has seed SEED + i")
    ap.add_argument("--minutes", type=float, default=None, help="stop starting networks after this long")
    ap.add_argument("--budget", type=int, default=14, help="layers per network after unrolling (default 14)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds one network may take (default 300)")
    ap.add_argument("--no-shrink", action="store_true", help="record failures without shrinking them")
    ap.add_argument("--shrink-tries", type=int, default=150, help="compiles one shrink may spend (default 150)")
    ap.add_argument("--out", type=Path, default=REGRESSIONS, help="where shrunk failures go")
    ap.add_argument("--log", type=Path, default=None, help="append one JSON line per network here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main()
        return 0

    own_cache = None
    if "CONVDSL_CACHE_DIR" not in os.environ:
        own_cache = tempfile.mkdtemp(prefix="convdsl-campaign-")
        os.environ["CONVDSL_CACHE_DIR"] = own_cache
    worker = Worker(args.timeout)
    started = time.time()
    counts: Counter = Counter()
    failures = []
    log = args.log.open("a") if args.log else None
    try:
        for i in range(args.count):
            if args.minutes is not None and time.time() - started > args.minutes * 60:
                break
            seed = args.seed + i
            reply = worker.ask({"seed": seed, "budget": args.budget})
            status = reply["status"] if reply["status"] != "fail" else f"fail:{reply['kind']}"
            counts[status] += 1
            if log:
                log.write(json.dumps({"seed": seed, **reply}) + "\n")
                log.flush()
            if reply["status"] == "fail":
                print(f"seed {seed}: [{reply['kind']}] {reply['detail'].strip().splitlines()[0][:200]}", flush=True)
                failures.append((seed, reply))
            elif reply["status"] != "ok":
                print(f"seed {seed}: {reply['status']}: {reply.get('detail', '')[:200]}", flush=True)
        elapsed = time.time() - started
        tried = sum(counts.values())
        print(f"\n{tried} networks in {elapsed:.0f} s: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        written = []
        for seed, reply in failures:
            if "case" not in reply:
                # A crash or hang loses the reply: make the case again from its seed.
                from netgen import generate
                case = generate(seed, args.budget)
            else:
                case = loads(reply["case"])
            kind = reply["kind"]
            if not args.no_shrink:
                from shrink import shrink

                def still_fails(cand, kind=kind):
                    r = worker.ask({"case": dumps(cand)})
                    return r["status"] == "fail" and r["kind"] == kind
                print(f"shrinking seed {seed} [{kind}] …", flush=True)
                case = shrink(case, still_fails, max_tries=args.shrink_tries)
                final = worker.ask({"case": dumps(case)})
                detail = final.get("detail", reply["detail"])
            else:
                detail = reply["detail"]
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / f"{kind}-seed{seed}.cnn"
            path.write_text(regression_text(case, kind, detail, f"seed {seed}"))
            written.append(path)
            print(f"  → {path}\n{render(case.program)}", flush=True)
        if written:
            print(f"{len(written)} regression file(s) written")
        return 1 if failures else 0
    finally:
        worker.stop()
        if log:
            log.close()
        if own_cache:
            shutil.rmtree(own_cache, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
