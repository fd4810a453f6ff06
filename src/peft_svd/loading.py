"""What an SVD adapter file may hold, and the checks it passes before any of it is loaded.

Loading a file changes nothing but what the file is declared to change. An SVD adapter holds, per
adapted layer, its singular-value change `svd_delta` and a fingerprint of the base weight it was
trained on (`svd_fingerprint`), once per adapter a fingerprint of the rest of the base model
(`svd_model_fingerprint`), and the tensors of the modules its config declares in
`modules_to_save`. Anything else is refused, by name, and so is a file that lacks a change for a
layer its config adapts.

Two places run the checks, both before anything is written into the model:

- `check_adapter_file`, on the safetensors header (names, dtypes, shapes; no tensor is read), when
  `SVDConfig.from_pretrained` reads a local adapter folder, which `PeftModel.from_pretrained` and
  `PeftModel.load_adapter` do before they read the weights;
- `check_adapter_state_dict`, on the tensors and the model they are loaded onto, from the tuner's
  `SVDModel._remap_adapter_state_dict_for_load`, which PEFT's `set_peft_model_state_dict` calls
  before `load_state_dict`. Its per-layer part, `check_layer_state`, also runs in each layer's
  load pre-hook, for state dicts loaded without PEFT.

The fingerprint of a layer also records how it is split in output blocks (`out_splits`), the one
setting of adapter_config.json that changes what the stored numbers mean without changing their count.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Mapping

import torch
from safetensors import SafetensorError, safe_open

from ._registry import SVD_PEFT_TYPE
from .errors import PeftSVDWarning
from .factorization import intra_op_threads

__all__ = [
    "ADAPTER_FILE",
    "base_fingerprint",
    "check_adapter_file",
    "check_adapter_folder",
    "check_adapter_state_dict",
    "check_layer_state",
    "fingerprints_match",
    "model_fingerprint",
    "output_limit",
]

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
# the tensors of one adapted layer, by their attribute on the layer (and last part of the saved key)
_LAYER_KEYS = ("svd_delta", "svd_fingerprint", "svd_model_fingerprint")
_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_FINGERPRINT_SIZE = 6  # norm, sum, three sketches, machine epsilon
_SHOWN = 3  # names listed in a message before "and N more"


# -- fingerprints: a few numbers that identify the base weight an adapter was trained on ---------


def base_fingerprint(weight: torch.Tensor, out_splits=None) -> torch.Tensor:
    """A few float64 numbers that identify a weight, stored as their int64 bit patterns `(6,)`.

    Frobenius norm, element sum, three random +-1 sketches `p^T W q` (fixed per shape), and the
    machine epsilon of the weight's dtype (which sets how close two fingerprints must be). A weight
    split in output blocks (`out_splits`) appends the row count of each block, `(6 + blocks,)`, so
    that an adapter is loaded only with the split it was trained with.
    """
    # One intra-op thread on the CPU: these few small products gain nothing from more, and on a
    # CPU shared with other jobs each of them would wait at barriers (20x slower on 2 busy cores).
    with intra_op_threads(1) if weight.device.type == "cpu" else contextlib.nullcontext():
        values = _fingerprint(weight)
    if out_splits:
        values = torch.cat([values, torch.tensor(list(out_splits), dtype=torch.int64)])
    return values


def _fingerprint(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach().to(torch.float64)
    out_f, in_f = w.shape
    gen = torch.Generator().manual_seed(out_f * 1_000_003 + in_f)
    p = (torch.randint(0, 2, (3, out_f), generator=gen) * 2 - 1).to(w)
    q = (torch.randint(0, 2, (3, in_f), generator=gen) * 2 - 1).to(w)
    sketches = ((p @ w) * q).sum(-1)
    values = torch.cat(
        [
            torch.stack([w.norm(), w.sum()]),
            sketches,
            torch.tensor([torch.finfo(weight.dtype).eps], dtype=torch.float64, device=w.device),
        ]
    )
    return values.cpu().view(torch.int64)


def model_fingerprint(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One fingerprint of many tensors (the base model's parameters outside the adapted layers) `(6,)`.

    The sum of the tensors' `base_fingerprint`s (each seen as a matrix `(shape[0], -1)`), with the
    largest machine epsilon among their dtypes: compared by `fingerprints_match` like that of one
    weight, so a copy in lower precision matches and a changed tensor does not.
    """
    total = torch.zeros(_FINGERPRINT_SIZE, dtype=torch.float64)
    for t in tensors:
        matrix = t.detach().reshape(t.shape[0] if t.ndim > 1 else 1, -1)
        values = base_fingerprint(matrix).view(torch.float64)
        total[:-1] += values[:-1]
        total[-1] = max(float(total[-1]), float(values[-1]))
    return total.view(torch.int64)


