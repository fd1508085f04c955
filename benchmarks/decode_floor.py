"""How fast can a B=1 decode step of this model shape get? Persistent kernel vs a graph of launches.

The B=1 goal of issue 7 (a quarter of the HBM bound) leaves 0.23 ms for a step of SmolLM2-135M's
30 layers on an H200. The step is a chain of small dependent products; today each is a cuBLAS launch
replayed in a CUDA graph. This measures the alternative, one persistent Triton kernel (one program per
SM) that walks the whole chain and separates its phases with a grid-wide barrier, on the four
products of every layer (qkv + gates, out, gate·up, down; no attention, norms or activations: the
floor below any full step). Rows, all in one run, timed in CUDA graphs (median):

- ``graph``: the chain as one cuBLAS product per phase (bf16), the named baseline;
- ``launched``: one Triton matrix-vector launch per phase (``_matvec``), per rows-per-program;
- ``launched_pdl``: the same with programmatic dependent launch: each product's weights load while the
  product before it still runs, and only the activation read waits for it;
- ``persistent``: the same chain in one persistent kernel, per program-count and warp choice;
- ``persistent_prefetch``: a persistent kernel in which each program holds a fixed share of every phase's
  rows and loads the next phase's weights before it waits at the barrier (the overlap PDL gives launches);
- ``barriers``: the persistent kernel with no products (what the phases' barriers alone cost);
- ``launches``: one empty kernel per phase in the graph (what a launch alone costs).

Each gives µs per step, the fraction of the HBM bound of the chain's weight bytes, and ratio =
graph time / its time. The persistent chain is checked against an fp32 PyTorch chain first.

    python benchmarks/decode_floor.py --hbm-tb-s 4.8 --out decode_floor.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _arrive(counter):
    tl.debug_barrier()  # all of this program's stores are issued before it arrives
    tl.atomic_add(counter, 1, sem="release", scope="gpu")


@triton.jit
def _wait(counter, target):
    seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _grid_sync(counter, target):
    """Wait until every program has arrived ``target`` counts in all; stores before it are visible after."""
    _arrive(counter)
    _wait(counter, target)


@triton.jit
def _chain(
    w, x, counter, w_offsets, n_rows, k_cols, y_offsets, PHASES, P,
    BN: tl.constexpr, BK: tl.constexpr, WORK: tl.constexpr,
):
    """Phase p: y_p[n] = Σ_k W_p[n, k] y_{p-1}[k] (y_{-1} = x), rows in BN-blocks strided over the P programs,
    columns in BK-blocks.

    Activations are fp32 in one buffer, each phase its own slice, read with .cg (past L1, which is not
    coherent across SMs). Without WORK only the barriers run.
    """
    pid = tl.program_id(0)
    o_b = tl.arange(0, BN)
    o_k = tl.arange(0, BK)
    for p in range(PHASES):
        if WORK:
            N = tl.load(n_rows + p)
            K = tl.load(k_cols + p)
            w_p = w + tl.load(w_offsets + p)
            x_p = x + tl.load(y_offsets + p)  # the previous phase's output (slot 0 holds the input)
            y_p = x + tl.load(y_offsets + p + 1)
            for nb in range(pid, tl.cdiv(N, BN), P):
                rows = nb * BN + o_b
                acc = tl.zeros([BN, BK], tl.float32)
                for k0 in range(0, K, BK):
                    cols = k0 + o_k
                    xk = tl.load(x_p + cols, mask=cols < K, other=0.0, cache_modifier=".cg")
                    tile = tl.load(w_p + rows[:, None] * K + cols[None, :],
                                   mask=(rows[:, None] < N) & (cols[None, :] < K), other=0.0)
                    acc += tile.to(tl.float32) * xk[None, :]
                tl.store(y_p + rows, tl.sum(acc, 1), mask=rows < N)
        _grid_sync(counter, (p + 1) * P)


@triton.jit
def _rows(N, R: tl.constexpr, BN: tl.constexpr):
    """This program's R consecutive rows of an N-row phase, in a BN-row tile, and which are live."""
    o = tl.arange(0, BN)
    rows = tl.program_id(0) * R + o
    return rows, (o < R) & (rows < N)


