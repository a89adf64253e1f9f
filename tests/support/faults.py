"""Code that dies of a real fault signal, for the tests of what survives one."""

from __future__ import annotations

from pendra_inference.selfcheck import CPU_PASSES_DONE

# Executes ud2, an instruction every x86-64 CPU refuses: the process dies of SIGILL, raised by
# the CPU, as one does that runs AVX-512 or AMX code the host will not execute.
SIGILL_CODE = (
    f"MARKER = {CPU_PASSES_DONE!r}\n"
    + r"""
import ctypes, mmap, os, signal, sys
# --after-cpu-passes: first say, as the self-check child does, that the CPU's passes lived.
if len(sys.argv) > 1 and sys.argv[1] == "--after-cpu-passes":
    sys.stderr.write(MARKER + "\n")
    sys.stderr.flush()
try:
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except OSError:  # a kernel that refuses writable code pages: the signal alone
    os.kill(os.getpid(), signal.SIGILL)
page.write(b"\x0f\x0b")
ctypes.CFUNCTYPE(None)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()
"""
)
