"""DeltaMask inside Flower (flwr 1.42, the Message API): a Strategy and a ClientApp over the project's engine.

    server_app   a ServerApp that runs `DeltaMask`, a Flower Strategy: `configure_train` plans the round with
                 the project's round policy (`deltamask.federation.plan_round`) and sends the task, the head
                 and theta's wire message; `aggregate_train` decodes and sums the uploads (`deltamask.shards`)
                 and closes the round with the project's aggregator. Both are the simulator's own
                 `Federation.open` / `Federation.close`, so a Flower run and `deltamask-sim` with the same
                 run config give the same theta, round by round (tests/test_flower.py).
    client_app   a ClientApp whose node is simulated device `partition-id` (its Dirichlet share of the
                 dataset): the project's LocalLearner trains its head share, mask or weights and answers
                 with the encoded upload.

The run config (`[tool.flwr.app.config]` of the app's pyproject, or `--run-config`) holds `SimConfig`'s
fields, dashes or underscores (`clients`, `codec`, `alpha`, `rounds`, ...; LocalTraining's as `local-epochs`,
`local-lr`, ...), plus `log` (a JSON-lines file of the round summaries, as deltamask-sim prints them) and
`torch-threads` (a ClientApp's torch threads; 1 by default, one per simulated node's CPU). The number of
Flower rounds is the policy's: its head rounds, then `rounds` mask rounds. examples/flower/ is an app.

The devices' names are `client-000`, ... (`partition-id` 0, ...): the strategy asks every node for its name
once (a query message) and plans over the names, as the coordinator does over enrolled names.
"""
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from deltamask.federation import DeviceTask, LocalTraining
from deltamask.headwire import decode_head, encode_head
from deltamask.learn.sim import Federation, SimConfig, Work, build, client_name
from deltamask.thetawire import decode_theta

log = logging.getLogger(__name__)
OWN_KEYS = ("log", "torch_threads")  # run-config keys of this module, not of SimConfig


# --- the run config -------------------------------------------------------------------------------------
def sim_config(run_config: Mapping) -> SimConfig:
    """SimConfig from a Flower run config (ValueError naming any key it does not know)."""
    defaults = SimConfig()
    top = {f.name for f in dataclasses.fields(SimConfig) if f.name != "local"}
    local_names = {f.name for f in dataclasses.fields(LocalTraining)}
    values, local, unknown = {}, {}, []
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if name in OWN_KEYS:
            continue
        if name.startswith(("local_", "local.")) and name[6:] in local_names:
            local[name[6:]] = _cast(getattr(defaults.local, name[6:]), value)
        elif name in top:
            values[name] = _cast(getattr(defaults, name), value)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unknown run-config keys: {', '.join(sorted(unknown))} (SimConfig's fields, local-*, "
                         f"log, torch-threads)")
    config = SimConfig(**values, local=dataclasses.replace(defaults.local, **local))
    config.check()
    return config


def _cast(default, value):
    if default is None or isinstance(default, str):  # TOML has no null: "" or "none" stands for None
        return None if value in ("", "none", "None") else str(value)
    if isinstance(default, bool):
        return bool(value)
    return type(default)(value)


# --- what travels in Flower's messages --------------------------------------------------------------------
def task_text(task: DeviceTask) -> str:
    """The task as JSON (a round seed has 64 bits: more than a Flower ConfigRecord's int holds)."""
    return json.dumps(dataclasses.asdict(task), sort_keys=True)


def task_from_text(text: str) -> DeviceTask:
    fields = json.loads(text)
    return DeviceTask(**{**fields, "local": LocalTraining(**fields["local"])})


def _bytes_array(data: bytes) -> Array:
    return Array(np.frombuffer(data, dtype=np.uint8).copy())


def _array_bytes(array: Array) -> bytes:
    return array.numpy().astype(np.uint8).tobytes()


