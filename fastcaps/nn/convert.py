"""Conversion of another CapsNet's routing weight into fastcaps' layout [I, J, D, K] (û = W u).

Public PyTorch CapsNets store the transforms W_ij in many layouts ([J, I, K, D] used as uᵀ W,
[I, K, J*D], [1, J, I, D, K], ...; the README's "Porting a CapsNet to fastcaps" lists them).
`convert_weight` takes the weight with an einops-style pattern that names its axes and the
product the port computes, checks both against the tensor, and returns fastcaps' layout.

The rearrangement itself is done by einops (`einops.rearrange`), a small, dependency-free and
well-kept library whose pattern notation is the one users of these ports already know; fastcaps
adds what einops cannot know: which named axis is the input dim k and which the output dim d
(einops would happily swap two axes of equal size), checked against the product the port
computes, and errors that name the axis that disagrees.
"""
import re

import einops
import torch

__all__ = ["convert_weight", "parse_weight_pattern"]

_AXES = {"i": "input capsules I, in_caps", "j": "output capsules J, out_caps", "d": "output capsule dim D, out_dim",
         "k": "input capsule dim K, in_dim"}
_PRODUCTS = {"Wu": "W u, with a [D, K] matrix per (i, j)", "uW": "uᵀ W, with a [K, D] matrix per (i, j)"}
_TOKEN = re.compile(r"\(|\)|[^\s()]+")


def parse_weight_pattern(pattern: str) -> list[list[str]]:
    """The axes of a weight pattern: one list of names per tensor dim ("1" for a size-1 dim).

    "i k (j d)" -> [["i"], ["k"], ["j", "d"]]. Raises ValueError naming what is wrong: an
    unknown name, a name missing or repeated, unbalanced or nested parentheses.
    """
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string such as 'j i k d' or 'i k (j d)', got {type(pattern).__name__}")
    dims, group = [], None
    for token in _TOKEN.findall(pattern):
        if token == "(":
            if group is not None:
                raise ValueError(f"pattern {pattern!r}: nested parentheses")
            group = []
        elif token == ")":
            if not group:
                raise ValueError(f"pattern {pattern!r}: ')' without a group before it")
            dims.append(group)
            group = None
        elif token == "1":
            if group is not None:
                raise ValueError(f"pattern {pattern!r}: a '1' inside a group; write the group's axes only")
            dims.append(["1"])
        elif token in _AXES:
            if group is None:
                dims.append([token])
            else:
                group.append(token)
        else:
            raise ValueError(f"pattern {pattern!r}: unknown axis {token!r}; the axes are "
                             + ", ".join(f"{n} ({what})" for n, what in _AXES.items())
                             + ", 1 (a dim of size 1) and groups such as (j d)")
    if group is not None:
        raise ValueError(f"pattern {pattern!r}: '(' is not closed")
    names = [name for dim in dims for name in dim if name != "1"]
    for name in _AXES:
        count = names.count(name)
        if count != 1:
            raise ValueError(f"pattern {pattern!r}: axis {name} ({_AXES[name]}) appears {count} times; "
                             "each of i, j, d, k must appear exactly once")
    return dims


