"""The sandbox against hostile programs: each attack must fail, be reported, and leave the host as
it was.

Every attack runs only where :func:`capabilities` says the protection it needs is enforced;
elsewhere it is skipped with the reason (an attack that would succeed could harm the machine running
the tests: ``os.kill(-1, SIGKILL)`` without a private pid namespace or uid kills every process of
the user).
Set ``RR_RAY_SANDBOX_STRICT=1`` (CI on a root or user-namespace host) to require every protection.
On a host without isolation the sandbox refuses to run anything unless the config allows it, so the attack
tests run there with that opt-in; the "fail closed" tests at the end check the refusal itself.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from rr_ray import cli, cluster
from rr_ray.config import ConfigError, RayConfig, config_from_text
from rr_ray.evaluation import sandbox
from rr_ray.evaluation.sandbox import (
    ALLOW_UNISOLATED_ENV,
    REQUIRED_PROTECTIONS,
    SandboxLimits,
    SandboxReport,
    SandboxResult,
    SandboxUnavailableError,
    capabilities,
    missing_isolation,
    run_many,
    run_python,
    sandbox_report,
)

pytestmark = pytest.mark.timeout(120)
REPORT = sandbox_report()
CAPS = REPORT.protections
FAST = SandboxLimits(wall_s=10, cpu_s=2, memory_mb=256, max_output_bytes=100_000)
HOST_PID = os.getpid()


def requires(*names: str):
    missing = [n for n in names if not CAPS.get(n)]
    return pytest.mark.skipif(
        bool(missing), reason=f"{', '.join(missing)} not enforced in mode {REPORT.mode!r}"
    )


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:  # exited meanwhile
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, pp in parents.items() if pp in frontier]
        found += children
        frontier = children
    return found


@pytest.fixture(autouse=True)
def allow_unisolated_only_where_needed(monkeypatch):
    """The default (no opt-in) where this host isolates; the opt-in where it cannot, else nothing runs."""
    if missing_isolation(REPORT):
        monkeypatch.setenv(ALLOW_UNISOLATED_ENV, "1")
    else:
        monkeypatch.delenv(ALLOW_UNISOLATED_ENV, raising=False)


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """Whatever a program did, nothing it started may outlive its run."""
    before = set(_descendants(HOST_PID))  # e.g. a Ray cluster another test module left running
    yield
    deadline = time.monotonic() + 5
    while set(_descendants(HOST_PID)) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(_descendants(HOST_PID)) - before == set()


@pytest.fixture
def shared_dir():
    """A world-writable host folder in /tmp: only isolation, not permissions, keeps writes out."""
    path = Path(tempfile.mkdtemp(prefix="rr-ray-test-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def assert_contained(result: SandboxResult) -> None:
    assert not result.ok, result
    assert result.status != "passed"
    assert result.status != "error", result.stderr  # the sandbox itself must have come up


# ---------------------------------------------------------------- ordinary programs


def test_benign_program_passes():
    result = run_python("import math, re, hashlib\nprint(math.factorial(5))", FAST)
    assert (result.ok, result.status, result.returncode) == (True, "passed", 0)
    assert result.stdout == "120\n" and result.stderr == ""
    assert 0 < result.wall_s < FAST.wall_s


def test_humaneval_style_program_passes_and_fails():
    candidate = "def add(a, b):\n    return a + b\n"
    wrong = "def add(a, b):\n    return a - b\n"
    tests = "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n"
    good, bad = run_many([candidate + tests + "check(add)", wrong + tests + "check(add)"], FAST)
    assert good.ok and good.status == "passed"
    assert not bad.ok and bad.status == "failed" and bad.returncode == 1
    assert "AssertionError" in bad.stderr and bad.detail.startswith("AssertionError")


def test_syntax_error_and_bad_encoding_fail():
    assert run_python("def f(:\n", FAST).status == "failed"
    assert run_python("x = '\ud800'", FAST).status == "failed"


def test_program_can_use_its_own_directory():
    code = "open('scratch.txt', 'w').write('hi')\nprint(open('scratch.txt').read())"
    assert run_python(code, FAST).stdout == "hi\n"


def test_stdin_is_empty_not_blocking():
    result = run_python("input()", FAST)
    assert result.status == "failed" and "EOFError" in result.stderr


def test_environment_is_minimal(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "host-secret-value")
    result = run_python("import os\nprint(sorted(os.environ))", FAST)
    assert result.ok
    assert set(eval(result.stdout)) <= {"PATH", "HOME", "TMPDIR", "LANG"}
    assert "host-secret-value" not in result.stdout


def test_limits_are_validated():
    with pytest.raises(ValueError):
        SandboxLimits(memory_mb=0)


# ---------------------------------------------------------------- hostile programs


def test_infinite_loop_hits_cpu_limit():
    limits = SandboxLimits(wall_s=20, cpu_s=1)
    result = run_python("while True:\n    pass", limits)
    assert_contained(result)
    assert result.status == "timeout" and result.detail == "cpu limit"
    assert result.cpu_s > 0.8  # not the wall time: on a loaded machine CPU time comes slowly
    # Ignoring SIGXCPU only postpones the end to the hard limit, a second later.
    stubborn = "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass"
    result = run_python(stubborn, limits)
    assert (result.status, result.detail) == ("timeout", "cpu limit") and result.cpu_s > 1.5


def test_sleeping_program_hits_wall_limit():
    result = run_python("import time\ntime.sleep(60)", SandboxLimits(wall_s=1, cpu_s=5))
    assert_contained(result)
    assert result.status == "timeout" and result.detail == "wall-clock limit"
    assert result.wall_s < 5
    # Closing its pipes does not end the wait.
    quiet = "import os, time\nos.close(1)\nos.close(2)\ntime.sleep(60)"
    assert run_python(quiet, SandboxLimits(wall_s=1, cpu_s=5)).status == "timeout"


@requires("no_fork")
def test_fork_bomb_cannot_fork():
    result = run_python("import os\nwhile True:\n    os.fork()", FAST)
    assert_contained(result)
    assert result.status == "failed" and "BlockingIOError" in result.stderr
    # One that swallows the errors just burns its own CPU budget.
    stubborn = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        0"
    assert run_python(stubborn, SandboxLimits(wall_s=10, cpu_s=1)).status == "timeout"


@requires("no_threads")
def test_thread_bomb_cannot_start_threads():
    code = "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep).start()"
    result = run_python(code, FAST)
    assert_contained(result)
    assert "can't start new thread" in result.stderr


def test_memory_bomb_is_stopped_quickly():
    result = run_python("chunks = []\nwhile True:\n    chunks.append(' ' * 10**7)", FAST)
    assert_contained(result)
    assert result.status == "memory" and result.cpu_s < FAST.cpu_s
    assert run_python("x = bytearray(10**11)", FAST).status == "memory"


@requires("readonly_outside_workdir")
def test_cannot_write_outside_its_directory(shared_dir):
    repo_target = Path(__file__).resolve().parent / f"escape-{uuid.uuid4().hex}"
    targets = [shared_dir / "escaped.txt", Path("/etc") / f"rr-ray-{uuid.uuid4().hex}", repo_target]
    code = (
        "written = []\n"
        f"for path in {[str(t) for t in targets]!r}:\n"
        "    try:\n"
        "        open(path, 'w').write('pwned')\n"
        "        written.append(path)\n"
        "    except OSError as exc:\n"
        "        print('blocked', path, exc)\n"
        "assert not written, written\n"
        "raise SystemExit('no write got through')\n"
    )
    result = run_python(code, FAST)
    assert_contained(result)
    assert result.stdout.count("blocked") == len(targets)
    for target in targets:
        assert not target.exists()
    assert list(shared_dir.iterdir()) == []


def test_file_size_is_capped():
    limits = SandboxLimits(wall_s=10, cpu_s=2, max_file_bytes=1_000_000)
    result = run_python("open('big', 'wb').write(b'x' * 50_000_000)", limits)
    assert_contained(result)
    assert result.status == "failed"
    assert "No space left" in result.stderr or "too large" in result.stderr


def test_cannot_read_host_secrets():
    if not (CAPS.get("host_files_hidden") or CAPS.get("separate_uid")):
        pytest.skip(f"neither host_files_hidden nor separate_uid in mode {REPORT.mode!r}")
    folder = Path(tempfile.mkdtemp(prefix="rr-ray-secret-", dir="/tmp"))
    try:
        folder.chmod(0o755)  # the folder is open: only the file's mode or isolation protect it
        secret, token = folder / "credentials", uuid.uuid4().hex
        secret.write_text(token)
        secret.chmod(0o600)
        code = (
            f"for path in [{str(secret)!r}, '/proc/{HOST_PID}/environ', '/etc/shadow']:\n"
            "    try:\n"
            "        print(open(path).read())\n"
            "    except OSError as exc:\n"
            "        print('blocked', exc)\n"
            f"print(open({str(secret)!r}).read())\n"
        )
        result = run_python(code, FAST)
        assert_contained(result)
        assert token not in result.stdout + result.stderr
        assert result.stdout.count("blocked") == 3
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=False)


@requires("no_network")
def test_cannot_connect_to_host_loopback():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)"
        result = run_python(code, FAST)
        assert_contained(result)
        assert "OSError" in result.stderr or "Error" in result.detail
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected


@requires("no_network")
def test_cannot_reach_external_network():
    code = (
        "import socket\n"
        "for target in [('1.1.1.1', 80), ('8.8.8.8', 53)]:\n"
        "    try:\n"
        "        socket.create_connection(target, timeout=3)\n"
        "        raise SystemExit('connected')\n"
        "    except OSError as exc:\n"
        "        print('blocked', exc)\n"
        "socket.getaddrinfo('example.com', 80)\n"
    )
    result = run_python(code, FAST)
    assert_contained(result)
    assert result.stdout.count("blocked") == 2 and result.status == "failed"  # not a timeout


def test_cannot_kill_its_parent_or_the_host():
    if not (CAPS.get("private_pids") or CAPS.get("separate_uid")):
        pytest.skip(f"neither private_pids nor separate_uid in mode {REPORT.mode!r}")
    code = (
        "import os, time\n"
        "for pid in (os.getppid(), %d):\n"
        "    try:\n"
        "        os.kill(pid, 9)\n"
        "        print('sent', pid)\n"
        "    except OSError as exc:\n"
        "        print('blocked', pid, exc)\n"
        "time.sleep(0.2)\n"
        "raise SystemExit(3)\n" % HOST_PID
    )
    result = run_python(code, FAST)
    assert_contained(result)
    # In a pid namespace the parent is its init, which ignores signals from inside (kill returns
    # 0 all the same); elsewhere the parent is the root-owned launcher. Either way the chain of
    # parents survived: the program's own exit status came back.
    assert (result.status, result.returncode) == ("failed", 3), result
    assert f"blocked {HOST_PID}" in result.stdout
    assert os.getpid() == HOST_PID  # still here


def test_kill_every_process_spares_the_host():
    if not (CAPS.get("private_pids") or CAPS.get("separate_uid")):
        pytest.skip(f"kill(-1) would reach the host in mode {REPORT.mode!r}")
    canary = subprocess.Popen(["sleep", "60"])
    try:
        result = run_python("import os\nos.kill(-1, 9)\nprint('survived')", FAST)
        assert result.status in ("failed", "passed", "killed")  # whatever it did, it did to itself
        assert canary.poll() is None
    finally:
        canary.kill()
        canary.wait()


def test_huge_output_is_capped():
    limits = SandboxLimits(wall_s=10, cpu_s=5, max_output_bytes=50_000)
    for code in ["while True:\n    print('x' * 10_000)",
                 "import sys\nwhile True:\n    sys.stderr.write('y' * 10_000)",
                 "import sys\nsys.stdout.write('z' * 10_000_000)"]:
        result = run_python(code, limits)
        assert_contained(result)
        assert result.status == "output_limit"
        assert len(result.stdout) + len(result.stderr) <= 2 * limits.max_output_bytes


def test_recursion_bombs():
    result = run_python("def f():\n    return f()\nf()", FAST)
    assert_contained(result)
    assert result.status == "failed" and "RecursionError" in result.stderr
    deep = "import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1) + 1\nf(0)"
    assert_contained(run_python(deep, FAST))


@requires("no_fork")
def test_shell_and_subprocess_do_not_run(shared_dir):
    marker = shared_dir / "ran"
    code_system = f"import os\nassert os.system('touch {marker}') == 0"
    code_run = f"import subprocess\nsubprocess.run(['touch', '{marker}'], check=True)"
    code_exec = f"import os\nos.execv('/bin/sh', ['sh', '-c', 'touch {marker}; touch {marker}'])"
    for result in run_many([code_system, code_run, code_exec], FAST):
        assert_contained(result)
    assert not marker.exists()


@requires("unprivileged_uid")
def test_runs_without_root():
    assert run_python("import os\nassert os.geteuid() != 0 and os.getegid() != 0", FAST).ok


# ---------------------------------------------------------------- many programs


def test_run_many_keeps_order():
    codes = [f"print({i})" if i % 3 else f"raise SystemExit({i + 1})" for i in range(12)]
    results = run_many(codes, FAST, parallelism=4)
    for i, result in enumerate(results):
        if i % 3:
            assert result.ok and result.stdout == f"{i}\n"
        else:
            assert result.status == "failed" and result.returncode == i + 1
    assert run_many([], FAST) == []


def test_run_many_runs_in_parallel():
    codes = ["import time\ntime.sleep(1)"] * 4
    start = time.monotonic()
    results = run_many(codes, FAST, parallelism=4)
    assert all(r.ok for r in results)
    assert time.monotonic() - start < 3  # 4 s one after another


# ---------------------------------------------------------------- what is enforced


def test_capabilities_report():
    caps = capabilities()
    assert caps and all(isinstance(v, bool) for v in caps.values())
    for always in ("resource_limits", "wall_timeout", "output_cap", "no_new_privileges"):
        assert caps[always]
    if os.environ.get("RR_RAY_SANDBOX_STRICT") == "1":
        assert REPORT.mode in ("namespaces", "userns"), REPORT
        assert all(caps.values()), {k: v for k, v in caps.items() if not v}


# ---------------------------------------------------------------- fail closed


@pytest.fixture
def forced_plain(monkeypatch):
    """The weakest mode, as on a non-root Ray image without user namespaces: no isolation at all."""
    monkeypatch.setenv("RR_RAY_SANDBOX_MODE", "plain")
    monkeypatch.delenv(ALLOW_UNISOLATED_ENV, raising=False)
    sandbox.sandbox_report.cache_clear()
    sandbox._warn_unisolated.cache_clear()
    yield
    sandbox.sandbox_report.cache_clear()  # later tests probe this host's own mode again
    sandbox._warn_unisolated.cache_clear()


def test_isolated_host_runs_without_opt_in():
    if missing_isolation(REPORT) and os.environ.get("RR_RAY_SANDBOX_STRICT") != "1":
        pytest.skip(f"this host lacks {missing_isolation(REPORT)} in mode {REPORT.mode!r}")
    assert ALLOW_UNISOLATED_ENV not in os.environ
    assert missing_isolation(REPORT) == [] and REPORT.mode in ("namespaces", "userns")
    assert run_python("print(6 * 7)", FAST).stdout == "42\n"
    assert [r.stdout for r in run_many(["print(1)", "print(2)"], FAST)] == ["1\n", "2\n"]


def test_weakest_mode_refuses_model_code(forced_plain, shared_dir, monkeypatch):
    marker = shared_dir / "ran"
    code = f"open({str(marker)!r}, 'w').write('ran')"
    for allow in (None, "0", "true"):  # unset, the config's false, anything but "1"
        if allow is not None:
            monkeypatch.setenv(ALLOW_UNISOLATED_ENV, allow)
        with pytest.raises(SandboxUnavailableError) as exc:
            run_python(code, FAST)
        with pytest.raises(SandboxUnavailableError):
            run_many([code, code], FAST, parallelism=2)
    assert not marker.exists()  # refused before anything ran
    assert isinstance(exc.value, RuntimeError)
    message = str(exc.value)
    assert "\n" not in message and "'plain'" in message and "RR_RAY_SANDBOX_MODE" in message
    # It names everything this host lacks (network, process, filesystem isolation) ...
    for name in ("no_network", "private_pids", "readonly_outside_workdir", "host_files_hidden"):
        assert name in message
    for fix in ("root", "kernel.unprivileged_userns_clone=1", "user.max_user_namespaces",  # ... and the fixes
                "securityContext", "SYS_ADMIN", "sandbox.allow_unisolated: true"):
        assert fix in message
    assert run_many([], FAST) == []  # nothing to run, nothing refused


def test_opt_in_runs_in_weakest_mode_and_warns_once(forced_plain, monkeypatch, caplog):
    monkeypatch.setenv(ALLOW_UNISOLATED_ENV, "1")
    with caplog.at_level("WARNING", logger=sandbox.__name__):
        result = run_python("print(6 * 7)", FAST)
        results = run_many(["print(1)", "raise SystemExit(3)"], FAST, parallelism=2)
    assert sandbox_report().mode == "plain"
    assert (result.ok, result.stdout) == (True, "42\n")
    assert [r.status for r in results] == ["passed", "failed"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "WITHOUT" in warnings[0] and all(name in warnings[0] for name in REQUIRED_PROTECTIONS)


def test_refusal_names_only_what_is_missing(monkeypatch):
    """A mode that measured everything but one protection is refused for that one alone."""
    for name in REQUIRED_PROTECTIONS:
        weak = SandboxReport(REPORT.mode, {**CAPS, **dict.fromkeys(REQUIRED_PROTECTIONS, True), name: False})
        monkeypatch.setattr(sandbox, "sandbox_report", lambda weak=weak: weak)
        monkeypatch.delenv(ALLOW_UNISOLATED_ENV, raising=False)
        assert missing_isolation() == [name]
        with pytest.raises(SandboxUnavailableError, match=name) as exc:
            run_python("print(1)", FAST)
        assert not [other for other in REQUIRED_PROTECTIONS if other != name and other in str(exc.value)]
    full = SandboxReport(REPORT.mode, {**CAPS, **dict.fromkeys(REQUIRED_PROTECTIONS, True)})
    monkeypatch.setattr(sandbox, "sandbox_report", lambda: full)
    assert missing_isolation() == []


def test_config_key_allow_unisolated():
    assert config_from_text("", "t").sandbox.allow_unisolated is False  # fail closed by default
    assert config_from_text("sandbox:\n  allow_unisolated: true\n", "t").sandbox.allow_unisolated is True
    assert config_from_text("", "t", ["sandbox.allow_unisolated=true"]).sandbox.allow_unisolated is True
    with pytest.raises(ConfigError, match="sandbox.allow_unisolated"):
        config_from_text("sandbox:\n  allow_unisolated: maybe\n", "t")
    with pytest.raises(ConfigError, match="sandbox"):
        config_from_text("sandbox:\n  allow_unisolatd: true\n", "t")


def test_config_key_reaches_this_process_and_ray_workers(monkeypatch, capsys):
    monkeypatch.setenv(ALLOW_UNISOLATED_ENV, "1")  # a stale value in the environment does not decide
    assert cli.main(["config"]) == 0
    assert os.environ[ALLOW_UNISOLATED_ENV] == "0"
    assert cli.main(["config", "--set", "sandbox.allow_unisolated=true"]) == 0
    assert os.environ[ALLOW_UNISOLATED_ENV] == "1"
    capsys.readouterr()
    # connect() hands the variable to every worker through the job's runtime_env.
    calls = []
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster.ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    cluster.connect(RayConfig(address="ray://example:10001"))
    assert calls[0]["runtime_env"]["env_vars"][ALLOW_UNISOLATED_ENV] == "1"


def test_cli_reports_the_refusal_in_one_line(monkeypatch, capsys):
    def refuse(cfg, args):
        raise SandboxUnavailableError("the code sandbox refuses to run model-written code: test")

    class FromRayWorker(SandboxUnavailableError):  # how Ray re-raises a worker's exception
        def __init__(self) -> None:
            super().__init__("Traceback (most recent call last):\n  File ...")
            self.cause = SandboxUnavailableError("the code sandbox refuses to run model-written code: ray")

    def refuse_in_worker(cfg, args):
        raise FromRayWorker()

    for command, word in ((refuse, "test"), (refuse_in_worker, "ray")):
        monkeypatch.setitem(cli.COMMANDS, "config", ("print the config", command))
        assert cli.main(["config"]) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert err == f"rr-ray: error: the code sandbox refuses to run model-written code: {word}\n"
