"""Launcher that confines one untrusted Python program, then execs it.

Run as ``python -I -S -B _sandbox_launcher.py CONFIG`` by :mod:`rr_ray.evaluation.sandbox`, where
CONFIG is a host-written marshal file (marshal and _signal, not json and signal: they import in
microseconds, and interpreter start-up is most of the per-program cost).
It is a script, not an imported module: a fresh single-threaded process is the only safe place to
call unshare/mount/setuid before exec (``preexec_fn`` is unsafe next to the thread pool of
``run_many``). Standard library only, because ``-S`` hides site-packages.

Steps (each one optional, chosen by the config the host probed as working):
1. unshare mount/net/pid/ipc/uts namespaces (plus a user namespace when not root);
2. fork: the child becomes pid 1 (a do-nothing init) of the new pid namespace and forks the
   program; the launcher forwards the program's exit status, re-raising a fatal signal on itself
   so that the host sees the same ``-signum``;
3. in the child, build a minimal read-only root on a tmpfs (/usr, /lib*, the interpreter's
   prefix, a few /dev nodes, a fresh /proc) whose only writable place is a size-capped /tmp,
   then chroot into it;
4. set resource limits, drop to a fresh unprivileged uid (when root), set RLIMIT_NPROC=0 and
   no_new_privs, and exec ``python -I -S -B -X utf8 program.py`` in the private /tmp.
A setup failure exits with code 125 and a line starting with ``SETUP_ERROR`` on stderr.
"""

import _signal
import ctypes
import marshal
import os
import resource
import sys

SETUP_ERROR = "rr-ray-sandbox setup error:"
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
ST_KEEP = 8 | 1024 | 2048  # noexec/noatime/nodiratime: locked flags a remount must keep in a userns
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
# Host directories a Python interpreter needs; everything else of the host stays invisible.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")
DEV_NODES = ("null", "zero", "full", "random", "urandom")

_libc = ctypes.CDLL(None, use_errno=True)


def _call(name, *args):
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}{args!r}: {os.strerror(err)}")


def _mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    _call("mount", enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))


def _bind_readonly(src, target):
    # The remount makes the top mount read-only; mounts nested below src (rare under /usr) keep
    # their flags, which the unprivileged uid cannot exploit beyond its file permissions.
    _mount(src, target, None, MS_BIND | MS_REC)
    keep = os.statvfs(src).f_flag & ST_KEEP
    _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | keep)


def _expose(path, root):
    """Make host ``path`` visible at the same place under ``root``, read-only (links copied)."""
    if not os.path.lexists(path) or os.path.lexists(root + path):
        return
    os.makedirs(os.path.dirname(root + path), mode=0o755, exist_ok=True)
    if os.path.islink(path):
        os.symlink(os.readlink(path), root + path)
        return
    if os.path.isdir(path):
        os.makedirs(root + path, mode=0o755)
    else:
        open(root + path, "wb").close()
    _bind_readonly(path, root + path)


