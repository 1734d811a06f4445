#!/usr/bin/env python3
"""What ptxas makes of the fused attention kernels for the H100 (sm_90), without a GPU.

    python3 cluster/kernel-stats.py [--base REV] [--head-dim 64] [--ops KERNEL] [--define NAME] [--dropout]

Compiles model/src/kernels/disentangled_attention.cu (after bf16.cuh) as the worker does
(NVRTC from the venv's nvidia wheel, then torch's ptxas), disassembles it (cuobjdump from the triton wheel torch
depends on) and prints per kernel: registers, spilled bytes, and the static instructions of one
key or query tile (the body of the kernel's tile loop, plus a second pass of the backward's
`unroll 1` loop over the tile's two 32-column halves), with the counts of the instructions that
matter most. The score loops are issue-bound, so fewer instructions per tile is the CPU's best
proxy for speed; only a GPU run (cluster/gpu-bench.sh) says what a change is worth. --base REV
prints the same for the kernel source at git revision REV, and the change. --define NAME adds -DNAME (PHASE_TIMING: the
build kernel-check times the kernels' phases with). --ops KERNEL prints
every opcode of that kernel's tile with its count (with --base, beside the base's), the most
frequent first: where a tile's instructions go (`IMAD.U32` by 0x10000 is a bf16 widened to fp32,
`IMAD.MOV` a register move, `F2FP` a pair rounded to bf16).

`smem` is the tile's shared-memory wavefronts: the cycles of the SM's shared memory (128 bytes a
clock, shared by its four schedulers) that the tile's loads and stores take at the least, bank
conflicts not counted: an `ldmatrix` .x4 (512 bytes) 4, a 32-bit `LDS`/`STS` 1, a 16-bit one 1
too (half a wavefront's bytes), .64 2, .128 4, a 16-byte `cp.async` (`LDGSTS.128`, its write) 4;
never-executed padding (`@!PT LDS RZ, [RZ]`) none. Four warps, one per scheduler, each issue
their tile's instructions while the shared memory serves all four tiles' wavefronts, so a tile
costs the SM at least max(instructions / 4, smem) clocks: for the attention kernels smem is the
larger (the eleventh session's measured kernel times were ~1.6-2.1 times smem, 2.1-3.3 times
instructions / 4; docs/performance.md). The score loops branch on
`p_drop > 0` inside the tile, so a tile's body holds both copies of that loop; --dropout
compiles the branch as always taken (in both revisions), so the counts are the training path's
(its registers and spills are that build's, not the worker's: the occupancy tests check those).
"""
import argparse
import collections
import ctypes
import os
import re
import subprocess
import sys
import tempfile

KERNELS = ["dattn_fwd", "dattn_fwd_rel", "dattn_bwd_kv", "dattn_bwd_kv_rel", "dattn_bwd_q", "dattn_bwd_q_rel",
           "dattn_bwd_q_ds", "dattn_bwd_v_ds", "dattn_bwd_k_ds",  # dattn_bwd_q_rel: until 2026-11-27
           "dattn_bwd_kv_rel_diag", "dattn_bwd_q_ds_diag", "dattn_bwd_k_ds_diag", "dattn_table_grads",  # since the sixteenth session
           "dattn_bwd_kv_rel_lean",  # since the seventeenth
           "dattn_fwd_rel_wg",  # since the twentieth, with --sm90a
           "dattn_bwd_kv_rel_lean_wg", "dattn_bwd_q_ds_diag_wg", "dattn_table_grads_wg",
           "dattn_fwd_rel_wgb"]  # since the twenty-first, with --sm90a
SHOWN = ["HMMA", "LDSM", "LDS", "STS", "MUFU", "IMAD", "BRA"]


