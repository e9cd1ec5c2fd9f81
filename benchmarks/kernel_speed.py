"""Benchmark (CUDA) or correctness smoke run (CPU interpreter) of the memory-attention kernel.

    python benchmarks/kernel_speed.py                     # CUDA: LongLLaMA-3B memory-layer shapes, do_bench
    TRITON_INTERPRET=1 python benchmarks/kernel_speed.py  # CPU: small shapes, max error vs the float64 reference
    python benchmarks/kernel_speed.py --crossbatch        # SDPA vs materialised mask for crossbatch training

On CUDA every row prints the Triton time next to fot's SDPA path (fot.attention.fused_memory_attention)
measured in the same run, with achieved TFLOP/s and GB/s; it never asserts a time.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from fot.attention import LocalKV, MemoryKV, fused_memory_attention, reference_memory_attention
from fot.kernels import load_memory_attention


def make(B, N, G, T, S, M, H, K, dtype, device, seed=0):
    """Random inputs; idx (if K) retrieves K distinct-ish slots per query, 10% of them -1."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    x = dict(q=randn(B, N, T, H), k_loc=randn(B, G, S, H), v_loc=randn(B, G, S, H),
             k_mem=randn(B, G, M, H), v_mem=randn(B, G, M, H),
             local_valid=None, mem_valid=(torch.rand(B, M, generator=g) > 0.05).to(device), idx=None)
    if K:
        idx = torch.randint(0, M, (B, N, T, K), generator=g, dtype=torch.int32)
        idx[torch.rand(B, N, T, K, generator=g) < 0.1] = -1
        x["idx"] = idx.to(device)
    return x


def roofline(B, N, G, T, S, M, H, K, itemsize):
    """(FLOPs, bytes) of one forward call: causal local part + memory part (dense M or K per query)."""
    local_pairs = B * N * (T * (S - T) + T * (T + 1) / 2)
    mem_pairs = B * N * T * (K if K else M)
    flops = 4 * H * (local_pairs + mem_pairs)
    io = B * (N * T * H * 2 + 2 * G * S * H) * itemsize  # q, out, local k/v
    io += (B * N * T * K * (2 * H * itemsize + 4)) if K else (2 * B * G * M * H * itemsize)
    return flops, io


def bench_cuda(args):
    import triton.testing

    ma = load_memory_attention()
    dtype = torch.bfloat16
    rows = [  # LongLLaMA-3B memory layer, one 2048-token window, batch 1
        ("dense M=8K", dict(B=1, N=32, G=32, T=2048, S=2048, M=8192, H=100, K=0)),
        ("dense M=32K", dict(B=1, N=32, G=32, T=2048, S=2048, M=32768, H=100, K=0)),
        ("top-128 of M=64K", dict(B=1, N=32, G=32, T=2048, S=2048, M=65536, H=100, K=128)),
        ("top-128 of M=1M", dict(B=1, N=32, G=32, T=2048, S=2048, M=1 << 20, H=100, K=128)),
        ("decode T=1 top-128", dict(B=8, N=32, G=32, T=1, S=2048, M=65536, H=100, K=128)),
    ]
    print(f"{'shape':<22}{'triton fwd ms':>14}{'TFLOP/s':>9}{'GB/s':>8}{'fwd+bwd ms':>12}{'sdpa fwd ms':>13}")
    for name, s in rows:
        x = make(**s, dtype=dtype, device="cuda")
        flops, io = roofline(**s, itemsize=2)
        fwd = triton.testing.do_bench(lambda: ma.memory_attention(**x))
        xg = {k: (v.requires_grad_(True) if k in ("q", "k_loc", "v_loc") else v) for k, v in x.items()}
        out = ma.memory_attention(**xg)
        dout = torch.randn_like(out)
        fb = triton.testing.do_bench(lambda: torch.autograd.grad(ma.memory_attention(**xg), [xg["q"]], dout))
        sdpa = float("nan")
        if not s["K"]:
            local = LocalKV(x["k_loc"], x["v_loc"], None)
            memory = MemoryKV(x["k_mem"], x["v_mem"], x["mem_valid"])
            sdpa = triton.testing.do_bench(lambda: fused_memory_attention(x["q"], local, memory))
        print(f"{name:<22}{fwd:>14.3f}{flops / fwd / 1e9:>9.1f}{io / fwd / 1e6:>8.0f}{fb:>12.3f}{sdpa:>13.3f}")


def check_small():
    """Interpreter/CPU: correctness on small odd shapes (the tests are the real check)."""
    ma = load_memory_attention()
    print(f"{'case':<40}{'max err vs fp64':>16}{'seconds':>9}")
    for name, s in [("dense T=17 S=113 M=257 H=20 GQA", dict(B=1, N=4, G=2, T=17, S=113, M=257, H=20, K=0)),
                    ("all-slot retrieval T=17 S=64 M=37", dict(B=1, N=4, G=2, T=17, S=64, M=37, H=20, K=0))]:
        x = make(**s, dtype=torch.float32, device="cpu")
        if name.startswith("all-slot"):  # every query retrieves every slot (shuffled): equals dense memory
            perm = torch.argsort(torch.rand(1, 4, 17, 37), dim=-1).to(torch.int32)
            x["idx"] = perm
        t0 = time.perf_counter()
        out = ma.memory_attention(**x)
        dt = time.perf_counter() - t0
        x64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in x.items()}
        ref = reference_memory_attention(x64["q"], LocalKV(x64["k_loc"], x64["v_loc"], None),
                                         MemoryKV(x64["k_mem"], x64["v_mem"], x64["mem_valid"]))
        print(f"{name:<40}{(out.double() - ref).abs().max().item():>16.2e}{dt:>9.2f}")


def crossbatch_cpu(T=512, C=1536, N=4, H=64, reps=5):
    """Crossbatch attention on CPU: Q = local [T], KV = [C additional-context keys ; T local keys]."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    torch.manual_seed(0)
    q = torch.randn(1, N, T, H, requires_grad=True)
    k = torch.randn(1, N, C + T, H, requires_grad=True)
    v = torch.randn(1, N, C + T, H, requires_grad=True)
    visible = torch.arange(C + T)[None, :] <= (C + torch.arange(T))[:, None]
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(H)
    ref = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ v.double()
    variants = {
        "sdpa, materialised bool mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=visible),
        "sdpa, causal_lower_right bias": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_lower_right(T, C + T)),
    }
    print(f"crossbatch T={T} C={C} N={N} H={H} fp32 CPU ({torch.get_num_threads()} threads)")
    print(f"{'variant':<32}{'max err vs fp64':>16}{'fwd ms':>9}{'fwd+bwd ms':>12}")
    for name, fn in variants.items():
        err = (fn().double() - ref).abs().max().item()
        times = []
        for with_bwd in (False, True):
            fn() if not with_bwd else fn().sum().backward()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn() if not with_bwd else fn().sum().backward()
            times.append((time.perf_counter() - t0) / reps * 1e3)
        print(f"{name:<32}{err:>16.2e}{times[0]:>9.1f}{times[1]:>12.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crossbatch", action="store_true", help="measure the crossbatch attention options")
    args = parser.parse_args()
    if args.crossbatch:
        crossbatch_cpu()
        return
    ma = load_memory_attention()
    if torch.cuda.is_available() and not ma.INTERPRET:
        bench_cuda(args)
    elif ma.unavailable_reason("cpu") is None:
        check_small()
    else:
        sys.exit(f"nothing to run: {ma.unavailable_reason('cpu')}")


if __name__ == "__main__":
    main()
