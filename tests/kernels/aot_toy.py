"""A small kernel that proves the AOT gate (the kernel issues gate their own kernels)."""

import triton
import triton.language as tl


@triton.jit
def _scaled_copy_kernel(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (x * scale).to(y_ptr.dtype.element_ty), mask=mask)


def scaled_copy(x, scale: float):
    y = x.new_empty(x.shape)
    n = x.numel()
    _scaled_copy_kernel[(triton.cdiv(n, 256),)](x, y, n, scale, BLOCK=256)
    return y