def convert_weight(weight: torch.Tensor, pattern: str, product: str, *, i: int | None = None,
                   j: int | None = None, d: int | None = None, k: int | None = None) -> torch.Tensor:
    """A port's routing weight in fastcaps' layout [I, J, D, K], with û_ij = W_ij u_i.

    Args:
        weight: the port's weight tensor (any dtype and device; the result keeps them).
        pattern: its layout in einops notation, one entry per dim of `weight`: the names i (input
            capsules), j (output capsules), d (output capsule dim), k (input capsule dim), each
            exactly once, `1` for a dim of size 1, and parenthesised groups for dims that hold
            several axes flattened in row-major order, e.g. "j i k d", "1 i j d k", "i k (j d)".
        product: how the port computes the prediction from its per-(i, j) matrix:
            "Wu" (û = W u, `torch.matmul(W, u)`, the matrix is [D, K]: d comes before k in the
            pattern) or "uW" (û = uᵀ W, `u @ W`, the matrix is [K, D]: k comes before d). It
            must agree with the order of d and k in the pattern, which is what decides between
            the two when K = D: a transposed matrix cannot be passed off silently.
        i, j, d, k: sizes. Needed for a group with more than one axis of unknown size (for
            "i k (j d)" one of j and d); every size given is checked against the tensor.

    Returns:
        A contiguous tensor [I, J, D, K] (a copy whenever the layout differs), to load into
        DigitCaps / FusedDigitCaps.weight or pass to fastcaps.dynamic_routing.

    Raises:
        ValueError naming the axis: a pattern whose rank differs from the tensor's, a `1` on a
        dim that is not of size 1, a size that disagrees with the one given, a group whose size
        is not divisible by the sizes of its other axes, or a product that disagrees with the
        pattern's order of d and k. TypeError for a weight that is not a tensor.

    Example (a port that stores [J, I, K, D] and computes `u @ W`):
        >>> w = fastcaps.convert_weight(port.route_weights, "j i k d", "uW")
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    if product not in _PRODUCTS:
        raise ValueError(f"product must be 'Wu' (û = W u, a [D, K] matrix) or 'uW' (û = uᵀ W, a [K, D] matrix), "
                         f"got {product!r}")
    dims = parse_weight_pattern(pattern)
    flat = [name for dim in dims for name in dim if name != "1"]
    if (flat.index("d") < flat.index("k")) != (product == "Wu"):
        order = "d before k" if flat.index("d") < flat.index("k") else "k before d"
        raise ValueError(f"pattern {pattern!r} puts {order}, but product={product!r} is {_PRODUCTS[product]}: "
                         "name the axes as the port multiplies them (a [D, K] matrix for 'Wu', [K, D] for 'uW')")
    if weight.dim() != len(dims):
        raise ValueError(f"pattern {pattern!r} has {len(dims)} dims but the weight has {weight.dim()}, "
                         f"shape {tuple(weight.shape)}")
    given = {name: size for name, size in (("i", i), ("j", j), ("d", d), ("k", k)) if size is not None}
    for name, size in given.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} ({_AXES[name]}) must be an int >= 1, got {size!r}")
    sizes = {}
    for position, (dim, extent) in enumerate(zip(dims, weight.shape)):
        where = f"dim {position} of the weight {tuple(weight.shape)}"
        if dim == ["1"]:
            if extent != 1:
                raise ValueError(f"pattern {pattern!r}: {where} is the '1', but has size {extent}")
            continue
        if extent == 0:
            raise ValueError(f"pattern {pattern!r}: {where} has size 0")
        known = 1
        unknown = [name for name in dim if name not in given]
        for name in dim:
            known *= given.get(name, 1)
        if len(unknown) > 1:
            raise ValueError(f"pattern {pattern!r}: {where} of size {extent} groups ({' '.join(dim)}); "
                             f"give the size of all but one of {', '.join(unknown)} (e.g. {unknown[-1]}=...)")
        if extent % known or (not unknown and extent != known):
            if len(dim) == 1:
                name = dim[0]
                raise ValueError(f"axis {name} ({_AXES[name]}) is {where}, of size {extent}, but {name}={known} "
                                 "was given")
            raise ValueError(f"pattern {pattern!r}: {where} of size {extent} groups ({' '.join(dim)}), which does not "
                             "match the sizes given: " + ", ".join(f"{n}={given[n]}" for n in dim if n in given))
        for name in dim:
            sizes[name] = given[name] if name in given else extent // known
    # einops only permutes and reshapes; every size was checked above, so it cannot fail on them
    # einops permutes and reshapes; every size was checked above, so it cannot fail on them
    grouped = {name: sizes[name] for dim in dims if len(dim) > 1 for name in dim}
    converted = einops.rearrange(weight, f"{pattern} -> i j d k", **grouped)
    return converted.contiguous()
