"""The balance op: global counts, partition-independent selection, reasons, coverage report."""

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from curation.concepts.vocab import make_table, write_vocab
from curation.ops.balance import Balance, BalanceParams
from schemas import Balanced, arrow_schema, conform


def _pool(n: int, seed: int = 0) -> pa.Table:
    """n images as the balance stage reads them (uid, alt-text, concepts): every 25th has no concept; of the rest
    60% only the head concept 0, 20% concepts 0 and 1, 20% one tail concept of 2..41 (plus a second one sometimes)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        r = rng.random()
        tail = {int(x) for x in rng.integers(2, 42, size=rng.integers(1, 3))}
        ids = [] if i % 25 == 0 else [0] if r < 0.6 else [0, 1] if r < 0.8 else sorted(tail)
        rows.append(
            {
                "uid": f"u{i:05d}",
                "url": f"http://127.0.0.1/{i}",
                "caption": f"photo {i}",
                "vocab": "v1",
                "concept_ids": sorted(ids),
            }
        )
    return pa.Table.from_pylist(rows)


def _run(tmp, pool: pa.Table, splits: list[int], **params):
    op = Balance(BalanceParams(**params), "balance", tmp / "_work")
    parts = {
        f"part-{i:05d}": pool.slice(a, b - a) for i, (a, b) in enumerate(zip([0] + splits, splits + [pool.num_rows]))
    }
    op.aggregate(
        pa.concat_tables(
            [op.analyze(t).append_column("part", pa.array([p] * t.num_rows, pa.string())) for p, t in parts.items()]
        )
    )
    outs, rejects = zip(*(op.process(p, t) for p, t in parts.items()))
    return op, pa.concat_tables([conform(o, Balanced, p) for o, p in zip(outs, parts)]), pa.concat_tables(rejects)


@pytest.mark.parametrize(
    "params", [{"method": "metaclip", "t": 10}, {"method": "inverse_frequency", "target_size": 200}]
)
def test_selection_does_not_depend_on_partitioning(tmp_path, params):
    pool = _pool(600)
    _, one, rej_one = _run(tmp_path / "a", pool, [], **params)
    _, many, rej_many = _run(tmp_path / "b", pool, [7, 100, 101, 450], **params)
    assert one.column("uid").to_pylist() == sorted(many.column("uid").to_pylist())
    assert one.num_rows + rej_one.num_rows == pool.num_rows == many.num_rows + rej_many.num_rows
    conform(one, Balanced, "test")
    if params["method"] == "inverse_frequency":
        assert one.num_rows == 200


def test_metaclip_rule_on_the_pool_and_reasons(tmp_path):
    pool = _pool(600)
    op, out, rej = _run(tmp_path, pool, [300], method="metaclip", t=10, seed=3)
    rep = op.report()
    counts = {}
    for ids in pool.column("concept_ids").to_pylist():
        for c in ids:
            counts[c] = counts.get(c, 0) + 1
    # hand-computed keep probability of each kept row: 1 - prod(1 - min(1, t / count))
    for ids, w in zip(out.column("concept_ids").to_pylist(), out.column("sample_weight").to_pylist()):
        assert w == pytest.approx(1 - np.prod([1 - min(1.0, 10 / counts[c]) for c in ids]))
    reasons = dict(zip(*np.unique(rej.column("reason").to_numpy(zero_copy_only=False), return_counts=True)))
    assert reasons["no_concepts"] == 24 and reasons["balanced_out"] > 0
    assert rep["t"] == 10 and rep["selected"] == out.num_rows and rep["pool"] == 600
    before, after = rep["coverage_before"], rep["coverage_after"]
    assert after["gini_present"] < before["gini_present"] and after["head_share_top1pct"] < before["head_share_top1pct"]
    assert after["entries_covered"] == before["entries_covered"]  # every tail entry (count < t... or near) survives
    cov = pa.parquet.read_table(op.coverage_path)
    assert cov.column("count_before").to_pylist()[0] == counts[0] and sum(cov.column("count_after").to_pylist()) == sum(
        len(x) for x in out.column("concept_ids").to_pylist()
    )


def test_target_fraction_and_vocab_texts(tmp_path):
    vocab = tmp_path / "vocab.parquet"
    write_vocab(make_table([f"concept {i}" for i in range(50)], "title"), vocab)
    op, out, _ = _run(tmp_path, _pool(500), [250], method="metaclip", target_fraction=0.5, vocab=str(vocab))
    rep = op.report()
    assert rep["n_concepts"] == 50 and abs(out.num_rows - rep["with_concepts"] / 2) < 0.1 * rep["with_concepts"]
    assert pa.parquet.read_table(op.coverage_path).column("text").to_pylist()[0] == "concept 0"


def test_params_need_exactly_one_target():
    with pytest.raises(ValidationError, match="exactly one of"):
        BalanceParams(method="metaclip")
    with pytest.raises(ValidationError, match="exactly one of"):
        BalanceParams(method="inverse_frequency", t=5)
    with pytest.raises(ValidationError, match="exactly one of"):
        BalanceParams(method="metaclip", t=5, target_size=3)


def test_empty_part_passes(tmp_path):
    op, out, rej = _run(tmp_path, _pool(100), [100], method="metaclip", t=5)
    assert out.num_rows + rej.num_rows == 100
    empty = pa.Table.from_pylist([], schema=_pool(1).schema)
    o, r = op.process("part-00009", empty)
    assert o.num_rows == r.num_rows == 0 and o.schema == arrow_schema(Balanced)
