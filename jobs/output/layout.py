"""Where every object of a batch lives under ``OUT/BATCH/``: the one place a key is spelled.

Besides what users read (``images/``, ``results.jsonl``, ``failed.jsonl``, ``summary.json``,
``report.html``), a batch keeps:

    manifest.jsonl      the archived input, the backlog the feeder reads the window from
    .state/rejected.jsonl   the rows of lines rejected at submit
    .state/parts/CCCCCC.jsonl   the rows of finished lines whose index falls in chunk C
    .state/stored/CCCCCC.tsv    the fingerprints of chunk C's succeeded lines: what later
                                batches under the same output look up to reuse them
    .state/batch.json   what ``status`` and ``ls`` show once Redis has forgotten the batch
    .state/groups/G.json    a group of lines sent as one provider job (an OpenAI batch): its
                            lines and the job's id, saved before the job is created, so a
                            resume after Redis is lost finds the job instead of buying again
"""

from __future__ import annotations

STATE = ".state"
PARTS = f"{STATE}/parts"
STORED = f"{STATE}/stored"
GROUPS = f"{STATE}/groups"


def image_key(batch: str, line_id: str, k: int, extension: str) -> str:
    return f"{batch}/images/{line_id}/{k}.{extension}"


def results_key(batch: str) -> str:
    return f"{batch}/results.jsonl"


def failed_key(batch: str) -> str:
    return f"{batch}/failed.jsonl"


def summary_key(batch: str) -> str:
    return f"{batch}/summary.json"


def manifest_key(batch: str) -> str:
    return f"{batch}/manifest.jsonl"


def rejected_key(batch: str) -> str:
    return f"{batch}/{STATE}/rejected.jsonl"


def info_key(batch: str) -> str:
    return f"{batch}/{STATE}/batch.json"


def part_key(batch: str, chunk: int) -> str:
    return f"{batch}/{PARTS}/{chunk:06d}.jsonl"


def stored_key(batch: str, chunk: int) -> str:
    return f"{batch}/{STORED}/{chunk:06d}.tsv"


def group_key(batch: str, group: str) -> str:
    return f"{batch}/{GROUPS}/{group}.json"


def groups_prefix(batch: str) -> str:
    return f"{batch}/{GROUPS}/"
