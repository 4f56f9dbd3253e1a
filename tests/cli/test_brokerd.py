"""``brokerd`` as a subprocess: configuration errors, the control socket, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "BROKER__SQLITE__PATH": str(tmp_path / "q2c.sqlite3"),
        "BROKER__MEMORY__JOURNAL": str(tmp_path / "queues.sqlite3"),
        "BROKER__CONTROL__SOCKET_PATH": str(tmp_path / "run" / "brokerd.sock"),
        "BROKER__LOGGING__FORMAT": "json",
        "BROKER__HTTP__PORT": "0",
        **extra,
    }


def brokerctl(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker.control.ctl", *args],
        env=env_for(tmp_path),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_a_typo_in_the_config_exits_78_naming_the_key(tmp_path: Path) -> None:
    """A wrong key stops the daemon before it starts, naming file and key path."""
    path = tmp_path / "broker.toml"
    path.write_text("[core]\nbatch-maxx = 3\n")
    done = subprocess.run(
        [sys.executable, "-m", "broker", "--config", str(path), "run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 78
    assert "batch-maxx" in done.stderr
    assert "$.core" in done.stderr


def test_check_config_masks_every_secret(tmp_path: Path) -> None:
    """Passwords, tokens, webhook secrets, API keys and URL credentials: ***."""
    path = tmp_path / "broker.toml"
    path.write_text(
        '[systems.erp_cloud]\nkind = "sap-s4"\nbase-url = "http://sap"\n'
        'username = "COMM"\nwebhook-secrets = ["whsec-one", "whsec-two"]\n'
        '[systems.billing]\nkind = "stripe"\napi-key = "sk_live_key"\n'
    )
    secrets = {
        "BROKER__SYSTEMS__ERP_CLOUD__PASSWORD": "hunter2-pw",
        "BROKER__HTTP__API_TOKENS": '["api-token-0123456789"]',
        "BROKER__AMQP__URL": "amqp://svc:amqp-pw@rabbit/prod",
        "BROKER__POSTGRES__DSN": (
            "postgresql://svc:pg-pw@db/q2c?sslpassword=key-pw&password=query-pw"
        ),
        "BROKER__AMQP__MANAGEMENT_URL": "http://admin:mgmt-pw@rabbit:15672",
    }
    done = subprocess.run(
        [sys.executable, "-m", "broker", "--config", str(path), "check-config"],
        cwd=ROOT,
        env={**os.environ, **secrets},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    for secret in (
        "whsec-one", "whsec-two", "sk_live_key", "hunter2-pw", "api-token-0123456789",
        "amqp-pw", "pg-pw", "mgmt-pw", "key-pw", "query-pw",
    ):  # fmt: skip
        assert secret not in done.stdout, secret
    assert shown["systems"]["erp_cloud"]["webhook-secrets"] == ["***", "***"]
    assert shown["systems"]["erp_cloud"]["username"] == "COMM"
    assert shown["amqp"]["url"] == "amqp://***@rabbit/prod"
    assert shown["postgres"]["dsn"] == (
        "postgresql://***@db/q2c?sslpassword=***&password=***"
    )


def test_runs_answers_brokerctl_and_drains_on_sigterm(tmp_path: Path) -> None:
    """The embedded daemon serves status and the actor tree, then exits 0 on SIGTERM."""
    log_path = tmp_path / "daemon.log"
    sock = str(tmp_path / "run" / "brokerd.sock")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "run"],
            cwd=ROOT,
            env=env_for(tmp_path),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        status = brokerctl(tmp_path, "--socket", sock, "--json", "status")
        while status.returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.1)  # bounded poll: the daemon is starting
            status = brokerctl(tmp_path, "--socket", sock, "--json", "status")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["pid"] == proc.pid
        # Once the tree is up, the startup heap leaves the collector's sight.
        frozen = json.loads(status.stdout)["gc"]["frozen_objects"]
        while not frozen and time.monotonic() < deadline:
            time.sleep(0.1)  # bounded poll: the freeze follows the start
            status = brokerctl(tmp_path, "--socket", sock, "--json", "status")
            frozen = json.loads(status.stdout)["gc"]["frozen_objects"]
        assert frozen > 10_000
        tree = brokerctl(tmp_path, "--socket", sock, "actors")
        assert tree.returncode == 0, tree.stderr
        for node in ("root", "relay", "app", "workflows", "ledger.0", "ledger.3"):
            assert node in tree.stdout
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0
    lines = [
        json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")
    ]
    events = [line["event"] for line in lines]
    assert "daemon_started" in events
    assert events[-1] == "shutdown_complete"
    assert not Path(sock).exists()


def test_brokerctl_without_a_daemon_says_how_to_start_one(tmp_path: Path) -> None:
    """No daemon: exit status 3 and a message naming the socket."""
    done = brokerctl(tmp_path, "--socket", str(tmp_path / "none.sock"), "status")
    assert done.returncode == 3
    assert "none.sock" in done.stderr


def test_the_root_giving_up_ends_the_process_non_zero(tmp_path: Path) -> None:
    """An application that keeps crashing exhausts the tree; brokerd exits 1, not 0."""
    done = subprocess.run(
        [sys.executable, "-m", "broker", "run"],
        cwd=ROOT,
        env=env_for(
            tmp_path, BROKER__DAEMON__TREE="tests.runtime.trees:build_crashing_tree"
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    events = [
        json.loads(x)["event"] for x in done.stderr.splitlines() if x.startswith("{")
    ]
    assert "restart_limit_reached" in events
    assert "daemon_failed" in events


def test_demo_drives_deals_end_to_end_and_its_check_passes(tmp_path: Path) -> None:
    """The README's first command, small: every fault accounted for, check PASS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER__")}
    done = subprocess.run(
        [sys.executable, "-m", "broker", "demo", "--deals", "40"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "check                              PASS" in done.stdout
    assert "consistency problems               0" in done.stdout
    assert "'order_fallout': 1" in done.stdout
    assert "poison payloads posted             1" in done.stdout


@pytest.mark.integration
def test_demo_on_a_missing_database_says_so_in_one_line(tmp_path: Path) -> None:
    """A refusal inside the demo's task groups is one line and exit 78, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER__")}
    done = subprocess.run(
        [sys.executable, "-m", "broker", "demo", "--deals", "5"],
        cwd=tmp_path,
        env={
            **env,
            "PYTHONPATH": str(ROOT),
            "BROKER__DAEMON__STORE": "postgres",
            "BROKER__POSTGRES__DSN": "postgresql://postgres@127.0.0.1:5432/q2c_no_such_db",
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 78, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("brokerd demo:")]
    assert line.startswith("brokerd demo: ConfigError: postgres refused the connection")
    assert '"q2c_no_such_db" does not exist' in line
