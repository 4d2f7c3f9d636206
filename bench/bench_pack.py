"""Benchmark offline packing (gap-aware default, plain BFD): fill ratio and speed on LLaVA-like mixes vs baselines.

Mix `llava15` (default): LLaVA-1.5's instruction mix llava_v1_5_mix665k, per source as published in Liu et al.,
"Improved Baselines with Visual Instruction Tuning" (arXiv:2310.03744), appendix table "Instruction-following
Data Mixture of LLaVA-1.5": LLaVA 158K, ShareGPT 40K, VQAv2 83K, GQA 72K, OKVQA 9K, OCRVQA 80K, A-OKVQA 66K,
TextCaps 22K, RefCOCO 48K, VG 86K (total 665K; the table's rows sum to 664K by rounding). LLaVA-Instruct-158K
splits as its released files: conversation_58k, detail_23k, complex_reasoning_77k (haotian-liu/LLaVA docs/Data.md).
LLaVA-1.5 merges the questions of one image into one multi-turn sample, so an academic-VQA sample has about
(train questions / train images) turns: VQAv2 443,757 / 82,783 = 5.4; GQA balanced 943,000 / 72,140 = 13;
OKVQA 9,009 / 8,998 = 1; OCR-VQA 1,002,146 / 207,572 = 4.8. Refer/region sources (RefCOCO, VG) have no
published per-sample turn count in the mix: 6 and 8 turns are assumptions. 576 image tokens (CLIP ViT-L/336).

Length model per sample (tokens of a LLaMA-like tokenizer; assumptions, not measured on the real files):
    text = 35 (system prompt, Vicuna v1 template) + 1 (<image>) + sum over turns of (question + answer + 8)
    turns = 1 + Poisson(mean - 1), at most `max`; question and answer tokens uniform in [lo, hi] per turn;
    a short-answer prompt ("Answer the question using a single word or phrase.", 11 tokens) is in the question.

    source              K   image  turns mean/max   question     answer     notes
    llava_conversation  58    1      3.5 / 10        8 - 30      20 - 150
    llava_detail        23    1        1             8 - 20     100 - 300
    llava_complex       77    1        1            15 - 50      80 - 300
    sharegpt            40    0        -                -            -      whole sample lognormal(median 800,
                                                                            sigma 0.9) tokens, >= 20; long tail
    vqav2               83    1      5.4 / 20       16 - 26       1 - 3
    gqa                 72    1       13 / 30       19 - 36       1 - 3
    okvqa                9    1        1            19 - 31       1 - 4
    ocrvqa              80    1      4.8 / 10       17 - 23       1 - 20     book titles / authors as answers
    aokvqa              66    1        1            40 - 70       1         4 options + letter prompt
    textcaps            22    1        1            10 - 12      10 - 30
    refcoco             48    1        6 / 15       25 - 40       3 - 25    region description / box
    vg                  86    1        8 / 20       25 - 40       3 - 25    region description / box

Samples over max_len (the ShareGPT tail) are rejected by pack (too_long), as the trainer rejects them.

Mix `simple` (the earlier figure, kept for comparison): short VQA 35% (60-200 text tokens), captions 20%
(100-300), conversations 20% (300-1500), detail 10% (200-600), text only 14.5% (50-3500, no image), too long 0.5%
(3600-12000); all with one image except text only.

Reported with the fill ratio: the lower bounds on the number of sequences any packing needs, ceil(tokens /
max_len) and Martello-Toth L2 (which also counts samples longer than max_len / 2 that cannot share a row), so the
best fill any packer could reach is tokens / (bound x max_len). `pack`'s default method (gap_aware) is measured;
baselines, side by side on the same lengths: plain best-fit-decreasing (`pack(..., method="bfd")`), padded
batches (every sample padded to max_len) and a naive BFD scanning every open bin (same bins as `bfd`, checked;
timed on a smaller sample).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np

from trainer.pack import pack, sample_lengths, to_table

IMAGE_TOKENS = 576  # CLIP ViT-L/14 at 336 px: 24 x 24 patches, as in LLaVA-1.5
SYSTEM_TOKENS, TURN_TOKENS = 35, 8  # Vicuna v1 system prompt; "USER: ... ASSISTANT: ...</s>" per turn
LLAVA15 = [  # (source, thousands in mix665k, images, turns mean, turns max, question lo/hi, answer lo/hi)
    ("llava_conversation", 58, 1, 3.5, 10, 8, 30, 20, 150),
    ("llava_detail", 23, 1, 1, 1, 8, 20, 100, 300),
    ("llava_complex", 77, 1, 1, 1, 15, 50, 80, 300),
    ("sharegpt", 40, 0, 0, 0, 0, 0, 0, 0),  # lognormal whole-sample length, see SHAREGPT
    ("vqav2", 83, 1, 5.4, 20, 16, 26, 1, 3),
    ("gqa", 72, 1, 13, 30, 19, 36, 1, 3),
    ("okvqa", 9, 1, 1, 1, 19, 31, 1, 4),
    ("ocrvqa", 80, 1, 4.8, 10, 17, 23, 1, 20),
    ("aokvqa", 66, 1, 1, 1, 40, 70, 1, 1),
    ("textcaps", 22, 1, 1, 1, 10, 12, 10, 30),
    ("refcoco", 48, 1, 6, 15, 25, 40, 3, 25),
    ("vg", 86, 1, 8, 20, 25, 40, 3, 25),
]
SHAREGPT = (800, 0.9, 20)  # median tokens, sigma of log, minimum
MIX = [  # the earlier `simple` mix: (name, share, text lo, text hi, images)
    ("short_vqa", 0.35, 60, 200, 1),
    ("caption", 0.20, 100, 300, 1),
    ("conversation", 0.20, 300, 1500, 1),
    ("detail", 0.10, 200, 600, 1),
    ("text_only", 0.145, 50, 3500, 0),
    ("too_long", 0.005, 3600, 12000, 1),
]


def llava_like_lengths(n: int, seed: int = 0, image_tokens: int = IMAGE_TOKENS) -> np.ndarray:
    """Token lengths int64 [n] drawn from MIX (text tokens uniform per kind, images widened to image_tokens)."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(len(MIX), size=n, p=[m[1] for m in MIX])  # [n] index into MIX
    lo = np.array([m[2] for m in MIX])[kind]
    hi = np.array([m[3] for m in MIX])[kind]
    text = rng.integers(lo, hi + 1)  # [n] tokens, <image> tokens included
    images = np.array([m[4] for m in MIX])[kind]  # [n]
    return sample_lengths(text, images, image_tokens)


