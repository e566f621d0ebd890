"""Peak memory of a transformers training step at full size, counted on meta tensors (no GPU).

    python -m fusedls.bench.train_step_memory [--tokens 8192 16384] [--vocab 128256] [--layers 2 4]
                                              [--seq 4096] [--dtype bf16] [--csv PATH]

The model is the GPU model of ``python -m fusedls.bench --op train_step`` (Llama-3-8B width, untied
128k head by default, ``--layers`` decoder layers) built on the meta device. For each case, the
forward + backward of one step (gradients included) is counted with
:class:`~fusedls.bench.live_bytes.LiveBytes` for: ``torch`` (unpatched, transformers' own loss,
no smoothing), ``torch+LabelSmoother`` (unpatched, the Trainer's ``label_smoothing_factor=0.1``
path on the logits) and ``fusedls`` (``fusedls.transformers.apply(model, label_smoothing=0.1)``,
the triton backend run on meta by :func:`~fusedls.bench.live_bytes.triton_on_meta`). ``peak`` is
above the parameters; ``step`` adds the parameters and AdamW's two states (what
``torch.cuda.max_memory_allocated`` would show for a step, less the optimizer's own temporaries).

Attention is counted as a flash-attention kernel allocates it (output and log-sum-exp; in backward
the input gradients), through aten's ``_scaled_dot_product_flash_attention`` meta kernels: sdpa
on meta tensors takes the math path, whose ``(seq, seq)`` scores no GPU run would hold.
"""

from __future__ import annotations

import argparse
import sys

import torch
import transformers
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.trainer_pt_utils import LabelSmoother

import fusedls
from fusedls.transformers import apply, remove

from .live_bytes import peak_live_bytes, triton_on_meta
from .memory_model import DTYPES, write_csv
from .train_step import SMOOTHING, build_model, model_config
ATTENTION = "fusedls_meta_sdpa"  # a name without "flash": transformers treats those as hub kernels


def _fused_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Causal attention through aten's fused (flash) kernel, which has meta implementations."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True, False, scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, _fused_attention)


def _peak(model, loss_fn) -> int:
    for p in model.parameters():
        p.grad = None
    peak = peak_live_bytes(lambda: loss_fn().backward())
    for p in model.parameters():
        p.grad = None
    return peak


def count(tokens: int, vocab: int, layers: int, seq: int, dtype: torch.dtype) -> list[dict]:
    """One row per provider: ``provider``, ``peak_bytes``, ``step_bytes``, and their ratios to torch's."""
    config = model_config("cuda", vocab, layers=layers, seq=seq)
    model = build_model(config, dtype, "meta", attention=ATTENTION)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.zeros(tokens // seq, seq, dtype=torch.long, device="meta")
    peaks = {
        "torch": _peak(model, lambda: model(input_ids=ids, labels=ids).loss),
        "torch+LabelSmoother": _peak(
            model, lambda: LabelSmoother(epsilon=SMOOTHING)(model(input_ids=ids), ids, shift_labels=True)
        ),
    }
    apply(model, label_smoothing=SMOOTHING)
    with triton_on_meta(), fusedls.use_backend("triton"):
        peaks["fusedls"] = _peak(model, lambda: model(input_ids=ids, labels=ids).loss)
    remove(model)
    rows = []
    for provider, peak in peaks.items():
        step = 3 * params + peak  # parameters, AdamW's exp_avg and exp_avg_sq, the step's peak
        rows.append(dict(provider=provider, peak_bytes=peak, step_bytes=step, params_bytes=params,
                         peak_vs_torch=peak / peaks["torch"], step_vs_torch=step / (3 * params + peaks["torch"])))  # fmt: skip
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedls.bench.train_step_memory",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384], help="tokens per step")
    parser.add_argument("--vocab", type=int, nargs="+", default=[128256])
    parser.add_argument("--layers", type=int, nargs="+", default=[2])
    parser.add_argument("--seq", type=int, default=4096, help="sequence length (tokens must be a multiple)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    table = []
    print(f"training step (fwd+bwd) peak memory counted on meta, Llama-3-8B width, transformers "
          f"{transformers.__version__}, {args.dtype}; step = parameters + AdamW state + peak")  # fmt: skip
    print(f"{'layers':>6}{'tokens':>7}{'vocab':>8}  {'provider':<21}{'peak MiB':>10}{'vs torch':>9}"
          f"{'step MiB':>10}{'vs torch':>9}")  # fmt: skip
    for layers in args.layers:
        for tokens in args.tokens:
            for vocab in args.vocab:
                for r in count(tokens, vocab, layers, args.seq, DTYPES[args.dtype]):
                    table.append(dict(layers=layers, tokens=tokens, vocab=vocab, dtype=args.dtype, **r))
                    print(f"{layers:>6}{tokens:>7}{vocab:>8}  {r['provider']:<21}{r['peak_bytes'] / 2**20:>10.0f}"
                          f"{r['peak_vs_torch']:>9.3f}{r['step_bytes'] / 2**20:>10.0f}{r['step_vs_torch']:>9.3f}")
    if args.csv:
        write_csv(args.csv, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
