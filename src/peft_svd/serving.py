"""Serving many tenants' SVD adapters from one base model as image classifiers.

All adapters of one base model share its factors, so one process can hold hundreds of them. A
tenant is an adapter with its class names and prompt template. `MultiAdapterClassifier` loads
tenants (an adapter folder or Hub id each, or a folder of adapter folders) through PEFT's own
`load_adapter`, so every check that `PeftModel.from_pretrained` makes applies (the adapter's
fingerprints of the base model, damaged values, layers this model lacks). `classify` takes
`(tenant, image)` pairs of any tenants and runs one mixed-adapter image forward for the whole
batch (PEFT's `adapter_names`); each tenant's class-prompt features are computed with its adapter
active, once per (adapter, class names, template), and kept in a memory-bounded cache that notices
when the adapter changes. `RequestBatcher` gathers requests that arrive within a few milliseconds
into such batches for an asyncio server (see `examples/serve.py`).

    import peft_svd.serving as serving

    classifier = serving.MultiAdapterClassifier.from_pretrained("peft-svd/builtin", adapters="runs/")
    results = classifier.classify([("shapes", image_a), ("segments", image_b)])
    results[0].label, results[0].top(3)

Each result equals what the tenant's adapter gives alone (`PeftModel.from_pretrained` of the base
model, `zeroshot.zero_shot_head`, `zeroshot.encode_images`), up to float rounding.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import os
import re
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image, ImageOps

from .config import SVDConfig
from .errors import PeftSVDWarning
from .fewshot import models
from .fewshot.data import to_rgb
from .fewshot.record import RESULTS_FILE, RunSummary
from .fewshot.templates import DEFAULT_TEMPLATE, build_prompts, check_template
from .fewshot.zeroshot import encode_images, encode_text, logit_scale, tokenize_prompts
from .layer import SVDLayer
from .model import iter_svd_layers

__all__ = [
    "AdapterLoadError",
    "BadImageError",
    "BatchStats",
    "CacheInfo",
    "Classification",
    "MultiAdapterClassifier",
    "RequestBatcher",
    "RequestError",
    "Tenant",
    "UnknownTenantError",
    "decode_image",
    "saved_tenant_classes",
    "valid_tenant_name",
]

ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_CACHE_MB = 256
# Tenant names go into file paths (a folder's adapters) and URLs: letters, digits, . _ - only.
_TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TEXT_BATCH = 256  # prompts per text forward


class RequestError(ValueError):
    """A request of a batch that cannot be served.

    Attributes:
        detail: what is wrong with it.
        index: its position in the batch (None when not known); `str(error)` names it.
    """

    def __init__(self, detail: str, index: int | None = None):
        super().__init__(detail)
        self.detail = detail
        self.index = index

    def __str__(self) -> str:
        return self.detail if self.index is None else f"request {self.index}: {self.detail}"


class UnknownTenantError(RequestError, LookupError):
    """A request names a tenant that is not loaded."""


class BadImageError(RequestError):
    """A request's image cannot be read or has the wrong shape."""


class AdapterLoadError(ValueError):
    """An adapter cannot be served: not found, not an SVD adapter, or made for another base model."""


@dataclass(frozen=True)
class Tenant:
    """One served adapter.

    Attributes:
        name: the tenant's name, as requests give it.
        source: the adapter folder or Hub id it was loaded from.
        class_names: the classes it chooses from, in index order.
        template: the prompt template (`"a photo of a {}."`).
        adapter_name: the adapter's name inside the PEFT model (`model.peft_config`); a reload
            gets a new one.
        base_model: the base model the adapter records (`base_model_name_or_path`), or None.
    """

    name: str
    source: str
    class_names: tuple[str, ...]
    template: str
    adapter_name: str
    base_model: str | None = None


