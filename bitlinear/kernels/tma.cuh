// Hopper (sm_90) TMA tensor copies and bulk async-groups, for gemm90a.cu.
// A tensor map (built on the host, src/cuda/tma.rs) describes a 2D matrix in global memory and
// the box the TMA unit copies; loads complete on an mbarrier as transaction bytes, stores and
// reduce-adds form the issuing thread's bulk async-groups. (The mbarrier operations, shared with
// the sm_90 GEMV, are in common.cuh.)
#pragma once
#include <stdint.h>

// The host's CUtensorMap (opaque, 128 bytes), passed by value as a __grid_constant__ parameter.
struct alignas(64) TensorMap {
    uint64_t opaque[16];
};

// 2D tile copy global -> shared through a tensor map; completes `bar`'s transaction bytes.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const TensorMap* map, int c0, int c1, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
        "[%4];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
}
// TMA reduce-add of a 2D box of s32 shared -> global (a bulk async-group of the issuing thread).
__device__ __forceinline__ void tma_reduce_add_2d(const TensorMap* map, int c0, int c1, uint32_t src) {
    asm volatile("cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"(
                     reinterpret_cast<uint64_t>(map)),
                 "r"(c0), "r"(c1), "r"(src)
                 : "memory");
}
// TMA store of a 2D box shared -> global (a bulk async-group of the issuing thread).
__device__ __forceinline__ void tma_store_2d(const TensorMap* map, int c0, int c1, uint32_t src) {
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"(
                     reinterpret_cast<uint64_t>(map)),
                 "r"(c0), "r"(c1), "r"(src)
                 : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's bulk groups still read shared memory.
template <int N> __device__ __forceinline__ void bulk_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
template <int N> __device__ __forceinline__ void bulk_wait() {
    asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}