def fingerprints_match(saved: torch.Tensor, current: torch.Tensor) -> bool:
    """Whether two fingerprints describe the same weight (and split), up to a rounding of it to a lower precision."""
    if saved.shape != current.shape or saved.dtype != torch.int64 or saved.numel() < _FINGERPRINT_SIZE:
        return False
    saved, current = saved.detach().cpu(), current.detach().cpu()
    if not torch.equal(saved[_FINGERPRINT_SIZE:], current[_FINGERPRINT_SIZE:]):
        return False
    a = saved[:_FINGERPRINT_SIZE].view(torch.float64)
    b = current[:_FINGERPRINT_SIZE].view(torch.float64)
    scale = max(float(a[0]), float(b[0]), 1e-30)
    # a rounding to a dtype moves each sketch by about eps * ||W||_F; allow 4x that (and 1e-5 floor)
    tol = max(4 * max(float(a[-1]), float(b[-1])), 1e-5) * scale
    return bool(((a[:-1] - b[:-1]).abs() <= tol).all())


# -- the file, before any tensor is read -----------------------------------------------------------


def read_header(file: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """`{name: (dtype, shape)}` of every tensor in a safetensors file, read from its header only.

    `dtype` is safetensors' name (`"F32"`, `"I64"`, ...). Raises `ValueError` naming the file if
    it is not a readable safetensors file (truncated, damaged, another format).
    """
    try:
        with safe_open(str(file), framework="pt") as f:
            header = {}
            for name in f.keys():
                view = f.get_slice(name)
                header[name] = (view.get_dtype(), tuple(view.get_shape()))
            return header
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{file} is not a readable safetensors file ({err}): it is truncated or damaged. Use another copy."
        ) from err


def check_adapter_file(file: str | os.PathLike, modules_to_save=None) -> None:
    """Refuse an adapter file whose header holds anything an SVD adapter does not hold.

    Reads only the header: an unknown tensor of any size costs nothing. Checks that every tensor is
    a singular-value change (floating point, one dimension), a fingerprint (int64), or a tensor of
    a module named in `modules_to_save` (the config's); that there is at least one change; and that every
    module in `modules_to_save` has its tensors. Which layers the changes are for, and their sizes,
    are checked against the model when the tensors are loaded (`check_adapter_state_dict`).

    Raises:
        ValueError: naming the file and the first offending tensors.
    """
    header = read_header(file)
    saved_modules = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save or [])
    unknown, deltas, held = [], [], set()
    for key, (dtype, shape) in header.items():
        kind = key.rpartition(".")[2]
        layer = _layer_of(key)
        if kind == "svd_delta":
            deltas.append(key)
            if dtype not in _FLOAT_DTYPES or len(shape) != 1:
                raise ValueError(
                    f"{file} holds the singular-value changes of layer '{layer}' as {dtype} of shape {list(shape)}; "
                    "they are a vector of floating-point numbers (F32 as saved by peft-svd). The file was edited "
                    "or damaged: refused. Use another copy of the adapter."
                )
        elif kind in ("svd_fingerprint", "svd_model_fingerprint"):
            if dtype != "I64" or len(shape) != 1 or shape[0] < _FINGERPRINT_SIZE:
                raise ValueError(_fingerprint_format_message(f"{file} holds", kind, layer, dtype, shape))
        else:
            module = _declared_module(key, saved_modules)
            if module is None:
                unknown.append(key)
            else:
                held.add(module)
    if unknown:
        raise ValueError(
            f"{file} holds {len(unknown)} tensor(s) that an SVD adapter does not hold: {_names(unknown)}. "
            "Loading them would overwrite weights of the base model that the adapter does not declare it changes "
            "(an SVD adapter holds singular-value changes, fingerprints, and the modules named in modules_to_save): "
            "refused. Use another copy of the adapter, or remove those tensors if you know where they come from."
        )
    if not deltas:
        raise ValueError(
            f"{file} holds no singular-value change (no '*.svd_delta' tensor): loaded, it would change nothing "
            "(or, with init_weights=false, add noise). It is not an SVD adapter, or it was emptied: refused."
        )
    missing = [m for m in saved_modules if m not in held]
    if missing:
        raise ValueError(
            f"The adapter's config declares modules_to_save {missing}, but {file} holds no tensor of "
            f"{'that module' if len(missing) == 1 else 'those modules'}: the config was edited or the file is "
            "incomplete: refused. Use another copy of the adapter."
        )


