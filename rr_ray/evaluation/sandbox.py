"""Run model-written Python programs in a confined child process.

Each program runs in its own process, started through ``_sandbox_launcher.py``, with:

* wall-clock (host side) and CPU-time (RLIMIT_CPU) limits, an address-space limit (RLIMIT_AS),
  a file-size limit, few open files and no core dumps;
* no new processes or threads: RLIMIT_NPROC=0 after dropping to an unprivileged uid (the limit is
  not enforced for root, so when we are root the program gets a fresh uid of its own);
* no network, no view of other processes, its own IPC: fresh net/pid/ipc/uts namespaces;
* a minimal read-only root (system libraries and the interpreter only) whose single writable place
  is a size-capped private tmpfs /tmp, which is also the working directory;
* ``python -I -S`` with a minimal environment, stdin from /dev/null, captured output capped.

What a host can enforce depends on its privileges, so :func:`sandbox_report` probes, once per
process, the strongest mode that works here (root: namespaces + uid drop; otherwise unprivileged
user namespaces; otherwise resource limits only) and then *measures* from inside the sandbox which
protections hold. :func:`capabilities` returns those measured flags for the README and the tests.
Set ``RR_RAY_SANDBOX_MODE`` to ``namespaces``, ``userns``, ``setuid`` or ``plain`` to force a mode.

It fails closed: programs run only where the probe measured network, process and filesystem isolation
(:data:`REQUIRED_PROTECTIONS`); elsewhere :func:`run_python` and :func:`run_many` raise
:class:`SandboxUnavailableError`, unless the run's config sets ``sandbox.allow_unisolated: true``, which
reaches this module (and every Ray worker, through :func:`rr_ray.cluster.connect`) as
``RR_RAY_SANDBOX_ALLOW_UNISOLATED=1`` and runs them in the best mode available, with a warning.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import marshal
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from rr_ray.evaluation._sandbox_launcher import SETUP_ERROR

_LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_launcher.py")
# The base interpreter, not the venv shim: with -I -S the venv adds nothing, and the sandbox
# exposes exactly this interpreter's prefix.
_PYTHON = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
_UID_BASE = 1_000_000_000  # fresh uids with no passwd entry, far from any real account
_uid_counter = itertools.count()

log = logging.getLogger(__name__)

STATUSES = ("passed", "failed", "timeout", "memory", "killed", "output_limit", "error")
MODES = ("namespaces", "userns", "setuid", "plain")
# Measured protections without which model-written code could reach the network (cloud metadata and
# credentials, the Ray ports), signal the node's processes, or read and write the host's files.
REQUIRED_PROTECTIONS = {
    "no_network": "network isolation",
    "private_pids": "process isolation",
    "readonly_outside_workdir": "a read-only filesystem outside its directory",
    "host_files_hidden": "hidden host files",
}
# Set by the CLI from the config's sandbox.allow_unisolated and forwarded to Ray workers; "1" = allowed.
ALLOW_UNISOLATED_ENV = "RR_RAY_SANDBOX_ALLOW_UNISOLATED"
_HOW_TO_GRANT = (
    "run as root with CAP_SYS_ADMIN, or allow unprivileged user namespaces (sysctl "
    "kernel.unprivileged_userns_clone=1 and user.max_user_namespaces>0; on Ubuntu 23.10+ "
    "kernel.apparmor_restrict_unprivileged_userns=0); on KubeRay give the Ray container "
    "securityContext: {runAsUser: 0, capabilities: {add: [SYS_ADMIN]}, appArmorProfile: {type: Unconfined}} "
    "or privileged: true; or, on a trusted, disposable machine only, set sandbox.allow_unisolated: true"
)


class SandboxUnavailableError(RuntimeError):
    """This host cannot isolate model-written code, and the config did not allow running it anyway."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits. ``memory_mb`` bounds the address space, not the resident set."""

    wall_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 512
    max_output_bytes: int = 1_000_000  # stdout + stderr together; more and the program is killed
    max_file_bytes: int = 10_000_000  # largest file, and the size of the private /tmp
    max_open_files: int = 64
    max_files: int = 1_000  # inodes in the private /tmp

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, got {value!r}")


@dataclass
class SandboxResult:
    """Outcome of one program. ``ok`` is exit code 0 within every limit.

    ``status``: passed (exit 0); failed (non-zero exit: exception, assertion, SystemExit);
    timeout (wall-clock or CPU limit, ``detail`` says which); memory (MemoryError or a crash under
    the address-space limit); output_limit (more than ``max_output_bytes``, killed); killed (died
    of another signal); error (the sandbox itself could not be set up: not the program's doing).
    """

    ok: bool
    status: str  # one of STATUSES
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float = 0.0  # user + system time of the program, its launcher included (~0.03 s)
    detail: str = ""


