"""The dual encoders few-shot adaptation runs on: Hugging Face transformers CLIP-style models and
OpenCLIP models (BiomedCLIP included), behind the few calls the workflow makes.

`load_dual_encoder(name)` returns the model with its tokenizer and image preprocessing, and the
name to record in the adapter (`base_model_name_or_path`) so that the same call reloads it.
`text_features` / `image_features` run either kind of model, adapted or not.

Which kind of model a name is:

| `name` | loaded with |
|---|---|
| `hf-hub:<org>/<name>` (e.g. BiomedCLIP) | `open_clip.create_model_from_pretrained` and `open_clip.get_tokenizer` |
| a folder with `open_clip_config.json`, or `local-dir:<folder>` | the same, from the folder (open_clip's Hub layout: `open_clip_config.json` + `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`, plus the tokenizer files of a Hugging Face text tower) |
| an OpenCLIP architecture (`ViT-B-16`) with `pretrained` (a tag such as `openai`, or a weights file) | `open_clip.create_model_from_pretrained(name, pretrained)` |
| `peft-svd/builtin` (`peft_svd.builtin.MODEL_NAME`), or the shipped model's folder | transformers, from the folder of this installation |
| anything else: a Hub id or a folder with `config.json` | transformers' `AutoModel`, `AutoTokenizer`, `AutoImageProcessor` |

`adapt(model, config)` and `load_adapter(model, folder)` wrap a loaded model with PEFT for training
and for use. `portable_name(name)` is the name an adapter records for its base model: `peft-svd/builtin` for the
shipped model (wherever it is installed), a Hub id as it is, else the path given.

OpenCLIP's tokenizers pad every prompt to the model's context (77 tokens, 256 for BiomedCLIP).
Where that padding cannot change the features, the prompts are cut to the longest one: text
towers that mask padding themselves (Hugging Face towers such as BiomedCLIP's PubMedBERT), and
causal towers pooled at the end-of-text token (OpenAI-style CLIP), which are then run on the
shorter sequence with the matching slice of their positional embedding and causal mask. Other
towers (bidirectional ones pooled at the last position, as SigLIP's) get the full context.
"""

import contextlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from PIL import Image

OPEN_CLIP_CONFIG = "open_clip_config.json"
_HF_HUB_PREFIX = "hf-hub:"
_LOCAL_DIR_PREFIX = "local-dir:"
_INSTALL_HINT = 'OpenCLIP models need open_clip and timm: pip install "peft-svd[openclip]"'


@dataclass
class DualEncoder:
    """A CLIP-style model with what it needs around it.

    Attributes:
        model: the base model (`transformers` CLIPModel-like, or an OpenCLIP `CLIP` /
            `CustomTextCLIP`), not yet adapted.
        tokenizer: `tokenizer(prompts, padding="longest", truncation=..., max_length=...,
            return_tensors="pt")` returns `{"input_ids", "attention_mask"}`, each (prompts, tokens);
            see `zeroshot.tokenize_prompts`.
        image_processor: `image_processor(images=pil_image, return_tensors="pt")["pixel_values"]`
            is (1, 3, H, W); its `crop_size` / `size`, `resample`, `image_mean` and `image_std`
            set the training augmentation (`data.TrainTransform`).
        name: what to record as the adapter's `base_model_name_or_path`; `load_dual_encoder(name,
            pretrained=revision)` loads the same model again.
        library: "transformers" or "open_clip".
        revision: the OpenCLIP pretrained tag or weights file when `name` is an architecture name
            (recorded as the adapter's `revision`), else None.
    """

    model: torch.nn.Module
    tokenizer: Any
    image_processor: Any
    name: str
    library: str
    revision: str | None = None


def _import_open_clip():
    try:
        import open_clip
    except ImportError as exc:
        raise ImportError(f"{_INSTALL_HINT} ({type(exc).__name__}: {exc})") from exc
    return open_clip


