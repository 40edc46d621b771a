"""The retrieval database: corpus -> tokenizer -> chunks -> embeddings -> index -> neighbours.

`build_database` runs every stage (resumably); `Database.open` reads a finished database.
"""

from __future__ import annotations

from retrolm.database.build import (
    add_documents,
    build_database,
    chunk_stage,
    embed_stage,
    index_stage,
    neighbours_stage,
)
from retrolm.database.config import DatabaseConfig
from retrolm.database.db import Database, DocumentRecord, SearchHit

__all__ = [
    "Database",
    "DatabaseConfig",
    "DocumentRecord",
    "SearchHit",
    "add_documents",
    "build_database",
    "chunk_stage",
    "embed_stage",
    "index_stage",
    "neighbours_stage",
]