def llava15_lengths(n: int, seed: int = 0, image_tokens: int = IMAGE_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """Token lengths int64 [n] of the LLAVA15 length model (sources drawn by their mix665k share) and source
    index int64 [n]."""
    rng = np.random.default_rng(seed)
    share = np.array([m[1] for m in LLAVA15], dtype=np.float64)
    source = rng.choice(len(LLAVA15), size=n, p=share / share.sum())  # [n]
    text = np.zeros(n, dtype=np.int64)  # [n] text tokens, <image> included
    images = np.array([m[2] for m in LLAVA15])[source]  # [n]
    for k, (name, _, n_img, t_mean, t_max, q_lo, q_hi, a_lo, a_hi) in enumerate(LLAVA15):
        idx = np.flatnonzero(source == k)
        if name == "sharegpt":
            median, sigma, low = SHAREGPT
            text[idx] = np.maximum(low, np.round(median * np.exp(sigma * rng.standard_normal(idx.size))))
            continue
        turns = np.minimum(1 + rng.poisson(t_mean - 1, idx.size), t_max)  # [m]
        live = np.arange(t_max)[None, :] < turns[:, None]  # [m, t_max] which turns exist
        per_turn = (
            rng.integers(q_lo, q_hi + 1, (idx.size, t_max), dtype=np.int32)
            + rng.integers(a_lo, a_hi + 1, (idx.size, t_max), dtype=np.int32)
            + TURN_TOKENS
        )  # [m, t_max]
        text[idx] = SYSTEM_TOKENS + n_img + (per_turn * live).sum(axis=1)
    return sample_lengths(text, images, image_tokens), source


def sequence_lower_bounds(lengths: np.ndarray, max_len: int) -> dict:
    """Lower bounds on the sequences any packing of the fitting samples needs: ceil(sum / max_len) and
    Martello-Toth L2 (max over thresholds k <= max_len/2 of big + mid + the small tokens that cannot go in the
    mid samples' rooms, in whole sequences)."""
    x = np.sort(lengths[(lengths > 0) & (lengths <= max_len)])  # [m] ascending
    cum = np.concatenate([[0], np.cumsum(x)])  # [m+1]
    l1 = int(-(-int(cum[-1]) // max_len))
    half = max_len / 2
    ks = np.unique(x[x <= half])  # candidate thresholds: the small sizes
    ks = np.concatenate([[0], ks]) if ks.size else np.array([0])
    m, hi_half = x.size, np.searchsorted(x, half, side="right")  # x[hi_half:] > max_len / 2
    lo_mid = np.searchsorted(x, max_len - ks, side="right")  # x[lo_mid:] > max_len - k: big
    big = m - lo_mid
    mid = lo_mid - hi_half  # (max_len/2, max_len - k]
    mid_room = mid * max_len - (cum[lo_mid] - cum[hi_half])
    lo_small = np.searchsorted(x, ks, side="left")  # x[lo_small:hi_half] in [k, max_len/2]
    small = cum[hi_half] - cum[lo_small]
    extra = np.maximum(0, -(-(small - mid_room) // max_len))
    l2 = int((big + mid + extra).max())
    return {"by_tokens": l1, "l2": max(l1, l2)}


def naive_bfd(ids: list[str], lengths: np.ndarray, max_len: int) -> list[list[str]]:
    """Best-fit-decreasing by scanning every open bin per sample: O(samples x bins); bins of sample ids."""
    order = sorted((-int(n), i) for i, n in zip(ids, lengths) if 0 < n <= max_len)  # ties by id, as pack
    room = np.empty(len(order), dtype=np.int64)  # [bins] remaining tokens
    bins: list[list[str]] = []
    for neg, k in order:
        n = -neg
        fit = np.flatnonzero(room[: len(bins)] >= n)
        if fit.size:
            b = int(fit[np.argmin(room[fit])])  # smallest room, lowest bin on ties
        else:
            b = len(bins)
            bins.append([])
            room[b] = max_len
        bins[b].append(k)
        room[b] -= n
    return bins


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far, GiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(lengths: np.ndarray, max_len: int, seed: int) -> tuple[dict, list[str]]:
    """Pack `lengths` (timed), build the table (timed), compare with padding and the lower bounds; report, ids."""
    n = lengths.size
    ids = [f"llava/{k:09d}" for k in np.random.default_rng(seed + 1).permutation(n).tolist()]
    start, cpu = time.perf_counter(), time.process_time()
    result = pack(ids, lengths, max_len)
    pack_s, pack_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    rep = result.report()
    start = time.perf_counter()
    table = to_table(result)
    table_s = time.perf_counter() - start
    assert table.num_rows == rep["sequences"]
    fits = lengths[(lengths > 0) & (lengths <= max_len)]
    padded_fill = float(fits.mean() / max_len)  # every sample alone in a max_len row
    bounds = sequence_lower_bounds(lengths, max_len)
    start = time.perf_counter()
    bfd = pack(ids, lengths, max_len, "bfd").report()
    bfd_s = time.perf_counter() - start
    return {
        "n_samples": n,
        "max_len": max_len,
        "mean_length": round(float(fits.mean()), 1),
        "sequences": rep["sequences"],
        "rejected_too_long": rep["rejected"],
        "rejected_equals_too_long": rep["rejected"] == int((lengths > max_len).sum()),
        "fill_ratio": round(rep["fill_ratio"], 5),
        "fill_goal": 0.97,
        "min_sequences_by_tokens": bounds["by_tokens"],
        "min_sequences_l2": bounds["l2"],
        "best_possible_fill": round(rep["tokens"] / (bounds["l2"] * max_len), 5),
        "sequences_over_bound": round(rep["sequences"] / bounds["l2"] - 1, 5),
        "bfd_fill_ratio": round(bfd["fill_ratio"], 5),
        "bfd_sequences": bfd["sequences"],
        "bfd_s": round(bfd_s, 3),
        "padded_fill_ratio": round(padded_fill, 5),
        "fill_vs_padded": round(rep["fill_ratio"] / padded_fill, 2),
        "compression": round(rep["compression"], 3),
        "pack_s": round(pack_s, 3),
        "pack_cpu_s": round(pack_cpu_s, 3),
        "pack_goal_s": 30.0,
        "to_table_conform_s": round(table_s, 3),
    }, ids


def main() -> None:
    """Pack n samples of each mix, time it, compare with the bounds, padded and naive baselines, print a report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="samples per mix")
    ap.add_argument("--max-len", type=int, default=4096, help="tokens per packed sequence")
    ap.add_argument("--sample", type=int, default=100_000, help="samples in the naive-BFD comparison (llava15 mix)")
    ap.add_argument("--image-tokens", type=int, default=IMAGE_TOKENS, help="tokens per image of the vision tower")
    ap.add_argument("--mixes", default="llava15,simple", help="comma-separated: llava15, simple")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args()

    rows, naive_out = {}, None
    for mix in args.mixes.split(","):
        if mix == "llava15":
            lengths, source = llava15_lengths(args.n, args.seed, args.image_tokens)  # data preparation, not timed
        elif mix == "simple":
            lengths, source = llava_like_lengths(args.n, args.seed, args.image_tokens), None
        else:
            raise SystemExit(f"unknown mix {mix!r}: use llava15 or simple")
        rows[mix], ids = measure(lengths, args.max_len, args.seed)
        rows[mix]["image_tokens"] = args.image_tokens
        if source is not None:
            fits = (lengths > 0) & (lengths <= args.max_len)
            sharegpt = [m[0] for m in LLAVA15].index("sharegpt")
            rows[mix]["text_only_share"] = round(float((source == sharegpt)[fits].mean()), 4)
        if naive_out is None:  # the first mix: pack(bfd) vs a plain best-fit scan on a smaller sample, same bins
            m = min(args.sample, args.n)
            start = time.perf_counter()
            small = pack(ids[:m], lengths[:m], args.max_len, "bfd")
            small_s = time.perf_counter() - start
            start = time.perf_counter()
            naive = naive_bfd(ids[:m], lengths[:m], args.max_len)
            naive_s = time.perf_counter() - start
            naive_out = {
                "mix": mix,
                "naive_sample": m,
                "naive_bfd_s": round(naive_s, 3),
                "bfd_sample_s": round(small_s, 4),
                "speedup_vs_naive": round(naive_s / small_s, 1),
                "naive_same_bins": naive == [s for s, _ in small.sequences],
            }
    out = {
        "mixes": rows,
        "naive": naive_out,
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    if args.json:
        print(json.dumps(out))
        return
    for mix, r in rows.items():
        print(
            f"{mix}: packing {r['n_samples']:,} samples ({r['image_tokens']} image tokens, mean {r['mean_length']}"
            f" tokens) into {r['max_len']}"
        )
        print(
            f"  fill ratio     {r['fill_ratio']:.4f}  (goal >= 0.97)   best possible {r['best_possible_fill']:.4f}"
            f"   padded batches {r['padded_fill_ratio']:.4f}   ratio {r['fill_vs_padded']}x"
        )
        print(f"  plain BFD      fill {r['bfd_fill_ratio']:.4f}, {r['bfd_sequences']:,} sequences, {r['bfd_s']} s")
        print(
            f"  sequences      {r['sequences']:,}   lower bounds: tokens {r['min_sequences_by_tokens']:,},"
            f" L2 {r['min_sequences_l2']:,}   compression {r['compression']} samples/seq"
            f"   rejected too_long {r['rejected_too_long']:,}"
        )
        print(
            f"  pack time      {r['pack_s']} s wall, {r['pack_cpu_s']} s CPU  (goal < 30 s)"
            f"   to_table + conform {r['to_table_conform_s']} s"
        )
    print(f"peak RSS {out['peak_rss_gib']} GiB   load {out['loadavg']}")
    nv = naive_out
    print(
        f"naive BFD on {nv['naive_sample']:,} ({nv['mix']}): {nv['naive_bfd_s']} s vs pack(bfd) {nv['bfd_sample_s']} s"
        f" = {nv['speedup_vs_naive']}x, same bins: {nv['naive_same_bins']}"
    )


if __name__ == "__main__":
    main()
