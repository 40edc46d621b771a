"""The database manifest (`manifest.json`): format, settings, counts, block files, stages.

The manifest is rewritten atomically after every finished block, so it always describes files
that are complete on disk. A block file that exists but is not in the manifest (a process was
killed between writing the block and the manifest) is simply written again on resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from retrolm.database.config import DatabaseConfig
from retrolm.errors import CorruptArtifactError, InputError, MismatchError
from retrolm.io import read_json, sha256_file, write_json

log = logging.getLogger(__name__)

FORMAT = "retrolm-database"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"
STAGES = ("tokenizer", "chunks", "embeddings", "index", "neighbours")


def fingerprint(settings: dict[str, Any]) -> str:
    """sha256 of the settings as canonical JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()


def new_manifest(config: DatabaseConfig) -> dict[str, Any]:
    settings = config.content_settings()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "settings": settings,
        "fingerprint": fingerprint(settings),
        "stages": {stage: False for stage in STAGES},
        "tokenizer": None,
        "sources": [],
        "counts": {
            "documents": 0,
            "chunks": 0,
            "train_chunks": 0,
            "valid_chunks": 0,
            "retrieval_chunks": 0,
            "bytes": 0,
            "skipped": {},
        },
        "chunks": {"blocks": [], "documents_file": None, "chunk_doc_file": None},
        "embeddings": {"spec": None, "dim": None, "metric": None, "blocks": {}},
        "index": None,
        "neighbours": {"k": config.neighbours, "blocks": {}},
    }


def manifest_path(folder: str | Path) -> Path:
    return Path(folder) / MANIFEST_FILE


def load_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and check a database's manifest.

    Raises:
        InputError: the folder is not a database.
        CorruptArtifactError: the manifest is unreadable or of an unknown format/version.
    """
    path = manifest_path(folder)
    if not path.is_file():
        raise InputError(
            f"{folder} is not a retrolm database (no {MANIFEST_FILE}); build one with `retrolm db build`"
        )
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as e:
        raise CorruptArtifactError(f"cannot read {path}: {e}; rebuild the database") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptArtifactError(f"{path} is not a retrolm database manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CorruptArtifactError(
            f"{path} has database format version {version}; this retrolm reads version "
            f"{FORMAT_VERSION}. Rebuild the database with this version of retrolm"
        )
    return manifest


def save_manifest(folder: str | Path, manifest: dict[str, Any]) -> None:
    write_json(manifest_path(folder), manifest)


def check_settings(manifest: dict[str, Any], config: DatabaseConfig, folder: str | Path) -> None:
    """Refuse to continue a database built with other content settings, naming them.

    Raises:
        MismatchError: with every differing setting, its stored and its requested value.
    """
    stored = manifest["settings"]
    wanted = config.content_settings()
    differing = [k for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
    if differing:
        lines = "; ".join(
            f"{k}: database has {stored.get(k)!r}, requested {wanted.get(k)!r}" for k in differing
        )
        raise MismatchError(
            f"the database {folder} was built with other settings ({lines}). Use the same "
            "settings to resume or add to it, or build a new database with --out elsewhere"
        )


def block_ok(folder: Path, file: str, sha256: str) -> bool:
    """True when `folder/file` exists and has the recorded checksum."""
    path = folder / file
    if not path.is_file():
        return False
    return sha256_file(path) == sha256


def write_config(folder: Path, config: DatabaseConfig) -> None:
    write_json(folder / CONFIG_FILE, config.to_dict())