def _declared_module(key: str, modules_to_save: list[str]) -> str | None:
    """The entry of `modules_to_save` that a saved tensor belongs to, or None.

    PEFT selects a module to save when its name ends with the entry; its tensors are saved under
    `<module name>.<tensor name>`.
    """
    parts = key.removeprefix("base_model.model.").split(".")
    for i in range(1, len(parts)):
        module = ".".join(parts[:i])
        for entry in modules_to_save:
            if module.endswith(entry):
                return entry
    return None


def check_adapter_folder(folder: str | os.PathLike) -> dict:
    """Check a local adapter folder the way the project's own loaders need it; returns its config as a dict.

    Refuses a folder whose adapter_config.json is not readable JSON, and one that holds SVD
    singular-value changes under a `peft_type` other than "SVD" (PEFT would load it as an empty
    adapter of that type). For an SVD adapter, the file is then checked by `check_adapter_file`.

    Raises:
        ValueError: naming the file and what is wrong.
    """
    folder = os.fspath(folder)
    config_file = os.path.join(folder, CONFIG_FILE)
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_file} cannot be read ({err}); use another copy of the adapter.") from err
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} holds a {type(config).__name__}, not a JSON object; use another copy.")
    weights = os.path.join(folder, ADAPTER_FILE)
    peft_type = config.get("peft_type")
    check_peft_type(peft_type, config_file)
    if os.path.isfile(weights):
        if peft_type != SVD_PEFT_TYPE and any(k.endswith(".svd_delta") for k in read_header(weights)):
            raise ValueError(
                f"{weights} holds SVD singular-value changes, but {config_file} declares peft_type {peft_type!r}: "
                f"loaded as {peft_type}, it would be an adapter that changes nothing. The config was edited: "
                "refused. Use another copy of the adapter."
            )
        if peft_type == SVD_PEFT_TYPE:
            check_adapter_file(weights, config.get("modules_to_save"))
    return config


def check_peft_type(peft_type, where: str) -> None:
    """Refuse a misspelt SVD type (`"svd"`), which PEFT would report as a bare `KeyError`."""
    if isinstance(peft_type, str) and peft_type != SVD_PEFT_TYPE and peft_type.upper() == SVD_PEFT_TYPE:
        raise ValueError(
            f"{where} declares peft_type {peft_type!r}; the type of an SVD adapter is 'SVD' (upper case), as "
            "peft-svd writes it. The file was edited or written by other software: check where it comes from, "
            "and set \"peft_type\": \"SVD\" if you trust it."
        )


# -- the tensors, against the model they are loaded onto --------------------------------------------


