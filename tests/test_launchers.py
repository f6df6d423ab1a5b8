"""The torchrun launchers' shared command line (scripts/_torchrun.sh): one node or several from the environment, and
two single-process "nodes" meeting at a c10d rendezvous on this machine train like one process."""

import os
import signal
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, write_llava_json
from test_training import assert_same_run, common_args, read_log

LAUNCHERS = ["pretrain.sh", "sft.sh", "sft_lora.sh", "sft_fsdp.sh", "dpo.sh"]
TORCHRUN_ENV = ["NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ENDPOINT", "RDZV_ID"]
SHARED = os.path.join(ROOT, "scripts", "_torchrun.sh")


def clean_env(**settings) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    return {**env, "OMP_NUM_THREADS": "1", **settings}


@pytest.mark.parametrize("settings, expected", [
    ({}, ["--standalone", "--nproc_per_node", "4"]),
    ({"NPROC": "8", "NNODES": "1", "MASTER_ADDR": "10.0.0.1"}, ["--standalone", "--nproc_per_node", "8"]),
    ({"NPROC": "2", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29501"},
     ["--nnodes", "2", "--nproc_per_node", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", "10.0.0.1:29501",
      "--rdzv_id", "mary"]),
    ({"NNODES": "3", "MASTER_ADDR": "node0"},
     ["--nnodes", "3", "--nproc_per_node", "4", "--rdzv_backend", "c10d", "--rdzv_endpoint", "node0:29500",
      "--rdzv_id", "mary"]),
    ({"NNODES": "2", "MASTER_ADDR": "node0", "RDZV_ENDPOINT": "store:1234", "RDZV_ID": "job7"},
     ["--nnodes", "2", "--nproc_per_node", "4", "--rdzv_backend", "c10d", "--rdzv_endpoint", "store:1234",
      "--rdzv_id", "job7"]),
], ids=["default", "one-node", "two-nodes", "default-port", "rdzv-endpoint"])
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_launcher_takes_the_node_settings_from_the_environment(tmp_path, launcher, settings, expected):
    """A stand-in torchrun records its command line: the launcher's torchrun flags come from the environment, then
    the stage script and its flags, the caller's last."""
    record = tmp_path / "argv"
    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir()
    fake.write_text(f"#!/usr/bin/env bash\nprintf '%s\\n' \"$@\" > {str(record)!r}\n")
    fake.chmod(0o755)
    env = clean_env(PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}", **settings)
    subprocess.run(["bash", os.path.join(ROOT, "scripts", launcher), "--seed", "7"], env=env, check=True, timeout=60)
    argv = record.read_text().splitlines()
    script = next(i for i, word in enumerate(argv) if word.endswith("_train.py"))
    assert argv[:script] == expected and argv[-2:] == ["--seed", "7"]


def test_several_nodes_without_an_address_stop_with_one_line(tmp_path):
    result = subprocess.run(["bash", SHARED, "sft_train.py"], env=clean_env(NNODES="2"), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "NNODES=2: set MASTER_ADDR (and MASTER_PORT) or RDZV_ENDPOINT=host:port, an address every node reaches"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_through_the_launcher_equal_one_process(tmp_path):
    """Two nodes of one process each, started through the launchers' own torchrun logic (NNODES=2, MASTER_ADDR,
    MASTER_PORT), meet at a c10d rendezvous on 127.0.0.1 and train on gloo: per-step losses and gradient norms equal
    one process on the same global batch (2 ranks x batch 2 against 1 x batch 4)."""
    data = write_llava_json(str(tmp_path / "data"), 16)
    steps = ["--preset", "tiny", "--device", "cpu", "--max_steps", "3", "--save_steps", "0"]
    stage = os.path.join(ROOT, "sft_train.py")
    env = clean_env(NPROC="1", NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                    RDZV_ID=f"test-{os.getpid()}")
    nodes = [subprocess.Popen(["bash", SHARED, stage, *common_args(data, tmp_path / "two", *steps), "--batch_size",
                               "2"], env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for rank in (0, 1)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=180))
    finally:
        for node in nodes:  # a node left waiting at the rendezvous must not outlive the test
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert "2 process(es) x batch 2" in "".join(out for out, _ in outputs)

    one = subprocess.run([sys.executable, stage, *common_args(data, tmp_path / "one", *steps), "--batch_size", "4"],
                         env=clean_env(), capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr[-3000:]
    two_log, one_log = read_log(tmp_path / "two"), read_log(tmp_path / "one")
    assert sorted(two_log) == sorted(one_log) == [1, 2, 3]
    assert_same_run(two_log, one_log, [1, 2, 3])
