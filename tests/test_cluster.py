"""Clusters: the shipped configs pass Ray's own validation; a real two-node Ray on 127.0.0.1, with
token authentication, runs a study on storage the nodes reach only by URI, with the driver's code."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import EXAMPLES, ROOT, energyat_cmd
from ray.autoscaler._private.util import prepare_config, validate_config
from test_remote_storage import BUCKET, CREDENTIALS, S3, s3  # noqa: F401  (s3: the S3-protocol server fixture)

from analysis.store import git_sha

RAY = str(Path(sys.executable).with_name("ray"))


def _local_config() -> dict:
    text = (ROOT / "docs" / "cluster.md").read_text()
    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))


@pytest.mark.parametrize("name", ["cluster.yaml", "docs/cluster.md (provider: local)"])
def test_cluster_config_passes_rays_validation(name: str) -> None:
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text()) if name == "cluster.yaml" else _local_config()
    validate_config(config)
    validate_config(prepare_config(config))


def test_aws_config_keeps_trials_off_the_head_and_workers_on_spot() -> None:
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head = config["available_node_types"][config["head_node_type"]]
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    assert any(
        w["resources"].get("GPU", 0) >= 1 and w["min_workers"] == 0 and w["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        for w in workers
    )
    text = (ROOT / "cluster.yaml").read_text().lower()
    assert "aws_secret_access_key" not in text and "aws_access_key_id" not in text


# Ray rewrites 127.0.0.1 to the host's outward address (so that other machines can reach a
# node); other addresses of the loopback range are kept as given, so the two nodes live on
# 127.0.0.2 and 127.0.0.3 and nothing leaves the machine. Token authentication on, as Ray's
# default for a head: every node and the driver read the same token (~/.ray/auth_token).
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"


def _env(temp: Path) -> dict[str, str]:
    return dict(os.environ, RAY_TMPDIR=str(temp), RAY_AUTH_MODE="token")


def _start_node(args: list[str], temp: Path, log: Path) -> subprocess.Popen[bytes]:
    """`ray start --block`: the node lives exactly as long as this process (its id for stopping).
    Its output goes to `log`, quoted when the node does not come up."""
    with log.open("ab") as out:
        return subprocess.Popen([RAY, "start", "--block", *args], env=_env(temp), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _alive_nodes(address: str, temp: Path) -> list[str]:
    """The addresses of the cluster's live nodes; none when the head does not answer in 60 s."""
    try:
        probe = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address='{address}', log_to_driver=False); "
             "print(' '.join(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))"],
            capture_output=True, text=True, timeout=60, env=_env(temp),
        )
    except subprocess.TimeoutExpired:
        return []
    return probe.stdout.split()


def _start_until_alive(args: list[str], temp: Path, log: Path, address: str, expect: list[str]) -> tuple[subprocess.Popen[bytes], list[str]]:
    """Start a node and wait until the cluster shows `expect` alive. Ray gives a node 30 s to
    register with the GCS (a constant in ray._private.node): on a machine whose two cores the
    other test worker keeps busy that is sometimes too short, and the node exits. It is started
    again then, at most three times in all."""
    alive: list[str] = []
    for _attempt in range(3):
        node = _start_node(args, temp, log)
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and node.poll() is None:
            alive = _alive_nodes(address, temp)
            if alive == expect:
                return node, alive
            time.sleep(3)
        _stop_node(node)
    return node, alive


def _stop_node(node: subprocess.Popen[bytes]) -> None:
    if node.poll() is None:
        os.killpg(node.pid, signal.SIGTERM)  # `ray start --block` stops its own node's processes
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()


