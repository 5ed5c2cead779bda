"""Run one campaign case against the compiled module and compare everything with the reference.

What is compared, in order: the parameter and buffer lists (names, shapes, order, which are
trainable), initial values that the file fixes (const weights, zeros/ones, biases, batchnorm),
then with random parameters: forward values, input gradients and parameter gradients at batch 1
(or the refusal PyTorch makes of a training-mode batchnorm with one value per channel) and at
batch 2-3 on the second size; batchnorm's running statistics after each training-mode forward;
for a network with a loss, Model.loss and one train_step against a PyTorch SGD step. The
reference is netlang's interpreter in float64 with autograd; nothing here asks the code under
test for an expected value.
"""
from __future__ import annotations

import math
import traceback

import numpy as np
import torch

import convdsl
from convdsl import ConvDSLError
from netgen import check_case
from netlang import Case, DropoutKeys, Interp, Invalid, loss_target, render, torch_loss

TOL = {"f32": dict(rtol=1e-4, atol=1e-5), "f64": dict(rtol=1e-7, atol=1e-9)}


class CampaignFailure(AssertionError):
    """The compiled network disagrees with the reference. `kind` names what disagreed."""

    def __init__(self, kind: str, detail: str):
        self.kind = kind
        self.detail = detail
        super().__init__(f"[{kind}] {detail}")


NOISE_FACTOR = 10


