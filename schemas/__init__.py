"""The row contract: pydantic models for every table, and their Arrow schemas. Light imports only."""
from schemas.arrow import ArrowType, arrow_schema
from schemas.rows import (
    TABLES, BalancedImage, BoxObject, Caption, ConceptMatch, DedupedImage, Embedding, FilteredImage, Image, Instruction,
    PackedSequence, Reject, Row, Turn, WebPair,
)
from schemas.validate import RowContractError, conform

__all__ = [
    "TABLES", "ArrowType", "BalancedImage", "BoxObject", "Caption", "ConceptMatch", "DedupedImage", "Embedding", "FilteredImage", "Image",
    "Instruction", "PackedSequence", "Reject", "Row", "RowContractError", "Turn", "WebPair", "arrow_schema", "conform",
]
