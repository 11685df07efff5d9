"""Your own model: ``--model path/to/file.py:factory``, ``--model package.module:factory``,
or a whole pickled model file (``--model model.pt --trust-pickle``).

The factory is called with the ``--model-arg`` keyword arguments and must return an
``nn.Module`` whose forward takes an (N, 3, H, W) batch and returns (N, classes) logits:
a tensor, a tuple or list whose first item is one, a dict with a ``logits`` entry (or a
single tensor), or an object with ``.logits`` (Hugging Face style).

Preprocessing, in order of precedence: ``--size`` / ``--mean`` / ``--std`` / ``--labels``
on the command line; then these optional attributes of the factory's module:

* ``INPUT_SIZE``: an int, ``(height, width)``, or timm's ``(3, height, width)``;
* ``MEAN``, ``STD``: three numbers each (default: ImageNet's);
* ``CLASSES``: the class names, in the order of the logits;
* ``INTERPOLATION``: ``"bilinear"`` (default) or ``"bicubic"``;
* ``CROP_PCT``: the share of the resized image ``--crop`` keeps (default 0.875).

There is no default input size: without ``--size`` or ``INPUT_SIZE`` the run stops
with a message naming both. A file is imported as a module of its own with its
directory first on ``sys.path`` for the rest of the run (so it can import its
neighbours, also lazily; relative imports need a package: use ``package.module:factory``);
``package.module`` is imported with the working directory on ``sys.path``, as ``python -m``
would. The resume fingerprint holds the factory's file (size, modification time), the
``--model-arg`` values and a hash of the built model's weights.

Your code cannot end fullgrad as if it were fullgrad: ``sys.exit`` (argparse too) or a
``KeyboardInterrupt`` it raises itself, at import, in the factory, while unpickling or in
the forward pass, is the model's failure: exit 2 and one line naming the file. While the
file is imported and the factory called, ``sys.argv`` is ``[the file]`` (argparse at import
with optional arguments only then parses cleanly). One probe forward of two zero images
checks the output before any image: (N, classes) floating-point logits, at least one class.
A forward that modifies its input in place works (the engine passes it a copy). Logits that
are NaN or infinite fail only the images they reach (see ``fgcli.dump.run``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import io
import re
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from fgcli.config import normalisation_fault
from fgcli.errors import SIGNALLED, SetupError, UsageError
from fgcli.models.base import WEIGHT_FILE_SUFFIXES, Built
from fgcli.models.sources import checkpoint as ckpt
from fgcli.models.sources import register_source

_INTERPOLATIONS = ("bilinear", "bicubic")


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {ckpt._first_line(exc)}"


IMPORT_HINT = ("it calls sys.exit or parses the command line at import; guard that code "
               "with if __name__ == \"__main__\"")
FACTORY_HINT = "it calls sys.exit or parses the command line in the factory"
FORWARD_HINT = "its forward pass calls sys.exit"


def _exit_code(exc: SystemExit) -> str:
    """``sys.exit()`` -> 0, ``sys.exit(3)`` -> 3, ``sys.exit("msg")`` -> 1 ("msg")."""
    if exc.code is None:
        return "0"
    if isinstance(exc.code, int):
        return str(exc.code)
    return f"1 ({ckpt._first_line(exc)!r})"


@contextlib.contextmanager
def _marking_sigint() -> Iterator[None]:
    """Under Python's default SIGINT handler, a real Ctrl-C also sets SIGNALLED, so that
    :func:`user_code` tells it from a KeyboardInterrupt the model raised itself (a run's
    own handler, where one is installed, sets SIGNALLED itself)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        SIGNALLED.set(signum)
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def user_code(who: str, doing: str, hint: str, argv0: str | None = None,
              capture: bool = False) -> Iterator[None]:
    """Run the user's model code so that it cannot end fullgrad as if it were fullgrad.

    ``SystemExit`` (``sys.exit``, argparse) and a ``KeyboardInterrupt`` the code raised
    itself (no SIGINT / SIGTERM arrived: :data:`fgcli.errors.SIGNALLED`) become a
    SetupError naming ``who`` (exit 2). ``argv0``: ``sys.argv`` is ``[argv0]`` meanwhile,
    so argparse at import sees none of fullgrad's options. ``capture``: what the code
    writes to ``sys.stderr`` is held back (argparse's usage would read as fullgrad's); its
    last line goes into the message on exit, all of it to stderr otherwise.
    """
    saved = sys.argv
    held = io.StringIO() if capture else None
    replay = True
    try:
        if argv0 is not None:
            sys.argv = [argv0]
        with _marking_sigint(), \
                contextlib.redirect_stderr(held) if held is not None else contextlib.nullcontext():
            yield
    except SystemExit as exc:
        replay = False
        lines = [line for line in (held.getvalue() if held else "").splitlines() if line.strip()]
        said = f"{lines[-1].strip()!r}; " if lines else ""
        raise SetupError(f"{who} exited with code {_exit_code(exc)} while {doing} "
                         f"({said}{hint})") from None
    except KeyboardInterrupt:
        if SIGNALLED:
            raise
        raise SetupError(f"{who} raised KeyboardInterrupt while {doing} (no interrupt "
                         "was sent to fullgrad)") from None
    finally:
        sys.argv = saved
        if held is not None and replay and held.getvalue():
            sys.stderr.write(held.getvalue())


