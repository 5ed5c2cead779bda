"""Make a failing campaign case small: try one edit at a time (drop a statement, skip an op,
drop an argument, simplify a value, fix the run-time sizes …) and keep every edit after which
the case is still valid and still fails the same way."""
from __future__ import annotations

from dataclasses import replace

from netgen import check_case
from netlang import (Apply, Assign, BlockDef, Case, ConstDecl, Dec, Input, Invalid, LayerDecl, Loss, Output, Ref,
                     Repeat, Return, Sym, render)

STATEMENTS = (Assign, LayerDecl, ConstDecl, Repeat, Output, Loss, BlockDef)


def refs_in(e) -> list[str]:
    if isinstance(e, Ref):
        return [e.name]
    if isinstance(e, Apply):
        return [n for i in e.inputs for n in refs_in(i)]
    return []


def value_edits(v):
    """Simpler argument values: (2, 3) → 2, same/full → valid, 4 → 1, 0.25 → 1."""
    if isinstance(v, tuple):
        if v and len(set(v)) > 1 and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            yield v[0]
        for i, x in enumerate(v):
            for new in value_edits(x):
                yield v[:i] + (new,) + v[i + 1:]
    elif isinstance(v, Sym) and v.name in ("same", "full"):
        yield Sym("valid")
    elif isinstance(v, int) and not isinstance(v, bool) and v > 1:
        yield 1
    elif isinstance(v, Dec) and v.text not in ("0", "1"):
        yield Dec("1")


def expr_edits(e):
    if not isinstance(e, Apply):
        return
    yield from e.inputs                                     # skip the op
    if len(e.inputs) > 2:
        for k in range(len(e.inputs)):
            yield replace(e, inputs=e.inputs[:k] + e.inputs[k + 1:])
    for k in range(len(e.kwargs)):
        yield replace(e, kwargs=e.kwargs[:k] + e.kwargs[k + 1:])
    if e.args:
        yield replace(e, args=e.args[:-1])
    for i, x in enumerate(e.inputs):
        for new in expr_edits(x):
            yield replace(e, inputs=e.inputs[:i] + (new,) + e.inputs[i + 1:])
    for i, a in enumerate(e.args):
        for new in value_edits(a):
            yield replace(e, args=e.args[:i] + (new,) + e.args[i + 1:])
    for i, (k, a) in enumerate(e.kwargs):
        for new in value_edits(a):
            yield replace(e, kwargs=e.kwargs[:i] + ((k, new),) + e.kwargs[i + 1:])


def stmt_edits(s):
    if isinstance(s, Assign):
        for n in dict.fromkeys(refs_in(s.expr)):
            if not (isinstance(s.expr, Ref) and s.expr.name == n):
                yield Assign(s.name, Ref(n))
        for new in expr_edits(s.expr):
            yield Assign(s.name, new)
    elif isinstance(s, Return):
        for new in expr_edits(s.expr):
            yield Return(new)
    elif isinstance(s, LayerDecl):
        for new in expr_edits(s.call):
            if isinstance(new, Apply):
                yield LayerDecl(s.name, new)
    elif isinstance(s, Repeat):
        if s.count > 1:
            yield replace(s, count=1)
        for new in body_edits(s.body):
            yield replace(s, body=new)
    elif isinstance(s, Output) and len(s.names) > 1:
        for k in range(len(s.names)):
            yield replace(s, names=s.names[:k] + s.names[k + 1:])
    elif isinstance(s, BlockDef):
        for new in body_edits(s.body):
            yield replace(s, body=new)


def rename(node, old: str, new: str):
    """The node with every read of the value `old` reading `new` instead."""
    if isinstance(node, Ref):
        return Ref(new) if node.name == old else node
    if isinstance(node, Apply):
        return replace(node, inputs=tuple(rename(i, old, new) for i in node.inputs))
    if isinstance(node, Assign):
        return Assign(node.name, rename(node.expr, old, new))
    if isinstance(node, Return):
        return Return(rename(node.expr, old, new))
    if isinstance(node, Repeat):
        return replace(node, body=tuple(rename(x, old, new) for x in node.body))
    if isinstance(node, Output):
        return Output(tuple(new if n == old else n for n in node.names))
    if isinstance(node, Loss):
        return Loss(node.kind, new if node.name == old else node.name, node.kwargs)
    return node