def portable_name(name_or_path: str) -> str:
    """Returns the name to record as an adapter's `base_model_name_or_path` (and in its run record
    and model card) for the model loaded from `name_or_path`: `peft_svd.builtin.MODEL_NAME` for the
    model shipped with peft-svd, given by that name or by any path to its folder (an absolute path
    inside one installation means nothing on another machine or on the Hub); anything else (a Hub
    id, an `hf-hub:` name, another folder) as given. `load_dual_encoder` accepts the result."""
    from peft_svd import builtin

    return builtin.MODEL_NAME if builtin.is_model(name_or_path) else name_or_path


def is_open_clip_name(name: str, pretrained: str | None = None) -> bool:
    """Returns whether `name` (with `pretrained`) designates an OpenCLIP model (see the module table)."""
    if name.startswith((_HF_HUB_PREFIX, _LOCAL_DIR_PREFIX)) or pretrained is not None:
        return True
    return os.path.isfile(os.path.join(name, OPEN_CLIP_CONFIG))


def load_dual_encoder(name: str, *, pretrained: str | None = None) -> DualEncoder:
    """Loads a CLIP-style model, its tokenizer and its image preprocessing.

    Args:
        name: `hf-hub:<org>/<name>`, an OpenCLIP checkpoint folder (or `local-dir:<folder>`), an
            OpenCLIP architecture name (with `pretrained`), a transformers Hub id or folder, or
            `peft-svd/builtin` for the model shipped with peft-svd.
        pretrained: OpenCLIP pretrained tag or weights file, only with an architecture name.

    Returns:
        A `DualEncoder` whose `name` is `portable_name(name)`; `model.name_or_path` is set to it, so
        that PEFT records it as the adapter's `base_model_name_or_path` (OpenCLIP models have no
        such attribute of their own; the shipped model's is its folder).

    Raises:
        ImportError: an OpenCLIP model without open_clip installed.
        ValueError: `pretrained` with a name that carries its own weights, or an OpenCLIP
            architecture name without `pretrained`.
    """
    from peft_svd import builtin

    if builtin.is_model(name):
        if pretrained is not None:
            raise ValueError(f"--pretrained is for OpenCLIP architecture names; {name!r} is the built-in model")
        return _load_transformers(builtin.model_path(), record_as=builtin.MODEL_NAME)
    if not is_open_clip_name(name, pretrained):
        if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
            raise ValueError(
                f"--model {name!r} is a folder with neither config.json (a transformers model) nor "
                f"{OPEN_CLIP_CONFIG} (an OpenCLIP checkpoint)"
            )
        open_clip = _open_clip_if_architecture(name)
        if open_clip is not None:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)[:6]) or "none known"
            raise ValueError(
                f"{name!r} is an OpenCLIP architecture; give its weights with --pretrained TAG or FILE "
                f"(tags: {tags}), or use an hf-hub:<org>/<name> model"
            )
        return _load_transformers(name)
    return _load_open_clip(name, pretrained)


def _open_clip_if_architecture(name: str):
    """Returns the open_clip module if it is installed and `name` is one of its architectures."""
    if "/" in name or os.path.exists(name):
        return None
    try:
        import open_clip
    except ImportError:
        return None
    return open_clip if name in open_clip.list_models() else None


