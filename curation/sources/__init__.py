"""Reading what users already have: sharded URL lists, WebDataset tars, image Parquet, image folders, COCO.

`files` finds the input files (a file, a directory or a glob), `tables` streams tabular files in bounded memory,
`metadata` turns declared extra columns into typed row fields, `images` checks and measures image bytes, `coco`
parses COCO's JSON. The source ops (curation/ops/read_*.py, ingest) are built from these.
"""
