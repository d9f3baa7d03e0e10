#!/usr/bin/env python3
"""Build allocsearch/data/demo: a deterministic subset of the shared datasets, in their original formats.

    python3 scripts/make_demo_data.py [--source ../shared/datasets] [--train 600] [--test 200]

Per task it keeps ``--train`` records of the train file and ``--test`` of the test file (SST-2, the task
the demo search runs on, keeps more: ``SST2_COUNTS``, so its validation split can tell allocations apart),
chosen by a
fixed-seed sample and written in original file order and format (JSON lists re-dumped with indent 4, which
reproduces the LLM-Adapters files byte for byte; TSV lines copied verbatim under the original header). It
then writes NOTICE (source and licence of every file), copies the ODC-By licence text, and checks that the
package readers read every written file. Running it twice gives identical files.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from allocsearch.data.tasks import get_task, read_task  # noqa: E402

DEMO_TASKS = ("arc_easy", "openbookqa", "boolq_llm_adapters", "sst2")
SST2_COUNTS = (3000, 872)  # train records, test records (the whole GLUE dev set)
ODC_BY = "LLM-Adapters-DATA_LICENSE.txt"

# Upstream dataset licences (from the shared datasets README and the datasets' own pages).
LICENCES = {
    "arc_easy": "LLM-Adapters data: ODC-By 1.0 (see ODC-By-1.0.txt). Upstream ARC (AI2 Reasoning "
                "Challenge, Allen Institute for AI): CC BY-SA 4.0.",
    "openbookqa": "LLM-Adapters data: ODC-By 1.0 (see ODC-By-1.0.txt). Upstream OpenBookQA (Allen Institute "
                  "for AI): its own terms; no licence is stated on its dataset card.",
    "boolq_llm_adapters": "LLM-Adapters data: ODC-By 1.0 (see ODC-By-1.0.txt). Upstream BoolQ (Google "
                          "Research, google-research-datasets/boolean-questions): CC BY-SA 3.0.",
    "sst2": "GLUE SST-2 (Stanford Sentiment Treebank, Socher et al. 2013, as distributed by GLUE): its own "
            "terms; neither the source repository nor GLUE states a licence for it.",
}


def sample_indices(n_total: int, n: int, key: str) -> list[int]:
    """``n`` of ``range(n_total)``, fixed by ``key``, in increasing order."""
    if n > n_total:
        raise SystemExit(f"{key}: asked for {n} records but the file has {n_total}")
    return sorted(random.Random(key).sample(range(n_total), n))


def subset_json(src: Path, dst: Path, n: int) -> int:
    records = json.loads(src.read_text(encoding="utf-8"))
    keep = sample_indices(len(records), n, f"demo/{src.parent.name}/{src.name}")
    dst.write_text(json.dumps([records[i] for i in keep], indent=4), encoding="utf-8")
    return len(keep)


def subset_tsv(src: Path, dst: Path, n: int, header: bool) -> int:
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    head, rows = (lines[:1], lines[1:]) if header else ([], lines)
    keep = sample_indices(len(rows), n, f"demo/{src.parent.name}/{src.name}")
    dst.write_text("".join(head + [rows[i] for i in keep]), encoding="utf-8")
    return len(keep)


def source_line(folder: Path) -> str:
    """The folder's SOURCE.txt on one line, without its leading 'source:'."""
    text = " ".join((folder / "SOURCE.txt").read_text(encoding="utf-8").split())
    return text.removeprefix("source:").strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--source", type=Path, default=REPO.parent / "shared" / "datasets")
    ap.add_argument("--out", type=Path, default=REPO / "allocsearch" / "data" / "demo")
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--test", type=int, default=200)
    args = ap.parse_args()
    if not args.source.is_dir():
        raise SystemExit(f"{args.source}: not found; pass --source pointing at the shared datasets folder")

    args.out.mkdir(parents=True, exist_ok=True)
    notice = [
        "allocsearch demo data",
        "=====================",
        "",
        "A deterministic subset of public benchmark files, kept in their original formats, made by",
        f"scripts/make_demo_data.py (--train {args.train} --test {args.test}, SST-2 {SST2_COUNTS[0]} and "
        f"{SST2_COUNTS[1]}: records sampled with a fixed seed,",
        "original order kept). The files are not covered by allocsearch's Apache-2.0 licence: each keeps the",
        "licence of its source, named below. The ODC-By 1.0 text of the LLM-Adapters data is in ODC-By-1.0.txt.",
        "Share-alike sources (CC BY-SA) stay under the same licence when redistributed. Each 'source' line",
        "quotes the SOURCE.txt of the shared datasets folder the file was taken from.",
        "",
    ]
    for name in DEMO_TASKS:
        task = get_task(name)
        src_dir, dst_dir = args.source / task.folder, args.out / task.folder
        dst_dir.mkdir(exist_ok=True)
        counts = []
        n_train, n_test = SST2_COUNTS if name == "sst2" else (args.train, args.test)
        for file, n in ((task.train_file, n_train), (task.test_file, n_test)):
            src, dst = src_dir / file, dst_dir / file
            if src.suffix == ".json":
                kept = subset_json(src, dst, n)
            else:
                kept = subset_tsv(src, dst, n, header=name != "cola")  # CoLA has no header
            counts.append(f"{task.folder}/{file} ({kept} of the source file's records)")
        notice += [f"{task.folder}/ (task {name})",
                   *[f"  file:    {c}" for c in counts],
                   f"  source:  {source_line(src_dir)}",
                   f"  licence: {LICENCES[name]}", ""]
        pools = read_task(name, args.out)  # the package readers must read what we wrote
        print(f"{name}: train {len(pools['train'])}, test {len(pools['test'])}")
    shutil.copyfile(args.source / "_licenses" / ODC_BY, args.out / "ODC-By-1.0.txt")
    (args.out / "NOTICE").write_text("\n".join(notice), encoding="utf-8")
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
