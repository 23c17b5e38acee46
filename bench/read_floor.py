"""Calibration for the decode (M = 1) benchmark: how long a kernel that only reads N x K/4 packed
bytes takes on this GPU, timed like gpu_check (CUDA events around batches of back-to-back launches
queued behind a spin kernel, median of batches; buffers rotated past the L2), and PyTorch's bf16
M = 1 matmul on the same shapes. Needs PyTorch and Triton (both on the GPU machine).

Run: python3 bench/read_floor.py
"""
import torch
import triton
import triton.language as tl


@triton.jit
def empty_kernel(out):
    pass


@triton.jit
def xor_combine(a, b):
    return a ^ b


@triton.jit
def read_kernel(p, n, out, BLOCK: tl.constexpr, PER: tl.constexpr):
    # PER consecutive tiles of BLOCK int32 a program, xor-folded so that no load is dead.
    base = tl.program_id(0).to(tl.int64) * PER * BLOCK
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in tl.static_range(PER):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(p + offs, mask=offs < n, other=0)
    s = tl.reduce(acc, 0, xor_combine)
    if s == 0x12345678:
        tl.store(out, s)


SPIN_CYCLES = 10_000_000  # ~5 ms: the batch's launches queue up behind it


def timeit(f, nb=7, per=20):
    """Median over nb batches (after one warm-up batch) of the mean time a call, in us."""
    ts = []
    for b in range(nb + 1):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SPIN_CYCLES)
        s.record()
        for i in range(per):
            f(i)
        e.record()
        e.synchronize()
        if b:
            ts.append(s.elapsed_time(e) * 1e3 / per)
    return sorted(ts)[len(ts) // 2]


out = torch.zeros(1, dtype=torch.int32, device="cuda")
props = torch.cuda.get_device_properties(0)
print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
print("empty kernel: %.2f us" % timeit(lambda i: empty_kernel[(1,)](out)))
print("empty kernel 1056 programs: %.2f us" % timeit(lambda i: empty_kernel[(1056,)](out)))
# packed bytes of the decode shapes: 2560^2, 13824 x 2560, 2560 x 6912, 4096^2, 20480 x 3200,
# 27648 x 5120, 55296 x 5120
SIZES = [1_638_400, 8_847_360, 4_423_680, 4_194_304, 16_384_000, 35_389_440, 70_778_880]
for nbytes in SIZES:
    nbuf = max(2, (200 << 20) // nbytes)
    n = nbytes // 4
    bufs = [torch.randint(0, 2**31 - 1, (n,), dtype=torch.int32, device="cuda") for _ in range(nbuf)]
    best = None
    for block, warps in [(2048, 4), (4096, 8)]:
        for per in [1, 2, 4, 8]:
            grid = -(-n // (block * per))
            f = lambda i: read_kernel[(grid,)](bufs[i % nbuf], n, out, BLOCK=block, PER=per, num_warps=warps)
            t = timeit(f)
            best = t if best is None else min(best, t)
            print(f"read {nbytes/1e6:.2f} MB block={block} per={per} grid={grid}: {t:.2f} us, {nbytes/t/1e3:.0f} GB/s")
    print(f"read {nbytes/1e6:.2f} MB best: {best:.2f} us, {nbytes/best/1e3:.0f} GB/s")
    del bufs
for (n, k) in [(2560, 2560), (13824, 2560), (2560, 6912), (4096, 4096), (20480, 3200), (27648, 5120), (55296, 5120)]:
    nb = max(2, (400 << 20) // (n * k * 2))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(nb)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    t = timeit(lambda i: torch.matmul(x, ws[i % nb].t()))
    print(f"torch bf16 M=1 {n}x{k}: {t:.2f} us, {n*k*2/t/1e3:.0f} GB/s")
    del ws
