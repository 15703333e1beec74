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

Cost per step and tensor: O(k log k) time and O(k) memory (binary-search merge of M and S, and
sorts over at most 2k slots), no dense temporary of θ's size, no host-device synchronisation, and
supports are drawn without a permutation of all n entries (`sparseshot.supports`). The tensors of a
param group are processed together (one slot vector for the whole group), so the number of
operations per step does not grow with the number of tensors except for one gather and one scatter
of θ per tensor.

Gradients reach the optimizer in one of two ways:
- ``so.grad_probe(p)``: a (k,) fp32 leaf tensor; a sparse-gradient backward (sparseshot.sparse_grad)
  writes ∂L/∂θ[S] into ``probe.grad`` without ever forming the dense gradient;
- otherwise ``p.grad`` (dense), gathered at S (what the reference implementation does).
The probe wins when both are set.

Per-tensor state (``so.state[p]``) of a sparse tensor:
  'step'    int, steps taken by this tensor;
  'support' (k,) int64, S sorted ascending, on p.device;
  'm_idx'   (0,) before the first step, then (k,) int64 sorted ascending: M;
  'm', 'v'  fp32 moments aligned with 'm_idx';
  'fixed'   True once `fix_support` pinned S (absent otherwise).
('m_idx', 'm', 'v' may be views into one buffer shared by the group: read them, do not write them.)
Tensors of a group with ``dense=True`` get plain Adam (coupled weight decay, as torch.optim.Adam,
bias-corrected once) with state 'step', 'exp_avg', 'exp_avg_sq' (fp32). Moments are fp32 for
every parameter dtype; for fp16/bf16 parameters the update is computed in fp32 from the current
value and rounded once when written back.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from sparseshot.supports import draw_support, draw_supports

__all__ = ["SO", "draw_support", "draw_supports"]

