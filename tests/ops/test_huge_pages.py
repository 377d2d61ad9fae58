"""Tables in transparent huge pages: the host's THP mode, the copy, and the impls' refusals."""

import pytest
import torch

from bench.embeddings import HUGE_PAGE_BYTES, huge_page_copy
from bench.host import huge_page_bytes, transparent_huge_pages
from bench.ops import common
from bench.registry import Unsupported


@pytest.mark.parametrize("text, mode", [("always [madvise] never\n", "madvise"),
                                        ("[always] madvise never\n", "always"),
                                        ("always madvise [never]\n", "never"),
                                        ("garbled\n", "unknown")])
def test_thp_mode_is_the_bracketed_choice(tmp_path, text, mode):
    path = tmp_path / "enabled"
    path.write_text(text)
    assert transparent_huge_pages(path) == mode


def test_thp_mode_of_a_host_without_sysfs_is_unknown(tmp_path):
    assert transparent_huge_pages(tmp_path / "missing") == "unknown"


SMAPS = """\
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
Size:               4096 kB
AnonHugePages:      2048 kB
7f0000400000-7f0000800000 rw-p 00000000 00:00 0 [heap]
Size:               4096 kB
AnonHugePages:         0 kB
"""


def test_huge_page_bytes_reads_the_mapping_that_holds_the_address(tmp_path):
    path = tmp_path / "smaps"
    path.write_text(SMAPS)
    assert huge_page_bytes(0x7f0000000010, path) == 2048 << 10
    assert huge_page_bytes(0x7f0000400010, path) == 0
    assert huge_page_bytes(0x100, path) == 0  # in no mapping
    assert huge_page_bytes(0x100, tmp_path / "missing") == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_huge_page_copy_is_an_aligned_exact_copy(dtype):
    source = (torch.arange(3 * HUGE_PAGE_BYTES // 64, dtype=torch.float32) % 251).to(dtype)
    source = source.view(-1, 16)
    copy, backed = huge_page_copy(source)
    assert torch.equal(copy, source) and copy.dtype == dtype and copy.shape == source.shape
    assert copy.data_ptr() != source.data_ptr()
    assert copy.data_ptr() % HUGE_PAGE_BYTES == 0
    # How many pages the kernel grants depends on its free memory: bounded, not fixed.
    assert 0 <= backed <= source.numel() * source.element_size()


@pytest.mark.parametrize("mode", ["never", "unknown"])
def test_huge_pages_impl_refuses_a_host_without_thp(monkeypatch, mode):
    monkeypatch.setattr(common, "transparent_huge_pages", lambda: mode)
    with pytest.raises(Unsupported, match="transparent_hugepage/enabled"):
        common.PooledTable(torch.zeros(4, 8), "fp32", torch.device("cpu"), huge_pages=True)


def test_huge_pages_impl_refuses_a_gpu_before_touching_it():
    with pytest.raises(Unsupported, match="CPU-only"):
        common.require_huge_pages(torch.device("cuda"))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "int4"])
def test_huge_page_table_pools_like_the_plain_table(monkeypatch, precision):
    # Advising huge pages is harmless where THP is off: the copy is then in 4 KiB pages.
    monkeypatch.setattr(common, "transparent_huge_pages", lambda: "madvise")
    weight = torch.randn(1000, 16, generator=torch.Generator().manual_seed(0))
    indices = torch.randint(0, 1000, (300,), generator=torch.Generator().manual_seed(1))
    offsets = torch.arange(0, 300, 3)
    plain = common.PooledTable(weight, precision, torch.device("cpu"))
    huge = common.PooledTable(weight, precision, torch.device("cpu"), huge_pages=True)
    assert torch.equal(huge(indices, offsets), plain(indices, offsets))
    assert 0.0 <= huge.huge_page_fraction <= 1.0
