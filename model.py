"""Mary-MLLM: a LLaVA-style vision-language model, readable top to bottom.

    pixel_values -> vision tower -> patch grid (g x g) -> bilinear 2x downsample -> MLP projector -> image features
    input_ids    -> token embeddings, image features scattered over the <|image_pad|> placeholders -> causal LM

With the real components (SigLIP-so400m-patch14-384 and Qwen2.5-0.5B-Instruct) a 384x384 image gives a 27x27 grid,
downsampled to 13x13 = 169 image tokens. Every size is read from the configs, so any vision model with a square patch
grid (SigLIP, CLIP, DINOv2) and any Hugging Face causal LM (Qwen2, Llama, GPT-2, ...) fit the same code.
"""

from __future__ import annotations

import copy
import inspect
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import ModelOutput
from transformers.models.auto.modeling_auto import MODEL_MAPPING

import conversation
from lora import add_adapters
from processor import DEFAULT_SYSTEM_PROMPT, IGNORE_INDEX, IMAGE_TOKEN, VLMProcessor, ensure_chat_tokens

# Attention implementations that build a per-row mask from packed position ids (transformers' masking_utils);
# any other (flash-attention kernels) is given a packed batch as one row.
MASKED_ATTENTION = ("eager", "sdpa", "flex_attention")


def _side(size) -> int:
    """A config's image or patch size, given as an int or a (height, width) pair."""
    return size if isinstance(size, int) else size[0]


class VLMConfig(PreTrainedConfig):
    """The vision and text sub-configs plus the few numbers that join them."""

    model_type = "mary_vlm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token: str = IMAGE_TOKEN
    image_token_id: int | None = None
    downsample_factor: int = 2
    projector_hidden_size: int | None = None  # None: the LLM's hidden size
    # What the projector does to the tower's features before its first linear layer (saved with its weights, so
    # inference does the same). Tower features carry a large shared offset (DINOv2 ViT-S at 112 px: the mean
    # feature's norm is 28 of a token's 38) and a few dominant directions (one holds 62% of the variance), so the
    # first layer's Adam updates move every token together. "whiten": subtract the training features' mean and
    # whiten them (ZCA, fitted once on the training images when a model is built, then fixed); "layernorm": a
    # LayerNorm over each token's channels (it removes neither the shared offset nor the dominant directions).
    # None: the plain LLaVA-1.5 MLP.
    projector_input_norm: str | None = None
    # The norm every image token leaves the projector with (its direction is what the MLP learns). A trained LLaVA
    # MLP's outputs grow far past the text embeddings' norm (SmolLM2-135M: 196 after stage 1 against 3.2).
    # "embedding" (resolved when the model is built): the LLM's mean input-embedding norm, a text token's scale; a
    # number: that norm. None: the plain MLP's output.
    projector_output_norm: float | str | None = None
    vision_feature_layer: int = -1  # -1: the tower's last_hidden_state; other values index hidden_states
    # The side of the square image the tower is fed, as the image processor produces it. It can differ from the
    # vision config's image_size: a DINOv2 folder declares 518 while its processor crops 224. None: the config's.
    image_size: int | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    # How prompts are written: "chat" (the tokenizer's chat template) or "plain" (LLaVA's stage 1: the image tokens,
    # then the caption). Saved with the model, so evaluation and chat prompt it as it was trained.
    prompt_format: str = "chat"
    # Dynamic resolution: an image is cut into up to this many tiles of the tower's input size (the grid that fits
    # its aspect ratio best) plus a global view, each view num_image_tokens tokens. 1: one view, whatever the image.
    max_tiles: int = 1
    # LoRA adapters, when the model carries them: {"r", "alpha", "dropout", "towers": ["llm"] or ["llm", "vision"]}.
    # Kept in the config so that from_pretrained rebuilds the adapters before loading their weights.
    lora: dict | None = None

    @property
    def vision_grid(self) -> int:
        """Patches per side of the vision tower's grid (27 for so400m-patch14-384)."""
        return self.input_size // self.patch_size  # a stride-`patch` convolution drops the remainder: 384 // 14 = 27

    @property
    def input_size(self) -> int:
        """The side of the images the tower sees (what the image processor makes of every image)."""
        return self.image_size or _side(self.vision_config.image_size)

    @property
    def patch_size(self) -> int:
        return _side(self.vision_config.patch_size)

    @property
    def image_grid(self) -> int:
        """Tokens per side after downsampling (13 for a 27x27 grid)."""
        grid = self.vision_grid // self.downsample_factor
        if grid < 1:
            raise ValueError(f"a {self.vision_grid}x{self.vision_grid} grid cannot be downsampled "
                             f"by {self.downsample_factor}")
        return grid

    @property
    def num_image_tokens(self) -> int:
        return self.image_grid**2


