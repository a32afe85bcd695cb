"""The four routers: exactness against an independent float64 computation, and input checks."""

import pytest
import torch

from seqr import ArrowRouter, BruteForceRouter, SeqrRouter, SpectrRouter
from seqr.core.errors import ShapeError, ValueCheckError

EXACT_ROUTERS = [SeqrRouter, SpectrRouter, BruteForceRouter]
ALL_ROUTERS = [*EXACT_ROUTERS, ArrowRouter]


def make_library(n=12, r=8, d_in=48, d_out=40, seed=0, per_adapter_a=False):
    g = torch.Generator().manual_seed(seed)
    shape_a = (n, r, d_in) if per_adapter_a else (r, d_in)
    A = torch.randn(*shape_a, generator=g) / d_in**0.5
    # Adapters of different scale so that raw norms have a clear winner per input.
    B = torch.randn(n, d_out, r, generator=g) * torch.rand(n, 1, 1, generator=g)
    X = torch.randn(64, d_in, generator=g)
    return A, B, X


def reference_norms(A, B, X):
    """||B_i A_i x|| in float64, one adapter at a time, no factorisation."""
    A, B, X = A.double(), B.double(), X.double()
    As = A if A.ndim == 3 else A.expand(B.shape[0], *A.shape)
    return torch.stack(
        [torch.linalg.vector_norm(X @ (b @ a).T, dim=1) for a, b in zip(As, B, strict=True)], 1
    )


@pytest.mark.parametrize("router_cls", EXACT_ROUTERS)
def test_exact_routers_match_direct_norms_in_float32(router_cls):
    A, B, X = make_library()
    expected = reference_norms(A, B, X)
    norms = router_cls(A, B).norms(X)
    assert norms.shape == (64, 12) and norms.dtype == torch.float32
    torch.testing.assert_close(norms.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(router_cls(A, B).route(X)[:, 0], expected.argmax(1))


@pytest.mark.parametrize("router_cls", [SpectrRouter, BruteForceRouter])
def test_baselines_accept_one_a_per_adapter(router_cls):
    A, B, X = make_library(per_adapter_a=True)
    torch.testing.assert_close(
        router_cls(A, B).norms(X).double(), reference_norms(A, B, X), rtol=1e-5, atol=1e-6
    )


def test_seqr_refuses_one_a_per_adapter_with_a_pointer_to_spectr():
    A, B, _ = make_library(per_adapter_a=True)
    with pytest.raises(ShapeError, match="SpectrRouter"):
        SeqrRouter(A, B)


def test_arrow_scores_top_right_singular_vector_projection():
    A, B, X = make_library()
    prototypes = []
    for b in B:
        _, _, vh = torch.linalg.svd((b @ A).double())
        prototypes.append(vh[0])
    expected = (X.double() @ torch.stack(prototypes).T).abs()
    torch.testing.assert_close(ArrowRouter(A, B).norms(X).double(), expected, rtol=1e-4, atol=1e-5)


def test_arrow_can_disagree_with_the_norm_maximiser():
    A, B, X = make_library(n=32, seed=3)
    exact = SeqrRouter(A, B).route(X)[:, 0]
    assert (ArrowRouter(A, B).route(X)[:, 0] != exact).any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("router_cls", EXACT_ROUTERS)
def test_routers_run_in_float64_and_bfloat16(router_cls, dtype):
    A, B, X = make_library()
    A, B, X = A.to(dtype), B.to(dtype), X.to(dtype)
    norms = router_cls(A, B).norms(X)
    assert norms.dtype == dtype
    expected = reference_norms(A, B, X)
    rtol = 1e-10 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(norms.double(), expected, rtol=rtol, atol=rtol)


def test_brute_force_with_a_applied_once_matches_direct_norms():
    A, B, X = make_library()
    norms = BruteForceRouter(A, B).norms_shared_projection(X.reshape(4, 16, -1))
    assert norms.shape == (4, 16, 12)
    torch.testing.assert_close(
        norms.reshape(64, 12).double(), reference_norms(A, B, X), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ShapeError, match="one A shared"):
        BruteForceRouter(*make_library(per_adapter_a=True)[:2]).norms_shared_projection(X)


def test_seqr_choice_equals_brute_force_on_many_adapters():
    A, B, X = make_library(n=300, r=16, d_in=96, d_out=96, seed=7)
    X = torch.randn(2000, 96, generator=torch.Generator().manual_seed(8))
    assert torch.equal(SeqrRouter(A, B).route(X, k=3), BruteForceRouter(A, B).route(X, k=3))


def test_seqr_norms_from_projection_reuse_h():
    A, B, X = make_library()
    router = SeqrRouter(A, B)
    torch.testing.assert_close(router.norms_from_projection(X @ A.T), router.norms(X))


def test_z_scores_use_each_adapters_own_statistics():
    A, B, X = make_library()
    mean, std = torch.rand(12) + 1, torch.rand(12) + 0.5
    router = SeqrRouter(A, B, mean=mean, std=std)
    expected = (reference_norms(A, B, X) - mean.double()) / std.double()
    torch.testing.assert_close(router.scores(X).double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(router.route(X, k=2), expected.topk(2, dim=1).indices)
    assert torch.equal(SeqrRouter(A, B).scores(X), SeqrRouter(A, B).norms(X))


def test_route_returns_int64_best_first():
    A, B, X = make_library()
    routes = SeqrRouter(A, B).route(X, k=4)
    assert routes.shape == (64, 4) and routes.dtype == torch.int64
    norms = reference_norms(A, B, X)
    picked = norms.gather(1, routes)
    assert (picked[:, :-1] >= picked[:, 1:]).all()


@pytest.mark.parametrize("router_cls", ALL_ROUTERS)
def test_adding_and_removing_adapters_keeps_the_others(router_cls):
    A, B, X = make_library()
    grown = router_cls(A, B[:8])
    for b in B[8:]:
        grown.add(b)
    torch.testing.assert_close(grown.norms(X), router_cls(A, B).norms(X))
    grown.remove(3)
    keep = [i for i in range(12) if i != 3]
    torch.testing.assert_close(grown.norms(X), router_cls(A, B[keep]).norms(X))
    assert grown.names == [str(i) for i in keep]


def test_list_of_b_is_accepted():
    A, B, X = make_library()
    torch.testing.assert_close(SeqrRouter(A, list(B)).norms(X), SeqrRouter(A, B).norms(X))


def test_add_needs_statistics_when_the_router_has_them():
    A, B, _ = make_library()
    router = SeqrRouter(A, B[:4], mean=torch.ones(4), std=torch.ones(4))
    with pytest.raises(ValueCheckError, match="statistics"):
        router.add(B[4])
    assert router.add(B[4], mean=1.0, std=2.0, name="new") == 4
    router.remove("new")
    assert len(router) == 4


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda A, B: (A[:4], B), ShapeError, "r of A is 4 but B has r = 8"),
        (lambda A, B: (A, B[:0]), ShapeError, "N = 0"),
        (lambda A, B: (A, []), ShapeError, "N = 0"),
        (lambda A, B: (A[0], B), ShapeError, r"A must be \(r, d_in\)"),
        (
            lambda A, B: (A, B.clone().index_fill_(0, torch.tensor([2]), float("nan"))),
            ValueCheckError,
            "NaN or inf",
        ),
        (lambda A, B: (A.clone().fill_(float("inf")), B), ValueCheckError, "NaN or inf"),
        (lambda A, B: (A.int(), B), ValueCheckError, "dtype"),
    ],
)
def test_bad_factors_are_rejected_with_a_clear_error(change, error, match):
    A, B, _ = make_library()
    A2, B2 = change(A, B)
    with pytest.raises(error, match=match):
        SeqrRouter(A2, B2)


