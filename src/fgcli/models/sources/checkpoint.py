"""Checkpoint files -> a state_dict that fits an architecture. The one place files are unwrapped.

What people actually have on disk, and how each is read:

* a plain ``state_dict`` (``torch.save(model.state_dict())``), ``.pth`` / ``.pt`` / ``.bin``
  / ``.ckpt``: ``torch.load(weights_only=True)``, which unpickles tensors and plain
  containers only, never code;
* a dict wrapping one or more of them (``state_dict``, ``model``, ``model_state_dict``,
  ``net``, ``ema``, ``state_dict_ema``, Lightning's full checkpoint with optimizer states
  and hyper-parameters, ...): every nested dict of tensors is a candidate, and the one
  that fits the architecture best is taken, whatever it is called (ties: the first
  non-EMA entry in the file's order);
* key prefixes (Lightning's ``model.`` / ``net.``, DataParallel/DDP's ``module.``,
  ``torch.compile``'s ``_orig_mod.``, any combination): the prefix is *found*, not
  guessed: the one after which the most keys are keys of the architecture;
* ``.safetensors``: read with the ``safetensors`` package (tensors only, by design);
* checkpoints that also pickle other objects (timm's train checkpoints keep their
  ``argparse.Namespace``): read with torch's weights-only allowlist, every other class
  the file names replaced by an inert stand-in, so nothing from the file runs and the
  state dicts come out;
* a whole pickled model (``torch.save(model)``): refused, because unpickling it runs
  code named in the file; ``trust_pickle`` (``--trust-pickle``) loads it with
  ``weights_only=False`` and takes the module's own state_dict (or the module itself,
  for ``--model FILE``);
* TorchScript archives: refused with an explanation (the engine must see every op of
  the forward pass; a scripted module runs as one opaque graph) and the one-liner that
  turns the archive into a state_dict.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fgcli.errors import SetupError

# torch.save's own bookkeeping keys: missing or extra ones never decide a fit
_IGNORED_SUFFIXES = ("num_batches_tracked",)
_MAX_DEPTH = 4  # how deep wrappers are searched for state dicts
# what the unpickler says of bytes that are no pickle at all (as opposed to a pickle of
# objects it may not build)
_NOT_A_PICKLE = ("Unsupported operand", "invalid load key", "truncated", "could not find MARK",
                 "unpickling stack underflow")


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint file holds: candidate state dicts by entry (``""`` is the top
    level, nested entries are joined with ``/``), or a whole module (trusted pickles)."""

    path: Path
    entries: tuple[tuple[str, dict[str, torch.Tensor]], ...]
    module: nn.Module | None = None
    kind: str = "state_dict"  # state_dict | safetensors | pickled module


