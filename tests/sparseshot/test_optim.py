"""SO optimizer: against a dense masked-Adam reference, supports, moments, dtypes, schedulers, resume."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from sparseshot.optim import SO, draw_support, draw_supports


def _grads(shape: tuple[int, ...], steps: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


class DenseReference:
    """The method's formulas on dense tensors and boolean masks (M, S) — no index tricks."""

    def __init__(self, theta: torch.Tensor, k: int, lr: float, betas, eps: float, wd: float) -> None:
        self.theta = theta.detach().clone().reshape(-1)  # (n,)
        n = self.theta.numel()
        self.m = torch.zeros(n)
        self.v = torch.zeros(n)
        self.in_m = torch.zeros(n, dtype=torch.bool)
        self.k, self.lr, self.betas, self.eps, self.wd, self.t = k, lr, betas, eps, wd, 0

    def step(self, grad: torch.Tensor, support: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.t += 1
        in_s = torch.zeros_like(self.in_m)
        in_s[support] = True
        g = torch.where(in_s, grad.reshape(-1) + self.wd * self.theta, torch.zeros_like(self.theta))
        in_u = self.in_m | in_s
        zero = torch.zeros_like(self.m)
        self.m = torch.where(in_u, b1 * self.m + (1 - b1) * g, zero)
        self.v = torch.where(in_u, b2 * self.v + (1 - b2) * g * g, zero)
        bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
        upd = self.lr / bc1 * self.m / ((self.v / bc2).sqrt() + self.eps)
        self.theta = torch.where(in_u, self.theta - upd, self.theta)
        # M <- top-k of U by |m|, ties towards the lower index (plain Python sort).
        cand = in_u.nonzero().flatten().tolist()
        cand.sort(key=lambda i: (-abs(float(self.m[i])), i))
        self.in_m = torch.zeros_like(self.in_m)
        self.in_m[torch.tensor(cand[: self.k], dtype=torch.long)] = True
        self.m = torch.where(self.in_m, self.m, zero)
        self.v = torch.where(self.in_m, self.v, zero)


@pytest.mark.parametrize("shape,wd", [((40, 50), 0.0), ((40, 50), 0.1), ((300,), 0.05)])
def test_matches_dense_reference(shape, wd) -> None:
    p = torch.nn.Parameter(torch.randn(shape))
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
    so = SO([p], density=0.05, refresh_every=4, generator=torch.Generator().manual_seed(3), **kw)
    k = so.support(p).numel()
    assert k == int(0.05 * p.numel())
    ref = DenseReference(p, k, kw["lr"], kw["betas"], kw["eps"], wd)
    for t, grad in enumerate(_grads(shape, 60), start=1):
        support = so.support(p).clone()
        before = p.detach().clone().reshape(-1)
        u = torch.cat([so.state[p]["m_idx"], support])
        p.grad = grad.clone()
        so.step()
        ref.step(grad, support)
        st = so.state[p]
        assert st["step"] == t
        torch.testing.assert_close(p.detach().reshape(-1), ref.theta, rtol=0, atol=1e-6)
        # M: exactly the reference's top-k set, sorted, with matching moments; |M| <= k.
        assert st["m_idx"].numel() <= k
        assert torch.equal(st["m_idx"], ref.in_m.nonzero().flatten())
        torch.testing.assert_close(st["m"], ref.m[st["m_idx"]], rtol=0, atol=1e-6)
        torch.testing.assert_close(st["v"], ref.v[st["m_idx"]], rtol=0, atol=1e-6)
        # Only entries of U = M ∪ S changed.
        changed = (p.detach().reshape(-1) != before).nonzero().flatten()
        assert torch.isin(changed, u).all()
        # S is redrawn exactly after every refresh_every steps.
        assert torch.equal(so.support(p), support) == (t % 4 != 0)


def test_several_tensors_match_reference() -> None:
    # One optimizer over tensors of different shapes; one of them skips some steps (no gradient),
    # so tensors at different step counts are batched separately.
    shapes = [(40, 50), (300,), (7, 3, 5), (64, 64)]
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    so = SO(ps, lr=1e-2, density=0.03, refresh_every=3, weight_decay=0.02,
            generator=torch.Generator().manual_seed(5))
    refs = [DenseReference(p, so.support(p).numel(), 1e-2, (0.9, 0.999), 1e-8, 0.02) for p in ps]
    grads = [_grads(s, 25, seed=i) for i, s in enumerate(shapes)]
    for t in range(25):
        supports = [so.support(p).clone() for p in ps]
        for i, p in enumerate(ps):
            p.grad = None if (i == 1 and t % 4 == 1) else grads[i][t].clone()
        so.step()
        for i, p in enumerate(ps):
            if p.grad is not None:
                refs[i].step(grads[i][t], supports[i])
            torch.testing.assert_close(p.detach().reshape(-1), refs[i].theta, rtol=0, atol=1e-6)
            assert torch.equal(so.state[p]["m_idx"], refs[i].in_m.nonzero().flatten())
    assert so.state[ps[0]]["step"] == 25 and so.state[ps[1]]["step"] == 19


def test_top_k_tie_break_prefers_lower_index() -> None:
    # beta1 = 0 makes m = g: a zero gradient after the first step ties every entry of U at |m| = 0.
    p = torch.nn.Parameter(torch.zeros(100))
    so = SO([p], lr=0.1, betas=(0.0, 0.999), density=0.04, refresh_every=1,
            generator=torch.Generator().manual_seed(0))
    p.grad = torch.ones(100)
    so.step()
    u = torch.cat([so.state[p]["m_idx"], so.support(p)]).unique()  # sorted, > 4 entries
    assert u.numel() > 4
    p.grad = torch.zeros(100)
    so.step()
    assert torch.equal(so.state[p]["m_idx"], u[:4])


def test_support_properties_and_probe() -> None:
    w = torch.nn.Parameter(torch.randn(30, 20))
    b = torch.nn.Parameter(torch.randn(20))
    so = SO([{"params": [w]}, {"params": [b], "dense": True}], density=0.1)
    assert so.sparse_params() == [w]
    s = so.support(w)
    assert s.dtype == torch.long and s.numel() == 60
    assert torch.equal(s, s.unique()) and 0 <= int(s.min()) and int(s.max()) < 600
    probe = so.grad_probe(w)
    assert probe.shape == (60,) and probe.dtype == torch.float32
    assert probe.is_leaf and probe.requires_grad and not probe.any()
    (probe * 2).sum().backward()
    so.zero_grad()
    assert probe.grad is None
    (probe * 2).sum().backward()
    so.zero_grad(set_to_none=False)
    assert probe.grad is not None and not probe.grad.any()


@pytest.mark.parametrize("n,k", [(10, 3), (10, 10), (5000, 2), (100_000, 50), (1_000_000, 1)])
def test_draw_support_distinct_sorted(n, k) -> None:
    gen = torch.Generator().manual_seed(n + k)
    for _ in range(20):
        s = draw_support(n, k, gen, torch.device("cpu"))
        assert s.shape == (k,) and s.dtype == torch.long
        assert torch.equal(s, s.unique()) and int(s.min()) >= 0 and int(s.max()) < n


def test_draw_supports_batched() -> None:
    ns, ks = [10, 100_000, 5000, 70_000, 4096], [3, 40, 1, 0, 200]
    out = draw_supports(ns, ks, torch.Generator().manual_seed(0), torch.device("cpu"))
    for s, n, k in zip(out, ns, ks, strict=True):
        assert s.shape == (k,) and torch.equal(s, s.unique())
        assert k == 0 or (int(s.min()) >= 0 and int(s.max()) < n)


def test_draw_support_fallback_is_distinct(monkeypatch) -> None:
    # Force the (never observed) case of too few distinct draws: every draw is the same value.
    real = torch.randint
    monkeypatch.setattr(torch, "randint", lambda low, high, size, **kw: real(0, 1, size, **kw) + 12345)
    s = draw_support(100_000, 50, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert s.shape == (50,) and torch.equal(s, s.unique()) and int(s.max()) < 100_000


def test_draw_support_is_uniform() -> None:
    # Rejection path (n > 4096): marginals uniform over 10 bins, and adjacent pairs not avoided.
    gen = torch.Generator().manual_seed(0)
    n, k, draws = 5000, 4, 4000
    samples = torch.stack([draw_support(n, k, gen, torch.device("cpu")) for _ in range(draws)])
    counts = torch.bincount(samples.flatten() * 10 // n, minlength=10).double()
    expected = draws * k / 10
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.9  # p = 0.001 for 9 degrees of freedom
    # A uniform 4-subset of 5000 has two neighbours within distance 3 with prob ≈ 1 - (1-6/5000)^6.
    gaps = samples.diff(dim=1).min(dim=1).values
    frac = float((gaps <= 3).double().mean())
    assert 0.002 < frac < 0.02


def test_first_step_uses_support_drawn_at_construction_and_generator_seeds() -> None:
    make = lambda seed: SO([torch.nn.Parameter(torch.zeros(4000))], density=0.01,
                           generator=torch.Generator().manual_seed(seed))
    a, b, c = make(1), make(1), make(2)
    pa, pb, pc = (o.param_groups[0]["params"][0] for o in (a, b, c))
    assert torch.equal(a.support(pa), b.support(pb))
    assert not torch.equal(a.support(pa), c.support(pc))
    torch.manual_seed(5)
    d = SO([pa], density=0.01)
    torch.manual_seed(5)
    e = SO([pb], density=0.01)
    assert torch.equal(d.support(pa), e.support(pb))


def test_probe_path_equals_dense_grad_path() -> None:
    p1 = torch.nn.Parameter(torch.randn(25, 40))
    p2 = torch.nn.Parameter(p1.detach().clone())
    kw = dict(lr=1e-2, density=0.05, refresh_every=3, weight_decay=0.01)
    o1 = SO([p1], generator=torch.Generator().manual_seed(9), **kw)
    o2 = SO([p2], generator=torch.Generator().manual_seed(9), **kw)
    for grad in _grads((25, 40), 20):
        o1.zero_grad()
        o2.zero_grad()
        p1.grad = grad.clone()
        probe = o2.grad_probe(p2)
        # What a sparse backward does: dL/dθ[S] into probe.grad; p2.grad stays None.
        (probe * grad.reshape(-1)[o2.support(p2)]).sum().backward()
        assert p2.grad is None
        o1.step()
        o2.step()
        assert torch.equal(p1, p2)
        assert torch.equal(o1.support(p1), o2.support(p2))


def test_dense_group_equals_torch_adam() -> None:
    p1 = torch.nn.Parameter(torch.randn(7, 9))
    p2 = torch.nn.Parameter(p1.detach().clone())
    so = SO([{"params": [p1], "dense": True}], lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)
    adam = torch.optim.Adam([p2], lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)
    for grad in _grads((7, 9), 30):
        p1.grad, p2.grad = grad.clone(), grad.clone()
        so.step()
        adam.step()
    torch.testing.assert_close(p1, p2, rtol=0, atol=1e-6)
    assert so.sparse_params() == []


def test_lr_scheduler_changes_effective_lr() -> None:
    ps = [torch.nn.Parameter(torch.ones(2000)) for _ in range(3)]
    opts = [SO([p], lr=lr, density=0.01, generator=torch.Generator().manual_seed(0))
            for p, lr in zip(ps, (1e-2, 2e-2, 1e-2), strict=True)]
    sched = torch.optim.lr_scheduler.LambdaLR(opts[1], lambda epoch: 0.5)  # 2e-2 * 0.5 = 1e-2
    zero = torch.optim.lr_scheduler.LambdaLR(opts[2], lambda epoch: 0.0 if epoch >= 3 else 1.0)
    for step, grad in enumerate(_grads((2000,), 8)):
        for p, o in zip(ps, opts, strict=True):
            p.grad = grad.clone()
            before = p.detach().clone()
            o.step()
            if o is opts[2] and step >= 3:
                assert torch.equal(p, before)
        sched.step()
        zero.step()
    assert torch.equal(ps[0], ps[1])
    assert not torch.equal(ps[0], ps[2])


def _run(p: torch.Tensor, so: SO, grads: list[torch.Tensor]) -> None:
    for grad in grads:
        so.zero_grad()
        p.grad = grad.clone()
        so.step()


def test_state_dict_round_trip_resumes_bit_exact() -> None:
    w = torch.nn.Parameter(torch.randn(30, 40))
    b = torch.nn.Parameter(torch.randn(40))
    params = [{"params": [w]}, {"params": [b], "dense": True, "lr": 3e-3}]
    so = SO(params, lr=1e-2, density=0.02, refresh_every=3, weight_decay=0.01,
            generator=torch.Generator().manual_seed(4))
    grads_w, grads_b = _grads((30, 40), 17, seed=2), _grads((40,), 17, seed=3)
    for gw, gb in zip(grads_w[:7], grads_b[:7], strict=True):
        so.zero_grad()
        w.grad, b.grad = gw.clone(), gb.clone()
        so.step()
    buf = io.BytesIO()
    torch.save(so.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)

    w2 = torch.nn.Parameter(w.detach().clone())
    b2 = torch.nn.Parameter(b.detach().clone())
    so2 = SO([{"params": [w2]}, {"params": [b2], "dense": True}], lr=5.0, density=0.02,
             refresh_every=3, weight_decay=0.01, generator=torch.Generator().manual_seed(99))
    so2.load_state_dict(saved)
    assert so2.param_groups[1]["lr"] == 3e-3 and so2.param_groups[0]["lr"] == 1e-2
    st, st2 = so.state[w], so2.state[w2]
    assert st2["support"].dtype == torch.long and st2["m"].dtype == torch.float32
    assert torch.equal(st["support"], st2["support"]) and torch.equal(st["m_idx"], st2["m_idx"])
    assert so2.grad_probe(w2).numel() == st2["support"].numel()
    for gw, gb in zip(grads_w[7:], grads_b[7:], strict=True):
        for o, ww, bb in ((so, w, b), (so2, w2, b2)):
            o.zero_grad()
            ww.grad, bb.grad = gw.clone(), gb.clone()
            o.step()
        assert torch.equal(w, w2) and torch.equal(b, b2)
        assert torch.equal(so.support(w), so2.support(w2))


def test_state_dict_is_a_snapshot() -> None:
    p = torch.nn.Parameter(torch.randn(500))
    so = SO([p], lr=1e-2, density=0.02, refresh_every=2)
    _run(p, so, _grads((500,), 3))
    saved = copy.deepcopy(so.state_dict())
    q = torch.nn.Parameter(p.detach().clone())
    so2 = SO([q], lr=1e-2, density=0.02, refresh_every=2)
    so2.load_state_dict(saved)
    grads = _grads((500,), 6, seed=7)
    _run(p, so, grads)
    _run(q, so2, grads)
    assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_params(dtype) -> None:
    p32 = torch.nn.Parameter(torch.randn(40, 30))
    plo = torch.nn.Parameter(p32.detach().to(dtype))
    kw = dict(lr=1e-2, density=0.05, refresh_every=4)
    o32 = SO([p32], generator=torch.Generator().manual_seed(1), **kw)
    olo = SO([plo], generator=torch.Generator().manual_seed(1), **kw)
    start = plo.detach().clone()
    for grad in _grads((40, 30), 12):
        p32.grad, plo.grad = grad.clone(), grad.to(dtype)
        o32.step()
        olo.step()
    assert plo.dtype == dtype and olo.state[plo]["m"].dtype == torch.float32
    assert torch.isfinite(plo.float()).all()
    assert (plo != start).sum() > 0
    torch.testing.assert_close(plo.float(), p32.detach(), rtol=0.02, atol=0.02)


def test_skips_params_without_grad_and_validates() -> None:
    p = torch.nn.Parameter(torch.randn(100))
    so = SO([p], density=0.1)
    so.step()
    assert so.state[p]["step"] == 0
    for bad in (dict(lr=-1.0), dict(density=0.0), dict(density=1.5), dict(refresh_every=0),
                dict(betas=(1.0, 0.9)), dict(weight_decay=-0.1)):
        with pytest.raises(ValueError):
            SO([torch.nn.Parameter(torch.randn(10))], **bad)


@pytest.mark.parametrize("use_probe", [True, False])
def test_step_allocates_no_dense_temporary(use_probe) -> None:
    from torch.profiler import ProfilerActivity, profile

    p = torch.nn.Parameter(torch.randn(1024, 1024))  # 4 MiB
    so = SO([p], density=1e-3, refresh_every=2)
    k = so.support(p).numel()
    grad = torch.randn(1024, 1024)

    def step() -> None:
        if use_probe:
            so.grad_probe(p).grad = torch.randn(k)
        else:
            p.grad = grad
        so.step()

    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(4):  # two of them redraw S
            step()
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert largest < p.numel() * 4 // 16  # O(k) buffers only (k = 1048 here)


def test_mixed_dtypes_in_one_group() -> None:
    ps = [torch.nn.Parameter(torch.randn(s).to(dt)) for s, dt in
          (((50, 50), torch.float16), ((60,), torch.bfloat16), ((70,), torch.float32))]
    so = SO(ps, lr=1e-2, density=0.1, refresh_every=2)
    for _ in range(5):
        for p in ps:
            p.grad = torch.randn_like(p)
        so.step()
    for p, dt in zip(ps, (torch.float16, torch.bfloat16, torch.float32), strict=True):
        assert p.dtype == dt and torch.isfinite(p.float()).all()
        assert so.state[p]["m"].dtype == torch.float32 and so.state[p]["step"] == 5


def test_fixed_support_is_adam_on_those_entries_and_never_redrawn():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(10, 20))
    ref = torch.nn.Parameter(w.detach().clone().view(-1)[[3, 50, 51, 199]])
    so = SO([w], lr=1e-2, density=0.2, refresh_every=1, generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([199, 3, 51, 50])
    so.fix_support(w, keep)
    adam = torch.optim.Adam([ref], lr=1e-2)
    before = w.detach().clone()
    for _ in range(4):
        g = torch.randn(10, 20)
        w.grad = g.clone()
        so.step()
        ref.grad = g.view(-1)[[3, 50, 51, 199]].clone()
        adam.step()
        assert so.support(w).tolist() == [3, 50, 51, 199]  # refresh_every=1, still the same support
    changed = (w.detach() != before).view(-1).nonzero().view(-1).tolist()
    assert changed == [3, 50, 51, 199]
    torch.testing.assert_close(w.detach().view(-1)[[3, 50, 51, 199]], ref.detach(), rtol=1e-6, atol=1e-7)
