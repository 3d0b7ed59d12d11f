"""Where a model comes from, checked before anything heavy loads; one-line errors for what is wrong.

    source = locate("models/smollm2-135m-instruct")        # an HF folder
    source = locate("SmolLM2-135M-Instruct.Q4_1.gguf")      # one GGUF file: weights, tokenizer, chat template
    source = locate("HuggingFaceTB/SmolLM2-135M-Instruct")   # a Hub id (its cached snapshot when offline)
    AutoModelForCausalLM.from_pretrained(source.path, **source.load_kwargs())

Every problem is a `ModelLoadError` (a ValueError) whose message is one line that names the path and
what is wrong, with the whole cause folded onto that line: a missing or unreadable `config.json`, a
truncated or random-bytes `*.safetensors` (its header is read and its size checked before transformers
sees it), a `pytorch_model.bin` that `torch.load(weights_only=True)` refuses, a folder without tokenizer
files, a file that is not GGUF.

The Hub is asked once per process: when it does not answer a short probe (or HF_HUB_OFFLINE is set), a
Hub id resolves to its cached snapshot or fails at once, instead of after huggingface_hub's retries
(about 25 s for a mistyped id on a machine without network).
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

GGUF_MAGIC = b"GGUF"
HUB_PROBE_TIMEOUT_S = 5.0
# Files any one of which lets AutoTokenizer build a tokenizer (fast JSON, sentencepiece, BPE vocab, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer_config.json")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ModelLoadError(ValueError):
    """A model, tokenizer or adapter that cannot be found or read; the message is one line."""


def one_line(error: BaseException | str) -> str:
    """The whole text of `error` on one line: terminal colour codes dropped, every run of whitespace one space."""
    text = _ANSI.sub("", str(error))
    text = " ".join(text.split())
    return text or type(error).__name__


@dataclass(frozen=True)
class ModelSource:
    """A located model: `path` is what `from_pretrained` gets (a folder or Hub id); `gguf_file` names the
    file inside `path` for a GGUF source."""

    name: str
    path: str
    gguf_file: str | None = None

    @property
    def is_folder(self) -> bool:
        return Path(self.path).is_dir()

    @property
    def gguf_path(self) -> str | None:
        return str(Path(self.path) / self.gguf_file) if self.gguf_file else None

    def load_kwargs(self) -> dict:
        """Extra `from_pretrained` arguments: the GGUF file, unpacked into plain dense weights at load."""
        if not self.gguf_file:
            return {}
        from transformers import GgufConfig
        return {"gguf_file": self.gguf_file,
                "quantization_config": GgufConfig(gguf_file=self.gguf_path, dequantize=True)}


def _is_path_like(name: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else can only be a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def locate(name_or_path, trust_remote_code: bool = False) -> ModelSource:
    """A folder, a `.gguf` file or a Hub id, checked to exist (Hub ids: their config loads); else `ModelLoadError`."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSource(name, str(path))
    if path.is_file():
        return _gguf_source(name, path)
    unreachable = f"model '{name}': not a local folder and not reachable on the Hugging Face Hub"
    if _is_path_like(name) or name.endswith(".gguf"):
        raise ModelLoadError(f"{unreachable}: no such folder or file, and not a valid Hub id")
    return ModelSource(name, _hub_path(name, unreachable, trust_remote_code))


def _gguf_source(name: str, path: Path) -> ModelSource:
    if path.suffix.lower() != ".gguf":
        raise ModelLoadError(f"model '{name}': is a file, not a model folder, a .gguf file or a Hub id")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"model '{name}': not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    return ModelSource(name, str(path.parent), path.name)


def _hub_path(name: str, unreachable: str, trust_remote_code: bool) -> str:
    """`name` itself when the Hub answers and has it; its cached snapshot folder when the Hub is off."""
    from huggingface_hub import constants, snapshot_download
    offline = constants.HF_HUB_OFFLINE
    problem = "HF_HUB_OFFLINE is set" if offline else hub_unreachable(constants.ENDPOINT)
    if problem:
        try:
            return snapshot_download(name, local_files_only=True)
        except Exception:  # noqa: BLE001 - LocalEntryNotFoundError, or an id the cache layer rejects (HFValidationError)
            raise ModelLoadError(f"{unreachable}: {problem}, and it is not in the local cache") from None
    from transformers import AutoConfig
    try:
        AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # hub/network errors are OSError subclasses; bad ids ValueError
        raise ModelLoadError(f"{unreachable}: {one_line(err)}") from None
    return name


