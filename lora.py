"""LoRA on a VLM, from adapters on to merged (peft's layers, injected in place).

    add_adapters(model, r, alpha, dropout, towers)   adapters on every linear layer of the towers' blocks
    adapter_parameters(model)                        what trains with --lora
    adapters_disabled(model)                         the base model for a while (DPO's reference)
    merge_adapters(model)                            adapters folded into the weights: a plain VLM again

The model's config records the adapters (`config.lora`), so `VLM.from_pretrained` rebuilds them before loading their
weights. k-bit loading (QLoRA) is in model_setup.py, saving a k-bit model dequantized in model.py.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch.nn as nn


def add_adapters(model, r: int = 16, alpha: int = 32, dropout: float = 0.05, towers=("llm",)):
    """Inject LoRA adapters (peft) into every linear layer of the chosen towers' transformer blocks."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = adapter_targets(model, towers)
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets), model)
    model.config.lora = {"r": r, "alpha": alpha, "dropout": dropout, "towers": list(towers)}
    return model


def adapter_targets(model, towers) -> list[str]:
    """Attention and MLP projections chosen by module type (nn.Linear, or GPT-2's Conv1D) inside the towers' blocks,
    whatever a given LLM names them; never the embeddings, the LM head or the projector."""
    from transformers.pytorch_utils import Conv1D

    roots = {"llm": model.language_model.base_model, "vision": model.vision_model}
    names = []
    for tower in towers:
        if tower not in roots:
            raise ValueError(f"unknown LoRA tower {tower!r}: use 'llm' or 'vision'")
        root = roots[tower]
        root_name = next(n for n, m in model.named_modules() if m is root)
        names += [f"{root_name}.{n}" for n, m in root.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    if not names:
        raise ValueError(f"no linear layers found for LoRA in {list(towers)}")
    return names


def adapter_parameters(model) -> dict[str, nn.Parameter]:
    """The LoRA parameters, found by layer type rather than by name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = {}
    for module_name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            found.update({f"{module_name}.{n}": p for n, p in module.named_parameters()
                          if not n.startswith("base_layer.")})
    return found


@contextmanager
def adapters_disabled(model):
    """Run the base model without its adapters (DPO's reference). Only the forward switch is flipped, not
    requires_grad, so a graph built before stays intact."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield model
    finally:
        for layer in layers:
            layer._disable_adapters = False


def merge_adapters(model):
    """Fold every adapter into its base weight and drop the adapter layers: a plain VLM again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    model.config.lora = None
    return model
