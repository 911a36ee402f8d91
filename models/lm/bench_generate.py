#!/usr/bin/env python3
"""Python onnxruntime baseline for greedy generation with the KV-cache model.

Prompts come from ``--input FILE.jsonl`` (lines ``{"custom_id": ..., "input": ...}``;
``input`` is the raw prompt text, no chat template), cycled if the file has fewer
than ``--prompts`` lines; without ``--input`` the lines of corpus.txt beside this
script are used.  Items are decoded greedily in static batches of ``--batch``
(left padding, attention mask, position_ids = cumsum(mask) - 1 clipped at 0, KV
cache), ignoring stop tokens, so every item gets exactly ``--max-new-tokens`` new
tokens.  Prompts longer than max_position_embeddings - max_new_tokens keep their
last tokens; an empty prompt becomes the single pad token.

Prints one JSON line:
  {"batch": B, "items": N, "new_tokens": N*T, "seconds": S, "tokens_per_s": N*T/S}
where S is the wall time of decoding only (no session creation, no tokenization).

Usage:  python3 models/lm/bench_generate.py --model-dir models/lm --batch 8 \\
            --prompts 64 --max-new-tokens 32 --input prompts.jsonl
"""

import argparse
import json
import os
import sys
import time

import numpy as np


def load_prompts(path, n, here):
    texts = []
    if path:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    texts.append(json.loads(line)["input"])
    else:
        with open(os.path.join(here, "corpus.txt"), encoding="utf-8") as f:
            texts = [ln.rstrip("\n") for ln in f if ln.strip()]
    if not texts:
        sys.exit("no prompts")
    return [texts[i % len(texts)] for i in range(n)]


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description="greedy generation baseline (onnxruntime, CPU)")
    ap.add_argument("--model-dir", default=here)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--input", help="JSONL with {custom_id, input} lines")
    args = ap.parse_args()
    if args.batch < 1 or args.prompts < 1 or args.max_new_tokens < 1:
        sys.exit("--batch, --prompts and --max-new-tokens must be >= 1")

    import onnxruntime as ort
    from tokenizers import Tokenizer

    with open(os.path.join(args.model_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    tok = Tokenizer.from_file(os.path.join(args.model_dir, "tokenizer.json"))
    sess = ort.InferenceSession(
        os.path.join(args.model_dir, "model.onnx"), providers=["CPUExecutionProvider"]
    )
    out_names = [o.name for o in sess.get_outputs()]
    n_layers, heads, head_dim = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["head_dim"]
    pad = cfg["pad_token_id"]
    max_prompt = cfg["max_position_embeddings"] - args.max_new_tokens
    if max_prompt < 1:
        sys.exit("--max-new-tokens exceeds max_position_embeddings")

    texts = load_prompts(args.input, args.prompts, here)
    encoded = []
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False).ids[-max_prompt:]
        encoded.append(ids or [pad])

    # Pre-build the padded batches so that only decoding is timed.
    batches = []
    for start in range(0, len(encoded), args.batch):
        rows = encoded[start:start + args.batch]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
        batches.append((ids, mask))

    new_tokens = 0
    t0 = time.perf_counter()
    for ids, mask in batches:
        b = ids.shape[0]
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        empty = np.zeros((b, heads, 0, head_dim), dtype=np.float32)
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        for i in range(n_layers):
            feed[f"past_key_values.{i}.key"] = empty
            feed[f"past_key_values.{i}.value"] = empty
        for step in range(args.max_new_tokens):
            res = dict(zip(out_names, sess.run(None, feed)))
            nxt = res["logits"][:, -1, :].argmax(axis=-1).astype(np.int64)[:, None]
            new_tokens += b
            if step + 1 == args.max_new_tokens:
                break
            mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], axis=1)
            feed = {
                "input_ids": nxt,
                "attention_mask": mask,
                "position_ids": feed["position_ids"][:, -1:] + 1,
            }
            for i in range(n_layers):
                feed[f"past_key_values.{i}.key"] = res[f"present.{i}.key"]
                feed[f"past_key_values.{i}.value"] = res[f"present.{i}.value"]
    seconds = time.perf_counter() - t0

    print(
        json.dumps(
            {
                "batch": args.batch,
                "items": len(encoded),
                "new_tokens": new_tokens,
                "seconds": round(seconds, 6),
                "tokens_per_s": round(new_tokens / seconds, 3) if seconds > 0 else None,
            }
        )
    )


if __name__ == "__main__":
    main()
