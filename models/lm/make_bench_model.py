#!/usr/bin/env python3
"""Builds a random-weight decoder with a real model's shapes, for timing text generation.

The test model beside this script (make_model.py) is tiny, so it measures the decoding
loop, not a GPU. This one has the shapes of Qwen2.5-3B-Instruct (the chatbot's model
class) and is stored as the README's export recipe stores a real model: every linear
layer int4 (MatMulNBits, block 32), embeddings, activations and KV cache float32, the
Optimum ``text-generation-with-past`` interface that batch-worker reads. Weights are
random (nothing can be downloaded here), so the replies are gibberish, but a step does
the same work as the real model's: the same matrices, the same bytes of weights read.

Shapes (``--shape qwen2.5-3b``): 36 layers, hidden 2048, 16 query heads and 2 KV heads
of 128 (grouped-query attention), SwiGLU MLP of 11008, vocabulary 151,936, untied head.
About 3.4 B parameters (the head untied); model.onnx + model.onnx.data is ~3.2 GB. ``--shape small``
keeps the structure at a few MB, for checking the script on a CPU.

Differences from the real model, none of which changes the matrix work:
  * learned position embeddings instead of rotary ones (an element-wise op per layer);
  * LayerNormalization instead of RMSNorm;
  * the tokenizer is the test model's (1,024 tokens), padded with placeholder tokens
    (``<|bench_N|>``) to the model's vocabulary, so prompts are tokenized by it and
    every sampled id decodes.

Usage:  python3 models/lm/make_bench_model.py OUT_DIR [--shape qwen2.5-3b|small]
Then:   batch-worker run --task generate --lm-dir OUT_DIR --ignore-stop-tokens ...
Needs numpy and onnx (models/lm/requirements.txt).
"""

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_model import embed_and_mask, interface  # noqa: E402  (the same interface)

SHAPES = {
    "qwen2.5-3b": {
        "hidden_size": 2048,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "intermediate_size": 11008,
        "vocab_size": 151936,
        "max_position_embeddings": 4096,
    },
    "small": {
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "intermediate_size": 256,
        "vocab_size": 1536,
        "max_position_embeddings": 512,
    },
}

BLOCK = 32  # MatMulNBits block size, as in the README's quantizer call
SEED = 20261204


