#!/usr/bin/env python3
"""Writes the committed seed corpora of the fuzz targets into fuzz/seeds/<target>/.

Deterministic (fixed random seed), standard library only, small (the whole corpus stays well under
1 MB): the network's real files are megabytes, so the safetensors seeds carry every tensor name,
dtype and metadata key of the real formats with small shapes (the first layers at their real
shapes), which is what the loaders parse and check before any large tensor. Run from anywhere:
`python3 fuzz/seeds.py`.
"""
import json
import os
import random
import shutil
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")
rng = random.Random(20)

DT = {"F32": ("<f", 4), "F16": ("<e", 2), "BF16": (None, 2), "U8": ("<B", 1), "I32": ("<i", 4)}


def encode(dtype, shape, values=None):
    n = 1
    for d in shape:
        n *= d
    if values is None:
        values = [rng.uniform(-1, 1) for _ in range(n)] if dtype != "U8" else [0x55] * n
    fmt, _ = DT[dtype]
    if dtype == "BF16":
        return b"".join(struct.pack("<f", v)[2:] for v in values)
    if dtype == "I32":
        values = [int(v * 100) for v in values]
    return b"".join(struct.pack(fmt, v) for v in values)


def safetensors(tensors, metadata=None):
    """tensors: list of (name, dtype, shape[, values])."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for t in tensors:
        name, dtype, shape = t[:3]
        raw = encode(dtype, shape, t[3] if len(t) > 3 else None)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def config(fc1, fc2):
    return json.dumps({"fc1": fc1, "fc2": fc2, "act_scaling": "per-token"}, separators=(",", ":"))


def convs(dtype, real_conv1=True):
    c1 = [32, 3, 3, 3] if real_conv1 else [2, 3, 3, 3]
    return [("conv1.weight", dtype, c1), ("conv1.bias", dtype, [c1[0]]),
            ("conv2.weight", dtype, [4, 2, 3, 3]), ("conv2.bias", dtype, [64])]


def bit_layer(name, n, k4, dtype, k):
    return [(f"{name}.weight.packed", "U8", [n, k4]), (f"{name}.weight.scale", "F32", [1], [0.25]),
            (f"{name}.bias", dtype, [n]), (f"{name}.norm.weight", dtype, [k])]


def packed_seeds():
    out = {}
    for i, (fc1, fc2, dtype) in enumerate([("bitlinear", "bitlinear", "F32"), ("bitlinear", "linear", "BF16"),
                                            ("linear", "linear", "F16")]):
        meta = {"format": "bitlinear-packed", "format_version": "1", "model": "SimpleBitCnn",
                "model_config": config(fc1, fc2), "float_dtype": dtype.lower(),
                "packing": "row-major", "code_mapping": "code = w + 1"}
        tensors = convs(dtype, real_conv1=i == 0)
        for name, kind, k, n in [("fc1", fc1, 8, 4), ("fc2", fc2, 4, 10)]:
            if kind == "bitlinear":
                meta[f"{name}.in_features"] = str(4096 if name == "fc1" else 512)
                tensors += bit_layer(name, n, k // 4, dtype, k)
            else:
                tensors += [(f"{name}.weight", dtype, [n, k]), (f"{name}.bias", dtype, [n])]
        out[f"packed_{fc1}_{fc2}_{dtype.lower()}"] = safetensors(tensors, meta)
    return out


def checkpoint_seeds():
    out = {}
    for i, (fc1, fc2, dtype) in enumerate([("bitlinear", "bitlinear", "F32"), ("linear", "bitlinear", "BF16"),
                                            ("bitlinear", "linear", "F32")]):
        tensors = convs(dtype, real_conv1=i == 0)
        for name, kind, k, n in [("fc1", fc1, 8, 4), ("fc2", fc2, 4, 10)]:
            tensors += [(f"{name}.weight", dtype, [n, k]), (f"{name}.bias", dtype, [n])]
            if kind == "bitlinear":
                tensors.append((f"{name}.norm.weight", dtype, [k]))
        # The recorded configuration (what a checkpoint written by `train` carries).
        meta = {"model": "SimpleBitCnn", "model_config": config(fc1, fc2), "epoch": str(i + 1)}
        out[f"ckpt_{fc1}_{fc2}_{dtype.lower()}"] = safetensors(tensors, meta if i != 2 else None)
    # A checkpoint variable relabelled I32.
    out["ckpt_i32"] = safetensors([("conv1.bias", "I32", [32]), ("fc2.bias", "F32", [10])])
    return out


def resume_seeds():
    out = {}
    for epochs_done in (1, 2):
        history = [{"epoch": e, "lr": 0.001, "train_loss": 1.5 / e, "train_acc": 0.3 * e, "test_loss": 1.4 / e,
                    "test_acc": 0.35 * e, "epoch_seconds": 12.5, "train_seconds": 10.0, "images_per_sec": 4000.0}
                   for e in range(1, epochs_done + 1)]
        state = {"version": 1, "epochs_done": epochs_done, "optimizer_step": 391 * epochs_done,
                 "best_test_acc": 0.35 * epochs_done, "best_epoch": epochs_done,
                 "settings": {"fc1": "bitlinear", "fc2": "bitlinear", "epochs": 20, "batch_size": 128, "lr": 0.001,
                              "weight_decay": 0.01, "schedule": ["constant", "cosine"][epochs_done - 1], "seed": 0,
                              "train_limit": None if epochs_done == 1 else 1000, "train_images": 50000,
                              "dtype": "f32"},
                 "history": history}
        tensors = []
        for name, shape in [("conv1.bias", [32]), ("fc2.norm.weight", [8]), ("fc2.weight", [2, 8])]:
            tensors += [(name, "F32", shape), (f"optim.m.{name}", "F32", shape), (f"optim.v.{name}", "F32", shape,
                                                                                     [rng.uniform(0, 1e-3) for _ in range(
                                                                                         shape[0] * (shape[1] if len(shape) > 1 else 1))])]
        out[f"resume_{epochs_done}"] = safetensors(tensors, {"train_state": json.dumps(state, separators=(",", ":"))})
    return out


def cifar_seeds():
    out = {}
    for n in (1, 2, 3):
        out[f"records_{n}"] = b"".join(bytes([rng.randrange(10)]) + bytes(rng.randrange(256) for _ in range(3072))
                                       for _ in range(n))
    return out


def ternary_seeds():
    out = {}
    # The README's example: [1, -1, 0, 1, -1] packs to [0x92, 0x54] (K = 5, 2 bytes per row).
    out["readme_k5"] = struct.pack("<HBf", 5, 2, 0.5) + bytes([0x92, 0x54])
    for n, k in [(3, 8), (4, 13), (2, 1), (1, 64)]:
        k4 = (k + 3) // 4
        codes = [rng.randrange(3) for _ in range(n * k)]
        body = b""
        for r in range(n):
            row = codes[r * k:(r + 1) * k] + [1] * (4 * k4 - k)
            body += bytes(sum(c << (2 * i) for i, c in enumerate(row[j:j + 4])) for j in range(0, 4 * k4, 4))
        out[f"n{n}_k{k}"] = struct.pack("<HBf", k, k4, rng.uniform(1e-3, 2)) + body
    return out


FIXTURES = os.path.join(os.path.dirname(ROOT), "..", "convert", "tests", "fixtures", "interop")


def hf_packed(n, k):
    """transformers' packing: value w + 1 of row r at bits 2 * (r // rows) of byte (r % rows, c)."""
    rows = (n + 3) // 4
    vals = [[rng.randrange(3) for _ in range(k)] for _ in range(n)] + [[1] * k] * (4 * rows - n)
    return [sum(vals[i * rows + r][c] << (2 * i) for i in range(4)) for r in range(rows) for c in range(k)]