def check_adapter_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    adapter_name: str,
    layers: Mapping[str, object],
    module_keys: set[str],
    verify: bool = True,
    recorded_base: str | None = None,
) -> dict[str, torch.Tensor]:
    """Check an adapter's state dict, with keys already mapped onto the model, before it is loaded.

    Args:
        state_dict: the adapter's tensors, keyed as in the model's state dict (PEFT's remapping done).
        adapter_name: the name the adapter is loaded under.
        layers: `{qualified name: SVD layer}` of every layer that `adapter_name` adapts.
        module_keys: the model's state-dict keys of `adapter_name`'s `modules_to_save` copies.
        verify: the loading user's `verify_base_model` (runtime setting): whether fingerprints that
            differ, and changes for layers the model lacks, are errors (True) or warnings.
        recorded_base: the base model the adapter's config records, named in the errors.

    Returns:
        The state dict to load: with `verify=False`, without changes for layers the model lacks
        and with the model's own fingerprints where they differ.

    Raises:
        ValueError: a tensor that is none of the adapter's (it would overwrite a base weight), a
            layer or module without its tensors, a change that is not floating point, has the
            wrong size, is not finite or would make the layer's weight absurdly large, a
            fingerprint in the wrong format or (with `verify`) of another base model.
    """
    expected: dict[str, tuple[str, str]] = {}
    for name, layer in layers.items():
        for kind in _LAYER_KEYS:
            if adapter_name in getattr(layer, kind):
                expected[_join(name, f"{kind}.{adapter_name}")] = (name, kind)
    unknown, orphans = [], []
    for key in state_dict:
        if key in expected or key in module_keys:
            continue
        # a key that PEFT could not map onto a layer of this model keeps its saved form
        (orphans if key.rpartition(".")[2] in _LAYER_KEYS else unknown).append(key)
    if unknown:
        raise ValueError(
            f"The SVD adapter {adapter_name!r} holds {len(unknown)} tensor(s) that are not its own: "
            f"{_names(_layer_of(k) for k in unknown)}. Loading them would overwrite weights of the base model (or "
            "of another adapter) that the adapter does not declare it changes: refused. An SVD adapter holds "
            "singular-value changes, fingerprints, and the modules named in modules_to_save."
        )
    state = dict(state_dict)
    if orphans:
        layer_names = sorted({_layer_of(k) for k in orphans if k.endswith(".svd_delta")} or {_layer_of(k) for k in orphans})
        message = (
            f"The SVD adapter {adapter_name!r} changes {len(layer_names)} layer(s) that this model does not have "
            f"or does not adapt ({_names(layer_names)}): it was made for a different base model"
            f"{_recorded(recorded_base)}, and loading it would silently drop those changes. Load it onto the model "
            "it was trained on"
        )
        if verify:
            raise ValueError(message + ", or set verify_base_model=False on the config you load with to load the rest.")
        warnings.warn(message + "; loading the rest (verify_base_model=False).", category=PeftSVDWarning, stacklevel=3)
        for key in orphans:
            del state[key]

    missing = [name for name, layer in layers.items() if _join(name, f"svd_delta.{adapter_name}") not in state]
    if missing:
        raise ValueError(
            f"The SVD adapter {adapter_name!r} holds no singular-value change for {len(missing)} of the "
            f"{len(layers)} layers its config adapts ({_names(_strip(n) for n in missing)}): loaded, they would keep "
            "the initial change (zero, or noise with init_weights=false) instead of the trained one. The file is "
            "incomplete or its config was edited (target_modules, layers_to_transform): refused."
        )
    absent_modules = sorted(k for k in module_keys if k not in state)
    if absent_modules:
        raise ValueError(
            f"The SVD adapter {adapter_name!r} declares modules_to_save, but holds no tensor "
            f"{_names(_strip(k) for k in absent_modules)}: refused. The file is incomplete or its config was edited."
        )

    unchecked = 0
    has_model_fingerprint = False
    for name, layer in layers.items():
        entries = {kind: state.get(_join(name, f"{kind}.{adapter_name}")) for kind in _LAYER_KEYS}
        unchecked += entries["svd_fingerprint"] is None
        has_model_fingerprint |= entries["svd_model_fingerprint"] is not None
        own = check_layer_state(layer, _strip(name), adapter_name, **entries, verify=verify, recorded_base=recorded_base)
        for kind, value in own.items():
            state[_join(name, f"{kind}.{adapter_name}")] = value
    if layers and (unchecked or not has_model_fingerprint):
        what = f"{unchecked} of its {len(layers)} layers" if unchecked else "the base model"
        warnings.warn(
            f"The SVD adapter {adapter_name!r} carries no fingerprint of {what} it was trained on "
            "(removed from the file?), so whether this is the right base model CANNOT be checked. If it is "
            "not, every output of the adapted model is wrong, without any error. Only use this adapter if "
            "you trust its source.",
            category=PeftSVDWarning, stacklevel=3,
        )
    return state


