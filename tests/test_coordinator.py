"""The round state machine without the network: sampling, liveness, deadlines, skips, restarts."""
import numpy as np
import pytest

from deltamask.codecs import get_codec
from deltamask.federation import plan_round
from deltamask.headwire import encode_head
from deltamask.rounds import client_update
from deltamask.sampling import thresholds_to_theta
from server.config import ServerConfig
from server.coordinator import HEAD, IDLE, MASK, REFIT, Coordinator, ModelFacts, NotOpen
from server.store import Store

D, FEATURES, CLASSES = 4096, 8, 3


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def make(tmp_path, clock, **kw) -> Coordinator:
    config = ServerConfig(**{**dict(state_dir=str(tmp_path / "state"), backbone=None, d=D, num_classes=CLASSES,
                                    expected_clients=3, min_quorum=2, rounds=3, round_deadline_s=100,
                                    heartbeat_interval_s=10, codec="exact", head="linear_probe", refit=False), **kw})
    return Coordinator(config, ModelFacts(D, "layout", FEATURES), Store(config.state_dir), clock=clock)


def join(c: Coordinator, names):
    ids = [c.register(n, "rpi4", 0, "").device_id for n in names]
    for i in ids:
        assert c.get_task(i, -1, 0).phase == IDLE  # ready: it asks for work
    return ids


def head(c: Coordinator, ids):
    c.step()
    assert c.open.phase == HEAD
    for i in ids:
        c.submit(i, c.open.round, encode_head(np.ones((CLASSES, FEATURES)), np.zeros(CLASSES)), "",
                 {"num_examples": 10})
    c.step()
    c.step()
    assert c.open.phase == MASK


def upload(c: Coordinator, device: str, seed: int = 0):
    r = c.open
    theta_k = thresholds_to_theta(c.thresholds).astype(np.float64)
    theta_k[np.random.default_rng(seed).choice(D, 200, replace=False)] = 0.02
    return client_update(c.thresholds, theta_k, r.seed, c.devices[device].name, r.kappa, get_codec(c.config.codec),
                         c.config.reference)


def test_no_round_opens_before_the_expected_devices_are_ready(tmp_path):
    clock = Clock()
    c = make(tmp_path, clock)
    join(c, ["a", "b"])
    c.register("c", "rpi4", 0, "")  # registered, still loading its model
    c.step()
    assert c.open is None
    join(c, ["c"])
    c.step()
    assert c.open is not None and len(c.open.selected) == 3


def test_a_device_missing_two_heartbeats_is_not_sampled(tmp_path):
    clock = Clock()
    c = make(tmp_path, clock, expected_clients=2)
    a, b, late = join(c, ["a", "b", "late"])
    head(c, [a, b, late])
    for device in (a, b, late):
        upload_ = upload(c, device)
        c.submit(device, c.open.round, upload_.payload, upload_.reference_digest, {})
    clock.now += 15
    c.heartbeat(a)
    c.heartbeat(b)
    clock.now += 10  # late: 25 s without a word (> 2 x 10 s)
    c.step()
    c.step()
    assert sorted(c.open.selected) == sorted([a, b])


def test_the_same_seed_selects_the_same_names_whatever_the_ids_and_the_order_they_joined(tmp_path):
    """Selection is over enrolled names (never the random device ids): two coordinators with the same
    seed, whose devices joined in opposite orders, select the same names, and the policy's own plan."""
    selected = []
    for folder, names in (("one", [f"d{i}" for i in range(6)]), ("two", [f"d{i}" for i in reversed(range(6))])):
        c = make(tmp_path / folder, Clock(), rho=0.5, expected_clients=6, min_quorum=1)
        join(c, names)
        head(c, list(c.devices))  # head_rho = 1: every device in the head round
        assert len(c.open.selected) == 3
        selected.append(sorted(c.devices[i].name for i in c.open.selected))
    assert selected[0] == selected[1]
    plan = plan_round(c.config, 1, 1, 0, [f"d{i}" for i in range(6)])
    assert list(plan.selected) == selected[0] and plan.seed == c.open.seed and plan.kappa == c.open.kappa


