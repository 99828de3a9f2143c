"""Where a sweep's runs execute (`st.engines`), with real processes: the local pool's workers never
outlive their parent (kill -9, SIGTERM, Ctrl-C), and on a local Ray instance a sweep gives the local
pool's per-run metrics, survives a worker killed with -9 mid-run (Ray retries it, and it resumes from
its progress) and a driver killed with -9 (the rerun skips finished runs). On a Ray cluster of this
machine bound to 127.0.0.1: `--ray 127.0.0.1:PORT` joins it, and a sweep survives one of its two nodes
lost mid-run (removed, or its raylet killed). An address st cannot join is one line in seconds; a
sweep waiting on Ray stops on SIGTERM and Ctrl-C. Tiny random model, one torch thread per run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from st.specs import DataSpec, ModelSpec, RunSpec, TrainConfig
from st.sweep import run_sweep
from st.sweep_config import SweepConfig
from tests.conftest import free_port

FAULTS = "ST_TEST_FAULTS"  # a folder, in Ray workers' environment: where the paused worker leaves its pid
TARGET = "ray-killed/seed0/winning-r0.50/run"  # the run whose worker is killed after its first epoch


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def config(model, data, epochs: int = 2, ratios=(0.3, 0.5)) -> SweepConfig:
    spec = RunSpec(
        DataSpec("csv", str(data)),
        ModelSpec(str(model), dropout=0.0, head_dropout=0.0),
        TrainConfig(epochs=epochs, batch_size=8, lr=5e-3),
    )
    return SweepConfig.create(spec, ratios=ratios, kinds=("winning", "random"), seeds=1)


def metrics(doc: dict) -> dict:
    return {
        (r["seed"], r["kind"], r["ratio"]): (r["selection"], r["report"], r["best_epoch"], r["error"])
        for r in doc["runs"]
    }


def as_in(doc: dict, reference: dict) -> bool:
    """Every run of `doc` gave what the same run gave in `reference` (a sweep of more ratios)."""
    runs, expected = metrics(doc), metrics(reference)
    return runs == {key: expected.get(key) for key in runs}


@pytest.fixture(scope="module")
def pool_doc(tiny_bert_dir, sentiment_dir, tmp_path_factory):
    """The reference: the same sweep in the local pool (2 processes)."""
    doc = run_sweep(config(tiny_bert_dir, sentiment_dir), tmp_path_factory.mktemp("pool") / "sweep", jobs=2)
    assert len(doc["runs"]) == 5 and not any(r["error"] for r in doc["runs"])
    return doc


def cli_args(model, data, out, *extra) -> list[str]:
    return [
        "sweep",
        "--task",
        "csv",
        "--data-dir",
        str(data),
        "--model",
        str(model),
        "--dropout",
        "0",
        "--head-dropout",
        "0",
        "--batch-size",
        "8",
        "--lr",
        "5e-3",
        "--ratios",
        "0.3,0.5",
        "--kinds",
        "winning,random",
        "--seeds",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
        *map(str, extra),
    ]


# ---- real processes ----------------------------------------------------------------------------


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped
    except OSError:
        return False


def command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:
        return ""


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_cli(*args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: a signal to it spares pytest
        # A shell starts background jobs with SIGINT ignored, and Python then keeps ignoring it:
        # without this, Ctrl-C would not reach the command when the tests run in the background.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def finished_runs(out: Path) -> int:
    try:
        return len(json.loads((out / "results.json").read_text())["runs"])
    except (OSError, ValueError):
        return 0


needs_linux = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")


@needs_linux
@pytest.mark.parametrize(
    "how", ["kill -9 of the parent", "SIGTERM to the parent", "Ctrl-C (SIGINT to the process group)"]
)
def test_pool_workers_never_outlive_the_sweep(how, tiny_bert_dir, sentiment_dir, tmp_path):
    out = tmp_path / "s"
    parent = start_cli(*cli_args(tiny_bert_dir, sentiment_dir, out, "--epochs", 200, "--jobs", 2))
    workers = set()
    try:
        # mid-run: the full model has saved an epoch's progress, and both pool workers are up
        wait_for(lambda: (out / "seed0/full/.progress/state.pt").exists(), 120, "the full model's first epoch")
        workers = wait_for(lambda: (lambda d: d if len(d) >= 2 else None)(descendants(parent.pid)), 30, "the workers")
        if how.startswith("kill"):
            parent.send_signal(signal.SIGKILL)
        elif how.startswith("SIGTERM"):
            parent.send_signal(signal.SIGTERM)
        else:
            os.killpg(parent.pid, signal.SIGINT)
        _, stderr = parent.communicate(timeout=60)
        wait_for(lambda: not any(alive(p) for p in workers), 15, f"workers {sorted(workers)} to stop")
        if how.startswith("kill"):
            assert parent.returncode == -signal.SIGKILL
        else:  # as cleanly as Ctrl-C: one line that says the finished work is kept and how to resume
            assert parent.returncode == 130 and "Traceback" not in stderr, stderr
            assert "interrupted" in stderr and "same command resumes" in stderr, stderr
        assert not (out / "seed0/full/metrics.json").exists()  # it was stopped mid-run, not let finish
    finally:
        for pid in {parent.pid, *workers}:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_pool_workers_import_the_users_task_modules(tiny_bert_dir, sentiment_dir, tmp_path):
    """`st --user-dir` registers tasks in the parent only: spawned workers must import them again."""
    module = tmp_path / "engines_user_tasks.py"
    module.write_text(
        "from st.tasks import TASKS, register_task\n\n\n@register_task('engines_user_csv')\n"
        "def engines_user_csv(**options):\n    return TASKS['csv'](**options)\n"
    )
    args = cli_args(tiny_bert_dir, sentiment_dir, tmp_path / "s", "--epochs", 1, "--jobs", 2)
    args[args.index("csv")] = "engines_user_csv"
    result = CliRunner().invoke(cli, ["--user-dir", str(module), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    runs = json.loads((tmp_path / "s" / "results.json").read_text())["runs"]
    assert len(runs) == 5 and not any(r["error"] for r in runs)


# ---- bad input (before the Ray instance below starts: a connected Ray is used as it is) -----------


def one_line_error(args) -> str:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    return lines[0]


def test_ray_without_the_extra_says_how_to_install_it(tiny_bert_dir, sentiment_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where Ray is not installed
    assert "pip install 'st[ray]'" in one_line_error(cli_args(tiny_bert_dir, sentiment_dir, tmp_path / "s", "--ray"))
    assert not (tmp_path / "s").exists()  # refused before anything was written


@contextmanager
def listener(answer: bytes):
    """A TCP server on 127.0.0.1 that sends `answer` to whoever connects, then keeps silent: yields its port
    and the connections it took."""
    server, taken = socket.create_server(("127.0.0.1", 0)), []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
                taken.append(conn)
                conn.sendall(answer)
            except OSError:  # closed
                return

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1], taken
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        for conn in taken:
            conn.close()


SSH = b"SSH-2.0-OpenSSH_9.6\r\n"  # a server that is no Ray head
HTTP2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # what a Ray head (gRPC) answers first


@pytest.mark.parametrize(("host", "there"), [("127.0.0.1", "nothing"), ("localhost", "no Ray head")])
def test_unreachable_ray_address_is_one_line_in_seconds(host, there, tiny_bert_dir, sentiment_dir, tmp_path):
    """One line naming the address dialled (st dials a loopback address as given; Ray would dial this
    machine's own address instead), within seconds: Ray itself tries for ten minutes."""
    with listener(SSH) as (port, _):
        port = free_port() if there == "nothing" else port
        args = cli_args(tiny_bert_dir, sentiment_dir, tmp_path / "s", "--ray", f"{host}:{port}")
        started = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 60  # Python and torch start, then a second; a loaded machine takes longer
    assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert f"no Ray cluster answers at {host}:{port} (" in run.stderr and "ray start --head" in run.stderr, run.stderr
    assert ("no Ray head" in run.stderr) == (there == "no Ray head"), run.stderr
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_ray_with_jobs_is_refused(tiny_bert_dir, sentiment_dir, tmp_path):
    assert "drop --jobs" in one_line_error(cli_args(tiny_bert_dir, sentiment_dir, tmp_path / "s", "--ray", "--jobs", 2))


def test_ray_under_torchrun_is_refused_with_the_reason(tiny_bert_dir, sentiment_dir, tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=1",
            "-m",
            "cli.main",
            *cli_args(tiny_bert_dir, sentiment_dir, tmp_path / "s", "--ray"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "torchrun starts one sweep per rank" in errors[0] and "without torchrun" in errors[0], (
        run.stderr
    )
    assert not (tmp_path / "s").exists()


# ---- Ray -----------------------------------------------------------------------------------------


def pause_target_run():
    """In every Ray worker (Ray's worker_process_setup_hook): the first attempt at TARGET stops after its
    first epoch's progress is saved and waits to be killed; every run that resumes from progress says so."""
    from st.runs import RunFolder

    faults = Path(os.environ[FAULTS])
    save, load = RunFolder.save_progress, RunFolder.load_progress

    def save_progress(self, *args, **kwargs):
        save(self, *args, **kwargs)
        if self.path.as_posix().endswith(TARGET) and not (faults / "killed").exists():
            import ray

            (faults / "node").write_text(ray.get_runtime_context().get_node_id())
            (faults / "pid.tmp").write_text(str(os.getpid()))
            (faults / "pid.tmp").replace(faults / "pid")
            time.sleep(600)

    def load_progress(self, *args, **kwargs):
        history = load(self, *args, **kwargs)
        if history:
            with open(faults / "resumed", "a") as f:
                f.write(f"{self.path.as_posix()} {len(history)}\n")
        return history

    RunFolder.save_progress, RunFolder.load_progress = save_progress, load_progress


def fault_runtime_env(faults: Path) -> dict:
    """What Ray workers need for `pause_target_run`: the hook, where it writes, and this module."""
    root = str(Path(__file__).resolve().parents[1])  # workers import this module for the hook
    return {
        "worker_process_setup_hook": pause_target_run,
        "env_vars": {
            FAULTS: str(faults),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        },
    }


def faults_from_the_environment(runtime_env: dict | None) -> dict:
    """Ray's RAY_RUNTIME_ENV_HOOK: the runtime environment of a driver that st itself connects."""
    return {**(runtime_env or {}), **fault_runtime_env(Path(os.environ[FAULTS]))}


# ---- a cluster of this machine on 127.0.0.1 (before the local instance below: a connected Ray is used as it is)


@contextmanager
def loopback_cluster(head_cpus: int, workers: int = 0):
    """A Ray cluster of nodes on 127.0.0.1 (its head listens there only), started here and stopped after."""
    from ray.cluster_utils import Cluster

    cluster = Cluster()
    try:
        for cpus in [head_cpus] + [1] * workers:  # random agent ports: other Ray instances may run here
            cluster.add_node(
                num_cpus=cpus, node_ip_address="127.0.0.1", include_dashboard=False, dashboard_agent_listen_port=None
            )
        yield cluster
    finally:
        cluster.shutdown()


def test_ray_joins_a_head_on_a_loopback_address(pool_doc, tiny_bert_dir, sentiment_dir, tmp_path):
    """Ray dials 127.0.0.1 at this machine's own address, where a head bound to loopback does not listen (st
    waited ten minutes there); st has it dial the address as given."""
    out = tmp_path / "s"
    with loopback_cluster(head_cpus=1) as cluster:
        assert cluster.address.startswith("127.0.0.1:")
        args = cli_args(tiny_bert_dir, sentiment_dir, out, "--ratios", 0.5, "--epochs", 2, "--ray", cluster.address)
        run = subprocess.run(
            [sys.executable, "-m", "cli.main", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    assert run.returncode == 0, run.stderr
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["runs"]) == 3 and as_in(doc, pool_doc)


@needs_linux
@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C (SIGINT to the process group)"])
def test_a_sweep_waiting_on_ray_stops_on_sigterm_and_ctrl_c(how, tiny_bert_dir, sentiment_dir, tmp_path):
    """A head that takes the connection and never answers kept Ray trying for ten minutes, each try of 30 s
    deaf to signals (and Ray's own SIGTERM handler made it an error): now the sweep stops in seconds, cleanly."""
    with listener(HTTP2_SETTINGS) as (port, taken):
        driver = start_cli(*cli_args(tiny_bert_dir, sentiment_dir, tmp_path / "s", "--ray", f"127.0.0.1:{port}"))
        try:  # st's own two checks, then Ray's tries
            wait_for(lambda: len(taken) >= 3 or driver.poll() is not None, 120, "Ray's first try")
            signalled = time.monotonic()
            if how == "SIGTERM":
                driver.send_signal(signal.SIGTERM)
            else:
                os.killpg(driver.pid, signal.SIGINT)
            _, stderr = driver.communicate(timeout=120)
            took = time.monotonic() - signalled
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    assert driver.returncode == 130 and "Traceback" not in stderr, stderr
    assert "interrupted" in stderr and "same command resumes" in stderr, stderr
    assert took < 30, took  # a try lasts 5 s


@needs_linux
@pytest.mark.parametrize("how", ["node removed", "raylet killed"])
def test_a_lost_node_costs_nothing(how, pool_doc, tiny_bert_dir, sentiment_dir, tmp_path, monkeypatch):
    """`st sweep --ray 127.0.0.1:PORT` on two nodes of this machine (the head runs nothing): the node running
    TARGET is lost after its first epoch. Ray retries the run on the other node, it resumes from that epoch,
    and every run gives what the uninterrupted sweep gave."""
    faults, lost, failed = tmp_path / "faults", [], []
    faults.mkdir()
    monkeypatch.setenv(FAULTS, str(faults))  # st's process connects with the faults' runtime environment
    monkeypatch.setenv("RAY_RUNTIME_ENV_HOOK", f"{__name__}.{faults_from_the_environment.__name__}")
    root = str(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    with loopback_cluster(head_cpus=0, workers=2) as cluster:

        def lose_the_node():
            try:
                pid = int(wait_for(lambda: (faults / "pid").exists() and (faults / "pid").read_text(), 180, "TARGET"))
                node = next(n for n in cluster.worker_nodes if n.node_id == (faults / "node").read_text())
                (faults / "killed").touch()  # the retry must not pause again
                if how == "node removed":
                    cluster.remove_node(node)
                else:
                    node.kill_raylet()
                lost.append(pid)
            except BaseException as e:  # let the sweep go on (the test fails below), not wait out TARGET's pause
                failed.append(e)
                (faults / "killed").touch()
                if (faults / "pid").exists():
                    os.kill(int((faults / "pid").read_text()), signal.SIGKILL)

        thread = threading.Thread(target=lose_the_node, daemon=True)
        thread.start()
        out = tmp_path / "ray-killed"  # TARGET's sweep
        args = cli_args(tiny_bert_dir, sentiment_dir, out, "--ratios", 0.5, "--epochs", 2, "--ray", cluster.address)
        run = subprocess.run(
            [sys.executable, "-m", "cli.main", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        thread.join(timeout=30)
    assert not failed and lost, failed
    assert run.returncode == 0, run.stderr
    wait_for(lambda: not alive(lost[0]), 30, "the lost node's worker to stop")
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["runs"]) == 3 and as_in(doc, pool_doc)  # the same results as without the loss
    resumed = (faults / "resumed").read_text().split("\n")
    assert f"{(tmp_path / TARGET).as_posix()} 1" in resumed  # the retry started after epoch 1, not from scratch


# ---- a local Ray instance --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    import ray

    faults = tmp_path_factory.mktemp("faults")
    # "local": a new instance, even where `ray start` left a cluster's address behind
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        runtime_env=fault_runtime_env(faults),
    )
    yield faults
    ray.shutdown()


def test_ray_sweep_gives_the_local_pools_runs(ray_local, pool_doc, tiny_bert_dir, sentiment_dir, tmp_path):
    started = []
    doc = run_sweep(config(tiny_bert_dir, sentiment_dir), tmp_path / "ray", ray="local", on_start=started.append)
    assert metrics(doc) == metrics(pool_doc) and started == [2]  # 2 CPUs, one per run
    assert json.loads((tmp_path / "ray" / "results.json").read_text()) == doc


def test_ray_retries_a_worker_killed_mid_run_and_it_resumes(
    ray_local, pool_doc, tiny_bert_dir, sentiment_dir, tmp_path
):
    faults, killed = ray_local, []

    def killer():
        pid = int(
            wait_for(lambda: (faults / "pid").exists() and (faults / "pid").read_text(), 120, "the paused worker")
        )
        (faults / "killed").touch()  # the retry must not pause again
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    doc = run_sweep(config(tiny_bert_dir, sentiment_dir), tmp_path / "ray-killed", ray="local")
    thread.join(timeout=5)
    assert killed and not alive(killed[0])
    assert metrics(doc) == metrics(pool_doc)  # the sweep finished with the same results
    resumed = (faults / "resumed").read_text().split("\n")
    assert f"{(tmp_path / TARGET).as_posix()} 1" in resumed  # the retry started after epoch 1, not from scratch


@needs_linux
def test_killed_ray_driver_rerun_skips_finished_runs(ray_local, pool_doc, tiny_bert_dir, sentiment_dir, tmp_path):
    out = tmp_path / "s"
    driver = start_cli(
        *cli_args(tiny_bert_dir, sentiment_dir, out, "--epochs", 2, "--ray")
    )  # its own local Ray instance
    processes = {}
    try:
        wait_for(lambda: finished_runs(out) >= 2 or driver.poll() is not None, 180, "two finished runs")
        processes = {p: command(p) for p in descendants(driver.pid)}
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        # Ray's workers die with their driver (its two agents, which write nothing, linger up to a minute)
        workers = [p for p, name in processes.items() if "Agent" not in name]
        wait_for(lambda: not any(alive(p) for p in workers), 30, "the dead driver's Ray processes to stop")
    finally:
        for pid in {driver.pid, *processes}:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    # killed mid-sweep; a run may have finished after results.json was last written: it counts as finished too
    finished = [m.parent for m in out.glob("seed0/**/metrics.json")]
    assert 2 <= finished_runs(out) <= len(finished) < 5
    stamps = {str(run.relative_to(out)): (run / "model.safetensors").stat().st_mtime_ns for run in finished}

    seen = []
    doc = run_sweep(config(tiny_bert_dir, sentiment_dir), out, ray="local", keep_weights="all", on_result=seen.append)
    assert sorted(r["run"] for r in seen if r["reused"]) == sorted(stamps)  # finished runs skipped ...
    assert all(
        (out / run / "model.safetensors").stat().st_mtime_ns == stamp for run, stamp in stamps.items()
    )  # ... not rewritten
    assert metrics(doc) == metrics(pool_doc)