def _load_transformers(name: str, record_as: str | None = None) -> DualEncoder:
    """Loads a transformers model from `name`, recorded (`name_or_path`) as `record_as` if given."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    image_processor = AutoImageProcessor.from_pretrained(name)
    model = AutoModel.from_pretrained(name)
    if record_as is not None:
        model.name_or_path = record_as  # what PEFT records as base_model_name_or_path
        model.config.name_or_path = record_as  # what PEFT's own model card records as base_model
        name = record_as
    return DualEncoder(model, tokenizer, image_processor, name=name, library="transformers")


def _load_open_clip(name: str, pretrained: str | None) -> DualEncoder:
    open_clip = _import_open_clip()
    source = name
    if name.startswith(_HF_HUB_PREFIX) or name.startswith(_LOCAL_DIR_PREFIX):
        if pretrained is not None:
            raise ValueError(
                f"--pretrained is for OpenCLIP architecture names; {name!r} carries its own weights"
            )
    elif pretrained is None:  # a checkpoint folder
        if not hasattr(open_clip.factory, "LOCAL_DIR_PREFIX"):
            raise ImportError(
                f"loading a local OpenCLIP checkpoint needs open_clip_torch >= 3.0 (found {open_clip.__version__})"
            )
        source = _LOCAL_DIR_PREFIX + name
    elif name not in open_clip.list_models():
        raise ValueError(
            f"{name!r} is not an OpenCLIP architecture (open_clip.list_models()); --pretrained needs one"
        )
    model, preprocess = open_clip.create_model_from_pretrained(source, pretrained=pretrained)
    tokenizer = open_clip.get_tokenizer(source)
    model.name_or_path = name  # PEFT records this as base_model_name_or_path
    return DualEncoder(
        model,
        OpenCLIPTokenizer(tokenizer, pad_to_longest=_pads_to_longest_safely(model, tokenizer)),
        OpenCLIPImageProcessor(_preprocess_cfg(model), preprocess),
        name=name,
        library="open_clip",
        revision=pretrained,
    )


def _preprocess_cfg(model) -> dict:
    """Returns the model's full preprocessing config (size, mean, std, interpolation, ...), with
    open_clip's defaults for what the model does not set."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    return merge_preprocess_dict(PreprocessCfg(), _import_open_clip().get_model_preprocess_cfg(model))


class OpenCLIPTokenizer:
    """An OpenCLIP tokenizer called as the workflow calls transformers' tokenizers.

    Args:
        tokenizer: from `open_clip.get_tokenizer`; returns ids padded to the context, (prompts, context).
        pad_to_longest: cut the ids after the longest prompt (only where the model's text tower
            gives the same features, see the module docstring).

    The returned `attention_mask` marks the columns each prompt needs (its tokens up to the
    end-of-text token, or every column when the full context is kept); the OpenCLIP model is
    called with the ids alone.
    """

    def __init__(self, tokenizer, *, pad_to_longest: bool):
        self.tokenizer = tokenizer
        self.pad_to_longest = pad_to_longest
        self.model_max_length = int(tokenizer.context_length)
        hf_tokenizer = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer / SigLipTokenizer
        pad = getattr(hf_tokenizer, "pad_token_id", None)
        self.pad_token_id = 0 if pad is None else int(pad)  # open_clip's SimpleTokenizer pads with 0

    def __call__(self, prompts, padding="longest", truncation=True, max_length=None, return_tensors="pt"):
        """Returns `{"input_ids", "attention_mask"}`, int64 tensors of shape (prompts, tokens)."""
        if padding not in ("longest", True) or return_tensors != "pt":
            raise ValueError("OpenCLIPTokenizer pads to the longest prompt and returns PyTorch tensors only")
        ids = self.tokenizer(list(prompts), context_length=max_length or self.model_max_length).long()
        if not self.pad_to_longest:
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        positions = torch.arange(ids.shape[1])
        # Length of a prompt: one past its last non-padding token (the end-of-text token).
        lengths = torch.where(ids != self.pad_token_id, positions + 1, 0).amax(dim=1)
        width = max(int(lengths.max()), 1)
        mask = (positions[:width] < lengths[:, None]).long()
        return {"input_ids": ids[:, :width].contiguous(), "attention_mask": mask}


