"""Hostile uploads through the real SubmitUpdate RPC, over TLS on a loopback socket: mutated payload bytes,
frames re-sealed around broken PNGs and position lists, lying header fields, chunks out of order and of
every size. The coordinator never crashes (no UNKNOWN or INTERNAL status: every refusal is one it chose),
never hangs (every call answers within its deadline), and every refusal leaves the persisted state byte for
byte as it was. 10,000 uploads by default (DELTAMASK_FUZZ_UPLOADS to change it); seeded, so a failure
names the upload that caused it and reproduces."""
import json
import os
import struct
import zlib

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deltamask.codecs import get_codec
from deltamask.codecs.base import pack_frame, read_frame
from deltamask.headwire import encode_head
from deltamask.rounds import client_update
from deltamask.sampling import thresholds_to_theta
from deltamask.thetawire import decode_theta
from deltamask.transfer import sha256_hex
from deltamask.v1 import coordinator_pb2 as pb
from server.config import LocalTraining, ServerConfig
from server.coordinator import Coordinator, ModelFacts
from server.service import Server
from server.store import Store
from tests.test_server_rpc import state_bytes
from tests.wire import Keys, as_device, enroll, secure_channel, tls_files

D, CLASSES, DEVICES = 4096, 3, 40
UPLOADS = int(os.environ.get("DELTAMASK_FUZZ_UPLOADS", "10000"))
CHOSEN = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
          grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.PERMISSION_DENIED}


def png_chunks(data: bytes):
    """[(type, body)] of a PNG."""
    out, at = [], 8
    while at + 8 <= len(data):
        (n,) = struct.unpack(">I", data[at:at + 4])
        out.append((data[at + 4:at + 8], data[at + 8:at + 8 + n]))
        at += 12 + n
    return out


def png_of(chunks, bad_crc: bool = False) -> bytes:
    out = b"\x89PNG\r\n\x1a\n"
    for kind, body in chunks:
        crc = zlib.crc32(kind + body) ^ (0xFFFF if bad_crc else 0)
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)
    return out