class Cluster(NamedTuple):
    address: str
    temp: Path
    logs: tuple[Path, Path]
    head: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A head node on 127.0.0.2 and a second node on 127.0.0.3, one CPU each, token authentication
    on; stopped by their `ray start --block` processes at the end of the module."""
    port = 46379
    temp = Path("/tmp") / f"ray-two-node-{os.getpid()}"  # short: Ray's socket paths have a length limit
    common = ["--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats"]
    folder = tmp_path_factory.mktemp("cluster")
    logs = folder / "head.log", folder / "worker.log"
    address = f"{HEAD_IP}:{port}"
    # the head's flags on one line: tests/test_security.py reads every `--head` line for its dashboard flag
    head_flags = ["--head", "--include-dashboard=false", f"--port={port}", f"--node-ip-address={HEAD_IP}", "--node-manager-port=46380"]
    ports = ["--object-manager-port=46381", "--min-worker-port=46400", "--max-worker-port=46499"]
    head, alive = _start_until_alive([*head_flags, *ports, *common], temp, logs[0], address, [HEAD_IP])
    worker = None
    try:
        assert alive == [HEAD_IP], f"the head node did not start: {logs[0].read_text()[-2000:]}"
        # A loaded machine (the other test worker runs Ray too) can also make the second node's
        # start fail on a port taken for a moment: the same retries
        worker, alive = _start_until_alive([f"--address={address}", f"--node-ip-address={WORKER_IP}", "--node-manager-port=46382",
                                            "--object-manager-port=46383", "--min-worker-port=46500", "--max-worker-port=46599", *common],
                                           temp, logs[1], address, [HEAD_IP, WORKER_IP])
        assert alive == [HEAD_IP, WORKER_IP], f"nodes alive: {alive}; worker log: {logs[1].read_text()[-3000:]}"
        yield Cluster(address, temp, logs, head, worker)
    finally:
        for node in (worker, head):
            if node is not None:
                _stop_node(node)
        shutil.rmtree(temp, ignore_errors=True)
    assert head.poll() is not None and (worker is None or worker.poll() is not None)


def _study_env(cluster: Cluster, tmp_path: Path) -> dict[str, str]:
    return {**_env(cluster.temp), **CREDENTIALS, "ENERGYAT_JOURNAL_DIR": str(tmp_path / "journals")}


def test_two_node_cluster_on_loopback_runs_the_smoke_study(cluster: Cluster, tmp_path: Path, s3: S3) -> None:  # noqa: F811  (the imported fixture)
    address, temp = cluster.address, cluster.temp
    # a client without the cluster's token can neither join nor submit: no token, a wrong one
    outsiders = [
        subprocess.Popen(
            [sys.executable, "-c", f"import ray; ray.init(address='{address}'); print('JOINED', ray.get(ray.remote(lambda: 1).remote()))"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for env in ({k: v for k, v in _env(temp).items() if k != "RAY_AUTH_MODE"}, {**_env(temp), "RAY_AUTH_TOKEN": "not-the-token"})
    ]
    for outsider in outsiders:
        out, err = outsider.communicate(timeout=180)
        assert outsider.returncode != 0 and "JOINED" not in out and "InvalidAuthToken" in err, err[-2000:]
    # storage the nodes do not share by path (an S3-protocol server): a worker needs only the
    # URI; two trials at once, one CPU per node, so Ray must place them on different nodes.
    # The driver runs outside the checkout: Ray puts the driver's working directory on every
    # worker's path, and here the workers share this disk, so the checkout would shadow the
    # code Ray ships (on a real cluster the driver's directory is not on the workers' disks)
    proc = subprocess.run([*energyat_cmd(), "run", str(EXAMPLES / "smoke.yaml"), "--address", address, "--storage", s3.uri("studies"),
                           "--name", "two", "--set", "samples=2", "--set", "epochs=2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900, env=_study_env(cluster, tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    node_ids = set()
    results = [f for f in s3.files("studies/two/tune") if f.endswith("/result.json")]
    assert len(results) == 2, s3.files("studies/two")
    for name in results:
        node_ids |= {r["ray_node_id"] for r in _reports(s3, f"studies/two/tune/{name}")}
    assert len(node_ids) == 2  # trials ran on both nodes
    # the trials ran the driver's code, shipped by Ray, and say so with the driver's revision
    # (compacted at the study's end: one part, each trial's provenance in its footer)
    (name,) = s3.files("studies/two/tables/trials")
    meta = pq.read_schema(f"{BUCKET}/studies/two/tables/trials/{name}", filesystem=s3.fs).metadata
    by_trial = json.loads(meta[b"energyat.provenance_by_trial"])
    assert len(by_trial) == 2
    for prov in by_trial.values():
        assert "runtime_resources" in prov["code"] and prov["git_sha"] == git_sha(), prov["code"]


def _reports(store: S3, key: str) -> list[dict]:
    """The reports Tune logged for a trial (its result.json in the bucket)."""
    with store.fs.open_input_stream(f"{BUCKET}/{key}") as f:
        return [json.loads(line) for line in f.read().decode().splitlines()]


def _raylet(ip: str) -> int | None:
    """The pid of the raylet of the node at `ip` (its command line names the address)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"/raylet") and any(a == f"--node_ip_address={ip}".encode() for a in args):
            return int(pid)
    return None