def downsample_grid(features: torch.Tensor, grid: int, out_grid: int) -> torch.Tensor:
    """(B, grid*grid, D) raster-ordered patch features -> (B, out_grid*out_grid, D).

    The tokens are put back on their 2-D grid first, so each output token mixes spatial neighbours; merging
    consecutive raster tokens with a plain view() would mix a row's patches instead. antialias=True makes the
    bilinear filter read every input patch rather than sample a few.
    """
    batch, _, dim = features.shape
    image = features.transpose(1, 2).reshape(batch, dim, grid, grid)
    # In fp32: the antialiased filter has no bf16 kernel on CPUs.
    image = F.interpolate(image.float(), size=(out_grid, out_grid), mode="bilinear", align_corners=False,
                          antialias=True)
    return image.flatten(2).transpose(1, 2).to(features.dtype)


PROJECTOR_INPUT_NORMS = (None, "layernorm", "whiten")


class Whitening(nn.Module):
    """A fixed affine map, (x - mean) @ matrix, that gives the training features zero mean and (nearly) identity
    covariance. Its two buffers are fitted once (`fit`) and saved with the model; nothing learns them."""

    def __init__(self, size: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("matrix", torch.eye(size))

    @torch.no_grad()
    def fit(self, features: torch.Tensor, shrinkage: float = 0.1) -> None:
        """ZCA whitening from (tokens, size) features. The covariance's eigenvalues get `shrinkage` times their mean
        added before the inverse square root, so directions that hold almost no variance (noise) are not blown up
        to the scale of the ones that carry the image."""
        features = features.double().reshape(-1, features.shape[-1])
        mean = features.mean(0)
        eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov((features - mean).T))
        eigenvalues = eigenvalues.clamp(min=0)
        scale = (eigenvalues + shrinkage * eigenvalues.mean()).rsqrt()
        self.mean.copy_(mean)
        self.matrix.copy_((eigenvectors * scale) @ eigenvectors.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.matrix


def projector_input_norm(kind: str | None, size: int) -> nn.Module:
    if kind not in PROJECTOR_INPUT_NORMS:
        raise ValueError(f"projector_input_norm {kind!r}: choose one of {PROJECTOR_INPUT_NORMS}")
    if kind == "whiten":
        return Whitening(size)
    return nn.LayerNorm(size) if kind == "layernorm" else nn.Identity()


class Projector(nn.Module):
    """Two-layer MLP from the vision width to the LLM width (LLaVA-1.5's mlp2x_gelu), optionally after a fixed
    whitening or a LayerNorm of its input (VLMConfig.projector_input_norm)."""

    def __init__(self, vision_size: int, hidden_size: int, text_size: int, input_norm: str | None = None,
                 output_norm: float | None = None):
        super().__init__()
        self.norm = projector_input_norm(input_norm, vision_size)
        self.output_norm = output_norm
        self.fc1 = nn.Linear(vision_size, hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_size, text_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act(self.fc1(self.norm(x))))
        return out if self.output_norm is None else F.normalize(out, dim=-1) * self.output_norm


def mean_embedding_norm(language_model: nn.Module) -> float | None:
    """The LLM's mean input-embedding row norm (None on the meta device, where a model is only being checked)."""
    weight = language_model.get_input_embeddings().weight
    return None if weight.is_meta else round(weight.detach().float().norm(dim=-1).mean().item(), 4)


@dataclass
class VLMOutput(ModelOutput):
    """Without labels: `logits`, (batch, time, vocab) for the positions `logits_to_keep` keeps. With labels: `loss`,
    the mean over supervised tokens, `loss_sum` and `num_tokens` (so a training loop can normalise over a whole
    optimizer step instead), and `supervised_logits`, (supervised tokens, vocab): the LM head runs only where a label
    is, in row-major order, and `logits` stays None."""

    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    supervised_logits: torch.Tensor | None = None
    cache: object | None = None


class VLM(PreTrainedModel, GenerationMixin):
    config: VLMConfig
    config_class = VLMConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _skip_keys_device_placement = ["cache"]

    def __init__(self, config: VLMConfig, vision_model: nn.Module | None = None,
                 language_model: nn.Module | None = None):
        super().__init__(config)
        self.vision_model = vision_model if vision_model is not None else AutoModel.from_config(config.vision_config)
        self.language_model = (language_model if language_model is not None
                               else AutoModelForCausalLM.from_config(config.text_config))
        # One config object per component: a resize of the embeddings must show in the saved VLM config too.
        config.vision_config, config.text_config = self.vision_model.config, self.language_model.config
        # Building VLMConfig around loaded components resets their attention choice; give them the VLM's.
        for sub_config in (config.vision_config, config.text_config):
            sub_config._attn_implementation = sub_config._attn_implementation or config._attn_implementation
        text_size = config.text_config.hidden_size
        if config.projector_output_norm == "embedding":
            config.projector_output_norm = mean_embedding_norm(self.language_model)
        self.projector = Projector(config.vision_config.hidden_size, config.projector_hidden_size or text_size,
                                   text_size, config.projector_input_norm, config.projector_output_norm)
        # Set by attach_processors / from_pretrained; chat() and the data pipeline need them.
        self.tokenizer = None
        self.image_processor = None
        if config.lora:  # a LoRA checkpoint: its adapters are rebuilt before its weights load into them
            add_adapters(self, **config.lora)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=getattr(self.config.text_config, "initializer_range", 0.02))
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ---------------------------------------------------------------- image features
    def encode_images(self, pixel_values: torch.Tensor | None = None,
                      vision_features: torch.Tensor | None = None) -> torch.Tensor:
        """(num_images, 3, H, W) -> (num_images, num_image_tokens, llm_hidden). Stage 1 may pass the tower's output
        instead (`vision_features`, cached once with the tower frozen)."""
        if vision_features is None:
            vision_features = self.vision_features(pixel_values)
        return self.projector(vision_features.to(self.projector.fc1.weight.dtype))

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's patch features, downsampled on their grid: (num_images, num_image_tokens, vision_hidden)."""
        layer = self.config.vision_feature_layer
        vision_trains = any(p.requires_grad for p in self.vision_model.parameters())
        # A frozen tower needs no activations kept for backward: the biggest saving of stage 1.
        with torch.set_grad_enabled(torch.is_grad_enabled() and vision_trains):
            out = self.vision_model(pixel_values=pixel_values.to(self.vision_model.dtype),
                                    output_hidden_states=layer != -1, **self._resize_kwargs())
            features = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        grid = self.config.vision_grid
        num_prefix = features.shape[1] - grid * grid
        if num_prefix < 0:
            raise ValueError(f"the vision tower returned {features.shape[1]} tokens, fewer than its "
                             f"{grid}x{grid} patch grid")
        # CLIP and DINOv2 put a class token (and DINOv2-reg its registers) before the patches; SigLIP has none.
        return downsample_grid(features[:, num_prefix:], grid, self.config.image_grid)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              image_index: torch.Tensor | None = None, vision_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features written over the image placeholder tokens. `image_index` lets
        several rows reuse one encoding: slot i of the batch gets image image_index[i] (DPO's chosen and rejected
        answers share their image)."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.config.image_token_id
        if pixel_values is None and vision_features is None:
            # Reading the count back to Python would split a compiled decoding step in two; eager calls check it.
            if not torch.compiler.is_compiling() and (num_slots := int(image_mask.sum())):
                raise ValueError(f"input_ids hold {num_slots} image tokens but no pixel_values were given")
            return embeds
        features = self.encode_images(pixel_values, vision_features)
        if image_index is not None:
            features = features[image_index]
        num_slots = int(image_mask.sum())
        if num_slots != features.shape[0] * features.shape[1]:
            raise ValueError(f"input_ids hold {num_slots} image tokens but the {features.shape[0]} images give "
                             f"{features.shape[0] * features.shape[1]} features ({features.shape[1]} per image)")
        return embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))

    def _resize_kwargs(self) -> dict:
        # SigLIP and CLIP keep their position embeddings at the config's size unless asked to resize them; DINOv2
        # always resizes them to the input and takes no such argument.
        resized = self.config.input_size != _side(self.config.vision_config.image_size)
        if resized and _accepts(self.vision_model.forward, "interpolate_pos_encoding"):
            return {"interpolate_pos_encoding": True}
        return {}

    # ---------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, image_index: torch.Tensor | None = None,
                vision_features: torch.Tensor | None = None, **kwargs) -> VLMOutput:
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_index, vision_features)
        rows = inputs_embeds.shape[0]
        if labels is not None:
            use_cache = False  # training keeps no KV cache (the LM would build one by default)
            if position_ids is not None:
                # A packed batch: position ids restart per sample and the LM builds its block-diagonal causal mask
                # from them, which it only does without a 2-D attention mask and without a cache.
                attention_mask = None
                if self.language_model.config._attn_implementation not in MASKED_ATTENTION:
                    # Flash-attention kernels find the samples from position ids only in a batch of one row, and
                    # would let each row's samples attend to one another: lay the rows end to end.
                    inputs_embeds = inputs_embeds.reshape(1, -1, inputs_embeds.shape[-1])
                    position_ids = position_ids.reshape(1, -1)
        outputs = self.language_model.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                                 position_ids=position_ids, cache=cache,
                                                 use_cache=use_cache, **kwargs)
        hidden = outputs.last_hidden_state.reshape(rows, -1, outputs.last_hidden_state.shape[-1])
        head = self.language_model.get_output_embeddings()
        if labels is None:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            return VLMOutput(logits=head(hidden[:, keep]), cache=outputs.cache)
        # The LM head runs only where a label is supervised: most positions of a pretrain sample are image tokens,
        # and Qwen's 151,936-word head is about a quarter of the LLM's FLOPs.
        targets = labels[:, 1:]
        supervised = targets != IGNORE_INDEX
        logits = head(hidden[:, :-1][supervised]).float()
        loss_sum = F.cross_entropy(logits, targets[supervised], reduction="sum")
        num_tokens = supervised.sum()
        return VLMOutput(loss=loss_sum / num_tokens.clamp(min=1), loss_sum=loss_sum, num_tokens=num_tokens,
                         supervised_logits=logits, cache=outputs.cache)

    # ---------------------------------------------------------------- processors, save and load
    def attach_processors(self, tokenizer, image_processor) -> VLM:
        """Give the model its tokenizer and image processor, adding the chat and image tokens a tokenizer lacks."""
        if ensure_chat_tokens(tokenizer, self.config.image_token):
            # New rows start at the old rows' mean; parameters on the meta device (data checks) have no values.
            on_meta = self.language_model.get_input_embeddings().weight.is_meta
            self.language_model.resize_token_embeddings(len(tokenizer), mean_resizing=not on_meta)
        self.config.image_token_id = tokenizer.convert_tokens_to_ids(self.config.image_token)
        # The geometry follows what the processor really produces, not what the tower's config declares.
        self.config.image_size = processed_image_size(image_processor)
        self.tokenizer, self.image_processor = tokenizer, image_processor
        return self

    def save_pretrained(self, save_directory, *args, **kwargs):
        # k-bit settings sit on the LLM's config (components) or on the VLM's (a checkpoint loaded in k-bit).
        quantized = [(config, config.quantization_config) for config in (self.config, self.config.text_config)
                     if getattr(config, "quantization_config", None) is not None]
        if not quantized:
            super().save_pretrained(save_directory, *args, **kwargs)
        else:  # QLoRA: saved as a plain checkpoint, so that it loads and merges anywhere, bitsandbytes or not
            kwargs["state_dict"] = self.dequantized_state_dict()
            # transformers' quantizer would write its packed state dict over ours: set aside while saving.
            quantizer, self.hf_quantizer = getattr(self, "hf_quantizer", None), None
            for config, _ in quantized:
                del config.quantization_config
            try:
                super().save_pretrained(save_directory, *args, **kwargs)
            finally:
                self.hf_quantizer = quantizer
                for config, quantization in quantized:
                    config.quantization_config = quantization
        for processor in (self.tokenizer, self.image_processor):
            if processor is not None:
                processor.save_pretrained(save_directory)

    def dequantized_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict with every k-bit (bitsandbytes) weight dequantized to the model's float dtype: exactly the
        weights the quantized layers compute with, without their packed storage and quantization state."""
        from peft.utils.integrations import dequantize_bnb_weight

        state_dict = self.state_dict()
        dtype = self.language_model.get_input_embeddings().weight.dtype
        for name, module in self.named_modules():
            # Its own parameter only: a LoRA wrapper's `weight` is its base layer's.
            if type(module._parameters.get("weight")).__name__ in ("Params4bit", "Int8Params"):
                for key in [k for k in state_dict if k.startswith(f"{name}.")
                            and k not in (f"{name}.weight", f"{name}.bias")]:
                    del state_dict[key]  # absmax, quant_map, quant_state, SCB, weight_format ... of the packing
                weight = dequantize_bnb_weight(module.weight, state=getattr(module, "state", None))
                state_dict[f"{name}.weight"] = weight.detach().to(dtype)
        return state_dict

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> VLM:
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        path = str(pretrained_model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(path) if _has_file(path, "tokenizer_config.json") else None
        image_processor = (AutoImageProcessor.from_pretrained(path)
                           if _has_file(path, "preprocessor_config.json") else None)
        model.tokenizer, model.image_processor = tokenizer, image_processor
        made = processed_image_size(image_processor) if image_processor is not None else model.config.input_size
        if made != model.config.input_size:
            raise ValueError(f"{path}: the image processor makes {made}-px images but the model was built for "
                             f"{model.config.input_size}-px ones")
        return model

    # ---------------------------------------------------------------- processor and conversation
    def processor(self) -> VLMProcessor:
        if self.tokenizer is None or self.image_processor is None:
            raise ValueError("this model has no tokenizer/image processor attached: load it with "
                             "VLM.from_pretrained(folder) or call model.attach_processors(tokenizer, image_processor)")
        return VLMProcessor.from_model(self)

    def batch_chat(self, images: list, questions: list[str], histories: list | None = None,
                   system_prompt: str | None = None, **generation_kwargs) -> list[str]:
        """Answer several (image, question[, history]) requests in one left-padded batch (conversation.py)."""
        return conversation.batch_chat(self, images, questions, histories, system_prompt, **generation_kwargs)

    def chat(self, image, question: str, history: list[tuple[str, str]] | None = None,
             system_prompt: str | None = None, **generation_kwargs) -> str:
        """One answer. `image`: a PIL image, a path, or None for a text-only question; `history`: earlier
        (question, answer) pairs of the same conversation. Generation kwargs go to `generate` (a `streamer` too)."""
        return conversation.batch_chat(self, [image], [question], [history], system_prompt, **generation_kwargs)[0]

    def stream_chat(self, image, question: str, history: list[tuple[str, str]] | None = None,
                    system_prompt: str | None = None, **generation_kwargs) -> Iterator[str]:
        """Like chat(), but yields the answer's text piece by piece as it is generated."""
        return conversation.stream(lambda streamer: self.chat(image, question, history, system_prompt,
                                                              streamer=streamer, **generation_kwargs),
                                   self.processor().tokenizer)


