"""`longdoc bench`: correctness-gated latency, throughput, memory and FLOP/s of the encoder.

A sweep is a :class:`BenchSpec` (from flags or a YAML file). :func:`run_bench` returns a
:class:`BenchReport` of frozen dataclasses and never prints; ``cli.py`` renders it.

Implementations (``impls``), all on the same weights:
- ``longdoc``: our encoder (banded local attention, reassociated global attention);
- ``longdoc-int8``: the same with int8 dynamic quantization of the linear layers (CPU, inference);
- ``longdoc-compiled``: the same with every layer through ``torch.compile`` (CUDA; mode from
  ``LONGDOC_COMPILE_MODE``, default "default"): fuses the element-wise work around the matmuls and
  FlexAttention; the first call compiles (untimed);
- ``hf``: ``transformers.LongformerModel`` loaded from the same checkpoint;
- ``bert``: ``transformers.BertModel`` with the same weights (``child.bert_checkpoint``: for the
  default model its original all-MiniLM-L6-v2 files; full attention, at most 512 tokens, no
  global tokens), the architecture the default model was converted from;
- ``full``: our encoder with every window widened over the whole sequence, so ``local_attention``
  takes its dense path: full (padding-only mask) scaled-dot-product attention;
- ``longdoc-attn``: one layer's attention alone (``attention.longformer_attention`` on random
  projections and hidden state), to see how close the banded kernel comes to the matmul peak.

Before timing, the gate: the layer's attention the model runs (``longformer_attention``, with the
kernel the model picks) equals :func:`reference_attention` at a small length, and
our model equals transformers' on the same weights (and int8 stays close to fp32). A failed check
stops the bench.

Each (model, dtype, mode, batch, length, impl) is measured in a fresh child process
(``python -m longdoc_cli.bench --child JOB``, child.py): warm-up runs, then timed runs. Memory is the peak
*extra* memory of those runs over what the loaded model and inputs already hold: on CPU the peak
resident set (VmHWM, reset through /proc/self/clear_refs once the model is loaded) minus the
resident set just before the first run; on CUDA ``max_memory_allocated`` minus the allocation
before the first run. A child that runs out of memory or time gives a skipped row with a note.

FLOPs are the useful ones of the math each implementation defines (multiply-add = 2), the same
for ``longdoc``, ``longdoc-int8`` and ``hf``: per layer 8 n d^2 (projections) + 4 n d f
(feed-forward) + 4 d * (exact number of (query, band key) pairs) + the global terms; ``full``
counts 4 n^2 d for its attention. ``train`` (forward + backward) counts 3x. Achieved GFLOP/s are
compared with the peak of a large square matmul in the same dtype, measured by each child right
after its timed runs (shared machines drift: one sweep-wide number made shares above 100%).

The package: spec.py (the sweep as data), flops.py (the FLOP model), child.py (one measurement:
models, inputs, memory meters, the child process), run.py (the gate and the sweep).
"""

from __future__ import annotations

from .child import PRESETS, MatmulPeak, full_attention_config, matmul_peak, preset_config, with_dilation
from .flops import attention_flops, band_pairs, encoder_flops, flops_of
from .run import BenchReport, Check, Measurement, ratios, run_bench
from .spec import DTYPES, IMPLS, MODES, BenchSpec, load_spec, parse_lengths, spec_from_dict

__all__ = [
    "DTYPES",
    "IMPLS",
    "MODES",
    "PRESETS",
    "BenchReport",
    "BenchSpec",
    "Check",
    "MatmulPeak",
    "Measurement",
    "attention_flops",
    "band_pairs",
    "encoder_flops",
    "flops_of",
    "full_attention_config",
    "load_spec",
    "matmul_peak",
    "parse_lengths",
    "preset_config",
    "ratios",
    "run_bench",
    "spec_from_dict",
    "with_dilation",
]
