"""Random networks over every op and option of the language, valid by construction.

A Generator draws choices from one seed and writes them as a netlang Program; every choice is
tried on the reference interpreter in abstract mode (random parameters, the run sizes and, for
run-time sizes, two more probe sizes) and kept only if the language accepts it there. The same
Program gives the .cnn text (netlang.render) and the PyTorch reference (netlang.Interp).
"""
from __future__ import annotations

import random

import torch

from netlang import (OPS, Apply, Arith, Assign, BlockDef, Case, ConstDecl, ConstName, Dec, InitFn, Input, Interp,
                     Invalid, LayerDecl, LayerVal, Loss, Measure, NumList, Output, ParamRef, Program, Ref, Repeat,
                     Return, Scope, ShapeList, Sym, V)

# How often each op is drawn for a chain step (maps / vectors are filtered by applicability).
OP_WEIGHTS = {
    "conv": 10, "depthwise": 3, "separable": 3, "local": 2, "tiled": 2, "deconv": 3, "maxpool": 3,
    "avgpool": 3, "l2pool": 2, "globalavgpool": 1, "globalmaxpool": 1, "maxout": 2, "shuffle": 2,
    "upsample": 2, "flatten": 1, "dense": 3, "relu": 4, "sigmoid": 2, "tanh": 2, "leaky_relu": 2,
    "softmax": 2, "batchnorm": 3, "dropout": 2,
    "relu6": 1, "clip": 1, "hardsigmoid": 1, "hardswish": 1, "silu": 1, "gelu": 1, "elu": 1, "prelu": 1,
    "layernorm": 1, "groupnorm": 1, "instancenorm": 2, "pad": 1, "reshape": 3,
}
MAP_ONLY = {"conv", "depthwise", "separable", "local", "tiled", "deconv", "maxpool", "avgpool", "l2pool",
            "globalavgpool", "globalmaxpool", "upsample", "pad", "instancenorm"}
DECIMALS = ("0.5", "-1", "0.25", "1.5", "-0.75", "2", "0", "1", "-0.5", "0.125", "1e-1", "-2.5", ".5", "3")


def make_inputs(program: Program, sizes: dict, batch: int, gen: torch.Generator, dtype=torch.float64) -> dict:
    """Random channel-first inputs [N, C, *S] for every `input` of the network."""
    out = {}
    for s in program.body:
        if isinstance(s, Input):
            dims = [d if isinstance(d, int) else sizes[d] for d in s.dims]
            if program.layout == "NHWC" and len(dims) > 1:
                dims = [dims[-1], *dims[:-1]]
            out[s.name] = torch.randn((batch, *dims), generator=gen, dtype=dtype)
    return out


def abstract_interp(program: Program, size_list, training: bool, batch: int = 2, seed: int = 0) -> Interp:
    gen = torch.Generator().manual_seed(seed)
    variants = [make_inputs(program, dict(sizes), batch, gen) for sizes in size_list]

    def param(name, spec):
        return torch.randn(spec.shape, generator=gen, dtype=torch.float64) * 0.5

    def buffer(name, shape, fill):
        return torch.full(shape, fill, dtype=torch.float64)

    return Interp(program, variants, training=training, param_source=param, buffer_source=buffer, abstract=True)


def check_case(case: Case) -> Interp:
    """Run the whole case in abstract mode at every size; raises Invalid if the language refuses it."""
    return abstract_interp(case.program, (*case.sizes, *case.probes), case.training).run()


