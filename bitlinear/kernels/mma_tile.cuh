// The k-tile step of the mma.sync int8 GEMMs (gemm.cu, conv_igemm.cu): one 128-code k tile of a
// warp's (16 * MI) x (8 * NI) accumulator tile, from shared memory.
//   xs : the stage's activation rows of 128 int8 codes, XS bytes apart, the warp's from row x0.
//        A fragments by
//        ldmatrix.x4 (lanes 0-15 address rows 0-15 of the first 16 k bytes, lanes 16-31 the next
//        16), one per 16 rows and 32 k.
//   ws : the stage's weight rows of 32 packed bytes (128 codes), WS bytes apart, the warp's from
//        row w0. For
//        k32 step s, lane (g, t) reads the 2 words (two 16-k groups) of row g and forms each B
//        fragment from field t of a word (common.cuh's k-permutation): the unsigned codes
//        c = w + 1 (SIGNED false: the caller subtracts the activation row sums) or the signed
//        codes w (SIGNED true).
#pragma once
#include "common.cuh"

// Field t of the four bytes of a group word (unsigned codes c = w + 1 in {0, 1, 2}) as signed
// bytes c - 1: with bit 7 set a byte never borrows from the next when 1 is subtracted.
__device__ __forceinline__ uint32_t signed_field(uint32_t word, int t) {
    const uint32_t c = (word >> (2 * t)) & 0x03030303u;
    return ((c | 0x80808080u) - 0x01010101u) ^ 0x80808080u;
}

template <int MI, int NI, int XS, int WS, bool SIGNED>
__device__ __forceinline__ void mma_k_tile(int (&acc)[MI][NI][4], const uint8_t* xs, int x0, const uint8_t* ws,
                                           int w0, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
        uint32_t a[MI][4];
#pragma unroll
        for (int i = 0; i < MI; ++i) {
            const uint8_t* p = xs + (x0 + i * 16 + (lane & 15)) * XS + ks * 32 + (lane >> 4) * 16;
            ldmatrix_x4(a[i][0], a[i][1], a[i][2], a[i][3], p);
        }
        uint32_t b[NI][2];
#pragma unroll
        for (int j = 0; j < NI; ++j) {
            const uint2 w = *reinterpret_cast<const uint2*>(ws + (w0 + j * 8 + g) * WS + ks * 8);
            if constexpr (SIGNED) {
                b[j][0] = signed_field(w.x, t);
                b[j][1] = signed_field(w.y, t);
            } else {
                b[j][0] = (w.x >> (2 * t)) & 0x03030303u;
                b[j][1] = (w.y >> (2 * t)) & 0x03030303u;
            }
        }
#pragma unroll
        for (int i = 0; i < MI; ++i)
#pragma unroll
            for (int j = 0; j < NI; ++j)
                mma_s8_16832(acc[i][j], a[i][0], a[i][1], a[i][2], a[i][3], b[j][0], b[j][1]);
    }
}
