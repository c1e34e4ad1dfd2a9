"""sparseapps.core.allocator: glibc's malloc_trim where it exists, a no-op elsewhere."""

import platform

import pytest

from sparseapps.core import allocator


@pytest.fixture(autouse=True)
def _fresh_lookup():
    allocator._malloc_trim.cache_clear()
    yield
    allocator._malloc_trim.cache_clear()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_trim_is_found_and_returns_freed_heap_pages() -> None:
    assert allocator._malloc_trim() is not None
    blocks = [bytearray(64_000) for _ in range(600)]  # 38 MB of heap chunks below the mmap threshold ...
    del blocks[:-1]  # ... freed, except the last one, which keeps the heap's top from shrinking by itself
    assert allocator.release_free_memory() is True


def test_no_c_library_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    assert allocator._malloc_trim() is None and allocator.release_free_memory() is False
