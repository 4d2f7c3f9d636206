"""dedup: exact duplicates by sha256, near duplicates by perceptual hash; one representative per group."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image as PILImage
from pydantic import Field

from curation.neardup import near_duplicate_groups, phash_u64, popcount64
from curation.ops.base import Op, Params
from curation.store import atomic_write_parquet, empty_rejects, make_rejects
from schemas import DedupedImage, arrow_schema


class DedupParams(Params):
    max_distance: int = Field(6, ge=0, le=32, description="pHash Hamming distance at or under which images are near duplicates")


class Dedup(Op):
    """Global step: hash every image, group, pick the largest image (then smallest uid) of each group."""

    name = "dedup"
    version = "1"
    Params = DedupParams
    output = DedupedImage
    has_analyze = True

    @property
    def groups_path(self):
        return self.work.parent / "groups.parquet"

    def analyze(self, table: pa.Table) -> pa.Table:
        hashes = []
        for data in table.column("image").to_pylist():
            with PILImage.open(io.BytesIO(data)) as im:
                hashes.append(phash_u64(im))
        pixels = pc.multiply(table.column("original_width").cast(pa.int64()), table.column("original_height").cast(pa.int64()))
        return pa.table({
            "uid": table.column("uid"), "sha256": table.column("sha256"),
            "phash": pa.array(hashes, pa.uint64()), "pixels": pixels,
        })

    def aggregate(self, summaries: pa.Table | None) -> None:
        """Assign every uid its group representative; write RUN/dedup/groups.parquet and one file per part."""
        if summaries is None or summaries.num_rows == 0:
            atomic_write_parquet(_groups_table([], [], [], [], [], [], []), self.groups_path)
            return
        # priority order: most pixels first, then smallest uid
        t = summaries.sort_by([("pixels", "descending"), ("uid", "ascending")])
        uid = np.array(t.column("uid").to_pylist(), dtype=object)
        sha = t.column("sha256").to_numpy(zero_copy_only=False)
        phash = t.column("phash").to_numpy()
        _, first, sha_idx = np.unique(sha, return_index=True, return_inverse=True)  # [U], [N]
        order = np.argsort(first)  # unique shas in priority order of their best row
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        labels = near_duplicate_groups(phash[first[order]], self.params.max_distance)  # [U] in priority order
        group_of_row = labels[rank[sha_idx]]  # smallest label = best-priority unique sha of the group
        rep_row = first[order][group_of_row]  # [N] row index of the representative
        size = np.bincount(group_of_row, minlength=len(order))[group_of_row]
        exact = sha == sha[rep_row]
        is_rep = rep_row == np.arange(len(uid))
        reason = np.where(is_rep, None, np.where(exact, "exact_duplicate", "near_duplicate"))
        dist = popcount64(phash ^ phash[rep_row])
        groups = _groups_table(uid.tolist(), uid[rep_row].tolist(), size, reason.tolist(), dist, phash, t.column("part"))
        atomic_write_parquet(groups, self.groups_path)
        groups = groups.sort_by("part")
        start = 0
        for item in pc.value_counts(groups.column("part")).to_pylist():  # first-seen order = sorted order
            atomic_write_parquet(groups.slice(start, item["counts"]), self.work / "groups" / f"{item['values']}.parquet")
            start += item["counts"]

    def process(self, part: str, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        if table.num_rows == 0:  # aggregate wrote no group file for an empty part
            return arrow_schema(DedupedImage).empty_table(), empty_rejects()
        g = pq.read_table(self.work / "groups" / f"{part}.parquet").drop_columns(["part"])
        hexes = pa.array([f"{h:016x}" for h in g.column("phash").to_pylist()], pa.string())
        g = g.set_column(g.schema.get_field_index("phash"), "phash", hexes)
        t = table.join(g, "uid").sort_by("uid")
        keep = pc.is_null(t.column("reason"))
        kept = t.filter(keep)
        out = kept.drop_columns(["rep_uid", "group_size", "reason", "distance"]).append_column(
            "dup_group", kept.column("rep_uid")).append_column("dup_count", kept.column("group_size").cast(pa.int32()))
        dups = t.filter(pc.invert(keep))
        details = [f"duplicate of {r} (phash distance {d})" for r, d in zip(dups.column("rep_uid").to_pylist(), dups.column("distance").to_pylist())]
        return out, make_rejects(dups, self.stage, dups.column("reason").to_pylist(), details)


def _groups_table(uid, rep, size, reason, dist, phash, part) -> pa.Table:
    return pa.table({
        "uid": pa.array(uid, pa.string()), "rep_uid": pa.array(rep, pa.string()),
        "group_size": pa.array(size, pa.int64()), "reason": pa.array(reason, pa.string()),
        "distance": pa.array(dist, pa.int32()), "phash": pa.array(phash, pa.uint64()), "part": pa.array(part, pa.string()),
    })