def processed_image_size(image_processor) -> int:
    """The side of the square images `image_processor` makes, found by running it on a small non-square image."""
    from PIL import Image

    height, width = image_processor(images=[Image.new("RGB", (61, 37))], return_tensors="pt")["pixel_values"].shape[-2:]
    if height != width:
        raise ValueError(f"{type(image_processor).__name__} makes {height}x{width} images from a non-square one; "
                         f"the model needs a square patch grid: set its size (and crop) to a square")
    return int(height)


def _accepts(function, name: str) -> bool:
    return name in inspect.signature(function).parameters


def _has_file(path: str, name: str) -> bool:
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, name))
    try:
        from huggingface_hub import file_exists

        return file_exists(path, name)
    except Exception:
        return False


AutoConfig.register(VLMConfig.model_type, VLMConfig)
AutoModel.register(VLMConfig, VLM)


# ==================================================================== three ways to build a VLM
def vision_config_of(name_or_path: str) -> PreTrainedConfig:
    """The vision tower's config of a hub id or folder: the vision half of a two-tower one (SigLIP, CLIP)."""
    config = AutoConfig.from_pretrained(name_or_path)
    return getattr(config, "vision_config", config)


def load_vision_tower(name_or_path: str, **kwargs) -> PreTrainedModel:
    """A vision tower from a hub id or folder. For two-tower checkpoints (SigLIP, CLIP) only the vision half loads."""
    vision_config = vision_config_of(name_or_path)
    if hasattr(vision_config, "vision_use_head"):  # SigLIP's pooling head: unused here, so not loaded
        kwargs["vision_use_head"] = False
    return MODEL_MAPPING[type(vision_config)].from_pretrained(name_or_path, **kwargs)


