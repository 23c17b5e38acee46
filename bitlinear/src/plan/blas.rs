//! The cuBLAS calls of the convolutions' backward products (`cuda/blas.rs`): a row-major product
//! written as cuBLAS's column-major GEMM of its transpose, `Cᵀ = Bᵀ · Aᵀ`, so cuBLAS's `A` is
//! the row-major product's right operand and its `B` the left one.

/// One column-major GEMM `C (m x n) = op(A) (m x k) · op(B) (k x n)` of `batch` products, with
/// leading dimensions and batch strides in elements (`transa`/`transb`: `op` transposes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ColumnMajorGemm {
    pub transa: bool,
    pub transb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    pub batch: usize,
}

/// Row-major `out (m, n) = left (k, m)ᵀ · right (n, k)ᵀ`, both operands contiguous: `outᵀ (n x
/// m)` = `right` (stored k x n column-major, transposed) · `left` (stored m x k, transposed).
pub(crate) fn tt_product(m: usize, n: usize, k: usize) -> ColumnMajorGemm {
    ColumnMajorGemm {
        transa: true,
        transb: true,
        m: n,
        n: m,
        k,
        lda: k,
        ldb: m,
        ldc: n,
        stride_a: 0,
        stride_b: 0,
        stride_c: 0,
        batch: 1,
    }
}

/// Row-major `out[i] (c, p) = left (c, r) · right[i] (r, p)` for `batch` contiguous `right`
/// blocks, one `left` for all: `out[i]ᵀ (p x c)` = `right[i]ᵀ` (stored p x r column-major, as it
/// is) · `leftᵀ` (stored r x c, as it is; batch stride 0).
pub(crate) fn shared_left_batched(c: usize, r: usize, p: usize, batch: usize) -> ColumnMajorGemm {
    ColumnMajorGemm {
        transa: false,
        transb: false,
        m: p,
        n: c,
        k: r,
        lda: p,
        ldb: r,
        ldc: p,
        stride_a: r * p,
        stride_b: 0,
        stride_c: c * p,
        batch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What cuBLAS computes for `g`: column-major, `a` = its A, `b` = its B.
    fn column_major(g: &ColumnMajorGemm, a: &[f64], b: &[f64]) -> Vec<f64> {
        let mut c = vec![0f64; g.stride_c.max(g.ldc * g.n) * g.batch];
        for t in 0..g.batch {
            let (a, b) = (&a[t * g.stride_a..], &b[t * g.stride_b..]);
            for i in 0..g.m {
                for j in 0..g.n {
                    let mut s = 0f64;
                    for l in 0..g.k {
                        let av = if g.transa { a[l + i * g.lda] } else { a[i + l * g.lda] };
                        let bv = if g.transb { b[j + l * g.ldb] } else { b[l + j * g.ldb] };
                        s += av * bv;
                    }
                    c[t * g.stride_c + i + j * g.ldc] = s;
                }
            }
        }
        c
    }

    fn values(n: usize, seed: u64) -> Vec<f64> {
        (0..n)
            .map(|i| ((i as u64 * 2654435761 + seed) % 1000) as f64 / 100.0 - 5.0)
            .collect()
    }

    #[test]
    fn tt_product_is_both_operands_transposed() {
        for (m, n, k) in [(1, 1, 1), (3, 5, 7), (64, 288, 40), (8, 1, 3), (1, 9, 4)] {
            let (left, right) = (values(k * m, 5), values(n * k, 6));
            let got = column_major(&tt_product(m, n, k), &right, &left);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|l| left[l * m + i] * right[j * k + l]).sum();
                    assert_eq!(got[i * n + j], want, "({m}, {n}, {k}) at ({i}, {j})");
                }
            }
        }
    }

    #[test]
    fn shared_left_batched_is_each_block_times_left() {
        for (c, r, p, batch) in [(1, 1, 1, 1), (4, 9, 6, 3), (32, 576, 16, 2), (5, 3, 1, 4)] {
            let (left, right) = (values(c * r, 3), values(batch * r * p, 4));
            let got = column_major(&shared_left_batched(c, r, p, batch), &right, &left);
            for t in 0..batch {
                for i in 0..c {
                    for j in 0..p {
                        let want: f64 = (0..r).map(|l| left[i * r + l] * right[t * r * p + l * p + j]).sum();
                        assert_eq!(
                            got[t * c * p + i * p + j],
                            want,
                            "({c}, {r}, {p}) image {t} at ({i}, {j})"
                        );
                    }
                }
            }
        }
    }
}
