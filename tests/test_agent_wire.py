"""The agent survives the wire: a corrupt theta transfer or a theta whose digest differs from the task's is
fetched again, then the round is skipped with a warning; the agent goes on to the next round and exits 0.
A real coordinator over a loopback socket, with a FetchTheta that corrupts what it sends."""
import logging
import threading
from pathlib import Path

import pytest

from deltamask.errors import PayloadError
from deltamask.federation import LocalTraining
from deltamask.v1 import coordinator_pb2 as pb
from edge_client.agent import Agent
from edge_client.config import AgentConfig, DataConfig
from server import service
from server.config import ServerConfig
from server.coordinator import Coordinator
from server.evaluation import model_facts
from server.security import issue_token
from server.store import Store
from tests.wire import tls_files


class Corrupting(service.CoordinatorService):
    """Serves theta with one byte flipped (for the rounds in `corrupt`), or a digest the task does not name."""

    corrupt = {1}
    fetches = []

    async def FetchTheta(self, request, context):
        self.fetches.append(request.round)

        class Flipping:  # the context, writing each chunk with its first byte flipped
            def __getattr__(self, name):
                return getattr(context, name)

            async def write(self, chunk):
                if request.round in Corrupting.corrupt and chunk.data:
                    chunk = pb.Chunk(total_length=chunk.total_length, sha256=chunk.sha256, offset=chunk.offset,
                                     data=bytes([chunk.data[0] ^ 1]) + chunk.data[1:])
                await context.write(chunk)

        return await super().FetchTheta(request, Flipping())


@pytest.fixture(params=["lda"])
def coordinator(request, tmp_path, monkeypatch):
    monkeypatch.setattr(service, "CoordinatorService", Corrupting)
    Corrupting.fetches, Corrupting.corrupt = [], {1}
    config = ServerConfig(state_dir=str(tmp_path / "state"), backbone="tiny", weights=None, image_size=16,
                          expected_clients=1, min_quorum=1, rounds=2, round_deadline_s=4, heartbeat_interval_s=2,
                          codec="exact", head=request.param, lda_rank=16, local=LocalTraining(epochs=1))
    c = Coordinator(config, model_facts(config), Store(config.state_dir))
    tls = tls_files(tmp_path / "tls")
    server = service.Server(c, "127.0.0.1:0", tls=tls)
    server.start()
    rounds = threading.Thread(target=c.run, daemon=True)
    rounds.start()
    c.agent_config = dict(server=f"localhost:{server.port}", ca=str(Path(tls.cert).parent / "ca.pem"),
                          enrollment_token=issue_token(c.store, uses=None),
                          credential_file=str(tmp_path / "credentials" / "{name}"))
    yield c, server.port
    server.stop(0)
    rounds.join(5)
    c.store.close()


def test_a_corrupt_theta_is_fetched_again_then_its_round_skipped_and_the_agent_goes_on(coordinator, tmp_path,
                                                                                         caplog):
    c, port = coordinator
    agent = Agent(AgentConfig(name="pi-1", **c.agent_config, weights=None, progress=False,
                              cache_dir=str(tmp_path / "cache"), task_wait_s=1, max_backoff_s=0.5,
                              data=DataConfig(dataset="digits", samples=300)))
    with caplog.at_level(logging.WARNING, logger="edge_client.agent"):
        assert agent.run() == 0  # not a traceback exit: the coordinator said DONE
    states = [(h["round"], h["phase"], h["state"]) for h in c.history]
    assert states[:2] == [(0, "head", "closed"), (1, "mask", "skipped")]  # nothing intact came for round 1
    assert [s for _, p, s in states if p == "mask"].count("closed") == 2
    assert Corrupting.fetches.count(1) == 3 and 2 in Corrupting.fetches  # three tries, then the next round
    assert "theta transfer 1 of 3 is corrupt" in caplog.text and "skipping the round" in caplog.text


@pytest.mark.parametrize("coordinator", ["kaiming"], indirect=True)  # no head phase: round 0 is a mask round
def test_a_theta_digest_other_than_the_tasks_is_refetched_then_the_round_is_given_up(coordinator, tmp_path):
    from edge_client.agent import RoundSkipped

    c, port = coordinator
    Corrupting.corrupt = set()
    agent = Agent(AgentConfig(name="pi-2", **c.agent_config, weights=None, progress=False,
                              cache_dir=str(tmp_path / "cache"), data=DataConfig(dataset="digits", samples=300)))
    agent.register()
    agent.d = agent.registration.d
    c.step()  # nothing open yet: the device is not ready
    c.step()
    task = agent.next_task(-1)
    assert task.phase == pb.MASK
    wrong = pb.Task(phase=pb.MASK, round=task.round, theta_digest="0" * 64)
    with pytest.raises(RoundSkipped, match="no intact theta after 3 tries"):
        agent.fetch_theta(wrong)


@pytest.mark.parametrize("coordinator", ["kaiming"], indirect=True)
def test_a_virtual_classes_task_whose_head_carries_no_anchors_skips_the_round(coordinator, tmp_path):
    """A coordinator that asks for virtual_classes with a head built without class anchors (a loss changed
    after the head round): the agent gives that round up with a reason, it does not exit."""
    import numpy as np

    from deltamask.headwire import encode_head
    from edge_client.agent import RoundSkipped

    c, port = coordinator
    agent = Agent(AgentConfig(name="pi-3", **c.agent_config, weights=None, progress=False,
                              cache_dir=str(tmp_path / "cache"), data=DataConfig(dataset="digits", samples=300)))
    agent.register()
    features = c.facts.feature_dim
    task = pb.Task(phase=pb.MASK, round=1, seed=1, kappa=1.0, codec="exact", reference="per-client",
                   head_kind="lda", epochs=1, batch_size=32, lr=0.1, loss="virtual_classes", num_classes=10,
                   feature_dim=features, head=encode_head(np.zeros((10, features)), np.zeros(10)))
    with pytest.raises(RoundSkipped, match="no class anchors"):
        agent.work(task)


@pytest.mark.parametrize("coordinator", ["kaiming"], indirect=True)
def test_a_device_holding_the_head_is_not_sent_it_again(coordinator, tmp_path):
    """The head crosses the network once per device and head: a TaskRequest naming the head the device holds
    gets a task without its bytes but with its digest, and the agent works from the head it keeps."""
    from deltamask.transfer import sha256_hex
    from edge_client.agent import RoundSkipped

    c, port = coordinator
    agent = Agent(AgentConfig(name="pi-4", **c.agent_config, weights=None, progress=False,
                              cache_dir=str(tmp_path / "cache"), data=DataConfig(dataset="digits", samples=300)))
    agent.register()
    c.step()
    c.step()
    first = agent.next_task(-1)
    assert first.phase == pb.MASK and first.head and first.head_sha256 == sha256_hex(first.head)
    assert agent.head_of(first) == first.head
    agent.head = (first.head, first.head_sha256)
    again = agent.next_task(-1)  # the same round asked again, now naming the head it holds
    assert again.round == first.round and again.head == b"" and again.head_sha256 == first.head_sha256
    assert agent.head_of(again) == first.head
    agent.head = (b"", "")  # a restarted agent holds no head: a task that leaves it out is given up, not run
    with pytest.raises(RoundSkipped, match="does not hold"):
        agent.head_of(again)
    bad = pb.Task(phase=pb.MASK, round=first.round, head=first.head, head_sha256="0" * 64)
    with pytest.raises(PayloadError, match="does not match its digest"):
        agent.head_of(bad)