def hf_seeds():
    """A mode byte (0: class from the config, 1: BitLinear, 2: AutoBitLinear), then the file."""
    out = {}
    layers = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
    t = [("model.norm.weight", "F32", [8])]
    for l, (n, k) in zip(layers, [(8, 8), (4, 12)]):
        t += [(l + ".weight", "U8", [(n + 3) // 4, k], hf_packed(n, k)), (l + ".weight_scale", "F32", [1], [0.5])]
    out["bitlinear"] = b"\x01" + safetensors(t, {"format": "pt"})
    # export-hf's metadata: the exact scale, an out-features count that is not a multiple of 4.
    l = layers[0]
    t = [(l + ".weight", "U8", [2, 5], hf_packed(6, 5)), (l + ".weight_scale", "F32", [1], [4.0])]
    meta = {"format": "pt", f"bitlinear.{l}.scale": "0.25", f"bitlinear.{l}.out_features": "6"}
    out["export_meta"] = b"\x00" + safetensors(t, meta)
    t = [(l + ".weight", "F32", [3, 4], [rng.choice([-1.0, 0.0, 1.0]) for _ in range(12)]),
         (l + ".weight_scale", "BF16", [1], [0.75]), ("lm_head.weight", "F16", [2, 4])]
    out["autobitlinear"] = b"\x02" + safetensors(t)
    return out


def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf(kvs, tensors, alignment=32):
    """kvs: (key, type id, packed value bytes); tensors: (name, dims in ggml order, type id, data)."""
    h = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for key, ty, value in kvs:
        h += gguf_string(key) + struct.pack("<I", ty) + value
    data = b""
    for name, dims, ty, raw in tensors:
        data += b"\0" * (-len(data) % alignment)
        h += gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        h += struct.pack("<IQ", ty, len(data))
        data += raw
    return h + b"\0" * (-len(h) % alignment) + data


def tq2_rows(n, k_stored, k, scale):
    """TQ2_0 blocks (64 bytes of 2-bit codes, f16 scale); codes past k are 1 (zero weights)."""
    out = b""
    for _ in range(n):
        for b in range(k_stored // 256):
            zero = (b + 1) * 256 > k
            out += bytes(0x55 if zero else sum(rng.randrange(3) << s for s in (0, 2, 4, 6)) for _ in range(64))
            out += struct.pack("<e", scale)
    return out


def gguf_seeds():
    out = {}
    with open(os.path.join(FIXTURES, "tq.gguf"), "rb") as f:
        out["gguf_package_tq"] = f.read()  # written by the gguf Python package: TQ2_0, TQ1_0, F32
    ours = [("general.architecture", 8, gguf_string("simplebitcnn")), ("general.alignment", 4, struct.pack("<I", 32)),
            ("bitlinear.model_config", 8, gguf_string(config("bitlinear", "bitlinear"))),
            ("bitlinear.fc1.in_features", 10, struct.pack("<Q", 200)),
            ("bitlinear.fc1.scale", 6, struct.pack("<f", 0.123))]
    tensors = [("fc1.weight", [256, 3], 35, tq2_rows(3, 256, 200, 0.123)),
               ("fc1.norm.weight", [200], 0, encode("F32", [200])),
               ("conv1.bias", [4], 1, encode("F16", [4])), ("conv2.bias", [4], 30, encode("BF16", [4]))]
    out["ours_tq2_padded"] = gguf(ours, tensors)
    out["tq2_two_blocks"] = gguf([], [("w.weight", [512, 2], 35, tq2_rows(2, 512, 512, 0.5))], alignment=32)
    return out


def codec_seeds():
    """codec (0 TQ2_0, 1 TQ1_0, 2 HF), N, K (u16), stored blocks, exact-scale flag, scale, data."""
    out = {}
    head = lambda codec, n, k, blocks, flags, scale: struct.pack("<BBHBBf", codec, n, k, blocks, flags, scale)
    out["tq2_k256"] = head(0, 2, 256, 1, 0, 0.5) + tq2_rows(2, 256, 256, 0.5)
    out["tq2_k300_exact"] = head(0, 1, 300, 2, 1, 0.3) + tq2_rows(1, 512, 300, 0.3)
    out["tq1_k256"] = head(1, 1, 256, 1, 0, 0.25) + bytes(rng.randrange(256) for _ in range(52)) + struct.pack("<e", 0.25)
    out["hf_n6_k5"] = head(2, 6, 5, 0, 0, 2.0) + bytes(hf_packed(6, 5))
    out["hf_n4_k8_divide"] = head(2, 4, 8, 0, 2, 4.0) + bytes(hf_packed(4, 8))
    return out


def speedrun_seeds():
    """A TernarySpeedrun packed file and checkpoint at widths 2/2/2/2 (all-zero ternary codes)."""
    w = [2, 2, 2, 2]
    cfg = json.dumps({"widths": w, "stem": "ternary", "act_scaling": "per-image"}, separators=(",", ":"))
    cfg = cfg.replace(", ", ",")
    meta = {"format": "bitlinear-packed", "format_version": "1", "model": "TernarySpeedrun",
            "model_config": cfg, "float_dtype": "f32", "packing": "row-major", "code_mapping": "code = w + 1",
            "stem.in_features": "27", "head.in_features": "2"}
    packed = [("stem.weight.packed", "U8", [2, 7]), ("stem.weight.scale", "F32", [1], [0.25]),
              ("stem.bias", "F32", [2])]
    ckpt = [("stem.weight", "F32", [2, 3, 3, 3]), ("stem.bias", "F32", [2])]
    for i in range(1, 4):
        for j in range(1, 3):
            conv = f"block{i}.conv{j}"
            meta[f"{conv}.in_features"] = "18"
            packed += [(f"{conv}.weight.packed", "U8", [2, 5]), (f"{conv}.weight.scale", "F32", [1], [0.5])]
            ckpt.append((f"{conv}.weight", "F32", [2, 2, 3, 3]))
            norm = [(f"block{i}.norm{j}.bias", "F32", [2]), (f"block{i}.norm{j}.running_mean", "F32", [2]),
                    (f"block{i}.norm{j}.running_var", "F32", [2], [1.0, 0.5])]
            packed += norm
            ckpt += norm
    packed += [("head.weight.packed", "U8", [10, 1]), ("head.weight.scale", "F32", [1], [0.125]),
               ("head.bias", "F32", [10]), ("head.norm.weight", "F32", [2])]
    ckpt += [("head.weight", "F32", [10, 2]), ("head.bias", "F32", [10]), ("head.norm.weight", "F32", [2])]
    ckpt_meta = {"model": "TernarySpeedrun", "model_config": cfg, "epoch": "1"}
    return {"packed_speedrun_f32": safetensors(packed, meta)}, {"ckpt_speedrun": safetensors(ckpt, ckpt_meta)}


def main():
    packed, ckpt = packed_seeds(), checkpoint_seeds()
    corpora = {
        "packed_file": packed,
        "checkpoint": ckpt,
        "resume": resume_seeds(),
        "cifar_records": cifar_seeds(),
        "packed_ternary": ternary_seeds(),
        "gguf": gguf_seeds(),
        "hf_bitnet": hf_seeds(),
        "ternary_codecs": codec_seeds(),
        "inspect": {**{k: v for k, v in packed.items() if len(v) < 8000}, **ckpt},
    }
    # Drawn last, so that the seeds above keep their random values.
    sp_packed, sp_ckpt = speedrun_seeds()
    corpora["packed_file"].update(sp_packed)
    corpora["checkpoint"].update(sp_ckpt)
    shutil.rmtree(ROOT, ignore_errors=True)
    total = 0
    for target, files in corpora.items():
        os.makedirs(os.path.join(ROOT, target))
        for name, data in files.items():
            with open(os.path.join(ROOT, target, name), "wb") as f:
                f.write(data)
            total += len(data)
    print(f"wrote {sum(map(len, corpora.values()))} seeds, {total} bytes, under {ROOT}")


if __name__ == "__main__":
    main()
