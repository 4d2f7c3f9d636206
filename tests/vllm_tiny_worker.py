"""Run requests through the in-process vllm backend and the request cache, in the vLLM venv (without ray or pyarrow).

argv: model folder, cache file, requests JSON ({"requests": [Request dicts], "reask": text}), output JSON. Writes the
first pass's results and stats, a rerun's (same cache file, a fresh connection), a re-ask of the first answer (the
stage's follow-up turn after the image turn) and the first request's prompt tokens without its image.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from curation.synth.cache import RequestCache, run_cached
    from curation.synth.types import Request
    from curation.synth.vllm_backend import VLLMBackend, VLLMEngine

    model, cache_file, req_file, out_file = sys.argv[1:5]
    doc = json.loads(Path(req_file).read_text())
    reqs = [Request.model_validate(r) for r in doc["requests"]]
    # the transformers implementation: vLLM's own llava module needs torchvision, which this CPU venv lacks
    backend = VLLMBackend(
        model, VLLMEngine(dtype="float32", max_model_len=4096, enforce_eager=True, model_impl="transformers")
    )
    cache = RequestCache(cache_file)
    first = run_cached(backend, cache, reqs)
    stats1 = backend.stats()
    cache.close()
    good = [r for r, res in zip(reqs, first) if res.ok]
    cache = RequestCache(cache_file)
    rerun = run_cached(backend, cache, good)
    stats2 = backend.stats()
    rows = len(cache)
    cache.close()
    # the same conversations without their image: how many prompt tokens the image added
    text_only = [
        r.model_copy(
            update={
                "key": r.key + "-text",
                "messages": r.messages[:-1] + [{"role": "user", "content": r.messages[-1]["content"][0]["text"]}],
            }
        )
        for r in good[:1]
    ]
    plain = backend.run(text_only)
    again = good[0].model_copy(
        update={
            "key": good[0].key + "-reask",
            "messages": good[0].messages
            + [{"role": "assistant", "content": first[0].text}, {"role": "user", "content": doc["reask"]}],
        }
    )
    reask = backend.run([again])
    Path(out_file).write_text(
        json.dumps(
            {
                "first": [r.model_dump() for r in first],
                "stats1": stats1,
                "rerun": [r.model_dump() for r in rerun],
                "stats2": stats2,
                "cache_rows": rows,
                "text_only": [r.model_dump() for r in plain],
                "reask": [r.model_dump() for r in reask],
            }
        )
    )


if __name__ == "__main__":  # vLLM's engine may spawn processes, which re-import this file
    main()
