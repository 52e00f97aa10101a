"""Known answers for the convex reformulation and optimal pruning of two-layer ReLU nets: the convex objective is
the balanced net's; a redundant net (split copies, cancelling pairs) prunes to the planted minimal network; any net
prunes to at most n neurons with independent fits, the same outputs and no more weight decay."""

from __future__ import annotations

import torch

from workers.convex_relu import ReluNet, balanced, from_convex, minimal_network, prune, to_convex


def _data(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _net(m: int, d: int, seed: int) -> ReluNet:
    gen = torch.Generator().manual_seed(seed)
    return ReluNet(torch.randn(m, d, generator=gen, dtype=torch.float64),
                   torch.randn(m, generator=gen, dtype=torch.float64))


def test_the_convex_objective_is_the_balanced_nets_and_maps_back():
    x, net = _data(30, 4), _net(6, 4, seed=1)
    y = torch.randn(30, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    form = to_convex(net, x)
    assert form.feasible(x) and form.neurons == 6
    for beta in (0.0, 0.1, 1.0):
        assert abs(form.objective(x, y, beta) - balanced(net).objective(x, y, beta)) < 1e-9
        assert balanced(net).objective(x, y, beta) <= net.objective(x, y, beta) + 1e-12  # balancing only helps
    torch.testing.assert_close(from_convex(form)(x), net(x), rtol=1e-12, atol=1e-12)


def test_a_redundant_net_prunes_to_the_planted_minimal_network():
    x, teacher = _data(40, 5), balanced(_net(3, 5, seed=3))
    gen = torch.Generator().manual_seed(4)
    w, alpha = [], []
    for j in range(3):  # each teacher neuron split into three copies with c² summing to 1
        c = torch.rand(3, generator=gen, dtype=torch.float64) + 0.1
        c = (c / c.sum()).sqrt()
        w += [teacher.w[j] * cj for cj in c]
        alpha += [teacher.alpha[j] * cj for cj in c]
    for _ in range(2):  # pairs that cancel: same pattern, opposite signs
        extra = torch.randn(5, generator=gen, dtype=torch.float64)
        w += [extra, extra.clone()]
        alpha += [torch.tensor(0.7, dtype=torch.float64), torch.tensor(-0.7, dtype=torch.float64)]
    redundant = ReluNet(torch.stack(w), torch.stack(alpha))
    torch.testing.assert_close(redundant(x), teacher(x))
    minimal = minimal_network(redundant, x)
    assert minimal.neurons == 3
    torch.testing.assert_close(minimal(x), teacher(x), rtol=1e-10, atol=1e-10)
    cos = torch.nn.functional.normalize(minimal.w, dim=1) @ torch.nn.functional.normalize(teacher.w, dim=1).T
    assert torch.allclose(cos.max(1).values, torch.ones(3, dtype=torch.float64), atol=1e-10)
    torch.testing.assert_close(minimal.alpha.sort().values, teacher.alpha.sort().values, rtol=1e-9, atol=1e-12)
    penalty = lambda net: (net.w.norm(dim=1) * net.alpha.abs()).sum().item()  # noqa: E731
    assert abs(penalty(minimal) - penalty(teacher)) < 1e-9 and penalty(minimal) < penalty(balanced(redundant))


def test_any_net_prunes_to_independent_fits_with_the_same_outputs_and_no_more_penalty():
    x = _data(6, 3, seed=5)
    net = _net(14, 3, seed=6)
    form = to_convex(net, x)
    pruned = prune(form, x)
    assert pruned.neurons <= 6 < form.neurons
    assert torch.linalg.matrix_rank(pruned.fits(x)).item() == pruned.neurons  # independent: nothing left to remove
    torch.testing.assert_close(pruned(x), net(x), rtol=1e-9, atol=1e-9)
    assert pruned.feasible(x) and pruned.penalty() <= form.penalty() + 1e-12
