"""Convex reformulation and optimal pruning of two-layer ReLU networks (Pilanci & Ergen, ICML'20; Mishkin & Pilanci,
"Optimal sets and solution paths of ReLU networks", ICML'23).

A two-layer ReLU net on data X (n, d) is f(X) = Σ_j (X w_j)₊ α_j. With weight decay (β/2)Σ_j(‖w_j‖² + α_j²), which
at a balanced net (‖w_j‖ = |α_j|, a rescaling that leaves f unchanged) equals β Σ_j ‖w_j‖·|α_j|, training is
equivalent to the convex program over activation patterns D_i = diag(1[X u_i ≥ 0]):

    min ½‖Σ_i D_i X (v_i − u_i) − y‖² + β Σ_i (‖v_i‖ + ‖u_i‖)   s.t. (2D_i − I) X v_i ≥ 0, (2D_i − I) X u_i ≥ 0,

a neuron with α > 0 mapping to v_i = w·|α| and one with α < 0 to u_i (same pattern, same sign: one variable, as
neurons of one pattern and sign add up exactly). Optimal pruning walks the solution set without leaving it: while
the active neurons' fits f_i = ±D_i X v_i are linearly dependent, a null vector η (Σ η_i f_i = 0) scales each
v_i by c_i = 1 − tη_i ≥ 0 (the cone constraints are kept, f(X) is unchanged, the penalty Σ c_i‖v_i‖ falls or
stays when η points along the penalties), t growing until a c_i reaches 0 and that neuron goes. It ends with
linearly independent fits, at most rank ≤ n neurons: the minimal network of the solution.

Scope in darwinfront: the supported families (Llama, Mistral, Qwen2) all use gated SiLU MLPs,
down(act(gate x) ⊙ up x), which are not two-layer ReLU networks (the product with `up` breaks the convex
reformulation even with a ReLU `act`), so this is not registered as a criterion; it serves two-layer ReLU nets,
tested where the minimal network is known. The convex program itself is not solved here (no solver is a
dependency); a trained net is mapped into it and pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ReluNet:
    """f(X) = Σ_j (X w_j)₊ α_j: first-layer weights `w` (m, d), second-layer weights `alpha` (m,)."""

    w: torch.Tensor
    alpha: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.w.T).clamp_min(0) @ self.alpha  # (n,)

    @property
    def neurons(self) -> int:
        return self.w.shape[0]

    def objective(self, x: torch.Tensor, y: torch.Tensor, beta: float) -> float:
        """½‖f(X) − y‖² + (β/2)·Σ_j (‖w_j‖² + α_j²)."""
        fit = 0.5 * (self(x) - y).pow(2).sum()
        return (fit + 0.5 * beta * (self.w.pow(2).sum() + self.alpha.pow(2).sum())).item()


def balanced(net: ReluNet) -> ReluNet:
    """The same function with every neuron rescaled to ‖w_j‖ = |α_j| (the least weight decay it can have)."""
    scale = (net.alpha.abs() / net.w.norm(dim=1).clamp_min(1e-300)).sqrt()  # (m,)
    return ReluNet(net.w * scale[:, None], net.alpha / scale)


@dataclass(frozen=True)
class ConvexForm:
    """A point of the convex program: one variable per (activation pattern, sign).

    Attributes:
        patterns: (p, n) bool, D_i's diagonal on the data.
        v: (p, d) the variables (a neuron's w·|α|).
        signs: (p,) +1 for a v_i (α > 0), −1 for a u_i (α < 0).
    """

    patterns: torch.Tensor
    v: torch.Tensor
    signs: torch.Tensor

    @property
    def neurons(self) -> int:
        return self.v.shape[0]

    def fits(self, x: torch.Tensor) -> torch.Tensor:
        """(n, p) each variable's signed contribution ±D_i X v_i."""
        return (self.patterns.T.to(x.dtype) * (x @ self.v.T)) * self.signs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fits(x).sum(1)

    def penalty(self) -> float:
        return self.v.norm(dim=1).sum().item()

    def objective(self, x: torch.Tensor, y: torch.Tensor, beta: float) -> float:
        """½‖Σ_i ±D_i X v_i − y‖² + β Σ_i ‖v_i‖."""
        return (0.5 * (self(x) - y).pow(2).sum()).item() + beta * self.penalty()

    def feasible(self, x: torch.Tensor, tol: float = 1e-9) -> bool:
        """Whether every (2D_i − I) X v_i ≥ 0, i.e. each variable's pattern is its own."""
        sign = self.patterns.T.to(x.dtype) * 2 - 1  # (n, p)
        return bool(((x @ self.v.T) * sign >= -tol).all())


def to_convex(net: ReluNet, x: torch.Tensor) -> ConvexForm:
    """The convex program's point of `net` on data `x`; neurons of one pattern and sign are added together.

    Its objective equals `net`'s at the balanced net (`balanced(net)`), for any β.
    """
    patterns = x @ net.w.T >= 0  # (n, m)
    signs = torch.sign(net.alpha)
    v = net.w * net.alpha.abs()[:, None]  # (m, d)
    keys: dict[tuple, int] = {}
    rows: list[torch.Tensor] = []
    pats, sgns = [], []
    for j in range(net.neurons):
        if signs[j] == 0 or v[j].abs().max() == 0:
            continue
        key = (int(signs[j]), tuple(patterns[:, j].tolist()))
        if key in keys:
            rows[keys[key]] = rows[keys[key]] + v[j]
        else:
            keys[key] = len(rows)
            rows.append(v[j])
            pats.append(patterns[:, j])
            sgns.append(signs[j])
    if not rows:
        return ConvexForm(torch.zeros(0, x.shape[0], dtype=torch.bool), x.new_zeros(0, x.shape[1]), x.new_zeros(0))
    return ConvexForm(torch.stack(pats), torch.stack(rows), torch.stack(sgns))


def from_convex(form: ConvexForm) -> ReluNet:
    """The balanced ReLU net of a convex point: one neuron per variable, w = v/√‖v‖, α = ±√‖v‖."""
    norm = form.v.norm(dim=1)  # (p,)
    root = norm.sqrt()
    return ReluNet(form.v / root[:, None], form.signs * root)


def prune(form: ConvexForm, x: torch.Tensor, *, rtol: float = 1e-10) -> ConvexForm:
    """Optimal pruning: remove variables along null directions of their fits until the fits are independent.

    The output on `x` is unchanged and the penalty never grows, so a point of the solution set stays in it, with at
    most rank(fits) ≤ n neurons. `rtol` sets the singular-value cut that decides dependence.
    """
    v, patterns, signs = form.v.clone(), form.patterns, form.signs
    keep = torch.ones(form.neurons, dtype=torch.bool)
    while keep.any():
        active = keep.nonzero().squeeze(1)
        current = ConvexForm(patterns[active], v[active], signs[active])
        fits = current.fits(x)  # (n, a)
        _, s, vh = torch.linalg.svd(fits, full_matrices=True)
        big = s.max() if s.numel() else fits.new_tensor(0.0)
        rank = int((s > rtol * big).sum())
        if rank == active.numel():
            break
        eta = vh[-1]  # (a,) a null vector: fits @ eta ≈ 0
        eta = torch.where(eta.abs() > rtol * eta.abs().max(), eta, 0.0)  # rounding noise would steer the sign
        penalties = current.v.norm(dim=1)
        if penalties @ eta < 0 or (penalties @ eta == 0 and eta.max() <= 0):
            eta = -eta
        up = eta > 0
        ratios = torch.full_like(eta, float("inf"))
        ratios[up] = 1.0 / eta[up]
        t = ratios.min()
        scale = (1.0 - t * eta).clamp_min(0.0)  # c_i ≥ 0: each variable keeps its pattern
        scale[ratios.argmin()] = 0.0
        # a variable the exact step zeroes may keep a rounding residue (~1e-16); left in, it poisons the next SVD
        scale[scale <= 16 * torch.finfo(scale.dtype).eps] = 0.0
        v[active] = current.v * scale[:, None]
        keep[active[scale == 0]] = False
    return ConvexForm(patterns[keep], v[keep], signs[keep])


def minimal_network(net: ReluNet, x: torch.Tensor, *, rtol: float = 1e-10) -> ReluNet:
    """`net`'s minimal network on `x`: merged by pattern, pruned optimally, balanced (same outputs on `x`)."""
    return from_convex(prune(to_convex(net, x), x, rtol=rtol))