LOST_EPOCHS = 12  # long enough that both trials are mid-run together when the node is lost (at 5, one can finish before the other starts)


def test_a_lost_node_s_trials_finish_on_the_other_node_from_their_checkpoints(cluster: Cluster, tmp_path: Path, s3: S3) -> None:  # noqa: F811
    # Runs last: it takes the second node down. Two trials, one per node; once both have a
    # checkpoint and epochs left, the second node's raylet is SIGKILLed (its trial's worker dies
    # with it, as when a spot instance is reclaimed). Tune restarts that trial on the head from its
    # checkpoint in the bucket: every (trial, epoch) stored once, the journal matching Tune.
    from test_study import assert_journal_matches_tune, assert_tables_consistent

    study = s3.uri("studies/lost")
    log = tmp_path / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen([*energyat_cmd(), "run", str(EXAMPLES / "smoke.yaml"), "--address", cluster.address, "--storage", s3.uri("studies"),
                                 "--name", "lost", "--set", "samples=2", "--set", f"epochs={LOST_EPOCHS}"],
                                cwd=tmp_path, stdout=out, stderr=out, env=_study_env(cluster, tmp_path), start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:  # both trials running, each with an epoch reported, a checkpoint in the bucket and two epochs still to run
            done = [len(s3.files(f"studies/lost/tables/epochs/{t}")) for t in {f.split("/")[0] for f in s3.files("studies/lost/tables/epochs")}]
            checkpointed = {f.split("/")[0] for f in s3.files("studies/lost/tune") if "/checkpoint_" in f}
            if (len(done) == 2 and all(1 <= n <= LOST_EPOCHS - 2 for n in done) and len(s3.files("studies/lost/tables/trials")) == 2
                    and len(checkpointed) == 2):
                break
            assert proc.poll() is None, f"the study ended before the node could be lost:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no moment to lose the node within 600 s: {done}"
            time.sleep(0.5)
        raylet = _raylet(WORKER_IP)
        assert raylet is not None, "no raylet of the second node"
        os.kill(raylet, signal.SIGKILL)
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-4000:]
    assert cluster.worker.wait(timeout=120) is not None  # the second node is gone for good
    trials = assert_tables_consistent(study)
    assert len(trials) == 2 and all(t[1] == "TERMINATED" and t[3] == LOST_EPOCHS for t in trials), trials
    journal = tmp_path / "copy.journal"
    with s3.fs.open_input_stream(f"{BUCKET}/studies/lost/optuna.journal") as f:
        journal.write_bytes(f.read())
    assert_journal_matches_tune(study, journal=journal, tune_dir=f"{BUCKET}/studies/lost/tune", fs=s3.fs)
    # the lost node's trial: reported on both nodes, up to its last epoch. Every epoch's row once is
    # checked on the tables above; Tune's own log of the reports (result.json) may repeat the epochs
    # re-run since the checkpoint (a trial checkpoints every CHECKPOINT_SECONDS, not every epoch, so
    # [0, 1, 1, 2, ...] is possible) and may lose its first line across a restart ([1, 2, 3, 4])
    moved = []
    for name in [f for f in s3.files("studies/lost/tune") if f.endswith("/result.json")]:
        reports = _reports(s3, f"studies/lost/tune/{name}")
        epochs = [r["epoch"] for r in reports]
        assert epochs[-1] == LOST_EPOCHS - 1 and set(epochs) >= set(range(1, LOST_EPOCHS)), (name, epochs)
        if len({r["ray_node_id"] for r in reports}) == 2:
            moved.append(name)
    assert len(moved) == 1, moved


@pytest.mark.parametrize("name", ["cluster.yaml", "docs/cluster.md (provider: local)"])
def test_cluster_configs_start_every_node_with_token_authentication_and_a_pinned_revision(name: str) -> None:
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text()) if name == "cluster.yaml" else _local_config()
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts if "ray start" in c)
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}  # one token for every node
    installs = [c for c in config["setup_commands"] if "pip install" in c and "energyat" in c]
    assert installs and all("@main" not in c and "@YOUR-COMMIT-SHA" in c for c in installs)
