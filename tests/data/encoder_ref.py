#!/usr/bin/env python3
# Writes tests/data/encoder_ref.json: reference embeddings of all-MiniLM-L6-v2 for the
# encoder test, from a numpy BERT and the HF `tokenizers` package (independent of the Rust
# code). Usage: pip install numpy safetensors tokenizers;
#   python3 tests/data/encoder_ref.py models/all-MiniLM-L6-v2 tests/data/encoder_ref.json
import json, sys
import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer
d = sys.argv[1]
W = load_file(d + "/model.safetensors")
tok = Tokenizer.from_file(d + "/tokenizer.json")
tok.no_padding(); tok.enable_truncation(256)
def ln(x, w, b, eps=1e-12):
    m = x.mean(-1, keepdims=True); v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * w + b
def lin(x, p):
    return x @ W[p + ".weight"].T + W[p + ".bias"]
from math import erf
verf = np.vectorize(erf)
def gelu(x):
    return 0.5 * x * (1 + verf(x / np.sqrt(2)))
def embed(text):
    ids = tok.encode(text).ids
    n = len(ids)
    x = W["embeddings.word_embeddings.weight"][ids] + W["embeddings.position_embeddings.weight"][:n] + W["embeddings.token_type_embeddings.weight"][0]
    x = ln(x, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"])
    for l in range(6):
        p = "encoder.layer.%d." % l
        q = lin(x, p + "attention.self.query").reshape(n, 12, 32).transpose(1, 0, 2)
        k = lin(x, p + "attention.self.key").reshape(n, 12, 32).transpose(1, 0, 2)
        v = lin(x, p + "attention.self.value").reshape(n, 12, 32).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(32)
        s = np.exp(s - s.max(-1, keepdims=True)); s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(1, 0, 2).reshape(n, 384)
        x = ln(x + lin(a, p + "attention.output.dense"), W[p + "attention.output.LayerNorm.weight"], W[p + "attention.output.LayerNorm.bias"])
        h = gelu(lin(x, p + "intermediate.dense"))
        x = ln(x + lin(h, p + "output.dense"), W[p + "output.LayerNorm.weight"], W[p + "output.LayerNorm.bias"])
    e = x.mean(0)
    return ids, (e / np.linalg.norm(e)).tolist()
texts = [
    "My card was stolen yesterday, please block it!",
    "The café's crème brûlée was NAÏVE-ly good :)",
    "这家餐厅的服务很好，菜也好吃。",
    "Flooding reported on Main St. near 5th Ave; 3 cars stuck.",
    "unbelievablyextraordinarilyloooooongword and x" * 1,
    "Why hasn't my transfer (ref #A-1234) arrived yet???",
    " ".join(["word%d" % i for i in range(300)]),
]
out = []
for t in texts:
    ids, e = embed(t)
    out.append({"text": t, "ids": ids, "embedding": [round(v, 6) for v in e]})
json.dump({"model": "all-MiniLM-L6-v2", "by": "tests/data/encoder_ref.py (numpy BERT, HF tokenizers)", "cases": out}, open(sys.argv[2], "w"), ensure_ascii=False)
print([len(c["ids"]) for c in out])
