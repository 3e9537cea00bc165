"""sdjax.platform: the XLA:CPU flags entry points set, and handing freed heap back to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import pytest

from sdjax import platform


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim and /proc are Linux's")
def test_release_free_memory_returns_freed_heap_pages():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block, count = 64 * 1024, 2048  # 128 MiB in blocks below glibc's mmap threshold: they live in the heap
    blocks = [libc.malloc(block) for _ in range(count)]
    pin = libc.malloc(block)  # keeps the heap's top in use, so free() alone cannot shrink it
    try:
        for b in blocks:
            ctypes.memset(b, 1, block)
        for b in blocks:
            libc.free(b)
        before = _rss_bytes()
        assert platform.release_free_memory() is True
        assert before - _rss_bytes() > 64 * 2**20
    finally:
        libc.free(pin)


def test_release_free_memory_without_malloc_trim_is_a_no_op(monkeypatch):
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())  # a libc without malloc_trim (musl, macOS)
    assert platform.release_free_memory() is False


def test_configure_cpu_leaves_user_flags_alone(monkeypatch):
    monkeypatch.setattr(platform, "CPU_XLA_FLAGS", ("--xla_cpu_example=1",))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert platform.configure_cpu() is None
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(platform, "_backend_started", lambda jax_module: True)  # too late once JAX has started
    assert platform.configure_cpu() is None
    monkeypatch.setattr(platform, "_backend_started", lambda jax_module: False)
    assert platform.configure_cpu() == "--xla_cpu_example=1"
    assert platform.configure_cpu() is None  # XLA_FLAGS is set now: a second call changes nothing