def _on_path(folder: str) -> None:
    """Put ``folder`` first on ``sys.path`` for the rest of the process: a factory may
    import its neighbours lazily, when it is called or even during the forward pass."""
    if folder not in sys.path:
        sys.path.insert(0, folder)


def _import_file(path: Path, spec: str) -> ModuleType:
    if not path.is_file():
        raise SetupError(f"--model {spec}: {path}: no such file")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"fgcli_user_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise SetupError(f"--model {spec}: {path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    _on_path(str(path.resolve().parent))
    sys.modules[name] = module
    with user_code(f"model file {path}", "being imported", IMPORT_HINT, argv0=str(path),
                   capture=True):
        try:
            module_spec.loader.exec_module(module)
        except BaseException as exc:
            sys.modules.pop(name, None)
            if not isinstance(exc, Exception):  # SystemExit, KeyboardInterrupt, a stop
                raise  # signal (fgcli.signals.Interrupted): user_code tells them apart
            raise SetupError(f"--model {spec}: importing {path} failed ({_one_line(exc)})") \
                from exc
    return module


def _import_module(dotted: str, spec: str) -> ModuleType:
    _on_path(str(Path.cwd()))
    try:
        with user_code(f"model module {dotted}", "being imported", IMPORT_HINT, argv0=dotted,
                       capture=True):
            return importlib.import_module(dotted)
    except SetupError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name and dotted.startswith(exc.name):
            raise SetupError(f"--model {spec}: no module named {exc.name!r} (looked in the "
                             "working directory and the installed packages)") from exc
        raise SetupError(f"--model {spec}: importing {dotted} failed ({_one_line(exc)})") \
            from exc
    except Exception as exc:  # noqa: BLE001 - the user's module may raise anything
        raise SetupError(f"--model {spec}: importing {dotted} failed ({_one_line(exc)})") \
            from exc


def _local(spec: str) -> str | None:
    """``spec`` without a Windows drive letter (no factory's colon), or None for
    ``timm/NAME`` (timm's, whatever else it holds)."""
    spec = spec.strip()
    return None if spec.startswith("timm/") else re.sub(r"^[A-Za-z]:[\\/]", "", spec)


def is_code(spec: str) -> bool:
    """``file.py:factory`` or ``package.module:factory`` (the source ``code``)."""
    rest = _local(spec)
    return rest is not None and (":" in rest or rest.endswith(".py"))


def is_model_file(spec: str) -> bool:
    """A pickled model file (the source ``pickle``): a path, not a factory."""
    rest = _local(spec)
    return rest is not None and not is_code(spec) and (
        rest.lower().endswith(WEIGHT_FILE_SUFFIXES) or "/" in rest or "\\" in rest)


def _is_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def _who(spec: str) -> str:
    """How messages name the user's code: ``model file net.py`` or ``model module pkg.mod``."""
    where = spec.rpartition(":")[0] if is_code(spec) else spec
    if is_code(spec) and not _is_file(where):
        return f"model module {where}"
    return f"model file {where}"


def _factory(spec: str) -> tuple[Any, ModuleType, str]:
    """The factory function, its module and an identity for the resume fingerprint."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr.isidentifier():
        raise UsageError(f"--model {spec}: expected path/to/file.py:factory or "
                         "package.module:factory")
    if _is_file(where):
        path = Path(where).expanduser()
        module = _import_file(path, spec)
        identity = f"file:{ckpt.file_identity(path)}:{attr}"
    else:
        module = _import_module(where, spec)
        file = getattr(module, "__file__", None)
        identity = f"module:{where}:{attr}"
        if file and Path(file).is_file():
            identity += f":{ckpt.file_identity(Path(file))}"
    factory = getattr(module, attr, None)
    if factory is None:
        found = getattr(module, "__file__", None) or where
        raise SetupError(f"--model {spec}: {where} ({found}) has no {attr!r}")
    if not callable(factory):
        raise SetupError(f"--model {spec}: {attr} is a {type(factory).__name__}, "
                         "not a function that returns a model")
    return factory, module, identity


def _call(factory: Any, kwargs: dict[str, Any], spec: str, who: str) -> nn.Module:
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:  # missing or unknown keyword arguments
        raise UsageError(f"--model-arg: {spec}: {exc} (give each argument as "
                         "--model-arg NAME=VALUE)") from exc
    except ValueError:
        pass  # no signature to read (a builtin): let the call decide
    name = getattr(factory, "__name__", "factory")
    try:
        with user_code(who, f"calling its factory {name}()", FACTORY_HINT,
                       argv0=spec.rpartition(":")[0], capture=True):
            model = factory(**kwargs)
    except SetupError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's factory may raise anything
        raise SetupError(f"--model {spec}: the factory raised {_one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise SetupError(f"--model {spec}: the factory returned a {type(model).__name__}, "
                         "not a torch.nn.Module")
    return model


def weights_digest(model: nn.Module) -> str:
    """A hash of every parameter and buffer: the resume fingerprint of weights that no
    file names (a factory's own initialisation or its own checkpoint loading, a pickled
    model), so a changed model is never skipped as already done."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        if t.numel():
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                          .numpy().tobytes())
    return digest.hexdigest()[:16]