@dataclass
class Classification:
    """The answer to one `(tenant, image)` request.

    Attributes:
        tenant: the tenant's name.
        label: the most probable class name.
        index: its index in `class_names`.
        probabilities: (classes,) float32 tensor on the CPU, softmax of the tenant's logits
            (`logit_scale * cos(image, class prompt)`).
        class_names: the tenant's classes.
        batch_size: how many requests the mixed image forward that answered this one held.
    """

    tenant: str
    label: str
    index: int
    probabilities: torch.Tensor
    class_names: tuple[str, ...]
    batch_size: int

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The `k` most probable classes as `(class name, probability)`, most probable first."""
        values, indices = self.probabilities.topk(min(k, len(self.class_names)))
        return [(self.class_names[i], float(p)) for p, i in zip(values.tolist(), indices.tolist(), strict=True)]


@dataclass(frozen=True)
class CacheInfo:
    """The class-prompt feature cache: lookups that found valid features (`hits`), lookups that
    computed them (`misses`), entries dropped to stay within `max_bytes` (`evictions`) or because
    their adapter changed (`invalidations`), and what it holds now."""

    hits: int
    misses: int
    evictions: int
    invalidations: int
    entries: int
    bytes: int
    max_bytes: int


def valid_tenant_name(name) -> bool:
    """Whether `name` can name a tenant: 1-128 letters, digits, '.', '_' or '-', starting with a
    letter or digit (so that it is safe in a URL and as a folder name inside an adapter folder)."""
    return isinstance(name, str) and bool(_TENANT_NAME.match(name)) and ".." not in name


def decode_image(data: bytes) -> Image.Image:
    """Decodes an encoded image file (PNG, JPEG, ...) as 8-bit RGB, upright (EXIF orientation
    applied, as the datasets library does for training images; 16-bit images rescaled, see
    `fewshot.data.to_rgb`).

    Raises:
        BadImageError: the bytes are not an image PIL can decode.
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))
    except Exception as exc:  # PIL raises many types for damaged files
        raise BadImageError(f"cannot decode the image ({type(exc).__name__}: {exc}); send a PNG or JPEG file") from exc


def saved_tenant_classes(adapter: str) -> tuple[list[str], str] | None:
    """Returns `(class names, template)` recorded beside an adapter by `examples/fewshot.py`
    (its results.json), or None when there is none (the file is looked up on the Hub for a Hub id).
    """
    path = os.path.join(adapter, RESULTS_FILE)
    if not os.path.isdir(adapter):
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(adapter, RESULTS_FILE)
        except Exception:  # not on the Hub, offline, or no results.json: the caller gives the classes
            return None
    if not os.path.isfile(path):
        return None
    try:
        run = RunSummary.load(path).run
    except (ValueError, KeyError, TypeError) as exc:
        raise AdapterLoadError(
            f"{path} cannot be read as the results of examples/fewshot.py ({type(exc).__name__}: {exc}); "
            "pass the tenant's class names and template"
        ) from exc
    return list(run.class_names), run.template