class OpenCLIPImageProcessor:
    """OpenCLIP's evaluation preprocessing, with the attributes the training augmentation reads.

    Args:
        preprocess_cfg: the model's preprocessing config (keys size, mean, std, interpolation).
        transform: the evaluation transform of `open_clip.create_model_from_pretrained` (PIL image ->
            (3, H, W) tensor).
    """

    def __init__(self, preprocess_cfg: dict, transform):
        size = preprocess_cfg.get("size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        self.size = self.crop_size = {"height": int(height), "width": int(width)}
        self.do_center_crop = True
        interpolation = str(preprocess_cfg.get("interpolation", "bicubic")).upper()
        self.resample = getattr(Image.Resampling, interpolation, Image.Resampling.BICUBIC)
        self.image_mean = [float(v) for v in np.broadcast_to(preprocess_cfg["mean"], 3)]
        self.image_std = [float(v) for v in np.broadcast_to(preprocess_cfg["std"], 3)]
        self.transform = transform

    def __call__(self, images, return_tensors="pt"):
        """Returns `{"pixel_values": (images, 3, H, W) float32}` for a PIL image or a list of them."""
        if return_tensors != "pt":
            raise ValueError("OpenCLIPImageProcessor returns PyTorch tensors only")
        images = images if isinstance(images, (list, tuple)) else [images]
        return {"pixel_values": torch.stack([self.transform(image) for image in images])}


def _text_tower(model):
    """Returns the module holding an OpenCLIP model's text transformer: the model itself (`CLIP`
    keeps the text tower's parts as its own attributes) or its `text` tower."""
    return model.text if isinstance(getattr(model, "text", None), torch.nn.Module) else model


def _slices_causal_text(tower) -> bool:
    """Whether `tower` is a causal OpenCLIP text transformer pooled at the end-of-text token, so
    that it can run on prompts cut after their longest member."""
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", None))
    return (
        hasattr(tower, "token_embedding")
        and torch.is_tensor(getattr(tower, "attn_mask", None))
        and getattr(tower, "cls_emb", None) is None
        and not getattr(tower, "use_pad_mask", False)
        and pool in ("argmax", "eos")
    )


def _masks_padding(tower) -> bool:
    # open_clip's HFTextEncoder builds its attention mask from the pad token and pools with it.
    return (
        hasattr(tower, "transformer")
        and hasattr(tower, "pooler")
        and hasattr(getattr(tower, "config", None), "pad_token_id")
    )


def _pads_to_longest_safely(model, tokenizer) -> bool:
    """Whether prompts of `model` can be cut after the longest one without changing its features."""
    if getattr(tokenizer, "tokenizer_mode", "") == "clips":  # class token appended after the padding
        return False
    tower = _text_tower(model)
    return _masks_padding(tower) or _slices_causal_text(tower)


def _base_model(model):
    # A PeftModel forwards attributes to the base model, but the text tower is read part by part.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_library(model) -> str:
    """Returns "transformers" or "open_clip" for a (possibly PEFT-wrapped) CLIP-style model.

    Raises:
        ValueError: the model has neither interface.
    """
    base = _base_model(model)
    if all(hasattr(base, a) for a in ("get_text_features", "get_image_features", "logit_scale")):
        return "transformers"
    if all(hasattr(base, a) for a in ("encode_text", "encode_image", "logit_scale")):
        return "open_clip"
    raise ValueError(
        f"{type(base).__name__} is not a CLIP-style dual encoder (it has neither get_text_features / "
        "get_image_features nor encode_text / encode_image, with logit_scale); few-shot adaptation needs a "
        "model such as transformers' CLIPModel or an OpenCLIP model"
    )


def _pooled(output) -> torch.Tensor:
    # transformers >= 5 returns a model output whose pooler_output is the projected feature;
    # older versions return the tensor itself.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _causal_text_features(tower, input_ids: torch.Tensor) -> torch.Tensor:
    # OpenCLIP's encode_text adds the whole positional embedding and causal mask, so it only takes
    # full-context ids. The same computation on the first `tokens` positions: causal attention
    # and pooling at the end-of-text token make the padding after it irrelevant.
    from open_clip.transformer import text_global_pool

    tokens = input_ids.shape[1]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(input_ids).to(cast_dtype) + tower.positional_embedding[:tokens].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:tokens, :tokens])
    x = tower.ln_final(x)
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
    eos = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
    x = text_global_pool(x, input_ids, pool, eos_token_id=eos)
    projection = tower.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, torch.nn.Module) else x @ projection


