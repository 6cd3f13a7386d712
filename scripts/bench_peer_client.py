#!/usr/bin/env python3
"""Classifies with llama.cpp's own llama-server (prompt cache on), the way a peer user would,
for scripts/bench-peer: the task file's prompt rendered exactly as edgeact renders it
(src/task.rs render_prefix + render_query), label log-probabilities from /completion.

- Single-token labels (sentiment): one request per input, n_predict 1, n_probs 20, the
  labels' first tokens looked up in the top 20 (a label outside them gets -inf).
- Multi-token labels (banking77): one request per label token, prompt = text + the label's
  earlier token ids (llama-server takes mixed prompts), n_predict 1, the token forced with
  logit_bias; the server reports the sampled token's log-probability from the raw logits
  (post_sampling_probs off), so the sum over the label is log p(label | prompt). Checked:
  forcing the label text with a GBNF grammar instead (one request per label) does not work,
  greedy grammar sampling spells " refund" as " " + "refund", another tokenization.

Stdlib only. Prints one JSON object (rates, latencies, accuracy, checks) on stdout.
"""
import argparse
import json
import math
import statistics
import sys
import time
import tomllib
import urllib.request


def post(url, path, body):
    req = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def render(template, fields):
    """edgeact's Template: {name} placeholders, {{ and }} literal braces."""
    out, i = [], 0
    while i < len(template):
        c = template[i]
        if template.startswith("{{", i) or template.startswith("}}", i):
            out.append(c)
            i += 2
        elif c == "{":
            j = template.index("}", i)
            out.append(fields[template[i + 1 : j]])
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def load_task(path):
    with open(path, "rb") as f:
        t = tomllib.load(f)
    t.setdefault("separator", "\n\n")
    t.setdefault("score", "total")
    if t.get("use_chat_template"):
        sys.exit("bench_peer_client: chat-template tasks are not rendered here")
    texts = {l["name"]: l["text"] for l in t["labels"]}
    prefix = ""
    if t["instruction"]:
        prefix += t["instruction"] + t["separator"]
    for ex in t.get("examples", []):
        prefix += render(t["query"], ex) + texts[ex["label"]] + t["separator"]
    t["prefix"] = prefix
    return t


def tokenize(url, text, add_special, parse_special):
    body = {"content": text, "add_special": add_special, "parse_special": parse_special}
    return post(url, "/tokenize", body)["tokens"]


def pct(xs, q):
    s = sorted(xs)
    return s[round((len(s) - 1) * q)] if s else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=40)
    a = ap.parse_args()
    task = load_task(a.task)
    rows = [json.loads(l) for l in open(a.data, encoding="utf-8") if l.strip()][: a.limit]

    # Label tokens in context, as edgeact derives them: tokenize the end of a rendered
    # query with and without the label and take the tail.
    probe = render(task["query"], {"text": "x"})
    probe_toks = tokenize(a.url, probe, False, False)
    label_toks = {}
    for l in task["labels"]:
        with_l = tokenize(a.url, probe + l["text"], False, False)
        assert with_l[: len(probe_toks)] == probe_toks, l["name"]
        label_toks[l["name"]] = with_l[len(probe_toks) :]
    single = all(len(v) == 1 for v in label_toks.values())

    # The text prompt the server tokenizes in one piece, against edgeact's two pieces
    # (prefix with BOS and control tokens parsed, then the query without).
    prefix_toks = tokenize(a.url, task["prefix"], True, True)
    same_tokens = 0
    for r in rows:
        query = render(task["query"], r)
        whole = tokenize(a.url, task["prefix"] + query, True, True)
        same_tokens += whole == prefix_toks + tokenize(a.url, query, False, False)

    base = {"cache_prompt": True, "temperature": 0.0, "post_sampling_probs": False}
    # Warm-up (not timed): the prefix into the server's cache.
    post(a.url, "/completion", dict(base, prompt=task["prefix"], n_predict=1))

    lat_ms, correct, labeled, requests, prompt_n = [], 0, 0, 0, []
    started = time.perf_counter()
    for r in rows:
        prompt = task["prefix"] + render(task["query"], r)
        t0 = time.perf_counter()
        scores = {}
        if single:
            res = post(a.url, "/completion", dict(base, prompt=prompt, n_predict=1, n_probs=20))
            requests += 1
            prompt_n.append(res.get("timings", {}).get("prompt_n", -1))
            top = {p["id"]: p["logprob"] for p in res["completion_probabilities"][0]["top_logprobs"]}
            for name, toks in label_toks.items():
                scores[name] = top.get(toks[0], -math.inf)
        else:
            for name, toks in label_toks.items():
                # One request per label token: the prompt (text, then the label's earlier
                # tokens as ids) and that token forced by logit_bias; the server reports its
                # log-probability from the raw logits. The prompt cache keeps all but the
                # newest token, so each request decodes about one token.
                lps = []
                for i, tok in enumerate(toks):
                    res = post(
                        a.url,
                        "/completion",
                        dict(base, prompt=[prompt] + toks[:i], n_predict=1, n_probs=1,
                             logit_bias=[[tok, 1000.0]]),
                    )
                    requests += 1
                    prompt_n.append(res.get("timings", {}).get("prompt_n", -1))
                    p = res["completion_probabilities"][0]
                    assert p["id"] == tok, (name, i, p)
                    lps.append(p["logprob"])
                total = sum(lps)
                scores[name] = total / len(lps) if task["score"] == "mean" else total
        lat_ms.append((time.perf_counter() - t0) * 1e3)
        if "label" in r:
            labeled += 1
            correct += max(scores, key=scores.get) == r["label"]
    wall_s = time.perf_counter() - started
    print(json.dumps({
        "task": task.get("name", a.task),
        "labels": len(label_toks),
        "label_tokens": sum(len(v) for v in label_toks.values()),
        "inputs": len(rows),
        "requests": requests,
        "classif_per_s": len(rows) / wall_s,
        "p50_ms": pct(lat_ms, 0.5),
        "p99_ms": pct(lat_ms, 0.99),
        "accuracy": correct / labeled if labeled else None,
        "prefix_tokens": len(prefix_toks),
        "prompt_tokens_evaluated_per_request_median": statistics.median(prompt_n) if prompt_n else None,
        "same_tokens_as_edgeact": f"{same_tokens}/{len(rows)}",
    }))


if __name__ == "__main__":
    main()