def test_a_round_below_quorum_at_its_deadline_is_skipped_and_changes_nothing(tmp_path):
    clock = Clock()
    c = make(tmp_path, clock)
    ids = join(c, ["a", "b", "c"])
    head(c, ids)
    before, thresholds, r = c.counts.ones.copy(), c.thresholds.copy(), c.open.round
    up = upload(c, ids[0])
    c.submit(ids[0], r, up.payload, up.reference_digest, {})
    assert c.counts.masks == 1
    c.step()
    assert c.open.round == r  # not yet: before the deadline
    clock.now += 101
    for i in ids:
        c.heartbeat(i)
    c.step()
    assert c.history[-1]["state"] == "skipped" and c.history[-1]["lost"] == sorted(ids[1:])
    assert np.array_equal(c.counts.ones, before) and c.counts.masks == 0
    assert np.array_equal(c.thresholds, thresholds) and c.mask_rounds == 0
    with pytest.raises(NotOpen):
        c.submit(ids[1], r, up.payload, up.reference_digest, {})  # late for a closed round


def test_a_restart_mid_round_replays_the_stored_uploads(tmp_path):
    clock = Clock()
    c = make(tmp_path, clock)
    ids = join(c, ["a", "b", "c"])
    head(c, ids)
    ups = {i: upload(c, i, seed=k) for k, i in enumerate(ids)}
    for i in ids[:2]:
        c.submit(i, c.open.round, ups[i].payload, ups[i].reference_digest, {})
    ones, r = c.counts.ones.copy(), c.open.round
    c.store.close()

    again = make(tmp_path, clock)  # same state_dir: a restarted coordinator
    assert again.open.round == r and sorted(again.open.received) == sorted(ids[:2])
    assert np.array_equal(again.counts.ones, ones) and again.counts.masks == 2
    assert {d.name for d in again.devices.values()} == {"a", "b", "c"}
    assert all(np.array_equal(a, b) for a, b in zip(again.agg.head, c.agg.head))
    again.submit(ids[2], r, ups[ids[2]].payload, ups[ids[2]].reference_digest, {})
    again.step()
    assert again.history[-1]["state"] == "closed" and again.history[-1]["received"] == 3
    assert again.submit(ids[0], r, ups[ids[0]].payload, ups[ids[0]].reference_digest, {})  # a retry: duplicate


def test_a_state_dir_of_another_model_is_refused(tmp_path):
    make(tmp_path, Clock()).store.close()
    config = ServerConfig(state_dir=str(tmp_path / "state"), backbone=None, d=D + 1)
    with pytest.raises(ValueError, match="use another state_dir"):
        Coordinator(config, ModelFacts(D + 1, "layout", FEATURES), Store(config.state_dir))


def mask_round_closed(tmp_path, clock, **kw):
    """A coordinator past its head round and one closed mask round (3 uploads); mask round 2 open, if any."""
    c = make(tmp_path, clock, **kw)
    ids = join(c, ["a", "b", "c"])
    head(c, ids)
    for k, i in enumerate(ids):
        up = upload(c, i, seed=k)
        c.submit(i, c.open.round, up.payload, up.reference_digest, {})
    c.step()
    c.step()
    assert c.history[-1]["state"] == "closed" and (c.done.is_set() or c.open.round == 2)
    return c, ids


def test_a_restart_gives_the_open_round_back_the_time_no_coordinator_served(tmp_path):
    clock = Clock()
    c, _ = mask_round_closed(tmp_path, clock)
    c.store.set_meta("alive_at", repr(clock.now))  # what the rounds thread records every 2 s
    deadline = c.open.deadline
    c.store.close()
    clock.now += 70  # down for 70 s of the round's 100
    again = make(tmp_path, clock)
    assert again.open.deadline == pytest.approx(deadline + 70)
    again.step()
    assert again.open is not None and again.open.round == 2  # not skipped for the restart's sake