def work_arrays(work: Work) -> ArrayRecord:
    """The head (its wire bytes), and theta's wire message or the global weights' offset (float32)."""
    record = ArrayRecord()
    if work.head is not None:
        record["head"] = _bytes_array(encode_head(*work.head))
    if work.theta_wire is not None:
        record["theta"] = _bytes_array(work.theta_wire)
    if work.offset is not None:
        record["offset"] = Array(np.asarray(work.offset, dtype=np.float32))
    return record


# --- the server side ------------------------------------------------------------------------------------
class DeltaMask(Strategy):
    """DeltaMask (and the project's baselines: any codec and head the SimConfig names) as a Flower Strategy.
    Whom to ask and what to send: `configure_train`; how to combine the replies: `aggregate_train`. The
    federation's state (Beta counts, theta, head) lives in the strategy's `Federation`; the ArrayRecord it
    returns is the global model as it travels (theta's wire message, the head's bytes)."""

    def __init__(self, config: SimConfig, log_path: Optional[str] = None, timeout: float = 3600) -> None:
        self.fed = Federation(config, devices=False)  # the model, aggregator and held-out evaluator; no devices
        self.config, self.timeout = config, timeout
        self.nodes: Dict[str, int] = {}  # device name -> Flower node id
        self.rows: List[Dict] = []  # the round summaries, as deltamask-sim prints them
        self.log_path = Path(log_path) if log_path else None
        self._open: Optional[Tuple[object, Work, float]] = None
        first = self.fed.start()
        if first is not None:
            self._record({**first, "d": self.fed.d})

    @property
    def num_rounds(self) -> int:
        return self.config.head_phase_rounds + self.config.rounds + self.config.refits

    def global_arrays(self) -> ArrayRecord:
        head = self.fed.agg.head
        return work_arrays(Work(None, head, theta_wire=self.fed.wire))

    def summary(self) -> None:
        c = self.config
        log.info("DeltaMask: codec %s, head %s (%d head rounds), %d mask rounds, rho %s of %d devices",
                 c.codec, c.head, c.head_phase_rounds, c.rounds, c.rho, c.clients)

    def _enrol(self, grid: Grid) -> None:
        """Ask every node its device name once (the names the round plans are drawn from)."""
        nodes = list(grid.get_node_ids())
        asks = [Message(RecordDict({"ask": ConfigRecord({"what": "name"})}), node, MessageType.QUERY)
                for node in nodes]
        reasons = []
        for reply in grid.send_and_receive(asks, timeout=self.timeout):
            if reply.has_error():
                reasons.append(reply.error.reason)
                log.warning("node %s did not say its name: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            name = str(reply.content["device"]["name"])
            if name in self.nodes:
                raise RuntimeError(f"two nodes say they are {name}: give each a distinct partition-id")
            self.nodes[name] = reply.metadata.src_node_id
        if not self.nodes:
            raise RuntimeError(f"none of the {len(nodes)} nodes said its name: {'; '.join(sorted(set(reasons)))}")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if not self.nodes:
            self._enrol(grid)
        plan = self.fed.plan(server_round - 1, sorted(self.nodes))
        if plan is None:  # the policy's rounds are done
            self._open = None
            return []
        work = self.fed.open(plan)
        content = RecordDict({"task": ConfigRecord({"task": task_text(work.task)}), "arrays": work_arrays(work)})
        self._open = (plan, work, time.perf_counter())
        return [Message(content, self.nodes[name], MessageType.TRAIN, group_id=str(server_round))
                for name in plan.selected]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        from deltamask.learn.learner import Reply

        if self._open is None:
            return None, None
        plan, work, sent = self._open
        self._open = None
        names = {node: name for name, node in self.nodes.items()}
        got = {}
        for reply in replies:
            name = names.get(reply.metadata.src_node_id)
            if reply.has_error() or name not in plan.selected:
                log.warning("round %d: no upload from %s: %s", plan.index, name or reply.metadata.src_node_id,
                            reply.error.reason if reply.has_error() else "not selected")
                continue
            up, m = reply.content["upload"], reply.content["metrics"]
            got[name] = (Reply(bytes(up["payload"]), int(m["examples"]), str(up["reference_digest"]),
                               int(m["delta"]), int(m["kept"]), float(m["encode_s"])), float(m["work_s"]))
        missing = [n for n in plan.selected if n not in got]
        if missing:  # the round's plan is the policy's: without every selected device it is not that round
            raise RuntimeError(f"round {plan.index}: no upload from {', '.join(missing)}")
        row = self.fed.close(plan, work, {name: got[name] for name in plan.selected}, time.perf_counter() - sent)
        self._record({**row, "d": self.fed.d} if not self.rows else row)
        metrics = MetricRecord({k: float(v) for k, v in row.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return self.global_arrays(), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # the server scores theta and the head on held-out data when it closes a round

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        return None

    def _record(self, row: Dict) -> None:
        self.rows.append(row)
        if self.log_path is not None:
            with self.log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")


# --- the apps ---------------------------------------------------------------------------------------------
_DEVICES: Dict[Tuple[str, str], Tuple[object, object]] = {}  # (config, name) -> (model, learner), per process


def device_name(context: Context) -> str:
    if "partition-id" not in context.node_config:
        raise ValueError("a DeltaMask node needs partition-id in its node config (the simulated device it is)")
    return client_name(int(context.node_config["partition-id"]))


def _device(config: SimConfig, context: Context):
    name = device_name(context)
    total = context.node_config.get("num-partitions")
    if total is not None and int(total) != config.clients:
        raise ValueError(f"{total} Flower nodes but the run config has clients = {config.clients}")
    key = (json.dumps(dataclasses.asdict(config), sort_keys=True), name)
    if key not in _DEVICES:
        import torch

        torch.set_num_threads(int(context.run_config.get("torch-threads", 1)))
        model, learners, _, _ = build(config, held_out=False, devices=[name])
        _DEVICES[key] = (model, learners[name])
    return name, _DEVICES[key]


def apps(config: Optional[SimConfig] = None, log_path: Optional[str] = None) -> Tuple[ServerApp, ClientApp]:
    """A ServerApp running the DeltaMask strategy and a ClientApp running a device's local learner, for
    `config` (None: both read it from the run config, as `flwr run` passes it; `log_path`: else the run
    config's `log`)."""
    server, client = ServerApp(), ClientApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        c = config or sim_config(context.run_config)
        path = log_path or str(context.run_config.get("log", "") or "") or None
        if path:
            Path(path).write_text(json.dumps({"config": dataclasses.asdict(c)}) + "\n")
        strategy = DeltaMask(c, path)
        strategy.start(grid, strategy.global_arrays(), num_rounds=strategy.num_rounds, timeout=strategy.timeout)

    @client.query()
    def _say_name(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"device": ConfigRecord({"name": device_name(context)})}), reply_to=msg)

    @client.train()
    def _train(msg: Message, context: Context) -> Message:
        name, (model, learner) = _device(config or sim_config(context.run_config), context)
        task = task_from_text(str(msg.content["task"]["task"]))
        arrays = msg.content["arrays"]
        head = decode_head(_array_bytes(arrays["head"]), model.num_classes, model.feature_dim) \
            if "head" in arrays else None  # the server's head (an LDA head's values may be large)
        thresholds = decode_theta(_array_bytes(arrays["theta"]), model.d) if "theta" in arrays else None
        offset = arrays["offset"].numpy().astype(np.float32) if "offset" in arrays else None
        started = time.perf_counter()
        reply = learner.work(task, name, head, thresholds, offset=offset)
        seconds = time.perf_counter() - started
        return Message(RecordDict({
            "upload": ConfigRecord({"payload": reply.payload, "reference_digest": reply.reference_digest}),
            "metrics": MetricRecord({"examples": reply.examples, "delta": reply.delta, "kept": reply.kept,
                                     "encode_s": reply.encode_s, "work_s": seconds})}), reply_to=msg)

    return server, client


server_app, client_app = apps()  # what an app's pyproject names: deltamask.flower:server_app, :client_app


__all__ = ["DeltaMask", "apps", "client_app", "device_name", "server_app", "sim_config", "task_from_text", "task_text",
           "work_arrays"]