def test_mismatched_d_in_of_x_is_rejected():
    A, B, X = make_library()
    with pytest.raises(ShapeError, match="d_in = 48"):
        SeqrRouter(A, B).norms(X[:, :40])


@pytest.mark.parametrize("k", [0, 13, 2.0])
def test_k_outside_one_to_n_is_rejected(k):
    A, B, X = make_library()
    with pytest.raises(ShapeError, match="k must be"):
        SeqrRouter(A, B).route(X, k=k)


@pytest.mark.parametrize("bad_std", [0.0, -1.0, float("nan")])
def test_zero_negative_or_nan_std_is_rejected(bad_std):
    A, B, _ = make_library()
    std = torch.ones(12)
    std[5] = bad_std
    with pytest.raises(ValueCheckError):
        SeqrRouter(A, B, mean=torch.zeros(12), std=std)


def test_mean_without_std_or_wrong_length_is_rejected():
    A, B, _ = make_library()
    with pytest.raises(ValueCheckError, match="both mean and std"):
        SeqrRouter(A, B, mean=torch.zeros(12))
    with pytest.raises(ShapeError, match="one value per adapter"):
        SeqrRouter(A, B, mean=torch.zeros(5), std=torch.ones(5))


def test_d_out_smaller_than_r_still_exact():
    A, B, X = make_library(r=8, d_out=5)
    torch.testing.assert_close(
        SeqrRouter(A, B).norms(X).double(), reference_norms(A, B, X), rtol=1e-5, atol=1e-6
    )


def test_scaling_b_scales_norms_and_honest_statistics_so_z_scores_are_invariant():
    A, B, X = make_library()
    norms = reference_norms(A, B, X).float()
    mean, std = norms.mean(0), norms.std(0)
    base = SeqrRouter(A, B, mean=mean, std=std).scores(X)
    scaled = SeqrRouter(A, B * 3.0, mean=mean * 3.0, std=std * 3.0).scores(X)
    torch.testing.assert_close(base, scaled, rtol=1e-4, atol=1e-4)