def text_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Returns the projected, unnormalised text features, (prompts, dim), of a (possibly adapted)
    transformers or OpenCLIP model. Gradients flow if enabled.

    Args:
        input_ids: (prompts, tokens), from the `DualEncoder`'s tokenizer.
        attention_mask: (prompts, tokens); used by transformers models (OpenCLIP models mask
            padding themselves, or are causal).
    """
    if model_library(model) == "transformers":
        return _pooled(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
    base = _base_model(model)
    tower = _text_tower(base)
    context = tower.attn_mask.shape[0] if torch.is_tensor(getattr(tower, "attn_mask", None)) else None
    if context is not None and input_ids.shape[1] < context and _slices_causal_text(tower):
        return _causal_text_features(tower, input_ids)
    return base.encode_text(input_ids)


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Returns the projected, unnormalised image features, (batch, dim), of a (possibly adapted)
    transformers or OpenCLIP model, from pixel_values (batch, 3, H, W)."""
    if model_library(model) == "transformers":
        return _pooled(model.get_image_features(pixel_values=pixel_values))
    return _base_model(model).encode_image(pixel_values)


@contextlib.contextmanager
def _peft_wrapping():
    # PEFT 0.21's PeftModel reads transformers' `is_gradient_checkpointing`, which transformers 5
    # deprecates in favour of `is_activation_checkpointing` (a FutureWarning at every wrap, that the
    # user can do nothing about). Only that warning is ignored, only while PEFT wraps the model.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def adapt(model: torch.nn.Module, config, **kwargs):
    """Returns `peft.get_peft_model(model, config, **kwargs)`: the model of a `DualEncoder` with a new
    adapter (e.g. `peft_svd.SVDConfig()`), ready to train."""
    from peft import get_peft_model

    with _peft_wrapping():
        return get_peft_model(model, config, **kwargs)


def load_adapter(model: torch.nn.Module, adapter: str, **kwargs):
    """Returns `peft.PeftModel.from_pretrained(model, adapter, **kwargs)`: the model of a
    `DualEncoder` with a saved adapter (folder or Hub id). Import `peft_svd` first for SVD adapters.

    A local folder is checked first (`peft_svd.loading.check_adapter_folder`): a file holding SVD
    changes under another `peft_type` (which PEFT would load as an adapter that changes nothing), a
    misspelt type, and a file holding anything but the adapter's own tensors are refused.

    Raises:
        ValueError: the folder is refused, or PEFT's loading refuses the adapter.
    """
    from peft import PeftModel

    from peft_svd import loading

    if os.path.isdir(adapter):
        loading.check_adapter_folder(adapter)
    with _peft_wrapping():
        return PeftModel.from_pretrained(model, adapter, **kwargs)


def read_adapter_base(adapter: str) -> tuple[str | None, str | None]:
    """Returns `(base_model_name_or_path, revision)` recorded in a local adapter folder's
    adapter_config.json, `(None, None)` if there is none. `load_dual_encoder(name, pretrained=revision)`
    loads that base model (`peft-svd/builtin` included); see `base_for_adapter` for what a file may choose.

    Raises:
        ValueError: the file is not a JSON object.
    """
    path = os.path.join(adapter, "adapter_config.json")
    if not os.path.isfile(path):
        return None, None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} cannot be read ({err}); use another copy of the adapter") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, not a JSON object; use another copy of the adapter")
    return config.get("base_model_name_or_path"), config.get("revision")


