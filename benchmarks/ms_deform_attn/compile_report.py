"""Compile the Triton deformable-attention kernels for a CUDA architecture without a GPU, and report.

Ahead-of-time compilation (``triton.compile`` with an explicit target; ptxas ships with triton)
needs no driver, so this runs on a CPU-only machine. For each model shape it prints the resource
report (registers per thread, stack, shared memory, local-memory spills) and counts of the SASS
instructions that matter for this memory-bound op: 16-byte loads (``LDG.E.128``), other global
loads, atomic reductions (``REDG``; in the PTX, ``atom...add.v4.f32`` is the 16-byte form),
tensor-core instructions (``HGMMA`` is wgmma, ``HMMA`` mma.sync), barriers (``BAR.SYNC``, mostly layout conversions through shared memory),
shuffles and local-memory traffic (``LDL``/``STL``, which should be 0).

Usage (``TRITON_INTERPRET`` must be unset):
    python benchmarks/ms_deform_attn/compile_report.py [--arch 90] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from cuda_ops import triton_backend as tb

# name: (channels per head, levels, points); the level sizes are run-time arguments
SHAPES = {
    "injector-B": (32, 3, 4),
    "injector-S": (64, 3, 4),
    "extractor-B": (32, 1, 4),
}
TYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
SASS_KEYS = ("LDG.E.128", "LDG.E", "REDG", "HGMMA", "HMMA", "BAR.SYNC", "SHFL", "LDL", "STL")
POINTER_ALIGNMENT = 16  # torch allocations are 16-byte aligned; triton specialises on it at launch


def _resources(cubin: bytes) -> dict[str, object]:
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        usage = subprocess.run(
            [bin_dir / "cuobjdump", "--dump-resource-usage", handle.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sass = subprocess.run(
            [bin_dir / "cuobjdump", "-sass", handle.name], capture_output=True, text=True, check=True
        ).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if match is None:
        raise RuntimeError(f"no resource usage in cuobjdump output:\n{usage}")
    ops = collections.Counter(re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]+)", sass, re.M))
    counts = {
        key: sum(n for op, n in ops.items() if op == key or op.startswith(key + ".")) for key in SASS_KEYS
    }
    counts["LDG.E"] -= counts["LDG.E.128"]
    registers, stack, shared, local = (int(g) for g in match.groups())
    return {"registers": registers, "stack": stack, "shared": shared, "local": local, **counts}


def compile_forward(dtype: str, channels: int, levels: int, points: int, config: tb.TritonConfig, arch: int):
    constants = {
        "CHANNELS": channels,
        "LEVELS": levels,
        "POINTS": points,
        "BLOCK_Q": config.block_q,
        "BLOCK_D": tb._block_d(channels),
        "INTERPRETER": False,
    }
    t = TYPE_NAMES[dtype]
    pointers = {
        "value_ptr": t,
        "shapes_ptr": "i32",
        "starts_ptr": "i32",
        "loc_ptr": "fp32",
        "attn_ptr": t,
        "out_ptr": t,
    }
    return _compile(tb._forward_kernel, pointers, constants, config, arch)


def compile_backward(dtype: str, channels: int, levels: int, points: int, config: tb.TritonConfig, arch: int):
    constants = {
        "CHANNELS": channels,
        "LEVELS": levels,
        "POINTS": points,
        "BLOCK_Q": config.block_q,
        "BLOCK_D": tb._block_d(channels),
        "HAS_ATOMIC": True,
        "HAS_DENSE": True,
        "DENSE_CHUNK": config.dense_chunk,
        "DOT_PRECISION": "ieee" if dtype == "float32" else "tf32",
        "INTERPRETER": False,
    }
    t = TYPE_NAMES[dtype]
    pointers = {
        "value_ptr": t,
        "shapes_ptr": "i32",
        "starts_ptr": "i32",
        "loc_ptr": "fp32",
        "attn_ptr": t,
        "grad_out_ptr": t,
        "grad_value_ptr": "fp32",
        "grad_loc_ptr": "fp32",
        "grad_attn_ptr": t,
    }
    return _compile(tb._backward_kernel, pointers, constants, config, arch)


def _compile(
    kernel, pointers: dict[str, str], constants: dict[str, object], config: tb.TritonConfig, arch: int
):
    # pointers, then int32 scalars, then constexprs, in the kernel's argument order
    signature = {
        name: f"*{pointers[name]}" if name in pointers else "constexpr" if name in constants else "i32"
        for name in kernel.arg_names
    }
    attrs = {(i,): [["tt.divisibility", POINTER_ALIGNMENT]] for i in range(len(pointers))}
    compiled = triton.compile(
        ASTSource(kernel, signature, constants, attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config.num_warps},
    )
    # shared memory: what triton allocates (dynamic), not the static figure cuobjdump prints
    return {**_resources(compiled.asm["cubin"]), "shared": compiled.metadata.shared}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    parser.add_argument("--dtypes", nargs="+", choices=sorted(TYPE_NAMES), default=["bfloat16", "float32"])
    parser.add_argument(
        "--fwd", type=int, nargs=2, metavar=("BLOCK_Q", "WARPS"), help="forward launch override"
    )
    parser.add_argument(
        "--bwd", type=int, nargs=2, metavar=("BLOCK_Q", "WARPS"), help="backward launch override"
    )
    args = parser.parse_args()
    if tb.INTERPRETED:
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    rows = []
    for name in args.shapes:
        channels, levels, points = SHAPES[name]
        fwd_config = tb.forward_config_default(channels)
        bwd_config = tb.backward_config_default(channels)
        if args.fwd:
            fwd_config = replace(fwd_config, block_q=args.fwd[0], num_warps=args.fwd[1])
        if args.bwd:
            bwd_config = replace(bwd_config, block_q=args.bwd[0], num_warps=args.bwd[1])
        for dtype in args.dtypes:
            fwd = compile_forward(dtype, channels, levels, points, fwd_config, args.arch)
            bwd = compile_backward(dtype, channels, levels, points, bwd_config, args.arch)
            rows += [{"shape": name, "dtype": dtype, "kernel": "forward", **fwd}]
            rows += [{"shape": name, "dtype": dtype, "kernel": "backward", **bwd}]
    header = ["shape", "dtype", "kernel", "registers", "stack", "shared", "local", *SASS_KEYS]
    print(" ".join(f"{h:>18}" if i < 3 else f"{h:>9}" for i, h in enumerate(header)))
    for row in rows:
        print(" ".join(f"{row[h]!s:>18}" if i < 3 else f"{row[h]!s:>9}" for i, h in enumerate(header)))
    if args.json:
        meta = {
            "arch": args.arch,
            "triton": triton.__version__,
            "fwd_override": args.fwd,
            "bwd_override": args.bwd,
        }
        args.json.write_text(json.dumps({"meta": meta, "kernels": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
