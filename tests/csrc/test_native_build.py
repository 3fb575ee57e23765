"""The compiled extension is present, loads, and was built against the installed torch."""

import torch

from adainfer_kernels import _native


def test_native_extension_loaded():
    assert _native.load() is not None, f"_C did not load: {_native.error()}"
    assert _native.error() is None


def test_build_info_matches_installed_torch():
    info = _native.build_info()
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert info["with_cuda"] == (torch.version.cuda is not None)
    assert info["compiler"].split()[0] in ("gcc", "clang")