def inline_aliases(body: tuple):
    """`b = a` dropped, later reads of b reading a (when neither is bound again)."""
    for i, s in enumerate(body):
        if isinstance(s, Assign) and isinstance(s.expr, Ref):
            later = body[i + 1:]
            rebound = any(isinstance(x, (Assign, Repeat)) and (getattr(x, "name", None) in (s.name, s.expr.name)
                          or isinstance(x, Repeat)) for x in later)
            if not rebound:
                yield body[:i] + tuple(rename(x, s.name, s.expr.name) for x in later)


def body_edits(body: tuple):
    """Drop a statement (a repeat may also be unrolled once), then edit one statement."""
    for i, s in enumerate(body):
        if isinstance(s, STATEMENTS) and not isinstance(s, Output):
            yield body[:i] + body[i + 1:]
        if isinstance(s, Repeat):
            yield body[:i] + s.body + body[i + 1:]
    for i, s in enumerate(body):
        for new in stmt_edits(s):
            yield body[:i] + (new,) + body[i + 1:]


def static_sizes(case: Case) -> Case | None:
    """The run-time sizes replaced by the first run's sizes."""
    if not case.sizes[0]:
        return None
    sizes = dict(case.sizes[0])
    body = tuple(Input(s.name, tuple(sizes.get(d, d) if isinstance(d, str) else d for d in s.dims))
                 if isinstance(s, Input) else s for s in case.program.body)
    return replace(case, program=replace(case.program, body=body), sizes=((), ()), probes=())


def candidates(case: Case):
    """Smaller cases, roughly the most shrinking first."""
    p = case.program
    body = p.body
    losses = [s for s in body if isinstance(s, Loss)]
    if losses:
        yield replace(case, program=replace(p, body=tuple(s for s in body if not isinstance(s, Loss))))
        if any(s.kwargs for s in losses):      # the loss with its defaults
            yield replace(case, program=replace(p, body=tuple(replace(s, kwargs=()) if isinstance(s, Loss) else s
                                                              for s in body)))
    for k in range(len(p.blocks)):
        yield replace(case, program=replace(p, blocks=p.blocks[:k] + p.blocks[k + 1:]))
    for new in inline_aliases(body):
        yield replace(case, program=replace(p, body=new))
    for new in body_edits(body):
        yield replace(case, program=replace(p, body=new))
    for new in body_edits(p.blocks):
        yield replace(case, program=replace(p, blocks=new))
    s = static_sizes(case)
    if s is not None:
        yield s
    if p.layout != "NCHW":
        yield replace(case, program=replace(p, layout="NCHW", body=tuple(_nchw_input(x) for x in body)))
    if p.dtype != "f64":
        yield replace(case, program=replace(p, dtype="f64"))
    if p.write_layout or p.write_dtype:
        yield replace(case, program=replace(p, write_layout=False, write_dtype=False))
    if case.training:
        yield replace(case, training=False)
    if case.batches != (1, 2):
        yield replace(case, batches=(1, 2))


def _nchw_input(s):
    if isinstance(s, Input) and len(s.dims) > 1:
        return Input(s.name, (s.dims[-1], *s.dims[:-1]))
    return s


def shrink(case: Case, still_fails, max_tries: int = 300, log=None) -> Case:
    """Greedy: take the first candidate that is valid and still fails, and start again from it.
    `still_fails(case)` says whether a case fails in the same way (it compiles it)."""
    seen = {render(case.program) + repr((case.sizes, case.training, case.batches))}
    tries = 0
    improved = True
    while improved and tries < max_tries:
        improved = False
        for cand in candidates(case):
            key = render(cand.program) + repr((cand.sizes, cand.training, cand.batches))
            if key in seen:
                continue
            seen.add(key)
            try:
                check_case(cand)
            except Invalid:
                continue
            except Exception:
                continue
            tries += 1
            if still_fails(cand):
                case = cand
                improved = True
                if log:
                    log(f"  shrunk to {len(render(case.program))} characters")
                break
            if tries >= max_tries:
                break
    return case
