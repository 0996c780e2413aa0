"""Bad model folders are one line in every model family: pickle-only weights, remote code without consent, a
missing tokenizer. What the user runs into first, with a model of their own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rlhf.errors import ModelLoadError
from rlhf.models import load_causal_lm, load_tokenizer
from tools.tiny import FAMILIES


def _one_line(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(exc.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bad_model_folders_are_one_line_in_every_family(family_dirs, family: str, tmp_path: Path):
    def broken_copy(name: str) -> Path:
        return Path(shutil.copytree(family_dirs(family), tmp_path / name))

    pickled = broken_copy("pickled")
    for weights in pickled.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelLoadError) as exc:
        load_causal_lm(str(pickled))
    _one_line(exc, str(pickled), "only pickle weights")

    marker = tmp_path / "remote-code-ran"
    remote = broken_copy("remote")
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps(config | {
        "model_type": f"custom_{family}", "auto_map": {"AutoConfig": "custom.CustomConfig",
                                                     "AutoModelForCausalLM": "custom.CustomModel"}}))
    (remote / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(ModelLoadError) as exc:
        load_causal_lm(str(remote))
    _one_line(exc, str(remote), "trust_remote_code = true")
    assert not marker.exists()

    no_tokenizer = broken_copy("no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (no_tokenizer / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError) as exc:
        load_tokenizer(str(no_tokenizer))
    _one_line(exc, str(no_tokenizer), "no tokenizer files")
