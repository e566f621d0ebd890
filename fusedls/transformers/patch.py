"""Patching a loaded causal LM in place: :func:`apply`, :func:`remove`, :class:`Patch`.

One generic mechanism for every ``XForCausalLM`` whose forward follows transformers' pattern
(decoder -> ``logits_to_keep`` slice -> output embedding -> optional soft-cap ->
``self.loss_function(logits, labels, vocab_size, **kwargs)``); nothing is copied from any model's
forward. Three things are replaced on the instances (never on the classes):

* ``model.forward``: a training forward with ``labels`` (and no ``return_logits=True``) is a
  *fused call*: the call's loss arguments (``labels``, ``shift_labels``, ``num_items_in_batch``,
  ``ignore_index``) are recorded, then the model's own forward runs unchanged;
* the output embedding's ``forward``: during a fused call it reads its input (the last hidden
  states, already sliced by ``logits_to_keep``) and its own ``weight``/``bias`` and computes the
  loss with ``fusedls.linear_cross_entropy``, then returns an empty ``(..., 0)`` tensor in place of
  the logits, on which the model's soft-capping costs nothing. The loss is computed inside the
  head's forward on purpose: under FSDP2 that is where the head's parameters are gathered
  (reading ``lm_head.weight`` anywhere else can see a shard);
* ``model.loss_function``: during a fused call it checks that the model handed it the head's
  placeholder untouched (a model that scales its logits after the head cannot be fused) and
  returns the loss already computed, so whatever the model adds to it (a MoE router's auxiliary
  loss) is added as before; outside fused calls (evaluation, ``return_logits=True``) it computes
  the same loss, with the same options, from the logits the model materialised.

The fused call returns the model's own output with ``logits=None`` (``return_dict=False``: the
tuple without them). Everything else (generation, caches, ``output_hidden_states``, ...) is the
model's unchanged forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import types

import torch

from .loss import IGNORE_INDEX, LossOptions, hidden_loss, logits_loss

_ATTR = "_fusedls_patch"  # the Patch, on the model and on its output embedding
LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")  # transformers' loss kwargs of a forward


@dataclasses.dataclass
class _Call:
    """One fused forward in flight: its loss arguments, then what the head computed."""

    labels: torch.Tensor
    shift_labels: torch.Tensor | None
    num_items_in_batch: object
    ignore_index: int
    loss: torch.Tensor | None = None
    placeholder: torch.Tensor | None = None
    returned: bool = False  # the model's loss_function handed the loss back


@dataclasses.dataclass(eq=False)
class Patch:
    """What :func:`apply` changed on one model; :meth:`remove` undoes it."""

    model: torch.nn.Module
    head: torch.nn.Module
    options: LossOptions
    softcap: float | None
    return_logits: bool
    model_forward: object  # the instance attribute replaced (None: the class's forward)
    head_forward: object
    signature: inspect.Signature  # the original forward's (bound: no ``self``)
    call: _Call | None = None

    @contextlib.contextmanager
    def using(self, **options):
        """Other loss options for the calls inside the block (e.g. the Trainer's smoothing)."""
        saved = self.options
        self.options = dataclasses.replace(saved, **options)
        try:
            yield self
        finally:
            self.options = saved

    def remove(self) -> None:
        """Restore the model as it was before :func:`apply`."""
        for module, saved in ((self.model, self.model_forward), (self.head, self.head_forward)):
            if saved is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = saved
            module.__dict__.pop(_ATTR, None)
        self.model.__dict__.pop("_loss_function", None)  # back to transformers' mapping (apply refuses a custom one)


def patch_of(model: torch.nn.Module) -> Patch | None:
    """The :class:`Patch` applied to ``model`` (None when it is not patched)."""
    return model.__dict__.get(_ATTR)


def _original_forward(module: torch.nn.Module, saved):
    return saved if saved is not None else types.MethodType(type(module).forward, module)


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _check_supported(model) -> torch.nn.Module:
    """The output embedding, or a ValueError/TypeError naming what ``model`` lacks."""
    name = type(model).__name__
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel (a torch.nn.Module with a config), got {name}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model; fusedls.transformers patches decoder-only causal LMs")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{name} has no output embedding (get_output_embeddings() returned None): patch the causal-LM "
                         "model (XForCausalLM), not its decoder")  # fmt: skip
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{name}'s output embedding is a {type(head).__name__}; fusedls.transformers needs a "
                        "torch.nn.Linear (weight (vocab, hidden), optional bias)")  # fmt: skip
    params = inspect.signature(model.forward).parameters
    if "labels" not in params:
        raise ValueError(f"{name}.forward takes no `labels` argument: not a causal LM")
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"{name}.forward takes no **kwargs, through which transformers passes the loss arguments "
                         f"({', '.join(LOSS_KWARGS)}) and `return_dict`")  # fmt: skip
    loss_type = getattr(model, "loss_type", None) or "ForCausalLM"
    if loss_type != "ForCausalLM" or "_loss_function" in model.__dict__:
        what = f"loss_type {loss_type!r}" if loss_type != "ForCausalLM" else "a custom loss_function"
        raise ValueError(f"{name} has {what}; fusedls.transformers reproduces transformers' ForCausalLMLoss only")
    return head


