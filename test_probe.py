"""probe.py: the classifiers are deterministic and right, the statistics match hand-computed values."""
import math

import pytest
import torch

import probe


def blobs(n, seed, classes=4, dim=6):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.randint(classes, (n,), generator=g)
    return centres[y] + torch.randn(n, dim, generator=g), y


def test_the_logistic_probe_is_deterministic_and_converged():
    (x, y), (xv, yv) = blobs(400, 0), blobs(400, 1)
    first, second = probe.logistic_probe(x, y, xv, yv, 4), probe.logistic_probe(x.clone(), y, xv, yv, 4)
    assert first == second
    xs, _ = probe.standardise(x, xv)
    w, b = probe.fit_logistic(xs, y, 4, first["weight_decay"])
    w.requires_grad_(True), b.requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(xs.double() @ w + b, y) + first["weight_decay"] * w.square().sum()
    loss.backward()
    assert w.grad.abs().max() < 2e-5 and b.grad.abs().max() < 2e-5     # at the optimum, not after some steps
    assert first["acc"] > 0.8                                            # well-separated blobs


def test_the_fit_with_its_written_out_gradient_equals_a_slow_autograd_fit():
    """fit_logistic's hand-written gradient against autograd's, by the minimum each reaches (the slow one
    fitted 10,000 times more tightly): the same loss to 1e-6 and the same predictions, from zeros and from a
    warm start."""
    x, y = blobs(300, 0, classes=5)
    x = probe.standardise(x, x)[0].double()
    w = torch.zeros(x.shape[1], 5, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=5000, tolerance_grad=1e-9, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = torch.nn.functional.cross_entropy(x @ w + b, y) + 1e-3 * w.square().sum()
        value.backward()
        return value
    opt.step(loss)
    slow = loss().detach()
    for start in (None, (torch.randn(x.shape[1], 5).double(), torch.randn(5).double())):
        fast_w, fast_b = probe.fit_logistic(x, y, 5, 1e-3, start)
        fast = torch.nn.functional.cross_entropy(x @ fast_w + fast_b, y) + 1e-3 * fast_w.square().sum()
        assert 0 <= fast - slow < 1e-6                                  # the same minimum
        assert torch.equal((x @ fast_w + fast_b).argmax(1), (x @ w + b).detach().argmax(1))


def test_the_weight_decay_is_chosen_on_the_training_split_only():
    (x, y), (xv, yv) = blobs(300, 0), blobs(300, 1)
    picked = probe.logistic_probe(x, y, xv, yv, 4)["weight_decay"]
    assert picked == probe.logistic_probe(x, y, xv, 1 - yv.clamp(max=1), 4)["weight_decay"]   # val labels unused
    assert probe.logistic_probe(x, y, xv, yv, 4, weight_decays=(0.5,))["weight_decay"] == 0.5


def test_knn_equals_a_slow_reference():
    (x, y), (xv, _) = blobs(120, 0, classes=5), blobs(37, 1, classes=5)
    fast = probe.knn_predict(x, y, xv, 5, k=7, temperature=0.1, chunk=8)
    for i in range(len(xv)):
        sims = [float(torch.dot(xv[i] / xv[i].norm(), x[j] / x[j].norm())) for j in range(len(x))]
        nearest = sorted(range(len(x)), key=lambda j: -sims[j])[:7]
        votes = [0.0] * 5
        for j in nearest:
            votes[int(y[j])] += math.exp(sims[j] / 0.1)
        assert int(fast[i]) == max(range(5), key=lambda c: votes[c])


def test_t_values_match_the_tables():
    assert probe.t_quantile(0.95, 4) == pytest.approx(2.7764, abs=1e-4)
    assert probe.t_quantile(0.95, 9) == pytest.approx(2.2622, abs=1e-4)
    assert probe.t_quantile(0.95, 1) == pytest.approx(12.7062, abs=1e-3)
    assert probe.t_sf2(2.0, 10) == pytest.approx(0.07339, abs=1e-5)
    assert probe.t_sf2(1.0, 1) == pytest.approx(0.5, abs=1e-12)          # Cauchy: P(|T| > 1) = 1/2


def test_paired_ci_against_a_hand_computed_example():
    # diffs 1, 2, 2, 3, 3: mean 2.2, sd sqrt(0.7), se sqrt(0.7 / 5) = 0.37417, t_4 = 2.77645 -> half 1.03885
    out = probe.paired_ci([1, 2, 3, 4, 5], [0, 0, 1, 1, 2])
    assert out["diffs"] == [1, 2, 2, 3, 3] and out["n"] == 5
    assert out["diff"] == pytest.approx(2.2)
    assert (out["low"], out["high"]) == (pytest.approx(1.16115, abs=1e-4), pytest.approx(3.23885, abs=1e-4))
    assert out["p"] == pytest.approx(probe.t_sf2(2.2 / math.sqrt(0.14), 4))
    assert 0.004 < out["p"] < 0.0045
    with pytest.raises(ValueError, match="equally long"):
        probe.paired_ci([1, 2], [1])


def test_holm_against_a_hand_computed_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    assert probe.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert probe.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])


def test_the_detectable_difference_shrinks_with_the_seeds():
    assert probe.detectable(2.0, 5) == pytest.approx((2.77645 + 0.8416) * 2 / math.sqrt(5), abs=1e-3)
    assert probe.detectable(2.0, 10) < probe.detectable(2.0, 5)
