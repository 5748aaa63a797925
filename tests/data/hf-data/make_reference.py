#!/usr/bin/env python3
"""Writes the reference expectations the Rust tests (tests/it/hf_data.rs) compare against.

1. selection_expected.json (and slices_expected.json: the rows `datasets` keeps for split
   slices like `train[10%:30%]`): for every layout and (config, split) query in selection_cases.json,
   the files the `datasets` library selects (`load_dataset_builder(...).config.data_files`), as
   paths relative to the repo root, and the builder module it infers (json, csv, parquet, ...),
   or the exception it raises.
2. chat_expected.json: for every chat template in chat/*.jinja and every conversation in
   chat/conversations.json, the text and token ids of transformers' `apply_chat_template`, and
   the rendering of every prefix the loss mask is built from.

Run with a Python that has datasets, transformers, jinja2 and tokenizers from PyPI (no hub
access needed):
    python3 -m venv /tmp/py && /tmp/py/bin/pip install datasets transformers jinja2 tokenizers
    /tmp/py/bin/python tests/data/hf-data/make_reference.py
"""
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write_file(root: Path, rel: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if rel.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": ["x"]}), path)
    elif rel.endswith(".csv"):
        path.write_text("text\nx\n")
    elif rel.endswith("config.json"):
        path.write_text("{}\n")
    else:
        path.write_text('{"text": "x"}\n')


def selection() -> dict:
    import datasets
    from datasets import load_dataset_builder

    datasets.disable_progress_bars()
    spec = json.loads((HERE / "selection_cases.json").read_text())
    out = {"datasets_version": datasets.__version__, "cases": {}}
    for case in spec["cases"]:
        with tempfile.TemporaryDirectory() as d:
            root = Path(d) / "repo"
            root.mkdir()
            for rel in case["files"]:
                write_file(root, rel)
            readme = case.get("readme")
            if readme is not None:
                (root / "README.md").write_text(readme)
            has_configs = readme is not None and "configs:" in readme
            results = []
            for config, split in case["queries"]:
                kwargs = {}
                if config is not None:
                    if has_configs:
                        kwargs["name"] = config
                    elif config == "default" and not (root / "default").is_dir():
                        pass
                    else:
                        kwargs["data_dir"] = config
                try:
                    builder = load_dataset_builder(str(root), **kwargs)
                    files = builder.config.data_files
                    module = type(builder).__module__.split(".")[-1]
                    if split not in files:
                        results.append({"error": "unknown split", "splits": sorted(str(s) for s in files)})
                        continue
                    rels = [os.path.relpath(f, root).replace(os.sep, "/") for f in files[split]]
                    results.append({"files": rels, "module": module})
                except Exception as e:  # the kind of failure is what is compared
                    results.append({"error": type(e).__name__, "message": str(e)[:300]})
            out["cases"][case["name"]] = results
    return out


SLICES = ["train[:2000]", "train[5:10]", "train[-3:]", "train[:-3]", "train[8:2]", "train[10%:]",
          "train[10%:30%]", "train[:50%]", "train[-25%:]", "train[33%:67%]", "train[1_0:]",
          "train[:50%](pct1_dropremainder)", "train[10%:20](closest)"]
SIZES = [0, 1, 7, 25, 99, 100, 250, 1001]


def slices() -> dict:
    """[from, to) of every slice in SLICES on splits of SIZES rows, as `datasets` computes it."""
    import datasets
    from datasets.arrow_reader import _rel_to_abs_instr, _str_to_read_instruction

    out = {"datasets_version": datasets.__version__, "rows": []}
    for spec in SLICES:
        rel = _str_to_read_instruction(spec)
        for n in SIZES:
            try:
                (a,) = [_rel_to_abs_instr(r, {"train": n}) for r in rel._relative_instructions]
                out["rows"].append({"spec": spec, "n": n, "from": a.from_, "to": a.to})
            except ValueError as e:
                out["rows"].append({"spec": spec, "n": n, "error": str(e)})
    return out


if __name__ == "__main__":
    which = sys.argv[1:] or ["selection", "slices", "chat"]
    if "slices" in which:
        (HERE / "slices_expected.json").write_text(json.dumps(slices(), indent=1) + "\n")
    if "selection" in which:
        (HERE / "selection_expected.json").write_text(json.dumps(selection(), indent=1) + "\n")
    if "chat" in which:
        from chat_reference import chat  # beside this file

        (HERE / "chat_expected.json").write_text(json.dumps(chat(HERE), indent=1) + "\n")