@dataclass(frozen=True)
class Fit:
    """A state dict fitted to an architecture's keys."""

    state: dict[str, torch.Tensor]
    entry: str  # which wrapper entry it came from ("" = the top level)
    prefix: str  # the prefix stripped from its keys ("" = none)
    matched: int  # keys that are keys of the architecture


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip whose records hold compiled code (``*/code/``)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n or n.endswith("constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def torchscript_message(path: Path | str, option: str) -> str:
    return (f"{option}: {path} is a TorchScript archive; the engine needs the eager model, "
            "because TorchScript runs the forward pass as one compiled graph and hides the "
            "individual ops whose biases FullGrad must see. Save the weights instead "
            "(python -c \"import torch; torch.save(torch.jit.load('"
            f"{path}').state_dict(), 'weights.pth')\") and give the architecture with "
            "--model NAME or --model file.py:factory and that file with --weights")


def _pickle_message(path: Path, option: str, exc: BaseException) -> str:
    found = re.findall(r"GLOBAL ([\w.]+)", str(exc))
    what = f" ({found[0]})" if found else ""
    return (f"{option}: {path} holds pickled Python objects{what}, not only tensors; "
            "unpickling it would run code named in the file, so it is refused. If you "
            "trust the file, add --trust-pickle (loads it with weights_only=False)")


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False,
                    option: str = "--weights") -> Checkpoint:
    """Read a checkpoint file without running code from it (unless ``trust_pickle``).

    Raises SetupError with one line naming the file and the reason.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise SetupError(f"{option}: {p}: no such file")
    if not p.is_file():
        raise SetupError(f"{option}: {p}: not a file")
    if p.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file

            state = load_file(str(p))
        except Exception as exc:  # noqa: BLE001 - header / format errors
            raise SetupError(f"{option}: {p}: not a readable .safetensors file "
                             f"({_first_line(exc)})") from exc
        return Checkpoint(p, (("", dict(state)),), kind="safetensors")
    if is_torchscript(p):
        raise SetupError(torchscript_message(p, option))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
        kind = "state_dict"
    except pickle.UnpicklingError as exc:
        if any(marker in str(exc) for marker in _NOT_A_PICKLE):
            raise SetupError(f"{option}: {p}: not a readable checkpoint (not a torch.save "
                             "file, or a damaged one)") from exc
        if not trust_pickle:
            found = _tensors_only(p)  # e.g. timm's train checkpoints with argparse args
            if found is None:
                raise SetupError(_pickle_message(p, option, exc)) from exc
            entries = tuple(_state_dicts(found))
            if entries:
                return Checkpoint(p, entries, kind="state_dict (other objects skipped)")
            raise SetupError(_pickle_message(p, option, exc)) from exc
        try:
            obj = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as inner:  # noqa: BLE001 - the file's own code may raise anything
            raise SetupError(f"{option}: {p}: cannot unpickle it even with --trust-pickle "
                             f"({type(inner).__name__}: {_first_line(inner)})") from inner
        kind = "pickled module"
    except Exception as exc:  # noqa: BLE001 - truncated zip, not a torch file, ...
        raise SetupError(f"{option}: {p}: not a readable checkpoint ({_first_line(exc)})") \
            from exc
    module = _find_module(obj)
    entries = tuple(_state_dicts(obj))
    if module is not None:
        entries = (("", dict(module.state_dict())),) + entries
    else:
        kind = "state_dict" if kind == "state_dict" else "pickled objects"
    if not entries:
        raise SetupError(f"{option}: {p}: holds no tensors (a {type(obj).__name__}); "
                         "expected a state_dict or a checkpoint wrapping one")
    return Checkpoint(p, entries, module, kind)


class _Skipped:
    """Stands in for an object of a class (or function) the file names that torch's
    weights-only unpickler does not allow (``argparse.Namespace``, a config class): built
    from nothing, its state kept aside, none of its code run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["skipped_state"] = state


def _tensors_only(path: Path) -> Any | None:
    """The file read by torch's own weights-only unpickler, with every global it would
    refuse allowed as an inert :class:`_Skipped` stand-in of that name (torch's
    ``safe_globals``), so no code from the file runs and nothing in this process can be
    changed by it. None when the file holds a whole pickled module (refused on purpose:
    load those with --trust-pickle) or torch cannot list the file's globals."""
    serialization = torch.serialization
    if not hasattr(serialization, "get_unsafe_globals_in_checkpoint"):
        return None
    try:
        names = serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a zip checkpoint, or damaged
        return None
    if any(n.startswith("torch.nn.modules.") for n in names):
        return None  # a whole model: refused with the --trust-pickle message
    stand_ins = [(type(n.rpartition(".")[2] or "Skipped", (_Skipped,), {}), n) for n in names]
    try:
        with serialization.safe_globals(stand_ins):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - anything odd: refuse as before
        return None
    return None if _holds_module_state(obj) else obj


def _holds_module_state(obj: Any, depth: int = 0) -> bool:
    """Whether a stand-in holds an ``nn.Module``'s pickled state (``_parameters``...)."""
    if depth > _MAX_DEPTH:
        return False
    if isinstance(obj, _Skipped):
        state = obj.__dict__.get("skipped_state")
        if isinstance(state, Mapping) and "_parameters" in state and "_modules" in state:
            return True
    if isinstance(obj, Mapping):
        return any(_holds_module_state(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_module_state(v, depth + 1) for v in obj)
    return False


def _find_module(obj: Any, depth: int = 0) -> nn.Module | None:
    """A whole model in a (trusted) pickle: the object itself or a wrapper's entry."""
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping) and depth < _MAX_DEPTH:
        for value in obj.values():
            found = _find_module(value, depth + 1)
            if found is not None:
                return found
    return None


def _state_dicts(obj: Any, entry: str = "", depth: int = 0):
    """Every dict of tensors inside ``obj`` (its tensor entries), with its entry path."""
    if not isinstance(obj, Mapping) or depth > _MAX_DEPTH:
        return
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors:
        yield entry, tensors
    for key, value in obj.items():
        if isinstance(value, Mapping):
            yield from _state_dicts(value, f"{entry}/{key}" if entry else str(key), depth + 1)