def apply(model: torch.nn.Module, *, label_smoothing: float = 0.0, z_loss: float = 0.0,
          return_logits: bool = False) -> Patch:  # fmt: skip
    """Patch ``model`` (a transformers causal LM) in place so that a training forward with ``labels``
    computes its loss with ``fusedls.linear_cross_entropy`` from the last hidden states and the
    output embedding, never materialising the ``(tokens, vocab)`` logits.

    ``label_smoothing`` (torch's uniform convention, the Trainer's ``LabelSmoother``) and ``z_loss``
    apply to every loss the patched model computes; Gemma's ``config.final_logit_softcapping`` is
    read from the config. The fused output has ``logits=None``; ``return_logits=True`` (here, or per
    call as a forward keyword) keeps the model's logits and the unfused loss on them. Returns the
    :class:`Patch`; ``patch.remove()`` or :func:`remove` undoes it.
    """
    if patch_of(model) is not None:
        raise ValueError(f"{type(model).__name__} is already patched; fusedls.transformers.remove(model) first")
    head = _check_supported(model)
    if not isinstance(return_logits, bool):
        raise TypeError(f"return_logits must be a bool, got {type(return_logits).__name__}")
    softcap = getattr(_text_config(model), "final_logit_softcapping", None)
    patch = Patch(
        model, head, LossOptions(label_smoothing, z_loss), softcap, return_logits,
        model.__dict__.get("forward"), head.__dict__.get("forward"), inspect.signature(model.forward),
    )  # fmt: skip
    # bound methods (not closures): a deepcopy of the patched model calls its own copy
    model.forward = _bound_like(_model_forward, model, patch.signature)
    head.forward = types.MethodType(_head_forward, head)
    model.loss_function = types.MethodType(_loss_function, model)
    model.__dict__[_ATTR] = head.__dict__[_ATTR] = patch
    return patch


def remove(model: torch.nn.Module) -> None:
    """Undo :func:`apply` on ``model`` (a ValueError if it is not patched)."""
    patch = patch_of(model)
    if patch is None:
        raise ValueError(f"{type(model).__name__} is not patched by fusedls.transformers")
    patch.remove()


class _Signed:
    """``func`` carrying a per-model ``__signature__`` (with a leading ``self``, which binding it to the
    model drops): the Trainer reads the forward's signature for ``**kwargs`` and dataset columns."""

    def __init__(self, func, signature: inspect.Signature):
        self.func = func
        self.__signature__ = signature
        self.__name__ = self.__qualname__ = func.__name__
        self.__doc__ = func.__doc__

    def __call__(self, *args, **kwargs):
        return self.func(*args, **kwargs)


def _bound_like(func, module: torch.nn.Module, signature: inspect.Signature):
    """``func`` bound to ``module`` (a deepcopy of the module rebinds it to the copy), showing
    ``signature`` (that of the bound method it replaces)."""
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    return types.MethodType(_Signed(func, signature.replace(parameters=[self_param, *signature.parameters.values()])),
                            module)  # fmt: skip


# ------------------------------------------------------------------------- the patched methods


def _model_forward(model, *args, **kwargs):
    """The patched ``model.forward``: a fused call when training with labels, else the original."""
    patch = model.__dict__[_ATTR]
    original = _original_forward(model, patch.model_forward)
    return_logits = kwargs.pop("return_logits", patch.return_logits)
    try:
        labels = patch.signature.bind_partial(*args, **kwargs).arguments.get("labels")
    except TypeError:  # the original forward raises it
        labels = None
    if labels is None or not model.training or return_logits or patch.call is not None:
        return original(*args, **kwargs)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    call = _Call(labels, kwargs.get("shift_labels"), kwargs.get("num_items_in_batch"),
                 kwargs.get("ignore_index", IGNORE_INDEX))  # fmt: skip
    patch.call = call
    try:
        out = original(*args, return_dict=True, **kwargs)
    finally:
        patch.call = None
    if not call.returned:
        raise RuntimeError(
            f"{type(model).__name__}.forward did not " + ("call its output embedding" if call.loss is None else
            "pass the logits to self.loss_function") + "; fusedls.transformers cannot fuse its loss"
        )  # fmt: skip
    out = type(out)(**{f.name: getattr(out, f.name) for f in dataclasses.fields(out)} | {"logits": None})
    return out if return_dict else out.to_tuple()


def _head_forward(head, hidden: torch.Tensor) -> torch.Tensor:
    """The patched output embedding: in a fused call, the loss from ``hidden`` and an empty
    ``(..., 0)`` placeholder for the logits; else the original forward."""
    patch = head.__dict__[_ATTR]
    call = patch.call
    if call is None or call.loss is not None:
        return _original_forward(head, patch.head_forward)(hidden)
    hidden = hidden.to(head.weight.device)  # a model split over devices (device_map) runs the head where it is
    call.loss = hidden_loss(
        hidden, head.weight, head.bias, call.labels, options=patch.options, softcap=patch.softcap,
        shift_labels=call.shift_labels, num_items_in_batch=call.num_items_in_batch, ignore_index=call.ignore_index,
    )  # fmt: skip
    call.placeholder = hidden.new_empty(*hidden.shape[:-1], 0)
    return call.placeholder


def _loss_function(model, logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = IGNORE_INDEX,
                   shift_labels=None, **kwargs) -> torch.Tensor:  # fmt: skip
    """The patched ``model.loss_function``: the fused call's loss, or the loss of real logits."""
    patch = model.__dict__[_ATTR]
    call = patch.call
    if call is None:
        return logits_loss(logits, labels, vocab_size, options=patch.options, shift_labels=shift_labels,
                           num_items_in_batch=num_items_in_batch, ignore_index=ignore_index)  # fmt: skip
    if call.loss is None:
        raise RuntimeError(f"{type(model).__name__} computed its loss before calling its output embedding")
    untouched = logits is call.placeholder or (patch.softcap is not None and logits.shape[-1] == 0)
    if not untouched:
        raise RuntimeError(
            f"{type(model).__name__} transforms its logits after the output embedding in a way fusedls.transformers "
            "does not reproduce (only config.final_logit_softcapping is); its loss cannot be fused"
        )  # fmt: skip
    call.returned = True
    return call.loss
