"""nixfs against kernel overlayfs: the same random operations, the same results."""

import pytest
from conftest import needs_root
from differential import compare_with_kernel

STEPS = 150


@needs_root
@pytest.mark.parametrize("seed", range(8))
def test_same_as_kernel_overlayfs(tmp_path, seed):
    compare_with_kernel(tmp_path, seed, STEPS)
