"""Front-end fuzzing: grammar-aware mutations of examples/*.cnn and tests/golden/*.cnn, and random
bytes, each run through everything `convdsl check` and `compile` do before the C compiler.

Every input must end as a ConvDSLError whose text starts with FILE:LINE:COL: error:, quotes the
source line and has a caret under the column, or check cleanly (and then the generated C, for a
sample of such inputs, must pass gcc -Wall -Wextra -Werror) — within a time limit per input.
A Python traceback, a hang, a crash or an error without a location is a bug.

    OMP_NUM_THREADS=1 python -m tests.campaigns.fuzz --count 100000 --seed 7

Inputs run in a worker process (a hang is a timeout, a crash the worker's death); each bug is
minimised (lines, then tokens, then characters are dropped while it keeps its signature) and
written to tests/campaigns/fuzz_regressions/, which the test suite replays.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FUZZ_REGRESSIONS = HERE / "fuzz_regressions"
INPUT_NAME = "fuzz.cnn"


def corpus() -> list[tuple[str, str]]:
    """(name, text) of every seed file that is text, in a fixed order (a golden case that is not
    UTF-8 on purpose is no seed: the fuzzer makes such bytes itself)."""
    files = sorted((REPO / "examples").glob("*.cnn")) + sorted((REPO / "tests" / "golden").glob("*.cnn"))
    seeds = []
    for f in files:
        try:
            seeds.append((f.relative_to(REPO).as_posix(), f.read_bytes().decode("utf-8")))
        except UnicodeDecodeError:
            continue
    return seeds


# ---- mutations ----------------------------------------------------------------------------

TOKEN = re.compile(r"""
    (?P<nl>\r?\n) | (?P<ws>[ \t\f\r]+) | (?P<comment>\#[^\n]*) | (?P<string>"[^"\n]*")
  | (?P<number>(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*) | (?P<op>->|//|[-+*/(){}\[\],:=]) | (?P<other>.)""", re.X | re.S)

EXTREME_NUMBERS = ("0", "-1", "1", "2147483647", "2147483648", str(2 ** 31), str(2 ** 32), str(2 ** 63),
                   str(2 ** 63 - 1), str(2 ** 64), str(2 ** 24 + 1), "99999999999999999999999", "1e308", "1e309",
                   "1e-320", "1e-400", "4.9e-324", "0.0", "-0.0", "1e999", "nan", "inf", "-inf", "NaN", "1e", "1.",
                   ".5", "0x10", "1_000", "00007", "1e+5", "12345678901234567890123456789012345678901234567890",
                   "-2147483649", "3.4028235e38", "1.7976931348623157e308", "9" * 400, "0." + "0" * 300 + "1")
KEYWORDS = ("network", "block", "input", "output", "layer", "const", "repeat", "loss", "layout", "dtype",
            "return", "use", "true", "false")
OP_NAMES = ("conv", "depthwise", "separable", "local", "tiled", "deconv", "maxpool", "avgpool", "l2pool",
            "globalavgpool", "globalmaxpool", "maxout", "shuffle", "upsample", "flatten", "dense", "relu",
            "sigmoid", "tanh", "leaky_relu", "softmax", "add", "concat", "scale", "batchnorm", "dropout",
            "relu6", "clip", "hardsigmoid", "hardswish", "silu", "gelu", "elu", "prelu", "layernorm", "groupnorm",
            "instancenorm", "sub", "mul", "pad", "reshape", "pad_mode", "reflect", "replicate",
            "softmax_cross_entropy", "mse", "channels", "height", "width", "same", "valid", "full", "he",
            "xavier", "normal", "uniform", "zeros", "ones", "nearest", "bilinear", "NCHW", "NHWC", "f32", "f64")
ODD_NAMES = ("class", "None", "lambda", "import", "def", "int", "double", "float", "main", "free", "malloc",
             "NULL", "m", "batch", "self", "__init__", "_", "__", "x" * 300, "y" * 5000, "é", "名前", "ñame",
             "x\u200b", "ǅ", "ﬁ", "Ⅻ", "٣", "a\u0301", "Ω", "\u202e", "e1", "inf", "nan", "I", "O",
             "_" + "a" * 64, "Model", "params", "forward", "return_", "static", "restrict", "omp", "pragma")
PUNCT = ("(", ")", "[", "]", "{", "}", ",", ":", "=", "->", "//", "+", "-", "*", "/", "#", '"', "\n", ";", "\\",
         "@", "$", "'", "`", "\t", "\r", "\x00", "\x0c", "\ufeff", "...", "->->", "==")


def tokens(text: str) -> list[str]:
    return [m.group(0) for m in TOKEN.finditer(text)]


def kind_of(tok: str) -> str:
    m = TOKEN.fullmatch(tok)
    return m.lastgroup if m else "other"


MILD_NUMBERS = ("1", "2", "3", "4", "5", "8", "16", "0.5", "2.0", "1e-3")
MILD_SYMBOLS = ("same", "valid", "full", "true", "false", "relu", "tanh", "sigmoid", "he", "xavier", "zeros")


def mutate_mild(text: str, rng: random.Random) -> str:
    """A change that often keeps the file valid, so that the deeper passes see it."""
    toks = tokens(text)
    numbers = [k for k, t in enumerate(toks) if kind_of(t) == "number"]
    names = [k for k, t in enumerate(toks) if kind_of(t) == "name" and t in MILD_SYMBOLS + OP_NAMES]
    r = rng.random()
    if numbers and (r < 0.6 or not names):
        toks[rng.choice(numbers)] = rng.choice(MILD_NUMBERS)
    elif names:
        k = rng.choice(names)
        toks[k] = rng.choice(MILD_SYMBOLS if toks[k] in MILD_SYMBOLS else ("relu", "tanh", "sigmoid", "softmax",
                                                                           "batchnorm", "globalavgpool", "flatten"))
    return "".join(toks)


def mutate(text: str, rng: random.Random, others: list[str]) -> str:
    """One grammar-aware change of the text."""
    toks = tokens(text)
    solid = [i for i, t in enumerate(toks) if kind_of(t) not in ("ws", "nl")]
    r = rng.random()
    if not solid or r < 0.04:
        return "".join(chr(rng.randrange(256)) for _ in range(rng.randint(0, 200)))     # random bytes
    i = rng.choice(solid)
    if r < 0.16:
        n = rng.choice((1, 1, 1, 2, 3))
        del toks[i:i + n]                                                               # delete tokens
    elif r < 0.24:
        toks.insert(i, toks[i] if rng.random() < 0.8 else toks[i] * rng.randint(2, 50))  # duplicate
    elif r < 0.32:
        j = rng.choice(solid) if rng.random() < 0.5 else min(i + 2, len(toks) - 1)
        toks[i], toks[j] = toks[j], toks[i]                                             # swap
    elif r < 0.48:
        numbers = [k for k in solid if kind_of(toks[k]) == "number"] or [i]
        toks[rng.choice(numbers)] = rng.choice(EXTREME_NUMBERS)                         # extreme number
    elif r < 0.62:
        names = [k for k in solid if kind_of(toks[k]) == "name"] or [i]
        pool = rng.choice((KEYWORDS, OP_NAMES, ODD_NAMES))
        toks[rng.choice(names)] = rng.choice(pool)                                      # odd name
    elif r < 0.72:
        toks.insert(i + rng.randint(0, 1), rng.choice(PUNCT) * rng.choice((1, 1, 1, 2, 200)))  # brackets …
    elif r < 0.78:
        cut = rng.randrange(len(text) + 1)
        return text[:cut]                                                               # cut the file
    elif r < 0.88:
        lines = text.split("\n")
        donor = rng.choice(others).split("\n")
        line = rng.choice(donor)
        k = rng.randrange(len(lines) + 1)
        if rng.random() < 0.5 and k < len(lines):
            lines[k] = line
        else:
            lines.insert(k, line)
        return "\n".join(lines)                                                         # splice a line
    elif r < 0.92:
        pos = rng.randrange(len(text) + 1)
        junk = "".join(chr(rng.randrange(256)) for _ in range(rng.randint(1, 8)))
        return text[:pos] + junk + text[pos:]                                           # random bytes inside
    elif r < 0.95:
        lines = text.split("\n")
        k = rng.randrange(len(lines))
        lines[k:k + 1] = [lines[k]] * rng.choice((2, 10, 300))                          # repeat a line
        return "\n".join(lines)
    elif r < 0.98:
        # Wrap an expression in many parentheses, or make a deep nested list.
        depth = rng.choice((10, 127, 129, 200, 1000))
        if rng.random() < 0.5:
            toks.insert(i, "(" * depth + "1" + ")" * depth)
        else:
            toks.insert(i, "[" * depth + "1" + "]" * depth)
    else:
        toks.insert(i, rng.choice(('use "fuzz.cnn"\n', 'use "../examples/lenet5.cnn"\n', 'use "/dev/zero"\n',
                                   'use ""\n', 'use "/"\n', 'use "' + str(REPO / "examples" / "inception_se.cnn")
                                   + '"\n')))
    return "".join(toks)


def inputs(seed: int, count: int):
    """`count` fuzz inputs as (text, route), each one to three mutations of a corpus file; the same
    for the same seed. One in ten goes through a file (one in four of those as Latin-1 bytes)."""
    rng = random.Random(seed ^ 0x5EED)
    for text in texts(seed, count):
        r = rng.random()
        yield text, ("latin-1" if r < 0.025 else "file" if r < 0.1 else "text")


def texts(seed: int, count: int):
    named = corpus()
    files = [t for _, t in named]
    valid = [t for n, t in named if "/error_" not in n and "/syntax_" not in n]
    rng = random.Random(seed)
    for _ in range(count):
        if rng.random() < 0.3:
            text = rng.choice(valid)
            for _ in range(rng.choice((1, 2, 3))):
                text = mutate_mild(text, rng)
            yield text
            continue
        text = rng.choice(files)
        for _ in range(rng.choice((1, 1, 2, 3))):
            text = mutate(text, rng, files)
        yield text


# ---- the oracle ---------------------------------------------------------------------------

class Bug(Exception):
    """What the input did that it must not: `signature` groups the same bug, `detail` explains."""

    def __init__(self, signature: str, detail: str):
        self.signature = signature
        self.detail = detail
        super().__init__(f"{signature}: {detail}")


def expected_quote(text: str, line: int) -> str:
    """The source line as the error should quote it (lines end at \\n only, as the lexer counts)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.split("\n")
    return lines[line - 1].rstrip("\r") if 1 <= line <= len(lines) else ""


def check_error_text(message: str, path: str, text: str) -> None:
    """FILE:LINE:COL: error: …, then the source line, then a caret under COL."""
    lines = message.split("\n")
    m = re.match(r"^(.*?):(\d+):(\d+): error: \S", lines[0])
    if not m:
        head = lines[0].replace(str(Path(path).parent), "DIR")
        raise Bug("unlocated error: " + re.sub(r"[0-9]+", "N", head)[:70], message[:600])
    where, line, col = m.group(1), int(m.group(2)), int(m.group(3))
    if len(lines) < 3 or not lines[1].startswith("    ") or not re.fullmatch(r" *\^~*", lines[2]):
        raise Bug("error without a quoted line and a caret", message[:600])
    if where == path:
        quote = expected_quote(text, line).expandtabs(1)
        if lines[1][4:] != quote:
            raise Bug("error quotes another line", f"{message[:600]}\n--- line {line} is: {quote[:200]!r}")
        caret = lines[2].index("^") - 4 + 1
        if caret != col or col > len(quote) + 1:
            raise Bug("caret not under the column", message[:600])


def front_end(text: str, path: str, from_file: bool = False) -> list:
    """Everything `convdsl check` and the compile's front half do; returns the compiled networks.
    `from_file` reads the input back from `path` as `convdsl check FILE` does (bytes, then UTF-8)."""
    from convdsl.targets import C
    from convdsl.compiler import compile_graph, module_meta
    from convdsl.frontend.parser import parse, parse_file
    from convdsl.ir.build import build_graph, load_program
    from convdsl.passes.lints import lint
    from convdsl.passes.memory import plan_memory
    from convdsl.passes.stats import collect
    from convdsl.passes.verify import verify
    from convdsl.report import json_document, json_network, text_report
    program = load_program(parse_file(path) if from_file else parse(text, path))
    names = [n.name for n in program.networks]
    if not names:
        build_graph(program, None)               # the "no network" error
    done = []
    for name in names:
        graph = verify(build_graph(program, name))
        C.check_supported(graph)
        warnings = lint(graph)
        for w in warnings:
            check_warning_text(w.render(), path, text)
        stats, memory = collect(graph), plan_memory(graph)
        text_report(graph, stats, memory)
        json.dumps(json_document([json_network(graph, stats, memory, warnings, "warning")]))
        compiled = compile_graph(graph)
        module_meta(graph)
        done.append(compiled)
    return done


def check_warning_text(message: str, path: str, text: str) -> None:
    if not re.match(r"^(.*?):(\d+):(\d+): warning: \S", message):
        raise Bug("unlocated warning", message[:600])


def compile_c(compiled, workdir: Path) -> None:
    """The generated C passes gcc -std=c11 -Wall -Wextra -Werror -O2 (with OpenMP)."""
    src = compiled.source
    (workdir / f"{src.prefix}.h").write_text(src.h)
    c_file = workdir / f"{src.prefix}.c"
    c_file.write_text(src.c)
    proc = subprocess.run(["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", "-fopenmp", "-c", str(c_file),
                           "-o", str(workdir / "net.o")], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        first = next((ln for ln in proc.stderr.splitlines() if "error" in ln or "warning" in ln), proc.stderr[:200])
        raise Bug("gcc rejects the generated C: " + re.sub(r".*?: (error|warning): ", "", first)[:80],
                  proc.stderr[:2000])


def as_bytes(text: str, route: str) -> bytes:
    """The file's bytes: UTF-8, or for the "latin-1" route one byte per character where that is possible."""
    if route == "latin-1" and all(ord(c) < 256 for c in text):
        return text.encode("latin-1")
    return text.encode("utf-8", "surrogatepass")


def attempt(text: str, path: str, from_file: bool) -> tuple[str, object]:
    """(what happened, what it gave): ("ok", the compiled networks), or the error's first line
    (or the exception's type) and the exception — for comparing two routes, and for judging one."""
    from convdsl.errors import ConvDSLError
    try:
        return "ok", front_end(text, path, from_file)
    except ConvDSLError as e:
        return str(e).split("\n")[0], e
    except Exception as e:
        return type(e).__name__, e


def judge(text: str, workdir: Path, compile_sample: bool = False, route: str = "text") -> str:
    """'error' or 'ok' (or 'compiled'); raises Bug for anything else. `route` "text" passes the
    string to the parser; "file" and "latin-1" write it to a file (as UTF-8 or Latin-1 bytes)
    and read it back as `convdsl check FILE` does."""
    from convdsl.errors import ConvDSLError
    path = str(workdir / INPUT_NAME)
    data = as_bytes(text, route)
    Path(path).write_bytes(data)                      # also for `use "fuzz.cnn"`
    if route != "text":
        text = data.decode("utf-8", "replace")
    if route == "file":
        # The same characters must mean the same whether a file or a string is compiled; the
        # file's run is then the one judged (a third run would triple the time a big input takes).
        by_file, by_text = attempt(text, path, True), attempt(text, path, False)
        if by_file[0] != by_text[0]:
            raise Bug("a file and the same text as a string differ",
                      f"file: {by_file[0][:300]}\nstring: {by_text[0][:300]}")
        _, result = by_file
    else:
        _, result = attempt(text, path, from_file=route != "text")
    if isinstance(result, ConvDSLError):
        check_error_text(str(result), path, text)
        return "error"
    if isinstance(result, RecursionError):
        # One signature whatever the frames (they differ with the depth it was hit at); the
        # innermost frames of convdsl in the detail, to find where it recursed.
        frames = [f for f in traceback.extract_tb(result.__traceback__) if "/convdsl/" in f.filename][-6:]
        raise Bug("traceback: RecursionError", "maximum recursion depth exceeded\n" + "".join(traceback.format_list(frames)))
    if isinstance(result, Exception):
        frames = traceback.extract_tb(result.__traceback__)
        inner = next((f for f in reversed(frames) if "/convdsl/" in f.filename), frames[-1] if frames else None)
        where = f"{Path(inner.filename).name}:{inner.name}" if inner else "?"
        raise Bug(f"traceback: {type(result).__name__} in {where}",
                  "".join(traceback.format_exception(result, limit=-6))[-2500:])
    done = result
    if compile_sample and done:
        for compiled in done:
            compile_c(compiled, workdir)
        return "compiled"
    return "ok"


# ---- worker and driver --------------------------------------------------------------------

WARM_UP = """network WarmUp {
    input x: [2, 8, 8]
    y = x -> conv(4, kernel=3, pad=same) -> batchnorm -> relu -> maxpool(2) -> flatten -> dense(3)
    output y
    loss mse(y)
}
"""


def worker_main(workdir: Path) -> None:
    import resource
    # A runaway input must not take the (shared) machine's memory: 4 GiB, then MemoryError.
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    # Start-up, inside the first request's allowance (Worker.ask): one network through every stage
    # compiles the conv and dense templates and the kernel headers they include, so that the
    # per-input limit measures the input's own work, not Jinja compiling templates the first time.
    attempt(WARM_UP, str(workdir / "warm-up.cnn"), False)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"status": judge(request["text"], workdir, request.get("compile", False),
                                     request.get("route", "text"))}
        except Bug as b:
            reply = {"status": "bug", "signature": b.signature, "detail": b.detail}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class Worker:
    """The fuzz worker; restarted after a hang (timeout) or a crash."""

    def __init__(self):
        self.proc = None
        self.workdir = None

    def start(self) -> None:
        # The folder the inputs are written to belongs to this side: a killed worker cannot clean up.
        self.workdir = tempfile.mkdtemp(prefix="convdsl-fuzz-")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(REPO)]))
        self.proc = subprocess.Popen([sys.executable, "-u", str(Path(__file__)), "--worker", self.workdir],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env=env)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def ask(self, text: str, limit: float, compile_sample: bool = False, route: str = "text") -> dict:
        if self.proc is None:
            self.start()
            # The first request also pays the worker's start-up (imports, the grammar).
            limit = limit + 30
        self.proc.stdin.write(json.dumps({"text": text, "compile": compile_sample, "route": route}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], limit)
        if not ready:
            self.stop()
            return {"status": "bug", "signature": "hang", "detail": f"no answer within {limit:.0f} s"}
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.stop()
            return {"status": "bug", "signature": f"crash (exit status {code})", "detail": "the worker died"}
        return json.loads(line)