def _build_root(cfg, code):
    root, uid, gid = cfg["root_dir"], cfg["uid"], cfg["gid"]
    # Private propagation first, so none of the mounts below leaks back to the host.
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for path in SYSTEM_DIRS + ETC_FILES + tuple(cfg["expose"]):
        _expose(path, root)
    os.makedirs(root + "/dev", mode=0o755)
    _mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
    for node in DEV_NODES:
        open(f"{root}/dev/{node}", "wb").close()
        _mount(f"/dev/{node}", f"{root}/dev/{node}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    os.makedirs(root + "/proc", mode=0o555)
    if cfg["proc"]:  # a fresh procfs shows only this pid namespace
        _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(root + "/tmp", mode=0o700)
    tmp_opts = (f"mode=0700,uid={uid},gid={gid},"
                f"size={cfg['tmp_bytes']},nr_inodes={cfg['tmp_inodes']}")
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, tmp_opts)
    _write_program(root + "/tmp", code, uid, gid)
    _mount(None, root, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot(root)
    return "/tmp"


def _write_program(workdir, code, uid, gid):
    path = os.path.join(workdir, "program.py")
    with open(path, "wb") as f:
        f.write(code)
    if os.geteuid() == 0 and uid != 0:
        os.chown(path, uid, gid)


def _limit(which, value):
    resource.setrlimit(which, (value, value))


def _confine_and_exec(cfg, code):
    os.umask(0o022)
    if cfg["namespaces"]:  # our own UTS namespace: do not show the host's name
        _call("sethostname", b"sandbox", ctypes.c_size_t(7))
    if cfg["fs"]:
        workdir = _build_root(cfg, code)
    else:
        workdir = cfg["work_dir"]
        _write_program(workdir, code, cfg["uid"], cfg["gid"])
    os.chdir(workdir)
    lim = cfg["limits"]
    resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))
    _limit(resource.RLIMIT_AS, lim["memory_bytes"])
    _limit(resource.RLIMIT_FSIZE, lim["file_bytes"])
    _limit(resource.RLIMIT_NOFILE, lim["open_files"])
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_MSGQUEUE, 0)
    _limit(resource.RLIMIT_MEMLOCK, 0)
    if cfg["setuid"]:
        os.setgroups([])
        os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
    # After the uid change: set before it, setuid would flag the process as over its limit and
    # the exec below would fail with EAGAIN. Zero blocks every fork/clone of a non-root user.
    _limit(resource.RLIMIT_NPROC, 0)
    _call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # setuid/file-caps binaries stay powerless
    _call("prctl", PR_SET_PDEATHSIG, _signal.SIGKILL, 0, 0, 0)  # dies with the launcher
    os.closerange(3, 1 << 16)
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    python = cfg["python"]
    os.execve(python, [python, "-I", "-S", "-B", "-X", "utf8", "program.py"], env)


def _unshare(cfg):
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    uid, gid = os.geteuid(), os.getegid()
    if cfg["userns"]:
        flags |= CLONE_NEWUSER
    _call("unshare", ctypes.c_int(flags))
    if cfg["userns"]:  # map ourselves to ourselves: exec then drops the namespace capabilities
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)


def _start_program(cfg, code):
    pid = os.fork()
    if pid == 0:
        try:
            _confine_and_exec(cfg, code)
        except BaseException as exc:
            os.write(2, f"{SETUP_ERROR} {exc!r}\n".encode())
        os._exit(125)
    return pid


def _exit_like(status):
    """Exit the way the waited-for process did, signal included."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig != _signal.SIGKILL:  # SIGKILL has no handler to reset
            _signal.signal(sig, _signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def main():
    with open(sys.argv[1], "rb") as f:
        cfg = marshal.load(f)
    with open(cfg["code_path"], "rb") as f:
        code = f.read()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        if cfg["namespaces"]:
            _unshare(cfg)
    except BaseException as exc:
        sys.stderr.write(f"{SETUP_ERROR} {exc!r}\n")
        os._exit(125)
    if not cfg["namespaces"]:
        _, status = os.waitpid(_start_program(cfg, code), 0)
        _exit_like(status)
    # The first child is pid 1 of the new pid namespace. It stays a privileged, do-nothing init
    # and runs the program as pid 2: an init ignores signals it has no handler for (SIGXCPU from
    # RLIMIT_CPU included), which the program should not inherit. Init reports the program's
    # raw wait status through a pipe, since an init cannot re-raise a signal on itself.
    status_r, status_w = os.pipe()
    init = os.fork()
    if init == 0:
        os.close(status_r)
        _, status = os.waitpid(_start_program(cfg, code), 0)
        os.write(status_w, str(status).encode())
        os._exit(0)
    os.close(status_w)
    _, init_status = os.waitpid(init, 0)
    data = os.read(status_r, 32)
    _exit_like(int(data) if data else init_status)


if __name__ == "__main__":
    main()