def base_for_adapter(
    adapter: str, model: str | None = None, pretrained: str | None = None, flag: str = "--model"
) -> tuple[str, str | None, str]:
    """Returns `(name, pretrained, source)`: the base model to load for `adapter`, and where that came from.

    The user's `model` / `pretrained` when given; else what the adapter's adapter_config.json
    records (`base_model_name_or_path`, `revision`), but only where a file from someone else may
    choose it: the built-in model, a Hub id or an `hf-hub:` name, and an OpenCLIP pretrained tag.
    A recorded path on this machine (a folder, a weights file, `local-dir:`) is loaded only when
    the user passes it (`flag`, `--pretrained`). `source` says which, for the user to read.

    Raises:
        ValueError: no base model is known, or the file names one on this machine.
    """
    from peft_svd import builtin

    config_file = os.path.join(adapter, "adapter_config.json")
    saved_base, saved_revision = read_adapter_base(adapter)
    name = model or saved_base
    if not name:
        raise ValueError(f"{adapter} does not say which base model it adapts (no base_model_name_or_path); pass {flag}")
    revision = pretrained
    if pretrained is None and saved_revision is not None and model in (None, saved_base):
        revision = saved_revision
    refused = []
    if model is None and name != builtin.MODEL_NAME:
        hub = name.removeprefix(_HF_HUB_PREFIX)
        try:
            validate_repo_id(hub)
            local = os.path.exists(name) or os.path.exists(hub) or name.startswith(_LOCAL_DIR_PREFIX)
        except HFValidationError:
            local = True
        if local:
            refused.append(f"base model {name!r}, which is not a Hub id but a path on this machine; pass {flag} {name} if you trust it")
    if pretrained is None and revision is not None:
        if os.path.exists(revision) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", revision):
            refused.append(f"pretrained weights {revision!r}, which is not a pretrained tag but a file path; pass --pretrained {revision} if you trust it")
    if refused:
        raise ValueError(
            f"{config_file} names the {' and the '.join(refused)}. A file from someone else does not choose what is "
            "loaded from your disk"
        )
    source = "given on the command line" if model else f"recorded in {config_file}"
    if revision is not None:
        source += "; pretrained weights " + ("given on the command line" if pretrained else "recorded there")
    return name, revision, source


# -- Where the parts of a dual encoder are: blocks, attention heads, projections, joint space. ----


@dataclass
class Projection:
    """One weight matrix of a transformer block.

    Attributes:
        module: the `nn.Linear` holding it (an SVD layer once adapted), or, for a packed q/k/v
            projection that is not adapted, the attention module with its `in_proj_weight`.
        rows: the rows of that weight which are this matrix (q, k or v of a packed projection),
            or None for the whole weight.
    """

    module: torch.nn.Module
    rows: slice | None = None

    def base_weight(self) -> torch.Tensor:
        """The matrix's current base weight, (out, in) (without any unmerged adapter)."""
        module = self.module
        if hasattr(module, "get_base_layer"):
            module = module.get_base_layer()
        weight = module.weight if hasattr(module, "weight") else module.in_proj_weight
        return weight if self.rows is None else weight[self.rows]


@dataclass
class BlockLayout:
    """The adapted matrices of one transformer block and its number of attention heads.

    `q`, `k`, `v` write one slice of `head_dim` rows per head; `out` reads the concatenated heads
    (one slice of columns per head); `fc_in` / `fc_out` are the MLP's two matrices.
    """

    index: int
    num_heads: int
    q: Projection
    k: Projection
    v: Projection
    out: Projection
    fc_in: Projection
    fc_out: Projection

    def projections(self) -> dict[str, Projection]:
        """The matrices by their role, in the order a block computes them."""
        return {"q_proj": self.q, "k_proj": self.k, "v_proj": self.v, "out_proj": self.out,
                "fc1": self.fc_in, "fc2": self.fc_out}  # fmt: skip


@dataclass
class EncoderLayout:
    """One tower of a dual encoder.

    Attributes:
        name: "vision" or "text".
        blocks: the transformer blocks, input first.
        norm: the layer norm applied to the pooled token before the projection into the joint
            space, or None (no final norm).
        projection: (joint_dim, hidden) weight of the linear map from the pooled token into the
            joint image-text space, or None when that map is not linear (attention pooling, MLP
            heads); naming residual-stream directions needs it.
    """

    name: str
    blocks: list[BlockLayout]
    norm: torch.nn.Module | None
    projection: torch.Tensor | None


