"""SO: Sparse Optimization (Adam on a random gradient support and a top-|m| moment support).

Method of "Sparsity Outperforms Low-Rank Projections in Few-Shot Adaptation" (ICCV 2025). For a
trainable tensor θ with n entries and k = max(1, floor(density·n)):

- S, the gradient support: k distinct flat indices drawn uniformly at random, kept for
  ``refresh_every`` steps and then redrawn.
- M, the moment support (empty before the first step), with Adam moments m, v stored only on M.
- One step with the tensor's global step counter t:
  g = ∂L/∂θ on S (+ weight_decay·θ on S, coupled L2). On U = M ∪ S (m = v = 0 for entries new to U,
  g = 0 off S): m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g²,
  θ_U ← θ_U − lr/(1−β1^t) · m_U / (sqrt(v_U/(1−β2^t)) + eps); then M ← the k entries of U with
  the largest |m| (ties: lower flat index first); moments of the other entries are dropped.

Cost per step and tensor: O(k log k) time and O(k) memory (a few sorts over at most 2k slots),
no dense temporary of θ's size, no host-device synchronisation, and supports are drawn without
a permutation of all n entries.

Gradients reach the optimizer in one of two ways:
- ``so.grad_probe(p)``: a (k,) fp32 leaf tensor; a sparse-gradient backward (sparseshot.sparse_grad)
  writes ∂L/∂θ[S] into ``probe.grad`` without ever forming the dense gradient;
- otherwise ``p.grad`` (dense), gathered at S (what the reference implementation does).

Per-tensor state (``so.state[p]``) of a sparse tensor:
  'step'    int, steps taken by this tensor;
  'support' (k,) int64, S sorted ascending, on p.device;
  'm_idx'   (0,) before the first step, then (k,) int64 sorted ascending: M;
  'm', 'v'  fp32 moments aligned with 'm_idx'.
Tensors of a group with ``dense=True`` get plain Adam (coupled weight decay, as torch.optim.Adam)
with state 'step', 'exp_avg', 'exp_avg_sq' (fp32). Moments are fp32 for every parameter dtype; for
fp16/bf16 parameters the update is computed in fp32 from the current value and rounded once when
written back.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["SO", "draw_support"]

# Below this many entries (or 32·k) a support is drawn from a full permutation: O(n) is then O(k).
_SMALL_N = 4096


def _norm_device(device: torch.device) -> torch.device:
    """'cuda' and 'cuda:0' name the same generator device; give CUDA devices an explicit index."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a tensor (flat indices address its entries in row-major order)."""
    if not t.is_contiguous():
        raise ValueError("SO needs contiguous parameters (flat indices address row-major entries)")
    return t.view(-1)


