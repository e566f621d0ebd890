"""Random configs of the architectures fusedls.transformers is tested on (no download, no weights).

:func:`random_config` builds a transformers config of one of :data:`ARCHITECTURES` at any size, for
the tests (tiny) and the training benchmark (Llama-3-8B width); ``AutoModelForCausalLM.from_config``
then gives a randomly initialised model. Dropout is off, so a training forward is deterministic.
"""

from __future__ import annotations

import transformers

# architecture -> (config class, config keywords beyond the common ones, or None)
_ARCH = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": None}),
    "gemma2": ("Gemma2Config", {"head_dim": None, "final_logit_softcapping": 2.0}),  # soft-capped logits
    "gemma3": ("Gemma3TextConfig", {"head_dim": None, "final_logit_softcapping": 2.0}),
    "phi3": ("Phi3Config", {}),
    "olmo2": ("Olmo2Config", {}),
    "gpt2": ("GPT2Config", {}),  # tied embeddings, decoder `transformer`, its own parameter names
}
ARCHITECTURES = tuple(_ARCH)


def random_config(arch: str, *, vocab_size: int = 97, hidden_size: int = 32, layers: int = 2, heads: int = 4,
                  kv_heads: int = 2, intermediate_size: int | None = None, max_positions: int = 64,
                  initializer_range: float = 0.02, **overrides):  # fmt: skip
    """A config of ``arch`` (one of :data:`ARCHITECTURES`) with these sizes and no dropout;
    ``overrides`` are passed to the config class last (e.g. ``final_logit_softcapping=None``)."""
    if arch not in _ARCH:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    name, extra = _ARCH[arch]
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # inside any vocabulary of >= 3 tokens
    if arch == "gpt2":
        kwargs = dict(vocab_size=vocab_size, n_embd=hidden_size, n_layer=layers, n_head=heads,
                      n_inner=intermediate_size, n_positions=max_positions, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, initializer_range=initializer_range, bos_token_id=1, eos_token_id=2)  # fmt: skip
    else:
        kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                      intermediate_size=intermediate_size or 2 * hidden_size, max_position_embeddings=max_positions,
                      initializer_range=initializer_range, attention_dropout=0.0, **ids)  # fmt: skip
        kwargs.update({k: (hidden_size // heads if k == "head_dim" else v) for k, v in extra.items()})
    kwargs.update(overrides)
    return getattr(transformers, name)(**kwargs)