def wavefronts(op):
    """Shared-memory wavefronts of one warp's instruction `op` (with its modifiers), at the least."""
    name = op.split(".")[0]
    if name == "LDSM":  # ldmatrix: 128 bytes per 8 x 8 matrix
        return 4 if op.endswith(".4") else 2 if op.endswith(".2") else 1
    if name in ("LDS", "STS", "LDGSTS", "ATOMS"):
        return 4 if ".128" in op else 2 if ".64" in op else 1
    m = re.match(r"HGMMA\.64x(\d+)x16", op)
    if m:  # wgmma's B (16 x N bf16) from shared memory, once per warpgroup: a quarter per warp;
        # with A from shared memory too (`.SS`, marked by `stats`), A's 64 x 16 as well
        return (16 * int(m.group(1)) * 2 + (64 * 16 * 2 if op.endswith(".SS") else 0)) // 128 / 4
    return 0


def tools():
    import torch  # the project venv's (cluster/env.sh puts it first on PATH)

    site = os.path.dirname(os.path.dirname(torch.__file__))
    nvrtc = os.path.join(site, "nvidia", "cu13", "lib", "libnvrtc.so.13")
    ptxas = os.environ.get("DEBERTA_PTXAS", os.path.join(os.path.dirname(torch.__file__), "bin", "ptxas"))
    cuobjdump = os.path.join(site, "triton", "backends", "nvidia", "bin", "cuobjdump")
    for path in (nvrtc, ptxas, cuobjdump):
        if not os.path.exists(path):
            sys.exit(f"kernel-stats: {path} not found (torch 2.11 with its CUDA wheels and triton)")
    return nvrtc, ptxas, cuobjdump


def ptx_of(source, nvrtc, head_dim, defines=(), arch="compute_90"):
    lib = ctypes.CDLL(nvrtc)
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"disentangled_attention.cu", 0, None, None):
        sys.exit("kernel-stats: nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}".encode(), f"-DHEAD_DIM={head_dim}".encode(), b"--std=c++17"]
    opts += [f"-D{d}".encode() for d in defines]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc:
        sys.exit(f"kernel-stats: NVRTC failed:\n{log.value.decode()}")
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    return ptx.value