def compare(kind: str, actual, expected, tol: dict, what: str, noise=None) -> None:
    """Equal within tol after dividing both by max(1, the reference's largest magnitude).

    For a float32 network, `noise` is the same quantity computed by PyTorch in float32: a
    difference up to NOISE_FACTOR times PyTorch's own largest float32 error on this tensor is
    rounding the computation cannot avoid (cancellation, such as the gradient of a bias that a
    training-mode batchnorm removes, which is 0 in exact arithmetic), not a bug."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise CampaignFailure(kind, f"{what}: shape {actual.shape}, reference {expected.shape}")
    if not np.all(np.isfinite(actual)):
        raise CampaignFailure(kind, f"{what}: non-finite values {actual.ravel()[~np.isfinite(actual.ravel())][:4]}")
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    err = np.abs(actual - expected) / scale
    bound = tol["atol"] + tol["rtol"] * np.abs(expected) / scale
    rounding = 0.0
    if noise is not None:
        rounding = NOISE_FACTOR * float(np.abs(np.asarray(noise, dtype=np.float64) - expected).max(initial=0.0)) / scale
    if np.any(err > bound + rounding):
        i = int(np.argmax(err - bound))
        idx = np.unravel_index(i, actual.shape)
        extra = f", PyTorch float32 {float(np.asarray(noise).reshape(actual.shape)[idx])!r}" if noise is not None else ""
        raise CampaignFailure(kind, f"{what}: {int(np.sum(err > bound + rounding))} of {actual.size} values differ; "
                                    f"at {idx} got {actual[idx]!r}, reference {expected[idx]!r}{extra} "
                                    f"(scale {scale:g})")


def to_file(a: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(a, 1, -1)) if layout == "NHWC" and a.ndim > 2 else a


def from_file(a: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(a, -1, 1)) if layout == "NHWC" and a.ndim > 2 else a


def as_tuple(v) -> tuple:
    return v if isinstance(v, tuple) else (v,)


def input_shapes(case: Case, sizes: dict) -> dict:
    """Channel-first per-sample shapes of the inputs at these run-time sizes."""
    from netlang import Input
    out = {}
    for s in case.program.body:
        if isinstance(s, Input):
            dims = [d if isinstance(d, int) else sizes[d] for d in s.dims]
            if case.program.layout == "NHWC" and len(dims) > 1:
                dims = [dims[-1], *dims[:-1]]
            out[s.name] = tuple(dims)
    return out


def weight_scale(name: str, shape: tuple, predicted) -> float:
    """A std that keeps activations near 1: 1/sqrt(inputs per output) for weights."""
    local = name.rsplit(".", 1)[-1]
    if local == "bias":
        return 0.5
    if len(shape) <= 1:
        return 0.5
    fan = math.prod(shape[1:])
    spec = predicted.pspecs[name]
    if len(shape) >= 4 and spec.local == "weight" and name in _unshared_names(predicted):
        # local/tiled [out, *positions, in, *kernel]: one output reads in·kernel values.
        rank = (len(shape) - 2) // 2
        fan = math.prod(shape[1 + rank:])
    return 1.0 / math.sqrt(max(fan, 1))


def _unshared_names(predicted) -> set:
    names = set()
    for op, label, _ in predicted.events:
        if op in ("local", "tiled"):
            names.add(f"{label}.weight")
    return names


class Runner:
    def __init__(self, case: Case, module=None):
        self.case = case
        self.program = case.program
        self.text = render(case.program)
        self.dtype = np.float64 if case.program.dtype == "f64" else np.float32
        self.tol = TOL[case.program.dtype]
        self.layout = case.program.layout
        self.module = module
        self.rng = np.random.default_rng(case.seed)

    # -- the reference
    def reference(self, xs: dict, params: dict, buffers: dict, keys: DropoutKeys):
        """Outputs (channel-first torch tensors) of the reference with these inputs and parameters."""
        it = Interp(self.program, [xs], training=self.case.training, param_source=lambda n, s: params[n],
                    buffer_source=lambda n, shape, fill: buffers[n], dropout=keys)
        it.run()
        return it

    # -- the steps
    def compile(self):
        try:
            self.predicted = check_case(self.case)
        except Invalid as e:
            raise CampaignFailure("generator", f"the case is not valid by the reference's rules: {e}") from None
        if self.module is None:
            try:
                self.module = convdsl.load_source(self.text)
            except ConvDSLError as e:
                raise CampaignFailure("rejected", f"a valid network was refused:\n{e}") from None
            except Exception:
                raise CampaignFailure("compile-crash", traceback.format_exc(limit=8)) from None
        return self.module

    def check_lists(self) -> None:
        meta = self.module.META
        want = self.predicted.param_list()
        got = [(n, tuple(s), t) for n, s, t in meta["params"]]
        if got != want:
            raise CampaignFailure("params", f"parameters (name, shape, trainable) in order:\n  got       {got}\n"
                                            f"  reference {want}")
        want_b = [(n, tuple(t.shape)) for n, t in self.predicted.buffers.items()]
        got_b = [(n, tuple(s)) for n, s in meta["buffers"]]
        if got_b != want_b:
            raise CampaignFailure("buffers", f"buffers in order: got {got_b}, reference {want_b}")

    def check_initial(self, net) -> None:
        for name, spec in self.predicted.pspecs.items():
            p = np.array(net.params[name], dtype=np.float64)
            kind = spec.init[0]
            if not np.all(np.isfinite(p)):
                raise CampaignFailure("init", f"{name} starts with non-finite values")
            if kind == "const":
                want = np.array(spec.init[1], dtype=self.dtype).astype(np.float64).reshape(spec.shape)
                compare("init", p, want, dict(rtol=0, atol=0), f"{name} starts as its const")
            elif kind in ("zeros", "ones"):
                compare("init", p, np.full(spec.shape, 0.0 if kind == "zeros" else 1.0), dict(rtol=0, atol=0),
                        f"{name} starts as {kind}")
            elif kind == "uniform" and np.abs(p).max(initial=0) > spec.init[1]:
                raise CampaignFailure("init", f"{name}: uniform({spec.init[1]}) drew {np.abs(p).max()}")
        for name, t in self.predicted.buffers.items():
            fill = 0.0 if name.endswith("running_mean") else 1.0
            compare("init", np.array(net.buffers[name]), np.full(tuple(t.shape), fill), dict(rtol=0, atol=0),
                    f"buffer {name} starts at {fill}")

    def randomize(self, net) -> None:
        for name, p in net.params.items():
            std = weight_scale(name, p.shape, self.predicted)
            values = self.rng.standard_normal(p.shape) * std
            if name.endswith("weight") and len(p.shape) == 1:
                values = 1.0 + 0.3 * self.rng.standard_normal(p.shape)       # batchnorm's scale
            p[...] = values
        if not self.case.training:
            for name, b in net.buffers.items():
                b[...] = (self.rng.uniform(0.5, 2.0, b.shape) if name.endswith("running_var")
                          else 0.5 * self.rng.standard_normal(b.shape))

    def new_model(self):
        net = self.module.Model(seed=self.case.seed % (2 ** 63))
        if not self.case.training:
            net.eval()
        return net

    def draw_inputs(self, sizes: dict, batch: int) -> dict:
        return {n: self.rng.standard_normal((batch, *s)).astype(self.dtype)
                for n, s in input_shapes(self.case, sizes).items()}

    def references(self, net, xs: dict, keys: DropoutKeys, grad: bool):
        """The reference in float64 and, for a float32 network, again in float32 (for `noise`):
        [(interp, outputs, params, inputs)], float64 first. Both draw the same dropout keys."""
        dtypes = [torch.float64] + ([torch.float32] if self.program.dtype == "f32" else [])
        taken = keys.taken
        runs = []
        for dt in dtypes:
            keys.taken = taken
            params = {k: torch.tensor(np.array(v), dtype=dt, requires_grad=k in net.grads)
                      for k, v in net.params.items()}
            buffers = {k: torch.tensor(np.array(v), dtype=dt) for k, v in net.buffers.items()}
            tx = {n: torch.tensor(x, dtype=dt, requires_grad=grad) for n, x in xs.items()}
            it = self.reference(tx, params, buffers, keys)
            runs.append((it, [v.tensors[0] for _, v in it.outputs], params, tx, buffers))
        return runs

    @staticmethod
    def noisy(runs, pick):
        """pick(run) as numpy for the float32 run, or None."""
        return pick(runs[1]) if len(runs) > 1 else None

    def forward_backward(self, net, xs: dict, keys: DropoutKeys, what: str, switch: bool = False):
        """One forward and backward, compared with the reference; returns the references.
        `switch` flips train/eval between the two: the backward must follow the forward's mode."""
        runs = self.references(net, xs, keys, grad=True)
        it, ys_ref, params, tx, buffers = runs[0]
        try:
            ys = as_tuple(net.forward(*[to_file(x, self.layout) for x in xs.values()]))
        except Exception as e:
            raise CampaignFailure("refused", f"{what}: forward raised {type(e).__name__}: {e}") from None
        if len(ys) != len(ys_ref):
            raise CampaignFailure("forward", f"{what}: {len(ys)} outputs, reference {len(ys_ref)}")
        for i, ((name, _), y, yr) in enumerate(zip(it.outputs, ys, ys_ref)):
            compare("forward", from_file(y, self.layout), yr.detach().numpy(), self.tol, f"{what}: output {name}",
                    self.noisy(runs, lambda r: r[1][i].detach().double().numpy()))
        for name, b in buffers.items():
            compare("buffers", net.buffers[name], b.numpy(), self.tol, f"{what}: buffer {name} after forward",
                    self.noisy(runs, lambda r: r[4][name].double().numpy()))
        dys = [self.rng.standard_normal(yr.shape).astype(self.dtype) for yr in ys_ref]
        if switch:
            net.eval() if self.case.training else net.train()
        try:
            dxs = as_tuple(net.backward(*[to_file(d, self.layout) for d in dys]))
        except Exception as e:
            raise CampaignFailure("refused", f"{what}: backward raised {type(e).__name__}: {e}") from None
        finally:
            if switch:
                net.train() if self.case.training else net.eval()
        grads_of = []
        for _, outs, ps, txs, _ in runs:
            objective = sum((yr * torch.tensor(d, dtype=yr.dtype)).sum() for yr, d in zip(outs, dys))
            wrt = list(txs.values()) + [ps[n] for n in net.grads]
            grads = torch.autograd.grad(objective, wrt, allow_unused=True)
            grads_of.append([np.zeros(tuple(w.shape)) if g is None else g.double().numpy() for w, g in zip(wrt, grads)])
        noise = grads_of[1] if len(grads_of) > 1 else [None] * len(grads_of[0])
        for k, ((name, _), dx) in enumerate(zip(tx.items(), dxs)):
            compare("input-grad", from_file(dx, self.layout), grads_of[0][k], self.tol,
                    f"{what}: gradient of input {name}", noise[k])
        for k, name in enumerate(net.grads, start=len(tx)):
            compare("param-grad", net.grads[name], grads_of[0][k], self.tol, f"{what}: gradient of {name}", noise[k])
        return runs

    def target(self, out_ref: torch.Tensor, loss):
        """(target as the model takes it, the same for the reference)."""
        kind = loss_target(loss)
        if kind == "values":
            t = self.rng.standard_normal(tuple(out_ref.shape)).astype(self.dtype)
            return to_file(t, self.layout), torch.tensor(t.astype(np.float64))
        if kind == "probabilities":
            t = self.rng.random(tuple(out_ref.shape))
            t[self.rng.random(t.shape) < 0.25] = 1.0        # hard labels among the soft ones
            t = t.astype(self.dtype)
            return to_file(t, self.layout), torch.tensor(t.astype(np.float64))
        n, c = out_ref.shape[:2]
        spatial = tuple(out_ref.shape[2:])
        per_pixel = spatial if not all(d == 1 for d in spatial) else ()
        labels = self.rng.integers(0, c, size=(n, *per_pixel))
        ignore = loss.arg("ignore_index")
        if ignore is not None:
            labels[self.rng.random(labels.shape) < 0.3] = ignore
            labels.flat[0] = 0 if ignore != 0 else 1    # one label counts: the loss is no 0 / 0
        return labels, torch.tensor(labels)

    def run(self) -> None:
        self.compile()
        self.check_lists()
        net = self.new_model()
        self.check_initial(net)
        self.randomize(net)
        start = {k: np.array(v) for k, v in net.params.items()}
        start_buffers = {k: np.array(v) for k, v in net.buffers.items()}
        keys = DropoutKeys(self.case.seed % (2 ** 63))
        sizes = [dict(s) for s in self.case.sizes]
        batch1, batch2 = self.case.batches
        first_batch = batch1
        xs = self.draw_inputs(sizes[0], batch1)
        try:
            self.forward_backward(net, xs, keys, f"batch {batch1}, sizes {sizes[0]}")
        except ValueError as e:
            if "one value per channel" not in str(e):
                raise
            first_batch = 2
            net, keys = self.refused_then_again(net, xs, start, start_buffers, sizes[0])
        xs = self.draw_inputs(sizes[1], batch2)
        switch = self.case.seed % 2 == 1
        runs = self.forward_backward(net, xs, keys, f"batch {batch2}, sizes {sizes[1]}"
                                     + (", mode switched before backward" if switch else ""), switch=switch)
        self.loss_and_step(net, xs, keys, runs)
        # Back to the first size and batch: the model prepares its buffers anew (smaller).
        xs = self.draw_inputs(sizes[0], first_batch)
        self.forward_backward(net, xs, keys, f"again batch {first_batch}, sizes {sizes[0]}")

    def refused_then_again(self, net, xs, start, start_buffers, sizes):
        """PyTorch refuses a training-mode batchnorm with one value per channel: so must the model.
        Then a fresh model with the same parameters runs batch 2."""
        try:
            net.forward(*[to_file(x, self.layout) for x in xs.values()])
        except RuntimeError:
            pass
        else:
            raise CampaignFailure("refused", "a training-mode batchnorm with one value per channel ran "
                                             "instead of raising RuntimeError") from None
        net = self.new_model()
        for k, v in start.items():
            net.params[k][...] = v
        for k, v in start_buffers.items():
            net.buffers[k][...] = v
        keys = DropoutKeys(self.case.seed % (2 ** 63))
        self.forward_backward(net, self.draw_inputs(sizes, 2), keys, f"batch 2, sizes {sizes}")
        return net, keys

    def loss_and_step(self, net, xs, keys, runs) -> None:
        it = runs[0][0]
        if it.loss is None:
            return
        loss, index = it.loss
        target, target_ref = self.target(runs[0][1][index], loss)
        losses = [float(torch_loss(loss, r[1][index].detach(), self.target_like(target_ref, r[1][index])))
                  for r in runs]
        try:
            got = net.loss(target)
        except Exception as e:
            raise CampaignFailure("refused", f"Model.loss raised {type(e).__name__}: {e}") from None
        compare("loss", got, losses[0], self.tol, "Model.loss after the last forward",
                losses[1] if len(losses) > 1 else None)
        self.train_step(net, xs, target, target_ref, keys, loss, index)

    @staticmethod
    def target_like(target_ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """A real target in the dtype of the reference run's output (labels as they are)."""
        return target_ref.to(out.dtype) if target_ref.is_floating_point() else target_ref

    def train_step(self, net, xs, target, target_ref, keys, loss, index) -> None:
        before = {k: np.array(v) for k, v in net.params.items()}
        runs = self.references(net, xs, keys, grad=False)
        trainable = list(net.grads)
        lr = self.case.lr
        results = []
        for it, outs, params, _, buffers in runs:
            value = torch_loss(loss, outs[index], self.target_like(target_ref, outs[index]))
            grads = [None] * len(trainable)
            if trainable and value.requires_grad:
                grads = torch.autograd.grad(value, [params[n] for n in trainable], allow_unused=True)
            after = {n: before[n].astype(np.float64) - lr * (0.0 if g is None else g.double().numpy())
                     for n, g in zip(trainable, grads)}
            results.append((float(value.detach()), after, {n: b.double().numpy() for n, b in buffers.items()}))
        noisy = results[1] if len(results) > 1 else None
        try:
            got = net.train_step(*[to_file(x, self.layout) for x in xs.values()], target, lr=lr)
        except Exception as e:
            raise CampaignFailure("refused", f"train_step raised {type(e).__name__}: {e}") from None
        compare("train-step", got, results[0][0], self.tol, "the loss train_step returns",
                noisy[0] if noisy else None)
        for name in trainable:
            compare("train-step", net.params[name], results[0][1][name], self.tol,
                    f"{name} after train_step(lr={lr})", noisy[1][name] if noisy else None)
        for name in net.params:
            if name not in net.grads and not np.array_equal(net.params[name], before[name]):
                raise CampaignFailure("train-step", f"frozen {name} changed in train_step")
        for name, b in results[0][2].items():
            compare("buffers", net.buffers[name], b, self.tol, f"buffer {name} after train_step",
                    noisy[2][name] if noisy else None)


def run_case(case: Case, module=None) -> None:
    """Raises CampaignFailure when the compiled network and the reference disagree."""
    Runner(case, module).run()
