"""Bad model files: each gives one line naming the path and what is wrong, exit code 2 from the CLI, and
leaves every file it was given (and the run folder) as it was. Also the fast failure of an unreachable
Hub and the error paths of `convert-gguf`."""
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distalign.cli.main import main
from distalign.models import ModelLoadError, load_policy, load_tokenizer, make_tiny


class Pickled:
    def __reduce__(self):
        return (print, ("a pickle that runs code when loaded",))


def truncated_weights(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) // 2])


def random_weights(d):
    (d / "model.safetensors").write_bytes(os.urandom(4096))


def garbage_header(d):
    (d / "model.safetensors").write_bytes((12).to_bytes(8, "little") + b"not json!!!!" + b"\0" * 64)


def refused_pickle(d):
    (d / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Pickled()}, d / "pytorch_model.bin")


def plain_pickle(d):
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))


def truncated_pickle(d):
    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    data = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(data[:len(data) // 2])


def no_config(d):
    (d / "config.json").unlink()


def broken_config(d):
    (d / "config.json").write_text('{"model_type": "llama",')


def no_weights(d):
    (d / "model.safetensors").unlink()


def no_tokenizer(d):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (d / name).unlink()


def broken_tokenizer(d):
    (d / "tokenizer.json").write_text("{}")


def broken_tokenizer_config(d):
    (d / "tokenizer_config.json").write_text("{nope")


def adapter_without_base(d):
    (d / "config.json").unlink()
    (d / "model.safetensors").unlink()
    (d / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(d.parent / "gone")}))


# (case, how to break the folder, what the one-line message must say)
CASES = [
    ("truncated_safetensors", truncated_weights, "model.safetensors: truncated ("),
    ("random_bytes_safetensors", random_weights, "model.safetensors: truncated or not a safetensors file"),
    ("garbage_header_safetensors", garbage_header, "model.safetensors: not a safetensors file"),
    ("refused_pickle_bin", refused_pickle, "pytorch_model.bin: torch.load(weights_only=True) refuses it"),
    ("plain_pickle_bin", plain_pickle, "pytorch_model.bin: torch.load(weights_only=True) refuses it"),
    ("truncated_pickle_bin", truncated_pickle, "pytorch_model.bin: cannot be read as a PyTorch checkpoint"),
    ("no_config_json", no_config, "no config.json in the folder (found: chat_template.jinja"),
    ("broken_config_json", broken_config, "config.json is not valid JSON"),
    ("no_weights", no_weights, "no file named model.safetensors"),
    ("no_tokenizer_files", no_tokenizer, "no tokenizer files in the folder"),
    ("broken_tokenizer_json", broken_tokenizer, "cannot load from"),
    ("broken_tokenizer_config", broken_tokenizer_config, "cannot load from"),
    ("adapter_without_base", adapter_without_base, "': its base model '"),
]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("model-files")
    model = make_tiny(root / "good", hidden_size=32, num_layers=1)
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Tell me {i}", "completion": "the cat"}) + "\n" for i in range(4)))
    return model, data


def broken(good, tmp_path, breaker) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(good[0], folder)
    breaker(folder)
    return folder


