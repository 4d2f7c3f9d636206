"""dedup: exact duplicates by sha256, near duplicates by perceptual hash; one representative per group.

Groups are greedy leader clusters in priority order (most pixels, then smallest uid): the best image not yet in a
group leads one and takes every image within max_distance of it whose 8x8 colour thumbnail is close too, so no image
is rejected against a representative farther than max_distance (connected components chained unrelated images) and
a pHash collision of different images is not a duplicate (issue 15). Plain images get exact-duplicate decisions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from curation.dedup.leaders import leader_groups
from curation.dedup.neardup import popcount64
from curation.dedup.signals import THUMB_BYTES, image_signals, is_plain, thumb_diff, thumb_matrix
from curation.engine.store import atomic_write_parquet, empty_rejects, make_rejects, write_per_part
from curation.ops.base import Op, Params
from schemas import Deduped, arrow_schema


class DedupParams(Params):
    max_distance: int = Field(
        6, ge=0, le=32, description="pHash Hamming distance at or under which images are near duplicates"
    )
    max_thumb_diff: int | None = Field(
        20,
        ge=0,
        le=255,
        description="a near duplicate must also look alike everywhere: no cell of the two 8x8 RGB thumbnails may "
        "differ by more than this in any channel (0-255); null: pHash alone decides",
    )
    min_detail: float = Field(
        2.0,
        ge=0,
        description="images whose 8x8 grey thumbnail varies less (standard deviation, 0-255) are too plain for a "
        "perceptual hash: exact duplicates only",
    )


class Dedup(Op):
    """Global step: hash every image, group, pick the largest image (then smallest uid) of each group."""

    name = "dedup"
    version = "3"  # 2: thin rows (uid, phash, group), the image in the source stage's rows; 3: leader groups
    Params = DedupParams
    output = Deduped

    @classmethod
    def required_columns(cls, params: DedupParams) -> set[str]:
        return {"uid", "image", "sha256", "original_width", "original_height"}

    @property
    def groups_path(self):
        return self.work.parent / "groups.parquet"

    def analyze(self, table: pa.Table) -> pa.Table:
        hashes, thumbs = [], []
        for data in table.column("image").to_pylist():
            h, thumb = image_signals(data)
            hashes.append(h)
            thumbs.append(thumb)
        pixels = pc.multiply(
            table.column("original_width").cast(pa.int64()), table.column("original_height").cast(pa.int64())
        )
        return pa.table(
            {
                "uid": table.column("uid"),
                "sha256": table.column("sha256"),
                "phash": pa.array(hashes, pa.uint64()),
                "thumb": pa.array(thumbs, pa.binary(THUMB_BYTES)),
                "pixels": pixels,
            }
        )

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
        best = first[order]  # [U] row of each unique sha, in priority order
        verify = self._verifier(t.column("thumb"), best) if self.params.max_thumb_diff is not None else None
        labels = leader_groups(phash[best], self.params.max_distance, verify=verify)  # [U] in priority order
        group_of_row = labels[rank[sha_idx]]  # smallest label = best-priority unique sha of the group
        rep_row = first[order][group_of_row]  # [N] row index of the representative
        size = np.bincount(group_of_row, minlength=len(order))[group_of_row]
        exact = sha == sha[rep_row]
        is_rep = rep_row == np.arange(len(uid))
        reason = np.where(is_rep, None, np.where(exact, "exact_duplicate", "near_duplicate"))
        dist = popcount64(phash ^ phash[rep_row])
        groups = _groups_table(
            uid.tolist(), uid[rep_row].tolist(), size, reason.tolist(), dist, phash, t.column("part")
        )
        atomic_write_parquet(groups, self.groups_path)
        write_per_part(groups, self.work / "groups")

    def _verifier(self, thumbs: pa.ChunkedArray, rows: np.ndarray):
        """verify(leader, candidates) over the unique shas: close in colour, and neither image too plain."""
        rgb = thumb_matrix(thumbs)[rows]  # [U, 192] uint8
        plain = is_plain(rgb, self.params.min_detail)  # [U]
        limit = self.params.max_thumb_diff

        def verify(leader: int, cand: np.ndarray) -> np.ndarray:
            return (thumb_diff(rgb[cand], rgb[leader]) <= limit) & ~plain[cand] & ~plain[leader]

        return verify

    def process(self, part: str, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        if table.num_rows == 0:  # aggregate wrote no group file for an empty part
            return arrow_schema(Deduped).empty_table(), empty_rejects()
        g = pq.read_table(self.work / "groups" / f"{part}.parquet")
        hexes = pa.array([f"{h:016x}" for h in g.column("phash").to_pylist()], pa.string())
        g = g.set_column(g.schema.get_field_index("phash"), "phash", hexes)
        t = table.join(g, "uid").sort_by("uid")
        keep = pc.is_null(t.column("reason"))
        kept = t.filter(keep)
        out = pa.table(
            {
                "uid": kept.column("uid"),
                "phash": kept.column("phash"),
                "dup_group": kept.column("rep_uid"),
                "dup_count": kept.column("group_size").cast(pa.int32()),
            }
        )
        dups = t.filter(pc.invert(keep))
        details = [
            f"duplicate of {r} (phash distance {d})"
            for r, d in zip(dups.column("rep_uid").to_pylist(), dups.column("distance").to_pylist())
        ]
        return out, make_rejects(dups, self.stage, dups.column("reason").to_pylist(), details)


def _groups_table(uid, rep, size, reason, dist, phash, part) -> pa.Table:
    return pa.table(
        {
            "uid": pa.array(uid, pa.string()),
            "rep_uid": pa.array(rep, pa.string()),
            "group_size": pa.array(size, pa.int64()),
            "reason": pa.array(reason, pa.string()),
            "distance": pa.array(dist, pa.int32()),
            "phash": pa.array(phash, pa.uint64()),
            "part": pa.array(part, pa.string()),
        }
    )