class Generator:
    """One random network. `budget` bounds the layers after unrolling (compile time grows with it)."""

    def __init__(self, seed: int, budget: int = 14):
        self.seed = seed
        self.rng = rng = random.Random(seed)
        self.budget = budget
        self.dtype = "f64" if rng.random() < 0.3 else "f32"
        self.layout = rng.choice(("NCHW", "NHWC"))
        self.rank = rng.choices((0, 1, 2, 3), weights=(1, 4, 8, 3))[0]
        self.symbolic = self.rank > 0 and rng.random() < 0.35
        self.training = rng.random() < 0.75
        self.big = rng.random() < 0.15
        self.wide = (4, 16) if self.big else (1, 6)          # channels an op makes
        self.blocks: list[BlockDef] = []
        self.body: list = []
        self.names = 0
        self.used: dict[int, V] = {}             # id → value read by some statement (kept alive)
        self.order: list[str] = []               # value names, oldest first
        self.first_values: dict = {}             # a new block's lifted parameters → their first values
        self._make_inputs()
        self.state = abstract_interp(self.program(), self.size_list, self.training, seed=seed)
        for s in self.body:
            self.state.exec(s, self.state.scope)

    # ---- the frame: inputs and sizes
    def _make_inputs(self) -> None:
        rng, rank = self.rng, self.rank
        lo, hi, grow = {0: (0, 0, 0), 1: (5, 12, 4), 2: (4, 8, 3), 3: (3, 5, 2)}[rank]
        if self.big:
            # Larger maps and channel counts reach the kernels' blocked paths and their edges.
            lo, hi, grow = {0: (0, 0, 0), 1: (16, 40, 9), 2: (9, 17, 5), 3: (5, 8, 3)}[rank]
        base = [rng.randint(lo, hi) for _ in range(rank)]
        names = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}.get(rank, ())
        if self.symbolic and rng.random() < 0.3:
            names = tuple(rng.choice((n + "x", n.lower() + "_in", "size_" + n)) for n in names)
        named = [self.symbolic and (rng.random() < 0.8 or i == 0) for i in range(rank)]
        dims_spatial = [names[i] if named[i] else base[i] for i in range(rank)]
        run_a = {names[i]: base[i] for i in range(rank) if named[i]}
        run_b = {n: v + rng.randint(1, grow) for n, v in run_a.items()}
        probes = [{n: v + 4 + extra for n, v in run_a.items()} for extra in (0, 3)] if run_a else []
        self.sizes = (tuple(run_a.items()), tuple(run_b.items()))
        self.probes = tuple(tuple(p.items()) for p in probes)
        self.size_list = [dict(s) for s in (*self.sizes, *self.probes)]
        count = 2 if rng.random() < 0.15 else 1
        for i in range(count):
            c = (rng.randint(3, 12) if self.big else rng.randint(1, 4)) if rank else rng.randint(2, 10 + 30 * self.big)
            dims = (c, *dims_spatial) if self.layout == "NCHW" or rank == 0 else (*dims_spatial, c)
            name = ("x", "img", "aux", "inp_2")[i if i else rng.randrange(2)] if count == 2 else rng.choice(
                ("x", "x", "image", "inp"))
            if i == 1 and name == self.body[0].name:
                name = "aux"
            self.body.append(Input(name, dims))
            self.order.append(name)

    def draw_loss(self, target_name: str, u: float) -> Loss:
        """A loss of the output `target_name` and its arguments. `u` is the draw the choice of loss
        always took from the main stream; the rest come from a stream of their own, so that the
        choices after the loss (batches, learning rate) are those they were before there were
        more losses to choose from."""
        v = self.state.scope.bindings[target_name]
        own = random.Random(f"loss {self.seed}")
        classes = v.channels >= 2
        if classes and u < 0.4:
            kind = "softmax_cross_entropy"
        else:
            kind = own.choice(("mse", "l1", "smooth_l1", "sigmoid_cross_entropy", "dice"))
        kwargs = []
        if kind == "softmax_cross_entropy":
            written = own.choice(((), ("weight",), ("ignore_index",), ("weight", "ignore_index")))
            if "weight" in written and not v.flags[0]:
                kwargs.append(("weight", NumList(tuple(Dec(own.choice(("0.5", "1", "1.5", "2", "0.25", "3")))
                                                       for _ in range(v.channels)))))
            if "ignore_index" in written:
                kwargs.append(("ignore_index", own.choice((255, -100, 0))))
        elif kind == "dice":
            if not classes or own.random() < 0.4:
                kwargs.append(("activation", Sym("sigmoid")))
            if own.random() < 0.5:
                kwargs.append(("eps", Dec(own.choice(("0.5", "1e-3", "2")))))
        elif kind == "smooth_l1" and own.random() < 0.7:
            kwargs.append(("beta", Dec(own.choice(("0.5", "2", "0", "1e-1")))))
        return Loss(kind, target_name, tuple(kwargs))

    def program(self, body=None) -> Program:
        return Program(f"Rnd{self.seed}", self.layout, self.dtype, tuple(self.blocks),
                       tuple(self.body if body is None else body), write_layout=self.rng_flag(0.5),
                       write_dtype=self.rng_flag(0.5))

    def rng_flag(self, p: float) -> bool:
        # Written with a fixed answer per seed so that program() is stable between calls.
        return random.Random(self.seed * 7 + int(p * 100)).random() < p

    # ---- trying things
    def try_stmts(self, stmts, state=None, scope=None):
        """A fork of the state with these statements run, or None if the language refuses them."""
        st = (state or self.state).fork()
        sc = st.scope if scope is None else scope
        try:
            for s in stmts:
                st.exec(s, sc)
        except Invalid:
            return None
        if st.nodes > self.budget:
            return None
        return st

    def value_of(self, st: Interp, expr, scope=None):
        try:
            return st.fork().eval(expr, scope if scope is not None else st.scope.copy())
        except Invalid:
            return None

    def new_name(self, prefix: str = "v") -> str:
        self.names += 1
        styles = (f"{prefix}{self.names}", f"{prefix}_{self.names}", f"t{self.names}", f"feat{self.names}",
                  f"h{self.names}", f"Z{self.names}")
        return self.rng.choice(styles)

    # ---- values
    def dec(self, choices) -> Dec:
        return Dec(self.rng.choice(choices))

    def ints(self, rank: int, lo: int, hi: int, tuple_p: float = 0.25):
        if rank and self.rng.random() < tuple_p:
            return tuple(self.rng.randint(lo, hi) for _ in range(rank))
        return self.rng.randint(lo, hi)

    def pad(self, rank: int, kernel, dilation=1, keep: bool = False):
        rng = self.rng
        ks = kernel if isinstance(kernel, tuple) else (kernel,) * rank
        rs = dilation if isinstance(dilation, tuple) else (dilation,) * rank
        keff = [r * (k - 1) + 1 for k, r in zip(ks, rs)]
        if keep:
            form = rng.random()
            if form < 0.6:
                return Sym("same")
            if form < 0.8 and all(k % 2 for k in keff):
                if len(set(keff)) == 1 and rng.random() < 0.5:
                    return (keff[0] - 1) // 2
                return tuple((k - 1) // 2 for k in keff)
            pairs = []
            for k in keff:
                b = rng.randint(0, k - 1)
                pairs.append((b, k - 1 - b))
            return tuple(pairs)
        form = rng.random()
        if form < 0.25:
            return Sym("valid")
        if form < 0.45:
            return Sym("same")
        if form < 0.55:
            return Sym("full")
        if form < 0.7:
            return rng.randint(0, 2)
        if form < 0.8:
            return tuple(rng.randint(0, 2) for _ in range(rank))
        entries = []
        for _ in range(rank):
            kind = rng.random()
            if kind < 0.2:
                entries.append(rng.randint(0, 2))
            elif kind < 0.5:
                entries.append((0, rng.randint(1, 2)))           # end-only
            else:
                entries.append((rng.randint(0, 2), rng.randint(0, 2)))
        return tuple(entries)

    def init(self):
        r = self.rng.random()
        if r < 0.65:
            return None
        return self.rng.choice((Sym("he"), Sym("xavier"), InitFn("normal", Dec("0.02")),
                                InitFn("uniform", Dec("0.5")), Sym("zeros"), Sym("ones"), InitFn("normal", Dec("1"))))

    def flags(self, values: dict, *names: str, p: float = 0.2) -> None:
        for n in names:
            if self.rng.random() < p:
                values[n] = {"bias": False, "flip": True, "frozen": True}[n]

    # ---- op arguments: a dict of the values to write (defaults may be written too)
    def op_values(self, op: str, v: V, keep: bool, scope_names=()):
        """(values, statements to put before) for op applied to v; keep asks for the same shape."""
        rng = self.rng
        c, rank = v.channels, v.rank
        pre = []
        vals: dict = {}
        if op in ("conv", "depthwise", "separable", "local", "tiled", "deconv"):
            kernel = self.ints(rank, 1, 3)
            vals["kernel"] = kernel
            if op in ("conv", "depthwise", "separable", "deconv") and rng.random() < 0.25:
                vals["dilation"] = self.ints(rank, 1, 3)
            if not keep and rng.random() < 0.4:
                vals["stride"] = self.ints(rank, 1, 3 if op != "deconv" else 2)
            elif rng.random() < 0.1:
                vals["stride"] = 1
            if op == "deconv":
                dil = vals.get("dilation", 1)
                ks = kernel if isinstance(kernel, tuple) else (kernel,) * rank
                rs = dil if isinstance(dil, tuple) else (dil,) * rank
                if keep:
                    vals.pop("stride", None)
                    if all((r * (k - 1)) % 2 == 0 for k, r in zip(ks, rs)):
                        vals["pad"] = tuple(r * (k - 1) // 2 for k, r in zip(ks, rs))
                    else:
                        vals["kernel"], vals["pad"] = 3, 1
                        vals.pop("dilation", None)
                else:
                    if rng.random() < 0.5:
                        vals["pad"] = self.ints(rank, 0, 1)
                    st = vals.get("stride", 1)
                    ss = st if isinstance(st, tuple) else (st,) * rank
                    if rng.random() < 0.4:
                        vals["output_pad"] = tuple(rng.randint(0, max(s, r) - 1) for s, r in zip(ss, rs))
                if rng.random() < 0.25:
                    g = rng.choice([d for d in range(1, c + 1) if c % d == 0])
                    vals["groups"] = g
                vals["out"] = c if keep else vals.get("groups", 1) * rng.randint(1, 3 + 3 * self.big)
            else:
                if op != "local" or rng.random() < 0.5:
                    vals["pad"] = self.pad(rank, kernel, vals.get("dilation", 1), keep=keep)
                elif keep:
                    vals["pad"] = Sym("same")
            if op == "conv":
                groups = 1
                if rng.random() < 0.25:
                    groups = rng.choice([d for d in range(1, c + 1) if c % d == 0])
                    vals["groups"] = groups
                vals["out"] = c if keep else groups * rng.randint(1, max(1, self.wide[1] // groups))
            if op == "depthwise" and not keep and rng.random() < 0.35:
                vals["multiplier"] = rng.randint(1, 2)
            if op in ("separable", "local", "tiled"):
                vals["out"] = c if keep else rng.randint(*self.wide)
            if op == "tiled":
                vals["tile"] = self.ints(rank, 1, 3)
            self.flags(vals, "bias", "frozen")
            if op in ("conv", "depthwise", "separable") and rng.random() < 0.15:
                vals["pad_mode"] = Sym(rng.choice(("reflect", "replicate", "reflect", "zeros")))
            if op in ("conv", "depthwise"):
                self.flags(vals, "flip", p=0.15)
                if rng.random() < 0.15:
                    vals["algo"] = Sym(rng.choice(("im2col", "auto")))
            init = self.init()
            if init is not None:
                vals["init"] = init
            if op in ("conv", "depthwise") and rng.random() < 0.1:
                const = self.const_for(op, v, vals)
                if const is not None:
                    pre.append(const)
                    vals["weight"] = ConstName(const.name)
                    vals.pop("init", None)
                    if rng.random() < 0.6:
                        vals["frozen"] = True
        elif op in ("maxpool", "avgpool", "l2pool"):
            window = self.ints(rank, 1, 3)
            vals["window"] = window
            if keep:
                vals["stride"] = 1
                vals["pad"] = Sym("same") if rng.random() < 0.7 else self.pad(rank, window, keep=True)
            else:
                if rng.random() < 0.4:
                    vals["stride"] = self.ints(rank, 1, 3)
                if rng.random() < 0.5:
                    vals["pad"] = self.pad(rank, window)
        elif op == "maxout":
            vals["k"] = 1 if keep else rng.choice([d for d in range(1, c + 1) if c % d == 0])
        elif op == "shuffle":
            vals["groups"] = rng.choice([d for d in range(1, c + 1) if c % d == 0])
        elif op == "upsample":
            vals["factor"] = 1 if keep else self.ints(rank, 1, 2 if rank > 1 else 3)
            if rng.random() < 0.5:
                vals["mode"] = Sym({1: "linear", 2: "bilinear", 3: "trilinear"}[rank])
            elif rng.random() < 0.2:
                vals["mode"] = Sym("nearest")
        elif op == "dense":
            vals["out"] = c if keep else rng.randint(1, 8 + 16 * self.big)
            self.flags(vals, "bias", "frozen")
            init = self.init()
            if init is not None:
                vals["init"] = init
        elif op == "leaky_relu":
            if rng.random() < 0.7:
                vals["alpha"] = self.dec(("0.01", "0.2", "0", "1.5", "1e-2", "0.3"))
        elif op == "batchnorm":
            if rng.random() < 0.3:
                vals["eps"] = self.dec(("1e-3", "0.1", "1e-5", "2"))
            if rng.random() < 0.3:
                vals["momentum"] = self.dec(("0", "1", "0.5", "0.9", "0.1"))
        elif op == "dropout":
            vals["p"] = self.dec(("0", "0.25", "0.5", "0.1", "0.0"))
        elif op == "clip":
            vals["min"], vals["max"] = (Dec(t) for t in rng.choice((("-0.5", "0.5"), ("0", "6"), ("-1", "2"),
                                                                     ("-2.5", "0.25"), ("0.1", "3"))))
        elif op == "elu":
            if rng.random() < 0.6:
                vals["alpha"] = self.dec(("0.5", "1", "2", "0.1", "0"))
        elif op == "prelu":
            if rng.random() < 0.5:
                vals["init"] = self.dec(("0.25", "0.1", "0", "-0.5", "1.5"))
            if rng.random() < 0.3:
                vals["shared"] = True
        elif op in ("layernorm", "groupnorm", "instancenorm"):
            if op == "groupnorm":
                vals["groups"] = rng.choice([d for d in range(1, c + 1) if c % d == 0])
            if rng.random() < 0.3:
                vals["eps"] = self.dec(("1e-3", "0.1", "1e-5"))
        elif op == "pad":
            vals["pad"] = 0 if keep else rng.choice((rng.randint(0, 2), tuple(rng.randint(0, 2) for _ in range(rank)),
                                                     tuple((rng.randint(0, 2), rng.randint(0, 2)) for _ in range(rank))))
            if rng.random() < 0.8:
                vals["mode"] = Sym(rng.choice(("reflect", "replicate", "zeros")))
        elif op == "reshape":
            vals["shape"] = self.reshape_target(v, keep)
        return vals, pre

    def reshape_target(self, v: V, keep: bool) -> ShapeList:
        """A shape in the layout's order for v's values: the same one (keep), a flatten, or a
        vector or map re-viewed as a map of 1 to 3 spatial axes."""
        rng = self.rng
        shape = v.shape()
        written = shape if self.layout == "NCHW" or len(shape) == 1 else (*shape[1:], shape[0])
        count = 1
        for d in shape:
            count *= d
        if keep:
            return ShapeList(tuple(written))
        if rng.random() < 0.3:
            return ShapeList((rng.choice((-1, count)),))
        dims, rest = [], count
        for _ in range(rng.randint(2, 4)):
            d = rng.choice([k for k in range(1, min(rest, 6) + 1) if rest % k == 0])
            dims.append(d)
            rest //= d
        dims[rng.randrange(len(dims))] *= rest
        if rng.random() < 0.3:
            dims[rng.randrange(len(dims))] = -1
        return ShapeList(tuple(dims))

    def const_for(self, op: str, v: V, vals: dict):
        rank, c = v.rank, v.channels
        k = vals["kernel"]
        ks = k if isinstance(k, tuple) else (k,) * rank
        if op == "conv":
            shape = (vals["out"], c // vals.get("groups", 1), *ks)
        else:
            shape = (c * vals.get("multiplier", 1), 1, *ks)
        count = 1
        for d in shape:
            count *= d
        if count > 150:
            return None
        rng = self.rng

        def nest(dims):
            if not dims:
                text = rng.choice(DECIMALS)
                return int(text) if text.lstrip("-").isdigit() and rng.random() < 0.5 else Dec(text)
            return tuple(nest(dims[1:]) for _ in range(dims[0]))
        self.names += 1
        return ConstDecl(f"K{self.names}", nest(shape))

    def call(self, op: str, vals: dict, inputs: tuple, style: str | None = None) -> Apply:
        """The values as written: a prefix of the arguments positionally, the rest by keyword in any order."""
        rng = self.rng
        spec = OPS[op]
        order = [n for n, _ in spec.args]
        written = {n: vals[n] for n in order if n in vals}
        npos = 0
        while npos < len(order) and order[npos] in written and rng.random() < 0.6:
            npos += 1
        args = tuple(written[n] for n in order[:npos])
        rest = [n for n in order[npos:] if n in written]
        rng.shuffle(rest)
        kwargs = tuple((n, written[n]) for n in rest)
        style = style or ("pipe" if rng.random() < 0.8 else "call")
        bare = not args and not kwargs and rng.random() < 0.8
        return Apply("op", op, inputs, args, kwargs, style, bare)

    # ---- chains
    def applicable(self, v: V) -> list[str]:
        ops = []
        for op in OP_WEIGHTS:
            if op in MAP_ONLY and v.rank == 0:
                continue
            if op in ("local", "tiled") and v.rank not in (1, 2):
                continue
            if op in ("local", "dense", "flatten", "reshape") and not v.static:
                continue
            ops.append(op)
        return ops

    def step(self, st: Interp, cur, v: V, keep: bool, scope, extra_ops=()):
        """One more op, layer use or block call after `cur`; returns (expr, value, pre-statements)."""
        rng = self.rng
        layers = [n for n, b in scope.bindings.items() if isinstance(b, LayerVal)]
        for _ in range(12):
            r = rng.random()
            if layers and r < 0.15:
                name = rng.choice(layers)
                expr = Apply("layer", name, (cur,), style="pipe" if rng.random() < 0.8 else "call", bare=True)
                pre = []
            elif self.blocks and r < 0.25:
                block = rng.choice(self.blocks)
                expr = self.block_call(block, cur, st, scope)
                if expr is None:
                    continue
                pre = []
            else:
                ops = self.applicable(v)
                if keep:
                    ops = [o for o in ops if o not in ("globalavgpool", "globalmaxpool", "flatten", "dense")
                           or v.rank == 0 and o == "dense"]
                op = rng.choices(ops, weights=[OP_WEIGHTS[o] for o in ops])[0]
                vals, pre = self.op_values(op, v, keep)
                expr = self.call(op, vals, (cur,))
            tried = st.fork()
            sc = scope.copy()
            try:
                for s in pre:
                    tried.exec(s, sc)
                out = tried.eval(expr, sc)
            except Invalid:
                continue
            if not isinstance(out, V):
                continue
            if keep and (out.shapes() != v.shapes() or out.flags != v.flags):
                continue
            return expr, out, pre
        return None

    def chain(self, st: Interp, src: str, n: int, keep: bool, scope):
        """`src -> op -> op …` of up to n steps, tried in `st` under `scope`."""
        cur = Ref(src)
        v = scope.bindings[src]
        pre_all = []
        for _ in range(n):
            got = self.step(st, cur, v, keep, scope)
            if got is None:
                break
            cur, v, pre = got
            if pre:
                # Constants go before the statement; run them so that later steps see them.
                st = st.fork()
                scope = scope.copy()
                for s in pre:
                    st.exec(s, scope)
                pre_all += pre
        return cur, v, pre_all

    # ---- moves: each appends statements to a body
    def pick(self, scope=None, want_map: bool = False) -> str | None:
        scope = scope or self.state.scope
        names = [n for n in self.order if isinstance(scope.bindings.get(n), V)]
        if want_map:
            names = [n for n in names if scope.bindings[n].rank > 0]
        if not names:
            return None
        unused = [n for n in names if id(scope.bindings[n]) not in self.used]
        pool = unused if unused and self.rng.random() < 0.7 else names
        return pool[-1] if self.rng.random() < 0.5 else self.rng.choice(pool)

    def commit(self, stmts, st: Interp, refs=()) -> None:
        for n in refs:
            b = self.state.scope.bindings.get(n)
            if b is not None:
                self.used[id(b)] = b
        self.body.extend(stmts)
        self.state = st
        for s in stmts:
            if isinstance(s, Assign) and s.name not in self.order:
                self.order.append(s.name)

    def move_chain(self) -> bool:
        src = self.pick()
        expr, v, pre = self.chain(self.state, src, self.rng.randint(1, 4), False, self.state.scope)
        if isinstance(expr, Ref):
            return False
        stmts = [*pre, Assign(self.new_name(), expr)]
        st = self.try_stmts(stmts)
        if st is None:
            return False
        self.commit(stmts, st, refs=(src,))
        return True

    def move_join(self) -> bool:
        rng = self.rng
        src = self.pick()
        v = self.state.scope.bindings[src]
        kind = rng.choice(("add", "add", "concat", "sub", "mul"))
        branches, pre = [], []
        st = self.state
        for _ in range(2 if kind in ("sub", "mul") else rng.choice((2, 2, 3))):
            n = rng.choice((0, 1, 1, 2))
            if n == 0 and Ref(src) not in branches:
                branches.append(Ref(src))
                continue
            scope = st.scope.copy()
            if kind in ("add", "sub", "mul"):
                expr, bv, p = self.chain(st, src, max(n, 1), True, scope)
            else:
                expr, bv, p = self.chain_spatial(st, src, max(n, 1), scope)
            if isinstance(expr, Ref):
                continue
            branches.append(expr)
            pre += p
        others = [n for n in self.order if n != src and isinstance(self.state.scope.bindings.get(n), V)]
        for n in others:
            o = self.state.scope.bindings[n]
            same = o.shapes() == v.shapes() and o.flags == v.flags
            spatial = [s[1:] for s in o.shapes()] == [s[1:] for s in v.shapes()] and o.rank == v.rank
            if (same or kind == "concat" and spatial) and rng.random() < 0.5:
                branches.append(Ref(n))
                break
        if len(branches) < 2:
            return False
        rng.shuffle(branches)
        if kind in ("sub", "mul"):
            branches = branches[:2]             # exactly two tensors
        style = "pipe" if rng.random() < 0.5 else "call"
        expr = Apply("op", kind, tuple(branches), style=style)
        stmts = [*pre, Assign(self.new_name(), expr)]
        st = self.try_stmts(stmts)
        if st is None:
            return False
        self.commit(stmts, st, refs=[b.name for b in branches if isinstance(b, Ref)] + [src])
        return True

    def chain_spatial(self, st, src, n, scope):
        """A chain that keeps the spatial size (channels may change): for concat."""
        for _ in range(4):
            expr, v, pre = self.chain(st, src, n, False, scope)
            base = scope.bindings[src]
            if not isinstance(expr, Ref) and [s[1:] for s in v.shapes()] == [s[1:] for s in base.shapes()] \
                    and v.rank == base.rank:
                return expr, v, pre
        expr, v, pre = self.chain(st, src, n, True, scope)
        return expr, v, pre

    def move_scale(self) -> bool:
        rng = self.rng
        src = self.pick(want_map=True)
        if src is None:
            return False
        v = self.state.scope.bindings[src]
        c = v.channels
        pool = Apply("op", rng.choice(("globalavgpool", "globalmaxpool")), (Ref(src),), bare=True)
        form = rng.random()
        if form < 0.5:
            s = Apply("op", "dense", (pool,), (c,))
        elif form < 0.8:
            s = Apply("op", "conv", (pool,), (c,), (("kernel", 1),))
        else:
            s = Apply("op", "dense", (Apply("op", "flatten", (pool,), bare=True),), (c,))
        s = Apply("op", "sigmoid", (s,), bare=True)
        x = Ref(src)
        if rng.random() < 0.5:
            x, _, _ = self.chain(self.state, src, 1, True, self.state.scope.copy())
        expr = Apply("op", "scale", (x, s), style="call" if rng.random() < 0.7 else "pipe")
        stmts = [Assign(self.new_name("se"), expr)]
        st = self.try_stmts(stmts)
        if st is None:
            return False
        self.commit(stmts, st, refs=(src,))
        return True

    def move_layer(self) -> bool:
        """`layer NAME = op(…)` and a statement that applies it twice."""
        rng = self.rng
        src = self.pick()
        v = self.state.scope.bindings[src]
        ops = [o for o in self.applicable(v) if o not in ("globalavgpool", "globalmaxpool", "flatten")]
        ops += ["globalavgpool"] if v.rank else []
        op = rng.choices(ops, weights=[OP_WEIGHTS.get(o, 1) + (6 if o == "conv" else 0) for o in ops])[0]
        keep = op not in ("globalavgpool",)
        vals, pre = self.op_values(op, v, keep)
        call = self.call(op, vals, (), style="call")
        self.names += 1
        name = rng.choice((f"L{self.names}", f"Shared{self.names}", f"U{self.names}", f"layer_{self.names}"))
        decl = LayerDecl(name, call)
        use1 = Apply("layer", name, (Ref(src),), style="pipe", bare=True)
        if keep and rng.random() < 0.7:
            mid = use1
            if rng.random() < 0.5:
                mid = Apply("op", rng.choice(("relu", "tanh", "sigmoid")), (use1,), bare=True)
            expr = Apply("layer", name, (mid,), style="pipe" if rng.random() < 0.7 else "call", bare=True)
        else:
            other = [n for n in self.order if n != src and isinstance(self.state.scope.bindings.get(n), V)
                     and self.state.scope.bindings[n].shapes() == v.shapes()]
            if other:
                expr = Apply("op", "add" if keep else "concat",
                             (use1, Apply("layer", name, (Ref(rng.choice(other)),), bare=True)), style="call")
            else:
                expr = use1
        stmts = [*pre, decl, Assign(self.new_name(), expr)]
        st = self.try_stmts(stmts)
        if st is None:
            return False
        self.commit(stmts, st, refs=(src,))
        return True

    def move_repeat(self) -> bool:
        rng = self.rng
        src = self.pick()
        v = self.state.scope.bindings[src]
        carried = src if src not in [s.name for s in self.body if isinstance(s, Input)] or rng.random() < 0.3 \
            else None
        stmts_pre = []
        if carried is None:
            carried = self.new_name("s")
            stmts_pre.append(Assign(carried, Ref(src)))
        st0 = self.try_stmts(stmts_pre)
        if st0 is None:
            return False
        scope = st0.scope.copy()
        body = []
        st = st0.fork()
        for _ in range(rng.choice((1, 1, 2))):
            if rng.random() < 0.35:
                branch, bv, pre = self.chain(st, carried, rng.randint(1, 2), True, scope)
                if isinstance(branch, Ref):
                    continue
                expr = Apply("op", "add", (Ref(carried), branch), style="call" if rng.random() < 0.5 else "pipe")
            else:
                expr, bv, pre = self.chain(st, carried, rng.randint(1, 3), True, scope)
                if isinstance(expr, Ref):
                    continue
            stmt = Assign(carried, expr)
            trial = scope.copy()
            try:
                st2 = st.fork()
                for s in pre + [stmt]:
                    st2.exec(s, trial)
            except Invalid:
                continue
            scope = trial
            body.append(stmt)
            stmts_pre = pre + stmts_pre if pre else stmts_pre
            st = st2
        if not body:
            return False
        for count in (rng.randint(1, 3), 2, 1):
            stmts = [*stmts_pre, Repeat(count, tuple(body))]
            done = self.try_stmts(stmts)
            if done is not None:
                self.commit(stmts, done, refs=(src,))
                if carried not in self.order:
                    self.order.append(carried)
                return True
        return False

    # ---- blocks
    def move_block(self) -> bool:
        rng = self.rng
        src = self.pick()
        v = self.state.scope.bindings[src]
        if self.blocks and rng.random() < 0.4:
            block = rng.choice(self.blocks)
            expr = self.block_call(block, Ref(src), self.state, self.state.scope)
            if expr is None:
                return False
            stmts = [Assign(self.new_name(), expr)]
            st = self.try_stmts(stmts)
            if st is None:
                return False
            self.commit(stmts, st, refs=(src,))
            return True
        xname = rng.choice(("x", "t", "inp", "u"))
        st = self.state.fork()
        scope = Scope(prefix="gen.")
        scope.bindings[xname] = v
        body = []
        last = xname
        names = [xname]
        for _ in range(rng.randint(1, 2)):
            start = rng.choice(names) if rng.random() < 0.5 else last
            # A block that calls an earlier block: labels nest (outer1.inner1.conv1). Its own
            # second chance, from a stream of its own, keeps nesting among the CI seeds as the
            # generator learns new ops (which dilute the first) and leaves other networks' draws be.
            if self.blocks and (rng.random() < 0.3 or random.Random(f"nest {self.seed} {len(body)}").random() < 0.8):
                inner = self.block_call(rng.choice(self.blocks), Ref(start), st, scope)
                if inner is None:
                    continue
                expr, pre = inner, []
            elif rng.random() < 0.3 and len(names) >= 1:
                branch, bv, pre = self.chain(st, start, rng.randint(1, 2), True, scope)
                if isinstance(branch, Ref):
                    continue
                expr = Apply("op", "add", (Ref(start), branch), style="call")
            else:
                expr, bv, pre = self.chain(st, start, rng.randint(1, 3), False, scope)
                if isinstance(expr, Ref) or pre:
                    continue
            name = rng.choice(("y", "z", "a", "b", "h", "out")) + str(len(body))
            try:
                st.exec(Assign(name, expr), scope)
            except Invalid:
                continue
            body.append(Assign(name, expr))
            names.append(name)
            last = name
        if not body:
            return False
        params, body = self.lift(xname, v, body)
        self.names += 1
        bname = rng.choice(("unit", "stage", "res", "blk", "cell")) + rng.choice(("", "_", "x")) + \
            "abcdefghij"[self.names % 10]
        if bname in OPS:
            bname += "q"
        block = BlockDef(bname, ((xname, None), *params), (*body, Return(Ref(last))))
        self.blocks.append(block)
        self.state.blocks[bname] = block
        expr = self.block_call(block, Ref(src), self.state, self.state.scope, first=True)
        stmts = [Assign(self.new_name(), expr)] if expr is not None else []
        st = self.try_stmts(stmts) if stmts else None
        if st is None:
            self.blocks.pop()
            del self.state.blocks[bname]
            return False
        self.commit(stmts, st, refs=(src,))
        return True

    def lift(self, xname: str, v: V, body: list):
        """Turn some literal ints of the body into block parameters or channels(x) arithmetic."""
        rng = self.rng
        c = v.channels
        params: list = []
        first_values: dict = {}

        def lift_value(key, val):
            if not isinstance(val, int) or isinstance(val, bool):
                return val
            if key == "out":
                if val == c and rng.random() < 0.5:
                    return Measure("channels", xname)
                if val == 2 * c and rng.random() < 0.5:
                    return Arith("*", Measure("channels", xname), 2)
                if c % 2 == 0 and val == c // 2 and rng.random() < 0.5:
                    return Arith("//", Measure("channels", xname), 2)
                if val == c + 1 and rng.random() < 0.5:
                    return Arith("+", Measure("channels", xname), 1)
            if key in ("out", "kernel", "window") and rng.random() < 0.3 and len(params) < 3:
                pname = rng.choice(("c", "k", "n", "width_", "m")) + str(len(params))
                default = val if rng.random() < 0.5 else None
                params.append((pname, default))
                first_values[pname] = val
                return ParamRef(pname)
            return val

        def walk(e):
            if isinstance(e, Apply):
                ins = tuple(walk(i) for i in e.inputs)
                if e.kind != "op":
                    return Apply(e.kind, e.name, ins, e.args, e.kwargs, e.style, e.bare)
                names = [n for n, _ in OPS[e.name].args]
                args = tuple(lift_value(names[i], a) for i, a in enumerate(e.args))
                kwargs = tuple((k, lift_value(k, a)) for k, a in e.kwargs)
                return Apply(e.kind, e.name, ins, args, kwargs, e.style, e.bare)
            return e

        new_body = [Assign(s.name, walk(s.expr)) for s in body]
        self.first_values = first_values
        return tuple(params), new_body

    def block_call(self, block: BlockDef, cur, st: Interp, scope, first: bool = False):
        rng = self.rng
        params = block.params[1:]
        for attempt in range(4):
            values = {}
            for name, default in params:
                base = self.first_values.get(name, default) if first else None
                if base is None:
                    base = default if default is not None else rng.randint(1, 3)
                if not first and attempt < 3 and rng.random() < 0.5:
                    base = max(1, base + rng.choice((-1, 1)))
                values[name] = base
            args, kwargs = [], []
            positional = rng.random() < 0.5
            for name, default in params:
                val = values[name]
                if default is not None and val == default and rng.random() < 0.6:
                    continue
                if positional and not kwargs and len(args) == params.index((name, default)):
                    args.append(val)
                else:
                    kwargs.append((name, val))
            expr = Apply("block", block.name, (cur,), tuple(args), tuple(kwargs),
                         style="pipe" if rng.random() < 0.7 else "call")
            if self.value_of(st, expr, scope.copy()) is not None:
                return expr
        return None

    # ---- the whole network
    def generate(self) -> Case:
        rng = self.rng
        moves = [(self.move_chain, 8), (self.move_join, 3), (self.move_layer, 2), (self.move_repeat, 2),
                 (self.move_block, 3), (self.move_scale, 1)]
        target = rng.randint(2, 5)
        done = 0
        for _ in range(target * 4):
            if done >= target:
                break
            move = rng.choices([m for m, _ in moves], weights=[w for _, w in moves])[0]
            if move():
                done += 1
        inputs = [s.name for s in self.body if isinstance(s, Input)]
        for name in inputs:
            if id(self.state.scope.bindings[name]) not in self.used:
                # Every input feeds the network.
                expr, v, pre = self.chain(self.state, name, 1, False, self.state.scope)
                if isinstance(expr, Ref):
                    expr = Apply("op", "relu", (Ref(name),), bare=True)
                stmts = [*pre, Assign(self.new_name(), expr)]
                st = self.try_stmts(stmts)
                if st is not None:
                    self.commit(stmts, st, refs=(name,))
        sinks = [n for n in self.order if isinstance(self.state.scope.bindings.get(n), V)
                 and id(self.state.scope.bindings[n]) not in self.used and n not in inputs]
        seen, outs = set(), []
        for n in reversed(sinks):
            b = id(self.state.scope.bindings[n])
            if b not in seen:
                seen.add(b)
                outs.append(n)
        outs = outs[:4][::-1] or [self.order[-1]]
        inner = [n for n in self.order if n not in outs and n not in inputs
                 and isinstance(self.state.scope.bindings.get(n), V) and id(self.state.scope.bindings[n]) in self.used
                 and id(self.state.scope.bindings[n]) not in {id(self.state.scope.bindings[o]) for o in outs}]
        if inner and rng.random() < 0.3:
            # An output that later layers also read: its gradient adds to theirs.
            outs.insert(rng.randrange(len(outs) + 1), rng.choice(inner))
        if set(outs) & set(inputs):
            expr = Apply("op", "relu", (Ref(outs[0]),), bare=True)
            name = self.new_name()
            st = self.try_stmts([Assign(name, expr)])
            self.commit([Assign(name, expr)], st)
            outs = [name]
        self.body.append(Output(tuple(outs)))
        if rng.random() < 0.5:
            target_name = rng.choice(outs)
            self.body.append(self.draw_loss(target_name, rng.random()))
        program = self.program()
        training = self.training
        interp = abstract_interp(program, self.size_list, training).run()
        drops = [b for op, _, b in interp.events if op == "dropout" and b["p"] > 0]
        if training and len(drops) > 1:
            training = False        # the order of several dropout layers' keys is not promised
        return Case(program, self.sizes, (1, rng.choice((2, 3))), training, self.seed,
                    lr=rng.choice((0.1, 0.05, 0.5)), probes=self.probes)


def generate(seed: int, budget: int = 14) -> Case:
    """A valid random case for this seed (the generator retries with derived seeds if it gets stuck)."""
    for attempt in range(20):
        try:
            case = Generator(seed * 1000 + attempt if attempt else seed, budget).generate()
            check_case(case)
            return Case(case.program, case.sizes, case.batches, case.training, seed, case.lr, case.probes)
        except Invalid:
            continue
    raise RuntimeError(f"no valid network for seed {seed}")


# ---- what a case exercises (the test suite checks that the CI seeds cover the language) ---

def _walk_exprs(stmts):
    for s in stmts:
        if isinstance(s, Assign):
            yield from _walk_expr(s.expr)
        elif isinstance(s, Return):
            yield from _walk_expr(s.expr)
        elif isinstance(s, LayerDecl):
            yield s.call
        elif isinstance(s, Repeat):
            yield from _walk_exprs(s.body)


def _walk_expr(e):
    if isinstance(e, Apply):
        yield e
        for i in e.inputs:
            yield from _walk_expr(i)


def _pad_form(p) -> str:
    if isinstance(p, Sym):
        return p.name
    if isinstance(p, int):
        return "int"
    if isinstance(p, tuple) and any(isinstance(x, tuple) for x in p):
        pairs = [x for x in p if isinstance(x, tuple)]
        if any(b == 0 and a > 0 for b, a in pairs):
            return "pairs-end-only"
        if any(b != a for b, a in pairs):
            return "pairs-asymmetric"
        return "pairs"
    return "tuple"


def features(case: Case) -> set[str]:
    """Names for the language features a case uses: op:conv, conv:groups, pad:same, repeat …"""
    p = case.program
    out = {f"layout:{p.layout}", f"dtype:{p.dtype}", "mode:train" if case.training else "mode:eval"}
    inputs = [s for s in p.body if isinstance(s, Input)]
    out.add(f"rank:{len(inputs[0].dims) - 1}")
    if len(inputs) > 1:
        out.add("inputs:several")
    if case.sizes[0]:
        out.add("run-time sizes")
    if any(isinstance(d, int) and d >= 16 for s in inputs for d in s.dims) or \
            any(v >= 16 for sizes in case.sizes for _, v in sizes):
        out.add("size:large")
    for s in p.body:
        if isinstance(s, Output) and len(s.names) > 1:
            out.add("outputs:several")
        if isinstance(s, Loss):
            out.add(f"loss:{s.kind}")
            out |= {f"loss:{s.kind}:{k}" for k, _ in s.kwargs}
        if isinstance(s, Repeat):
            out.add("repeat")
        if isinstance(s, LayerDecl):
            out.add("layer")
        if isinstance(s, ConstDecl):
            out.add("const")
    if p.blocks:
        out.add("block")
    interp = check_case(case)
    if any(id(v) in interp.consumed for _, v in interp.outputs):
        out.add("outputs:also-read")
    exprs = list(_walk_exprs(p.body)) + [e for b in p.blocks for e in _walk_exprs(b.body)]
    for b in p.blocks:
        if any(d is not None for _, d in b.params[1:]):
            out.add("block:default-argument")
    for e in exprs:
        if e.kind == "block":
            out.add("block:applied")
            if any(x.kind == "block" for b in p.blocks for x in _walk_exprs(b.body)):
                out.add("block:nested")
            continue
        if e.kind == "layer":
            out.add("layer:applied")
            continue
        out.add(f"op:{e.name}")
        out.add(f"style:{e.style}")
        if e.args and e.kwargs:
            out.add("args:positional-and-keyword")
        values = dict(zip([n for n, _ in OPS[e.name].args], e.args))
        values.update(dict(e.kwargs))
        for k, v in values.items():
            if isinstance(v, (ParamRef, Measure, Arith)):
                out.add(f"block-arg:{type(v).__name__}")
            if k == "pad":
                out.add(f"pad:{_pad_form(v)}")
            elif k in ("stride", "dilation", "groups", "multiplier", "output_pad", "tile", "factor") and \
                    v not in (1, 0, None) and not isinstance(v, (ParamRef, Measure, Arith)):
                out.add(f"{e.name}:{k}")
            elif k in ("bias", "flip", "frozen") and v == (k != "bias"):
                out.add(f"{k}={'false' if k == 'bias' else 'true'}")
            elif k == "init" and isinstance(v, (Sym, InitFn)):
                out.add(f"init:{v.name}")
            elif k == "init" and isinstance(v, Dec):
                out.add(f"{e.name}:init")
            elif k == "weight" and v is not None:
                out.add("weight=const")
            elif k == "algo":
                out.add(f"algo:{v.name}")
            elif k == "mode" and e.name == "pad" or k == "pad_mode":
                out.add(f"pad_mode:{v.name}")
            elif k == "mode":
                out.add(f"upsample:{v.name}")
            elif k == "shape":
                out.add("reshape:inferred" if -1 in v.items else f"reshape:to-rank-{len(v.items) - 1}")
            elif k == "p" and v.value > 0:
                out.add("dropout:p>0")
    return out
