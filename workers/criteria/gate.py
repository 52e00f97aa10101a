"""Gate criteria: sensitivity of the next-token CE to per-unit multiplicative gates (= 1) on o_proj / down_proj.

* first order, autograd: |∂T/∂m_u|, T = mean CE over every calibration prediction;
* Fisher, autograd: mean over sequences n of (∂T_n/∂m_u)², T_n = sequence n's mean CE (per-sample gradients
  from one backward, through gates of shape (B, n_units));
* first order, SPSA: forward only, on one layer's gates of one kind at a time, with seeded Rademacher probes z:
  ĝ = mean_k (T(1 + εz_k) − T(1 − εz_k)) / 2ε · z_k. Keep the gate dimension small (KV groups, not channels):
  E cos(ĝ, g) ≈ √(K / (K + d + 1)) for K probes.

Weights get no gradients (activation memory only). Scores: higher = keep.

Near a trained optimum the first-order mean gradient largely cancels: on the builtin reference model a 25% cut
by `gate` (first order) loses more than a random cut, while `gate_fisher` is close to Taylor and OBS
(benchmarks/criteria.py). Prefer `gate_fisher` for ranking; first order is kept for its exact identities.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.criteria import _gates
from workers.criteria._common import KINDS, Geometry, check_kinds, empty, micro_batches
from workers.criteria._replay import Replay
from workers.criteria.base import LayerScores, UnitScores

CRITERIA = {  # the catalog entries (darwinfront.core.criteria): one class, three variants
    "gate": {"class": "Gate"},
    "gate_fisher": {"class": "Gate", "defaults": {"stat": "fisher"}},
    "gate_spsa": {"class": "Gate", "defaults": {"estimator": "spsa"},
                  "options": {"probes": {"type": "int", "min": 1, "max": 4096},
                              "eps": {"type": "float", "min": 1e-6, "max": 0.5},
                              "seed": {"type": "int", "min": 0, "max": 2147483647}}},
}
STATS = ("first", "fisher")
ESTIMATORS = ("autograd", "spsa")


def gate_gradients(
    model: nn.Module,
    calibration: torch.Tensor,
    kinds: tuple[str, ...] = KINDS,
    batch_size: int = 8,
    attention_unit: str = "kv_group",
) -> tuple[_gates.Gates, _gates.Gates]:
    """Signed gradients ∂T/∂m (T = mean CE) and the Fisher mean_n (∂T_n/∂m)², per layer and kind (fp64, CPU)."""
    check_kinds(kinds)
    geo = Geometry.of(model, attention_unit)
    n_seq, per_seq = calibration.shape[0], calibration.shape[1] - 1
    first = [{k: torch.zeros(_gates.n_units(k, geo), dtype=torch.float64) for k in kinds} for _ in range(geo.n_layers)]
    fisher = [{k: torch.zeros_like(v) for k, v in per_kind.items()} for per_kind in first]
    device = next(model.parameters()).device
    with _gates.frozen(model), torch.enable_grad():
        for ids in micro_batches(calibration, batch_size):
            gates = _gates.ones(geo, kinds, batch=ids.shape[0], device=device, grad=True)
            with _gates.gated(model, gates):
                loss = _gates.sample_ce(model, ids).sum()
            flat = [m for per_kind in gates for m in per_kind.values()]
            grads = iter(torch.autograd.grad(loss, flat))
            for f_acc, s_acc in zip(first, fisher, strict=True):
                for kind in kinds:
                    g = next(grads).detach().to(device="cpu", dtype=torch.float64)  # (B, n_units)
                    f_acc[kind] += g.sum(0) / (n_seq * per_seq)
                    s_acc[kind] += (g / per_seq).pow(2).sum(0) / n_seq
    return first, fisher


def spsa_gradient(
    model: nn.Module,
    calibration: torch.Tensor,
    layer: int,
    kind: str,
    probes: torch.Tensor,
    *,
    eps: float = 1e-3,
    batch_size: int = 8,
    replay: Replay | None = None,
    attention_unit: str = "kv_group",
) -> torch.Tensor:
    """Forward-only estimate of ∂T/∂m for one layer's gates of `kind`: mean_k (T(1+εz_k) − T(1−εz_k))/2ε · z_k.

    `probes` (K, d) are the z_k: Rademacher for SPSA; basis vectors e_i give d·ĝ = central finite differences.
    Each T runs layers `layer`.. only, from `replay` (built here from `calibration` when not given).
    """
    check_kinds((kind,))
    geo = Geometry.of(model, attention_unit)
    param = next(model.parameters())
    if eps < 4 * torch.finfo(param.dtype).eps:
        raise ValueError(f"eps={eps} is lost in {param.dtype} rounding of the gates; use eps >= 4 * its epsilon")
    gates = _gates.ones(geo, (kind,), device=param.device)
    m = gates[layer][kind]
    if probes.dim() != 2 or probes.shape[1] != m.numel():
        raise ValueError(f"probes must be (K, {m.numel()}), got {tuple(probes.shape)}")
    replay = replay or Replay(model, calibration, batch_size)
    n_pred = _gates.predictions(calibration)

    def mean_ce_from_layer() -> float:
        return sum(_gates.ce_of(ids, logits).sum().item() for ids, logits in replay.logits(layer)) / n_pred

    est = torch.zeros(m.numel(), dtype=torch.float64)
    with _gates.gated(model, gates):
        for z in probes.to(torch.float64):
            m.copy_(1.0 + eps * z)
            plus = mean_ce_from_layer()
            m.copy_(1.0 - eps * z)
            minus = mean_ce_from_layer()
            est += (plus - minus) / (2 * eps) * z
        m.fill_(1.0)
    return est / probes.shape[0]


def rademacher(k: int, d: int, seed: int) -> torch.Tensor:
    """K seeded Rademacher probes (K, d) of ±1."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (k, d), generator=gen).to(torch.float64) * 2 - 1


