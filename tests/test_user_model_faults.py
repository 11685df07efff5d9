"""Issue #17, items 4 and 9: the user's model code cannot end fullgrad as if it were
fullgrad. ``sys.exit``, argparse and ``KeyboardInterrupt`` in a model file (at import, in
the factory, while unpickling, in the forward pass) and bad outputs (no classes, integer
logits) are the model's failure: exit 2 and one line naming the file. A forward that
modifies its input in place works, and completeness still holds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, cli, model_file, one_error_line

from fgcli.errors import SIGNALLED, SetupError


def dump(imgs: Path, out: Path, spec: str, *extra: str):
    return cli("dump", str(imgs), "-o", str(out), "--model", spec, "--workers", "0", "-q",
               *extra)


# -- sys.exit, argparse, KeyboardInterrupt -----------------------------------------------

EXIT_AT_IMPORT = """
import sys
sys.exit(0)
def build():
    return Net()
"""


@pytest.mark.parametrize("command", ["dump", "eval", "check"])
def test_sys_exit_at_import_is_the_models_failure(command, imgs, tmp_path):
    spec = model_file(tmp_path, EXIT_AT_IMPORT)
    out = tmp_path / "out"
    args = {"dump": ["dump", str(imgs), "-o", str(out)],
            "eval": ["eval", str(imgs), "-o", str(out)],
            "check": ["check"]}[command]
    line = one_error_line(cli(*args, "--model", spec))
    assert "model file" in line and "net.py exited with code 0 while being imported" in line
    assert 'if __name__ == "__main__"' in line
    assert not out.exists()


@pytest.mark.slow
def test_sys_exit_at_import_in_a_real_process(imgs, tmp_path):
    """The reported case: `dump` exited 0 having done nothing."""
    spec = model_file(tmp_path, EXIT_AT_IMPORT)
    proc = subprocess.run(
        [sys.executable, "-m", "fgcli", "dump", str(imgs), "-o", str(tmp_path / "out"),
         "--model", spec], capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "exited with code 0 while being imported" in proc.stderr


def test_sys_exit_in_the_factory(imgs, tmp_path):
    spec = model_file(tmp_path, """
    import sys
    def build():
        sys.exit(3)
    """)
    line = one_error_line(dump(imgs, tmp_path / "out", spec))
    assert "net.py exited with code 3 while calling its factory build()" in line


def test_sys_exit_with_a_message_in_the_factory(imgs, tmp_path):
    spec = model_file(tmp_path, """
    import sys
    def build():
        sys.exit("no GPU here")
    """)
    line = one_error_line(dump(imgs, tmp_path / "out", spec))
    assert "exited with code 1 ('no GPU here')" in line


def test_argparse_with_a_required_argument_at_import(imgs, tmp_path):
    spec = model_file(tmp_path, """
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    args = parser.parse_args()
    def build():
        return Net()
    """, name="train.py")
    result = dump(imgs, tmp_path / "out", spec)
    line = one_error_line(result)
    assert "train.py exited with code 2 while being imported" in line
    assert "the following arguments are required: --data" in line  # argparse's own reason
    assert "usage: fullgrad" not in result.output


def test_argparse_with_optional_arguments_at_import_works(imgs, tmp_path):
    spec = model_file(tmp_path, """
    import argparse, sys
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="x")
    args = parser.parse_args()
    SEEN = list(sys.argv)
    def build():
        return Net()
    """)
    argv = list(sys.argv)
    result = dump(imgs, tmp_path / "out", spec)
    assert result.exit_code == 0, result.output
    assert sys.argv == argv  # restored
    module = next(m for name, m in sys.modules.items()
                  if name.startswith("fgcli_user_net_") and getattr(m, "__file__", "")
                  == spec.rpartition(":")[0])
    assert module.SEEN == [spec.rpartition(":")[0]]  # argparse saw no fullgrad option
    assert "usage:" not in result.output


def test_keyboard_interrupt_in_the_factory(imgs, tmp_path):
    spec = model_file(tmp_path, """
    def build():
        raise KeyboardInterrupt
    """)
    line = one_error_line(dump(imgs, tmp_path / "out", spec))
    assert "net.py raised KeyboardInterrupt while calling its factory build()" in line


def test_keyboard_interrupt_in_forward(imgs, tmp_path):
    spec = model_file(tmp_path, """
    class Bad(Net):
        def forward(self, x):
            raise KeyboardInterrupt
    def build():
        return Bad()
    """)
    line = one_error_line(dump(imgs, tmp_path / "out", spec))
    assert f"model {spec} raised KeyboardInterrupt while computing a probe batch" in line


def test_a_real_interrupt_stays_an_interrupt():
    """With a signal received (fgcli.errors.SIGNALLED set by the run's handler), a
    KeyboardInterrupt in user code is the user's Ctrl-C, not the model's failure."""
    from fgcli.models.sources.usercode import user_code

    with pytest.raises(SetupError):
        with user_code("model file x.py", "being imported", "hint"):
            raise KeyboardInterrupt
    SIGNALLED.set(2)
    try:
        with pytest.raises(KeyboardInterrupt):
            with user_code("model file x.py", "being imported", "hint"):
                raise KeyboardInterrupt
    finally:
        SIGNALLED.clear()


def test_sys_exit_in_forward_during_the_run_keeps_earlier_images(imgs, tmp_path):
    """The probe passes; the forward exits on the 4th image (white): exit 2, one line, and
    the images before it keep their manifest lines and files."""
    spec = model_file(tmp_path, """
    import sys
    class Bad(Net):
        def forward(self, x):
            if bool((x.flatten(1).amin(1) > 1.5).any()):
                sys.exit(7)
            return super().forward(x)
    def build():
        return Bad()
    """)
    out = tmp_path / "out"
    line = one_error_line(dump(imgs, out, spec, "-b", "1"))
    assert "exited with code 7 while computing a batch" in line
    records = [json.loads(r) for r in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in records) == ["a.png", "b.png", "c.png"]
    assert all(r["status"] == "ok" for r in records)


def test_sys_exit_while_unpickling_a_model(imgs, tmp_path):
    class Exits:
        def __reduce__(self):
            return (sys.exit, (4,))

    path = tmp_path / "model.pt"
    torch.save({"model": Exits()}, path)
    line = one_error_line(dump(imgs, tmp_path / "out", str(path), "--trust-pickle",
                               "--size", "16"))
    assert "model.pt exited with code 4 while being unpickled" in line


def test_other_exception_in_forward_at_the_probe(imgs, tmp_path):
    spec = model_file(tmp_path, """
    class Bad(Net):
        def forward(self, x):
            return 1 / 0
    def build():
        return Bad()
    """)
    line = one_error_line(dump(imgs, tmp_path / "out", spec))
    assert spec in line and "ZeroDivisionError" in line


# -- bad outputs ---------------------------------------------------------------------------

def test_zero_classes(imgs, tmp_path):
    spec = model_file(tmp_path, """
    def build(n: int = 3):
        return Net(n)
    """)
    for command in (["dump", str(imgs), "-o", str(tmp_path / "out")], ["check"],
                    ["eval", str(imgs), "-o", str(tmp_path / "ev")]):
        line = one_error_line(cli(*command, "--model", spec, "--model-arg", "n=0"))
        assert "the model has no classes" in line and "(2, 0)" in line


def test_zero_classes_of_a_torchvision_head():
    from fgcli.config import ModelSpec
    from fgcli.models.load import load

    with pytest.raises(SetupError, match="no classes"):
        load(ModelSpec("squeezenet1_1", "none", ("num_classes=0",), size=32), "cpu")


def test_integer_logits(imgs, tmp_path):
    spec = model_file(tmp_path, """
    class Ints(Net):
        def forward(self, x):
            return super().forward(x).long()
    def build():
        return Ints()
    """)
    line = one_error_line(dump(imgs, tmp_path / "out", spec))
    assert "torch.int64 logits" in line and "floating-point" in line
    assert "shape (2, 3);" in line  # the shape is fine: the message must not blame it


IN_PLACE = {
    "mul_": "x.mul_(2)",
    "iadd": "x += 1",
    "setitem": "x[:, 0] = x[:, 0] * 0.5",
    "clamp_": "x.clamp_(-1.0, 1.0)",
}


@pytest.mark.parametrize("op", IN_PLACE)
def test_in_place_input_changes_work_and_stay_complete(op, imgs, tmp_path):
    from fgcli import FullGrad
    from fgcli.check import check_model

    spec = model_file(tmp_path, f"""
    class InPlace(Net):
        def forward(self, x):
            {IN_PLACE[op]}
            return super().forward(x)
    def build():
        return InPlace()
    """)
    result = check_model(spec, "random", alone=True)
    assert result.ok and result.worst < 1e-5, [(i.logit, i.residual) for i in result.images]
    # the caller's batch is not changed, and the input term is taken on it
    from fgcli.config import ModelSpec
    from fgcli.models.load import load

    model = load(ModelSpec(spec, "random"), "cpu").model
    x = torch.randn(2, 3, 16, 16)
    before = x.clone()
    dec = FullGrad(model).decompose(x)
    assert torch.equal(x, before)
    assert torch.allclose(dec.input_term, dec.input_grad * before)
    assert float(dec.residual.abs().max()) < 1e-5
    out = tmp_path / "out"
    assert dump(imgs, out, spec).exit_code == 0
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 4


def test_in_place_input_changes_in_eval(imgs, tmp_path):
    spec = model_file(tmp_path, """
    class InPlace(Net):
        def forward(self, x):
            x.mul_(2)
            return super().forward(x)
    def build():
        return InPlace()
    """)
    result = cli("eval", str(imgs), "-o", str(tmp_path / "ev"), "--model", spec,
                 "--methods", "fullgrad,gradient", "--metrics", "perturbation", "--ks", "50",
                 "-q")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert len(data["images"]) == 4 and not data["failed"]


def test_a_real_ctrl_c_while_importing_is_an_interrupt(imgs, tmp_path):
    """A SIGINT that really arrives while the model file is imported is the user's Ctrl-C
    (exit 130, "interrupted"), not the model's failure."""
    import signal

    spec = model_file(tmp_path, """
    import os, signal, time
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    def build():
        return Net()
    """)
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here")
    try:
        result = dump(imgs, tmp_path / "out", spec)
    finally:
        SIGNALLED.clear()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.stderr and "exited" not in result.stderr