def image_processor_of(name_or_path: str, image_size: int | None = None):
    """The tower's image processor; with image_size, set to make that square instead of its own size."""
    image_processor = AutoImageProcessor.from_pretrained(name_or_path)
    if image_size:
        square = {"height": image_size, "width": image_size}
        image_processor.size = square
        if getattr(image_processor, "crop_size", None):
            image_processor.crop_size = square
    return image_processor


def vlm_from_components(vision_model: str, llm_model: str, dtype: torch.dtype = torch.float32,
                        llm_kwargs: dict | None = None, image_size: int | None = None, **config_kwargs) -> VLM:
    """Stage-1 start: pretrained vision tower + pretrained LLM + a fresh projector (hub ids or local folders).
    `llm_kwargs` go to the LLM's from_pretrained (a quantization_config for QLoRA). `image_size` makes the image
    processor resize every image to that square instead of its own size: fewer patches, fewer image tokens."""
    vision = load_vision_tower(vision_model, dtype=dtype)
    language = AutoModelForCausalLM.from_pretrained(llm_model, dtype=dtype, **(llm_kwargs or {}))
    config = VLMConfig(vision_config=vision.config, text_config=language.config, **config_kwargs)
    model = VLM(config, vision_model=vision, language_model=language)
    if not llm_kwargs:  # a quantized LLM keeps its k-bit weights
        model = model.to(dtype)
    return model.attach_processors(AutoTokenizer.from_pretrained(llm_model), image_processor_of(vision_model, image_size))