def fingerprint(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("case,breaker,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_model_folder_is_one_line_exit_2(good, tmp_path, capsys, case, breaker, expected):
    folder = broken(good, tmp_path, breaker)
    before = fingerprint(folder)
    with pytest.raises(ModelLoadError) as info:
        load_tokenizer(folder)
        load_policy(folder)
    message = str(info.value)
    assert "\n" not in message and str(folder) in message and expected in message, message
    out = tmp_path / "run"
    code, err = run_cli(capsys, "train", "sft", f"model.name_or_path={folder}", f"data.train={good[1]}",
                        f"train.output_dir={out}", "train.max_steps=1", "train.progress_bar=false")
    assert code == 2 and err == f"distalign: error: {message}"
    assert fingerprint(folder) == before   # the files given are untouched
    assert not out.exists() or not any(p.is_file() and p.suffix in (".safetensors", ".bin") for p in out.rglob("*"))


@pytest.mark.parametrize("content,expected", [
    (b"\x00" * 64, "not a GGUF file (it starts with b'\\x00\\x00\\x00\\x00'"),
    (b"GGUF" + b"\x00" * 4, "cannot load from"),
], ids=["not_gguf", "gguf_magic_then_nothing"])
def test_bad_gguf_file_is_one_line(tmp_path, capsys, content, expected):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError) as info:
        load_tokenizer(path)
        load_policy(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and expected in message, message
    code, err = run_cli(capsys, "convert-gguf", str(path), "--out", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 0 and str(path) in err and not (tmp_path / "out").exists()
    assert path.read_bytes() == content


def test_missing_gguf_and_plain_file(tmp_path):
    with pytest.raises(ModelLoadError, match=r"^model '.*missing\.gguf': not a local folder and not reachable"):
        load_policy(tmp_path / "missing.gguf")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelLoadError, match=r"weights\.txt': is a file, not a model folder, a \.gguf file"):
        load_policy(tmp_path / "weights.txt")


def test_convert_gguf_arguments(tmp_path, capsys):
    code, err = run_cli(capsys, "convert-gguf", "--from-package", "no_such_package_xyz", "--out", str(tmp_path / "o"))
    assert code == 2 and err.startswith("distalign: error: --from-package no_such_package_xyz: no such installed "
                                        "package") and "\n" not in err
    with pytest.raises(SystemExit, match="give a .gguf FILE or --from-package PACKAGE"):
        main(["convert-gguf", "--out", str(tmp_path / "o")])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    code, err = run_cli(capsys, "convert-gguf", str(tmp_path / "m.gguf"), "--out", str(taken))
    assert code == 2 and "exists and is not an empty folder" in err and (taken / "keep.txt").read_text() == "mine"


def test_unreachable_hub_fails_fast(monkeypatch, tmp_path):
    """A mistyped Hub id with no Hub to ask costs one probe, not huggingface_hub's ~25 s of retries."""
    import huggingface_hub.constants

    from distalign.models import sources
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    sources.hub_unreachable.cache_clear()
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_policy("nobody/typo-model")
    assert time.monotonic() - start < 5
    assert str(info.value).startswith("model 'nobody/typo-model': not a local folder and not reachable on the "
                                      "Hugging Face Hub: no answer from http://127.0.0.1:9 (")
    assert str(info.value).endswith("), and it is not in the local cache")
    sources.hub_unreachable.cache_clear()


def test_unreachable_hub_in_a_subprocess_is_exit_2(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "distalign", "train", "sft", "model.name_or_path=nobody/typo-model",
                           f"data.train={data}", f"train.output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("distalign: error: model 'nobody/typo-model': not a local folder and not reachable")
    assert lines[0].endswith("and it is not in the local cache") and not (tmp_path / "run").exists()


def test_convert_checks_logits_and_leaves_nothing_when_they_differ(good, tmp_path, monkeypatch):
    """convert_gguf reads any source load_policy takes; a tiny folder stands in for the GGUF here. The saved
    folder must reproduce the source's logits exactly, else the conversion fails and no folder is left."""
    from distalign.models import gguf
    out = gguf.convert_gguf(good[0], tmp_path / "ok", log=lambda *_: None)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    real_load = gguf.load_policy
    calls = []

    def reload_perturbed(path):
        model = real_load(path)
        calls.append(path)
        if len(calls) == 2:   # the reload of the written folder
            with torch.no_grad():
                model.model.norm.weight.add_(1e-3)
        return model
    monkeypatch.setattr(gguf, "load_policy", reload_perturbed)
    with pytest.raises(ModelLoadError, match=r"the saved model's logits differ from the GGUF-loaded model's "
                                             r"\(max \|difference\| "):
        gguf.convert_gguf(good[0], tmp_path / "bad", log=lambda *_: None)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".tmp-bad-*"))
