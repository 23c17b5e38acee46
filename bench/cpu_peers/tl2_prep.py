"""bitnet.cpp TL2 for the benchmark shapes, driven through bitnet.cpp's own code in peers/bitnet.

`kernels`: runs bitnet.cpp's TL2 code generator (utils/codegen_tl2.py) for the benchmark's
weight shapes instead of a model's, writing include/bitnet-lut-kernels.h and kernel_config.ini
into peers/bitnet as its setup_env.py would.

`weights OUT_DIR`: random ternary weights (seeded) for each shape, laid out by bitnet.cpp's own
converter (preprocess_weights_tl2 in utils/convert-hf-to-gguf-bitnet.py): writes
tl2_NxK.bin (TL2 bytes) and tern_NxK.bin (the int8 weights, row-major, for the harness's check).

Nothing of bitnet.cpp is copied: both modules are loaded from peers/bitnet at run time.
"""

import ast
import os
import sys
from configparser import ConfigParser

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BITNET = os.path.join(ROOT, "peers", "bitnet")

# (N, K) of the benchmark, with TL2 tiles chosen as bitnet.cpp's presets do for similar shapes
# (BM divides N; K % BK % 32 == 0; bm is always 32).
SHAPES = [(512, 4096, 256, 96), (4096, 4096, 128, 96), (2560, 6912, 128, 96)]


def kernels():
    sys.path.insert(0, os.path.join(BITNET, "utils"))
    import codegen_tl2 as cg

    k_list = [cg.get_three_k_two_k(k, bk) for (_, k, _, bk) in SHAPES]
    impls = [cg.gen_tbl_impl(f"{n}_{k}", bm_, bk, 32, kl) for (n, k, bm_, bk), kl in zip(SHAPES, k_list)]
    shapes = [[n, k] for (n, k, _, _) in SHAPES]
    inc = os.path.join(BITNET, "include")
    with open(os.path.join(inc, "bitnet-lut-kernels.h"), "w") as f:
        f.write("#if defined(GGML_BITNET_X86_TL2)")
        f.write(cg.gen_ctor_code())
        for code in impls:
            f.write(code)
        f.write(cg.gen_top_api(shapes, k_list))
        f.write(cg.gen_transform_code(shapes))
        f.write("#endif")
    config = ConfigParser()
    for i, (n, k, bm_, bk) in enumerate(SHAPES):
        s = f"Kernels_{i}"
        config.add_section(s)
        for key, v in (("M", n), ("K", k), ("BM", bm_), ("BK", bk), ("bmm", 32)):
            config.set(s, key, str(v))
    with open(os.path.join(inc, "kernel_config.ini"), "w") as f:
        config.write(f)


def load_converter():
    """The TL2 preprocessing functions of bitnet.cpp's converter, without its heavy imports."""
    path = os.path.join(BITNET, "utils", "convert-hf-to-gguf-bitnet.py")
    tree = ast.parse(open(path).read())
    wanted = {"preprocess_two_weights_tl2", "preprocess_three_weights_tl2", "preprocess_weights_tl2"}
    mod = ast.Module(body=[n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted], type_ignores=[])
    ns = {"np": np, "Tuple": tuple}
    exec(compile(mod, path, "exec"), ns)
    return ns["preprocess_weights_tl2"]


def weights(out_dir):
    prep = load_converter()
    os.makedirs(out_dir, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(BITNET)  # the converter reads include/kernel_config.ini relative to bitnet.cpp's root
    try:
        for n, k, _, _ in SHAPES:
            rng = np.random.default_rng(n * 100003 + k)
            w = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
            tl2 = prep(w.astype(np.float32))
            assert tl2.dtype == np.uint8
            w.tofile(os.path.join(out_dir, f"tern_{n}x{k}.bin"))
            tl2.tofile(os.path.join(out_dir, f"tl2_{n}x{k}.bin"))
    finally:
        os.chdir(cwd)


if __name__ == "__main__":
    if sys.argv[1:2] == ["kernels"]:
        kernels()
    elif sys.argv[1:2] == ["weights"] and len(sys.argv) == 3:
        weights(sys.argv[2])
    else:
        sys.exit("usage: tl2_prep.py kernels | weights OUT_DIR")