class Gate:
    """Gate-sensitivity criterion.

    Args:
        stat: "first" (|∂T/∂m|) or "fisher" (mean_n (∂T_n/∂m)²; autograd only).
        estimator: "autograd" (one backward per micro-batch) or "spsa" (forward only, one layer and kind at a time).
        probes: SPSA probes per layer and kind (2 forwards over the calibration set each).
        eps: SPSA perturbation size.
        seed: seeds the SPSA probes (layer l, kind k use seed + 2l + k).
        batch_size: sequences per forward pass.
        attention_unit: "kv_group" or "q_head".
    """

    def __init__(
        self,
        stat: str = "first",
        estimator: str = "autograd",
        *,
        probes: int = 64,
        eps: float = 1e-3,
        seed: int = 0,
        batch_size: int = 8,
        attention_unit: str = "kv_group",
    ):
        if stat not in STATS or estimator not in ESTIMATORS:
            raise ValueError(f"unknown gate stat/estimator {stat!r}/{estimator!r}; expected {STATS} / {ESTIMATORS}")
        if stat == "fisher" and estimator == "spsa":
            raise ValueError("the Fisher statistic needs per-sample gradients: use estimator='autograd'")
        self.stat, self.estimator = stat, estimator
        self.probes, self.eps, self.seed, self.batch_size = probes, eps, seed, batch_size
        self.attention_unit = attention_unit
        self.name = "gate_spsa" if estimator == "spsa" else ("gate_fisher" if stat == "fisher" else "gate")

    def score(self, model: nn.Module, calibration: torch.Tensor, kinds: tuple[str, ...] = KINDS) -> UnitScores:
        """Gate sensitivity of every attention unit / MLP channel of `kinds`."""
        check_kinds(kinds)
        if self.estimator == "spsa":
            grads = self._spsa(model, calibration, kinds)
        else:
            first, fisher = gate_gradients(model, calibration, kinds, self.batch_size, self.attention_unit)
            grads = fisher if self.stat == "fisher" else first
        layers = []
        for per_kind in grads:
            out = {k: empty() for k in KINDS}
            out.update({k: v.abs() for k, v in per_kind.items()})
            layers.append(LayerScores(**out))
        return UnitScores(layers=tuple(layers), criterion=self.name)

    def _spsa(self, model: nn.Module, calibration: torch.Tensor, kinds: tuple[str, ...]) -> _gates.Gates:
        return spsa_gradients(model, calibration, kinds, probes=self.probes, eps=self.eps, seed=self.seed,
                              batch_size=self.batch_size, attention_unit=self.attention_unit)


def spsa_gradients(
    model: nn.Module,
    calibration: torch.Tensor,
    kinds: tuple[str, ...],
    *,
    probes: int,
    eps: float,
    seed: int,
    batch_size: int = 8,
    attention_unit: str = "kv_group",
) -> _gates.Gates:
    """`spsa_gradient` for every layer and kind (seed + 2l + k for layer l, kind k), forward passes only."""
    geo = Geometry.of(model, attention_unit)
    replay = Replay(model, calibration, batch_size)
    out: _gates.Gates = []
    for layer in range(geo.n_layers):
        per_kind = {}
        for kind in kinds:
            z = rademacher(probes, _gates.n_units(kind, geo), seed + 2 * layer + KINDS.index(kind))
            per_kind[kind] = spsa_gradient(
                model, calibration, layer, kind, z, eps=eps, replay=replay, attention_unit=attention_unit
            )
        out.append(per_kind)
    return out