class _TextFeatureCache:
    """Normalised class-prompt features by (adapter name, class names, template), least recently
    used first, within `max_bytes`. Each entry keeps what it was computed from (see `_AdapterState`)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.entries: collections.OrderedDict[tuple, tuple[_AdapterState, torch.Tensor]] = collections.OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = self.invalidations = 0

    def get(self, key: tuple, model) -> torch.Tensor | None:
        entry = self.entries.get(key)
        if entry is not None and entry[0].unchanged(model):
            self.entries.move_to_end(key)
            self.hits += 1
            return entry[1]
        if entry is not None:
            self.invalidations += 1
            self._drop(key)
        self.misses += 1
        return None

    def put(self, key: tuple, state: _AdapterState, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if key in self.entries:
            self._drop(key)
        if size > self.max_bytes:
            return  # larger than the whole cache: used for this call only
        while self.bytes + size > self.max_bytes:
            self._drop(next(iter(self.entries)))
            self.evictions += 1
        self.entries[key] = (state, features)
        self.bytes += size

    def drop_adapter(self, adapter_name: str) -> None:
        for key in [k for k in self.entries if k[0] == adapter_name]:
            self._drop(key)

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def _drop(self, key: tuple) -> None:
        _, features = self.entries.pop(key)
        self.bytes -= features.numel() * features.element_size()


class _AdapterState:
    """What one adapter's text features were computed from: on each adapted layer the text forward
    ran, the singular-value change of that adapter and the base weight, with their version counters
    and storage. Reloading, deleting, replacing or editing in place (an optimizer step,
    `load_state_dict`, `copy_`) any of them makes `unchanged` false."""

    __slots__ = ("adapter_name", "records")

    def __init__(self, adapter_name: str, layers: Iterable[SVDLayer]):
        self.adapter_name = adapter_name
        self.records = tuple(
            (layer, _tensor_state(layer.svd_delta[adapter_name]), _tensor_state(layer.get_base_layer().weight))
            for layer in layers
            if adapter_name in layer.svd_delta
        )

    def unchanged(self, model) -> bool:
        if self.adapter_name not in model.peft_config:
            return False
        for layer, delta, weight in self.records:
            current = layer.svd_delta[self.adapter_name] if self.adapter_name in layer.svd_delta else None
            if current is None or not _same_tensor(delta, current):
                return False
            if not _same_tensor(weight, layer.get_base_layer().weight):
                return False
        return True


def _tensor_state(t: torch.Tensor) -> tuple:
    # the object itself (kept alive, so no other tensor can take its id), its in-place version and storage
    return (t, t._version, t.data_ptr())


def _same_tensor(state: tuple, t: torch.Tensor) -> bool:
    return state[0] is t and state[1:] == (t._version, t.data_ptr())


@contextlib.contextmanager
def _per_sample_adapters(peft_model, adapter_names: list[str]):
    """Runs every adapted layer of `peft_model` with one adapter per sample (PEFT's `adapter_names`,
    as `PeftModel.forward` and `get_image_features(..., adapter_names=...)` apply it), for any
    model layout, so that `models.image_features` / `models.text_features` run mixed batches."""
    with peft_model.base_model._enable_peft_forward_hooks(adapter_names=adapter_names):
        yield


@contextlib.contextmanager
def _recording_adapted_layers(peft_model, seen: set):
    """Adds to `seen` every SVD layer that runs (inside any PEFT wrapper that runs) while inside."""
    wrappers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]

    def record(module, args):
        seen.update(layer for _, layer in iter_svd_layers(module))

    handles = [m.register_forward_pre_hook(record) for m in wrappers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class MultiAdapterClassifier:
    """Many tenants' SVD adapters on one base model, classifying `(tenant, image)` batches.

    Args:
        encoder: the base model with its tokenizer and image preprocessing
            (`peft_svd.fewshot.models.load_dual_encoder`); its model is wrapped in place by PEFT
            when the first adapter is loaded, so do not use it elsewhere.
        device: where to run (default: where the model is).
        max_cache_mb: the most memory, in MiB, the class-prompt features of all tenants may take;
            the least recently used are dropped beyond it (a tenant whose features alone exceed
            it recomputes them at every call).

    Thread safety: calls are serialised by one lock (`classify` runs one forward at a time).
    """

    def __init__(self, encoder: models.DualEncoder, *, device: torch.device | str | None = None,
                 max_cache_mb: float = DEFAULT_CACHE_MB):
        models.model_library(encoder.model)  # refuses models without CLIP's interface
        if max_cache_mb < 0:
            raise ValueError(f"max_cache_mb must be >= 0, got {max_cache_mb}")
        self.encoder = encoder
        self.device = torch.device(device) if device is not None else next(encoder.model.parameters()).device
        encoder.model.to(self.device).eval()
        self.model = None  # the PeftModel, once an adapter is loaded
        self._tenants: dict[str, Tenant] = {}
        self._next_id = 0
        self._cache = _TextFeatureCache(int(max_cache_mb * 2**20))
        self._lock = threading.RLock()

    @classmethod
    def from_pretrained(cls, model: str = "peft-svd/builtin", adapters: str | Mapping[str, str] | None = None, *,
                        pretrained: str | None = None, **kwargs) -> MultiAdapterClassifier:
        """Loads the base model (`models.load_dual_encoder(model, pretrained=pretrained)`) and, if
        given, adapters: a folder of adapter folders (`load_adapters_from`) or `{tenant: adapter}`.
        Other keyword arguments go to the constructor."""
        classifier = cls(models.load_dual_encoder(model, pretrained=pretrained), **kwargs)
        if isinstance(adapters, str):
            classifier.load_adapters_from(adapters)
        elif adapters is not None:
            with classifier._all_or_none():
                for tenant, source in adapters.items():
                    classifier.load_adapter(tenant, source)
        return classifier

    # -- tenants ---------------------------------------------------------------------------------

    @property
    def tenants(self) -> dict[str, Tenant]:
        """The loaded tenants by name."""
        return dict(self._tenants)

    def __contains__(self, tenant: str) -> bool:
        return tenant in self._tenants

    def load_adapter(self, tenant: str, adapter: str, *, class_names: Sequence[str] | None = None,
                     template: str | None = None, replace: bool = False) -> Tenant:
        """Loads an adapter (folder or Hub id) as `tenant`.

        The class names and template are those given, else those recorded beside the adapter by
        `examples/fewshot.py` (results.json); a template not given and not recorded is
        `fewshot.templates.DEFAULT_TEMPLATE`. With `replace`, a tenant of that name is replaced
        once the new adapter has loaded (a failed reload leaves the old one serving).

        Returns:
            The new `Tenant`.

        Raises:
            ValueError: a bad tenant name, an existing tenant without `replace`, bad class names
                or template.
            AdapterLoadError: the adapter is missing, is not an SVD adapter, or was made for
                another base model (PEFT's and the tuner's checks); nothing is left loaded.
        """
        with self._lock:
            if not valid_tenant_name(tenant):
                raise ValueError(
                    f"tenant name {tenant!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or "
                    "digit, without '..'"
                )
            if tenant in self._tenants and not replace:
                raise ValueError(f"tenant {tenant!r} is already loaded; pass replace=True to reload it")
            names, template = self._classes_for(adapter, class_names, template)
            adapter_name = f"tenant{self._next_id:06d}"  # same length: no name is a part of another
            self._next_id += 1
            self._load_into_model(tenant, adapter, adapter_name)
            old = self._tenants.get(tenant)
            base, _ = models.read_adapter_base(adapter) if os.path.isdir(adapter) else (None, None)
            self._tenants[tenant] = Tenant(tenant, adapter, tuple(names), template, adapter_name, base)
            if old is not None:
                self._delete_adapter(old.adapter_name)
            return self._tenants[tenant]

    def load_adapters_from(self, folder: str) -> list[str]:
        """Loads every subfolder of `folder` that holds an adapter (adapter_config.json) as the tenant
        named after it, in name order; other subfolders are skipped with a warning, files ignored.
        All or none: if one adapter fails, those loaded by this call are unloaded again.

        Returns:
            The tenants loaded.
        """
        if not os.path.isdir(folder):
            raise AdapterLoadError(f"adapter folder {folder} does not exist or is not a folder")
        loaded = []
        with self._lock, self._all_or_none():
            for entry in sorted(os.listdir(folder)):
                path = os.path.join(folder, entry)
                if entry.startswith(".") or not os.path.isdir(path):
                    continue
                if not os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
                    warnings.warn(f"{path} has no {ADAPTER_CONFIG}; not an adapter, skipped", category=PeftSVDWarning, stacklevel=2)
                    continue
                self.load_adapter(entry, path)
                loaded.append(entry)
        return loaded

    def unload_adapter(self, tenant: str) -> None:
        """Removes a tenant and its adapter (and its cached features)."""
        with self._lock:
            removed = self._tenants.pop(tenant, None)
            if removed is None:
                raise UnknownTenantError(self._unknown(tenant))
            self._delete_adapter(removed.adapter_name)

    def set_classes(self, tenant: str, class_names: Sequence[str], template: str | None = None) -> Tenant:
        """Changes the classes (and, if given, the template) a tenant chooses from."""
        with self._lock:
            current = self._tenant(tenant)
            names, template = self._classes_for(current.source, class_names, template or current.template)
            self._tenants[tenant] = Tenant(tenant, current.source, tuple(names), template, current.adapter_name,
                                           current.base_model)
            return self._tenants[tenant]

    # -- classification --------------------------------------------------------------------------

    @torch.no_grad()
    def classify(self, requests: Sequence[tuple[str, Image.Image | bytes | torch.Tensor]]) -> list[Classification]:
        """Classifies `(tenant, image)` pairs, any tenants mixed, with one image forward for the batch.

        An image is a PIL image, the bytes of an image file (`decode_image`), or pixel values
        (3, H, W) already preprocessed as the model's image processor does. Every request is
        checked before any work is done.

        Returns:
            One `Classification` per request, in order.

        Raises:
            UnknownTenantError, BadImageError: with the `index` of the first bad request.
        """
        with self._lock:
            if not requests:
                return []
            tenants = [self._tenant(t, index=i) for i, (t, _) in enumerate(requests)]
            pixel_values = self._pixel_values([image for _, image in requests])
            heads = self._text_heads(list({t.name: t for t in tenants}.values()))
            names = [t.adapter_name for t in tenants]
            with _per_sample_adapters(self.model, names):
                images = encode_images(self.model, pixel_values.to(self.device))
            scale = logit_scale(self.model)
            results = []
            for i, tenant in enumerate(tenants):
                probabilities = (scale * images[i] @ heads[tenant.name].T).float().softmax(-1).cpu()
                index = int(probabilities.argmax())
                results.append(Classification(tenant.name, tenant.class_names[index], index, probabilities,
                                              tenant.class_names, len(requests)))
            return results

    @torch.no_grad()
    def text_head(self, tenant: str) -> torch.Tensor:
        """The tenant's normalised class-prompt features, (classes, dim), computed with its adapter
        active (from the cache when it holds valid ones)."""
        with self._lock:
            return self._text_heads([self._tenant(tenant)])[tenant]

    def cache_info(self) -> CacheInfo:
        """The class-prompt feature cache's counters and size."""
        c = self._cache
        return CacheInfo(c.hits, c.misses, c.evictions, c.invalidations, len(c.entries), c.bytes, c.max_bytes)

    def clear_cache(self) -> None:
        """Drops every cached class-prompt feature."""
        with self._lock:
            self._cache.clear()

    # -- internals -------------------------------------------------------------------------------

    def _tenant(self, name: str, index: int | None = None) -> Tenant:
        tenant = self._tenants.get(name) if isinstance(name, str) else None
        if tenant is None:
            raise UnknownTenantError(self._unknown(name), index)
        return tenant

    def _unknown(self, name) -> str:
        known = sorted(self._tenants)
        listed = ", ".join(known[:10]) + (f", ... ({len(known)} in all)" if len(known) > 10 else "")
        return f"unknown tenant {name!r}; loaded: {listed or 'none'}"

    def _classes_for(self, adapter: str, class_names, template) -> tuple[list[str], str]:
        if class_names is None:
            saved = saved_tenant_classes(adapter)
            if saved is None:
                raise AdapterLoadError(
                    f"adapter {adapter} records no class names (no {RESULTS_FILE} of examples/fewshot.py beside it); "
                    "pass class_names"
                )
            class_names, saved_template = saved
            template = template or saved_template
        if isinstance(class_names, str):
            raise ValueError(f"class_names must be a list of names, not the string {class_names!r}")
        names = [str(n) for n in class_names]
        if len(names) < 2 or any(not n.strip() for n in names):
            raise ValueError(f"a tenant needs at least two non-empty class names, got {names[:5]}")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"class names must be distinct; repeated: {', '.join(duplicates[:5])}")
        return names, check_template(template or DEFAULT_TEMPLATE)

    def _load_into_model(self, tenant: str, adapter: str, adapter_name: str) -> None:
        """Loads `adapter` as `adapter_name` through PEFT's `load_adapter` (the tuner's checks of
        the base model apply); on failure the model is left as it was."""
        config = self._adapter_config(adapter)
        first = self.model is None
        try:
            if first:
                # PeftModel.from_pretrained would leave the base model wrapped if the weights failed
                # its checks; wrapping first keeps a handle to unwrap it by.
                config.inference_mode = True
                with warnings.catch_warnings():
                    # get_peft_model's note that the adapter records another base model name than
                    # this one's: the fingerprints, checked below, decide whether it fits
                    warnings.filterwarnings("ignore", message="The PEFT config's `base_model_name_or_path` was renamed")
                    self.model = models.adapt(self.encoder.model, config, adapter_name=adapter_name)
            with warnings.catch_warnings():
                # PEFT's own warning that a missing key was expected; the tuner raises on what matters
                warnings.filterwarnings("ignore", message="Found missing adapter keys")
                self.model.load_adapter(adapter, adapter_name=adapter_name, torch_device=str(self.device))
        except Exception as exc:
            self._discard_failed(adapter_name, first)
            hint = ""
            base, _ = models.read_adapter_base(adapter) if os.path.isdir(adapter) else (None, None)
            if base and base != self.encoder.name:
                hint = f" The adapter records base model {base!r}."
            reason = str(exc).rstrip(".").replace(repr(adapter_name), repr(tenant))  # the name the user knows
            raise AdapterLoadError(
                f"adapter {adapter} (tenant {tenant!r}) cannot be loaded onto base model {self.encoder.name}: {reason}.{hint}"
            ) from exc
        self.model.eval()

    def _adapter_config(self, adapter: str) -> SVDConfig:
        if os.path.isdir(adapter) and not os.path.isfile(os.path.join(adapter, ADAPTER_CONFIG)):
            raise AdapterLoadError(f"{adapter} has no {ADAPTER_CONFIG}; give the folder of a saved adapter")
        if not os.path.isdir(adapter) and (os.path.isabs(adapter) or adapter.startswith(".") or adapter.count("/") != 1):
            raise AdapterLoadError(f"adapter {adapter} is neither a folder nor a Hub id (<owner>/<name>)")
        try:
            config = PeftConfig.from_pretrained(adapter)
        except Exception as exc:  # not found, unreadable, unknown peft_type
            raise AdapterLoadError(f"cannot read the adapter config of {adapter}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(config, SVDConfig):
            raise AdapterLoadError(
                f"adapter {adapter} is a {getattr(config, 'peft_type', type(config).__name__)} adapter; "
                "MultiAdapterClassifier serves SVD adapters (peft-svd)"
            )
        return config

    def _discard_failed(self, adapter_name: str, first: bool) -> None:
        if self.model is None:
            return
        if first:
            self.model.unload()  # the base model's modules as they were
            self.model = None
        elif adapter_name in self.model.peft_config:
            self.model.delete_adapter(adapter_name)

    def _delete_adapter(self, adapter_name: str) -> None:
        self._cache.drop_adapter(adapter_name)
        if len(self.model.peft_config) == 1:
            self.model.unload()
            self.model = None
            return
        with warnings.catch_warnings():
            # PEFT warns when the deleted adapter was the active one; mixed batches do not use it
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            self.model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def _all_or_none(self):
        before = set(self._tenants)
        try:
            yield
        except BaseException:
            for name in [n for n in self._tenants if n not in before]:
                self.unload_adapter(name)
            raise

    def _pixel_values(self, images: Sequence) -> torch.Tensor:
        """(batch, 3, H, W) pixel values of the requests' images (see `classify`)."""
        processed = []
        for i, image in enumerate(images):
            try:
                processed.append(self._one_image(image))
            except BadImageError as exc:
                raise BadImageError(exc.detail, i) from exc
        shapes = {tuple(p.shape) for p in processed}
        if len(shapes) > 1:
            first = tuple(processed[0].shape)
            index = next(i for i, p in enumerate(processed) if tuple(p.shape) != first)
            raise BadImageError(
                f"pixel values of shape {tuple(processed[index].shape)}, but request 0 has {first}; "
                "send images (the server preprocesses them) or pixel values of the model's size", index
            )
        return torch.stack(processed)

    def _one_image(self, image) -> torch.Tensor:
        if isinstance(image, (bytes, bytearray, memoryview)):
            image = decode_image(bytes(image))
        if isinstance(image, Image.Image):
            if image.width < 1 or image.height < 1:
                raise BadImageError(f"the image is empty ({image.width}x{image.height})")
            try:
                return self.encoder.image_processor(images=to_rgb(image), return_tensors="pt")["pixel_values"][0]
            except Exception as exc:
                raise BadImageError(f"the image processor cannot read the image ({type(exc).__name__}: {exc})") from exc
        if torch.is_tensor(image):
            if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
                raise BadImageError(
                    f"pixel values must be a float tensor (3, H, W); got {tuple(image.shape)} {image.dtype}"
                )
            if not torch.isfinite(image).all():
                raise BadImageError("pixel values hold NaN or inf")
            return image
        raise BadImageError(
            f"an image must be a PIL image, the bytes of an image file or a (3, H, W) tensor, not {type(image).__name__}"
        )

    def _text_heads(self, tenants: list[Tenant]) -> dict[str, torch.Tensor]:
        """Each tenant's normalised class-prompt features; those not validly cached are computed in
        mixed text forwards (one adapter per prompt) and cached."""
        heads, missing = {}, []
        for tenant in tenants:
            key = (tenant.adapter_name, tenant.class_names, tenant.template)
            cached = self._cache.get(key, self.model)
            if cached is not None:
                heads[tenant.name] = cached
            else:
                missing.append(tenant)
        if not missing:
            return heads
        prompts, names = [], []
        for tenant in missing:
            tenant_prompts = build_prompts(list(tenant.class_names), tenant.template)
            prompts += tenant_prompts
            names += [tenant.adapter_name] * len(tenant_prompts)
        seen: set = set()
        features = []
        with _recording_adapted_layers(self.model, seen):
            for start in range(0, len(prompts), _TEXT_BATCH):
                tokens = tokenize_prompts(self.encoder.tokenizer, prompts[start : start + _TEXT_BATCH])
                with _per_sample_adapters(self.model, names[start : start + _TEXT_BATCH]):
                    features.append(encode_text(self.model, tokens["input_ids"].to(self.device),
                                                tokens["attention_mask"].to(self.device)))
        features = torch.cat(features)
        start = 0
        for tenant in missing:
            head = features[start : start + len(tenant.class_names)].clone()
            start += len(tenant.class_names)
            key = (tenant.adapter_name, tenant.class_names, tenant.template)
            self._cache.put(key, _AdapterState(tenant.adapter_name, seen), head)
            heads[tenant.name] = head
        return heads


@dataclass
class BatchStats:
    """What a `RequestBatcher` has run: `batches` mixed forwards answering `requests` requests;
    `sizes[n]` is how many batches held n requests."""

    batches: int = 0
    requests: int = 0
    sizes: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"batches": self.batches, "requests": self.requests, "max_batch_size": max(self.sizes, default=0),
                "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())}}


class RequestBatcher:
    """Gathers `(tenant, image)` requests from concurrent asyncio tasks into mixed batches.

    A batch starts with the first waiting request and takes every request that arrives within
    `max_wait_ms` of it, up to `max_batch`; it runs in a worker thread (`classifier.classify`)
    while the next batch gathers. A request that cannot be served (unknown tenant, bad image) fails
    alone; the rest of its batch runs without it.

    Use inside a running event loop: `await batcher.start()`, `await batcher.classify(tenant,
    image)`, `await batcher.stop()`.
    """

    def __init__(self, classifier: MultiAdapterClassifier, *, max_batch: int = 32, max_wait_ms: float = 5.0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.classifier = classifier
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_ms) / 1000
        self.stats = BatchStats()
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Starts the batching task on the running loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stops the batching task; requests still waiting fail with `RuntimeError`."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue is not None and not self._queue.empty():
            _, _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError("the server is shutting down"))

    async def classify(self, tenant: str, image) -> Classification:
        """Queues one request and returns its `Classification` once its batch has run.

        Raises:
            UnknownTenantError, BadImageError: this request cannot be served.
        """
        if self._task is None:
            raise RuntimeError("RequestBatcher.start() was not awaited")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((tenant, image, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            await self._answer([item for item in batch if not item[2].done()])  # done: the client left

    async def _answer(self, batch: list) -> None:
        while batch:
            try:
                results = await asyncio.to_thread(self.classifier.classify, [(t, image) for t, image, _ in batch])
            except RequestError as exc:
                if exc.index is None:
                    self._fail(batch, exc)
                    return
                self._fail([batch[exc.index]], exc)
                batch = batch[: exc.index] + batch[exc.index + 1 :]
                continue
            except Exception as exc:  # the forward itself failed: every request of the batch learns why
                self._fail(batch, exc)
                return
            self.stats.batches += 1
            self.stats.requests += len(batch)
            self.stats.sizes[len(batch)] = self.stats.sizes.get(len(batch), 0) + 1
            for (_, _, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
            return

    @staticmethod
    def _fail(items: list, exc: Exception) -> None:
        for _, _, future in items:
            if not future.done():
                future.set_exception(exc)