def _num_heads_of(attention, config=None) -> int:
    for holder in (attention, config):
        for attr in ("num_heads", "num_attention_heads"):
            value = getattr(holder, attr, None)
            if isinstance(value, int):
                return value
    raise ValueError(f"cannot tell how many heads {type(attention).__name__} has (no num_heads attribute)")


def _packed(holder, name: str) -> tuple[Projection, Projection, Projection]:
    """q, k, v of a packed projection: `holder.<name>` (a Linear, or the SVD layer adapting it) or,
    for an unadapted nn.MultiheadAttention, its `in_proj_weight`."""
    module = holder._modules.get(name) if name in holder._modules else getattr(holder, name, None)
    if module is None:  # nn.MultiheadAttention / OpenCLIP Attention without the adapted in_proj part
        module = holder.get_base_layer() if hasattr(holder, "get_base_layer") else holder
        width = module.in_proj_weight.shape[1]
    else:
        width = module.in_features
    return tuple(Projection(module, slice(i * width, (i + 1) * width)) for i in range(3))


def _linear_weight(projection) -> torch.Tensor | None:
    """(joint_dim, hidden) weight of a projection into the joint space: an nn.Linear (bias-free
    or not, the bias does not depend on the written direction) or an OpenCLIP `(hidden, joint_dim)`
    parameter used as `x @ proj`; None for anything else."""
    if isinstance(projection, torch.nn.Linear):
        return projection.weight
    if isinstance(projection, torch.nn.Sequential):  # OpenCLIP TimmModel head: (dropout, Linear)
        linears = [m for m in projection if isinstance(m, torch.nn.Linear)]
        others = [m for m in projection if not isinstance(m, (torch.nn.Linear, torch.nn.Dropout, torch.nn.Identity))]
        return linears[0].weight if len(linears) == 1 and not others else None
    if torch.is_tensor(projection) and projection.ndim == 2:
        return projection.T
    return None


def _transformers_layouts(base) -> dict[str, EncoderLayout]:
    layouts = {}
    for name, tower_attr, norm_attr, projection_attr in (
        ("vision", "vision_model", "post_layernorm", "visual_projection"),
        ("text", "text_model", "final_layer_norm", "text_projection"),
    ):
        tower = getattr(base, tower_attr, None)
        if tower is None or not hasattr(getattr(tower, "encoder", None), "layers"):
            continue
        config = getattr(tower, "config", None)
        blocks = []
        for index, layer in enumerate(tower.encoder.layers):
            attention, mlp = layer.self_attn, layer.mlp
            blocks.append(BlockLayout(
                index, _num_heads_of(attention, config),
                Projection(attention.q_proj), Projection(attention.k_proj), Projection(attention.v_proj),
                Projection(attention.out_proj), Projection(mlp.fc1), Projection(mlp.fc2),
            ))  # fmt: skip
        projection = getattr(base, projection_attr, None)
        layouts[name] = EncoderLayout(
            name, blocks, getattr(tower, norm_attr, None), None if projection is None else _linear_weight(projection)
        )
    return layouts


def _packed_block(index: int, attention, packed: str, out, fc1, fc2) -> BlockLayout:
    """The layout of a block whose attention packs q, k and v in one projection named `packed`."""
    q, k, v = _packed(attention, packed)
    return BlockLayout(index, _num_heads_of(attention), q, k, v, Projection(out), Projection(fc1), Projection(fc2))


def _open_clip_resblocks(transformer) -> list[BlockLayout]:
    return [
        _packed_block(i, block.attn, "in_proj", block.attn.out_proj, block.mlp.c_fc, block.mlp.c_proj)
        for i, block in enumerate(transformer.resblocks)
    ]