@triton.jit
def _tile(w, rows, live, KA: tl.constexpr, KB: tl.constexpr):
    """Rows ``rows`` of a row-major (N, KA + KB) matrix as two column blocks (the K of the chain's products
    are not powers of two: 576 = 512 + 64, 1536 = 1024 + 512)."""
    base = w + rows[:, None] * (KA + KB)
    a = tl.load(base + tl.arange(0, KA)[None, :], mask=live[:, None], other=0.0)
    b = tl.load(base + KA + tl.arange(0, KB)[None, :], mask=live[:, None], other=0.0)
    return a, b


@triton.jit
def _rows_times(a, b, x, y, rows, live, KA: tl.constexpr, KB: tl.constexpr):
    """y[rows] = [a b] · x[:KA + KB], x read past L1 (written by other programs)."""
    xa = tl.load(x + tl.arange(0, KA), cache_modifier=".cg")
    xb = tl.load(x + KA + tl.arange(0, KB), cache_modifier=".cg")
    out = tl.sum(a.to(tl.float32) * xa[None, :], 1) + tl.sum(b.to(tl.float32) * xb[None, :], 1)
    tl.store(y + rows, out, mask=live)


@triton.jit
def _prefetched_chain(
    w, x, counter, LAYERS, P,
    N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, N3: tl.constexpr,
    R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr,
    BN0: tl.constexpr, BN1: tl.constexpr, BN2: tl.constexpr, BN3: tl.constexpr,
    KA: tl.constexpr, KB: tl.constexpr, IA: tl.constexpr, IB: tl.constexpr,
):
    """The chain of layer_shapes' four products per layer, each program holding R_j consecutive rows of
    phase j, that loads the next phase's weight rows before it waits for this phase's input: the weight
    stream of phase j + 1 overlaps the barrier and products of phase j.

    Hidden size KA + KB (the first three products' K and the last's N), intermediate IA + IB (the last's K).
    Activations in x as in Chain (slot 0 the input, then each phase's output in order); one counter
    counts arrivals over the whole chain, so phase p of the chain waits for p·P of them.
    """
    H: tl.constexpr = KA + KB
    W1: tl.constexpr = N0 * H
    W2: tl.constexpr = W1 + N1 * H
    W3: tl.constexpr = W2 + N2 * H
    WL: tl.constexpr = W3 + N3 * (IA + IB)  # weights of a layer
    SL: tl.constexpr = N0 + N1 + N2 + N3  # activations of a layer
    r0, l0 = _rows(N0, R0, BN0)
    r1, l1 = _rows(N1, R1, BN1)
    r2, l2 = _rows(N2, R2, BN2)
    r3, l3 = _rows(N3, R3, BN3)
    a0, b0 = _tile(w, r0, l0, KA, KB)
    for layer in range(LAYERS):
        wl = w + layer * WL
        y = x + H + layer * SL  # this layer's outputs; its input, y - H, is the layer before's down output
        phase = 4 * layer
        a1, b1 = _tile(wl + W1, r1, l1, KA, KB)
        _wait(counter, phase * P)
        _rows_times(a0, b0, y - H, y, r0, l0, KA, KB)
        _arrive(counter)
        a2, b2 = _tile(wl + W2, r2, l2, KA, KB)
        _wait(counter, (phase + 1) * P)
        _rows_times(a1, b1, y, y + N0, r1, l1, KA, KB)
        _arrive(counter)
        a3, b3 = _tile(wl + W3, r3, l3, IA, IB)
        _wait(counter, (phase + 2) * P)
        _rows_times(a2, b2, y + N0, y + N0 + N1, r2, l2, KA, KB)
        _arrive(counter)
        a0, b0 = _tile(wl + WL, r0, l0 & (layer + 1 < LAYERS), KA, KB)  # the next layer's first product
        _wait(counter, (phase + 3) * P)
        _rows_times(a3, b3, y + N0 + N1, y + N0 + N1 + N2, r3, l3, IA, IB)
        _arrive(counter)