def _size(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 3:
        value = tuple(value)[1:]  # timm's (channels, height, width)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 8 for v in value):
        return int(value[0]), int(value[1])
    raise SetupError(f"{where}: INPUT_SIZE must be an int or (height, width) of at least 8, "
                     f"got {value!r}")


def _triple(value: Any, name: str, where: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise SetupError(f"{where}: {name} must be three numbers, got {value!r}") from exc
    fault = normalisation_fault(out, name == "STD")
    if fault in ("count", "finite"):
        raise SetupError(f"{where}: {name} must be three finite numbers, got {value!r}")
    if fault == "positive":
        raise SetupError(f"{where}: STD must be three numbers > 0, got {value!r}")
    return out  # type: ignore[return-value]


def _module_preprocessing(module: ModuleType | None, where: str) -> dict[str, Any]:
    """The optional preprocessing attributes of the factory's module (see the docstring)."""
    out: dict[str, Any] = {}
    if module is None:
        return out
    if hasattr(module, "INPUT_SIZE"):
        out["size"] = _size(module.INPUT_SIZE, where)
    for name in ("MEAN", "STD"):
        if hasattr(module, name):
            out[name.lower()] = _triple(getattr(module, name), name, where)
    if hasattr(module, "CLASSES"):
        classes = module.CLASSES
        if isinstance(classes, str) or not all(isinstance(c, str) for c in classes):
            raise SetupError(f"{where}: CLASSES must be a list of class names")
        out["categories"] = tuple(classes)
        out["labels_from"] = f"{where} CLASSES"
    if hasattr(module, "INTERPOLATION"):
        mode = str(module.INTERPOLATION).lower()
        if mode not in _INTERPOLATIONS:
            raise SetupError(f"{where}: INTERPOLATION must be bilinear or bicubic, got {mode!r}")
        out["interpolation"] = mode
    if hasattr(module, "CROP_PCT"):
        pct = module.CROP_PCT
        if not isinstance(pct, (int, float)) or not 0 < pct <= 1:
            raise SetupError(f"{where}: CROP_PCT must be a number in (0, 1], got {pct!r}")
        out["crop_fraction"] = float(pct)
    return out


def probe(model: nn.Module, size: tuple[int, int], spec: str) -> int:
    """One eval forward of two zero images: the model must give (2, classes) floating-point
    logits with at least one class. Returns the class count; raises SetupError naming the
    model otherwise (also when the forward raises, exits or raises KeyboardInterrupt).
    Non-finite logits are not an error here: each image they reach fails on its own."""
    from fgcli.models.outputs import (
        checked_logits,
        describe_output,
        extract_logits,
        frozen_eval,
    )

    x = torch.zeros(2, 3, *size)
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(param.device)
    try:
        with user_code(f"model {spec}", "computing a probe batch", FORWARD_HINT), \
                frozen_eval(model), torch.no_grad():
            out = model(x)
    except SetupError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's forward may raise anything
        raise SetupError(f"--model {spec}: the model fails on a (2, 3, {size[0]}, {size[1]}) "
                         f"batch ({_one_line(exc)})") from exc
    try:
        logits = extract_logits(out)
        if logits.dim() != 2 or logits.shape[0] != 2:
            raise SetupError(f"--model {spec}: the model returned {describe_output(out)} for "
                             "a batch of 2; expected (N, classes) logits")
        return int(checked_logits(out, 2).shape[1])
    except (TypeError, ValueError) as exc:
        raise SetupError(f"--model {spec}: {exc}") from exc


@register_source("pickle", claims=is_model_file)
@register_source("code", claims=is_code)
def load(spec: str, weights: str, *, model_args: dict[str, Any] | None = None,
         trust_pickle: bool = False, size: int | None = None) -> Built:
    """Build a model from your code or a pickled model file (see the module docstring).

    ``--weights``: ``DEFAULT`` / ``none`` keep the weights the model comes with, ``random``
    draws seeded non-trivial ones, a file is loaded into it (its keys and shapes must fit).
    """
    kwargs = dict(model_args or {})
    module: ModuleType | None = None
    if is_code(spec):
        factory, module, identity = _factory(spec)
        model = _call(factory, kwargs, spec, _who(spec))
        source, where = "code", spec.rpartition(":")[0]
    else:
        if kwargs:
            raise UsageError("--model-arg: a pickled model file takes no arguments")
        path = Path(spec).expanduser()
        with user_code(_who(spec), "being unpickled", "its pickled code calls sys.exit"):
            found = ckpt.read_checkpoint(path, trust_pickle=trust_pickle, option="--model")
        if found.module is None:
            raise SetupError(f"--model {spec}: holds a state_dict, not a model; give the "
                             f"architecture with --model NAME (or file.py:factory) and "
                             f"this file with --weights {spec}")
        model = found.module
        identity = f"pickle:{ckpt.file_identity(path)}"
        source, where = "pickle", spec
    model = model.cpu().float()
    info = _module_preprocessing(module, where)
    checkpoint = None
    label = "as built by the factory" if source == "code" else "from the pickled model"
    w = weights.strip()
    if w.lower() == "random":
        label, identity = "random (seeded, non-trivial biases and norm statistics)", \
            identity + ":random"
    elif w.lower() not in ("default", "none"):
        path = Path(w).expanduser()
        with user_code(f"weights file {path}", "being unpickled",
                       "its pickled code calls sys.exit"):
            found = ckpt.read_checkpoint(path, trust_pickle=trust_pickle)
        fitted = ckpt.fit(found, model.state_dict(), spec)
        ckpt.load_into(model, fitted.state, spec, path)
        identity += f":weights:{ckpt.file_identity(path)}"
        label = str(path)
        checkpoint = ckpt.describe(found, fitted)
    if size is not None:
        info["size"] = (size, size)
    if "size" not in info:
        raise UsageError(f"--model {spec}: no input size; give --size N, or define "
                         f"INPUT_SIZE in {where}")
    if w.lower() != "random":  # seeded weights are named by the recipe; others by content
        identity += f":state:{weights_digest(model)}"
    classes = probe(model, info["size"], spec)  # the real class count, whatever the head
    return Built(name=spec, model=model, weights=label, identity=identity, source=source,
                 checkpoint=checkpoint, randomise=w.lower() == "random", num_classes=classes,
                 **info)
