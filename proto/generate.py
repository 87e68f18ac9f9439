"""Regenerate the checked-in Python code for proto/deltamask/v1 (or, with --check, fail when it drifted).

    python proto/generate.py          # writes deltamask/v1/*_pb2*.py
    python proto/generate.py --check  # exit 1 if the checked-in files differ from a fresh generation

Generated with grpcio-tools 1.70.0 on purpose: its protobuf 5.29 gencode imports under protobuf 5.29
through 7.x and grpcio >= 1.70, so one set serves Python 3.8+ boards and the newest server. Code from
a newer grpcio-tools refuses to import under an older protobuf runtime.
"""
import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

GRPCIO_TOOLS = "1.70.0"
ROOT = Path(__file__).resolve().parents[1]
PROTOS = ["deltamask/v1/coordinator.proto"]
OUTPUTS = ["coordinator_pb2.py", "coordinator_pb2.pyi", "coordinator_pb2_grpc.py"]
PACKAGE = Path("deltamask/v1")


def generate(out: Path) -> None:
    from importlib.metadata import version

    from grpc_tools import protoc

    found = version("grpcio-tools")
    if found != GRPCIO_TOOLS:
        sys.exit(f"generate.py: needs grpcio-tools=={GRPCIO_TOOLS} (found {found}): "
                 f"pip install grpcio-tools=={GRPCIO_TOOLS}")
    args = ["protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *[str(ROOT / "proto" / p) for p in PROTOS]]
    if protoc.main(args) != 0:
        sys.exit("generate.py: protoc failed")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the checked-in files, write nothing")
    check = parser.parse_args(argv).check
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        drifted = []
        for name in OUTPUTS:
            fresh, kept = Path(tmp) / PACKAGE / name, ROOT / PACKAGE / name
            if check:
                if not kept.exists() or not filecmp.cmp(fresh, kept, shallow=False):
                    drifted.append(str(PACKAGE / name))
            else:
                shutil.copyfile(fresh, kept)
    if drifted:
        print("generated code drifted from proto/ (run python proto/generate.py): " + ", ".join(drifted))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