@triton.jit
def _matvec(w, x, y, N, K, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    """y[n] = Σ_k W[n, k] x[k] for one BN-row block, all of K in one tile.

    With PDL (programmatic dependent launch, Hopper), the weight tile, which no earlier kernel writes,
    loads before the wait for the kernel before, and the next kernel may start as soon as every
    program here has issued its loads: the weight streams of consecutive products overlap.
    """
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.arange(0, BK)
    tile = tl.load(w + rows[:, None] * K + cols[None, :], mask=(rows[:, None] < N) & (cols[None, :] < K), other=0.0)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    xk = tl.load(x + cols, mask=cols < K, other=0.0, cache_modifier=".cg")  # written by the kernel before
    tl.store(y + rows, tl.sum(tile.to(tl.float32) * xk[None, :], 1), mask=rows < N)


@triton.jit
def _empty(x):
    pass


def layer_shapes(hidden: int, proj: int, inter: int) -> list[tuple[int, int]]:
    """(rows, cols) of one layer's products in order; each reads the first cols of the one before."""
    return [(proj, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter)]


class Chain:
    """The weights and activation slots of ``layers`` layers' products, for both implementations."""

    def __init__(self, layers: int, hidden: int, proj: int, inter: int):
        self.shapes = layer_shapes(hidden, proj, inter) * layers
        g = torch.Generator(device="cuda").manual_seed(0)
        # scaled so the activations keep their size over the whole chain
        self.weights = [(torch.randn(n, k, device="cuda", generator=g) / k**0.5).bfloat16() for n, k in self.shapes]
        self.flat = torch.cat([w.flatten() for w in self.weights])
        self.x = torch.randn(hidden, device="cuda", generator=g)
        ints = lambda xs: torch.tensor(xs, device="cuda", dtype=torch.int64)  # noqa: E731
        starts = lambda sizes: [0, *itertools.accumulate(sizes)][:-1]  # noqa: E731
        self.w_offsets = ints(starts(w.numel() for w in self.weights))
        self.n_rows, self.k_cols = ints([n for n, _ in self.shapes]), ints([k for _, k in self.shapes])
        slot_sizes = [hidden] + [n for n, _ in self.shapes]
        self.slots = starts(slot_sizes)  # where each phase's input starts in acts (the last: the output)
        self.y_offsets = ints(self.slots)
        self.acts = torch.zeros(sum(slot_sizes), device="cuda")
        self.acts[:hidden] = self.x
        self.counter = torch.zeros(1, device="cuda", dtype=torch.int32)

    @property
    def weight_bytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def reference(self) -> torch.Tensor:
        y = self.x
        for w, (_, k) in zip(self.weights, self.shapes):
            y = w.float() @ y[:k]
        return y

    def persistent(self, programs: int, block_rows: int, num_warps: int, work: bool = True, block_cols: int = 256):
        def run():
            self.counter.zero_()
            _chain[(programs,)](
                self.flat, self.acts, self.counter, self.w_offsets, self.n_rows, self.k_cols, self.y_offsets,
                len(self.shapes), programs, BN=block_rows, BK=block_cols, WORK=work, num_warps=num_warps,
            )

        return run

    def prefetched(self, programs: int, num_warps: int):
        """The chain in _prefetched_chain: each phase's rows spread evenly over ``programs``."""
        (n0, hidden), (n1, _), (n2, _), (n3, inter) = self.shapes[:4]
        split = lambda k: (1 << (k.bit_length() - 1), k - (1 << (k.bit_length() - 1)))  # noqa: E731
        (ka, kb), (ia, ib) = split(hidden), split(inter)
        if min(kb, ib) < 1 or kb & (kb - 1) or ib & (ib - 1):
            raise ValueError(f"hidden {hidden} and intermediate {inter} must be sums of two powers of two")
        meta = {}
        for j, n in enumerate((n0, n1, n2, n3)):
            meta[f"R{j}"] = triton.cdiv(n, programs)
            meta[f"BN{j}"] = triton.next_power_of_2(meta[f"R{j}"])

        def run():
            self.counter.zero_()
            _prefetched_chain[(programs,)](
                self.flat, self.acts, self.counter, len(self.shapes) // 4, programs, N0=n0, N1=n1, N2=n2, N3=n3,
                KA=ka, KB=kb, IA=ia, IB=ib, **meta, num_warps=num_warps,
            )

        return run

    def launched(self, block_rows: int, pdl: bool, num_warps: int = 4):
        """The chain as one _matvec launch per phase into the same activation slots."""
        slots = self.slots

        def run():
            for p, (w, (n, k)) in enumerate(zip(self.weights, self.shapes)):
                _matvec[(triton.cdiv(n, block_rows),)](
                    w, self.acts[slots[p]:], self.acts[slots[p + 1]:], n, k, BN=block_rows,
                    BK=triton.next_power_of_2(k), PDL=pdl, launch_pdl=pdl, num_warps=num_warps,
                )

        return run

    def output(self) -> torch.Tensor:
        return self.acts[self.slots[-1]:]

    def graph(self):
        y = self.x.bfloat16()[None]  # (1, hidden): the decoder's B=1 products

        def run():
            h = y
            for w, (_, k) in zip(self.weights, self.shapes):
                h = F.linear(h[:, :k], w)
            return h

        return run

    def launches(self):
        def run():
            for _ in self.shapes:
                _empty[(1,)](self.counter)

        return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="30,576,978,1536", help="layers,hidden,proj,inter (SmolLM2 student)")
    parser.add_argument("--programs", default="", help="program counts to try (default: the SM count, and half)")
    parser.add_argument("--block-rows", default="4,8,16", help="rows per block to try")
    parser.add_argument("--warps", default="4,8", help="num_warps to try")
    parser.add_argument("--hbm-tb-s", type=float, default=4.8, help="HBM bandwidth for the bound (H200 4.8)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    layers, hidden, proj, inter = map(int, args.dims.split(","))
    chain = Chain(layers, hidden, proj, inter)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    programs = [int(p) for p in args.programs.split(",") if p] or [sms, sms // 2]
    if max(programs) > sms:
        parser.error(f"--programs above the SM count ({sms}) could deadlock the grid barrier")
    bound_us = chain.weight_bytes / (args.hbm_tb_s * 1e12) * 1e6

    def bench(fn) -> float:
        return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")

    def row(name, us, **extra):
        r = {"name": name, "us_per_step": us, "fraction_of_bound": bound_us / us, **extra}
        print(json.dumps(r), flush=True)
        return r

    ref = chain.reference()

    def checked(name, run, **extra):
        """A row for a chain implementation: checked against the fp32 chain, then timed; a failure is a row."""
        try:
            chain.acts[hidden:].zero_()
            run()
            err = ((chain.output() - ref).norm() / ref.norm()).item()
            if not err < 1e-3:
                return row(name, float("nan"), **extra, error=f"rel. err {err:.2e} vs the fp32 chain")
            us = bench(run)
        except Exception as e:  # noqa: BLE001 - e.g. PDL refused inside graph capture: recorded, not fatal
            return row(name, float("nan"), **extra, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        return row(name, us, **extra, rel_err=err, ratio=base / us)

    base = bench(chain.graph())
    rows = [row("graph", base, launches=len(chain.shapes), ratio=1.0)]
    us = bench(chain.launches())
    rows.append(row("launches", us, launches=len(chain.shapes), ratio=base / us))
    for bn in map(int, args.block_rows.split(",")):
        for pdl in (False, True):
            rows.append(checked("launched_pdl" if pdl else "launched", chain.launched(bn, pdl), block_rows=bn))
    for p in programs:
        for warps in map(int, args.warps.split(",")):
            us = bench(chain.persistent(p, 16, warps, work=False))
            rows.append(row("barriers", us, programs=p, num_warps=warps, ratio=base / us))
            for bn in map(int, args.block_rows.split(",")):
                rows.append(checked("persistent", chain.persistent(p, bn, warps), programs=p, num_warps=warps,
                                    block_rows=bn))
            rows.append(checked("persistent_prefetch", chain.prefetched(p, warps), programs=p, num_warps=warps))
    meta = {"device": torch.cuda.get_device_name(), "sms": sms, "triton": triton.__version__,
            "dims": [layers, hidden, proj, inter], "phases": len(chain.shapes),
            "weight_bytes": chain.weight_bytes, "bound_us": bound_us, "hbm_tb_s": args.hbm_tb_s}
    print(json.dumps(meta))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
