"""Bad model folders are one line in every model family: pickle-only weights, remote code without consent, a
missing tokenizer. What the user runs into first, with a model of their own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rlhf.errors import ModelLoadError
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.tiny import FAMILIES, build_tiny_model


@pytest.fixture(scope="module")
def family_model(tmp_path_factory: pytest.TempPathFactory):
    """Each family's tiny model, built on first use; tests get a copy to break."""
    built: dict[str, Path] = {}

    def copy_of(family: str, dest: Path) -> Path:
        if family not in built:
            built[family] = build_tiny_model(tmp_path_factory.mktemp(family), family)
        return Path(shutil.copytree(built[family], dest))

    return copy_of


def _one_line(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(exc.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bad_model_folders_are_one_line_in_every_family(family_model, family: str, tmp_path: Path):
    pickled = family_model(family, tmp_path / "pickled")
    for weights in pickled.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelLoadError) as exc:
        load_causal_lm(str(pickled))
    _one_line(exc, str(pickled), "only pickle weights")

    marker = tmp_path / "remote-code-ran"
    remote = family_model(family, tmp_path / "remote")
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps(config | {
        "model_type": f"custom_{family}", "auto_map": {"AutoConfig": "custom.CustomConfig",
                                                     "AutoModelForCausalLM": "custom.CustomModel"}}))
    (remote / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(ModelLoadError) as exc:
        load_causal_lm(str(remote))
    _one_line(exc, str(remote), "trust_remote_code = true")
    assert not marker.exists()

    no_tokenizer = family_model(family, tmp_path / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (no_tokenizer / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError) as exc:
        load_tokenizer(str(no_tokenizer))
    _one_line(exc, str(no_tokenizer), "no tokenizer files")
