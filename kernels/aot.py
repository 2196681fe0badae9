"""Ahead-of-time compile of the Triton grouping kernels for sm_80 / sm_90 without a GPU, with
the ptxas register/spill report (used by tests/test_grouping_triton.py and bench/grouping.py).

Run as ``python -m groupvit_fast.kernels.aot [--arch 80 90]`` with TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

# Release configurations: stage 1 (S=64, N=196), stage 2 (S=8, N=64) and the largest group
# count the issue asks for (S=128), all at C=384, for fp32 and bf16 inputs.
SHAPES = [(64, 196, 384), (8, 64, 384), (128, 1176, 384)]
DTYPES = {"fp32": "*fp32", "bf16": "*bf16"}


def _kernels(shape, dt):
    from . import grouping_triton as gt
    lp = gt.launch_params(*shape)
    upcast = dt == "*fp32"
    common = dict(UPCAST=upcast, FP32_IEEE=upcast)
    sigs = dict(
        assign_fwd=(gt._assign_fwd,
                    dict(q_ptr=dt, k_ptr=dt, idx_ptr="*i32", soft_ptr=dt, hard_ptr=dt,
                         seed="i32", S="i32", N="i32", C="i32", scale="fp32"),
                    dict(GUMBEL=True, RETURN_ATTN=False, **common)),
        merge_fwd=(gt._merge_fwd,
                   dict(v_ptr=dt, idx_ptr="*i32", out_ptr=dt, cnt_ptr="*fp32", S="i32",
                        N="i32", C="i32", eps="fp32"), dict(common)),
        bwd_dv=(gt._bwd_dv,
                dict(dout_ptr=dt, v_ptr=dt, idx_ptr="*i32", cnt_ptr="*fp32", dv_ptr=dt,
                     t_ptr="*fp32", S="i32", N="i32", C="i32", eps="fp32"), {}),
        bwd_groupsum=(gt._bwd_groupsum,
                      dict(idx_ptr="*i32", t_ptr="*fp32", d_ptr="*fp32", S="i32", N="i32"), {}),
        bwd_tokens=(gt._bwd_tokens,
                    dict(q_ptr=dt, k_ptr=dt, v_ptr=dt, dout_ptr=dt, cnt_ptr="*fp32",
                         d_ptr="*fp32", da_ptr="*fp32", dk_ptr=dt, seed="i32", S="i32",
                         N="i32", C="i32", scale="fp32", inv_tau="fp32", eps="fp32"),
                    dict(GUMBEL=True, **common)),
    )
    for name, (fn, sig, consts) in sigs.items():
        p = dict(lp[name])
        nw = p.pop("num_warps")
        consts = dict(consts, **p)
        yield name, fn, sig, consts, nw


_PTXAS_LINE = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_all(archs=(80, 90), shapes=None, dtypes=None):
    """Compile every kernel/config/dtype for each arch; returns a list of report rows."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("AOT compile needs TRITON_INTERPRET unset (run in a subprocess)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    rows = []
    for arch in archs:
        ptxas = get_ptxas(arch).path
        for shape in shapes or SHAPES:
            for dname in dtypes or DTYPES:
                dt = DTYPES[dname]
                for name, fn, sig, consts, nw in _kernels(shape, dt):
                    signature = dict(sig)
                    signature.update({k: "constexpr" for k in consts})
                    src = triton.compiler.ASTSource(fn=fn, signature=signature,
                                                    constexprs=consts)
                    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                        options={"num_warps": nw})
                    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
                    with tempfile.TemporaryDirectory() as tmp:
                        ptx = os.path.join(tmp, "k.ptx")
                        with open(ptx, "w") as f:
                            f.write(ck.asm["ptx"])
                        res = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", ptx, "-o",
                                              os.path.join(tmp, "k.cubin")],
                                             capture_output=True, text=True)
                    if res.returncode != 0:
                        raise RuntimeError(f"ptxas failed for {name}: {res.stderr[-2000:]}")
                    log = res.stderr + res.stdout
                    regs = int(_PTXAS_LINE.search(log).group(1))
                    sp = _SPILL.search(log)
                    rows.append(dict(arch=f"sm_{arch}", kernel=name, dtype=dname,
                                     S=shape[0], N=shape[1], C=shape[2],
                                     BLOCK_S=consts.get("BLOCK_S", 0),
                                     BLOCK_N=consts["BLOCK_N"], BLOCK_C=consts.get("BLOCK_C", 0),
                                     num_warps=nw, registers=regs,
                                     spill_stores=int(sp.group(1)) if sp else 0,
                                     spill_loads=int(sp.group(2)) if sp else 0))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None)
    p.add_argument("--shape", nargs="+", default=None, help="S,N,C triples, e.g. 64,196,384")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else None
    rows = compile_all(tuple(args.arch), shapes, args.dtype)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'arch':6} {'S':>4} {'kernel':13} {'dtype':5} {'S/N/C blocks':13} {'warps':5} "
          f"{'regs':4} spills (stores/loads)")
    for r in rows:
        blocks = f"{r['BLOCK_S']}/{r['BLOCK_N']}/{r['BLOCK_C']}"
        print(f"{r['arch']:6} {r['S']:>4} {r['kernel']:13} {r['dtype']:5} {blocks:13} {r['num_warps']:5} "
              f"{r['registers']:4} {r['spill_stores']}/{r['spill_loads']} B")


if __name__ == "__main__":
    main()
