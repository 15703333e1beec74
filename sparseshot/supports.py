"""Random gradient supports of SO: k distinct flat indices of a tensor, uniform over k-subsets.

`draw_supports` draws the supports of many tensors at once on one device, without a permutation of
all n entries of a large tensor and without host-device synchronisation (see its docstring for the
sampler and why it is exactly uniform).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["draw_support", "draw_supports"]

# Below this many entries (or 32·k) a support is drawn from a full permutation: O(n) is then O(k).
_SMALL_N = 4096


def draw_support(n: int, k: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """k distinct indices in [0, n), uniform over k-subsets, sorted ascending: (k,) int64 on device."""
    return draw_supports([n], [k], generator, device)[0]


def draw_supports(
    ns: list[int], ks: list[int], generator: torch.Generator, device: torch.device
) -> list[torch.Tensor]:
    """One support per tensor: ks[i] distinct indices in [0, ns[i]), uniform over k-subsets, sorted.

    Small n (≤ max(32·k, 4096)): the first k entries of a random permutation of n, O(k + 4096).

    Larger n, all such tensors at once: sequential sampling with rejection, vectorised. For each
    tensor draw k' = 2k+64 integers r uniform in [0, 2^62); r is valid when r < ⌊2^62/n⌋·n (so
    r mod n is exactly uniform in [0, n); the others, a fraction < n/2^62, are skipped like repeats).
    Keep the first k distinct values in draw order: each kept value is uniform over the values not
    kept before it, so the kept set is uniform over k-subsets (and stays so conditioned on success,
    by symmetry under relabelling [0, n)). Fewer than k distinct values needs more than k+64
    collisions, each draw colliding with probability < k'/n; a Chernoff bound puts that below 1e-85
    for every k at these n. In that event a still-valid (distinct, sorted) but not exactly uniform
    set is used instead, chosen by torch.where, so no host-device synchronisation is needed.
    Cost: three sorts over Σk' values; no tensor of size n.
    """
    out: list[torch.Tensor | None] = [None] * len(ns)
    big: list[int] = []
    for i, (n, k) in enumerate(zip(ns, ks, strict=True)):
        if k == 0:
            out[i] = torch.empty(0, dtype=torch.long, device=device)
        elif n <= max(32 * k, _SMALL_N):
            out[i] = torch.randperm(n, generator=generator, device=device)[:k].sort().values
        else:
            big.append(i)
    if big:
        chosen = _draw_large([ns[i] for i in big], [ks[i] for i in big], generator, device)
        for i, c in zip(big, torch.split(chosen, [ks[i] for i in big]), strict=True):
            out[i] = c
    return [o for o in out if o is not None]


def _draw_large(
    ns: list[int], ks: list[int], generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """The rejection sampler of draw_supports for tensors with n > 32·k: (Σk,) concatenated supports."""
    lay = _draw_layout(tuple(ns), tuple(ks), str(device))
    d = lay["n"].numel()  # Σk' draws
    r = torch.randint(0, 2**62, (d,), generator=generator, device=device)
    valid = r < lay["limit"]
    # Key (tensor, value): Σ_{j<i} n_j + r mod n_i; invalid draws get distinct keys past every tensor.
    key = torch.where(valid, lay["base"] + r % lay["n"], lay["total"] + lay["arange"])
    sk, draw_pos = torch.sort(key, stable=True)  # equal keys keep draw order
    first = torch.ones(d, dtype=torch.bool, device=device)
    first[1:] = sk[1:] != sk[:-1]
    first &= sk < lay["total"]  # first valid occurrence of each value of each tensor
    # Per tensor, first occurrences in draw order, then the rest: tensor i fills [start_i, end_i).
    pkey = torch.where(first, 2 * draw_pos, 2 * lay["end"].index_select(0, draw_pos) - 1)
    pk, by_pos = torch.sort(pkey)
    chosen = sk.index_select(0, by_pos.index_select(0, lay["take"])).sort().values  # (K,) keys
    ok = pk.index_select(0, lay["last"]) % 2 == 0  # (K,) the k-th kept draw is a first occurrence
    # Never-taken fallback: sorted draws in [0, n-k] plus 0..k-1 are distinct and in [0, n).
    fb = lay["base_k"] + r.index_select(0, lay["take"]) % (lay["n_k"] - lay["k_k"] + 1)
    fallback = fb.sort().values + lay["rank_k"]
    return torch.where(ok, chosen, fallback) - lay["base_k"]


@functools.lru_cache(maxsize=16)
def _draw_layout(ns: tuple[int, ...], ks: tuple[int, ...], device: str) -> dict[str, torch.Tensor]:
    """Per-draw and per-kept-entry vectors of _draw_large; they depend on the sizes only."""
    per_draw: dict[str, list[int]] = {"n": [], "limit": [], "base": [], "end": []}
    per_k: dict[str, list[int]] = {"take": [], "last": [], "base_k": [], "n_k": [], "k_k": [], "rank_k": []}
    base = start = 0
    for n, k in zip(ns, ks, strict=True):
        kk = 2 * k + 64
        per_draw["n"] += [n] * kk
        per_draw["limit"] += [(2**62 // n) * n] * kk
        per_draw["base"] += [base] * kk
        per_draw["end"] += [start + kk] * kk
        per_k["take"] += range(start, start + k)
        per_k["last"] += [start + k - 1] * k
        per_k["base_k"] += [base] * k
        per_k["n_k"] += [n] * k
        per_k["k_k"] += [k] * k
        per_k["rank_k"] += range(k)
        base += n
        start += kk
    lists = {**per_draw, **per_k}
    lay = {name: torch.tensor(v, dtype=torch.long, device=device) for name, v in lists.items()}
    lay["arange"] = torch.arange(start, device=device)
    lay["total"] = torch.tensor(base, dtype=torch.long, device=device)
    return lay
