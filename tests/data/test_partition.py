import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltamask.data import PRESENT, DataError, class_coverage, dirichlet_partition, iid_partition

LABELS = np.repeat(np.arange(10), 1000)  # 10 classes x 1,000 samples


def assert_disjoint_cover(parts, n):
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64 and len(joined) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


def test_dirichlet_partition_is_deterministic_for_a_seed():
    a = dirichlet_partition(LABELS, 10, 0.5, seed=3)
    b = dirichlet_partition(LABELS, 10, 0.5, seed=3)
    c = dirichlet_partition(LABELS, 10, 0.5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("alpha", [0.05, 0.1, 1.0, 100.0])
def test_dirichlet_partition_covers_every_index_once_and_respects_the_minimum(alpha):
    parts = dirichlet_partition(LABELS, 20, alpha, min_per_client=25, seed=1)
    assert len(parts) == 20 and min(len(p) for p in parts) >= 25
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats
    assert_disjoint_cover(parts, len(LABELS))


def test_class_coverage_matches_the_papers_regimes():
    iid = [class_coverage(LABELS, dirichlet_partition(LABELS, 10, 10.0, seed=s)) for s in range(3)]
    skew = [class_coverage(LABELS, dirichlet_partition(LABELS, 10, 0.1, seed=s)) for s in range(3)]
    assert np.mean(iid) > 0.85  # C_p ~ 1.0 at Dir(10)
    assert 0.1 < np.mean(skew) < 0.35  # C_p ~ 0.2 at Dir(0.1)
    present = [class_coverage(LABELS, dirichlet_partition(LABELS, 10, a, seed=0), measure=PRESENT)
               for a in (10.0, 0.1)]
    assert present[0] > 0.95 and present[1] < present[0]


def test_class_coverage_counts_classes_per_client():
    labels = np.array([0, 0, 1, 1, 2, 2])
    parts = [np.array([0, 1]), np.array([2, 4]), np.array([], np.int64), np.array([3, 5])]
    assert class_coverage(labels, parts, measure=PRESENT) == pytest.approx((1 + 2 + 0 + 2) / 3 / 4)
    assert class_coverage(labels, parts) == pytest.approx((1 + 2 + 0 + 2) / 3 / 4)  # even splits: same
    assert class_coverage(labels, [np.array([0, 1, 2])], num_classes=10) == pytest.approx(
        np.exp(-(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3))) / 10)


def test_an_unreachable_minimum_raises_data_error():
    with pytest.raises(DataError, match="min_per_client = 400 unreachable"):
        dirichlet_partition(LABELS, 20, 0.05, min_per_client=400, seed=0, max_tries=5)
    with pytest.raises(DataError, match="at least 600 samples"):
        dirichlet_partition(LABELS, 20, 1.0, min_per_client=600)


@pytest.mark.parametrize("partition", [lambda l, k: dirichlet_partition(l, k, 1.0, min_per_client=0),
                                       lambda l, k: iid_partition(l, k)])
def test_empty_input_or_too_many_clients_raise_data_error(partition):
    with pytest.raises(DataError, match="non-empty"):
        partition(np.array([], np.int64), 2)
    with pytest.raises(DataError, match="5 clients .* only 3 samples"):
        partition(np.array([0, 1, 1]), 5)
    with pytest.raises(DataError, match="non-negative integers"):
        partition(np.array([0.5, 1.0]), 1)


def test_iid_partition_is_a_balanced_deterministic_cover():
    parts = iid_partition(LABELS[:1003], 10, seed=2)
    assert sorted(len(p) for p in parts) == [100] * 7 + [101] * 3
    assert_disjoint_cover(parts, 1003)
    assert all(np.array_equal(x, y) for x, y in zip(parts, iid_partition(LABELS[:1003], 10, seed=2)))


@settings(max_examples=150, deadline=None)
@given(labels=st.lists(st.integers(0, 9), min_size=1, max_size=300),
       clients=st.integers(1, 30), alpha=st.floats(0.01, 100.0), minimum=st.integers(0, 3),
       balance=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_dirichlet_partition_is_always_a_disjoint_cover(labels, clients, alpha, minimum, balance, seed):
    labels = np.array(labels)
    clients = min(clients, len(labels))
    try:
        parts = dirichlet_partition(labels, clients, alpha, min_per_client=minimum, seed=seed, balance=balance,
                                    max_tries=20)
    except DataError as e:
        assert minimum > 0 and ("unreachable" in str(e) or "at least" in str(e))
        return
    assert len(parts) == clients and min(len(p) for p in parts) >= minimum
    assert_disjoint_cover(parts, len(labels))
