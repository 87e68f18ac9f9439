"""The generated code matches proto/ and imports under the oldest supported runtime."""
import subprocess
import sys
from pathlib import Path

import google.protobuf
import grpc
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_checked_in_code_has_not_drifted_from_the_proto():
    from importlib.metadata import PackageNotFoundError, version

    try:
        tools = version("grpcio-tools")
    except PackageNotFoundError:
        tools = None
    if tools != "1.70.0":
        pytest.skip(f"needs grpcio-tools 1.70.0 (found {tools}): `make test` runs this in the edge environment")
    result = subprocess.run([sys.executable, "proto/generate.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_imports_and_round_trips_a_message():
    from deltamask.v1 import coordinator_pb2 as pb

    header = pb.UpdateHeader(device_id="abc", round=3, reference_digest="0" * 64, total_length=10,
                             metrics=pb.Metrics(num_examples=5, energy_j=1.5))
    chunk = pb.UpdateChunk(header=header)
    again = pb.UpdateChunk.FromString(chunk.SerializeToString())
    assert again.WhichOneof("part") == "header" and again.header.metrics.energy_j == 1.5
    assert pb.DESCRIPTOR.package == "deltamask.v1"
    assert tuple(int(x) for x in google.protobuf.__version__.split(".")[:2]) >= (5, 29)
    assert tuple(int(x) for x in grpc.__version__.split(".")[:2]) >= (1, 70)