def vlm_without_weights(model_path: str | None = None, vision_model: str | None = None,
                        llm_model: str | None = None, image_size: int | None = None, **config_kwargs) -> VLM:
    """A VLM checkpoint's, or two components', configs, tokenizer and image processor around parameters on the meta
    device: everything checking data needs (geometry, chat template, image tokens), read in a second and no weights
    loaded, whatever the model's size."""
    if model_path:
        config = VLMConfig.from_pretrained(model_path)
        tokenizer, image_processor = AutoTokenizer.from_pretrained(model_path), image_processor_of(model_path)
    else:
        config = VLMConfig(vision_config=vision_config_of(vision_model),
                           text_config=AutoConfig.from_pretrained(llm_model), **config_kwargs)
        tokenizer, image_processor = AutoTokenizer.from_pretrained(llm_model), image_processor_of(vision_model,
                                                                                                  image_size)
    with torch.device("meta"):
        model = VLM(config)
    return model.attach_processors(tokenizer, image_processor)


def vlm_from_configs(vision_config: PreTrainedConfig, text_config: PreTrainedConfig, tokenizer, image_processor,
                     **config_kwargs) -> VLM:
    """Randomly initialised VLM from small (or real-size) configs: tests, the tiny preset, benchmarks."""
    config = VLMConfig(vision_config=copy.deepcopy(vision_config), text_config=copy.deepcopy(text_config),
                       **config_kwargs)
    return VLM(config).attach_processors(tokenizer, image_processor)