def check_layer_state(
    layer,
    layer_name: str,
    adapter_name: str,
    svd_delta: torch.Tensor | None = None,
    svd_fingerprint: torch.Tensor | None = None,
    svd_model_fingerprint: torch.Tensor | None = None,
    verify: bool = True,
    recorded_base: str | None = None,
) -> dict[str, torch.Tensor]:
    """Check the tensors of one layer of an adapter about to be loaded into that layer.

    The change must be a floating-point vector of the layer's rank, finite, and keep the adapted
    weight `U diag(s + d) Vh` and the layer's outputs finite: its largest singular value
    `max |s + d|` (which bounds its entries and its gain, so this needs only `s` and `d`) stays
    below `output_limit`.
    Fingerprints must be int64 and record the layer's split; with `verify` they must match the
    layer's base weight.

    Returns:
        `{attribute: the layer's own fingerprint}` for the fingerprints that differ when
        `verify=False` (to be loaded instead of the file's, with a warning); else `{}`.
    """
    if svd_delta is not None:
        _check_delta(layer, layer_name, adapter_name, svd_delta)
    replace = {}
    for kind, saved in (("svd_fingerprint", svd_fingerprint), ("svd_model_fingerprint", svd_model_fingerprint)):
        buffers = getattr(layer, kind)
        if saved is None or adapter_name not in buffers:
            continue
        current = buffers[adapter_name]
        if saved.dtype != torch.int64 or saved.ndim != 1 or saved.numel() < _FINGERPRINT_SIZE:
            raise ValueError(
                _fingerprint_format_message(f"The SVD adapter {adapter_name!r} has", kind, layer_name, saved.dtype, saved.shape)
            )
        if not torch.equal(saved[_FINGERPRINT_SIZE:].cpu(), current[_FINGERPRINT_SIZE:].cpu()):
            raise ValueError(
                f"The SVD adapter {adapter_name!r} was trained with layer '{layer_name}' split in output blocks of "
                f"{_split(saved)} rows, but the config it is loaded with splits it in {_split(current)}: its "
                "singular-value changes would be applied to other directions. The config's out_splits was edited: "
                "refused. Use the adapter's own adapter_config.json."
            )
        if fingerprints_match(saved, current):
            continue
        if kind == "svd_fingerprint":
            differs = f"the weight of layer '{layer_name}' does not match the one the adapter was created on"
        else:
            differs = (
                "its parameters outside the adapted layers (embeddings, norms, heads, ...) do not match "
                "those of the model the adapter was created on"
            )
        message = (
            f"The SVD adapter {adapter_name!r} was trained on a different base model{_recorded(recorded_base)}: "
            f"{differs} (another checkpoint or a fine-tuned copy?)."
        )
        if verify:
            raise ValueError(
                message + " Load the adapter onto the base model it was trained on. To load it anyway, set "
                "verify_base_model=False on the config you load with: `cfg = SVDConfig.from_pretrained(path); "
                "cfg.verify_base_model = False; PeftModel.from_pretrained(model, path, config=cfg)`."
            )
        warnings.warn(message + " Loading anyway (verify_base_model=False).", category=PeftSVDWarning, stacklevel=3)
        # keep the fingerprint of the weights it is now attached to
        replace[kind] = current.clone()
    return replace


