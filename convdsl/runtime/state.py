"""Weights from another framework's state_dict (PyTorch's: tensors or arrays, by name) onto a Model's
parameters and buffers: by an explicit name map, by equal names, or by structural order.

Structural order pairs the model's layers, in the order of the network, with the other side's
modules (the prefixes before `.weight`, `.bias`, `.running_mean` …) in their order, and inside a
layer each tensor with the one of the same role; every pair must have the same shape. Anything
that does not pair off exactly — a count, a role, a shape — is refused: a guess could load a
network's weights into the wrong layers without a word. PyTorch's BatchNorm `num_batches_tracked`
counters are ignored (the language's batchnorm has a momentum, no counter).
"""
from __future__ import annotations

import re
from collections import OrderedDict

import numpy as np

IGNORED_SUFFIXES = ("num_batches_tracked",)


def as_arrays(sd) -> "OrderedDict[str, np.ndarray]":
    """A state_dict's tensors (torch tensors, numpy arrays, anything array-like) as numpy arrays,
    in its order, without the ignored counters."""
    if not hasattr(sd, "items"):
        raise TypeError(f"a state_dict is a mapping from names to tensors, got {type(sd).__name__}")
    out = OrderedDict()
    for name, value in sd.items():
        if not isinstance(name, str):
            raise TypeError(f"state_dict names are strings, got {name!r}")
        if name.rsplit(".", 1)[-1] in IGNORED_SUFFIXES:
            continue
        if hasattr(value, "detach"):            # a torch tensor, without importing torch
            value = value.detach().cpu().numpy()
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"state_dict `{name}` has dtype {arr.dtype}, expected real numbers")
        out[name] = arr
    return out


def _split(name: str) -> tuple[str, str]:
    prefix, _, role = name.rpartition(".")
    return prefix, role


def _groups(names) -> "OrderedDict[str, list[str]]":
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for name in names:
        groups.setdefault(_split(name)[0], []).append(name)
    return groups


def _identifier(name: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_]+", "_", name)).strip("_")


def correspondence(ours: "OrderedDict[str, tuple]", theirs: "OrderedDict[str, np.ndarray]",
                   mapping: dict | None = None) -> tuple["OrderedDict[str, str]", str]:
    """{our name: their name} for every parameter and buffer, and how it was found: `mapping`,
    `names` or `order`. `ours` maps each name to its shape, in the network's order (each layer's
    parameters then its buffers). Raises ValueError on anything that does not pair off exactly."""
    if mapping is not None:
        unknown = sorted(set(mapping) - set(ours))
        if unknown:
            raise ValueError(f"mapping: {unknown[:5]} are not parameters or buffers of this network "
                             f"(its names are our names, mapped to the state_dict's)")
        missing = [n for n in ours if n not in mapping]
        if missing:
            raise ValueError(f"mapping: no state_dict name for {missing[:5]}" + (" …" if len(missing) > 5 else ""))
        pairs = OrderedDict((n, mapping[n]) for n in ours)
        how = "mapping"
    elif set(theirs) == set(ours):
        pairs = OrderedDict((n, n) for n in ours)
        how = "names"
    elif len({_identifier(_split(t)[0]) + "." + _split(t)[1] for t in theirs}) == len(theirs) and \
            {_identifier(_split(t)[0]) + "." + _split(t)[1] for t in theirs} == set(ours):
        # `convdsl import` names layers after the ONNX weights: layer1.0.conv1 → layer1_0_conv1.
        back = {_identifier(_split(t)[0]) + "." + _split(t)[1]: t for t in theirs}
        pairs = OrderedDict((n, back[n]) for n in ours)
        how = "names"
    else:
        pairs = _by_order(ours, theirs)
        how = "order"
    used = list(pairs.values())
    absent = [t for t in used if t not in theirs]
    if absent:
        raise ValueError(f"the state_dict has no {absent[:5]}")
    twice = sorted({t for t in used if used.count(t) > 1})
    if twice:
        raise ValueError(f"{twice[:5]} would load into several parameters")
    unused = [t for t in theirs if t not in set(used)]
    if unused:
        raise ValueError(f"the state_dict's {unused[:5]}" + (" …" if len(unused) > 5 else "")
                         + " would be left out: it does not fit this network")
    for n, t in pairs.items():
        if tuple(theirs[t].shape) != tuple(ours[n]):
            raise ValueError(f"`{n}` is {list(ours[n])} but the state_dict's `{t}` is {list(theirs[t].shape)}")
    return pairs, how


def _by_order(ours, theirs) -> "OrderedDict[str, str]":
    mine, other = _groups(ours), _groups(theirs)
    if len(mine) != len(other):
        raise ValueError(f"by order: this network has {len(mine)} layers with weights, the state_dict "
                         f"{len(other)} modules ({', '.join(list(other)[:6])}{' …' if len(other) > 6 else ''}); "
                         f"give mapping={{our name: their name}}")
    pairs = OrderedDict()
    for (layer, names), (module, their_names) in zip(mine.items(), other.items()):
        roles = {_split(n)[1]: n for n in names}
        their_roles = {_split(t)[1]: t for t in their_names}
        if set(roles) != set(their_roles):
            raise ValueError(f"by order: layer `{layer}` has {sorted(roles)} but its counterpart `{module}` has "
                             f"{sorted(their_roles)}; give mapping={{our name: their name}}")
        for role, n in roles.items():
            t = their_roles[role]
            if tuple(theirs[t].shape) != tuple(ours[n]):
                raise ValueError(f"by order: `{n}` is {list(ours[n])} but its counterpart `{t}` is "
                                 f"{list(theirs[t].shape)}: the layers do not line up; give "
                                 f"mapping={{our name: their name}}")
            pairs[n] = t
    return OrderedDict((n, pairs[n]) for n in ours)


def network_order(params: dict, buffers: dict) -> "OrderedDict[str, tuple]":
    """Our names with their shapes, each layer's parameters then its buffers, layers in order."""
    out: OrderedDict[str, tuple] = OrderedDict()
    layers: OrderedDict[str, list[str]] = OrderedDict()
    for name in list(params) + list(buffers):
        layers.setdefault(_split(name)[0], []).append(name)
    shapes = {**{n: a.shape for n, a in params.items()}, **{n: a.shape for n, a in buffers.items()}}
    for names in layers.values():
        for n in names:
            out[n] = tuple(shapes[n])
    return out