@pytest.mark.parametrize("damage", ["zeroed", "truncated", "missing"])
@pytest.mark.parametrize("name", ["counts-1.npy", "theta-2.bin", "head.bin"])
def test_a_damaged_array_file_is_found_by_its_digest_and_rebuilt_from_the_stored_uploads(tmp_path, caplog,
                                                                                         name, damage):
    clock = Clock()
    c, _ = mask_round_closed(tmp_path, clock)
    c.store.close()
    path = tmp_path / "state" / name
    good = path.read_bytes()
    if damage == "zeroed":
        path.write_bytes(bytes(len(good)))
    elif damage == "truncated":
        path.write_bytes(good[:len(good) // 2])
    else:
        path.unlink()
    with caplog.at_level("WARNING", logger="server.coordinator"):
        again = make(tmp_path, clock)
    assert name in caplog.text and "rebuilding from the stored uploads" in caplog.text
    assert path.read_bytes() == good  # rebuilt byte for byte
    assert np.array_equal(again.counts.ones, c.counts.ones) and again.wire == c.wire
    assert all(np.array_equal(x, y) for x, y in zip(again.agg.head, c.agg.head))


def test_a_damaged_stored_upload_stops_the_restart_with_a_message_naming_it(tmp_path):
    from server.recovery import StateError

    clock = Clock()
    c, ids = mask_round_closed(tmp_path, clock)
    up = upload(c, ids[0], seed=9)
    c.submit(ids[0], 2, up.payload, up.reference_digest, {})  # kept for the open round 2
    c.store.close()
    stored = tmp_path / "state" / "updates" / "2" / f"{ids[0]}.bin"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 1
    stored.write_bytes(bytes(data))
    with pytest.raises(StateError, match=str(stored).replace(".", r"\.") + ": stored update of round 2 is damaged"):
        make(tmp_path, clock)


def test_after_a_restart_past_the_end_every_enrolled_device_is_told_before_the_coordinator_may_exit(tmp_path):
    clock = Clock()
    c, ids = mask_round_closed(tmp_path, clock, rounds=1)
    assert c.done.is_set()
    assert c.get_task(ids[0], 1, 0).phase == "done"  # one heard it before the crash
    c.flush_told()
    c.store.close()
    again = make(tmp_path, clock, rounds=1)  # restarted: nobody online yet, two still waiting somewhere
    assert again.done.is_set() and not again.everyone_told_done()
    for i in ids[1:]:
        assert again.get_task(i, 1, 0).phase == "done"
    assert again.everyone_told_done()


@pytest.mark.parametrize("executor", ["process", "ray"])
def test_uploads_rebuilt_as_shards_on_a_pool_or_ray_give_the_serial_round(tmp_path, executor):
    if executor == "ray":
        pytest.importorskip("ray", reason="the ray extra")
    from server.config import Aggregation
    from server.coordinator import InvalidUpdate

    serial, _ = mask_round_closed(tmp_path / "serial", Clock())
    sharded, ids = mask_round_closed(tmp_path / executor, Clock(), aggregation=Aggregation(executor, workers=2))
    try:
        assert sharded.shards is not None and serial.shards is None
        assert np.array_equal(sharded.counts.ones, serial.counts.ones) and sharded.wire == serial.wire
        good = upload(sharded, ids[0])
        with pytest.raises(InvalidUpdate, match="reference mask digest"):
            sharded.submit(ids[0], sharded.open.round, good.payload, "0" * 64, {})
        with pytest.raises(InvalidUpdate, match="corrupt update"):
            sharded.submit(ids[0], sharded.open.round, good.payload[:-3], good.reference_digest, {})
        assert sharded.submit(ids[0], sharded.open.round, good.payload, good.reference_digest, {}) is not None
    finally:
        sharded.stop()
        serial.store.close()
        sharded.store.close()


def test_aggregation_settings_are_checked():
    from server.config import Aggregation

    with pytest.raises(ValueError, match="aggregation.executor must be one of serial, process, ray"):
        ServerConfig(backbone=None, d=D, aggregation=Aggregation("gpu")).check()
    with pytest.raises(ValueError, match="aggregation.address is a Ray cluster's"):
        ServerConfig(backbone=None, d=D, aggregation=Aggregation("process", address="auto")).check()


def test_a_restart_that_turns_on_virtual_classes_after_the_head_round_is_refused(tmp_path):
    """The head round gathered no class anchors; a coordinator restarted with local.loss virtual_classes would
    send every device a task it cannot run, so it refuses to start and says why."""
    from dataclasses import replace

    from deltamask.federation import LocalTraining
    from deltamask.headwire import LdaStats, encode_lda_stats
    from server.recovery import StateError

    clock = Clock()
    c = make(tmp_path, clock, head="lda", lda_covariance="diag")
    ids = join(c, ["a", "b", "c"])
    c.step()
    assert c.open.phase == HEAD
    rng = np.random.default_rng(0)
    for i in ids:
        x = rng.normal(size=(9, FEATURES))
        stats = LdaStats(np.stack([x[k::3].sum(0) for k in range(3)]), np.full(CLASSES, 3.0), (x * x).sum(0))
        c.submit(i, c.open.round, encode_lda_stats(stats, "diag"), "", {"num_examples": 9})
    c.step()
    c.step()
    assert c.open.phase == MASK and len(c.agg.head) == 2
    c.store.close()
    config = replace(c.config, local=LocalTraining(loss="virtual_classes"))
    with pytest.raises(StateError, match="without class anchors"):
        Coordinator(config, ModelFacts(D, "layout", FEATURES, input_dim=12), Store(config.state_dir), clock=clock)


def test_keep_best_holds_on_to_the_best_scored_round_its_theta_file_and_a_restart_finds_it(tmp_path):
    """With held-out scores (scripted here: the accuracy a real evaluator would report), the kept round is the
    best so far (the head round's head alone included), its theta file outlives pruning, a restart folds the
    history to the same choice, and keep: last keeps the latest round."""
    from deltamask.thetawire import theta_digest

    scores = iter([0.80, 0.70, 0.85, 0.60, 0.85, 0.5, 0.5])  # head round, mask rounds 1..6 (a tie keeps round 2)
    evaluate = lambda head_, thresholds, seed: ({"accuracy": 0.5, "accuracy_expected": next(scores)}  # noqa: E731
                                                if thresholds is not None else {"accuracy": next(scores)})
    clock = Clock()
    c = make(tmp_path, clock, rounds=6)
    c.evaluate = evaluate
    ids = join(c, ["a", "b", "c"])
    head(c, ids)
    assert (c.kept.round, c.kept.phase, c.kept.score) == (0, HEAD, 0.80)
    kept_after = []
    while not c.done.is_set():
        if c.open is None:
            c.step()
        for k, i in enumerate(ids):
            up = upload(c, i, seed=10 * c.open.round + k)
            c.submit(i, c.open.round, up.payload, up.reference_digest, {})
        c.step()
        kept_after.append(c.kept.round)
    assert kept_after == [0, 2, 2, 2, 2, 2]
    path = c.store.theta_path(3)  # the theta round 2 left: pruned once round 5 closed, but kept
    assert path.exists() and theta_digest(path.read_bytes()) == c.history[2]["next_theta_sha256"]
    assert not c.store.theta_path(2).exists()  # an earlier round's, not kept: pruned
    c.store.close()
    again = make(tmp_path, clock, rounds=6)
    assert (again.kept.round, again.kept.score) == (2, 0.85)
    again.store.close()
    last = make(tmp_path, clock, rounds=6, keep="last")
    assert last.kept.round == 6
    last.store.close()
    with pytest.raises(ValueError, match="keep"):
        ServerConfig(state_dir=str(tmp_path / "x"), backbone=None, d=D, keep="first").check()


@pytest.mark.parametrize("damage", ["none", "missing"])
def test_the_refit_round_serves_theta_keeps_its_own_head_file_and_is_rebuilt_from_its_uploads(tmp_path, damage):
    """refit: after the last mask round one more head round of every device, its task carrying theta; its head
    goes to head-refit.bin (head.bin keeps the head round's, which the mask rounds' models use), the
    federation is over only after it, and a restart finds (or rebuilds) the refit's head."""
    clock = Clock()
    c, ids = mask_round_closed(tmp_path, clock, rounds=1, refit=True)
    assert not c.done.is_set()
    c.step()
    r = c.open
    assert r.phase == REFIT and len(r.selected) == 3
    task = c.get_task(ids[0], r.round - 1, 0)
    assert task.phase == REFIT and task.theta_digest and task.work.phase == REFIT
    assert c.theta_for(ids[0], r.round) == c.wire
    first = c.store.load_head()
    for k, i in enumerate(ids):
        c.submit(i, r.round, encode_head(np.full((CLASSES, FEATURES), 2.0 + k), np.ones(CLASSES)), "",
                 {"num_examples": 10})
    c.step()
    c.step()
    assert c.done.is_set() and c.history[-1]["phase"] == REFIT and c.history[-1]["state"] == "closed"
    assert c.store.load_head() == first and c.store.load_head(refit=True) == encode_head(*c.agg.head)
    assert np.allclose(c.agg.head[0], 3.0)  # the refit's shares averaged
    c.store.close()
    if damage == "missing":
        (tmp_path / "state" / "head-refit.bin").unlink()
    again = make(tmp_path, clock, rounds=1, refit=True)
    assert again.done.is_set() and all(np.array_equal(x, y) for x, y in zip(again.agg.head, c.agg.head))
    assert (tmp_path / "state" / "head-refit.bin").read_bytes() == encode_head(*c.agg.head)