def _check_delta(layer, layer_name: str, adapter_name: str, delta: torch.Tensor) -> None:
    where = f"The SVD adapter {adapter_name!r} has"
    if not delta.is_floating_point():
        raise ValueError(
            f"{where} singular-value changes of dtype {delta.dtype} for layer '{layer_name}'; they are floating-point "
            "numbers (float32 as saved by peft-svd). The file was edited or damaged: refused."
        )
    if tuple(delta.shape) != (layer.rank,):
        split = f", split in output blocks of {list(layer.out_splits)} rows" if layer.out_splits else ""
        raise ValueError(
            f"{where} {list(delta.shape)} singular-value changes for layer '{layer_name}', which has {layer.rank} "
            f"singular values{split}: it was made for another model, or its config was edited (out_splits): refused."
        )
    d = delta.detach().to(torch.float64)
    if not torch.isfinite(d).all():
        raise ValueError(
            f"{where} NaN or inf singular-value changes for layer '{layer_name}': the adapter file is damaged. "
            "Use another copy of the adapter."
        )
    if layer.svd_S is None:
        return
    s = layer.svd_S.detach().to(device=d.device, dtype=torch.float64)
    largest = float((s + d).abs().max()) if d.numel() else 0.0
    limit = output_limit(layer.in_features, layer.get_base_layer().weight.dtype)
    # the float32 build of W + U diag(d) Vh adds at most sum|d| to an entry of W (at most max s)
    build = float(s.max()) + float(d.abs().sum()) if d.numel() else 0.0
    if largest >= limit or build >= torch.finfo(torch.float32).max:
        raise ValueError(
            f"{where} singular-value changes for layer '{layer_name}' that make its largest singular value "
            f"{largest:.3g} (the base weight's: {float(s.max()):.3g}): above {limit:.3g}, the layer's outputs or their "
            "squares (in the next norm or attention) are inf for inputs of unit size, and so would be every output "
            "of the model. The adapter file is damaged, or it was not trained on this model: refused."
        )


def output_limit(in_features: int, dtype: torch.dtype) -> float:
    """The largest singular value an adapted layer may have: `min(F / sqrt(n), sqrt(F32 / n))`.

    `n` is `in_features`, `F` the largest number of the layer's (floating) dtype and `F32` that of
    float32. The adapted weight's entries, and its output's norm for an input of unit
    root-mean-square `x` (`|x| = sqrt(n)`, what a norm layer feeds it), are at most `max |s + d|`
    resp. `max |s + d| sqrt(n)`: below this limit that output is finite in the layer's dtype and its
    squares (a following norm or attention score, computed in float32 at least) are finite too.
    """
    big = torch.finfo(dtype if dtype.is_floating_point else torch.float32).max
    big32 = torch.finfo(torch.float32).max
    n = max(int(in_features), 1)
    return min(big / math.sqrt(n), math.sqrt(big32 / n))


def _fingerprint_format_message(where: str, kind: str, layer: str, dtype, shape) -> str:
    what = "the base model's other parameters" if kind == "svd_model_fingerprint" else f"layer '{layer}'"
    return (
        f"{where} a fingerprint of {what} stored as {dtype} of shape {list(shape)}; peft-svd stores fingerprints as "
        f"int64 bit patterns of at least {_FINGERPRINT_SIZE} numbers, so the file was edited or written by other "
        "software, and the base model cannot be checked with it: refused. Use another copy of the adapter."
    )


def _split(fingerprint: torch.Tensor) -> str:
    rows = fingerprint[_FINGERPRINT_SIZE:].tolist()
    return str(rows) if rows else "one block (not split)"


def _recorded(base: str | None) -> str:
    return f" (its config records {base!r})" if base else ""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _strip(name: str) -> str:
    return name.removeprefix("base_model.model.")


def _layer_of(key: str) -> str:
    """The layer (or tensor) a key names, without PEFT's prefix, the tuner's attribute and the adapter name."""
    key = _strip(key)
    for kind in _LAYER_KEYS:
        head, sep, _ = key.partition(f".{kind}")
        if sep:
            return head
    return key


def _names(names) -> str:
    names = list(dict.fromkeys(names))
    shown = ", ".join(f"'{n}'" for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")
