#!/usr/bin/env python3
"""CPU forward pass: ours vs HF transformers' eager DebertaV2Model, same preset, same run.

    make bench-cpu-forward          # or: python3 bench/cpu_forward_vs_hf.py --preset base --batch 4 --seq 128

Both sides: random init, eval mode, fp32, no grad, random ids, the same libtorch (the venv's
torch 2.11.0) with the same thread count; median time over --iters after --warmup. HF's model
is built with the peer baseline's own config() (../shared/bench/hf_deberta_baseline.py), so both
run the v2 architecture (disentangled attention, 256 buckets, shared key, conv). Prints one JSON
line per system and the ratio (ours tokens/s / HF tokens/s; target >= 1).
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = os.path.join(ROOT, "..", "shared", "bench", "hf_deberta_baseline.py")


def load_baseline():
    spec = importlib.util.spec_from_file_location("hf_deberta_baseline", BASELINE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def hf_forward(preset, batch, seq, iters, warmup):
    from transformers import DebertaV2Model, __version__
    base = load_baseline()
    torch.manual_seed(0)
    model = DebertaV2Model(base.config(preset)).eval()
    ids = torch.randint(5, model.config.vocab_size, (batch, seq))
    mask = torch.ones_like(ids)
    times = []
    with torch.no_grad():
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask).last_hidden_state.sum().item()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return dict(system=f"hf-transformers-{__version__}-eager", model=f"preset {preset}", batch=batch, seq=seq,
                threads=torch.get_num_threads(), forward_s=round(step, 4),
                tokens_per_s=round(batch * seq / step, 1))


def ours_forward(binary, preset, batch, seq, iters, warmup):
    out = subprocess.run([binary, "bench-forward", "--preset", preset, "--batch", str(batch), "--seq", str(seq),
                          "--iters", str(iters), "--warmup", str(warmup)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="base")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--deberta", default=os.path.join(ROOT, "target", "release", "deberta"))
    a = ap.parse_args()
    # Interleave so that machine noise hits both sides alike.
    hf1 = hf_forward(a.preset, a.batch, a.seq, a.iters, a.warmup)
    ours1 = ours_forward(a.deberta, a.preset, a.batch, a.seq, a.iters, a.warmup)
    hf2 = hf_forward(a.preset, a.batch, a.seq, a.iters, a.warmup)
    ours2 = ours_forward(a.deberta, a.preset, a.batch, a.seq, a.iters, a.warmup)
    hf = max(hf1, hf2, key=lambda r: r["tokens_per_s"])
    ours = max(ours1, ours2, key=lambda r: r["tokens_per_s"])
    print(json.dumps(hf))
    print(json.dumps(ours))
    print(json.dumps(dict(ratio_ours_over_hf=round(ours["tokens_per_s"] / hf["tokens_per_s"], 3),
                          runs_tokens_per_s=dict(hf=[hf1["tokens_per_s"], hf2["tokens_per_s"]],
                                                 ours=[ours1["tokens_per_s"], ours2["tokens_per_s"]]))))


if __name__ == "__main__":
    main()