def stats(source, head_dim, defines=(), sm90a=False):
    nvrtc, ptxas, cuobjdump = tools()
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "k.ptx"), "wb") as f:
            f.write(ptx_of(source, nvrtc, head_dim, defines, "compute_90a" if sm90a else "compute_90"))
        log = subprocess.run([ptxas, "-arch=sm_90a" if sm90a else "-arch=sm_90", "-v", "k.ptx", "-o", "k.cubin"],
                             cwd=d, capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([cuobjdump, "-sass", "k.cubin"], cwd=d, capture_output=True, text=True,
                              check=True).stdout
    regs, name = {}, None
    for line in log.splitlines():
        m = re.search(r"entry function '(\w+)'", line)
        if m:
            name, spill = m.group(1), 0
        m = re.search(r"(\d+) bytes spill stores", line)
        if m:
            spill = int(m.group(1))
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            regs[name] = (int(m.group(1)), spill)
    code, fn = collections.defaultdict(list), None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\w+)", line)
        if m:
            fn = m.group(1)
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s*(.*?);", line)
        if m and fn:
            text = m.group(2).strip()
            if text.startswith("@!PT "):
                text = "NEVER " + text[5:]  # ptxas's padding: issued, never executed
            code[fn].append((int(m.group(1), 16), re.sub(r"^@!?U?P\w+\s+", "", text)))
    out = {}
    for k in KERNELS:
        ins = code[k]
        if not ins:
            continue  # not in this revision
        # Loops are backward branches; the tile loop is the outermost (largest) one.
        loops = sorted(((int(m.group(1), 16), a) for a, t in ins
                        for m in [re.search(r"BRA(?:\.\w+)* (0x[0-9a-f]+)", t)] if m and int(m.group(1), 16) < a),
                       key=lambda l: l[0] - l[1])
        outer = loops[0]
        inner = [l for l in loops[1:] if l[1] - l[0] > 0x1000 and outer[0] <= l[0] and l[1] <= outer[1]]
        body = [t for a, t in ins if outer[0] <= a <= outer[1]]
        if k.startswith("dattn_bwd") and inner:
            body += [t for a, t in ins if inner[0][0] <= a <= inner[0][1]]
        ops = collections.Counter(t.split()[0].split(".")[0] for t in body)
        # With the modifiers; a wgmma reading A from shared memory (its second operand a
        # descriptor, not registers) marked `.SS`.
        full = collections.Counter(t.split()[0] + (".SS" if re.match(r"HGMMA\S*\s+\S+,\s*gdesc", t) else "")
                                   for t in body)
        smem = round(sum(wavefronts(op) * c for op, c in full.items()))
        out[k] = (regs[k], len(body), ops, full, smem)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="also the kernel source at this git revision")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--ops", metavar="KERNEL", help="every opcode of this kernel's tile, counted")
    ap.add_argument("--dropout", action="store_true",
                    help="count the training path: the kernels' `p_drop > 0` branches compiled as taken")
    ap.add_argument("--sm90a", action="store_true",
                    help="compile for sm_90a (the build DEBERTA_WGMMA loads): adds the wgmma kernels (_wg, _wgb)")
    ap.add_argument("--define", action="append", default=[], metavar="NAME",
                    help="compile with -DNAME too (e.g. PHASE_TIMING, kernel-check's timed build)")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # The source as the worker compiles it: the shared bf16 helpers, then the kernels (before
    # the helpers had their own file, the kernel file alone).
    files = ["model/src/kernels/bf16.cuh", "model/src/kernels/wgmma.cuh", "model/src/kernels/disentangled_attention.cu"]

    def source(parts):
        text = "".join(parts)
        if not args.dropout:
            return text
        taken, n = re.subn(r"\bif \(p_drop > 0\.f\) \{", "if (true) {", text)
        if n == 0:
            sys.exit("kernel-stats: --dropout found no `if (p_drop > 0.f) {` to take")
        return taken

    now = stats(source(open(os.path.join(root, f)).read() for f in files), args.head_dim, args.define, args.sm90a)
    base = None
    if args.base:
        parts = []
        for f in files:
            src = subprocess.run(["git", "show", f"{args.base}:{f}"], cwd=root, capture_output=True, text=True)
            if src.returncode and f.endswith(".cu"):
                sys.exit(f"kernel-stats: git show {args.base}:{f}: {src.stderr.strip()}")
            parts.append(src.stdout if src.returncode == 0 else "")
        base = stats(source(parts), args.head_dim, args.define, args.sm90a)
    print(f"sm_90, head size {args.head_dim}; static instructions per tile (the tile loop's body"
          + (", dropout's branches taken)" if args.dropout else ")"))
    print(f"{'kernel':<22} {'regs':>4} {'spill':>5} {'per tile':>8} {'smem':>5}  " + " ".join(f"{o:>5}" for o in SHOWN)
          + ("   base: regs spill per tile  change  smem  change" if base else ""))
    for k in (k for k in KERNELS if k in now):
        (r, s), n, ops, _, w = now[k]
        line = f"{k:<22} {r:>4} {s:>5} {n:>8} {w:>5}  " + " ".join(f"{ops[o]:>5}" for o in SHOWN)
        if base and k in base:
            (br, bs), bn, _, _, bw = base[k]
            line += (f"   {br:>10} {bs:>5} {bn:>8}  {100.0 * (n - bn) / bn:+6.1f}%"
                     f" {bw:>5} {100.0 * (w - bw) / bw:+6.1f}%")
        print(line)
    if args.ops:
        if args.ops not in now:
            sys.exit(f"kernel-stats: no kernel {args.ops} (one of {', '.join(k for k in KERNELS if k in now)})")
        full = now[args.ops][3]
        was = base[args.ops][3] if base and args.ops in base else None
        print(f"\n{args.ops}: opcodes per tile" + (" (now, base)" if was is not None else ""))
        for op, c in sorted(full.items(), key=lambda x: (-x[1], x[0])):
            print(f"  {op:<24} {c:>5}" + (f" {was[op]:>5}" if was is not None else ""))


if __name__ == "__main__":
    main()
