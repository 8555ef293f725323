import resource

import pytest
import torch

from cifarlab.core.heap import _glibc, reuse_freed_memory

pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc only")


def page_faults(allocations: int) -> int:
    """Minor page faults of allocating and writing a 64 MiB tensor `allocations` times."""
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(allocations):
        torch.ones(64 << 20, dtype=torch.uint8)  # above glibc's largest mmap threshold
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start


def test_training_buffers_are_reused_without_page_faults():
    # by default each 64 MiB block comes fresh from the kernel: 16,384 faults of 4 KiB pages
    # (32 with transparent huge pages always on); inside the block, none once the heap settled
    assert page_faults(5) >= 5 * 32
    with reuse_freed_memory():
        page_faults(20)
        with reuse_freed_memory():  # nesting keeps the setting
            pass
        assert page_faults(5) < 32
    assert page_faults(5) >= 5 * 32  # glibc's behaviour is back after the block


def test_the_api_offers_the_setting_and_does_not_impose_it():
    import cifarlab

    assert cifarlab.reuse_freed_memory is reuse_freed_memory
    assert page_faults(5) >= 5 * 32  # importing or using the API leaves malloc as it was
    with cifarlab.reuse_freed_memory():
        page_faults(20)
        assert page_faults(5) < 32
