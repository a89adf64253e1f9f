"""Code that dies of a real fault signal, for the tests of what survives one."""

from __future__ import annotations

# Executes ud2, an instruction every x86-64 CPU refuses: the process dies of SIGILL, raised by
# the CPU, as one does that runs AVX-512 or AMX code the host will not execute.
SIGILL_CODE = r"""
import ctypes, mmap
page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(b"\x0f\x0b")
ctypes.CFUNCTYPE(None)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()
"""