@functools.lru_cache(maxsize=8)
def hub_unreachable(endpoint: str) -> str | None:
    """None if the Hub at `endpoint` answers one request within a few seconds, else why not (asked once)."""
    from huggingface_hub.utils import get_session
    try:
        get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 - any transport failure: DNS, refused, timeout, proxy
        return f"no answer from {endpoint} ({one_line(err)})"
    return None


def _listing(folder: Path, limit: int = 8) -> str:
    names = sorted(p.name for p in folder.iterdir())
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return shown or "nothing"


def check_model_folder(source: ModelSource) -> None:
    """One-line errors for a folder that cannot hold a loadable model, before transformers reads it."""
    if not source.is_folder or source.gguf_file:
        return
    folder = Path(source.path)
    config = folder / "config.json"
    if not config.is_file():
        if (folder / "adapter_config.json").is_file():
            return  # a PEFT adapter: its base model is located separately
        raise ModelLoadError(f"model '{source.name}': no config.json in the folder (found: {_listing(folder)}); "
                             "a model folder is what save_pretrained writes, or use a .gguf file")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"model '{source.name}': {config} is not valid JSON ({one_line(err)})") from None
    for weights in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise ModelLoadError(f"model '{source.name}': {weights}: {problem}")


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file (header length, JSON header, data size), else None."""
    size = path.stat().st_size
    if size < 8:
        return f"truncated or not a safetensors file ({size} bytes, shorter than the 8-byte header length)"
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        if header_length > size - 8:
            return (f"truncated or not a safetensors file (its header length field says {header_length} bytes, "
                    f"the file has {size})")
        raw = handle.read(header_length)
    try:
        header = json.loads(raw)
        end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                  default=0)
    except (ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError, AttributeError):
        return "not a safetensors file (its header is not the JSON table of tensors safetensors writes)"
    if 8 + header_length + end > size:
        return f"truncated ({size} bytes; its header describes {8 + header_length + end})"
    return None


def check_tokenizer_folder(source: ModelSource) -> None:
    """A one-line error for a folder with none of the files a tokenizer is built from."""
    if not source.is_folder or source.gguf_file:
        return
    folder = Path(source.path)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES) and not any(folder.glob("*.tiktoken")):
        raise ModelLoadError(f"tokenizer '{source.name}': no tokenizer files in the folder (expected "
                             f"tokenizer.json, or tokenizer_config.json with its vocabulary files; found: "
                             f"{_listing(folder)})")


def describe_load_failure(what: str, source: ModelSource, err: BaseException) -> ModelLoadError:
    """The one-line error for an exception raised while transformers / torch read `source`."""
    cause = one_line(err)
    pickles = _pickle_checkpoints(source)
    if type(err).__name__ == "UnpicklingError":
        cause = (f"{', '.join(pickles) or 'a pickle checkpoint'}: torch.load(weights_only=True) refuses it: it "
                 "holds Python objects, not only tensors; re-save it as safetensors where you trust its source: "
                 + cause)
    elif pickles and isinstance(err, (OSError, RuntimeError)) and what == "model":
        cause = f"{', '.join(pickles)}: cannot be read as a PyTorch checkpoint (truncated or corrupt?): {cause}"
    elif isinstance(err, ImportError) and source.gguf_file:
        cause = f"reading .gguf files needs the gguf package (pip install 'distalign[smollm2]'): {cause}"
    where = source.gguf_path or source.path
    return ModelLoadError(f"{what} '{source.name}': cannot load from {where}: {cause}")


def _pickle_checkpoints(source: ModelSource) -> list[str]:
    """The pickle weight files transformers reads in a folder without safetensors weights."""
    if not source.is_folder or source.gguf_file:
        return []
    folder = Path(source.path)
    if any(folder.glob("*.safetensors")):
        return []
    return sorted(p.name for p in folder.glob("*.bin") if p.name.startswith("pytorch_model"))
