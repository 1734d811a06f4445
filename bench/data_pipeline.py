#!/usr/bin/env python3
"""Data pipeline throughput: `deberta preprocess` vs Python `tokenizers` encode_batch, and the
loader + masking rate on one core.

    make bench-data            # or: python3 bench/data_pipeline.py [--repeat 3]

Preprocess: the same files (the shared corpora, each --repeat times, ~35 MB by default) go
through (a) our whole `deberta preprocess` process (start-up, tokenizer load, read, tokenise on
all cores, write shards, sha256) and (b) HF's Python `tokenizers` doing the same minus the
writing: tokenizer load, reading and cutting the files into documents (blank-line separated,
lines joined by a space), `encode_batch` on batches of 512 documents (all cores). Prints MB/s of
input text for both and the ratio (target >= 1). Our fixed start-up (~0.4 s, mostly loading
libtorch, which the `deberta` binary links) weighs on small inputs only.

Loader: `deberta data bench` builds masked micro-batches (8 x 512) on one thread and reports
tokens/s (target >= 1M; one H100 at our goal consumes about 45k tokens/s).
"""
import argparse
import json
import os
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))
TOKENIZER = os.path.join(SHARED, "tokenizers", "deberta-v3-base", "tokenizer.json")
CORPORA = ["tinyshakespeare.txt", "wikitext2_valid.tokens.txt", "wikitext2_test.tokens.txt"]


def documents(path):
    docs, cur = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                if cur:
                    docs.append(" ".join(cur))
                    cur = []
            else:
                cur.append(line.rstrip())
    if cur:
        docs.append(" ".join(cur))
    return docs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--deberta", default=os.path.join(ROOT, "target", "release", "deberta"))
    a = ap.parse_args()
    files = [os.path.join(SHARED, "corpus", c) for c in CORPORA] * a.repeat
    mb = sum(os.path.getsize(f) for f in files) / 1e6
    workers = os.cpu_count()

    from tokenizers import Tokenizer, __version__
    t0 = time.perf_counter()
    tok = Tokenizer.from_file(TOKENIZER)
    docs = [d for f in files for d in documents(f)]
    n_tokens = 0
    for i in range(0, len(docs), 512):
        n_tokens += sum(len(e.ids) for e in tok.encode_batch(docs[i:i + 512], add_special_tokens=False))
    hf_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = subprocess.run([a.deberta, "preprocess", "--tokenizer", TOKENIZER, "--input", *files,
                              "--output-prefix", os.path.join(tmp, "c"), "--workers", str(workers)],
                             check=True, capture_output=True, text=True).stdout
        ours_s = time.perf_counter() - t0
        manifest = json.load(open(os.path.join(tmp, "c.manifest.json")))
        bench = subprocess.run([a.deberta, "data", "bench", os.path.join(tmp, "c"), "--seq-len", "512",
                                "--micro-batch", "8", "--batches", "300"],
                               check=True, capture_output=True, text=True).stdout
    assert manifest["tokens"] == n_tokens, (manifest["tokens"], n_tokens)
    hf = dict(system=f"python-tokenizers-{__version__} (load+read+encode_batch)", input_mb=round(mb, 2), seconds=round(hf_s, 3),
              mb_per_s=round(mb / hf_s, 2), tokens=n_tokens, workers=workers)
    ours = dict(system="deberta preprocess (process start+load+read+tokenise+write+sha256)", input_mb=round(mb, 2),
                seconds=round(ours_s, 3), mb_per_s=round(mb / ours_s, 2), tokens=manifest["tokens"], workers=workers)
    print(json.dumps(hf))
    print(json.dumps(ours))
    print(json.dumps(dict(preprocess_ratio_ours_over_hf=round(hf_s / ours_s, 3))))
    print(bench.strip())


if __name__ == "__main__":
    main()