def _open_clip_layouts(base) -> dict[str, EncoderLayout]:
    layouts = {}
    visual = getattr(base, "visual", None)
    if hasattr(getattr(visual, "transformer", None), "resblocks"):  # OpenCLIP's VisionTransformer
        linear = getattr(visual, "attn_pool", None) is None
        layouts["vision"] = EncoderLayout(
            "vision", _open_clip_resblocks(visual.transformer), getattr(visual, "ln_post", None),
            _linear_weight(visual.proj) if linear and visual.proj is not None else None,
        )
    elif hasattr(getattr(getattr(visual, "trunk", None), "blocks", None), "__len__"):  # timm trunk (BiomedCLIP)
        trunk = visual.trunk
        blocks = [
            _packed_block(i, block.attn, "qkv", block.attn.proj, block.mlp.fc1, block.mlp.fc2)
            for i, block in enumerate(trunk.blocks)
        ]
        fc_norm = getattr(trunk, "fc_norm", None)
        norm = fc_norm if isinstance(fc_norm, torch.nn.LayerNorm) else getattr(trunk, "norm", None)
        token_pooled = getattr(trunk, "global_pool", "token") in ("token", "avg", "") and getattr(trunk, "attn_pool", None) is None
        head = getattr(visual, "head", None)
        layouts["vision"] = EncoderLayout(
            "vision", blocks, norm if isinstance(norm, torch.nn.LayerNorm) else None,
            _linear_weight(head) if token_pooled and head is not None else None,
        )
    text = _text_tower(base)
    if hasattr(getattr(text, "transformer", None), "resblocks"):  # OpenAI-style causal text tower
        layouts["text"] = EncoderLayout(
            "text", _open_clip_resblocks(text.transformer), getattr(text, "ln_final", None),
            None if getattr(text, "text_projection", None) is None else _linear_weight(text.text_projection),
        )
    elif hasattr(getattr(getattr(text, "transformer", None), "encoder", None), "layer"):  # Hugging Face (BERT) tower
        blocks = []
        for index, layer in enumerate(text.transformer.encoder.layer):
            attention = layer.attention
            blocks.append(BlockLayout(
                index, _num_heads_of(attention.self, text.transformer.config),
                Projection(attention.self.query), Projection(attention.self.key), Projection(attention.self.value),
                Projection(attention.output.dense), Projection(layer.intermediate.dense), Projection(layer.output.dense),
            ))  # fmt: skip
        # Post-norm blocks end in their own layer norm; the pooled token goes through `proj`.
        layouts["text"] = EncoderLayout("text", blocks, None, _linear_weight(getattr(text, "proj", None)))
    return layouts


def encoder_layouts(model) -> dict[str, EncoderLayout]:
    """Returns the towers of a (possibly PEFT-wrapped, adapted or not) dual encoder by name
    ("vision", "text"): their blocks with each block's q, k, v, output and MLP matrices and number
    of heads, the final norm and the projection into the joint space. Known layouts: transformers
    CLIP (`vision_model` / `text_model`), OpenCLIP's `CLIP` (VisionTransformer and causal text
    transformer), and OpenCLIP's `CustomTextCLIP` with a timm image trunk and a Hugging Face text
    tower (BiomedCLIP).

    Raises:
        ValueError: the model has none of these layouts.
    """
    base = _base_model(model)
    if hasattr(base, "vision_model") or hasattr(base, "text_model"):
        layouts = _transformers_layouts(base)
    else:
        layouts = _open_clip_layouts(base)
    if not layouts:
        raise ValueError(
            f"{type(base).__name__} has no known dual-encoder layout (transformers CLIP's vision_model / text_model, "
            "OpenCLIP's visual / transformer or visual.trunk / text); the analysis cannot find its blocks and heads"
        )
    return layouts


def vocabulary_tokenizer(tokenizer):
    """Returns the transformers tokenizer behind a `DualEncoder`'s tokenizer (itself for transformers
    models, the Hugging Face tokenizer of an OpenCLIP text tower such as BiomedCLIP's), to look words
    up in its vocabulary; None for OpenCLIP's byte-level BPE tokenizer, which knows every word."""
    if isinstance(tokenizer, OpenCLIPTokenizer):
        inner = getattr(tokenizer.tokenizer, "tokenizer", None)
        return inner if hasattr(inner, "unk_token_id") else None
    return tokenizer
