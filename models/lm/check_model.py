#!/usr/bin/env python3
"""Checks model.onnx against reference.json with onnxruntime.

1. Per prompt, KV-cache decoding: the first call feeds the whole prompt with a
   zero-length past, then one token per step with present -> past.  The greedy ids
   must equal the reference exactly and the first/last step logits must be within
   1e-4 of the numpy reference.
2. All prompts at once as one LEFT-padded batch (attention_mask, position_ids =
   cumsum(mask) - 1 clipped at 0): same greedy ids per prompt, same tolerance on
   logits, and no NaN/Inf anywhere (padded rows are fully masked).

Exits non-zero on any mismatch.

Usage:  python3 models/lm/check_model.py [MODEL_DIR]
"""

import json
import os
import sys

import numpy as np

TOL = 1e-4


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


class Session:
    def __init__(self, model_dir):
        import onnxruntime as ort

        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            self.cfg = json.load(f)
        self.sess = ort.InferenceSession(
            os.path.join(model_dir, "model.onnx"), providers=["CPUExecutionProvider"]
        )
        self.n_layers = self.cfg["num_hidden_layers"]

    def empty_past(self, batch):
        c = self.cfg
        z = np.zeros((batch, c["num_attention_heads"], 0, c["head_dim"]), dtype=np.float32)
        return {
            f"past_key_values.{i}.{kind}": z for i in range(self.n_layers) for kind in ("key", "value")
        }

    def step(self, input_ids, attention_mask, position_ids, past):
        feed = {
            "input_ids": np.asarray(input_ids, dtype=np.int64),
            "attention_mask": np.asarray(attention_mask, dtype=np.int64),
            "position_ids": np.asarray(position_ids, dtype=np.int64),
            **past,
        }
        outs = self.sess.run(None, feed)
        names = [o.name for o in self.sess.get_outputs()]
        res = dict(zip(names, outs))
        present = {
            f"past_key_values.{i}.{kind}": res[f"present.{i}.{kind}"]
            for i in range(self.n_layers)
            for kind in ("key", "value")
        }
        return res["logits"], present


def greedy_batch(s, prompts, max_new, eos=None):
    """Left-padded greedy decoding with KV cache.  Returns (ids per row, logits per step [B, V])."""
    b = len(prompts)
    width = max(len(p) for p in prompts)
    ids = np.zeros((b, width), dtype=np.int64)
    mask = np.zeros((b, width), dtype=np.int64)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = p
        mask[r, width - len(p):] = 1
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    past = s.empty_past(b)
    gen = [[] for _ in range(b)]
    done = [False] * b
    step_logits = []
    cur_ids, cur_pos = ids, pos
    for _ in range(max_new):
        logits, past = s.step(cur_ids, mask, cur_pos, past)
        if not np.all(np.isfinite(logits)):
            fail("non-finite logits")
        last = logits[:, -1, :]
        step_logits.append(last)
        nxt = last.argmax(axis=-1)
        for r in range(b):
            if not done[r]:
                gen[r].append(int(nxt[r]))
                if eos is not None and int(nxt[r]) in eos:
                    done[r] = True
        if all(done):
            break
        cur_ids = nxt[:, None].astype(np.int64)
        cur_pos = cur_pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], axis=1)
    return gen, step_logits


def main(argv):
    model_dir = argv[0] if argv else os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(model_dir, "reference.json"), encoding="utf-8") as f:
        ref = json.load(f)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    s = Session(model_dir)
    eos = set(ref["eos_token_id"])
    max_new = ref["max_new_tokens"]

    # Interface.
    want_in = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{k}" for i in range(s.n_layers) for k in ("key", "value")
    ]
    want_out = ["logits"] + [f"present.{i}.{k}" for i in range(s.n_layers) for k in ("key", "value")]
    if [i.name for i in s.sess.get_inputs()] != want_in:
        fail(f"inputs {[i.name for i in s.sess.get_inputs()]}")
    if [o.name for o in s.sess.get_outputs()] != want_out:
        fail(f"outputs {[o.name for o in s.sess.get_outputs()]}")

    max_diff = 0.0
    for n, item in enumerate(ref["prompts"]):
        ids = tok.encode(item["text"], add_special_tokens=False).ids
        if ids != item["input_ids"]:
            fail(f"prompt {n}: tokenizer ids differ from reference")
        gen, logits = greedy_batch(s, [ids], max_new, eos)
        if gen[0] != item["generated_ids"]:
            fail(f"prompt {n}: greedy ids {gen[0]} != reference {item['generated_ids']}")
        for got, key in ((logits[0][0], "first_step_logits"), (logits[-1][0], "last_step_logits")):
            d = float(np.max(np.abs(got - np.asarray(item[key], dtype=np.float32))))
            max_diff = max(max_diff, d)
            if not d <= TOL:
                fail(f"prompt {n}: {key} max abs diff {d:.3g} > {TOL}")
    print(f"KV-cache decoding: {len(ref['prompts'])} prompts, greedy ids equal, max abs logit diff {max_diff:.3g}")

    prompts = [it["input_ids"] for it in ref["prompts"]]
    gen, logits = greedy_batch(s, prompts, max_new, eos)
    bmax = 0.0
    for n, item in enumerate(ref["prompts"]):
        if gen[n] != item["generated_ids"]:
            fail(f"left-padded batch, prompt {n}: greedy ids {gen[n]} != reference {item['generated_ids']}")
        steps = len(item["generated_ids"])
        for got, key in ((logits[0][n], "first_step_logits"), (logits[steps - 1][n], "last_step_logits")):
            d = float(np.max(np.abs(got - np.asarray(item[key], dtype=np.float32))))
            bmax = max(bmax, d)
            if not d <= TOL:
                fail(f"left-padded batch, prompt {n}: {key} max abs diff {d:.3g} > {TOL}")
    print(f"left-padded batch of {len(prompts)}: greedy ids equal, max abs logit diff {bmax:.3g}")
    print("OK")


if __name__ == "__main__":
    main(sys.argv[1:])