def int4_weight(rng, k, n):
    """Random MatMulNBits weight for a [k, n] matrix: packed nibbles and per-block scales.

    Nibbles are uniform 0..15 with the default zero point 8, so a weight is (q - 8) * scale;
    the scale makes each output's variance about that of its input.
    """
    if k % BLOCK:
        raise SystemExit(f"K={k} is not a multiple of the block size {BLOCK}")
    blocks = k // BLOCK
    packed = rng.integers(0, 256, size=(n, blocks, BLOCK // 2), dtype=np.uint8)
    scale = np.float32(1.0 / (4.6 * np.sqrt(k)))
    scales = np.full((n * blocks,), scale, dtype=np.float32)
    return packed, scales


def build(shape, out_dir):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c = SHAPES[shape]
    d, n_layers = c["hidden_size"], c["num_hidden_layers"]
    h_n, kv_n, h_d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    ff, v, p = c["intermediate_size"], c["vocab_size"], c["max_position_embeddings"]
    group = h_n // kv_n
    rng = np.random.default_rng(SEED)

    nodes, inits = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(op, ins, outs, domain=None, **attrs):
        nodes.append(helper.make_node(op, ins, outs, domain=domain, **attrs))
        return outs[0]

    def linear(x, name, k, n, out):
        packed, scales = int4_weight(rng, k, n)
        init(f"{name}.qweight", packed)
        init(f"{name}.scales", scales)
        return node(
            "MatMulNBits",
            [x, f"{name}.qweight", f"{name}.scales"],
            [out],
            domain="com.microsoft",
            K=k,
            N=n,
            bits=4,
            block_size=BLOCK,
        )

    def norm(x, name, out):
        init(f"{name}.g", np.ones((d,), np.float32))
        init(f"{name}.b", np.zeros((d,), np.float32))
        return node("LayerNormalization", [x, f"{name}.g", f"{name}.b"], [out], axis=-1, epsilon=1e-6)

    init("tok_emb", (rng.standard_normal((v, d), dtype=np.float32) * 0.02).astype(np.float32))
    init("pos_emb", (rng.standard_normal((p, d), dtype=np.float32) * 0.02).astype(np.float32))
    init("c_i64_0", np.array(0, dtype=np.int64))
    init("c_i64_1", np.array(1, dtype=np.int64))
    init("c_axes_0", np.array([0], dtype=np.int64))
    init("c_axes_1", np.array([1], dtype=np.int64))
    init("c_axes_2", np.array([2], dtype=np.int64))
    init("c_axes_12", np.array([1, 2], dtype=np.int64))
    init("c_q_shape", np.array([0, 0, h_n, h_d], dtype=np.int64))
    init("c_kv_shape", np.array([0, 0, kv_n, h_d], dtype=np.int64))
    init("c_group_shape", np.array([0, kv_n, group, -1, h_d], dtype=np.int64))
    init("c_heads_shape", np.array([0, h_n, -1, h_d], dtype=np.int64))
    init("c_merge_shape", np.array([0, 0, h_n * h_d], dtype=np.int64))
    init("c_scale", np.array(1.0 / np.sqrt(h_d), dtype=np.float32))
    init("c_mask_value", np.array(-1e9, dtype=np.float32))

    # allowed: [B, 1, 1, S, T] (batch, kv head, group, query, key).
    x = embed_and_mask(node)
    node("Unsqueeze", ["allowed", "c_axes_2"], ["allowed_grp"])

    for i in range(n_layers):
        pre = f"l{i}"
        h = norm(x, f"{pre}.ln1", f"{pre}_ln1")
        linear(h, f"{pre}.q", d, h_n * h_d, f"{pre}_q")
        linear(h, f"{pre}.k", d, kv_n * h_d, f"{pre}_k")
        linear(h, f"{pre}.v", d, kv_n * h_d, f"{pre}_v")
        node("Reshape", [f"{pre}_q", "c_q_shape"], [f"{pre}_q_bshd"])
        node("Transpose", [f"{pre}_q_bshd"], [f"{pre}_q_bhsd"], perm=[0, 2, 1, 3])
        node("Reshape", [f"{pre}_q_bhsd", "c_group_shape"], [f"{pre}_q_grp"])  # [B, kv, g, S, hd]
        for kind in ("k", "v"):
            node("Reshape", [f"{pre}_{kind}", "c_kv_shape"], [f"{pre}_{kind}_bshd"])
            node("Transpose", [f"{pre}_{kind}_bshd"], [f"{pre}_{kind}_bhsd"], perm=[0, 2, 1, 3])
        cache = {"k": "key", "v": "value"}
        for kind, full in cache.items():
            node(
                "Concat",
                [f"past_key_values.{i}.{full}", f"{pre}_{kind}_bhsd"],
                [f"present.{i}.{full}"],
                axis=2,
            )
            node("Unsqueeze", [f"present.{i}.{full}", "c_axes_2"], [f"{pre}_{kind}_grp"])  # [B, kv, 1, T, hd]
        node("Transpose", [f"{pre}_k_grp"], [f"{pre}_kT"], perm=[0, 1, 2, 4, 3])
        node("MatMul", [f"{pre}_q_grp", f"{pre}_kT"], [f"{pre}_qk"])  # [B, kv, g, S, T]
        node("Mul", [f"{pre}_qk", "c_scale"], [f"{pre}_scores"])
        node("Where", ["allowed_grp", f"{pre}_scores", "c_mask_value"], [f"{pre}_masked"])
        node("Softmax", [f"{pre}_masked"], [f"{pre}_probs"], axis=-1)
        node("MatMul", [f"{pre}_probs", f"{pre}_v_grp"], [f"{pre}_ctx_grp"])  # [B, kv, g, S, hd]
        node("Reshape", [f"{pre}_ctx_grp", "c_heads_shape"], [f"{pre}_ctx_bhsd"])
        node("Transpose", [f"{pre}_ctx_bhsd"], [f"{pre}_ctx_bshd"], perm=[0, 2, 1, 3])
        node("Reshape", [f"{pre}_ctx_bshd", "c_merge_shape"], [f"{pre}_ctx"])
        linear(f"{pre}_ctx", f"{pre}.o", h_n * h_d, d, f"{pre}_o")
        x = node("Add", [x, f"{pre}_o"], [f"{pre}_x_attn"])

        h = norm(x, f"{pre}.ln2", f"{pre}_ln2")
        gate = linear(h, f"{pre}.gate", d, ff, f"{pre}_gate")
        up = linear(h, f"{pre}.up", d, ff, f"{pre}_up")
        node("Sigmoid", [gate], [f"{pre}_sig"])
        node("Mul", [gate, f"{pre}_sig"], [f"{pre}_silu"])
        node("Mul", [f"{pre}_silu", up], [f"{pre}_act"])
        linear(f"{pre}_act", f"{pre}.down", ff, d, f"{pre}_down")
        x = node("Add", [x, f"{pre}_down"], [f"{pre}_x_mlp"])

    norm(x, "lnf", "x_final")
    linear("x_final", "lm_head", d, v, "logits")

    inputs, outputs = interface(n_layers, kv_n, h_d, v)

    graph = helper.make_graph(nodes, f"bench_{shape}", inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    model.ir_version = 9
    # Parameters: two per packed int4 byte; the per-block scales are not counted.
    params = sum(
        0 if t.name.endswith(".scales") else int(np.prod(t.dims)) * (2 if t.name.endswith(".qweight") else 1)
        for t in inits
    )
    path = os.path.join(out_dir, "model.onnx")
    onnx.save_model(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    onnx.checker.check_model(path)
    return params


def write_tokenizer(vocab, out_dir):
    """The test model's tokenizer, padded with placeholder tokens up to `vocab` ids."""
    with open(os.path.join(HERE, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    base = len(tok["model"]["vocab"])
    taken = {t["id"] for t in tok["added_tokens"]}
    if base > vocab:
        raise SystemExit(f"the test tokenizer has {base} tokens, more than the vocabulary {vocab}")
    for i in range(base, vocab):
        if i not in taken:
            tok["added_tokens"].append(
                {
                    "id": i,
                    "content": f"<|bench_{i}|>",
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": False,
                }
            )
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)
    shutil.copy(os.path.join(HERE, "tokenizer_config.json"), out_dir)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-3b")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    started = time.time()
    c = SHAPES[args.shape]
    params = build(args.shape, args.out_dir)
    write_tokenizer(c["vocab_size"], args.out_dir)
    with open(os.path.join(HERE, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config.update(c)
    config["model_type"] = f"bench-{args.shape}"
    config["hidden_act"] = "silu"
    config["tie_word_embeddings"] = False
    with open(os.path.join(args.out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(args.out_dir, n)) for n in os.listdir(args.out_dir))
    print(
        f"{args.shape}: {params / 1e9:.3f} B parameters, {size / 1e6:.0f} MB in {args.out_dir} "
        f"({time.time() - started:.1f} s)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