def _ignored(key: str) -> bool:
    return key.endswith(_IGNORED_SUFFIXES)


def best_prefix(keys: list[str], wanted: set[str]) -> tuple[str, int]:
    """The key prefix (cut at ``.`` boundaries) after which the most keys are in ``wanted``,
    and that count; on ties, one without "ema" in it, then the shortest."""
    score: Counter[str] = Counter()
    for key in keys:
        if _ignored(key):
            continue
        cut = 0
        while True:
            if key[cut:] in wanted:
                score[key[:cut]] += 1
            dot = key.find(".", cut)
            if dot < 0:
                break
            cut = dot + 1
    if not score:
        return "", 0
    # ties: not an EMA copy (a Lightning module's "ema." beside "model."), then the shortest
    prefix = min(score, key=lambda p: (-score[p], _ema_rank(p), len(p)))
    return prefix, score[prefix]


def _ema_rank(entry: str) -> int:
    return 1 if "ema" in entry.lower() else 0


def fit(ckpt: Checkpoint, model_keys: Mapping[str, Any], arch: str,
        option: str = "--weights") -> Fit:
    """The candidate state dict and key prefix that fit ``model_keys`` best.

    Raises SetupError naming the architecture when no candidate fits at all.
    """
    wanted = {k for k in model_keys if not _ignored(k)}
    best: tuple[tuple[int, int, int], Fit] | None = None
    for order, (entry, state) in enumerate(ckpt.entries):
        prefix, matched = best_prefix(list(state), wanted)
        rank = (-matched, _ema_rank(entry), order)
        if matched and (best is None or rank < best[0]):
            stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            best = (rank, Fit(stripped, entry, prefix, matched))
    if best is None:
        sample = next((k for _, s in ckpt.entries for k in s), "?")
        expected = next((k for k in model_keys if k in wanted), "?")
        raise SetupError(f"{option}: {ckpt.path}: does not fit {arch} (none of its keys is "
                         f"one of {arch}'s, with or without a prefix: the file has keys like "
                         f"{sample!r}, {arch} expects keys like {expected!r})")
    return best[1]


def mismatch(state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]
             ) -> str | None:
    """One line on how ``state`` fails to fit the model's state dict, or None if it fits:
    the first missing and unexpected keys (with counts) and the first shape mismatch."""
    missing = [k for k in model_state if k not in state and not _ignored(k)]
    unexpected = [k for k in state if k not in model_state and not _ignored(k)]
    parts = []
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        parts.append(f"missing {missing[0]!r}{more}")
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        parts.append(f"unexpected {unexpected[0]!r}{more}")
    for key, value in state.items():
        target = model_state.get(key)
        if target is not None and tuple(target.shape) != tuple(value.shape):
            parts.append(f"{key!r} has shape {tuple(value.shape)} in the file, "
                         f"{tuple(target.shape)} in the model")
            break
    return "; ".join(parts) or None


def head_classes(state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor],
                 default: int | None) -> int | None:
    """The class count of the checkpoint's classifier: the leading size of the tensors
    whose counterpart in a model built with ``default`` classes leads with ``default``
    and that differ from it only there (``fc.weight``, ``fc.bias``, aux heads...).
    None when the checkpoint's head has the default size (or nothing tells)."""
    if not default:
        return None
    found: Counter[int] = Counter()
    for key, target in model_state.items():
        value = state.get(key)
        if value is None or target.dim() == 0 or target.shape[0] != default:
            continue
        if value.dim() == target.dim() and value.shape[1:] == target.shape[1:] \
                and value.shape[0] != default:
            found[int(value.shape[0])] += 1
    if not found:
        return None
    return found.most_common(1)[0][0]


def file_identity(path: Path) -> str:
    """A file's resolved path, size and modification time: changes when the file does
    (part of the resume fingerprint, so new weights are never skipped as done)."""
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def describe(found: Checkpoint, fitted: Fit) -> dict[str, str]:
    """What run.json records of a checkpoint: the file, its kind, the entry and prefix."""
    return {"file": str(found.path), "kind": found.kind, "entry": fitted.entry,
            "prefix": fitted.prefix}


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], arch: str, path: Path,
              option: str = "--weights") -> None:
    """``load_state_dict(strict)`` with a one-line error naming the architecture."""
    problem = mismatch(state, model.state_dict())
    if problem is not None:
        raise SetupError(f"{option}: {path}: does not fit {arch} ({problem})")
    model.load_state_dict(dict(state), strict=False)  # only ignored keys can differ here
