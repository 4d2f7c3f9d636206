"""The op registry: every op a pipeline YAML can name."""

from curation.ops.balance import Balance
from curation.ops.base import Op
from curation.ops.clip_score import ClipScore
from curation.ops.decontaminate import Decontaminate
from curation.ops.dedup import Dedup
from curation.ops.embed import Embed
from curation.ops.filter import Filter
from curation.ops.ingest import Ingest
from curation.ops.instruct import Instruct
from curation.ops.match_concepts import MatchConcepts
from curation.ops.pseudo_caption import PseudoCaption
from curation.ops.read_coco import ReadCoco
from curation.ops.read_folder import ReadFolder
from curation.ops.read_parquet import ReadParquet
from curation.ops.read_webdataset import ReadWebDataset
from curation.ops.recaption import Recaption
from curation.ops.semdedup import SemDedup

OPS: dict[str, type[Op]] = {
    op.name: op
    for op in (
        Ingest,
        ReadWebDataset,
        ReadParquet,
        ReadFolder,
        ReadCoco,
        Dedup,
        Filter,
        Embed,
        SemDedup,
        Decontaminate,
        ClipScore,
        MatchConcepts,
        Balance,
        PseudoCaption,
        Recaption,
        Instruct,
    )
}
