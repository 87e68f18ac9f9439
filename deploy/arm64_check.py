"""The arm64 check: a Raspberry Pi's install route, for real, under QEMU, against an x86_64 coordinator.

    sudo .venv/bin/python deploy/arm64_check.py [--root /var/tmp/deltamask-arm64] [--out docs/runs/arm64]

As root on an x86_64 Debian host, with this checkout's `make install` done (the coordinator runs from .venv); it
installs qemu-user-static, debootstrap and binfmt-support when missing:
  1. a Debian bookworm arm64 root (what 64-bit Raspberry Pi OS is built on), by debootstrap; kept and
     reused by the next run;
  2. the project copied in (`git archive HEAD`: what is committed), and `deploy/install-rpi4.sh` run in the
     root as it is, with PyPI's torch (TORCH_INDEX= TORCH_SPEC="torch==2.9.1 torchvision==0.24.1": PyTorch's CPU index is not
     reachable here; on a Pi the script's default index is the route); pyfusefilter builds from its sdist;
  3. an x86_64 coordinator (this checkout's .venv, TLS, tiny backbone, a FiT-LDA head round and 2 mask
     rounds, held-out evaluation on digits) and 2 arm64 agents (the root's venv, digits split in 2, the
     prefix on onnxruntime) enrolled with a token, each agent process run under qemu-aarch64;
  4. a report: the rounds as the coordinator closed them, and for every mask update the reference-mask digest
     the arm64 agent computed beside the one the x86_64 coordinator computes for it.
Writes OUT/report.json and OUT/install.log (the install script's output); prints the report.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT_DIR = Path(__file__).resolve().parents[1]
TORCH = "torch==2.9.1 torchvision==0.24.1"  # PyPI's aarch64 CPU builds (torch >= 2.11 there pulls CUDA packages)
PACKAGES = "python3,python3-venv,python3-pip,ca-certificates,git"


def sh(cmd, **kw):
    print("+", cmd if isinstance(cmd, str) else " ".join(map(str, cmd)), flush=True)
    return subprocess.run(cmd, check=True, shell=isinstance(cmd, str), **kw)


def host_tools() -> None:
    if not all(shutil.which(t) for t in ("debootstrap", "qemu-aarch64-static")):
        sh("apt-get install -y -qq qemu-user-static debootstrap binfmt-support")
    if not Path("/proc/sys/fs/binfmt_misc/status").exists():
        sh("mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc")
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        sh("update-binfmts --enable qemu-aarch64")


def mirror() -> str:
    for line in Path("/etc/apt/sources.list.d/debian.sources").read_text().splitlines():
        if line.startswith("URIs:"):
            return line.split()[1]
    return "http://deb.debian.org/debian"


def build_root(root: Path) -> None:
    if (root / "usr/bin/python3").exists():
        print(f"arm64 root {root} exists: reused", flush=True)
    else:
        sh(["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(root),
            mirror()])
    for name in ("etc/pip.conf", "etc/ssl/certs/ca-certificates.crt", "etc/resolv.conf"):
        if Path("/" + name).exists():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy("/" + name, root / name)
    (root / "etc/apt/sources.list").write_text(f"deb {mirror()} bookworm main\n")
    for fs, kind in (("proc", "proc"), ("sys", "sysfs"), ("dev", None)):
        target = root / fs
        if subprocess.run(["mountpoint", "-q", str(target)]).returncode != 0:
            sh(["mount", "--bind", f"/{fs}", str(target)] if kind is None else ["mount", "-t", kind, kind, str(target)])


def copy_project(root: Path) -> None:
    src = root / "src/deltamask"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT_DIR), "archive", "HEAD"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)


def install(root: Path, log: Path, script: str = "install-rpi4.sh", *options: str) -> float:
    (root / "etc/udev/rules.d/60-deltamask-i2c.rules").unlink(missing_ok=True)  # every run takes the udev step
    venv = options[3] if len(options) > 3 else "/opt/deltamask"
    shutil.rmtree(root / venv.lstrip("/"), ignore_errors=True)  # a fresh venv: what the script installs, only
    started = time.monotonic()
    with open(log, "w") as out:
        run = subprocess.run(["chroot", str(root), "env", "TORCH_INDEX=", f"TORCH_SPEC={TORCH}",
                              "bash", f"/src/deltamask/deploy/{script}", *options], stdout=out, stderr=subprocess.STDOUT)
    if run.returncode != 0:
        sys.exit(f"{script} failed (exit {run.returncode}); see {log}")
    return time.monotonic() - started


# Jetson Nano and Coral: their scripts' venv route (--python) in the same Debian arm64 root. Not their stacks:
# JetPack 4.6 (Ubuntu 18.04, glibc 2.27, Python 3.6) and Mendel (Debian 10, Python 3.7) images are not
# reachable here, nor a Docker engine for their default container route.
OTHER_BOARDS = {"jetson-nano": ("install-jetson-nano.sh", "--python", "/usr/bin/python3", "--prefix",
                                "/opt/deltamask-jetson"),
                "coral": ("install-coral.sh", "--python", "/usr/bin/python3", "--prefix", "/opt/deltamask-coral")}


# onnxruntime 1.32 segfaults on import under this host's qemu-aarch64 (7.2); 1.19.2 loads. A QEMU limit, not a
# board's: the check puts 1.19.2 in the root's venv after the install script (report: "qemu_onnxruntime").
QEMU_ONNXRUNTIME = "onnxruntime==1.19.2"


def qemu_onnxruntime(root: Path, venv: str = "/opt/deltamask/venv") -> str:
    probe = ["chroot", str(root), f"{venv}/bin/python", "-c", "import onnxruntime; print(onnxruntime.__version__)"]
    first = subprocess.run(probe, capture_output=True, text=True)
    if first.returncode == 0:
        return f"{first.stdout.strip()} (as installed)"
    sh(["chroot", str(root), f"{venv}/bin/pip", "install", "-q", QEMU_ONNXRUNTIME])
    return f"{subprocess.run(probe, capture_output=True, text=True).stdout.strip()} (the installed one exited " \
           f"{first.returncode} on import under QEMU)"


def federation(root: Path, work: Path, timeout_s: float) -> dict:
    python = str(ROOT_DIR / ".venv/bin/python")
    env = {**os.environ, "PYTHONPATH": str(ROOT_DIR), "HF_HUB_OFFLINE": "1"}
    sys.path.insert(0, str(ROOT_DIR))
    from server.demo import free_port

    port, state = free_port(), work / "state"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = {"listen": f"127.0.0.1:{port}", "state_dir": str(state), "backbone": "tiny", "weights": None,
              "image_size": 16, "num_classes": 10, "expected_clients": 2, "min_quorum": 2, "rounds": 2,
              "head": "lda", "lda_covariance": "diag", "round_deadline_s": 3600, "heartbeat_interval_s": 60,
              "exit_when_done": True, "tls": {"cert": str(state / "tls/server.pem"), "key": str(state / "tls/server.key")},
              "evaluation": {"dataset": "digits", "samples": 300}, "local": {"batch_size": 32}}
    server_yaml = work / "server.yaml"
    server_yaml.write_text(json.dumps(config))  # JSON is YAML
    sh([python, "-m", "server.cli", "tls", "--config", str(server_yaml), "--hosts", "localhost,127.0.0.1"], env=env,
       cwd=ROOT_DIR, capture_output=True)
    token = subprocess.run([python, "-m", "server.cli", "token", "--config", str(server_yaml), "--uses", "2"], env=env,
                           cwd=ROOT_DIR, check=True, capture_output=True, text=True).stdout.strip()
    server = subprocess.Popen([python, "-m", "server.cli", "--config", str(server_yaml)], env=env, cwd=ROOT_DIR,
                              stdout=subprocess.PIPE, stderr=open(work / "server.err", "w"), text=True)
    inside = root / "var/tmp/deltamask-check"
    shutil.rmtree(inside, ignore_errors=True)
    inside.mkdir(parents=True)
    shutil.copy(state / "tls/ca.pem", inside / "ca.pem")
    agents = []
    for k in range(2):
        agent = {"name": f"arm64-{k}", "server": f"localhost:{port}", "ca": "/var/tmp/deltamask-check/ca.pem",
                 "enrollment_token": token, "credential_file": f"/var/tmp/deltamask-check/{k}.credential",
                 "kind": "rpi4", "weights": "default", "cache_dir": "/var/tmp/deltamask-check/cache",
                 "prefix_runtime": "onnxruntime", "progress": False, "exit_when_done": True,
                 "data": {"dataset": "digits", "samples": 0, "clients": 2, "index": k, "alpha": 10.0, "seed": 0}}
        (inside / f"agent-{k}.yaml").write_text(json.dumps(agent))
        agents.append(subprocess.Popen(
            ["chroot", str(root), "/opt/deltamask/venv/bin/deltamask-client", "--config",
             f"/var/tmp/deltamask-check/agent-{k}.yaml"], stdout=open(work / f"agent-{k}.log", "w"),
            stderr=subprocess.STDOUT))
    try:
        out, _ = server.communicate(timeout=timeout_s)
        for a in agents:  # told that training is over, they exit on their own
            a.wait(timeout=120)
    finally:
        for a in agents + [server]:
            if a.poll() is None:
                a.kill()
    rounds = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {"rounds": rounds, "state": state, "agents_exit": [a.wait() for a in agents], "server_exit": server.returncode,
            "agent_arch": subprocess.run(["chroot", str(root), "uname", "-m"], capture_output=True,
                                         text=True).stdout.strip(),
            "agent_python": subprocess.run(["chroot", str(root), "/opt/deltamask/venv/bin/python", "-c",
                                            "import sys, torch, onnxruntime, grpc; print(sys.version.split()[0], "
                                            "torch.__version__, onnxruntime.__version__, grpc.__version__)"],
                                           capture_output=True, text=True).stdout.strip()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/var/tmp/deltamask-arm64"))
    parser.add_argument("--out", type=Path, default=ROOT_DIR / "docs/runs/arm64")
    parser.add_argument("--timeout", type=float, default=5400)
    parser.add_argument("--skip-install", action="store_true", help="reuse the root's installed agent")
    parser.add_argument("--other-boards", action="store_true",
                        help="also run the Jetson Nano and Coral scripts' venv route (--python) in the root")
    args = parser.parse_args()
    if os.geteuid() != 0 or platform.machine() != "x86_64":
        sys.exit("run as root on an x86_64 host")
    args.out.mkdir(parents=True, exist_ok=True)
    host_tools()
    build_root(args.root)
    install_s = None
    if not args.skip_install:
        copy_project(args.root)
        install_s = install(args.root, args.out / "install.log")
    others = {}
    if args.other_boards:
        copy_project(args.root)
        for board, (script, *options) in OTHER_BOARDS.items():
            seconds = install(args.root, args.out / f"install-{board}.log", script, *options)
            imports = subprocess.run(["chroot", str(args.root), f"{options[3]}/venv/bin/python", "-c",
                                      "import deltamask, torch, pyfusefilter, grpc; print('ok', torch.__version__)"],
                                     capture_output=True, text=True)
            others[board] = {"command": f"{script} {' '.join(options)}", "install_s": round(seconds),
                             "imports": imports.stdout.strip() or imports.stderr.strip()[-300:]}
    ort = qemu_onnxruntime(args.root)
    result = federation(args.root, Path("/var/tmp/deltamask-check"), args.timeout)
    report = {"command": "sudo .venv/bin/python deploy/arm64_check.py", "install_script": "deploy/install-rpi4.sh (unpatched; "
              f"TORCH_INDEX= TORCH_SPEC={TORCH})", "install_s": install_s, "agent_arch": result["agent_arch"],
              "agent_python_torch_onnxruntime_grpc": result["agent_python"], "coordinator_arch": platform.machine(),
              "server_exit": result["server_exit"], "agents_exit": result["agents_exit"],
              "rounds": [{k: r.get(k) for k in ("round", "phase", "state", "received", "accuracy", "uplink_bpp",
                                                 "downlink_bpp", "head_sha256", "theta_sha256")} for r in result["rounds"]],
              "qemu_onnxruntime": ort, "reference_digests": reference_digests(result["state"]),
              "other_boards": others}
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    ok = result["server_exit"] == 0 and all(r["state"] == "closed" for r in result["rounds"]) and \
        all(d["equal"] for d in report["reference_digests"]) and len(result["rounds"]) == 3 and \
        len(report["reference_digests"]) == 4
    return 0 if ok else 1


def reference_digests(state: Path) -> list:
    """For every mask update: the reference-mask digest the arm64 agent sent with it, and the digest of the
    reference mask this x86_64 host draws for that device from the round's theta and seed (where the round's
    theta file is still kept: the coordinator prunes old ones; it compared the two when it took the update,
    and stores only updates that matched)."""
    sys.path.insert(0, str(ROOT_DIR))
    from deltamask.sampling import MaskDigest, reference_mask
    from deltamask.thetawire import decode_theta
    from server.store import Store

    store, d = Store(state), masked_weights()
    try:
        names = {row["device_id"]: row["name"] for row in store.devices()}
        rows = []
        for r in store.rounds():
            if r["phase"] != "mask" or r["state"] != "closed":
                continue
            kept = (state / f"theta-{r['round']}.bin").exists()
            thresholds = decode_theta(store.load_theta(r["round"]), d) if kept else None
            for u in store.updates(r["round"]):
                name = names[u["device_id"]]
                row = {"round": r["round"], "device": name, "arm64": u["reference_digest"], "x86_64": None}
                if thresholds is not None:
                    mask = reference_mask(thresholds, r["seed"], name)
                    row["x86_64"] = MaskDigest(d).update(mask).hexdigest()
                row["equal"] = row["x86_64"] == row["arm64"] if thresholds is not None else "checked on acceptance"
                rows.append(row)
        return rows
    finally:
        store.close()


def masked_weights() -> int:
    sys.path.insert(0, str(ROOT_DIR))
    from deltamask.learn.models import load_backbone, masked_weight_count

    return masked_weight_count(load_backbone("tiny", weights=None, blocks=5, size=16))


if __name__ == "__main__":
    sys.exit(main())
