"""A/B of the forward state pass's variants (kernels/mlstm_chunkwise._fwd_states, flags PREFETCH, N_DOT).

PREFETCH 1: load chunk c+1's gates (wk, M, b_last) during chunk c; 2: k and v as well.
N_DOT 1: carry n as 16 equal columns updated by a tensor-core product instead of a row sum.
Per shape and variant: forward (do_bench, ms), fw+bw, each kernel's µs (profiler), FLA's forward,
and h, n against the (0, 0) variant. Runs at the commit that has the flags only.

    python benchmarks/ab_fwd_states.py
"""

import itertools, json, torch
import torch.nn.functional as F
from xmerge.kernels import mlstm_chunkwise as mk
from xmerge.benchmarks.kernels_mlstm import mlstm_inputs, ms, kernel_times, fw_bw
from fla.ops.simple_gla import chunk_simple_gla
for B, H, S, D in ((1, 32, 65536, 128), (1, 9, 65536, 64), (8, 9, 8192, 64)):
    xs = mlstm_inputs(B, H, S, D, requires_grad=True)
    qf, kf, vf = (x.detach().transpose(1, 2).contiguous() for x in xs[:3])
    gf = F.logsigmoid(xs[4].detach()).transpose(1, 2).contiguous()
    with torch.no_grad():
        fla = ms(lambda: chunk_simple_gla(qf, kf, vf, gf))
    base = None
    for pf, nd in itertools.product((0, 1, 2), (0, 1)):
        mk._AB.update(PREFETCH=pf, N_DOT=nd)
        with torch.no_grad():
            h, (C, n, m) = mk.mlstm_chunkwise_triton(*xs)
            base = base or (h, n)
            err = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in ((h, base[0]), (n, base[1]))]
            fw = ms(lambda: mk.mlstm_chunkwise_triton(*xs))
            kt = kernel_times(lambda: mk.mlstm_chunkwise_triton(*xs))
        fwbw = ms(fw_bw(lambda *a: mk.mlstm_chunkwise_triton(*a)[0], xs), xs)
        print(json.dumps({"shape": [B, H, S, D], "prefetch": pf, "n_dot": nd, "fw": round(fw, 3), "fla_fw": round(fla, 3),
                          "fla/ours": round(fla / fw, 3), "fwbw": round(fwbw, 3), "kernels": kt,
                          "err_h_n_vs_base": err}), flush=True)