def draw_support(n: int, k: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """k distinct indices in [0, n), uniform over k-subsets, sorted ascending: (k,) int64 on device.

    Large n (> max(32·k, 4096)): sequential sampling with rejection, vectorised. Draw k' = 2k+64
    integers uniformly with replacement and keep the first k distinct values in draw order. Each
    kept value is uniform over the values not kept before it, so the kept set is uniform over
    k-subsets (and stays so conditioned on success, by symmetry under relabelling [0, n)). Fewer than
    k distinct values among k' draws needs more than k+64 collisions, each draw colliding with
    probability < k'/n; a Chernoff bound puts that below 1e-85 for every k at these n. In that
    event a still-valid (distinct, sorted) but not exactly uniform set is used instead, selected by
    torch.where so that no host-device synchronisation is needed. Cost: three sorts of k' values.

    Small n: the first k entries of a random permutation of n, which is O(k + 4096) here.
    """
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    if n <= max(32 * k, _SMALL_N):
        perm = torch.randperm(n, generator=generator, device=device)
        return perm[:k].sort().values
    kk = 2 * k + 64
    r = torch.randint(0, n, (kk,), generator=generator, device=device)  # (k',) with repeats
    vals, order = torch.sort(r, stable=True)  # equal values keep draw order
    first = torch.ones(kk, dtype=torch.bool, device=device)
    first[1:] = vals[1:] != vals[:-1]  # first occurrence (in draw order) of each value
    # Draw position of each first occurrence; repeats get a key past the end.
    key = torch.where(first, order, torch.full_like(order, kk))
    key_sorted, pos = torch.sort(key)  # (k',) ascending draw positions
    chosen = vals[pos[:k]].sort().values  # (k,) the first k distinct values, sorted
    ok = key_sorted[k - 1] < kk  # 0-d bool: at least k distinct values were drawn
    # Never-taken fallback: sorted draws in [0, n-k] plus 0..k-1 are distinct and in [0, n).
    fallback = (r[:k] % (n - k + 1)).sort().values + torch.arange(k, device=device)
    return torch.where(ok, chosen, fallback)


class SO(Optimizer):
    """Sparse Optimization: Adam restricted to a random gradient support and a top-|m| moment support.

    Args:
        params: parameters or param groups (a group may set ``dense=True`` for plain Adam, and may
            override lr, betas, eps, weight_decay, density, refresh_every).
        lr, betas, eps: Adam hyperparameters (group['lr'] is read at every step, so LR schedulers work).
        weight_decay: coupled L2 (added to the gradient on S, as in the reference implementation).
        density: k = max(1, floor(density·n)) per tensor of n entries.
        refresh_every: S is redrawn after every ``refresh_every`` steps of a tensor.
        generator: torch.Generator for drawing supports. Used directly for parameters on its device;
            parameters on other devices get generators seeded from it. Without one, the global
            torch RNG seeds them (so torch.manual_seed makes runs reproducible).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        density: float = 5e-5,
        refresh_every: int = 5,
        generator: torch.Generator | None = None,
    ) -> None:
        _check_hparams(lr, betas, eps, weight_decay, density, refresh_every)
        # Set before Optimizer.__init__, which calls add_param_group (supports are drawn there).
        self._user_gen = generator
        self._gens: dict[str, torch.Generator] = {}
        self._base_seed: int | None = None
        self._probes: dict[int, torch.Tensor] = {}  # id(param) -> (k,) fp32 leaf
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            density=density,
            refresh_every=refresh_every,
            dense=False,
        )
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- public interface

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hparams(
            group["lr"], group["betas"], group["eps"], group["weight_decay"],
            group["density"], group["refresh_every"],
        )
        if group["dense"]:
            return
        for p in group["params"]:
            if not p.is_floating_point():
                raise ValueError("SO only optimizes floating-point tensors")
            _flat(p)
            self._init_sparse(p, group)

    def sparse_params(self) -> list[torch.Tensor]:
        """Parameters handled sparsely (every parameter of the groups without dense=True)."""
        return [p for g in self.param_groups if not g["dense"] for p in g["params"]]

    def support(self, p: torch.Tensor) -> torch.Tensor:
        """Current gradient support S of a sparse parameter: (k,) int64 flat indices, ascending."""
        return self.state[p]["support"]

    def grad_probe(self, p: torch.Tensor) -> torch.Tensor:
        """(k,) fp32 leaf (zeros, requires_grad) whose .grad is read as ∂L/∂θ[S] by step().

        The object changes when S is redrawn and after load_state_dict: ask for it at every forward.
        """
        return self._probes[id(p)]

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for probe in self._probes.values():
            if probe.grad is None:
                continue
            if set_to_none:
                probe.grad = None
            else:
                probe.grad.detach_().zero_()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if group["dense"]:
                    self._dense_step(p, group)
                else:
                    self._sparse_step(p, group)
        return loss

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        gens = dict(self._gens)
        if self._user_gen is not None:
            gens[str(_norm_device(self._user_gen.device))] = self._user_gen
        sd["so_rng"] = {
            "base_seed": self._base_seed,
            "states": {dev: g.get_state() for dev, g in gens.items()},
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        rng = sd.pop("so_rng", None)
        saved_state = sd["state"]
        saved_groups = sd["param_groups"]
        # Groups (hyperparameters) through Optimizer; the state by hand, because Optimizer would
        # cast every tensor (index tensors and fp32 moments included) to the parameter's dtype.
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        id_map = {
            old: p
            for old_g, g in zip(saved_groups, self.param_groups, strict=True)
            for old, p in zip(old_g["params"], g["params"], strict=True)
        }
        for old, value in saved_state.items():
            if old in id_map:
                p = id_map[old]
                self.state[p] = {
                    key: v.detach().clone().to(p.device) if torch.is_tensor(v) else copy.deepcopy(v)
                    for key, v in value.items()
                }
        if rng is not None:
            self._base_seed = rng["base_seed"]
            for dev, gstate in rng["states"].items():
                self._generator(torch.device(dev), create_only=True).set_state(gstate.clone().cpu())
        for group in self.param_groups:
            if not group["dense"]:
                for p in group["params"]:
                    self._new_probe(p)

    # ----------------------------------------------------------------- internals

    def _generator(self, device: torch.device, create_only: bool = False) -> torch.Generator:
        """The generator for supports of tensors on device (created and seeded on first use)."""
        device = _norm_device(device)
        if self._user_gen is not None and _norm_device(self._user_gen.device) == device:
            return self._user_gen
        key = str(device)
        gen = self._gens.get(key)
        if gen is None:
            if self._base_seed is None:
                self._base_seed = self._draw_base_seed()
            gen = torch.Generator(device=device)
            gen.manual_seed((self._base_seed + 7919 * (1 + len(self._gens))) % (2**63))
            self._gens[key] = gen
        return gen

    def _draw_base_seed(self) -> int:
        # One host read at construction (never inside step()).
        g = self._user_gen
        if g is None:
            return int(torch.randint(0, 2**62, (1,)).item())
        return int(torch.randint(0, 2**62, (1,), generator=g, device=g.device).item())

    def _init_sparse(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        n = p.numel()
        k = min(n, max(1, int(group["density"] * n)))
        state = self.state[p]
        state["step"] = 0
        state["support"] = draw_support(n, k, self._generator(p.device), p.device)
        state["m_idx"] = torch.empty(0, dtype=torch.long, device=p.device)
        state["m"] = torch.empty(0, dtype=torch.float32, device=p.device)
        state["v"] = torch.empty(0, dtype=torch.float32, device=p.device)
        self._new_probe(p)

    def _new_probe(self, p: torch.Tensor) -> None:
        k = self.state[p]["support"].numel()
        self._probes[id(p)] = torch.zeros(k, dtype=torch.float32, device=p.device, requires_grad=True)

    def _support_grad(self, p: torch.Tensor, support: torch.Tensor) -> torch.Tensor | None:
        """g on S, (k,) fp32: the probe's gradient if a sparse backward wrote one, else p.grad at S."""
        probe = self._probes.get(id(p))
        if probe is not None and probe.grad is not None:
            return probe.grad.detach().float()
        if p.grad is None:
            return None
        if p.grad.is_sparse:
            raise RuntimeError("SO does not take sparse-layout gradients; use grad_probe()")
        return _flat(p.grad).index_select(0, support).float()

    def _sparse_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        support = state["support"]  # (k,)
        k = support.numel()
        if k == 0:
            return
        g = self._support_grad(p, support)  # (k,) fp32
        if g is None:
            return
        flat = _flat(p)  # (n,) view of the parameter
        wd = group["weight_decay"]
        if wd != 0:
            g = g + wd * flat.index_select(0, support).float()
        state["step"] += 1
        t = state["step"]
        beta1, beta2 = group["betas"]

        idx, m, v, g_u, merged = _merge(state["m_idx"], state["m"], state["v"], support, g)
        # Adam on the L = |M| + k slots of U (the duplicate slot of a merged pair is ignored below).
        m.mul_(beta1).add_(g_u, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g_u, g_u, value=1 - beta2)
        bc1 = 1 - beta1**t
        bc2 = 1 - beta2**t
        denom = (v / bc2).sqrt_().add_(group["eps"])
        new = flat.index_select(0, idx).float().addcdiv_(m, denom, value=-group["lr"] / bc1)
        new = new.to(p.dtype)  # (L,) rounded once for fp16/bf16
        # A merged pair occupies slots (i, i+1) with the same index: give both slot i+1's value, so
        # the indexed write is well defined (duplicate indices carry identical values).
        new = torch.where(merged, new.roll(-1), new)
        flat.index_put_((idx,), new)

        # M <- top-k of U by |m|; merged duplicates get key -1 and are never selected. A stable
        # descending sort over index-ordered slots breaks ties towards the lower index.
        key = torch.where(merged, torch.full_like(m, -1.0), m.abs())
        order = torch.sort(key, descending=True, stable=True).indices
        keep = order[:k].sort().values  # (k,) slot positions in ascending index order
        state["m_idx"] = idx[keep]
        state["m"] = m[keep]
        state["v"] = v[keep]

        if t % group["refresh_every"] == 0:
            state["support"] = draw_support(p.numel(), k, self._generator(p.device), p.device)
            self._new_probe(p)

    def _dense_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        if p.grad is None:
            return
        if p.grad.is_sparse:
            raise RuntimeError("SO does not take sparse-layout gradients")
        state = self.state[p]
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        state["step"] += 1
        t = state["step"]
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        grad = p.grad.float()
        p32 = p.float() if p.dtype != torch.float32 else p
        if group["weight_decay"] != 0:
            grad = grad.add(p32, alpha=group["weight_decay"])
        # Same operation order as torch.optim.Adam (single-tensor path).
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bc1 = 1 - beta1**t
        bc2_sqrt = math.sqrt(1 - beta2**t)
        denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(group["eps"])
        if p32 is p:
            p.addcdiv_(exp_avg, denom, value=-group["lr"] / bc1)
        else:
            p.copy_(p32.addcdiv_(exp_avg, denom, value=-group["lr"] / bc1))


def _merge(
    m_idx: torch.Tensor, m: torch.Tensor, v: torch.Tensor, support: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay out U = M ∪ S on L = |M| + k slots sorted by flat index.

    M (m_idx, m, v: (|M|,)) and S (support, g: (k,)) each hold distinct indices, so an index occurs
    at most twice, and a stable sort puts its M copy right before its S copy. The S copy (slot i+1)
    takes over the moments of the M copy (slot i); slot i is flagged in ``merged``.
    Returns idx (L,) int64 ascending, m, v, g (L,) fp32 (new tensors), merged (L,) bool.
    """
    km, k = m_idx.numel(), support.numel()
    zeros_k = g.new_zeros(k)
    idx, order = torch.sort(torch.cat([m_idx, support]), stable=True)  # (L,)
    m_u = torch.cat([m, zeros_k])[order]
    v_u = torch.cat([v, zeros_k])[order]
    g_u = torch.cat([g.new_zeros(km), g])[order]
    dup = idx[1:] == idx[:-1]  # (L-1,) slot i and i+1 hold the same index
    no = torch.zeros(1, dtype=torch.bool, device=idx.device)
    merged = torch.cat([dup, no])  # slot i: M copy of a pair (ignored)
    takes = torch.cat([no, dup])  # slot i+1: S copy of a pair (kept)
    m_u = torch.where(takes, m_u.roll(1), m_u)
    v_u = torch.where(takes, v_u.roll(1), v_u)
    return idx, m_u, v_u, g_u, merged


def _check_hparams(
    lr: float, betas: Any, eps: float, weight_decay: float, density: float, refresh_every: Any
) -> None:
    if not lr >= 0.0:
        raise ValueError(f"invalid learning rate: {lr}")
    if not eps >= 0.0:
        raise ValueError(f"invalid eps: {eps}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"invalid betas: {betas} (each in [0, 1))")
    if not weight_decay >= 0.0:
        raise ValueError(f"invalid weight_decay: {weight_decay}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"invalid density: {density} (must be in (0, 1])")
    if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
        raise ValueError(f"invalid refresh_every: {refresh_every} (a positive integer)")