# Named sizes in one place. "real" is so400m + Qwen2.5-0.5B with random weights (benchmarks, memory checks);
# "tiny" is for tests and the offline main job; "small" (~60M) keeps the real geometry (384-px images, 14-px patches:
# 27x27 patches -> 169 image tokens) at CPU-friendly widths, so sequence lengths match the real model's.
# Vocabulary size follows the tokenizer given.
PRESETS = {
    "tiny": dict(
        vision=dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                    num_attention_heads=4, image_size=64, patch_size=8, vision_use_head=False),
        text=dict(model_type="qwen2", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=True),
    ),
    "small": dict(
        vision=dict(model_type="siglip_vision_model", hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                    num_attention_heads=6, image_size=384, patch_size=14, vision_use_head=False),
        text=dict(model_type="qwen2", hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                  tie_word_embeddings=True),
    ),
    "real": dict(
        vision=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                    num_hidden_layers=27, num_attention_heads=16, image_size=384, patch_size=14,
                    vision_use_head=False),
        text=dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, vocab_size=151936),
    ),
}


def preset_configs(name: str, vocab_size: int) -> tuple[PreTrainedConfig, PreTrainedConfig]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    vision, text = dict(PRESETS[name]["vision"]), dict(PRESETS[name]["text"])
    vision_config = AutoConfig.for_model(vision.pop("model_type"), **vision)
    # Qwen2.5 pads its embedding table past the tokenizer's length (151,936 rows for 151,665 tokens).
    vocab_size = max(vocab_size, text.pop("vocab_size", 0))
    text_config = AutoConfig.for_model(text.pop("model_type"), vocab_size=vocab_size, **text)
    return vision_config, text_config


def preset_image_processor(vision_config: PreTrainedConfig):
    """SigLIP's own image processor at the tower's input size (resize, rescale to [-1, 1])."""
    from transformers import SiglipImageProcessorPil

    size = vision_config.image_size
    return SiglipImageProcessorPil(size={"height": size, "width": size})


def vlm_from_preset(name: str, tokenizer, **config_kwargs) -> VLM:
    vision_config, text_config = preset_configs(name, vocab_size=len(tokenizer))
    return vlm_from_configs(vision_config, text_config, tokenizer, preset_image_processor(vision_config),
                            **config_kwargs)
