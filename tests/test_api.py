"""The public Python API: the README's example runs as written, and `import privenc` stays light."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_readme_example(), str(README), "exec"), namespace)
    assert (tmp_path / "runs" / "api" / "encoder.pt").is_file()
    assert (tmp_path / "ver" / "api" / "verify.json").is_file()
    assert tuple(namespace["codes"].shape) == (4, 3, 8, 8)
    assert namespace["best"]["task"] == "g1c0" and 0.0 <= namespace["best"]["test_bacc_best"] <= 1.0
    import privenc

    assert (tmp_path / namespace["encoder_path"]).resolve() == (tmp_path / "runs" / "api" / "encoder.pt").resolve()
    assert privenc.read_encoder("runs/api").step == 30  # warm-up 10 + 20 adversarial iterations


def test_import_privenc_does_not_import_torch_and_names_its_api():
    code = ("import sys, privenc\n"
            "print('torch' in sys.modules)\n"
            "print(callable(privenc.train), callable(privenc.verify), callable(privenc.load_encoder))\n"
            "print(privenc.load_config('demo').train.private)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "False"  # the command line tunes OpenMP before torch loads
    assert out[1] == "True True True"
    assert out[2] == "['g1c0']"


def test_an_unknown_name_is_an_attribute_error():
    import privenc

    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        privenc.trian  # noqa: B018