class Hostile:
    """Seeded hostile variants of a valid upload: (chunks, what) for one SubmitUpdate."""

    def __init__(self, rng: np.random.Generator, round_index: int, other_device: str) -> None:
        self.rng, self.round, self.other = rng, round_index, other_device

    def pick(self, values: list):
        return values[int(self.rng.integers(len(values)))]

    def payload(self, valid: bytes) -> tuple:
        r, kind = self.rng, int(self.rng.integers(9))
        data = bytearray(valid)
        if kind == 0:  # bits flipped anywhere (the frame's CRC-32 must catch them)
            for i in r.integers(0, len(data) * 8, size=int(r.integers(1, 9))):
                data[i // 8] ^= 1 << (i % 8)
            return bytes(data), "bit flips"
        if kind == 1:
            return bytes(data[:int(r.integers(0, len(data)))]), "truncated"
        if kind == 2:
            return bytes(data) + r.bytes(int(r.integers(1, 300))), "trailing junk"
        if kind == 3:
            return r.bytes(int(r.integers(0, 3000))), "random bytes"
        frame = read_frame(valid)
        if kind == 4:  # a sealed frame that lies about d, count or codec
            d, count, codec_id = frame.d, frame.count, frame.codec_id
            field = int(r.integers(3))
            if field == 0:
                d = self.pick([0, 1, D - 1, D + 1, 2 ** 40, 2 ** 64 - 1])
            elif field == 1:
                count = self.pick([0, 1, frame.count + 1, 2 ** 32, 2 ** 64 - 1])
            else:
                codec_id = int(r.integers(256))
            return pack_frame(codec_id, d, count, frame.header, frame.body), f"sealed frame, field {field}"
        if kind == 5:  # a sealed frame around a random codec header or body
            header = r.bytes(int(r.integers(0, 40))) if r.random() < 0.5 else frame.header
            body = r.bytes(int(r.integers(0, 2000))) if header is frame.header else frame.body
            return pack_frame(frame.codec_id, frame.d, frame.count, header, body), "sealed random header/body"
        if kind == 6 and frame.body.startswith(b"\x89PNG"):  # PNG structure: its chunks reordered, dropped, lied in
            chunks = png_chunks(frame.body)
            how = int(r.integers(6))
            if how == 0:  # IHDR dimensions, depth, colour type
                w, h, depth, colour = struct.unpack(">IIBB", chunks[0][1][:10])
                w, h = self.pick([0, 1, w + 1, 2 ** 31 - 1, 100_000]), self.pick([0, h, h + 1, 100_000])
                depth, colour = self.pick([1, 8, 16, 3]), self.pick([0, 2, 3, 4, 6])
                chunks[0] = (b"IHDR", struct.pack(">IIBB", w, h, depth, colour) + chunks[0][1][10:])
                body = png_of(chunks)
            elif how == 1:
                body = png_of(chunks, bad_crc=True)
            elif how == 2:
                body = png_of([c for c in chunks if c[0] != b"IEND"])
            elif how == 3:  # a decompression bomb where the pixels should be
                bomb = zlib.compress(bytes(50 << 20), 9)
                body = png_of([chunks[0], (b"IDAT", bomb), (b"IEND", b"")])
            elif how == 4:
                body = png_of(chunks[::-1])
            else:
                body = png_of([chunks[0]] + [(b"IDAT", r.bytes(int(r.integers(1, 500))))] + chunks[-1:])
            return pack_frame(frame.codec_id, frame.d, frame.count, frame.header, body), f"PNG structure {how}"
        if kind in (6, 7):  # a position list out of range, unsorted, repeated, or of the wrong width
            positions = r.integers(-5, D + 5, size=int(r.integers(0, 200))).astype("<i8" if r.random() < 0.5 else "<u4")
            return pack_frame(frame.codec_id, frame.d, len(positions), frame.header, positions.tobytes()), \
                "positions"
        return bytes(data), "valid payload"  # (with a lying header or chunking below)

    def upload(self, valid: bytes, reference: str) -> tuple:
        """Chunks for SubmitUpdate: a hostile payload under a header that may lie, cut up in hostile ways."""
        r = self.rng
        payload, what = self.payload(valid)
        header = pb.UpdateHeader(round=self.round, reference_digest=reference, total_length=len(payload),
                                 sha256=sha256_hex(payload), metrics=pb.Metrics(num_examples=int(r.integers(1, 100))))
        lie = int(r.integers(10))
        if what == "valid payload" and lie >= 5 and r.random() > 0.02:
            lie = int(r.integers(5))  # a valid upload is accepted once a device: mostly make it lie
        if lie == 0:
            header.round = self.pick([0, self.round + 1, 2 ** 32 - 1])
        elif lie == 1:
            header.total_length = self.pick([0, max(0, len(payload) - 1), len(payload) + 1, 2 ** 64 - 1])
        elif lie == 2:
            header.sha256 = self.pick(["", "0" * 64, "not hex", sha256_hex(valid)])
        elif lie == 3:
            header.reference_digest = self.pick(["", "f" * 64, "x"])
        elif lie == 4:
            header.device_id = self.other
        what += f", header lie {lie}" if lie < 5 else ""
        pieces = self.cut(payload)
        order = int(r.integers(8))
        chunks = [pb.UpdateChunk(header=header)] + [pb.UpdateChunk(data=p) for p in pieces]
        if order == 0 and len(chunks) > 1:
            chunks = chunks[1:] + chunks[:1]  # data before the header
        elif order == 1:
            chunks.insert(int(r.integers(1, len(chunks) + 1)), pb.UpdateChunk(header=header))  # two headers
        elif order == 2:
            chunks = chunks[:1]  # a header and nothing after it
        elif order == 3 and len(chunks) > 2:
            chunks[1], chunks[2] = chunks[2], chunks[1]  # two pieces swapped
        elif order == 4:
            chunks = []  # no message at all
        return chunks, what + (f", order {order}" if order < 5 else "")

    def cut(self, payload: bytes) -> list:
        r = self.rng
        how = int(r.integers(4))
        if how == 0:
            return [payload]
        if how == 1:
            return [payload[i:i + 1] for i in range(min(len(payload), 400))] + ([payload[400:]] if len(payload) > 400
                                                                                  else [])
        if how == 2:  # empty pieces among the data
            cuts = sorted(r.integers(0, len(payload) + 1, size=4))
            return [payload[a:b] for a, b in zip([0] + cuts, cuts + [len(payload)])]
        size = int(r.integers(1, 64))
        return [payload[i:i + size] for i in range(0, len(payload), size)]


@pytest.fixture
def mask_round(tmp_path):
    config = ServerConfig(state_dir=str(tmp_path / "state"), backbone=None, d=D, num_classes=CLASSES,
                          expected_clients=DEVICES + 1, min_quorum=1, rounds=3, round_deadline_s=3600,
                          heartbeat_interval_s=3600, head="linear_probe", codec="exact",
                          local=LocalTraining(head_epochs=1))
    coordinator = Coordinator(config, ModelFacts(D, "", 0), Store(config.state_dir))
    tls = tls_files(tmp_path / "tls")
    server = Server(coordinator, "127.0.0.1:0", tls=tls)
    server.start()
    channel = secure_channel(server.port, tls)
    stub = Keys().stub(channel)
    names = [f"dev-{i:02d}" for i in range(DEVICES + 1)]
    for name in names:
        enroll(stub, coordinator.store, name)
        assert stub.GetTask(pb.TaskRequest(after_round=-1, wait_s=0)).phase == pb.IDLE
    coordinator.step()
    head = encode_head(np.zeros((CLASSES, 0)), np.zeros(CLASSES))
    for name in names:
        as_device(stub, name)
        header = pb.UpdateHeader(round=0, total_length=len(head), sha256=sha256_hex(head))
        stub.SubmitUpdate(iter([pb.UpdateChunk(header=header), pb.UpdateChunk(data=head)]))
    coordinator.step()
    coordinator.step()
    assert coordinator.open.round == 1 and coordinator.open.phase == "mask"
    yield coordinator, server, channel, stub, names
    channel.close()
    server.stop(0)
    coordinator.store.close()


def test_hostile_uploads_are_refused_without_a_crash_a_hang_or_a_changed_byte(mask_round, tmp_path):
    coordinator, server, channel, stub, names = mask_round
    folder = tmp_path / "state"
    task = stub.GetTask(pb.TaskRequest(after_round=0, wait_s=5))
    wire = b"".join(c.data for c in stub.FetchTheta(pb.FetchRequest(round=1)))
    thresholds = decode_theta(wire, D)
    valid = {}
    for i, name in enumerate(names):
        theta = thresholds_to_theta(thresholds).astype(np.float64)
        theta[np.random.default_rng(i).choice(D, 200, replace=False)] = 0.02
        codec = get_codec(("exact", "bfuse8", "bfuse8-cond")[i % 3])  # position lists, PNG filters, conditional
        valid[name] = client_update(thresholds, theta, task.seed, name, task.kappa, codec, task.reference)
    last, fresh = names[-1], names[:-1]  # the last device stays clean: it uploads after the storm
    rng = np.random.default_rng(2026)
    before, accepted, codes = state_bytes(folder), 0, {}
    used = set()  # devices with an accepted upload: anything else from them is ALREADY_EXISTS at the header
    for n in range(UPLOADS):
        pool = [f for f in fresh if f not in used] or fresh
        name = pool[int(rng.integers(len(pool)))]
        as_device(stub, name)
        upload = valid[name]
        chunks, what = Hostile(rng, 1, coordinator._by_name(last).device_id).upload(upload.payload,
                                                                                   upload.reference_digest)
        try:
            reply = stub.SubmitUpdate(iter(chunks), timeout=30)
        except grpc.RpcError as exc:
            code = exc.code()
            assert code in CHOSEN, f"upload {n} ({what}): {code.name} {exc.details()}"
            codes[code.name] = codes.get(code.name, 0) + 1
            now = state_bytes(folder)
            assert now == before, f"upload {n} ({what}) was refused ({code.name}) but changed the persisted state"
            continue
        # a hostile-looking upload that is a valid one (say, only cut into odd pieces), or that one again
        accepted += not reply.duplicate
        used.add(name)
        assert reply.duplicate or state_bytes(folder) != before
        before = state_bytes(folder)
    print(json.dumps({"uploads": UPLOADS, "refused": codes, "accepted": accepted}))  # pytest -s shows it
    assert sum(codes.values()) >= UPLOADS * 0.9 and accepted <= len(fresh)
    assert len(codes) >= 4, codes  # the storm reached the header checks, the decoders and the size limits
    # the coordinator still serves: health, and a clean device's real upload
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
    as_device(stub, last)
    header = pb.UpdateHeader(round=1, reference_digest=valid[last].reference_digest)
    from edge_client.transport import Backoff, submit_update

    assert submit_update(stub, header, valid[last].payload, Backoff()).accepted
    assert len(coordinator.open.received) == accepted + 1
