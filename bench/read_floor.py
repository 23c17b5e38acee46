"""Calibration for the decode (M = 1) benchmark: how long a kernel that only reads N x K/4 packed
bytes takes on this GPU, timed like gpu_check (CUDA events around batches of back-to-back launches
queued behind a spin kernel, median of batches; buffers rotated past the L2), and PyTorch's bf16
M = 1 matmul on the same shapes. Needs CuPy and PyTorch (both on the GPU machine).

Run: python3 bench/read_floor.py
"""
import cupy as cp, numpy as np, torch
src = r'''
extern "C" __global__ void empty() {}
extern "C" __global__ void spin(long long ns) {
    long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { __nanosleep(1000); asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
extern "C" __global__ void readsum(const uint4* __restrict__ p, long n16, int per, unsigned* out) {
    long base = ((long)blockIdx.x * blockDim.x + threadIdx.x);
    long stride = (long)gridDim.x * blockDim.x;
    uint4 v[8];
    #pragma unroll
    for (int i = 0; i < 8; ++i) { long j = base + i * stride; v[i] = (i < per && j < n16) ? __ldg(p + j) : make_uint4(0,0,0,0); }
    unsigned s = 0;
    #pragma unroll
    for (int i = 0; i < 8; ++i) s ^= v[i].x ^ v[i].y ^ v[i].z ^ v[i].w;
    if (s == 0x12345678u) out[0] = s;
}
'''
mod = cp.RawModule(code=src, options=("-std=c++17",))
empty = mod.get_function("empty"); spin = mod.get_function("spin"); rs = mod.get_function("readsum")
out = cp.zeros(1, dtype=cp.uint32)
def timeit(f, nb=7, per=20):
    ts = []
    for b in range(nb + 1):
        s, e = cp.cuda.Event(), cp.cuda.Event()
        spin((1,), (1,), (np.int64(5_000_000),))
        s.record()
        for i in range(per): f(i)
        e.record(); e.synchronize()
        if b: ts.append(cp.cuda.get_elapsed_time(s, e) * 1e3 / per)
    return sorted(ts)[len(ts)//2]
print("empty kernel: %.2f us" % timeit(lambda i: empty((1,), (1,), ())))
print("empty kernel 1056x256: %.2f us" % timeit(lambda i: empty((1056,), (256,), ())))
for nbytes in [1_638_400, 8_847_360, 4_423_680, 4_194_304, 70_778_880]:
    nbuf = max(1, (200 << 20) // nbytes)
    bufs = [cp.random.randint(0, 2**31, nbytes // 4, dtype=cp.int32) for _ in range(nbuf)]
    n16 = nbytes // 16
    for per in [1, 2, 4, 8]:
        threads = 256; grid = -(-n16 // (threads * per))
        t = timeit(lambda i: rs((grid,), (threads,), (bufs[i % nbuf], np.int64(n16), np.int32(per), out)))
        print(f"read {nbytes/1e6:.2f} MB per={per} grid={grid}: {t:.2f} us, {nbytes/t/1e3:.0f} GB/s")
for (n, k) in [(2560, 2560), (13824, 2560), (2560, 6912), (4096, 4096)]:
    nb = max(1, (200 << 20) // (n * k * 2))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(nb)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    st = torch.cuda.current_stream()
    def tt(i): torch.matmul(x, ws[i % nb].t())
    for i in range(5): tt(i)
    torch.cuda.synchronize()
    ts = []
    for b in range(8):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        spin((1,), (1,), (np.int64(5_000_000),))
        s.record()
        for i in range(20): tt(i)
        e.record(); e.synchronize()
        if b: ts.append(s.elapsed_time(e) * 1e3 / 20)
    print(f"torch bf16 M=1 {n}x{k}: {sorted(ts)[len(ts)//2]:.2f} us")