@dataclass(frozen=True)
class SandboxReport:
    """Which mode this host runs programs in, and which protections were verified to hold."""

    mode: str
    protections: dict[str, bool] = field(default_factory=dict)
    note: str = ""


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` as a program in the sandbox; never raises for anything the program does.

    Raises :class:`SandboxUnavailableError` where this host cannot isolate it (see the module doc).
    """
    return _run(code, limits or SandboxLimits(), _usable_mode())


def run_many(
    codes: list[str], limits: SandboxLimits | None = None, parallelism: int | None = None
) -> list[SandboxResult]:
    """Run many programs, ``parallelism`` at a time (default: CPU count); results in input order.

    Threads are enough: each program is its own process, the threads only wait on pipes.
    Raises :class:`SandboxUnavailableError` like :func:`run_python` (not for an empty list).
    """
    if not codes:
        return []
    limits = limits or SandboxLimits()
    mode = _usable_mode()
    workers = max(1, min(parallelism or os.cpu_count() or 1, len(codes) or 1))
    if workers == 1:
        return [_run(code, limits, mode) for code in codes]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda code: _run(code, limits, mode), codes))


def capabilities() -> dict[str, bool]:
    """Protections verified active on this host (see :class:`SandboxReport`)."""
    return dict(sandbox_report().protections)


def set_allow_unisolated(allowed: bool) -> None:
    """Apply the config's ``sandbox.allow_unisolated`` to this process and the Ray workers it starts.

    Always set, "0" included: the config, not a variable left in a pod's environment, decides.
    """
    os.environ[ALLOW_UNISOLATED_ENV] = "1" if allowed else "0"


def missing_isolation(report: SandboxReport | None = None) -> list[str]:
    """The :data:`REQUIRED_PROTECTIONS` that ``report`` (default: this host's) did not measure."""
    report = report or sandbox_report()
    return [name for name in REQUIRED_PROTECTIONS if not report.protections.get(name)]


def _usable_mode() -> str:
    """The mode to run programs in; raises unless isolation holds or the config allowed going without."""
    report = sandbox_report()
    missing = missing_isolation(report)
    if missing:
        lacks = ", ".join(f"{REQUIRED_PROTECTIONS[name]} ({name})" for name in missing)
        forced = " (forced by RR_RAY_SANDBOX_MODE)" if os.environ.get("RR_RAY_SANDBOX_MODE") else ""
        if os.environ.get(ALLOW_UNISOLATED_ENV) != "1":
            raise SandboxUnavailableError(
                f"the code sandbox refuses to run model-written code: on this host its mode {report.mode!r}"
                f"{forced} lacks {lacks}; to grant isolation, {_HOW_TO_GRANT}")
        _warn_unisolated(report.mode, lacks)
    return report.mode


@functools.cache
def _warn_unisolated(mode: str, lacks: str) -> None:
    # Cached: one warning per process, not one per program.
    log.warning("sandbox.allow_unisolated is set: running model-written code WITHOUT %s (sandbox mode %r); "
                "it may reach the network, this node's processes and its files", lacks, mode)


@functools.lru_cache(maxsize=1)
def sandbox_report() -> SandboxReport:
    """Pick the strongest working mode, then measure its protections from inside a sandbox."""
    forced = os.environ.get("RR_RAY_SANDBOX_MODE")
    if forced and forced not in MODES:
        raise ValueError(f"RR_RAY_SANDBOX_MODE={forced!r}; expected one of {MODES}")
    candidates = [forced] if forced else [m for m in MODES if _mode_possible(m)]
    # A generous wall limit: with 20 s the probe timed out on a loaded 2-core node (a compare beside two other
    # heavy jobs) and the run stopped, yet a timeout says nothing about isolation. A working probe takes ~1 s.
    limits = SandboxLimits(wall_s=120, cpu_s=10)
    failures = []
    for mode in candidates:
        # A world-writable host directory: only isolation, not permissions, can keep writes out.
        with tempfile.TemporaryDirectory(prefix="rr-ray-probe-") as shared:
            os.chmod(shared, 0o1777)
            probe = _PROBE.replace("HOST_FILE", repr(os.path.abspath(__file__)))
            probe = probe.replace("HOST_PID", str(os.getpid()))
            probe = probe.replace("HOST_UID", str(os.geteuid()))
            res = _run(probe.replace("SHARED_DIR", repr(shared)), limits, mode)
            escaped = bool(os.listdir(shared))
        if res.ok:
            facts = json.loads(res.stdout.strip().splitlines()[-1])
            facts["readonly_outside_workdir"] = not escaped and facts["readonly_outside_workdir"]
            note = "; ".join(failures)
            return SandboxReport(mode=mode, protections=_protections(mode, facts), note=note)
        failures.append(f"{mode}: {res.status} {res.stderr.strip()[-300:]}")
    raise SandboxUnavailableError("no sandbox mode works on this host: " + " | ".join(failures))


def _mode_possible(mode: str) -> bool:
    # "plain" is never chosen for root: the program would run as root with only rlimits, free to
    # kill(-1, SIGKILL) every process on the host. Forcing it through the environment still works.
    root = os.geteuid() == 0
    return {"namespaces": root, "userns": not root, "setuid": root, "plain": not root}[mode]


# Runs inside the sandbox; every protection is tested by trying to break it.
_PROBE = r"""
import errno, json, os, socket, threading
facts = {"unprivileged_uid": os.geteuid() != 0, "separate_uid": os.geteuid() != HOST_UID}
try:
    pid = os.fork()
except OSError:
    facts["no_fork"] = True
else:
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    facts["no_fork"] = False
try:
    threading.Thread(target=lambda: None).start()
    facts["no_threads"] = False
except RuntimeError:
    facts["no_threads"] = True
s = socket.socket()
facts["no_network"] = False
try:
    s.connect(("127.0.0.1", 9))
except OSError as e:
    facts["no_network"] = e.errno in (errno.ENETUNREACH, errno.EADDRNOTAVAIL)
try:
    os.kill(HOST_PID, 0)
    facts["private_pids"] = False
except ProcessLookupError:
    facts["private_pids"] = True
except PermissionError:
    facts["private_pids"] = False
facts["host_files_hidden"] = not os.path.exists(HOST_FILE)
writable = []
for d in ("/", "/etc", "/usr", "/var/tmp", "/dev/shm", os.path.dirname(HOST_FILE), SHARED_DIR):
    try:
        with open(os.path.join(d, ".rr_ray_probe"), "w"):
            writable.append(d)
        if d != SHARED_DIR:  # a weak mode got through: leave the host as it was (the host checks SHARED_DIR)
            os.remove(os.path.join(d, ".rr_ray_probe"))
    except OSError:
        pass
facts["readonly_outside_workdir"] = not writable
print(json.dumps(facts))
"""


def _protections(mode: str, facts: dict[str, bool]) -> dict[str, bool]:
    return {
        "resource_limits": True,  # RLIMIT_CPU/AS/FSIZE/NOFILE/CORE, always applied
        "wall_timeout": True,
        "output_cap": True,
        "minimal_environment": True,
        "no_new_privileges": True,
        "namespaces": mode in ("namespaces", "userns"),
        **facts,
    }


def _run(code: str, limits: SandboxLimits, mode: str) -> SandboxResult:
    host_dir = tempfile.mkdtemp(prefix="rr-ray-sbx-")
    try:
        cfg = _config(code, limits, mode, host_dir)
        return _execute(cfg, limits)
    finally:
        shutil.rmtree(host_dir, onerror=_force_remove)


def _config(code: str, limits: SandboxLimits, mode: str, host_dir: str) -> dict:
    code_path = os.path.join(host_dir, "program.py")
    # surrogatepass: undecodable code is written as is and fails inside, as a SyntaxError.
    _write_private(code_path, code.encode("utf-8", errors="surrogatepass"))
    setuid = mode in ("namespaces", "setuid")
    uid = gid = _UID_BASE + (os.getpid() % 100_000) * 10_000 + next(_uid_counter) % 10_000
    if not setuid:
        uid, gid = os.geteuid(), os.getegid()
    fs = mode in ("namespaces", "userns")
    root_dir, work_dir = os.path.join(host_dir, "root"), os.path.join(host_dir, "work")
    os.mkdir(root_dir)
    os.mkdir(work_dir, 0o700)
    if not fs and setuid:  # the dropped uid must reach its working directory, and only that
        os.chmod(host_dir, 0o711)
        os.chown(work_dir, uid, gid)
    # Parents sort before their children, so a child already inside an exposed parent is skipped.
    expose = sorted({sys.base_prefix, sys.base_exec_prefix, os.path.dirname(_PYTHON)})
    cfg = {
        "code_path": code_path, "python": _PYTHON, "namespaces": fs, "userns": mode == "userns",
        "fs": fs, "proc": True, "setuid": setuid, "uid": uid, "gid": gid,
        "root_dir": root_dir, "work_dir": work_dir, "expose": expose,
        "tmp_bytes": limits.max_file_bytes, "tmp_inodes": limits.max_files,
        "limits": {
            "cpu_s": int(limits.cpu_s), "memory_bytes": int(limits.memory_mb) << 20,
            "file_bytes": int(limits.max_file_bytes), "open_files": int(limits.max_open_files),
        },
        "config_path": os.path.join(host_dir, "config.marshal"),
    }
    _write_private(cfg["config_path"], marshal.dumps(cfg))
    return cfg


def _write_private(path: str, data: bytes) -> None:
    # 0600: in the modes without a private root the program could otherwise read these by name.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "wb") as f:
        f.write(data)


def _execute(cfg: dict, limits: SandboxLimits) -> SandboxResult:
    start = time.monotonic()
    deadline = start + limits.wall_s
    proc = subprocess.Popen(
        [_PYTHON, "-I", "-S", "-B", _LAUNCHER, cfg["config_path"]],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, cwd=cfg["work_dir"],
        start_new_session=True, close_fds=True,
    )
    fds = (proc.stdout.fileno(), proc.stderr.fileno())
    chunks: dict[int, list[bytes]] = {fd: [] for fd in fds}
    total, killed_for = 0, ""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                killed_for = "timeout"
                break
            for key, _ in sel.select(timeout=remaining):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                chunks[key.fd].append(data)
                total += len(data)
            if total > limits.max_output_bytes:
                killed_for = "output_limit"
                break
    cpu = None if killed_for else _reap(proc, deadline)
    if cpu is None:  # still running at the deadline (it may have closed its pipes and slept)
        killed_for = killed_for or "timeout"
        # The launcher leads its own session; the program dies with it (PR_SET_PDEATHSIG, and a
        # pid namespace dies with its init), so one SIGKILL to the group is enough.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        cpu = _reap(proc, None)
    proc.stdout.close()
    proc.stderr.close()
    wall = time.monotonic() - start
    out, err = (_decode(b"".join(chunks[fd]), limits) for fd in fds)
    result = _classify(proc.returncode, out, err, wall, killed_for, cpu >= limits.cpu_s)
    result.cpu_s = round(cpu, 4)
    return result


def _reap(proc: subprocess.Popen, deadline: float | None) -> float | None:
    """Wait for the launcher (until ``deadline``) and return the CPU seconds of it and the program.

    wait4 rather than Popen.wait: its rusage includes the program's time, which is how a SIGKILL
    from the hard RLIMIT_CPU is told apart from other kills.
    """
    delay = 0.0005
    while True:
        pid, status, usage = os.wait4(proc.pid, 0 if deadline is None else os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() >= deadline:
            return None
        time.sleep(delay)
        delay = min(2 * delay, 0.01)


def _decode(data: bytes, limits: SandboxLimits) -> str:
    return data[: limits.max_output_bytes].decode("utf-8", errors="replace")


def _classify(
    rc: int, out: str, err: str, wall: float, killed_for: str, cpu_spent: bool
) -> SandboxResult:
    def result(status: str, detail: str = "") -> SandboxResult:
        return SandboxResult(status == "passed", status, rc, out, err, round(wall, 4), detail=detail)

    if killed_for == "timeout":
        return result("timeout", "wall-clock limit")
    if killed_for:
        return result(killed_for)
    if rc == 0:
        return result("passed")
    if rc == 125 and SETUP_ERROR in err:
        return result("error", err.strip().splitlines()[-1])
    last = err.strip().splitlines()[-1] if err.strip() else ""
    if "MemoryError" in last or (rc < 0 and "memory" in err.lower()):
        return result("memory", last)
    if rc == -signal.SIGXCPU or (rc == -signal.SIGKILL and cpu_spent):
        # The soft RLIMIT_CPU sends SIGXCPU; a program that ignores it meets the hard one, SIGKILL.
        return result("timeout", "cpu limit")
    if rc < 0:
        return result("killed", f"signal {-rc}")
    return result("failed", last)


def _force_remove(func, path, _exc_info) -> None:
    # A program may chmod its own files to 0 in the weaker modes; make them removable again.
    try:
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700)
        func(path)
    except OSError:
        pass