def needs_compile(signature: str) -> bool:
    return signature.startswith("gcc")


def minimise(text: str, signature: str, worker: Worker, limit: float, max_tries: int = 2000,
             route: str = "text") -> str:
    """Drop lines, then tokens, then characters, while the input keeps its bug signature."""
    tries = 0
    cc = needs_compile(signature)

    def same(candidate: str) -> bool:
        nonlocal tries
        tries += 1
        r = worker.ask(candidate, 300 if cc else limit, compile_sample=cc, route=route)
        return r["status"] == "bug" and r["signature"] == signature

    for split, joiner in ((lambda t: t.split("\n"), "\n"), (tokens, ""), (list, "")):
        parts = split(text)
        chunk = max(1, len(parts) // 2)
        while chunk >= 1 and tries < max_tries:
            i, changed = 0, False
            while i < len(parts) and tries < max_tries:
                cand = parts[:i] + parts[i + chunk:]
                if cand != parts and same(joiner.join(cand)):
                    parts, changed = cand, True
                else:
                    i += chunk
            if not changed:
                chunk //= 2
        text = joiner.join(parts)
    return text


def safe_name(signature: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", signature).strip("-").lower()[:60]


def run_campaign(seed: int, count: int, *, limit: float = 2.0, compile_every: int = 0, compile_cap: int = 0,
                 minutes: float | None = None, shrink: bool = True, out: Path = FUZZ_REGRESSIONS,
                 report=print, write: bool = True) -> dict:
    """Runs `count` inputs; returns {"counts": Counter, "bugs": {signature: (input, minimised, detail)}}."""
    worker = Worker()
    counts: Counter = Counter()
    bugs: dict = {}
    compiled = checked = 0
    started = time.time()
    try:
        for n, (text, route) in enumerate(inputs(seed, count)):
            if minutes is not None and time.time() - started > minutes * 60:
                break
            sample = bool(compile_every) and compiled < compile_cap
            reply = worker.ask(text, limit, route=route)
            if reply["status"] == "ok":
                checked += 1
                if sample and checked % compile_every == 0:
                    compiled += 1
                    reply = worker.ask(text, 300, compile_sample=True)
            counts[reply["status"]] += 1
            if reply["status"] == "bug":
                sig = reply["signature"]
                counts["bug: " + sig] += 1
                if sig not in bugs:
                    report(f"input {n}: {sig}")
                    bugs[sig] = [text, text, reply["detail"], route]
        counts["seconds"] = round(time.time() - started)
        for sig, entry in bugs.items():
            if shrink:
                # A hang costs the time limit and a gcc check a compile: fewer tries for those.
                tries = 60 if sig == "hang" else 80 if needs_compile(sig) else 2000
                entry[1] = minimise(entry[0], sig, worker, limit, max_tries=tries, route=entry[3])
            if write:
                out.mkdir(parents=True, exist_ok=True)
                path = out / f"{safe_name(sig)}.cnn"
                path.write_bytes(as_bytes(entry[1], entry[3]))
                report(f"  → {path} ({len(entry[1])} characters)")
    finally:
        worker.stop()
    return {"counts": counts, "bugs": bugs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=None)
    ap.add_argument("--limit", type=float, default=2.0, help="seconds one input may take (default 2)")
    ap.add_argument("--compile-every", type=int, default=50, help="compile the C of every n-th input that checks")
    ap.add_argument("--compile-cap", type=int, default=40, help="at most this many C compiles")
    ap.add_argument("--no-shrink", action="store_true")
    ap.add_argument("--out", type=Path, default=FUZZ_REGRESSIONS)
    ap.add_argument("--worker", metavar="DIR", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(Path(args.worker))
        return 0
    result = run_campaign(args.seed, args.count, limit=args.limit, compile_every=args.compile_every,
                          compile_cap=args.compile_cap, minutes=args.minutes, shrink=not args.no_shrink, out=args.out)
    counts = result["counts"]
    print("\n" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: str(kv[0]))))
    for sig, (_, small, detail, _route) in result["bugs"].items():
        print(f"\n== {sig}\n-- minimised input: {small!r}\n-- {detail[:1500]}")
    return 1 if result["bugs"] else 0


if __name__ == "__main__":
    sys.exit(main())