# Sizes of a batch of tensors: (n_i, |M_i|, k_i) each (what a _Layout depends on).
_Sizes = tuple[tuple[int, int, int], ...]


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
        params: ParamsT,
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
        self._layouts: dict[tuple[str, _Sizes], _Layout] = {}
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
        self._redraw(group["params"])

    def sparse_params(self) -> list[torch.Tensor]:
        """Parameters handled sparsely (every parameter of the groups without dense=True)."""
        return [p for g in self.param_groups if not g["dense"] for p in g["params"]]

    def support(self, p: torch.Tensor) -> torch.Tensor:
        """Current gradient support S of a sparse parameter: (k,) int64 flat indices, ascending."""
        return self.state[p]["support"]

    def fix_support(self, p: torch.Tensor, support: torch.Tensor) -> None:
        """From now on train `p` only on `support` ((k,) distinct flat indices): S := support, never
        redrawn, moments cleared. With S fixed, M ⊆ U = S after the first step, so the update is
        plain Adam on those k entries (used to re-train a pruned delta on its kept entries)."""
        state = self.state[p]
        state["support"] = support.to(device=p.device, dtype=torch.long).sort().values
        state["fixed"] = True
        state["m_idx"] = torch.empty(0, dtype=torch.long, device=p.device)
        state["m"] = torch.empty(0, dtype=torch.float32, device=p.device)
        state["v"] = torch.empty(0, dtype=torch.float32, device=p.device)
        self._new_probe(p)

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
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # the closure's loss, as returned
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["dense"]:
                for p in group["params"]:
                    self._dense_step(p, group)
            else:
                self._sparse_group_step(group)
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
        # Groups (hyperparameters) through Optimizer; the state by hand, because Optimizer would
        # cast every tensor (index tensors and fp32 moments included) to the parameter's dtype.
        super().load_state_dict({"state": {}, "param_groups": sd["param_groups"]})
        self._load_param_states(sd["state"], sd["param_groups"])
        if rng is not None:
            self._load_rng(rng)
        for group in self.param_groups:
            if not group["dense"]:
                for p in group["params"]:
                    self._new_probe(p)

    def _load_param_states(self, saved_state: dict[Any, Any], saved_groups: list[dict[str, Any]]) -> None:
        """Per-parameter state copied onto each parameter's device, dtypes kept."""
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

    def _load_rng(self, rng: dict[str, Any]) -> None:
        """The support generators' base seed and states, as `state_dict` saved them ("so_rng")."""
        self._base_seed = rng["base_seed"]
        for dev, gstate in rng["states"].items():
            user = self._user_gen
            if user is not None and str(_norm_device(user.device)) == dev:
                gen = user
            else:
                gen = self._gens.setdefault(dev, torch.Generator(device=torch.device(dev)))
            gen.set_state(gstate.clone().cpu())

    # ----------------------------------------------------------------- internals

    def _generator(self, device: torch.device) -> torch.Generator:
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
        state["support"] = torch.empty(k, dtype=torch.long, device=p.device)  # drawn by _redraw
        state["m_idx"] = torch.empty(0, dtype=torch.long, device=p.device)
        state["m"] = torch.empty(0, dtype=torch.float32, device=p.device)
        state["v"] = torch.empty(0, dtype=torch.float32, device=p.device)

    def _redraw(self, params: list[torch.Tensor]) -> None:
        """Draw a new support S (same k) for each tensor, batched per device; new probes."""
        by_device: dict[str, list[torch.Tensor]] = {}
        for p in params:
            by_device.setdefault(str(p.device), []).append(p)
        for ps in by_device.values():
            device = ps[0].device
            ks = [self.state[p]["support"].numel() for p in ps]
            supports = draw_supports([p.numel() for p in ps], ks, self._generator(device), device)
            for p, s in zip(ps, supports, strict=True):
                self.state[p]["support"] = s
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

    def _sparse_group_step(self, group: dict[str, Any]) -> None:
        """One step for the sparse tensors of a group, batched over tensors sharing device and t.

        Tensors are laid out one after the other in a single slot vector, so the sorts and the Adam
        arithmetic run once per batch rather than once per tensor; only the gather/scatter of θ
        stays per tensor. Element for element this is the per-tensor algorithm of the module
        docstring (segments never mix: their keys are offset by the sizes of the tensors before).
        """
        batches: dict[tuple[str, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p in group["params"]:
            state = self.state[p]
            if state["support"].numel() == 0:
                continue
            g = self._support_grad(p, state["support"])  # (k,) fp32
            if g is not None:
                batches.setdefault((str(p.device), state["step"] + 1), []).append((p, g))
        for (_, t), items in batches.items():
            self._sparse_batch_step(group, t, [p for p, _ in items], [g for _, g in items])
            if t % group["refresh_every"] == 0:
                self._redraw([p for p, _ in items if not self.state[p].get("fixed", False)])

    def _sparse_batch_step(
        self, group: dict[str, Any], t: int, params: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> None:
        """One step of tensors sharing device and step count t: U, Adam on U, then M := top-|m| of U."""
        states = [self.state[p] for p in params]
        for st in states:
            st["step"] = t
        flats = [_flat(p) for p in params]  # (n_i,) views
        lay = self._layout(params, states)
        u = _union(states, grads, lay)
        _adam_on_union(group, t, params, flats, lay, u)
        _keep_top_moments(states, lay, u)

    def _layout(self, params: list[torch.Tensor], states: list[dict[str, Any]]) -> _Layout:
        """Index vectors that depend only on the tensors' sizes (cached; rebuilt when they change)."""
        sizes: _Sizes = tuple((p.numel(), st["m_idx"].numel(), st["support"].numel()) for p, st in zip(
            params, states, strict=True))
        device = params[0].device
        cache_key = (str(device), sizes)
        lay = self._layouts.get(cache_key)
        if lay is None:
            if len(self._layouts) > 32:
                self._layouts.clear()
            lay = _Layout(sizes, device)
            self._layouts[cache_key] = lay
        return lay

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


class _Union(NamedTuple):
    """U = M ∪ S of a batch of tensors on L = KM + K slots (KM = Σ|M_i|, K = Σk_i), sorted by
    (tensor, flat index).

    Every field is (L,). A pair of slots (i, i+1) with the same index comes from M (slot i) and S
    (slot i+1): slot i+1 carries the moments and slot i is `merged` (ignored).
    """

    local: torch.Tensor  # int64 flat index within its tensor
    order: torch.Tensor  # int64 position of each slot in the concatenation [M..., S...]
    m: torch.Tensor  # fp32 first moments (0 for entries new to U)
    v: torch.Tensor  # fp32 second moments (0 for entries new to U)
    g: torch.Tensor  # fp32 gradient (0 off S)
    merged: torch.Tensor  # bool


def _union(states: list[dict[str, Any]], grads: list[torch.Tensor], lay: _Layout) -> _Union:
    """U of every tensor of the batch, with moments and gradients aligned to its slots."""
    # Sort key (tensor, flat index): key = Σ_{j<i} n_j + index, so tensors never mix. The stable sort
    # puts the M copy of an index shared by M and S right before its S copy.
    m_key = torch.cat([st["m_idx"] for st in states]) + lay.m_offset  # (KM,)
    s_key = torch.cat([st["support"] for st in states]) + lay.s_offset  # (K,)
    key, order = torch.sort(torch.cat([m_key, s_key]), stable=True)  # order: into [M..., S...]
    local = key - lay.offset
    zeros_k = lay.zeros_k
    m = torch.cat([*(st["m"] for st in states), zeros_k]).index_select(0, order)
    v = torch.cat([*(st["v"] for st in states), zeros_k]).index_select(0, order)
    g = torch.cat([lay.zeros_km, *grads]).index_select(0, order)
    # Of a pair with the same key, slot i+1 takes the moments; slot i is flagged `merged`.
    dup = key[1:] == key[:-1]
    no = lay.no
    merged = torch.cat([dup, no])
    takes = torch.cat([no, dup])
    m = torch.where(takes, m.roll(1), m)
    v = torch.where(takes, v.roll(1), v)
    return _Union(local, order, m, v, g, merged)


def _adam_on_union(
    group: dict[str, Any], t: int, params: list[torch.Tensor], flats: list[torch.Tensor], lay: _Layout,
    u: _Union,
) -> None:
    """Bias-corrected Adam on U: updates u.m and u.v in place and writes θ_U into the parameters."""
    beta1, beta2 = group["betas"]
    wd = group["weight_decay"]
    local_parts = torch.split(u.local, lay.slots)  # per tensor, (L_i,) ascending
    theta = torch.cat([f.index_select(0, i) for f, i in zip(flats, local_parts, strict=True)])
    theta = theta.float()  # (L,) θ_U
    g = u.g
    if wd != 0:
        g = torch.where(u.order >= lay.km, g + wd * theta, g)  # coupled L2 on S
    m, v = u.m, u.v
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1 = 1 - beta1**t
    bc2 = 1 - beta2**t
    denom = _sqrt_(v / bc2).add_(group["eps"])
    new = theta.addcdiv_(m, denom, value=-group["lr"] / bc1)  # (L,) fp32
    # Both slots of a merged pair get slot i+1's value: the indexed write below is then well
    # defined although the index occurs twice.
    new = torch.where(u.merged, new.roll(-1), new)
    for p, f, i, x in zip(params, flats, local_parts, torch.split(new, lay.slots), strict=True):
        _index_assign_(f, i, x.to(p.dtype))  # fp16/bf16: rounded once here


def _keep_top_moments(states: list[dict[str, Any]], lay: _Layout, u: _Union) -> None:
    """M_i := the k_i entries of U_i with the largest |m| (ties: lower index), moments kept on M_i."""
    # One stable sort on (tensor, |m| descending): the bit pattern of a non-negative fp32 orders like
    # its value; merged duplicates sort after every real entry and are never selected; ties keep
    # slot order, i.e. the lower index first.
    bits = u.m.abs().view(torch.int32).long()  # (L,) in [0, 2^31)
    rank_key = lay.seg_base + torch.where(u.merged, lay.last_rank, 2**31 - 1 - bits)
    ranked = torch.sort(rank_key, stable=True).indices
    keep = ranked.index_select(0, lay.take).sort().values  # (K,) slots, ascending per tensor
    for st, mi, mm, vv in zip(
        states,
        torch.split(u.local.index_select(0, keep), lay.ks),
        torch.split(u.m.index_select(0, keep), lay.ks),
        torch.split(u.v.index_select(0, keep), lay.ks),
        strict=True,
    ):
        st["m_idx"], st["m"], st["v"] = mi, mm, vv


def _sqrt_(x: torch.Tensor) -> torch.Tensor:
    """In-place sqrt (correctly rounded either way).

    On CPU, torch's sqrt goes through a vector-math library that may wake worker threads even for
    a few thousand entries, which on a busy machine costs milliseconds; NumPy's sqrt on the same
    memory is single-threaded and gives the same IEEE result."""
    if x.device.type == "cpu" and x.is_contiguous():
        arr = x.numpy()
        np.sqrt(arr, out=arr)
        return x
    return x.sqrt_()


def _index_assign_(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    """dst[idx] = src for 1-D tensors (a repeated index always carries the same value).

    index_copy_ is serial on CPU for small sizes; on CUDA index_put_ has a deterministic mode."""
    if dst.device.type == "cpu":
        dst.index_copy_(0, idx, src)
    else:
        dst.index_put_((idx,), src)


class _Layout:
    """Index vectors of a batch of tensors with sizes [(n_i, |M_i|, k_i)]; they depend on sizes only.

    Slots are U's entries sorted by (tensor, index); tensor i owns L_i = |M_i| + k_i consecutive
    slots. offset (L,): Σ_{j<i} n_j of each slot's tensor; m_offset (KM,), s_offset (K,): the same
    for the concatenated M and S entries; seg_base (L,): tensor number · 2^32 (rank-key high bits);
    take (K,): the first k_i slots of each tensor's range; slots = [L_i], ks = [k_i].
    """

    def __init__(self, sizes: _Sizes, device: torch.device) -> None:
        self.slots = [km + k for _, km, k in sizes]
        self.ks = [k for _, _, k in sizes]
        self.km = sum(km for _, km, _ in sizes)
        offset: list[int] = []
        m_offset: list[int] = []
        s_offset: list[int] = []
        seg_base: list[int] = []
        take: list[int] = []
        base = start = 0
        for i, ((n, km, k), length) in enumerate(zip(sizes, self.slots, strict=True)):
            offset += [base] * length
            m_offset += [base] * km
            s_offset += [base] * k
            seg_base += [i << 32] * length
            take += range(start, start + k)
            base += n
            start += length
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)
        self.offset, self.m_offset, self.s_offset = as_long(offset), as_long(m_offset), as_long(s_offset)
        self.seg_base, self.take = as_long(seg_base), as_long(take)
        self.last_rank = torch.tensor(2**32 - 1, dtype=torch.long, device=device)  # after any |m|
        self.zeros_k = torch.zeros(sum(self.ks), dtype=torch.float32, device=device)
        self.zeros_km = torch.zeros(self.km, dtype=torch.float32, device=device)
        self.no = torch.zeros(1, dtype=torch.bool, device=device)


def _check_hparams(
    lr: float, betas: Sequence[float], eps: float, weight_decay: float, density: float, refresh_every: object
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
